"""The 3-D latent view: ``npdgm train vae --z-dim 3`` writes latent3d.png (the study notes' 3-D scatter)."""
import os

import pytest

import npdgm
from npdgm.plots import vae as P

TINY = ["--train-limit", "200", "--test-limit", "60", "--hidden", "16", "--batch-size", "64", "--iwae-n", "10",
        "--iwae-k", "3", "--impute-steps", "1", "--impute-k", "3", "--impute-n", "10", "--no-progress"]


def test_train_vae_z3_writes_the_3d_scatter(tmp_path, run_cli):
    out = tmp_path / "run"
    code, _, err = run_cli("train", "vae", *TINY, "--z-dim", "3", "--epochs", "1", "--out", out)
    assert code == 0, err
    files = set(os.listdir(out))
    assert "latent3d.png" in files and "latent.png" not in files
    assert os.path.getsize(out / "latent3d.png") > 10_000


def test_latent_scatter_3d_refuses_other_latent_sizes(tmp_path):
    import numpy as np

    vae = npdgm.VAE(x_dim=784, hidden=(8,), z_dim=2)
    with pytest.raises(ValueError, match="3-D latent.*z_dim=2"):
        P.latent_scatter_3d(vae, np.zeros((4, 784)), np.arange(4), str(tmp_path / "x.png"))
