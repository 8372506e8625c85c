"""Elementwise activations: forward y = f(x), backward dx = dy * f'(x).

Each backward takes whichever of x or y makes f' cheapest and exact.
"""
from ..backend import array_module
from . import fused as _fused
from ._check import check_same_shape


def relu_forward(x):
    """y = max(x, 0)."""
    if _fused.active(x):
        return _fused.relu_forward(x)
    return array_module(x).maximum(x, 0)


def relu_backward(dy, y):
    """dx = dy * [x > 0]   (computed from y = relu(x): y > 0 iff x > 0; f'(0) := 0)."""
    check_same_shape("dy", dy, "y", y)
    if _fused.active(dy, y):
        return _fused.relu_backward(dy, y)
    return dy * (y > 0)


def leaky_relu_forward(x, slope=0.01):
    """y = x if x > 0 else slope * x."""
    return array_module(x).where(x > 0, x, x * slope)


def leaky_relu_backward(dy, x, slope=0.01):
    """dx = dy * (1 if x > 0 else slope)."""
    check_same_shape("dy", dy, "x", x)
    if _fused.active(dy, x):
        return _fused.leaky_relu_backward(dy, x, slope)
    return array_module(x).where(x > 0, dy, dy * slope)


def tanh_forward(x):
    """y = tanh(x)."""
    return array_module(x).tanh(x)


def tanh_backward(dy, y):
    """dx = dy * (1 - y^2),  y = tanh(x)."""
    check_same_shape("dy", dy, "y", y)
    if _fused.active(dy, y):
        return _fused.tanh_backward(dy, y)
    return dy * (1 - y * y)


def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)) = n / (1 + e),  e = exp(-|x|),  n = exp(min(x, 0)) = (1 if x >= 0 else e):
    the exponent is <= 0, so no overflow for large |x| and no cancellation in either tail. n is
    max(e, [x >= 0]) since e <= 1: one exp per element, no ``where`` (NumPy's select branches per element
    and is ~10x slower on a random sign pattern)."""
    if _fused.active(x):
        return _fused.sigmoid_forward(x)
    xp = array_module(x)
    if getattr(x, "ndim", 0) == 0:
        return sigmoid_forward(xp.asarray(x).reshape(1))[0]
    e = xp.abs(x)
    xp.negative(e, out=e)
    xp.exp(e, out=e)                        # e = exp(-|x|)
    y = xp.maximum(e, x >= 0)               # exp(min(x, 0))
    e += 1
    y /= e
    return y


def sigmoid_backward(dy, y):
    """dx = dy * y * (1 - y),  y = sigmoid(x)."""
    check_same_shape("dy", dy, "y", y)
    if _fused.active(dy, y):
        return _fused.sigmoid_backward(dy, y)
    return dy * y * (1 - y)


def softplus_forward(x):
    """y = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))   (stable for all x)."""
    if _fused.active(x):
        return _fused.softplus_forward(x)
    xp = array_module(x)
    if getattr(x, "ndim", 0) == 0:
        return softplus_forward(xp.asarray(x).reshape(1))[0]
    y = xp.abs(x)                           # in place from here: one temporary, not four
    xp.negative(y, out=y)
    xp.exp(y, out=y)
    xp.log1p(y, out=y)
    y += xp.maximum(x, 0)
    return y


def softplus_backward(dy, x):
    """dx = dy * sigmoid(x)."""
    check_same_shape("dy", dy, "x", x)
    if _fused.active(dy, x):
        return _fused.softplus_backward(dy, x)
    return dy * sigmoid_forward(x)


def elu_forward(x, alpha=1.0):
    """y = x if x > 0 else alpha * (exp(x) - 1)."""
    xp = array_module(x)
    return xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0)))


def elu_backward(dy, x, alpha=1.0):
    """dx = dy * (1 if x > 0 else alpha * exp(x))."""
    check_same_shape("dy", dy, "x", x)
    if _fused.active(dy, x):
        return _fused.elu_backward(dy, x, alpha)
    xp = array_module(x)
    return xp.where(x > 0, dy, dy * alpha * xp.exp(xp.minimum(x, 0)))


def identity_forward(x):
    """y = x."""
    return x


def identity_backward(dy, x):
    """dx = dy."""
    return dy


# name -> (forward, backward, what backward needs: "x" or "y")
ACTIVATIONS = {
    "relu": (relu_forward, relu_backward, "y"),
    "leaky_relu": (leaky_relu_forward, leaky_relu_backward, "x"),
    "tanh": (tanh_forward, tanh_backward, "y"),
    "sigmoid": (sigmoid_forward, sigmoid_backward, "y"),
    "softplus": (softplus_forward, softplus_backward, "x"),
    "elu": (elu_forward, elu_backward, "x"),
    "identity": (identity_forward, identity_backward, "x"),
}


def get_activation(name):
    """(forward, backward, needs) for an activation name; ValueError for unknown names."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
