"""What every model shares: a kind name, a JSON-able config, save/load."""
from __future__ import annotations

from ..io import save_model
from ..nn.module import Module


class Model(Module):
    """A Module that can be saved and rebuilt: ``kind`` names its class in checkpoints and
    ``config`` holds the constructor arguments (plain JSON values)."""

    kind = "model"

    def __init__(self, **config):
        super().__init__()
        object.__setattr__(self, "config", dict(config))

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def save(self, path):
        """Write weights, config and parameter layout to ``path`` (.npz) atomically."""
        save_model(self, path)
