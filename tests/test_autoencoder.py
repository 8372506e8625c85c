"""The plain / denoising autoencoder baseline (npdgm.models.autoencoder) and `npdgm train ae`."""
import json

import numpy as np
import pytest

import npdgm
from npdgm import gradcheck
from npdgm.models.autoencoder import Autoencoder

TINY = ["--train-limit", "200", "--test-limit", "60", "--hidden", "16", "--batch-size", "64", "--no-progress"]


def test_gradchecks_pass():
    from npdgm import checks  # noqa: F401

    rows = gradcheck.run_all(["model.ae["])
    assert {r[0] for r in rows} == {"model.ae[denoise=0]", "model.ae[denoise=0.4]"}
    assert all(r[4] for r in rows), [r for r in rows if not r[4]]


@pytest.mark.parametrize("denoise", [0.0, 0.3])
def test_training_lowers_the_reconstruction_error(denoise):
    rng = np.random.default_rng(0)
    x = (rng.random((256, 16)) < 0.3).astype(np.float64)
    x[:, 8:] = x[:, :8]                                # half the pixels repeat the other half: learnable
    m = Autoencoder(x_dim=16, hidden=(24,), z_dim=6, denoise=denoise, seed=1)
    before = float(m.loss(x)[0])
    opt = npdgm.optim.Adam(m, lr=1e-2)
    for _ in range(80):
        xb = x[rng.integers(0, 256, 64)]
        m.loss_and_grad(xb, m.corrupt_mask(rng, xb.shape))
        opt.step()
    assert float(m.loss(x)[0]) < 0.75 * before


def test_masking_noise_and_codes(tmp_path):
    m = Autoencoder(x_dim=6, hidden=(5,), z_dim=2, denoise=0.5, seed=0)
    keep = m.corrupt_mask(np.random.default_rng(0), (2000, 6))
    assert keep.dtype == bool and abs(1 - keep.mean() - 0.5) < 0.03
    assert Autoencoder(x_dim=6, hidden=(5,), z_dim=2).corrupt_mask(np.random.default_rng(0), (3, 6)) is None
    assert m.encode(np.zeros((3, 6))).shape == (3, 2) and m.sample(4, rng=0).shape == (4, 6)
    m.save(tmp_path / "a.npz")
    assert npdgm.load(tmp_path / "a.npz").config["denoise"] == 0.5
    with pytest.raises(ValueError, match="0 <= P < 1"):
        Autoencoder(x_dim=6, denoise=1.0)


def test_cli_train_ae_and_denoising(tmp_path, run_cli):
    vae = tmp_path / "vae"
    assert run_cli("train", "vae", *TINY, "--iwae-n", "0", "--impute-k", "0", "--impute-n", "10", "--z-dim", "4",
                   "--epochs", "1", "--no-plots", "--out", vae)[0] == 0
    out = tmp_path / "dae"
    code, stdout, err = run_cli("train", "ae", *TINY, "--z-dim", "4", "--denoise", "0.25", "--epochs", "1",
                                "--vae", vae, "--out", out)
    assert code == 0, err
    assert "denoising autoencoder" in stdout
    s = json.loads((out / "summary.json").read_text())
    assert s["denoise"] == 0.25 and s["test_recon"] > 0 and 0 < s["test_mse"] < 1 and s["prior_sq_norm"] == 4
    assert {"codes_vs_prior.png", "reconstructions.png", "curves.png"} <= {p.name for p in out.iterdir()}
    code, _, err = run_cli("train", "ae", *TINY, "--denoise", "1", "--out", tmp_path / "bad")
    assert code != 0 and "--denoise" in err
