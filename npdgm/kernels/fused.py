"""Fused kernels behind the plain kernels' names: one pass per elementwise chain, on GPU (CuPy) and CPU
(numexpr); CUDA-graph capture of a step; TF32 opt-in.

Each fused kernel is ONE formula text in :mod:`npdgm.kernels.formulas` (e.g. ReLU's backward is
``dx = where(y > 0, dy, 0)``). NumPy evaluates the text (the reference), numexpr runs it on the
CPU, and the CuPy ``ElementwiseKernel`` / ``ReductionKernel`` source is generated from it, so the
three cannot drift apart. The kernels in ``npdgm.kernels`` call the versions here when
:func:`active` says so for their arrays:

* CuPy arrays: the generated CUDA kernels (default on; ``set_enabled(False)`` runs the plain array
  code on CuPy too, for comparison). On the GPU a small model is launch-bound: ``dy * (y > 0)`` is
  two kernels and a temporary, the Bernoulli gradient five; fused, each is one launch.
* NumPy arrays: plain NumPy by default (``npdgm-numpy`` is the textbook path). ``set_cpu_fused(True)``
  runs the formulas as one compiled loop each with numba (or, second choice, numexpr: one
  multithreaded pass per output), no temporaries; ``optim.Adam`` then updates p, m, v in one fused
  pass. Without numba and numexpr the switch warns and the plain NumPy code runs.

    npdgm.kernels.fused.set_cpu_fused(True)  # numba (or numexpr) on the CPU: pip install numba
    npdgm.kernels.fused.set_enabled(False)   # plain array code on CuPy (for comparison)
    npdgm.kernels.fused.set_tf32(True)       # TF32 tensor-core matmuls (opt-in; ~1e-3 rel. error)
    step = CudaGraphStep(fn, (x, eps), optimizers=[opt])   # capture fn(x, eps) once, replay it

tests/test_fused.py compares every formula with its plain kernel on every input maker of the kernel
table (NumPy reference, numba and numexpr on the CPU; the CuPy kernels under ``pytest -m gpu``, and
``benchmarks/gpu_check.sh`` on a GPU machine). CuPy, numba and numexpr are imported lazily:
importing this module needs none of them.
"""
from __future__ import annotations

import warnings

from numpy import ndarray as _ndarray

from ..backend import array_module
from .formulas import FORMULAS

_state = {"enabled": True, "kernels": {}, "cpu": None, "min_size": 0, "threads": 1}
CPU_MIN_SIZE = 4096   # arrays smaller than this take the plain NumPy code even with the fused CPU path on
ENGINES = ("numba", "numexpr", "numpy")   # "numpy": the formulas evaluated by NumPy (the reference, for tests)


def set_enabled(flag=True):
    """Use the fused CuPy kernels (default) or the plain array code on CuPy arrays."""
    _state["enabled"] = bool(flag)


def enabled():
    return _state["enabled"]


def engine_available(engine):
    """True when the fused CPU ``engine`` can run here (numba / numexpr importable; numpy always)."""
    if engine == "numpy":
        return True
    try:
        __import__(engine)
    except ImportError:
        return False
    return True


def numexpr_available():
    return engine_available("numexpr")


def set_cpu_fused(flag=True, engine=None, min_size=CPU_MIN_SIZE, threads=None):
    """Run the fused formulas on NumPy arrays (True) or the plain NumPy kernels (False, the default).

    ``engine``: "numba" (one compiled parallel loop per formula: the fastest, measured), "numexpr", or
    "numpy" (whole-array NumPy evaluation of the formulas: the reference, for tests); None picks the
    first of numba, numexpr that is installed, and without either warns and leaves the plain NumPy
    path on. ``min_size``: calls whose largest array is smaller stay on the plain code (a fused call
    costs ~5-10 us). ``threads``: numba's loops run on one thread unless ``threads`` > 1 (measured on 2
    cores: a parallel numba loop between OpenBLAS's multithreaded GEMMs made whole steps slower, its
    workers and OpenBLAS's spinning ones fighting for the cores, while one vectorized thread already
    streams at memory speed); numexpr uses ``threads`` if given, else its own default. (Adam's numba
    loop is split over npdgm's own optimizer threads instead, from ``optim.NUMBA_THREADED_MIN``
    parameters on.) Returns the engine now in use, or None (plain NumPy)."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown fused CPU engine {engine!r}; expected one of {ENGINES}")
    if flag and engine is None:
        engine = next((e for e in ENGINES[:2] if engine_available(e)), None)
        if engine is None:
            warnings.warn("neither numba nor numexpr is installed (pip install numba, or numexpr: the extra "
                          "npdgm[fast]): the fused CPU path falls back to plain NumPy", RuntimeWarning, stacklevel=2)
            flag = False
    elif flag and not engine_available(engine):
        raise ImportError(f"fused CPU engine {engine!r} is not installed (pip install {engine})")
    _state["cpu"] = engine if flag else None
    _state["min_size"] = max(0, int(min_size))
    _state["threads"] = max(1, int(threads or 1))
    if flag and engine == "numexpr" and threads is not None:
        __import__("numexpr").set_num_threads(int(threads))
    elif flag and engine == "numba" and _state["threads"] > 1:
        import numba

        numba.set_num_threads(min(_state["threads"], numba.config.NUMBA_NUM_THREADS))
    return _state["cpu"]


def cpu_fused():
    """The fused CPU engine in use ("numba", "numexpr" or "numpy"), or None for the plain NumPy kernels."""
    return _state["cpu"]


def cpu_state():
    """The fused CPU settings now (engine, min_size, threads), to hand to :func:`set_cpu_state` later: a
    benchmark runner sharing its process with another (``npdgm bench --interleave``) restores its own
    before each step, so a plain NumPy runner stays plain beside a fused one."""
    return _state["cpu"], _state["min_size"], _state["threads"]


def set_cpu_state(state):
    """Restore settings from :func:`cpu_state` (no checks, no imports: cheap enough to call every step)."""
    _state["cpu"], _state["min_size"], _state["threads"] = state


def _same_float(arrays, module):
    if not type(arrays[0]).__module__.startswith(module):
        return False
    dt = arrays[0].dtype
    return dt.kind == "f" and all(type(a).__module__.startswith(module) and a.dtype == dt for a in arrays)


def on_gpu(*arrays):
    """True when fusion is enabled and every argument is a CuPy float array of one dtype (the kernels'
    dispatch test; anything else, NumPy arrays included, takes the plain array code)."""
    return _state["enabled"] and _same_float(arrays, "cupy")


def on_cpu(*arrays):
    """True when the fused CPU path is on and every argument is a NumPy float array of one dtype with
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
    """The kernels' dispatch test: a fused version runs these arrays (GPU or CPU)."""
    if type(arrays[0]) is _ndarray:
        return on_cpu(*arrays)
    return on_gpu(*arrays)


def set_tf32(flag):
    """Allow (True) or forbid (False, the default) TF32 tensor-core math in float32 CuPy matmuls.
    No-op without CuPy. TF32 keeps float32's range with a 10-bit mantissa: faster GEMMs on
    Ampere and newer, ~1e-3 relative error, so it is an explicit opt-in."""
    try:
        import numpy
        from cupy._core import _routines_linalg as L
    except ImportError:
        return False
    L.set_compute_type(numpy.float32, L.COMPUTE_TYPE_TF32 if flag else L.COMPUTE_TYPE_DEFAULT)
    return True


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
    kernel for CuPy arrays, else numexpr or the NumPy reference (:func:`set_cpu_fused`'s engine).
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


# -- the fused versions (called by the plain kernels when active(...)) --------------------------
def relu_forward(x):
    return run("relu_forward", x)


def bias_relu_forward(h, b):
    """In place: h <- max(h + b, 0) (formula ``bias_relu_forward``); returns h."""
    return run("bias_relu_forward", h, b)


def relu_backward(dy, y):
    return run("relu_backward", dy, y)


def leaky_relu_backward(dy, x, slope):
    return run("leaky_relu_backward", dy, x, slope=slope)


def tanh_backward(dy, y):
    return run("tanh_backward", dy, y)


def sigmoid_forward(x):
    return run("sigmoid_forward", x)


def sigmoid_backward(dy, y):
    return run("sigmoid_backward", dy, y)


def softplus_forward(x):
    return run("softplus_forward", x)


def softplus_backward(dy, x):
    return run("softplus_backward", dy, x)


def elu_backward(dy, x, alpha):
    return run("elu_backward", dy, x, alpha=alpha)


def bernoulli_nll_forward(logits, x):
    return run("bernoulli_nll_forward", logits, x)


def bernoulli_nll_backward(dloss, logits, x):
    return run("bernoulli_nll_backward", dloss[:, None], logits, x)


def reparameterize_forward(mu, logvar, eps):
    return run("reparameterize_forward", mu, logvar, eps)


def reparameterize_backward(dz, logvar, eps):
    dlv = run("reparameterize_backward", dz, logvar, eps)
    extra = tuple(range(dz.ndim - logvar.ndim))
    if extra:
        dz, dlv = dz.sum(axis=extra), dlv.sum(axis=extra)
    return dz, dlv


def kl_std_normal_forward(mu, logvar):
    return run("kl_std_normal_forward", mu, logvar)


def kl_std_normal_backward(dkl, mu, logvar):
    return run("kl_std_normal_backward", dkl[:, None], mu, logvar)


def _column(d, like):
    """dL/dlogdet (B,) as a (B, 1) column; None (no gradient reaches the log-det) as zeros."""
    return d[:, None] if d is not None else array_module(like).zeros((like.shape[0], 1), dtype=like.dtype)


def affine_coupling_forward(xb, s, t):
    return run("affine_coupling_forward", xb, s, t), s.sum(axis=1)


def affine_coupling_backward(dyb, dlogdet, xb, s):
    dxb, ds = run("affine_coupling_backward", dyb, _column(dlogdet, xb), xb, s)
    return dxb, ds, dyb


def affine_coupling_inverse(yb, s, t):
    return run("affine_coupling_inverse", yb, s, t), -s.sum(axis=1)


def affine_coupling_inverse_backward(dxb, dlogdet_inv, xb, s):
    return run("affine_coupling_inverse_backward", dxb, _column(dlogdet_inv, xb), xb, s)


def logistic_logprob_forward(z):
    return run("logistic_logprob_forward", z)


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


# -- CUDA graphs --------------------------------------------------------------------------------
class CudaGraphStep:
    """Capture ``fn(*inputs)`` (a whole training step: forward, backward, optimizer) as a CUDA graph
    and replay it: one launch per step instead of hundreds.

    ``inputs`` are example arrays (host or device); the step runs on static device copies whose
    contents each call refreshes, so every buffer keeps its address. ``fn`` must not synchronize
    with the host (no ``float(loss)``; flows with ``checked="off"``, ``VAE.loss_and_grad(check=False)``).
    Temporaries come from a private memory pool that lives as long as the graph, so nothing else
    can reuse (and overwrite) them between replays. ``optimizers``: their host step counters are
    advanced on every replay (their device counters advance inside the graph).
    ``warmup`` eager calls run first (allocations settle, kernels compile); they are real steps.
    Every value computed on the host is frozen into the graph at capture: the learning rate (a schedule
    has no effect on the replays) and, with the fused kernels off, Adam's bias corrections, so capture
    refuses that case.
    """

    def __init__(self, fn, inputs, optimizers=(), warmup=2):
        if not enabled():
            raise RuntimeError("a CUDA graph step needs the fused kernels (fused.set_enabled(True)): without them "
                               "Adam's bias corrections are host values that the graph would replay unchanged")
        import cupy

        self.cupy = cupy
        self.optimizers = list(optimizers)
        self.pool = cupy.cuda.MemoryPool()
        self.stream = cupy.cuda.Stream(non_blocking=True)
        # the non-blocking stream does not wait for the current one: let the copies and fills queued there
        # (the model's parameters, the optimizer's zeros) finish before it reads them
        cupy.cuda.get_current_stream().synchronize()
        with cupy.cuda.using_allocator(self.pool.malloc), self.stream:
            self.static = [cupy.array(a) for a in inputs]
            for _ in range(max(1, int(warmup))):
                fn(*self.static)
            self.stream.synchronize()
            host_t = [o.t for o in self.optimizers]
            self.stream.begin_capture()
            try:
                self.out = fn(*self.static)     # recorded, not run: undo its host-side step count
            except BaseException:
                try:                            # end the capture, but report fn's error, not end_capture's
                    self.stream.end_capture()
                except Exception:
                    pass
                raise
            finally:
                for o, t in zip(self.optimizers, host_t):
                    o.t = t
            self.graph = self.stream.end_capture()
        self.stream.synchronize()

    def __call__(self, *inputs):
        cp = self.cupy
        for s, a in zip(self.static, inputs):
            if type(a).__module__.startswith("cupy"):
                cp.copyto(s, a)
            else:
                s.set(a)
        self.graph.launch()  # on the current stream, after the copies above
        for o in self.optimizers:
            o.t += 1
        return self.out
