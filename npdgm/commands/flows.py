"""``npdgm train nice``, ``npdgm train realnvp``, ``npdgm train flow2d``, ``npdgm flow-sample RUNDIR``.

    npdgm train flow2d --dataset moons                    # 8 affine couplings, 3000 steps of 512
    npdgm train nice --data mnist --epochs 3
    npdgm train realnvp --dataset mnist --epochs 5        # MLP affine couplings, checkerboard masks
    npdgm train realnvp --dataset spirals                 # the same family on a 2-D toy
    npdgm train nice --resume runs/nice-... --epochs 6    # continue bit-for-bit
    npdgm flow-sample runs/nice-... --temperatures 0.5 0.8 1.0

A run directory gets checkpoint.npz, metrics.jsonl (train_loss = mean NLL in nats per example over
the epoch's batches; test_nll, test_ll = -test_nll, and for images train_bpd/test_bpd), summary.json
and the figures. Images are uniformly dequantized with fresh noise every batch (the test set once,
with a fixed seed), so the NLL is that of a density on [0, 1]^784 and
bits/dim = (NLL / 784 + log 256) / log 2.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .. import backend
from . import common
from .common import add_train_args, default_out, nonneg_int, positive_float, positive_int, setup_backend

TOY_DATASETS = ("moons", "circles", "8gaussians", "checkerboard", "spirals")


def _model_group(p):
    return p.add_argument_group("model")


def _data_args(p, image=True, toy=True):
    d = p.add_argument_group("data and evaluation")
    if image:
        d.add_argument("--data", default=None, metavar="DIR",
                       help="directory with the MNIST IDX files (default $NPDGM_DATA, else the bundled subset)")
        d.add_argument("--train-limit", type=positive_int, default=None, help="use the first N training images")
        d.add_argument("--test-limit", type=positive_int, default=None, help="use the first N test images")
    if toy:
        d.add_argument("--n-train", type=positive_int, default=51200, help="2-D: training points, drawn once (default 51200)")
        d.add_argument("--n-test", type=positive_int, default=10000, help="2-D: test points (default 10000)")
        d.add_argument("--steps", type=positive_int, default=None,
                       help="2-D: optimizer steps; sets --epochs to ceil(steps / batches per epoch)")


def register(commands, train_commands):
    # npdgm train nice
    p = train_commands.add_parser(
        "nice", help="NICE (additive couplings) on MNIST",
        description="NICE on dequantized MNIST: additive couplings (MLP D/2 -> hidden x n-hidden -> D/2, ReLU), "
                    "half split alternating, diagonal scaling, logistic prior. Loss = mean NLL (nats/image).")
    g = _model_group(p)
    g.add_argument("--couplings", type=positive_int, default=4, help="additive coupling layers (default 4)")
    g.add_argument("--hidden", type=positive_int, default=1000, help="units per hidden layer (default 1000)")
    g.add_argument("--n-hidden", type=nonneg_int, default=5, help="hidden layers per coupling network (default 5)")
    g.add_argument("--prior", choices=["logistic", "gaussian"], default="logistic", help="default logistic")
    g.add_argument("--logit", action="store_true", help="logit-transform the pixels first (off in the paper)")
    _data_args(p, image=True, toy=False)
    add_train_args(p, epochs=10, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train, family="nice", epochs=None)

    # npdgm train realnvp
    p = train_commands.add_parser(
        "realnvp", help="RealNVP (affine couplings) on MNIST or a 2-D toy",
        description="Affine couplings y_b = x_b exp(s(x_a)) + t(x_a) with a bounded scale. On MNIST: logit "
                    "transform, ActNorm + coupling (MLP nets, checkerboard masks alternating). On 2-D toys: "
                    "the flow2d model.")
    p.add_argument("--dataset", choices=("mnist",) + TOY_DATASETS, default="mnist", help="default mnist")
    g = _model_group(p)
    g.add_argument("--couplings", type=positive_int, default=None, help="coupling layers (default 8)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=None, metavar="H",
                   help="coupling MLP hidden sizes (default 512 512 on MNIST, 256 256 in 2-D)")
    g.add_argument("--mask", choices=["checkerboard", "half", "alternate"], default="checkerboard",
                   help="MNIST mask, alternating parity between couplings (default checkerboard)")
    g.add_argument("--scale", choices=["tanh", "atan", "none"], default="tanh",
                   help="bound on the log-scale s (default tanh: s = b tanh(raw / b))")
    g.add_argument("--scale-bound", type=positive_float, default=None, help="b (default 2 on MNIST, 1 in 2-D)")
    g.add_argument("--no-actnorm", action="store_true", help="MNIST: no ActNorm before each coupling")
    g.add_argument("--actnorm", action="store_true", help="2-D: ActNorm before each coupling")
    g.add_argument("--alpha", type=positive_float, default=0.05, help="logit transform alpha (default 0.05)")
    _data_args(p, image=True, toy=True)
    add_train_args(p, epochs=10, batch_size=None, lr=1e-3)
    p.set_defaults(func=cmd_train, family="realnvp", epochs=None, batch_size=None)

    # npdgm train flow2d
    p = train_commands.add_parser(
        "flow2d", help="RealNVP-style flow on a 2-D toy density",
        description="Affine couplings on R^2 (coupling i conditions on coordinate i % 2; s/t MLP 1 -> hidden -> 2, "
                    "bounded scale), standard Gaussian prior, trained on points drawn once from a seeded toy set.")
    p.add_argument("--dataset", choices=TOY_DATASETS, default="moons", help="default moons")
    g = _model_group(p)
    g.add_argument("--couplings", type=positive_int, default=8, help="affine coupling layers (default 8)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 256], metavar="H", help="default 256 256")
    g.add_argument("--scale", choices=["tanh", "atan", "none"], default="tanh", help="default tanh")
    g.add_argument("--scale-bound", type=positive_float, default=1.0, help="default 1 (s = tanh(raw))")
    g.add_argument("--actnorm", action="store_true", help="ActNorm before each coupling")
    _data_args(p, image=False, toy=True)
    add_train_args(p, epochs=None, batch_size=512, lr=1e-3)
    p.set_defaults(func=cmd_train, family="flow2d", epochs=None, steps=3000)

    s = commands.add_parser("flow-sample", help="samples from a trained flow run (nice / realnvp / flow2d)")
    s.add_argument("rundir", metavar="RUNDIR", help="run directory or checkpoint .npz")
    s.add_argument("--n", type=positive_int, default=None, help="images per temperature (default 12) or 2-D points "
                                                       "(default 5000)")
    s.add_argument("--temperatures", type=positive_float, nargs="+", default=[0.5, 0.7, 0.85, 1.0], metavar="T",
                   help="prior temperatures (default 0.5 0.7 0.85 1.0; 2-D uses the last)")
    s.add_argument("--seed", type=nonneg_int, default=0)
    s.add_argument("--out", default=None, help="PNG path (default RUNDIR/flow-samples-seed<S>.png)")
    s.add_argument("--npy", default=None, help="also save the samples (T = last temperature) as .npy")
    s.add_argument("--backend", choices=backend.BACKENDS, default=None)
    s.set_defaults(func=cmd_sample)


# -- helpers --------------------------------------------------------------------------------------
def _is_image(run):
    return run["family"] == "nice" or (run["family"] == "realnvp" and run.get("dataset") == "mnist")


def _run_from_args(args):
    """The JSON-able options that rebuild the model and the data (stored in the checkpoint)."""
    fam = args.family
    run = {"family": fam, "lr": args.lr, "clip": args.clip, "seed": args.seed, "dtype": args.dtype}
    if fam == "nice":
        run.update(dataset="mnist", couplings=args.couplings, hidden=args.hidden, n_hidden=args.n_hidden,
                   prior=args.prior, logit=args.logit, batch_size=args.batch_size)
    elif fam == "realnvp" and args.dataset == "mnist":
        run.update(dataset="mnist", couplings=args.couplings or 8, hidden=args.hidden or [512, 512], mask=args.mask,
                   scale=args.scale, scale_bound=2.0 if args.scale_bound is None else args.scale_bound,
                   actnorm=not args.no_actnorm, alpha=args.alpha, batch_size=args.batch_size or 64)
    else:  # flow2d, or realnvp on a toy set
        run.update(family="flow2d", dataset=args.dataset, couplings=args.couplings or 8,
                   hidden=args.hidden or [256, 256], scale=args.scale,
                   scale_bound=1.0 if args.scale_bound is None else args.scale_bound, actnorm=args.actnorm,
                   batch_size=args.batch_size or 512, n_train=args.n_train, n_test=args.n_test)
    if _is_image(run):
        run.update(data=args.data, train_limit=args.train_limit, test_limit=args.test_limit)
    return run


def build_model(run):
    from ..models import flows

    seed = run["seed"]
    if run["family"] == "nice":
        return flows.nice(784, run["couplings"], run["hidden"], run["n_hidden"], prior=run["prior"],
                          logit=run["logit"], seed=seed)
    if run["family"] == "realnvp":
        return flows.realnvp(784, run["couplings"], run["hidden"], mask=run["mask"], image_shape=(28, 28),
                             scale=run["scale"], scale_bound=run["scale_bound"], actnorm=run["actnorm"],
                             alpha=run["alpha"], seed=seed)
    return flows.realnvp2d(run["couplings"], run["hidden"], scale=run["scale"], scale_bound=run["scale_bound"],
                           actnorm=run["actnorm"], seed=seed)


def load_data(run):
    """(train, test) host arrays: MNIST pixels in [0, 1] (test dequantized once, seeded) or 2-D points."""
    from ..data import check_unit_interval, dequantize, load_mnist, make_toy2d

    seed = run["seed"]
    if _is_image(run):
        x_tr, _ = load_mnist("train", run["data"], limit=run["train_limit"])
        x_te, _ = load_mnist("test", run["data"], limit=run["test_limit"])
        check_unit_interval("training images", x_tr)
        x_te = dequantize(x_te, np.random.default_rng([seed, 5]))
        return x_tr, x_te
    for k in ("n_train", "n_test"):
        if run[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {run[k]}")
    return (make_toy2d(run["dataset"], run["n_train"], np.random.default_rng([seed, 11])),
            make_toy2d(run["dataset"], run["n_test"], np.random.default_rng([seed, 12])))


def init_actnorm(flow, train_x, image, seed, n=1000):
    """Data-dependent ActNorm init on the first ``n`` training examples (dequantized with their own seeded
    noise, so the training RNG stream and hence resume are unaffected) instead of the first minibatch:
    per-pixel statistics of 64 images are too noisy for MNIST's nearly constant border pixels."""
    from ..models.flows import ActNorm

    if not any(isinstance(layer, ActNorm) and not layer.initialized for layer in flow.layers):
        return
    x = train_x[:n]
    if image:
        from ..data import dequantize

        x = dequantize(x, np.random.default_rng([seed, 9]))
    flow.log_prob(x)


def evaluate(flow, x_test, image):
    """Test metrics: mean NLL (nats), log-likelihood, and bits/dim for images."""
    from ..models.flows import bits_per_dim

    nll = flow.nll(x_test, batch_size=1000)
    out = {"nll": nll, "ll": -nll}
    if image:
        out["bpd"] = bits_per_dim(nll, flow.dim)
    return out


# -- npdgm train nice | realnvp | flow2d ----------------------------------------------------------
def cmd_train(args):
    from .. import optim, train

    setup_backend(args)
    if not args.resume:
        run0 = _run_from_args(args)
        args.out = args.out or default_out(run0["family"] + ("" if _is_image(run0) else "-" + run0["dataset"]))
    families = ("realnvp", "flow2d") if args.family == "realnvp" else (args.family,)
    r = common.resume_or_new(args, "flow", lambda a: run0, None, build_model, families=families)
    if r is None:
        return 0
    model, run, out = r
    image = _is_image(run)
    x_tr, x_te = load_data(run)
    if run.get("epochs") is None:
        steps = getattr(args, "steps", None)
        nb = math.ceil(len(x_tr) / run["batch_size"])
        run["epochs"] = max(1, math.ceil(steps / nb)) if steps is not None and not image else 10
    dtype = model.flat_params.dtype
    train_x = backend.to_device(x_tr, dtype)
    test_x = backend.to_device(x_te, dtype)

    opt = optim.Adam(model, lr=run["lr"])
    if args.resume:
        rng, start = train.restore_checkpoint(out, opt)
    else:
        rng, start = np.random.default_rng(run["seed"]), 0
        init_actnorm(model, train_x, image, run["seed"])
    print(f"{run['family']} on {run['dataset']}: {model!r}  train {len(train_x)}  test {len(test_x)}  "
          f"{math.ceil(len(train_x) / run['batch_size'])} steps/epoch  backend {backend.get_backend()} {dtype}  "
          f"-> {out}", flush=True)

    D, log256, ln2 = model.dim, math.log(256), math.log(2)
    if image:
        from ..data import dequantize

        def step(xb, rng):
            loss = model.loss_and_grad(dequantize(xb, rng), zero_grad=False)  # fit zeroed them
            return {"loss": loss, "bpd": (loss / D + log256) / ln2}
    else:
        def step(xb, rng):
            return {"loss": model.loss_and_grad(xb, zero_grad=False)}

    train.fit(model, opt, train_x, epochs=run["epochs"], batch_size=run["batch_size"], out=out, rng=rng, step=step,
              evaluate=lambda e: evaluate(model, test_x, image), start_epoch=start, run_meta={"args": run},
              progress=not args.no_progress, clip=run["clip"])
    records = train.read_metrics(out)
    summary = {"family": run["family"], "dataset": run["dataset"], "epochs": run["epochs"],
               "steps": records[-1]["step"] if records else 0, "test_n": len(x_te),
               "parameters": model.num_parameters()}
    if records:
        summary.update({k: records[-1][k] for k in ("test_nll", "test_ll", "test_bpd") if k in records[-1]})
    common.write_summary(out, summary)
    msg = f"test NLL {summary.get('test_nll', float('nan')):.4f} nats"
    if "test_bpd" in summary:
        msg += f"  ({summary['test_bpd']:.4f} bits/dim; log-likelihood {summary['test_ll']:.2f} nats)"
    print(msg, flush=True)

    if not args.no_plots:
        from ..plots import flows as P

        if image:
            P.sample_grids(model, os.path.join(out, "samples.png"), seed=run["seed"])
            P.bpd_curves(records, os.path.join(out, "curves.png"), title=f"{run['family']} on MNIST")
        else:
            P.flow2d_panels(model, x_te, os.path.join(out, "density.png"),
                            title=f"{run['dataset']}: test NLL {summary.get('test_nll', float('nan')):.3f} nats",
                            seed=run["seed"])
            P.nll_curves(records, os.path.join(out, "curves.png"), title=f"flow2d on {run['dataset']}")
        print(f"figures in {out}", flush=True)
    return 0


# -- npdgm flow-sample ----------------------------------------------------------------------------
def cmd_sample(args):
    from ..io import load_arrays, model_from_arrays

    setup_backend(args)
    for opt in ("out", "npy"):
        if getattr(args, opt):
            common.check_out_file(getattr(args, opt), "--" + opt)
    arrays, meta = load_arrays(args.rundir)
    if meta.get("kind") != "flow":
        raise ValueError(f"{args.rundir} holds a {meta.get('kind')!r} model; flow-sample handles flow runs")
    model = model_from_arrays(arrays, meta, os.fspath(args.rundir))
    rundir = args.rundir if os.path.isdir(args.rundir) else os.path.dirname(os.path.abspath(args.rundir))
    out = args.out or os.path.join(rundir, f"flow-samples-seed{args.seed}.png")
    from ..plots import flows as P

    if model.dim == 784:
        P.sample_grids(model, out, temperatures=args.temperatures, n_per_row=args.n or 12, seed=args.seed)
        n = args.n or 12
    else:
        run = meta.get("run", {}).get("args", {})
        n = args.n or 5000
        data = (load_data(run)[1] if run.get("dataset") in TOY_DATASETS
                else backend.to_host(model.sample(n, rng=args.seed + 1)))
        P.flow2d_panels(model, data, out, n_samples=n, seed=args.seed, temperature=args.temperatures[-1])
    if args.npy:
        np.save(args.npy, backend.to_host(model.sample(n, temperature=args.temperatures[-1], rng=args.seed)))
    print(out)
    return 0
