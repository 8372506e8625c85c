"""Glow's layers (Kingma & Dhariwal 2018) on NCHW images held in flat vectors, every backward by hand.

A :class:`~npdgm.models.flows.Flow` moves flat rows x (B, D); an image layer here views the first
n = C H W features of a row as an image (C, H, W) in NCHW order (``x[:, :n].reshape(B, C, H, W)``) and passes
the other D - n features through unchanged (log-det 0, gradient unchanged). That is the multi-scale split:
after a level the next level's layers are built with half the channels, (C/2, H, W), so the second half of
the channels (a contiguous block of the NCHW vector) is factored out and reaches the Flow's standard normal
prior untouched -- exactly  log p(x) = log N(z_out) + log N(z_final) + sum log|det|  of Glow's split with a
standard normal prior on the factored-out half. The Flow container, its prior, checkpoints and the CLI see
ordinary flow layers.

Layers (each also has the protocol of :class:`~npdgm.models.flow_layers.FlowLayer`):

    Squeeze               (C, H, W) -> (4C, H/2, W/2), space to depth (pixel_unshuffle order); log|det| = 0
    ChannelActNorm        y = (x + loc_c) exp(ls_c) per channel, data-dependent init; log|det| = H W sum_c ls_c
    InvertibleConv1x1     y[:, :, h, w] = W^T x[:, :, h, w] at every pixel, W = P L (U + diag(s)) (the math of
                          :class:`~npdgm.models.flow_layers.InvertibleLinear`); log|det| = H W sum_c log|s_c|
    ConvAffineCoupling    y_b = (x_b + t) sigmoid(r + 2), (t, r) = NN(x_a) on the channel halves (openai/glow);
                          log|det| = sum_{c,h,w} log sigmoid(r + 2)
"""
from __future__ import annotations

import numpy as np

from .. import backend
from ..kernels.activations import sigmoid_forward, softplus_forward
from ..kernels.conv import squeeze_backward, squeeze_forward, unsqueeze_backward, unsqueeze_forward
from ..nn.conv import Conv2d
from ..nn.layers import Activation, Sequential
from ..nn.module import Parameter
from ..validate import check_float, check_int
from .flow_layers import FlowLayer, InvertibleLinear, _layer
from .registry import SHAPE_FREE_TYPES

__all__ = ["Squeeze", "ChannelActNorm", "InvertibleConv1x1", "ConvAffineCoupling", "check_image_shape"]


def check_image_shape(image_shape, dim):
    """(C, H, W) as ints after checking that it is three positive ints with C H W <= dim; ValueError naming it."""
    try:
        shape = tuple(check_int(s, "image_shape entry", lo=1) for s in image_shape)
    except TypeError:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape!r}") from None
    if len(shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
    if int(np.prod(shape)) > dim:
        raise ValueError(f"image_shape {shape} holds {int(np.prod(shape))} features, more than the flow's dim {dim}")
    return shape


def _image_layer(cls):
    """Register a flow layer spec and mark it as sized by its channels only (checkpoint size bound)."""
    SHAPE_FREE_TYPES.add(cls.__name__)
    return _layer(cls)


class _ImageLayer(FlowLayer):
    """An invertible map of the image x[:, :n] -> (B, C, H, W), n = C H W; features n.. pass through.

    Subclasses write the four passes on images: ``_forward(img) -> (img, logdet)``, ``_backward(dimg, dlogdet)``,
    ``_inverse(img) -> (img, logdet_inv)``, ``_inverse_backward(dimg, dlogdet_inv)``; the pass-through part
    has the identity Jacobian (no log-det, its gradient is copied)."""

    def __init__(self, dim, image_shape):
        super().__init__(dim)
        self.image_shape = check_image_shape(image_shape, self.dim)
        self.n = int(np.prod(self.image_shape))

    def _view(self, x):
        if getattr(x, "ndim", None) != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{type(self).__name__} expects rows of {self.dim} features, got shape "
                             f"{getattr(x, 'shape', type(x))}")
        return x[:, :self.n].reshape((x.shape[0],) + self.image_shape)

    def _join(self, img, x):
        """Rows (B, D): the image flattened in NCHW order, then x's pass-through features."""
        B = x.shape[0]
        if self.n == self.dim:
            return img.reshape(B, self.dim)
        out = backend.array_module(x).empty((B, self.dim), dtype=x.dtype)
        out[:, :self.n] = img.reshape(B, self.n)
        out[:, self.n:] = x[:, self.n:]
        return out

    def forward(self, x):
        """y = (f(x[:, :n]), x[:, n:]);  logdet = log|det f'|.   x (B, D) -> (y (B, D), logdet (B,))."""
        img, ld = self._forward(self._view(x))
        self._mode = "forward"
        return self._join(img, x), ld

    def backward(self, dy, dlogdet=None, need_dx=True):
        """dx = (f'^T dy[:, :n] + dlogdet d logdet/dx, dy[:, n:]).   dy (B, D), dlogdet (B,) or None -> dx (B, D)."""
        self._need("forward")
        return self._join(self._backward(self._view(dy), dlogdet), dy)

    def inverse(self, y, logdet=False):
        """x = (f^-1(y[:, :n]), y[:, n:]).   y (B, D) -> x (B, D), or (x, logdet_inv (B,)) with ``logdet``."""
        img, ld = self._inverse(self._view(y))
        self._mode = "inverse"
        x = self._join(img, y)
        return (x, ld) if logdet else x

    def inverse_backward(self, dx, dlogdet=None):
        """The backward of :meth:`inverse`.   dx (B, D), dlogdet_inv (B,) or None -> dy (B, D)."""
        self._need("inverse")
        return self._join(self._inverse_backward(self._view(dx), dlogdet), dx)

    def _zeros(self, img):
        return backend.array_module(img).zeros(img.shape[0], dtype=img.dtype)


@_image_layer
class Squeeze(_ImageLayer):
    """Space to depth: (C, H, W) -> (4C, H/2, W/2), y[c 4 + 2 i + j, h, w] = x[c, 2 h + i, 2 w + j]
    (PyTorch's pixel_unshuffle, :func:`npdgm.kernels.conv.squeeze_forward`). A permutation of the features:
    log|det| = 0, dx = unsqueeze(dy), and the inverse is unsqueeze. ``image_shape`` is the input's shape;
    :attr:`out_shape` the output's."""

    def __init__(self, dim, image_shape):
        super().__init__(dim, image_shape)
        C, H, W = self.image_shape
        if H % 2 or W % 2:
            raise ValueError(f"squeeze needs even H and W, image_shape is {self.image_shape}")
        self.out_shape = (4 * C, H // 2, W // 2)

    def spec(self):
        """The dict that rebuilds this layer: {"type": "Squeeze", dim, image_shape}."""
        return {"type": "Squeeze", "dim": self.dim, "image_shape": list(self.image_shape)}

    def _forward(self, img):
        return squeeze_forward(img), self._zeros(img)

    def _backward(self, dimg, dlogdet):
        return squeeze_backward(dimg.reshape((-1,) + self.out_shape))

    def _inverse(self, img):
        img = img.reshape((-1,) + self.out_shape)
        return unsqueeze_forward(img), self._zeros(img)

    def _inverse_backward(self, dimg, dlogdet):
        return unsqueeze_backward(dimg)


@_image_layer
class ChannelActNorm(_ImageLayer):
    """Glow's activation normalization per channel:  y[b, c, h, w] = (x[b, c, h, w] + loc_c) exp(ls_c),
    log|det| = H W sum_c ls_c.

    Data-dependent init: the first ``forward`` on an uninitialized layer sets loc = -mean, ls = -log(std + eps)
    over (batch, H, W) per channel, so y starts with zero mean and unit variance per channel; the
    ``initialized`` flag is a buffer saved with the weights. Backward (u = x + loc):
        dx = dy exp(ls),  d loc_c = sum_{b,h,w} dx,  d ls_c = sum_{b,h,w} dy y + H W sum_b dlogdet.
    Inverse: x = y exp(-ls) - loc (u = y exp(-ls)); its backward from dx, dlogdet_inv:
        dy = dx exp(-ls),  d loc_c = -sum dx,  d ls_c = -sum_{b,h,w} dx u - H W sum_b dlogdet_inv."""

    def __init__(self, dim, image_shape, eps=1e-6):
        super().__init__(dim, image_shape)
        dt = backend.get_dtype()
        C = self.image_shape[0]
        self.eps = check_float(eps, "eps", lo=0)
        self.loc = Parameter(backend.to_device(np.zeros(C), dt))
        self.log_scale = Parameter(backend.to_device(np.zeros(C), dt))
        self.initialized = False
        self.hw = self.image_shape[1] * self.image_shape[2]

    def spec(self):
        """The dict that rebuilds this layer: {"type": "ChannelActNorm", dim, image_shape, eps}."""
        return {"type": "ChannelActNorm", "dim": self.dim, "image_shape": list(self.image_shape), "eps": self.eps}

    def buffers(self):
        """{"initialized": 0-d host array, 1.0 once the data-dependent init ran} (saved with the weights)."""
        return {"initialized": np.array(1.0 if self.initialized else 0.0, dtype=np.dtype(self.loc.data.dtype))}

    def load_buffers(self, bufs):
        """Restore the init flag from {"initialized": 0-d array} (nonzero = initialized)."""
        self.initialized = bool(np.asarray(bufs["initialized"]) != 0)

    def initialize(self, img):
        """loc = -mean, ls = -log(std + eps) over (B, H, W) per channel of img (B, C, H, W), B H W >= 2."""
        if img.shape[0] * self.hw < 2:
            raise ValueError("ChannelActNorm data-dependent init needs at least 2 values per channel")
        xp = backend.array_module(img)
        self.loc.data[...] = -img.mean(axis=(0, 2, 3))
        self.log_scale.data[...] = -xp.log(img.std(axis=(0, 2, 3)) + self.eps)
        self.initialized = True

    def _chan(self, v):
        return v[:, None, None]

    def _forward(self, img):
        """u = x + loc,  y = u exp(ls);  logdet = H W sum_c ls_c (initializes on the first call)."""
        if not self.initialized:
            self.initialize(img)
        xp = backend.array_module(img)
        scale = xp.exp(self.log_scale.data)
        y = (img + self._chan(self.loc.data)) * self._chan(scale)
        self._y = y
        return y, self._zeros(img) + self.hw * self.log_scale.data.sum()

    def _backward(self, dimg, dlogdet):
        """dx = dy exp(ls);  d loc = sum_{b,h,w} dx;  d ls = sum_{b,h,w} dy y + H W sum_b dlogdet."""
        xp = backend.array_module(dimg)
        dx = dimg * self._chan(xp.exp(self.log_scale.data))
        self.loc.grad += dx.sum(axis=(0, 2, 3))
        self.log_scale.grad += (dimg * self._y).sum(axis=(0, 2, 3)) + (0 if dlogdet is None else
                                                                       self.hw * dlogdet.sum())
        return dx

    def _inverse(self, img):
        """u = y exp(-ls),  x = u - loc;  logdet_inv = -H W sum_c ls_c."""
        xp = backend.array_module(img)
        u = img * self._chan(xp.exp(-self.log_scale.data))
        self._u = u
        return u - self._chan(self.loc.data), self._zeros(img) - self.hw * self.log_scale.data.sum()

    def _inverse_backward(self, dimg, dlogdet):
        """dy = dx exp(-ls);  d loc = -sum dx;  d ls = -sum_{b,h,w} dx u - H W sum_b dlogdet_inv."""
        xp = backend.array_module(dimg)
        self.loc.grad -= dimg.sum(axis=(0, 2, 3))
        self.log_scale.grad -= (dimg * self._u).sum(axis=(0, 2, 3)) + (0 if dlogdet is None else
                                                                       self.hw * dlogdet.sum())
        return dimg * self._chan(xp.exp(-self.log_scale.data))


def _pixels(img):
    """(B, C, H, W) -> rows (B H W, C), one row per pixel."""
    return img.transpose(0, 2, 3, 1).reshape(-1, img.shape[1])


def _image(rows, shape):
    """Rows (B H W, C) -> (B, C, H, W), the inverse of :func:`_pixels`."""
    C, H, W = shape
    return rows.reshape(-1, H, W, C).transpose(0, 3, 1, 2)


@_image_layer
class InvertibleConv1x1(_ImageLayer):
    """Glow's invertible 1x1 convolution: the same C x C linear map at every pixel,
    y[b, :, h, w] = x[b, :, h, w] W  with W = P L (U + diag(s)) the LU parameterization of
    :class:`~npdgm.models.flow_layers.InvertibleLinear` (as a convolution weight (C_out, C_in, 1, 1) it is
    W^T). The pixels are the rows of that layer (``lin``), so its forward, inverse (two triangular solves) and
    both backwards are reused as they are:
        log|det| = H W log|det W| = H W sum_c log|s_c|,  dlogdet per pixel row = dlogdet of its image,
    so d log_s = diag(b^T dy) s + H W sum_b dlogdet. Parameters lin.L, lin.U, lin.log_s; ``seed``, ``perm``,
    ``sign`` as in InvertibleLinear (W starts as a seeded random rotation)."""

    def __init__(self, dim, image_shape, seed=0, perm=None, sign=None):
        super().__init__(dim, image_shape)
        self.lin = InvertibleLinear(self.image_shape[0], seed=seed, perm=perm, sign=sign)
        self.hw = self.image_shape[1] * self.image_shape[2]

    def spec(self):
        """The dict that rebuilds this layer: {"type": "InvertibleConv1x1", dim, image_shape, seed, perm, sign}."""
        s = self.lin.spec()
        return {"type": "InvertibleConv1x1", "dim": self.dim, "image_shape": list(self.image_shape),
                "seed": s["seed"], "perm": s["perm"], "sign": s["sign"]}

    def _per_pixel(self, dlogdet):
        """dlogdet (B,) -> (B H W,): every pixel row of an image carries the image's dlogdet."""
        return None if dlogdet is None else backend.array_module(dlogdet).repeat(dlogdet, self.hw)

    def _per_image(self, ld):
        return ld.reshape(-1, self.hw).sum(axis=1)

    def _forward(self, img):
        """rows x W at every pixel;  logdet = H W sum_c log_s_c."""
        rows, ld = self.lin.forward(_pixels(img))
        return _image(rows, self.image_shape), self._per_image(ld)

    def _backward(self, dimg, dlogdet):
        """InvertibleLinear's backward on the pixel rows with dlogdet repeated over each image's pixels."""
        return _image(self.lin.backward(_pixels(dimg), self._per_pixel(dlogdet)), self.image_shape)

    def _inverse(self, img):
        """rows W^-1 at every pixel (two triangular solves);  logdet_inv = -H W sum_c log_s_c."""
        rows, ld = self.lin.inverse(_pixels(img), logdet=True)
        return _image(rows, self.image_shape), self._per_image(ld)

    def _inverse_backward(self, dimg, dlogdet):
        """InvertibleLinear's inverse backward on the pixel rows."""
        return _image(self.lin.inverse_backward(_pixels(dimg), self._per_pixel(dlogdet)), self.image_shape)


def log_sigmoid(x):
    """log sigmoid(x) = -softplus(-x) (stable for every x)."""
    return -softplus_forward(-x)


@_image_layer
class ConvAffineCoupling(_ImageLayer):
    """Glow's affine coupling on channels (openai/glow's ``affine_coupling``): x_a = the first C//2 channels
    (conditioning), x_b the others;  h = NN(x_a),  t = h[:, 0::2],  r = h[:, 1::2],  s = sigmoid(r + 2),
        y_a = x_a,  y_b = (x_b + t) s,  log|det| = sum_{c,h,w} log s.

    NN: Conv2d 3x3 (pad 1) C_a -> hidden, ReLU, Conv2d 1x1 hidden -> hidden, ReLU, Conv2d 3x3 (pad 1)
    hidden -> 2 C_b initialized to zero (the layer starts as y_b = x_b sigmoid(2)). The scale is sigmoid(r + 2)
    in (0, 1) as in openai/glow (not the tanh-bounded exp(s) of the MLP :class:`AffineCoupling`): it cannot
    overflow either way. With u = x_b + t (so y_b = u s) the backward is
        dx_b = dy_b s,  dt = dy_b s,  dr = (dy_b u + dlogdet / s) s (1 - s) = dy_b u s (1 - s) + dlogdet (1 - s),
        dx_a = dy_a + J_NN^T [dt, dr interleaved];
    the inverse x_b = y_b / s - t (logdet_inv = -sum log s) and its backward from dx_b, dlogdet_inv:
        dy_b = dx_b / s,  dt = -dx_b,  dr = -(dx_b u + dlogdet_inv) (1 - s),  dy_a = dx_a + J_NN^T [dt, dr]."""

    def __init__(self, dim, image_shape, hidden=64, seed=0):
        super().__init__(dim, image_shape)
        C = self.image_shape[0]
        if C < 2:
            raise ValueError(f"a channel coupling needs at least 2 channels, image_shape is {self.image_shape}")
        self.hidden, self.seed = check_int(hidden, "hidden", lo=1), check_int(seed, "seed", lo=0)
        self.ca, self.cb = C // 2, C - C // 2
        rng = np.random.default_rng(self.seed)
        self.net = Sequential(Conv2d(self.ca, self.hidden, 3, padding=1, rng=rng), Activation("relu"),
                              Conv2d(self.hidden, self.hidden, 1, rng=rng), Activation("relu"),
                              Conv2d(self.hidden, 2 * self.cb, 3, padding=1, init="zeros", rng=rng))

    def spec(self):
        """The dict that rebuilds this coupling: {"type": "ConvAffineCoupling", dim, image_shape, hidden, seed}."""
        return {"type": "ConvAffineCoupling", "dim": self.dim, "image_shape": list(self.image_shape),
                "hidden": self.hidden, "seed": self.seed}

    def _ts(self, a):
        """(t, s, log s) from the conditioning channels a (B, C_a, H, W)."""
        h = self.net.forward(a)
        r2 = h[:, 1::2] + 2
        return h[:, 0::2], sigmoid_forward(r2), log_sigmoid(r2)

    def _dnet(self, dt, dr):
        """J_NN^T [dt, dr] with dt, dr interleaved back into h's channels (t = h[:, 0::2], r = h[:, 1::2])."""
        xp = backend.array_module(dt)
        dh = xp.empty(dt.shape[:1] + (2 * self.cb,) + dt.shape[2:], dtype=dt.dtype)
        dh[:, 0::2], dh[:, 1::2] = dt, dr
        return self.net.backward(dh)

    def _merge(self, a, b):
        return backend.array_module(a).concatenate([a, b], axis=1)

    def _dld(self, dlogdet):
        return 0 if dlogdet is None else dlogdet[:, None, None, None]

    def _forward(self, img):
        """h = NN(x_a), t = h[:, 0::2], s = sigmoid(h[:, 1::2] + 2);  y_b = (x_b + t) s;  logdet = sum log s."""
        xa, xb = img[:, :self.ca], img[:, self.ca:]
        t, s, logs = self._ts(xa)
        u = xb + t
        self._cache = (u, s)
        return self._merge(xa, u * s), logs.sum(axis=(1, 2, 3))

    def _backward(self, dimg, dlogdet):
        """dx_b = dt = dy_b s,  dr = dy_b u s (1 - s) + dlogdet (1 - s),  dx_a = dy_a + J_NN^T [dt, dr]."""
        u, s = self._cache
        dya, dyb = dimg[:, :self.ca], dimg[:, self.ca:]
        dt = dyb * s
        dr = (dt * u + self._dld(dlogdet)) * (1 - s)
        return self._merge(dya + self._dnet(dt, dr), dt)

    def _inverse(self, img):
        """h = NN(y_a);  x_b = y_b / s - t;  logdet_inv = -sum log s."""
        ya, yb = img[:, :self.ca], img[:, self.ca:]
        t, s, logs = self._ts(ya)
        u = yb / s
        self._cache = (u, s)
        return self._merge(ya, u - t), -logs.sum(axis=(1, 2, 3))

    def _inverse_backward(self, dimg, dlogdet):
        """dy_b = dx_b / s,  dt = -dx_b,  dr = -(dx_b u + dlogdet_inv) (1 - s),  dy_a = dx_a + J_NN^T [dt, dr]."""
        u, s = self._cache
        dxa, dxb = dimg[:, :self.ca], dimg[:, self.ca:]
        dr = -(dxb * u + self._dld(dlogdet)) * (1 - s)
        return self._merge(dxa + self._dnet(-dxb, dr), dxb / s)
