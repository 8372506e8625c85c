"""``npdgm evaluate RUN``: log p(x) of a trained VAE by several estimators, and BDMC bounds.

    npdgm evaluate runs/vae --method iwae ais --n-images 100         # mean log p(x) +- standard error
    npdgm evaluate runs/vae --method naive --k 100000 --plot naive.png
    npdgm evaluate runs/vae --method ais --steps 1000 --leapfrog 10 --json ais.json
    npdgm evaluate runs/vae --bdmc --n-images 10                      # simulated data: lower / upper bound
    mpiexec -n 2 npdgm evaluate runs/vae --method iwae ais            # images split over 2 ranks, same numbers

Methods (nats per image, on the first N test images of the run's data, the run's binarization):
elbo (the mean of k one-sample ELBOs), iwae (k importance samples from q(z|x)), naive (k samples from
the prior p(z)), ais (annealed importance sampling p(z) -> p(z|x), ``--chains`` chains per image,
``--steps`` distributions, HMC with ``--leapfrog`` steps). The +- is the standard error of the mean over
images. The estimators are in :mod:`npdgm.inference`; the math is in docs/inference.md.

    npdgm evaluate runs/cvae --method classify --k 100 --n-images 10000   # test error of a classifier

classify (cvae and m2 runs; alone): the test error on the first N test images. A cvae classifies by Bayes'
rule, argmax_y log p(x|y) + log p(y) with uniform p(y) and log p(x|y) the IWAE estimate with --k samples
per class (:meth:`npdgm.CVAE.classify`); an m2 run by its q(y|x) (M1+M2: on the codes of the stored M1 VAE,
refused when that checkpoint is missing or changed); a class-conditional flow run (``npdgm train realnvp | maf
--condition``) by Bayes' rule with its exact log p(x|y) (:meth:`npdgm.models.flows.Flow.classify`, the test images
dequantized once with the run's seed, as its test NLL).
"""
from __future__ import annotations

import os
import time

import numpy as np

from .. import backend
from ..train import progress, stage
from . import common
from .common import nonneg_int, positive_int, setup_backend

METHODS = ("elbo", "iwae", "naive", "ais", "classify")


def register(commands, train_commands):
    e = commands.add_parser(
        "evaluate", help="log p(x) of a VAE run: ELBO, IWAE, naive MC, AIS; --bdmc bounds",
        description="Estimate the mean test log p(x) (nats per image) of the VAE in RUNDIR by each --method, "
                    "or (--bdmc) bound it from both sides on data simulated from the model.")
    e.add_argument("rundir", metavar="RUNDIR",
                   help="run directory or checkpoint .npz (a vae run; cvae or m2 with --method classify)")
    d = common.group(e, "data")
    common.add_data_arg(d, default="the run's data")
    d.add_argument("--n", "--n-images", type=positive_int, default=100, dest="n_images",
                   help="test images (default 100; --n-images is its old name)")
    v = common.group(e, "evaluation")
    v.add_argument("--method", nargs="+", choices=METHODS, default=None,
                   help="estimators to run (default iwae; several allowed); classify, alone: the test error of a "
                        "cvae run (Bayes rule with IWAE log p(x|y), --k per class) or an m2 run (q(y|x))")
    v.add_argument("--bdmc", action="store_true", help="BDMC on --n images simulated from the model: AIS "
                                                       "lower bound and reverse-AIS upper bound")
    v.add_argument("--k", type=positive_int, default=1000, help="importance samples per image for elbo/iwae/naive "
                                                                "(default 1000)")
    v.add_argument("--ais-steps", "--steps", type=positive_int, default=1000, dest="steps",
                   help="ais/bdmc: intermediate distributions (default 1000; --steps is its old name)")
    v.add_argument("--leapfrog", type=positive_int, default=2, help="ais/bdmc: leapfrog steps per HMC "
                                                                    "transition (default 2)")
    v.add_argument("--chains", type=positive_int, default=4, help="ais/bdmc: chains per image (default 4; with "
                   "1000 steps and 2 leapfrog steps a few CPU-minutes per 1000 images, see docs/inference.md)")
    v.add_argument("--batch-size", "--batch", type=positive_int, default=100, dest="batch",
                   help="images per batch (default 100; --batch is its old name)")
    o = common.group(e, "output")
    o.add_argument("--json", default=None, metavar="JSON", help="also write the results as JSON here (default: none)")
    o.add_argument("--png", "--plot", default=None, dest="plot", metavar="PNG",
                   help="naive: a figure of the naive and IWAE estimates against the sample count (1 .. k) "
                        "(default: none; --plot is its old name)")
    r = common.group(e, "run")
    r.add_argument("--seed", type=nonneg_int, default=0, help="seed of all draws (default 0)")
    r.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend (default: $NPDGM_BACKEND or numpy)")
    r.add_argument("--distributed", action="store_true",
                   help="split the images over MPI ranks (default: on when started by mpiexec -n N, N > 1)")
    e.set_defaults(func=cmd_evaluate)


def _estimate(model, x, method, args, rng):
    """Per-image log p(x) estimates (host float64) of ``method`` for the images x, in batches."""
    from .. import inference as I

    out = []
    step = len(x) if method == "naive" else args.batch   # naive MC: one set of prior draws for all images
    for s in range(0, len(x), step):
        xb = x[s:s + step]
        if method == "elbo":
            r = I.elbo_estimate(model, xb, args.k, rng=rng)
        elif method == "iwae":
            r = model.log_likelihood(xb, args.k, rng=rng)
        elif method == "naive":
            r = I.naive_log_px(model, xb, args.k, rng=rng)["est"]
        else:
            r = I.ais(model, xb, args.steps, args.chains, args.leapfrog, rng=rng)["est"]
        out.append(np.asarray(backend.to_host(r), np.float64))
    return np.concatenate(out)


def _setting(method, args):
    if method == "ais":
        return {"steps": args.steps, "leapfrog": args.leapfrog, "chains": args.chains}
    return {"k": args.k}


def _load(args):

    model, meta = common.load_vae(args.rundir)
    run = common.run_args(meta)
    data = args.data or run.get("data")
    x, _ = common.load_image_data(data, "test", args.n_images, run.get("binarize", "none"), run.get("seed", 0))
    if len(x) < args.n_images and common.is_root():
        print(f"note: the test set holds {len(x)} images; --n-images {args.n_images} lowered to {len(x)}")
    return model, x


def _draws(model, x, method, args, comm):
    """Per-image estimates (host float64, all images on every rank) of ``method``: each rank estimates its
    images [lo, hi) (npdgm.distributed.shard_bounds) and the vectors are summed over ranks. The draws do
    not depend on the split: image i's come from its own stream (distributed.ImageStreams, key
    (seed, 16, method)); naive MC's prior draws are shared by all images, one stream with that key."""
    from ..distributed import ImageStreams, shard_bounds

    key = [args.seed, 16, METHODS.index(method)]
    lo, hi = shard_bounds(len(x), comm.rank, comm.size)
    est = np.zeros(len(x))
    if method == "naive":
        if hi > lo:
            est[lo:hi] = _estimate(model, x[lo:hi], method, args, np.random.default_rng(key))
    else:
        for s in range(lo, hi, args.batch):
            e = min(hi, s + args.batch)
            est[s:e] = _estimate(model, x[s:e], method, args, ImageStreams(key, range(s, e)))
    return comm.allreduce_sum(est)


def _run_methods(model, x, args, comm):
    res = {}
    for method in args.method:
        stage(f"{method}: {len(x)} images, {' '.join(f'{k}={v}' for k, v in _setting(method, args).items())}",
              comm.rank == 0)
        t0 = time.perf_counter()
        est = _draws(model, x, method, args, comm)
        r = {"mean": float(est.mean()), "se": float(est.std(ddof=1) / np.sqrt(len(est))) if len(est) > 1 else None,
             "seconds": time.perf_counter() - t0, **_setting(method, args), "per_image": est.tolist()}
        res[method] = r
        if comm.rank:
            continue
        se = "n/a" if r["se"] is None else f"{r['se']:.2f}"
        opts = " ".join(f"{k}={v}" for k, v in _setting(method, args).items())
        print(f"{method:<6} {opts:<32} log p(x) = {r['mean']:9.3f} +- {se} nats/image  ({len(x)} images, "
              f"{r['seconds']:.1f} s)")
    return res


def _run_bdmc(model, args):
    from .. import inference as I

    rng = np.random.default_rng([args.seed, 17])
    t0 = time.perf_counter()
    lo, hi = [], []
    for s in progress(range(0, args.n_images, args.batch), f"bdmc: {args.n_images} simulated images"):
        r = I.bdmc(model, min(args.batch, args.n_images - s), args.steps, args.chains, args.leapfrog, rng=rng)
        lo.append(backend.to_host(r["lower"]))
        hi.append(backend.to_host(r["upper"]))
    lo, hi = np.concatenate(lo).astype(np.float64), np.concatenate(hi).astype(np.float64)
    r = {"lower": float(lo.mean()), "upper": float(hi.mean()), "gap": float((hi - lo).mean()),
         "seconds": time.perf_counter() - t0, "n_images": args.n_images, "steps": args.steps,
         "leapfrog": args.leapfrog, "chains": args.chains}
    print(f"bdmc   steps={args.steps} leapfrog={args.leapfrog} chains={args.chains}  simulated images: "
          f"{args.n_images}  lower {r['lower']:.3f}  upper {r['upper']:.3f}  gap {r['gap']:.3f} nats/image  "
          f"({r['seconds']:.1f} s)")
    return r


def _plot(model, x, args):
    from .. import inference as I
    from ..plots import inference as P

    stage(f"naive-vs-IWAE figure -> {args.plot}")
    counts = sorted({int(c) for c in np.logspace(0, np.log10(args.k), 1 + int(np.log10(args.k)) * 2).round()})
    curve = I.naive_curve(model, x[:min(len(x), args.batch)], counts, repeats=5, rng=args.seed, iwae_max=5000)
    print(P.naive_vs_iwae(curve, args.plot, title=f"{args.rundir}: naive MC vs IWAE"))


def cmd_evaluate(args):
    setup_backend(args)
    comm = common.world()  # N > 1 ranks: the images of --method are split; --bdmc and --plot run on rank 0
    for opt in ("json", "plot"):
        if getattr(args, opt):
            common.check_out_file(getattr(args, opt), "--" + opt)
    if args.bdmc and args.method:
        raise ValueError("give either --method or --bdmc, not both")
    if args.plot and "naive" not in (args.method or ()):
        raise ValueError("--plot draws the naive-MC figure: use it with --method naive")
    args.method = args.method or ([] if args.bdmc else ["iwae"])
    if "classify" in args.method:
        return _classify(args)
    model, x = _load(args)
    result = {"run": os.fspath(args.rundir), "n_images": len(x), "seed": args.seed}
    if args.bdmc:
        if comm.rank:
            return 0
        result["bdmc"] = _run_bdmc(model, args)
    else:
        result["methods"] = _run_methods(model, x, args, comm)
    if comm.rank:
        return 0
    if args.plot:
        _plot(model, x, args)
    if args.json:
        common.write_json(args.json, result)
    return 0


def _classify_flow(args, model, run):
    """--method classify of a class-conditional MNIST flow: argmax_y log p(x|y) + log p(y), uniform p(y)."""
    from ..data import dequantize, load_mnist

    if not run.get("condition") or model.context_dim != 10 or model.dim != 784:
        raise ValueError(f"{args.rundir} holds a flow without classes; --method classify needs a class-conditional "
                         f"MNIST flow (npdgm train realnvp | maf --condition)")
    x, y = load_mnist("test", args.data or run.get("data"), limit=args.n_images)
    x = backend.to_device(dequantize(x, np.random.default_rng([run.get("seed", 0), 5])), model.flat_params.dtype)
    t0 = time.perf_counter()
    pred = model.predict(x, batch_size=args.batch)
    return _classify_report(args, "classify flow", pred, y, t0, "Bayes rule, exact log p(x|y) of the flow")


def _classify_report(args, label, pred, y, t0, rule, setting=None):
    """Print ``label`` with the test error of the predictions ``pred`` against ``y``; --json writes the record
    {"error", "n_images", "seconds", setting..., "rule", "predictions"}."""
    wrong = np.asarray(pred) != np.asarray(y)
    r = {"error": float(wrong.mean()), "n_images": len(y), "seconds": time.perf_counter() - t0, **(setting or {}),
         "rule": rule, "predictions": np.asarray(pred).tolist()}
    print(f"{label} test error = {r['error']:.4f}  ({int(wrong.sum())} of {len(y)} test images, "
          f"{r['seconds']:.1f} s)")
    if args.json:
        common.write_json(args.json, {"run": os.fspath(args.rundir), "n_images": len(y), "seed": args.seed,
                                      "methods": {"classify": r}})
    return 0


def _classify(args):
    """--method classify: the test error of a cvae (Bayes rule, IWAE log p(x|y)) or m2 run (q(y|x))."""
    from ..io import load_arrays
    from ..models.registry import model_from_arrays

    if args.method != ["classify"]:
        raise ValueError("--method classify is for cvae, m2 and class-conditional flow runs: give it alone")
    arrays, meta = load_arrays(args.rundir)
    kind = meta.get("kind")
    if kind not in ("cvae", "m2", "flow"):
        raise ValueError(f"{args.rundir} holds a {kind!r} model; --method classify needs a cvae, m2 or "
                         f"class-conditional flow run")
    run = common.run_args(meta)
    model = model_from_arrays(arrays, meta, os.fspath(args.rundir))
    if kind == "flow":
        return _classify_flow(args, model, run)
    x, y = common.load_image_data(args.data or run.get("data"), "test", args.n_images, run.get("binarize", "none"),
                                  run.get("seed", 0))
    t0 = time.perf_counter()
    if kind == "m2" and run.get("features"):                 # M1+M2: the codes of the stored M1 VAE
        from ..models.m1 import vae_features
        from .m2 import load_features

        vae = load_features(run["features"], run.get("features_sha256"))[0]
        x = vae_features(vae, vae.check_x(x, "test images"))
    if kind == "m2":
        pred = backend.to_host(model.predict(x))
        setting = {}
    else:
        rng = np.random.default_rng([args.seed, 18])
        pred = np.concatenate([model.classify(x[s:s + args.batch], args.k, rng).argmax(axis=1)
                               for s in range(0, len(x), args.batch)])
        setting = {"k": args.k}
    return _classify_report(args, f"classify {kind} {' '.join(f'{k}={v}' for k, v in setting.items()):<8}", pred, y,
                            t0, "q(y|x)" if kind == "m2" else "Bayes rule, IWAE log p(x|y)", setting)
