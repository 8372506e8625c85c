"""Figures of npdgm.inference: the naive Monte Carlo estimate of log p(x) against the sample count.

The seeds' point, measured: log p(x) ~= log (1/N) sum_i p(x|z_i) with z_i ~ p(z) is unbiased for p(x) but
far below log p(x) on the log scale until N is huge, and worse as the latent dimension grows, while IWAE
(z_i ~ q(z|x)) is close with a handful of samples.
"""
from __future__ import annotations

import numpy as np

from . import _save, pyplot


def naive_vs_iwae(curves, path, reference=None, title=None):
    """One panel per curve of :func:`npdgm.inference.naive_curve` (e.g. one per latent dimension): the mean
    over repeats of the naive and IWAE estimates against the sample count N (log axis), with a band of
    +-1 standard deviation over repeats, and a dashed line at ``reference`` (e.g. the best estimate: IWAE
    with many samples or AIS), if given. ``curves``: one dict or a list of them. Returns the path."""
    plt = pyplot()
    curves = [curves] if isinstance(curves, dict) else list(curves)
    fig, axes = plt.subplots(1, len(curves), figsize=(5.2 * len(curves), 4), squeeze=False)
    for ax, c in zip(axes[0], curves):
        n = np.asarray(c["counts"], np.float64)
        for key, color, label in (("naive", "C3", "naive MC, z ~ p(z)"), ("iwae", "C0", "IWAE, z ~ q(z|x)")):
            v = np.asarray(c[key], np.float64)
            m, s = v.mean(0), v.std(0)
            ax.plot(n, m, "o-", color=color, label=label)
            ax.fill_between(n, m - s, m + s, color=color, alpha=0.25)
        if reference is not None:
            ax.axhline(reference, color="k", ls="--", lw=1, label="reference")
        ax.set_xscale("log")
        ax.set_xlabel("samples N")
        ax.set_ylabel("mean log p(x) estimate (nats / image)")
        ax.set_title(f"z_dim = {c.get('z_dim', '?')}, {len(c['naive'])} repeats")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title or "naive Monte Carlo vs IWAE: bias and spread against the sample count")
    return _save(fig, path)


def mcem_vs_elbo(records, path, title=None):
    """Monte-Carlo EM against ELBO training, per epoch: ``records`` maps a method name to a list of
    {"epoch", "ais_test"} (AIS log p(x) on the same test images, nats per image) and, optionally, "elbo_test"
    (the ELBO of the q-trained model; the gap to its AIS line is KL(q || p(z|x)) averaged)."""
    from . import finish_curves

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (name, rows) in enumerate(records.items()):
        ep = [r["epoch"] for r in rows]
        ax.plot(ep, [r["ais_test"] for r in rows], marker="o", ms=4, color=f"C{i}", label=f"{name}: AIS log p(x)")
        if any("elbo_test" in r for r in rows):
            ax.plot(ep, [r["elbo_test"] for r in rows], marker="o", ms=4, ls="--", color=f"C{i}",
                    label=f"{name}: ELBO")
    finish_curves(ax, "test log-likelihood (nats per image)", title or "Monte-Carlo EM vs ELBO training")
    return _save(fig, path)
