"""The fused twins of the reference kernels: one function per ``@twinnable`` kernel, same arguments,
same result (bit-equal, or within the ulp bound tests/test_accel.py states), computed by one fused
formula (:mod:`npdgm.accel.formulas`) when :func:`npdgm.accel.engines.active` says an engine runs these
arrays, else ``NotImplemented`` (the reference lines run). Each twin checks its arguments as its
reference does, before any fused work. :data:`TWINS` pairs every reference with its twin.
"""
from __future__ import annotations

from ..backend import array_module
from ..kernels import activations, coupling, gaussian, linear, losses
from ..kernels._check import check_2d, check_same_shape
from .engines import active, run


def relu_forward(x):
    return run("relu_forward", x) if active(x) else NotImplemented


def relu_backward(dy, y):
    check_same_shape("dy", dy, "y", y)
    return run("relu_backward", dy, y) if active(dy, y) else NotImplemented


def leaky_relu_backward(dy, x, slope=0.01):
    check_same_shape("dy", dy, "x", x)
    return run("leaky_relu_backward", dy, x, slope=slope) if active(dy, x) else NotImplemented


def tanh_backward(dy, y):
    check_same_shape("dy", dy, "y", y)
    return run("tanh_backward", dy, y) if active(dy, y) else NotImplemented


def sigmoid_forward(x):
    return run("sigmoid_forward", x) if active(x) else NotImplemented


def sigmoid_backward(dy, y):
    check_same_shape("dy", dy, "y", y)
    return run("sigmoid_backward", dy, y) if active(dy, y) else NotImplemented


def softplus_forward(x):
    return run("softplus_forward", x) if active(x) else NotImplemented


def softplus_backward(dy, x):
    check_same_shape("dy", dy, "x", x)
    return run("softplus_backward", dy, x) if active(dy, x) else NotImplemented


def elu_backward(dy, x, alpha=1.0):
    check_same_shape("dy", dy, "x", x)
    return run("elu_backward", dy, x, alpha=alpha) if active(dy, x) else NotImplemented


def linear_relu_forward(x, W, b):
    """max(x @ W + b, 0) with the bias add and the ReLU in one pass over the product, in place (formula
    ``bias_relu_forward``): the reference's bits."""
    h = linear.product(x, W, b)
    return run("bias_relu_forward", h, b) if active(h, b) else activations.relu_forward(h + b)


def bernoulli_nll_forward(logits, x):
    check_2d("logits", logits)
    check_same_shape("logits", logits, "x", x)
    return run("bernoulli_nll_forward", logits, x) if active(logits, x) else NotImplemented


def bernoulli_nll_backward(dloss, logits, x):
    if not active(dloss, logits, x):
        return NotImplemented
    return run("bernoulli_nll_backward", dloss[:, None], logits, x)


def reparameterize_forward(mu, logvar, eps):
    check_same_shape("mu", mu, "logvar", logvar)
    if eps.shape[-mu.ndim:] != mu.shape:
        raise ValueError(f"eps must end with shape {mu.shape}, got {eps.shape}")
    return run("reparameterize_forward", mu, logvar, eps) if active(mu, logvar, eps) else NotImplemented


def reparameterize_backward(dz, logvar, eps):
    if not active(dz, logvar, eps):
        return NotImplemented
    dlv = run("reparameterize_backward", dz, logvar, eps)
    extra = tuple(range(dz.ndim - logvar.ndim))
    if extra:
        dz, dlv = dz.sum(axis=extra), dlv.sum(axis=extra)
    return dz, dlv


def kl_std_normal_forward(mu, logvar):
    check_same_shape("mu", mu, "logvar", logvar)
    return run("kl_std_normal_forward", mu, logvar) if active(mu, logvar) else NotImplemented


def kl_std_normal_backward(dkl, mu, logvar):
    if not active(dkl, mu, logvar):
        return NotImplemented
    return run("kl_std_normal_backward", dkl[:, None], mu, logvar)


def _column(d, like):
    """dL/dlogdet (B,) as a (B, 1) column; None (no gradient reaches the log-det) as zeros."""
    return d[:, None] if d is not None else array_module(like).zeros((like.shape[0], 1), dtype=like.dtype)


def affine_coupling_forward(xb, s, t):
    check_same_shape("xb", xb, "s", s)
    check_same_shape("xb", xb, "t", t)
    return (run("affine_coupling_forward", xb, s, t), s.sum(axis=1)) if active(xb, s, t) else NotImplemented


def affine_coupling_backward(dyb, dlogdet, xb, s):
    check_same_shape("dyb", dyb, "xb", xb)
    if not (active(dyb, xb, s) and (dlogdet is None or active(dlogdet, xb))):
        return NotImplemented
    dxb, ds = run("affine_coupling_backward", dyb, _column(dlogdet, xb), xb, s)
    return dxb, ds, dyb


def affine_coupling_inverse(yb, s, t):
    check_same_shape("yb", yb, "s", s)
    return (run("affine_coupling_inverse", yb, s, t), -s.sum(axis=1)) if active(yb, s, t) else NotImplemented


def affine_coupling_inverse_backward(dxb, dlogdet_inv, xb, s):
    check_same_shape("dxb", dxb, "xb", xb)
    if not (active(dxb, xb, s) and (dlogdet_inv is None or active(dlogdet_inv, xb))):
        return NotImplemented
    return run("affine_coupling_inverse_backward", dxb, _column(dlogdet_inv, xb), xb, s)


def logistic_logprob_forward(z):
    return run("logistic_logprob_forward", z) if active(z) else NotImplemented


# (reference, twin) for every @twinnable kernel: what npdgm.accel.enable registers
TWINS = [(getattr(module, twin.__name__), twin) for module, twins in (
    (activations, (relu_forward, relu_backward, leaky_relu_backward, tanh_backward, sigmoid_forward,
                   sigmoid_backward, softplus_forward, softplus_backward, elu_backward)),
    (linear, (linear_relu_forward,)),
    (losses, (bernoulli_nll_forward, bernoulli_nll_backward)),
    (gaussian, (reparameterize_forward, reparameterize_backward, kl_std_normal_forward, kl_std_normal_backward)),
    (coupling, (affine_coupling_forward, affine_coupling_backward, affine_coupling_inverse,
                affine_coupling_inverse_backward, logistic_logprob_forward))) for twin in twins]
