"""Conditional VAE and the categorical kernels: kernel values (their gradients are the registry's kernel checks,
tests/test_kernels.py), the split first layer against a plain MLP on [x | onehot], save/load, bad labels, a short
learning test, the CLI."""
import json
import os

import numpy as np
import pytest

import npdgm
from npdgm import checks, gradcheck  # noqa: F401  (checks registers the model gradchecks)
from npdgm.kernels import (log_softmax_forward, softmax_ce_forward, softmax_entropy_forward,
                           softmax_expectation_forward, softmax_forward)
from npdgm.models.cvae import CVAE, ConditionalMLP, check_labels, one_hot
from npdgm.nn import MLP



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


def test_categorical_kernels_values(rng):
    s = rng.standard_normal((4, 5)) * 3
    s[0, 0] = 800.0                                   # stable for huge logits
    q = np.exp(s - s.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    np.testing.assert_allclose(softmax_forward(s), q, rtol=1e-12)
    np.testing.assert_allclose(np.exp(log_softmax_forward(s)), q, rtol=1e-12)
    y = np.array([0, 4, 2, 1])
    with np.errstate(divide="ignore"):
        np.testing.assert_allclose(softmax_ce_forward(s, y), -np.log(q[np.arange(4), y]), rtol=1e-9, atol=1e-12)
    ent = -(q * np.log(np.where(q > 0, q, 1))).sum(1)
    np.testing.assert_allclose(softmax_entropy_forward(s), ent, rtol=1e-9, atol=1e-12)
    assert softmax_entropy_forward(np.zeros((1, 7)))[0] == pytest.approx(np.log(7))
    v = rng.standard_normal((4, 5))
    np.testing.assert_allclose(softmax_expectation_forward(s, v), (q * v).sum(1), rtol=1e-12)


def test_softmax_ce_bad_labels():
    s = np.zeros((3, 4))
    with pytest.raises(ValueError, match="labels must have shape"):
        softmax_ce_forward(s, np.array([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        softmax_ce_forward(s, np.array([0.0, 1.0, 2.0]))


def test_registered_cvae_gradchecks_pass():
    rows = gradcheck.run_all(["model.cvae"])
    assert len({r[0] for r in rows}) >= 3
    assert all(r[4] for r in rows), [r for r in rows if not r[4]]


def test_conditional_mlp_equals_mlp_on_concatenated_input(f64, rng):
    """The split first layer is exactly an MLP on [x | e]: outputs, parameter grads, dx; and forward_all
    equals the per-class loop."""
    D, C = 6, 3
    cm = ConditionalMLP(D, C, [5, 4], 2, activation="tanh", rng=1)
    ref = MLP(D + C, [5, 4], 2, activation="tanh", rng=1)
    cm.flatten()
    ref.flatten()
    x, y = rng.standard_normal((7, D)), rng.integers(0, C, 7)
    e = one_hot(y, C, np.float64)
    out = cm.forward(x, e)
    np.testing.assert_allclose(out, ref.forward(np.concatenate([x, e], 1)), rtol=1e-12)
    dy = rng.standard_normal(out.shape)
    cm.zero_grad()
    ref.zero_grad()
    dx = cm.backward(dy)
    dxe = ref.backward(dy)
    np.testing.assert_allclose(dx, dxe[:, :D], rtol=1e-10, atol=1e-12)
    for n in cm.grads:
        np.testing.assert_allclose(cm.grads[n], ref.grads[n], rtol=1e-10, atol=1e-12, err_msg=n)
    # every class at once: rows c * B + b
    allc = cm.forward_all(x)
    loop = np.concatenate([ref.forward(np.concatenate([x, one_hot(np.full(7, c), C, np.float64)], 1))
                           for c in range(C)])
    np.testing.assert_allclose(allc, loop, rtol=1e-12)
    dy = rng.standard_normal(allc.shape)
    cm.zero_grad()
    ref.zero_grad()
    dx = cm.backward(dy)
    ref.forward(np.concatenate([np.tile(x, (C, 1)), np.repeat(np.eye(C), 7, axis=0)], 1))
    dxe = ref.backward(dy)
    np.testing.assert_allclose(dx, dxe[:, :D].reshape(C, 7, D).sum(0), rtol=1e-10, atol=1e-12)
    for n in cm.grads:
        np.testing.assert_allclose(cm.grads[n], ref.grads[n], rtol=1e-10, atol=1e-12, err_msg=n)


def test_cvae_loss_definition(f64, rng):
    m = CVAE(x_dim=8, num_classes=4, hidden=(6,), z_dim=3, seed=3)
    x, y = rng.uniform(0, 1, (5, 8)), np.array([0, 1, 2, 3, 1])
    eps = rng.standard_normal((1, 5, 3))
    loss, t = m.loss(x, y, eps)
    e = one_hot(y, 4, np.float64)
    h = m.encoder.forward(x, e)
    mu, lv = h[:, :3], h[:, 3:]
    z = mu + np.exp(lv / 2) * eps[0]
    logits = m.decoder.forward(z, e)
    p = 1 / (1 + np.exp(-logits))
    rec = -(x * np.log(p) + (1 - x) * np.log(1 - p)).sum(1).mean()
    kl = (0.5 * (mu ** 2 + np.exp(lv) - 1 - lv).sum(1)).mean()
    assert float(t["recon"]) == pytest.approx(rec, rel=1e-10)
    assert float(t["kl"]) == pytest.approx(kl, rel=1e-10)
    assert float(loss) == pytest.approx(rec + kl, rel=1e-10)
    # the label matters: a different label gives a different loss
    assert float(m.loss(x, (y + 1) % 4, eps)[0]) != pytest.approx(float(loss))


def test_cvae_save_load_same_loss(tmp_path, rng):
    m = CVAE(x_dim=784, num_classes=10, hidden=(32,), z_dim=4, seed=5, likelihood="gaussian")
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape).astype(np.float32) * 0.01
    x, y = rng.standard_normal((6, 784)).astype(np.float32), rng.integers(0, 10, 6)
    eps = rng.standard_normal((1, 6, 4)).astype(np.float32)
    path = tmp_path / "cvae.npz"
    m.save(path)
    m2 = npdgm.load(path)
    assert isinstance(m2, CVAE) and m2.config == m.config
    assert float(m2.loss(x, y, eps)[0]) == float(m.loss(x, y, eps)[0])


def test_check_labels_errors():
    assert check_labels([1, 2, 3], 3, 10).dtype == np.int64
    assert check_labels(np.array([1.0, 2.0]), 2, 10).tolist() == [1, 2]
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_labels(np.array([0, 10]), 2, 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_labels(np.array([-1, 3]), 2, 10)
    with pytest.raises(ValueError, match="3 labels but there are 2 images"):
        check_labels(np.array([0, 1, 2]), 2, 10)
    with pytest.raises(TypeError, match="non-integer"):
        check_labels(np.array([0.5, 1.0]), 2, 10)
    with pytest.raises(TypeError, match="integer class labels"):
        check_labels(np.array([True, False]), 2, 10)
    with pytest.raises(ValueError, match="1-D"):
        check_labels(np.zeros((2, 1), int), 2, 10)


def test_cvae_bad_input():
    m = CVAE(x_dim=5, num_classes=3, hidden=(4,), z_dim=2)
    x = np.full((2, 5), 0.5, np.float32)
    with pytest.raises(ValueError, match="y has 3 labels but there are 2 images"):
        m.loss_and_grad(x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        m.loss_and_grad(x, [0, 3])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        m.loss_and_grad(x * 3, [0, 1])
    with pytest.raises(ValueError, match="eps must have shape"):
        m.loss_and_grad(x, [0, 1], eps=np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="num_classes"):
        CVAE(num_classes=0)


def test_cvae_generation_shapes():
    m = CVAE(x_dim=784, num_classes=10, hidden=(16,), z_dim=3)
    g = m.class_grid(4, rng=0)
    assert g.shape == (40, 784) and 0 <= g.min() and g.max() <= 1
    x = np.random.default_rng(0).random((3, 784), dtype=np.float32)
    st = m.style_transfer(x, [1, 2, 3])
    assert st.shape == (3, 10, 784)
    assert m.sample([0, 9], rng=1).shape == (2, 784)


def test_cvae_learns(rng):
    """30 Adam steps (batch 50) on 500 bundled images: the -ELBO on 200 of them drops from ~546 by more
    than 200 nats/image (measured: to ~230)."""
    from npdgm import optim
    from npdgm.cli import main
    from npdgm.data import load_mnist

    x, y = load_mnist("train", limit=500)
    m = CVAE(hidden=(64,), z_dim=8, seed=0)
    opt = optim.Adam(m, lr=3e-3)
    eps_eval = np.random.default_rng(1).standard_normal((1, 200, 8)).astype(np.float32)
    before = float(m.loss(x[:200], y[:200], eps_eval)[0])
    r = np.random.default_rng(0)
    for _ in range(30):
        i = r.integers(0, 500, 50)
        m.loss_and_grad(x[i], y[i], rng=r)
        opt.step()
    after = float(m.loss(x[:200], y[:200], eps_eval)[0])
    assert before - after > 200, (before, after)


def test_cli_train_cvae_and_resume(tmp_path):
    from npdgm.cli import main

    out = str(tmp_path / "run")
    args = ["train", "cvae", "--train-limit", "200", "--test-limit", "50", "--hidden", "16", "--z-dim", "2",
            "--batch-size", "50", "--no-progress", "--out", out]
    assert main(args + ["--epochs", "1"]) == 0
    for f in ("checkpoint.npz", "metrics.jsonl", "summary.json", "classes.png", "style_transfer.png", "curves.png"):
        assert os.path.exists(os.path.join(out, f)), f
    assert main(["train", "cvae", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    recs = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["epoch"] for r in recs] == [1, 2]
    assert recs[1]["test_nelbo"] < recs[0]["test_nelbo"]


def test_cvae_log_prob_is_the_iwae_estimate_of_log_p_x_given_y(f64, rng):
    """CVAE.log_prob(x, y, k) = log_likelihood: logsumexp_k [log p(x|z_k, y) + log N(z_k) - log q(z_k|x, y)]
    - log k, written out here with numpy from encode/decode and the same noise; more samples, a larger bound."""
    m = CVAE(x_dim=6, num_classes=3, hidden=(5,), z_dim=2, activation="tanh", seed=4)
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape) * 0.3
    x, y = rng.uniform(0, 1, (4, 6)), np.array([0, 2, 1, 2])
    eps = rng.standard_normal((9, 4, 2))

    class Replay:
        def standard_normal(self, shape, dtype=None):
            assert tuple(shape) == eps.shape
            return eps

    mu, lv = m.encode(x, y)
    z = mu + np.exp(lv / 2) * eps                                                       # (9, 4, 2)
    p = m.decode(z.reshape(36, 2), np.tile(y, 9)).reshape(9, 4, 6)
    lpx = (x * np.log(p) + (1 - x) * np.log1p(-p)).sum(2)
    logw = lpx - 0.5 * (z ** 2).sum(2) + 0.5 * (eps ** 2 + lv).sum(2)
    want = np.log(np.exp(logw).mean(0))
    np.testing.assert_allclose(m.log_prob(x, y, k=9, rng=Replay()), want, rtol=1e-10)
    np.testing.assert_allclose(m.log_likelihood(x, y, k=9, rng=Replay()), want, rtol=1e-10)
    np.testing.assert_allclose(m.log_prob(x, y, k=9, rng=3, chunk=8), m.log_prob(x, y, k=9, rng=3), rtol=1e-12)
    assert m.log_prob(x, y, k=500, rng=0).mean() > m.log_prob(x, y, k=1, rng=0).mean()
    with pytest.raises(ValueError, match="4 labels but there are 3 images"):
        m.log_prob(x[:3], y, k=2)
    with pytest.raises(TypeError, match=r"call loss\(x, y, eps\).*log_prob\(x, y, k\).*sample\(y\)"):
        m(x, y)


def test_cvae_classify_is_bayes_rule_exactly_when_q_is_the_prior(f64, rng):
    """With the encoder's last layer zero, q(z|x, y) = N(0, I) = p(z), and with the decoder's z-rows zero,
    p(x|z, y) = Bernoulli(sigmoid(b + W_y)) does not depend on z: every importance weight is p(x|y), so
    classify gives the exact posterior p(y|x) = p(x|y) p(y) / sum_c p(x|c) p(c), computed here by hand."""
    m = CVAE(x_dim=6, num_classes=3, hidden=(5,), z_dim=2, activation="tanh", seed=1)
    m.flat_params[...] = rng.standard_normal(m.flat_params.shape)
    m.params["encoder.2.W"][...] = 0
    m.params["encoder.2.b"][...] = 0
    m.params["decoder.0.W"][:2] = 0                      # rows of z (the label rows follow)
    x = (rng.uniform(0, 1, (7, 6)) > 0.5).astype(np.float64)
    logpx = np.stack([(lambda p: (x * np.log(p) + (1 - x) * np.log1p(-p)).sum(1))(
        m.decode(np.zeros((7, 2)), np.full(7, c))) for c in range(3)], axis=1)
    prior = np.log([0.2, 0.5, 0.3])
    want = logpx + prior - np.log(np.exp(logpx + prior).sum(1, keepdims=True))
    np.testing.assert_allclose(m.classify(x, k=3, rng=0, log_prior=prior), want, rtol=1e-10)
    uniform = m.classify(x, k=2, rng=0)
    np.testing.assert_allclose(np.exp(uniform).sum(1), 1, rtol=1e-12)
    np.testing.assert_array_equal(m.predict(x, k=2, rng=0), logpx.argmax(1))
    with pytest.raises(ValueError, match="log_prior must be 3 finite"):
        m.classify(x, log_prior=[0.0, 0.0])


def test_cvae_classify_uses_the_iwae_estimate_per_class(f64, rng):
    """classify's log p(x|y) per class = log_likelihood with that label, the classes drawing one stream in order."""
    m = CVAE(x_dim=6, num_classes=3, hidden=(5,), z_dim=2, activation="tanh", seed=4)
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape) * 0.3
    x = rng.uniform(0, 1, (4, 6))
    g = np.random.default_rng(5)
    lp = np.stack([m.log_likelihood(x, np.full(4, c), k=7, rng=g) for c in range(3)], axis=1)
    want = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    np.testing.assert_allclose(m.classify(x, k=7, rng=np.random.default_rng(5)), want, rtol=1e-10)


def test_cli_evaluate_classify(tmp_path, capsys):
    """npdgm evaluate RUN --method classify: the error of the Bayes-rule classifier on the first N test
    images, the per-image predictions in --json; refused beside other methods (test_m1: for an m2 run whose
    M1 VAE changed)."""
    from npdgm.cli import main
    from npdgm.data import load_mnist

    out = str(tmp_path / "run")
    assert main(["train", "cvae", "--epochs", "3", "--hidden", "64", "--z-dim", "4", "--train-limit", "5000",
                 "--batch-size", "64", "--test-limit", "100", "--no-progress", "--no-plots", "--out", out]) == 0
    capsys.readouterr()
    js = tmp_path / "c.json"
    assert main(["evaluate", out, "--method", "classify", "--k", "5", "--n-images", "60", "--json", js]) == 0
    line = capsys.readouterr().out
    r = json.loads(js.read_text())["methods"]["classify"]
    _, y = load_mnist("test", None, limit=60)
    assert len(r["predictions"]) == 60 and r["k"] == 5
    assert r["error"] == pytest.approx(float((np.array(r["predictions"]) != y).mean()))
    assert f"test error = {r['error']:.4f}" in line
    assert r["error"] < 0.6                       # three epochs on 5000 images already classify (chance: 0.9)
    assert main(["evaluate", out, "--method", "classify", "iwae"]) == 2
    assert "give it alone" in capsys.readouterr().err


def _digit_classifier(n=2000, max_iter=50):
    """The project's softmax regression (npdgm.models.m1) on the first n bundled training digits, 2x2-pooled to
    14x14 so it fits in about a second (test error ~12%); returns predict(images (m, 784)) -> labels."""
    from npdgm.data import load_mnist
    from npdgm.models.m1 import SoftmaxRegression

    pool = lambda a: np.asarray(a, np.float64).reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(-1, 196)  # noqa
    x, y = load_mnist("train", limit=n)
    clf = SoftmaxRegression(10, l2=1e-2, max_iter=max_iter).fit(pool(x), y)
    return lambda images: clf.predict(pool(images))


def _label_accuracy(model, predict, n_per_class=50, seed=1):
    """Fraction of class-conditional samples (the same z under every label, as classes.png) that ``predict``
    labels as their class."""
    grid = np.asarray(model.class_grid(n_per_class, rng=seed))
    return float((predict(grid) == np.repeat(np.arange(10), n_per_class)).mean())


def test_cvae_cli_defaults_follow_the_label(tmp_path):
    """npdgm train cvae at its defaults (z 20, 400 hidden, label scale 10) for 30 steps: a classifier trained on
    real digits labels >= 90% of its class-conditional samples as their class (measured 99%; with the plain
    one-hot, --label-scale 1, the same run gives ~12%: z carries the class and the label is ignored)."""
    from npdgm.cli import main

    out = tmp_path / "run"
    assert main(["train", "cvae", "--train-limit", "1920", "--batch-size", "64", "--test-limit", "100", "--epochs", "1",
                 "--no-plots", "--no-progress", "--out", str(out)]) == 0
    model = npdgm.load(out)
    assert model.z_dim == 20 and model.label_scale == 10.0
    assert _label_accuracy(model, _digit_classifier()) >= 0.9


@pytest.mark.slow
def test_cvae_full_default_run_follows_the_label(tmp_path):
    """The whole default run (10 epochs on the bundled 10k images, ~1 min): >= 90% of the classes.png-style
    samples are classified as their label by softmax regression on every bundled training digit."""
    from npdgm.cli import main

    out = tmp_path / "run"
    assert main(["train", "cvae", "--no-plots", "--no-progress", "--out", str(out)]) == 0
    assert _label_accuracy(npdgm.load(out), _digit_classifier(10000, 200), 100) >= 0.9


def test_label_scale_gradients_config_and_old_checkpoints(f64, rng, tmp_path):
    """label_scale s enters as s e_y: the loss equals the plain CVAE's with its label rows W[D:] multiplied by s,
    its gradient passes central differences, and a config without the key (older checkpoints) loads as s = 1."""
    from npdgm.checks import _cvae_check

    errs = _cvae_check(rng, label_scale=5.0, activation="tanh")
    assert max(rel for _, rel in errs.values()) < 1e-6, errs
    a = CVAE(x_dim=8, num_classes=4, hidden=(6,), z_dim=3, seed=3, label_scale=5.0)
    b = CVAE(x_dim=8, num_classes=4, hidden=(6,), z_dim=3, seed=3)
    for net in ("encoder", "decoder"):
        W = getattr(b, net).layers[0].W.data
        W[getattr(b, net).d_in:] *= 5.0
    x, y, eps = rng.uniform(0, 1, (5, 8)), np.array([0, 1, 2, 3, 1]), rng.standard_normal((1, 5, 3))
    assert float(a.loss(x, y, eps)[0]) == pytest.approx(float(b.loss(x, y, eps)[0]), rel=1e-12)
    cfg = dict(a.config)
    del cfg["label_scale"]
    assert CVAE.from_config(cfg).label_scale == 1.0 and CVAE.from_config(a.config).label_scale == 5.0
    with pytest.raises(ValueError, match="label_scale"):
        CVAE(label_scale=0)
