"""npdgm: deep generative models as array code with hand-written gradients (NumPy / CuPy).

    import npdgm
    npdgm.set_backend("numpy")      # or "cupy"
    model = npdgm.load("runs/vae-.../checkpoint.npz")

Importing npdgm changes nothing in the process (no environment variable, no allocator setting): the
fast wing, :mod:`npdgm.accel`, makes its settings when it is switched on.
"""
__version__ = "0.1.0"

from . import backend, kernels, nn, optim  # noqa: E402
from .backend import get_backend, set_backend, set_dtype  # noqa: E402
from .models.registry import load  # noqa: E402
from .train import fit_model as fit  # noqa: E402
from .models import *  # noqa: E402,F401,F403
