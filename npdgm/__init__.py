"""npdgm: deep generative models as array code with hand-written gradients (NumPy / CuPy).

    import npdgm
    npdgm.set_backend("numpy")      # or "cupy"
    model = npdgm.load("runs/vae-.../checkpoint.npz")

Importing npdgm changes nothing in the process (no environment variable, no allocator setting): the
fast wing, :mod:`npdgm.accel`, makes its settings when it is switched on.
"""
from . import backend, kernels, nn, optim  # noqa: F401
from ._version import __version__  # noqa: F401
from .backend import get_backend, set_backend, set_dtype  # noqa: F401
from .models.registry import load  # noqa: F401
from .train import fit_model as fit  # noqa: F401
from .models import *  # noqa: F401,F403
