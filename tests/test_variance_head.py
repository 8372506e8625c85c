"""A Gaussian decoder with its own variance head sigma_theta(z): VAE(likelihood="gaussian", sigma="learned-z")."""
import numpy as np
import pytest

import npdgm
from npdgm import gradcheck
from npdgm.models.cvae import CVAE
from npdgm.models.elbo import LOGVAR_BOUND, head_nll_backward, head_nll_forward

TINY = ["--train-limit", "200", "--test-limit", "60", "--hidden", "16", "--batch-size", "64", "--iwae-n", "10",
        "--iwae-k", "3", "--impute-steps", "1", "--impute-k", "3", "--impute-n", "10", "--no-progress"]


def test_gradchecks_of_the_variance_head_pass():
    from npdgm import checks  # noqa: F401  (registers the rows)

    rows = gradcheck.run_all(["learned-z"])
    names = {r[0] for r in rows}
    assert {"model.vae[gaussian,learned-z,tanh,K=2]", "model.vae.iwae[gaussian,learned-z,tanh,k=3]",
            "model.vae.head_nll[learned-z]", "model.vae.grad_z[gaussian,learned-z,tanh,2 chains]"} <= names
    assert all(r[4] for r in rows), [r for r in rows if not r[4]]


def test_head_nll_is_the_gaussian_density_with_a_bounded_logvar():
    rng = np.random.default_rng(0)
    mean, raw, x = rng.standard_normal((3, 4)), rng.uniform(-20, 20, (3, 4)), rng.standard_normal((3, 4))
    v = LOGVAR_BOUND * np.tanh(raw / LOGVAR_BOUND)
    want = -(-0.5 * ((x - mean) ** 2 / np.exp(v) + v + np.log(2 * np.pi))).sum(1)
    got = head_nll_forward(np.concatenate([mean, raw], 1), x)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.all(np.abs(v) < LOGVAR_BOUND)
    assert head_nll_backward(np.ones(3), np.concatenate([mean, raw], 1), x).shape == (3, 8)


def _hetero_data(n, rng):
    """1-D latent u; pixel 0 = u (sure), pixel 1 = noise whose std grows with |u| (a per-image variance)."""
    u = rng.standard_normal(n)
    return np.stack([u, 0.05 + np.abs(u) * rng.standard_normal(n), u + 0.05 * rng.standard_normal(n)], 1)


def _train(model, x, steps, rng):
    opt = npdgm.optim.Adam(model, lr=1e-2)
    for _ in range(steps):
        model.loss_and_grad(x[rng.integers(0, len(x), 64)], rng=rng)
        opt.step()
    return float(model.loss(x, rng=np.random.default_rng(1))[1]["nelbo"])


def test_a_variance_head_fits_heteroscedastic_noise_better_than_one_variance_per_pixel():
    """Noise whose std depends on the image: the head's -ELBO ends well below the per-pixel variance's
    (a wrong head gradient, e.g. without the tanh factor or with the mean's sign flipped, does not get there)."""
    rng = np.random.default_rng(0)
    x = _hetero_data(2000, rng)
    kw = dict(x_dim=3, hidden=(32,), z_dim=1, likelihood="gaussian", activation="tanh", seed=0)
    head = _train(npdgm.VAE(sigma="learned-z", **kw), x, 300, np.random.default_rng(2))
    pixel = _train(npdgm.VAE(sigma=None, **kw), x, 300, np.random.default_rng(2))
    assert head < pixel - 0.3, (head, pixel)


def test_save_load_sample_and_old_configs(tmp_path):
    m = npdgm.VAE(x_dim=6, hidden=(5,), z_dim=2, likelihood="gaussian", sigma="learned-z", seed=3)
    assert m.decoder.layers[-1].W.shape == (5, 12) and "logvar_x" not in dict(m.named_parameters())
    m.save(tmp_path / "h.npz")
    back = npdgm.load(tmp_path / "h.npz")
    assert back.config["sigma"] == "learned-z"
    np.testing.assert_array_equal(back.flat_params, m.flat_params)
    z = np.random.default_rng(0).standard_normal((4, 2)).astype(m.dtype)
    assert m.decode(z).shape == (4, 6) and m.decode_std(z).shape == (4, 6)
    assert np.all(np.asarray(m.decode_std(z)) > np.exp(-LOGVAR_BOUND / 2))
    assert m.sample(5, rng=1, mean=False).shape == (5, 6)
    old = npdgm.VAE(x_dim=6, hidden=(5,), z_dim=2, likelihood="gaussian", sigma=None)   # a per-pixel variance
    old.save(tmp_path / "o.npz")
    assert npdgm.load(tmp_path / "o.npz").config["sigma"] is None


@pytest.mark.parametrize("build, msg", [
    (lambda: CVAE(x_dim=6, num_classes=2, likelihood="gaussian", sigma="learned-z"), "VAE only"),
    (lambda: npdgm.VAE(x_dim=6, likelihood="bernoulli", sigma="learned-z"), "Gaussian likelihood only"),
    (lambda: npdgm.VAE(x_dim=6, likelihood="gaussian", sigma="learned"), "learned-z"),
    (lambda: npdgm.VAE(x_dim=4, likelihood="gaussian", sigma="learned-z", arch="conv", image_shape=(1, 2, 2)),
     "arch='mlp'"),
])
def test_bad_uses_are_refused_with_one_clear_line(build, msg):
    with pytest.raises(ValueError, match=msg):
        build()


def test_cli_trains_a_variance_head_and_draws_its_std(tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", "vae", *TINY, "--z-dim", "2", "--likelihood", "gaussian", "--sigma",
                                "learned-z", "--epochs", "1", "--out", out)
    assert code == 0, err
    assert (out / "decoder_std.png").exists() and npdgm.load(out).config["sigma"] == "learned-z"
    code, _, err = run_cli("train", "vae", *TINY, "--likelihood", "gaussian", "--sigma", "zz", "--out", tmp_path / "b")
    assert code != 0 and "--sigma" in err
