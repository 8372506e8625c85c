"""npdgm.study: the change of variables worked in 1-D and 2-D with npdgm flows, and the ELBO gap as a KL to float64
precision (closed forms for a linear-Gaussian VAE, quadrature for a nonlinear 1-D latent VAE)."""
import math

import numpy as np
import pytest

from npdgm import inference, study
from npdgm.models.vae import VAE


def test_affine_1d_flow_is_the_pushed_forward_density_and_integrates_to_one():
    flow = study.affine_flow_1d(2.0, 1.0)
    x = np.linspace(-25, 27, 200_001)[:, None]
    lp = flow.log_prob(x)
    np.testing.assert_allclose(lp, -0.5 * ((x[:, 0] - 1) / 2) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(2),
                               rtol=1e-13, atol=1e-13)                   # N(1, 4): the density halves
    assert abs(np.trapezoid(np.exp(lp), x[:, 0]) - 1) < 1e-10
    z = np.random.default_rng(0).standard_normal((5, 1))
    np.testing.assert_allclose(flow.inverse(z), 2 * z + 1, rtol=1e-14)    # sampling is x = 2 z + 1
    with pytest.raises(ValueError, match="nonzero"):
        study.affine_flow_1d(0.0)


def test_linear_2d_flow_matches_the_gaussian_it_pushes_forward():
    flow, W = study.linear_flow_2d()
    g = np.linspace(-12, 12, 1201)
    X = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    lp = flow.log_prob(X)
    np.testing.assert_allclose(lp, study.gaussian_logpdf(X, np.zeros(2), np.linalg.inv(W @ W.T)), rtol=1e-12,
                               atol=1e-12)
    h = g[1] - g[0]
    assert abs(np.exp(lp).sum() * h * h - 1) < 1e-8
    z = np.random.default_rng(1).standard_normal((4, 2))
    np.testing.assert_allclose(flow.inverse(z), z @ np.linalg.inv(W), rtol=1e-12)


def test_elbo_gap_is_the_kl_to_the_posterior_in_closed_form():
    m = study.linear_gaussian_vae()
    x = np.random.default_rng(2).standard_normal((6, 5))
    t = study.linear_gaussian_terms(m, x)
    np.testing.assert_allclose(t["gap"], t["kl_posterior"], rtol=1e-12, atol=1e-12)
    assert np.all(t["kl_posterior"] > 0) and np.all(t["elbo"] < t["log_px"])
    # the closed forms are npdgm's numbers: its -ELBO with noise whose sample mean is 0 and sample covariance I
    # (the recon term is quadratic in z, so those K draws give its expectation exactly), and log p(x) against
    # the naive Monte-Carlo estimate with many prior draws
    e = np.random.default_rng(3).standard_normal((4000, 2))
    e -= e.mean(0)
    e = e @ np.linalg.inv(np.linalg.cholesky(e.T @ e / len(e))).T
    for i in range(3):
        nelbo = float(m.loss(x[i:i + 1], e[:, None, :])[1]["nelbo"])
        np.testing.assert_allclose(-nelbo, t["elbo"][i], rtol=1e-11)
    np.testing.assert_allclose(inference.naive_log_px(m, x[:2], 200_000, rng=4)["est"], t["log_px"][:2], atol=0.05)


def test_elbo_gap_is_the_kl_to_the_posterior_by_quadrature():
    from npdgm import backend

    with backend.use(dtype="float64"):
        m = VAE(x_dim=6, hidden=(5,), z_dim=1, activation="tanh", seed=1)
    m.flat_params[...] += np.random.default_rng(0).standard_normal(m.flat_params.shape) * 0.5
    x = (np.random.default_rng(1).random((5, 6)) < 0.4).astype(np.float64)
    t = study.quadrature_terms(m, x)
    np.testing.assert_allclose(t["q_mass"], 1, atol=1e-12)
    np.testing.assert_allclose(t["gap"], t["kl_posterior"], rtol=1e-10, atol=1e-12)
    assert np.all(t["kl_posterior"] > 0)
    iw = m.log_likelihood(x, k=50_000, rng=2)
    np.testing.assert_allclose(iw, t["log_px"], atol=0.01)
    with pytest.raises(ValueError, match="z_dim = 1"):
        study.quadrature_terms(study.linear_gaussian_vae(), x[:, :5])


@pytest.mark.parametrize("topic, says", [("change-of-variables", "integral of p_X = 1.000000000000"),
                                         ("elbo-gap", "max |gap - KL(q || p(z|x))| = ")])
def test_study_commands_print_the_identity_and_write_the_figure(tmp_path, run_cli, topic, says):
    code, out, err = run_cli("study", topic, "--png", str(tmp_path / "f.png"))
    assert code == 0 and says in out and (tmp_path / "f.png").stat().st_size > 10_000, err
