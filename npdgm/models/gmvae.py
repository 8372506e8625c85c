"""A VAE with a Gaussian-mixture prior (GMVAE; the generative model of VaDE, Jiang et al. 2017), backward by hand.

Model
    p(c)     = pi_c = softmax(prior_logits)_c       c in 1..C (weights="uniform": pi_c = 1/C, no parameter)
    p(z|c)   = N(z; m_c, diag exp(s_c))             prior_mean (C, Z), prior_logvar (C, Z), learned
    p(z)     = sum_c pi_c N(z; m_c, diag exp(s_c))  the mixture prior
    p(x|z)   = Bernoulli(sigmoid(f(z)))             decoder MLP, as the VAE's
    q(z|x)   = N(mu(x), diag exp(v(x)))             encoder MLP, as the VAE's ([mu | v] in one head)

The KL(q(z|x) || p(z)) to a mixture has no closed form; the loss uses the one-sample Monte Carlo estimate at
the reparameterized z = mu + exp(v/2) eps (exact in expectation, so the loss is the -ELBO):

    log q(z|x) = -1/2 sum_j (eps_j^2 + v_j + log 2 pi)
    a_c        = log pi_c - nll_c,  nll_c = -log N(z; m_c, e^s_c) = gaussian_nll(m_c, z, s_c)
    log p(z)   = logsumexp_c a_c
    kl         = mean_kb [log q(z_kb|x_b) - log p(z_kb)]
    loss       = recon + beta * kl                    nats per image, as the VAE's

Backward, with d = beta / (K B) per sample row and the responsibilities r_c = p(c|z) = softmax_c a_c:

    da_c      = -d r_c                                      (logsumexp backward of -d lse)
    dm_c      = sum_n -da_nc (m_c - z_n) e^-s_c             (gaussian_nll backward, mean part, with dnll = -da)
    ds_c      = sum_n -da_nc (1 - (z_n - m_c)^2 e^-s_c) / 2
    dz       += sum_c da_nc (m_c - z_n) e^-s_c = d sum_c r_c (z - m_c) e^-s_c      (= -dm per row: r = z - m)
    dlogits   = log_softmax backward of sum_n da_n = -sum_n d r_n + pi sum_n d
    dmu, dv   = reparameterize backward(dz);  dv -= d / 2 summed over samples       (log q: eps held fixed)

The clusters: component(x) = argmax_c r_c(mu(x)), the mixture component that most probably generated the
posterior mean (VaDE's closed-form q(c|x) evaluated at z = mu(x)). :func:`npdgm.cluster.cluster_accuracy`
scores it against labels. ``npdgm train gmvae`` trains it on MNIST (docs/gmvae.md).
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..kernels import (gaussian_nll_backward, gaussian_nll_forward, logsumexp_backward, logsumexp_forward,
                       reparameterize_backward, reparameterize_forward, sigmoid_forward)
from ..kernels.categorical import log_softmax_backward, log_softmax_forward
from ..nn import INITS, MLP, Parameter
from ..validate import check_float, check_int
from .base import Model
from .elbo import ELBOMixin, draw, generator, rec_backward
from .registry import register_model
from .vae import _check_x

__all__ = ["GMVAE", "WEIGHTS"]

WEIGHTS = ("uniform", "learned")
LOG_2PI = math.log(2 * math.pi)


@register_model
class GMVAE(ELBOMixin, Model):
    """VAE with a learned Gaussian-mixture prior over z (module docstring).

    Parameters: x_dim, hidden (encoder sizes; the decoder uses them reversed), z_dim, components (C),
    activation, weights ("uniform": pi = 1/C fixed; "learned": pi = softmax(prior_logits)), prior_scale (the
    std of the initial component means m_c ~ N(0, prior_scale^2 I)), n_samples, beta, seed, init.
    Parameter names: encoder.*, decoder.* (as the VAE's), prior_mean (C, Z), prior_logvar (C, Z) and, learned
    weights only, prior_logits (C,)."""

    kind = "gmvae"
    likelihood = "bernoulli"
    sigma = None
    flow = None

    def __init__(self, x_dim=784, hidden=(400,), z_dim=10, components=10, activation="relu", weights="uniform",
                 prior_scale=1.0, n_samples=1, beta=1.0, seed=0, init="torch"):
        x_dim, z_dim = check_int(x_dim, "x_dim", lo=1), check_int(z_dim, "z_dim", lo=1)
        components = check_int(components, "components", lo=1)
        if isinstance(hidden, (int, np.integer)):
            hidden = (hidden,)
        hidden = [check_int(h, "hidden size", lo=1) for h in hidden]
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        prior_scale = check_float(prior_scale, "prior_scale", lo=0)
        n_samples, beta = check_int(n_samples, "n_samples", lo=1), check_float(beta, "beta", lo=0)
        seed = check_int(seed, "seed", lo=0)
        super().__init__(x_dim=x_dim, hidden=hidden, z_dim=z_dim, components=components, activation=activation,
                         weights=weights, prior_scale=float(prior_scale), n_samples=n_samples, beta=float(beta),
                         seed=seed, init=init)
        self.x_dim, self.z_dim, self.components, self.hidden = x_dim, z_dim, components, hidden
        self.weights, self.n_samples, self.beta = weights, n_samples, float(beta)
        dtype, host = backend.get_dtype(), np.random.default_rng(seed)
        self.encoder = MLP(x_dim, hidden, 2 * z_dim, activation=activation, init=init, rng=host, dtype=dtype)
        self.decoder = MLP(z_dim, hidden[::-1], x_dim, activation=activation, init=init, rng=host, dtype=dtype)
        self.prior_mean = Parameter(backend.to_device(prior_scale * host.standard_normal((components, z_dim)), dtype))
        self.prior_logvar = Parameter(backend.to_device(np.zeros((components, z_dim)), dtype))
        if weights == "learned":
            self.prior_logits = Parameter(backend.to_device(np.zeros(components), dtype))
        object.__setattr__(self, "_noise", backend.rng(seed))
        self.flatten()

    def check_x(self, x, name="x"):
        """x as a model-dtype (B, x_dim) array in [0, 1] (ValueError naming ``name`` otherwise)."""
        return _check_x(self, x, name)

    # -- the mixture prior -------------------------------------------------------------------------------
    def log_weights_prior(self):
        """log pi (C,): log_softmax(prior_logits), or -log C for uniform weights."""
        if self.weights == "learned":
            return log_softmax_forward(self.prior_logits.data[None])[0]
        return self.xp.full(self.components, -math.log(self.components), dtype=self.dtype)

    def _component_terms(self, z):
        """a (N, C) = log pi_c - gaussian_nll(m_c, z_n, s_c) for z (N, Z), and the tiled inputs of the NLL."""
        N, C, Z = z.shape[0], self.components, self.z_dim
        xp = self.xp
        M = xp.broadcast_to(self.prior_mean.data[None], (N, C, Z)).reshape(N * C, Z)
        S = xp.broadcast_to(self.prior_logvar.data[None], (N, C, Z)).reshape(N * C, Z)
        zt = xp.broadcast_to(z[:, None], (N, C, Z)).reshape(N * C, Z)
        a = self.log_weights_prior()[None] - gaussian_nll_forward(M, zt, S).reshape(N, C)
        return a, (M, zt, S)

    def log_prior(self, z):
        """log p(z) = logsumexp_c [log pi_c + log N(z; m_c, e^s_c)] per row of z (N, Z)."""
        return logsumexp_forward(self._component_terms(z)[0], axis=1)

    def responsibilities(self, z):
        """p(c|z) (N, C) = softmax_c [log pi_c + log N(z; m_c, e^s_c)]."""
        a = self._component_terms(z)[0]
        return self.xp.exp(a - logsumexp_forward(a, axis=1)[:, None])

    def _prior_backward(self, d, z):
        """Backward of L = sum_n d_n (-log p(z_n)) (module docstring): adds into the prior's grads, returns dz."""
        N, C, Z = z.shape[0], self.components, self.z_dim
        a, (M, zt, S) = self._component_terms(z)
        da = logsumexp_backward(-d, a, logsumexp_forward(a, axis=1), axis=1)        # (N, C) = -d r
        dM, dS = gaussian_nll_backward(-da.reshape(N * C), M, zt, S)                   # dnll = -da
        dM = dM.reshape(N, C, Z)
        self.prior_mean.grad += dM.sum(axis=0)
        self.prior_logvar.grad += dS.reshape(N, C, Z).sum(axis=0)
        if self.weights == "learned":
            self.prior_logits.grad += log_softmax_backward(da.sum(axis=0)[None],
                                                           log_softmax_forward(self.prior_logits.data[None]))[0]
        return -dM.sum(axis=1)                                                          # d/dz = -d/dm (r = z - m)

    # -- the loss and its gradient ----------------------------------------------------------------------
    def _forward(self, x, eps):
        B, Z, K = x.shape[0], self.z_dim, eps.shape[0]
        h = self.encoder.forward(x)
        mu, logvar = h[:, :Z], h[:, Z:]
        z = reparameterize_forward(mu, logvar, eps).reshape(K * B, Z)
        out = self.decoder.forward(z)
        xt = x if K == 1 else self.xp.broadcast_to(x, (K,) + x.shape).reshape(K * B, -1)
        recon = self._rec_rows(out, xt).mean()
        log_q = -0.5 * (eps * eps + logvar + LOG_2PI).sum(axis=2).reshape(K * B)
        kl = (log_q - self.log_prior(z)).mean()
        loss = recon + self.beta * kl
        return loss, {"loss": loss, "recon": recon, "kl": kl, "nelbo": recon + kl}, (xt, mu, logvar, eps, out, z)

    def loss(self, x, eps=None, rng=None):
        """Forward only: ``(loss, terms)`` as :meth:`loss_and_grad`."""
        x = self.check_x(x)
        loss, terms, _ = self._forward(x, self._eps(eps, x.shape[0], rng))
        return loss, terms

    def loss_and_grad(self, x, eps=None, rng=None, *, zero_grad=True, check=True):
        """The batch-mean -ELBO with the mixture prior (one-sample Monte Carlo KL) and its gradient into ``grads``.
        x (B, x_dim) in [0, 1]; eps (K, B, z_dim) or None (n_samples draws from ``rng``). Returns ``(loss, terms)``,
        terms {"loss", "recon", "kl", "nelbo"} in nats per image."""
        if check:
            x = self.check_x(x)
        eps = self._eps(eps, x.shape[0], rng, check)
        loss, terms, (xt, mu, logvar, eps, out, z) = self._forward(x, eps)
        if zero_grad:
            self.zero_grad()
        xp, K, B = self.xp, eps.shape[0], x.shape[0]
        dz = self.decoder.backward(rec_backward(self, xp.full(K * B, 1.0 / (K * B), dtype=self.dtype), out, xt))
        if self.beta:
            d = xp.full(K * B, self.beta / (K * B), dtype=self.dtype)
            dz = dz + self._prior_backward(d, z)
        dmu, dlogvar = reparameterize_backward(dz.reshape(eps.shape), logvar, eps)
        if self.beta:
            dlogvar = dlogvar - 0.5 * self.beta / B
        self.encoder.backward(xp.concatenate([dmu, dlogvar], axis=1), need_dx=False)
        return loss, terms

    def train_step(self, x, rng, shard=slice(None)):
        """One step's gradient, added into ``grads``: n_samples noise draws for the whole batch from the run's
        ``rng``, then the rows ``shard``. Returns the step's terms."""
        eps = self.training_noise(rng, self.n_samples, x.shape[0])[:, shard]
        _, t = self.loss_and_grad(x[shard], eps, check=False, zero_grad=False)
        return t

    # -- using it ----------------------------------------------------------------------------------------
    def encode(self, x):
        """(mu, logvar) of q(z|x), each (B, z_dim)."""
        h = self.encoder.forward(self.check_x(x))
        return h[:, :self.z_dim].copy(), h[:, self.z_dim:].copy()

    def predict(self, x):
        """The component of each image: argmax_c p(c | z = mu(x)), (B,) integers (host array)."""
        return np.asarray(backend.to_host(self.responsibilities(self.encode(x)[0]).argmax(axis=1)))

    def decode(self, z):
        """E[x|z] = sigmoid(f(z)), (n, x_dim)."""
        return sigmoid_forward(self.decoder.forward(self.check_z(z)))

    def reconstruct(self, x):
        """E[x | z = mu(x)]."""
        return self.decode(self.encode(x)[0])

    def sample(self, n, rng=None, mean=True, component=None):
        """n images: c ~ pi (or the given ``component``), z ~ N(m_c, e^s_c), then E[x|z] (``mean``) or a
        Bernoulli draw. Returns (n, x_dim)."""
        n = check_int(n, "n", lo=1)
        rng = generator(self, rng)
        if component is None:
            pi = np.exp(np.asarray(backend.to_host(self.log_weights_prior()), dtype=np.float64))
            u = np.asarray(backend.to_host(rng.random(n)), dtype=np.float64)
            c = np.minimum(np.searchsorted(np.cumsum(pi), u * pi.sum()), self.components - 1)
        else:
            c = np.full(n, check_int(component, "component", lo=0, hi=self.components - 1))
        c = backend.to_device(c)
        z = self.prior_mean.data[c] + self.xp.exp(0.5 * self.prior_logvar.data[c]) * draw(self, (n, self.z_dim), rng)
        m = self.decode(z)
        if mean:
            return m
        return (self.xp.asarray(rng.random(m.shape, dtype=np.float32)) < m).astype(self.dtype)

    def log_likelihood(self, x, k=100, rng=None):
        """Importance-weighted estimate of log p(x) per row (B,), float64: logsumexp_i log w_i - log k,
        log w_i = log p(x|z_i) + log p(z_i) - log q(z_i|x), z_i ~ q(z|x) (Burda et al. 2016)."""
        x = self.check_x(x)
        k = check_int(k, "k", lo=1)
        mu, logvar = self.encode(x)
        B, Z, xp = x.shape[0], self.z_dim, self.xp
        eps = draw(self, (k, B, Z), generator(self, rng))
        z = reparameterize_forward(mu, logvar, eps).reshape(k * B, Z)
        xt = xp.broadcast_to(x, (k,) + x.shape).reshape(k * B, -1)
        log_q = -0.5 * (eps * eps + logvar + LOG_2PI).sum(axis=2).reshape(k * B)
        logw = (self.log_prior(z) - log_q - self._rec_rows(self.decoder.forward(z), xt)).astype(np.float64)
        return logsumexp_forward(logw.reshape(k, B), axis=0) - math.log(k)
