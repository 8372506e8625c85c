"""Benchmark entry point: full training steps of the same models on npdgm (NumPy / CuPy) and PyTorch.

    npdgm bench [--workloads vae,nice,realnvp2d,glow] [--backends numpy,cupy,torch]
                [--batch N | --sweep] [--steps N] [--repeats R] [--threads T]
                [--json out.json] [--md out.md] [--plot out.png] [--profile]

(``python -m npdgm.bench.run`` and, in a checkout, ``python -m benchmarks.run`` are the same command.)

Every (workload, backend, batch) point runs in its own Python process (``--no-isolate`` runs them
in this one), so thread pools of different libraries do not compete and the peak RSS is that
point's own. A point: build the model, warm up, then ``--repeats`` timed blocks of steps; the
table shows the median block's ms/step. The GEMM floor is measured in the same run on the same
device, per workload and batch (see :mod:`npdgm.bench.gemm`).

Backends: ``numpy`` (npdgm on CPU), ``cupy`` (npdgm on GPU; skipped with a note without CuPy or
a GPU), ``torch`` (eager PyTorch on CPU, plus eager and ``torch.compile`` on CUDA when ``cupy``
is requested and torch sees a GPU; skipped with a note without torch).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from . import harness

SWEEP = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
BACKENDS = ("numpy", "numpy-fused", "cupy", "torch")
ROW_FIELDS = ("workload", "backend", "impl", "device", "threads", "batch", "ms_per_step", "ms_min", "ms_max",
              "samples_per_s", "floor_ms", "x_floor", "x_torch", "peak_rss_mb", "step_alloc_mb", "gpu_peak_mb", "loss",
              "params", "steps_per_block", "repeats")
RESULT_FIELDS = ("machine", "config", "results", "floors", "skipped", "profile")


def add_arguments(p):
    """The benchmark's options on parser ``p`` (``npdgm bench`` and ``python -m npdgm.bench.run`` share them)."""
    p.add_argument("--workloads", default="vae,nice,realnvp2d",
                   help="comma list of vae, nice, realnvp2d, convvae, glow (default: vae,nice,realnvp2d; convvae "
                        "and glow are the slow ones: glow about 0.25 s a step of 64 on one CPU thread)")
    p.add_argument("--backends", default="numpy,torch",
                   help="comma list of numpy (the reference wing: --accel off), numpy-fused (the fast wing: "
                        "--accel auto, numba or numexpr), cupy, torch (default: numpy,torch)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--batch-size", "--batch", type=int, default=None, dest="batch",
                   help="batch size (default: each workload's own; --batch is its old name)")
    g.add_argument("--sweep", action="store_true", help=f"batch sizes {SWEEP[0]}..{SWEEP[-1]} (see --sweep-batches)")
    p.add_argument("--sweep-batches", default=",".join(map(str, SWEEP)), help="batch sizes of --sweep")
    p.add_argument("--steps", type=int, default=None, help="steps per timed block (default: ~0.5 s blocks)")
    p.add_argument("--repeats", type=int, default=None, help="timed blocks per point (default 5, 3 with --sweep)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help=f"CPU threads for every library (default: all cores, {os.cpu_count() or 1} here)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order and noise (default 0)")
    p.add_argument("--no-floor", action="store_true", help="skip the GEMM floor measurement")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile on CUDA")
    p.add_argument("--profile", action="store_true", help="also profile one npdgm step per workload")
    p.add_argument("--cuda-graph", action="store_true", help="capture the npdgm-cupy step as a CUDA graph")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on GPU (npdgm and torch)")
    p.add_argument("--torch-adam", default="default", choices=("default", "foreach", "fused"),
                   help="torch.optim.Adam implementation of the peer (default: torch's choice, on CPU the "
                        "single-tensor loop)")
    p.add_argument("--no-isolate", action="store_true", help="run every point in this process")
    p.add_argument("--interleave", action="store_true",
                   help="time the CPU backends and the GEMM floor of a point round-robin in one process "
                        "(fair on a machine whose load changes; best with --threads 1)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole plan this many times, backends alternating, and report each point's "
                        "median round (on a VM whose speed drifts, a drift then hits every backend alike)")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--md", default=None, help="write the markdown table to this file")
    p.add_argument("--plot", default=None, help="log-log plot of ms/step and samples/s against batch")
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel step time against --ranks (mpiexec, threads / ranks BLAS threads per rank) "
                        "and the gradient all-reduce's ms per step (npdgm.bench.distributed)")
    p.add_argument("--ranks", default="1,2", help="--distributed: comma list of rank counts (default 1,2)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def check_args(p, a):
    """Reject out-of-range values through ``p.error`` (exit 2 with the usage line)."""
    if a.threads < 1:
        p.error("--threads must be >= 1")
    for name in ("steps", "repeats", "batch"):
        v = getattr(a, name)
        if v is not None and v < 1:
            p.error(f"--{name} must be >= 1, got {v}")
    if a.warmup < 1:
        p.error("--warmup must be >= 1")
    if a.rounds < 1:
        p.error(f"--rounds must be >= 1, got {a.rounds}")
    from ..commands.common import check_out_file

    for opt in ("json", "md", "plot"):  # before the benchmark, not after it
        if getattr(a, opt, None) and not a.child:
            try:
                check_out_file(getattr(a, opt), f"--{opt}")
            except ValueError as e:
                p.error(str(e))
    return a


def parse_args(argv=None, prog="npdgm bench"):
    p = add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]))
    return check_args(p, p.parse_args(argv))


def register(sub):
    """Add ``npdgm bench`` to the CLI's subcommands (``sub``: its ``add_subparsers`` object)."""
    b = sub.add_parser("bench", help="time training steps: npdgm-NumPy / npdgm-CuPy / PyTorch, GEMM floor",
                       description=__doc__.split("\n\n")[0])
    add_arguments(b)
    b.set_defaults(func=lambda args: run(check_args(b, args)))


# -- one point (runs in the child process) ------------------------------------------------------
def _gpu_peak_start(kind):
    if kind == "cupy":
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
    elif kind == "torch-cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()


def _gpu_peak_mb(kind, graph=None):
    """Peak GPU memory of the point: CuPy's default pool (it only grows: its size is its peak) plus a
    CUDA graph step's private pool, or torch's peak allocation."""
    if kind == "cupy":
        import cupy

        own = graph.pool.total_bytes() if graph is not None else 0
        return (cupy.get_default_memory_pool().total_bytes() + own) / 2**20
    if kind == "torch-cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return None


def _device_name(gpu):
    if not gpu:
        return "cpu"
    try:
        import cupy

        return "gpu:" + cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        import torch

        return "gpu:" + torch.cuda.get_device_name(0)


def _build(spec, backend):
    """(runner, step, impl, gpu_kind) for one backend of a point."""
    from .workloads import NpdgmRunner, TorchRunner, get_workload

    w = get_workload(spec["workload"])
    batch = spec["batch"]
    gpu_kind = None
    if backend in ("npdgm-numpy", "npdgm-numpy-fused", "npdgm-cupy"):
        xp_name = backend.split("-")[1]
        if xp_name == "cupy":
            gpu_kind = "cupy"
            from npdgm.accel.cuda import set_tf32

            set_tf32(spec.get("tf32", False))
        _gpu_peak_start(gpu_kind)
        r = NpdgmRunner(w, batch, backend[len("npdgm-"):], spec["seed"])   # numpy, numpy-fused or cupy
        impl = "library"
        if backend == "npdgm-numpy-fused":
            impl += f"+accel[{r.engine}]"     # numba's loops on one thread (see accel.engines.set_engine)
        if xp_name == "cupy" and spec.get("cuda_graph"):
            r.enable_cuda_graph()
            impl += "+graph"
        return r, r.step, impl, gpu_kind
    import torch

    torch.set_num_threads(spec["threads"])
    device = "cuda" if backend.endswith("cuda") or backend == "torch-compile" else "cpu"
    if device == "cuda":
        gpu_kind = "torch-cuda"
        torch.backends.cuda.matmul.allow_tf32 = bool(spec.get("tf32", False))
    _gpu_peak_start(gpu_kind)
    adam = spec.get("torch_adam", "default")
    r = TorchRunner(w, batch, device, spec["seed"], compile=backend == "torch-compile", adam=adam)
    return r, r.step, backend if adam == "default" else f"{backend}[{adam} adam]", gpu_kind


def _row(spec, backend, r, t, impl, gpu_kind):
    ms = t["ms_per_step"]
    batch = spec["batch"]
    alloc = None
    if backend in ("npdgm-numpy", "npdgm-numpy-fused"):       # tracemalloc sees NumPy's memory only
        alloc = round(harness.step_alloc_mb(r.step), 2)
    peak = harness.peak_rss_mb()  # None on Windows
    return {"workload": spec["workload"], "backend": backend, "impl": impl,
            "device": _device_name(gpu_kind is not None), "threads": spec["threads"], "batch": batch,
            "ms_per_step": round(ms, 4), "ms_min": round(t["ms_min"], 4), "ms_max": round(t["ms_max"], 4),
            "samples_per_s": round(batch / ms * 1e3, 1), "floor_ms": None, "x_floor": None, "x_torch": None,
            "peak_rss_mb": None if peak is None else round(peak, 1), "step_alloc_mb": alloc,
            "gpu_peak_mb": _gpu_peak_mb(gpu_kind, getattr(r, "graph", None)),
            "loss": r.loss(), "params": r.num_parameters(), "steps_per_block": t["steps_per_block"],
            "repeats": t["repeats"], "blocks_ms": t["blocks_ms"]}


def run_point(spec):
    """Time one (workload, backend, batch); returns a result row (dict)."""
    harness.set_threads(spec["threads"])
    harness.reset_peak_rss()
    r, step, impl, gpu_kind = _build(spec, spec["backend"])
    t = harness.time_steps(step, r.sync, warmup=spec["warmup"], repeats=spec["repeats"], steps=spec["steps"],
                           target_s=spec.get("target_s", 0.5))
    return _row(spec, spec["backend"], r, t, impl, gpu_kind)


def run_group(spec):
    """``--interleave``: every CPU backend of one (workload, batch) and the CPU GEMM floor in one
    process, timed round-robin (block 1 of each, then block 2 of each, ...), so a machine whose load
    changes during the run slows all of them alike. Returns {"rows": [...], "floor": {...}}."""
    from .workloads import get_workload

    import numpy

    harness.set_threads(spec["threads"])
    harness.reset_peak_rss()
    built = [(b, *_build(spec, b)) for b in spec["backends"]]
    prods = get_workload(spec["workload"]).products(spec["batch"])
    from .gemm import _operands, product

    rng = numpy.random.default_rng(0)
    ops = [(product(numpy, *_operands(numpy, m, k, n, lay, "float32", rng)), c)
           for (m, k, n, lay), c in sorted(prods.items())]

    def floor_step():
        for fn, c in ops:
            for _ in range(c):
                fn()

    fns = [(b, step, r.sync) for b, r, step, _, _ in built] + [("floor", floor_step, lambda: None)]
    steps = {}
    for name, fn, sync in fns:                         # warm-up, and a block length per function
        t = harness.time_steps(fn, sync, warmup=spec["warmup"], repeats=1, steps=spec["steps"],
                               target_s=spec.get("target_s", 0.5))
        steps[name] = t["steps_per_block"]
    blocks = {name: [] for name, _, _ in fns}
    for _ in range(spec["repeats"]):
        for name, fn, sync in fns:
            t = harness.time_steps(fn, sync, warmup=1, repeats=1, steps=steps[name])
            blocks[name].append(t["ms_per_step"])

    def summary(name):
        b = blocks[name]
        return {"ms_per_step": statistics.median(b), "ms_min": min(b), "ms_max": max(b),
                "blocks_ms": [round(x, 4) for x in b], "steps_per_block": steps[name], "repeats": len(b)}

    rows = [_row(spec, b, r, summary(b), impl, gk) for b, r, _, impl, gk in built]

    def ratios(name, over):                            # each block over the block of ``over`` timed beside it
        return [round(a / b, 4) for a, b in zip(blocks[name], blocks[over])]

    for row in rows:
        row["paired"] = {"x_floor": ratios(row["backend"], "floor")}
        if "torch-eager" in blocks:
            row["paired"]["x_torch"] = ratios(row["backend"], "torch-eager")
    fl = summary("floor")
    floor = {"workload": spec["workload"], "device": "cpu", "batch": spec["batch"], "threads": spec["threads"],
             "floor_ms": fl["ms_per_step"], "gflop_per_step": sum(2 * m * k * n * c for (m, k, n, _), c in
                                                                 prods.items()) / 1e9,
             "interleaved": True, "blocks_ms": fl["blocks_ms"], "products": []}
    floor["gflops"] = floor["gflop_per_step"] / floor["floor_ms"] * 1e3
    return {"rows": rows, "floor": floor}


def run_floor(spec):
    """GEMM floor of one workload at one batch on one device (numpy or cupy)."""
    from .gemm import gemm_floor
    from .workloads import get_workload

    harness.set_threads(spec["threads"])
    w = get_workload(spec["workload"])
    if spec["device"] == "gpu":
        import cupy as xp

        from npdgm.accel.cuda import set_tf32

        set_tf32(spec.get("tf32", False))
        sync = xp.cuda.get_current_stream().synchronize
    else:
        import numpy as xp

        sync = lambda: None  # noqa: E731
    f = gemm_floor(w.products(spec["batch"]), xp, sync)
    return {"workload": w.name, "device": spec["device"], "batch": spec["batch"], "threads": spec["threads"], **f}


def run_profile(spec):
    from .profile import profile_step

    harness.set_threads(spec["threads"])
    return profile_step(spec["workload"], spec["batch"], spec["backend"], spec["seed"],
                        floor_ms=spec.get("floor_ms"))


CHILD_KINDS = {"point": run_point, "floor": run_floor, "profile": run_profile, "group": run_group}


def _child_pythonpath(env):
    """PYTHONPATH for a child: the folder holding this ``npdgm`` first when it is a checkout (the child
    then imports the same npdgm as this process, whatever its working directory); an installed npdgm
    is found through site-packages as usual."""
    import site

    parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sites = {os.path.realpath(d) for d in site.getsitepackages() + [site.getusersitepackages()]}
    if os.path.realpath(parent) in sites:
        return env.get("PYTHONPATH", "")
    return parent + os.pathsep + env.get("PYTHONPATH", "")


def _call(spec, isolate):
    """Run ``spec`` in a fresh interpreter (isolate) or here; returns its result dict."""
    if not isolate:
        return CHILD_KINDS[spec["kind"]](spec)
    env = dict(os.environ)
    for k in harness.THREAD_ENV + ("NPDGM_NUM_THREADS",):
        env[k] = str(spec["threads"])
    env["PYTHONPATH"] = _child_pythonpath(env)
    proc = subprocess.run([sys.executable, "-m", "npdgm.bench.run", "--child", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark point {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the plan -----------------------------------------------------------------------------------
def _availability(backends):
    """(torch_ok, torch_cuda_ok, cupy_ok, notes)"""
    notes = []
    torch_ok = torch_cuda = cupy_ok = False
    if "torch" in backends:
        try:
            import torch

            torch_ok = True
            torch_cuda = bool(torch.cuda.is_available())
        except ImportError:
            notes.append("torch: not installed; the PyTorch peer is skipped (its CPU build: pip install torch "
                         "--index-url https://download.pytorch.org/whl/cpu)")
    if "cupy" in backends:
        from npdgm.backend import cupy_available

        cupy_ok = cupy_available()
        if not cupy_ok:
            notes.append("cupy: CuPy with a visible GPU is not available; GPU rows are skipped")
    return torch_ok, torch_cuda, cupy_ok, notes


def plan(args):
    """[(spec, ...)] points to run, the floors to measure and the skip notes."""
    from .workloads import get_workload

    workloads = [get_workload(n.strip()) for n in args.workloads.split(",") if n.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise ValueError(f"unknown backend {b!r}; expected some of {BACKENDS}")
    torch_ok, torch_cuda, cupy_ok, notes = _availability(backends)
    run_backends = []
    if "numpy" in backends:
        run_backends.append(("npdgm-numpy", "cpu"))
    if "numpy-fused" in backends:
        from npdgm.accel import engine_available

        if engine_available("numba") or engine_available("numexpr"):
            run_backends.append(("npdgm-numpy-fused", "cpu"))
        else:
            notes.append("numpy-fused: neither numba nor numexpr is installed; the fused CPU row is skipped")
    if torch_ok:
        run_backends.append(("torch-eager", "cpu"))
    if cupy_ok:
        run_backends.append(("npdgm-cupy", "gpu"))
    if torch_ok and "cupy" in backends:
        if torch_cuda:
            run_backends.append(("torch-eager-cuda", "gpu"))
            if not args.no_compile:
                run_backends.append(("torch-compile", "gpu"))
        else:
            notes.append("torch: no CUDA device visible to torch; GPU PyTorch rows are skipped")
    repeats = args.repeats or (3 if args.sweep else 5)
    target_s = 0.3 if args.sweep else 0.5
    points, floors = [], []
    for w in workloads:
        batches = [int(b) for b in args.sweep_batches.split(",")] if args.sweep else [args.batch or w.batch]
        for batch in batches:
            for backend, device in run_backends:
                points.append({"kind": "point", "workload": w.name, "backend": backend, "batch": batch,
                               "threads": args.threads, "seed": args.seed, "warmup": args.warmup,
                               "repeats": repeats, "steps": args.steps, "target_s": target_s,
                               "cuda_graph": args.cuda_graph, "tf32": args.tf32, "torch_adam": args.torch_adam})
            if not args.no_floor:
                for device in sorted({d for _, d in run_backends}):
                    floors.append({"kind": "floor", "workload": w.name, "device": device, "batch": batch,
                                   "threads": args.threads, "tf32": args.tf32})
    return points, floors, notes


def attach_ratios(rows, floors):
    """Fill floor_ms, x_floor (ms / floor on the row's device) and x_torch (ms / torch eager, same device)."""
    fl = {(f["workload"], f["device"], f["batch"]): f["floor_ms"] for f in floors}
    eager = {}
    for r in rows:
        if r["backend"] in ("torch-eager", "torch-eager-cuda"):
            eager[(r["workload"], r["device"] == "cpu", r["batch"])] = r["ms_per_step"]
    for r in rows:
        dev = "cpu" if r["device"] == "cpu" else "gpu"
        f = fl.get((r["workload"], dev, r["batch"]))
        if f:
            r["floor_ms"] = round(f, 4)
            r["x_floor"] = round(r["ms_per_step"] / f, 3)
        t = eager.get((r["workload"], r["device"] == "cpu", r["batch"]))
        if t:
            r["x_torch"] = round(r["ms_per_step"] / t, 3)
    return rows


def _fmt(v, nd=2):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(rows):
    """The results as a markdown table; with ``--interleave`` two more columns, the paired ratios
    (the median of block / floor block and block / torch block, :func:`pool_paired`)."""
    paired = any("x_floor_paired" in r for r in rows)
    head = ["workload", "backend", "impl", "device", "threads", "batch", "ms/step", "samples/s", "floor ms",
            "x floor", "x torch"] + (["paired x floor", "paired x torch"] if paired else []) + [
            "peak RSS MB", "step alloc MB", "GPU peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        vals = [r["workload"], r["backend"], r["impl"], r["device"], r["threads"], r["batch"],
                _fmt(r["ms_per_step"], 3), _fmt(r["samples_per_s"], 0), _fmt(r["floor_ms"], 3),
                _fmt(r["x_floor"]), _fmt(r["x_torch"])]
        if paired:
            vals += [_fmt(r.get("x_floor_paired")), _fmt(r.get("x_torch_paired"))]
        vals += [_fmt(r["peak_rss_mb"], 0), _fmt(r.get("step_alloc_mb")), _fmt(r["gpu_peak_mb"], 0)]
        lines.append("| " + " | ".join(map(str, vals)) + " |")
    return "\n".join(lines)


def profile_table(profiles):
    if not profiles:
        return ""
    head = ["workload", "backend", "batch", "step ms", "GEMM floor", "linear layers", "elementwise + rest",
            "optimizer", "zero_grad"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in profiles:
        pct = lambda k: f"{p[k]:.2f} ({100 * p[k] / p['step_ms']:.0f}%)" if p.get(k) is not None else "-"  # noqa
        lines.append("| " + " | ".join([p["workload"], p["backend"], str(p["batch"]), f"{p['step_ms']:.2f}",
                                        pct("gemm_floor_ms"), pct("linear_ms"), pct("elementwise_ms"),
                                        pct("optimizer_ms"), pct("zero_grad_ms")]) + " |")
    return "\n".join(lines)


def plot_sweep(rows, path):
    from npdgm.plots import pyplot

    plt = pyplot()
    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.5 * len(workloads), 7), squeeze=False)
    for j, w in enumerate(workloads):
        for backend in sorted({r["backend"] for r in rows if r["workload"] == w}):
            pts = sorted((r["batch"], r["ms_per_step"], r["samples_per_s"]) for r in rows
                         if r["workload"] == w and r["backend"] == backend)
            b = [p[0] for p in pts]
            axes[0][j].plot(b, [p[1] for p in pts], "o-", label=backend)
            axes[1][j].plot(b, [p[2] for p in pts], "o-", label=backend)
        fl = sorted({(r["batch"], r["floor_ms"]) for r in rows if r["workload"] == w and r["device"] == "cpu"
                     and r["floor_ms"]})
        if fl:
            axes[0][j].plot([f[0] for f in fl], [f[1] for f in fl], "k--", label="GEMM floor (cpu)")
        axes[0][j].set_title(w)
        for i, ylab in enumerate(("ms / step", "samples / s")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch")
            ax.set_ylabel(ylab)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _interleave(points, floors, isolate, rows, floor_rows):
    """Run the CPU points as round-robin groups; returns the (GPU) points and floors left to run."""
    groups, rest = {}, []
    for p in points:
        if p["backend"] in ("npdgm-numpy", "npdgm-numpy-fused", "torch-eager"):
            groups.setdefault((p["workload"], p["batch"]), []).append(p)
        else:
            rest.append(p)
    for (w, batch), ps in groups.items():
        spec = dict(ps[0], kind="group", backends=[p["backend"] for p in ps])
        res = _call(spec, isolate)
        rows.extend(res["rows"])
        floor_rows.append(res["floor"])
        for r in res["rows"]:
            print(f"{r['workload']:10s} {r['backend']:17s} batch {r['batch']:5d}: {r['ms_per_step']:.3f} ms/step "
                  f"[{r['ms_min']:.3f}..{r['ms_max']:.3f}]  (floor {res['floor']['floor_ms']:.3f})", file=sys.stderr)
    return rest, [f for f in floors if f["device"] != "cpu"]


def _run_plan(points, floors, interleave, isolate, rows, floor_rows):
    if interleave:
        points, floors = _interleave(points, floors, isolate, rows, floor_rows)
    for spec in floors:
        f = _call(spec, isolate)
        floor_rows.append(f)
        print(f"floor {f['workload']:10s} {f['device']} batch {f['batch']:5d}: {f['floor_ms']:.3f} ms "
              f"({f['gflops']:.1f} GFLOP/s)", file=sys.stderr)
    for spec in points:
        r = _call(spec, isolate)
        rows.append(r)
        print(f"{r['workload']:10s} {r['backend']:17s} batch {r['batch']:5d}: {r['ms_per_step']:.3f} ms/step "
              f"[{r['ms_min']:.3f}..{r['ms_max']:.3f}]", file=sys.stderr)


def pool_paired(rows):
    """``--interleave``: {(workload, backend, batch): {"x_floor": [...], "x_torch": [...]}}, every round's
    block ratios pooled. A block's ratio to the floor (or torch) block timed right after it in the same
    process cancels the machine's drift between blocks, which the ratio of two medians does not."""
    out = {}
    for r in rows:
        for k, v in r.get("paired", {}).items():
            out.setdefault((r["workload"], r["backend"], r["batch"]), {}).setdefault(k, []).extend(v)
    return out


def median_rounds(rows, key, field):
    """One row per ``key``: the round whose ``field`` is the median (the lower middle for an even count),
    with every round's value in ``rounds``. Order of first appearance is kept."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in key), []).append(r)
    out = []
    for rs in groups.values():
        rs = sorted(rs, key=lambda r: r[field])
        pick = dict(rs[(len(rs) - 1) // 2])
        pick["rounds"] = [r[field] for r in rs]
        out.append(pick)
    return out


def main(argv=None, prog="npdgm bench"):
    return run(parse_args(argv, prog))


def run(args):
    """Run the benchmark of parsed ``args``; returns the exit code."""
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(CHILD_KINDS[spec["kind"]](spec)))
        return 0
    if args.distributed:
        from .distributed import main as distributed_main

        return distributed_main(args)
    restore = harness.set_threads(args.threads)
    try:
        return _main(args)
    finally:
        restore()


def _config(args):
    """The benchmark's own options of ``args`` (not the ``npdgm`` CLI's additions) for the JSON file."""
    own = {a.dest for a in add_arguments(argparse.ArgumentParser(add_help=False))._actions} - {"child"}
    return {k: v for k, v in vars(args).items() if k in own}


def _main(args):
    isolate = not args.no_isolate
    points, floors, notes = plan(args)
    forced = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.get(k)}
    if forced:
        notes.append(f"OpenBLAS is forced by {forced}: numbers may not be this CPU's best; for a fair run "
                     f"unset them for this command only (env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE ...)")
    for n in notes:
        print("note:", n, file=sys.stderr)
    t0 = time.time()
    try:
        load0 = round(os.getloadavg()[0], 2)
    except OSError:
        load0 = None
    floor_rows, rows = [], []
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"round {rnd + 1}/{args.rounds}", file=sys.stderr)
        _run_plan(points, floors, args.interleave, isolate, rows, floor_rows)
    paired = pool_paired(rows)
    rows = median_rounds(rows, ("workload", "backend", "batch"), "ms_per_step")
    floor_rows = median_rounds(floor_rows, ("workload", "device", "batch"), "floor_ms")
    attach_ratios(rows, floor_rows)
    for r in rows:
        r.pop("paired", None)
        for k, v in paired.get((r["workload"], r["backend"], r["batch"]), {}).items():
            r[f"{k}_paired"] = round(statistics.median(v), 3)
    profiles = []
    if args.profile:
        for w in sorted({r["workload"] for r in rows}):
            for r in rows:
                if r["workload"] == w and r["backend"].startswith("npdgm") and (
                        args.sweep is False or r["batch"] == rows[0]["batch"]):
                    spec = {"kind": "profile", "workload": w, "batch": r["batch"], "threads": args.threads,
                            "backend": r["backend"][len("npdgm-"):], "seed": args.seed, "floor_ms": r["floor_ms"]}
                    profiles.append(_call(spec, isolate))
    from . import harness as H

    machine = H.machine_info()
    machine["loadavg_1m_start"] = load0
    table = markdown_table(rows)
    ptable = profile_table(profiles)
    print(table)
    if ptable:
        print("\n" + ptable)
    for n in notes:
        print("\nnote: " + n)
    out = {"machine": machine, "config": _config(args),
           "results": rows, "floors": floor_rows, "skipped": notes, "profile": profiles,
           "elapsed_s": round(time.time() - t0, 1)}
    for path in (args.json, args.md, args.plot):  # checked to be writable before the benchmark (check_args)
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(f"Machine: {machine['cpu']}, {machine['cpu_count']} cores, threads={args.threads}; "
                    f"numpy {machine['numpy']}, torch {machine.get('torch')}; load average "
                    f"{machine.get('loadavg_1m_start')} -> {machine.get('loadavg_1m')}\n\n{table}\n")
            if ptable:
                f.write("\n" + ptable + "\n")
            for n in notes:
                f.write(f"\nnote: {n}\n")
    if args.plot:
        plot_sweep(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m npdgm.bench.run"))
