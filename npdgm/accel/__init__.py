"""The fast wing: twins of reference functions, registered when the wing is switched on.

The reference wing (backend, kernels, nn, models, optim, train) is the textbook and never imports this
package. Switched on, the wing registers a twin for reference functions by name (the one door,
:mod:`npdgm.kernels.dispatch`), and every twin is tested against its reference (tests/test_accel.py,
tests/test_optim.py):

    formulas.py   each fused elementwise chain written once, as text; engines.py runs it with numba,
                  numexpr or a generated CuPy ElementwiseKernel / ReductionKernel
    twins.py      the fused twins of the kernels (activations, Bernoulli NLL, Gaussian, coupling, Linear+ReLU)
    conv.py       the convolutions' twins: im2col / col2im in a (C, H, W, B) layout feeding one GEMM, no
                  transposed copies (NumPy arrays, any engine)
    layers.py     nn.Sequential.forward with every Linear + ReLU pair in one pass; Module.zero_grad and
                  Linear.backward: a layer's first backward after zero_grad writes its gradients (out=)
    optim.py      Adam.step: chunked and threaded on NumPy, one fused pass with numba / numexpr, one
                  CUDA kernel with a device step counter on CuPy
    cuda.py       TF32 opt-in, CUDA-graph capture of a training step
    process.py    heap and OpenBLAS thread settings (made at switch-on; ``npdgm info`` reports them)

    import npdgm.accel
    npdgm.accel.enable("auto")      # the fastest installed CPU engine (numba, then numexpr)
    npdgm.accel.disable()           # the reference everywhere again (bit for bit)

``npdgm train ... --accel {auto,off,numba,numexpr}`` is the same switch (auto by default; the run records
what ran).
"""
from __future__ import annotations

from ..kernels import dispatch
from ..models.autoregressive import _Autoregressive
from ..nn.layers import Linear, Sequential
from ..nn.module import Module
from ..optim import Adam
from . import conv, engines, process
from .engines import CPU_MIN_SIZE, engine_available
from .layers import autoregressive_solve, linear_backward, sequential_forward, zero_grad
from .optim import adam_step
from .twins import TWINS

CHOICES = ("auto", "off", "numba", "numexpr")   # the --accel choices
AUTO_ORDER = ("numba", "numexpr")               # fastest first (measured: accel/formulas.py)


def _all_twins():
    """{reference name: twin} of every twin of the wing."""
    table = {ref.twin_name: twin for ref, twin in TWINS + conv.TWINS}
    table[Sequential.forward.twin_name] = sequential_forward
    table[Module.zero_grad.twin_name] = zero_grad
    table[Linear.backward.twin_name] = linear_backward
    table[Adam.step.twin_name] = adam_step
    table[_Autoregressive._solve.twin_name] = autoregressive_solve
    return table


def enable(engine="auto", min_size=CPU_MIN_SIZE, threads=None):
    """Switch the fast wing on and return what runs on NumPy arrays: "numba" or "numexpr" (the fused
    formulas with that engine), "numpy" (the formulas evaluated by NumPy: for tests), or "threads" (no
    compiled engine: the reference kernels, the chunked threaded Adam). CuPy arrays take the generated
    CUDA kernels whatever the CPU engine. ``engine``: one of :data:`CHOICES` ("off" is :func:`disable`),
    "numpy" or "threads"; "auto" takes the first installed of numba, numexpr. ``min_size`` and
    ``threads``: see :func:`npdgm.accel.engines.set_engine`."""
    if engine == "off":
        disable()
        return "off"
    if engine not in CHOICES + ("numpy", "threads"):
        raise ValueError(f"unknown accel engine {engine!r}; expected one of {CHOICES}")
    if engine == "auto":
        cpu = next((e for e in AUTO_ORDER if engine_available(e)), None)
    else:
        cpu = None if engine == "threads" else engine
    engines.set_engine(cpu, min_size, threads)          # ImportError naming the engine when it is missing
    dispatch.set_twins(_all_twins())
    process.apply()
    return cpu or "threads"


def disable():
    """Switch the fast wing off: every registered twin removed, the reference runs everywhere."""
    dispatch.set_twins({})
    engines.set_engine(None)


def engine():
    """What runs now: "off" (the reference), else as :func:`enable` returns it."""
    if not dispatch.twins():
        return "off"
    return engines.cpu_engine() or "threads"


def state():
    """The wing's whole switch state (twins and engine settings), for :func:`set_state`: a benchmark
    runner sharing its process with another (``npdgm bench --interleave``) restores its own before each
    step, so a reference runner stays the reference beside a fast one."""
    return dispatch.twins(), engines.engine_state()


def set_state(saved):
    """Restore :func:`state` (no checks, no imports: cheap enough to call every step)."""
    twins, engine_state = saved
    dispatch.set_twins(twins)
    engines.set_engine_state(engine_state)
