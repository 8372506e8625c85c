"""k-means: k-means++ seeding and Lloyd iterations (the GaussianMixture's default initialization).

Array code on the module of the data (NumPy or CuPy); the random draws come from a host NumPy
Generator, so a seed gives the same centers on every backend.

    centers = kmeans(x, kmeans_plusplus(x, k, np.random.default_rng(0)))     # x (N, D) -> centers (k, D)
    labels  = nearest(x, centers)                                              # (N,)
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..backend import array_module

__all__ = ["sqdist", "nearest", "kmeans_plusplus", "kmeans"]


def sqdist(x, centers):
    """(N, K) squared distances |x_n - c_k|^2 (expanded form, clipped at 0)."""
    xp = array_module(x)
    d = (x * x).sum(1)[:, None] - 2 * x @ centers.T + (centers * centers).sum(1)[None]
    return xp.maximum(d, 0)


def nearest(x, centers):
    """(N,) index of the nearest center of each point x_n (x (N, D), centers (K, D))."""
    return sqdist(x, centers).argmin(1)


def kmeans_plusplus(x, k, g, n_trials=None):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007; the greedy variant scikit-learn uses): the first
    center uniformly from the data; for each next one draw ``n_trials`` (default 2 + floor(ln k)) candidates with
    probability proportional to the squared distance to the nearest chosen center, and keep the candidate that
    lowers the total squared distance sum_n min_c |x_n - c|^2 the most."""
    xp = array_module(x)
    N = x.shape[0]
    n_trials = n_trials or 2 + int(math.log(k))
    idx = [int(g.integers(N))]
    d2 = sqdist(x, x[idx[0]][None])[:, 0]
    for _ in range(1, k):
        p = np.asarray(backend.to_host(d2), dtype=np.float64)
        tot = p.sum()
        if not tot > 0:  # every point coincides with a chosen center: take unused points
            rest = np.setdiff1d(np.arange(N), idx)
            j = int(g.choice(rest))
            idx.append(j)
            continue
        cand = g.choice(N, size=n_trials, p=p / tot)
        dc = xp.minimum(d2[:, None], sqdist(x, x[xp.asarray(cand)]))     # (N, trials)
        best = int(backend.to_host(dc.sum(0)).argmin())
        idx.append(int(cand[best]))
        d2 = dc[:, best]
    return x[xp.asarray(idx)].copy()


def kmeans(x, centers, max_iter=100, tol=1e-4):
    """Lloyd iterations from ``centers``: assign each point to its nearest center, move each center to the mean
    of its points (an empty cluster keeps its center); stop when the assignment no longer changes or the
    squared center shift falls below tol * (mean per-feature variance of x), as scikit-learn's KMeans."""
    xp = array_module(x)
    K = centers.shape[0]
    thresh = tol * float(x.var(0).mean())
    labels = None
    for _ in range(max_iter):
        new = nearest(x, centers)
        if labels is not None and bool((new == labels).all()):
            break
        labels = new
        onehot = xp.eye(K, dtype=x.dtype)[labels]                   # (N, K)
        counts = onehot.sum(0)
        sums = onehot.T @ x
        moved = xp.where(counts[:, None] > 0, sums / xp.maximum(counts, 1)[:, None], centers)
        shift = float(((moved - centers) ** 2).sum())
        centers = moved
        if shift <= thresh:
            break
    return centers
