"""Gaussian mixture fitted by expectation-maximization (EM), and the same mixture on PCA-reduced data.

The classical latent-variable model: a discrete latent z in {1..K} with p(z = k) = pi_k and
p(x | z = k) = N(x; mu_k, Sigma_k), so that

    p(x) = sum_k pi_k N(x; mu_k, Sigma_k),
    log N(x; mu, Sigma) = -1/2 [ D log(2 pi) + log|Sigma| + (x - mu)^T Sigma^-1 (x - mu) ].

EM maximizes sum_n log p(x_n) by alternating two closed-form steps (no gradients anywhere):

E-step (posterior of the latent, "responsibilities"), with log-sum-exp for stability:
    log r_nk = log pi_k + log N(x_n; mu_k, Sigma_k) - log p(x_n),
    log p(x_n) = logsumexp_k [ log pi_k + log N(x_n; mu_k, Sigma_k) ].

M-step (maximize the expected complete-data log-likelihood sum_nk r_nk log pi_k N(x_n; mu_k, Sigma_k)):
    N_k     = sum_n r_nk                       (+ 10 * machine eps, so an empty component divides safely)
    pi_k    = N_k / N
    mu_k    = sum_n r_nk x_n / N_k
    Sigma_k = sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T / N_k + reg_covar * I          (full)
    sigma2_kd = sum_n r_nk (x_nd - mu_kd)^2 / N_k + reg_covar                      (diag)
    sigma2_k  = (1/D) sum_d [ sum_n r_nk (x_nd - mu_kd)^2 / N_k ] + reg_covar        (spherical)

Each iteration cannot lower the log-likelihood (with reg_covar = 0; the regularizer shifts the
covariance off the exact maximizer by reg_covar * I, which is negligible at its default 1e-6).
This is the ELBO argument the VAE generalizes: with q(z | x_n) = r_n the bound
L(q, theta) = E_q[log p(x, z)] + H[q] is tight after the E-step and the M-step raises it.

Everything is array code on the module of the data (NumPy or CuPy), vectorized over points and
components; points are processed in chunks so the (chunk, K, D) temporaries stay small. The
random initialization draws from a host NumPy Generator, so a seed gives the same fit on every
backend.

    >>> gm = GaussianMixture(3, covariance_type="full", seed=0).fit(x)      # x: (N, D)
    >>> gm.score_samples(x)   # log p(x_n) per point;  gm.score(x) is their mean
    >>> gm.predict(x), gm.predict_proba(x), gm.sample(100, rng=1), gm.bic(x)
    >>> gm.save("gmm.npz"); npdgm.load("gmm.npz")
"""
from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..backend import array_module
from .registry import register_model
from ..kernels import logsumexp_forward
from ..nn.module import Parameter
from ..validate import as_rng, check_float, check_int
from .base import Model
from .kmeans import kmeans, kmeans_plusplus, nearest as _nearest

__all__ = ["GaussianMixture", "PCAGaussianMixture", "COVARIANCE_TYPES", "INITS", "RESIDUALS"]

COVARIANCE_TYPES = ("full", "diag", "spherical")
INITS = ("kmeans", "k-means++", "random", "random_from_data")
LOG_2PI = math.log(2 * math.pi)
_CHUNK_ELEMENTS = 1 << 22  # elements of one (chunk, K, D) temporary


def _allsum(a, comm):
    """The sum over the ranks of ``comm`` (npdgm.distributed) of the array ``a`` (reduced on the host in
    float64, returned in a's dtype and backend); ``a`` itself in one process (comm None)."""
    if comm is None:
        return a
    return array_module(a).asarray(comm.allreduce_sum(backend.to_host(a)), dtype=a.dtype)


def _regularize_hint(reg_covar):
    return (f"increase reg_covar (now {reg_covar:g}; try 1e-4 or more), use fewer components, or "
            f"covariance_type='diag'/'spherical'")


class GaussianMixture(Model):
    """Mixture of K Gaussians fitted by EM.

    Parameters (also the constructor config, stored in checkpoints):
        n_components     K >= 1
        covariance_type  "full" (K, D, D) | "diag" (K, D) | "spherical" (K,)
        reg_covar        added to the covariance diagonal in every M-step (>= 0)
        tol              stop when the mean log-likelihood per point changes by less than tol
        max_iter         most EM iterations per initialization
        init             "kmeans" (k-means++ seeding then Lloyd iterations, hard responsibilities),
                         "k-means++" (seeding only), "random" (random soft responsibilities),
                         "random_from_data" (K distinct data points as means)
        n_init           initializations tried; the fit with the highest final log-likelihood is kept
        seed             seed of the host NumPy Generator used by the initialization
        dim              D; set by fit (given only when rebuilding from a checkpoint)

    Fitted state: the Parameters ``weights`` (K,), ``means`` (K, D), ``covariances``; the arrays as
    ``weights_``, ``means_``, ``covariances_``; ``history_`` (mean log-likelihood per point after
    the initialization and after every iteration), ``n_iter_``, ``converged_``, ``lower_bound_``.
    """

    kind = "gmm"

    def __init__(self, n_components=1, covariance_type="full", reg_covar=1e-6, tol=1e-3, max_iter=100,
                 init="kmeans", n_init=1, seed=0, dim=None):
        n_components = check_int(n_components, "n_components", lo=1)
        if covariance_type not in COVARIANCE_TYPES:
            raise ValueError(f"unknown covariance_type {covariance_type!r}; expected one of {COVARIANCE_TYPES}")
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}; expected one of {INITS}")
        reg_covar, tol = check_float(reg_covar, "reg_covar", lo=0), check_float(tol, "tol", lo=0)
        max_iter, n_init = check_int(max_iter, "max_iter", lo=1), check_int(n_init, "n_init", lo=1)
        dim = None if dim is None else check_int(dim, "dim (or None)", lo=1)
        seed = check_int(seed, "seed", lo=0)
        super().__init__(n_components=n_components, covariance_type=covariance_type, reg_covar=reg_covar,
                         tol=tol, max_iter=max_iter, init=init, n_init=n_init, seed=seed, dim=dim)
        self.n_components, self.covariance_type = n_components, covariance_type
        self.reg_covar, self.tol, self.max_iter = reg_covar, tol, max_iter
        self.init, self.n_init, self.seed = init, n_init, seed
        self.history_, self.n_iter_, self.converged_, self.lower_bound_ = [], 0, False, -math.inf
        self._cache = None
        if dim is not None:
            xp, dt = backend.xp(), backend.get_dtype()
            K, D = self.n_components, int(dim)
            cov = {"full": xp.broadcast_to(xp.eye(D, dtype=dt), (K, D, D)).copy(),
                   "diag": xp.ones((K, D), dtype=dt), "spherical": xp.ones((K,), dtype=dt)}[covariance_type]
            self._set(xp.full((K,), 1.0 / K, dtype=dt), xp.zeros((K, D), dtype=dt), cov, check=False)

    # -- fitted arrays ----------------------------------------------------------------------------
    @property
    def dim(self):
        return self.config["dim"]

    @property
    def fitted(self):
        return self.dim is not None

    @property
    def weights_(self):
        return self.weights.data

    @property
    def means_(self):
        return self.means.data

    @property
    def covariances_(self):
        return self.covariances.data

    def n_parameters(self):
        """Free parameters: K-1 weights, K*D means, and K*D(D+1)/2 | K*D | K covariance entries."""
        self._require_fitted()
        K, D = self.n_components, self.dim
        cov = {"full": K * D * (D + 1) // 2, "diag": K * D, "spherical": K}[self.covariance_type]
        return (K - 1) + K * D + cov

    def __repr__(self):
        d = "unfitted" if not self.fitted else f"D={self.dim}"
        return f"GaussianMixture(K={self.n_components}, {self.covariance_type}, {d})"

    def _require_fitted(self):
        if not self.fitted:
            raise ValueError("this GaussianMixture is not fitted yet; call fit(x) first")

    def _set(self, weights, means, covariances, check=True):
        """Install parameters (arrays on one backend) and refresh the Cholesky cache."""
        self.weights = Parameter(weights)
        self.means = Parameter(means)
        self.covariances = Parameter(covariances)
        self.config["dim"] = int(means.shape[1])
        self._cache = None
        if check:
            self._factor()

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self._cache = None
        self._factor()
        return self

    def set_params(self, weights, means, covariances):
        """Set pi (K,), mu (K, D) and the covariances (shape by covariance_type) directly; checked."""
        xp = array_module(means)
        means = xp.asarray(means)
        if means.ndim != 2 or means.shape[0] != self.n_components:
            raise ValueError(f"means must have shape ({self.n_components}, D), got {tuple(means.shape)}")
        dt = means.dtype if means.dtype.kind == "f" else backend.get_dtype()
        K, D = means.shape
        weights, covariances = xp.asarray(weights, dtype=dt), xp.asarray(covariances, dtype=dt)
        want = {"full": (K, D, D), "diag": (K, D), "spherical": (K,)}[self.covariance_type]
        if tuple(weights.shape) != (K,):
            raise ValueError(f"weights must have shape ({K},), got {tuple(weights.shape)}")
        if tuple(covariances.shape) != want:
            raise ValueError(f"{self.covariance_type} covariances must have shape {want}, "
                             f"got {tuple(covariances.shape)}")
        for name, a in (("weights", weights), ("means", means), ("covariances", covariances)):
            backend.check_finite(name, a)
        if bool((weights < 0).any()) or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError("weights must be >= 0 and sum to 1")
        self._set(weights, means.astype(dt, copy=True), covariances.copy())
        return self

    # -- Cholesky factors of the covariances --------------------------------------------------------
    def _factor(self):
        """Cache what the E-step needs: for "full" P_k = L_k^-1 (Sigma_k = L_k L_k^T), for diag /
        spherical the precisions 1/sigma^2, and log|Sigma_k|^(-1/2) for every component."""
        if self._cache is not None:
            return self._cache
        cov = self.covariances.data
        xp = array_module(cov)
        hint = _regularize_hint(self.reg_covar)
        if self.covariance_type == "full":
            try:
                L = xp.linalg.cholesky(cov)
            except np.linalg.LinAlgError:
                L = None
            if L is None or not bool(xp.isfinite(L).all()):
                bad = self._bad_components_full(cov)
                raise ValueError(f"singular covariance: the covariance matrix of component(s) {bad} is not positive "
                                 f"definite (a component collapsed onto too few points or a degenerate feature); "
                                 f"{hint}")
            D = cov.shape[-1]
            eye = xp.broadcast_to(xp.eye(D, dtype=cov.dtype), cov.shape).copy()
            P = xp.linalg.solve(L, eye)                       # (K, D, D) lower-triangular inverses
            half_logdet = -xp.log(xp.diagonal(L, axis1=1, axis2=2)).sum(1)   # -1/2 log|Sigma_k|
            self._cache = {"P": P, "half_logdet": half_logdet}
        else:
            if not bool((cov > 0).all()) or not bool(xp.isfinite(cov).all()):
                bad = [int(k) for k in np.unique(np.nonzero(~(backend.to_host(cov) > 0))[0])]
                raise ValueError(f"singular covariance: component(s) {bad} have a zero variance; {hint}")
            prec = 1.0 / cov
            D = self.dim
            half_logdet = (0.5 * xp.log(prec).sum(1) if self.covariance_type == "diag"
                           else 0.5 * D * xp.log(prec))
            self._cache = {"prec": prec, "half_logdet": half_logdet}
        return self._cache

    @staticmethod
    def _bad_components_full(cov):
        host = backend.to_host(cov).astype(np.float64)
        bad = []
        for k, c in enumerate(host):
            try:
                np.linalg.cholesky(c)
                if not np.isfinite(c).all():
                    bad.append(k)
            except np.linalg.LinAlgError:
                bad.append(k)
        return bad or list(range(len(host)))

    # -- input checks ---------------------------------------------------------------------------------
    def _check_x(self, x, name="x", fitting=False):
        xp = array_module(x)
        x = xp.asarray(x)
        if x.ndim != 2:
            hint = "; for 1-D data pass x.reshape(-1, 1)" if x.ndim == 1 else ""
            raise ValueError(f"{name} must be a 2-D array (n_points, n_features), got shape {tuple(x.shape)}{hint}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must have at least one point and one feature, got shape {tuple(x.shape)}")
        if x.dtype.kind not in "fiub":
            raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
        if not fitting:
            self._require_fitted()
            if x.shape[1] != self.dim:
                raise ValueError(f"{name} has {x.shape[1]} features, the mixture was fitted on {self.dim}")
            dt = self.means.data.dtype
        else:
            dt = x.dtype if x.dtype.kind == "f" else backend.get_dtype()
        x = x.astype(dt, copy=False)
        backend.check_finite(name, x)
        return x

    # -- the two steps ----------------------------------------------------------------------------------
    def _chunks(self, n):
        size = max(1, _CHUNK_ELEMENTS // max(1, self.n_components * self.dim))
        return [(s, min(n, s + size)) for s in range(0, n, size)]

    def _log_gauss(self, x):
        """(N, K) log N(x_n; mu_k, Sigma_k) = -1/2 [D log 2pi + |L_k^-1 (x_n - mu_k)|^2] - sum_d log L_k,dd."""
        c = self._factor()
        xp = array_module(x)
        mu = self.means.data
        N, D = x.shape
        out = xp.empty((N, self.n_components), dtype=x.dtype)
        for s, e in self._chunks(N):
            diff = x[None, s:e, :] - mu[:, None, :]                # (K, n, D), contiguous per component
            if self.covariance_type == "full":
                # y_k = diff_k P_k^T, one batched GEMM over components: (K, n, D) @ (K, D, D)
                y = xp.matmul(diff, c["P"].transpose(0, 2, 1))
                maha = (y * y).sum(-1).T                            # (n, K)
            elif self.covariance_type == "diag":
                maha = (diff * diff * c["prec"][:, None, :]).sum(-1).T
            else:
                maha = (diff * diff).sum(-1).T * c["prec"][None]
            out[s:e] = -0.5 * (D * LOG_2PI + maha) + c["half_logdet"][None]
        return out

    def _log_joint(self, x):
        """(N, K) log pi_k + log N(x_n; mu_k, Sigma_k)."""
        xp = array_module(x)
        with np.errstate(divide="ignore"):
            logw = xp.log(self.weights.data)
        return self._log_gauss(x) + logw[None]

    def _e_step(self, x):
        """Responsibilities r (N, K) and log p(x_n) (N,):
        log p(x_n) = logsumexp_k(log pi_k + log N_k(x_n)),  r_nk = exp(log pi_k + log N_k(x_n) - log p(x_n))."""
        xp = array_module(x)
        lj = self._log_joint(x)
        lp = logsumexp_forward(lj, axis=1)
        return xp.exp(lj - lp[:, None]), lp

    def _m_step(self, x, resp, comm=None, n=None):
        """Closed-form maximizer of sum_nk r_nk log pi_k N(x_n; mu_k, Sigma_k) (see the module docstring).
        ``comm``: x is this rank's shard of n points; the sums over points (N_k, sum_n r_nk x_n, then the
        scatter matrices) are all-reduced, so every rank gets the parameters of one process."""
        xp = array_module(x)
        N, D = x.shape
        N = N if n is None else n
        dt = x.dtype
        nk = _allsum(resp.sum(0), comm) + 10 * np.finfo(dt).eps     # (K,)
        means = _allsum(resp.T @ x, comm) / nk[:, None]               # (K, D)
        K = self.n_components
        if self.covariance_type == "full":
            cov = xp.zeros((K, D, D), dtype=dt)
        else:
            cov = xp.zeros((K, D), dtype=dt)
        for s, e in self._chunks(N):
            diff = x[None, s:e, :] - means[:, None, :]              # (K, n, D), centered at the new means
            wdiff = diff * resp[s:e].T[:, :, None]
            if self.covariance_type == "full":
                # sum_n r_nk diff_nk diff_nk^T, one batched GEMM: (K, D, n) @ (K, n, D)
                cov += xp.matmul(wdiff.transpose(0, 2, 1), diff)
            else:
                cov += (wdiff * diff).sum(1)
        cov = _allsum(cov, comm)
        if self.covariance_type == "full":
            cov /= nk[:, None, None]
            idx = xp.arange(D)
            cov[:, idx, idx] += self.reg_covar
        elif self.covariance_type == "diag":
            cov = cov / nk[:, None] + self.reg_covar
        else:
            cov = cov.sum(1) / (nk * D) + self.reg_covar
        self._set(nk / N, means, cov)

    # -- initialization -------------------------------------------------------------------------------------
    def _init_resp(self, x, g):
        """Initial responsibilities (N, K) from the chosen init, drawn with the host Generator g."""
        xp = array_module(x)
        N, K = x.shape[0], self.n_components
        if self.init == "random":
            r = g.random((N, K))
            return xp.asarray(r / r.sum(1, keepdims=True), dtype=x.dtype)
        if self.init == "random_from_data":
            centers = x[xp.asarray(g.choice(N, K, replace=False))]
        else:
            centers = kmeans_plusplus(x, K, g)
            if self.init == "kmeans":
                centers = kmeans(x, centers)
        labels = _nearest(x, centers)
        return xp.eye(K, dtype=x.dtype)[labels]

    # -- fitting ----------------------------------------------------------------------------------------------
    def fit(self, x, rng=None, weights_init=None, means_init=None, covariances_init=None, callback=None, comm=None):
        """Run EM on x (N, D) from n_init initializations; keep the best. Returns self.

        rng: seed or host NumPy Generator for the initialization (default: the ``seed`` config).
        weights_init / means_init / covariances_init: start from these parameters instead (all three;
        n_init is then 1). callback(trial, iteration, mean_log_likelihood) is called after every E-step
        (the model then holds the parameters that log-likelihood belongs to).
        ``history_`` holds the mean log-likelihood per point of the initial parameters and after every
        M-step; EM makes it non-decreasing.
        comm: a communicator of npdgm.distributed (data-parallel EM): x is all the data, on every rank. The
        initialization runs on all of it on every rank (the same draws, the same result); then each rank's
        E-step takes its rows (distributed.shard_bounds) and the M-step's sums and the log-likelihood are
        all-reduced, so every rank holds the fit of one process (up to the order of float sums).
        """
        x = self._check_x(x, fitting=True)
        N, D = x.shape
        K = self.n_components
        if K > N:
            raise ValueError(f"n_components={K} is larger than the number of points ({N}); "
                             f"a mixture needs at least one point per component")
        given = [a is not None for a in (weights_init, means_init, covariances_init)]
        if any(given) and not all(given):
            raise ValueError("give weights_init, means_init and covariances_init together (or none of them)")
        g = as_rng(self.seed if rng is None else rng)
        comm = comm if comm is not None and 1 < comm.size <= N else None
        if comm is not None:
            from ..distributed import shard_bounds

            lo, hi = shard_bounds(N, comm.rank, comm.size)
            xs = x[lo:hi]
            xp = array_module(x)
            mean_ll = lambda lp: float(_allsum(xp.atleast_1d(lp.sum()), comm)[0]) / N
        else:
            xs, mean_ll = x, lambda lp: float(lp.mean())
        best = None
        for trial in range(1 if all(given) else self.n_init):
            self.config["dim"] = D
            if all(given):
                self.set_params(weights_init, array_module(x).asarray(means_init, dtype=x.dtype), covariances_init)
            else:
                self._m_step(x, self._init_resp(x, g))
            resp, lp = self._e_step(xs)
            ll = mean_ll(lp)
            history, converged, it = [ll], False, 0
            if callback:
                callback(trial, 0, ll)
            for it in range(1, self.max_iter + 1):
                self._m_step(xs, resp, comm, N)
                resp, lp = self._e_step(xs)
                prev, ll = ll, mean_ll(lp)
                history.append(ll)
                if callback:
                    callback(trial, it, ll)
                if not math.isfinite(ll):
                    raise FloatingPointError(f"EM produced a non-finite log-likelihood at iteration {it}; "
                                             f"{_regularize_hint(self.reg_covar)}")
                if abs(ll - prev) < self.tol:
                    converged = True
                    break
            if best is None or ll > best[0]:
                state = (self.weights.data, self.means.data, self.covariances.data)
                best = (ll, state, history, it, converged)
        ll, (w, m, c), self.history_, self.n_iter_, self.converged_ = best
        self.lower_bound_ = ll
        self._set(w, m, c)
        return self

    # -- using the fitted mixture ----------------------------------------------------------------------------------
    def score_samples(self, x):
        """log p(x_n) per point (N,), in nats."""
        x = self._check_x(x)
        return logsumexp_forward(self._log_joint(x), axis=1)

    def score(self, x):
        """Mean log-likelihood per point (a Python float, nats)."""
        return float(self.score_samples(x).mean())

    def predict_proba(self, x):
        """Posterior p(z = k | x_n) (N, K) — the E-step responsibilities."""
        return self._e_step(self._check_x(x))[0]

    def predict(self, x):
        """Most probable component per point (N,) ints."""
        x = self._check_x(x)
        return self._log_joint(x).argmax(1)

    def bic(self, x):
        """Bayesian information criterion -2 log L + p log N (lower is better)."""
        x = self._check_x(x)
        return -2.0 * self.score(x) * x.shape[0] + self.n_parameters() * math.log(x.shape[0])

    def aic(self, x):
        """Akaike information criterion -2 log L + 2 p (lower is better)."""
        x = self._check_x(x)
        return -2.0 * self.score(x) * x.shape[0] + 2 * self.n_parameters()

    def sample(self, n, rng=None, return_labels=False):
        """n points from the mixture: z ~ Categorical(pi), x = mu_z + L_z eps with eps ~ N(0, I).

        Noise comes from a host NumPy Generator (seed or Generator), so every backend draws the same points.
        """
        self._require_fitted()
        n = check_int(n, "n", lo=1)
        g = as_rng(rng)
        w = np.asarray(backend.to_host(self.weights.data), dtype=np.float64)
        labels = g.choice(self.n_components, size=int(n), p=w / w.sum())
        eps = g.standard_normal((int(n), self.dim))
        mu = self.means.data
        xp = array_module(mu)
        dt = mu.dtype
        lab = xp.asarray(labels)
        eps = xp.asarray(eps, dtype=dt)
        cov = self.covariances.data
        if self.covariance_type == "full":
            L = xp.linalg.cholesky(cov)
            out = xp.empty((int(n), self.dim), dtype=dt)
            for k in range(self.n_components):
                idx = xp.asarray(np.nonzero(labels == k)[0])
                out[idx] = mu[k] + eps[idx] @ L[k].T
        elif self.covariance_type == "diag":
            out = mu[lab] + eps * xp.sqrt(cov)[lab]
        else:
            out = mu[lab] + eps * xp.sqrt(cov)[lab][:, None]
        return (out, lab) if return_labels else out

    def save(self, path, extra_meta=None):
        """Write the fitted parameters (and the fit's history) to ``path``; ``npdgm.load`` rebuilds it."""
        from ..io import save_model

        self._require_fitted()
        save_model(self, path, extra_meta={"fit": {"history": self.history_, "n_iter": self.n_iter_,
                                                   "converged": self.converged_}, **(extra_meta or {})})


# -- the mixture on a PCA subspace, completed to a density on the full space ------------------------------------------
RESIDUALS = ("full", "isotropic")


@register_model
class PCAGaussianMixture(Model):
    """A GaussianMixture on the top ``pca_dim`` principal components times a Gaussian on the orthogonal
    complement, so that it is a proper density on the full D-dimensional space.

    With the data mean m, the eigenvectors of the sample covariance sorted by eigenvalue, V (D, d) the top d and
    U (D, D-d) the rest, the map x -> (V^T (x - m), U^T (x - m)) is a rotation (Jacobian 1), so

        log p(x) = log p_gmm(V^T (x - m)) + log p_res(x),

    residual "full":      p_res = prod_j N(u_j^T (x - m); 0, lambda_j)   (j over the discarded directions)
                          = the maximum-likelihood Gaussian on the complement (its covariance is diagonal in U);
    residual "isotropic": p_res = N(r; 0, s2 I_(D-d)), r = (I - V V^T)(x - m), s2 = mean of the discarded
                          lambda_j (probabilistic PCA's noise model),
          log p_res = -(D-d)/2 log(2 pi s2) - |r|^2 / (2 s2).

    residual_reg (default: reg_covar) is added to every lambda_j (and to s2): the smallest eigenvalues of
    dequantized images are ~1e-6 (pixels that are always black), and a floor there trades a little training
    likelihood for much held-out likelihood.
    ``score_samples`` returns the full-space log-density; ``score_samples_pca`` the mixture's log-density in
    the d PCA coordinates alone (a density on R^d, not on the pixels).
    """

    kind = "pca_gmm"

    def __init__(self, dim, pca_dim=50, n_components=10, covariance_type="full", reg_covar=1e-6, tol=1e-3,
                 max_iter=100, init="kmeans", n_init=1, seed=0, residual="full", residual_reg=None, fitted=False):
        dim, pca_dim = check_int(dim, "dim", lo=1), check_int(pca_dim, "pca_dim", lo=1)
        if pca_dim > dim:
            raise ValueError(f"pca_dim={pca_dim} must be <= the data dimension {dim}")
        if residual not in RESIDUALS:
            raise ValueError(f"unknown residual {residual!r}; expected one of {RESIDUALS}")
        if residual_reg is not None:
            residual_reg = check_float(residual_reg, "residual_reg (or None)", lo=0)
        gmm = GaussianMixture(n_components, covariance_type, reg_covar, tol, max_iter, init, n_init, seed,
                              dim=pca_dim if fitted else None)                 # checks the mixture options
        g = gmm.config
        super().__init__(dim=dim, pca_dim=pca_dim, n_components=g["n_components"],
                         covariance_type=covariance_type, reg_covar=g["reg_covar"], tol=g["tol"],
                         max_iter=g["max_iter"], init=init, n_init=g["n_init"], seed=g["seed"], residual=residual,
                         residual_reg=residual_reg, fitted=bool(fitted))
        self.dim, self.pca_dim, self.residual = dim, pca_dim, residual
        self.residual_reg = g["reg_covar"] if residual_reg is None else residual_reg
        xp, dt = backend.xp(), backend.get_dtype()
        k = self.dim - self.pca_dim
        self.mean = Parameter(xp.zeros((self.dim,), dtype=dt))
        self.components = Parameter(xp.zeros((self.dim, self.pca_dim), dtype=dt))      # V, orthonormal columns
        if residual == "full":
            self.complement = Parameter(xp.zeros((self.dim, k), dtype=dt))            # U
            self.residual_var = Parameter(xp.ones((k,), dtype=dt))                     # lambda_j + reg_covar
        else:
            self.residual_var = Parameter(xp.ones((1,), dtype=dt))                     # s2
        self.gmm = gmm

    def __repr__(self):
        return f"PCAGaussianMixture(D={self.dim} -> {self.pca_dim}, {self.residual} residual, {self.gmm!r})"

    def _require_fitted(self):
        if not self.config["fitted"]:
            raise ValueError("this PCAGaussianMixture is not fitted yet; call fit(x) first")

    def _check(self, x, name="x"):
        xp = array_module(x)
        x = xp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"{name} must have shape (n_points, {self.dim}), got {tuple(x.shape)}")
        x = x.astype(self.mean.data.dtype if self.config["fitted"] else
                     (x.dtype if x.dtype.kind == "f" else backend.get_dtype()), copy=False)
        backend.check_finite(name, x)
        return x

    def fit(self, x, rng=None, callback=None, comm=None):
        """PCA by an eigendecomposition of the sample covariance, the residual Gaussian, then EM on V^T (x - m)
        (``comm``: data-parallel EM, see :meth:`GaussianMixture.fit`; the PCA runs on every rank)."""
        x = self._check(x)
        xp = array_module(x)
        N = x.shape[0]
        if N < 2:
            raise ValueError(f"PCA needs at least 2 points, got {N}")
        d, D = self.pca_dim, self.dim
        reg = self.residual_reg
        m = x.mean(0)
        xc = x - m
        lam, vecs = xp.linalg.eigh((xc.T @ xc) / N)         # ascending
        lam, vecs = xp.maximum(lam[::-1], 0), vecs[:, ::-1]
        self.mean = Parameter(m.copy())
        self.components = Parameter(xp.ascontiguousarray(vecs[:, :d]))
        if self.residual == "full":
            self.complement = Parameter(xp.ascontiguousarray(vecs[:, d:]))
            self.residual_var = Parameter(xp.ascontiguousarray(lam[d:]) + reg)
        else:
            s2 = (float(lam[d:].mean()) if d < D else 0.0) + reg
            self.residual_var = Parameter(xp.asarray([s2], dtype=x.dtype))
        if d < D and not bool((self.residual_var.data > 0).all()):
            raise ValueError(f"the data has no variance outside its top {d} principal components; lower pca_dim "
                             f"or raise reg_covar")
        self.gmm.fit(xc @ self.components.data, rng=rng, callback=callback, comm=comm)
        self.config["fitted"] = True
        return self

    def project(self, x):
        """PCA coordinates V^T (x - m) (N, d)."""
        x = self._check(x)
        return (x - self.mean.data) @ self.components.data

    def score_samples_pca(self, x):
        """log p_gmm(V^T (x - m)) per point: a density on the d-dimensional PCA space only."""
        self._require_fitted()
        return self.gmm.score_samples(self.project(x))

    def residual_logprob(self, x):
        """log p_res(x) per point: the Gaussian on the discarded directions (see the class docstring)."""
        x = self._check(x)
        xp = array_module(x)
        k = self.dim - self.pca_dim
        if k == 0:
            return xp.zeros((x.shape[0],), dtype=x.dtype)
        xc = x - self.mean.data
        lam = self.residual_var.data
        if self.residual == "full":
            c = xc @ self.complement.data                    # (N, D-d) coordinates on U
            return -0.5 * (k * LOG_2PI + xp.log(lam).sum()) - 0.5 * (c * c / lam).sum(1)
        V = self.components.data
        r = xc - (xc @ V) @ V.T
        return -0.5 * k * (LOG_2PI + xp.log(lam[0])) - 0.5 * (r * r).sum(1) / lam[0]

    def score_samples(self, x):
        """log p(x_n) on the full D-dimensional space (nats)."""
        self._require_fitted()
        return self.score_samples_pca(x) + self.residual_logprob(x)

    def score(self, x):
        return float(self.score_samples(x).mean())

    def sample(self, n, rng=None):
        """x = m + V z + residual noise, z from the mixture; "full": U (sqrt(lambda) * eps), "isotropic":
        (I - V V^T) sqrt(s2) eps with eps ~ N(0, I) (host Generator)."""
        self._require_fitted()
        n, g = check_int(n, "n", lo=1), as_rng(rng)
        z = self.gmm.sample(n, rng=g)
        xp = array_module(z)
        V = self.components.data
        k = self.dim - self.pca_dim
        x = self.mean.data + z @ V.T
        if self.residual == "full":
            eps = xp.asarray(g.standard_normal((int(n), k)), dtype=z.dtype)
            return x + (eps * xp.sqrt(self.residual_var.data)) @ self.complement.data.T
        eps = xp.asarray(g.standard_normal((int(n), self.dim)), dtype=z.dtype) * xp.sqrt(self.residual_var.data[0])
        return x + eps - (eps @ V) @ V.T

    def n_parameters(self):
        """Mixture + mean (D) + subspace (d (D-d)) + residual covariance ((D-d)(D-d+1)/2 "full" or 1)."""
        d, D = self.pca_dim, self.dim
        k = D - d
        return self.gmm.n_parameters() + D + d * k + (k * (k + 1) // 2 if self.residual == "full" else 1)

    def save(self, path, extra_meta=None):
        from ..io import save_model

        self._require_fitted()
        g = self.gmm
        save_model(self, path, extra_meta={"fit": {"history": g.history_, "n_iter": g.n_iter_,
                                                   "converged": g.converged_}, **(extra_meta or {})})


register_model(GaussianMixture)
