"""SplineCoupling (rational-quadratic splines, Durkan et al. 2019): exact inverse inside and in the linear tails,
log-det against a finite-difference Jacobian, a monotone C^1 map, both hand-written backwards, the spec."""
import inspect

import numpy as np
import pytest

import npdgm
from npdgm import checks, gradcheck  # noqa: F401  (checks registers the model gradchecks)
from npdgm.models import flows as F


def _layer(rng, d=4, **kw):
    layer = F.SplineCoupling(d, **{"mask": "half", "parity": 0, "hidden": [7], "activation": "tanh", "bins": 5,
                                   "bound": 2.0, "seed": 1, **kw}).flatten()
    layer.flat_params[...] += 0.5 * rng.standard_normal(layer.flat_params.shape)
    return layer


@pytest.mark.parametrize("d,mask", [(2, "half"), (3, "alternate"), (5, "half")])
def test_round_trip_and_logdet_match_slogdet(f64, rng, d, mask):
    layer = _layer(rng, d, mask=mask)
    x = rng.standard_normal((16, d)) * 1.5  # some rows in the tails (|x| > 2)
    assert np.any(np.abs(x) > 2)
    y, ld = layer.forward(x)
    xx, ldi = layer.inverse(y, logdet=True)
    assert np.max(np.abs(xx - x)) < 1e-10
    np.testing.assert_allclose(ldi, -ld, rtol=1e-10, atol=1e-12)
    sign, fd = np.linalg.slogdet(gradcheck.numerical_jacobian(lambda a: layer.forward(a)[0], x, h=1e-6))
    assert np.all(sign > 0)
    np.testing.assert_allclose(ld, fd, rtol=1e-6, atol=1e-7)


def test_spline_is_monotone_continuous_and_identity_in_the_tails(f64, rng):
    layer = _layer(rng, 2, bins=6, bound=2.0)
    t = np.linspace(-3, 3, 60001)
    x = np.stack([np.full_like(t, 0.3), t], axis=1)  # x_0 conditions, x_1 runs through bins and tails
    y, ld = layer.forward(x)
    assert np.all(np.diff(y[:, 1]) > 0)
    out = np.abs(t) > 2
    np.testing.assert_array_equal(y[out, 1], t[out]) and np.testing.assert_array_equal(ld[out], 0)
    slope = np.exp(ld)
    assert np.max(np.abs(np.diff(slope))) < 0.05  # C^1: no jump at the knots or at +-bound (slope 1 there)
    edge = np.array([[0.3, -2 + 1e-9], [0.3, 2 - 1e-9]])  # just inside +-bound: slope d_0 = d_K = 1
    np.testing.assert_allclose(np.exp(layer.forward(edge)[1]), 1, atol=1e-6)


@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_backward_of_both_passes_matches_central_differences(f64, rng, direction):
    layer = _layer(rng, 4, mask="alternate", parity=1, bins=4, bound=1.5, activation="softplus")
    a = rng.standard_normal((6, 4)) * 1.5
    rep = gradcheck.check_flow_layer(layer, a, rng, direction)
    assert max(r for _, r in rep.values()) < 1e-6, rep


def test_gradcheck_is_registered():
    """``npdgm gradcheck --only "model.flow[spline]"`` (run with every model.flow check by tests/test_flows.py)."""
    assert "model.flow[spline]" in gradcheck.CHECKS


def test_spec_checkpoint_factory_and_bad_arguments(f64, rng, tmp_path):
    fl = F.spline2d(n_couplings=3, hidden=(8,), bins=4, seed=2)
    assert [layer.spec()["parity"] for layer in fl.layers] == [0, 1, 0]
    fl.flat_params[...] += 0.3 * rng.standard_normal(fl.flat_params.shape)
    fl.save(tmp_path / "s.npz")
    x = rng.standard_normal((5, 2))
    np.testing.assert_allclose(npdgm.load(tmp_path / "s.npz").log_prob(x), fl.log_prob(x), rtol=1e-12)
    with pytest.raises(ValueError, match="bins \\* min_width and bins \\* min_height must be < 1"):
        F.SplineCoupling(2, bins=10, min_width=0.1)
    with pytest.raises(ValueError, match="bins must be an integer >= 2, got 1"):
        F.SplineCoupling(2, bins=1)


def test_cli_flow2d_spline(tmp_path, capsys):
    from npdgm.cli import main

    assert main(["train", "flow2d", "--flow", "spline", "--dataset", "moons", "--train-limit", "256", "--test-limit",
                 "128", "--couplings", "2", "--hidden", "8", "--batch-size", "128", "--epochs", "1", "--no-progress",
                 "--no-plots", "--out", str(tmp_path)]) == 0
    g = npdgm.load(tmp_path)
    assert [type(layer).__name__ for layer in g.layers] == ["SplineCoupling"] * 2
    assert (g.layers[0].bins, g.layers[0].bound) == (8, 5.0)  # [-5, 5]: the toy sets reach |x| ~ 3.4
    assert g.layers[0].spec()["identity_init"] is True  # every coupling started as the identity
    assert main(["train", "flow2d", "--flow", "spline", "--actnorm", "--out", str(tmp_path / "c")]) == 2
    assert "the spline stack has no ActNorm layers" in capsys.readouterr().err
    assert main(["train", "flow2d", "--flow", "maf", "--bins", "4", "--out", str(tmp_path / "d")]) == 2
    assert "--bins / --tail-bound go with --flow spline, not --flow maf" in capsys.readouterr().err


def test_cli_flow2d_spline_bins_and_tail_bound_and_older_runs(tmp_path):
    from npdgm.commands import flows as cmd
    from npdgm.cli import main

    assert main(["train", "flow2d", "--flow", "spline", "--bins", "5", "--tail-bound", "4", "--train-limit", "64",
                 "--test-limit", "32", "--couplings", "2", "--hidden", "4", "--batch-size", "64", "--epochs", "1",
                 "--no-progress", "--no-plots", "--out", str(tmp_path)]) == 0
    layer = npdgm.load(tmp_path).layers[1]
    assert (layer.bins, layer.bound, layer.spec()["parity"]) == (5, 4.0, 1)
    old = {"family": "flow2d", "flow": "spline", "couplings": 1, "hidden": [4], "seed": 0}  # stored before bins/bound
    assert (cmd.build_model(old).layers[0].bins, cmd.build_model(old).layers[0].bound) == (8, 3.0)
    assert "identity_init" not in cmd.build_model(old).layers[0].spec()
    defaults = {k: v.default for k, v in inspect.signature(F.spline2d).parameters.items()}
    assert cmd.SPLINE2D == {k: defaults[k] for k in ("bins", "bound", "identity_init")}  # CLI = library defaults


def test_zero_conditioner_output_is_the_identity_and_the_layer_calls_the_kernels(f64, rng):
    """u = 0 (equal bins, raw derivatives 0) is the identity spline: slope min_d + softplus(0 + c) = 1 at every
    knot. The layer keeps no spline math of its own (npdgm.kernels.spline, in the kernel table)."""
    from npdgm.kernels import spline as S
    from npdgm.kernels.table import KERNELS
    from npdgm.models import flow_layers

    layer = _layer(rng, 4, bins=6)
    layer.flat_params[...] = 0  # the last layer's weights and bias 0: u = 0 for every input
    x = rng.standard_normal((7, 4)) * 1.5
    y, ld = layer.forward(x)
    np.testing.assert_allclose(y, x, atol=1e-12)
    np.testing.assert_allclose(ld, 0, atol=1e-12)
    assert S.derivative_shift(1e-3) == pytest.approx(np.log(np.expm1(1 - 1e-3)))
    ident = F.SplineCoupling(4, hidden=[5], bins=3, identity_init=True, seed=3)  # only the last net layer is 0
    y, ld = ident.forward(x)
    np.testing.assert_allclose(y, x, atol=1e-12) and np.testing.assert_allclose(ld, 0, atol=1e-12)
    assert F.build_layer(ident.spec()).spec()["identity_init"] is True and np.any(ident.net.layers[0].W.data != 0)
    assert not [n for n in dir(flow_layers) if n.startswith("_rq")]
    assert {"rq_knots", "rq_spline", "rq_spline_inverse", "masked_linear"} <= set(KERNELS)
    with pytest.raises(ValueError, match="min_derivative must be < 1"):
        F.SplineCoupling(2, min_derivative=1.0)
