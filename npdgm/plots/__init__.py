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
    """Arrange (N, H*W) images in [0, 1] into one (rows*(H+pad), nrow*(W+pad)) array; ``shape`` (C, H, W)
    with C = 3: (N, C*H*W) colour images in (C, H, W) order into one (rows*(H+pad), nrow*(W+pad), 3) RGB array
    (C = 1: grey, as (H, W))."""
    from ..backend import to_host

    shape = tuple(shape)
    if len(shape) == 3 and shape[0] == 1:
        shape = shape[1:]
    images = np.asarray(to_host(images), dtype=np.float64).reshape(-1, *shape)
    if len(shape) == 3:
        images = images.transpose(0, 2, 3, 1)  # (N, H, W, C) for imshow
    n = len(images)
    ncol = nrow
    nrows = max(1, -(-n // ncol))
    h, w = shape[-2:]
    out = np.ones((nrows * (h + pad) + pad, ncol * (w + pad) + pad, *shape[:-2]))
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    return out


def save_image_grid(images, path, nrow=10, title=None, shape=(28, 28), row_labels=None, col_labels=None):
    """Save (N, 784) images in [0, 1] (``shape`` (3, H, W): colour, (C, H, W) order) as a grid PNG; returns
    the path. ``row_labels`` / ``col_labels`` name the rows (left) and columns (top); a title wider than the
    figure wraps onto more lines."""
    plt = pyplot()
    grid = tile(np.clip(np.asarray(images), 0, 1) if isinstance(images, np.ndarray) else images, nrow, shape)
    width = nrow * 0.6 + 0.8
    fig, ax = plt.subplots(figsize=(width, grid.shape[0] / grid.shape[1] * nrow * 0.6 + 0.6))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    height, width_px = tuple(shape)[-2:]
    if row_labels:
        h = height + 1
        ax.set_yticks([1 + h * i + height / 2 for i in range(len(row_labels))], row_labels)
    if col_labels:
        w = width_px + 1
        ax.set_xticks([1 + w * j + width_px / 2 for j in range(len(col_labels))], col_labels)
        ax.xaxis.tick_top()
    ax.tick_params(length=0)
    if title:
        import textwrap

        ax.set_title("\n".join(w for line in title.split("\n") for w in textwrap.wrap(line, max(20, int(width / 0.1)))))
    return _save(fig, path)


def epoch_axis(ax, label="epoch"):
    """Label the x axis and put ticks on whole numbers only (epochs, EM iterations), also for a
    single epoch (min_n_ticks=1: the default falls back to fractional ticks on a short range)."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def finish_curves(ax, ylabel, title, xlabel="epoch"):
    """The end of every curve panel: whole-number x axis (:func:`epoch_axis`), labels, grid, legend."""
    epoch_axis(ax, xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


TRAIN_STYLE, TEST_STYLE = "-", "--"  # every curve figure: a term keeps its colour, train solid, test dashed


def paired_lines(ax, records, terms, x="epoch", color=0):
    """For each ``(label, train_key, test_key)`` in ``terms`` (either key may be None): one colour,
    the train line solid and the test line dashed, legends "train LABEL" / "test LABEL". Colours
    start at ``C{color}``."""
    for i, (label, *keys) in enumerate(terms):
        for key, split, ls in zip(keys, ("train", "test"), (TRAIN_STYLE, TEST_STYLE)):
            pts = [(r[x], r[key]) for r in records if key and key in r and x in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=4, ls=ls, color=f"C{color + i}", label=f"{split} {label}")


def pair_keys(keys):
    """Group metric keys into ``(label, train_key, test_key)`` by what follows ``train_`` / ``test_``,
    in order of first appearance ("train_nll", "test_nll" -> ("nll", "train_nll", "test_nll"))."""
    terms = {}
    for k in keys:
        split, _, name = k.partition("_")
        terms.setdefault(name, {})[split] = k
    return [(name, d.get("train"), d.get("test")) for name, d in terms.items()]


def training_curves(records, path, keys=None, title="training curves", ylabel="loss (nats)", labels=None, x="epoch"):
    """Plot metrics.jsonl records for ``keys`` (default: every train_/test_ key) over ``x`` (``"epoch"``,
    or ``"step"`` for runs logged per step); train and test of one quantity share a colour (train solid,
    test dashed). ``labels`` maps the quantity (the key without train_/test_) to its legend text."""
    plt = pyplot()
    keys = keys or sorted({k for r in records for k in r if k.startswith(("train_", "test_")) and
                           isinstance(r[k], (int, float)) and not k.endswith("seconds")})
    fig, ax = plt.subplots(figsize=(6, 4))
    paired_lines(ax, records, [((labels or {}).get(name, name.replace("_", " ")), tr, te)
                               for name, tr, te in pair_keys(keys)], x=x)
    finish_curves(ax, ylabel, title, xlabel=x)
    return _save(fig, path)


def _save(fig, path):
    """Write ``fig`` to ``path`` atomically (:func:`npdgm.io.atomic_write_bytes`: a kill leaves no half
    figure, and a run directory lists it among the files npdgm wrote), in the format of its extension."""
    from ..io import atomic_write_bytes

    fig.tight_layout()
    fmt = os.path.splitext(os.fspath(path))[1][1:].lower() or "png"
    atomic_write_bytes(path, lambda f: fig.savefig(f, format=fmt, dpi=110))
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def square_limit(points):
    """Half-width of a square view covering 99.5% of ``points`` (n, 2) with a margin, rounded up to 0.5."""
    return float(np.ceil(np.percentile(np.abs(np.asarray(points)), 99.5) * 1.15 * 2) / 2) or 1.0


def square_axes(axes, lim):
    """Equal aspect and the view [-lim, lim]^2 on every axis in ``axes``."""
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)


def scatter_panels(panels, path, title=None, max_points=20000):
    """One scatter panel per ``(title, points (n, 2))``, side by side on the same square axes (the
    limits cover 99.5% of the first panel's points); at most ``max_points`` drawn per panel."""
    plt = pyplot()
    pts = [np.asarray(p, dtype=np.float64)[:max_points] for _, p in panels]
    lim = square_limit(pts[0])
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4.3), squeeze=False)
    for ax, (name, _), p in zip(axes[0], panels, pts):
        ax.scatter(p[:, 0], p[:, 1], s=1, alpha=0.3)
        ax.set_title(f"{name} ({len(p):,} points)")
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    square_axes(axes[0], lim)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
