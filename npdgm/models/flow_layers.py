"""Invertible flow layers and their masks, every backward by hand (the container is :mod:`npdgm.models.flows`).

Every layer is a :class:`~npdgm.nn.Module` with, for a batch of B rows of D features,

    forward(x)               x (B, D) -> (y (B, D), logdet (B,))     logdet = log|det dy/dx| per row
    backward(dy, dlogdet)    dy (B, D), dlogdet (B,) or None -> dx (B, D); accumulates parameter gradients
                             (need_dx=False: a coupling skips dx and returns None; the first layer)
    inverse(y, logdet=False) y (B, D) -> x (B, D)  (or (x, logdet_inv (B,)), logdet_inv = -logdet(x))
    inverse_backward(dx, dlogdet_inv) dx (B, D), dlogdet_inv (B,) or None -> dy (B, D): the backward
                             through the inverse (sampling-side losses)
    spec()                   -> JSON dict that rebuilds the layer (masks, permutation seeds included)

Context (conditional flows, p(x | c)): a coupling, MAF or IAF built with ``context_dim=C > 0`` takes a context
c (B, C) in ``forward(x, c)`` / ``inverse(y, logdet, c)``; c is concatenated to the conditioner's input (the
coupling net sees [x_a | c], the MADE [x | c] with c connected to every first-layer unit), and its
``backward`` / ``inverse_backward`` return (dx, dc) instead of dx (dc = the c-columns of the conditioner's
input gradient). Layers without a conditioner (ActNorm, Permutation, InvertibleLinear, ...) have
``context_dim = 0`` and never see c: the container :class:`~npdgm.models.flows.Flow` passes c to the
conditional layers only. Derivation: docs/conditional-flows.md.

A backward pairs with the latest forward (``backward``) or inverse (``inverse_backward``) call of
the same layer: the layer caches what it needs there.

Layers:  AdditiveCoupling (NICE), AffineCoupling (RealNVP, bounded scale), Permutation
(reverse / seeded random), Scaling (NICE's diagonal scaling), ActNorm (data-dependent init),
LogitTransform (x in [0, 1] -> logit space, with its log-det), InvertibleLinear (LU-parameterized
y = x W), SplineCoupling (rational-quadratic splines, linear tails). Masks: :func:`make_mask`.
MAF / IAF (MADE) are in :mod:`npdgm.models.autoregressive`.
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels import coupling as C
from ..kernels import spline as S
from ..nn import MLP
from ..nn.module import Module, Parameter
from ..validate import check_float, check_int

__all__ = ["FlowLayer", "AdditiveCoupling", "AffineCoupling", "Permutation", "Scaling", "ActNorm",
           "LogitTransform", "InvertibleLinear", "SplineCoupling", "make_mask", "build_layer", "check_context",
           "FLOW_LAYERS", "MASKS"]

MASKS = ("half", "alternate", "checkerboard", "channel")
FLOW_LAYERS = {}


def _layer(cls):
    FLOW_LAYERS[cls.__name__] = cls
    return cls


# -- masks -----------------------------------------------------------------------------------------
def make_mask(dim, mask="half", parity=0, image_shape=None):
    """Host bool array (dim,): True = conditioning part x_a (passed through), False = transformed x_b.

    half          first dim//2 features condition (parity 1: the rest condition)  -- NICE's split
    alternate     even indices condition (parity 1: odd)
    checkerboard  pixel (h, w) conditions when (h + w) % 2 == parity; ``image_shape`` (H, W) or (C, H, W)
    channel       the first C//2 channels condition (parity 1: the others); ``image_shape`` (C, H, W)
    list of 0/1   an arbitrary binary mask (1 = condition); parity 1 flips it
    """
    dim = check_int(dim, "dim")
    if dim < 2:
        raise ValueError(f"a coupling needs dim >= 2, got {dim}")
    if parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1, got {parity!r}")
    if isinstance(mask, str):
        if mask == "half":
            m = np.arange(dim) < dim // 2
        elif mask == "alternate":
            m = np.arange(dim) % 2 == 0
        elif mask in ("checkerboard", "channel"):
            if image_shape is None:
                raise ValueError(f"mask {mask!r} needs image_shape ((H, W) or (C, H, W))")
            shape = tuple(int(s) for s in image_shape)
            if len(shape) == 2:
                shape = (1, *shape)
            if len(shape) != 3 or int(np.prod(shape)) != dim:
                raise ValueError(f"image_shape {tuple(image_shape)} does not match dim {dim} "
                                 f"(expected (H, W) or (C, H, W) with product {dim})")
            c, h, w = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
            if mask == "checkerboard":
                m = ((h + w) % 2 == 0).ravel()
            else:
                if shape[0] < 2:
                    raise ValueError(f"a channel mask needs at least 2 channels, image_shape is {shape}")
                m = (c < shape[0] // 2).ravel()
        else:
            raise ValueError(f"unknown mask {mask!r}; expected one of {MASKS} or a list of 0/1")
    else:
        m = np.asarray(mask)
        if m.shape != (dim,):
            raise ValueError(f"mask has shape {m.shape} but the data has {dim} features; expected ({dim},)")
        if not np.all((m == 0) | (m == 1)):
            raise ValueError("mask must hold only 0 and 1 (1 = conditioning feature)")
        m = m.astype(bool)
    if parity == 1:
        m = ~m
    if m.all() or not m.any():
        raise ValueError("mask must have at least one conditioning (1) and one transformed (0) feature")
    return m


def _index(mask_bool):
    """A slice when the selected features are contiguous (views, no gather), else an index array."""
    idx = np.flatnonzero(mask_bool)
    if idx[-1] - idx[0] + 1 == idx.size:
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


_DEVICE_INDEX = {}  # (id of the host index array, array module name) -> (host array, device copy)


def _dev_index(idx, x):
    """``idx`` as an index on the device of ``x`` (slices as they are; index arrays copied once per device)."""
    if isinstance(idx, slice):
        return idx
    xp = backend.array_module(x)
    if xp is np:
        return idx
    key = (id(idx), xp.__name__)
    hit = _DEVICE_INDEX.get(key)
    if hit is None or hit[0] is not idx:
        hit = _DEVICE_INDEX[key] = (idx, xp.asarray(idx))
    return hit[1]


def check_scale_net(scale, scale_bound, hidden, seed):
    """The options of a layer whose network outputs a clamped log-scale (affine couplings, MAF/IAF),
    checked: ``(scale, scale_bound, hidden list, seed)``; ValueError/TypeError naming the bad one."""
    if scale not in C.SCALE_CLAMPS:
        raise ValueError(f"unknown scale clamp {scale!r}; expected one of {C.SCALE_CLAMPS}")
    return (scale, check_float(scale_bound, "scale_bound", lo=0, strict_lo=True),
            [check_int(h, "hidden size", lo=1) for h in hidden], check_int(seed, "seed", lo=0))


def check_context(owner, context, context_dim, rows):
    """A context c for a layer or flow ``owner`` (its name) built with ``context_dim``: (rows, context_dim) float
    array, or None when ``context_dim`` is 0; ValueError / TypeError naming what is wrong."""
    if not context_dim:
        if context is not None:
            raise ValueError(f"{owner} takes no context (built with context_dim=0), got one of shape "
                             f"{getattr(context, 'shape', type(context))}")
        return None
    if context is None:
        raise ValueError(f"{owner} is conditional (context_dim={context_dim}): pass a context of shape "
                         f"(batch, {context_dim})")
    if getattr(context, "ndim", None) != 2 or context.shape != (rows, context_dim):
        raise ValueError(f"context must have shape ({rows}, {context_dim}) (a row per example, "
                         f"context_dim={context_dim}), got {getattr(context, 'shape', type(context))}")
    if context.dtype.kind != "f":
        raise TypeError(f"context must be a float array, got dtype {context.dtype}")
    return context


def _check_input(name, x, dim):
    if getattr(x, "ndim", None) != 2:
        raise ValueError(f"{name} must be a 2-D array (batch, {dim}), got shape {getattr(x, 'shape', type(x))}")
    if x.shape[1] != dim:
        raise ValueError(f"{name} has {x.shape[1]} features but the flow expects {dim} (shape {x.shape})")
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")


# -- layers ----------------------------------------------------------------------------------------
class FlowLayer(Module):
    """Base of the invertible layers (see the module docstring for the protocol)."""

    context_dim = 0  # > 0: a conditional layer (forward/inverse take c, the backwards return (dx, dc))

    def __init__(self, dim):
        super().__init__()
        self.dim = check_int(dim, "dim", lo=1)
        self._mode = None

    def spec(self):
        """The JSON dict {"type": class name, **constructor arguments} that rebuilds the layer
        (:func:`build_layer`); plain values, no arrays."""
        raise NotImplementedError

    def _need(self, mode):
        if self._mode != mode:
            raise RuntimeError(f"{type(self).__name__}: {'backward' if mode == 'forward' else 'inverse_backward'} "
                               f"needs a preceding {mode} call (last call: {self._mode})")

    def buffers(self):
        """Non-trainable state that checkpoints must keep: {name: host array} (ActNorm: a 0-d flag);
        no buffers here."""
        return {}

    def load_buffers(self, bufs):
        """Restore what :meth:`buffers` returned ({name: host array}); nothing to restore here."""
        pass


class _Coupling(FlowLayer):
    """Shared mask handling: x_a = x[:, mask], x_b = x[:, ~mask]; and the conditioner's input, x_a or with a
    context [x_a | c] (net input size na + context_dim)."""

    def __init__(self, dim, mask, parity, image_shape, context_dim=0):
        super().__init__(dim)
        m = make_mask(dim, mask, parity, image_shape)
        self.mask_bool = m
        self.ia, self.ib = _index(m), _index(~m)
        self.na, self.nb = int(m.sum()), int((~m).sum())
        self.context_dim = check_int(context_dim, "context_dim", lo=0)
        self._mask_spec = dict(mask=mask if isinstance(mask, str) else [int(v) for v in mask], parity=int(parity),
                               image_shape=None if image_shape is None else [int(s) for s in image_shape])

    def _context_spec(self):
        """{"context_dim": C} for a conditional layer, {} otherwise (context-free specs stay as they were)."""
        return {"context_dim": self.context_dim} if self.context_dim else {}

    def _net_in(self, a, context):
        """The conditioner's input: x_a (B, na), or [x_a | c] (B, na + C) for a conditional layer."""
        context = check_context(type(self).__name__, context, self.context_dim, a.shape[0])
        return a if context is None else backend.array_module(a).concatenate([a, context], axis=1)

    def _net_back(self, dh, need_dx=True):
        """net's backward for the output gradient dh: (d x_a or None, dc or None); a conditional layer always
        needs the input gradient, whose last C columns are dc."""
        if not self.context_dim:
            return self.net.backward(dh, need_dx=need_dx), None
        dn = self.net.backward(dh, need_dx=True)
        return dn[:, :self.na], dn[:, self.na:]

    def _out(self, dx, dc):
        """What a backward returns: dx, or (dx, dc) for a conditional layer."""
        return (dx, dc) if self.context_dim else dx

    def _split(self, x):
        return x[:, _dev_index(self.ia, x)], x[:, _dev_index(self.ib, x)]

    def _merge(self, a, b):
        xp = backend.array_module(a)
        out = xp.empty((a.shape[0], self.dim), dtype=a.dtype)
        out[:, _dev_index(self.ia, a)] = a
        out[:, _dev_index(self.ib, a)] = b
        return out


@_layer
class AdditiveCoupling(_Coupling):
    """NICE coupling:  y_a = x_a,  y_b = x_b + m(x_a);  log|det| = 0 (unit triangular Jacobian).

    m is an MLP na -> hidden... -> nb. Backward:  dx_b = dy_b,  dx_a = dy_a + J_m^T dy_b.
    Inverse:  x_b = y_b - m(y_a);  its backward: dy_b = dx_b,  dy_a = dx_a + J_m^T (-dx_b).
    """

    def __init__(self, dim, mask="half", parity=0, hidden=(1000, 1000, 1000, 1000, 1000), activation="relu",
                 image_shape=None, init="torch", seed=0, context_dim=0):
        super().__init__(dim, mask, parity, image_shape, context_dim)
        hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
        seed = check_int(seed, "seed", lo=0)
        self.net = MLP(self.na + self.context_dim, hidden, self.nb, activation=activation, init=init, rng=seed)
        self._spec = dict(dim=self.dim, **self._mask_spec, hidden=hidden, activation=activation, init=init,
                          seed=seed, **self._context_spec())

    def spec(self):
        """The dict that rebuilds this coupling: {"type": "AdditiveCoupling", dim, mask, parity, hidden, ...}."""
        return {"type": "AdditiveCoupling", **self._spec}

    def forward(self, x, context=None):
        """y_a = x_a,  y_b = x_b + m(x_a [| c]);  logdet = 0.   x (B, D) -> (y (B, D), logdet (B,) zeros)."""
        xa, xb = self._split(x)
        yb = xb + self.net.forward(self._net_in(xa, context))
        self._mode = "forward"
        return self._merge(xa, yb), backend.array_module(x).zeros(x.shape[0], dtype=x.dtype)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx_b = dy_b;  dx_a = dy_a + m'(x_a)^T dy_b  (log-det is constant: dlogdet is unused).
        dy (B, D), dlogdet (B,) or None -> dx (B, D) (None with need_dx=False); m's gradients accumulate.
        Conditional: (dx, dc), dc = m'(c)^T dy_b."""
        self._need("forward")
        dya, dyb = self._split(dy)
        dm, dc = self._net_back(dyb, need_dx)
        return self._out(self._merge(dya + dm, dyb) if need_dx else None, dc)

    def inverse(self, y, logdet=False, context=None):
        """x_a = y_a,  x_b = y_b - m(y_a [| c]).   y (B, D) -> x (B, D), or (x, logdet_inv (B,) zeros) with
        ``logdet``."""
        ya, yb = self._split(y)
        xb = yb - self.net.forward(self._net_in(ya, context))
        self._mode = "inverse"
        x = self._merge(ya, xb)
        return (x, backend.array_module(y).zeros(y.shape[0], dtype=y.dtype)) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy_b = dx_b;  dy_a = dx_a + m'(y_a)^T (-dx_b)  (m's parameters receive the upstream gradient -dx_b).
        dx (B, D), dlogdet_inv (B,) or None (unused) -> dy (B, D) (conditional: (dy, dc), dc = m'(c)^T (-dx_b))."""
        self._need("inverse")
        dxa, dxb = self._split(dx)
        dm, dc = self._net_back(-dxb)
        return self._out(self._merge(dxa + dm, dxb), dc)


@_layer
class AffineCoupling(_Coupling):
    """RealNVP coupling:  y_a = x_a,  (raw, t) = net(x_a),  s = clamp(raw),  y_b = x_b * exp(s) + t,
    log|det| = sum_j s_j.

    net is an MLP na -> hidden... -> 2 nb whose first nb outputs are the raw log-scales and the
    last nb the shifts. ``scale`` bounds s: "tanh" s = b tanh(raw/b), "atan" s = (2b/pi) atan(raw/b),
    "none" s = raw (``scale_bound`` = b). Backward (kernels in ``npdgm.kernels.coupling``):
        dx_b = dy_b exp(s);  ds = dy_b x_b exp(s) + dlogdet;  dt = dy_b;  d raw = ds clamp'(raw)
        dx_a = dy_a + J_net^T [d raw | dt]
    """

    def __init__(self, dim, mask="half", parity=0, hidden=(256, 256), activation="relu", scale="tanh",
                 scale_bound=1.0, image_shape=None, init="torch", seed=0, context_dim=0):
        super().__init__(dim, mask, parity, image_shape, context_dim)
        scale, scale_bound, hidden, seed = check_scale_net(scale, scale_bound, hidden, seed)
        self.scale, self.scale_bound = scale, scale_bound
        self.net = MLP(self.na + self.context_dim, hidden, 2 * self.nb, activation=activation, init=init, rng=seed)
        self._spec = dict(dim=self.dim, **self._mask_spec, hidden=hidden, activation=activation, scale=scale,
                          scale_bound=self.scale_bound, init=init, seed=seed, **self._context_spec())

    def spec(self):
        """The dict that rebuilds this coupling: {"type": "AffineCoupling", dim, mask, parity, hidden, scale, ...}."""
        return {"type": "AffineCoupling", **self._spec}

    def _st(self, a, context):
        h = self.net.forward(self._net_in(a, context))
        raw, t = h[:, :self.nb], h[:, self.nb:]
        return raw, C.scale_clamp_forward(raw, self.scale, self.scale_bound), t

    def _dnet(self, ds, dt, raw, s, need_dx=True):
        """(d x_a, dc) through the net from (ds, dt): d raw = ds clamp'(raw), [d raw | dt] into the net."""
        xp = backend.array_module(ds)
        draw = C.scale_clamp_backward(ds, raw, s, self.scale, self.scale_bound)
        return self._net_back(xp.concatenate([draw, dt], axis=1), need_dx)

    def forward(self, x, context=None):
        """(raw, t) = net(x_a [| c]), s = clamp(raw);  y_a = x_a,  y_b = x_b exp(s) + t;  logdet = sum_j s_j.
        x (B, D) -> (y (B, D), logdet (B,))."""
        xa, xb = self._split(x)
        raw, s, t = self._st(xa, context)
        yb, ld = C.affine_coupling_forward(xb, s, t)
        self._cache = (xb, raw, s)
        self._mode = "forward"
        return self._merge(xa, yb), ld

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx_b = dy_b exp(s);  ds = dy_b x_b exp(s) + dlogdet;  dt = dy_b;  d raw = ds clamp'(raw);
        dx_a = dy_a + J_net^T [d raw | dt].   dy (B, D), dlogdet (B,) or None -> dx (B, D) (None with
        need_dx=False); net's gradients accumulate. Conditional: (dx, dc), dc the c-columns of J_net^T [d raw | dt]."""
        self._need("forward")
        xb, raw, s = self._cache
        dya, dyb = self._split(dy)
        dxb, ds, dt = C.affine_coupling_backward(dyb, dlogdet, xb, s)
        dm, dc = self._dnet(ds, dt, raw, s, need_dx)
        return self._out(self._merge(dya + dm, dxb) if need_dx else None, dc)

    def inverse(self, y, logdet=False, context=None):
        """(raw, t) = net(y_a [| c]);  x_a = y_a,  x_b = (y_b - t) exp(-s);  logdet_inv = -sum_j s_j.
        y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        ya, yb = self._split(y)
        raw, s, t = self._st(ya, context)
        xb, ld = C.affine_coupling_inverse(yb, s, t)
        self._cache = (xb, raw, s)
        self._mode = "inverse"
        x = self._merge(ya, xb)
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy_b = dx_b exp(-s);  dt = -dy_b;  ds = -dx_b x_b - dlogdet_inv;  dy_a = dx_a + J_net^T [d raw | dt].
        dx (B, D), dlogdet_inv (B,) or None -> dy (B, D); net's gradients accumulate (conditional: (dy, dc))."""
        self._need("inverse")
        xb, raw, s = self._cache
        dxa, dxb = self._split(dx)
        dyb, ds, dt = C.affine_coupling_inverse_backward(dxb, dlogdet, xb, s)
        dm, dc = self._dnet(ds, dt, raw, s)
        return self._out(self._merge(dxa + dm, dyb), dc)


@_layer
class Permutation(FlowLayer):
    """y = x[:, perm] with perm = reversed order ("reverse") or a seeded random permutation ("random").
    log|det| = 0;  dx = dy[:, perm^-1];  inverse x = y[:, perm^-1], its backward dy = dx[:, perm]."""

    def __init__(self, dim, kind="reverse", seed=0):
        super().__init__(dim)
        seed = check_int(seed, "seed", lo=0)
        if kind == "reverse":
            perm = np.arange(self.dim)[::-1].copy()
        elif kind == "random":
            perm = np.random.default_rng(seed).permutation(self.dim)
        else:
            raise ValueError(f"unknown permutation kind {kind!r}; expected 'reverse' or 'random'")
        self.kind, self.seed = kind, seed
        self.perm, self.inv = perm, np.argsort(perm)

    def spec(self):
        """The dict that rebuilds this permutation: {"type": "Permutation", dim, kind, seed}."""
        return {"type": "Permutation", "dim": self.dim, "kind": self.kind, "seed": self.seed}

    def _take(self, a, idx):
        return a[:, _dev_index(idx, a)]

    def forward(self, x):
        """y = x[:, perm];  logdet = 0.   x (B, D) -> (y (B, D), logdet (B,) zeros)."""
        self._mode = "forward"
        return self._take(x, self.perm), backend.array_module(x).zeros(x.shape[0], dtype=x.dtype)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = dy[:, perm^-1] (no parameters; dlogdet unused).   dy (B, D), dlogdet (B,) or None -> dx (B, D)."""
        return self._take(dy, self.inv)

    def inverse(self, y, logdet=False):
        """x = y[:, perm^-1].   y (B, D) -> x (B, D), or (x, logdet_inv (B,) zeros) with ``logdet``."""
        self._mode = "inverse"
        x = self._take(y, self.inv)
        return (x, backend.array_module(y).zeros(y.shape[0], dtype=y.dtype)) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy = dx[:, perm] (dlogdet_inv unused).   dx (B, D), dlogdet_inv (B,) or None -> dy (B, D)."""
        return self._take(dx, self.perm)


@_layer
class Scaling(FlowLayer):
    """NICE's diagonal scaling:  y = x * exp(log_scale),  log|det| = sum_d log_scale_d  (log_scale starts at 0)."""

    def __init__(self, dim):
        super().__init__(dim)
        self.log_scale = Parameter(backend.to_device(np.zeros(self.dim), backend.get_dtype()))

    def spec(self):
        """The dict that rebuilds this layer: {"type": "Scaling", dim}."""
        return {"type": "Scaling", "dim": self.dim}

    def forward(self, x):
        """y = x exp(ls);  logdet = sum_d ls_d (the same for every row).   x (B, D) -> (y (B, D), logdet (B,))."""
        self._x, self._mode = x, "forward"
        return C.diag_scale_forward(x, self.log_scale.data)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = dy exp(ls);  d ls += sum_B dy x exp(ls) + sum_B dlogdet.
        dy (B, D), dlogdet (B,) or None -> dx (B, D); log_scale (D,) gradient accumulates."""
        self._need("forward")
        dx, dls = C.diag_scale_backward(dy, dlogdet, self._x, self.log_scale.data)
        self.log_scale.grad += dls
        return dx

    def inverse(self, y, logdet=False):
        """x = y exp(-ls);  logdet_inv = -sum_d ls_d.
        y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        x, ld = C.diag_scale_inverse(y, self.log_scale.data)
        self._x, self._mode = x, "inverse"
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy = dx exp(-ls);  d ls += -sum_B dx x - sum_B dlogdet_inv.
        dx (B, D), dlogdet_inv (B,) or None -> dy (B, D); log_scale (D,) gradient accumulates."""
        self._need("inverse")
        dy, dls = C.diag_scale_inverse_backward(dx, dlogdet, self._x, self.log_scale.data)
        self.log_scale.grad += dls
        return dy


@_layer
class ActNorm(FlowLayer):
    """Glow's activation normalization:  y = (x + loc) * exp(log_scale),  log|det| = sum_d log_scale_d.

    Data-dependent initialization: the first ``forward`` on an uninitialized layer sets
    loc = -mean(x), log_scale = -log(std(x) + eps) over its batch, so y starts with zero mean and unit
    variance per feature; the ``initialized`` flag is saved with the weights (see :meth:`Flow.state_dict`).
    Backward (u = x + loc):  dx = dy exp(ls),  d loc = sum_B dy exp(ls),  d ls = sum_B dy y + sum_B dlogdet.
    """

    def __init__(self, dim, eps=1e-6):
        super().__init__(dim)
        dt = backend.get_dtype()
        self.eps = check_float(eps, "eps", lo=0)
        self.loc = Parameter(backend.to_device(np.zeros(self.dim), dt))
        self.log_scale = Parameter(backend.to_device(np.zeros(self.dim), dt))
        self.initialized = False

    def spec(self):
        """The dict that rebuilds this layer: {"type": "ActNorm", dim, eps} (the init flag is a buffer)."""
        return {"type": "ActNorm", "dim": self.dim, "eps": self.eps}

    def buffers(self):
        """{"initialized": 0-d host array, 1.0 once the data-dependent init ran} (saved with the weights)."""
        return {"initialized": np.array(1.0 if self.initialized else 0.0, dtype=np.dtype(self.loc.data.dtype))}

    def load_buffers(self, bufs):
        """Restore the init flag from {"initialized": 0-d array} (nonzero = initialized)."""
        self.initialized = bool(np.asarray(bufs["initialized"]) != 0)

    def initialize(self, x):
        """Set loc = -mean_B x and log_scale = -log(std_B x + eps) (each (D,)) from the batch x (B, D), B >= 2,
        and mark the layer initialized."""
        if x.shape[0] < 2:
            raise ValueError(f"ActNorm data-dependent init needs a batch of at least 2 rows, got {x.shape[0]}")
        xp = backend.array_module(x)
        self.loc.data[...] = -x.mean(axis=0)
        self.log_scale.data[...] = -xp.log(x.std(axis=0) + self.eps)
        self.initialized = True

    def forward(self, x):
        """u = x + loc,  y = u exp(ls);  logdet = sum_d ls_d (the first call on an uninitialized layer runs
        :meth:`initialize` on x first).   x (B, D) -> (y (B, D), logdet (B,))."""
        if not self.initialized:
            self.initialize(x)
        u = x + self.loc.data
        self._u, self._mode = u, "forward"
        return C.diag_scale_forward(u, self.log_scale.data)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = du = dy exp(ls);  d loc += sum_B du;  d ls += sum_B dy y + sum_B dlogdet.
        dy (B, D), dlogdet (B,) or None -> dx (B, D); loc, log_scale (D,) gradients accumulate."""
        self._need("forward")
        du, dls = C.diag_scale_backward(dy, dlogdet, self._u, self.log_scale.data)
        self.log_scale.grad += dls
        self.loc.grad += du.sum(axis=0)
        return du

    def inverse(self, y, logdet=False):
        """x = y exp(-ls) - loc;  logdet_inv = -sum_d ls_d (an uninitialized layer is used as it stands: the
        identity).   y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        u, ld = C.diag_scale_inverse(y, self.log_scale.data)
        self._u, self._mode = u, "inverse"
        x = u - self.loc.data
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """x = u - loc, u = y exp(-ls):  d loc -= sum_B dx;  dy, d ls from the diagonal-scale inverse backward.
        dx (B, D), dlogdet_inv (B,) or None -> dy (B, D); loc, log_scale (D,) gradients accumulate."""
        self._need("inverse")
        dy, dls = C.diag_scale_inverse_backward(dx, dlogdet, self._u, self.log_scale.data)
        self.log_scale.grad += dls
        self.loc.grad -= dx.sum(axis=0)
        return dy


@_layer
class LogitTransform(FlowLayer):
    """x in [0, 1] -> y = logit(alpha + (1 - 2 alpha) x) with its log-det (no parameters), so a flow on
    logit space still reports the density of the data in [0, 1]^D (bits/dim stay comparable)."""

    def __init__(self, dim, alpha=0.05):
        super().__init__(dim)
        alpha = check_float(alpha, "alpha")
        if not 0 <= alpha < 0.5:
            raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def spec(self):
        """The dict that rebuilds this layer: {"type": "LogitTransform", dim, alpha}."""
        return {"type": "LogitTransform", "dim": self.dim, "alpha": self.alpha}

    def forward(self, x):
        """p = a + (1 - 2a) x,  y = log p - log(1 - p);  logdet = sum_d log(1 - 2a) - log p - log(1 - p).
        x (B, D) in [0, 1] -> (y (B, D), logdet (B,))."""
        self._x, self._mode = x, "forward"
        return C.logit_forward(x, self.alpha)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = (1 - 2a) / (p (1 - p)) (dy + dlogdet (2p - 1)),  p = a + (1 - 2a) x  (no parameters).
        dy (B, D), dlogdet (B,) or None -> dx (B, D)."""
        self._need("forward")
        return C.logit_backward(dy, dlogdet, self._x, self.alpha)

    def inverse(self, y, logdet=False):
        """x = (sigmoid(y) - a) / (1 - 2a);  logdet_inv = -logdet(x).
        y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        self._y, self._mode = y, "inverse"
        x, ld = C.logit_inverse(y, self.alpha)
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy = dx p (1 - p) / (1 - 2a) + dlogdet_inv (1 - 2p),  p = sigmoid(y)  (no parameters).
        dx (B, D), dlogdet_inv (B,) or None -> dy (B, D)."""
        self._need("inverse")
        return C.logit_inverse_backward(dx, dlogdet, self._y, self.alpha)


def build_layer(spec):
    """A layer from its :meth:`FlowLayer.spec` dict."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in FLOW_LAYERS:
        raise ValueError(f"unknown flow layer type {kind!r}; expected one of {sorted(FLOW_LAYERS)}")
    return FLOW_LAYERS[kind](**spec)


# -- invertible linear layer, LU-parameterized (Glow's 1x1 convolution for vectors) -------------------------
def _lu_pivot(W):
    """Host LU with partial pivoting of a square W: (perm (D,), L unit lower, U upper) with W[perm] = L @ U."""
    A = np.array(W, dtype=np.float64)
    n = A.shape[0]
    perm, L = np.arange(n), np.eye(n)
    for k in range(n):
        p = k + int(np.argmax(np.abs(A[k:, k])))
        A[[k, p]], perm[[k, p]], L[[k, p], :k] = A[[p, k]], perm[[p, k]], L[[p, k], :k]
        L[k + 1:, k] = A[k + 1:, k] / A[k, k]
        A[k + 1:] -= L[k + 1:, k:k + 1] * A[k]
    return perm, L, np.triu(A)


@_layer
class InvertibleLinear(FlowLayer):
    """y = x W with W = P L (U + diag(s)) (D, D): P a fixed permutation, L unit lower triangular, U strictly
    upper triangular, s = sign * exp(log_s) (sign fixed at init); log|det W| = sum_d log_s_d for every row.

    Parameters ``L`` and ``U`` are full (D, D) arrays of which only the strict lower / strict upper triangle
    is used (the other entries get zero gradient), and ``log_s`` (D,). With perm the index form of P
    (P_ij = 1 iff i = perm[j]):  a = x[:, perm],  b = a L1 (L1 = tril(L, -1) + I),  y = b U1 (U1 = triu(U, 1) +
    diag(s)). Backward:  dU1 = b^T dy, db = dy U1^T, dL1 = a^T db, da = db L1^T, dx = da[:, perm^-1];
    d log_s = diag(dU1) * s + sum_B dlogdet. Inverse: two triangular solves, b = y U1^-1, a = b L1^-1.
    Initialized from the LU of a seeded random rotation (W starts orthogonal). ``perm`` and ``sign`` are
    part of the spec (they are not trained)."""

    def __init__(self, dim, seed=0, perm=None, sign=None):
        super().__init__(dim)
        seed = check_int(seed, "seed", lo=0)
        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((self.dim, self.dim)))
        p0, L0, U0 = _lu_pivot(q * np.sign(np.diag(r)))
        perm = p0 if perm is None else np.asarray(perm, dtype=np.int64)
        if sorted(perm.tolist()) != list(range(self.dim)):
            raise ValueError(f"perm must be a permutation of 0..{self.dim - 1}, got {perm.tolist()}")
        sign = np.sign(np.diag(U0)) if sign is None else np.asarray(sign, dtype=np.float64)
        if sign.shape != (self.dim,) or not np.all(np.abs(sign) == 1):
            raise ValueError(f"sign must be {self.dim} values of +1 or -1, got {np.asarray(sign).tolist()}")
        self.seed, self.perm, self.inv, self.sign_host = seed, perm, np.argsort(perm), sign
        dt = backend.get_dtype()
        self.L = Parameter(backend.to_device(np.tril(L0, -1), dt))
        self.U = Parameter(backend.to_device(np.triu(U0, 1), dt))
        self.log_s = Parameter(backend.to_device(np.log(np.abs(np.diag(U0))), dt))
        self._consts = {}

    def spec(self):
        """The dict that rebuilds this layer: {"type": "InvertibleLinear", dim, seed, perm, sign}."""
        return {"type": "InvertibleLinear", "dim": self.dim, "seed": self.seed,
                "perm": [int(v) for v in self.perm], "sign": [int(v) for v in self.sign_host]}

    def _tri(self):
        """(L1, U1, s) on the parameters' device: unit lower L1, upper U1 with diagonal s."""
        xp = backend.array_module(self.L.data)
        key = (xp.__name__, self.L.data.dtype.str)
        if key not in self._consts:
            n = self.dim
            self._consts = {key: (xp.asarray(np.tril(np.ones((n, n)), -1), dtype=self.L.data.dtype),
                                  xp.asarray(np.triu(np.ones((n, n)), 1), dtype=self.L.data.dtype),
                                  xp.eye(n, dtype=self.L.data.dtype),
                                  xp.asarray(self.sign_host, dtype=self.L.data.dtype))}
        lo, up, eye, sign = self._consts[key]
        s = sign * xp.exp(self.log_s.data)
        return self.L.data * lo + eye, self.U.data * up + s * eye, s, lo, up

    def _logdet(self, x, sgn):
        xp = backend.array_module(x)
        return xp.zeros(x.shape[0], dtype=x.dtype) + sgn * self.log_s.data.sum()

    def _grads(self, dL1, dU1, s, lo, up, dld_total):
        xp = backend.array_module(dL1)
        self.L.grad += dL1 * lo
        self.U.grad += dU1 * up
        self.log_s.grad += xp.diagonal(dU1) * s + dld_total

    def forward(self, x):
        """a = x[:, perm], b = a L1, y = b U1;  logdet = sum_d log_s_d.   x (B, D) -> (y (B, D), logdet (B,))."""
        L1, U1, _, _, _ = self._tri()
        a = x[:, _dev_index(self.perm, x)]
        b = a @ L1
        self._cache, self._mode = (a, b), "forward"
        return b @ U1, self._logdet(x, 1)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dU1 = b^T dy, db = dy U1^T, dL1 = a^T db, dx = (db L1^T)[:, perm^-1]; d log_s = diag(dU1) s +
        sum_B dlogdet.   dy (B, D), dlogdet (B,) or None -> dx (B, D); L, U, log_s gradients accumulate."""
        self._need("forward")
        a, b = self._cache
        L1, U1, s, lo, up = self._tri()
        db = dy @ U1.T
        self._grads(a.T @ db, b.T @ dy, s, lo, up, 0 if dlogdet is None else dlogdet.sum())
        return (db @ L1.T)[:, _dev_index(self.inv, dy)]

    def inverse(self, y, logdet=False):
        """b = y U1^-1, a = b L1^-1 (two triangular solves), x = a[:, perm^-1];  logdet_inv = -sum_d log_s_d.
        y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        xp = backend.array_module(y)
        L1, U1, _, _, _ = self._tri()
        b = xp.linalg.solve(U1.T, y.T).T
        a = xp.linalg.solve(L1.T, b.T).T
        self._cache, self._mode = (a, b), "inverse"
        x = a[:, _dev_index(self.inv, y)]
        return (x, self._logdet(y, -1)) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """da = dx[:, perm], db = da L1^-T, dL1 = -a^T db, dy = db U1^-T, dU1 = -b^T dy;
        d log_s = diag(dU1) s - sum_B dlogdet_inv.   dx (B, D), dlogdet_inv (B,) or None -> dy (B, D);
        L, U, log_s gradients accumulate."""
        self._need("inverse")
        xp = backend.array_module(dx)
        a, b = self._cache
        L1, U1, s, lo, up = self._tri()
        da = dx[:, _dev_index(self.perm, dx)]
        db = xp.linalg.solve(L1, da.T).T
        dy = xp.linalg.solve(U1, db.T).T
        self._grads(-(a.T @ db), -(b.T @ dy), s, lo, up, 0 if dlogdet is None else -dlogdet.sum())
        return dy


# -- rational-quadratic spline coupling (Durkan et al. 2019), linear tails: kernels in npdgm/kernels/spline.py --
@_layer
class SplineCoupling(_Coupling):
    """Rational-quadratic spline coupling (Durkan et al. 2019):  y_a = x_a,  y_b = g(x_b; net(x_a)), a monotone
    rational-quadratic spline of ``bins`` bins on [-bound, bound] and the identity outside (linear tails, slope
    1, matched by d_0 = d_K = 1);  log|det| = sum_j log g'(x_b,j) (0 in the tails).

    net: MLP na -> hidden... -> nb (3 bins - 1), per transformed feature [widths K | heights K | interior
    derivatives K - 1] (softmax, softmax, min_derivative + softplus(u + c), c such that u = 0 gives slope 1).
    The inverse solves the quadratic a xi^2 + b xi + c = 0 in its stable form xi = 2c / (-b - sqrt(b^2 - 4ac)).
    The kernels (knot map, bin search, spline and inverse, their backwards) are in :mod:`npdgm.kernels.spline`;
    backward: spline backward -> knot-map backward -> net.
    """

    def __init__(self, dim, mask="half", parity=0, hidden=(64, 64), activation="relu", bins=8, bound=3.0,
                 min_width=1e-3, min_height=1e-3, min_derivative=1e-3, image_shape=None, init="torch", seed=0,
                 identity_init=False, context_dim=0):
        super().__init__(dim, mask, parity, image_shape, context_dim)
        self.bins = check_int(bins, "bins", lo=2)
        self.bound = check_float(bound, "bound", lo=0, strict_lo=True)
        self.min_width = check_float(min_width, "min_width", lo=0)
        self.min_height = check_float(min_height, "min_height", lo=0)
        self.min_derivative = check_float(min_derivative, "min_derivative", lo=0)
        if self.min_derivative >= 1:
            raise ValueError(f"min_derivative must be < 1 (the tails' slope), got {self.min_derivative}")
        if self.bins * max(self.min_width, self.min_height) >= 1:
            raise ValueError(f"bins * min_width and bins * min_height must be < 1, got bins={self.bins}, "
                             f"min_width={self.min_width}, min_height={self.min_height}")
        hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
        seed = check_int(seed, "seed", lo=0)
        self.net = MLP(self.na + self.context_dim, hidden, self.nb * (3 * self.bins - 1), activation=activation,
                       init=init, rng=seed)
        if identity_init:  # the last layer starts at 0: u = 0, the identity spline (Glow's zero-initialized output)
            last = self.net.layers[-1]
            last.W.data[...], last.b.data[...] = 0, 0
        self._spec = dict(dim=self.dim, **self._mask_spec, hidden=hidden, activation=activation, bins=self.bins,
                          bound=self.bound, min_width=self.min_width, min_height=self.min_height,
                          min_derivative=self.min_derivative, init=init, seed=seed, **self._context_spec())
        if identity_init:
            self._spec["identity_init"] = True

    def spec(self):
        """The dict that rebuilds this coupling: {"type": "SplineCoupling", dim, mask, parity, hidden, bins, ...}."""
        return {"type": "SplineCoupling", **self._spec}

    def _knots(self, a, context):
        """(u (B, nb, 3K - 1), knots (xk, yk, d)) of the conditioning half a (and the context c)."""
        u = self.net.forward(self._net_in(a, context)).reshape(a.shape[0], self.nb, 3 * self.bins - 1)
        return u, S.rq_knots_forward(u, self.bound, self.min_width, self.min_height, self.min_derivative)

    def _dnet(self, u, dknots, need_dx=True):
        """(d x_a, dc) through the knot map and the net."""
        du = S.rq_knots_backward(*dknots, u, self.bound, self.min_width, self.min_height, self.min_derivative)
        return self._net_back(du.reshape(du.shape[0], -1), need_dx)

    def _dlog(self, dlogdet, like):
        """dL/dlog g' per element (B, nb) from dL/dlogdet (B,) (zeros for None)."""
        xp = backend.array_module(like)
        return xp.zeros_like(like) if dlogdet is None else xp.broadcast_to(dlogdet[:, None], like.shape)

    def forward(self, x, context=None):
        """knots = net(x_a [| c]);  y_a = x_a,  y_b = g(x_b);  logdet = sum_j log g'(x_b,j).
        x (B, D) -> (y (B, D), logdet (B,))."""
        xa, xb = self._split(x)
        u, knots = self._knots(xa, context)
        yb, logg = S.rq_spline_forward(xb, *knots)
        self._cache, self._mode = (xb, u, knots), "forward"
        return self._merge(xa, yb), logg.sum(axis=1)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx_b = dy_b g' + dlogdet d log g'/dx_b (identity in the tails);  the knots' gradients from
        :func:`~npdgm.kernels.spline.rq_spline_backward` -> knot map backward -> net:  dx_a = dy_a + J_net^T du.
        dy (B, D), dlogdet (B,) or None -> dx (B, D) (None with need_dx=False); net's gradients accumulate.
        Conditional: (dx, dc)."""
        self._need("forward")
        xb, u, knots = self._cache
        dya, dyb = self._split(dy)
        dxb, *dknots = S.rq_spline_backward(dyb, self._dlog(dlogdet, dyb), xb, *knots)
        dm, dc = self._dnet(u, dknots, need_dx)
        return self._out(self._merge(dya + dm, dxb) if need_dx else None, dc)

    def inverse(self, y, logdet=False, context=None):
        """knots = net(y_a [| c]);  x_a = y_a,  x_b = g^-1(y_b) (the quadratic's stable root);  logdet_inv =
        -sum_j log g'(x_b,j).   y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        ya, yb = self._split(y)
        u, knots = self._knots(ya, context)
        xb, ldi = S.rq_spline_inverse(yb, *knots)
        self._cache, self._mode = (xb, u, knots), "inverse"
        x = self._merge(ya, xb)
        return (x, ldi.sum(axis=1)) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """x_b = g^-1(y_b), logdet_inv = -sum_j log g'(x_b):  dy_b = (dx_b - dlogdet_inv d log g'/dx) / g';
        the knots get the forward backward's gradients with (-dy_b, -dlogdet_inv)
        (:func:`~npdgm.kernels.spline.rq_spline_inverse_backward`);  dy_a = dx_a + J_net^T du.
        dx (B, D), dlogdet_inv (B,) or None -> dy (B, D); net's gradients accumulate (conditional: (dy, dc))."""
        self._need("inverse")
        xb, u, knots = self._cache
        dxa, dxb = self._split(dx)
        dyb, *dknots = S.rq_spline_inverse_backward(dxb, self._dlog(dlogdet, dxb), xb, *knots)
        dm, dc = self._dnet(u, dknots)
        return self._out(self._merge(dxa + dm, dyb), dc)
