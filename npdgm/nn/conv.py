"""Conv2d, ConvTranspose2d and Reshape modules on npdgm.kernels.conv, and the convolutional encoder / decoder
of the VAE's ``arch="conv"`` (DCGAN-style: 4x4 kernels, stride 2, padding 1 halve / double the image)."""
from __future__ import annotations

import math

from .. import backend
from ..kernels.activations import get_activation
from ..kernels.conv import conv2d_backward, conv2d_forward, conv_transpose2d_backward, conv_transpose2d_forward
from .layers import Activation, Linear, Sequential, _host_rng
from .module import Module, Parameter


class _Conv(Module):
    transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, init="torch",
                 rng=None, dtype=None):
        super().__init__()
        k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
        if min(int(in_channels), int(out_channels), *k) < 1:
            raise ValueError(f"channels and kernel size must be positive, got {in_channels}, {out_channels}, {k}")
        self.in_channels, self.out_channels, self.kernel_size = int(in_channels), int(out_channels), k
        self.stride, self.padding, self.dilation = stride, padding, dilation
        # W (out, in, kh, kw) for a convolution, (in, out, kh, kw) for a transposed one; PyTorch's fan_in is
        # W.shape[1] kh kw in both cases
        shape = (self.in_channels, self.out_channels) if self.transposed else (self.out_channels, self.in_channels)
        rng, fan_in = _host_rng(rng), shape[1] * k[0] * k[1]
        if init == "zeros":
            W, b = rng.uniform(0, 0, shape + k), rng.uniform(0, 0, self.out_channels)
        elif init == "torch":
            bound = 1.0 / math.sqrt(fan_in)
            W, b = rng.uniform(-bound, bound, shape + k), rng.uniform(-bound, bound, self.out_channels)
        else:
            raise ValueError(f"unknown conv init {init!r}; expected 'torch' or 'zeros'")
        dtype = dtype or backend.get_dtype()
        self.W = Parameter(backend.to_device(W, dtype))
        self.b = Parameter(backend.to_device(b, dtype))
        self._x = None

    def _check(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self!r} expects input of shape (batch, {self.in_channels}, H, W), got {x.shape}")

    def __repr__(self):
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding})")


class Conv2d(_Conv):
    """y = conv2d(x, W, b) (:func:`npdgm.kernels.conv.conv2d_forward`), W (out, in, kh, kw) as in PyTorch."""

    def forward(self, x):
        self._check(x)
        self._x = x
        return conv2d_forward(x, self.W.data, self.b.data, self.stride, self.padding, self.dilation)

    def backward(self, dy, need_dx=True):
        """dx, W.grad += dW, b.grad += db from :func:`npdgm.kernels.conv.conv2d_backward`."""
        dx, dW, db = conv2d_backward(dy, self._x, self.W.data, self.stride, self.padding, self.dilation)
        self.W.grad += dW
        self.b.grad += db
        return dx

    def input_vjp(self, dy):
        """The dx of the backward alone (dW and db are not accumulated)."""
        return conv2d_backward(dy, self._x, self.W.data, self.stride, self.padding, self.dilation)[0]


class ConvTranspose2d(_Conv):
    """y = conv_transpose2d(x, W, b), W (in, out, kh, kw) as in PyTorch; ``output_padding`` adds rows and
    columns at the bottom / right (stride 2, kernel 4, padding 1 doubles H and W without it)."""

    transposed = True

    def __init__(self, *args, output_padding=0, **kw):
        super().__init__(*args, **kw)
        self.output_padding = output_padding

    def forward(self, x):
        self._check(x)
        self._x = x
        return conv_transpose2d_forward(x, self.W.data, self.b.data, self.stride, self.padding, self.dilation,
                                        self.output_padding)

    def backward(self, dy, need_dx=True):
        """dx, W.grad += dW, b.grad += db from :func:`npdgm.kernels.conv.conv_transpose2d_backward`."""
        dx, dW, db = conv_transpose2d_backward(dy, self._x, self.W.data, self.stride, self.padding, self.dilation)
        self.W.grad += dW
        self.b.grad += db
        return dx

    def input_vjp(self, dy):
        """The dx of the backward alone (dW and db are not accumulated)."""
        return conv_transpose2d_backward(dy, self._x, self.W.data, self.stride, self.padding, self.dilation)[0]


class Reshape(Module):
    """x (B, ...) -> (B, *shape); backward reshapes dy back to the input's shape."""

    def __init__(self, *shape):
        super().__init__()
        self.shape, self._in = tuple(int(s) for s in shape), None

    def forward(self, x):
        self._in = x.shape
        return x.reshape((x.shape[0],) + self.shape)

    def backward(self, dy, need_dx=True):
        return dy.reshape(self._in)

    def __repr__(self):
        return f"Reshape{self.shape}"


def _check_image(image_shape, n):
    """(C, H, W) as ints, ValueError unless n stride-2 convolutions divide H and W evenly."""
    C, H, W = (int(a) for a in image_shape)
    if H % 2 ** n or W % 2 ** n:
        raise ValueError(f"{n} stride-2 convolutions need H and W divisible by {2 ** n}, got {H}x{W}")
    return C, H, W


def conv_encoder(image_shape, channels, out_features, activation="relu", rng=None, dtype=None):
    """x (B, C H W) -> (B, out_features): Reshape(C, H, W), then per entry of ``channels`` a 4x4 stride-2
    convolution (padding 1: H -> H / 2) and ``activation``, then Reshape to a vector and one Linear."""
    get_activation(activation)
    rng = _host_rng(rng)
    C, H, W = _check_image(image_shape, len(channels))
    mods, c = [Reshape(C, H, W)], C
    for ch in channels:
        mods += [Conv2d(c, ch, 4, stride=2, padding=1, rng=rng, dtype=dtype), Activation(activation)]
        c, H, W = ch, H // 2, W // 2
    mods += [Reshape(c * H * W), Linear(c * H * W, out_features, rng=rng, dtype=dtype)]
    return Sequential(*mods)


def conv_decoder(in_features, channels, image_shape, activation="relu", rng=None, dtype=None):
    """z (B, in_features) -> (B, C H W), the mirror of :func:`conv_encoder`: one Linear and ``activation`` to
    (channels[-1], H / 2^n, W / 2^n), then 4x4 stride-2 transposed convolutions (H -> 2 H) through
    reversed(channels) to C output channels (no activation after the last), then Reshape to a vector."""
    get_activation(activation)
    rng = _host_rng(rng)
    C, H, W = _check_image(image_shape, len(channels))
    n = len(channels)
    h, w, c = H // 2 ** n, W // 2 ** n, channels[-1]
    mods = [Linear(in_features, c * h * w, rng=rng, dtype=dtype), Activation(activation), Reshape(c, h, w)]
    for i, ch in enumerate([*channels[::-1][1:], C]):
        mods.append(ConvTranspose2d(c, ch, 4, stride=2, padding=1, rng=rng, dtype=dtype))
        if i < n - 1:
            mods.append(Activation(activation))
        c = ch
    mods.append(Reshape(C * H * W))
    return Sequential(*mods)
