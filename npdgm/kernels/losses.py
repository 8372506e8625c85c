"""Negative log-likelihoods and logsumexp. Every loss returns one number per row
(summed over the feature axis); callers average over the batch.
"""
import math

from ..backend import array_module
from ._check import check_2d, check_same_shape
from .activations import sigmoid_forward, softplus_forward
from .dispatch import twinnable

LOG_2PI = math.log(2 * math.pi)


@twinnable
def bernoulli_nll_forward(logits, x):
    """-log Bernoulli(x | sigmoid(l)) summed over features = sum_d softplus(l) - x * l.

    logits, x: (B, D) with x in [0, 1] -> (B,). Stable for any |l| (the BCE-with-logits form).
    """
    check_2d("logits", logits)
    check_same_shape("logits", logits, "x", x)
    return (softplus_forward(logits) - x * logits).sum(axis=1)


@twinnable
def bernoulli_nll_backward(dloss, logits, x):
    """dl = dloss[:, None] * (sigmoid(l) - x)."""
    return (sigmoid_forward(logits) - x) * dloss[:, None]


def gaussian_nll_forward(mu, x, logvar):
    """loss_b = -log N(x_b | mu_b, exp(logvar)) = 0.5 * sum_d [ (x - mu)^2 exp(-logvar) + logvar + log 2 pi ].

    mu, x: (B, D); logvar: scalar, (D,) (learned per dimension) or (B, D) -> (B,).
    """
    check_2d("mu", mu)
    check_same_shape("mu", mu, "x", x)
    xp = array_module(mu)
    r = x - mu
    lv = xp.broadcast_to(xp.asarray(logvar, dtype=mu.dtype), mu.shape)
    return 0.5 * (r * r * xp.exp(-lv) + lv + LOG_2PI).sum(axis=1)


def gaussian_nll_backward(dloss, mu, x, logvar):
    """Gradients of the Gaussian NLL per row:

    dmu     = dloss * (mu - x) exp(-logvar)
    dlogvar = dloss * 0.5 * (1 - (x - mu)^2 exp(-logvar))   (summed to logvar's shape)
    Returns (dmu, dlogvar)."""
    xp = array_module(mu)
    lv = xp.asarray(logvar, dtype=mu.dtype)
    r = x - mu
    prec = xp.exp(-lv)
    d = dloss[:, None]
    dmu = -d * r * prec
    dlv = d * 0.5 * (1 - r * r * prec)
    if lv.ndim == 0:
        dlv = dlv.sum()
    elif lv.ndim == 1:
        dlv = dlv.sum(axis=0)
    return dmu, dlv


def mse_forward(pred, target):
    """mean over all elements of (pred - target)^2 -> scalar."""
    check_same_shape("pred", pred, "target", target)
    r = pred - target
    return (r * r).mean()


def mse_backward(dloss, pred, target):
    """dpred = dloss * 2 (pred - target) / N."""
    return dloss * 2 * (pred - target) / pred.size


def logsumexp_forward(a, axis=-1):
    """y = log sum_i exp(a_i) along ``axis`` = m + log sum exp(a - m), m = max a (stable)."""
    xp = array_module(a)
    m = a.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0)
    return (m + xp.log(xp.exp(a - m).sum(axis=axis, keepdims=True))).squeeze(axis)


def logsumexp_backward(dy, a, y, axis=-1):
    """da = dy * softmax(a) = dy * exp(a - y)."""
    xp = array_module(a)
    return xp.expand_dims(dy, axis) * xp.exp(a - xp.expand_dims(y, axis))
