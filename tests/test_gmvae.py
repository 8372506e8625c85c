"""The Gaussian-mixture VAE (npdgm.models.gmvae), `npdgm train gmvae` and the cluster scores (npdgm.cluster)."""
import json

import numpy as np
import pytest

import npdgm
from npdgm import gradcheck
from npdgm.cluster import cluster_accuracy, linear_assignment, purity
from npdgm.models.gmvae import GMVAE

TINY = ["--train-limit", "200", "--test-limit", "60", "--hidden", "16", "--batch-size", "64", "--iwae-n", "10",
        "--iwae-k", "3", "--no-progress"]


def test_gradchecks_pass():
    from npdgm import checks  # noqa: F401

    rows = gradcheck.run_all(["model.gmvae["])
    assert len({r[0] for r in rows}) == 3
    names = {r[1] for r in rows}
    assert {"prior_mean", "prior_logvar", "prior_logits", "encoder.0.W", "decoder.0.W"} <= names
    assert all(r[4] for r in rows), [r for r in rows if not r[4]]


def test_log_prior_is_the_mixture_density():
    m = GMVAE(x_dim=5, hidden=(4,), z_dim=2, components=3, weights="learned", seed=1)
    m.flat_params[...] += np.random.default_rng(0).standard_normal(m.flat_params.shape).astype(m.dtype) * 0.5
    z = np.random.default_rng(1).standard_normal((4, 2)).astype(m.dtype)
    pi = np.exp(m.prior_logits.data) / np.exp(m.prior_logits.data).sum()
    mean, var = m.prior_mean.data.astype(np.float64), np.exp(m.prior_logvar.data.astype(np.float64))
    dens = sum(pi[c] * np.prod(np.exp(-(z - mean[c]) ** 2 / (2 * var[c])) / np.sqrt(2 * np.pi * var[c]), axis=1)
               for c in range(3))
    np.testing.assert_allclose(m.log_prior(z), np.log(dens), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m.responsibilities(z)).sum(1), 1, rtol=1e-6)


def test_training_separates_two_clusters():
    """Two well-separated binary patterns: 60 Adam steps lower the -ELBO by a margin and the 2 components split
    them (a wrong prior gradient leaves the components on top of each other)."""
    rng = np.random.default_rng(0)
    base = (rng.random((2, 12)) < 0.5).astype(np.float64)
    y = rng.integers(0, 2, 256)
    x = np.abs(base[y] - (rng.random((256, 12)) < 0.05))
    m = GMVAE(x_dim=12, hidden=(16,), z_dim=2, components=2, prior_scale=1.0, seed=3)
    before = float(m.loss(x, rng=np.random.default_rng(1))[0])
    opt = npdgm.optim.Adam(m, lr=1e-2)
    g = np.random.default_rng(2)
    for _ in range(60):
        m.loss_and_grad(x[g.integers(0, 256, 64)], rng=g)
        opt.step()
    after = float(m.loss(x, rng=np.random.default_rng(1))[0])
    assert after < before - 2, (before, after)
    assert cluster_accuracy(m.predict(x), y)[0] > 0.9


def test_cluster_scores():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    assert cluster_accuracy((y + 1) % 3, y) == (1.0, {0: 2, 1: 0, 2: 1})
    assert cluster_accuracy(np.zeros(7, int), y)[0] == pytest.approx(3 / 7)
    assert purity(np.arange(7), y) == 1.0 and cluster_accuracy(np.arange(7), y)[0] == pytest.approx(3 / 7)
    cost = np.array([[4.0, 1, 3], [2, 0, 5], [3, 2, 2]])
    assert cost[np.arange(3), linear_assignment(cost)].sum() == 5
    with pytest.raises(ValueError, match="one length"):
        cluster_accuracy(np.zeros(3, int), np.zeros(4, int))


def test_sample_and_save_load(tmp_path):
    m = GMVAE(x_dim=6, hidden=(5,), z_dim=2, components=3, weights="learned", seed=2)
    assert m.sample(4, rng=0).shape == (4, 6) and m.sample(3, rng=0, component=2, mean=False).shape == (3, 6)
    m.save(tmp_path / "g.npz")
    back = npdgm.load(tmp_path / "g.npz")
    assert isinstance(back, GMVAE) and back.config == m.config
    assert np.isfinite(np.asarray(back.log_likelihood(np.full((2, 6), 0.5), k=4, rng=0))).all()
    with pytest.raises(ValueError, match="weights must be one of"):
        GMVAE(x_dim=6, weights="fixed")


def test_cli_train_gmvae(tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli("train", "gmvae", *TINY, "--components", "4", "--z-dim", "3", "--epochs", "1",
                                "--out", out)
    assert code == 0, err
    assert "cluster accuracy" in stdout
    s = json.loads((out / "summary.json").read_text())
    assert 0 < s["cluster_acc"] <= s["purity"] <= 1 and 1 <= len(s["cluster_map"]) <= 4 and np.isfinite(s["test_nll"])
    assert {"clusters.png", "components.png", "curves.png"} <= {p.name for p in out.iterdir()}
    rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test_cluster_acc" in rec
    code, _, err = run_cli("train", "gmvae", *TINY, "--components", "0", "--out", tmp_path / "bad")
    assert code != 0 and "--components" in err
