"""Free bits (Kingma et al. 2016): the KL term sum_j max(L, batch-mean KL_j), its kernel, the VAE option and the CLI."""
import json
import os

import numpy as np
import pytest

import npdgm
from npdgm import backend, cli, gradcheck
from npdgm.kernels.gaussian import (kl_free_bits_backward, kl_free_bits_forward, kl_std_normal_backward,
                                    kl_std_normal_forward)
from npdgm.models.vae import VAE

TINY = ["--train-limit", "200", "--test-limit", "60", "--hidden", "16", "--batch-size", "50", "--z-dim", "4",
        "--iwae-n", "10", "--iwae-k", "3", "--impute-steps", "1", "--impute-k", "0", "--impute-n", "10",
        "--no-progress", "--no-plots"]


def _mu_logvar(rng):
    """(B, 4) encoder outputs whose per-dimension mean KL is ~0.005, ~0.05, ~1, ~2."""
    mu = rng.standard_normal((16, 4)) * np.array([0.1, 0.3, 1.4, 2.0])
    return mu, rng.standard_normal((16, 4)) * 0.1


def test_kernel_value_and_zero_gradient_under_the_free_bits():
    mu, lv = _mu_logvar(np.random.default_rng(0))
    kl_bj = 0.5 * (mu ** 2 + np.exp(lv) - 1 - lv)
    kl_j = kl_bj.mean(axis=0)
    L = 0.3
    assert (kl_j[:2] < L).all() and (kl_j[2:] > L).all()
    assert np.isclose(kl_free_bits_forward(mu, lv, L), 2 * L + kl_j[2:].sum())
    assert np.isclose(kl_free_bits_forward(mu, lv, 0.0), kl_std_normal_forward(mu, lv).mean())   # L = 0: the plain KL
    dmu, dlv = kl_free_bits_backward(np.float64(2.0), mu, lv, L)
    ref_mu, ref_lv = kl_std_normal_backward(np.full(16, 2.0 / 16), mu, lv)
    assert np.all(dmu[:, :2] == 0) and np.all(dlv[:, :2] == 0)          # under L: no gradient
    np.testing.assert_allclose(dmu[:, 2:], ref_mu[:, 2:], rtol=1e-12)   # over L: the plain KL's gradient
    np.testing.assert_allclose(dlv[:, 2:], ref_lv[:, 2:], rtol=1e-12)


def test_kernel_row_and_model_gradchecks_are_registered_and_pass():
    from npdgm import checks  # noqa: F401

    names = ["kernel.kl_free_bits", "model.vae[bernoulli,relu,free_bits=0.3,K=2]"]
    rows = gradcheck.run_all(names)
    assert rows and all(r[-1] for r in rows), rows


def _pair(**kw):
    with backend.use(dtype="float64"):
        a = VAE(x_dim=7, hidden=(6,), z_dim=3, seed=3, **kw)
        b = VAE(x_dim=7, hidden=(6,), z_dim=3, seed=3)
    return a, b


def test_free_bits_zero_is_the_plain_vae_and_a_large_L_removes_the_kl_gradient():
    rng = np.random.default_rng(1)
    x, eps = rng.uniform(0, 1, (5, 7)), rng.standard_normal((1, 5, 3))
    fb0, plain = _pair(free_bits=0.0)
    assert "free_bits" not in fb0.config                      # default: the config (and checkpoints) unchanged
    l0, _ = fb0.loss_and_grad(x, eps)
    lp, _ = plain.loss_and_grad(x, eps)
    assert float(l0) == float(lp)
    np.testing.assert_array_equal(fb0.flat_grads, plain.flat_grads)
    # L far above every dimension's KL: the KL term is the constant z_dim L, the gradient that of beta = 0
    big, _ = _pair(free_bits=100.0)
    nokl, _ = _pair(beta=0.0)
    loss, terms = big.loss_and_grad(x, eps)
    nokl.loss_and_grad(x, eps)
    assert np.isclose(float(loss), float(terms["recon"]) + 3 * 100.0)
    assert float(terms["kl"]) < 100 and np.isclose(float(terms["nelbo"]), float(terms["recon"] + terms["kl"]))
    np.testing.assert_allclose(big.flat_grads, nokl.flat_grads, rtol=1e-12, atol=1e-15)


def test_free_bits_options_refused():
    with pytest.raises(ValueError, match="free_bits must be"):
        VAE(x_dim=7, hidden=(6,), z_dim=3, free_bits=-1.0)
    with pytest.raises(ValueError, match="free_bits applies to the Gaussian posterior"):
        VAE(x_dim=7, hidden=(6,), z_dim=3, free_bits=0.5, posterior="iaf:1")


@pytest.mark.parametrize("extra, msg", [
    (["--objective", "iwae"], "--free-bits applies to --objective elbo"),
    (["--beta", "0"], "--free-bits shapes the KL term, which --beta 0 removes"),
    (["--posterior", "iaf:1"], "free_bits applies to the Gaussian posterior"),
])
def test_cli_refuses_combinations_that_make_no_sense(tmp_path, capsys, extra, msg):
    rc = cli.main(["train", "vae", *TINY, "--epochs", "1", "--free-bits", "0.5", *extra, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc != 0 and "npdgm: error:" in err and msg in err


def test_cli_free_bits_with_warmup_trains_resumes_and_keeps_the_option(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "vae", *TINY, "--epochs", "1", "--free-bits", "0.2", "--kl-warmup", "1",
                     "--out", out]) == 0
    assert npdgm.load(out).config["free_bits"] == 0.2
    assert cli.main(["train", "vae", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    m = npdgm.load(out)
    assert m.free_bits == 0.2
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in recs] == [1, 2]
    # the training loss holds the free-bits KL (>= z_dim L = 0.8 once the warm-up is over), the -ELBO the true KL
    assert recs[1]["train_loss"] >= recs[1]["train_recon"] + 4 * 0.2 - 1e-3
    assert "active_units" in json.load(open(os.path.join(out, "summary.json")))
