#!/usr/bin/env bash
# GPU check of npdgm, in one go (< 10 minutes; every step has its own timeout):
#   1. pytest -m gpu                       (the CuPy tests: the fast wing's kernels, fused Adam, CUDA graphs)
#   1b. the NCCL test (mpiexec + NCCL through CuPy, one rank per GPU); -rs says why if it skips
#       (it needs mpi4py and an mpiexec: pip install ".[mpi]" where there is a network)
#   2. every fast-wing twin (npdgm/accel) against its reference on CuPy (each kernel table entry, float32 and
#      float64, and Adam/AdamW); prints one line per kernel, fails loudly on a mismatch
#   3. the three workloads (vae b128, nice b200, realnvp2d b512) on npdgm-cupy, npdgm-cupy + CUDA graph,
#      torch eager and torch.compile (CUDA) through the bench harness, with the GPU GEMM floor
# Writes gpu_check.json and gpu_check.md (and the raw step outputs) into $OUT, or ./gpu-check/.
# Needs CuPy with a visible GPU (torch for the torch rows); no network. Run from anywhere:
#   bash benchmarks/gpu_check.sh
# Exit status: 0 all passed; 1 a mismatch or a failed step; 3 no GPU here (nothing was run).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${OUT:-$PWD/gpu-check}"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" || exit 1
mkdir -p "$DEST"

if ! timeout 60 "$PY" -c 'import sys; from npdgm.backend import cupy_available; sys.exit(0 if cupy_available() else 1)'; then
    echo "gpu_check: no GPU: CuPy with a visible CUDA device is needed (python -c 'import cupy' and nvidia-smi" \
         "to see why); nothing was run" >&2
    exit 3
fi

STATUS=0
STEPS="$DEST/steps.tsv"
: > "$STEPS"
step() {  # step NAME TIMEOUT_S CMD...: run with a timeout, log to $DEST/NAME.log, record rc and seconds
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS rc
    echo "== $name (timeout ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" > "$DEST/$name.log" 2>&1
    rc=$?
    tail -n 25 "$DEST/$name.log"
    [ "$rc" -eq 124 ] && echo "gpu_check: step $name TIMED OUT after ${limit}s" >&2
    [ "$rc" -ne 0 ] && { echo "gpu_check: step $name FAILED (exit $rc; log $DEST/$name.log)" >&2; STATUS=1; }
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$STEPS"
    return 0
}

# 1. the GPU tests
step pytest_gpu 100 "$PY" -m pytest -q -m gpu -p no:cacheprovider --ignore=tests/test_distributed.py tests
step nccl 60 "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_distributed.py

# 2. every fast-wing twin (npdgm.accel.enable) against the reference array code (accel off) on CuPy
step fused_compare 60 "$PY" - "$DEST/fused_compare.json" <<'EOF'
import json, sys
import numpy as np
import cupy
from npdgm import accel, optim
from npdgm.accel.optim import CHUNK
from npdgm.kernels import table
from npdgm.nn import Parameter

def flat(out_grads):
    outputs, grads = out_grads
    return {**{f"out.{k}": v for k, v in outputs.items()}, **{f"grad.{k}": v for k, v in grads.items()}}

def worst(fast, plain, tol):
    """max |fast - plain| / (tol * (|plain| + max |plain|)): <= 1 passes."""
    scale = np.abs(plain) + np.abs(plain).max() + 1e-300
    return float((np.abs(fast - plain) / (tol * scale)).max())

rows = []
for dtype, tol in ((np.float32, 32 * np.finfo(np.float32).eps), (np.float64, 64 * np.finfo(np.float64).eps)):
    for e in table.TABLE:
        inputs = {k: cupy.asarray(v) for k, v in e.make(np.random.default_rng(1), dtype).items()}
        accel.disable()
        plain = {k: cupy.asnumpy(v) for k, v in flat(e.run(inputs)).items()}
        accel.enable()
        fast = {k: cupy.asnumpy(v) for k, v in flat(e.run(inputs)).items()}
        w = max(worst(fast[k], plain[k], tol) for k in plain)
        rows.append({"kernel": e.name, "dtype": np.dtype(dtype).name, "worst_over_tol": w, "ok": w <= 1})
    for wd, dec in ((0.0, False), (0.1, False), (0.1, True)):
        rng = np.random.default_rng(2)
        p0 = rng.standard_normal(3 * CHUNK + 7).astype(dtype)
        gs = [rng.standard_normal(p0.size).astype(dtype) for _ in range(4)]
        res = {}
        for mode in ("plain", "fused"):
            accel.enable() if mode == "fused" else accel.disable()
            p = Parameter(cupy.asarray(p0))
            opt = optim.Adam([p], lr=1e-2, weight_decay=wd, decoupled=dec)
            for g in gs:
                p.grad[...] = cupy.asarray(g)
                opt.step()
            res[mode] = cupy.asnumpy(p.data)
        accel.disable()
        w = worst(res["fused"], res["plain"], tol * 4)
        rows.append({"kernel": f"adam(wd={wd}, decoupled={dec})", "dtype": np.dtype(dtype).name,
                     "worst_over_tol": w, "ok": w <= 1})
for r in rows:
    print(f"{'ok      ' if r['ok'] else 'MISMATCH'} {r['kernel']:40s} {r['dtype']:8s} {r['worst_over_tol']:.3g}")
json.dump(rows, open(sys.argv[1], "w"), indent=1)
bad = [r for r in rows if not r["ok"]]
if bad:
    print(f"gpu_check: MISMATCH in {len(bad)} fused kernel(s): " + ", ".join(f"{r['kernel']} [{r['dtype']}]" for r in bad))
    sys.exit(1)
print(f"all {len(rows)} fused kernels match their plain versions")
EOF

# 3. the workloads: npdgm-cupy, torch eager (CPU and CUDA), torch.compile; then npdgm-cupy as a CUDA graph
step bench 200 "$PY" -m npdgm.bench.run --workloads vae,nice,realnvp2d --backends cupy,torch --repeats 3 \
    --json "$DEST/bench.json" --md "$DEST/bench.md"
step bench_graph 60 "$PY" -m npdgm.bench.run --workloads vae,nice,realnvp2d --backends cupy --cuda-graph \
    --repeats 3 --json "$DEST/bench_graph.json" --md "$DEST/bench_graph.md"
# the convolutional workloads (the reference im2col convolution on CuPy: the conv twins of npdgm.accel are
# NumPy-only, so the GPU runs the reference lines) in a step of their own, so a failure there spares the rest
step bench_conv 80 "$PY" -m npdgm.bench.run --workloads convvae,glow --backends cupy,torch --repeats 2 \
    --json "$DEST/bench_conv.json" --md "$DEST/bench_conv.md"

# the report: gpu_check.json + gpu_check.md
"$PY" - "$DEST" "$STATUS" <<'EOF'
import json, os, sys
dest, status = sys.argv[1], int(sys.argv[2])
def load(name):
    p = os.path.join(dest, name)
    return json.load(open(p)) if os.path.exists(p) else None
steps = [dict(zip(("step", "exit", "seconds"), ln.split("\t"))) for ln in open(os.path.join(dest, "steps.tsv")).read().split("\n") if ln]
compare = load("fused_compare.json") or []
rows = []
for name, impl in (("bench.json", None), ("bench_graph.json", "graph"), ("bench_conv.json", None)):
    b = load(name)
    for r in (b or {}).get("results", []):
        if impl and r["backend"] != "npdgm-cupy":
            continue
        rows.append(r)
eager = {(r["workload"], r["batch"]): r["ms_per_step"] for r in rows if r["backend"] == "torch-eager-cuda"}
for r in rows:                          # the CUDA-graph run had no torch row: ratio to the first run's
    if r.get("x_torch") is None and r["device"] != "cpu" and (r["workload"], r["batch"]) in eager:
        r["x_torch"] = round(r["ms_per_step"] / eager[(r["workload"], r["batch"])], 3)
report = {"status": "pass" if status == 0 else "FAIL", "steps": steps, "fused_compare": compare, "bench": rows}
json.dump(report, open(os.path.join(dest, "gpu_check.json"), "w"), indent=1, default=str)
md = [f"# npdgm GPU check: {report['status']}", "", "| step | exit | seconds |", "|---|---|---|"]
md += [f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in steps]
bad = [r for r in compare if not r["ok"]]
md += ["", f"Fused kernels vs plain on CuPy: {len(compare) - len(bad)}/{len(compare)} match"
       + (": MISMATCH " + ", ".join(f"{r['kernel']} [{r['dtype']}]" for r in bad) if bad else "."), ""]
md += ["| workload | backend | impl | batch | ms/step | x GEMM floor | x torch eager (same device) |", "|---|---|---|---|---|---|---|"]
f = lambda v: "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
for r in sorted(rows, key=lambda r: (r["workload"], r["device"] == "cpu", r["backend"], r["impl"])):
    md.append(f"| {r['workload']} | {r['backend']} | {r['impl']} | {r['batch']} | {f(r['ms_per_step'])} | "
              f"{f(r.get('x_floor'))} | {f(r.get('x_torch'))} |")
open(os.path.join(dest, "gpu_check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md))
EOF

if [ "$STATUS" -ne 0 ]; then
    echo "gpu_check: FAILED (see the lines above and $DEST/*.log)" >&2
else
    echo "gpu_check: passed; results in $DEST/gpu_check.json and $DEST/gpu_check.md"
fi
exit "$STATUS"
