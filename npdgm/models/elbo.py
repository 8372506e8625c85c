"""The ELBO and IWAE objectives of the VAE family and their ONE backward (VAE, CVAE and M2 use it).

Given the encoder output (mu, logvar) (B, Z), noise eps (K, B, Z) (M2: (N, Z) rows), the
reparameterized z = mu + exp(logvar / 2) eps, the decoder output ``out`` (K B, D) for z and the
targets ``xt`` (x repeated per sample, (K B, D)):

ELBO (per-row weights ``d_rec`` (K B,) on -log p(x|z) and ``d_kl`` (B,) on KL(q(z|x) || N(0, I))):

    L       = sum_n d_rec_n (-log p(x_n | z_n)) + sum_b d_kl_b KL_b
    dout    = likelihood backward(d_rec)              Bernoulli: d_rec (sigmoid(out) - x)
                                                      Gaussian:  d_rec (out - x) exp(-logvar_x)
                                                      (+ d logvar_x with a learned sigma; a variance head
                                                      sigma="learned-z": out = [mean | raw], see head_nll_backward)
    dz      = decoder.backward(dout)                  (K, B, Z)
    dmu     = sum_k dz_k                  + d_kl mu
    dlogvar = sum_k dz_k eps_k e^(logvar/2) / 2 + d_kl (e^logvar - 1) / 2
    encoder.backward([dmu | dlogvar])

IWAE (Burda et al. 2016; docs/iwae-logsumexp.md), the k-sample bound per row and its gradient:

    log w_kb = log p(x_b | z_kb) + log N(z_kb; 0, I) - log q(z_kb | x_b)
             = -nll_kb - 0.5 sum_j (z_kbj^2 - eps_kbj^2 - logvar_bj)      (log 2 pi terms cancel)
    iwae_b   = logsumexp_k log w_kb - log K
    a_kb     = softmax_k log w_kb                      (the normalized importance weights)
    for L = sum_b d_b (-iwae_b):  dlogw_kb = -d_b a_kb
    dz      = decoder.backward(likelihood backward(-dlogw)) - dlogw z      (eps held fixed)
    dmu, dlogvar = reparameterize backward(dz);  dlogvar += 0.5 sum_k dlogw
    encoder.backward([dmu | dlogvar])

Free bits (Kingma et al. 2016; ``model.free_bits`` = L > 0, docs/kl-closed-form.md): the KL term of the batch
is sum_j max(L, mean_b KL_bj) instead of mean_b sum_j KL_bj; d_kl is then the 0-d weight of that term and
:func:`npdgm.kernels.gaussian.kl_free_bits_backward` gives a dimension under L no gradient.

IAF posterior (``model.flow``, K IAF steps after the Gaussian, :mod:`npdgm.models.iaf_posterior`,
docs/iaf-posterior.md): the decoder sees z_K = flow(z_0) and the KL is the one-sample Monte Carlo estimate

    KL_n = log q(z_K|x) - log N(z_K; 0, I) = 0.5 sum_j (z_K^2 - eps^2 - logvar) - LD_n    (per decoder row n)

with LD = sum of the steps' log-dets, so d_kl is (K B,); log w_n = -nll_n - KL_n and the backward adds
dz_K += d_kl z_K, goes through the steps with dLD = -d_kl, and dlogvar -= 0.5 sum_k d_kl (eps held fixed).
With ``model.iaf_context`` the steps also see the encoder's last hidden layer h (B, H) (``context``, repeated
for the K samples); their dc summed over k is dh, added at the input of the encoder's last Linear
(:func:`npdgm.models.iaf_posterior.encoder_backward`).

The model provides ``encoder`` and ``decoder`` modules (``backward(dy, need_dx)``), ``likelihood``
("bernoulli" | "gaussian"), ``sigma`` / ``logvar_x`` for the Gaussian, ``xp`` and ``dtype``.
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..kernels.activations import tanh_backward, tanh_forward
from ..kernels.gaussian import kl_free_bits_backward
from ..kernels import (bernoulli_nll_backward, bernoulli_nll_forward, gaussian_nll_backward, gaussian_nll_forward,
                       kl_std_normal_backward, logsumexp_backward, logsumexp_forward, reparameterize_backward,
                       reparameterize_forward)
from ..validate import as_rng
from .iaf_posterior import encoder_backward, flow_backward, flow_forward

__all__ = ["ELBOMixin", "posterior_sample", "logvar_x", "variance_head", "head_split", "head_nll_forward",
           "head_nll_backward", "rec_rows", "rec_backward", "elbo_backward", "log_weights",
           "iwae_estimate", "iwae_forward", "iwae_backward", "generator", "draw", "as_noise"]


# -- noise ------------------------------------------------------------------------------------------
def generator(model, rng):
    """The noise generator once per call: ``rng`` None -> the model's own generator, an int seed ->
    a fresh host Generator, a Generator -> itself. Convert ONCE per method and pass the Generator on,
    so that successive draws (chunks, labelled and unlabelled noise) continue one stream instead of
    restarting the same seed."""
    if rng is None:
        return model._noise
    return rng if hasattr(rng, "standard_normal") else as_rng(rng)   # a Generator, or anything that draws like one


def draw(model, shape, rng):
    """Standard normal noise of ``shape`` in the model dtype/backend from a NumPy/CuPy Generator or int
    seed (default: the model's own generator)."""
    rng = generator(model, rng)
    eps = rng.standard_normal(shape, dtype=np.float32 if model.dtype == np.float32 else np.float64)
    return model.xp.asarray(eps).astype(model.dtype, copy=False)


def as_noise(model, eps, shape, name="eps", finite=True):
    """Given noise checked to be a float array of ``shape`` (and finite, unless ``finite=False``: the
    callers' ``check=False``, which must not read the device, e.g. inside a CUDA-graph capture), as a
    model-dtype backend array."""
    if eps.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(eps.shape)}")
    if eps.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array, got dtype {eps.dtype}")
    xp = model.xp
    eps = xp.asarray(eps) if backend.array_module(eps) is not xp else eps
    eps = eps.astype(model.dtype, copy=False)
    if finite:
        backend.check_finite(name, eps)   # NaN/inf noise would turn the whole loss into NaN silently
    return eps


# -- the likelihood p(x|z), one row per decoder output row -------------------------------------------
SIGMA_HEAD = "learned-z"   # sigma= value of a decoder with its own variance head sigma_theta(z) (heteroscedastic)
LOGVAR_BOUND = 7.0         # the head's log-variance v = b tanh(raw / b) lies in (-b, b): sigma in (0.030, 33)


def learned_sigma(model):
    return getattr(model, "likelihood", "bernoulli") == "gaussian" and model.sigma is None


def variance_head(model):
    """True for a Gaussian decoder whose output row is [mean | raw log-variance] (N, 2D): sigma="learned-z"."""
    return getattr(model, "sigma", None) == SIGMA_HEAD


def logvar_x(model):
    """The Gaussian decoder log-variance: the learned (D,) parameter or the fixed scalar 2 log sigma."""
    if variance_head(model):
        raise ValueError("this decoder's variance is a function of z (sigma='learned-z'): its log-variance is "
                         "head_split(decoder output)[1], one per row, not one array for the model")
    if learned_sigma(model):
        return model.logvar_x.data
    return model.xp.asarray(2 * math.log(model.sigma), dtype=model.dtype)


def head_split(out):
    """A variance-head decoder output [mean | raw] (N, 2D) -> (mean, v), both (N, D), with the bounded
    log-variance v = b tanh(raw / b), b = LOGVAR_BOUND (so sigma^2 = e^v can neither vanish nor explode)."""
    D = out.shape[1] // 2
    return out[:, :D], LOGVAR_BOUND * tanh_forward(out[:, D:] / LOGVAR_BOUND)


def head_nll_forward(out, xt):
    """-log N(x; mean(z), diag e^v(z)) per row for out = [mean | raw] (N, 2D), xt (N, D) -> (N,): the
    per-element log-variance form of :func:`npdgm.kernels.losses.gaussian_nll_forward` on :func:`head_split`."""
    mean, v = head_split(out)
    return gaussian_nll_forward(mean, xt, v)


def head_nll_backward(d_rows, out, xt):
    """d L / d out = [dmean | draw] (N, 2D) for L = sum_n d_rows_n head_nll_n:

        dmean = d (mean - x) e^-v,   dv = d (1 - (x - mean)^2 e^-v) / 2     (gaussian_nll_backward, per element)
        draw  = dv (1 - tanh^2(raw / b)) = dv (1 - (v / b)^2)               (tanh_backward of v / b = tanh(raw / b))"""
    mean, v = head_split(out)
    dmean, dv = gaussian_nll_backward(d_rows, mean, xt, v)
    return backend.array_module(out).concatenate([dmean, tanh_backward(dv, v / LOGVAR_BOUND)], axis=1)


def rec_rows(model, out, xt):
    """-log p(x|z) per decoder row (summed over pixels): out (N, D) (a variance head: (N, 2D)), xt (N, D) -> (N,)."""
    if model.likelihood == "bernoulli":
        return bernoulli_nll_forward(out, xt)
    if variance_head(model):
        return head_nll_forward(out, xt)
    return gaussian_nll_forward(out, xt, logvar_x(model))


def rec_backward(model, d_rows, out, xt):
    """d L / d out (N, D) (a variance head: (N, 2D)) for L = sum_n d_rows_n (-log p(x_n | z_n)); with a learned
    sigma it also adds d L / d logvar_x into ``model.logvar_x.grad``."""
    if model.likelihood == "bernoulli":
        return bernoulli_nll_backward(d_rows, out, xt)
    if variance_head(model):
        return head_nll_backward(d_rows, out, xt)
    dout, dlv_x = gaussian_nll_backward(d_rows, out, xt, logvar_x(model))
    if learned_sigma(model):
        model.logvar_x.grad += dlv_x
    return dout


# -- the posterior sample --------------------------------------------------------------------------
def posterior_sample(model, mu, logvar, eps, context=None):
    """z (K, B, Z) ~ q(z|x) for noise eps (K, B, Z) and the log-det sum LD (K, B) of the IAF steps (None
    without ``model.flow``): z_0 = mu + exp(logvar / 2) eps, then z = flow(z_0; h) with an IAF posterior,
    ``context`` h (B, H) the steps' context (``model.iaf_context``; row b's h for all K samples of row b)."""
    z = reparameterize_forward(mu, logvar, eps)
    flow = getattr(model, "flow", None)
    if flow is None:
        return z, None
    K, B, Z = eps.shape
    if context is not None:
        context = model.xp.broadcast_to(context, (K,) + context.shape).reshape(K * B, -1)
    z, ld = flow_forward(flow, z.reshape(K * B, Z), context)
    return z.reshape(K, B, Z), ld.reshape(K, B)


def _flow_back(model, dz, dld, eps):
    """(dz_0 (K, B, Z), dh (B, H) or None) from dz_K (K, B, Z) and dLD (K, B) through the IAF steps of
    ``model.flow``; dh = sum_k of the steps' dc (h is shared by the K samples of a row), None without context."""
    K, B, Z = eps.shape
    dz, dc = flow_backward(model.flow, dz.reshape(K * B, Z), dld.reshape(K * B))
    return dz.reshape(K, B, Z), (None if dc is None else dc.reshape(K, B, -1).sum(axis=0))


# -- the ELBO backward ------------------------------------------------------------------------------
def elbo_backward(model, d_rec, d_kl, cache):
    """Backward of  L = sum_n d_rec_n (-log p(x_n|z_n)) + sum_b d_kl_b KL(q(z|x_b) || N(0, I))  through
    decoder, reparameterization, KL and encoder (see the module docstring); accumulates into the
    model's gradients. cache = (xt, mu, logvar, eps, out) of the forward (+ z_K with an IAF posterior);
    d_rec (N,) with N = the decoder rows (K B), d_kl (B,) or None (beta = 0: no KL term).
    Two options change the KL's backward only: free bits (:func:`_kl_backward`, d_kl the 0-d weight of
    sum_j max(L, mean_b KL_bj)) and an IAF posterior (:func:`_iaf_backward`, d_kl (N,) on the Monte Carlo
    KL rows)."""
    xt, mu, logvar, eps, out = cache[:5]
    dz = model.decoder.backward(rec_backward(model, d_rec, out, xt)).reshape(eps.shape)     # (K, B, Z)
    dh = None
    if getattr(model, "flow", None) is None:
        dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
        if d_kl is not None:
            dmu_kl, dlogvar_kl = _kl_backward(model, d_kl, mu, logvar)
            dmu += dmu_kl
            dlogvar += dlogvar_kl
    else:
        dmu, dlogvar, dh = _iaf_backward(model, dz, d_kl, cache)
    encoder_backward(model.encoder, model.xp.concatenate([dmu, dlogvar], axis=1), dh)


def _kl_backward(model, d_kl, mu, logvar):
    """(dmu, dlogvar) of the closed-form KL term: d_kl (B,) (e^logvar - 1) / 2 and d_kl mu; with free bits
    (``model.free_bits`` = L > 0) of sum_j max(L, mean_b KL_bj), d_kl 0-d, no gradient for a dimension under L."""
    free_bits = getattr(model, "free_bits", 0.0)
    if free_bits:
        return kl_free_bits_backward(d_kl, mu, logvar, free_bits)
    return kl_std_normal_backward(d_kl, mu, logvar)


def _iaf_backward(model, dz, d_kl, cache):
    """(dmu, dlogvar, dh) with an IAF posterior, from dz = dL/dz_K (K, B, Z) and d_kl (N,) or None on the Monte
    Carlo KL_n = 0.5 sum_j (z_K^2 - eps^2 - logvar) - LD_n (eps held fixed): dz_K += d_kl z_K, back through
    the steps with dLD = -d_kl, the reparameterization backward, then dlogvar -= 0.5 sum_k d_kl. dh (B, H):
    the context's gradient, sum over the steps and the K samples of dc (None without ``model.iaf_context``)."""
    logvar, eps, z_K = cache[2], cache[3], cache[5]
    if d_kl is None:
        dz, dh = _flow_back(model, dz, model.xp.zeros(eps.shape[:2], dz.dtype), eps)
        return (*reparameterize_backward(dz, logvar, eps), dh)
    d_kl = d_kl.reshape(eps.shape[:2])
    dz, dh = _flow_back(model, dz + d_kl[:, :, None] * z_K, -d_kl, eps)
    dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
    dlogvar -= 0.5 * d_kl.sum(axis=0)[:, None]
    return dmu, dlogvar, dh


# -- IWAE ----------------------------------------------------------------------------------------------
def log_weights(model, x, mu, logvar, eps, decode, observed=None, context=None):
    """log w (K, B) = log p(x|z) + log N(z; 0, I) - log q(z|x) = -nll - 0.5 sum_j (z^2 - eps^2 - logvar)
    for z = reparameterize(mu, logvar, eps), x (B, D), mu/logvar (B, Z), eps (K, B, Z); with an IAF
    posterior z = z_K = flow(z_0) and log q has the steps' log-dets: log w = ... + LD (:func:`posterior_sample`;
    ``context`` h (B, H): the steps' context when they take one);
    ``decode(z (K B, Z)) -> out (K B, D)`` runs the decoder. Returns (logw, (z, out, xt)).

    ``observed`` (B, D) bool: the likelihood of those pixels only, log p(x_o|z). The rows are the same
    likelihood rows with the other pixels set to out = x = 0, where each contributes a constant
    (log 2 Bernoulli, (logvar_x + log 2 pi)/2 Gaussian) that does not depend on z: the same for all
    K samples of a row, so it cancels in the normalized weights softmax_k log w (not in log w itself)."""
    xp, B, Z, K = model.xp, x.shape[0], mu.shape[1], eps.shape[0]
    z, ld = posterior_sample(model, mu, logvar, eps, context)                       # (K, B, Z)
    out = decode(z.reshape(K * B, Z))
    xt = xp.broadcast_to(x, (K,) + x.shape).reshape(K * B, -1)
    if observed is None:
        nll = rec_rows(model, out, xt)
    else:
        keep = xp.broadcast_to(observed, (K,) + x.shape).reshape(K * B, -1)
        keep_out = keep if out.shape == keep.shape else xp.concatenate([keep, keep], axis=1)   # [mean | raw]
        nll = rec_rows(model, xp.where(keep_out, out, 0), xp.where(keep, xt, 0))
    logw = -nll.reshape(K, B) - 0.5 * (z * z - eps * eps - logvar).sum(axis=2)
    if ld is not None:
        logw = logw + ld
    return logw, (z, out, xt)


def iwae_forward(model, x, h, eps, decode, context=None):
    """IWAE bound per row from the encoder output h = [mu | logvar] (B, 2Z) and noise eps (K, B, Z);
    ``decode(z (K B, Z)) -> out (K B, D)`` runs the decoder; ``context`` (B, H): the IAF steps' context
    (``model.iaf_context``). Returns (iwae (B,), cache)."""
    Z, K = h.shape[1] // 2, eps.shape[0]
    mu, logvar = h[:, :Z], h[:, Z:]
    logw, (z, out, xt) = log_weights(model, x, mu, logvar, eps, decode, context=context)
    lse = logsumexp_forward(logw, axis=0)
    return lse - math.log(K), (xt, mu, logvar, eps, out, z, logw, lse)


def iwae_estimate(model, x, mu, logvar, k, rng, chunk, decode, noise=None, context=None):
    """log p(x) ~= logsumexp_k log w_k - log k per row (B,), float64, for z_k ~ q(z|x) = N(mu, e^logvar):
    the k samples in blocks of at most ``chunk`` decoder rows; ``decode(z (c B, Z), c)`` -> out (c B, D)
    (c samples of the batch, sample-major). The log-weights are reduced in float64. ``noise(model,
    shape, rng)`` draws each block (default :func:`draw`); ``context`` (B, H): the IAF steps' context."""
    draw_block = draw if noise is None else noise
    xp, B, Z = model.xp, x.shape[0], mu.shape[1]
    rng = generator(model, rng)                                         # one stream for all blocks
    logw = xp.empty((k, B), dtype=np.float64)
    per = max(1, chunk // B)
    for s in range(0, k, per):
        c = min(per, k - s)
        eps = draw_block(model, (c, B, Z), rng)
        logw[s:s + c] = log_weights(model, x, mu, logvar, eps, lambda z, c=c: decode(z, c), context=context)[0]
    m = logw.max(axis=0)
    return m + xp.log(xp.exp(logw - m).sum(axis=0)) - math.log(k)


def iwae_backward(model, d_neg_iwae, cache):
    """Backward of L = sum_b d_neg_iwae_b (-iwae_b) through the normalized importance weights,
    decoder, reparameterization and encoder; accumulates into the model's gradients."""
    xt, mu, logvar, eps, out, z, logw, lse = cache
    K, B, Z = eps.shape
    dlogw = logsumexp_backward(-d_neg_iwae, logw, lse, axis=0)                     # (K, B) = -d a_kb
    d_nll = -dlogw.reshape(K * B)                                                   # d L / d nll rows
    dz = model.decoder.backward(rec_backward(model, d_nll, out, xt)).reshape(K, B, Z) - dlogw[:, :, None] * z
    dh = None
    if getattr(model, "flow", None) is not None:
        dz, dh = _flow_back(model, dz, dlogw, eps)                                  # dLD = d L / d log w
    dmu, dlogvar = reparameterize_backward(dz, logvar, eps)
    dlogvar += 0.5 * dlogw.sum(axis=0)[:, None]
    encoder_backward(model.encoder, model.xp.concatenate([dmu, dlogvar], axis=1), dh)


class ELBOMixin:
    """What VAE and CVAE share: the decoder likelihood p(x|z) and the training noise (the backward is
    :func:`elbo_backward`)."""

    @property
    def learned_sigma(self):
        return learned_sigma(self)

    def _logvar_x(self):
        return logvar_x(self)

    def _rec_rows(self, out, xt):
        """-log p(x|z) per decoder row (summed over pixels)."""
        return rec_rows(self, out, xt)

    def training_noise(self, rng, k, B):
        """Noise of one training step, (k, B, z_dim), drawn in float32 from the run's host Generator
        ``rng`` and moved to the model's backend and dtype: every backend and both dtypes see the same
        numbers, and a resumed run continues the same stream."""
        return backend.to_device(rng.standard_normal((k, B, self.z_dim), dtype=np.float32), self.dtype)

    def _eps(self, eps, B, rng, check=True):
        """Training noise (K, B, z_dim): ``eps`` checked ((S, B, z_dim) or (B, z_dim)), or n_samples draws
        from ``rng`` (default: the model's own generator) when None."""
        if eps is None:
            return draw(self, (self.n_samples, B, self.z_dim), rng)
        if getattr(eps, "ndim", None) == 2:
            eps = eps[None]
        if getattr(eps, "ndim", None) != 3 or eps.shape[0] < 1 or eps.shape[1:] != (B, self.z_dim):
            raise ValueError(f"eps must have shape (samples, batch, z_dim) = (S, {B}, {self.z_dim}) with S >= 1 "
                             f"(or ({B}, {self.z_dim})), got {tuple(getattr(eps, 'shape', ()))}")
        return as_noise(self, eps, eps.shape, finite=check)

    def _elbo_grad(self, cache):
        """The batch-mean ELBO loss's backward: d_rec = 1/(K B) per decoder row, d_kl = beta/B per row
        (free bits: beta on the batch's free-bits KL; IAF posterior: beta/(K B) per Monte Carlo KL row)."""
        xp, B, K = self.xp, cache[1].shape[0], cache[3].shape[0]
        d_rec = xp.full(K * B, 1.0 / (K * B), dtype=self.dtype)
        if not self.beta:
            d_kl = None
        elif getattr(self, "flow", None) is not None:
            d_kl = xp.full(K * B, self.beta / (K * B), dtype=self.dtype)
        elif getattr(self, "free_bits", 0.0):
            d_kl = xp.asarray(self.beta, dtype=self.dtype)
        else:
            d_kl = xp.full(B, self.beta / B, dtype=self.dtype)
        elbo_backward(self, d_rec, d_kl, cache)
