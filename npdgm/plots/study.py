"""Figures of npdgm.study: the change of variables (1-D and 2-D) and the ELBO gap against the exact KL."""
from __future__ import annotations

import math

import numpy as np

from . import _save, pyplot


def change_of_variables(flow1d, flow2d, W, path):
    """Left: p_Z = N(0, 1) and p_X for x = 2 z + 1 (npdgm's flow and the formula), with one interval and its
    image of equal probability. Right: the contours of p_Z = N(0, I) and of p_X for the 2-D linear map, with the
    unit square's image. Returns the path."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.4))
    t = np.linspace(-6, 8, 1401)
    pz = np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    px = np.exp(flow1d.log_prob(t[:, None]))
    a.plot(t, pz, color="C0", label="p_Z(z) = N(0, 1)")
    a.plot(t, px, color="C3", label="p_X(x), x = 2z + 1: npdgm flow")
    a.plot(t[::60], np.exp(-0.5 * ((t[::60] - 1) / 2) ** 2) / (2 * math.sqrt(2 * math.pi)),
           "k.", label="formula p_Z((x-1)/2) / 2")
    lo, hi = 0.0, 0.5
    a.fill_between(t, 0, pz, where=(t >= lo) & (t <= hi), color="C0", alpha=0.3, label="P(0 <= z <= 0.5)")
    a.fill_between(t, 0, px, where=(t >= 2 * lo + 1) & (t <= 2 * hi + 1), color="C3", alpha=0.3,
                   label="P(1 <= x <= 2): the same mass")
    a.set_xlabel("z or x")
    a.set_ylabel("density")
    a.set_title("1-D: the interval doubles, the density halves")
    a.legend(fontsize=7)
    g = np.linspace(-3.5, 3.5, 201)
    X = np.stack(np.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    b.contour(g, g, np.exp(-0.5 * (X * X).sum(1)).reshape(201, 201) / (2 * math.pi), 5, colors="C0",
              linewidths=1)
    b.contour(g, g, np.exp(flow2d.log_prob(X)).reshape(201, 201), 5, colors="C3", linewidths=1)
    sq = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]], dtype=float)
    b.plot(*sq.T, color="C0", label="unit square in z (area 1)")
    img = sq @ np.linalg.inv(W)
    b.plot(*img.T, color="C3", label=f"its image x = z W^-1 (area {1 / abs(np.linalg.det(W)):.2f})")
    b.set_xlabel("coordinate 1")
    b.set_ylabel("coordinate 2")
    b.set_aspect("equal")
    b.set_title(f"2-D linear map: p_X(x) = p_Z(xW) |det W|, |det W| = {abs(np.linalg.det(W)):.2f}")
    b.legend(fontsize=7, loc="lower right")
    fig.suptitle("change of variables: blue p_Z, red p_X")
    return _save(fig, path)


def elbo_gap(closed, quad, path):
    """log p(x) - ELBO against KL(q(z|x) || p(z|x)), one point per image, for the closed-form linear-Gaussian
    VAE and the 1-D latent VAE by quadrature: every point on the diagonal. Returns the path."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for t, marker, label in ((closed, "o", "linear-Gaussian VAE (closed form)"),
                             (quad, "s", "1-D latent VAE (quadrature)")):
        ax.plot(t["kl_posterior"], t["gap"], marker, ls="none", label=label, alpha=0.8)
    hi = max(float(np.max(closed["gap"])), float(np.max(quad["gap"]))) * 1.05
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="gap = KL")
    ax.set_xlabel("KL(q(z|x) || p(z|x))  (nats)")
    ax.set_ylabel("log p(x) - ELBO(x)  (nats)")
    ax.set_title("the ELBO gap is the KL to the posterior, per image")
    ax.legend(fontsize=8)
    return _save(fig, path)
