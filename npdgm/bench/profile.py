"""Where one npdgm training step spends its time: matmul vs elementwise vs optimizer.

The step is split by wall-clock timers around its phases (warm steps, mean over steps, so the
parts add up to the step):
    zero_grad        model.zero_grad()
    loss_and_grad    forward + backward; inside it, every Linear layer's forward/backward is timed
                     (matmul + bias add + grad accumulation = "linear layers"; a Linear + ReLU pair
                     that the fast wing's Sequential runs through ``linear_relu_forward`` counts with its ReLU);
                     the rest is elementwise work (activations, losses, couplings) and Python overhead
    optimizer        Adam.step()
The GEMM floor (pure matmul time on the same shapes, measured separately) is shown beside the
linear-layer time: the difference is bias/gradient traffic around the matmuls.

    python -m npdgm.bench.profile vae [--batch N] [--backend numpy|numpy-fused|cupy] [--steps 20]
"""
from __future__ import annotations

import argparse
import statistics
import time


def profile_step(workload, batch=None, backend="numpy", seed=0, steps=20, floor_ms=None):
    import numpy as np

    from npdgm import backend as B
    from npdgm.accel import layers as fused_layers
    from npdgm.nn import layers

    from .npdgm_models import loss_and_grad
    from .workloads import NpdgmRunner, get_workload

    w = get_workload(workload)
    batch = batch or w.batch
    r = NpdgmRunner(w, batch, backend, seed)
    sync = r.sync
    acc = {"linear": 0.0}
    orig_f, orig_b, orig_fr = layers.Linear.forward, layers.Linear.backward, fused_layers.linear_relu_forward

    def timed(fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            out = fn(*a, **k)
            sync()
            acc["linear"] += time.perf_counter() - t
            return out
        return wrapper

    rec = {k: [] for k in ("zero_grad", "loss_and_grad", "linear", "optimizer", "step")}
    for _ in range(3):
        r.step()
    layers.Linear.forward, layers.Linear.backward = timed(orig_f), timed(orig_b)
    fused_layers.linear_relu_forward = timed(orig_fr)
    try:
        for i in range(steps):
            x = r.batches[i % len(r.batches)]
            eps = None
            if r.noise_shape is not None:
                eps = B.to_device(r.noise_rng.standard_normal(r.noise_shape, dtype=np.float32))
            acc["linear"] = 0.0
            sync()
            t0 = time.perf_counter()
            r.model.zero_grad()
            sync()
            t1 = time.perf_counter()
            loss_and_grad(r.model, x, eps, zero_grad=False)
            sync()
            t2 = time.perf_counter()
            r.opt.step()
            sync()
            t3 = time.perf_counter()
            rec["zero_grad"].append(t1 - t0)
            rec["loss_and_grad"].append(t2 - t1)
            rec["linear"].append(acc["linear"])
            rec["optimizer"].append(t3 - t2)
            rec["step"].append(t3 - t0)
    finally:
        layers.Linear.forward, layers.Linear.backward = orig_f, orig_b
        fused_layers.linear_relu_forward = orig_fr
    # means, not medians: the parts of a step add up to the step exactly
    med = {k: statistics.fmean(v) * 1e3 for k, v in rec.items()}
    return {"workload": w.name, "backend": f"npdgm-{backend}", "batch": batch, "step_ms": med["step"],
            "zero_grad_ms": med["zero_grad"], "loss_and_grad_ms": med["loss_and_grad"], "linear_ms": med["linear"],
            "elementwise_ms": med["loss_and_grad"] - med["linear"], "optimizer_ms": med["optimizer"],
            "gemm_floor_ms": floor_ms, "params": r.num_parameters()}


def main(argv=None):
    from . import harness

    p = argparse.ArgumentParser(prog="python -m npdgm.bench.profile", description=__doc__.split("\n\n")[0])
    p.add_argument("workload")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--backend", default="numpy", choices=("numpy", "numpy-fused", "cupy"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--floor", action="store_true", help="also measure the GEMM floor")
    a = p.parse_args(argv)
    if a.threads:
        harness.set_threads(a.threads)
    floor = None
    if a.floor:
        from .gemm import gemm_floor
        from .workloads import get_workload

        import numpy

        w = get_workload(a.workload)
        floor = gemm_floor(w.products(a.batch or w.batch), numpy)["floor_ms"]
    res = profile_step(a.workload, a.batch, a.backend, steps=a.steps, floor_ms=floor)
    for k, v in res.items():
        print(f"{k:18s} {v:.3f}" if isinstance(v, float) else f"{k:18s} {v}")


if __name__ == "__main__":
    main()
