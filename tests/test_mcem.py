"""Issue 29 item 6: Monte-Carlo EM, a VAE decoder trained on HMC samples of p(z|x) in place of q(z|x)
(npdgm.inference.mcem_decoder_loss_and_grad, mcem_fit)."""
import math

import numpy as np
import pytest

from npdgm import backend
from npdgm.gradcheck import compare, numerical_grad
from npdgm.inference import ais, mcem_decoder_loss_and_grad, mcem_fit
from npdgm.models.vae import VAE


def _binary(n, d, seed):
    """Images from two prototypes with flipped pixels: a latent structure a 1-2-D z can hold."""
    g = np.random.default_rng(seed)
    protos = (g.random((2, d)) < 0.5).astype(np.float64)
    x = protos[g.integers(0, 2, n)]
    flip = g.random((n, d)) < 0.1
    return np.where(flip, 1 - x, x)


@pytest.mark.parametrize("likelihood,sigma", [("bernoulli", None), ("gaussian", None), ("gaussian", 0.5)])
def test_decoder_gradient_is_the_monte_carlo_gradient_of_log_joint(likelihood, sigma):
    """dL/dtheta of L = -(1/(C B)) sum log p(x_b, z_cb) at fixed z, by float64 central differences; the encoder
    gets no gradient."""
    with backend.use("numpy", "float64"):
        m = VAE(x_dim=6, hidden=(5,), z_dim=2, likelihood=likelihood, sigma=sigma, seed=1)
        g = np.random.default_rng(2)
        m.flat_params[:] += 0.2 * g.standard_normal(m.flat_params.shape)
        x = _binary(4, 6, 3)
        z = g.standard_normal((3, 4, 2))
        mcem_decoder_loss_and_grad(m, x, z)
        analytic = {k: v.copy() for k, v in m.grads.items()}

        def neg_mean_log_joint():
            return -float(m.log_joint_and_grad_z(x, z)[0].mean())
        for name, p in m.params.items():
            if name.startswith("encoder"):
                assert not analytic[name].any(), name
                continue
            err = compare(analytic[name], numerical_grad(neg_mean_log_joint, p))[1]
            assert err < 1e-6, (name, err)
        # the returned loss is -mean log p(x|z): log p(x, z) less the prior term
        loss = float(mcem_decoder_loss_and_grad(m, x, z))
        prior = -0.5 * (z ** 2).sum(-1) - math.log(2 * math.pi)
        assert math.isclose(loss, neg_mean_log_joint() + prior.mean(), rel_tol=1e-10)


def test_mcem_fit_raises_the_likelihood_of_the_training_images():
    x = _binary(64, 16, 0).astype(np.float32)
    m = VAE(x_dim=16, hidden=(16,), z_dim=2, seed=0)
    before = float(ais(m, x[:32], steps=50, chains=4, rng=0)["est"].mean())
    hist = mcem_fit(m, x, epochs=6, batch_size=16, lr=1e-2, hmc_steps=2, leapfrog=3, rng=0)
    after = float(ais(m, x[:32], steps=50, chains=4, rng=0)["est"].mean())
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert all(0 < h["accept"] <= 1 for h in hist)
    assert hist[-1]["loss"] < hist[0]["loss"] and after > before + 1.0, (before, after, hist)


def test_mcem_vs_elbo_figure_is_labelled(monkeypatch, tmp_path):
    from npdgm.plots import inference as PI

    seen = []
    monkeypatch.setattr(PI, "_save", lambda fig, path: seen.append(fig))
    rows = lambda off, elbo: [{"epoch": e, "ais_test": -200.0 + off + e, **({"elbo_test": -210.0 + e} if elbo else {})}
                              for e in (1, 2)]
    PI.mcem_vs_elbo({"ELBO": rows(0, True), "MC-EM": rows(-3, False)}, tmp_path / "m.png")
    fig, = seen
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["ELBO: AIS log p(x)", "ELBO: ELBO", "MC-EM: AIS log p(x)"]
    assert ax.get_xlabel() == "epoch" and "log-likelihood" in ax.get_ylabel()
