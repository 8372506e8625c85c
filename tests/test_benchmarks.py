"""The benchmark suite: workloads compute the library models' losses, the torch peers are the same
models, the JSON output has every field, GPU-only paths skip cleanly without CuPy.
(Benchmarks are not timed here.)"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from npdgm import backend
from npdgm.bench import gemm, harness, run, workloads
from npdgm.bench.npdgm_models import loss_and_grad

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def small(name, **attrs):
    """A workload of the same kind with reduced sizes (fast, same code path)."""
    w = type(workloads.get_workload(name))()
    for k, v in attrs.items():
        setattr(w, k, v)
    return w


SMALL = {
    "vae": dict(x_dim=784, hidden=32, z_dim=4),
    "nice": dict(dim=784, hidden=24, n_hidden=2),
    "realnvp2d": dict(hidden=16),
    "convvae": dict(image_shape=(2, 8, 4), channels=(3, 4), z_dim=2),
    "glow": dict(depth=1, hidden=4),
}


@pytest.mark.parametrize("name", ["vae", "nice", "realnvp2d", "convvae", "glow"])
def test_runner_step_is_library_loss_and_adam(name):
    """One benchmark step = the library model's loss on that batch, then exactly one Adam update."""
    w = small(name, **SMALL[name])
    r = workloads.NpdgmRunner(w, batch=8, backend="numpy", seed=3)
    ref = w.build_npdgm(3)                       # same seed -> same initial weights
    np.testing.assert_array_equal(ref.flat_params, r.model.flat_params)
    x = r.batches[0]
    eps = None
    if w.noise_shape(8) is not None:
        eps = np.random.default_rng(4).standard_normal(w.noise_shape(8), dtype=np.float32)  # runner's rng: seed+1
    r.step()
    want = float(loss_and_grad(ref, x, eps))
    if hasattr(ref, "loss"):
        direct = ref.loss(x, eps) if eps is not None else ref.loss(x)
        direct = direct[0] if isinstance(direct, tuple) else direct
        assert float(direct) == pytest.approx(want, rel=1e-6)
    assert r.loss() == pytest.approx(want, rel=1e-6)
    from npdgm.optim import Adam

    opt = Adam(ref, lr=workloads.LR)
    opt.step()
    np.testing.assert_allclose(r.model.flat_params, ref.flat_params, rtol=0, atol=1e-7)
    assert r.model.flat_params.dtype == np.float32


@pytest.mark.parametrize("name", ["vae", "nice", "realnvp2d", "convvae", "glow"])
def test_torch_peer_is_the_same_model(name):
    """With npdgm's weights loaded by name, the PyTorch peer (the same functions tests/mirror checks against every
    saved model) gives the same loss and gradients (float64)."""
    torch = pytest.importorskip("torch")

    w = small(name, **SMALL[name])
    with backend.use("numpy", "float64"):
        model = w.build_npdgm(5)
        rng = np.random.default_rng(6)
        model.flat_params[...] += rng.standard_normal(model.flat_params.shape) * 0.05
        x = w.batches(6, seed=1)[0].astype(np.float64)
        eps = rng.standard_normal(w.noise_shape(6)) if w.noise_shape(6) is not None else None
        loss = float(loss_and_grad(model, x, eps))
        tm = w.build_torch(5).double()
        assert {n: tuple(p.shape) for n, p in tm.P.items()} == {n: v.shape for n, v in model.params.items()}
        tm.load(model.params)
        tl = w.torch_loss(tm, torch.as_tensor(x), None if eps is None else torch.as_tensor(eps))
        tl.backward()
    assert tl.item() == pytest.approx(loss, rel=1e-10)
    for n, p in tm.P.items():
        np.testing.assert_allclose(p.grad.numpy(), model.grads[n], rtol=1e-7, atol=1e-10, err_msg=n)


def test_torch_peer_init_is_torch_default_linear_init():
    """The peers keep torch.nn.Linear's default init (same seed -> the same weights the nn.Linear stack had)."""
    torch = pytest.importorskip("torch")
    from npdgm.bench import torch_models as T

    torch.manual_seed(3)
    tm = T.VAE(12, (9,), 3)
    torch.manual_seed(3)
    ref = [torch.nn.Linear(i, o) for i, o in [(12, 9), (9, 6), (3, 9), (9, 12)]]
    P = tm.P
    for k, lin in enumerate(ref):
        pre = "encoder" if k < 2 else "decoder"
        j = 2 * (k % 2)
        torch.testing.assert_close(P[f"{pre}.{j}.W"].detach(), lin.weight.detach().T)
        torch.testing.assert_close(P[f"{pre}.{j}.b"].detach(), lin.bias.detach())
    with pytest.raises(ValueError, match="names differ"):
        tm.load({"encoder.0.W": np.zeros((12, 9))})


def test_gemm_products_and_floor():
    c = gemm.linear_products(4, [(5, 3, False), (3, 2, True)])
    assert c == {(4, 5, 3, "NN"): 1, (5, 4, 3, "TN"): 1, (4, 3, 2, "NN"): 1, (4, 2, 3, "NT"): 1, (3, 4, 2, "TN"): 1}
    f = gemm.gemm_floor(c, np, repeats=1, target_s=0.001)
    assert f["floor_ms"] > 0 and len(f["products"]) == 5
    assert f["gflop_per_step"] == pytest.approx(2 * (4 * 5 * 3 * 2 + 4 * 3 * 2 * 3) / 1e9)
    # VAE: the first layer's input is data, so it has no dx product
    vae = gemm.linear_products(128, workloads.get_workload("vae").layers())
    assert (128, 400, 784, "NT") not in vae and (128, 784, 400, "NN") in vae


def test_convvae_floor_times_the_im2col_products_of_its_convolutions():
    """Each convolution of the convvae step is one product on its im2col rows (B Ho Wo for a conv, B H W for a
    transposed conv), forward, dx (not for the data) and dW; the Linear layers have one row per image."""
    c = workloads.get_workload("convvae").products(128)
    B = 128
    assert c[(B * 196, 16, 32, "NN")] == 1 and (B * 196, 32, 16, "NT") not in c      # 1 -> 32, 28 -> 14
    assert c[(B * 49, 512, 64, "NN")] == c[(B * 49, 64, 512, "NT")] == c[(512, B * 49, 64, "TN")] == 1
    assert c[(B, 3136, 40, "NN")] == c[(B, 20, 3136, "NN")] == 1                        # the two Linears
    assert c[(B * 49, 64, 512, "NN")] == 1 and c[(B * 196, 32, 16, "NN")] == 1          # transposed 64 -> 32 -> 1
    assert sum(c.values()) == 3 * 6 - 1


def test_convvae_bench_runs_with_the_reference_fast_and_torch_rows(tmp_path):
    args = _tiny_args(tmp_path, "--no-isolate", "--backends", "numpy,numpy-fused,torch", "--threads", "1",
                      "--no-floor")
    args[1] = "convvae"
    assert run.main(args) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    rows = {r["backend"]: r for r in out["results"]}
    assert "npdgm-numpy" in rows and all(r["workload"] == "convvae" for r in rows.values())
    from npdgm.accel import engines

    if not (engines.engine_available("numba") or engines.engine_available("numexpr")):
        return                                   # the bare install: bench skips the fused row (it says so)
    assert rows["npdgm-numpy-fused"]["loss"] == pytest.approx(rows["npdgm-numpy"]["loss"], rel=1e-4)


def test_gemm_floor_times_an_inner_dimension_of_one_as_the_outer_product():
    """k = 1 (realnvp2d's first layer) is one broadcast multiply in the library, so in the floor too."""
    calls = []

    class XP:   # numpy, recording which product ran
        asarray, empty = staticmethod(np.asarray), staticmethod(np.empty)

        @staticmethod
        def matmul(a, b, out):
            calls.append(("matmul", a.shape[1]))
            return np.matmul(a, b, out=out)

        @staticmethod
        def multiply(a, b, out):
            calls.append(("multiply", a.shape[1]))
            return np.multiply(a, b, out=out)

    f = gemm.gemm_floor({(4, 1, 3, "NN"): 1, (4, 3, 2, "NN"): 1}, XP, repeats=1, target_s=0.001)
    assert {c for c in calls} == {("multiply", 1), ("matmul", 3)} and len(f["products"]) == 2


def test_time_steps_counts_and_validates():
    calls = []
    t = harness.time_steps(lambda: calls.append(1), warmup=2, repeats=3, steps=4)
    assert len(calls) == 2 + 3 * 4 and len(t["blocks_ms"]) == 3
    assert t["ms_min"] <= t["ms_per_step"] <= t["ms_max"]
    with pytest.raises(ValueError, match="warmup"):
        harness.time_steps(lambda: None, warmup=0)


def test_peak_rss_and_machine_info():
    assert harness.peak_rss_mb() > 0
    info = harness.machine_info()
    for k in ("cpu", "cpu_count", "numpy", "blas", "env"):
        assert k in info


def _tiny_args(tmp_path, *extra):
    return ["--workloads", "realnvp2d", "--batch", "8", "--steps", "1", "--repeats", "1", "--warmup", "1",
            "--json", str(tmp_path / "out.json"), "--md", str(tmp_path / "out.md"), *extra]


def test_json_has_every_field(tmp_path, capsys):
    assert run.main(_tiny_args(tmp_path, "--no-isolate", "--backends", "numpy,torch,cupy", "--threads", "1")) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    for k in run.RESULT_FIELDS:
        assert k in out, k
    assert out["results"], "no rows"
    backends = {r["backend"] for r in out["results"]}
    assert "npdgm-numpy" in backends
    for r in out["results"]:
        for k in run.ROW_FIELDS:
            assert k in r, k
        assert r["ms_per_step"] > 0 and r["samples_per_s"] > 0 and r["floor_ms"] > 0 and r["x_floor"] > 0
        assert r["threads"] == 1 and r["device"] == "cpu"
        assert np.isfinite(r["loss"])
    if "torch-eager" in backends:
        assert all(r["x_torch"] is not None for r in out["results"])
    assert out["floors"][0]["products"]
    assert "| realnvp2d | npdgm-numpy |" in (tmp_path / "out.md").read_text()
    if not backend.cupy_available():
        assert any("cupy" in n for n in out["skipped"])
        assert not any("cupy" in b or "cuda" in b for b in backends)


def test_glow_floor_is_the_im2col_gemms_of_every_convolution():
    """glow's floor: per k x k convolution the products (B H W, C k k) x (C k k, O) forward, its two backward ones,
    and InvertibleLinear's two (B H W, C) x (C, C) products per 1x1 convolution, at each level's pixel count."""
    c = workloads.get_workload("glow").products(64)
    rows0, rows1 = 64 * 14 * 14, 64 * 7 * 7                     # level 0: (4, 14, 14), level 1: (8, 7, 7)
    assert c[(rows0, 2 * 9, 32, "NN")] == 4 and c[(rows0, 32, 2 * 9, "NT")] == 4 and c[(2 * 9, rows0, 32, "TN")] == 4
    assert c[(rows0, 32 * 9, 2 * 2, "NN")] == 4 and c[(rows1, 32 * 9, 2 * 4, "NN")] == 4
    assert c[(rows0, 4, 4, "NN")] == 8 and c[(rows1, 8, 8, "NN")] == 8 and c[(rows1, 4 * 9, 32, "NN")] == 4
    assert sum(c.values()) == 2 * 4 * 5 * 3                     # 2 levels x 4 steps x 5 products x 3 (all need dx)


def test_glow_bench_runs_beside_torch_from_the_same_start(tmp_path):
    """``npdgm bench --workloads glow --backends numpy,numpy-fused,torch`` gives every row and the floor; the torch
    peer starts from npdgm's weights with ActNorm initialised on the same first batch, so the first step's loss is
    the same (float32; the runs above time different numbers of steps, so their last losses differ)."""
    pytest.importorskip("torch")
    args = _tiny_args(tmp_path, "--no-isolate", "--backends", "numpy,numpy-fused,torch", "--threads", "1")
    args[args.index("realnvp2d")] = "glow"
    args[args.index("--batch") + 1] = "4"
    assert run.main(args) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    rows = {r["backend"]: r for r in out["results"]}
    assert set(rows) == {"npdgm-numpy", "npdgm-numpy-fused", "torch-eager"}
    assert all(r["floor_ms"] > 0 and r["x_torch"] > 0 and np.isfinite(r["loss"]) for r in rows.values())
    w = small("glow", **SMALL["glow"])
    ours, theirs = workloads.NpdgmRunner(w, batch=4, seed=2), workloads.TorchRunner(w, batch=4, seed=2)
    ours.step()
    theirs.step()
    assert theirs.loss() == pytest.approx(ours.loss(), rel=1e-5)


def test_isolated_point_and_sweep_plot(tmp_path):
    """Each point in its own process; --sweep writes a plot with every batch."""
    args = _tiny_args(tmp_path, "--backends", "numpy", "--threads", "1", "--no-floor", "--plot",
                      str(tmp_path / "sweep.png"))
    args.remove("--batch")
    args.remove("8")
    assert run.main(args + ["--sweep", "--sweep-batches", "8,16"]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert sorted(r["batch"] for r in out["results"]) == [8, 16]
    assert all(r["peak_rss_mb"] > 0 for r in out["results"])
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown workload"):
        run.plan(run.parse_args(["--workloads", "gan"]))
    with pytest.raises(ValueError, match="unknown backend"):
        run.plan(run.parse_args(["--backends", "jax"]))
    with pytest.raises(SystemExit):
        run.parse_args(["--threads", "0"])


def test_gpu_rows_skip_without_cupy():
    if backend.cupy_available():
        pytest.skip("a GPU is visible: the GPU rows run instead")
    points, floors, notes = run.plan(run.parse_args(["--backends", "cupy", "--workloads", "vae"]))
    assert points == [] and floors == []
    assert any("CuPy" in n for n in notes)


def test_cuda_graph_step_refuses_the_reference_wing():
    """With the fast wing off, Adam's bias corrections are host values a captured graph would replay
    unchanged: the capture is refused (before CuPy is touched, so this runs anywhere)."""
    from npdgm import accel
    from npdgm.accel.cuda import CudaGraphStep

    accel.disable()
    with pytest.raises(RuntimeError, match="needs the fast wing"):
        CudaGraphStep(lambda: None, ())


# -- GPU paths: CUDA graphs against eager steps (skipped without CuPy; the fused kernels: tests/test_accel.py) ---
@pytest.mark.gpu
@pytest.mark.parametrize("name", ["vae", "realnvp2d"])
def test_cuda_graph_step_matches_eager_steps(cupy, name):
    w = small(name, **SMALL[name])
    eager = workloads.NpdgmRunner(w, batch=16, backend="cupy", seed=7)
    graph = workloads.NpdgmRunner(w, batch=16, backend="cupy", seed=7)
    try:
        graph.enable_cuda_graph(warmup=2)                 # the 2 warm-up calls are real steps on batch 0
        eps0 = None if eager.noise_shape is None else cupy.asarray(
            eager.noise_rng.standard_normal(eager.noise_shape, dtype=np.float32))  # the capture's example noise
        for _ in range(2):
            loss_and_grad(eager.model, eager.batches[0], eps0)
            eager.opt.step()
        graph.noise_rng = np.random.default_rng(123)
        eager.noise_rng = np.random.default_rng(123)
        for _ in range(5):
            eager.step()
            graph.step()
        cupy.cuda.get_current_stream().synchronize()
        assert graph.opt.t == eager.opt.t == 7
        assert graph.loss() == pytest.approx(eager.loss(), rel=1e-4)
        np.testing.assert_allclose(cupy.asnumpy(graph.model.flat_params), cupy.asnumpy(eager.model.flat_params),
                                   rtol=1e-4, atol=1e-5)
    finally:
        backend.set_backend("numpy")


def test_rounds_report_the_median_round(tmp_path):
    assert run.median_rounds([{"w": "a", "ms": 3.0}, {"w": "b", "ms": 1.0}, {"w": "a", "ms": 1.0},
                              {"w": "a", "ms": 2.0}], ("w",), "ms") == [
        {"w": "a", "ms": 2.0, "rounds": [1.0, 2.0, 3.0]}, {"w": "b", "ms": 1.0, "rounds": [1.0]}]
    assert run.main(_tiny_args(tmp_path, "--no-isolate", "--backends", "numpy", "--threads", "1",
                               "--repeats", "1", "--rounds", "2")) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert [len(r["rounds"]) for r in out["results"]] == [2] and len(out["floors"][0]["rounds"]) == 2
    assert out["results"][0]["ms_per_step"] == min(out["results"][0]["rounds"])


def test_interleaved_group_and_profile(tmp_path):
    """--interleave: backends and the floor timed round-robin in one process; --profile splits a step."""
    assert run.main(_tiny_args(tmp_path, "--no-isolate", "--backends", "numpy,torch", "--threads", "1",
                               "--interleave", "--repeats", "2", "--profile")) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert {r["backend"] for r in out["results"]} >= {"npdgm-numpy"}
    assert all(len(r["blocks_ms"]) == 2 and r["x_floor"] > 0 for r in out["results"])
    assert out["floors"][0]["interleaved"] and out["floors"][0]["floor_ms"] > 0
    by = {r["backend"]: r for r in out["results"]}
    assert by["npdgm-numpy"]["x_floor_paired"] > 0 and "paired x floor" in (tmp_path / "out.md").read_text()
    assert by["npdgm-numpy"]["step_alloc_mb"] > 0
    if "torch-eager" in by:
        assert by["torch-eager"]["x_torch_paired"] == 1.0
    (prof,) = out["profile"]
    parts = prof["zero_grad_ms"] + prof["linear_ms"] + prof["elementwise_ms"] + prof["optimizer_ms"]
    assert parts == pytest.approx(prof["step_ms"], rel=0.05)
    assert prof["linear_ms"] > 0 and prof["optimizer_ms"] > 0


def test_paired_ratios_pool_every_round():
    """pool_paired: the block ratios of every round, per (workload, backend, batch); a row timed alone (no
    "paired") adds nothing."""
    rows = [{"workload": "vae", "backend": "npdgm-numpy", "batch": 8, "paired": {"x_floor": [1.5, 1.4]}},
            {"workload": "vae", "backend": "npdgm-numpy", "batch": 8, "paired": {"x_floor": [1.6, 1.5, 1.5]}},
            {"workload": "vae", "backend": "torch-eager", "batch": 8}]
    assert run.pool_paired(rows) == {("vae", "npdgm-numpy", 8): {"x_floor": [1.5, 1.4, 1.6, 1.5, 1.5]}}


def test_plain_runner_stays_plain_beside_a_fused_one(monkeypatch):
    """--interleave keeps npdgm-numpy and npdgm-numpy-fused in one process: each runner sets the fast wing's
    switch to its own state before its step (the switch is global), so the reference row never runs a fused
    formula and the fast row runs them all (here with the NumPy engine: no extra needed)."""
    from npdgm import accel
    from npdgm.accel import engines, twins

    real_enable, real_run = accel.enable, engines.run
    monkeypatch.setattr(accel, "enable", lambda engine="auto", **k: real_enable(
        "off" if engine == "off" else "numpy", min_size=0))
    calls = []
    record = lambda name, *a, **k: calls.append(name) or real_run(name, *a, **k)  # noqa: E731
    monkeypatch.setattr(engines, "run", record)
    monkeypatch.setattr(twins, "run", record)
    try:
        w = small("vae", **SMALL["vae"])
        plain = workloads.NpdgmRunner(w, batch=8, backend="numpy", seed=3)
        fast = workloads.NpdgmRunner(w, batch=8, backend="numpy-fused", seed=3)
        assert fast.engine == "numpy" and accel.engine() == "numpy"   # the last one built set the switch
        plain.step()
        assert calls == [] and accel.engine() == "off"
        first = plain.loss()
        fast.step()
        assert {"adam", "bernoulli_nll_forward", "relu_backward", "bias_relu_forward"} <= set(calls)
        calls.clear()
        plain.step()
        assert calls == []
        assert fast.loss() == pytest.approx(first, rel=1e-5)     # the same first step, two paths
    finally:
        real_enable("off")


def test_profile_of_the_fused_row_profiles_the_fused_path(monkeypatch):
    """``--profile`` of an npdgm-numpy-fused row splits a fast-wing step (it used to profile plain NumPy)."""
    from npdgm import accel
    from npdgm.accel import engines, twins
    from npdgm.bench import profile

    real_enable, real_run = accel.enable, engines.run
    monkeypatch.setattr(accel, "enable", lambda engine="auto", **k: real_enable(
        "off" if engine == "off" else "numpy", min_size=0))
    calls = []
    record = lambda name, *a, **k: calls.append(name) or real_run(name, *a, **k)  # noqa: E731
    monkeypatch.setattr(engines, "run", record)
    monkeypatch.setattr(twins, "run", record)
    try:
        res = profile.profile_step("realnvp2d", batch=16, backend="numpy-fused", steps=1)
    finally:
        real_enable("off")
    assert res["backend"] == "npdgm-numpy-fused" and {"adam", "affine_coupling_backward"} <= set(calls)


def test_profile_times_every_linear_layer_also_the_ones_run_with_their_relu(monkeypatch):
    """The fast wing's Sequential runs a Linear + ReLU pair through linear_relu_forward: the profile's
    "linear" part must include those forwards (it timed Linear.forward alone, so they fell into "elementwise")."""
    from npdgm import accel
    from npdgm.accel import layers as fused_layers
    from npdgm.bench import profile

    import time

    real = fused_layers.linear_relu_forward

    def slow(x, W, b):       # 2 ms per pair: 16 pairs per realnvp2d step
        time.sleep(0.002)
        return real(x, W, b)

    monkeypatch.setattr(fused_layers, "linear_relu_forward", slow)
    try:
        res = profile.profile_step("realnvp2d", batch=16, backend="numpy-fused", steps=1)
    finally:
        accel.disable()
    assert res["linear_ms"] >= 16 * 2 and res["elementwise_ms"] < 16 * 2
    assert fused_layers.linear_relu_forward is slow       # restored after the profile


# -- shipped as `npdgm bench` -------------------------------------------------------------------
def test_npdgm_bench_subcommand_runs_the_benchmark(tmp_path, capsys):
    from npdgm.cli import main

    assert main(["bench", *_tiny_args(tmp_path, "--no-isolate", "--backends", "numpy", "--threads", "1",
                                      "--no-floor")]) == 0
    out = json.loads((tmp_path / "out.json").read_text())
    assert [(r["workload"], r["backend"], r["batch"]) for r in out["results"]] == [("realnvp2d", "npdgm-numpy", 8)]
    assert "| realnvp2d | npdgm-numpy |" in capsys.readouterr().out


def test_npdgm_bench_errors_are_one_line(capsys):
    from npdgm.cli import main

    assert main(["bench", "--backends", "jax"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("npdgm: error: unknown backend 'jax'") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["bench", "--rounds", "0"])
    assert "--rounds must be >= 1" in capsys.readouterr().err


def test_checkout_shim_and_isolated_children_from_any_directory(tmp_path, monkeypatch):
    """`python -m benchmarks.run` (checkout) is npdgm.bench.run; its per-point child processes run
    `python -m npdgm.bench.run` and import the same npdgm from another working directory."""
    monkeypatch.syspath_prepend(ROOT)  # the checkout's benchmarks/ folder (plain `pytest` does not add it)
    import benchmarks.run as shim

    assert shim is run
    if importlib.util.find_spec("torch") is not None:  # kept for code that imported it from benchmarks/
        from benchmarks import torch_models
        from npdgm.bench import torch_models as T

        assert torch_models is T
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "benchmarks.run", *_tiny_args(tmp_path, "--backends", "numpy",
                                                                             "--threads", "1", "--no-floor")],
                       cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["results"][0]["backend"] == "npdgm-numpy" and out["results"][0]["ms_per_step"] > 0
    assert "usage: python -m benchmarks.run" in subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "-h"], cwd=work, env=env, capture_output=True, text=True).stdout


def test_step_alloc_counts_a_steps_temporaries():
    """harness.step_alloc_mb: the peak of what the steps allocate above what was live before them (so the
    engine's import and compiled code, which peak RSS also counts, stay out of it)."""
    keep = np.zeros(1 << 20)                               # 8 MiB live before: not counted

    def step():
        t = np.ones(1 << 19)                               # a 4 MiB temporary, freed at return
        return float(t[0] + keep[0])

    assert harness.step_alloc_mb(step) == pytest.approx(4.0, abs=0.1)
    assert harness.step_alloc_mb(lambda: None) < 0.01
