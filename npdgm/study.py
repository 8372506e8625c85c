"""Worked identities from the study notes, computed with npdgm's own models (``npdgm study ...`` draws them).

* Change of variables: x = 2 z + 1 in 1-D (the density halves and moves) and a 2-D linear map, each as an npdgm
  :class:`~npdgm.models.flows.Flow`, against the closed forms  p_X(x) = p_Z(f(x)) |det J_f(x)|.
* The ELBO gap is a KL:  log p(x) - ELBO(x) = KL(q(z|x) || p(z|x)), on a linear-Gaussian VAE where every term has a
  closed form, and on a nonlinear VAE with a 1-D latent where quadrature gives every term.

Everything here is float64 host NumPy: these are checks, not training code.
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .inference import logmeanexp
from .models.flow_layers import ActNorm, InvertibleLinear
from .models.flows import Flow
from .models.vae import VAE

LOG_2PI = math.log(2 * math.pi)


# -- change of variables ------------------------------------------------------------------------------------
def affine_flow_1d(scale=2.0, shift=1.0):
    """The flow of x = scale z + shift, z ~ N(0, 1): one ActNorm with f(x) = (x - shift) / scale, so
    log p_X(x) = log N(f(x); 0, 1) - log|scale|, i.e. x ~ N(shift, scale^2)."""
    if scale == 0:
        raise ValueError("scale must be nonzero (x = scale z + shift must be invertible)")
    with backend.use(dtype="float64"):
        layer = ActNorm(1)
        layer.loc.data[...] = -shift
        layer.log_scale.data[...] = -math.log(abs(scale))
        layer.initialized = True
        flow = Flow([layer])
    return flow


def linear_flow_2d(l21=0.8, u12=0.5, log_s=(0.7, -0.1)):
    """The flow of x = z W^-1 for W = L1 U1 (L1 = [[1, 0], [l21, 1]], U1 = [[s1, u12], [0, s2]], s = exp(log_s)):
    one InvertibleLinear layer, z = f(x) = x W, so p_X(x) = N(x W; 0, I) |det W| = N(x; 0, (W W^T)^-1).
    Returns (flow, W)."""
    with backend.use(dtype="float64"):
        layer = InvertibleLinear(2, perm=[0, 1], sign=[1.0, 1.0])
        layer.L.data[...] = [[0.0, 0.0], [l21, 0.0]]
        layer.U.data[...] = [[0.0, u12], [0.0, 0.0]]
        layer.log_s.data[...] = log_s
        flow = Flow([layer])
    W = np.array([[1.0, 0.0], [l21, 1.0]]) @ np.array([[math.exp(log_s[0]), u12], [0.0, math.exp(log_s[1])]])
    return flow, W


def gaussian_logpdf(x, mean, cov):
    """log N(x; mean, cov) per row of x (B, D), cov (D, D)."""
    x = np.atleast_2d(x) - mean
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (np.einsum("bi,ij,bj->b", x, np.linalg.inv(cov), x) + logdet + x.shape[1] * LOG_2PI)


# -- the ELBO gap ----------------------------------------------------------------------------------------------
def linear_gaussian_vae(x_dim=5, z_dim=2, sigma=0.5, seed=0):
    """A VAE whose every term has a closed form: hidden=() (encoder and decoder are single Linear layers),
    Gaussian likelihood with fixed sigma, random float64 weights."""
    with backend.use(dtype="float64"):
        m = VAE(x_dim=x_dim, hidden=(), z_dim=z_dim, likelihood="gaussian", sigma=sigma, seed=seed)
    r = np.random.default_rng(seed)
    m.flat_params[...] = r.standard_normal(m.flat_params.shape) * 0.5
    return m


def _gaussian_kl(mu0, var0, mu1, cov1):
    """KL(N(mu0, diag var0) || N(mu1, cov1)) per row: 0.5 [tr(S1^-1 S0) + d^T S1^-1 d - k + log|S1| - log|S0|]."""
    inv = np.linalg.inv(cov1)
    d = mu1 - mu0
    _, logdet1 = np.linalg.slogdet(cov1)
    return 0.5 * ((np.diag(inv) * var0).sum(1) + np.einsum("bi,ij,bj->b", d, inv, d) - mu0.shape[1]
                  + logdet1 - np.log(var0).sum(1))


def linear_gaussian_terms(model, x):
    """Closed forms for the linear-Gaussian VAE (decoder out = z W + b, x | z ~ N(out, sigma^2 I), z ~ N(0, I)) and
    its Gaussian q(z|x) = N(mu, diag exp(logvar)) from the encoder, per row of x (B, D):
        log p(x)      = log N(x; b, W^T W + sigma^2 I)
        p(z|x)        = N(m, S),  S = (I + W W^T / sigma^2)^-1,  m = S W (x - b) / sigma^2
        ELBO          = E_q log N(x; z W + b, sigma^2 I) - KL(q || N(0, I)),
                        E_q[...] = -D/2 log(2 pi sigma^2) - (|x - mu W - b|^2 + sum_j var_j |W_j|^2) / (2 sigma^2)
        KL_posterior  = KL(q || p(z|x)).
    Returns {"log_px", "elbo", "kl_posterior", "gap"} with gap = log_px - elbo (which equals kl_posterior)."""
    W, b = model.params["decoder.0.W"], model.params["decoder.0.b"]
    s2, (D, Z) = model.sigma ** 2, (model.x_dim, model.z_dim)
    mu, logvar = (np.asarray(a, dtype=np.float64) for a in model.encode(x))
    var = np.exp(logvar)
    log_px = gaussian_logpdf(x, b, W.T @ W + s2 * np.eye(D))
    S = np.linalg.inv(np.eye(Z) + W @ W.T / s2)
    m = (x - b) @ W.T @ S / s2
    rec = -0.5 * D * math.log(2 * math.pi * s2) - (((x - mu @ W - b) ** 2).sum(1) + var @ (W * W).sum(1)) / (2 * s2)
    kl_prior = 0.5 * (mu * mu + var - 1 - logvar).sum(1)
    elbo = rec - kl_prior
    kl_post = np.array([_gaussian_kl(mu[i:i + 1], var[i:i + 1], m[i:i + 1], S)[0] for i in range(len(x))])
    return {"log_px": log_px, "elbo": elbo, "kl_posterior": kl_post, "gap": log_px - elbo}


def quadrature_terms(model, x, grid=None):
    """The same four terms for a VAE with a 1-D latent (any decoder), by quadrature on a z grid (default 12001
    points on [-30, 30]): log p(x) = log int p(x|z) N(z) dz, the exact posterior p(z|x) on the grid, and
    ELBO = int q log(p(x|z) N(z) / q), KL = int q log(q / p(z|x)), each a sum times the grid step. The identity
    log p(x) - ELBO = KL holds to the grid's precision; q's mass on the grid is reported as "q_mass"."""
    if model.z_dim != 1:
        raise ValueError(f"quadrature_terms needs z_dim = 1, got {model.z_dim}")
    z = np.linspace(-30, 30, 12001) if grid is None else np.asarray(grid, dtype=np.float64)
    h = z[1] - z[0]
    x = np.asarray(x, dtype=np.float64)
    log_lik = -np.stack([model._rec_rows(model.decoder.forward(z[:, None]), np.broadcast_to(xb, (len(z), len(xb))))
                         for xb in x])                                    # (B, G): log p(x_b | z_g)
    log_joint = log_lik - 0.5 * (z * z + LOG_2PI)
    log_px = logmeanexp(log_joint, axis=1) + math.log(len(z) * h)        # log sum_g exp(.) h
    log_post = log_joint - log_px[:, None]
    mu, logvar = (np.asarray(a, dtype=np.float64) for a in model.encode(x))
    log_q = -0.5 * ((z[None, :] - mu) ** 2 / np.exp(logvar) + logvar + LOG_2PI)
    q = np.exp(log_q) * h
    return {"log_px": log_px, "elbo": (q * (log_joint - log_q)).sum(1), "kl_posterior": (q * (log_q - log_post)).sum(1),
            "gap": log_px - (q * (log_joint - log_q)).sum(1), "q_mass": q.sum(1)}
