"""Rational-quadratic spline kernels (Durkan et al. 2019), linear tails; every backward by hand.

A spline of K bins per element is given by its knots: xk, yk (..., K+1), increasing, with
xk_0 = yk_0 = -bound and xk_K = yk_K = bound, and the derivatives d (..., K+1) at the knots, d_0 = d_K = 1
(the identity tails' slope, so the map is C^1). In bin k, with  x_k, w = xk_{k+1} - xk_k, y_k,
h = yk_{k+1} - yk_k, d0 = d_k, d1 = d_{k+1},  xi = (x - x_k) / w,  s = h / w:

    g(x) = y_k + h (s xi^2 + d0 xi (1 - xi)) / (s + (d1 + d0 - 2s) xi (1 - xi))

and g(x) = x outside [xk_0, xk_K]. The kernels, each forward beside its backward:

    rq_knots_forward / rq_knots_backward      raw conditioner outputs u (..., 3K - 1) <-> knots (xk, yk, d)
    rq_search                                 the bin of each element (no derivative: piecewise constant)
    rq_spline_forward / rq_spline_backward    x -> (y, log g'(x)) elementwise
    rq_spline_inverse / rq_spline_inverse_backward   y -> (x, -log g'(x)) by the quadratic's stable root

The coupling layer (``npdgm.models.flow_layers.SplineCoupling``) sums log g' over its features.
Derivations: docs/autoregressive-flows.md. Array math takes its module from the inputs (NumPy or CuPy).
"""
from __future__ import annotations

import math

from ..backend import array_module
from ._check import check_same_shape


def derivative_shift(min_derivative):
    """c with min_d + softplus(0 + c) = 1: raw derivative outputs of 0 give slope 1 (the identity spline,
    together with equal raw widths and heights)."""
    return math.log(math.expm1(1 - min_derivative)) if min_derivative < 1 else 0.0


def rq_knots_forward(u, bound, min_width=1e-3, min_height=1e-3, min_derivative=1e-3):
    """Knots from raw outputs u (..., 3K - 1) = [widths K | heights K | interior derivatives K - 1]:
    w = 2 bound (min_w + (1 - K min_w) softmax(u_w)),  xk = -bound + [0, cumsum w]  (the same for yk with
    the heights),  d = [1, min_d + softplus(u_d + c), 1]  (c = :func:`derivative_shift`: u = 0 is the
    identity map).  -> (xk, yk, d), each (..., K + 1)."""
    xp = array_module(u)
    K = (u.shape[-1] + 1) // 3
    if u.shape[-1] != 3 * K - 1 or K < 2:
        raise ValueError(f"u has {u.shape[-1]} values per element; a spline of K >= 2 bins takes 3K - 1")

    def knots(raw, lo):
        e = xp.exp(raw - raw.max(axis=-1, keepdims=True))
        size = 2 * bound * (lo + (1 - K * lo) * (e / e.sum(axis=-1, keepdims=True)))
        return xp.concatenate([xp.zeros_like(size[..., :1]), xp.cumsum(size, axis=-1)], axis=-1) - bound

    one = xp.ones_like(u[..., :1])
    d = xp.concatenate([one, min_derivative + xp.logaddexp(0, u[..., 2 * K:] + derivative_shift(min_derivative)),
                        one], axis=-1)
    return knots(u[..., :K], min_width), knots(u[..., K:2 * K], min_height), d


def rq_knots_backward(dxk, dyk, dd, u, bound, min_width=1e-3, min_height=1e-3, min_derivative=1e-3):
    """du (..., 3K - 1) from the knots' gradients: a knot is -bound plus the sizes before it, so
    d size_j = sum_{i > j} d knot_i;  size = 2 bound (lo + (1 - K lo) p):  dp = 2 bound (1 - K lo) d size;
    softmax:  d raw = p (dp - sum p dp);  d u_d = dd_interior sigmoid(u_d + c)."""
    xp = array_module(u)
    K = (u.shape[-1] + 1) // 3

    def back(dknots, raw, lo):
        e = xp.exp(raw - raw.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        dp = xp.cumsum(dknots[..., :0:-1], axis=-1)[..., ::-1] * (2 * bound * (1 - K * lo))
        return p * (dp - (p * dp).sum(axis=-1, keepdims=True))

    dud = dd[..., 1:K] / (1 + xp.exp(-(u[..., 2 * K:] + derivative_shift(min_derivative))))
    return xp.concatenate([back(dxk, u[..., :K], min_width), back(dyk, u[..., K:2 * K], min_height), dud], axis=-1)


def rq_search(v, edges):
    """Bin index k (...,) of each element: the number of interior edges edges_1 .. edges_{K-1} <= v
    (edges (..., K + 1) increasing; v below edges_1 -> 0, above edges_{K-1} -> K - 1)."""
    return (v[..., None] >= edges[..., 1:-1]).sum(axis=-1)


def _gather(k, xk, yk, d):
    """(one-hot (..., K + 1) of k, one-hot of k + 1, [x_k, w, y_k, h, d0, d1] each (...,))."""
    xp = array_module(xk)
    r = xp.arange(xk.shape[-1])
    o0 = (k[..., None] == r).astype(xk.dtype)
    o1 = (k[..., None] + 1 == r).astype(xk.dtype)
    x0, x1, y0, y1 = (xk * o0).sum(-1), (xk * o1).sum(-1), (yk * o0).sum(-1), (yk * o1).sum(-1)
    return o0, o1, [x0, x1 - x0, y0, y1 - y0, (d * o0).sum(-1), (d * o1).sum(-1)]


def _bin_eval(x, b):
    """The rational quadratic on its bin b = (x_k, w, y_k, h, d0, d1):  (y, log g', cache)."""
    xp = array_module(x)
    x0, w, y0, h, d0, d1 = b
    xi = (x - x0) / w
    s = h / w
    th = xi * (1 - xi)
    Dn = s + (d1 + d0 - 2 * s) * th
    num = s * xi * xi + d0 * th
    M = d1 * xi * xi + 2 * s * th + d0 * (1 - xi) ** 2
    return y0 + h * num / Dn, 2 * xp.log(s) + xp.log(M) - 2 * xp.log(Dn), (xi, s, th, Dn, num, M)


def _bin_partials(dy, dl, b, cache):
    """Gradients of sum(y dy) + sum(log g' dl) of :func:`_bin_eval` w.r.t. (x, x_k, w, y_k, h, d0, d1):
    R = num / D (c = d1 + d0 - 2s):  R_xi = ((2 s xi + d0 (1 - 2xi)) D - num c (1 - 2xi)) / D^2,
    R_s = (xi^2 D - num (1 - 2th)) / D^2,  R_d0 = th (D - num) / D^2,  R_d1 = -num th / D^2;
    l = log g':  l_xi = M_xi / M - 2 c (1 - 2xi) / D,  l_s = 2/s + 2th/M - 2(1 - 2th)/D,
    l_d0 = (1 - xi)^2/M - 2th/D,  l_d1 = xi^2/M - 2th/D;  then xi = (x - x_k)/w, s = h/w (chain rule)."""
    x0, w, y0, h, d0, d1 = b
    xi, s, th, Dn, num, M = cache
    c = d1 + d0 - 2 * s
    D2 = Dn * Dn
    t = 1 - 2 * xi
    gxi = dy * h * ((2 * s * xi + d0 * t) * Dn - num * c * t) / D2 \
        + dl * ((2 * d1 * xi + 2 * s * t - 2 * d0 * (1 - xi)) / M - 2 * c * t / Dn)
    gs = dy * h * (xi * xi * Dn - num * (1 - 2 * th)) / D2 + dl * (2 / s + 2 * th / M - 2 * (1 - 2 * th) / Dn)
    gd0 = dy * h * th * (Dn - num) / D2 + dl * ((1 - xi) ** 2 / M - 2 * th / Dn)
    gd1 = -dy * h * num * th / D2 + dl * (xi * xi / M - 2 * th / Dn)
    gx = gxi / w
    return gx, -gx, -(gxi * xi + gs * s) / w, dy, dy * num / Dn + gs / w, gd0, gd1


def _knot_grads(o0, o1, g):
    """Scatter the bin gradients (x_k, w, y_k, h, d0, d1) onto (dxk, dyk, dd) (..., K + 1):
    xk_k gets g_x - g_w and xk_{k+1} g_w (w = xk_{k+1} - xk_k); the same for y; d_k g_d0, d_{k+1} g_d1."""
    gx0, gw, gy0, gh, gd0, gd1 = [a[..., None] for a in g]
    return (gx0 - gw) * o0 + gw * o1, (gy0 - gh) * o0 + gh * o1, gd0 * o0 + gd1 * o1


def _inside(v, edges):
    return (v >= edges[..., 0]) & (v <= edges[..., -1])


def rq_spline_forward(x, xk, yk, d):
    """y = g(x) elementwise, the rational-quadratic spline in bin k = rq_search(x, xk) and y = x outside
    [xk_0, xk_K];  log g'(x) = 2 log s + log(d1 xi^2 + 2 s xi (1 - xi) + d0 (1 - xi)^2) - 2 log D
    (0 in the tails).   x (...,), knots (..., K + 1) -> (y (...,), log g' (...,))."""
    xp = array_module(x)
    check_same_shape("x", x, "knots without their last axis", xk[..., 0])
    inside = _inside(x, xk)
    xc = xp.clip(x, xk[..., 0], xk[..., -1])
    _, _, b = _gather(rq_search(xc, xk), xk, yk, d)
    y, logg, _ = _bin_eval(xc, b)
    return xp.where(inside, y, x), xp.where(inside, logg, 0)


def rq_spline_backward(dy, dlogg, x, xk, yk, d):
    """From dL/dy and dL/dlog g' (each (...,)):  dx = dy g' + dlogg d log g'/dx inside, dx = dy in the tails;
    the bin's partial derivatives (R = num / D, l = log g', see :func:`_bin_partials`) go to the knots:
    dxk_k += g_x0 - g_w, dxk_{k+1} += g_w (w = xk_{k+1} - xk_k), likewise dyk from (g_y0, g_h), dd_k += g_d0,
    dd_{k+1} += g_d1 (nothing from the tails).   -> (dx (...,), dxk, dyk, dd (..., K + 1))."""
    xp = array_module(x)
    inside = _inside(x, xk)
    xc = xp.clip(x, xk[..., 0], xk[..., -1])
    o0, o1, b = _gather(rq_search(xc, xk), xk, yk, d)
    g = _bin_partials(dy * inside, dlogg * inside, b, _bin_eval(xc, b)[2])
    return (xp.where(inside, g[0], dy), *_knot_grads(o0, o1, g[1:]))


def rq_spline_inverse(y, xk, yk, d):
    """x = g^-1(y) elementwise: in bin k = rq_search(y, yk), xi solves a xi^2 + b xi + c = 0 with
    a = h (s - d0) + (y - y_k) c2,  b = h d0 - (y - y_k) c2,  c = -s (y - y_k)  (c2 = d1 + d0 - 2s), by the
    stable root xi = 2c / (-b - sqrt(b^2 - 4ac)), x = x_k + w xi;  x = y in the tails.
    -> (x (...,), logdet_inv = -log g'(x) (...,))."""
    xp = array_module(y)
    check_same_shape("y", y, "knots without their last axis", yk[..., 0])
    inside = _inside(y, yk)
    yc = xp.clip(y, yk[..., 0], yk[..., -1])
    _, _, b = _gather(rq_search(yc, yk), xk, yk, d)
    x0, w, y0, h, d0, d1 = b
    s, dy = h / w, yc - y0
    c2 = d1 + d0 - 2 * s
    qa, qb, qc = h * (s - d0) + dy * c2, h * d0 - dy * c2, -s * dy
    xi = xp.clip(2 * qc / (-qb - xp.sqrt(xp.maximum(qb * qb - 4 * qa * qc, 0))), 0, 1)
    xs = x0 + xi * w
    logg = _bin_eval(xs, b)[1]
    return xp.where(inside, xs, y), xp.where(inside, -logg, 0)


def rq_spline_inverse_backward(dx, dlogdet_inv, x, xk, yk, d):
    """x = g^-1(y), logdet_inv = -log g'(x):  a = dx - dlogdet_inv d log g'/dx,  dy = a / g'  (dy = dx in the
    tails); the knots move x by -(d g/d knot) / g' at fixed y, so their gradients are those of
    :func:`rq_spline_backward` with upstream (-dy, -dlogdet_inv).  x is the inverse's output.
    -> (dy (...,), dxk, dyk, dd (..., K + 1))."""
    xp = array_module(x)
    inside = _inside(x, xk)
    xc = xp.clip(x, xk[..., 0], xk[..., -1])
    o0, o1, b = _gather(rq_search(xc, xk), xk, yk, d)
    _, logg, cache = _bin_eval(xc, b)
    lx = _bin_partials(xp.zeros_like(dx), xp.ones_like(dx), b, cache)[0]  # d log g' / dx at fixed knots
    dy = xp.where(inside, (dx - dlogdet_inv * lx) * xp.exp(-logg), dx)
    g = _bin_partials(-dy * inside, -dlogdet_inv * inside, b, cache)
    return (dy, *_knot_grads(o0, o1, g[1:]))
