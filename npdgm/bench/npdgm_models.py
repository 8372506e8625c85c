"""The library models behind the benchmark workloads, and the one call a benchmark step makes.

Every model is the library's own (``npdgm.VAE``, the ``nice`` / ``realnvp2d`` / ``glow`` flow factories), built as
the trainer builds it; :func:`loss_and_grad` calls it as the trainer does and returns the loss.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np

from npdgm.models import flows
from npdgm.models.vae import VAE


def build_vae(x_dim, hidden, z_dim, seed):
    return VAE(x_dim=x_dim, hidden=(hidden,), z_dim=z_dim, activation="relu", likelihood="bernoulli", seed=seed)


def build_conv_vae(image_shape, channels, z_dim, seed):
    return VAE(x_dim=int(np.prod(image_shape)), z_dim=z_dim, arch="conv", channels=channels,
               image_shape=image_shape, activation="relu", likelihood="bernoulli", seed=seed)


def build_nice(dim, n_couplings, hidden, n_hidden, seed):
    # checked="off": no per-step host sync for the NaN diagnosis (the flows' benchmark mode)
    return flows.nice(dim=dim, n_couplings=n_couplings, hidden=hidden, n_hidden=n_hidden, prior="logistic",
                      seed=seed, checked="off")


def build_realnvp2d(n_couplings, hidden, seed):
    return flows.realnvp2d(n_couplings=n_couplings, hidden=(hidden, hidden), scale="tanh", scale_bound=1.0,
                           prior="gaussian", seed=seed, checked="off")


def build_glow(image_shape, levels, depth, hidden, seed):
    return flows.glow(image_shape, levels=levels, depth=depth, hidden=hidden, seed=seed, checked="off")


@functools.lru_cache(maxsize=None)
def _signature(cls):
    return frozenset(inspect.signature(cls.loss_and_grad).parameters)


def loss_and_grad(model, x, eps=None, zero_grad=True):
    """One forward + backward of ``model``; returns the loss (a 0-d array). Grads are zeroed first
    (``zero_grad=False``: the caller zeroed them, the profile times that separately).

    Called as the trainer calls it: ``loss_and_grad(x[, eps], check=False)`` (data validated once up
    front, not every step)."""
    args = (x,) if eps is None else (x, eps)
    kw = {"check": False} if "check" in _signature(type(model)) else {}
    out = model.loss_and_grad(*args, zero_grad=zero_grad, **kw)
    return out[0] if isinstance(out, tuple) else out
