"""Inference beyond the ELBO: naive Monte Carlo log p(x), HMC / MALA / Langevin on p(z|x), AIS and BDMC.

Everything here needs one thing from a model: a target ``f(z) -> (log density, d/dz log density)``.
For a VAE that is :meth:`npdgm.models.vae.VAE.log_joint_and_grad_z` (the decoder's hand-written backward
to its input plus the prior's -z); :func:`posterior_target` wraps it. The samplers take any such target
(tests use a Gaussian with a known mean and covariance). Derivations: docs/inference.md.

Shapes: a state z is (C, B, Z) -- C chains for each of B images (or any leading shape), the target
returns logp of shape z.shape[:-1] (float64) and a gradient of z's shape. Step sizes have the shape of
logp (or broadcast to it) and are adapted per chain/image during warm-up.

    naive_log_px(model, x, k)       log p(x) ~= logmeanexp_i log p(x|z_i), z_i ~ p(z) shared by the rows (+ s.e.)
    hmc(target, z0, n, warmup)      leapfrog HMC, step size adapted toward an acceptance rate, ESS
    langevin(target, z0, n, ...)    MALA (adjust=True) or the unadjusted Langevin algorithm
    ais(model, x, steps, chains)    annealed importance sampling p(z) -> p(z|x): a stochastic lower bound
    bdmc(model, n, steps, chains)   simulated data: AIS lower bound and reverse-AIS upper bound
    mcem_fit(model, x, epochs, ...) Monte-Carlo EM: the decoder trained on HMC samples of p(z|x) in place of q
"""
from __future__ import annotations

import math

import numpy as np

from . import backend
from .kernels.losses import bernoulli_nll_backward, bernoulli_nll_forward
from .models.elbo import rec_backward, rec_rows
from .validate import as_rng, check_float, check_int

__all__ = ["logmeanexp", "posterior_target", "impute_hmc", "naive_log_px", "leapfrog", "hmc_step", "mala_step", "hmc",
           "langevin", "elbo_estimate", "naive_curve", "effective_sample_size", "schedule", "ais_chains", "ais", "bdmc",
           "mcem_decoder_loss_and_grad", "mcem_fit"]

LOG_2PI = math.log(2 * math.pi)


def logmeanexp(a, axis=0):
    """log mean_i exp(a_i) along ``axis``, stably (float64)."""
    xp = backend.array_module(a)
    a = a.astype(np.float64)
    m = a.max(axis=axis, keepdims=True)
    m = xp.where(xp.isfinite(m), m, 0.0)
    return (m + xp.log(xp.exp(a - m).mean(axis=axis, keepdims=True))).squeeze(axis)


def _lme_se(a, axis=0):
    """(logmeanexp a, its delta-method standard error std(w) / (sqrt(n) mean(w)), w = exp(a))."""
    xp = backend.array_module(a)
    n = a.shape[axis]
    w = xp.exp(a - a.max(axis=axis, keepdims=True))
    return logmeanexp(a, axis), w.std(axis=axis) / (math.sqrt(n) * w.mean(axis=axis))


def _rng(model, rng):
    """The model's own generator (rng None), a Generator as given, or a fresh one from an int seed."""
    if rng is None:
        return model._noise
    return rng if hasattr(rng, "standard_normal") else as_rng(rng)


def _normal(like, rng):
    xp = backend.array_module(like)
    dt = np.float32 if like.dtype == np.float32 else np.float64
    return xp.asarray(rng.standard_normal(like.shape, dtype=dt)).astype(like.dtype, copy=False)


def _uniform(shape, rng, xp):
    return xp.asarray(rng.random(shape))


# -- targets ---------------------------------------------------------------------------------------------
def posterior_target(model, x, observed=None):
    """f(z) = (log p(x, z), d/dz log p(x, z)) for z (C, B, Z): the unnormalized posterior p(z|x) of a VAE
    (``observed`` (B, D) bool: p(z | x_observed), the likelihood of those pixels only)."""
    x = model.check_x(x)
    return lambda z: model.log_joint_and_grad_z(x, z, check=False, observed=observed)


def impute_hmc(model, x, mask, chains=8, n=50, warmup=50, leapfrog=10, rng=0):
    """E[x_missing | x_observed] = E_{p(z | x_o)} E[x_m | z] by HMC on p(z | x_o) (``mask`` True = missing):
    ``chains`` chains per image from the encoder mean of x with the missing pixels zeroed, ``warmup``
    adapting transitions, then the decoder mean averaged over the n x chains kept draws. Exact in the
    limit, where :meth:`VAE.conditional_mean` importance-samples from q(z | x~) instead.
    Returns (imputed (B, D) with the observed pixels unchanged, the :func:`hmc` result)."""
    xp = model.xp
    mask, x_obs = model._prep_mask(x, mask)
    mu = model.encode(x_obs)[0]
    z0 = xp.broadcast_to(mu, (check_int(chains, "chains", lo=1),) + mu.shape).copy()
    out = hmc(posterior_target(model, x_obs, ~mask), z0, n, warmup, 0.05, leapfrog, rng=rng)
    acc = xp.zeros(x_obs.shape, dtype=np.float64)
    for zs in out["samples"]:
        zs = backend.to_device(zs, model.dtype)
        acc += model.decode(zs.reshape(-1, model.z_dim)).reshape((chains,) + x_obs.shape).astype(np.float64).sum(0)
    est = (acc / (n * chains)).astype(model.dtype)
    return xp.where(mask, est, x_obs), out


def _loglik(model, x):
    """f(z) = (log p(x|z), d/dz log p(x|z)) for z (C, B, Z), with ``f.grad(z)``: the gradient alone (what the
    inner leapfrog steps need). Bernoulli decoders take :func:`_bernoulli_loglik`; a Gaussian decoder
    uses log p(x, z) - log N(z; 0, I) and its gradient + z."""
    if model.likelihood == "bernoulli":
        return _bernoulli_loglik(model, x)

    def f(z):
        lj, g = model.log_joint_and_grad_z(x, z, check=False)
        return lj - _log_prior(z), g + z
    f.grad = lambda z: f(z)[1]
    return f


def _bernoulli_loglik(model, x):
    """The AIS / BDMC target for a Bernoulli decoder, l = decoder(z) (C, B, D), x (B, D) in [0, 1], through
    the loss kernels (:func:`npdgm.kernels.losses.bernoulli_nll_forward` / ``_backward``):

        log p(x|z) = -sum_d softplus(l_d) - x_d l_d
        d/dz log p(x|z) = -J^T (sigmoid(l) - x)          (the decoder's backward to its input)

    ``f.grad(z)`` (inner leapfrog steps) skips the NLL. The rows are the C B (chain, image) pairs, x
    repeated over the chains; the NLL sums in the model dtype, the result float64 (the per-pixel terms are
    all >= 0, so the sum does not cancel)."""
    xp, Z = model.xp, model.z_dim

    def logits_and_x(z):
        zz = xp.asarray(z).astype(model.dtype, copy=False).reshape(-1, Z)
        logits = model.decoder.forward(zz)                                     # (C B, D)
        return logits, xp.broadcast_to(x, z.shape[:-1] + x.shape[-1:]).reshape(logits.shape)

    def grad_z(logits, xx, z):
        dl = bernoulli_nll_backward(xp.ones(logits.shape[0], dtype=logits.dtype), logits, xx)  # sigmoid(l) - x
        return -model.decoder.input_vjp(dl).reshape(z.shape)

    def grad(z):
        logits, xx = logits_and_x(z)
        return grad_z(logits, xx, z)

    def f(z):
        logits, xx = logits_and_x(z)
        nll = bernoulli_nll_forward(logits, xx).reshape(z.shape[:-1])
        return -nll.astype(np.float64), grad_z(logits, xx, z)

    f.grad = grad
    return f


def _log_prior(z):
    """log N(z; 0, I) per row (float64)."""
    z = z.astype(np.float64)
    return -0.5 * (z * z).sum(axis=-1) - 0.5 * LOG_2PI * z.shape[-1]


# -- naive Monte Carlo -----------------------------------------------------------------------------------
def naive_log_px(model, x, k, rng=None, chunk=4096, counts=()):
    """The naive estimate  log p(x) ~= log (1/k) sum_i p(x|z_i),  z_i ~ p(z) = N(0, I)  per row, with its
    delta-method standard error std_i(w_i) / (sqrt(k) mean_i(w_i)), w_i = p(x|z_i).

    Unbiased for p(x), so E[estimate] <= log p(x) (Jensen); in high dimension almost every prior draw
    misses the posterior and the estimate stays far below until k is astronomically large.
    The k prior draws are shared by all rows of x: each draw is one decoder pass, and log p(x_b|z_i) for
    every (b, i) is one matrix product (:func:`_loglik_table`), so 10^5 draws for 1000 images cost 10^5
    decoder rows, not 10^8. Each row's estimate is the same as with its own draws; the rows' estimates
    are correlated. Blocks of at most ``chunk`` draws (fewer when B chunk > 2^22, the (B, draws) table's
    bound), running float64 sums with a running maximum.
    Returns {"est": (B,), "se": (B,), "curve": {n: (est, se)} for each n in ``counts`` (<= k)}."""
    x = model.check_x(x)
    k, chunk = check_int(k, "k", lo=1), check_int(chunk, "chunk", lo=1)
    xp, B, Z = model.xp, x.shape[0], model.z_dim
    rng = _rng(model, rng)
    stops = sorted({int(n) for n in counts if 0 < int(n) < k} | {k})
    m, s1, s2, done, curve = xp.full(B, -np.inf), xp.zeros(B), xp.zeros(B), 0, {}
    x64 = x.astype(np.float64)
    for stop in stops:
        while done < stop:
            c = min(chunk, max(1, (1 << 22) // B), stop - done)
            z = _normal(xp.empty((c, Z), dtype=model.dtype), rng)
            lw = _loglik_table(model, x64, model.decoder.forward(z))          # (B, c)
            m_new = xp.maximum(m, lw.max(axis=1))
            sc, w = xp.exp(m - m_new), xp.exp(lw - m_new[:, None])
            s1, s2, m, done = s1 * sc + w.sum(1), s2 * sc * sc + (w * w).sum(1), m_new, done + c
        mean = s1 / done
        se = xp.sqrt(xp.maximum(s2 / done - mean * mean, 0) / done) / mean
        curve[stop] = (m + xp.log(mean), se)
    est, se = curve[k]
    return {"est": est, "se": se, "curve": {n: v for n, v in curve.items() if n in set(map(int, counts))}}


def _loglik_table(model, x64, out):
    """log p(x_b | z_i) for every image b (x64 (B, D) float64) and decoder output out_i (N, D): (B, N)
    float64, one matrix product, since both likelihoods are linear in x given the output:

        Bernoulli  sum_d x_d l_d - softplus(l_d)                     = x . l - sum_d softplus(l_d)
        Gaussian   -1/2 sum_d (x_d - m_d)^2 e^-v_d + v_d + log 2 pi  = x . (m e^-v) - 1/2 (m^2 + x^2) . e^-v - ...

    In float64: x . l and sum softplus(l) are each thousands of nats and cancel to the hundreds."""
    from .models.elbo import logvar_x

    xp = model.xp
    o = out.astype(np.float64)
    if model.likelihood == "bernoulli":
        sp = xp.maximum(o, 0) + xp.log1p(xp.exp(-xp.abs(o)))
        return x64 @ o.T - sp.sum(1)
    lv = xp.broadcast_to(xp.asarray(logvar_x(model), dtype=np.float64), o.shape[1:])
    iv = xp.exp(-lv)
    const = -0.5 * float((lv + LOG_2PI).sum())
    return x64 @ (o * iv).T - 0.5 * ((o * o) @ iv)[None, :] - 0.5 * ((x64 * x64) @ iv)[:, None] + const


def elbo_estimate(model, x, k, rng=None, chunk=1 << 15):
    """The ELBO per row averaged over k draws z_i ~ q(z|x): (1/k) sum_i log w_i, log w_i = log p(x, z_i) -
    log q(z_i|x) (the same log-weights as IWAE, averaged instead of log-mean-exp'd), float64 (B,)."""
    from .models.elbo import log_weights

    x = model.check_x(x)
    k, chunk = check_int(k, "k", lo=1), check_int(chunk, "chunk", lo=1)
    rng = _rng(model, rng)
    mu, logvar, ctx = model.encode_posterior(x) if hasattr(model, "encode_posterior") else (*model.encode(x), None)
    tot, per = model.xp.zeros(x.shape[0]), max(1, chunk // x.shape[0])
    for s in range(0, k, per):
        eps = _normal(model.xp.empty((min(per, k - s),) + mu.shape, dtype=model.dtype), rng)
        tot += log_weights(model, x, mu, logvar, eps, model.decoder.forward, context=ctx)[0].astype(np.float64).sum(0)
    return tot / k


def naive_curve(model, x, counts, repeats=5, rng=None, chunk=4096, iwae_max=None):
    """The naive estimate's bias and spread against the sample count, beside IWAE with as many samples:
    ``repeats`` independent runs of :func:`naive_log_px` (estimates read off at each n in ``counts``) and
    of the IWAE estimate ``model.log_likelihood(x, k=n)`` for the n <= ``iwae_max`` (default: all; IWAE
    costs n decoder rows per image where naive MC's draws are shared, so 10^5 is cheap for one and not
    the other). Returns {"counts": (n,), "naive": (repeats, n), "iwae": (repeats, n), NaN above
    iwae_max} host float64 arrays of the mean over the images of x, nats per image."""
    counts = sorted({check_int(n, "count", lo=1) for n in counts})
    repeats = check_int(repeats, "repeats", lo=1)
    rng = _rng(model, rng)
    naive, iwae = np.empty((repeats, len(counts))), np.full((repeats, len(counts)), np.nan)
    for r in range(repeats):
        curve = naive_log_px(model, x, counts[-1], rng, chunk, counts)["curve"]
        for j, n in enumerate(counts):
            naive[r, j] = float(curve[n][0].mean())
            if iwae_max is None or n <= iwae_max:
                iwae[r, j] = float(model.log_likelihood(x, k=n, rng=rng, chunk=1 << 15).mean())
    return {"counts": np.asarray(counts), "naive": naive, "iwae": iwae, "z_dim": model.z_dim}


# -- HMC and Langevin ---------------------------------------------------------------------------------------
def _pick(accept, new, old):
    """new where ``accept`` (shape logp) else old, for arrays of logp's or z's shape."""
    xp = backend.array_module(old)
    a = accept if new.ndim == accept.ndim else accept[..., None]
    return xp.where(a, new, old)


def leapfrog(target, z, grad, p, eps, L):
    """L leapfrog steps of size eps (broadcast to z) for H(z, p) = -log f(z) + |p|^2 / 2:
        p += eps/2 grad;  (z += eps p;  p += eps grad) x L, the last momentum update a half step.
    Returns (z, out, p) with out = target(z) (logp, grad, *extra) at the end point. The inner points need
    only the gradient: a target with a ``.grad`` attribute (z -> gradient) is called through it there.
    Volume preserving and time reversible, so the Metropolis test needs only the change of H."""
    gradf = getattr(target, "grad", None) or (lambda zz: target(zz)[1])
    p = p + 0.5 * eps * grad
    for _ in range(L - 1):
        z = z + eps * p
        p += eps * gradf(z)
    z = z + eps * p
    out = target(z)
    p += 0.5 * eps * out[1]
    return z, out, p


def hmc_step(target, state, eps, L, rng):
    """One HMC transition. state = (z, logp, grad, *extra) as target(z) returns them (prefixed by z);
    eps has logp's shape (or broadcasts to it). Returns (new state, acceptance probability (logp's shape))."""
    z, logp = state[0], state[1]
    xp = backend.array_module(logp)
    p0 = _normal(z, rng)
    z1, out, p1 = leapfrog(target, z, state[2], p0, eps[..., None], L)
    dH = out[0] - logp - 0.5 * ((p1 * p1).sum(-1) - (p0 * p0).sum(-1)).astype(np.float64)
    dH = xp.where(xp.isnan(dH), -np.inf, dH)
    prob = xp.exp(xp.minimum(dH, 0.0))
    accept = xp.log(_uniform(logp.shape, rng, xp)) < dH
    return (_pick(accept, z1, z),) + tuple(_pick(accept, n, o) for n, o in zip(out, state[1:])), prob


def mala_step(target, state, eps, rng, adjust=True):
    """One Langevin move  z' = z + eps^2/2 grad log f(z) + eps xi,  xi ~ N(0, I); with ``adjust`` the
    Metropolis-Hastings test with q(z'|z) = N(z + eps^2/2 grad(z), eps^2 I) (MALA), else always accepted
    (the unadjusted Langevin algorithm, biased by O(eps^2)). Returns (state, acceptance probability)."""
    z, logp, grad = state[:3]
    xp = backend.array_module(logp)
    e = eps[..., None]
    z1 = z + 0.5 * e * e * grad + e * _normal(z, rng)
    out = target(z1)
    if not adjust:
        return (z1,) + tuple(out), xp.ones(logp.shape)
    fwd = z1 - z - 0.5 * e * e * grad
    bwd = z - z1 - 0.5 * e * e * out[1]
    dH = out[0] - logp + (((fwd * fwd).sum(-1) - (bwd * bwd).sum(-1)) / (2 * eps * eps)).astype(np.float64)
    dH = xp.where(xp.isnan(dH), -np.inf, dH)
    accept = xp.log(_uniform(logp.shape, rng, xp)) < dH
    return (_pick(accept, z1, z),) + tuple(_pick(accept, n, o) for n, o in zip(out, state[1:])), \
        xp.exp(xp.minimum(dH, 0.0))


def _adapt(eps, prob, target_accept, rate):
    """Robbins-Monro on log eps: larger when the acceptance is above target, smaller below."""
    xp = backend.array_module(eps)
    return eps * xp.exp(rate * (prob - target_accept)).astype(eps.dtype)


def _run(move, target, z0, n, warmup, step, target_accept, rng, adapt=True):
    """The driver of :func:`hmc` and :func:`langevin`: warm-up moves adapt the step size (rate 1/sqrt(t)),
    then n kept moves with it fixed. Returns the result dict (see :func:`hmc`)."""
    n, warmup = check_int(n, "n", lo=1), check_int(warmup, "warmup", lo=0)
    step = check_float(step, "step", lo=0, strict_lo=True)
    rng = _rng(None, rng)
    xp = backend.array_module(z0)
    state = (z0,) + tuple(target(z0))
    eps = xp.full(state[1].shape, step, dtype=z0.dtype)
    for t in range(warmup):
        state, prob = move(target, state, eps, rng)
        if adapt:
            eps = _adapt(eps, prob, target_accept, 2.0 / math.sqrt(t + 1))
    samples, acc = [], 0.0
    for _ in range(n):
        state, prob = move(target, state, eps, rng)
        samples.append(backend.to_host(state[0]))
        acc = acc + prob
    samples = np.stack(samples)
    return {"samples": samples, "accept": backend.to_host(acc / n), "step": backend.to_host(eps),
            "ess": effective_sample_size(samples), "state": state}


def hmc(target, z0, n, warmup=100, step=0.1, leapfrog=10, target_accept=0.65, rng=0):
    """Hamiltonian Monte Carlo on f = target (log density and its gradient), all chains of z0 (C, ..., Z)
    as one batch. During ``warmup`` transitions the step size of each chain moves toward
    ``target_accept``; then ``n`` transitions are kept. Returns {"samples": (n, *z0.shape) host,
    "accept": mean acceptance probability per chain, "step": the step sizes, "ess": effective sample
    size per coordinate, shape z0.shape[1:] (axis 0 of z0 is the chain axis, see
    :func:`effective_sample_size`), "state": the last (z, logp, grad)}."""
    L = check_int(leapfrog, "leapfrog", lo=1)
    return _run(lambda f, s, e, r: hmc_step(f, s, e, L, r), target, z0, n, warmup, step, target_accept, rng)


def langevin(target, z0, n, warmup=100, step=0.05, adjust=True, target_accept=0.574, rng=0):
    """MALA (``adjust=True``, step size adapted toward 0.574 in warm-up) or the unadjusted Langevin
    algorithm (``adjust=False``: no accept test, the step stays ``step``); results as :func:`hmc`."""
    return _run(lambda f, s, e, r: mala_step(f, s, e, r, adjust), target, z0, n, warmup, step, target_accept,
                rng, adapt=adjust)


def effective_sample_size(samples):
    """ESS per coordinate of ``samples`` (T, C, ...) -- T draws of C chains -- by the multi-chain
    autocorrelation of Stan / Geyer: rho_t = 1 - (W - mean_c acov_c(t)) / var+,  var+ = (T-1)/T W + B/T,
    ESS = C T / (1 + 2 sum_t rho_t) summed over the initial positive sequence of pairs rho_2k + rho_2k+1.
    Returns an array of shape samples.shape[2:] (float64; above C T for anticorrelated chains)."""
    s = np.asarray(samples, np.float64)
    T, C = s.shape[:2]
    x = s.reshape(T, C, -1)
    if T < 4:
        return np.full(s.shape[2:], float("nan"))
    mean = x.mean(0)
    f = np.fft.rfft(x - mean, n=2 * T, axis=0)
    acov = np.fft.irfft(f * np.conj(f), axis=0)[:T] / T                  # (T, C, d)
    W = acov[0].mean(0) * T / (T - 1)
    var = W * (T - 1) / T + (mean.var(0, ddof=1) if C > 1 else 0.0)
    rho = 1 - (W - acov.mean(1)) / np.maximum(var, 1e-300)                 # (T, d), rho_0 = 1
    pairs = rho[:T - T % 2].reshape(T // 2, 2, -1).sum(1)                  # (T/2, d)
    keep = np.cumprod(pairs > 0, axis=0).astype(bool)
    tau = -1 + 2 * (pairs * keep).sum(0)
    return (C * T / np.maximum(tau, 1e-12)).reshape(s.shape[2:])


# -- AIS and BDMC -------------------------------------------------------------------------------------------
def schedule(steps, kind="sigmoid", delta=4.0):
    """Inverse temperatures 0 = beta_0 < ... < beta_steps = 1 of the geometric path
    f_t(z) = p(z) p(x|z)^beta_t: "linear", or "sigmoid" (Grosse et al. 2015: sigma(delta (2t/K - 1))
    rescaled to [0, 1], small steps near both ends)."""
    steps = check_int(steps, "steps", lo=1)
    t = np.linspace(0.0, 1.0, steps + 1)
    if kind == "linear":
        return t
    if kind != "sigmoid":
        raise ValueError(f"unknown schedule {kind!r}; expected 'linear' or 'sigmoid'")
    s = 1 / (1 + np.exp(-delta * (2 * t - 1)))
    return (s - s[0]) / (s[-1] - s[0])


def ais_chains(loglik, z, betas, leapfrog=10, step=0.05, target_accept=0.65, rng=0, rate=0.05):
    """AIS along f_t(z) = N(z; 0, I) p(x|z)^beta_t from z ~ f_{betas[0]} (z: (C, B, Z)):

        log w += (beta_t - beta_{t-1}) log p(x|z_{t-1});   z_t ~ T_t(. | z_{t-1})  (HMC leaving f_t invariant)

    ``loglik(z) -> (log p(x|z), its z-gradient)``. The step size (one per image, shared by its chains) moves
    toward ``target_accept`` after each transition. Increasing betas (0 -> 1, z from the prior): E[w] = p(x),
    so logmeanexp_c log w is a stochastic lower bound of log p(x). Decreasing (1 -> 0, z an exact posterior
    sample): E[w] = 1 / p(x), so -logmeanexp_c log w is a stochastic upper bound.
    Returns (log w (C, B) float64, final z, mean acceptance)."""
    xp = backend.array_module(z)
    L = check_int(leapfrog, "leapfrog", lo=1)
    rng = _rng(None, rng)
    gradf = getattr(loglik, "grad", None) or (lambda zz: loglik(zz)[1])
    ll, gll = loglik(z)
    logw = xp.zeros(ll.shape)
    eps = xp.full(ll.shape[1:], step, dtype=z.dtype)
    acc = 0.0
    for t in range(1, len(betas)):
        b = float(betas[t])
        logw += (b - float(betas[t - 1])) * ll

        def target(zz, b=b):
            lik, g = loglik(zz)
            return _log_prior(zz) + b * lik, b * g - zz, lik, g
        target.grad = lambda zz, b=b: b * gradf(zz) - zz

        state, prob = hmc_step(target, (z, _log_prior(z) + b * ll, b * gll - z, ll, gll), eps[None], L, rng)
        z, ll, gll = state[0], state[3], state[4]
        eps = _adapt(eps, prob.mean(0), target_accept, rate)
        acc = acc + prob.mean()
    return logw, z, float(acc) / max(1, len(betas) - 1)


def ais(model, x, steps=1000, chains=4, leapfrog=2, schedule_kind="sigmoid", rng=None, step=0.05):
    """AIS estimate of log p(x) per row of x (B, x_dim): ``chains`` chains per image from the prior to
    p(z|x) through ``steps`` intermediate distributions with HMC (``leapfrog`` steps) transitions.
    Returns {"est": (B,) = logmeanexp_c log w (a stochastic lower bound), "se": its delta-method standard
    error over chains, "logw": (chains, B), "accept": mean acceptance}."""
    x = model.check_x(x)
    rng = _rng(model, rng)
    chains = check_int(chains, "chains", lo=1)
    z = _normal(model.xp.empty((chains, x.shape[0], model.z_dim), dtype=model.dtype), rng)
    logw, _, acc = ais_chains(_loglik(model, x), z, schedule(steps, schedule_kind), leapfrog, step, rng=rng)
    est, se = _lme_se(logw)
    return {"est": est, "se": se, "logw": logw, "accept": acc}


def simulate(model, n, rng=None):
    """(x, z): z ~ N(0, I) (n, Z), x ~ p(x|z) (Bernoulli draws, or the Gaussian mean plus noise); then z is
    an exact sample of p(z|x), what reverse AIS starts from."""
    rng = _rng(model, rng)
    z = _normal(model.xp.empty((n, model.z_dim), dtype=model.dtype), rng)
    m = model.decode(z)
    if model.likelihood == "bernoulli":
        x = (_uniform(m.shape, rng, model.xp) < m).astype(model.dtype)
    else:
        x = m + model.xp.exp(0.5 * model._logvar_x()).astype(model.dtype) * _normal(m, rng)
    return x, z


def bdmc(model, n=10, steps=1000, chains=4, leapfrog=2, schedule_kind="sigmoid", rng=None, step=0.05):
    """Bidirectional Monte Carlo (Grosse et al. 2015) on n images simulated from the model: forward AIS gives
    a stochastic lower bound of each log p(x), reverse AIS (from the exact posterior sample z that made x,
    betas 1 -> 0) a stochastic upper bound. Returns {"lower": (n,), "upper": (n,), "x": the images}."""
    n = check_int(n, "n", lo=1)
    rng = _rng(model, rng)
    x, z = simulate(model, n, rng)
    fwd = ais(model, x, steps, chains, leapfrog, schedule_kind, rng, step)
    zc = model.xp.broadcast_to(z, (chains,) + z.shape).copy()
    logw, _, acc = ais_chains(_loglik(model, x), zc, schedule(steps, schedule_kind)[::-1], leapfrog, step, rng=rng)
    return {"lower": fwd["est"], "upper": -logmeanexp(logw), "x": x, "accept": (fwd["accept"], acc)}


# -- Monte-Carlo EM ---------------------------------------------------------------------------------------------
def mcem_decoder_loss_and_grad(model, x, z, zero_grad=True):
    """The M-step of Monte-Carlo EM at fixed samples z (C, B, Z) of p(z | x) (e.g. HMC states):

        Q(theta) ~= (1/C) sum_c log p_theta(x, z_c),   L = -(1/(C B)) sum_{c,b} log p(x_b | z_cb)

    (log N(z; 0, I) holds no parameter). dL/dout = the likelihood's backward with weight 1/(C B) per row, then the
    decoder's backward to its weights (and logvar_x's gradient with a learned sigma): the Monte-Carlo gradient
    of -log p(x, z). The encoder's gradients are left untouched (zero after ``zero_grad``). Returns L (0-d)."""
    xp = model.xp
    if zero_grad:
        model.zero_grad()
    zz = xp.asarray(z).astype(model.dtype, copy=False).reshape(-1, model.z_dim)
    out = model.decoder.forward(zz)
    xt = xp.broadcast_to(x, (zz.shape[0] // x.shape[0],) + x.shape).reshape(out.shape)
    rows = rec_rows(model, out, xt)
    d_rows = xp.full(rows.shape[0], 1.0 / rows.shape[0], dtype=model.dtype)
    model.decoder.backward(rec_backward(model, d_rows, out, xt), need_dx=False)
    return rows.mean()


def mcem_fit(model, x, epochs=5, batch_size=100, lr=1e-3, hmc_steps=3, leapfrog=5, step=0.1, target_accept=0.65,
             rng=0, optimizer=None, log=None):
    """Monte-Carlo EM for a VAE's decoder (Wei & Tanner 1990), the E-step by HMC in place of q(z | x).

    Every image keeps one persistent chain on p(z | x), started at the encoder mean mu(x) (the encoder is used
    only there and is not trained). Per minibatch of ``batch_size`` images, in a shuffled order each epoch:
      E: ``hmc_steps`` HMC transitions (``leapfrog`` steps each) of the batch's chains on the current p(z | x),
         each chain's step size adapted toward ``target_accept`` (kept with the chain);
      M: one Adam step (``lr``) on :func:`mcem_decoder_loss_and_grad` at the chains' new states.
    x (N, x_dim) training images (checked). Returns a list of per-epoch dicts {"epoch", "loss" (mean -log p(x|z)
    at the samples), "logjoint" (mean log p(x, z)), "accept", "seconds"}; the model is trained in place."""
    import time

    from .optim import Adam

    x = model.check_x(x)
    epochs, batch_size = check_int(epochs, "epochs", lo=1), check_int(batch_size, "batch_size", lo=1)
    hmc_steps, leapfrog = check_int(hmc_steps, "hmc_steps", lo=1), check_int(leapfrog, "leapfrog", lo=1)
    rng = _rng(model, rng)
    opt = optimizer or Adam(model, lr=lr)
    xp, n = model.xp, x.shape[0]
    chains = xp.concatenate([model.encoder.forward(x[s:s + 1000])[:, :model.z_dim] for s in range(0, n, 1000)])
    eps = xp.full(n, check_float(step, "step", lo=0, strict_lo=True), dtype=model.dtype)
    history = []
    for epoch in range(1, epochs + 1):
        t0, sums = time.perf_counter(), {"loss": 0.0, "logjoint": 0.0, "accept": 0.0}
        perm = np.random.default_rng(int(rng.integers(1 << 31))).permutation(n)
        for s in range(0, n, batch_size):
            idx = xp.asarray(perm[s:s + batch_size])
            xb, target = x[idx], posterior_target(model, x[idx])
            state, e = (chains[idx],) + tuple(target(chains[idx])), eps[idx]
            for _ in range(hmc_steps):  # E-step: a few transitions of p(z | x_b) under the current decoder
                state, prob = hmc_step(target, state, e, leapfrog, rng)
                e = _adapt(e, prob, target_accept, 0.5).astype(model.dtype)
            chains[idx], eps[idx] = state[0], e
            loss = mcem_decoder_loss_and_grad(model, xb, state[0][None])  # M-step
            opt.step()
            w = len(perm[s:s + batch_size]) / n
            sums["loss"] += w * float(loss)
            sums["logjoint"] += w * float(state[1].mean())
            sums["accept"] += w * float(prob.mean())
        history.append({"epoch": epoch, **sums, "seconds": round(time.perf_counter() - t0, 3)})
        if log:
            log(history[-1])
    return history
