"""M1 (Kingma, Rezende, Mohamed & Welling 2014): a VAE's posterior means as features for a classifier.

M1, the "latent-feature discriminative model": train a VAE on all images (labels unused), map every image
to z = mu(x) = E_q[z|x] and fit a classifier on the few labelled pairs (mu(x), y). The paper used a
(transductive) SVM. Here the classifier is multinomial logistic regression with an L2 penalty (softmax
regression), because

- its objective is smooth and strictly convex in W: one optimum, which the tests compare with
  scikit-learn's ``LogisticRegression`` on the same objective (an SVM solver's result depends on its
  stopping rule and on which of many dual solutions it lands);
- its gradient is the categorical kernel npdgm already has (:func:`softmax_ce_backward`) and one GEMM;
- it gives probabilities q(y|x), like M2's classifier (M2's is the same softmax on an MLP).

Objective, features X (N, F) (scaled by the caller, :func:`standardizer`), labels y, weights W (F, C), bias b (C,):

    J(W, b) = mean_n CE(softmax(S_n), y_n) + (l2 / 2) ||W||^2,       S = X W + b
    dS = (softmax(S) - onehot(y)) / N,   dW = X^T dS + l2 W,   db = sum_n dS_n

(scikit-learn's LogisticRegression(C) minimizes C sum_n CE + ||W||^2 / 2: the same optimum for
C = 1 / (l2 N).) J is minimized by L-BFGS with a backtracking line search (:func:`fit_softmax_regression`),
until max |grad| < tol.
"""
from __future__ import annotations

import numpy as np

from ..backend import one_blas_thread
from ..kernels import softmax_ce_backward, softmax_ce_forward, softmax_forward
from ..validate import check_float, check_int

__all__ = ["SoftmaxRegression", "fit_softmax_regression", "softmax_regression_loss_and_grad", "choose_l2",
           "standardizer", "vae_features", "active_units", "prune_latents", "L2_GRID", "ACTIVE_STD"]

ACTIVE_STD = 0.1      # a latent unit is active when std_x mu_j(x) exceeds this (Kingma et al.'s code; Burda et al.)
L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)   # candidates of the cross-validated penalty


def softmax_regression_loss_and_grad(W, b, X, y, l2):
    """J(W, b) = mean CE(softmax(X W + b), y) + (l2/2) ||W||^2 and (dW, db) (module docstring).
    X (N, F), y (N,) int, W (F, C), b (C,). Returns (J, dW, db), float64."""
    S = X @ W + b
    N = X.shape[0]
    J = float(softmax_ce_forward(S, y).mean()) + 0.5 * l2 * float((W * W).sum())
    dS = softmax_ce_backward(np.full(N, 1.0 / N), S, y)
    return J, X.T @ dS + l2 * W, dS.sum(axis=0)


def fit_softmax_regression(X, y, num_classes, l2, max_iter=2000, tol=1e-6, init=None, memory=10):
    """Minimize J (module docstring) from W = 0, b = 0 (or ``init`` = (W, b): a warm start, e.g. the
    solution for a nearby penalty) by L-BFGS (Nocedal & Wright 2006, Alg. 7.4: the two-loop recursion over
    the last ``memory`` steps s = theta' - theta and gradient changes r = g' - g, Armijo backtracking from
    the unit step) until max |grad| < tol. Returns (W, b, info), info = {"iterations", "loss", "grad_max",
    "converged"}."""
    X = np.asarray(X, np.float64)
    N, F = X.shape

    def f(theta):
        J, dW, db = softmax_regression_loss_and_grad(theta[:F], theta[F], X, y, l2)
        return J, np.concatenate([dW, db[None]], axis=0)

    theta = np.zeros((F + 1, num_classes)) if init is None else np.concatenate([init[0], init[1][None]], axis=0)
    J, g = f(theta)
    S, R = [], []
    it = 0
    while it < max_iter and np.abs(g).max() >= tol:
        it += 1
        d = -g                                                   # d = -H g by the two-loop recursion
        a = []
        for s_, r_ in reversed(list(zip(S, R))):
            a.append((s_ * d).sum() / (r_ * s_).sum())
            d = d - a[-1] * r_
        if S:
            d = d * ((S[-1] * R[-1]).sum() / (R[-1] * R[-1]).sum())
        for (s_, r_), a_ in zip(zip(S, R), reversed(a)):
            d = d + s_ * (a_ - (r_ * d).sum() / (r_ * s_).sum())
        slope = float((g * d).sum())
        if slope >= 0:                                           # not a descent direction: restart
            S, R, d, slope = [], [], -g, -float((g * g).sum())
        step = 1.0 if S else min(1.0, 1.0 / max(float(np.abs(g).max()), 1e-12))
        while True:                                              # Armijo: J' <= J + 1e-4 step slope
            J_new, g_new = f(theta + step * d)
            if J_new <= J + 1e-4 * step * slope or step < 1e-12:
                break
            step /= 2
        if J_new > J + 1e-4 * step * slope:                      # no decrease left at float precision: stop
            break
        s_, r_ = step * d, g_new - g
        if (s_ * r_).sum() > 1e-12:                              # curvature pair kept only when positive
            S.append(s_)
            R.append(r_)
            S, R = S[-memory:], R[-memory:]
        theta, J, g = theta + s_, J_new, g_new
    gmax = float(np.abs(g).max())
    return theta[:F].copy(), theta[F].copy(), {"iterations": it, "loss": J, "grad_max": gmax, "converged": gmax < tol}


class SoftmaxRegression:
    """Multinomial logistic regression with an L2 penalty on W (module docstring), NumPy on the host.

    ``fit(X, y)`` then ``predict_proba`` / ``predict`` / ``error_rate``; ``W`` (F, C), ``b`` (C,) and
    ``info`` (iterations, final loss, max |gradient|) after fitting."""

    def __init__(self, num_classes=10, l2=1e-2, max_iter=2000, tol=1e-6):
        self.num_classes = check_int(num_classes, "num_classes", lo=2)
        self.l2 = check_float(l2, "l2", lo=0)
        self.max_iter = check_int(max_iter, "max_iter", lo=1)
        self.tol = check_float(tol, "tol", lo=0, strict_lo=True)
        self.W = self.b = None

    def fit(self, X, y, init=None):
        """Fit on X (N, F), y (N,); ``init`` (W, b) warm-starts the solver."""
        X, y = _xy(X, y, self.num_classes)
        with one_blas_thread():
            self.W, self.b, self.info = fit_softmax_regression(X, y, self.num_classes, self.l2, self.max_iter,
                                                               self.tol, init)
        return self

    def logits(self, X):
        if self.W is None:
            raise ValueError("this SoftmaxRegression is not fitted yet: call fit(X, y) first")
        X = np.asarray(X, np.float64)
        if X.ndim != 2 or X.shape[1] != self.W.shape[0]:
            raise ValueError(f"X must have shape (n, {self.W.shape[0]}), got {X.shape}")
        return X @ self.W + self.b

    def predict_proba(self, X):
        return softmax_forward(self.logits(X))

    def predict(self, X):
        return self.logits(X).argmax(axis=1)

    def error_rate(self, X, y):
        return float((self.predict(X) != np.asarray(y)).mean())


def _xy(X, y, num_classes):
    X = np.asarray(X, np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be a non-empty 2-D array (n, features), got shape {X.shape}")
    if y.shape != (X.shape[0],) or y.dtype.kind not in "iu":
        raise ValueError(f"y must be {X.shape[0]} integer labels, got shape {y.shape} dtype {y.dtype}")
    if not np.isfinite(X).all():
        raise ValueError("X holds NaN or infinite values")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), found {int(y.min())}..{int(y.max())}")
    return X, y.astype(np.int64)


def choose_l2(X, y, num_classes=10, grid=L2_GRID, folds=5, seed=0):
    """The penalty of ``grid`` with the lowest k-fold cross-validated error on (X, y) (folds stratified by
    class, seeded; ties -> the larger penalty). Each fold runs the grid from the largest penalty down,
    warm-starting every fit at the previous solution. Returns (l2, {l2: mean validation error})."""
    X, y = _xy(X, y, num_classes)
    folds = check_int(folds, "folds", lo=2)
    rng = np.random.default_rng([seed, 21])
    fold = np.empty(len(y), np.int64)
    for c in np.unique(y):                                   # deal each class's examples round-robin
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(len(idx)) + c) % folds
    wrong = {l2: 0 for l2 in grid}
    for f in range(folds):
        tr, va = fold != f, fold == f
        init = None
        for l2 in sorted(grid, reverse=True):
            clf = SoftmaxRegression(num_classes, l2, max_iter=500, tol=1e-5).fit(X[tr], y[tr], init)
            init = (clf.W, clf.b)
            wrong[l2] += int((clf.predict(X[va]) != y[va]).sum())
    errors = {l2: wrong[l2] / len(y) for l2 in grid}
    best = min(errors.values())
    return max(l2 for l2, e in errors.items() if e == best), errors


def standardizer(X):
    """(mean per feature, one scale) of X: the scale is the root mean variance over the features, so
    (X - mean) / scale has unit mean variance and one penalty grid fits VAE codes and pixels alike. One
    scale, not one per feature: a VAE's inactive latent units have mu(x) ~ 0 for every image, and scaling
    each to unit variance would blow their noise up to the size of the informative units (measured on a
    50-latent VAE with 26 active units, 100 labels: 33.5 % test error per feature, 29.4 % with one scale)."""
    X = np.asarray(X, np.float64)
    return X.mean(axis=0), max(float(np.sqrt(X.var(axis=0).mean())), 1e-12)


def vae_features(model, x, sample=False, rng=None, batch=1000):
    """M1 features of images x (N, x_dim), host float64 (N, z_dim): the posterior means mu(x), or with
    ``sample`` one draw z = mu + exp(logvar / 2) eps per image (eps from ``rng``)."""
    from .. import backend
    from ..kernels import reparameterize_forward

    if sample and rng is None:
        raise ValueError("vae_features(sample=True) draws its noise from rng: pass a numpy Generator")
    out = []
    for s in range(0, len(x), batch):
        mu, logvar = model.encode(x[s:s + batch])
        z = mu
        if sample:
            eps = backend.to_device(rng.standard_normal(mu.shape, dtype=np.float32), model.dtype)
            z = reparameterize_forward(mu, logvar, eps)
        out.append(np.asarray(backend.to_host(z), np.float64))
    return np.concatenate(out)


def active_units(mu, threshold=ACTIVE_STD):
    """Indices j (sorted, int64) of the latent units whose posterior mean varies over the images:
    std_n mu_j(x_n) > threshold, for codes mu (N, z_dim). The rest are inactive (q(z_j|x) ~ p(z_j) for every
    x): their means are ~0 and their posterior samples pure N(0, 1) noise. Kingma et al. (2014) keep only the
    active units of the M1 VAE (their code: std > 0.1 over 1000 training images) as M2's input; Burda et al.
    (2016) count Cov_x(E_q[z_j]) > 0.01, the same threshold. threshold 0 keeps every unit that varies at all."""
    mu = np.asarray(mu, np.float64)
    if mu.ndim != 2 or mu.shape[0] < 2:
        raise ValueError(f"mu must be (n >= 2, z_dim) codes, got shape {mu.shape}")
    threshold = check_float(threshold, "threshold", lo=0)
    return np.flatnonzero(mu.std(axis=0) > threshold).astype(np.int64)


def prune_latents(vae, keep):
    """A copy of the (Gaussian-posterior) VAE restricted to the latent units ``keep``: z_dim = len(keep), the
    encoder's output layer keeps the columns of mu_keep and logvar_keep, the decoder's input layer the rows
    of z_keep; every other weight is copied. Its encode(x) is exactly (mu, logvar)[:, keep] of the original;
    its decoder is the original's with the dropped z_j set to 0 (the prior mean: for inactive units the
    decoder hardly depends on them)."""
    keep = np.asarray(keep, np.int64)
    Z = vae.z_dim
    if keep.ndim != 1 or len(keep) == 0 or len(np.unique(keep)) != len(keep) or keep.min() < 0 or keep.max() >= Z:
        raise ValueError(f"keep must be distinct indices into the {Z} latent units (at least one), got {keep.tolist()}")
    if getattr(vae, "flow", None) is not None:
        raise ValueError("prune_latents handles a Gaussian posterior q(z|x); this VAE has an IAF posterior")
    new = type(vae)(**dict(vae.config, z_dim=int(len(keep))))
    n_enc = max(int(k.split(".")[1]) for k in vae.params if k.startswith("encoder."))
    cols = np.concatenate([keep, Z + keep])
    for name, p in vae.params.items():
        v = p
        if name in (f"encoder.{n_enc}.W", f"encoder.{n_enc}.b"):
            v = p[..., vae.xp.asarray(cols)]
        elif name == "decoder.0.W":
            v = p[vae.xp.asarray(keep)]
        new.params[name][...] = v
    return new
