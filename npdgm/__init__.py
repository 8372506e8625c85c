"""npdgm: deep generative models as array code with hand-written gradients (NumPy / CuPy).

    import npdgm
    npdgm.set_backend("numpy")      # or "cupy"
    model = npdgm.load("runs/vae-.../checkpoint.npz")
"""
__version__ = "0.1.0"

import os as _os
import sys as _sys

if "numpy" not in _sys.modules:
    # OpenBLAS's idle worker threads spin for 2^28 cycles (~0.1 s) after every GEMM before they sleep.
    # npdgm's own threads (the chunked Adam update, npdgm.optim) then share a core with a spinning
    # thread: on 2 cores the 19M-parameter NICE update took 37 ms instead of 21. 2^12 cycles lets the
    # workers sleep between steps' GEMM phases; an explicit setting is kept. OpenBLAS reads it once,
    # when NumPy loads, so this only acts when npdgm is imported before NumPy (as `npdgm ...` does).
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "12")

from . import backend, kernels, nn, optim  # noqa: E402
from .backend import get_backend, set_backend, set_dtype  # noqa: E402
from .io import load  # noqa: E402
from .models import *  # noqa: E402,F401,F403
