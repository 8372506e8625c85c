"""Normalizing flows: invertible layers with exact log-determinants, every backward by hand.

A flow G^-1 maps data x to latents z = f(x) through invertible layers; the change of variables
gives the exact log-density

    log p(x) = log p_Z(f(x)) + sum_layers log|det d y_l / d y_{l-1}|

which is maximized directly (mean negative log-likelihood in nats). Sampling runs the layers
backwards: x = f^-1(z), z ~ p_Z (optionally scaled by a temperature).

Every layer is a :class:`~npdgm.nn.Module` with

    forward(x)               -> (y, logdet)   logdet = log|det dy/dx| per row, shape (B,)
    backward(dy, dlogdet)    -> dx            accumulates parameter gradients (need_dx=False: a
                                              coupling skips dx and returns None; the first layer)
    inverse(y, logdet=False) -> x  (or (x, logdet_inv), logdet_inv = -logdet(x))
    inverse_backward(dx, dlogdet_inv) -> dy   the backward through the inverse (sampling-side losses)
    spec()                   -> JSON dict that rebuilds the layer (masks, permutation seeds included)

A backward pairs with the latest forward (``backward``) or inverse (``inverse_backward``) call of
the same layer: the layer caches what it needs there.

Layers:  AdditiveCoupling (NICE), AffineCoupling (RealNVP, bounded scale), Permutation
(reverse / seeded random), Scaling (NICE's diagonal scaling), ActNorm (data-dependent init),
LogitTransform (x in [0, 1] -> logit space, with its log-det).  Container: :class:`Flow`.
Factories used by the CLI and the benchmarks: :func:`nice`, :func:`realnvp2d`, :func:`realnvp`.

    >>> import npdgm, numpy as np
    >>> flow = npdgm.models.flows.realnvp2d(n_couplings=8, hidden=(256, 256), seed=0)
    >>> x = np.random.default_rng(0).standard_normal((512, 2)).astype(np.float32)
    >>> loss = flow.loss_and_grad(x)          # mean NLL (nats); fills flow.grads
    >>> xs = flow.sample(16, temperature=0.8, rng=0)
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..io import register_model
from ..kernels import coupling as C
from ..nn import MLP
from ..nn.module import Module, Parameter
from ..validate import as_rng, check_float, check_int
from .base import Model

__all__ = ["FlowLayer", "AdditiveCoupling", "AffineCoupling", "Permutation", "Scaling", "ActNorm",
           "LogitTransform", "Flow", "make_mask", "nice", "realnvp2d", "realnvp", "bits_per_dim",
           "FLOW_LAYERS"]

MASKS = ("half", "alternate", "checkerboard", "channel")
FLOW_LAYERS = {}


def _layer(cls):
    FLOW_LAYERS[cls.__name__] = cls
    return cls


def bits_per_dim(nll_nats, dim, levels=256):
    """bits/dim = (NLL_nats / D + log(levels)) / log 2  for ``levels``-level data scaled to [0, 1]
    (the density of the dequantized data in [0, 1]^D bounds the discrete likelihood)."""
    return (float(nll_nats) / dim + math.log(levels)) / math.log(2)


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

    def __init__(self, dim):
        super().__init__()
        self.dim = check_int(dim, "dim", lo=1)
        self._mode = None

    def spec(self):
        raise NotImplementedError

    def _need(self, mode):
        if self._mode != mode:
            raise RuntimeError(f"{type(self).__name__}: {'backward' if mode == 'forward' else 'inverse_backward'} "
                               f"needs a preceding {mode} call (last call: {self._mode})")

    def buffers(self):
        """Non-trainable state that checkpoints must keep ({name: host array})."""
        return {}

    def load_buffers(self, bufs):
        pass


class _Coupling(FlowLayer):
    """Shared mask handling: x_a = x[:, mask], x_b = x[:, ~mask]."""

    def __init__(self, dim, mask, parity, image_shape):
        super().__init__(dim)
        m = make_mask(dim, mask, parity, image_shape)
        self.mask_bool = m
        self.ia, self.ib = _index(m), _index(~m)
        self.na, self.nb = int(m.sum()), int((~m).sum())
        self._mask_spec = dict(mask=mask if isinstance(mask, str) else [int(v) for v in mask], parity=int(parity),
                               image_shape=None if image_shape is None else [int(s) for s in image_shape])

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
                 image_shape=None, init="torch", seed=0):
        super().__init__(dim, mask, parity, image_shape)
        hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
        seed = check_int(seed, "seed", lo=0)
        self.net = MLP(self.na, hidden, self.nb, activation=activation, init=init, rng=seed)
        self._spec = dict(dim=self.dim, **self._mask_spec, hidden=hidden, activation=activation, init=init,
                          seed=seed)

    def spec(self):
        return {"type": "AdditiveCoupling", **self._spec}

    def forward(self, x):
        xa, xb = self._split(x)
        yb = xb + self.net.forward(xa)
        self._mode = "forward"
        return self._merge(xa, yb), backend.array_module(x).zeros(x.shape[0], dtype=x.dtype)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx_b = dy_b;  dx_a = dy_a + m'(x_a)^T dy_b  (log-det is constant: dlogdet is unused)."""
        self._need("forward")
        dya, dyb = self._split(dy)
        dm = self.net.backward(dyb, need_dx=need_dx)
        return self._merge(dya + dm, dyb) if need_dx else None

    def inverse(self, y, logdet=False):
        ya, yb = self._split(y)
        xb = yb - self.net.forward(ya)
        self._mode = "inverse"
        x = self._merge(ya, xb)
        return (x, backend.array_module(y).zeros(y.shape[0], dtype=y.dtype)) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy_b = dx_b;  dy_a = dx_a + m'(y_a)^T (-dx_b)  (m's parameters receive the upstream gradient -dx_b)."""
        self._need("inverse")
        dxa, dxb = self._split(dx)
        dya = dxa + self.net.backward(-dxb)
        return self._merge(dya, dxb)


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
                 scale_bound=1.0, image_shape=None, init="torch", seed=0):
        super().__init__(dim, mask, parity, image_shape)
        if scale not in C.SCALE_CLAMPS:
            raise ValueError(f"unknown scale clamp {scale!r}; expected one of {C.SCALE_CLAMPS}")
        scale_bound = check_float(scale_bound, "scale_bound", lo=0, strict_lo=True)
        hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
        seed = check_int(seed, "seed", lo=0)
        self.scale, self.scale_bound = scale, scale_bound
        self.net = MLP(self.na, hidden, 2 * self.nb, activation=activation, init=init, rng=seed)
        self._spec = dict(dim=self.dim, **self._mask_spec, hidden=hidden, activation=activation, scale=scale,
                          scale_bound=self.scale_bound, init=init, seed=seed)

    def spec(self):
        return {"type": "AffineCoupling", **self._spec}

    def _st(self, a):
        h = self.net.forward(a)
        raw, t = h[:, :self.nb], h[:, self.nb:]
        return raw, C.scale_clamp_forward(raw, self.scale, self.scale_bound), t

    def _dnet(self, ds, dt, raw, s, need_dx=True):
        xp = backend.array_module(ds)
        draw = C.scale_clamp_backward(ds, raw, s, self.scale, self.scale_bound)
        return self.net.backward(xp.concatenate([draw, dt], axis=1), need_dx=need_dx)

    def forward(self, x):
        xa, xb = self._split(x)
        raw, s, t = self._st(xa)
        yb, ld = C.affine_coupling_forward(xb, s, t)
        self._cache = (xb, raw, s)
        self._mode = "forward"
        return self._merge(xa, yb), ld

    def backward(self, dy, dlogdet=None, need_dx=True):
        self._need("forward")
        xb, raw, s = self._cache
        dya, dyb = self._split(dy)
        dxb, ds, dt = C.affine_coupling_backward(dyb, dlogdet, xb, s)
        dm = self._dnet(ds, dt, raw, s, need_dx)
        return self._merge(dya + dm, dxb) if need_dx else None

    def inverse(self, y, logdet=False):
        ya, yb = self._split(y)
        raw, s, t = self._st(ya)
        xb, ld = C.affine_coupling_inverse(yb, s, t)
        self._cache = (xb, raw, s)
        self._mode = "inverse"
        x = self._merge(ya, xb)
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy_b = dx_b exp(-s);  dt = -dy_b;  ds = -dx_b x_b - dlogdet_inv;  dy_a = dx_a + J_net^T [d raw | dt]."""
        self._need("inverse")
        xb, raw, s = self._cache
        dxa, dxb = self._split(dx)
        dyb, ds, dt = C.affine_coupling_inverse_backward(dxb, dlogdet, xb, s)
        return self._merge(dxa + self._dnet(ds, dt, raw, s), dyb)


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
        return {"type": "Permutation", "dim": self.dim, "kind": self.kind, "seed": self.seed}

    def _take(self, a, idx):
        return a[:, _dev_index(idx, a)]

    def forward(self, x):
        self._mode = "forward"
        return self._take(x, self.perm), backend.array_module(x).zeros(x.shape[0], dtype=x.dtype)

    def backward(self, dy, dlogdet=None, need_dx=True):
        return self._take(dy, self.inv)

    def inverse(self, y, logdet=False):
        self._mode = "inverse"
        x = self._take(y, self.inv)
        return (x, backend.array_module(y).zeros(y.shape[0], dtype=y.dtype)) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        return self._take(dx, self.perm)


@_layer
class Scaling(FlowLayer):
    """NICE's diagonal scaling:  y = x * exp(log_scale),  log|det| = sum_d log_scale_d  (log_scale starts at 0)."""

    def __init__(self, dim):
        super().__init__(dim)
        self.log_scale = Parameter(backend.to_device(np.zeros(self.dim), backend.get_dtype()))

    def spec(self):
        return {"type": "Scaling", "dim": self.dim}

    def forward(self, x):
        self._x, self._mode = x, "forward"
        return C.diag_scale_forward(x, self.log_scale.data)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = dy exp(ls);  d ls += sum_B dy x exp(ls) + sum_B dlogdet."""
        self._need("forward")
        dx, dls = C.diag_scale_backward(dy, dlogdet, self._x, self.log_scale.data)
        self.log_scale.grad += dls
        return dx

    def inverse(self, y, logdet=False):
        x, ld = C.diag_scale_inverse(y, self.log_scale.data)
        self._x, self._mode = x, "inverse"
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy = dx exp(-ls);  d ls += -sum_B dx x - sum_B dlogdet_inv."""
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
        return {"type": "ActNorm", "dim": self.dim, "eps": self.eps}

    def buffers(self):
        return {"initialized": np.array(1.0 if self.initialized else 0.0, dtype=np.dtype(self.loc.data.dtype))}

    def load_buffers(self, bufs):
        self.initialized = bool(np.asarray(bufs["initialized"]) != 0)

    def initialize(self, x):
        """Set loc and log_scale from the batch ``x`` (B >= 2) and mark the layer initialized."""
        if x.shape[0] < 2:
            raise ValueError(f"ActNorm data-dependent init needs a batch of at least 2 rows, got {x.shape[0]}")
        xp = backend.array_module(x)
        self.loc.data[...] = -x.mean(axis=0)
        self.log_scale.data[...] = -xp.log(x.std(axis=0) + self.eps)
        self.initialized = True

    def forward(self, x):
        if not self.initialized:
            self.initialize(x)
        u = x + self.loc.data
        self._u, self._mode = u, "forward"
        return C.diag_scale_forward(u, self.log_scale.data)

    def backward(self, dy, dlogdet=None, need_dx=True):
        self._need("forward")
        du, dls = C.diag_scale_backward(dy, dlogdet, self._u, self.log_scale.data)
        self.log_scale.grad += dls
        self.loc.grad += du.sum(axis=0)
        return du

    def inverse(self, y, logdet=False):
        """x = y exp(-ls) - loc (an uninitialized layer is used as it stands: the identity)."""
        u, ld = C.diag_scale_inverse(y, self.log_scale.data)
        self._u, self._mode = u, "inverse"
        x = u - self.loc.data
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """x = u - loc, u = y exp(-ls):  d loc = -sum_B dx;  dy, d ls from the diagonal-scale inverse backward."""
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
        return {"type": "LogitTransform", "dim": self.dim, "alpha": self.alpha}

    def forward(self, x):
        self._x, self._mode = x, "forward"
        return C.logit_forward(x, self.alpha)

    def backward(self, dy, dlogdet=None, need_dx=True):
        self._need("forward")
        return C.logit_backward(dy, dlogdet, self._x, self.alpha)

    def inverse(self, y, logdet=False):
        self._y, self._mode = y, "inverse"
        x, ld = C.logit_inverse(y, self.alpha)
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        self._need("inverse")
        return C.logit_inverse_backward(dx, dlogdet, self._y, self.alpha)


def build_layer(spec):
    """A layer from its :meth:`FlowLayer.spec` dict."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in FLOW_LAYERS:
        raise ValueError(f"unknown flow layer type {kind!r}; expected one of {sorted(FLOW_LAYERS)}")
    return FLOW_LAYERS[kind](**spec)


# -- the container ---------------------------------------------------------------------------------
CHECK_MODES = ("off", "loss", "layers")


@register_model
class Flow(Model):
    """A stack of invertible layers and a prior ("gaussian" | "logistic").

    ``layers``: FlowLayer instances or their spec dicts (``config`` keeps the specs, so ``npdgm.load``
    rebuilds the same stack with the same masks and permutations). ``checked`` says how non-finite
    values are caught: "loss" (default) checks the loss of every ``loss_and_grad`` and, when it is not
    finite, replays the batch layer by layer and raises FloatingPointError naming the first layer
    whose output or log-det overflowed, and likewise the result of every ``inverse`` (so ``sample``
    never returns NaN silently; its input z must be finite); "layers" checks after every layer of every
    forward/inverse; "off" checks nothing (no host sync: benchmarks).
    """

    kind = "flow"

    def __init__(self, layers, prior="gaussian", checked="loss"):
        built = [layer if isinstance(layer, FlowLayer) else build_layer(layer) for layer in layers]
        if not built:
            raise ValueError("a flow needs at least one layer")
        C.prior_logprob(prior)
        if checked not in CHECK_MODES:
            raise ValueError(f"checked must be one of {CHECK_MODES}, got {checked!r}")
        dims = {layer.dim for layer in built}
        if len(dims) != 1:
            raise ValueError(f"all flow layers must have the same dim, got {[layer.dim for layer in built]}")
        super().__init__(layers=[layer.spec() for layer in built], prior=prior, checked=checked)
        self.layers = built
        for i, layer in enumerate(built):
            self._modules[str(i)] = layer
        self.dim = built[0].dim
        self.prior = prior
        self.checked = checked
        self._prior_f, self._prior_b = C.prior_logprob(prior)
        self.flatten()

    # -- state (weights + ActNorm init flags) ------------------------------------------------------
    def state_dict(self):
        """Weights plus non-trainable buffers ("<i>.initialized" of ActNorm layers)."""
        state = super().state_dict()
        for i, layer in enumerate(self.layers):
            state.update({f"{i}.{k}": v for k, v in layer.buffers().items()})
        return state

    def load_state_dict(self, state):
        state = dict(state)
        for i, layer in enumerate(self.layers):
            names = list(layer.buffers())
            if names:
                missing = [f"{i}.{n}" for n in names if f"{i}.{n}" not in state]
                if missing:
                    raise KeyError(f"state dict lacks the buffers {missing} of layer {i} ({type(layer).__name__})")
                layer.load_buffers({n: state.pop(f"{i}.{n}") for n in names})
        return super().load_state_dict(state)

    # -- passes --------------------------------------------------------------------------------------
    def _dtype(self):
        p = self.flat_params
        return p.dtype if p is not None else np.dtype(backend.get_dtype())

    def _validate(self, name, x):
        _check_input(name, x, self.dim)
        if x.dtype != self._dtype():
            raise TypeError(f"{name} is {x.dtype} but the flow's parameters are {self._dtype()}; cast it first")

    def _check_layer(self, i, direction, y, ld, inp):
        xp = backend.array_module(y)
        if bool(xp.isfinite(y).all()) and bool(xp.isfinite(ld).all()):
            return
        layer = self.layers[i]
        what = "output" if not bool(xp.isfinite(y).all()) else "log-det"
        lo, hi = float(xp.min(inp)), float(xp.max(inp))
        extra = ""
        if isinstance(layer, AffineCoupling):
            extra = (f"; its scale clamp is {layer.scale!r}" +
                     (" (unbounded: exp(s) overflowed, use scale='tanh')" if layer.scale == "none" else ""))
        elif isinstance(layer, LogitTransform):
            extra = "; LogitTransform expects data in [0, 1]"
        if not bool(xp.isfinite(inp).all()):
            detail = "its input already held non-finite values"
        else:
            detail = f"its input lies in [{lo:.4g}, {hi:.4g}]"
        raise FloatingPointError(f"flow layer {i} ({type(layer).__name__}) produced a non-finite {what} in the "
                                 f"{direction} pass; {detail}{extra}")

    def forward(self, x):
        """z = f(x) and the summed log|det df/dx| per row (caches for :meth:`backward`)."""
        self._validate("x", x)
        xp = backend.array_module(x)
        logdet = xp.zeros(x.shape[0], dtype=x.dtype)
        h = x
        for i, layer in enumerate(self.layers):
            y, ld = layer.forward(h)
            if self.checked == "layers":
                self._check_layer(i, "forward", y, ld, h)
            logdet += ld
            h = y
        return h, logdet

    def backward(self, dz, dlogdet=None, need_dx=True):
        """dx from dL/dz (B, D) and dL/dlogdet (B,); accumulates every parameter gradient.
        ``need_dx=False`` (a loss of the data): the first layer may skip dx and None is returned."""
        for i in range(len(self.layers) - 1, -1, -1):
            dz = self.layers[i].backward(dz, dlogdet, need_dx=need_dx or i > 0)
        return dz if need_dx else None

    def inverse(self, z, logdet=False):
        """x = f^-1(z) (and log|det df^-1/dz| per row when ``logdet``); caches for :meth:`inverse_backward`.

        Unless ``checked="off"``: ValueError when z is not finite, and FloatingPointError naming the first
        layer whose inverse output or log-det overflowed (e.g. exp(-s) of an unbounded scale)."""
        self._validate("z", z)
        if self.checked != "off":
            backend.check_finite("z", z)
        xp = backend.array_module(z)
        total = xp.zeros(z.shape[0], dtype=z.dtype)
        h = z
        for i in range(len(self.layers) - 1, -1, -1):
            x, ld = self.layers[i].inverse(h, logdet=True)
            if self.checked == "layers":
                self._check_layer(i, "inverse", x, ld, h)
            total += ld
            h = x
        if self.checked == "loss" and not (bool(xp.isfinite(h).all()) and bool(xp.isfinite(total).all())):
            self.diagnose_inverse(z)
        return (h, total) if logdet else h

    def diagnose_inverse(self, z):
        """Replay the inverse of ``z`` layer by layer and raise FloatingPointError at the first layer whose
        output or log-det is not finite (ValueError when ``z`` itself is not). None when all is finite."""
        backend.check_finite("z", z)
        h = z
        for i in range(len(self.layers) - 1, -1, -1):
            x, ld = self.layers[i].inverse(h, logdet=True)
            self._check_layer(i, "inverse", x, ld, h)
            h = x

    def inverse_backward(self, dx, dlogdet=None):
        """dz from dL/dx of x = f^-1(z) (and dL/dlogdet_inv); accumulates parameter gradients."""
        for layer in self.layers:
            dx = layer.inverse_backward(dx, dlogdet)
        return dx

    def log_prob(self, x):
        """log p(x) per row (nats): log p_Z(f(x)) + log|det df/dx|."""
        z, logdet = self.forward(x)
        return self._prior_f(z) + logdet

    def nll(self, x, batch_size=1000):
        """Mean negative log-likelihood (nats, float) over ``x``, in batches (no gradients).
        ValueError for an empty or non-finite ``x``."""
        self._validate("x", x)
        if x.shape[0] == 0:
            raise ValueError(f"x is empty (shape {tuple(x.shape)}): the mean NLL needs at least one row")
        backend.check_finite("x", x)
        batch_size = check_int(batch_size, "batch_size", lo=1)
        total = 0.0
        for s in range(0, x.shape[0], batch_size):
            total += float(-self.log_prob(x[s:s + batch_size]).sum())
        return total / x.shape[0]

    def loss_and_grad(self, x, zero_grad=True):
        """Mean NLL in nats over the batch (0-d array) and the gradient of every parameter in ``grads``.

        L = -(1/B) sum_i [log p_Z(z_i) + logdet_i]:  dL/dlogdet_i = -1/B,  dL/dz_i = -(1/B) d log p_Z / dz_i.
        """
        if zero_grad:
            self.zero_grad()
        z, logdet = self.forward(x)
        lp = self._prior_f(z) + logdet
        loss = -lp.mean()
        if self.checked != "off" and not math.isfinite(float(loss)):
            self.diagnose(x)
            raise FloatingPointError(f"the flow's loss is {float(loss)} although every layer output is finite; "
                                     f"the {self.prior} prior log-density overflowed (|z| up to "
                                     f"{float(backend.array_module(z).abs(z).max()):.4g})")
        xp = backend.array_module(x)
        dlp = xp.full(x.shape[0], -1.0 / x.shape[0], dtype=x.dtype)
        self.backward(self._prior_b(dlp, z), dlp, need_dx=False)
        return loss

    def diagnose(self, x):
        """Replay ``x`` layer by layer and raise FloatingPointError at the first non-finite layer
        (ValueError when ``x`` itself is not finite). Returns None when everything is finite."""
        backend.check_finite("x", x)
        h = x
        for i, layer in enumerate(self.layers):
            y, ld = layer.forward(h)
            self._check_layer(i, "forward", y, ld, h)
            h = y

    def sample(self, n, temperature=1.0, rng=None, noise=None):
        """n samples x = f^-1(T z), z ~ prior (host noise from ``rng``: a NumPy Generator or seed, or
        pass ``noise`` (n, D) directly). Returns an (n, D) array on the backend.

        ``temperature`` T: a finite number >= 0 (0 gives f^-1(0), the image of the prior's mode);
        ValueError otherwise, and for non-finite ``noise``. A sample that overflows in a layer raises
        FloatingPointError naming the layer (see :meth:`inverse`; not with ``checked="off"``)."""
        temperature = check_float(temperature, "temperature", lo=0)
        if noise is None:
            n = check_int(n, "n", lo=1)
            noise = C.prior_noise(self.prior, as_rng(rng), (n, self.dim), np.float64)
        noise = np.asarray(backend.to_host(noise), dtype=np.float64)
        _check_input("noise", noise, self.dim)
        backend.check_finite("noise", noise)
        z = backend.to_device(noise * temperature, self._dtype())
        return self.inverse(z)

    def __repr__(self):
        return (f"Flow({len(self.layers)} layers: "
                f"{', '.join(type(layer).__name__ for layer in self.layers)}; prior={self.prior}; "
                f"{self.num_parameters()} parameters)")


# -- factories ---------------------------------------------------------------------------------------
def nice(dim=784, n_couplings=4, hidden=1000, n_hidden=5, prior="logistic", activation="relu", logit=False,
         seed=0, checked="loss"):
    """NICE (Dinh et al. 2014): ``n_couplings`` additive couplings, each m an MLP
    D/2 -> ``n_hidden`` x ``hidden`` (ReLU) -> D/2, half split alternating which half conditions,
    then a diagonal Scaling; logistic prior. Same model as ``benchmarks/torch_models.NICE``."""
    layers = [LogitTransform(dim)] if logit else []
    layers += [AdditiveCoupling(dim, "half", i % 2, [hidden] * n_hidden, activation, seed=seed * 1000 + i)
               for i in range(n_couplings)]
    layers.append(Scaling(dim))
    return Flow(layers, prior=prior, checked=checked)


def realnvp2d(n_couplings=8, hidden=(256, 256), scale="tanh", scale_bound=1.0, prior="gaussian",
              activation="relu", actnorm=False, seed=0, checked="loss"):
    """RealNVP on R^2: ``n_couplings`` affine couplings, coupling i conditions on coordinate i % 2;
    (raw, t) = MLP 1 -> hidden -> 2, s = clamp(raw) (tanh: s = tanh(raw) for bound 1). Gaussian prior.
    Same model as ``benchmarks/torch_models.RealNVP2d`` (without ``actnorm``)."""
    layers = []
    for i in range(n_couplings):
        if actnorm:
            layers.append(ActNorm(2))
        layers.append(AffineCoupling(2, "half", i % 2, hidden, activation, scale, scale_bound, seed=seed * 1000 + i))
    return Flow(layers, prior=prior, checked=checked)


def realnvp(dim=784, n_couplings=8, hidden=(512, 512), mask="checkerboard", image_shape=(28, 28), scale="tanh",
            scale_bound=2.0, actnorm=True, logit=True, alpha=0.05, prior="gaussian", activation="relu", seed=0,
            checked="loss", actnorm_eps=1.0):
    """Affine-coupling flow for flattened images: [LogitTransform] then ``n_couplings`` x
    ([ActNorm] + AffineCoupling with ``mask`` alternating parity). MLP coupling nets (no convolutions).

    ``actnorm_eps`` floors the ActNorm init, log_scale = -log(std + eps): per-pixel ActNorm on MNIST sees
    border pixels that are (nearly) constant in the init batch; with a tiny eps they get scales ~60x per
    layer and the first batches where they light up give losses of 1e6-1e8 nats (measured); eps = 1 keeps
    the init close to Glow's on informative pixels (std ~ 2-3 in logit space) and stable elsewhere."""
    layers = [LogitTransform(dim, alpha)] if logit else []
    for i in range(n_couplings):
        if actnorm:
            layers.append(ActNorm(dim, eps=actnorm_eps))
        shape = image_shape if mask in ("checkerboard", "channel") else None
        layers.append(AffineCoupling(dim, mask, i % 2, hidden, activation, scale, scale_bound, image_shape=shape,
                                     seed=seed * 1000 + i))
    return Flow(layers, prior=prior, checked=checked)
