"""npdgm models for the benchmark workloads.

``build_*`` return the library model (``npdgm.models.VAE`` / the flow factories) when the
library provides it, else a stand-in written here from ``npdgm.nn.MLP`` and the kernels (used
while the library model does not exist yet, and reported as ``impl: "prototype"``).
Every model exposes ``loss_and_grad(x[, eps]) -> loss`` (batch mean; grads accumulated).
"""
from __future__ import annotations

import functools
import inspect
import math

import numpy as np

from npdgm import backend
from npdgm import kernels as K
from npdgm.models.base import Model
from npdgm.nn import MLP


def impl_of(model):
    return "prototype" if getattr(model, "prototype", False) else "library"


# -- prototypes ---------------------------------------------------------------------------------
class ProtoVAE(Model):
    prototype = True

    def __init__(self, x_dim=784, hidden=400, z_dim=20, seed=0):
        super().__init__(x_dim=x_dim, hidden=hidden, z_dim=z_dim)
        rng = np.random.default_rng(seed)
        self.z_dim = z_dim
        self.enc = MLP(x_dim, [hidden], 2 * z_dim, rng=rng)
        self.dec = MLP(z_dim, [hidden], x_dim, rng=rng)
        self.flatten()

    def loss_and_grad(self, x, eps):
        xp = backend.array_module(x)
        Z, B = self.z_dim, x.shape[0]
        h = self.enc.forward(x)
        mu, lv = h[:, :Z], h[:, Z:]
        z = K.reparameterize_forward(mu, lv, eps)
        logits = self.dec.forward(z)
        per_row = K.bernoulli_nll_forward(logits, x) + K.kl_std_normal_forward(mu, lv)
        d = xp.full(B, 1.0 / B, dtype=x.dtype)
        dz = self.dec.backward(K.bernoulli_nll_backward(d, logits, x))
        dmu, dlv = K.reparameterize_backward(dz, lv, eps)
        kmu, klv = K.kl_std_normal_backward(d, mu, lv)
        self.enc.backward(xp.concatenate([dmu + kmu, dlv + klv], axis=1), need_dx=False)
        return per_row.mean()


class ProtoNICE(Model):
    prototype = True

    def __init__(self, dim=784, n_couplings=4, hidden=1000, n_hidden=5, seed=0):
        super().__init__(dim=dim, n_couplings=n_couplings, hidden=hidden, n_hidden=n_hidden)
        rng = np.random.default_rng(seed)
        self.half = dim // 2
        na, nb = self.half, dim - self.half
        self.nets = []
        for i in range(n_couplings):
            cond, out = (na, nb) if i % 2 == 0 else (nb, na)
            m = MLP(cond, [hidden] * n_hidden, out, rng=rng)
            setattr(self, f"c{i}", m)
            self.nets.append(m)
        from npdgm.nn import Parameter

        self.log_scale = Parameter(backend.to_device(np.zeros(dim), backend.get_dtype()))
        self.flatten()

    def loss_and_grad(self, x):
        xp = backend.array_module(x)
        B = x.shape[0]
        a, b = x[:, :self.half], x[:, self.half:]
        for i, m in enumerate(self.nets):
            if i % 2 == 0:
                b = b + m.forward(a)
            else:
                a = a + m.forward(b)
        y = xp.concatenate([a, b], axis=1)
        s = self.log_scale.data
        h = y * xp.exp(s)
        # logistic prior: log p(h) = -(softplus(h) + softplus(-h)); d/dh = -tanh(h/2)
        lp = -(K.softplus_forward(h) + K.softplus_forward(-h)).sum(axis=1) + s.sum()
        loss = -lp.mean()
        dh = xp.tanh(0.5 * h) / B                      # d(-mean log p)/dh
        self.log_scale.grad += (dh * h).sum(axis=0) - 1.0
        dy = dh * xp.exp(s)
        da, db = dy[:, :self.half], dy[:, self.half:]
        for i in range(len(self.nets) - 1, -1, -1):
            m = self.nets[i]
            if i % 2 == 0:
                dx = m.backward(db, need_dx=i > 0)
                if dx is not None:
                    da = da + dx
            else:
                da_in = m.backward(da)
                db = db + da_in
        return loss


class ProtoRealNVP2d(Model):
    prototype = True

    def __init__(self, n_couplings=8, hidden=256, seed=0):
        super().__init__(n_couplings=n_couplings, hidden=hidden)
        rng = np.random.default_rng(seed)
        self.nets = []
        for i in range(n_couplings):
            m = MLP(1, [hidden, hidden], 2, rng=rng)
            setattr(self, f"c{i}", m)
            self.nets.append(m)
        self.flatten()

    def loss_and_grad(self, x):
        xp = backend.array_module(x)
        B = x.shape[0]
        cols = [x[:, 0:1], x[:, 1:2]]
        cache = []
        logdet = 0
        for i, m in enumerate(self.nets):
            a = i % 2
            st = m.forward(cols[a])
            s = xp.tanh(st[:, 0:1])
            e = xp.exp(s)
            xb = cols[1 - a]
            cache.append((xb, s, e))
            cols[1 - a] = xb * e + st[:, 1:2]
            logdet = logdet + s
        y = xp.concatenate(cols, axis=1)
        loss = (0.5 * (y * y).sum(axis=1, keepdims=True) + math.log(2 * math.pi) - logdet).mean()
        dcols = [y[:, 0:1] / B, y[:, 1:2] / B]
        for i in range(len(self.nets) - 1, -1, -1):
            a = i % 2
            xb, s, e = cache[i]
            dyb = dcols[1 - a]
            ds = dyb * xb * e - 1.0 / B
            dst = xp.concatenate([ds * (1 - s * s), dyb], axis=1)
            dcols[1 - a] = dyb * e
            dxa = self.nets[i].backward(dst, need_dx=True)
            dcols[a] = dcols[a] + dxa
        return loss


# -- builders -----------------------------------------------------------------------------------
def build_vae(x_dim, hidden, z_dim, seed):
    try:
        from npdgm.models.vae import VAE
    except ImportError:
        return ProtoVAE(x_dim, hidden, z_dim, seed)
    return VAE(x_dim=x_dim, hidden=(hidden,), z_dim=z_dim, activation="relu", likelihood="bernoulli", seed=seed)


@functools.lru_cache(maxsize=None)
def _signature(cls):
    return frozenset(inspect.signature(cls.loss_and_grad).parameters)


def loss_and_grad(model, x, eps=None, zero_grad=True):
    """One forward + backward of ``model``; returns the loss (a 0-d array). Grads are zeroed first
    (``zero_grad=False``: the caller zeroed them, the profile times that separately).

    Library models are called as the trainer calls them: ``loss_and_grad(x[, eps], check=False)``
    (data validated once up front, not every step) returning ``(loss, terms)``."""
    args = (x,) if eps is None else (x, eps)
    if getattr(model, "prototype", False):
        if zero_grad:
            model.zero_grad()
        return model.loss_and_grad(*args)
    params = _signature(type(model))
    kw = {"check": False} if "check" in params else {}
    if "zero_grad" in params:
        kw["zero_grad"] = zero_grad
    elif zero_grad:
        model.zero_grad()
    out = model.loss_and_grad(*args, **kw)
    return out[0] if isinstance(out, tuple) else out


def _flows():
    try:
        from npdgm.models import flows
    except ImportError:
        return None
    return flows


def build_nice(dim, n_couplings, hidden, n_hidden, seed):
    flows = _flows()
    if flows is None:
        return ProtoNICE(dim, n_couplings, hidden, n_hidden, seed)
    # checked="off": no per-step host sync for the NaN diagnosis (the flows' benchmark mode)
    return flows.nice(dim=dim, n_couplings=n_couplings, hidden=hidden, n_hidden=n_hidden, prior="logistic",
                      seed=seed, checked="off")


def build_realnvp2d(n_couplings, hidden, seed):
    flows = _flows()
    if flows is None:
        return ProtoRealNVP2d(n_couplings, hidden, seed)
    return flows.realnvp2d(n_couplings=n_couplings, hidden=(hidden, hidden), scale="tanh", scale_bound=1.0,
                           prior="gaussian", seed=seed, checked="off")
