"""Model reference vectors: the committed float64 set still matches, the stored description rebuilds the
model, the IWAE bound's hand-written gradient matches central differences and VAE.log_likelihood.

tests/reference/models-f64 was written by
    python -c "from npdgm.reference import export_reference as e, MODEL_CASES; \\
               e('tests/reference/models-f64', names=MODEL_CASES)"
and is committed (regenerate it only on purpose)."""
import json
import math
import os

import numpy as np
import pytest

from npdgm import gradcheck
from npdgm.reference import models as R
from npdgm.reference import CASES, check_reference, export_reference

COMMITTED = os.path.join(os.path.dirname(__file__), "reference", "models-f64")
EXPECTED = {"vae_bernoulli", "vae_gaussian_learned", "vae_iwae", "nice", "realnvp2d", "affine_coupling",
            "affine_coupling_inverse", "prior_gaussian", "prior_logistic", "cvae", "m2"}


def test_committed_model_reference_still_matches():
    rows = check_reference(COMMITTED)
    cases = {r[0] for r in rows}
    assert EXPECTED <= cases
    assert all(ok for *_, ok in rows), [r for r in rows if not r[3]]


def test_model_cases_store_config_layout_and_every_parameter_gradient():
    with open(os.path.join(COMMITTED, "manifest.json")) as f:
        manifest = json.load(f)
    assert sum(os.path.getsize(os.path.join(COMMITTED, e["file"])) for e in manifest["cases"].values()) < 400_000
    for name in ("vae_bernoulli", "vae_gaussian_learned", "vae_iwae", "nice", "realnvp2d", "affine_coupling",
                 "affine_coupling_inverse", "cvae", "m2"):
        with np.load(os.path.join(COMMITTED, f"{name}.npz")) as z:
            desc = json.loads(z["input/model"].tobytes())
            params = z["input/params"]
            grads = {k[5:]: z[k] for k in z.files if k.startswith("grad/")}
            total = 0
            for pname, shape, off in desc["layout"]:
                assert off == total and grads[pname].shape == tuple(shape), (name, pname)
                total += int(np.prod(shape))
            assert total == params.size, name
    with np.load(os.path.join(COMMITTED, "vae_gaussian_learned.npz")) as z:
        desc = json.loads(z["input/model"].tobytes())
        assert desc["config"]["sigma"] is None and "grad/logvar_x" in z.files
        assert {"output/loss", "output/recon", "output/kl", "output/nelbo"} <= set(z.files)


def test_model_export_is_deterministic_and_float32_within_tolerance(tmp_path):
    names = ["vae_bernoulli", "realnvp2d", "affine_coupling_inverse", "m2"]
    export_reference(tmp_path / "a", seed=5, names=names)
    export_reference(tmp_path / "b", seed=5, names=names)
    for n in names:
        assert (tmp_path / "a" / f"{n}.npz").read_bytes() == (tmp_path / "b" / f"{n}.npz").read_bytes()
    export_reference(tmp_path / "f32", dtype="float32", names=names + ["vae_iwae", "nice", "cvae"])
    assert all(ok for *_, ok in check_reference(tmp_path / "f32"))


def test_check_detects_a_wrong_parameter_gradient(tmp_path):
    export_reference(tmp_path, names=["nice"])
    p = tmp_path / "nice.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["grad/1.net.2.W"] = arrays["grad/1.net.2.W"] * (1 + 1e-7)
    np.savez(p, **arrays)
    bad = [r for r in check_reference(tmp_path) if not r[3]]
    assert [(r[0], r[1]) for r in bad] == [("nice", "grad/1.net.2.W")]


def test_rebuild_refuses_a_layout_it_cannot_reproduce():
    inputs = CASES["vae_bernoulli"]["make"](np.random.default_rng(0), np.float64)
    desc = json.loads(inputs["model"].tobytes())
    desc["layout"][0][1] = [7, 5]
    inputs["model"] = np.frombuffer(json.dumps(desc).encode(), dtype=np.uint8)
    with pytest.raises(ValueError, match="layout"):
        CASES["vae_bernoulli"]["run"](inputs)


class _Replay:
    """A stand-in Generator whose standard_normal hands out stored noise blocks in order."""

    def __init__(self, eps):
        self.eps, self.at = eps, 0

    def standard_normal(self, shape, dtype=None):
        out = self.eps[self.at:self.at + shape[0]]
        assert out.shape == tuple(shape)
        self.at += shape[0]
        return out


@pytest.mark.parametrize("cfg", [R.VAE_BERNOULLI, R.VAE_GAUSSIAN], ids=["bernoulli", "gaussian-learned"])
def test_iwae_gradient_central_differences_and_log_likelihood(f64, rng, cfg):
    from npdgm.models.vae import VAE

    m = VAE(**cfg)
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape) * 0.3
    B, K = 3, 4
    x = rng.uniform(0, 1, (B, cfg["x_dim"])) if cfg["likelihood"] == "bernoulli" else rng.standard_normal((B, 6))
    eps = rng.standard_normal((K, B, cfg["z_dim"]))
    loss, iwae = R.iwae_loss_and_grad(m, x, eps)
    analytic = {n: g.copy() for n, g in m.grads.items()}
    rep = gradcheck.check(lambda: float(R.iwae_loss_and_grad(m, x, eps)[0]), m.params, analytic)
    assert max(r for _, r in rep.values()) < 1e-6, rep
    # the same estimate as VAE.log_likelihood fed the same noise
    ll = m.log_likelihood(x, k=K, rng=_Replay(eps))
    np.testing.assert_allclose(iwae, ll, rtol=1e-12, atol=1e-12)
    assert math.isclose(float(loss), -float(ll.mean()), rel_tol=1e-12)


def test_layer_cases_match_central_differences(f64):
    """The inverse cases' gradients are those of L = sum(x dx) + sum(logdet_inv dlogdet)."""
    for name in ("affine_coupling_inverse", "logit_transform_inverse", "affine_coupling"):
        i = CASES[name]["make"](np.random.default_rng(1), np.float64)
        outs, grads = CASES[name]["run"](i)
        inp, up, ld = ("y", "dx", "logdet_inv") if name.endswith("_inverse") else ("x", "dy", "logdet")
        out = "x" if name.endswith("_inverse") else "y"
        layer = R._build(i["model"])
        if "params" in i:
            R._load_params(layer, i["params"])
        arr = {inp: i[inp].copy()}
        arr.update(layer.params)

        def f():
            o = layer.inverse(arr[inp], logdet=True) if name.endswith("_inverse") else layer.forward(arr[inp])
            return np.sum(o[0] * i[up]) + np.sum(o[1] * i["dlogdet"])

        np.testing.assert_allclose(f(), np.sum(outs[out] * i[up]) + np.sum(outs[ld] * i["dlogdet"]))
        rep = gradcheck.check(f, arr, {k: grads[k] for k in arr})
        assert max(r for _, r in rep.values()) < 1e-6, (name, rep)


@pytest.mark.parametrize("name", ["affine_coupling_context", "affine_coupling_context_inverse", "maf_context",
                                  "maf_context_inverse", "spline_coupling_context",
                                  "spline_coupling_context_inverse"])
def test_conditional_layer_cases_store_c_and_its_gradient(f64, tmp_path, name):
    """input/c and grad/c = dL/dc (central differences), and the case checks against its own export."""
    i = CASES[name]["make"](np.random.default_rng(2), np.float64)
    outs, grads = CASES[name]["run"](i)
    inverse = name.endswith("_inverse")
    inp, up, out, ld = ("y", "dx", "x", "logdet_inv") if inverse else ("x", "dy", "y", "logdet")
    layer = R._build(i["model"])
    R._load_params(layer, i["params"])
    arr = {inp: i[inp].copy(), "c": i["c"].copy()}

    def f():
        o = layer.inverse(arr[inp], True, arr["c"]) if inverse else layer.forward(arr[inp], arr["c"])
        return np.sum(o[0] * i[up]) + np.sum(o[1] * i["dlogdet"])

    np.testing.assert_allclose(f(), np.sum(outs[out] * i[up]) + np.sum(outs[ld] * i["dlogdet"]))
    rep = gradcheck.check(f, arr, {k: grads[k] for k in arr})
    assert max(r for _, r in rep.values()) < 1e-6, (name, rep)
    export_reference(tmp_path, names=[name])
    rows = check_reference(tmp_path)
    assert any(r[1] == "grad/c" for r in rows) and all(r[3] for r in rows), rows
