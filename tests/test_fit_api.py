"""npdgm.fit: the Python trainer (progress, metrics, atomic checkpoints, bit-for-bit resume) for a VAE, a CVAE
and a flow, and its refusals."""
import numpy as np
import pytest

import npdgm
from npdgm.io import CheckpointError
from npdgm.models.cvae import CVAE
from npdgm.models.flows import realnvp2d
from npdgm.models.m2 import M2
from npdgm.models.vae import VAE
from npdgm.train import read_metrics


def _data(rng, n=96, d=12):
    return (rng.random((n, d)) < 0.3).astype(np.float32)


def _vae(**kw):
    return VAE(**{"x_dim": 12, "hidden": (8,), "z_dim": 2, "seed": 1, **kw})


def test_fit_trains_a_vae_writes_metrics_and_checkpoints(tmp_path, rng):
    x, xt = _data(rng), _data(rng, 40)
    m = _vae()
    recs = npdgm.fit(m, x, out=tmp_path / "r", epochs=3, batch_size=32, lr=1e-2, test_x=xt, progress=False,
                     log=lambda *a: None)
    assert [r["epoch"] for r in recs] == [1, 2, 3] and recs == read_metrics(tmp_path / "r")
    assert recs[-1]["train_loss"] < recs[0]["train_loss"] and recs[-1]["test_nelbo"] < recs[0]["test_nelbo"]
    assert abs(recs[0]["test_nelbo"] - recs[0]["test_recon"] - recs[0]["test_kl"]) < 1e-4
    loaded = npdgm.load(tmp_path / "r" / "checkpoint.npz")
    np.testing.assert_array_equal(loaded.flat_params, m.flat_params)


def test_fit_resume_is_bit_for_bit_and_refusals(tmp_path, rng):
    x = _data(rng)
    kw = dict(batch_size=32, lr=1e-2, progress=False, log=lambda *a: None)
    whole = _vae()
    npdgm.fit(whole, x, out=tmp_path / "a", epochs=3, **kw)
    npdgm.fit(_vae(), x, out=tmp_path / "b", epochs=1, **kw)
    again = _vae(seed=5)                             # other weights: the checkpoint's replace them
    recs = npdgm.fit(again, x, out=tmp_path / "b", epochs=3, resume=True, **kw)
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    np.testing.assert_array_equal(again.flat_params, whole.flat_params)
    with pytest.raises(FileExistsError, match="already holds a run .* resume=True"):
        npdgm.fit(_vae(), x, out=tmp_path / "a", epochs=1, **kw)
    with pytest.raises(CheckpointError, match="holds a vae with config"):
        npdgm.fit(_vae(z_dim=3), x, out=tmp_path / "a", epochs=4, resume=True, **kw)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        npdgm.fit(_vae(), x, out=tmp_path / "none", epochs=1, resume=True, **kw)


def test_fit_cvae_and_flow_and_unsupported_models(tmp_path, rng):
    kw = dict(epochs=2, batch_size=32, progress=False, log=lambda *a: None)
    x, y = _data(rng), rng.integers(0, 3, 96)
    c = CVAE(x_dim=12, num_classes=3, hidden=(8,), z_dim=2, seed=0)
    recs = npdgm.fit(c, x, y, out=tmp_path / "c", test_x=x[:20], test_y=y[:20], **kw)
    assert len(recs) == 2 and np.isfinite(recs[-1]["test_nelbo"])
    with pytest.raises(ValueError, match="pass y"):
        npdgm.fit(c, x, out=tmp_path / "c2", **kw)
    f = realnvp2d(n_couplings=2, hidden=(8,))
    pts = rng.standard_normal((96, 2)) * [2.0, 0.5]
    recs = npdgm.fit(f, pts.astype(f.flat_params.dtype), out=tmp_path / "f", test_x=pts[:30].astype(np.float32),
                     lr=1e-2, **kw)
    assert recs[-1]["test_nll"] < recs[0]["test_nll"] + 0.5 and np.isfinite(recs[-1]["train_nll"])
    with pytest.raises(TypeError, match="npdgm train m2"):
        npdgm.fit(M2(x_dim=12, hidden=(8,), z_dim=2), x, out=tmp_path / "m", **kw)
    with pytest.raises(ValueError):
        npdgm.fit(_vae(), np.full((10, 12), 2.0, np.float32), out=tmp_path / "v", **kw)
