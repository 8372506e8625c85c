"""M1 and M1+M2: the softmax-regression classifier (gradient by central differences, the optimum against
scikit-learn), the cross-validated penalty, ``npdgm train m1`` (with --vae and training its own VAE) and
``npdgm train m2 --features m1:RUN`` with its checksum of the M1 VAE."""
import json
import os

import numpy as np
import pytest

from npdgm.cli import main
from npdgm.models.m1 import (SoftmaxRegression, choose_l2, fit_softmax_regression, softmax_regression_loss_and_grad,
                             standardizer, vae_features)

TINY_VAE = ["--hidden", "16", "--z-dim", "4", "--epochs", "1", "--train-limit", "600", "--test-limit", "200",
            "--iwae-n", "0", "--impute-k", "0", "--impute-n", "10", "--no-plots", "--no-progress"]


def _blobs(rng, n=100, f=12, c=4, sep=1.5):
    y = np.arange(n) % c
    centers = rng.standard_normal((c, f)) * sep
    return centers[y] + rng.standard_normal((n, f)), y


def test_softmax_regression_gradient_by_central_differences(rng):
    X, y = _blobs(rng, n=30, f=5, c=3)
    W, b, l2 = rng.standard_normal((5, 3)), rng.standard_normal(3), 0.3
    _, dW, db = softmax_regression_loss_and_grad(W, b, X, y, l2)
    h = 1e-6
    for P, G in ((W, dW), (b, db)):
        num = np.zeros_like(P)
        for i in np.ndindex(P.shape):
            old = P[i]
            P[i] = old + h
            jp = softmax_regression_loss_and_grad(W, b, X, y, l2)[0]
            P[i] = old - h
            jm = softmax_regression_loss_and_grad(W, b, X, y, l2)[0]
            P[i] = old
            num[i] = (jp - jm) / (2 * h)
        np.testing.assert_allclose(G, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("l2", [1e-2, 0.3])
def test_softmax_regression_matches_scikit_learn(rng, l2):
    """Same objective (sklearn's C = 1 / (l2 N)): the same class probabilities and the same W up to the
    softmax's shift freedom (the penalty fixes it: columns of W sum to 0 in both)."""
    sk = pytest.importorskip("sklearn.linear_model")
    X, y = _blobs(rng)
    ours = SoftmaxRegression(4, l2, tol=1e-8).fit(X, y)
    ref = sk.LogisticRegression(C=1 / (l2 * len(y)), tol=1e-12, max_iter=10000).fit(X, y)
    assert ours.info["converged"]
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(ours.W, ref.coef_.T, atol=1e-4)
    assert (ours.predict(X) == ref.predict(X)).all()


def test_fit_reaches_the_optimum_and_warm_start_agrees(rng):
    X, y = _blobs(rng)
    W, b, info = fit_softmax_regression(X, y, 4, 0.05, tol=1e-8)
    assert info["converged"] and info["grad_max"] < 1e-8
    W2, b2, info2 = fit_softmax_regression(X, y, 4, 0.05, tol=1e-8, init=(W + 0.1, b - 0.2))
    np.testing.assert_allclose(W2, W, atol=1e-6)
    # started at the optimum it stops at once
    assert fit_softmax_regression(X, y, 4, 0.05, tol=1e-6, init=(W, b))[2]["iterations"] == 0


def test_choose_l2_picks_from_the_grid_by_cross_validation(rng):
    X, y = _blobs(rng, sep=0.8)
    l2, errors = choose_l2(X, y, 4, grid=(1e-3, 1e-1, 1e2), folds=4, seed=3)
    assert set(errors) == {1e-3, 1e-1, 1e2}
    assert errors[1e2] > errors[1e-1]         # a huge penalty flattens the classifier toward chance
    assert errors[l2] == min(errors.values())
    assert choose_l2(X, y, 4, grid=(1e-3, 1e-1, 1e2), folds=4, seed=3) == (l2, errors)   # seeded


def test_softmax_regression_errors(rng):
    with pytest.raises(ValueError, match="not fitted"):
        SoftmaxRegression(3).predict(np.zeros((2, 2)))
    X, y = _blobs(rng, n=12, f=3, c=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        SoftmaxRegression(2).fit(X, y)
    with pytest.raises(ValueError, match="NaN or infinite"):
        SoftmaxRegression(3).fit(np.full((12, 3), np.nan), y)
    with pytest.raises(ValueError, match="shape"):
        SoftmaxRegression(3).fit(X, y).predict(np.zeros((2, 5)))


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("m1") / "vae"
    assert main(["train", "vae", *TINY_VAE, "--out", out]) == 0
    return out


def test_train_m1_with_vae(vae_run, tmp_path):
    """The reported error is the classifier's on the VAE's test features: recomputed from classifier.npz."""
    out = tmp_path / "m1"
    assert main(["train", "m1", "--vae", vae_run, "--labels", "50", "--l2", "0.1", "--out", out]) == 0
    s = json.loads((out / "summary.json").read_text())
    link = json.loads((out / "m1.json").read_text())
    assert link["vae_sha256"] == s["vae_sha256"] and os.path.isfile(os.path.join(out, link["vae"]))
    keep = link["keep"]
    assert s["l2"] == 0.1 and s["baseline_l2"] == 0.1 and s["labels"] == 50 and s["z_dim"] == 4
    assert s["feature_dim"] == len(keep) >= 1 and link["active_std"] == 0.1
    import npdgm
    from npdgm.commands.m1 import load_images

    vae = npdgm.load(vae_run)
    x_te, y_te = load_images(None, "test", 200, "none", 0)
    c = np.load(out / "classifier.npz")
    mu = vae_features(vae, x_te)
    pred = (((mu[:, keep] - c["mean"]) / c["scale"]) @ c["W"] + c["b"]).argmax(1)
    assert s["test_error"] == pytest.approx(float((pred != y_te).mean()))
    assert 0 <= s["baseline_test_error"] < 0.9 and s["baseline_train_error"] == 0   # 50 images in 784 dims: separable
    from npdgm.commands.m1 import validation_split

    x_tr, y_tr = load_images(None, "train", 600, "none", 0)
    tr, va = validation_split(600, 100, 0)                    # the default --val: a sixth of the 600
    assert s["val_n"] == 100 and s["train_n"] == 500 and not set(tr) & set(va)
    pred = (((vae_features(vae, x_tr[va])[:, keep] - c["mean"]) / c["scale"]) @ c["W"] + c["b"]).argmax(1)
    assert s["val_error"] == pytest.approx(float((pred != y_tr[va]).mean())) and 0 <= s["baseline_val_error"] <= 1


def test_train_m1_trains_its_vae_first(tmp_path):
    out = tmp_path / "m1"
    assert main(["train", "m1", *TINY_VAE, "--labels", "20", "--l2", "1", "--active-std", "0", "--out", out]) == 0
    link = json.loads((out / "m1.json").read_text())
    assert link["vae"] == os.path.join("vae", "checkpoint.npz") and link["binarize"] == "dynamic"
    import npdgm

    vae = npdgm.load(out / "vae")
    assert vae.config["hidden"] == [16] and vae.config["z_dim"] == 4 and vae.config["activation"] == "softplus"


def test_train_m1_paper_defaults_in_help(capsys):
    assert main(["train", "m1", "-h"]) == 0
    h = " ".join(capsys.readouterr().out.split())
    assert "default: 600 600 for M1" in h and "default: 50 for M1" in h and "default: softplus for M1" in h


def test_train_m1_refusals(vae_run, tmp_path, capsys):
    assert main(["train", "m1", "--vae", vae_run, "--hidden", "8", "--out", tmp_path / "a"]) == 2
    assert "--hidden applies to the VAE that m1 trains without --vae" in capsys.readouterr().err
    assert main(["train", "m1", "--vae", tmp_path / "nope", "--out", tmp_path / "b"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    assert main(["train", "m1", "--resume", tmp_path / "a"]) == 2
    assert "has no --resume" in capsys.readouterr().err
    assert main(["train", "m1", "--l2", "-1"]) == 2
    assert "--l2 must be cv or a number >= 0" in capsys.readouterr().err


def test_standardizer_one_scale_keeps_inactive_units_small():
    """One scale for all features (root mean variance), so a constant or near-constant feature (an inactive
    latent unit) stays near 0 instead of being blown up to unit variance."""
    X = np.array([[1.0, 5.0, 0.0], [3.0, 5.0, 1e-3], [5.0, 5.0, 0.0]])
    mean, scale = standardizer(X)
    np.testing.assert_allclose(mean, X.mean(0))
    assert scale == pytest.approx(np.sqrt(X.var(0).mean()))
    assert np.abs((X - mean) / scale)[:, 2].max() < 1e-3
    assert standardizer(np.ones((3, 2)))[1] == 1e-12


def test_feature_encoder_draws_z1_from_q(vae_run, rng):
    """M1+M2's step input: z1 = mu + exp(logvar / 2) eps with eps from the run's rng, float32 draws."""
    import npdgm
    from npdgm.commands.m2 import feature_encoder

    vae = npdgm.load(vae_run)
    x = rng.uniform(0, 1, (5, 784)).astype(np.float32)
    z = feature_encoder(vae)(x, np.random.default_rng(7))
    mu, logvar = vae.encode(x)
    eps = np.random.default_rng(7).standard_normal(mu.shape, dtype=np.float32)
    np.testing.assert_allclose(z, mu + np.exp(logvar / 2) * eps, rtol=1e-5)
    np.testing.assert_allclose(vae_features(vae, x), mu, rtol=1e-6)
    drawn = vae_features(vae, x, sample=True, rng=np.random.default_rng(7))    # the same draw, host float64
    np.testing.assert_array_equal(drawn, np.asarray(mu + np.exp(logvar / 2) * eps, np.float64))
    with pytest.raises(ValueError, match="draws its noise from rng"):
        vae_features(vae, x, sample=True)


def test_code_sampler_draws_z1_from_precomputed_codes(vae_run, rng):
    """--m1-codes fixed: [mu | logvar] rows computed once, z1 = mu + exp(logvar / 2) eps each step; the same
    draw as the per-step encoder on the same images and noise."""
    import npdgm
    from npdgm.commands.m2 import code_sampler, feature_encoder, posterior_codes

    vae = npdgm.load(vae_run)
    x = (rng.uniform(0, 1, (5, 784)) < 0.3).astype(np.float32)
    h = posterior_codes(vae, x, batch=2)
    mu, logvar = vae.encode(x)
    np.testing.assert_allclose(h, np.concatenate([mu, logvar], 1), rtol=1e-5, atol=1e-6)   # batches 2 vs 5: GEMM order
    z = code_sampler(vae.z_dim)(h, np.random.default_rng(3))
    np.testing.assert_allclose(z, feature_encoder(vae)(x, np.random.default_rng(3)), rtol=1e-5, atol=1e-6)


def test_m1_plus_m2_codes_per_step(vae_run, tmp_path):
    m1 = tmp_path / "m1"
    assert main(["train", "m1", "--vae", vae_run, "--labels", "20", "--l2", "1", "--out", m1]) == 0
    out = tmp_path / "m2"
    assert main(["train", "m2", "--features", f"m1:{m1}", "--m1-codes", "step", "--labels", "20", "--epochs", "1",
                 "--hidden", "8", "--z-dim", "3", "--train-limit", "300", "--test-limit", "100", "--baseline-steps",
                 "5", "--eval-n", "50", "--no-progress", "--no-plots", "--out", out]) == 0
    assert json.loads((out / "summary.json").read_text())["test_error"] < 1


def test_m1_plus_m2_stores_and_checks_the_m1_vae(vae_run, tmp_path, capsys):
    m1 = tmp_path / "m1"
    assert main(["train", "m1", "--vae", vae_run, "--labels", "20", "--l2", "1", "--out", m1]) == 0
    out = tmp_path / "m2"
    common = ["--hidden", "8", "--z-dim", "3", "--train-limit", "300", "--test-limit", "100", "--baseline-steps", "5",
              "--eval-n", "50", "--no-progress", "--no-plots"]
    assert main(["train", "m2", "--features", f"m1:{m1}", "--labels", "20", "--epochs", "1", *common,
                 "--out", out]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["features_sha256"] == json.loads((m1 / "m1.json").read_text())["vae_sha256"]
    assert s["features"] == f"m1:{os.path.abspath(m1)}" and s["baseline_input"] == "M1 codes mu(x)"
    import npdgm

    m2 = npdgm.load(out)
    keep = json.loads((m1 / "m1.json").read_text())["keep"]
    assert m2.likelihood == "gaussian" and m2.x_dim == len(keep) < 4 and "logvar_x" in m2.params   # active units only
    assert main(["evaluate", out, "--method", "classify", "--n-images", "100", "--json", tmp_path / "c.json"]) == 0
    r = json.loads((tmp_path / "c.json").read_text())["methods"]["classify"]
    assert r["error"] == pytest.approx(s["test_error"])          # the same codes as the run's own evaluation
    capsys.readouterr()
    # the M1 VAE changes: resume and evaluate refuse, naming the checkpoint
    ck = vae_run / "checkpoint.npz"
    saved = ck.read_bytes()
    try:
        ck.write_bytes(saved + b"\0")
        assert main(["train", "m2", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 2
        assert "changed since the M1 run recorded it" in capsys.readouterr().err
        assert main(["evaluate", out, "--method", "classify"]) == 2
        assert "changed since the M1 run recorded it" in capsys.readouterr().err
        ck.unlink()
        assert main(["train", "m2", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert "its VAE checkpoint" in err and "is missing" in err
    finally:
        ck.write_bytes(saved)
    assert main(["train", "m2", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    assert main(["train", "m2", "--features", "m2:x", "--out", tmp_path / "bad"]) == 2
    assert "expected m1:RUN" in capsys.readouterr().err


def test_registered_m1_gradchecks_pass():
    from npdgm import checks, gradcheck  # noqa: F401  (checks registers the model gradchecks)

    rows = gradcheck.run_all(["model.m1"])
    assert {(r[0], r[1]) for r in rows} == {(f"model.m1.softmax_regression[l2={l2}]", p) for l2 in ("0", "0.7")
                                            for p in "Wb"}
    assert all(r[4] for r in rows), [r for r in rows if not r[4]]


def test_active_units_and_prune_latents(rng):
    """The active units are those whose mean varies over the images; the pruned VAE encodes exactly the
    kept columns of (mu, logvar) and decodes as the original with the dropped units at 0."""
    from npdgm.models.m1 import active_units, prune_latents

    mu = np.column_stack([rng.standard_normal(200), 0.05 * rng.standard_normal(200), np.full(200, 3.0),
                          0.5 * rng.standard_normal(200)])
    assert active_units(mu).tolist() == [0, 3] and active_units(mu, 0).tolist() == [0, 1, 3]
    assert active_units(mu, 0.01).tolist() == [0, 1, 3] and active_units(mu, 2).tolist() == []
    with pytest.raises(ValueError, match="codes"):
        active_units(mu[:1])
    import npdgm

    vae = npdgm.VAE(x_dim=6, hidden=(5, 4), z_dim=4, activation="softplus", seed=3)
    vae.flat_params[...] += 0.2 * rng.standard_normal(vae.flat_params.shape).astype(vae.flat_params.dtype)
    keep = np.array([0, 3])
    small = prune_latents(vae, keep)
    x = rng.uniform(0, 1, (7, 6)).astype(np.float32)
    (m, lv), (m2, lv2) = vae.encode(x), small.encode(x)
    assert small.z_dim == 2 and small.config["hidden"] == [5, 4]
    np.testing.assert_array_equal(m2, m[:, keep])
    np.testing.assert_array_equal(lv2, lv[:, keep])
    z = rng.standard_normal((7, 2)).astype(np.float32)
    full = np.zeros((7, 4), np.float32)
    full[:, keep] = z
    np.testing.assert_allclose(small.decode(z), vae.decode(full), rtol=1e-6)
    for bad in ([], [0, 0], [4], [-1]):
        with pytest.raises(ValueError, match="distinct indices"):
            prune_latents(vae, bad)


def test_m1_active_std_zero_keeps_every_unit_that_varies(vae_run, tmp_path):
    out = tmp_path / "m1"
    assert main(["train", "m1", "--vae", vae_run, "--labels", "20", "--l2", "1", "--active-std", "0",
                 "--out", out]) == 0
    assert json.loads((out / "m1.json").read_text())["keep"] == [0, 1, 2, 3]
