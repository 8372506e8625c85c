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

from . import backend, kernels, nn, optim  # noqa: E402
from .backend import get_backend, set_backend, set_dtype  # noqa: E402
from .models.registry import load  # noqa: E402
from .models import *  # noqa: E402,F401,F403
