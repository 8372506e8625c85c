"""The MADE masked linear layer (Germain et al. 2015): a linear layer whose weight is multiplied by a fixed
0/1 mask, forward beside backward (the plain linear kernels on W * M). The masks (unit degrees) are built in
``npdgm.models.autoregressive``. Array math takes its module from the inputs (NumPy or CuPy)."""
from __future__ import annotations

from ._check import check_same_shape
from .linear import linear_backward, linear_forward


def masked_linear_forward(x, W, M, b):
    """y = x (W * M) + b.   x (B, in), W and the fixed 0/1 mask M (in, out), b (out,) -> y (B, out)."""
    check_same_shape("W", W, "mask M", M)
    return linear_forward(x, W * M, b)


def masked_linear_backward(dy, x, W, M, need_dx=True, params=True):
    """dx = dy (W * M)^T,  dW = (x^T dy) * M (a masked-out weight gets no gradient),  db = sum_B dy.
    dy (B, out) -> (dx (B, in), dW (in, out), db (out,)); M is data. dx is None with ``need_dx=False``;
    ``params=False`` returns (dx, None, None) (an input-VJP: the MADE's Jacobi steps)."""
    if not params:
        return dy @ (W * M).T, None, None
    dx, dW, db = linear_backward(dy, x, W * M, need_dx)
    return dx, dW * M, db
