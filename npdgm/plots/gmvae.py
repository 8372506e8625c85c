"""GMVAE figures: the test codes coloured by digit and by mixture component, and samples of every component."""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from . import _save, pyplot, save_image_grid


def _h(a):
    return np.asarray(to_host(a), dtype=np.float64)


def project_2d(mu, means):
    """(codes, component means) in 2-D: as they are for z_dim 2, else on the codes' first two principal axes
    (returns the projections and the axis labels)."""
    if mu.shape[1] <= 2:
        pad = lambda a: np.pad(a, ((0, 0), (0, 2 - a.shape[1])))  # noqa: E731
        return pad(mu), pad(means), ("z1", "z2")
    centre = mu.mean(axis=0)
    _, s, vt = np.linalg.svd(mu - centre, full_matrices=False)
    share = s[:2] ** 2 / (s ** 2).sum()
    return ((mu - centre) @ vt[:2].T, (means - centre) @ vt[:2].T,
            (f"PC1 ({share[0]:.0%} of the variance)", f"PC2 ({share[1]:.0%})"))


def clusters(model, x, labels, components, path, acc=None):
    """Two panels of the posterior means mu(x) (2-D, or their first two principal components): coloured by digit
    label, and by assigned component argmax_c p(c | mu(x)), with the component means m_c marked and numbered."""
    plt = pyplot()
    mu = _h(model.encode(x)[0])
    p, m, (xl, yl) = project_2d(mu, _h(model.prior_mean.data))
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5.6))
    cmap = plt.cm.tab10 if model.components <= 10 else plt.cm.tab20
    for ax, c, what, cm in [(axes[0], np.asarray(labels), "digit label", plt.cm.tab10),
                            (axes[1], np.asarray(components), "assigned component", cmap)]:
        for v in np.unique(c):
            k = c == v
            ax.scatter(p[k, 0], p[k, 1], s=4, alpha=0.7, color=cm(int(v) % cm.N), label=str(v))
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.set_title(f"test codes mu(x), coloured by {what}")
        ax.legend(title=what.split()[-1], markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    axes[1].scatter(m[:, 0], m[:, 1], marker="x", s=60, color="black", label="m_c")
    for i, (a, b) in enumerate(m):
        axes[1].annotate(str(i), (a, b), fontsize=8, xytext=(3, 3), textcoords="offset points")
    if acc is not None:
        fig.suptitle(f"Gaussian-mixture VAE, {model.components} components: cluster accuracy {acc:.3f} "
                     f"(x: component means m_c)")
    return _save(fig, path)


def components(model, path, n=10, rng=0):
    """One row per mixture component c: n images decoded from z ~ N(m_c, e^s_c), labelled with the weight pi_c."""
    pi = np.exp(_h(model.log_weights_prior()))
    rows = [_h(model.sample(n, rng=rng + c, component=c)) for c in range(model.components)]
    return save_image_grid(np.concatenate(rows), path, nrow=n, title="samples of each mixture component",
                           row_labels=[f"c={c} pi={pi[c]:.2f}" for c in range(model.components)])
