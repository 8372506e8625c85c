"""Conditional-generation figures shared by the CVAE and M2 (PNG, Agg): one row per class sampled
from the prior, and style transfer (encode a digit with its label, decode it under every label).

Both take any model with ``class_grid(n, rng)`` and ``style_transfer(x, y)`` (:class:`npdgm.models.cvae.CVAE`,
:class:`npdgm.models.m2.M2`) and return the path.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from . import save_image_grid


def _h(a):
    return np.asarray(to_host(a), dtype=np.float64)


def class_grid(model, path, n=10, rng=0, title=None):
    """Row c: n images of class c decoded from the same n prior draws z ~ N(0, I) (a column keeps
    its z, so it shows one style under every label)."""
    x = _h(model.class_grid(n, rng=rng))
    C = model.num_classes
    return save_image_grid(x, path, nrow=n, row_labels=[str(c) for c in range(C)],
                           title=title or "samples from the prior, one row per class (same z down a column)")


def style_transfer(model, x, y, path, title=None):
    """Row i: the input digit x_i, then x_i encoded with its label y_i (z = mu(x_i, y_i)) and decoded
    under every label 0..C-1."""
    x = _h(x)
    out = _h(model.style_transfer(x, y))                       # (B, C, D)
    rows = np.concatenate([x[:, None], out], axis=1).reshape(-1, x.shape[1])
    C = model.num_classes
    return save_image_grid(rows, path, nrow=C + 1, row_labels=[f"y={int(c)}" for c in np.asarray(to_host(y))],
                           col_labels=["input"] + [str(c) for c in range(C)],
                           title=title or "style transfer: z = mu(input, y), decoded under each label")
