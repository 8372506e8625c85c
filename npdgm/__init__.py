"""npdgm: deep generative models as array code with hand-written gradients (NumPy / CuPy).

    import npdgm
    npdgm.set_backend("numpy")      # or "cupy"
    model = npdgm.load("runs/vae-.../checkpoint.npz")
"""
__version__ = "0.1.0"

from . import backend, kernels, nn, optim  # noqa: E402
from .backend import get_backend, set_backend, set_dtype  # noqa: E402
from .io import load  # noqa: E402
from .models import *  # noqa: E402,F401,F403
