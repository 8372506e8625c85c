"""Gaussian mixture fitted by EM: monotone log-likelihood, parameter recovery, a hand-computed 1-D step,
brute-force densities, scikit-learn agreement (when installed), sampling moments, save/load, the PCA
mixture's full-space density, the CLI, and bad input."""
import json
import math
import os
import warnings

import numpy as np
import pytest
from scipy.stats import multivariate_normal

import npdgm
from npdgm.models import GaussianMixture, PCAGaussianMixture

COV_TYPES = ("full", "diag", "spherical")


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """These small GEMMs run fastest on one BLAS thread (and do not fight the other test files for cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield
INITS = ("kmeans", "k-means++", "random", "random_from_data")


def blobs(n, D, K, seed, scale=0.5, spread=3.0):
    """n points from K anisotropic Gaussian blobs in D dims (means ~ N(0, spread^2))."""
    g = np.random.default_rng(seed)
    c = g.normal(0, spread, (K, D))
    A = g.normal(0, scale, (K, D, D))
    lab = g.integers(0, K, n)
    return c[lab] + np.einsum("nij,nj->ni", A[lab], g.standard_normal((n, D)))


def truth_cov(ct, cov_full):
    if ct == "full":
        return cov_full
    if ct == "diag":
        return np.diagonal(cov_full, axis1=1, axis2=2).copy()
    return np.diagonal(cov_full, axis1=1, axis2=2).mean(1)


def full_cov(gm):
    """The model's covariances as (K, D, D) host arrays whatever the covariance type."""
    c, D = np.asarray(gm.covariances_), gm.dim
    if gm.covariance_type == "full":
        return c
    if gm.covariance_type == "diag":
        return np.stack([np.diag(v) for v in c])
    return np.stack([np.eye(D) * v for v in c])


def brute_logpdf(gm, x):
    """log sum_k pi_k N(x; mu_k, Sigma_k) with scipy, one component at a time."""
    lp = np.stack([math.log(w) + multivariate_normal(m, c).logpdf(x)
                   for w, m, c in zip(gm.weights_, gm.means_, full_cov(gm))], 1)
    mx = lp.max(1, keepdims=True)
    return (mx + np.log(np.exp(lp - mx).sum(1, keepdims=True)))[:, 0]


# -- EM never lowers the log-likelihood -------------------------------------------------------------------------------
@pytest.mark.parametrize("ct", COV_TYPES)
@pytest.mark.parametrize("init", INITS)
def test_log_likelihood_never_decreases(ct, init):
    x = blobs(1200, 3, 4, seed=1)
    # exact EM (reg_covar = 0): non-decreasing up to float64 rounding. With reg_covar > 0 the M-step returns
    # S_k + reg I instead of the maximizer S_k, so a step may lose O(reg^2 / var^2) (~1e-11 here), no more.
    for reg, slack in ((0.0, 1e-12), (1e-6, 1e-9)):
        gm = GaussianMixture(4, ct, reg_covar=reg, init=init, tol=0, max_iter=40, seed=2).fit(x)
        h = np.array(gm.history_)
        assert len(h) == gm.n_iter_ + 1 == 41
        assert np.all(np.diff(h) >= -slack * abs(h[-1])), (reg, np.diff(h).min())
        assert h[-1] > h[0]
        assert gm.history_[-1] == pytest.approx(gm.score(x), abs=1e-12)


def test_stops_at_tol_and_converged_flag():
    x = blobs(800, 2, 3, seed=4)
    gm = GaussianMixture(3, tol=1e-3, max_iter=500).fit(x)
    assert gm.converged_ and gm.n_iter_ < 500
    assert abs(gm.history_[-1] - gm.history_[-2]) < 1e-3
    assert all(abs(b - a) >= 1e-3 for a, b in zip(gm.history_[:-2], gm.history_[1:-1]))
    gm = GaussianMixture(3, tol=0, max_iter=3).fit(x)
    assert not gm.converged_ and gm.n_iter_ == 3


# -- recovers a known mixture -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("ct", COV_TYPES)
def test_recovers_known_mixture(ct):
    g = np.random.default_rng(7)
    w = np.array([0.5, 0.3, 0.2])
    mu = np.array([[-4.0, 0.0], [3.0, 3.0], [3.0, -3.0]])
    full = np.array([[[1.0, 0.6], [0.6, 1.0]], [[0.5, -0.2], [-0.2, 0.8]], [[0.3, 0.0], [0.0, 1.5]]])
    if ct != "full":  # draw from a mixture the model class can represent
        full = np.stack([np.diag(v) for v in np.diagonal(full, axis1=1, axis2=2)])
        if ct == "spherical":
            full = np.stack([np.eye(2) * np.trace(c) / 2 for c in full])
    n = 20000
    lab = g.choice(3, n, p=w)
    L = np.linalg.cholesky(full)
    x = mu[lab] + np.einsum("nij,nj->ni", L[lab], g.standard_normal((n, 2)))
    gm = GaussianMixture(3, ct, seed=0, tol=1e-6).fit(x)
    order = [int(np.argmin(((gm.means_ - m) ** 2).sum(1))) for m in mu]
    assert sorted(order) == [0, 1, 2]
    # standard errors at n=20000 are ~0.01-0.02; margins ~4-5 of them
    np.testing.assert_allclose(gm.weights_[order], w, atol=0.015)
    np.testing.assert_allclose(gm.means_[order], mu, atol=0.05)
    np.testing.assert_allclose(gm.covariances_[order], truth_cov(ct, full), atol=0.06)
    assert (gm.predict(x) == np.array(order)[lab]).mean() > 0.99


# -- one EM step in 1-D, computed by hand -----------------------------------------------------------------------------
def test_one_em_step_1d_by_hand():
    xs = [-2.0, -1.0, 0.0, 1.0, 3.0]
    w, m, v = [0.4, 0.6], [-1.0, 1.5], [1.0, 2.0]

    def normal(x, mean, var):
        return math.exp(-(x - mean) ** 2 / (2 * var)) / math.sqrt(2 * math.pi * var)

    # E-step: r_nk = w_k N(x_n; m_k, v_k) / sum_j w_j N(x_n; m_j, v_j); log-likelihood of the start
    joint = [[w[k] * normal(x, m[k], v[k]) for k in range(2)] for x in xs]
    ll0 = sum(math.log(a + b) for a, b in joint) / len(xs)
    r = [[a / (a + b), b / (a + b)] for a, b in joint]
    # M-step: N_k = sum_n r_nk, w_k = N_k / N, m_k = sum r x / N_k, v_k = sum r (x - m_k)^2 / N_k
    nk = [sum(rn[k] for rn in r) for k in range(2)]
    w1 = [nk[k] / len(xs) for k in range(2)]
    m1 = [sum(rn[k] * x for rn, x in zip(r, xs)) / nk[k] for k in range(2)]
    v1 = [sum(rn[k] * (x - m1[k]) ** 2 for rn, x in zip(r, xs)) / nk[k] for k in range(2)]
    ll1 = sum(math.log(sum(w1[k] * normal(x, m1[k], v1[k]) for k in range(2))) for x in xs) / len(xs)

    x = np.array(xs)[:, None]
    cov0 = {"full": np.array(v)[:, None, None], "diag": np.array(v)[:, None], "spherical": np.array(v)}
    for ct in COV_TYPES:
        gm = GaussianMixture(2, ct, reg_covar=0.0, tol=0, max_iter=1)
        gm.fit(x, weights_init=np.array(w), means_init=np.array(m)[:, None], covariances_init=cov0[ct])
        assert gm.history_[0] == pytest.approx(ll0, rel=1e-13)
        assert gm.history_[1] == pytest.approx(ll1, rel=1e-13)
        np.testing.assert_allclose(gm.weights_, w1, rtol=1e-13)
        np.testing.assert_allclose(gm.means_[:, 0], m1, rtol=1e-13)
        np.testing.assert_allclose(np.asarray(gm.covariances_).reshape(2), v1, rtol=1e-13)
    # and the E-step of the updated model, as responsibilities and as hard labels
    joint1 = [[w1[k] * normal(xx, m1[k], v1[k]) for k in range(2)] for xx in xs]
    r1 = np.array([[a / (a + b), b / (a + b)] for a, b in joint1])
    np.testing.assert_allclose(gm.predict_proba(x), r1, rtol=1e-12)
    np.testing.assert_array_equal(gm.predict(x), r1.argmax(1))


# -- densities, criteria ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ct", COV_TYPES)
def test_score_samples_matches_scipy(ct):
    x = blobs(600, 3, 3, seed=5)
    gm = GaussianMixture(3, ct, seed=1).fit(x)
    xt = blobs(200, 3, 3, seed=6)
    np.testing.assert_allclose(gm.score_samples(xt), brute_logpdf(gm, xt), rtol=1e-10, atol=1e-10)
    assert gm.score(xt) == pytest.approx(brute_logpdf(gm, xt).mean(), rel=1e-10)
    p = gm.predict_proba(xt)
    np.testing.assert_allclose(p.sum(1), 1, atol=1e-12)
    np.testing.assert_array_equal(gm.predict(xt), p.argmax(1))
    K, D = 3, 3
    n_cov = {"full": K * D * (D + 1) // 2, "diag": K * D, "spherical": K}[ct]
    assert gm.n_parameters() == K - 1 + K * D + n_cov
    N = len(x)
    assert gm.bic(x) == pytest.approx(-2 * N * gm.score(x) + gm.n_parameters() * math.log(N), rel=1e-12)
    assert gm.aic(x) == pytest.approx(-2 * N * gm.score(x) + 2 * gm.n_parameters(), rel=1e-12)


def test_bic_prefers_the_true_number_of_components():
    x = blobs(3000, 2, 3, seed=11, scale=0.4, spread=4.0)
    bics = {k: GaussianMixture(k, seed=0, n_init=2).fit(x).bic(x) for k in (1, 2, 3, 4, 6)}
    assert min(bics, key=bics.get) == 3, bics


def test_far_points_do_not_underflow():
    gm = GaussianMixture(2, "full", seed=0).fit(blobs(300, 2, 2, seed=3))
    far = np.array([[1e3, -1e3], [50.0, 50.0]])
    lp = gm.score_samples(far)
    assert np.all(np.isfinite(lp)) and np.all(lp < -100)
    np.testing.assert_allclose(gm.predict_proba(far).sum(1), 1)


# -- scikit-learn agreement -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ct", COV_TYPES)
def test_agrees_with_sklearn(ct):
    skm = pytest.importorskip("sklearn.mixture")
    x = blobs(1500, 3, 4, seed=8)
    # 1) from the same starting parameters, 7 EM iterations give the same parameters
    ours0 = GaussianMixture(4, ct, seed=3).fit(x)  # any reasonable start
    w0, m0, c0 = ours0.weights_.copy(), ours0.means_ + 0.3, np.asarray(ours0.covariances_) * 1.5
    prec0 = np.linalg.inv(c0) if ct == "full" else 1.0 / c0
    ours = GaussianMixture(4, ct, tol=0, max_iter=7).fit(x, weights_init=w0, means_init=m0, covariances_init=c0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = skm.GaussianMixture(4, covariance_type=ct, tol=0, max_iter=7, weights_init=w0, means_init=m0,
                                 precisions_init=prec0).fit(x)
    np.testing.assert_allclose(ours.weights_, sk.weights_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours.means_, sk.means_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(ours.covariances_, sk.covariances_, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(ours.score_samples(x), sk.score_samples(x), rtol=1e-9, atol=1e-9)
    assert ours.bic(x) == pytest.approx(sk.bic(x), rel=1e-9)
    np.testing.assert_array_equal(ours.predict(x), sk.predict(x))
    # 2) converged fits from their own k-means starts reach the same optimum on separated blobs
    ours = GaussianMixture(4, ct, tol=1e-8, max_iter=500, seed=0).fit(x)
    sk = skm.GaussianMixture(4, covariance_type=ct, tol=1e-8, max_iter=500, random_state=0).fit(x)
    assert ours.score(x) == pytest.approx(sk.score(x), abs=1e-6)


# -- sampling ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ct", COV_TYPES)
def test_sample_moments_and_labels(ct):
    gm = GaussianMixture(3, ct, seed=0).fit(blobs(900, 2, 3, seed=9))
    n = 200_000
    s, lab = gm.sample(n, rng=5, return_labels=True)
    assert s.shape == (n, 2) and s.dtype == gm.means_.dtype
    w, mu, cov = gm.weights_, gm.means_, full_cov(gm)
    mean = w @ mu
    second = np.einsum("k,kij->ij", w, cov + np.einsum("ki,kj->kij", mu, mu)) - np.outer(mean, mean)
    sd = np.sqrt(np.diag(second))
    np.testing.assert_allclose(s.mean(0), mean, atol=5 * (sd / math.sqrt(n)).max())
    np.testing.assert_allclose(np.cov(s.T), second, atol=0.02 * np.abs(second).max())
    freq = np.bincount(lab, minlength=3) / n
    np.testing.assert_allclose(freq, w, atol=5 * math.sqrt(0.25 / n))
    for k in range(3):  # each component's points have that component's mean and covariance
        sk = s[lab == k]
        np.testing.assert_allclose(sk.mean(0), mu[k], atol=0.03 * math.sqrt(cov[k].max()) + 0.01)
    np.testing.assert_array_equal(gm.sample(10, rng=3), gm.sample(10, rng=3))


# -- determinism, dtype, persistence ----------------------------------------------------------------------------------
def test_seeded_and_n_init_keeps_the_best():
    x = blobs(800, 2, 5, seed=12)
    a = GaussianMixture(5, init="k-means++", seed=4).fit(x)
    b = GaussianMixture(5, init="k-means++", seed=4).fit(x)
    np.testing.assert_array_equal(a.means_, b.means_)
    g = np.random.default_rng(0)   # n_init trials draw their starts one after another from one Generator
    singles = [GaussianMixture(5, init="random_from_data").fit(x, rng=g).lower_bound_ for _ in range(4)]
    assert len(set(singles)) > 1
    best = GaussianMixture(5, init="random_from_data", n_init=4, seed=0).fit(x)
    assert best.lower_bound_ == max(singles)
    assert best.lower_bound_ == pytest.approx(best.score(x), abs=1e-12)


def test_float32_fit_keeps_dtype():
    x = blobs(1000, 2, 3, seed=13).astype(np.float32)
    gm = GaussianMixture(3, seed=0).fit(x)
    assert gm.means_.dtype == np.float32 and gm.score_samples(x).dtype == np.float32
    g64 = GaussianMixture(3, seed=0).fit(x.astype(np.float64))
    assert gm.score(x) == pytest.approx(g64.score(x), abs=1e-3)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_save_load_round_trip(tmp_path, ct):
    x = blobs(500, 3, 3, seed=14)
    gm = GaussianMixture(3, ct, seed=0).fit(x)
    path = tmp_path / "gmm.npz"
    gm.save(path)
    back = npdgm.load(path)
    assert isinstance(back, GaussianMixture) and back.covariance_type == ct and back.dim == 3
    np.testing.assert_array_equal(back.score_samples(x), gm.score_samples(x))
    np.testing.assert_array_equal(back.sample(5, rng=1), gm.sample(5, rng=1))
    from npdgm.io import load_arrays

    meta = load_arrays(path)[1]
    assert meta["kind"] == "gmm" and meta["fit"]["history"] == gm.history_
    with pytest.raises(ValueError, match="not fitted"):
        GaussianMixture(2).save(tmp_path / "x.npz")


# -- the PCA mixture: a proper density on the full space --------------------------------------------------------------
def _low_rank_data(n, D, seed):
    g = np.random.default_rng(seed)
    A = g.normal(0, 1, (D, D)) * np.linspace(2, 0.05, D)[None]
    return g.standard_normal((n, D)) @ A.T + 0.5


@pytest.mark.parametrize("residual", ("full", "isotropic"))
def test_pca_mixture_with_one_component_is_the_gaussian_it_should_be(residual):
    D, d, reg = 6, 2, 1e-6
    x = _low_rank_data(3000, D, seed=15)
    m = PCAGaussianMixture(D, d, n_components=1, residual=residual, reg_covar=reg).fit(x)
    mean = x.mean(0)
    S = np.cov(x.T, bias=True)
    lam, vec = np.linalg.eigh(S)
    lam, vec = lam[::-1], vec[:, ::-1]
    if residual == "full":  # V diag(lam_top + reg) V^T + U diag(lam_rest + reg) U^T = S + reg I
        C = S + reg * np.eye(D)
    else:  # probabilistic PCA: V diag(lam_top + reg) V^T + s2 (I - V V^T)
        V = vec[:, :d]
        s2 = lam[d:].mean() + reg
        C = V @ np.diag(lam[:d] + reg) @ V.T + s2 * (np.eye(D) - V @ V.T)
    xt = _low_rank_data(300, D, seed=16)
    np.testing.assert_allclose(m.score_samples(xt), multivariate_normal(mean, C).logpdf(xt), rtol=1e-8, atol=1e-8)
    s = m.sample(100_000, rng=0)
    np.testing.assert_allclose(np.cov(s.T), C, atol=0.03 * np.abs(C).max())
    assert m.n_parameters() > m.gmm.n_parameters()


def test_pca_mixture_save_load_and_pca_space_score(tmp_path):
    x = _low_rank_data(1500, 8, seed=17)
    m = PCAGaussianMixture(8, 3, n_components=2, seed=0, residual_reg=1e-3).fit(x)
    lam = np.linalg.eigvalsh(np.cov(x.T, bias=True))[::-1]
    np.testing.assert_allclose(m.residual_var.data, lam[3:] + 1e-3, rtol=1e-10)   # the floor is added
    np.testing.assert_allclose(m.score_samples_pca(x), m.gmm.score_samples((x - x.mean(0)) @ m.components.data))
    np.testing.assert_allclose(m.score_samples(x), m.score_samples_pca(x) + m.residual_logprob(x))
    m.save(tmp_path / "p.npz")
    back = npdgm.load(tmp_path / "p.npz")
    assert isinstance(back, PCAGaussianMixture) and back.residual == "full" and back.residual_reg == 1e-3
    np.testing.assert_array_equal(back.score_samples(x), m.score_samples(x))
    with pytest.raises(ValueError, match="not fitted"):
        PCAGaussianMixture(8, 3).score_samples(x)
    with pytest.raises(ValueError, match="pca_dim"):
        PCAGaussianMixture(8, 9)
    with pytest.raises(ValueError, match="residual"):
        PCAGaussianMixture(8, 3, residual="diag")
    with pytest.raises(ValueError, match="residual_reg"):
        PCAGaussianMixture(8, 3, residual_reg=-1.0)
    with pytest.raises(ValueError, match=r"shape \(n_points, 8\)"):
        m.score_samples(x[:, :5])


# -- bad input --------------------------------------------------------------------------------------------------------
def test_bad_input():
    x = blobs(50, 2, 2, seed=18)
    with pytest.raises(ValueError, match="n_components=60 is larger than the number of points"):
        GaussianMixture(60).fit(x)
    with pytest.raises(ValueError, match="unknown covariance_type 'tied'"):
        GaussianMixture(2, "tied")
    with pytest.raises(ValueError, match="unknown init"):
        GaussianMixture(2, init="kmeans+++")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n_components"):
            GaussianMixture(bad)
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianMixture(2, reg_covar=-1)
    with pytest.raises(ValueError, match="tol"):
        GaussianMixture(2, tol=float("nan"))
    with pytest.raises(ValueError, match="max_iter"):
        GaussianMixture(2, max_iter=0)
    with pytest.raises(ValueError, match=r"2-D array.*reshape\(-1, 1\)"):
        GaussianMixture(2).fit(x[:, 0])
    with pytest.raises(ValueError, match="2-D array"):
        GaussianMixture(2).fit(x[None])
    xn = x.copy()
    xn[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"x contains non-finite values \(1 NaN, 0 inf\)"):
        GaussianMixture(2).fit(xn)
    with pytest.raises(ValueError, match="not fitted"):
        GaussianMixture(2).score_samples(x)
    gm = GaussianMixture(2, seed=0).fit(x)
    with pytest.raises(ValueError, match="x has 3 features, the mixture was fitted on 2"):
        gm.score_samples(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        gm.predict(xn)
    with pytest.raises(ValueError, match="together"):
        GaussianMixture(2).fit(x, means_init=gm.means_)
    with pytest.raises(ValueError, match="covariances must have shape"):
        GaussianMixture(2).fit(x, weights_init=gm.weights_, means_init=gm.means_, covariances_init=np.ones((2, 2)))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(2).fit(x, weights_init=np.array([0.9, 0.9]), means_init=gm.means_,
                               covariances_init=gm.covariances_)
    with pytest.raises(ValueError, match="n must be"):
        gm.sample(0)


@pytest.mark.parametrize("ct", COV_TYPES)
def test_singular_covariance_suggests_reg_covar(ct):
    g = np.random.default_rng(19)
    # a cluster of 60 copies of one point: its component collapses to zero covariance
    collapsed = np.concatenate([g.standard_normal((200, 2)), np.tile([[8.0, 8.0]], (60, 1))])
    datasets = [collapsed]
    if ct != "spherical":  # a feature with no variance at all (spherical averages it away)
        datasets.append(np.stack([g.standard_normal(200), np.zeros(200)], 1))
    for x in datasets:
        with pytest.raises(ValueError, match="singular covariance.*increase reg_covar"):
            GaussianMixture(2, ct, reg_covar=0.0, seed=0).fit(x)
        gm = GaussianMixture(2, ct, reg_covar=1e-6, seed=0).fit(x)   # the suggested fix works
        assert np.isfinite(gm.score(x))


def test_singular_initial_covariance_is_reported():
    x = blobs(100, 2, 2, seed=20)
    with pytest.raises(ValueError, match=r"component\(s\) \[1\] is not positive definite"):
        GaussianMixture(2, reg_covar=0).fit(x, weights_init=np.array([0.5, 0.5]), means_init=x[:2],
                                            covariances_init=np.stack([np.eye(2), np.ones((2, 2))]))


# -- GPU (skipped without CuPy and a GPU) -----------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("ct", COV_TYPES)
def test_cupy_matches_numpy(cupy, ct):
    x = blobs(2000, 4, 3, seed=21)
    a = GaussianMixture(3, ct, seed=0, tol=0, max_iter=20).fit(x)
    b = GaussianMixture(3, ct, seed=0, tol=0, max_iter=20).fit(cupy.asarray(x))
    assert type(b.means_).__module__.startswith("cupy")
    np.testing.assert_allclose(cupy.asnumpy(b.means_), a.means_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b.history_, a.history_, rtol=1e-10)
    np.testing.assert_allclose(cupy.asnumpy(b.sample(50, rng=2)), a.sample(50, rng=2), rtol=1e-8, atol=1e-10)


# -- the command line -------------------------------------------------------------------------------------------------
def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_moons(tmp_path):
    from npdgm.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "gmm", "--dataset", "moons", "--n-train", "3000", "--n-test", "1000", "--components",
                 "6", "--out", out, "--no-progress"]) == 0
    for f in ("checkpoint.npz", "metrics.jsonl", "summary.json", "density.png", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    recs = _metrics(out)
    tr = [r["train_nll"] for r in recs]
    assert recs[0]["iteration"] == 0 and all(b <= a + 1e-12 for a, b in zip(tr, tr[1:]))
    summary = json.load(open(os.path.join(out, "summary.json")))
    model = npdgm.load(out)
    from npdgm.commands.gmm import load_data

    _, x_te = load_data({"dataset": "moons", "seed": 0, "n_train": 3000, "n_test": 1000})
    assert summary["test_nll"] == pytest.approx(-model.score(x_te), rel=1e-12)
    assert summary["test_nll"] == pytest.approx(recs[-1]["test_nll"], rel=1e-12)
    assert 1.0 < summary["test_nll"] < 2.5   # moons at 2x scale; K=6 gets ~1.9 nats


def test_cli_mnist_small(tmp_path):
    from npdgm.cli import main

    out = str(tmp_path / "mnist")
    assert main(["train", "gmm", "--dataset", "mnist", "--train-limit", "1500", "--test-limit", "300", "--pca-dim",
                 "20", "--components", "3", "--max-iter", "5", "--out", out, "--no-progress"]) == 0
    for f in ("checkpoint.npz", "metrics.jsonl", "summary.json", "means.png", "samples.png", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["pca_dim"] == 20 and "[0,1]^784" in s["nll_space"]
    assert s["test_bpd"] == pytest.approx((s["test_nll"] / 784 + math.log(256)) / math.log(2))
    model = npdgm.load(out)
    assert isinstance(model, PCAGaussianMixture) and model.gmm.dim == 20
    r = _metrics(out)[-1]
    assert r["test_nll"] == pytest.approx(s["test_nll"], rel=1e-10)
    assert {"train_nll", "test_nll", "train_nll_pca", "test_nll_pca", "test_bpd"} <= set(r)


@pytest.mark.parametrize("argv, msg", [
    (["--components", "0"], "--components must be >= 1"),
    (["--tol", "-1"], "--tol must be >= 0"),
    (["--components", "5000", "--n-train", "100"], "larger than the number of points"),
    (["--dataset", "mnist", "--pca-dim", "900", "--train-limit", "50", "--test-limit", "10"], "--pca-dim"),
])
def test_cli_bad_input(tmp_path, capsys, argv, msg):
    from npdgm.cli import main

    assert main(["train", "gmm", "--out", str(tmp_path / "r"), "--no-progress", "--no-plots"] + argv) == 2
    assert msg in capsys.readouterr().err


def test_kmeans_lives_in_its_own_module(rng):
    """k-means moved out of gmm.py (issue 14): models/kmeans.py, used by the mixture's default init."""
    from npdgm.models import gmm, kmeans

    assert gmm.kmeans is kmeans.kmeans and gmm.kmeans_plusplus is kmeans.kmeans_plusplus
    x = np.concatenate([rng.standard_normal((50, 2)) * 0.1 + c for c in ([0, 0], [5, 5], [0, 5])])
    centers = kmeans.kmeans(x, kmeans.kmeans_plusplus(x, 3, np.random.default_rng(0)))
    labels = kmeans.nearest(x, centers)
    assert sorted(np.bincount(labels).tolist()) == [50, 50, 50]
    np.testing.assert_allclose(sorted(centers.round(0).tolist()), [[0, 0], [0, 5], [5, 5]], atol=1e-12)
