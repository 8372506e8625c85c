"""Figures of Gaussian-mixture runs: the 2-D mixture density beside the data and samples, the EM
log-likelihood per iteration, and for MNIST (PCA mixture) the component means and samples."""
from __future__ import annotations

import numpy as np

from . import _save, finish_curves, pair_keys, paired_lines, pyplot, save_image_grid, square_axes, square_limit
from .. import backend


def _host(a):
    return np.asarray(backend.to_host(a), dtype=np.float64)


def density_grid(gmm, lim, n=200):
    """(xs, ys, density (n, n)) of p(x) = exp(score_samples) on the square [-lim, lim]^2."""
    xs = np.linspace(-lim, lim, n)
    gx, gy = np.meshgrid(xs, xs)
    pts = backend.to_device(np.stack([gx.ravel(), gy.ravel()], 1), gmm.means_.dtype)
    return xs, xs, np.exp(_host(gmm.score_samples(pts))).reshape(n, n)


def _ellipses(ax, gmm, color="cyan"):
    """Two-sigma ellipse of every component, line width scaled by its weight."""
    t = np.linspace(0, 2 * np.pi, 100)
    circle = np.stack([np.cos(t), np.sin(t)])
    mu, w, cov = _host(gmm.means_), _host(gmm.weights_), _host(gmm.covariances_)
    for k in range(gmm.n_components):
        c = cov[k] if gmm.covariance_type == "full" else np.diag(
            cov[k] if gmm.covariance_type == "diag" else np.full(2, cov[k]))
        vals, vecs = np.linalg.eigh(c)
        pts = mu[k][:, None] + 2 * vecs @ (np.sqrt(np.maximum(vals, 0))[:, None] * circle)
        ax.plot(pts[0], pts[1], color=color, lw=0.5 + 4 * w[k], alpha=0.8)
        ax.plot(*mu[k], "+", color=color, ms=5)


def gmm2d_panels(gmm, data, path, title=None, n_samples=None, seed=0):
    """Three panels: the data, the mixture density (heat map, contours, 2-sigma component ellipses),
    and samples of the mixture."""
    plt = pyplot()
    data = _host(data)
    lim = square_limit(data)
    samples = _host(gmm.sample(n_samples or len(data), rng=seed))
    xs, ys, dens = density_grid(gmm, lim)
    fig, axes = plt.subplots(1, 3, figsize=(12.5, 4.4))
    rng = [[-lim, lim], [-lim, lim]]
    axes[0].hist2d(data[:, 0], data[:, 1], bins=120, range=rng, cmap="magma")
    axes[0].set_title(f"data ({len(data)} points)")
    axes[1].imshow(dens, origin="lower", extent=(-lim, lim, -lim, lim), cmap="magma", aspect="auto")
    axes[1].contour(xs, ys, dens, levels=6, colors="white", linewidths=0.5, alpha=0.6)
    _ellipses(axes[1], gmm)
    axes[1].set_title(f"mixture density p(x), K={gmm.n_components} {gmm.covariance_type}")
    axes[2].hist2d(samples[:, 0], samples[:, 1], bins=120, range=rng, cmap="magma")
    axes[2].set_title(f"samples ({len(samples)})")
    square_axes(axes, lim)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def em_curves(records, path, title="EM", keys=("train_nll", "test_nll")):
    """Train/test NLL (nats per point) after every EM iteration (iteration 0 = the initialization)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    paired_lines(ax, records, [("NLL" if name == "nll" else name.replace("_", " "), tr, te)
                               for name, tr, te in pair_keys(keys)], x="iteration")
    finish_curves(ax, "negative log-likelihood (nats per point)", title, "EM iteration")
    return _save(fig, path)


def mnist_figures(model, out_means, out_samples, seed=0, n=60):
    """For a PCAGaussianMixture on MNIST: the component means mapped back to pixels (m + V mu_k), largest
    weight first, and n samples: the top rows m + V z (the mixture alone, z ~ p_gmm), the bottom rows the
    same z plus the residual noise of the full-space model; pixels clipped to [0, 1]."""
    g = model.gmm
    order = np.argsort(-_host(g.weights_))
    means = _host(model.mean.data) + _host(g.means_)[order] @ _host(model.components.data).T
    w = _host(g.weights_)[order]
    nrow = min(10, len(means))
    save_image_grid(np.clip(means, 0, 1), out_means, nrow=nrow,
                    title=f"component means m + V mu_k (weights {w.max():.3f} .. {w.min():.3f})")
    full = _host(model.sample(n, rng=seed))
    z = _host(model.gmm.sample(n, rng=seed))        # the same z: sample() draws z first from the same seed
    mix = _host(model.mean.data) + z @ _host(model.components.data).T
    half = (n // 2) // 10 * 10 or n
    grid = np.clip(np.concatenate([mix[:half], full[:half]]), 0, 1)
    save_image_grid(grid, out_samples, nrow=10,
                    title=f"samples: top m + V z (mixture on PCA-{model.pca_dim}); "
                          f"bottom + {model.residual} residual noise")
    return out_means, out_samples
