"""Normalizing-flow kernels: coupling transforms, diagonal scaling, logit transform, priors.

Conventions (the flow layers in ``npdgm/models/flows.py`` are thin wrappers around these):

* A transform maps x -> y and reports ``logdet`` = log|det dy/dx| per row, shape (B,).
* ``*_backward(dy, dlogdet, ...)`` returns the gradients of a scalar L that depends on
  (y, logdet) with respect to the transform's inputs, given dL/dy (B, D) and dL/dlogdet (B,).
* ``*_inverse`` maps y -> x and ``*_inverse_backward(dx, dlogdet_inv, ...)`` differentiates
  a scalar that depends on (x, logdet_inv), logdet_inv = log|det dx/dy| = -logdet(x).
* Priors return log p(z) per row (B,) and backward gives dL/dz from dL/dlogp.

Array math takes its module from the inputs (NumPy or CuPy), never ``import numpy``.
"""
from __future__ import annotations

import math

from ..backend import array_module
from ._check import check_same_shape
from .activations import sigmoid_forward, softplus_forward
from .dispatch import twinnable

LOG_2PI = math.log(2 * math.pi)
SCALE_CLAMPS = ("tanh", "atan", "none")


# -- bounded scales ------------------------------------------------------------------------------
def scale_clamp_forward(raw, kind="tanh", bound=1.0):
    """s = clamp(raw), the bounded log-scale of an affine coupling (b = ``bound``):
    tanh   s = b * tanh(raw / b)            (|s| < b, identity slope at 0)
    atan   s = (2 b / pi) * atan(raw / b)   (|s| < b, softer tails; FrEIA's soft clamp)
    none   s = raw                          (unbounded: exp(s) can overflow)
    """
    xp = array_module(raw)
    if kind == "tanh":
        return bound * xp.tanh(raw / bound)
    if kind == "atan":
        return (2 * bound / math.pi) * xp.arctan(raw / bound)
    if kind == "none":
        return raw
    raise ValueError(f"unknown scale clamp {kind!r}; expected one of {SCALE_CLAMPS}")


def scale_clamp_backward(ds, raw, s, kind="tanh", bound=1.0):
    """d raw = ds * ds/draw:   tanh: 1 - (s/b)^2;   atan: (2/pi) / (1 + (raw/b)^2);   none: 1."""
    check_same_shape("ds", ds, "raw", raw)
    if kind == "tanh":
        r = s / bound
        return ds * (1 - r * r)
    if kind == "atan":
        r = raw / bound
        return ds * ((2 / math.pi) / (1 + r * r))
    if kind == "none":
        return ds
    raise ValueError(f"unknown scale clamp {kind!r}; expected one of {SCALE_CLAMPS}")


# -- affine coupling (the transformed half) --------------------------------------------------
@twinnable
def affine_coupling_forward(xb, s, t):
    """y_b = x_b * exp(s) + t;  logdet = sum_j s_j.   xb, s, t: (B, nb) -> (y_b (B, nb), logdet (B,))."""
    check_same_shape("xb", xb, "s", s)
    check_same_shape("xb", xb, "t", t)
    return xb * array_module(xb).exp(s) + t, s.sum(axis=1)


@twinnable
def affine_coupling_backward(dyb, dlogdet, xb, s):
    """Gradients of y_b = x_b * exp(s) + t, logdet = sum s:

    dx_b = dy_b * exp(s)
    ds   = dy_b * x_b * exp(s) + dlogdet[:, None]
    dt   = dy_b
    Returns (dx_b, ds, dt); ``dlogdet`` (B,) may be None (no gradient reaches the log-det).
    """
    check_same_shape("dyb", dyb, "xb", xb)
    xp = array_module(xb)
    dxb = dyb * xp.exp(s)
    ds = dxb * xb
    if dlogdet is not None:
        ds += dlogdet[:, None]
    return dxb, ds, dyb


@twinnable
def affine_coupling_inverse(yb, s, t):
    """x_b = (y_b - t) * exp(-s);  logdet_inv = -sum_j s_j."""
    check_same_shape("yb", yb, "s", s)
    return (yb - t) * array_module(yb).exp(-s), -s.sum(axis=1)


@twinnable
def affine_coupling_inverse_backward(dxb, dlogdet_inv, xb, s):
    """Gradients of x_b = (y_b - t) * exp(-s), logdet_inv = -sum s, written with x_b = the inverse's output:

    dy_b = dx_b * exp(-s)
    dt   = -dx_b * exp(-s)
    ds   = -dx_b * x_b - dlogdet_inv[:, None]
    Returns (dy_b, ds, dt).
    """
    check_same_shape("dxb", dxb, "xb", xb)
    xp = array_module(xb)
    dyb = dxb * xp.exp(-s)
    ds = -(dxb * xb)
    if dlogdet_inv is not None:
        ds -= dlogdet_inv[:, None]
    return dyb, ds, -dyb


# -- diagonal scaling (NICE's last layer, ActNorm's scale) ------------------------------------
def diag_scale_forward(x, log_scale):
    """y = x * exp(log_scale);  logdet = sum_d log_scale_d for every row.   x: (B, D), log_scale: (D,)."""
    xp = array_module(x)
    if log_scale.shape != (x.shape[1],):
        raise ValueError(f"log_scale must have shape ({x.shape[1]},), got {log_scale.shape}")
    y = x * xp.exp(log_scale)
    return y, xp.zeros(x.shape[0], dtype=x.dtype) + log_scale.sum()


def diag_scale_backward(dy, dlogdet, x, log_scale):
    """dx = dy * exp(ls);  dls = sum_B dy * x * exp(ls) + sum_B dlogdet.   Returns (dx, dls)."""
    check_same_shape("dy", dy, "x", x)
    xp = array_module(x)
    dx = dy * xp.exp(log_scale)
    dls = (dx * x).sum(axis=0)
    if dlogdet is not None:
        dls += dlogdet.sum()
    return dx, dls


def diag_scale_inverse(y, log_scale):
    """x = y * exp(-log_scale);  logdet_inv = -sum log_scale."""
    xp = array_module(y)
    return y * xp.exp(-log_scale), xp.zeros(y.shape[0], dtype=y.dtype) - log_scale.sum()


def diag_scale_inverse_backward(dx, dlogdet_inv, x, log_scale):
    """For x = y * exp(-ls) (x the inverse's output):  dy = dx * exp(-ls);
    dls = -sum_B dx * x - sum_B dlogdet_inv.   Returns (dy, dls)."""
    check_same_shape("dx", dx, "x", x)
    xp = array_module(x)
    dy = dx * xp.exp(-log_scale)
    dls = -(dx * x).sum(axis=0)
    if dlogdet_inv is not None:
        dls -= dlogdet_inv.sum()
    return dy, dls


# -- logit transform for data in [0, 1] ---------------------------------------------------------
def logit_forward(x, alpha=0.05):
    """y = logit(p) = log p - log(1 - p),  p = alpha + (1 - 2 alpha) x;
    logdet = sum_d [log(1 - 2 alpha) - log p_d - log(1 - p_d)].   Returns (y, logdet).

    RealNVP's preprocessing of pixels in [0, 1].
    """
    xp = array_module(x)
    p = alpha + (1 - 2 * alpha) * x
    lp, l1p = xp.log(p), xp.log1p(-p)
    return lp - l1p, (math.log(1 - 2 * alpha) - lp - l1p).sum(axis=1)


def logit_backward(dy, dlogdet, x, alpha=0.05):
    """dx = (1 - 2a) / (p (1 - p)) * (dy + dlogdet[:, None] * (2 p - 1)),  p = a + (1 - 2a) x."""
    check_same_shape("dy", dy, "x", x)
    p = alpha + (1 - 2 * alpha) * x
    g = dy if dlogdet is None else dy + dlogdet[:, None] * (2 * p - 1)
    return g * ((1 - 2 * alpha) / (p * (1 - p)))


def logit_inverse(y, alpha=0.05):
    """x = (sigmoid(y) - alpha) / (1 - 2 alpha);  logdet_inv = sum_d [log p + log(1 - p) - log(1 - 2 alpha)],
    p = sigmoid(y)."""
    p = sigmoid_forward(y)
    # log p + log(1 - p) = -softplus(-y) - softplus(y), stable for large |y|
    ld = (-softplus_forward(-y) - softplus_forward(y) - math.log(1 - 2 * alpha)).sum(axis=1)
    return (p - alpha) / (1 - 2 * alpha), ld


def logit_inverse_backward(dx, dlogdet_inv, y, alpha=0.05):
    """dy = dx * p (1 - p) / (1 - 2a) + dlogdet_inv[:, None] * (1 - 2 p),  p = sigmoid(y)."""
    check_same_shape("dx", dx, "y", y)
    p = sigmoid_forward(y)
    dy = dx * (p * (1 - p) / (1 - 2 * alpha))
    if dlogdet_inv is not None:
        dy += dlogdet_inv[:, None] * (1 - 2 * p)
    return dy


# -- priors --------------------------------------------------------------------------------------
PRIORS = ("gaussian", "logistic")


def gaussian_logprob_forward(z):
    """log N(z; 0, I) per row = -0.5 * sum_d (z_d^2 + log 2 pi)."""
    return -0.5 * (z * z).sum(axis=1) - 0.5 * LOG_2PI * z.shape[1]


def gaussian_logprob_backward(dlogp, z):
    """dz = -dlogp[:, None] * z."""
    return -dlogp[:, None] * z


@twinnable
def logistic_logprob_forward(z):
    """Standard logistic log-density per row: sum_d -(softplus(z_d) + softplus(-z_d))
    = sum_d -(|z_d| + 2 log1p(exp(-|z_d|)))."""
    xp = array_module(z)
    a = xp.abs(z)
    return -(a + 2 * xp.log1p(xp.exp(-a))).sum(axis=1)


def logistic_logprob_backward(dlogp, z):
    """dz = dlogp[:, None] * (1 - 2 sigmoid(z)) = -dlogp[:, None] * tanh(z / 2)."""
    xp = array_module(z)
    return -dlogp[:, None] * xp.tanh(0.5 * z)


def prior_logprob(name):
    """(forward, backward) of the prior ``name`` ("gaussian" | "logistic")."""
    if name == "gaussian":
        return gaussian_logprob_forward, gaussian_logprob_backward
    if name == "logistic":
        return logistic_logprob_forward, logistic_logprob_backward
    raise ValueError(f"unknown prior {name!r}; expected one of {PRIORS}")


def prior_noise(name, host_rng, shape, dtype="float32"):
    """Host NumPy draws from the prior: N(0, 1) or the standard logistic log(u) - log(1 - u)."""
    import numpy

    if name == "gaussian":
        return host_rng.standard_normal(shape).astype(dtype)
    if name == "logistic":
        u = host_rng.uniform(1e-12, 1 - 1e-12, shape)
        return (numpy.log(u) - numpy.log1p(-u)).astype(dtype)
    raise ValueError(f"unknown prior {name!r}; expected one of {PRIORS}")
