"""Affine map y = x @ W + b.

Layout (the one checkpoints and ports use): W has shape (in, out), b has shape (out,).
"""
from ..backend import array_module
from ._check import check_2d, check_float, check_same_dtype


def linear_forward(x, W, b, out=None):
    """y = x @ W + b.   x: (B, in), W: (in, out), b: (out,) -> y: (B, out)."""
    check_2d("x", x)
    check_2d("W", W)
    check_float("x", x)
    check_same_dtype("x", x, "W", W)
    if x.shape[1] != W.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features but W expects {W.shape[0]} (W shape {W.shape})")
    if b.shape != (W.shape[1],):
        raise ValueError(f"b must have shape ({W.shape[1]},), got {b.shape}")
    xp = array_module(x)
    y = xp.matmul(x, W, out=out)
    y += b
    return y


def linear_backward(dy, x, W, need_dx=True):
    """Gradients of y = x @ W + b.

    dx = dy @ W.T      (B, in)
    dW = x.T @ dy      (in, out)
    db = sum_B dy      (out,)
    Returns (dx, dW, db); dx is None when ``need_dx`` is False (first layer).
    """
    if dy.shape != (x.shape[0], W.shape[1]):
        raise ValueError(f"dy must have shape {(x.shape[0], W.shape[1])}, got {dy.shape}")
    dx = dy @ W.T if need_dx else None
    return dx, x.T @ dy, dy.sum(axis=0)
