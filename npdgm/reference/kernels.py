"""Kernel reference cases: one per entry of the kernel table (npdgm/kernels/table.py), and the Adam update.

The committed float64 set is ``tests/reference/kernels-f64`` (:data:`KERNEL_CASES`, seed 0); a case's
formula is the entry's forward and backward docstrings.
"""
from ..kernels.table import TABLE
from ..nn.module import Parameter
from ..optim import Adam
from .cases import register

for _k in TABLE:
    register(_k.name, _k.formula, _k.make)(_k.run)


def _std(rng, dtype, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def _adam(rng, dt):
    return {"p": _std(rng, dt, 64), "g1": _std(rng, dt, 64), "g2": _std(rng, dt, 64), "g3": _std(rng, dt, 64)}


@register("adam_step", "m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  "
                       "p -= lr/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps);  "
                       "3 steps, lr=1e-2, betas=(0.9, 0.999)", _adam)
def _(i):
    p = Parameter(i["p"].copy())
    opt = Adam([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for g in (i["g1"], i["g2"], i["g3"]):
        p.grad[...] = g
        opt.step()
    return {"p": p.data, "m": opt.m[0], "v": opt.v[0]}, {}


KERNEL_CASES = sorted([k.name for k in TABLE] + ["adam_step"])  # the kernel set (tests/reference/kernels-f64)
