"""What every model shares: a kind name, a JSON-able config, save/load."""
from __future__ import annotations

from .. import backend
from ..io import save_model
from ..nn.module import Module


class Model(Module):
    """A Module that can be saved and rebuilt: ``kind`` names its class in checkpoints and
    ``config`` holds the constructor arguments (plain JSON values)."""

    kind = "model"

    def __init__(self, **config):
        super().__init__()
        object.__setattr__(self, "config", dict(config))

    @property
    def dtype(self):
        """The float dtype of the parameters (float32 or float64)."""
        return self.flat_params.dtype

    @property
    def xp(self):
        """numpy or cupy, whichever holds the parameters."""
        return backend.array_module(self.flat_params)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def check_z(self, z):
        """Latents z (n, z_dim) of a latent-variable model as a model-dtype array on its backend; ValueError
        naming the expected shape otherwise."""
        if getattr(z, "ndim", None) != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"z must have shape (n, {self.z_dim}), got {tuple(getattr(z, 'shape', ()))}")
        xp = self.xp
        return (xp.asarray(z) if backend.array_module(z) is not xp else z).astype(self.dtype, copy=False)

    def save(self, path):
        """Write weights, config and parameter layout to ``path`` (.npz) atomically."""
        save_model(self, path)
