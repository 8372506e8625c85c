"""Autoregressive flows, every pass by hand: MADE masks, MAF (one-pass density, D-pass sampling), IAF (the reverse).

MADE (Germain et al. 2015) turns an MLP into an autoregressive network by masking its weights. Every unit
gets a degree: input d (0-based) has degree d + 1, hidden unit k of a layer of H units degree
1 + floor(k (D - 2) / (H - 1)) (1 .. D-1 evenly, both ends included: every degree when H >= D - 1),
and output block j's unit d degree d + 1 again. A weight from a unit of degree m to one of degree m' is kept
when m' >= m (into a hidden unit) or m' > m (into an output), so output d depends on inputs 0..d-1 only.

MAF (Papamakarios et al. 2017), written in the density direction x -> z (the flow's ``forward``):

    (raw, mu) = MADE(x),  alpha = clamp(raw)   (the coupling's bounded scale: b tanh(raw / b), ...)
    z = (x - mu) * exp(-alpha),     logdet = log|det dz/dx| = -sum_d alpha_d

dz/dx is lower triangular (mu_d, alpha_d see x_<d only) with diagonal exp(-alpha), so the density takes one
MADE pass. Sampling inverts it coordinate by coordinate: x = z exp(alpha(x)) + mu(x), iterated D times from
x = 0 (pass k fixes coordinate k). IAF (Kingma et al. 2016) is the same map used the other way round: its
sampling direction is the one-pass map and its density needs the D passes. The backward through the D-pass
direction, x = F^-1(z), needs w = dL/dz = J_F^-T g (g = dL/dx): J_F^T = diag(e^-alpha) + N^T with N strictly
lower triangular, so the Jacobi iteration  w <- e^alpha (g - N^T w - c)  is exact after D steps (c: the
log-det's x-path), each step one input-VJP of the MADE. The parameters then get -(dF/dtheta)^T w (and the
log-det's term), one more MADE backward. Derivations: docs/autoregressive-flows.md.

Context (``context_dim=C > 0``, p(x | c)): the MADE's input is [x | c] and the c rows of its first mask are all
ones (c reaches every unit, the autoregressive order among the x stays), so mu and alpha are functions of
(x_<d, c); the backwards return (dx, dc). In the D-pass direction c enters like a parameter: dc is the c-part
of the same final MADE backward with (-w, -dlogdet) that gives the parameters theirs
(docs/conditional-flows.md).
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels import coupling as C
from ..kernels import masked as KM
from ..kernels.dispatch import twinnable
from ..nn.layers import Activation, Sequential, _host_rng, init_weight
from ..nn.module import Module, Parameter
from ..validate import check_int
from .flow_layers import FlowLayer, _layer, check_context, check_scale_net

__all__ = ["made_degrees", "made_masks", "MaskedLinear", "MADE", "MAF", "IAF"]


def made_degrees(dim, hidden):
    """Unit degrees [input (D,), hidden layer 1 (H1,), ...]: input d -> d + 1, hidden unit k of H ->
    1 + floor(k (D - 2) / (H - 1)) (spans 1..D-1 even when H < D - 1, so no late input is cut off)."""
    dim = check_int(dim, "dim", lo=2)
    return [np.arange(1, dim + 1)] + [np.arange(int(h)) * (dim - 2) // max(int(h) - 1, 1) + 1 for h in hidden]


def made_masks(dim, hidden, blocks=2):
    """Host 0/1 masks (in, out), one per MADE layer: hidden layers keep m_out >= m_in, the output layer
    (``blocks`` copies of the input degrees) keeps m_out > m_in, so output block j, unit d sees x_<d only."""
    deg = made_degrees(dim, hidden)
    masks = [(d_out[None, :] >= d_in[:, None]).astype(np.float64) for d_in, d_out in zip(deg[:-1], deg[1:])]
    out = np.tile(deg[0], blocks)
    masks.append((out[None, :] > deg[-1][:, None]).astype(np.float64))
    return masks


class MaskedLinear(Module):
    """y = x @ (W * M) + b, W (in, out), fixed 0/1 mask M (in, out), b (out,) (the kernels
    :func:`~npdgm.kernels.masked.masked_linear_forward` / ``_backward``).
    Backward: dx = dy (W M)^T,  dW = (x^T dy) * M,  db = sum_B dy."""

    def __init__(self, mask, init="torch", rng=None):
        super().__init__()
        mask = np.asarray(mask, dtype=np.float64)
        W, b = init_weight(_host_rng(rng), mask.shape[0], mask.shape[1], init)
        dt = backend.get_dtype()
        self.in_features, self.out_features = mask.shape
        self.W = Parameter(backend.to_device(W * mask, dt))
        self.b = Parameter(backend.to_device(b, dt))
        self.mask = backend.to_device(mask, dt)

    def _mask(self):
        """The mask on the weights' device and dtype (moved once after a backend or dtype change)."""
        if self.mask.dtype != self.W.data.dtype or backend.array_module(self.mask) is not backend.array_module(
                self.W.data):
            self.mask = backend.array_module(self.W.data).asarray(backend.to_host(self.mask), dtype=self.W.data.dtype)
        return self.mask

    def forward(self, x):
        """x (B, in) -> x (W M) + b (B, out)."""
        self._x = x
        return KM.masked_linear_forward(x, self.W.data, self._mask(), self.b.data)

    def backward(self, dy, need_dx=True):
        """dx = dy (W M)^T;  W.grad += (x^T dy) M;  b.grad += sum_B dy."""
        dx, dW, db = KM.masked_linear_backward(dy, self._x, self.W.data, self._mask(), need_dx)
        self.W.grad += dW
        self.b.grad += db
        return dx

    def input_vjp(self, dy):
        """dy (B, out) -> dy (W M)^T (B, in), no parameter gradients."""
        return KM.masked_linear_backward(dy, self._x, self.W.data, self._mask(), params=False)[0]


class MADE(Sequential):
    """Masked MLP D -> hidden... -> blocks * D (activation between layers); output block j, unit d is a
    function of x_<d only (:func:`made_masks`). Parameters "0.W", "0.b", "2.W", ... as in npdgm.nn.MLP.
    ``context_dim`` C > 0: the input is [x | c] (B, D + C), the C context rows of the first mask all ones."""

    def __init__(self, dim, hidden, blocks=2, activation="relu", init="torch", seed=0, context_dim=0):
        rng = _host_rng(seed)
        masks = made_masks(dim, hidden, blocks)
        if context_dim:
            masks[0] = np.concatenate([masks[0], np.ones((context_dim, masks[0].shape[1]))], axis=0)
        mods = []
        for i, m in enumerate(masks):
            mods.append(MaskedLinear(m, init, rng))
            if i < len(masks) - 1:
                mods.append(Activation(activation))
        super().__init__(*mods)


class _Autoregressive(FlowLayer):
    """The shared MAF/IAF map F: z = (x - mu(x)) exp(-alpha(x)) (one pass) and its D-pass inverse."""

    def __init__(self, dim, hidden=(64, 64), activation="relu", scale="tanh", scale_bound=1.0, init="torch",
                 seed=0, context_dim=0):
        super().__init__(dim)
        if self.dim < 2:
            raise ValueError(f"an autoregressive layer needs dim >= 2, got {self.dim}")
        scale, scale_bound, hidden, seed = check_scale_net(scale, scale_bound, hidden, seed)
        self.scale, self.scale_bound = scale, scale_bound
        self.context_dim = check_int(context_dim, "context_dim", lo=0)
        self.made = MADE(self.dim, hidden, 2, activation, init, seed, self.context_dim)
        self._spec = dict(dim=self.dim, hidden=hidden, activation=activation, scale=scale,
                          scale_bound=scale_bound, init=init, seed=seed)
        if self.context_dim:
            self._spec["context_dim"] = self.context_dim
        self._context = None

    def spec(self):
        """The dict that rebuilds this layer: {"type": class name, dim, hidden, activation, scale, ...}."""
        return {"type": type(self).__name__, **self._spec}

    def _set_context(self, context, rows):
        self._context = check_context(type(self).__name__, context, self.context_dim, rows)

    def _made(self, x):
        """(raw, alpha, mu) of MADE(x) (MADE([x | c]) with the context set by the pass)."""
        inp = x if self._context is None else backend.array_module(x).concatenate([x, self._context], axis=1)
        h = self.made.forward(inp)
        raw, mu = h[:, :self.dim], h[:, self.dim:]
        return raw, C.scale_clamp_forward(raw, self.scale, self.scale_bound), mu

    def _out(self, dx, dm):
        """What a backward returns: dx, or (dx, dc) with dc = the context columns of the MADE input gradient."""
        return (dx, dm[:, self.dim:]) if self.context_dim else dx

    def _one_pass(self, x, context):
        """z = (x - mu) e^-alpha, logdet = -sum alpha; caches (z, raw, alpha)."""
        self._set_context(context, x.shape[0])
        raw, alpha, mu = self._made(x)
        z, ld = C.affine_coupling_inverse(x, alpha, mu)
        self._cache = (z, raw, alpha)
        return z, ld

    def _made_back(self, dz, dlogdet, params):
        """(direct dx, MADE input gradient (B, D [+ C])) for the cotangent (dz, dlogdet) of the one-pass map."""
        z, raw, alpha = self._cache
        dx, dalpha, dmu = C.affine_coupling_inverse_backward(dz, dlogdet, z, alpha)
        dh = backend.array_module(dz).concatenate(
            [C.scale_clamp_backward(dalpha, raw, alpha, self.scale, self.scale_bound), dmu], axis=1)
        return dx, (self.made.backward(dh) if params else self.made.input_vjp(dh))

    def _one_pass_backward(self, dz, dlogdet):
        dx, dm = self._made_back(dz, dlogdet, True)
        return self._out(dx + dm[:, :self.dim], dm)

    progress = None  # a callable given the number of coordinates each D-pass solve has just fixed (a tqdm update)

    def _solve_reference(self, z):
        """x = F^-1(z), the plain way: x <- z e^alpha(x) + mu(x) with whole MADE passes, D times from x = 0
        (pass k fixes coordinate k, since alpha_k, mu_k see x_<k only)."""
        x = backend.array_module(z).zeros_like(z)
        for _ in range(self.dim):
            raw, alpha, mu = self._made(x)
            x = C.affine_coupling_forward(z, alpha, mu)[0]
        return x

    @twinnable
    def _solve(self, z):
        """x = F^-1(z) coordinate by coordinate, each step doing only the work that coordinate d needs:
        x_d = z_d e^alpha_d + mu_d with (raw_d, mu_d) from x_<d.  Setting x_d changes the first layer's
        pre-activation by a rank-1 term, h1 += x_d (W1 M1)[d]; a deeper hidden unit of degree m sees units of
        degree <= m only, so output d needs the units of degree <= d (a prefix: degrees ascend) of each layer,
        and of the output layer its two columns d and D + d. The same numbers as :meth:`_solve_reference` up
        to rounding, at a fraction of its D full passes."""
        xp = backend.array_module(z)
        D, B = self.dim, z.shape[0]
        lin = [m for m in self.made.layers if isinstance(m, MaskedLinear)]
        acts = [m._f for m in self.made.layers if isinstance(m, Activation)]
        Ws = [m.W.data * m._mask() for m in lin]
        bs = [m.b.data for m in lin]
        w_out = xp.ascontiguousarray(xp.stack([Ws[-1][:, :D].T, Ws[-1][:, D:].T], axis=2))  # (D, H_last, 2)
        b_out = xp.stack([bs[-1][:D], bs[-1][D:]], axis=1)                                   # (D, 2)
        degrees = made_degrees(D, self._spec["hidden"])[1:]
        counts = [np.searchsorted(deg, np.arange(D), side="right") for deg in degrees]   # units of degree <= d
        x = xp.zeros_like(z)
        h1 = xp.repeat(bs[0][None, :], B, axis=0)           # x = 0: the first pre-activation is its bias,
        if self._context is not None:                        # plus the context's rows (fixed over the solve)
            h1 += self._context @ Ws[0][D:]
        for d in range(D):
            n = [int(c[d]) for c in counts]
            a = acts[0](h1[:, :n[0]])
            for i in range(1, len(n)):
                a = acts[i](a @ Ws[i][:n[i - 1], :n[i]] + bs[i][:n[i]])
            out = a @ w_out[d, :n[-1]] + b_out[d]            # (B, 2): [raw_d | mu_d]
            alpha = C.scale_clamp_forward(out[:, :1], self.scale, self.scale_bound)
            x[:, d:d + 1] = C.affine_coupling_forward(z[:, d:d + 1], alpha, out[:, 1:])[0]
            h1 += x[:, d:d + 1] * Ws[0][d]
            if self.progress is not None:
                self.progress(1)
        return x

    def _d_pass(self, z, context=None, reference=False):
        """x = F^-1(z) (:meth:`_solve`, or :meth:`_solve_reference` with ``reference``) given the context;
        logdet = +sum alpha; caches (z, raw, alpha) from one whole MADE pass at the solution (the backward's
        cache)."""
        self._set_context(context, z.shape[0])
        x = self._solve_reference(z) if reference else self._solve(z)
        raw, alpha, _ = self._made(x)
        self._cache = (z, raw, alpha)
        return x, alpha.sum(axis=1)

    def _d_pass_backward(self, dx, dlogdet):
        """x = F^-1(z), logdet = -logdet_F(x):  w = dL/dz solves  J_F^T w + (d logdet_F/dx)^T dlogdet = dx
        (D Jacobi steps w <- e^alpha (dx - N^T w - c), c the log-det's MADE path); the parameters get
        -(dF/dtheta)^T w - (d logdet_F/dtheta)^T dlogdet: the one-pass backward with (-w, -dlogdet)."""
        xp = backend.array_module(dx)
        ea = xp.exp(self._cache[2])
        w = dx * ea
        for _ in range(self.dim - 1):
            w = ea * (dx - self._made_back(w, dlogdet, False)[1][:, :self.dim])
        dm = self._made_back(-w, None if dlogdet is None else -dlogdet, True)[1]
        return self._out(w, dm)


@_layer
class MAF(_Autoregressive):
    """Masked autoregressive flow layer:  (raw, mu) = MADE(x), alpha = clamp(raw),  z = (x - mu) e^-alpha,
    log|det dz/dx| = -sum_d alpha_d (one MADE pass); the inverse (sampling) x_d = z_d e^alpha_d + mu_d takes D
    passes. Put a Permutation between layers so every coordinate gets conditioned on every other."""

    def forward(self, x, context=None):
        """z = (x - mu(x)) e^-alpha(x);  logdet = -sum_d alpha_d.   x (B, D) -> (z (B, D), logdet (B,))."""
        self._mode = "forward"
        return self._one_pass(x, context)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = dz e^-alpha + J_MADE^T [d raw | d mu],  d alpha = -dz z - dlogdet,  d mu = -dz e^-alpha,
        d raw = d alpha clamp'(raw).   dy (B, D), dlogdet (B,) or None -> dx (B, D); MADE gradients accumulate."""
        self._need("forward")
        return self._one_pass_backward(dy, dlogdet)

    def inverse(self, y, logdet=False, context=None):
        """x = z e^alpha(x) + mu(x) solved in D MADE passes;  logdet_inv = +sum_d alpha_d(x).
        y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        self._mode = "inverse"
        x, ld = self._d_pass(y, context)
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dz = J_F^-T (dx + dlogdet_inv d(sum alpha)/dx) by D Jacobi steps (one MADE input-VJP each); then
        the MADE's parameters get the backward of the forward map with (-dz, -dlogdet_inv).
        dx (B, D), dlogdet_inv (B,) or None -> dz (B, D); MADE gradients accumulate."""
        self._need("inverse")
        return self._d_pass_backward(dx, dlogdet)


@_layer
class IAF(_Autoregressive):
    """Inverse autoregressive flow layer: the MAF map turned round. Sampling (``inverse``) is one MADE pass,
    x = (z - mu(z)) e^-alpha(z) with logdet_inv = -sum alpha; the density direction (``forward``) solves that
    map for z coordinate by coordinate in D passes, z = x e^alpha(z) + mu(z), logdet = +sum alpha(z)."""

    def forward(self, x, context=None):
        """y with x = (y - mu(y)) e^-alpha(y), D MADE passes;  logdet = +sum_d alpha_d(y).
        x (B, D) -> (y (B, D), logdet (B,))."""
        self._mode = "forward"
        return self._d_pass(x, context)

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = J^-T (dy + dlogdet d(sum alpha)/dy) by D Jacobi steps, J = d x / d y of the one-pass map; then
        the MADE's parameters get its backward with (-dx, -dlogdet).   dy (B, D), dlogdet (B,) or None ->
        dx (B, D); MADE gradients accumulate."""
        self._need("forward")
        return self._d_pass_backward(dy, dlogdet)

    def inverse(self, y, logdet=False, context=None):
        """x = (y - mu(y)) e^-alpha(y) (one MADE pass);  logdet_inv = -sum_d alpha_d.
        y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        self._mode = "inverse"
        x, ld = self._one_pass(y, context)
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """dy = dx e^-alpha + J_MADE^T [d raw | d mu] (d alpha = -dx x - dlogdet_inv, d mu = -dx e^-alpha).
        dx (B, D), dlogdet_inv (B,) or None -> dy (B, D); MADE gradients accumulate."""
        self._need("inverse")
        return self._one_pass_backward(dx, dlogdet)
