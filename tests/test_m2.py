"""M2: the registry's gradient checks of the labelled + unlabelled loss, the exact sum over classes against
a brute-force loop, the loss definition, save/load, balanced label selection, bad input, learning, CLI."""
import json
import os

import numpy as np
import pytest

import npdgm
from npdgm import checks, gradcheck  # noqa: F401  (checks registers the model gradchecks)
from npdgm.commands.m2 import balanced_labels
from npdgm.models.m2 import M2


@pytest.fixture(autouse=True)
def _one_blas_thread():
    """These tests multiply small matrices; on a loaded 2-core machine OpenBLAS's two threads wait on
    each other (measured 10x slower than one thread), so run them single-threaded when possible."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _tiny(rng, C=4, **kw):
    m = M2(**{"x_dim": 6, "num_classes": C, "hidden": (5,), "z_dim": 2, "classifier_hidden": (4,), "alpha": 1.7,
              **kw}, seed=int(rng.integers(1000)))
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape) * 0.3
    return m


def _data(rng, m, bl=5, bu=4):
    C, Z, D = m.num_classes, m.z_dim, m.x_dim
    return dict(x_l=rng.uniform(0, 1, (bl, D)), y_l=rng.integers(0, C, bl), x_u=rng.uniform(0, 1, (bu, D)),
                eps_l=rng.standard_normal((bl, Z)), eps_u=rng.standard_normal((C, bu, Z)))


def test_registered_m2_gradchecks_pass():
    rows = gradcheck.run_all(["model.m2"])
    assert len({r[0] for r in rows}) >= 4
    assert all(r[4] for r in rows), [r for r in rows if not r[4]]


def test_loss_is_the_weighted_sum_of_its_terms_ten_classes(f64, rng):
    """loss = labelled_weight * labelled + alpha * ce + unlabelled with C = 10 (the MNIST class count); every
    gradient of the loss is the registry's model.m2 checks (npdgm gradcheck)."""
    m = _tiny(rng, C=10, activation="softplus", labelled_weight=0.6)
    d = _data(rng, m)
    loss, terms = m.loss_and_grad(**d)
    assert float(loss) == pytest.approx(float(0.6 * terms["labelled"] + m.alpha * terms["ce"] + terms["unlabelled"]))
    assert float(m.loss(**d)[0]) == pytest.approx(float(loss), rel=1e-12)
    assert set(m.grads) == set(m.params) and len(m.params) == 12


def test_unlabelled_sum_equals_brute_force_loop(f64, rng):
    """U(x) batched over all classes == sum_c q(c|x) L(x, c) - H(q), L from C separate labelled passes;
    and the batched gradient == the gradient assembled from the loop (product rule by hand)."""
    m = _tiny(rng, C=5)
    d = _data(rng, m)
    x, eps = d["x_u"], d["eps_u"]
    B, C = x.shape[0], m.num_classes
    s = m.classifier.forward(x)
    q = np.exp(s - s.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    L = np.stack([m.nelbo(x, np.full(B, c), eps=eps[c]) for c in range(C)], axis=1)      # (B, C)
    U_loop = (q * L).sum(1) + (q * np.log(q)).sum(1)
    np.testing.assert_allclose(m.nelbo(x, eps=eps), U_loop, rtol=1e-12)
    _, t = m.loss(x_u=x, eps_u=eps)
    assert float(t["unlabelled"]) == pytest.approx(U_loop.mean(), rel=1e-12)
    assert float(t["entropy"]) == pytest.approx(-(q * np.log(q)).sum(1).mean(), rel=1e-12)
    # gradient: dU/dtheta = sum_c q_c dL_c/dtheta (decoder/encoder) + (L_c + log q_c) dq_c/dtheta (classifier)
    m.loss_and_grad(x_u=x, eps_u=eps)
    g_batched = m.flat_grads.copy()
    acc = np.zeros_like(g_batched)
    for c in range(C):
        for b in range(B):  # per-image weight q_bc / B on L(x_b, c): one labelled pass per (b, c)
            m.zero_grad()
            m._elbo_backward(np.array([q[b, c] / B]), m._elbo_rows(x[b:b + 1], np.eye(C)[[c]], eps[c, b:b + 1])[1])
            acc += m.flat_grads
    m.zero_grad()
    m.classifier.forward(x)
    gs = q * ((L + np.log(q)) - ((L + np.log(q)) * q).sum(1, keepdims=True)) / B   # softmax Jacobian
    m.classifier.backward(gs, need_dx=False)
    acc += m.flat_grads
    np.testing.assert_allclose(g_batched, acc, rtol=1e-9, atol=1e-12)


def test_labelled_loss_definition(f64, rng):
    m = _tiny(rng, C=3)
    d = _data(rng, m)
    x, y, eps = d["x_l"], d["y_l"], d["eps_l"]
    _, t = m.loss(x_l=x, y_l=y, eps_l=eps)
    e = np.eye(3)[y]
    h = m.encoder.forward(x, e)
    mu, lv = h[:, :2], h[:, 2:]
    logits = m.decoder.forward(mu + np.exp(lv / 2) * eps, e)
    p = 1 / (1 + np.exp(-logits))
    rec = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1)
    kl = 0.5 * (mu ** 2 + np.exp(lv) - 1 - lv).sum(1)
    assert float(t["labelled"]) == pytest.approx((rec + kl + np.log(3)).mean(), rel=1e-10)
    s = m.classifier.forward(x)
    ce = -(s[np.arange(len(y)), y] - np.log(np.exp(s).sum(1)))
    assert float(t["ce"]) == pytest.approx(ce.mean(), rel=1e-10)
    assert float(t["loss"]) == pytest.approx(float(t["labelled"]) + m.alpha * ce.mean(), rel=1e-10)


def test_shared_noise_equals_broadcast(f64, rng):
    m = _tiny(rng)
    d = _data(rng, m)
    e = d["eps_u"][0]
    a = float(m.loss(x_u=d["x_u"], eps_u=e)[0])
    b = float(m.loss(x_u=d["x_u"], eps_u=np.broadcast_to(e, d["eps_u"].shape).copy())[0])
    assert a == b


def test_save_load_same_loss(tmp_path, rng):
    m = M2(x_dim=784, hidden=(16,), z_dim=3, classifier_hidden=(8,), alpha=12.5, seed=4)
    d = {k: v.astype(np.float32) if v.dtype.kind == "f" else v for k, v in _data(rng, m).items()}
    d["x_l"], d["x_u"] = rng.random((5, 784), dtype=np.float32), rng.random((4, 784), dtype=np.float32)
    m.save(tmp_path / "m2.npz")
    m2 = npdgm.load(tmp_path / "m2.npz")
    assert isinstance(m2, M2) and m2.config == m.config and m2.alpha == 12.5
    assert float(m2.loss(**d)[0]) == float(m.loss(**d)[0])
    assert np.array_equal(npdgm.backend.to_host(m2.predict(d["x_u"])), npdgm.backend.to_host(m.predict(d["x_u"])))


def test_balanced_labels():
    y = np.repeat(np.arange(10), 30)
    np.random.default_rng(0).shuffle(y)
    idx = balanced_labels(y, 100, 10, seed=3)
    assert len(idx) == len(set(idx)) == 100
    assert np.bincount(y[idx], minlength=10).tolist() == [10] * 10
    assert np.array_equal(idx, balanced_labels(y, 100, 10, seed=3))
    assert not np.array_equal(idx, balanced_labels(y, 100, 10, seed=4))
    with pytest.raises(ValueError, match="cannot be balanced"):
        balanced_labels(y, 105, 10)
    with pytest.raises(ValueError, match="exceeds the 300 training images"):
        balanced_labels(y, 310, 10)
    with pytest.raises(ValueError, match="needs 40 images of class 1 but the training set has 30"):
        balanced_labels(np.r_[y, np.zeros(200, int)], 400, 10)
    with pytest.raises(ValueError, match="positive integer"):
        balanced_labels(y, 0, 10)


def test_bad_input(rng):
    m = M2(x_dim=6, num_classes=3, hidden=(4,), z_dim=2)
    x = np.full((2, 6), 0.5, np.float32)
    with pytest.raises(ValueError, match="give a labelled batch"):
        m.loss_and_grad()
    with pytest.raises(ValueError, match="x_l and y_l go together"):
        m.loss_and_grad(x_l=x)
    with pytest.raises(ValueError, match=r"y_l must lie in \[0, 3\)"):
        m.loss_and_grad(x_l=x, y_l=[0, 3])
    with pytest.raises(ValueError, match="y_l has 1 labels but there are 2 images"):
        m.loss_and_grad(x_l=x, y_l=[0])
    with pytest.raises(TypeError, match="non-integer"):
        m.loss_and_grad(x_l=x, y_l=np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"eps_u must have shape \(3, 2, 2\)"):
        m.loss_and_grad(x_u=x, eps_u=np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match=r"x_u must lie in \[0, 1\]"):
        m.loss_and_grad(x_u=x * 4)
    with pytest.raises(ValueError, match="alpha"):
        M2(alpha=-1)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        M2(num_classes=1)


def test_m2_learns(rng):
    """25 Adam steps (20 labelled + 50 unlabelled per step) on 400 bundled images: the unlabelled bound
    U(x) on 100 of them drops by more than 150 nats/image (measured: ~546 -> ~300) and the classifier
    fits its 20 labels (labelled cross-entropy below 0.5)."""
    from npdgm import optim
    from npdgm.data import load_mnist

    x, y = load_mnist("train", limit=400)
    lab = balanced_labels(y, 20, 10, seed=0)
    m = M2(hidden=(64,), z_dim=8, classifier_hidden=(32,), alpha=20.0, seed=0)
    opt = optim.Adam(m, lr=3e-3)
    r = np.random.default_rng(0)
    eps = r.standard_normal((10, 100, 8)).astype(np.float32)
    before = float(m.loss(x_u=x[300:], eps_u=eps)[0])
    for _ in range(25):
        li, ui = r.choice(lab, 20), r.integers(0, 300, 50)
        m.loss_and_grad(x[li], y[li], x[ui], rng=r)
        opt.step()
    after = float(m.loss(x_u=x[300:], eps_u=eps)[0])
    ce = float(m.loss(x[lab], y[lab], rng=r)[1]["ce"])
    assert before - after > 150, (before, after)
    assert ce < 0.5, ce


def test_cli_train_m2(tmp_path, capsys):
    from npdgm.cli import main

    out = str(tmp_path / "run")
    base = ["train", "m2", "--train-limit", "200", "--test-limit", "60", "--hidden", "16", "--z-dim", "2",
            "--labels", "20", "--batch-size", "50", "--labelled-batch", "10", "--eval-n", "20",
            "--baseline-steps", "5", "--label-boost", "2", "--no-progress", "--out", out]
    assert main(base + ["--epochs", "1"]) == 0
    for f in ("checkpoint.npz", "metrics.jsonl", "summary.json", "baseline.json", "classes.png",
              "style_transfer.png", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    summ = json.load(open(os.path.join(out, "summary.json")))
    n = 200 - 200 // 6                                       # the default --val holds out a sixth
    lam = 2 * 20 / n                                         # label boost K N_labels / N
    assert summ["labelled_weight"] == pytest.approx(lam)
    assert summ["alpha_step"] == pytest.approx(0.1 * n / 20 * lam)      # paper's ratio 0.1 N / N_labels
    assert 0 <= summ["test_error"] <= 1 and 0 <= summ["baseline_test_error"] <= 1
    rec = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert {"test_error", "test_nelbo_xy", "test_nelbo_x", "train_unlabelled", "train_ce"} <= set(rec)
    base_json = open(os.path.join(out, "baseline.json")).read()
    assert main(["train", "m2", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in recs] == [1, 2]
    assert open(os.path.join(out, "baseline.json")).read() == base_json      # not retrained on resume
    capsys.readouterr()
    assert main(["train", "m2", "--labels", "25", "--train-limit", "200", "--out", str(tmp_path / "b")]) == 2
    assert "cannot be balanced over 10 classes" in capsys.readouterr().err
    assert main(["train", "m2", "--labels", "300", "--train-limit", "200", "--out", str(tmp_path / "b")]) == 2
    assert "exceeds the 167 training images" in capsys.readouterr().err
    assert main(["train", "m2", "--val", "195", "--train-limit", "200", "--out", str(tmp_path / "b")]) == 2
    assert "--val 195 leaves 5 of the 200 training images" in capsys.readouterr().err


def test_validation_split_is_disjoint_and_chooses_the_epoch(tmp_path, capsys):
    """--val N holds N training images out (disjoint from the unlabelled and labelled training images); each
    epoch logs val_error, and summary.json reports the test error of the epoch with the lowest val_error."""
    from npdgm.cli import main
    from npdgm.commands import m2 as M2C
    from npdgm.commands.m1 import chosen_epoch, validation_size, validation_split

    tr, va = validation_split(600, 100, seed=3)
    assert len(va) == 100 and len(tr) == 500 and not set(tr) & set(va) and sorted({*tr, *va}) == list(range(600))
    assert validation_size(60000) == 10000 and validation_size(600, 0) == 0
    run = {"seed": 3, "data": None, "train_limit": 600, "test_limit": 50, "labels": 20, "binarize": "dynamic",
           "val": 100}
    x_tr, y_tr, lab, _, _, x_va, y_va = M2C._images(run, {})
    x_all, y_all = npdgm.data.load_mnist("train", None, limit=600)
    np.testing.assert_array_equal(y_all[tr], y_tr)
    np.testing.assert_array_equal(y_all[va], y_va)
    np.testing.assert_array_equal(x_all[tr], x_tr)                  # the training part itself, unbinarized
    assert set(tr[lab]) <= set(tr) and not set(tr[lab]) & set(va)  # labelled images are training images
    assert set(np.unique(x_va)) <= {0, 1}                           # drawn once, as the test set
    recs = [{"epoch": 1, "val_error": 0.5, "test_error": 0.4}, {"epoch": 2, "val_error": 0.3, "test_error": 0.35},
            {"epoch": 3, "val_error": 0.3, "test_error": 0.2}, {"epoch": 4, "val_error": 0.4, "test_error": 0.1}]
    assert chosen_epoch(recs)["epoch"] == 2 and chosen_epoch([{"epoch": 1}]) is None

    out = str(tmp_path / "run")
    assert main(["train", "m2", "--train-limit", "300", "--test-limit", "60", "--hidden", "16", "--z-dim", "2",
                 "--labels", "20", "--val", "50", "--batch-size", "50", "--eval-n", "0", "--baseline-steps", "0",
                 "--epochs", "3", "--no-progress", "--no-plots", "--out", out]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    summ = json.load(open(os.path.join(out, "summary.json")))
    assert all(0 <= r["val_error"] <= 1 for r in recs) and "test_val_error" not in recs[0]
    best = min(recs, key=lambda r: (r["val_error"], r["epoch"]))
    assert summ["chosen_epoch"] == best["epoch"] and summ["val_error"] == best["val_error"]
    assert summ["test_error_at_chosen_epoch"] == best["test_error"] and summ["val_n"] == 50
    assert "chosen on validation" in capsys.readouterr().out


def test_beta_weights_kl_in_training_loss_only(f64, rng):
    """beta scales the KL inside L for the training loss; nelbo() still reports the true bound."""
    m1 = _tiny(rng, C=3)
    m3 = M2(**dict(m1.config, beta=3.0))
    m3.flat_params[...] = m1.flat_params
    d = _data(rng, m1)
    t1, t3 = m1.loss(**d)[1], m3.loss(**d)[1]
    assert float(t3["labelled"] - t1["labelled"]) == pytest.approx(2 * float(t1["kl_l"]), rel=1e-10)
    np.testing.assert_array_equal(m1.nelbo(d["x_u"], eps=d["eps_u"]), m3.nelbo(d["x_u"], eps=d["eps_u"]))
    np.testing.assert_array_equal(m1.nelbo(d["x_l"], d["y_l"], eps=d["eps_l"]),
                                  m3.nelbo(d["x_l"], d["y_l"], eps=d["eps_l"]))


def test_gaussian_m2_on_real_features(f64, rng, tmp_path):
    """M2(likelihood="gaussian") (M1+M2: M2 on real-valued codes): -log p(x|y, z) is the Gaussian NLL with the
    learned per-dimension logvar_x (written out here), real inputs are accepted, decode is the mean, the
    registry has its gradient checks, and save/load keeps logvar_x."""
    m = _tiny(rng, C=3, likelihood="gaussian")
    m.params["logvar_x"][...] = rng.standard_normal(6) * 0.5
    x, y = 3 * rng.standard_normal((4, 6)), np.array([0, 2, 1, 1])
    eps = rng.standard_normal((4, 2))
    mu, lv = m.encode(x, y)
    out = m.decode(mu + np.exp(lv / 2) * eps, y)
    lvx = m.params["logvar_x"]
    nll = 0.5 * (((x - out) ** 2) * np.exp(-lvx) + lvx + np.log(2 * np.pi)).sum(1)
    kl = 0.5 * (mu ** 2 + np.exp(lv) - 1 - lv).sum(1)
    np.testing.assert_allclose(m.nelbo(x, y, eps=eps), nll + kl + np.log(3), rtol=1e-10)
    m.save(tmp_path / "g.npz")
    m2 = npdgm.load(tmp_path / "g.npz")
    assert m2.likelihood == "gaussian" and m2.sigma is None
    np.testing.assert_allclose(m2.nelbo(x, y, eps=eps), m.nelbo(x, y, eps=eps), rtol=1e-6)
    fixed = _tiny(rng, C=3, likelihood="gaussian", sigma=0.5)
    assert "logvar_x" not in fixed.params
    tags = {r[0].split(":")[0] for r in gradcheck.run_all(["model.m2[labelled+unlabelled,gaussian"])}
    assert len(tags) == 2
    with pytest.raises(ValueError, match="sigma applies to the Gaussian likelihood only"):
        M2(x_dim=4, sigma=1.0)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        M2(x_dim=4, likelihood="poisson")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\] for a Bernoulli decoder"):
        _tiny(rng, C=3).nelbo(x, y)
