"""Figures of flow runs: 2-D densities (data | learned density | samples | latent z) and MNIST
sample grids at several temperatures."""
from __future__ import annotations

import numpy as np

from . import _save, pyplot, save_image_grid, square_axes, square_limit, training_curves
from .. import backend


def _host(a):
    return np.asarray(backend.to_host(a), dtype=np.float64)


def density_grid(flow, lim, n=200, context=None):
    """(xs, ys, density (n, n)) of exp(log p) on the square [-lim, lim]^2 (p(x | c) for one context row
    ``context`` (C,) of a conditional flow)."""
    xs = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(xs, xs)
    pts = np.stack([gx.ravel(), gy.ravel()], 1)
    dt = flow.flat_params.dtype if flow.flat_params is not None else backend.get_dtype()

    def ctx(rows):
        return None if context is None else backend.to_device(np.broadcast_to(context, (rows, len(context))), dt)

    lp = np.concatenate([_host(flow.log_prob(backend.to_device(pts[s:s + 10000], dt), ctx(len(pts[s:s + 10000]))))
                         for s in range(0, len(pts), 10000)])
    return xs, xs, np.exp(lp).reshape(n, n)


def conditional_panels(flow, contexts, names, path, lim, title=None, n_samples=400, seed=0):
    """One panel per context row c of ``contexts`` (K, C): the learned density p(x | c) as a heat map, with
    ``n_samples`` samples of p(x | c) on top (the check that a conditional flow follows its context)."""
    plt = pyplot()
    contexts = np.asarray(contexts, dtype=np.float64)
    fig, axes = plt.subplots(1, len(contexts), figsize=(3.3 * len(contexts), 3.6), squeeze=False)
    for ax, c, name in zip(axes[0], contexts, names):
        xs, ys, dens = density_grid(flow, lim, 150, c)
        ax.imshow(dens, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma", aspect="auto")
        smp = _host(flow.sample(n_samples, rng=seed, context=c))
        ax.scatter(smp[:, 0], smp[:, 1], s=1.5, c="cyan", alpha=0.6)
        ax.set_title(f"p(x | {name})")
    square_axes(axes[0], lim)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def flow2d_panels(flow, data, path, title=None, n_samples=None, seed=0, temperature=1.0):
    """Four panels: the training data, the learned density (heat map + contours), samples of the
    flow, and the data mapped to the latent space z = f(x) against the prior's unit circle."""
    plt = pyplot()
    data = _host(data)
    lim = square_limit(data)
    dt = flow.flat_params.dtype if flow.flat_params is not None else backend.get_dtype()
    n_samples = n_samples or len(data)
    samples = _host(flow.sample(n_samples, temperature=temperature, rng=seed))
    z, _ = flow.forward(backend.to_device(data, dt))
    z = _host(z)
    xs, ys, dens = density_grid(flow, lim)
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.3))
    rng = [[-lim, lim], [-lim, lim]]
    axes[0].hist2d(data[:, 0], data[:, 1], bins=120, range=rng, cmap="magma")
    axes[0].set_title(f"data ({len(data):,} points)")
    axes[1].imshow(dens, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma", aspect="auto")
    axes[1].contour(xs, ys, dens, levels=dens.max() * np.array([0.02, 0.1, 0.3, 0.6, 0.9]), colors="white",
                    linewidths=0.5, alpha=0.6)
    axes[1].set_title("learned density p(x)")
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=120, range=rng, cmap="magma")
    axes[2].set_title(f"samples x = f^-1(z) (T={temperature:g})")
    zl = max(4.0, float(np.percentile(np.abs(z), 99.5)))
    angle = axes[3].scatter(z[:, 0], z[:, 1], s=1, alpha=0.3, c=np.degrees(np.arctan2(data[:, 1], data[:, 0])),
                            cmap="hsv", vmin=-180, vmax=180)
    fig.colorbar(angle, ax=axes[3], ticks=[-180, -90, 0, 90, 180], fraction=0.046, pad=0.04,
                 label="colour: angle of x around the origin (degrees)")
    t = np.linspace(0, 2 * np.pi, 200)
    for r in (1, 2, 3):
        axes[3].plot(r * np.cos(t), r * np.sin(t), "k--", lw=0.6, alpha=0.6)
    square_axes(axes[3:], zl)
    axes[3].set_title(f"latent z = f(x) of the data ({flow.prior} prior)")
    square_axes(axes[:3], lim)
    for ax, (h, v) in zip(axes, [("x1", "x2")] * 3 + [("z1", "z2")]):
        ax.set_xlabel(h)
        ax.set_ylabel(v)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def sample_grids(flow, path, temperatures=(0.5, 0.7, 0.85, 1.0), n_per_row=12, seed=0, shape=(28, 28)):
    """One row of samples per temperature (same noise scaled by T, all rows drawn as one batch), pixels clipped
    to [0, 1]."""
    g = np.random.default_rng(seed)
    from ..kernels.coupling import prior_noise

    noise = prior_noise(flow.prior, g, (n_per_row, flow.dim), np.float64)
    batch = np.concatenate([noise * t for t in temperatures])  # every temperature in one inverse pass
    rows = np.clip(_host(flow.sample(len(batch), noise=batch)), 0, 1)
    return save_image_grid(rows, path, nrow=n_per_row, shape=shape,
                           title="samples, one row per temperature T",
                           row_labels=[f"T={t:g}" for t in temperatures])


def class_sample_grid(flow, path, n_per_class=10, temperature=0.7, seed=0, shape=(28, 28)):
    """Samples of a class-conditional flow, one row per class y (context e_y), the same noise in every row."""
    from ..kernels.coupling import prior_noise

    C = flow.context_dim
    noise = prior_noise(flow.prior, np.random.default_rng(seed), (n_per_class, flow.dim), np.float64)
    rows = [np.clip(_host(flow.sample(n_per_class, temperature=temperature, noise=noise, context=np.eye(C)[y])), 0, 1)
            for y in range(C)]
    return save_image_grid(np.concatenate(rows), path, nrow=n_per_class, shape=shape,
                           title=f"samples of p(x | y), one row per class (T={temperature:g})",
                           row_labels=[f"y={y}" for y in range(C)])


def bpd_curves(records, path, title="flow training"):
    """train/test bits per dimension per epoch."""
    return training_curves(records, path, keys=[k for k in ("train_bpd", "test_bpd") if any(k in r for r in records)],
                           title=title, ylabel="bits / dim",
                           labels={"bpd": "bits/dim"})


def nll_curves(records, path, title="flow training", x="epoch"):
    """train/test mean NLL (nats) per epoch, or per optimizer step with ``x="step"`` (train_nll; runs of
    older versions logged it as train_loss only)."""
    records = [{"train_nll": r["train_loss"], **r} if "train_loss" in r else r for r in records]
    x = x if all(x in r for r in records) else "epoch"
    return training_curves(records, path, keys=[k for k in ("train_nll", "test_nll") if any(k in r for r in records)],
                           title=title, ylabel="negative log-likelihood (nats)", labels={"nll": "NLL"}, x=x)


TERM_PANELS = (("ll", "log-likelihood (total)"), ("logprior", "prior term  log p_Z(f(x))"),
               ("logdet", "log-det term  sum log|det df/dx|"))


def likelihood_terms(records, path, title="flow training", x="epoch"):
    """Three panels side by side, train (solid) and test (dashed) per epoch (or step): the log-likelihood and
    its two terms, log p(x) = log p_Z(f(x)) + sum log|det df/dx| (nats, means over examples). The prior term
    alone is largest with every z = f(x) at the prior's mode (f shrinking the data to 0); the log-det term rewards
    f for expanding space; the total is what training balances. Records without the terms (older runs) leave
    their panels empty."""
    from . import finish_curves, paired_lines

    plt = pyplot()
    records = [{**r, "train_ll": -r.get("train_nll", r.get("train_loss"))} if "train_ll" not in r and
               ("train_nll" in r or "train_loss" in r) else r for r in records]
    x = x if all(x in r for r in records) else "epoch"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (name, label) in zip(axes, TERM_PANELS):
        paired_lines(ax, records, [(label.split("  ")[0], f"train_{name}", f"test_{name}")], x=x)
        finish_curves(ax, "nats per example", label, xlabel=x)
    if title:
        fig.suptitle(f"{title}: log p(x) = prior term + log-det term")
    return _save(fig, path)


FIT_NAMES = {"forward-kl": "forward KL(p || q): mass-covering", "reverse-kl": "reverse KL(q || p): mode-seeking"}


def kl_directions(target, fits, path, title=None, n_samples=2000, seed=0):
    """The target density p = p*/Z beside each fitted flow q: ``fits`` is a list of (objective, flow, summary)
    (summary: a run's summary.json dict with test_kl_reverse / test_kl_forward, or None). Each fit's panel shows q
    as a heat map, the target's contours in white and ``n_samples`` of the flow's samples as dots."""
    plt = pyplot()
    lim = target.box
    xs = np.linspace(-lim, lim, 200)
    gx, gy = np.meshgrid(xs, xs)
    p = np.exp(target.log_prob(np.stack([gx.ravel(), gy.ravel()], 1)) - target.log_z).reshape(gx.shape)
    fig, axes = plt.subplots(1, 1 + len(fits), figsize=(4.6 * (1 + len(fits)), 4.6), squeeze=False)
    axes = axes[0]
    levels = p.max() * np.array([0.05, 0.3, 0.7])
    axes[0].imshow(p, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma", aspect="auto")
    axes[0].set_title(f"target p(x) = p*(x) / Z ({target.name})")
    for ax, (objective, flow, summary) in zip(axes[1:], fits):
        _, _, q = density_grid(flow, lim)
        ax.imshow(q, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma", aspect="auto")
        ax.contour(xs, xs, p, levels=levels, colors="white", linewidths=0.7, alpha=0.8)
        s = _host(flow.sample(n_samples, rng=seed))
        ax.scatter(s[:, 0], s[:, 1], s=1, c="cyan", alpha=0.3)
        name = FIT_NAMES.get(objective, objective)
        if summary and "test_kl_reverse" in summary:
            name += (f"\nKL(q || p) = {summary['test_kl_reverse']:.3f}, "
                     f"KL(p || q) = {summary['test_kl_forward']:.3f} nats")
        ax.set_title(name, fontsize=10)
    square_axes(axes, lim)
    for ax in axes:
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
    if title:
        fig.suptitle(title)
    return _save(fig, path)
