"""Models: each defines loss_and_grad with its backward written out by hand.

Importing this package registers every model kind with ``npdgm.load``.
"""
import importlib

from .base import Model

__all__ = ["Model"]

for _name in ("vae", "flows", "gmm", "cvae", "m2"):
    try:
        _mod = importlib.import_module(f".{_name}", __name__)
    except ModuleNotFoundError as _e:  # a model family not written yet
        if _e.name != f"{__name__}.{_name}":
            raise
        continue
    for _attr in getattr(_mod, "__all__", ()):
        globals()[_attr] = getattr(_mod, _attr)
        __all__.append(_attr)
