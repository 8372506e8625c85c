"""Glow (npdgm.models.glow_layers, flows.glow, ``npdgm train glow``): exact inverses, log-determinants against
the slogdet of a float64 finite-difference Jacobian, hand-written gradients of both passes against central
differences, the 1x1 convolution against the conv kernel, the multi-scale split, checkpoints, learning, the CLI."""
import json
import os

import numpy as np
import pytest

import npdgm
from npdgm import checks, gradcheck  # noqa: F401  (checks registers model.flow[glow])
from npdgm.kernels.conv import conv2d_forward, squeeze_forward
from npdgm.models import flows as F

SHAPE = (2, 4, 4)          # C, H, W of the small checks
DIM = 32 + 8               # 8 pass-through features beyond the image (a factored-out part)


def make_layers(rng):
    """One of every image layer on a 2x4x4 image inside 40-feature rows, parameters moved off their init."""
    layers = {
        "squeeze": F.Squeeze(DIM, SHAPE),
        "actnorm": F.ChannelActNorm(DIM, SHAPE),
        "conv1x1": F.InvertibleConv1x1(DIM, SHAPE, seed=3),
        "coupling": F.ConvAffineCoupling(DIM, SHAPE, hidden=5, seed=4),
        "coupling-3ch": F.ConvAffineCoupling(3 * 2 * 2 + 4, (3, 2, 2), hidden=3, seed=5),  # odd C: 1 | 2 channels
    }
    layers["actnorm"].initialize(rng.standard_normal((8,) + SHAPE) * 2 + 1)
    for layer in layers.values():
        if layer.flatten().flat_params is not None:
            layer.flat_params[...] += 0.3 * rng.standard_normal(layer.flat_params.shape)
    return layers


def _x(layer, rng, n=3):
    return rng.standard_normal((n, layer.dim)) * 1.5


@pytest.mark.parametrize("name", ["squeeze", "actnorm", "conv1x1", "coupling", "coupling-3ch"])
def test_layer_round_trip_and_logdet_match_slogdet(f64, rng, name):
    layer = make_layers(rng)[name]
    x = _x(layer, rng)
    y, ld = layer.forward(x)
    x2, ldi = layer.inverse(y, logdet=True)
    assert np.max(np.abs(x2 - x)) < 1e-10
    assert np.max(np.abs(ld + ldi)) < 1e-10
    np.testing.assert_allclose(ld, gradcheck.numerical_logdet(lambda v: layer.forward(v)[0], x), atol=1e-7)
    np.testing.assert_allclose(ldi, gradcheck.numerical_logdet(lambda v: layer.inverse(v), y), atol=1e-7)
    np.testing.assert_array_equal(y[:, layer.n:], x[:, layer.n:])  # the factored-out part passes through
    if name != "squeeze":
        assert np.all(np.abs(ld) > 1e-2), "trivial log-det: the check would not see errors"


@pytest.mark.parametrize("name", ["squeeze", "actnorm", "conv1x1", "coupling", "coupling-3ch"])
@pytest.mark.parametrize("direction", ["forward", "inverse"])
def test_layer_gradients_of_both_passes_match_central_differences(f64, rng, name, direction):
    """Every parameter and the input, L = sum(out * u) + sum(logdet * v), float64 central differences."""
    layer = make_layers(rng)[name]
    rep = gradcheck.check_flow_layer(layer, _x(layer, rng), rng, direction)
    assert set(rep) == {"a", *layer.params}
    assert max(r for _, r in rep.values()) < 1e-6, rep


def test_registered_glow_gradcheck_passes():
    rows = gradcheck.run_all(["model.flow[glow]"])
    names = {r[1] for r in rows}
    assert {"loss:x", "inverse:z", "loss:3.net.0.W", "inverse:2.lin.log_s"} <= names
    assert all(r[4] for r in rows), [r for r in rows if not r[4]]


def test_logdets_are_hw_sums(f64, rng):
    """ActNorm and the 1x1 convolution: log|det| = H W sum_c log|scale_c| for every row."""
    layers = make_layers(rng)
    x = _x(layers["actnorm"], rng)
    np.testing.assert_allclose(layers["actnorm"].forward(x)[1], 16 * layers["actnorm"].log_scale.data.sum())
    lin = layers["conv1x1"].lin
    W = np.eye(2)[:, lin.perm] @ (np.tril(lin.L.data, -1) + np.eye(2)) @ (np.triu(lin.U.data, 1) + np.diag(
        lin.sign_host * np.exp(lin.log_s.data)))
    np.testing.assert_allclose(layers["conv1x1"].forward(x)[1], 16 * np.log(abs(np.linalg.det(W))))


def test_conv1x1_is_a_1x1_convolution_with_weight_w_transposed(f64, rng):
    layer = make_layers(rng)["conv1x1"]
    x = _x(layer, rng)
    L1, U1, _, _, _ = layer.lin._tri()
    P = np.zeros((2, 2))
    P[layer.lin.perm, np.arange(2)] = 1
    W = P @ L1 @ U1
    img = x[:, :32].reshape(-1, *SHAPE)
    ref = conv2d_forward(img, W.T[:, :, None, None].copy(), None)
    np.testing.assert_allclose(layer.forward(x)[0][:, :32].reshape(ref.shape), ref, atol=1e-12)


def test_squeeze_and_actnorm_init(f64, rng):
    sq = F.Squeeze(DIM, SHAPE)
    x = _x(sq, rng)
    y = sq.forward(x)[0]
    np.testing.assert_array_equal(y[:, :32].reshape(3, 8, 2, 2), squeeze_forward(x[:, :32].reshape(3, *SHAPE)))
    assert sq.out_shape == (8, 2, 2)
    an = F.ChannelActNorm(DIM, SHAPE)
    assert not an.initialized
    y = an.forward(x * 3 + 2)[0][:, :32].reshape(3, *SHAPE)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), 1, atol=1e-5)
    assert an.initialized and an.buffers()["initialized"] == 1


def test_coupling_starts_near_identity_scale(f64, rng):
    """The last conv is zero: t = 0, s = sigmoid(2), so y_b = x_b sigmoid(2) and y_a = x_a."""
    layer = F.ConvAffineCoupling(32, SHAPE, hidden=4, seed=0)
    x = rng.standard_normal((2, 32))
    y, ld = layer.forward(x)
    s = 1 / (1 + np.exp(-2))
    np.testing.assert_allclose(y[:, :16], x[:, :16])
    np.testing.assert_allclose(y[:, 16:], x[:, 16:] * s)
    np.testing.assert_allclose(ld, 16 * np.log(s))


def _glow(rng, **kw):
    fl = F.glow((2, 4, 4), **{"levels": 2, "depth": 2, "hidden": 4, "seed": 1, **kw})
    return checks._moved(fl, rng, (6, 32))


def test_glow_structure_split_and_whole_flow_logdet(f64, rng):
    fl = _glow(rng)
    names = [type(layer).__name__ for layer in fl.layers]
    assert names == ["Squeeze"] + ["ChannelActNorm", "InvertibleConv1x1", "ConvAffineCoupling"] * 2 + \
        ["Squeeze"] + ["ChannelActNorm", "InvertibleConv1x1", "ConvAffineCoupling"] * 2
    # level 1 on (8, 2, 2); after the split level 2 squeezes the first 4 channels (4, 2, 2) -> (16, 1, 1)
    assert fl.layers[1].image_shape == (8, 2, 2) and fl.layers[7].image_shape == (4, 2, 2)
    assert fl.layers[8].image_shape == (16, 1, 1)
    x = rng.uniform(0, 1, (4, 32))
    z, ld = fl.forward(x)
    x2, ldi = fl.inverse(z, logdet=True)
    assert np.max(np.abs(x2 - x)) < 1e-10 and np.max(np.abs(ld + ldi)) < 1e-10
    np.testing.assert_allclose(ld, gradcheck.numerical_logdet(lambda v: fl.forward(v)[0], x), atol=1e-7)
    # the factored-out half (the last 16 features after the first level) never changes after level 1
    h = x
    for layer in fl.layers[:7]:
        h = layer.forward(h)[0]
    np.testing.assert_array_equal(z[:, 16:], h[:, 16:])


def test_glow_checkpoint_round_trip(f64, rng, tmp_path):
    fl = _glow(rng)
    fl.save(tmp_path / "g.npz")
    back = npdgm.load(tmp_path / "g.npz")
    assert back.config == fl.config
    assert all(layer.initialized for layer in back.layers if isinstance(layer, F.ChannelActNorm))
    x = rng.uniform(0, 1, (3, 32))
    np.testing.assert_allclose(back.log_prob(x), fl.log_prob(x), rtol=1e-12)


def test_tiny_glow_learns(rng):
    """float32, 2x4x4 images of correlated pixels: 30 Adam steps lower the NLL clearly."""
    from npdgm.optim import Adam

    fl = F.glow((1, 8, 8), levels=2, depth=2, hidden=8, seed=0)
    base = rng.uniform(0, 1, (256, 1, 1, 1))
    x = np.clip(base + 0.1 * rng.standard_normal((256, 1, 8, 8)), 0, 1).reshape(256, 64).astype(np.float32)
    before = fl.nll(x)
    opt = Adam(fl, lr=3e-3)
    for i in range(30):
        fl.loss_and_grad(x[(i % 4) * 64:(i % 4 + 1) * 64])
        opt.step()
    after = fl.nll(x)
    assert after < before - 10, (before, after)


def test_bad_arguments_are_reported():
    with pytest.raises(ValueError, match="more than the flow's dim 10"):
        F.ChannelActNorm(10, (1, 4, 4))
    with pytest.raises(ValueError, match="image_shape must be \\(C, H, W\\)"):
        F.Squeeze(16, (4, 4))
    with pytest.raises(ValueError, match="squeeze needs even H and W"):
        F.Squeeze(9, (1, 3, 3))
    with pytest.raises(ValueError, match="at least 2 channels"):
        F.ConvAffineCoupling(16, (1, 4, 4))
    with pytest.raises(ValueError, match="H and W must be divisible by 8, got 28x28"):
        F.glow((1, 28, 28), levels=3)
    with pytest.raises(ValueError, match="expects rows of 16 features"):
        F.Squeeze(16, (1, 4, 4)).forward(np.zeros((2, 15)))


# -- CLI ----------------------------------------------------------------------------------------------
def _cli(*argv):
    from npdgm.cli import main

    return main([str(a) for a in argv])


def test_cli_glow_trains_resumes_bit_for_bit_and_samples(tmp_path):
    common = ["--train-limit", 64, "--test-limit", 32, "--hidden", 4, "--depth", 1, "--batch-size", 32,
              "--no-progress"]
    assert _cli("train", "glow", *common, "--epochs", 2, "--out", tmp_path / "a") == 0
    g = npdgm.load(tmp_path / "a")
    step = ["ChannelActNorm", "InvertibleConv1x1", "ConvAffineCoupling"]
    assert [type(layer).__name__ for layer in g.layers] == (["Squeeze"] + step) * 2
    assert g.layers[1].initialized and g.layers[3].net.layers[0].W.data.shape == (4, 2, 3, 3)
    s = json.load(open(tmp_path / "a" / "summary.json"))
    assert s["family"] == "glow" and s["test_bpd"] == pytest.approx(F.bits_per_dim(s["test_nll"], 784))
    recs = [json.loads(r) for r in open(tmp_path / "a" / "metrics.jsonl")]
    assert recs[1]["train_bpd"] < recs[0]["train_bpd"]
    for f in ("samples.png", "curves.png"):
        assert os.path.exists(tmp_path / "a" / f), f
    assert _cli("train", "glow", *common, "--no-plots", "--epochs", 1, "--out", tmp_path / "b") == 0
    assert _cli("train", "glow", "--resume", tmp_path / "b", "--epochs", 2, "--no-progress", "--no-plots") == 0
    np.testing.assert_array_equal(npdgm.load(tmp_path / "b").flat_params, g.flat_params)
    assert _cli("sample", tmp_path / "b", "--n", 2, "--temperatures", 0.5, 1.0) == 0


def test_cli_glow_bad_levels(tmp_path, capsys):
    assert _cli("train", "glow", "--levels", 3, "--out", tmp_path, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--levels 3" in err and "Traceback" not in err


@pytest.mark.slow
def test_glow_bits_per_dim_after_a_short_run(tmp_path, shared_mnist):
    """One epoch (32 steps) on 2000 real MNIST images with the defaults (2 levels x 4 steps, 32 channels): test
    bits/dim falls below the ~7.8 of the untrained flow (measured 7.02; docs/glow.md)."""
    assert _cli("train", "glow", "--data", shared_mnist, "--train-limit", 2000, "--test-limit", 500, "--epochs", 1,
                "--out", tmp_path, "--no-progress", "--no-plots") == 0
    s = json.load(open(tmp_path / "summary.json"))
    assert s["test_bpd"] < 7.3, s


def test_checkpoint_size_bound_still_walks_the_channels(f64, rng, tmp_path):
    """Glow's layers skip dim and H, W in the load-time size bound (nothing is sized by them), not C."""
    from npdgm.io import CheckpointError

    fl = _glow(rng)
    fl.save(tmp_path / "g.npz")
    from npdgm.io import load_arrays
    from npdgm.models.registry import model_from_arrays

    arrays, meta = load_arrays(tmp_path / "g.npz")
    meta["config"]["layers"][1]["image_shape"][0] = 10 ** 9
    with pytest.raises(CheckpointError, match="layers\\[1\\].image_shape\\[0\\]=1000000000 does not fit"):
        model_from_arrays(arrays, meta, "g.npz")
