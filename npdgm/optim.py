"""Optimizers updating parameters in place, with PyTorch's update formulas.

An optimizer is built from a Module (it uses the module's flat parameter/gradient buffers,
flattening the module if needed) or from a list of Parameters. Each update is written as its paper
writes it, with whole-array temporaries. (The fast wing, :mod:`npdgm.accel`, registers a chunked,
threaded or fused twin of :meth:`Adam.step`, tested against this one.)
"""
from __future__ import annotations

import math

from . import backend
from .kernels.dispatch import twinnable
from .nn.module import Module, Parameter
from .validate import check_float


def _pairs(params):
    """[(value, grad)] arrays the optimizer updates."""
    if isinstance(params, Module):
        if params.flat_params is None:
            params.flatten()
        return [(params.flat_params, params.flat_grads)] if params.flat_params is not None else []
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Parameter):
            raise TypeError(f"params[{i}] is {type(p).__name__}, expected a Parameter (or pass a Module)")
    return [(p.data, p.grad) for p in params]


def adam_update(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay=0.0, decoupled=False):
    """The textbook Adam / AdamW step (Kingma & Ba 2015, Algorithm 1; Loshchilov & Hutter 2019) of one
    array of any shape, in place, written as in the paper with whole-array temporaries (what
    :meth:`Adam.step` runs on every parameter array; its fast twins live in :mod:`npdgm.accel`).

        g <- g + weight_decay p                      (Adam: L2 penalty in the gradient)
        p <- p (1 - lr weight_decay)                 (AdamW, decoupled=True: instead of the line above)
        m <- beta1 m + (1 - beta1) g                 first moment
        v <- beta2 v + (1 - beta2) g^2               second moment
        m_hat = m / (1 - beta1^t);  v_hat = v / (1 - beta2^t)        bias corrections, t = 1, 2, ...
        p <- p - lr m_hat / (sqrt(v_hat) + eps)

    (the last line computed as PyTorch does: lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)).
    p, g, m, v: arrays of one shape; m and v are updated in place, g is not written."""
    xp = backend.array_module(p)
    if weight_decay and decoupled:
        p *= 1 - lr * weight_decay
    elif weight_decay:
        g = g + weight_decay * p
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (g * g) * (1 - beta2)
    bias1, bias2 = 1 - beta1 ** t, 1 - beta2 ** t
    p -= lr / bias1 * m / (xp.sqrt(v) / math.sqrt(bias2) + eps)


class Optimizer:
    def __init__(self, params, lr):
        lr = check_float(lr, "lr")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not isinstance(params, Module):
            params = list(params)           # read twice below: a generator would leave self._params empty
        self.pairs = _pairs(params)
        if not self.pairs:
            raise ValueError("optimizer got no parameters")
        self.lr = lr
        self.t = 0

    def state_dict(self):
        """Step count and state arrays (host copies), for checkpoints."""
        return {"t": self.t, **{f"{k}.{i}": backend.to_host(a).copy()
                                for k, arrs in self._state().items() for i, a in enumerate(arrs)}}

    def load_state_dict(self, state):
        self.t = int(state["t"])
        for k, arrs in self._state().items():
            for i, a in enumerate(arrs):
                v = state[f"{k}.{i}"]
                if tuple(v.shape) != tuple(a.shape):
                    raise ValueError(f"optimizer state {k}.{i} has shape {tuple(v.shape)}, expected {a.shape}")
                a[...] = backend.array_module(a).asarray(v)

    def _state(self):
        return {}


class SGD(Optimizer):
    """PyTorch SGD: g += wd * p;  buf = momentum * buf + (1 - dampening) * g (buf = g at step 1);
    p -= lr * (g + momentum * buf if nesterov else buf)."""

    def __init__(self, params, lr=1e-2, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        super().__init__(params, lr)
        momentum, dampening = check_float(momentum, "momentum", lo=0), check_float(dampening, "dampening", lo=0)
        weight_decay = check_float(weight_decay, "weight_decay", lo=0)
        if nesterov and (not momentum or dampening):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0 (as in PyTorch)")
        self.momentum, self.dampening, self.wd, self.nesterov = momentum, dampening, weight_decay, nesterov
        self.buf = [backend.array_module(p).zeros_like(p) for p, _ in self.pairs] if momentum else []

    def _state(self):
        return {"buf": self.buf}

    def step(self):
        self.t += 1
        for i, (p, g) in enumerate(self.pairs):
            d = g + self.wd * p if self.wd else g
            if self.momentum:
                b = self.buf[i]
                if self.t == 1:
                    b[...] = d
                else:
                    b *= self.momentum
                    b += (1 - self.dampening) * d
                d = d + self.momentum * b if self.nesterov else b
            p -= self.lr * d


class Adam(Optimizer):
    """PyTorch Adam (and AdamW with ``decoupled=True``).

    g  <- g + wd * p                 (Adam: L2 penalty in the gradient)
    p  <- p * (1 - lr * wd)          (AdamW: decoupled decay, instead of the line above)
    m  <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
    p  <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__(params, lr)
        b1, b2 = (check_float(b, f"betas[{i}]") for i, b in enumerate(betas))
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        eps, weight_decay = check_float(eps, "eps", lo=0), check_float(weight_decay, "weight_decay", lo=0)
        self.b1, self.b2, self.eps, self.wd, self.decoupled = b1, b2, eps, weight_decay, decoupled
        xp = backend.array_module(self.pairs[0][0])
        self.m = [xp.zeros(p.shape, dtype=p.dtype) for p, _ in self.pairs]    # C-contiguous: flat views
        self.v = [xp.zeros(p.shape, dtype=p.dtype) for p, _ in self.pairs]

    def _state(self):
        return {"m": self.m, "v": self.v}

    @twinnable
    def step(self):
        """One update: :func:`adam_update` on every parameter array."""
        self.t += 1
        for (p, g), m, v in zip(self.pairs, self.m, self.v):
            adam_update(p, g, m, v, self.t, self.lr, self.b1, self.b2, self.eps, self.wd, self.decoupled)


def AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
    """Adam with decoupled weight decay (PyTorch's AdamW defaults)."""
    return Adam(params, lr, betas, eps, weight_decay, decoupled=True)


def clip_grad_norm(params, max_norm):
    """Scale gradients in place so their global L2 norm is at most ``max_norm`` (PyTorch's rule:
    coef = max_norm / (norm + 1e-6), applied when < 1). Returns the norm before clipping.
    ``max_norm`` must be a positive finite number: a negative one would flip the gradient's sign,
    0 or NaN would silently mean no clipping."""
    max_norm = check_float(max_norm, "max_norm", lo=0, strict_lo=True)
    grads = [g for _, g in _pairs(params)]
    xp = backend.array_module(grads[0])
    norm = math.sqrt(sum(float(xp.vdot(g.ravel(), g.ravel())) for g in grads))
    coef = max_norm / (norm + 1e-6)
    if coef < 1:
        for g in grads:
            g *= coef
    return norm
