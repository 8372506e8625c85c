"""Autoencoder figures: curves, reconstructions (with the corrupted input of a denoising one) and why its codes
do not sample (the codes against N(0, I), and images decoded from z ~ N(0, I))."""
from __future__ import annotations

import numpy as np

from ..backend import to_host
from . import _save, finish_curves, paired_lines, pyplot, save_image_grid, tile


def _h(a):
    return np.asarray(to_host(a), dtype=np.float64)


def curves(records, path):
    """Reconstruction BCE (nats per image) and MSE per pixel against the epoch, train solid, test dashed."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    paired_lines(a, records, [("reconstruction BCE", "train_recon", "test_recon")])
    finish_curves(a, "nats per image", "-log p(x | z = g(x)), clean x")
    paired_lines(b, records, [("MSE", None, "test_mse")], color=1)
    finish_curves(b, "squared error per pixel", "test MSE of E[x | g(x)]")
    return _save(fig, path)


def reconstructions(model, x, keep, path):
    """Rows: input, (denoising: the corrupted input x * mask,) reconstruction."""
    x = _h(x)
    rows, labels = [x], ["input"]
    if keep is not None:
        rows.append(x * _h(keep))
        labels.append("corrupted")
    rows.append(_h(model.reconstruct(x, keep)))
    labels.append("output")
    title = "autoencoder reconstructions" + (f" (denoising, P={model.denoise:g})" if model.denoise else "")
    return save_image_grid(np.concatenate(rows), path, nrow=len(x), row_labels=labels, title=title)


def codes_vs_prior(model, x, path, vae=None, n=10, rng=0):
    """Left: histograms of the codes' coordinates g(x) (all dimensions pooled) against the N(0, 1) density.
    Right, one row each: images decoded from z ~ N(0, I) by the autoencoder, from z ~ N(mean, cov) fitted to its
    codes, and (``vae`` given) the VAE's samples from its prior N(0, I), the one it was trained to match."""
    plt = pyplot()
    z = _h(model.encode(x))
    g = np.random.default_rng(rng)
    prior = g.standard_normal((n, model.z_dim))
    mean, cov = z.mean(0), np.cov(z, rowvar=False).reshape(model.z_dim, model.z_dim)
    fitted = g.multivariate_normal(mean, cov, size=n, method="eigh")
    rows = [_h(model.decode(prior)), _h(model.decode(fitted))]
    labels = ["AE: z~N(0,I)", "AE: z~N(m,C) of codes"]
    if vae is not None:
        rows.append(_h(vae.sample(n, rng=rng)))
        labels.append("VAE: z~N(0,I)")
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    lo, hi = min(-4.0, np.percentile(z, 0.5)), max(4.0, np.percentile(z, 99.5))
    a.hist(z.ravel(), bins=80, range=(lo, hi), density=True, alpha=0.6, label="AE codes g(x), all dims")
    t = np.linspace(lo, hi, 300)
    a.plot(t, np.exp(-t * t / 2) / np.sqrt(2 * np.pi), color="C3", label="N(0, 1): what sampling assumes")
    a.set_xlabel("code coordinate")
    a.set_ylabel("density")
    a.set_title(f"codes: E|z|^2 = {(z * z).sum(1).mean():.1f} vs {model.z_dim} under N(0, I)")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    b.imshow(tile(np.clip(np.concatenate(rows), 0, 1), n), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    b.set_xticks([])
    b.set_yticks([1 + 29 * i + 14 for i in range(len(labels))], labels)
    b.tick_params(length=0)
    b.set_title("decoded samples: the AE's decoder never saw most of N(0, I)")
    return _save(fig, path)
