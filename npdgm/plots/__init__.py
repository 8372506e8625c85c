"""Figures saved as PNG (matplotlib, Agg backend: no display needed).

Shared helpers live here; each model family keeps its own figures in ``plots/<family>.py``.
"""
from __future__ import annotations

import os

import numpy as np


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images, nrow, shape=(28, 28), pad=1):
    """Arrange (N, H*W) images in [0, 1] into one (rows*(H+pad), nrow*(W+pad)) array."""
    from ..backend import to_host

    images = np.asarray(to_host(images), dtype=np.float64).reshape(-1, *shape)
    n = len(images)
    ncol = nrow
    nrows = max(1, -(-n // ncol))
    h, w = shape
    out = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad))
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return out


def save_image_grid(images, path, nrow=10, title=None, shape=(28, 28), row_labels=None):
    """Save (N, 784) images in [0, 1] as a grid PNG; returns the path."""
    plt = pyplot()
    grid = tile(np.clip(np.asarray(images), 0, 1) if isinstance(images, np.ndarray) else images, nrow, shape)
    fig, ax = plt.subplots(figsize=(nrow * 0.6 + 0.8, grid.shape[0] / grid.shape[1] * nrow * 0.6 + 0.6))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if row_labels:
        h = shape[0] + 1
        ax.set_yticks([1 + h * i + shape[0] / 2 for i in range(len(row_labels))], row_labels)
        ax.set_xticks([])
    else:
        ax.axis("off")
    if title:
        ax.set_title(title)
    return _save(fig, path)


def training_curves(records, path, keys=None, title="training curves", ylabel="loss (nats)"):
    """Plot metrics.jsonl records (list of dicts with "epoch") for ``keys`` (default: every train_/test_ key)."""
    plt = pyplot()
    keys = keys or sorted({k for r in records for k in r if k.startswith(("train_", "test_")) and
                           isinstance(r[k], (int, float)) and not k.endswith("seconds")})
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in keys:
        pts = [(r["epoch"], r[k]) for r in records if k in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
