"""The GEMM floor: how long one training step's matrix products alone take on this machine.

A Linear layer y = x @ W + b (x: (B, in), W: (in, out)) costs three products per step:
    forward   y  = x  @ W      (B, in)  x (in, out)    layout "NN"
    backward  dx = dy @ W.T    (B, out) x (out, in)    layout "NT"  (skipped when x is data)
    backward  dW = x.T @ dy    (in, B)  x (B, out)     layout "TN"
Each distinct product is timed with the backend's own BLAS (OpenBLAS through NumPy on CPU,
cuBLAS through CuPy on GPU) on preallocated operands with the transposes as views, exactly as
the library calls it; the floor of a step is the sum over its products. A product with inner
dimension k = 1 (a flow layer fed by one coordinate) is an outer product: it is timed as the one
broadcast multiply the library computes it with (``kernels.linear._matmul``), not as an sgemm call
(which OpenBLAS runs at ~1% of its peak there: realnvp2d's (512, 1) x (1, 256), 0.15 ms as sgemm,
~0.03 ms as the multiply), so the floor is the product's real cost, not BLAS's worst case. A step cannot be faster
than its floor, so ms/step divided by the floor says how much time goes elsewhere
(elementwise work, the optimizer, Python and launch overhead).
"""
from __future__ import annotations

from collections import Counter

from .harness import time_steps


def linear_products(batch, layers):
    """Counter of (m, k, n, layout) products for Linear layers ``[(in, out, need_dx), ...]``."""
    c = Counter()
    for fin, fout, need_dx in layers:
        c[(batch, fin, fout, "NN")] += 1
        if need_dx:
            c[(batch, fout, fin, "NT")] += 1
        c[(fin, batch, fout, "TN")] += 1
    return c


def _operands(xp, m, k, n, layout, dtype, rng):
    a = rng.standard_normal((k, m) if layout[0] == "T" else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if layout[1] == "T" else (k, n)).astype(dtype)
    a, b = xp.asarray(a), xp.asarray(b)
    a = a.T if layout[0] == "T" else a
    b = b.T if layout[1] == "T" else b
    return a, b, xp.empty((m, n), dtype=dtype)


def product(xp, a, b, out):
    """A function computing ``out = a @ b`` as the library computes it (``kernels.linear._matmul``): matmul,
    or for an inner dimension of 1 the one broadcast multiply (an outer product; see the module docstring)."""
    from npdgm.kernels.linear import _matmul

    return lambda: _matmul(xp, a, b, out)


def gemm_floor(products, xp, sync=lambda: None, dtype="float32", repeats=5, target_s=0.1):
    """Time every product once per distinct shape; returns {"floor_ms", "gflops", "products": [...]}.

    ``products``: Counter {(m, k, n, layout): count}; ``xp``: numpy or cupy.
    """
    import numpy

    rng = numpy.random.default_rng(0)
    rows, total_ms, total_flop = [], 0.0, 0
    for (m, k, n, layout), count in sorted(products.items()):
        a, b, c = _operands(xp, m, k, n, layout, dtype, rng)
        t = time_steps(product(xp, a, b, c), sync, warmup=2, repeats=repeats, target_s=target_s)
        ms = t["ms_per_step"]
        flop = 2 * m * k * n
        rows.append({"m": m, "k": k, "n": n, "layout": layout, "count": count, "ms": round(ms, 5),
                     "gflops": round(flop / ms / 1e6, 2)})
        total_ms += count * ms
        total_flop += count * flop
    return {"floor_ms": total_ms, "gflop_per_step": total_flop / 1e9,
            "gflops": total_flop / total_ms / 1e6 if total_ms else None, "products": rows}
