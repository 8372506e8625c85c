"""npdgm train vae / sample / impute: run directory contents, bit-for-bit resume, clear errors."""
import json
import os

import numpy as np
import pytest

import npdgm
from npdgm import cli, io, train

TINY = ["--train-limit", "300", "--test-limit", "100", "--hidden", "32", "--batch-size", "64",
        "--iwae-n", "20", "--iwae-k", "5", "--impute-steps", "3", "--impute-k", "10", "--impute-n", "50",
        "--no-progress"]


@pytest.fixture(scope="module")
def run2d(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vae") / "run")
    assert cli.main(["train", "vae", *TINY, "--z-dim", "2", "--epochs", "2", "--out", out]) == 0
    return out


def test_train_writes_run_directory(run2d, capsys):
    files = set(os.listdir(run2d))
    assert {"checkpoint.npz", "metrics.jsonl", "summary.json", "curves.png", "reconstructions.png", "samples.png",
            "interpolation.png", "imputation.png", "latent.png", "manifold.png"} <= files
    recs = train.read_metrics(run2d)
    assert [r["epoch"] for r in recs] == [1, 2]
    for k in ("train_loss", "train_nelbo", "train_recon", "train_kl", "test_nelbo", "test_recon", "test_kl"):
        assert np.isfinite(recs[-1][k]), k
    s = json.load(open(os.path.join(run2d, "summary.json")))
    assert s["iwae_k"] == 5 and s["iwae_n"] == 20 and s["test_nll"] == -s["test_ll"]
    assert s["test_nll"] < s["test_nelbo_iwae_subset"]   # IWAE bound is tighter than the ELBO
    assert {"impute_mse_vae", "impute_mse_vae_cond_mean", "impute_mse_mean_image"} <= set(s)
    m = npdgm.load(run2d)
    assert isinstance(m, npdgm.VAE) and m.z_dim == 2 and m.config["hidden"] == [32]


def test_sample_and_impute_commands(run2d, tmp_path, capsys):
    png, npy = str(tmp_path / "s.png"), str(tmp_path / "s.npy")
    assert cli.main(["sample", run2d, "--n", "12", "--nrow", "4", "--out", png, "--npy", npy]) == 0
    assert os.path.getsize(png) > 1000 and np.load(npy).shape == (12, 784)
    assert cli.main(["sample", os.path.join(run2d, "checkpoint.npz"), "--n", "4", "--draw"]) == 0
    assert os.path.exists(os.path.join(run2d, "samples-seed0.png"))
    png = str(tmp_path / "imp.png")
    assert cli.main(["impute", run2d, "--n", "30", "--rows", "5", "12", "--steps", "2", "--out", png]) == 0
    out = capsys.readouterr().out
    assert "mean image" in out and "E[x_miss|x_obs] (k=100)" in out and os.path.exists(png)


def test_resume_equals_uninterrupted(tmp_path):
    """2 epochs in one go == 1 epoch, then --resume to epoch 2: identical weights, optimizer state and
    train metrics (with dynamic binarization, so the restored RNG is exercised too)."""
    opts = [*TINY, "--z-dim", "3", "--binarize", "dynamic", "--no-plots", "--seed", "5"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    assert cli.main(["train", "vae", *opts, "--epochs", "2", "--out", full]) == 0
    assert cli.main(["train", "vae", *opts, "--epochs", "1", "--out", part]) == 0
    assert cli.main(["train", "vae", "--resume", part, "--epochs", "2", "--no-progress", "--no-plots"]) == 0
    a, ma = io.load_arrays(full)
    b, mb = io.load_arrays(part)
    assert set(a) == set(b) and ma["epoch"] == mb["epoch"] == 2 and ma["rng"] == mb["rng"]
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rs]
    assert strip(train.read_metrics(full)) == strip(train.read_metrics(part))


@pytest.mark.parametrize("args,msg", [
    (["--data", "/no/such/dir"], "does not exist"),
    (["--sigma", "0.1"], "Gaussian likelihood only"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--z-dim", "0"], "--z-dim must be >= 1"),
    (["--iwae-k", "0"], "--iwae-k must be >= 1"),
    (["--impute-rows", "20", "10"], "START < STOP"),
])
def test_bad_options_fail_before_training(tmp_path, capsys, args, msg):
    out = str(tmp_path / "r")
    assert cli.main(["train", "vae", *TINY, "--no-plots", "--out", out, *args]) == 2
    assert msg in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "checkpoint.npz"))


def test_unknown_choices_and_bad_rundirs(tmp_path, capsys):
    assert cli.main(["train", "vae", "--likelihood", "poisson"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert cli.main(["sample", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert cli.main(["train", "vae", "--resume", str(tmp_path)]) == 2


@pytest.mark.slow
def test_main_job_reaches_its_quality(tmp_path):
    """The README main job (defaults: bundled subset, 784-400-20 ReLU, 10 epochs) measured 118.8 nats
    test -ELBO and IWAE(k=100) -log p(x) 114.3; demand < 125 and IWAE below the ELBO."""
    out = str(tmp_path / "main")
    assert cli.main(["train", "vae", "--no-progress", "--no-plots", "--iwae-n", "200", "--impute-k", "0",
                     "--out", out]) == 0
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["test_nelbo"] < 125 and s["test_nll"] < s["test_nelbo_iwae_subset"], s
