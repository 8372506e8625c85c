"""Which array module runs the math: NumPy (CPU) or CuPy (GPU).

One place says three things: the array module (``xp``), the default float dtype
(float32; float64 for gradient checks) and how random numbers are made (explicit,
seeded ``Generator`` objects). Kernels never import numpy themselves: they ask
:func:`array_module` for the module of the arrays they were given, so the CuPy path
runs the very same lines.

    >>> import npdgm
    >>> npdgm.set_backend("numpy")          # or "cupy", or NPDGM_BACKEND=cupy
    >>> xp = npdgm.backend.xp()             # numpy
    >>> rng = npdgm.backend.rng(0)          # numpy.random.Generator on this backend

``NPDGM_BACKEND`` is read lazily, on the first use of the backend (``xp()``, ``get_backend()``, ...)
and only when nothing called :func:`set_backend` before: importing npdgm, ``npdgm --help`` or
``npdgm train ... --backend numpy`` never fail because of it. A bad value raises
:class:`BackendError` naming the variable at that first use (and again at every later use, never
falling back to NumPy in silence); :func:`env_backend_problem` reports it without raising.
"""
from __future__ import annotations

import contextlib
import os

import numpy

from .validate import OptionTypeError, check_int

BACKENDS = ("numpy", "cupy")
DTYPES = ("float32", "float64")

ENV = "NPDGM_BACKEND"
# name None: NPDGM_BACKEND not applied yet (see _current); xp stays NumPy until then
_state = {"name": None, "xp": numpy, "dtype": numpy.dtype("float32")}


class BackendError(RuntimeError):
    """The requested backend cannot run here (unknown name, CuPy missing, no GPU)."""


def _load_cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise BackendError(
            "backend 'cupy' needs the CuPy package, which is not installed "
            "(pip install 'npdgm[gpu-cuda12]' or 'npdgm[gpu-cuda13]', matching your CUDA)"
        ) from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # pragma: no cover - depends on the machine
        raise BackendError(f"backend 'cupy': CuPy is installed but no CUDA GPU is visible ({e})") from e
    if n < 1:  # pragma: no cover
        raise BackendError("backend 'cupy': CuPy is installed but no CUDA GPU is visible")
    return cupy


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU."""
    try:
        _load_cupy()
        return True
    except BackendError:
        return False


def set_backend(name: str) -> None:
    """Select the array module for new arrays: ``"numpy"`` or ``"cupy"`` (overrides NPDGM_BACKEND)."""
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    _state["xp"] = numpy if name == "numpy" else _load_cupy()
    _state["name"] = name


def _current() -> str:
    """The backend name, applying NPDGM_BACKEND on first use (numpy when it is unset or empty)."""
    if _state["name"] is None:
        env = os.environ.get(ENV, "").strip().lower() or "numpy"
        try:
            set_backend(env)
        except BackendError as e:
            raise BackendError(f"{ENV}={os.environ.get(ENV)!r}: {e}") from e
    return _state["name"]


def env_backend_problem():
    """None when NPDGM_BACKEND is unset or usable, else the reason it cannot be used (never raises)."""
    env = os.environ.get(ENV, "").strip().lower()
    if not env or env == "numpy":
        return None
    if env not in BACKENDS:
        return f"{ENV}={os.environ.get(ENV)!r}: unknown backend {env!r}; expected one of {BACKENDS}"
    try:
        _load_cupy()
    except BackendError as e:
        return f"{ENV}={os.environ.get(ENV)!r}: {e}"
    return None


def get_backend() -> str:
    """Name of the current backend."""
    return _current()


def xp():
    """The current array module (numpy or cupy)."""
    _current()
    return _state["xp"]


def set_dtype(dtype) -> None:
    """Default float dtype of new parameters and data: float32 (default) or float64."""
    if dtype is None or isinstance(dtype, (bool, int, float)):
        raise OptionTypeError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    try:
        d = numpy.dtype(dtype)
    except TypeError as e:
        raise OptionTypeError(f"dtype must be one of {DTYPES}, got {dtype!r}") from e
    if d.name not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {d.name!r}")
    _state["dtype"] = d


def get_dtype():
    """The current default float dtype."""
    return _state["dtype"]


class use:
    """Context manager: ``with backend.use("numpy", "float64"): ...`` restores the old setting."""

    def __init__(self, name=None, dtype=None):
        self.name, self.dtype = name, dtype

    def __enter__(self):
        self._old = dict(_state)  # may be "NPDGM_BACKEND not applied yet"; restored as it was
        if self.name is not None:
            set_backend(self.name)
        if self.dtype is not None:
            set_dtype(self.dtype)
        return self

    def __exit__(self, *exc):
        _state.update(self._old)


def one_blas_thread():
    """A context with BLAS on one thread when threadpoolctl is installed (else nothing), for loops of tiny
    GEMMs (M1's softmax regression, 100 x 784 x 10; MAF's coordinate-by-coordinate sampling): two OpenBLAS
    threads waiting on each other made them ~10x (sampling: ~25x in CPU time) slower on a loaded 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def array_module(*arrays):
    """numpy or cupy, whichever the given arrays live in (numpy for plain Python values)."""
    for a in arrays:
        mod = type(a).__module__
        if mod.startswith("cupy"):
            import cupy

            return cupy
    return numpy


def rng(seed=None):
    """A seeded random Generator on the current backend (same seed, same numbers); ``seed`` is
    None or a non-negative Python/NumPy integer (a float such as 1.5 is an error, not rounded)."""
    if seed is not None:
        seed = check_int(seed, "seed", lo=0)
    return xp().random.default_rng(seed)


def to_host(a):
    """Copy an array to a NumPy array on the host (no copy for NumPy input)."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    return numpy.asarray(a)


def to_device(a, dtype=None):
    """Move a host array onto the current backend, optionally casting."""
    x = xp().asarray(a)
    return x.astype(dtype, copy=False) if dtype is not None else x


def synchronize() -> None:
    """Wait for queued GPU work (no-op on NumPy); use before reading a timer."""
    if _current() == "cupy":
        _state["xp"].cuda.get_current_stream().synchronize()


def check_finite(name: str, a) -> None:
    """Raise ValueError naming ``name`` when ``a`` holds NaN or inf."""
    m = array_module(a)
    if not bool(m.isfinite(a).all()):
        n_nan = int(m.isnan(a).sum())
        n_inf = int(m.isinf(a).sum())
        raise ValueError(f"{name} contains non-finite values ({n_nan} NaN, {n_inf} inf)")


def available_memory():
    """Bytes the current backend can still allocate, about: the GPU's free memory plus what CuPy's pool holds
    free (cupy), or the host's MemAvailable (numpy, Linux; free pages elsewhere); None when unknown."""
    if get_backend() == "cupy":
        cp = _load_cupy()
        return int(cp.cuda.Device().mem_info[0]) + int(cp.get_default_memory_pool().free_bytes())
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
