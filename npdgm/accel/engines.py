"""The engines that run a fused formula (:mod:`npdgm.accel.formulas`): one pass per elementwise chain.

Each formula is ONE text (ReLU's backward is ``dx = where(y > 0, dy, 0)``). NumPy evaluates the text
(engine "numpy": the formulas' own reference, for tests), numba compiles it into one loop, numexpr runs
it as one multithreaded pass per output, and the CuPy ``ElementwiseKernel`` / ``ReductionKernel``
source is generated from it, so the engines cannot drift apart. :func:`run` picks the engine for its
arrays: CuPy arrays take the generated CUDA kernel, NumPy arrays the CPU engine of :func:`set_engine`.

CuPy, numba and numexpr are imported lazily: importing this module needs none of them.
"""
from __future__ import annotations

from numpy import ndarray as _ndarray

from ..backend import array_module
from .formulas import FORMULAS

CPU_MIN_SIZE = 4096   # arrays smaller than this take the reference NumPy code even with a CPU engine on
ENGINES = ("numba", "numexpr", "numpy")   # "numpy": the formulas evaluated by NumPy (for tests)
_state = {"kernels": {}, "cpu": None, "min_size": CPU_MIN_SIZE, "threads": 1}


def engine_available(engine):
    """True when the fused CPU ``engine`` can run here (numba / numexpr importable; numpy always)."""
    if engine == "numpy":
        return True
    try:
        __import__(engine)
    except ImportError:
        return False
    return True


def set_engine(engine, min_size=CPU_MIN_SIZE, threads=None):
    """Run the fused formulas on NumPy arrays with ``engine`` ("numba", "numexpr", "numpy"; None: the
    reference NumPy kernels). ``min_size``: calls whose largest array is smaller stay on the reference
    code (a fused call costs ~5-10 us). ``threads``: numba's loops run on one thread unless ``threads`` > 1
    (measured on 2 cores: a parallel numba loop between OpenBLAS's multithreaded GEMMs made whole steps
    slower, its workers and OpenBLAS's spinning ones fighting for the cores, while one vectorized thread
    already streams at memory speed); numexpr uses ``threads`` if given, else its own default. (Adam's
    numba loop is split over the wing's optimizer threads instead, :mod:`npdgm.accel.optim`.)"""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown fused CPU engine {engine!r}; expected one of {ENGINES}")
    if engine is not None and not engine_available(engine):
        raise ImportError(f"fused CPU engine {engine!r} is not installed (pip install {engine})")
    _state["cpu"] = engine
    _state["min_size"] = max(0, int(min_size))
    _state["threads"] = max(1, int(threads or 1))
    if engine == "numexpr" and threads is not None:
        __import__("numexpr").set_num_threads(int(threads))
    elif engine == "numba" and _state["threads"] > 1:
        import numba

        numba.set_num_threads(min(_state["threads"], numba.config.NUMBA_NUM_THREADS))
    return engine


def cpu_engine():
    """The fused CPU engine in use ("numba", "numexpr" or "numpy"), or None (the reference NumPy kernels)."""
    return _state["cpu"]


def engine_state():
    """The engine settings now (engine, min_size, threads), for :func:`set_engine_state` (no checks)."""
    return _state["cpu"], _state["min_size"], _state["threads"]


def set_engine_state(state):
    _state["cpu"], _state["min_size"], _state["threads"] = state


def _same_float(arrays, module):
    if not type(arrays[0]).__module__.startswith(module):
        return False
    dt = arrays[0].dtype
    return dt.kind == "f" and all(type(a).__module__.startswith(module) and a.dtype == dt for a in arrays)


def on_gpu(*arrays):
    """True when every argument is a CuPy float array of one dtype (the generated CUDA kernels run them)."""
    return _same_float(arrays, "cupy")


def on_cpu(*arrays):
    """True when a CPU engine is on and every argument is a NumPy float array of one dtype with
    at least ``min_size`` elements in the largest (0-d arrays take the plain code)."""
    if _state["cpu"] is None:
        return False
    dt = getattr(arrays[0], "dtype", None)
    if dt is None or dt.kind != "f":
        return False
    big = False
    for a in arrays:
        if type(a) is not _ndarray or a.dtype != dt or a.ndim == 0:
            return False
        big = big or a.size >= _state["min_size"]
    return big


def active(*arrays):
    """The twins' test: a fused formula runs these arrays (GPU or CPU); else the reference lines do."""
    if type(arrays[0]) is _ndarray:
        return on_cpu(*arrays)
    return on_gpu(*arrays)


def cuda_kernel(name):
    """The CuPy kernel generated from formula ``name`` (compiled lazily, once)."""
    k = _state["kernels"].get(name)
    if k is None:
        import cupy

        spec = dict(FORMULAS[name].cuda())
        if "map_expr" in spec:
            k = cupy.ReductionKernel(spec.pop("in_params"), spec.pop("out_params"), spec.pop("map_expr"),
                                     spec.pop("reduce_expr"), spec.pop("post_map_expr"), spec.pop("identity"),
                                     spec.pop("name"), preamble=spec.pop("preamble"))
        else:
            k = cupy.ElementwiseKernel(spec["in_params"], spec["out_params"], spec["operation"], spec["name"],
                                       preamble=spec["preamble"])
        _state["kernels"][name] = k
    return k


def run(name, *arrays, **scalars):
    """Formula ``name`` on ``arrays`` (in the formula's order; scalars by name): the generated CUDA
    kernel for CuPy arrays, else the CPU engine of :func:`set_engine`.
    Returns the one output, or a tuple in the formula's output order."""
    f = FORMULAS[name]
    if _state["cpu"] == "numba" and type(arrays[0]) is _ndarray:        # the CPU hot path: no dicts
        res = f.numba_call(arrays, scalars, _state["threads"] > 1)
        return res[0] if len(res) == 1 else res
    if type(arrays[0]).__module__.startswith("cupy"):
        k = cuda_kernel(name)
        args = [a for n, a in zip(f.arrays, arrays) if n not in f.inplace] + [float(scalars[s]) for s in f.scalars]
        if f.rows:
            return k(*args, axis=1)
        return k(*args, *[a for n, a in zip(f.arrays, arrays) if n in f.inplace])
    values = dict(zip(f.arrays, arrays), **scalars)
    res = getattr(f, _state["cpu"] or "numpy")(**values)
    out = tuple(res[o] for o in f.outputs)
    return out[0] if len(out) == 1 else out


def adam_step(p, g, m, v, t, lr, b1, b2, eps, wd=0.0, decoupled=False):
    """In place: one Adam (AdamW with ``decoupled``) update of p, m, v from g (formula ``adam``).
    ``t``: the step, already counted for this one; on CuPy a 0-d float64 device counter (so a captured
    CUDA graph replays with the right bias corrections)."""
    l2, decay = (0.0, 1.0 - lr * wd) if decoupled else (wd, 1.0)
    scal = dict(lr=lr, b1=b1, b2=b2, eps=eps, l2=l2, decay=decay)
    if type(p).__module__.startswith("cupy"):
        k = cuda_kernel("adam")
        k(g, t, *(float(scal[s]) for s in FORMULAS["adam"].scalars if s != "t"), p, m, v)
        return
    run("adam", g, p, m, v, t=t, **scal)
