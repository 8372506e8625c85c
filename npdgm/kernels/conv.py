"""2-D convolution (NCHW) as im2col + one matrix product, its adjoint the transposed convolution, and
squeeze / unsqueeze (space-to-depth).

Layout (PyTorch's, so weights port as they are): x (B, C, H, W); a convolution's W (O, C, kh, kw), b (O,);
a transposed convolution's W (C, O, kh, kw). With stride s, padding p and dilation d, output pixel
(ho, wo) of a convolution reads the input pixels

    h = ho s - p + i d,   w = wo s - p + j d      (i < kh, j < kw; outside [0, H) x [0, W) they are 0),

so Ho = (H + 2p - d (kh - 1) - 1) // s + 1 and likewise Wo.
"""
from ..backend import array_module
from ._check import check_float, check_same_dtype
from .dispatch import twinnable


def _pair(v, name):
    v = (v, v) if isinstance(v, int) else tuple(v)
    if len(v) != 2 or not all(isinstance(a, int) for a in v):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


def conv_output_size(size, k, stride, padding, dilation):
    """Ho = (H + 2p - d (k - 1) - 1) // s + 1 for one axis."""
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def _geometry(x_shape, kh, kw, stride, padding, dilation):
    """(s, p, d, Ho, Wo) after checking the arguments; ValueError when the output would be empty."""
    s, p, d = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"stride and dilation must be >= 1 and padding >= 0, got {s}, {d}, {p}")
    Ho = conv_output_size(x_shape[2], kh, s[0], p[0], d[0])
    Wo = conv_output_size(x_shape[3], kw, s[1], p[1], d[1])
    if Ho < 1 or Wo < 1:
        raise ValueError(f"a {kh}x{kw} kernel (dilation {d}, padding {p}) does not fit a {x_shape[2]}x{x_shape[3]} "
                         f"input")
    return s, p, d, Ho, Wo


def im2col(x, kh, kw, stride=1, padding=0, dilation=1):
    """cols (B Ho Wo, C kh kw): row (b, ho, wo) holds the patch x[b, c, ho s - p + i d, wo s - p + j d] for
    c, i, j in that order (zero where the index falls in the padding). x (B, C, H, W)."""
    xp = array_module(x)
    B, C, H, W = x.shape
    (sh, sw), (ph, pw), (dh, dw), Ho, Wo = _geometry(x.shape, kh, kw, stride, padding, dilation)
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty((B, C, kh, kw, Ho, Wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xpad[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw]
    return cols.transpose(0, 4, 5, 1, 2, 3).reshape(B * Ho * Wo, C * kh * kw)


def col2im(cols, x_shape, kh, kw, stride=1, padding=0, dilation=1):
    """The adjoint of :func:`im2col`: x (B, C, H, W) with x[b, c, h, w] = the sum of every entry of cols
    (B Ho Wo, C kh kw) that im2col read from that pixel (overlapping patches add up; padding is dropped)."""
    xp = array_module(cols)
    B, C, H, W = x_shape
    (sh, sw), (ph, pw), (dh, dw), Ho, Wo = _geometry(x_shape, kh, kw, stride, padding, dilation)
    c = cols.reshape(B, Ho, Wo, C, kh, kw).transpose(0, 3, 4, 5, 1, 2)
    xpad = xp.zeros((B, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):
        for j in range(kw):
            xpad[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw] += c[:, :, i, j]
    return xpad[:, :, ph:ph + H, pw:pw + W]


def _check_conv(x, W, b, in_axis):
    if x.ndim != 4 or W.ndim != 4:
        raise ValueError(f"x must be (B, C, H, W) and W 4-D, got x {x.shape}, W {W.shape}")
    check_float("x", x)
    check_same_dtype("x", x, "W", W)
    if x.shape[1] != W.shape[in_axis]:
        raise ValueError(f"x has {x.shape[1]} channels but W expects {W.shape[in_axis]} (W shape {W.shape})")
    out = W.shape[1 - in_axis]
    if b is not None and b.shape != (out,):
        raise ValueError(f"b must have shape ({out},), got {b.shape}")


@twinnable
def conv2d_forward(x, W, b, stride=1, padding=0, dilation=1):
    """y[b, o, ho, wo] = b[o] + sum_{c, i, j} W[o, c, i, j] x[b, c, ho s - p + i d, wo s - p + j d].
    x (B, C, H, W), W (O, C, kh, kw), b (O,) or None -> y (B, O, Ho, Wo).

    As one product: y = im2col(x) @ W.reshape(O, C kh kw).T + b, rows (b, ho, wo) back to NCHW."""
    _check_conv(x, W, b, 1)
    B, O, kh, kw = x.shape[0], W.shape[0], W.shape[2], W.shape[3]
    *_, Ho, Wo = _geometry(x.shape, kh, kw, stride, padding, dilation)
    y = im2col(x, kh, kw, stride, padding, dilation) @ W.reshape(O, -1).T
    if b is not None:
        y += b
    return y.reshape(B, Ho, Wo, O).transpose(0, 3, 1, 2)


@twinnable
def conv2d_backward(dy, x, W, stride=1, padding=0, dilation=1):
    """dy (B, O, Ho, Wo) -> (dx, dW, db). With D = dy as rows (B Ho Wo, O) and X = im2col(x):
    dW = (D.T @ X).reshape(W.shape),  db = sum_{b, ho, wo} dy,  dx = col2im(D @ W.reshape(O, C kh kw))."""
    O, kh, kw = W.shape[0], W.shape[2], W.shape[3]
    D = dy.transpose(0, 2, 3, 1).reshape(-1, O)
    dW = (D.T @ im2col(x, kh, kw, stride, padding, dilation)).reshape(W.shape)
    dx = col2im(D @ W.reshape(O, -1), x.shape, kh, kw, stride, padding, dilation)
    return dx, dW, dy.sum(axis=(0, 2, 3))


def conv_transpose2d_output_size(size, k, stride, padding, dilation, output_padding=0):
    """H_out = (H - 1) s - 2p + d (k - 1) + output_padding + 1: the input size of the convolution whose
    adjoint this is."""
    return (size - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1


@twinnable
def conv_transpose2d_forward(x, W, b, stride=1, padding=0, dilation=1, output_padding=0):
    """The adjoint of conv2d in its input, plus a bias: x (B, C, H, W), W (C, O, kh, kw), b (O,) or None ->
    y (B, O, Hy, Wy), Hy = (H - 1) s - 2p + d (kh - 1) + output_padding + 1:

    y = col2im(X @ W.reshape(C, O kh kw)) + b  with X = x as rows (B H W, C), i.e. every input pixel adds
    x[b, c, h, w] W[c, o, i, j] at y[b, o, h s - p + i d, w s - p + j d]."""
    _check_conv(x, W, b, 0)
    B, C, H, Wd = x.shape
    O, kh, kw = W.shape[1], W.shape[2], W.shape[3]
    s, p, d, op = (_pair(v, n) for v, n in ((stride, "stride"), (padding, "padding"), (dilation, "dilation"),
                                             (output_padding, "output_padding")))
    if not (0 <= op[0] < s[0] and 0 <= op[1] < s[1]):
        raise ValueError(f"output_padding must be >= 0 and smaller than the stride {s}, got {op}")
    y_shape = (B, O) + tuple(conv_transpose2d_output_size(n, k, *a) for n, k, a in
                             ((H, kh, (s[0], p[0], d[0], op[0])), (Wd, kw, (s[1], p[1], d[1], op[1]))))
    X = x.transpose(0, 2, 3, 1).reshape(-1, C)
    y = col2im(X @ W.reshape(C, -1), y_shape, kh, kw, s, p, d)
    if b is not None:
        y += b[:, None, None]
    return y


@twinnable
def conv_transpose2d_backward(dy, x, W, stride=1, padding=0, dilation=1):
    """dy (B, O, Hy, Wy) -> (dx, dW, db). With Y = im2col(dy) (B H W, O kh kw) and X = x as rows (B H W, C):
    dx = (Y @ W.reshape(C, O kh kw).T) back to NCHW,  dW = (X.T @ Y).reshape(W.shape),  db = sum dy."""
    B, C, H, Wd = x.shape
    kh, kw = W.shape[2], W.shape[3]
    Y = im2col(dy, kh, kw, stride, padding, dilation)
    X = x.transpose(0, 2, 3, 1).reshape(-1, C)
    dx = (Y @ W.reshape(C, -1).T).reshape(B, H, Wd, C).transpose(0, 3, 1, 2)
    return dx, (X.T @ Y).reshape(W.shape), dy.sum(axis=(0, 2, 3))


def squeeze_forward(x, f=2):
    """Space to depth: x (B, C, H, W) -> y (B, C f f, H / f, W / f),
    y[b, c f^2 + i f + j, h, w] = x[b, c, h f + i, w f + j] (PyTorch's pixel_unshuffle). A permutation:
    log|det| = 0 and its inverse is :func:`unsqueeze_forward`."""
    B, C, H, W = x.shape
    if H % f or W % f:
        raise ValueError(f"squeeze by {f} needs H and W divisible by {f}, got {H}x{W}")
    return x.reshape(B, C, H // f, f, W // f, f).transpose(0, 1, 3, 5, 2, 4).reshape(B, C * f * f, H // f, W // f)


def squeeze_backward(dy, f=2):
    """dx = unsqueeze(dy): the adjoint of a permutation is its inverse."""
    return unsqueeze_forward(dy, f)


def unsqueeze_forward(y, f=2):
    """Depth to space, the inverse of :func:`squeeze_forward`: y (B, C f f, h, w) -> x (B, C, h f, w f)."""
    B, Cff, h, w = y.shape
    if Cff % (f * f):
        raise ValueError(f"unsqueeze by {f} needs channels divisible by {f * f}, got {Cff}")
    C = Cff // (f * f)
    return y.reshape(B, C, f, f, h, w).transpose(0, 1, 4, 2, 5, 3).reshape(B, C, h * f, w * f)


def unsqueeze_backward(dx, f=2):
    """dy = squeeze(dx)."""
    return squeeze_forward(dx, f)
