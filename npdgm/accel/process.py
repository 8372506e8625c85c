"""Process-wide settings the fast wing makes when it is switched on (and only then: ``import npdgm``
changes nothing in the process). :func:`settings` reports them; ``npdgm info`` prints that.

* glibc's malloc keeps freed memory for reuse (:func:`keep_freed_heap`), applied once per process.
* OpenBLAS's idle worker threads spin for 2^28 cycles (~0.1 s) after every GEMM before they sleep; the
  wing's optimizer threads (:mod:`npdgm.accel.optim`) then share a core with a spinning thread (on 2 cores
  the 19M-parameter NICE update took 37 ms instead of 21). 2^21 cycles (``OPENBLAS_THREAD_TIMEOUT=21``,
  ~0.9 ms at 2.4 GHz) keeps them awake across a step's elementwise work and lets them sleep early in an
  optimizer update (measured, 2 threads: fused vae step -6..10 %, realnvp2d -4 %). OpenBLAS reads the
  variable once, when NumPy loads: set it in the environment (``npdgm bench`` sets it for its workers);
  the wing sets it only when it is switched on before NumPy is imported.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys

OPENBLAS_THREAD_TIMEOUT = "21"
_applied = {"keep_heap": None}


def heap_blocker():
    """Why :func:`keep_freed_heap` would not apply here (a short reason), or None when it would."""
    env = os.environ
    if env.get("NPDGM_KEEP_HEAP", "1") == "0":
        return "NPDGM_KEEP_HEAP=0"
    if any(k in env for k in ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return "set through GLIBC_TUNABLES / MALLOC_*_"
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    return None


def keep_freed_heap():
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the kernel at once.

    A training step allocates and frees the same few-hundred-KB arrays (activations, gradients) again
    and again. With glibc's defaults, blocks above its adaptive mmap threshold (128 KiB until a larger
    block is freed) and any free top of the heap above 2x that threshold go back to the kernel, so the
    next step's arrays fault their pages in afresh (~1,100 faults and ~30 brk calls per RealNVP-2d step).
    Measured on 2 cores, fused path, a fresh process: a RealNVP-2d step 18.6-19.0 -> 14.8-15.1 ms, its 16
    ReLU backwards 2.7 -> 0.75 ms (where glibc had adapted already, as in ``npdgm bench``: no change).
    So: arrays below 32 MiB come from the heap (M_MMAP_THRESHOLD; larger ones, e.g. a 19M-parameter
    model's flat buffers, are still mapped), and up to 256 MiB of free heap top stays with the process
    (M_TRIM_THRESHOLD). Setting the trim threshold alone would be worse: it fixes the mmap threshold
    at 128 KiB. Only on glibc, only when neither limit was set through MALLOC_*_ / GLIBC_TUNABLES
    (those win), and NPDGM_KEEP_HEAP=0 turns it off. Returns True when it was applied."""
    if heap_blocker() is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


def apply():
    """Make the wing's process settings (once; later calls only report). Returns :func:`settings`."""
    if _applied["keep_heap"] is None:
        _applied["keep_heap"] = keep_freed_heap()
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_THREAD_TIMEOUT)
    return settings()


def settings():
    """{setting: value} of the process settings the wing makes (None: not applied in this process)."""
    return {"malloc keeps freed memory": _applied["keep_heap"],
            "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}


def describe():
    """Lines for ``npdgm info``: what the wing sets in the process when it is switched on."""
    applied, blocker = _applied["keep_heap"], heap_blocker()
    heap = ("applied" if applied else f"not applied ({blocker})" if blocker else
            "applied at switch-on" if applied is None else "not applied (mallopt failed)")
    timeout = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
    return [f"glibc malloc keeps freed memory: {heap} (NPDGM_KEEP_HEAP=0 turns it off)",
            f"OPENBLAS_THREAD_TIMEOUT: {timeout if timeout else 'unset'} (read when NumPy loads; "
            f"{OPENBLAS_THREAD_TIMEOUT} recommended: export it before starting)"]
