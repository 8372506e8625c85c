"""VAE figures (PNG, Agg): reconstructions, prior samples, curves, interpolation, 2-D latent
scatter and the decoded manifold of a 2-D latent grid, the 3-D latent scatter of a 3-D latent, imputation
rows (observed / missing / imputed pixels).

Every function takes a trained :class:`npdgm.VAE` and host or device arrays and returns the path.
"""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from . import _save, finish_curves, paired_lines, pyplot, save_image_grid, tile


def _h(a):
    return np.asarray(to_host(a), dtype=np.float64)


def _shape(model):
    """The (C, H, W) of a conv VAE's images (colour when C = 3), else MNIST's 28x28."""
    return tuple(getattr(model, "config", {}).get("image_shape", (28, 28)))


def reconstructions(model, x, path, n=10, pairs=2):
    """Rows alternate input / reconstruction E[x | z = mu(x)] for ``pairs`` rows of ``n`` images."""
    x = _h(x)[:n * pairs]
    rec = _h(model.reconstruct(x))
    rows, labels = [], []
    for p in range(pairs):
        rows += [x[p * n:(p + 1) * n], rec[p * n:(p + 1) * n]]
        labels += ["input", "output"]
    return save_image_grid(np.concatenate(rows), path, nrow=n, title="reconstructions", row_labels=labels,
                           shape=_shape(model))


def samples(model, path, n=100, nrow=10, rng=0, mean=True):
    """A grid of images decoded from z ~ N(0, I) (E[x|z] when ``mean``, else draws x ~ p(x|z))."""
    x = _h(model.sample(n, rng=rng, mean=mean))
    title = "samples from the prior" + ("  (E[x|z])" if mean else "  (x ~ p(x|z))")
    return save_image_grid(x, path, nrow=nrow, title=title, shape=_shape(model))


def mean_and_std(model, path, n=10, rng=0):
    """A Gaussian decoder at n prior draws z ~ N(0, I), one column each: its mean E[x|z], its standard deviation
    sigma(z) per pixel (grey = sigma / max sigma over the figure: white where the decoder is least sure) and a draw
    x = mean + sigma eps. With a variance head (sigma="learned-z") the std changes from column to column."""
    from ..models.elbo import draw, generator

    rng = generator(model, rng)
    z = draw(model, (n, model.z_dim), rng)
    m, s = _h(model.decode(z)), _h(model.decode_std(z))
    x = m + s * _h(draw(model, (n, model.x_dim), rng))
    top = float(s.max()) or 1.0
    return save_image_grid(np.concatenate([m, s / top, x]), path, nrow=n,
                           row_labels=["mean", "sigma(z)", "mean+sigma eps"],
                           title=f"Gaussian decoder at z ~ N(0, I): mean, std (white = {top:.3g}), a draw")


def interpolation(model, xa, xb, path, steps=10):
    """For each pair (xa[i], xb[i]): the input a, decodings of (1-t) mu(a) + t mu(b) for t in
    [0, 1] (``steps`` values), the input b; one row per pair."""
    xa, xb = _h(xa), _h(xb)
    mua, mub = _h(model.encode(xa)[0]), _h(model.encode(xb)[0])
    t = np.linspace(0, 1, steps)
    rows = []
    for i in range(len(xa)):
        z = (1 - t)[:, None] * mua[i] + t[:, None] * mub[i]
        rows += [xa[i:i + 1], _h(model.decode(z)), xb[i:i + 1]]
    return save_image_grid(np.concatenate(rows), path, nrow=steps + 2,
                           title="latent interpolation (ends: the two inputs)", shape=_shape(model))


def latent_scatter(model, x, labels, path, title="encoded test digits: mu(x)"):
    """2-D latent: scatter of mu(x) coloured by digit label."""
    if model.z_dim != 2:
        raise ValueError(f"latent_scatter needs a 2-D latent, this VAE has z_dim={model.z_dim}")
    plt = pyplot()
    mu = _h(model.encode(x)[0])
    labels = np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6.4, 5.6))
    sc = ax.scatter(mu[:, 0], mu[:, 1], c=labels, cmap="tab10", s=4, alpha=0.8, vmin=-0.5, vmax=9.5)
    fig.colorbar(sc, ax=ax, ticks=range(10), label="digit")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def latent_scatter_3d(model, x, labels, path, title="encoded test digits: mu(x), 3-D latent",
                      views=((25, -60), (25, 30))):
    """3-D latent (z_dim 3): mu(x) as a 3-D scatter (mpl_toolkits.mplot3d) coloured by digit label, one panel per
    (elevation, azimuth) in ``views`` (two by default: a single projection of a 3-D cloud hides its depth)."""
    if model.z_dim != 3:
        raise ValueError(f"latent_scatter_3d needs a 3-D latent, this VAE has z_dim={model.z_dim}")
    plt = pyplot()   # matplotlib >= 3.2 registers the "3d" projection itself
    mu = _h(model.encode(x)[0])
    labels = np.asarray(labels)
    fig = plt.figure(figsize=(5.6 * len(views) + 0.8, 5.4))
    for i, (elev, azim) in enumerate(views):
        ax = fig.add_subplot(1, len(views), i + 1, projection="3d")
        for c in np.unique(labels):   # one scatter per digit: a legend, not a colorbar (no extra axes)
            m = labels == c
            ax.scatter(mu[m, 0], mu[m, 1], mu[m, 2], color=plt.cm.tab10(int(c) % 10), s=3, alpha=0.7, label=str(c))
        ax.view_init(elev=elev, azim=azim)
        ax.set_xlabel("z1")
        ax.set_ylabel("z2")
        ax.set_zlabel("z3")
        ax.set_title(f"view: elevation {elev}, azimuth {azim}", fontsize=9)
    fig.axes[-1].legend(title="digit", markerscale=3, fontsize=8, loc="center left", bbox_to_anchor=(1.05, 0.5))
    fig.suptitle(title)
    return _save(fig, path)


def manifold(model, path, n=20, lo=0.05, hi=0.95):
    """2-D latent: decoded images on an n x n grid of z = (Phi^-1(u1), Phi^-1(u2)), u in [lo, hi]
    (Gaussian quantiles, as in Kingma & Welling's figure); z1 grows to the right, z2 upwards, and the
    ticks give z at a few grid columns / rows."""
    if model.z_dim != 2:
        raise ValueError(f"manifold needs a 2-D latent, this VAE has z_dim={model.z_dim}")
    from statistics import NormalDist

    g = np.array([NormalDist().inv_cdf(u) for u in np.linspace(lo, hi, n)])
    z = np.array([[a, b] for b in g[::-1] for a in g])  # rows: z2 from high to low; cols: z1
    plt = pyplot()
    grid = tile(np.clip(_h(model.decode(z)), 0, 1), n, _shape(model))
    fig, ax = plt.subplots(figsize=(n * 0.45 + 1.2, n * 0.45 + 1.0))
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    side = _shape(model)[-1]
    centre = [1 + (side + 1) * i + side // 2 for i in range(n)]  # pixel centre of grid column / row i (+ 1 pad)
    every = max(1, n // 5)
    cols = list(range(0, n, every)) + ([n - 1] if (n - 1) % every else [])
    ax.set_xticks([centre[i] for i in cols], [f"{g[i]:.2f}" for i in cols])
    ax.set_yticks([centre[i] for i in cols], [f"{g[::-1][i]:.2f}" for i in cols])
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(f"decoded manifold E[x|z], z on Gaussian quantiles [{lo}, {hi}]")
    return _save(fig, path)


def imputation(original, masked, imputed, path, title="imputation", cond_mean=None, shape=(28, 28)):
    """Rows: original, masked (missing pixels shown mid-grey), imputed (encode/decode iterations)
    and, when given, the importance-sampled E[x_missing | x_observed] (``shape``: as save_image_grid's)."""
    rows = [_h(original), _h(masked), _h(imputed)]
    labels = ["original", "masked", "imputed"]
    if cond_mean is not None:
        rows.append(_h(cond_mean))
        labels.append("E[x_m | x_o]")
        title += "\nlast row: E[x_missing | x_observed], importance-sampled"
    return save_image_grid(np.concatenate(rows), path, nrow=len(rows[0]), title=title, row_labels=labels,
                           shape=shape)


def curves(records, path, summary=None):
    """Three panels, one colour per term, train solid and test dashed: the -ELBO (with the final IWAE
    -log p(x) estimate when given), its reconstruction term and its KL term (on its own axis: it is an
    order of magnitude below the others). A run trained on the IWAE bound logs no train -ELBO: its
    train line in the first panel is that bound (``train_loss``)."""
    plt = pyplot()
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    paired_lines(a, records, [("-ELBO", "train_nelbo", "test_nelbo")])
    if not any("train_nelbo" in r for r in records):
        paired_lines(a, records, [("-IWAE bound (the objective)", "train_loss", None)], color=3)
    ep = [r["epoch"] for r in records]
    nll = summary.get("test_nll", summary.get("test_iwae_nll")) if summary and "iwae_k" in summary else None
    if nll is not None and ep:   # test_iwae_nll: its older name (old summary.json files)
        a.plot([ep[-1]], [nll], marker="*", ms=12, ls="", color="C2",
               label=f"test -log p(x), IWAE k={summary['iwae_k']} (n={summary['iwae_n']})")
    finish_curves(a, "nats per image", "negative ELBO")
    paired_lines(b, records, [("reconstruction", "train_recon", "test_recon")], color=1)
    finish_curves(b, "nats per image", "reconstruction -E_q log p(x|z)")
    paired_lines(c, records, [("KL", "train_kl", "test_kl")], color=4)
    finish_curves(c, "nats per image", "KL(q(z|x) || p(z))")
    return _save(fig, path)
