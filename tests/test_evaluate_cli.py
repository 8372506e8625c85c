"""``npdgm evaluate``: every method through npdgm.cli.main, the JSON, BDMC, the naive-MC figure, the errors,
and AIS against the exact log p(x) of a linear-Gaussian VAE saved as a checkpoint."""
import json
import math

import numpy as np
import pytest

from npdgm import cli
from npdgm.models.vae import VAE

TINY = ["--train-limit", "100", "--test-limit", "20", "--batch-size", "50", "--no-progress", "--no-plots",
        "--hidden", "8", "--z-dim", "2", "--epochs", "1", "--iwae-n", "0", "--impute-k", "0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ev") / "vae")
    assert cli.main(["train", "vae", *TINY, "--out", out]) == 0
    return out


def test_every_method_prints_and_writes_json(run, tmp_path, capsys):
    js = tmp_path / "ev.json"
    argv = ["evaluate", run, "--method", "elbo", "iwae", "naive", "ais", "--k", "200", "--n-images", "6",
            "--steps", "30", "--leapfrog", "3", "--chains", "4", "--json", js]
    assert cli.main(argv) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    for m in ("elbo", "iwae", "naive", "ais"):
        assert f"\n{m} " in "\n" + text and "nats/image" in text
    r = json.loads(js.read_text())
    assert r["n_images"] == 6 and set(r["methods"]) == {"elbo", "iwae", "naive", "ais"}
    m = {k: v["mean"] for k, v in r["methods"].items()}
    assert all(np.isfinite(v) and v < 0 for v in m.values())
    assert m["elbo"] < m["iwae"] and m["ais"] > m["elbo"], m
    assert r["methods"]["ais"]["steps"] == 30 and r["methods"]["iwae"]["k"] == 200
    for v in r["methods"].values():   # the per-image estimates, for paired comparisons between methods
        assert len(v["per_image"]) == 6 and np.isclose(np.mean(v["per_image"]), v["mean"], rtol=1e-12)
    assert all(v["se"] > 0 and v["seconds"] >= 0 for v in r["methods"].values())


def test_bdmc_prints_lower_and_upper(run, tmp_path, capsys):
    js = tmp_path / "b.json"
    assert cli.main(["evaluate", run, "--bdmc", "--n-images", "3", "--steps", "60", "--leapfrog", "3",
                     "--chains", "4", "--json", js]) == 0
    assert "lower" in capsys.readouterr().out
    b = json.loads(js.read_text())["bdmc"]
    assert b["lower"] <= b["upper"] + 0.5 and b["gap"] < 3, b


def test_naive_plot(run, tmp_path, capsys):
    png = tmp_path / "naive.png"
    assert cli.main(["evaluate", run, "--method", "naive", "--k", "10", "--n-images", "2", "--plot", png]) == 0
    assert png.stat().st_size > 5000


def test_naive_draws_are_shared_by_all_images_whatever_the_batch(run, tmp_path):
    """naive MC takes all the images in one call (one decoder pass per prior draw): --batch leaves it alone."""
    means = []
    for batch in ("2", "100"):
        js = tmp_path / f"n{batch}.json"
        assert cli.main(["evaluate", run, "--method", "naive", "--k", "300", "--n-images", "5", "--batch", batch,
                         "--json", js]) == 0
        means.append(json.loads(js.read_text())["methods"]["naive"]["mean"])
    assert means[0] == means[1], means


@pytest.mark.parametrize("argv, msg", [
    (["--bdmc", "--method", "iwae"], "either --method or --bdmc"),
    (["--method", "iwae", "--plot", "x.png"], "--plot draws the naive-MC figure"),
])
def test_errors(run, capsys, argv, msg):
    assert cli.main(["evaluate", run, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npdgm: error:") and msg in err


def test_not_a_vae_run(tmp_path, capsys):
    from npdgm.models.cvae import CVAE

    assert cli.main(["evaluate", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("npdgm: error:")
    CVAE(x_dim=784, num_classes=10, hidden=(4,), z_dim=2).save(str(tmp_path / "c.npz"))
    assert cli.main(["evaluate", str(tmp_path / "c.npz")]) == 2
    assert "holds a 'cvae' model" in capsys.readouterr().err


def test_ais_matches_exact_log_px_of_linear_gaussian_checkpoint(tmp_path, capsys):
    """x = z W + b + 0.5 n with p(x) = N(b, W^T W + 0.25 I): AIS through the CLI lands on the closed form."""
    from npdgm.data import load_mnist

    m = VAE(x_dim=784, hidden=(), z_dim=2, likelihood="gaussian", sigma=0.5, seed=0)
    r = np.random.default_rng(0)
    m.params["decoder.0.W"][...] = r.standard_normal((2, 784)) * 0.3
    m.params["decoder.0.b"][...] = 0.1
    path = str(tmp_path / "lg.npz")
    m.save(path)
    js = tmp_path / "lg.json"
    assert cli.main(["evaluate", path, "--method", "ais", "iwae", "--n-images", "3", "--steps", "200",
                     "--leapfrog", "5", "--chains", "32", "--k", "100", "--json", js]) == 0, capsys.readouterr().err
    x = load_mnist("test", None, limit=3)[0].astype(np.float64)
    W, b = np.asarray(m.params["decoder.0.W"], np.float64), np.asarray(m.params["decoder.0.b"], np.float64)
    S = W.T @ W + 0.25 * np.eye(784)
    d = x - b
    exact = -0.5 * (np.einsum("bi,ij,bj->b", d, np.linalg.inv(S), d) + np.linalg.slogdet(S)[1]
                    + 784 * math.log(2 * math.pi))
    got = json.loads(js.read_text())["methods"]["ais"]["mean"]
    assert abs(got - exact.mean()) < 0.3, (got, exact.mean())  # se of the 32-chain estimate ~ 0.1


# -- npdgm train vae --objective iwae --k K, and the active-units diagnostic ------------------------------
def test_iwae_objective_step_is_iwae_loss_and_grad(f64):
    from npdgm.commands.vae import make_step

    m = VAE(x_dim=6, hidden=(5,), z_dim=2, seed=1)
    xb = np.random.default_rng(0).uniform(0, 1, (4, 6))
    m.zero_grad()
    loss = make_step(m, False, "iwae", 3)(xb, None, np.random.default_rng(7))["loss"]
    g = m.flat_grads.copy()
    eps = np.random.default_rng(7).standard_normal((3, 4, 2), dtype=np.float32).astype(np.float64)
    want, iw = m.iwae_loss_and_grad(xb, eps)
    assert float(loss) == float(want) and iw.shape == (4,)
    np.testing.assert_allclose(g, m.flat_grads, rtol=1e-12)
    m.zero_grad()
    elbo = make_step(m, False)(xb, None, np.random.default_rng(7))["loss"]
    assert float(elbo) > float(loss)  # -ELBO (one sample) above the 3-sample -IWAE with the same first draw


def test_train_vae_objective_iwae_records_it_and_counts_active_units(tmp_path, capsys):
    out = str(tmp_path / "iw")
    argv = [a for a in TINY if a not in ("--z-dim", "2")] + ["--z-dim", "3"]
    assert cli.main(["train", "vae", *argv, "--objective", "iwae", "--k", "3", "--out", out]) == 0
    s = json.loads((tmp_path / "iw" / "summary.json").read_text())
    assert 0 <= s["active_units"] <= 3
    meta = json.loads(open(out + "/metrics.jsonl").readline())
    assert np.isfinite(meta["train_loss"])
    from npdgm.io import load_arrays
    run = load_arrays(out)[1]["run"]["args"]
    assert run["objective"] == "iwae" and run["k"] == 3


def test_active_units_counts_dimensions_whose_posterior_mean_varies():
    from npdgm.commands.vae import active_units

    class M:
        def encode(self, x):
            return np.stack([x[:, 0], 0.01 * x[:, 1], x[:, 2] * 0], 1), None
    x = np.random.default_rng(0).standard_normal((500, 3))
    assert active_units(M(), x) == 1


def test_kl_warmup_ramps_beta_step_by_step(f64):
    from npdgm.commands.vae import make_step

    m = VAE(x_dim=6, hidden=(5,), z_dim=2, seed=1, beta=2.0)
    xb = np.random.default_rng(0).uniform(0, 1, (4, 6))
    step, seen = make_step(m, False, warmup_steps=4, start_step=1), []
    for _ in range(5):
        m.zero_grad()
        t = step(xb, None, np.random.default_rng(3))
        seen.append(m.beta)
        np.testing.assert_allclose(float(t["loss"]), float(t["recon"] + m.beta * t["kl"]), rtol=1e-12)
    assert seen == [0.5, 1.0, 1.5, 2.0, 2.0] and m.config["beta"] == 2.0


def test_train_vae_kl_warmup_option(tmp_path):
    out = str(tmp_path / "w")
    assert cli.main(["train", "vae", *TINY, "--kl-warmup", "0.5", "--out", out]) == 0
    from npdgm.io import load_arrays
    arrays, meta = load_arrays(out)
    assert meta["run"]["args"]["kl_warmup"] == 0.5 and meta["config"]["beta"] == 1.0


def test_kl_warmup_with_iwae_objective_is_refused(tmp_path, capsys):
    argv = ["train", "vae", *TINY, "--kl-warmup", "1", "--objective", "iwae", "--out", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    assert "--kl-warmup applies to --objective elbo" in capsys.readouterr().err


def test_evaluate_a_non_finite_model_leaks_no_numpy_warning(run, tmp_path, run_cli):
    """Issue 23: `evaluate` on a diverged model printed numpy's "RuntimeWarning: invalid value encountered in
    matmul" (whether such a checkpoint is refused or evaluated to NaN, no warning may reach the user)."""
    import shutil

    from npdgm import io

    bad = str(tmp_path / "bad")
    shutil.copytree(run, bad)
    arrays, meta = io.load_arrays(bad)
    for k in arrays:
        if k.startswith("param/"):
            arrays[k][...] = np.nan
    arrays["param/encoder.0.W"][:5] = np.inf
    io.save_arrays(f"{bad}/checkpoint.npz", arrays, meta)
    code, _, err = run_cli("evaluate", bad, "--method", "elbo", "iwae", "--k", "5", "--n-images", "3")
    assert code in (0, 2) and err.count("\n") <= 1, err
