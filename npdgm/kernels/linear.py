"""Affine map y = x @ W + b.

Layout (the one checkpoints and ports use): W has shape (in, out), b has shape (out,).
"""
from ..backend import array_module
from ._check import check_2d, check_float, check_same_dtype
from .activations import relu_backward, relu_forward
from .dispatch import twinnable


def linear_forward(x, W, b):
    """y = x @ W + b.   x: (B, in), W: (in, out), b: (out,) -> y: (B, out)."""
    y = product(x, W, b)
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
    xp = array_module(dy)
    dx = _matmul(xp, dy, W.T) if need_dx else None
    return dx, xp.matmul(x.T, dy), dy.sum(axis=0)


@twinnable
def linear_relu_forward(x, W, b):
    """y = max(x @ W + b, 0).   x: (B, in), W: (in, out), b: (out,) -> y: (B, out).

    A Linear layer and the ReLU after it, as ``relu_forward(linear_forward(x, W, b))``. (The fast wing
    runs a twin that adds the bias and applies the ReLU in one pass over the product, the same bits.)"""
    return relu_forward(linear_forward(x, W, b))


def linear_relu_backward(dy, x, W, y, need_dx=True):
    """Gradients of y = max(x @ W + b, 0), from y (relu_backward, then linear_backward):

    dh = dy * [y > 0]
    dx = dh @ W.T      (B, in)
    dW = x.T @ dh      (in, out)
    db = sum_B dh      (out,)
    Returns (dx, dW, db); dx is None when ``need_dx`` is False."""
    return linear_backward(relu_backward(dy, y), x, W, need_dx)


def product(x, W, b):
    """x @ W after the shape and dtype checks of a Linear layer (b: the bias the shapes are checked against)."""
    check_2d("x", x)
    check_2d("W", W)
    check_float("x", x)
    check_same_dtype("x", x, "W", W)
    if x.shape[1] != W.shape[0]:
        raise ValueError(f"x has {x.shape[1]} features but W expects {W.shape[0]} (W shape {W.shape})")
    if b.shape != (W.shape[1],):
        raise ValueError(f"b must have shape ({W.shape[1]},), got {b.shape}")
    return _matmul(array_module(x), x, W)


def _matmul(xp, a, b, out=None):
    """a @ b. When the inner dimension is 1 (a layer fed by one flow coordinate) OpenBLAS's sgemm
    runs at ~1% of its peak (0.15 ms for (512, 1) @ (1, 256) on a Zen 4 core), so the product is
    written as the outer product  a[:, 0] b[0, :]  (one broadcast multiply, 0.035 ms). Inner
    dimensions >= 2 stay with BLAS (already fast there; broadcasting is slower)."""
    if a.shape[1] != 1:
        return xp.matmul(a, b, out=out)
    return xp.multiply(a, b, out=out)
