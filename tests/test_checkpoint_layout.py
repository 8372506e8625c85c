"""docs/checkpoints.md is exact: its plain-NumPy reader (run here as printed on that page) rebuilds every
model's flat buffer from numpy.load + the manifest, and a training checkpoint's optimizer moments share
the layout."""
import os
import re

import numpy as np
import pytest

from npdgm import backend, optim
from npdgm.models import flows as F
from npdgm.models.vae import VAE

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "checkpoints.md")


def _reader():
    with open(DOC) as f:
        text = f.read()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "def read_npdgm_checkpoint" in b]
    assert len(blocks) == 1, "docs/checkpoints.md must hold one python block defining read_npdgm_checkpoint"
    ns = {}
    exec(compile(blocks[0], DOC, "exec"), ns)
    return ns["read_npdgm_checkpoint"]


MODELS = {
    "vae": lambda: VAE(x_dim=12, hidden=[7, 5], z_dim=3),
    "vae,gaussian-learned,float64": lambda: VAE(x_dim=9, hidden=[6], z_dim=2, likelihood="gaussian"),
    "realnvp,actnorm": lambda: F.realnvp(dim=16, n_couplings=2, hidden=(6,), image_shape=(4, 4)),
    "nice": lambda: F.nice(dim=6, n_couplings=2, hidden=5, n_hidden=2),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_documented_reader_reproduces_the_flat_buffer(tmp_path, rng, name):
    dtype = "float64" if "float64" in name else "float32"
    with backend.use("numpy", dtype):
        m = MODELS[name]()
    if isinstance(m, F.Flow):
        m.forward(rng.uniform(0.1, 0.9, (8, m.dim)).astype(dtype))  # ActNorm init
    m.flat_params[...] += rng.standard_normal(m.flat_params.shape).astype(dtype)
    m.save(tmp_path / "m.npz")
    manifest, flat, params = _reader()(tmp_path / "m.npz")
    assert flat.dtype == m.flat_params.dtype and np.array_equal(flat, m.flat_params)
    assert manifest["kind"] == m.kind and manifest["config"] == m.config
    assert list(params) == [n for n, _ in m.named_parameters()]
    for n, a in m.params.items():
        assert np.array_equal(params[n], a), n
    # offsets are contiguous, in order, C-order slices of the flat buffer
    off = 0
    for n, shape, o in manifest["layout"]:
        assert o == off
        np.testing.assert_array_equal(m.flat_params[o:o + int(np.prod(shape))].reshape(shape), params[n])
        off += int(np.prod(shape))
    assert off == m.flat_params.size


def test_linear_weight_is_in_out_and_computes_x_at_W_plus_b(tmp_path, rng):
    m = VAE(x_dim=12, hidden=[7], z_dim=3)
    m.save(tmp_path / "m.npz")
    _, _, params = _reader()(tmp_path / "m.npz")
    assert params["encoder.0.W"].shape == (12, 7) and params["decoder.2.W"].shape == (7, 12)
    x = rng.uniform(0, 1, (4, 12)).astype(np.float32)
    h = np.maximum(x @ params["encoder.0.W"] + params["encoder.0.b"], 0) @ params["encoder.2.W"] + params["encoder.2.b"]
    np.testing.assert_allclose(h[:, :3], m.encode(x)[0], rtol=1e-6)


def test_training_checkpoint_moments_share_the_layout(tmp_path, rng):
    from npdgm.train import save_checkpoint

    m = VAE(x_dim=12, hidden=[7], z_dim=3)
    opt = optim.Adam(m, lr=1e-2)
    x = rng.uniform(0, 1, (5, 12)).astype(np.float32)
    for _ in range(2):
        m.loss_and_grad(x)
        opt.step()
    save_checkpoint(str(tmp_path), m, opt, np.random.default_rng(0), 1, {})
    manifest, flat, params = _reader()(tmp_path / "checkpoint.npz")
    assert np.array_equal(flat, m.flat_params) and manifest["opt_t"] == 2
    with np.load(tmp_path / "checkpoint.npz") as z:
        mom = z["opt/m.0"]
    assert mom.shape == flat.shape and np.array_equal(mom, opt.m[0])
