"""npdgm.inference and VAE.log_joint_and_grad_z: the z-gradient by finite differences, naive MC, HMC / MALA
on Gaussians with a known answer, ESS, and AIS / BDMC on a linear-Gaussian VAE whose log p(x) is exact."""
import math

import numpy as np
import pytest

from npdgm import inference as I
from npdgm.gradcheck import check
from npdgm.models.vae import VAE


def _vae(rng, **kw):
    m = VAE(**{"x_dim": 6, "hidden": (5, 4), "z_dim": 3, "activation": "tanh", **kw}, seed=3)
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape) * 0.3
    return m


def _data(m, rng, B=4):
    return rng.uniform(0, 1, (B, m.x_dim)) if m.likelihood == "bernoulli" else rng.standard_normal((B, m.x_dim))


@pytest.mark.parametrize("kw", [dict(likelihood="bernoulli"), dict(likelihood="gaussian", sigma=0.6),
                                dict(likelihood="gaussian")], ids=["bernoulli", "gauss-fixed", "gauss-learned"])
@pytest.mark.parametrize("chains", [None, 3])
def test_grad_z_finite_differences_and_value(f64, rng, kw, chains):
    m = _vae(rng, **kw)
    if m.learned_sigma:
        m.logvar_x.data[...] = rng.standard_normal(m.x_dim) * 0.5
    x = _data(m, rng)
    z = rng.standard_normal((4, 3) if chains is None else (chains, 4, 3)) * 1.5
    w = rng.standard_normal(z.shape[:-1])
    logp, g = m.log_joint_and_grad_z(x, z)
    rep = check(lambda: float(np.sum(m.log_joint_and_grad_z(x, z)[0] * w)), {"z": z}, {"z": w[..., None] * g})
    assert rep["z"][1] < 1e-6, rep
    # the value: log p(x|z) from the training loss's rows plus log N(z; 0, I), normalizing constants included
    zz = z.reshape(-1, 3)
    xt = np.broadcast_to(x, (zz.shape[0] // 4, 4, 6)).reshape(-1, 6)
    ref = -m._rec_rows(m.decoder.forward(zz), xt) - 0.5 * (zz ** 2).sum(1) - 1.5 * math.log(2 * math.pi)
    np.testing.assert_allclose(logp.reshape(-1), ref, rtol=1e-12)
    assert not m.flat_grads.any(), "the z-gradient must not touch the parameter gradients"


def test_grad_z_is_registered_in_gradcheck():
    from npdgm import checks  # noqa: F401
    from npdgm import gradcheck

    rows = gradcheck.run_all(["grad_z"], seed=0)
    assert len(rows) == 5 and all(r[4] for r in rows), rows          # 4 likelihoods x chains + the variance head


def test_grad_z_rejects_bad_shape(rng):
    m = _vae(rng)
    with pytest.raises(ValueError, match=r"z must have shape \(4, 3\)"):
        m.log_joint_and_grad_z(_data(m, rng), np.zeros((4, 2), np.float32))


# -- a linear-Gaussian VAE: x = z W + b + sigma n, p(x) = N(b, W^T W + sigma^2 I) exactly --------------------
def _linear_gaussian(D=5, Z=2, sigma=0.5, seed=0):
    m = VAE(x_dim=D, hidden=(), z_dim=Z, likelihood="gaussian", sigma=sigma, seed=seed)
    r = np.random.default_rng(seed)
    m.params["decoder.0.W"][...] = r.standard_normal((Z, D))
    m.params["decoder.0.b"][...] = r.standard_normal(D) * 0.3
    return m


def _exact_log_px(m, x):
    W, b = m.params["decoder.0.W"], m.params["decoder.0.b"]
    S = W.T @ W + m.sigma ** 2 * np.eye(m.x_dim)
    r = x - b
    _, logdet = np.linalg.slogdet(S)
    return -0.5 * (np.einsum("bi,ij,bj->b", r, np.linalg.inv(S), r) + logdet + m.x_dim * math.log(2 * math.pi))


def test_naive_mc_converges_to_exact_log_px(f64):
    m = _linear_gaussian()
    x, _ = I.simulate(m, 3, rng=1)
    exact = _exact_log_px(m, x)
    out = I.naive_log_px(m, x, 40000, rng=2, chunk=3000, counts=(10, 100))
    assert np.all(np.abs(out["est"] - exact) < 5 * out["se"] + 0.02), (out["est"], exact, out["se"])
    assert set(out["curve"]) == {10, 100} and np.all(out["curve"][10][1] > out["se"])


def test_hmc_recovers_gaussian_mean_and_cov(f64):
    mean, A = np.array([1.0, -2.0]), np.array([[1.0, 0.0], [0.9, 0.5]])
    cov = A @ A.T
    P = np.linalg.inv(cov)

    def target(z):
        r = z - mean
        return -0.5 * np.einsum("...i,ij,...j->...", r, P, r), -r @ P

    out = I.hmc(target, np.zeros((40, 2)), n=150, warmup=100, step=0.3, leapfrog=5, rng=0)
    s = out["samples"].reshape(-1, 2)
    np.testing.assert_allclose(s.mean(0), mean, atol=0.1)
    np.testing.assert_allclose(np.cov(s.T), cov, atol=0.15)
    assert 0.5 < out["accept"].mean() < 0.85
    assert np.all(out["ess"] > 300), out["ess"]
    # MALA on the same target
    out = I.langevin(target, np.zeros((40, 2)), n=300, warmup=100, step=0.3, rng=1)
    np.testing.assert_allclose(out["samples"][100:].reshape(-1, 2).mean(0), mean, atol=0.15)
    assert 0.4 < out["accept"].mean() < 0.75


def test_acceptance_tends_to_one_as_step_goes_to_zero(f64, rng):
    """Leapfrog conserves H to O(eps^2): a tiny step is accepted with probability ~1 (a broken gradient
    or a non-reversible integrator would fail this)."""
    m = _vae(rng)
    x = _data(m, rng)
    f = I.posterior_target(m, x)
    z = rng.standard_normal((2, 4, 3))
    state = (z,) + tuple(f(z))
    for eps, lo in [(1e-2, 0.99), (1e-4, 1 - 1e-6)]:
        _, prob = I.hmc_step(f, state, np.full((2, 4), eps), 5, np.random.default_rng(0))
        assert prob.min() > lo, (eps, prob.min())
        _, prob = I.mala_step(f, state, np.full((2, 4), eps), np.random.default_rng(0))
        assert prob.min() > lo, (eps, prob.min())


def test_unadjusted_langevin_accepts_everything(f64):
    out = I.langevin(lambda z: (-0.5 * (z * z).sum(-1), -z), np.zeros((8, 1)), n=20, warmup=0, step=0.2,
                     adjust=False)
    assert np.all(out["accept"] == 1) and np.all(out["step"] == 0.2)


def test_ess_of_iid_and_ar1_chains():
    r = np.random.default_rng(0)
    iid = r.standard_normal((1000, 8, 2))
    assert np.all(np.abs(I.effective_sample_size(iid) / 8000 - 1) < 0.2)
    rho, x = 0.9, np.zeros((4000, 8, 1))
    for t in range(1, 4000):
        x[t] = rho * x[t - 1] + math.sqrt(1 - rho ** 2) * r.standard_normal((8, 1))
    want = 32000 * (1 - rho) / (1 + rho)
    assert abs(I.effective_sample_size(x)[0] / want - 1) < 0.3


def test_schedule():
    for kind in ("linear", "sigmoid"):
        b = I.schedule(10, kind)
        assert b[0] == 0 and b[-1] == 1 and np.all(np.diff(b) > 0)
    with pytest.raises(ValueError, match="unknown schedule"):
        I.schedule(10, "cosine")


def test_ais_and_bdmc_sandwich_exact_log_px(f64):
    m = _linear_gaussian()
    out = I.bdmc(m, n=6, steps=300, chains=32, leapfrog=5, rng=0)
    exact = _exact_log_px(m, out["x"])
    lo, hi, ex = out["lower"].mean(), out["upper"].mean(), exact.mean()
    assert abs(lo - ex) < 0.05 and lo < ex + 0.02 < hi + 0.04, (lo, ex, hi)
    assert np.all(np.abs(out["lower"] - exact) < 0.15) and np.all(np.abs(out["upper"] - exact) < 0.15), out
    assert 0.5 < out["accept"][0] < 0.95


def test_ais_beats_prior_sampling_on_a_bernoulli_vae(rng):
    """On a nonlinear model AIS is at least as high as IWAE (both lower bounds) and far above a few naive
    samples; with one step AIS is the naive estimate."""
    m = _vae(rng, x_dim=20, z_dim=4)
    x = (rng.random((5, 20)) < 0.5).astype(np.float32)
    a = I.ais(m, x, steps=50, chains=8, leapfrog=5, rng=0)
    assert a["est"].shape == (5,) and 0 < a["accept"] <= 1
    iwae = m.log_likelihood(x, k=2000, rng=1)
    assert float(a["est"].mean()) > float(iwae.mean()) - 0.1


def test_elbo_estimate_is_the_mean_of_log_p_minus_log_q(f64, rng):
    """(1/k) sum_i [log p(x, z_i) - log q(z_i|x)] with log p(x, z) from log_joint_and_grad_z, log q written out."""
    m = _vae(rng)
    x = _data(m, rng)
    eps = np.random.default_rng(5).standard_normal((7, 4, 3))

    class G:  # a Generator that hands the estimator this noise
        def standard_normal(self, shape, dtype=None):
            assert shape == eps.shape
            return eps
    mu, logvar = m.encode(x)
    z = mu + np.exp(0.5 * logvar) * eps
    logq = -0.5 * (eps ** 2 + logvar + math.log(2 * math.pi)).sum(-1)
    want = (m.log_joint_and_grad_z(x, z)[0] - logq).mean(0)
    np.testing.assert_allclose(I.elbo_estimate(m, x, 7, rng=G()), want, rtol=1e-10)
    assert np.all(I.elbo_estimate(m, x, 300, rng=2) < m.log_likelihood(x, k=300, rng=1))


def test_naive_curve_and_its_figure_one_panel_per_latent_dimension(tmp_path, rng):
    from npdgm.plots.inference import naive_vs_iwae

    curves = []
    for z in (2, 5):
        m = _vae(rng, x_dim=10, z_dim=z)
        x = (rng.random((3, 10)) < 0.5).astype(np.float32)
        c = I.naive_curve(m, x, counts=(1, 10, 100), repeats=3, rng=0)
        assert c["naive"].shape == (3, 3) and c["iwae"].shape == (3, 3) and c["z_dim"] == z
        assert c["naive"][:, 0].std() > c["naive"][:, 2].std()   # the spread over repeats shrinks with N
        assert np.all(c["iwae"][:, 0] <= c["iwae"][:, 2] + 0.5)
        curves.append(c)
    capped = I.naive_curve(m, x, counts=(1, 10, 100), repeats=2, rng=0, iwae_max=10)
    assert np.isfinite(capped["iwae"][:, :2]).all() and np.isnan(capped["iwae"][:, 2]).all()
    assert np.isfinite(capped["naive"]).all()
    curves.append(capped)
    path = naive_vs_iwae(curves, str(tmp_path / "n.png"), reference=-5.0)
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[1] > 1000   # three panels side by side


def test_impute_hmc_matches_gaussian_conditioning_of_a_linear_gaussian_vae(f64):
    """p(x) = N(b, S): E[x_m | x_o] = b_m + S_mo S_oo^-1 (x_o - b_o) exactly; HMC on p(z | x_o) gets there."""
    m = _linear_gaussian(D=6, Z=2, sigma=0.4)
    x, _ = I.simulate(m, 3, rng=4)
    mask = np.zeros((3, 6), bool)
    mask[:, 4:] = True
    W, b = m.params["decoder.0.W"], m.params["decoder.0.b"]
    S = W.T @ W + 0.16 * np.eye(6)
    want = b[4:] + (x[:, :4] - b[:4]) @ np.linalg.solve(S[:4, :4], S[:4, 4:])
    got, out = I.impute_hmc(m, x, mask, chains=16, n=150, warmup=100, leapfrog=5, rng=0)
    np.testing.assert_allclose(got[:, 4:], want, atol=0.06)
    np.testing.assert_array_equal(got[:, :4], x[:, :4])
    assert 0.5 < out["accept"].mean() < 0.85
    # the masked target: the missing pixels do not change log p(x_o, z) or its gradient
    f, x2 = I.posterior_target(m, x, ~mask), x.copy()
    x2[:, 4:] += 3.0
    z = np.random.default_rng(0).standard_normal((2, 3, 2))
    for a, c in zip(f(z), I.posterior_target(m, x2, ~mask)(z)):
        np.testing.assert_allclose(a, c, rtol=1e-12)


def test_grad_z_with_observed_pixels_finite_differences(f64, rng):
    for kw in (dict(likelihood="bernoulli"), dict(likelihood="gaussian")):
        m = _vae(rng, **kw)
        x, z, obs = _data(m, rng), rng.standard_normal((2, 4, 3)), rng.random((4, 6)) < 0.5
        g = m.log_joint_and_grad_z(x, z, observed=obs)[1]
        rep = check(lambda: float(np.sum(m.log_joint_and_grad_z(x, z, observed=obs)[0])), {"z": z}, {"z": g})
        assert rep["z"][1] < 1e-6, rep


# -- the AIS hot loop and the shared-draw naive MC --------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bernoulli_loglik_fast_path_matches_log_joint(rng, dtype):
    from npdgm import backend

    with backend.use("numpy", np.dtype(dtype).name):
        m = VAE(x_dim=50, hidden=(16,), z_dim=3, seed=2)
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape) * 3   # logits far past +-88 in places
    x = rng.uniform(0, 1, (4, 50)).astype(dtype)
    x[:, :10] = rng.uniform(0, 1, (4, 10)) < 0.5
    z = (rng.standard_normal((5, 4, 3)) * 3).astype(dtype)
    f = I._loglik(m, x)
    assert np.abs(m.decoder.forward(z.reshape(-1, 3))).max() > 100
    ll, g = f(z)
    lj, gj = m.log_joint_and_grad_z(x, z)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(ll, lj - I._log_prior(z), rtol=tol, atol=tol * 100)
    assert ll.dtype == np.float64 and g.dtype == dtype
    np.testing.assert_allclose(g, gj + z, rtol=tol, atol=tol * 100)
    np.testing.assert_allclose(f.grad(z), g, atol=tol * np.abs(g).max())   # sigmoid by another formula


def test_leapfrog_inner_steps_call_the_gradient_only(rng):
    calls = {"full": 0, "grad": 0}
    P = np.array([[2.0, 0.3], [0.3, 0.5]])

    def full(z):
        calls["full"] += 1
        return -0.5 * np.einsum("...i,ij,...j->...", z, P, z), -z @ P

    def grad(z):
        calls["grad"] += 1
        return -z @ P

    z0, p0 = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    ref = I.leapfrog(full, z0, full(z0)[1], p0, 0.1, 5)
    full.grad = grad
    calls.update(full=0, grad=0)
    got = I.leapfrog(full, z0, full(z0)[1], p0, 0.1, 5)
    assert calls == {"full": 2, "grad": 4}             # 1 start (the caller's) + 1 end; 4 inner points
    for a, b in zip((ref[0], ref[1][0], ref[2]), (got[0], got[1][0], got[2])):
        np.testing.assert_allclose(a, b, rtol=1e-14)


@pytest.mark.parametrize("kw", [dict(likelihood="bernoulli"), dict(likelihood="gaussian", sigma=0.6),
                                dict(likelihood="gaussian")], ids=["bernoulli", "gauss-fixed", "gauss-learned"])
def test_naive_table_and_shared_draws(f64, rng, kw):
    m = _vae(rng, **kw)
    if m.learned_sigma:
        m.logvar_x.data[...] = rng.standard_normal(m.x_dim) * 0.5
    x = _data(m, rng, B=5)
    out = m.decoder.forward(rng.standard_normal((7, 3)))
    tab = I._loglik_table(m, x, out)
    ref = np.stack([-m._rec_rows(out, np.broadcast_to(xb, out.shape)) for xb in x])
    np.testing.assert_allclose(tab, ref, rtol=1e-12)
    # the draws are shared by the rows: row b's estimate is the one x[b] alone gets from the same stream
    full = I.naive_log_px(m, x, 50, rng=7, chunk=8, counts=(20,))
    one = I.naive_log_px(m, x[2:3], 50, rng=7, chunk=8, counts=(20,))
    np.testing.assert_allclose(full["est"][2], one["est"][0], rtol=1e-12)
    np.testing.assert_allclose(full["curve"][20][0][2], one["curve"][20][0][0], rtol=1e-12)


def test_naive_mc_at_small_k_is_logmeanexp_of_its_own_draws(f64):
    """Replays the estimator's k prior draws: est = logmeanexp_i log p(x|z_i) (a mean over k, not k + 1) and
    se = std_i(w_i) / (sqrt(k) mean_i(w_i)) with the population std; k = 7 draws, so a wrong count shows."""
    m = _linear_gaussian()
    x, _ = I.simulate(m, 3, rng=1)
    k = 7
    out = I.naive_log_px(m, x, k, rng=np.random.default_rng(4), chunk=100)
    z = np.random.default_rng(4).standard_normal((k, m.z_dim))
    lw = I._loglik_table(m, x, m.decoder.forward(z))                   # (B, k)
    np.testing.assert_allclose(out["est"], I.logmeanexp(lw, axis=1), rtol=1e-12)
    w = np.exp(lw - lw.max(axis=1, keepdims=True))
    np.testing.assert_allclose(out["se"], w.std(axis=1) / (math.sqrt(k) * w.mean(axis=1)), rtol=1e-9)


def test_ais_standard_error_is_the_delta_method_over_its_returned_log_weights(f64):
    """AIS's se over C chains is std_c(w_c) / (sqrt(C) mean_c(w_c)), w = exp(log w): checked against the
    log-weights it returns (C = 5, so sqrt(C - 1) or a sample std would show)."""
    m = _linear_gaussian()
    x, _ = I.simulate(m, 4, rng=1)
    a = I.ais(m, x, steps=10, chains=5, leapfrog=2, rng=0)
    logw = np.asarray(a["logw"])
    assert logw.shape == (5, 4)
    np.testing.assert_allclose(a["est"], I.logmeanexp(logw, axis=0), rtol=1e-12)
    w = np.exp(logw - logw.max(axis=0))
    np.testing.assert_allclose(a["se"], w.std(axis=0) / (math.sqrt(5) * w.mean(axis=0)), rtol=1e-12)
    assert np.all(a["se"] > 0)
