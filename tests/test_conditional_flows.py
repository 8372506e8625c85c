"""Conditional flows p(x | c): the context gradient of every conditional layer (gradcheck rows), MADE's order
kept with a context, context-free specs and checkpoints unchanged, bad contexts named, checkpoints of
conditional flows."""
import json

import numpy as np
import pytest

import npdgm
from npdgm import checks, gradcheck  # noqa: F401  (checks registers the model gradchecks)
from npdgm.gradcheck import numerical_jacobian
from npdgm.models import flows as F

COND = ["cond-couplings", "cond-maf", "cond-iaf", "cond-spline"]


def test_every_conditional_layer_has_passing_context_gradient_rows():
    rows = gradcheck.run_all([f"model.flow[{t}]" for t in COND])
    ctx = {(r[0], r[1]) for r in rows if r[1] in ("loss:c", "inverse:c")}
    assert ctx == {(f"model.flow[{t}]", k) for t in COND for k in ("loss:c", "inverse:c")}
    bad = [r for r in rows if not r[4]]
    assert not bad, bad


@pytest.mark.parametrize("cls", [F.MAF, F.IAF])
def test_made_with_context_stays_autoregressive_in_x_and_sees_c(f64, rng, cls):
    layer = cls(4, [8, 8], "tanh", seed=1, context_dim=2)
    layer.flatten()
    layer.flat_params[...] += 0.3 * rng.standard_normal(layer.flat_params.shape)

    def one_pass(v, c):  # the MADE's map: MAF's density direction, IAF's sampling direction
        return layer.forward(v, c)[0] if cls is F.MAF else layer.inverse(v, context=c)

    x, c = rng.standard_normal((3, 4)), rng.standard_normal((3, 2))
    J = numerical_jacobian(lambda v: one_pass(v, c), x)  # (B, out, in)
    assert np.allclose(np.triu(J, 1), 0, atol=1e-9)  # z_d depends on x_<=d only
    out, out2 = one_pass(x, c), one_pass(x, c + 1.0)
    assert np.abs(out - out2).max() > 1e-3  # ... and on c


def test_context_free_specs_have_no_context_key_and_old_configs_load(tmp_path, f64):
    flow = F.realnvp2d(2, (4,), seed=0)
    assert flow.context_dim == 0 and all("context_dim" not in s for s in flow.config["layers"])
    spec = F.MAF(3, [5], seed=1).spec()
    assert "context_dim" not in spec and F.build_layer(spec).context_dim == 0
    flow.save(tmp_path / "f.npz")
    back = npdgm.load(tmp_path / "f.npz")
    assert back.context_dim == 0
    x = np.random.default_rng(0).standard_normal((5, 2))
    np.testing.assert_array_equal(back.log_prob(x), flow.log_prob(x))


def test_conditional_flow_checkpoint_round_trip(tmp_path, f64, rng):
    flow = F.Flow([F.AffineCoupling(2, "half", 0, [5], seed=1, context_dim=1), F.ActNorm(2),
                   F.SplineCoupling(2, "half", 1, [5], bins=4, seed=2, context_dim=1)])
    x, c = rng.standard_normal((6, 2)), rng.standard_normal((6, 1))
    flow.loss_and_grad(x, context=c)
    flow.save(tmp_path / "c.npz")
    back = npdgm.load(tmp_path / "c.npz")
    assert back.context_dim == 1
    np.testing.assert_array_equal(back.log_prob(x, c), flow.log_prob(x, c))
    s1 = back.sample(4, rng=0, context=np.array([0.5]))
    s2 = back.sample(4, rng=0, context=np.full((4, 1), 0.5))
    np.testing.assert_array_equal(s1, s2)


def test_bad_contexts_are_named(f64, rng):
    cond = F.Flow([F.AffineCoupling(2, "half", 0, [4], seed=1, context_dim=3)])
    plain = F.realnvp2d(2, (4,), seed=0)
    x = rng.standard_normal((5, 2))
    with pytest.raises(ValueError, match=r"conditional \(context_dim=3\).*\(batch, 3\)"):
        cond.log_prob(x)
    with pytest.raises(ValueError, match=r"context must have shape \(5, 3\)"):
        cond.log_prob(x, rng.standard_normal((5, 2)))
    with pytest.raises(ValueError, match="takes no context"):
        plain.log_prob(x, rng.standard_normal((5, 3)))
    with pytest.raises(TypeError, match="context must be a float array"):
        cond.log_prob(x, np.zeros((5, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="share one context_dim"):
        F.Flow([F.AffineCoupling(2, "half", 0, [4], context_dim=3), F.MAF(2, [4], context_dim=2)])


# -- learning: the samples of a trained conditional flow follow c ---------------------------------------------
def _train(flow, x, c, steps, batch=256, lr=3e-3):
    from npdgm import optim

    opt, rng = optim.Adam(flow, lr=lr), np.random.default_rng(0)
    for _ in range(steps):
        i = rng.integers(0, len(x), batch)
        flow.loss_and_grad(x[i], context=c[i])
        opt.step()
    return flow


def test_rings_samples_radius_tracks_c():
    """p(x | c) on rings of radius c ~ U(0.5, 2.5): after 400 short steps the median radius of its samples at c
    follows c (measured: 0.70, 1.51, 2.32 at c = 0.7, 1.5, 2.3); an unconditional flow gives ~1.5 for every c."""
    from npdgm.data import make_rings

    x, c = (a.astype(np.float32) for a in make_rings(4096, np.random.default_rng(0)))
    flow = _train(F.realnvp2d(4, (32, 32), seed=0, context_dim=1), x, c, 400)
    for r in (0.7, 1.5, 2.3):
        s = flow.sample(2000, rng=1, context=np.array([r]))
        assert abs(float(np.median(np.hypot(s[:, 0], s[:, 1]))) - r) < 0.25, r


def test_two_moons_class_conditional_samples_land_on_their_half():
    """moons with the upper / lower half as classes 0 / 1: samples of class k lie mostly on half k (its points'
    nearest neighbours in the data have label k)."""
    from npdgm.data import make_toy2d_labelled

    x, y = make_toy2d_labelled("moons", 4096, np.random.default_rng(0))
    x = x.astype(np.float32)
    flow = _train(F.realnvp2d(4, (32, 32), seed=0, context_dim=2), x, np.eye(2, dtype=np.float32)[y], 300)
    for k in (0, 1):
        s = flow.sample(500, rng=2, context=np.eye(2)[k])
        nearest = np.argmin(((s[:, None, :] - x[None, :1000, :]) ** 2).sum(-1), axis=1)
        assert np.mean(y[:1000][nearest] == k) > 0.9, k
    # Bayes' rule with the exact log p(x|y): rows normalize, and the two halves are told apart
    xt, yt = make_toy2d_labelled("moons", 1000, np.random.default_rng(1))
    logp = flow.classify(xt.astype(np.float32), batch_size=300)
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1, rtol=1e-6)
    assert np.mean(flow.predict(xt.astype(np.float32)) == yt) > 0.95
    with pytest.raises(ValueError, match="classify needs a class-conditional flow"):
        F.realnvp2d(1, (4,)).classify(xt.astype(np.float32))


# -- npdgm train flow2d --condition ---------------------------------------------------------------------------
def _cli(*argv):
    from npdgm.cli import main

    return main([str(a) for a in argv])


SMALL = ["--n-train", 512, "--n-test", 128, "--couplings", 2, "--hidden", 8, "--batch-size", 128, "--no-progress"]


@pytest.mark.parametrize("dataset,context_dim", [("moons", 2), ("rings", 1)])
def test_cli_flow2d_condition_trains_resumes_and_draws_p_x_given_c(tmp_path, capsys, dataset, context_dim):
    out = tmp_path / "run"
    assert _cli("train", "flow2d", "--condition", "--dataset", dataset, *SMALL, "--epochs", 1, "--out", out) == 0
    assert _cli("train", "flow2d", "--resume", out, "--epochs", 2, "--no-progress", "--no-plots") == 0
    flow = npdgm.load(out)
    assert flow.context_dim == context_dim and (out / "density.png").exists()
    recs = [json.loads(s) for s in open(out / "metrics.jsonl")]
    assert len(recs) == 2 and all(np.isfinite(r["test_nll"]) for r in recs)
    assert "RuntimeWarning" not in capsys.readouterr().err
    assert _cli("sample", out, "--n", 10) != 0
    assert "holds a conditional flow p(x | c)" in capsys.readouterr().err


def test_cli_flow2d_condition_bad_combinations_are_named(tmp_path, capsys):
    assert _cli("train", "flow2d", "--condition", "--dataset", "checkerboard", *SMALL, "--out", tmp_path / "a") != 0
    assert "--condition needs a toy with classes" in capsys.readouterr().err
    assert _cli("train", "flow2d", "--dataset", "rings", *SMALL, "--out", tmp_path / "b") != 0
    assert "--dataset rings is a conditional density" in capsys.readouterr().err


def test_cli_class_conditional_mnist_flow_samples_per_class_and_classifies(tmp_path, capsys):
    """npdgm train realnvp --condition (one-hot MNIST labels): samples.png one row per class, and
    `npdgm evaluate RUN --method classify` reports the Bayes-rule test error (quality needs long runs)."""
    out = tmp_path / "run"
    assert _cli("train", "realnvp", "--condition", "--train-limit", 128, "--test-limit", 32, "--epochs", 1,
                "--couplings", 2, "--hidden", 16, "--batch-size", 64, "--no-progress", "--out", out) == 0
    assert (out / "samples.png").exists() and npdgm.load(out).context_dim == 10
    assert _cli("evaluate", out, "--method", "classify", "--n-images", 40, "--json", tmp_path / "c.json") == 0
    r = json.load(open(tmp_path / "c.json"))["methods"]["classify"]
    assert 0 <= r["error"] <= 1 and len(r["predictions"]) == 40 and "exact log p(x|y)" in r["rule"]
    assert "RuntimeWarning" not in capsys.readouterr().err
