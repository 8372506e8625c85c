"""``npdgm bench --distributed``: data-parallel step time against the number of ranks, and the all-reduce's share.

    npdgm bench --distributed                                  # vae, nice, realnvp2d: 1 rank x 2 threads vs 2 x 1
    npdgm bench --distributed --workloads nice --batch 200 --ranks 1,2 --json dist.json
    npdgm bench --distributed --backends cupy --ranks 1        # NCCL through CuPy, one GPU per rank

For every workload of the benchmark (:mod:`npdgm.bench.workloads`: the same models, batches and Adam) and
every rank count R in ``--ranks``, this command launches ``mpiexec -n R`` (the mpich wheel's, beside this
Python, else the one on PATH) with ``--threads / R`` BLAS threads per rank (at least 1), so every row uses
the same cores; ``--rounds K`` repeats the rank counts K times, alternating, and keeps each one's median
round (a drift of the machine's load then hits every rank count alike). Each rank builds the same model,
takes its rows of every global batch of B examples (:func:`npdgm.distributed.shard_bounds`; the noise is
drawn for the whole batch and sliced), computes its gradient, scales it by N n_r / B and all-reduces it
(:class:`npdgm.distributed.MPIComm`), then steps Adam, exactly as ``npdgm.train.fit`` does. One rank
(numpy) is the plain single-process step, with no communicator. A row reports rank 0's median ms per
step over ``--repeats`` timed blocks, samples/s, the time per step spent in the gradient all-reduce
(``allreduce_ms``: it includes waiting for the slower rank), the all-reduce of the same buffer timed alone
after a barrier (``allreduce_only_ms``), and the speedup over the one-rank row. As in ``train.fit``, the
ranks of one node keep their gradient buffers, and one copy of the parameters and Adam's state, in MPI
shared memory and each steps its 1/N of the parameters (:meth:`npdgm.distributed.MPIComm.share`; the
row's comm is then ``mpi-shm-sharded``; ``optimizer_ms`` is that step with its barrier). In the
environment, ``NPDGM_DIST_SHM=grads`` shares the gradients only (comm ``mpi-shm``: every rank runs the
whole Adam step) and ``NPDGM_DIST_SHM=0`` times MPICH's ``Iallreduce`` (comm ``mpi``). With ``--backends cupy`` the
all-reduce is NCCL's (every R, also 1).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np


def mpiexec():
    """The mpiexec beside this Python (the mpich wheel in a venv that is not activated), else on PATH."""
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.access(beside, os.X_OK) else shutil.which("mpiexec")


def _batch_axis(workload, batch):
    """The axis of the workload's noise that runs over the batch (None without noise)."""
    a, b = workload.noise_shape(batch), workload.noise_shape(batch + 1)
    return None if a is None else next(i for i, (p, q) in enumerate(zip(a, b)) if p != q)


def run_child(spec):
    """One (workload, ranks) point on this rank; rank 0 returns the row (others None)."""
    from npdgm import distributed

    from . import harness
    from .workloads import NpdgmRunner, get_workload

    harness.set_threads(spec["threads"])
    w = get_workload(spec["workload"])
    batch, cupy = spec["batch"], spec["backend"] == "cupy"
    comm = distributed.detect(force=True, gpu=cupy) if spec["comm"] else distributed.Single()
    r = NpdgmRunner(w, batch, spec["backend"], spec["seed"])   # after detect: NCCL chose this rank's GPU
    step, ar, shared = r.step, [0.0, 0.0], ""  # seconds in the all-reduce, in the optimizer step
    if spec["comm"]:
        model, opt, axis = r.model, r.opt, _batch_axis(w, batch)
        lo, hi = distributed.shard_bounds(batch, comm.rank, comm.size)
        scale = (hi - lo) / batch * comm.size
        if axis is not None:  # this rank's rows of the whole batch's noise
            rows = tuple(slice(lo, hi) if i == axis else slice(None) for i in range(len(r.noise_shape)))
        comm.check_same(model.flat_params, "initial parameters")
        shared = comm.share(model, opt)  # as train.fit: gradients, parameters, Adam state in node shared memory

        def step():  # the step of npdgm.train.fit on N ranks, the all-reduce timed
            from npdgm import backend as B

            x = r.batches[r.i % len(r.batches)][lo:hi]
            r.i += 1
            eps = None
            if r.noise_shape is not None:
                eps = B.to_device(r.noise_rng.standard_normal(r.noise_shape, dtype=np.float32))[rows]
            r._loss = r._loss_and_grad(model, x, eps)
            if scale != 1.0:
                model.flat_grads *= scale
            if cupy:
                r.sync()
            t = time.perf_counter()
            comm.allreduce_mean_(model.flat_grads)
            if cupy:
                r.sync()
            t1 = time.perf_counter()
            ar[0] += t1 - t
            opt.step()
            if cupy:
                r.sync()
            ar[1] += time.perf_counter() - t1
    for _ in range(spec["warmup"]):
        step()
    r.sync()
    t0 = time.perf_counter()
    step()
    r.sync()
    est = time.perf_counter() - t0
    steps = spec["steps"] or comm.bcast(max(1, min(200, int(round(spec["target_s"] / max(est, 1e-6))))))
    ar[:], n0 = [0.0, 0.0], r.i
    t = harness.time_steps(step, r.sync, warmup=1, repeats=spec["repeats"], steps=steps)
    ar_ms, opt_ms = (a / max(1, r.i - n0) * 1e3 for a in ar)
    only = None
    if spec["comm"]:
        buf = r.model.flat_grads  # the buffer itself: a shared one goes through its window (a copy would not)
        comm.barrier()
        r.sync()
        t0 = time.perf_counter()
        for _ in range(10):
            comm.allreduce_mean_(buf)
        r.sync()
        only = (time.perf_counter() - t0) / 10 * 1e3
    if comm.rank:
        return None
    ms = t["ms_per_step"]
    name = comm.name + {"": "", "grads": "-shm", "grads+step": "-shm-sharded"}[shared] if spec["comm"] else "none"
    return {"workload": spec["workload"], "backend": spec["backend"], "comm": name,
            "ranks": comm.size, "threads_per_rank": spec["threads"], "batch": batch, "ms_per_step": round(ms, 3),
            "ms_min": round(t["ms_min"], 3), "ms_max": round(t["ms_max"], 3),
            "samples_per_s": round(batch / ms * 1e3, 1), "allreduce_ms": round(ar_ms, 3) if spec["comm"] else None,
            "optimizer_ms": round(opt_ms, 3) if spec["comm"] else None,
            "allreduce_only_ms": None if only is None else round(only, 3),
            "grad_mb": round(r.model.flat_grads.nbytes / 2 ** 20, 2), "params": int(r.model.flat_params.size),
            "loss": r.loss(), "steps_per_block": t["steps_per_block"], "repeats": t["repeats"],
            "blocks_ms": t["blocks_ms"]}


def _launch(spec):
    """Run one point in fresh processes (``mpiexec -n ranks`` when it needs a communicator)."""
    import npdgm

    from . import harness

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "HYDRA_"))}
    for k in harness.THREAD_ENV + ("NPDGM_NUM_THREADS",):
        env[k] = str(spec["threads"])
    root = os.path.dirname(os.path.dirname(os.path.abspath(npdgm.__file__)))  # the children import this npdgm
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "npdgm.bench.distributed", json.dumps(spec)]
    if spec["comm"]:
        cmd = [mpiexec(), "-n", str(spec["ranks"])] + cmd
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=spec.get("timeout", 1800))
    if p.returncode != 0:
        raise RuntimeError(f"distributed benchmark point {spec['workload']} x {spec['ranks']} ranks failed "
                           f"(exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads([line for line in p.stdout.splitlines() if line.startswith("{")][-1])


def markdown_table(rows):
    head = ("workload", "batch", "ranks x threads", "comm", "ms/step", "samples/s", "allreduce ms/step",
            "allreduce alone ms", "grad MB", "speedup")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    f = lambda v: "" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)
    for r in rows:
        out.append("| " + " | ".join(f(v) for v in (
            r["workload"], r["batch"], f"{r['ranks']} x {r['threads_per_rank']}", r["comm"], r["ms_per_step"],
            r["samples_per_s"], r["allreduce_ms"], r["allreduce_only_ms"], r["grad_mb"], r.get("speedup"))) + " |")
    return "\n".join(out)


def main(args):
    """``npdgm bench --distributed`` on the parsed bench options ``args``; returns the exit code."""
    from .workloads import get_workload

    ranks = [int(n) for n in str(args.ranks).split(",") if n.strip()]
    if not ranks or min(ranks) < 1:
        raise ValueError(f"--ranks must list rank counts >= 1, got {args.ranks!r}")
    backend = args.backends.split(",")[0]
    if backend not in ("numpy", "cupy"):
        raise ValueError(f"--distributed times npdgm's numpy or cupy backend, got --backends {args.backends}")
    cupy = backend == "cupy"
    if (max(ranks) > 1 or cupy) and (mpiexec() is None or not _have_mpi4py()):
        raise ValueError("npdgm bench --distributed needs mpi4py and mpiexec (pip install 'npdgm[mpi]')")
    load = lambda: round(os.getloadavg()[0], 2)
    load0, rows = load(), []
    for name in args.workloads.split(","):
        w = get_workload(name)
        batch = args.batch or w.batch
        runs = {}
        for rnd in range(args.rounds):  # rounds alternate the rank counts: a drift of the load hits them alike
            for n in ranks:
                if batch < n:
                    continue
                spec = {"workload": name, "backend": backend, "batch": batch, "ranks": n, "comm": n > 1 or cupy,
                        "threads": max(1, args.threads // n), "seed": args.seed, "warmup": args.warmup,
                        "repeats": args.repeats or 5, "steps": args.steps, "target_s": 0.5}
                row = _launch(spec)
                runs.setdefault(n, []).append(row)
                print(f"{name:<10} batch {batch:<5} {n} rank(s) x {spec['threads']} thread(s), round {rnd + 1}: "
                      f"{row['ms_per_step']:.2f} ms/step" + ("" if row["allreduce_ms"] is None else
                      f", all-reduce {row['allreduce_ms']:.2f} ms/step (alone {row['allreduce_only_ms']:.2f})"),
                      file=sys.stderr, flush=True)
        base = None
        for n in ranks:
            if n not in runs:
                print(f"note: {name}: batch {batch} < {n} ranks, skipped", file=sys.stderr)
                continue
            row = sorted(runs[n], key=lambda r: r["ms_per_step"])[(len(runs[n]) - 1) // 2]  # the median round
            row["rounds_ms"] = [r["ms_per_step"] for r in runs[n]]
            base = row["ms_per_step"] if n == 1 else base
            row["speedup"] = None if base is None else round(base / row["ms_per_step"], 3)
            rows.append(row)
    result = {"config": {"ranks": ranks, "threads": args.threads, "backend": backend, "workloads": args.workloads,
                         "batch": args.batch}, "load_average": [load0, load()], "results": rows}
    table = markdown_table(rows)
    print(table)
    print(f"load average (1 min) {load0} at the start, {result['load_average'][1]} at the end", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")
    return 0


def _have_mpi4py():
    import importlib.util

    return importlib.util.find_spec("mpi4py") is not None


if __name__ == "__main__":  # a child: one point, on this rank
    out = run_child(json.loads(sys.argv[1]))
    if out is not None:
        print(json.dumps(out), flush=True)
