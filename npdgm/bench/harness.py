"""Timing, threads, memory and machine facts shared by every benchmark.

Nothing here imports numpy at module level: :func:`set_threads` must run before the first
``import numpy`` so that OpenBLAS starts with the requested number of threads.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time

THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")
BLAS_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_VERBOSE", "OPENBLAS_THREAD_TIMEOUT")
OPENBLAS_THREAD_TIMEOUT = "21"  # the fast wing's choice (npdgm/accel/process.py), applied here before NumPy loads


def set_threads(n):
    """Pin the CPU thread count for every library: environment variables (read when OpenBLAS/MKL/
    OpenMP load, so call this before importing numpy/torch), then threadpoolctl when it is installed
    (limits already-loaded BLAS pools), torch and npdgm's optimizer threads when already imported.
    Returns a function that restores the previous settings (for in-process callers such as tests)."""
    n = int(n)
    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    keys = THREAD_ENV + ("NPDGM_NUM_THREADS",)
    old_env = {k: os.environ.get(k) for k in keys + ("OPENBLAS_THREAD_TIMEOUT",)}
    old_torch = sys.modules["torch"].get_num_threads() if "torch" in sys.modules else None
    optim = sys.modules.get("npdgm.accel.optim")    # the fast wing's optimizer threads, when loaded
    old_optim = optim._threads["n"] if optim is not None else None
    for k in keys:
        os.environ[k] = str(n)
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
    limiter = None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass
    else:
        limiter = threadpool_limits(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    if optim is not None:
        optim.set_num_threads(n)

    def restore():
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if limiter is not None:
            limiter.restore_original_limits()
        if old_torch is not None and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(old_torch)
        if optim is not None:
            optim.set_num_threads(old_optim)   # None: back to the environment's default
    return restore


def blas_info():
    """[{library, version, architecture (OpenBLAS kernel), threads}] via threadpoolctl, or [] without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"library": d.get("internal_api"), "prefix": d.get("prefix"), "version": d.get("version"),
             "architecture": d.get("architecture"), "threads": d.get("num_threads")}
            for d in threadpool_info()]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """Machine and library facts recorded with every result."""
    import numpy

    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": numpy.__version__,
            "env": {k: os.environ[k] for k in BLAS_ENV + THREAD_ENV if k in os.environ},
            "blas": blas_info()}
    try:
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        import npdgm
        from npdgm.accel import process
        info["npdgm"] = npdgm.__version__
        info["keep_heap"] = process.settings()["malloc keeps freed memory"]   # npdgm/accel/process.py
    except ImportError:
        pass
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        import cupy
        info["cupy"] = cupy.__version__
        info["gpu"] = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:  # no CuPy or no GPU: fine
        info["cupy"] = None
    return info


# -- memory -------------------------------------------------------------------------------------
def reset_peak_rss():
    """Reset the kernel's peak-RSS counter of this process (Linux: write 5 to /proc/self/clear_refs).
    Returns True when the reset worked, so the next :func:`peak_rss_mb` is the peak since now."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_kb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mb():
    """Current resident set size in MiB (None where /proc is missing)."""
    kb = _proc_status_kb("VmRSS")
    return None if kb is None else kb / 1024


def peak_rss_mb():
    """Peak resident set size in MiB: VmHWM (since the last reset), else getrusage's lifetime peak."""
    kb = _proc_status_kb("VmHWM")
    if kb is None:
        try:
            import resource  # POSIX only: on Windows there is no peak to report
        except ImportError:
            return None
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kb //= 1024
    return kb / 1024


def step_alloc_mb(step, sync=lambda: None, steps=3):
    """Peak MiB that ``steps`` calls of ``step`` allocate above what was live before them, as
    tracemalloc sees it (Python objects and NumPy's array memory; not CuPy's or torch's allocators): a
    step's temporaries, without what peak RSS also counts (libraries loaded, code compiled)."""
    import tracemalloc

    sync()
    tracemalloc.start()
    try:
        for _ in range(steps):
            step()
        sync()
        return tracemalloc.get_traced_memory()[1] / 2**20    # traced since start(): the baseline is 0
    finally:
        tracemalloc.stop()


# -- timing -------------------------------------------------------------------------------------
def time_steps(step, sync=lambda: None, *, warmup=3, repeats=5, steps=None, target_s=0.5, max_steps=200):
    """Time ``step()`` after ``warmup`` calls: ``repeats`` blocks of ``steps`` calls each, ``sync()``
    (GPU synchronization) before starting and before stopping the clock of every block.

    With ``steps=None`` the block length is picked from the warm-up so a block lasts about
    ``target_s`` seconds (at least 1, at most ``max_steps`` steps). Returns a dict with the median,
    min and max milliseconds per step over the blocks, the per-block list and the block length.
    """
    if warmup < 1:
        raise ValueError("warmup must be >= 1 (the first step allocates buffers and compiles kernels)")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    est = (time.perf_counter() - t0) / warmup
    if steps is None:
        steps = max(1, min(max_steps, int(round(target_s / max(est, 1e-6)))))
    blocks = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        blocks.append((time.perf_counter() - t) / steps * 1e3)
    return {"ms_per_step": statistics.median(blocks), "ms_min": min(blocks), "ms_max": max(blocks),
            "blocks_ms": [round(b, 4) for b in blocks], "steps_per_block": steps, "warmup": warmup,
            "repeats": repeats}
