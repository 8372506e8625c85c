"""npdgm: deep generative models as array code with hand-written gradients (NumPy / CuPy).

    import npdgm
    npdgm.set_backend("numpy")      # or "cupy"
    model = npdgm.load("runs/vae-.../checkpoint.npz")
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

if "numpy" not in _sys.modules and "OPENBLAS_THREAD_TIMEOUT" not in _os.environ:
    # OpenBLAS's idle worker threads spin for 2^28 cycles (~0.1 s) after every GEMM before they sleep.
    # npdgm's own threads (the chunked Adam update, npdgm.optim) then share a core with a spinning
    # thread: on 2 cores the 19M-parameter NICE update took 37 ms instead of 21. Too short a spin costs
    # as well: at 2^12 cycles (~2 us) the workers sleep between any two GEMMs of a step and every GEMM
    # waits for a wake-up (a small one then takes 2-3x its back-to-back time). 2^21 cycles (~0.9 ms at
    # 2.4 GHz) keeps them awake across a step's elementwise work between products and lets them sleep
    # early in an optimizer update (measured, 2 threads: fused vae step -6..10 %, realnvp2d -4 %, plain
    # unchanged within noise). OpenBLAS reads the variable once, when NumPy loads, so
    # it is set for that import only and removed right after: child processes do not inherit npdgm's
    # choice (an npdgm child makes it again). An explicit setting is kept; when NumPy is already
    # loaded nothing is done. (threadpoolctl sets thread counts, not this timeout.)
    _os.environ["OPENBLAS_THREAD_TIMEOUT"] = "21"
    try:
        import numpy as _numpy  # noqa: F401  (OpenBLAS reads OPENBLAS_THREAD_TIMEOUT here)
    finally:
        _os.environ.pop("OPENBLAS_THREAD_TIMEOUT", None)


def _keep_freed_heap():
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
    env = _os.environ
    if (env.get("NPDGM_KEEP_HEAP", "1") == "0" or "GLIBC_TUNABLES" in env
            or "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env):
        return False
    import platform

    if _sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))


KEEP_HEAP = _keep_freed_heap()

from . import backend, kernels, nn, optim  # noqa: E402
from .backend import get_backend, set_backend, set_dtype  # noqa: E402
from .models.registry import load  # noqa: E402
from .train import fit_model as fit  # noqa: E402
from .models import *  # noqa: E402,F401,F403
