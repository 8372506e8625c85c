"""Unnormalised 2-D target densities p*(x) for fitting a flow by reverse KL, each with its hand-written
d log p*/dx (normflows' ``distributions/target.py`` habit: a target is known by its log-density, not by samples).

A target is called like the samplers' targets of :mod:`npdgm.inference`: ``target(x) -> (log p*(x), d/dx log p*(x))``
for x (..., 2), log p* of shape x.shape[:-1]. ``log_z`` is log of the normalising constant by quadrature on a
grid (exact enough in 2-D: the KLs reported in nats are true KLs), and ``sample`` draws exact samples (the mixture
directly, the others by rejection from a uniform box under the bound ``log_max`` >= max log p*).

    bimodal     0.5 N((-2.5, 0), 0.5^2 I) + 0.5 N((2.5, 0), 0.5^2 I)       (normalised: log Z = 0)
                log p* = logsumexp_k [log 0.5 - |x - m_k|^2 / 2s^2] - log(2 pi s^2)
                d/dx   = sum_k r_k(x) (m_k - x) / s^2,   r_k = the responsibilities
    ring        log p* = -(|x| - 2)^2 / (2 0.25^2);   d/dx = -(|x| - 2) / 0.25^2 * x / |x|
    two-moons   normflows' TwoMoons energy, a = |x_1|, r = |x|:
                log p* = -((r - 2) / 0.2)^2 / 2 - ((a - 2) / 0.3)^2 / 2 + log(1 + exp(-4a / 0.09))
                d/dx   = -(r - 2) / 0.04 * x / r + e_1 sign(x_1) [-(a - 2) / 0.09 - (4 / 0.09) sigmoid(-4a / 0.09)]
                (the bracket is 0 at a = 0, so log p* is smooth across x_1 = 0)
"""
from __future__ import annotations

import math

import numpy as np

from . import backend

__all__ = ["Target", "TARGETS", "get_target", "log_normaliser"]


class Target:
    """A named unnormalised density on R^2: ``target(x) -> (logp, grad)``; ``box`` the half-width of a square
    holding (all but a negligible part of) its mass; ``log_max`` an upper bound of log p* (for rejection)."""

    def __init__(self, name, fn, box, log_max, sampler=None, doc=""):
        self.name, self._fn, self.box, self.log_max, self._sampler, self.doc = name, fn, box, log_max, sampler, doc
        self._log_z = None

    def __call__(self, x):
        return self._fn(x)

    def log_prob(self, x):
        """log p*(x), unnormalised."""
        return self._fn(x)[0]

    @property
    def log_z(self):
        """log of Z = integral of p* over R^2, by quadrature on a 601^2 grid over the box (cached)."""
        if self._log_z is None:
            self._log_z = log_normaliser(self)
        return self._log_z

    def sample(self, n, rng):
        """n exact samples (n, 2) float64 on the host (``rng`` a NumPy Generator)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self._sampler is not None:
            return self._sampler(n, rng)
        out, have = [], 0
        while have < n:  # rejection from the uniform box: accept with probability p*(x) / exp(log_max)
            x = rng.uniform(-self.box, self.box, (4 * (n - have) + 64, 2))
            keep = x[np.log(rng.random(len(x))) < self._fn(x)[0] - self.log_max]
            out.append(keep)
            have += len(keep)
        return np.concatenate(out)[:n]

    def __repr__(self):
        return f"Target({self.name!r})"


def log_normaliser(target, n=601):
    """log Z = log sum_grid p*(x) h^2 on an n x n grid over [-box, box]^2 (the integrand is smooth and
    negligible at the box's edge, so the rectangle rule is accurate to many digits)."""
    xs = np.linspace(-target.box, target.box, n)
    h = xs[1] - xs[0]
    gx, gy = np.meshgrid(xs, xs)
    lp = target.log_prob(np.stack([gx.ravel(), gy.ravel()], 1).astype(np.float64))
    m = lp.max()
    return float(m + math.log(np.exp(lp - m).sum() * h * h))


# -- bimodal: a two-component Gaussian mixture ------------------------------------------------------------------
BIMODAL_MEANS, BIMODAL_SD = ((-2.5, 0.0), (2.5, 0.0)), 0.5


def bimodal(x):
    """(log p*, grad) of 0.5 N(m_1, s^2 I) + 0.5 N(m_2, s^2 I) (normalised)."""
    xp = backend.array_module(x)
    s2 = BIMODAL_SD ** 2
    means = xp.asarray(BIMODAL_MEANS, dtype=x.dtype)
    d = means - x[..., None, :]                                    # (..., K, 2): m_k - x
    logits = math.log(0.5) - (d * d).sum(-1) / (2 * s2)            # (..., K)
    m = logits.max(-1, keepdims=True)
    lse = m[..., 0] + xp.log(xp.exp(logits - m).sum(-1))
    resp = xp.exp(logits - lse[..., None])
    grad = (resp[..., None] * d).sum(-2) / s2
    return lse - math.log(2 * math.pi * s2), grad


def _bimodal_sample(n, rng):
    k = rng.integers(0, 2, n)
    return np.asarray(BIMODAL_MEANS)[k] + BIMODAL_SD * rng.standard_normal((n, 2))


# -- ring --------------------------------------------------------------------------------------------------------
RING_RADIUS, RING_SD = 2.0, 0.25


def ring(x):
    """(log p*, grad) of exp(-(|x| - R)^2 / 2 s^2)."""
    xp = backend.array_module(x)
    r = xp.sqrt((x * x).sum(-1))
    u = (r - RING_RADIUS) / RING_SD ** 2
    return -0.5 * (r - RING_RADIUS) * u, -(u / xp.maximum(r, 1e-30))[..., None] * x


# -- two moons (normflows) ---------------------------------------------------------------------------------------
def two_moons(x):
    """(log p*, grad) of normflows' TwoMoons energy (formula in the module docstring)."""
    xp = backend.array_module(x)
    r = xp.sqrt((x * x).sum(-1))
    a = xp.abs(x[..., 0])
    u = 4 * a / 0.09
    softplus = xp.logaddexp(0, -u)                                 # log(1 + exp(-u)), no overflow
    logp = -0.5 * ((r - 2) / 0.2) ** 2 - 0.5 * ((a - 2) / 0.3) ** 2 + softplus
    g_r = -(r - 2) / 0.04 / xp.maximum(r, 1e-30)                   # d/dx of the radial term = g_r * x
    g_a = -(a - 2) / 0.09 - (4 / 0.09) * xp.exp(-xp.logaddexp(0, u))   # sigmoid(-u) = exp(-softplus(u))
    grad = g_r[..., None] * x
    grad[..., 0] += xp.sign(x[..., 0]) * g_a
    return logp, grad


TARGETS = {
    "bimodal": Target("bimodal", bimodal, 5.0, -math.log(4 * math.pi * BIMODAL_SD ** 2) + 1e-6, _bimodal_sample,
                      "two well-separated Gaussians, 0.5 N((-2.5, 0), 0.25 I) + 0.5 N((2.5, 0), 0.25 I)"),
    "ring": Target("ring", ring, 4.0, 0.0, doc="a ring of radius 2 and width 0.25"),
    "two-moons": Target("two-moons", two_moons, 4.0, 0.01, doc="normflows' two-moons energy"),
}


def get_target(name):
    """The target called ``name`` (ValueError naming the choices otherwise)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]
