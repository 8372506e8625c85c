"""MADE / MAF / IAF: masks are autoregressive (triangular Jacobians), exact inverses, log-dets against
finite-difference Jacobians, hand-written gradients of both directions, specs, factories, the CLI."""
import inspect
import json

import numpy as np
import pytest

import npdgm
from npdgm import checks, gradcheck  # noqa: F401  (checks registers the model gradchecks)
from npdgm.models import autoregressive as AR
from npdgm.models import flows as F


def _layer(cls, d, rng, **kw):
    layer = cls(d, **{"hidden": [7, 6], "activation": "tanh", "seed": 1, **kw}).flatten()
    layer.flat_params[...] += 0.3 * rng.standard_normal(layer.flat_params.shape)
    return layer


@pytest.mark.parametrize("d,hidden", [(2, [3]), (3, [5, 4]), (5, [2]), (6, [11, 9, 7]), (10, [4, 3])])
def test_made_masks_are_autoregressive(f64, rng, d, hidden):
    """d out_j,d / d x_k = 0 unless k < d, for both output blocks (central differences of the masked net)."""
    made = AR.MADE(d, hidden, 2, "tanh", seed=3)
    for m in made.layers:
        if isinstance(m, AR.MaskedLinear):
            m.W.data[...] = rng.standard_normal(m.W.data.shape)  # masked entries too: the mask must hide them
    J = gradcheck.numerical_jacobian(made.forward, rng.standard_normal((3, d)))
    for block in range(2):
        Jb = np.abs(J[:, block * d:(block + 1) * d, :]).max(axis=0)
        assert np.all(Jb[np.triu_indices(d)] == 0), Jb
        if len(hidden) == 1 and hidden[0] >= d - 1:  # every allowed path exists
            assert np.all(Jb[np.tril_indices(d, -1)] > 0), Jb
        assert np.all(Jb[d - 1, :d - 1] > 0), Jb  # narrow layers too: the last output sees every earlier input
    masks = AR.made_masks(d, hidden)
    assert [m.shape for m in masks] == list(zip([d, *hidden], [*hidden, 2 * d]))
    deg = AR.made_degrees(d, hidden)
    assert deg[0].tolist() == list(range(1, d + 1)) and all(1 <= h.min() and h.max() <= d - 1 for h in deg[1:])


@pytest.mark.parametrize("cls", [AR.MAF, AR.IAF])
@pytest.mark.parametrize("d", [2, 3, 6])
def test_round_trip_triangular_jacobian_and_logdet(f64, rng, cls, d):
    layer = _layer(cls, d, rng)
    x = rng.standard_normal((5, d)) * 1.5
    y, ld = layer.forward(x)
    xx, ldi = layer.inverse(y, logdet=True)
    assert np.max(np.abs(xx - x)) < 1e-10
    np.testing.assert_allclose(ldi, -ld, rtol=1e-10, atol=1e-12)
    J = gradcheck.numerical_jacobian(lambda a: layer.forward(a)[0], x)
    assert np.abs(J[:, np.triu_indices(d, 1)[0], np.triu_indices(d, 1)[1]]).max() < 1e-9  # lower triangular
    np.testing.assert_allclose(ld, np.linalg.slogdet(J)[1], rtol=1e-7, atol=1e-8)
    Ji = gradcheck.numerical_jacobian(lambda a: layer.inverse(a), y)
    np.testing.assert_allclose(ldi, np.linalg.slogdet(Ji)[1], rtol=1e-7, atol=1e-8)


def test_maf_density_is_one_made_pass_and_sampling_d_passes(f64, rng):
    layer = _layer(AR.MAF, 5, rng)
    calls = []
    orig = layer.made.forward
    layer.made.forward = lambda a: (calls.append(1), orig(a))[1]
    z, _ = layer.forward(rng.standard_normal((4, 5)))
    assert len(calls) == 1
    calls.clear()
    layer._d_pass(z, reference=True)
    assert len(calls) == 5 + 1  # the reference: D passes, then one at the solution (the backward's cache)
    calls.clear()
    layer.inverse(z)
    assert len(calls) == 1  # the incremental solve needs no whole pass; one at the solution for the cache


@pytest.mark.parametrize("d,hidden,act", [(2, [3], "relu"), (6, [11, 9, 7], "tanh"), (10, [4, 3], "relu"),
                                          (7, [20], "elu"), (9, [2, 30], "softplus")])
@pytest.mark.parametrize("cls", [AR.MAF, AR.IAF])
def test_incremental_solve_matches_the_plain_d_passes(f64, rng, cls, d, hidden, act):
    """The sampling solve (rank-1 first-layer updates, degree prefixes of deeper layers, two output columns)
    gives the reference's D whole MADE passes to float64 rounding, and is an exact inverse of the one pass."""
    layer = _layer(cls, d, rng, hidden=hidden, activation=act)
    z = rng.standard_normal((6, d)) * 1.5
    x, ld = layer._d_pass(z)
    x_ref, ld_ref = layer._d_pass(z, reference=True)
    np.testing.assert_allclose(x, x_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld, ld_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer._one_pass(x, None)[0], z, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [AR.MAF, AR.IAF])
def test_incremental_solve_with_a_context_matches_the_plain_d_passes(f64, rng, cls):
    """With a context c the incremental solve adds c's rows of the first layer once, before the first coordinate:
    the same x as D whole passes of MADE([x | c]), and the one pass at (x, c) gives z back."""
    layer = cls(7, hidden=(12, 9), activation="tanh", seed=3, context_dim=3)
    for p in layer.parameters():
        p.data[...] += 0.3 * rng.standard_normal(p.shape)
    z, c = rng.standard_normal((5, 7)), rng.standard_normal((5, 3))
    x, ld = layer._d_pass(z, c)
    x_ref, ld_ref = layer._d_pass(z, c, reference=True)
    np.testing.assert_allclose(x, x_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ld, ld_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer._one_pass(x, c)[0], z, rtol=1e-10, atol=1e-10)
    assert np.abs(layer._d_pass(z, c + 1.0)[0] - x).max() > 1e-3          # the context changes the solution


def test_maf_flow_samples_match_the_reference_and_report_progress(f64, rng):
    """A whole MAF flow (logit, ActNorm, permutations) samples as its layers' reference solves do; the progress
    hook of :func:`npdgm.commands.flows.sampling_progress` counts D per MAF layer and is removed afterwards."""
    from npdgm.commands.flows import sampling_progress

    flow = F.maf(12, 3, (16, 16), actnorm=True, seed=2)
    flow.flat_params[...] += 0.2 * rng.standard_normal(flow.flat_params.shape)
    noise = rng.standard_normal((5, 12))
    with sampling_progress(flow, 1, enabled=True) as bar:
        x = flow.sample(5, noise=noise)
        assert bar.total == 3 * 12 and bar.n == 3 * 12
    mafs = [layer for layer in flow.layers if isinstance(layer, AR.MAF)]
    assert all(layer.progress is None for layer in mafs)
    for layer in mafs:
        layer._solve = layer._solve_reference
    np.testing.assert_allclose(x, flow.sample(5, noise=noise), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cls", [AR.MAF, AR.IAF])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_backward_of_both_directions_matches_central_differences(f64, rng, cls, direction):
    layer = _layer(cls, 4, rng, scale="atan", scale_bound=2.0)
    a = rng.standard_normal((4, 4))
    rep = gradcheck.check_flow_layer(layer, a, rng, direction)
    assert max(r for _, r in rep.values()) < 1e-7, rep
    for m in layer.made.layers:  # masked weights get no gradient
        if isinstance(m, AR.MaskedLinear):
            assert np.all(m.W.grad[m.mask == 0] == 0)


def test_gradchecks_are_registered():
    """model.flow[maf] and model.flow[iaf] (run with every model.flow check by tests/test_flows.py)."""
    assert {"model.flow[maf]", "model.flow[iaf]"} <= set(gradcheck.CHECKS)


def test_every_public_method_is_documented_with_shapes():
    for cls in (AR.MAF, AR.IAF):
        for name in ("forward", "backward", "inverse", "inverse_backward"):
            doc = inspect.getdoc(vars(cls)[name])
            assert doc and "(B, D)" in doc and "(B,)" in doc, (cls.__name__, name)
        assert inspect.getdoc(cls.spec)


def test_factories_specs_and_checkpoints(f64, rng, tmp_path):
    fl = F.maf(dim=6, n_layers=3, hidden=(8,), ordering="random", logit=True, seed=2)
    kinds = [type(layer).__name__ for layer in fl.layers]
    assert kinds == ["LogitTransform", "MAF", "Permutation", "MAF", "Permutation", "MAF"]
    assert fl.layers[2].kind == "random" and fl.layers[2].seed != fl.layers[4].seed
    two = F.maf2d(n_layers=3, hidden=(16, 16))
    assert [type(layer).__name__ for layer in two.layers] == ["MAF", "Permutation", "MAF", "Permutation", "MAF"]
    fl.flat_params[...] += 0.1 * rng.standard_normal(fl.flat_params.shape)
    fl.save(tmp_path / "maf.npz")
    back = npdgm.load(tmp_path / "maf.npz")
    x = rng.uniform(0.05, 0.95, (4, 6))
    np.testing.assert_allclose(back.log_prob(x), fl.log_prob(x), rtol=1e-12)
    xs = fl.sample(3, rng=0)
    a = 0.05  # LogitTransform's alpha: its inverse (sigmoid(y) - a) / (1 - 2a) lies in (-a, 1 - a) / (1 - 2a)
    assert xs.shape == (3, 6) and np.all((xs > -a / (1 - 2 * a)) & (xs < (1 - a) / (1 - 2 * a)))
    with pytest.raises(ValueError, match="unknown ordering 'sideways'"):
        F.maf(dim=4, ordering="sideways")
    with pytest.raises(ValueError, match="needs dim >= 2"):
        AR.MAF(1)
    with pytest.raises(ValueError, match="unknown scale clamp 'exp'"):
        AR.IAF(3, scale="exp")


def _cli(*argv):
    from npdgm.cli import main

    return main([str(a) for a in argv])


def test_cli_flow2d_maf_trains_and_samples(tmp_path, capsys):
    assert _cli("train", "flow2d", "--flow", "maf", "--dataset", "moons", "--train-limit", 256, "--test-limit", 128,
                "--couplings", 2, "--hidden", 8, 8, "--batch-size", 128, "--epochs", 1, "--no-progress", "--no-plots",
                "--out", tmp_path / "a") == 0
    rec = json.loads(open(tmp_path / "a" / "metrics.jsonl").readline())
    assert np.isfinite(rec["test_nll"]) and rec["step"] == 2
    g = npdgm.load(tmp_path / "a")
    assert [type(layer).__name__ for layer in g.layers] == ["MAF", "Permutation", "MAF"]
    assert g.layers[0].made.layers[0].W.shape == (2, 8)
    xs = g.sample(50, rng=0)  # D = 2 passes per MAF layer (npdgm sample RUNDIR draws the same way, with a figure)
    assert xs.shape == (50, 2) and np.all(np.isfinite(xs))
    assert _cli("train", "flow2d", "--flow", "maf", "--actnorm", "--out", tmp_path / "c", "--no-progress") == 2
    assert "--actnorm goes with --flow realnvp" in capsys.readouterr().err


@pytest.mark.gpu
def test_cupy_matches_numpy_for_the_new_layers(cupy):
    """InvertibleLinear, MAF, IAF and SplineCoupling on CuPy: NumPy's loss, gradients, samples and the
    inverse pass's gradients (float64)."""
    from npdgm import backend

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 5))
    zz, w, v = rng.standard_normal((16, 5)), rng.standard_normal((16, 5)), rng.standard_normal(16)

    def make():
        return F.Flow([F.InvertibleLinear(5, seed=1), F.MAF(5, [12], seed=2), F.Permutation(5, "random", 3),
                       F.SplineCoupling(5, "alternate", 0, [8], bins=4, bound=2.0, seed=4), F.IAF(5, [9], seed=5)])

    def run(fl, arr):
        loss = float(fl.loss_and_grad(arr(x)))
        g = backend.to_host(fl.flat_grads).copy()
        fl.zero_grad()
        xs, ld = fl.inverse(arr(zz), logdet=True)
        dz = fl.inverse_backward(arr(w), arr(v))
        return loss, g, backend.to_host(xs), backend.to_host(dz), backend.to_host(fl.flat_grads).copy()

    with backend.use("numpy", "float64"):
        ref = run(make(), np.asarray)
    with backend.use("cupy", "float64"):
        got = run(make(), cupy.asarray)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-10)
    for a, b in zip(got[1:], ref[1:]):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
