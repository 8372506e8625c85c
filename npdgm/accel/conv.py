"""Fast twins of the convolutions (:mod:`npdgm.kernels.conv`) on NumPy arrays: the reference's im2col + one
GEMM, laid out channel-major so that neither the patch matrix nor the product is ever transposed and copied.

The reference builds patch rows (B Ho Wo, C kh kw) and multiplies by W.T: its im2col ends in a 6-D transposed
copy, its backward turns dy into rows (another copy) and its col2im adds from a transposed view. Here an image
is held as (C, H, W, B) in memory (the batch innermost) and handed out as its (B, C, H, W) transposed view:

    cols (C kh kw, Ho Wo B) = one copy of a strided window view of the padded x, in runs of B contiguous
                              values (the view is already in (c, i, j, ho, wo, b) order: no transpose),
    y = W (O, C kh kw) @ cols                        -> (O, Ho Wo B), handed out as the (B, O, Ho, Wo) view,
    dW = D @ cols.T,  dcols = W.T @ D                with D = dy as (O, Ho Wo B) (free for such a view),
    dx = col2im(dcols): kh kw strided adds into a (C, H, W, B) array, each of runs of B contiguous values,

and a 1x1 convolution (stride 1, no padding) is the plain product on the (C, H W B) pixel columns. NumPy's
elementwise kernels (and the fast wing's numba loops) keep an input's memory order, so the ReLU between two
convolutions passes the layout on and the next convolution reads it without a copy. The results are the
reference's up to the order of the sums (a few ulps of the values' scale: tests/test_accel_conv.py). Other
arrays (CuPy, integer, mixed dtypes) return ``NotImplemented`` and the reference runs.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..kernels import conv as reference
from ..kernels.conv import _check_conv, _geometry, _pair, conv_transpose2d_output_size


def _handled(*arrays):
    """True when every array (None skipped) is a NumPy float32 / float64 array of one dtype."""
    arrays = [a for a in arrays if a is not None]
    dt = arrays[0].dtype
    return all(type(a) is np.ndarray for a in arrays) and dt in (np.float32, np.float64) and \
        all(a.dtype == dt for a in arrays)


def _columns(x):
    """x (B, C, H, W) -> (C, H W B): free when x is the view a twin returns, else one transposing copy."""
    B, C, H, W = x.shape
    return x.transpose(1, 2, 3, 0).reshape(C, H * W * B)


def _image(cols, B, C, H, W):
    """(C, H W B) -> the (B, C, H, W) view."""
    return cols.reshape(C, H, W, B).transpose(3, 0, 1, 2)


def _is_1x1(kh, kw, s, p):
    return kh == kw == 1 and s == (1, 1) and p == (0, 0)


def _padded(x, ph, pw):
    """x (B, C, H, W) -> xpad (C, H + 2 ph, W + 2 pw, B) with a zero border (x's view when no padding)."""
    B, C, H, W = x.shape
    xt = x.transpose(1, 2, 3, 0)
    if ph == pw == 0:
        return xt
    xpad = np.empty((C, H + 2 * ph, W + 2 * pw, B), dtype=x.dtype)
    xpad[:, :ph] = 0
    xpad[:, H + ph:] = 0
    xpad[:, ph:H + ph, :pw] = 0
    xpad[:, ph:H + ph, W + pw:] = 0
    xpad[:, ph:H + ph, pw:W + pw] = xt
    return xpad


def im2col_cm(x, kh, kw, s, p, d, Ho, Wo):
    """cols (C kh kw, Ho Wo B), cols[(c, i, j), (ho, wo, b)] = x[b, c, ho s - p + i d, wo s - p + j d]
    (0 in the padding): one copy of a window view of the padded (C, H, W, B) image, B contiguous runs."""
    B, C = x.shape[:2]
    if _is_1x1(kh, kw, s, p):
        return _columns(x)
    xpad = _padded(x, *p)
    sC, sH, sW, sB = xpad.strides
    win = as_strided(xpad, (C, kh, kw, Ho, Wo, B), (sC, d[0] * sH, d[1] * sW, s[0] * sH, s[1] * sW, sB),
                     writeable=False)
    return np.ascontiguousarray(win).reshape(C * kh * kw, Ho * Wo * B)


def _valid(n_out, n_in, s, p, offset):
    """(first, stop) of the output indices o with 0 <= o s - p + offset < n_in, and the first input index."""
    first = max(0, -((offset - p) // s))                            # ceil((p - offset) / s)
    stop = min(n_out, (n_in - 1 + p - offset) // s + 1)
    return first, stop, first * s - p + offset


def col2im_cm(cols, B, C, H, W, kh, kw, s, p, d, Ho, Wo):
    """The adjoint of :func:`im2col_cm`: x as a C-contiguous (C, H, W, B) array with every entry of cols
    (C kh kw, Ho Wo B) added at the pixel it was read from (entries read from the padding dropped); per
    kernel offset (i, j) one strided add of the (C, Ho', Wo', B) block that lands inside the image."""
    if _is_1x1(kh, kw, s, p):
        return cols.reshape(C, H, W, B)
    (sh, sw), (ph, pw), (dh, dw) = s, p, d
    c = cols.reshape(C, kh, kw, Ho, Wo, B)
    x = np.zeros((C, H, W, B), dtype=cols.dtype)
    for i in range(kh):
        h0, h1, h = _valid(Ho, H, sh, ph, i * dh)
        for j in range(kw):
            w0, w1, w = _valid(Wo, W, sw, pw, j * dw)
            if h1 > h0 and w1 > w0:
                x[:, h:h + sh * (h1 - h0 - 1) + 1:sh, w:w + sw * (w1 - w0 - 1) + 1:sw] += c[:, i, j, h0:h1, w0:w1]
    return x


def conv2d_forward(x, W, b, stride=1, padding=0, dilation=1):
    """y = W (O, C kh kw) @ cols (C kh kw, B Ho Wo) + b, handed out as the (B, O, Ho, Wo) view."""
    if not _handled(x, W, b):
        return NotImplemented
    _check_conv(x, W, b, 1)
    B, (O, _, kh, kw) = x.shape[0], W.shape
    s, p, d, Ho, Wo = _geometry(x.shape, kh, kw, stride, padding, dilation)
    y = W.reshape(O, -1) @ im2col_cm(x, kh, kw, s, p, d, Ho, Wo)
    if b is not None:
        y += b[:, None]
    return _image(y, B, O, Ho, Wo)


def conv2d_backward(dy, x, W, stride=1, padding=0, dilation=1):
    """With D = dy as (O, B Ho Wo) and X = cols(x): dW = D @ X.T, dx = col2im(W.T @ D), db = sum of D's rows."""
    if not _handled(dy, x, W) or dy.ndim != 4 or x.ndim != 4 or W.ndim != 4:
        return NotImplemented
    (B, C, H, Wd), (O, _, kh, kw) = x.shape, W.shape
    s, p, d, Ho, Wo = _geometry(x.shape, kh, kw, stride, padding, dilation)
    if dy.shape != (B, O, Ho, Wo):
        return NotImplemented                       # the reference raises its own error
    D, W2 = _columns(dy), W.reshape(O, -1)
    dW = (D @ im2col_cm(x, kh, kw, s, p, d, Ho, Wo).T).reshape(W.shape)
    dx = col2im_cm(W2.T @ D, B, C, H, Wd, kh, kw, s, p, d, Ho, Wo).transpose(3, 0, 1, 2)
    return dx, dW, D.sum(axis=1)


def conv_transpose2d_forward(x, W, b, stride=1, padding=0, dilation=1, output_padding=0):
    """y = col2im(W (C, O kh kw).T @ X) + b with X = x as (C, B H W), handed out as the (B, O, Hy, Wy) view."""
    if not _handled(x, W, b):
        return NotImplemented
    _check_conv(x, W, b, 0)
    (B, C, H, Wd), (_, O, kh, kw) = x.shape, W.shape
    s, p, d, op = (_pair(v, n) for v, n in (
        (stride, "stride"), (padding, "padding"), (dilation, "dilation"), (output_padding, "output_padding")))
    if not (0 <= op[0] < s[0] and 0 <= op[1] < s[1]) or min(s) < 1 or min(d) < 1 or min(p) < 0:
        return NotImplemented                       # the reference raises its own error
    Hy = conv_transpose2d_output_size(H, kh, s[0], p[0], d[0], op[0])
    Wy = conv_transpose2d_output_size(Wd, kw, s[1], p[1], d[1], op[1])
    y = col2im_cm(W.reshape(C, -1).T @ _columns(x), B, O, Hy, Wy, kh, kw, s, p, d, H, Wd)
    if b is not None:
        y += b[:, None, None, None]
    return y.transpose(3, 0, 1, 2)


def conv_transpose2d_backward(dy, x, W, stride=1, padding=0, dilation=1):
    """With Y = cols(dy) (O kh kw, B H W) and X = x as (C, B H W): dx = W (C, O kh kw) @ Y, dW = X @ Y.T,
    db = sum dy."""
    if not _handled(dy, x, W) or dy.ndim != 4 or x.ndim != 4 or W.ndim != 4:
        return NotImplemented
    (B, C, H, Wd), (_, O, kh, kw) = x.shape, W.shape
    s, p, d, Ho, Wo = _geometry(dy.shape, kh, kw, stride, padding, dilation)
    if (Ho, Wo) != (H, Wd) or dy.shape[:2] != (B, O) or W.shape[0] != C:
        return NotImplemented                       # the reference raises its own error
    Y = im2col_cm(dy, kh, kw, s, p, d, H, Wd)
    dx = _image(W.reshape(C, -1) @ Y, B, C, H, Wd)
    return dx, (_columns(x) @ Y.T).reshape(W.shape), dy.sum(axis=(0, 2, 3))


# (reference, twin) pairs :func:`npdgm.accel.enable` registers
TWINS = [(getattr(reference, f.__name__), f)
         for f in (conv2d_forward, conv2d_backward, conv_transpose2d_forward, conv_transpose2d_backward)]
