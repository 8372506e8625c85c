"""Float64 central differences against any hand-written backward.

    numerical_grad(f, x)  ~  df/dx,   df/dx_i = (f(x + h e_i) - f(x - h e_i)) / 2h

The error reported per input is scale-relative:

    rel = max_i |analytic_i - numeric_i| / max(max_i |analytic_i|, max_i |numeric_i|, 1e-30)

which stays meaningful when some entries are (near) zero. ``npdgm gradcheck`` runs every
check in :data:`CHECKS` and prints a table; tests run the same registry.
"""
from __future__ import annotations

import numpy as np

from . import backend

TOL = 1e-6
CHECKS = {}  # name -> function(rng) -> {input name: (max_abs, max_rel)}


def register(name):
    """Decorator adding a check ``fn(rng) -> report`` to the ``npdgm gradcheck`` table."""
    def deco(fn):
        CHECKS[name] = fn
        return fn
    return deco


def numerical_grad(f, x, h=1e-6):
    """Central-difference gradient of scalar ``f()`` w.r.t. array ``x`` (perturbed in place)."""
    g = np.zeros(x.shape, dtype=np.float64)
    if not x.flags.c_contiguous:
        raise ValueError("numerical_grad needs a C-contiguous array it can perturb in place")
    flat, gflat = x.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = float(flat[i])
        flat[i] = old + h
        fp = float(f())
        flat[i] = old - h
        fm = float(f())
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return g


def compare(analytic, numeric):
    """(max abs error, scale-relative error) between two gradient arrays."""
    a = np.asarray(backend.to_host(analytic), dtype=np.float64)
    n = np.asarray(numeric, dtype=np.float64)
    if a.shape != n.shape:
        raise ValueError(f"analytic gradient has shape {a.shape}, numeric {n.shape}")
    err = float(np.max(np.abs(a - n))) if a.size else 0.0
    scale = max(float(np.max(np.abs(a))) if a.size else 0.0, float(np.max(np.abs(n))) if n.size else 0.0, 1e-30)
    return err, err / scale


def check(f, inputs, analytic, h=1e-6):
    """Compare ``analytic[name]`` with the central difference of ``f()`` w.r.t. ``inputs[name]``.

    ``inputs`` are float64 host arrays that ``f`` reads (they are perturbed in place and restored).
    Returns {name: (max_abs, max_rel)}.
    """
    report = {}
    for name, x in inputs.items():
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck input {name!r} must be float64, got {x.dtype}")
        report[name] = compare(analytic[name], numerical_grad(f, x, h))
    return report


def check_kernel(k, inputs, h=1e-6):
    """Check a kernel table entry ``k`` (:mod:`npdgm.kernels.table`) on float64 ``inputs``: each gradient
    ``k.run`` returns against central differences of  L = sum_o sum(outputs[o] * inputs[upstream of o])."""
    outputs, grads = k.run(inputs)
    upstream = k.upstream(outputs)

    def loss():
        out, _ = k.run(inputs)
        return sum(float(np.sum(out[o] * inputs[u])) for o, u in upstream.items())

    return check(loss, {n: inputs[n] for n in grads}, grads, h)


def check_module_params(module, loss_fn, h=1e-6):
    """Check every parameter gradient of ``module`` for the scalar ``loss_fn()``, which must run the
    forward pass. Call after ``module.zero_grad()`` and one forward/backward that filled ``grads``."""
    analytic = {n: backend.to_host(g).copy() for n, g in module.grads.items()}
    return check(loss_fn, module.params, analytic, h)


def numerical_jacobian(f, x, h=1e-5):
    """Row-wise Jacobian of f: (B, D) -> (B, E) by central differences, J (B, E, D) with
    J[b, :, j] = d f(x)_b / d x_bj (f must map every row on its own, as flow layers do)."""
    J = None
    for j in range(x.shape[1]):
        e = np.zeros_like(x)
        e[:, j] = h
        col = (f(x + e) - f(x - e)) / (2 * h)
        if J is None:
            J = np.zeros((x.shape[0], col.shape[1], x.shape[1]))
        J[:, :, j] = col
    return J


def numerical_logdet(f, x, h=1e-5):
    """log|det J| per row (B,) of a row-wise map f: (B, D) -> (B, D): slogdet of :func:`numerical_jacobian`,
    the brute-force check of a flow's log-determinant; FloatingPointError if a Jacobian is singular."""
    sign, ld = np.linalg.slogdet(numerical_jacobian(f, x, h))
    if np.any(sign == 0):
        raise FloatingPointError("a finite-difference Jacobian is singular")
    return ld


def check_flow_layer(layer, a, rng, direction="forward", h=1e-6):
    """Check a flow layer's backward (``direction`` "forward": ``layer.backward``; "inverse":
    ``layer.inverse_backward``) on float64 input ``a`` (B, D): its parameter and input gradients
    against central differences of  L = sum(out * u) + sum(logdet * v)  with random u (B, D), v (B,)."""
    up, v = rng.standard_normal(a.shape), rng.standard_normal(a.shape[0])
    run = layer.forward if direction == "forward" else (lambda t: layer.inverse(t, logdet=True))
    layer.zero_grad()
    run(a)
    da = layer.backward(up, v) if direction == "forward" else layer.inverse_backward(up, v)
    analytic = {**{n: g.copy() for n, g in layer.grads.items()}, "a": da}
    arrays = {**layer.params, "a": a}

    def loss():
        o, ld = run(arrays["a"])
        return np.sum(o * up) + np.sum(ld * v)

    return check(loss, arrays, analytic, h)


def run_all(names=None, seed=0, progress=None):
    """Run registered checks; returns [(check name, input name, max_abs, max_rel, passed)].
    progress(items) -> iterable: wraps the selected (name, check) pairs (e.g. npdgm.train.progress)."""
    rows = []
    chosen = [(name, fn) for name, fn in CHECKS.items() if not names or any(s in name for s in names)]
    with backend.use("numpy", "float64"):
        for name, fn in (progress or iter)(chosen):
            report = fn(np.random.default_rng(seed))
            for inp, (abs_err, rel_err) in report.items():
                rows.append((name, inp, abs_err, rel_err, rel_err < TOL))
    return rows


def format_table(rows):
    w = max([len(f"{r[0]}:{r[1]}") for r in rows] + [10])
    lines = [f"{'check':<{w}}  {'max abs err':>11}  {'max rel err':>11}  result", "-" * (w + 34)]
    for name, inp, a, r, ok in rows:
        lines.append(f"{name + ':' + inp:<{w}}  {a:11.2e}  {r:11.2e}  {'pass' if ok else 'FAIL'}")
    n_fail = sum(not r[4] for r in rows)
    lines.append(f"{len(rows) - n_fail} passed, {n_fail} failed (tolerance: rel < {TOL:g}, float64)")
    return "\n".join(lines)
