"""Linear, Activation, Sequential and MLP modules built on the kernels."""
from __future__ import annotations

import math

import numpy

from .. import backend
from ..kernels.activations import get_activation
from ..kernels.dispatch import twinnable
from ..kernels.linear import linear_backward, linear_forward
from .module import Module, Parameter

INITS = ("torch", "xavier_uniform", "xavier_normal", "kaiming_normal", "zeros")


def init_weight(rng, fan_in, fan_out, init="torch"):
    """Host float64 (W, b) for a Linear layer, W of shape (fan_in, fan_out).

    torch          W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))   (PyTorch's nn.Linear default)
    xavier_uniform W ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)); b = 0
    xavier_normal  W ~ N(0, 2 / (fan_in + fan_out)); b = 0
    kaiming_normal W ~ N(0, 2 / fan_in) (He, for ReLU); b = 0
    zeros          W = 0, b = 0
    """
    if init == "torch":
        k = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-k, k, (fan_in, fan_out)), rng.uniform(-k, k, fan_out)
    b = numpy.zeros(fan_out)
    if init == "xavier_uniform":
        a = math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-a, a, (fan_in, fan_out)), b
    if init == "xavier_normal":
        return rng.normal(0, math.sqrt(2.0 / (fan_in + fan_out)), (fan_in, fan_out)), b
    if init == "kaiming_normal":
        return rng.normal(0, math.sqrt(2.0 / fan_in), (fan_in, fan_out)), b
    if init == "zeros":
        return numpy.zeros((fan_in, fan_out)), b
    raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


def _host_rng(rng):
    if rng is None:
        return numpy.random.default_rng()
    if isinstance(rng, (int, numpy.integer)):
        return numpy.random.default_rng(int(rng))
    return rng


class Linear(Module):
    """y = x @ W + b with W: (in, out), b: (out,). Initialised on the host (NumPy Generator
    ``rng`` or an int seed) so a seed gives the same weights on every backend."""

    def __init__(self, in_features, out_features, init="torch", rng=None, dtype=None):
        super().__init__()
        if int(in_features) < 1 or int(out_features) < 1:
            raise ValueError(f"Linear sizes must be positive, got ({in_features}, {out_features})")
        self.in_features, self.out_features = int(in_features), int(out_features)
        W, b = init_weight(_host_rng(rng), self.in_features, self.out_features, init)
        dtype = dtype or backend.get_dtype()
        self.W = Parameter(backend.to_device(W, dtype))
        self.b = Parameter(backend.to_device(b, dtype))
        self._x = None

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear({self.in_features}, {self.out_features}) expects input of shape "
                             f"(batch, {self.in_features}), got {x.shape}")
        self._x = x
        return linear_forward(x, self.W.data, self.b.data)

    @twinnable
    def backward(self, dy, need_dx=True):
        """dx = dy @ W.T;  W.grad += x.T @ dy;  b.grad += sum_B dy."""
        dx, dW, db = linear_backward(dy, self._x, self.W.data, need_dx)
        self.W.grad += dW
        self.b.grad += db
        return dx

    def input_vjp(self, dy):
        """dx = dy @ W.T (the dx line of the backward; no parameter gradient)."""
        return dy @ self.W.data.T


class Activation(Module):
    """Elementwise activation by name (relu, leaky_relu, tanh, sigmoid, softplus, elu, identity)."""

    def __init__(self, name):
        super().__init__()
        self.name = name
        self._f, self._df, self._needs = get_activation(name)
        self._cache = None

    def forward(self, x):
        y = self._f(x)
        self._cache = y if self._needs == "y" else x
        return y

    def backward(self, dy, need_dx=True):
        return self._df(dy, self._cache)

    def __repr__(self):
        return f"Activation({self.name!r})"


class Sequential(Module):
    """Modules applied in order; parameters named "<index>.<name>" like PyTorch."""

    def __init__(self, *modules):
        super().__init__()
        self.layers = list(modules)
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(f"Sequential item {i} is {type(m).__name__}, not a Module")
            self._modules[str(i)] = m

    @twinnable
    def forward(self, x):
        for m in self.layers:
            x = m.forward(x)
        return x

    def backward(self, dy, need_dx=True):
        for i in range(len(self.layers) - 1, -1, -1):
            dy = self.layers[i].backward(dy, need_dx=need_dx or i > 0)
        return dy

    def input_vjp(self, dy):
        """J^T dy through the layers in reverse order, each one's input_vjp (no parameter gradient)."""
        for m in reversed(self.layers):
            dy = m.input_vjp(dy)
        return dy


class MLP(Sequential):
    """in -> hidden[0] -> ... -> out, ``activation`` after every hidden Linear,
    ``out_activation`` (default none) after the last."""

    def __init__(self, in_features, hidden, out_features, activation="relu", out_activation=None,
                 init="torch", rng=None, dtype=None):
        get_activation(activation)
        if out_activation is not None:
            get_activation(out_activation)
        rng = _host_rng(rng)
        sizes = [int(in_features), *[int(h) for h in hidden], int(out_features)]
        mods = []
        for i in range(len(sizes) - 1):
            mods.append(Linear(sizes[i], sizes[i + 1], init=init, rng=rng, dtype=dtype))
            if i < len(sizes) - 2:
                mods.append(Activation(activation))
        if out_activation is not None:
            mods.append(Activation(out_activation))
        super().__init__(*mods)
        self.sizes = sizes
