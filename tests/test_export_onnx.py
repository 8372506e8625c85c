"""npdgm export --format onnx: every graph, run in onnxruntime on small random models, gives npdgm's own
outputs (float32, normwise relative error 1e-5, log-dets included); onnx.checker accepts each file; the CLI
writes the directory and its manifest; what has no graph is refused in one line."""
import json

import numpy as np
import pytest

from npdgm import cli
from npdgm.kernels import kl_std_normal_forward, reparameterize_forward, sigmoid_forward, softmax_forward
from npdgm.models import flows as F
from npdgm.models.autoencoder import Autoencoder
from npdgm.models.cvae import CVAE
from npdgm.models.elbo import head_split, rec_rows
from npdgm.models.gmvae import GMVAE
from npdgm.models.m2 import M2
from npdgm.models.vae import VAE

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from npdgm.export_onnx import ExportError, export_onnx, onnx_graphs  # noqa: E402

RTOL = 1e-5


def _perturb(m, scale=0.2, seed=0):
    m.flat_params[...] += np.random.default_rng(seed).standard_normal(m.flat_params.shape).astype(m.dtype) * scale
    return m


def _run(proto, **feeds):
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _close(got, want, rtol=RTOL):
    """float32 agreement: max |got - want| <= rtol max |want| (and the same shape)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape
    assert np.all(np.isfinite(got))
    assert np.abs(got - want).max() <= rtol * max(np.abs(want).max(), 1e-30), np.abs(got - want).max()


def _data(rng, B, D, unit=True):
    return (rng.random((B, D)) if unit else rng.standard_normal((B, D))).astype(np.float32)


# -- the VAE family ----------------------------------------------------------------------------------------
def _raw(m, z, y, label):
    """The decoder's output (logits / mean / [mean | raw]) at z (and y)."""
    if label:
        return m._decode_raw(z, y)
    return m._decode_raw(z) if hasattr(m, "_decode_raw") else m.decoder.forward(z)


def _check_vae(m, label=False, B=5):
    rng = np.random.default_rng(3)
    x = _data(rng, B, m.x_dim, m.likelihood == "bernoulli")
    eps = rng.standard_normal((B, m.z_dim)).astype(np.float32)
    z = (rng.standard_normal((B, m.z_dim)) * 2).astype(np.float32)
    y = rng.integers(0, getattr(m, "num_classes", 1), B).astype(np.int64)
    lab = {"y": y} if label else {}
    g = onnx_graphs(m)
    args = (x, y) if label else (x,)

    enc = _run(g["encode"], x=x, **lab)
    mu, logvar = m.encode(*args)
    _close(enc["mu"], mu)
    _close(enc["logvar"], logvar)

    dec = _run(g["decode"], z=z, **lab)
    out = _raw(m, z, y, label)
    if m.likelihood == "bernoulli":
        _close(dec["logits"], out)
        _close(dec["probs"], sigmoid_forward(out))
    elif m.sigma == "learned-z":
        mean, v = head_split(out)
        _close(dec["mean"], mean)
        _close(dec["logvar"], v)
        _close(dec["std"], m.decode_std(z))
    else:
        _close(dec["mean"], out)

    elbo = _run(g["elbo"], x=x, eps=eps, **lab)
    if m.kind == "m2":
        _close(elbo["nelbo"], m.nelbo(x, y, eps))
    else:
        _, terms = m.loss(*args, eps[None])
        for k in ("recon", "kl", "nelbo"):
            _close(elbo[k].mean(keepdims=True), np.asarray(terms[k]).reshape(1))
    if getattr(m, "flow", None) is None:
        zz = reparameterize_forward(mu, logvar, eps)
        recon = rec_rows(m, _raw(m, zz, y, label), x)
        _close(elbo["recon"], recon)
        if m.kind == "gmvae":     # one-sample KL to the mixture prior
            log_q = -0.5 * (eps * eps + logvar + np.log(2 * np.pi)).sum(axis=1)
            _close(elbo["kl"], log_q - m.log_prior(zz))
        else:
            _close(elbo["kl"], kl_std_normal_forward(mu, logvar))
    return g


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "elu", "identity"])
def test_vae_mlp_graphs_match_npdgm(activation):
    g = _check_vae(_perturb(VAE(x_dim=12, hidden=(9, 7), z_dim=3, activation=activation, seed=1)))
    assert sorted(g) == ["decode", "elbo", "encode"]
    assert {i.name for i in g["encode"].graph.initializer} >= {"encoder.0.W", "encoder.0.b", "encoder.2.W"}
    assert g["encode"].opset_import[0].version == 17


@pytest.mark.parametrize("sigma", [0.3, None])
def test_vae_gaussian_likelihoods(sigma):
    m = _perturb(VAE(x_dim=10, hidden=(8,), z_dim=2, likelihood="gaussian", sigma=sigma, seed=2))
    g = _check_vae(m)
    assert [o.name for o in g["decode"].graph.output] == ["mean"]


def test_vae_variance_head_decodes_std_and_elbo_uses_it():
    """sigma="learned-z": decode gives mean, logvar = 7 tanh(raw / 7), std per pixel; the ELBO's recon uses them."""
    m = _perturb(VAE(x_dim=10, hidden=(8,), z_dim=2, likelihood="gaussian", sigma="learned-z", seed=2), 0.5)
    g = _check_vae(m)
    assert [o.name for o in g["decode"].graph.output] == ["mean", "logvar", "std"]
    z = np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32)
    assert np.ptp(_run(g["decode"], z=z)["std"]) > 1e-3          # per pixel and per row, not one sigma


def test_vae_large_logits():
    """Logits of +-hundreds: the BCE-from-logits form (softplus) stays finite and agrees."""
    m = _perturb(VAE(x_dim=10, hidden=(8,), z_dim=2, seed=3))
    m.decoder.layers[-1].W.data[...] *= 400
    g = _check_vae(m)
    z = np.random.default_rng(0).standard_normal((4, 2)).astype(np.float32)
    assert np.abs(_run(g["decode"], z=z)["logits"]).max() > 100


def test_vae_conv_graphs_match_npdgm():
    m = _perturb(VAE(x_dim=64, hidden=(), z_dim=3, arch="conv", channels=(2, 3), image_shape=(1, 8, 8),
                     activation="leaky_relu", seed=4), 0.1)
    g = _check_vae(m, B=3)
    ops = {n.op_type for n in g["decode"].graph.node}
    assert {"ConvTranspose", "Reshape"} <= ops and "Conv" in {n.op_type for n in g["encode"].graph.node}


def test_vae_iaf_posterior_elbo():
    m = _perturb(VAE(x_dim=10, hidden=(8,), z_dim=3, posterior="iaf:2", iaf_hidden=(6,), seed=5), 0.1)
    g = _check_vae(m)
    assert any(i.name.endswith(".made.0.W.masked") for i in g["elbo"].graph.initializer)


def test_cvae_graphs_take_the_label():
    m = _perturb(CVAE(x_dim=11, num_classes=4, hidden=(7,), z_dim=2, seed=6))
    g = _check_vae(m, label=True)
    assert [(i.name, i.type.tensor_type.elem_type) for i in g["encode"].graph.input] == [("x", 1), ("y", 7)]


def test_m2_graphs_and_classifier():
    m = _perturb(M2(x_dim=11, num_classes=3, hidden=(7,), z_dim=2, seed=7))
    g = _check_vae(m, label=True)
    x = _data(np.random.default_rng(8), 4, 11)
    out = _run(g["classify"], x=x)
    _close(out["logits"], m.logits(x))
    _close(out["probs"], softmax_forward(m.logits(x)))


@pytest.mark.parametrize("weights", ["uniform", "learned"])
def test_gmvae_graphs_and_clusters(weights):
    """encode / decode / elbo (the one-sample KL log q(z|x) - log p(z) to the mixture, a deterministic function
    of eps) and cluster = p(c | z = mu(x)); components far from every z (log-weights of -hundreds) keep the
    logsumexp finite."""
    m = _perturb(GMVAE(x_dim=11, hidden=(7,), z_dim=3, components=4, weights=weights, seed=8), 0.3)
    m.prior_mean.data[...] += 30 * np.arange(1, 5)[:, None]       # every component far from z
    g = _check_vae(m)
    assert sorted(g) == ["cluster", "decode", "elbo", "encode"]
    x = _data(np.random.default_rng(9), 6, 11)
    out = _run(g["cluster"], x=x)
    _close(out["probs"], m.responsibilities(m.encode(x)[0]))
    np.testing.assert_array_equal(out["component"], m.predict(x))


@pytest.mark.parametrize("denoise", [0.0, 0.3])
def test_autoencoder_graphs(denoise):
    m = _perturb(Autoencoder(x_dim=12, hidden=(9, 5), z_dim=3, denoise=denoise, seed=9))
    g = onnx_graphs(m)
    assert sorted(g) == ["decode", "encode", "recon"]
    rng = np.random.default_rng(10)
    x, z = _data(rng, 5, 12), rng.standard_normal((5, 3)).astype(np.float32)
    _close(_run(g["encode"], x=x)["z"], m.encode(x))
    dec = _run(g["decode"], z=z)
    _close(dec["probs"], m.decode(z))
    _close(dec["logits"], m.decoder.forward(z))
    recon = _run(g["recon"], x=x)["recon"]
    _close(recon, rec_rows(m, m.decoder.forward(m.encode(x)), x))
    _close(recon.mean(keepdims=True), np.reshape(m.loss(x)[0], 1))


# -- flows -------------------------------------------------------------------------------------------------
def _check_flow(flow, x, B=6, context=None):
    """log_prob and sample (given base noise, and the context of a conditional flow) against npdgm."""
    g = onnx_graphs(flow)
    assert sorted(g) == ["log_prob", "sample"]
    cx = {} if context is None else {"context": context}
    lp = _run(g["log_prob"], x=x, **cx)
    z, logdet = flow.forward(x, context)
    _close(lp["logdet"], logdet)
    _close(lp["log_prob"], flow.log_prob(x, context))
    zs = np.random.default_rng(9).standard_normal((B, flow.dim)).astype(np.float32) * 0.7
    cs = None if context is None else context[np.arange(B) % len(context)]
    xs, ld = flow.inverse(zs, logdet=True, context=cs)
    sm = _run(g["sample"], z=zs, **({} if cs is None else {"context": cs}))
    _close(sm["x"], xs)
    _close(sm["logdet"], ld)
    # sampling inverts the density pass, to a float32 inverse's precision (a spline's root loses digits)
    _close(_run(g["sample"], z=z, **cx)["x"], x, rtol=1e-4)
    return g


def test_nice_with_logit_and_scaling():
    flow = _perturb(F.nice(dim=6, n_couplings=3, hidden=8, n_hidden=2, logit=True, seed=1), 0.1)
    _check_flow(flow, _data(np.random.default_rng(1), 5, 6))


@pytest.mark.parametrize("scale", ["tanh", "atan", "none"])
def test_realnvp_checkerboard_actnorm(scale):
    flow = F.realnvp(dim=16, n_couplings=3, hidden=(10,), image_shape=(4, 4), scale=scale, seed=2)
    x = _data(np.random.default_rng(2), 7, 16)
    flow.forward(x)                                    # ActNorm's data-dependent init
    _check_flow(_perturb(flow, 0.05), x)


def test_realnvp2d_logistic_prior_and_invertible_linear():
    # InvertibleLinear(seed=2): perm [1 2 0 3], not its own inverse
    layers = [F.InvertibleLinear(4, seed=2), F.AffineCoupling(4, "alternate", 0, (6,), "tanh", seed=3),
              F.Permutation(4, "random", seed=4), F.Scaling(4), F.AdditiveCoupling(4, "half", 1, (5,), seed=5)]
    flow = _perturb(F.Flow(layers, prior="logistic"), 0.1)
    _check_flow(flow, _data(np.random.default_rng(3), 5, 4, unit=False))


def test_maf_density_and_sampling_loop():
    flow = _perturb(F.maf(dim=5, n_layers=2, hidden=(12,), ordering="random", logit=True, seed=3), 0.1)
    g = _check_flow(flow, _data(np.random.default_rng(4), 6, 5))
    assert "Loop" in {n.op_type for n in g["sample"].graph.node}


def test_iaf_flow_layer_density_is_the_loop():
    flow = _perturb(F.Flow([F.IAF(4, hidden=(9,), seed=1), F.Permutation(4), F.IAF(4, hidden=(9,), seed=2)]), 0.1)
    g = _check_flow(flow, _data(np.random.default_rng(5), 5, 4, unit=False))
    assert "Loop" in {n.op_type for n in g["log_prob"].graph.node}


def test_spline_coupling_with_tails():
    flow = _perturb(F.spline2d(n_couplings=3, hidden=(8,), bins=5, bound=2.0, seed=1), 0.3)
    x = np.random.default_rng(6).standard_normal((40, 2)).astype(np.float32) * 1.5     # some beyond the bound
    assert (np.abs(x) > 2).any()
    _check_flow(flow, x)


# -- Glow and conditional flows ----------------------------------------------------------------------------
def _glow(**kw):
    flow = F.glow(**kw)
    C, H, W = kw["image_shape"]
    x = _data(np.random.default_rng(10), 4, C * H * W)
    flow.forward(x)                                    # ChannelActNorm's data-dependent init
    return _perturb(flow, 0.05, seed=11), x


def test_onnx_space_to_depth_is_not_npdgms_squeeze():
    """Why the squeeze is Reshape/Transpose: ONNX SpaceToDepth orders the output channels (i, j, c), npdgm's
    pixel_unshuffle (c, i, j) (they agree only for one channel)."""
    from npdgm.kernels.conv import squeeze_forward

    x = np.arange(2 * 4 * 4, dtype=np.float32).reshape(1, 2, 4, 4)
    h = onnx.helper
    node = h.make_node("SpaceToDepth", ["x"], ["y"], blocksize=2)
    graph = h.make_graph([node], "s2d", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 4, 4])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8, 2, 2])])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    proto.ir_version = 8
    assert not np.array_equal(_run(proto, x=x)["y"], squeeze_forward(x))


def test_glow_two_levels_with_split():
    """Squeeze, ChannelActNorm, InvertibleConv1x1, ConvAffineCoupling; the second level sees half the channels
    (its layers pass the factored-out features through)."""
    flow, x = _glow(image_shape=(2, 4, 4), levels=2, depth=2, hidden=5, seed=1)
    assert any(layer.n < layer.dim for layer in flow.layers)
    g = _check_flow(flow, x)
    ops = {n.op_type for n in g["log_prob"].graph.node}
    assert {"Conv", "Transpose"} <= ops and "SpaceToDepth" not in ops
    assert "DepthToSpace" in {n.op_type for n in g["sample"].graph.node}
    assert any(i.name.endswith(".lin.log_s") for i in g["log_prob"].graph.initializer)


def test_glow_one_channel_with_logit():
    flow, x = _glow(image_shape=(1, 4, 4), levels=1, depth=2, hidden=4, logit=True, seed=2)
    _check_flow(flow, x)


def test_glow_uninitialized_actnorm_is_refused():
    with pytest.raises(ExportError, match="ChannelActNorm layer was never initialized"):
        onnx_graphs(F.glow(image_shape=(1, 4, 4), levels=1, depth=1, hidden=3))


def _context(B, C, seed=12):
    return np.random.default_rng(seed).standard_normal((B, C)).astype(np.float32)


@pytest.mark.parametrize("build", [
    lambda: F.realnvp2d(2, (6,), context_dim=3, seed=1),
    lambda: F.maf2d(2, (8,), context_dim=3, seed=2),
    lambda: F.spline2d(2, (6,), bins=4, bound=2.0, context_dim=3, seed=3),
], ids=["realnvp2d", "maf2d", "spline2d"])
def test_conditional_flows_take_the_context(build):
    flow = _perturb(build(), 0.2)
    x = np.random.default_rng(13).standard_normal((6, 2)).astype(np.float32)
    g = _check_flow(flow, x, context=_context(6, 3))
    for name in ("log_prob", "sample"):
        assert [(i.name, i.type.tensor_type.shape.dim[1].dim_value) for i in g[name].graph.input][1] == ("context", 3)
    # the context matters: another context gives another density
    other = _run(g["log_prob"], x=x, context=_context(6, 3, seed=14))["log_prob"]
    assert np.abs(other - flow.log_prob(x, _context(6, 3))).max() > 1e-3


def test_conditional_realnvp_on_images():
    flow = F.realnvp(dim=16, n_couplings=2, hidden=(6,), image_shape=(4, 4), context_dim=2, seed=4)
    x = _data(np.random.default_rng(15), 5, 16)
    flow.forward(x, _context(5, 2))
    _check_flow(_perturb(flow, 0.05), x, context=_context(5, 2))


# -- the command -------------------------------------------------------------------------------------------
def test_cli_writes_the_directory_and_manifest(tmp_path, capsys):
    m = _perturb(VAE(x_dim=12, hidden=(9,), z_dim=3, seed=2))
    m.save(tmp_path / "m.npz")
    out = tmp_path / "onnx"
    assert cli.main(["export", str(tmp_path / "m.npz"), str(out), "--format", "onnx"]) == 0
    assert "3 graphs" in capsys.readouterr().out
    man = json.loads((out / "manifest.json").read_text())
    assert man["opset"] == 17 and man["kind"] == "vae" and man["dtype"] == "float32"
    assert sorted(man["graphs"]) == ["decode", "elbo", "encode"]
    assert man["graphs"]["elbo"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 12]},
                                               {"name": "eps", "dtype": "float32", "shape": ["batch", 3]}]
    assert [o["name"] for o in man["graphs"]["decode"]["outputs"]] == ["logits", "probs"]
    for name, g in man["graphs"].items():
        proto = onnx.load(str(out / g["file"]))
        onnx.checker.check_model(proto, full_check=True)
    x = _data(np.random.default_rng(0), 4, 12)
    sess = ort.InferenceSession(str(out / "encode.onnx"), providers=["CPUExecutionProvider"])
    _close(sess.run(["mu"], {"x": x})[0], m.encode(x)[0])


def test_cli_exports_a_saved_glow_and_a_conditional_flow(tmp_path, capsys):
    """Through the checkpoint: ChannelActNorm's init flag survives the save, a conditional flow's graphs list
    the context input in the manifest."""
    glow, x = _glow(image_shape=(2, 4, 4), levels=2, depth=1, hidden=3, seed=5)
    cond = _perturb(F.maf2d(2, (6,), context_dim=3, seed=6))
    for name, flow in (("glow", glow), ("cond", cond)):
        flow.save(tmp_path / f"{name}.npz")
        assert cli.main(["export", str(tmp_path / f"{name}.npz"), str(tmp_path / name), "--format", "onnx"]) == 0
    assert "2 graphs" in capsys.readouterr().out
    man = json.loads((tmp_path / "cond" / "manifest.json").read_text())
    assert man["graphs"]["sample"]["inputs"] == [{"name": "z", "dtype": "float32", "shape": ["batch", 2]},
                                                 {"name": "context", "dtype": "float32", "shape": ["batch", 3]}]
    sess = ort.InferenceSession(str(tmp_path / "glow" / "log_prob.onnx"), providers=["CPUExecutionProvider"])
    _close(sess.run(["log_prob"], {"x": x})[0], glow.log_prob(x))


def test_refused_cases_are_one_line(tmp_path, capsys):
    from npdgm.models.gmm import GaussianMixture

    g = GaussianMixture(n_components=2)
    with pytest.raises(ExportError, match="this gmm was never fitted"):
        onnx_graphs(g)
    flow = F.realnvp(dim=4, n_couplings=1, hidden=(3,), mask="half", logit=False)
    flow.save(tmp_path / "f.npz")
    assert cli.main(["export", str(tmp_path / "f.npz"), str(tmp_path / "o"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ActNorm layer was never initialized" in err and "\n" not in err
    (tmp_path / "file").write_text("")
    m = VAE(x_dim=4, hidden=(3,), z_dim=2)
    with pytest.raises(ExportError, match="is a file"):
        export_onnx(m, tmp_path / "file")


def test_a_vae_with_an_iaf_context_posterior_is_refused_in_one_line():
    from npdgm.export_onnx import ExportError, onnx_graphs

    m = VAE(x_dim=6, hidden=(5,), z_dim=2, posterior="iaf:1", iaf_hidden=(4,), iaf_context=True, seed=0)
    with pytest.raises(ExportError, match="iaf_context"):
        onnx_graphs(m)


@pytest.mark.parametrize("cov", ["full", "diag", "spherical"])
def test_gaussian_mixture_log_prob_and_proba(cov):
    """log p(x) = logsumexp_k (log pi_k + log N(x; mu_k, Sigma_k)) and p(k | x) as npdgm's score_samples and
    predict_proba (the K maps (x - mu_k) P_k^T side by side in one product)."""
    from npdgm.models.gmm import GaussianMixture

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((200, 3)) @ rng.standard_normal((3, 3)) + 4 * rng.standard_normal(3)
                        for _ in range(3)])
    g = GaussianMixture(n_components=3, covariance_type=cov, seed=0).fit(x)
    graphs = onnx_graphs(g)
    xt = np.concatenate([x[::7], x[:3] + 60]).astype(np.float32)     # and points far from every component
    _close(_run(graphs["log_prob"], x=xt)["log_prob"], g.score_samples(xt.astype(np.float64)))
    _close(_run(graphs["proba"], x=xt)["proba"], g.predict_proba(xt.astype(np.float64)), rtol=1e-4)


@pytest.mark.parametrize("residual", ["full", "isotropic"])
def test_pca_mixture_log_prob_adds_the_residual_gaussian(residual):
    from npdgm.models.gmm import PCAGaussianMixture

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)) @ rng.standard_normal((8, 8)) * 0.5 + rng.standard_normal(8)
    m = PCAGaussianMixture(8, pca_dim=3, n_components=2, residual=residual, seed=0).fit(x)
    xt = x[::9].astype(np.float32)
    _close(_run(onnx_graphs(m)["log_prob"], x=xt)["log_prob"], m.score_samples(x[::9]))
