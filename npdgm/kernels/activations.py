"""Elementwise activations: forward y = f(x), backward dx = dy * f'(x).

Each backward takes whichever of x or y makes f' cheapest and exact.
"""
from ..backend import array_module
from ._check import check_same_shape
from .dispatch import twinnable


@twinnable
def relu_forward(x):
    """y = max(x, 0)."""
    return array_module(x).maximum(x, 0)


@twinnable
def relu_backward(dy, y):
    """dx = dy * [x > 0]   (computed from y = relu(x): y > 0 iff x > 0; f'(0) := 0)."""
    check_same_shape("dy", dy, "y", y)
    return dy * (y > 0)


def leaky_relu_forward(x, slope=0.01):
    """y = x if x > 0 else slope * x."""
    return array_module(x).where(x > 0, x, x * slope)


@twinnable
def leaky_relu_backward(dy, x, slope=0.01):
    """dx = dy * (1 if x > 0 else slope)."""
    check_same_shape("dy", dy, "x", x)
    return array_module(x).where(x > 0, dy, dy * slope)


def tanh_forward(x):
    """y = tanh(x)."""
    return array_module(x).tanh(x)


@twinnable
def tanh_backward(dy, y):
    """dx = dy * (1 - y^2),  y = tanh(x)."""
    check_same_shape("dy", dy, "y", y)
    return dy * (1 - y * y)


@twinnable
def sigmoid_forward(x):
    """y = 1 / (1 + exp(-x)), written with e = exp(-|x|) <= 1 so neither tail overflows:
    y = 1 / (1 + e) for x >= 0,  y = e / (1 + e) for x < 0."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1, e) / (1 + e)


@twinnable
def sigmoid_backward(dy, y):
    """dx = dy * y * (1 - y),  y = sigmoid(x)."""
    check_same_shape("dy", dy, "y", y)
    return dy * y * (1 - y)


@twinnable
def softplus_forward(x):
    """y = log(1 + exp(x)) = log1p(exp(-|x|)) + max(x, 0)   (stable for all x)."""
    xp = array_module(x)
    return xp.log1p(xp.exp(-xp.abs(x))) + xp.maximum(x, 0)


@twinnable
def softplus_backward(dy, x):
    """dx = dy * sigmoid(x)."""
    check_same_shape("dy", dy, "x", x)
    return dy * sigmoid_forward(x)


def elu_forward(x, alpha=1.0):
    """y = x if x > 0 else alpha * (exp(x) - 1)."""
    xp = array_module(x)
    return xp.where(x > 0, x, alpha * xp.expm1(xp.minimum(x, 0)))


@twinnable
def elu_backward(dy, x, alpha=1.0):
    """dx = dy * (1 if x > 0 else alpha * exp(x))."""
    check_same_shape("dy", dy, "x", x)
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
