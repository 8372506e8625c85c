"""``npdgm train nice``, ``npdgm train realnvp``, ``npdgm train maf``, ``npdgm train glow``, ``npdgm train flow2d``
(``npdgm sample RUNDIR``
draws from them).

    npdgm train flow2d --dataset moons                    # 8 affine couplings, 3000 steps of 512
    npdgm train flow2d --flow maf --dataset moons         # 8 MAF layers (MADE), reversed order between them
    npdgm train flow2d --flow spline --dataset moons      # 8 rational-quadratic spline couplings
    npdgm train flow2d --condition --dataset moons        # p(x | class): the two moons' halves as classes
    npdgm train flow2d --condition --dataset rings        # p(x | c): a ring of radius c, c ~ U(0.5, 2.5)
    npdgm train flow2d --target bimodal --objective reverse-kl   # fit an unnormalised density by its own samples
    npdgm train nice --data mnist --epochs 3
    npdgm train realnvp --dataset mnist --epochs 5        # MLP affine couplings, checkerboard masks
    npdgm train realnvp --dataset spirals                 # the same family on a 2-D toy
    npdgm train maf --data mnist --epochs 5               # MAF: logit + 5 x (ActNorm, MADE layer), order reversed
    npdgm train glow --data mnist --epochs 5              # Glow: 2 levels x 4 steps, conv couplings (32 channels)
    npdgm train nice --resume runs/nice-... --epochs 6    # continue bit-for-bit
    npdgm sample runs/nice-... --temperatures 0.5 0.8 1.0 # (flow-sample is its old name)

A run directory gets checkpoint.npz, metrics.jsonl / metrics.csv (train_loss = mean NLL in nats per
example over the epoch's batches; test_nll, test_ll = -test_nll, and for images train_bpd/test_bpd; the
log-likelihood's two terms train_/test_logprior + train_/test_logdet = -nll), summary.json and the figures
(curves.png, terms.png: the total beside its two terms; docs/metrics.md lists every key). Images are uniformly
dequantized with fresh noise every batch (the test set once, with a fixed seed), so the NLL is that of a density on
[0, 1]^784 and bits/dim = (NLL / 784 + log 256) / log 2 (:func:`npdgm.models.flows.bits_per_dim`).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys

import numpy as np

from .. import backend
from . import common
from .common import add_train_args, default_out, positive_float, positive_int, setup_backend

from ..data import RING_RADII, TOY_CLASSES, TOYS
from ..targets import TARGETS

NICE_HIDDEN = [1000] * 5          # NICE's coupling MLP: 5 hidden layers of 1000 (Dinh et al. 2014)
TOY_TRAIN, TOY_TEST = 51200, 10000
# flow2d --flow spline defaults (docs/autoregressive-flows.md, "Why the spline lost"): [-5, 5] (the toy sets reach
# |x| ~ 3.4; a point beyond the bound stays in the identity tail through every layer), every coupling starting as
# the identity (last net layer 0)
SPLINE2D = {"bins": 8, "bound": 5.0, "identity_init": True}
OBJECTIVES = ("forward-kl", "reverse-kl")


def _data_args(p, image=True, toy=True, colour=False):
    d = common.group(p, "data")
    if image:
        common.add_data_arg(d, colour=colour)
    # --n-train / --n-test: the 2-D spelling of older versions, still accepted
    mn, toy_n = ("MNIST: use the first N {} images (default: all)", "2-D: {} points drawn once (default {})")
    both = lambda what, n: "; ".join(([mn.format(what)] if image else []) + ([toy_n.format(what, n)] if toy else []))
    d.add_argument("--train-limit", *(["--n-train"] if toy else []), type=positive_int, default=None,
                   dest="train_limit", metavar="N", help=both("training", TOY_TRAIN))
    d.add_argument("--test-limit", *(["--n-test"] if toy else []), type=positive_int, default=None,
                   dest="test_limit", metavar="N", help=both("test", TOY_TEST))
    if toy:
        common.group(p, "training").add_argument("--steps", type=positive_int, default=None,
                       help="2-D: optimizer steps; sets --epochs to ceil(steps / batches per epoch) (default "
                            f"{'3000' if not image else 'none: 10 epochs'}; on --resume the stored epochs)")


def register(commands, train_commands):
    """npdgm train nice | realnvp | maf | glow | flow2d (``npdgm sample`` is commands/sample.py)."""
    _register_nice(train_commands)
    _register_realnvp(train_commands)
    _register_maf(train_commands)
    _register_glow(train_commands)
    _register_flow2d(train_commands)


def _register_nice(train_commands):
    p = train_commands.add_parser(
        "nice", help="NICE (additive couplings) on MNIST",
        description="NICE on dequantized MNIST: additive couplings (MLP D/2 -> hidden sizes -> D/2, ReLU), "
                    "half split alternating, diagonal scaling, logistic prior. Loss = mean NLL (nats/image).")
    g = common.group(p, "model")
    g.add_argument("--couplings", type=positive_int, default=4, help="additive coupling layers (default 4)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=None, metavar="H",
                   help="hidden sizes of each coupling MLP, one width repeated (default 1000 1000 1000 1000 1000)")
    g.add_argument("--prior", choices=["logistic", "gaussian"], default="logistic", help="default logistic")
    g.add_argument("--logit", action="store_true", help="logit-transform the pixels first (off in the paper)")
    _data_args(p, image=True, toy=False)
    add_train_args(p, epochs=10, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train, family="nice", epochs=None)


def _register_realnvp(train_commands):
    p = train_commands.add_parser(
        "realnvp", help="RealNVP (affine couplings) on MNIST or a 2-D toy",
        description="Affine couplings y_b = x_b exp(s(x_a)) + t(x_a) with a bounded scale. On MNIST: logit "
                    "transform, ActNorm + coupling (MLP nets, checkerboard masks alternating). On 2-D toys: "
                    "the flow2d model.")
    common.group(p, "data").add_argument("--dataset", choices=("mnist",) + TOYS, default="mnist",
                                         help="default mnist")
    g = common.group(p, "model")
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
    g.add_argument("--condition", action="store_true",
                   help="class-conditional p(x | y), the one-hot label concatenated into every coupling net; "
                        "samples per class, and `npdgm evaluate RUN --method classify` (Bayes' rule); "
                        "2-D: as flow2d --condition")
    _data_args(p, image=True, toy=True)
    add_train_args(p, epochs=10, batch_size=None, lr=1e-3, batch_help="default 64 on MNIST, 512 in 2-D")
    p.set_defaults(func=cmd_train, family="realnvp", epochs=None, batch_size=None)


def _register_maf(train_commands):
    p = train_commands.add_parser(
        "maf", help="MAF (masked autoregressive flow) on MNIST",
        description="MAF on dequantized MNIST: logit transform, then ActNorm + MAF layers, z = (x - mu(x)) "
                    "exp(-alpha(x)) with (alpha, mu) from a MADE (784 -> hidden -> 2 x 784, masked so output d "
                    "sees x_<d) and the order reversed (or randomly permuted) between layers; Gaussian prior. The "
                    "density takes one MADE pass per layer, a sample 784. Loss = mean NLL (nats/image), reported "
                    "in bits/dim.")
    g = common.group(p, "model")
    g.add_argument("--layers", type=positive_int, default=5, help="MAF layers (default 5)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[512, 512], metavar="H",
                   help="MADE hidden sizes (default 512 512)")
    g.add_argument("--ordering", choices=["reverse", "random"], default="reverse",
                   help="permutation between layers (default reverse)")
    g.add_argument("--scale", choices=["tanh", "atan", "none"], default="tanh",
                   help="bound on the log-scale alpha (default tanh: alpha = b tanh(raw / b))")
    g.add_argument("--scale-bound", type=positive_float, default=2.0, help="b (default 2)")
    g.add_argument("--no-actnorm", action="store_true",
                   help="no ActNorm (data-dependent init, as realnvp's) before each MAF layer")
    g.add_argument("--alpha", type=positive_float, default=0.05, help="logit transform alpha (default 0.05)")
    g.add_argument("--condition", action="store_true",
                   help="MNIST: class-conditional p(x | y), the one-hot label concatenated into every MADE; "
                        "samples per class, and `npdgm evaluate RUN --method classify` (Bayes' rule)")
    _data_args(p, image=True, toy=False)
    add_train_args(p, epochs=10, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train, family="maf", epochs=None)


def _register_glow(train_commands):
    p = train_commands.add_parser(
        "glow", help="Glow (multi-scale, 1x1 convolutions, conv couplings) on MNIST or CIFAR-10",
        description="Glow on dequantized MNIST (or CIFAR-10: --data cifar10): --levels levels of squeeze (space "
                    "to depth) + --depth steps of (per-channel ActNorm, invertible 1x1 convolution with the LU "
                    "parameterization, affine coupling on channels with a conv net 3x3 -> 1x1 -> 3x3 "
                    "zero-initialized, scale sigmoid(r + 2)), half the channels factored out to the standard normal "
                    "prior after every level but the last. "
                    "Loss = mean NLL (nats/image), reported in bits/dim.")
    g = p.add_argument_group("model")
    g.add_argument("--levels", type=positive_int, default=2,
                   help="levels (squeezes); 28x28 allows 1 or 2 (default 2: 28 -> 14 -> 7), CIFAR-10's 32x32 "
                        "1 to 5 (3: 32 -> 16 -> 8 -> 4)")
    g.add_argument("--depth", type=positive_int, default=4, help="flow steps per level (default 4)")
    g.add_argument("--hidden", type=positive_int, default=32, metavar="H",
                   help="channels of each coupling's conv net (default 32)")
    _data_args(p, image=True, toy=False, colour=True)
    add_train_args(p, epochs=10, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train, family="glow", epochs=None)


def _register_flow2d(train_commands):
    p = train_commands.add_parser(
        "flow2d", help="RealNVP, MAF or spline flow on a 2-D toy density (--flow)",
        description="Affine couplings on R^2 (coupling i conditions on coordinate i % 2; s/t MLP 1 -> hidden -> 2, "
                    "bounded scale), with --flow maf MAF layers (MADE 2 -> hidden -> 4, reversed order between "
                    "layers), or with --flow spline rational-quadratic spline couplings (--bins on [-B, B], "
                    "--tail-bound B, identity outside; each starts as the identity); standard Gaussian prior, "
                    "trained on points drawn once from a seeded toy set, or fitted to a named unnormalised "
                    "density (--target) by either KL: forward (maximum likelihood on the target's samples) or "
                    "reverse (the flow's own samples x = f^-1(z) and the target's log-density).")
    d = common.group(p, "data")
    d.add_argument("--dataset", choices=TOYS + ("rings",), default=None,
                   help="default moons; rings (a ring of radius c) needs --condition")
    d.add_argument("--target", choices=list(TARGETS), default=None,
                   help="instead of a data set, an unnormalised 2-D density p*(x) known by its log-density: "
                        + "; ".join(f"{k}: {t.doc}" for k, t in TARGETS.items()) + " (default: none, --dataset)")
    g = common.group(p, "model")
    g.add_argument("--condition", action="store_true",
                   help=f"a conditional flow p(x | c), c concatenated into every conditioner: c = the one-hot class "
                        f"on {', '.join(sorted(TOY_CLASSES))} (e.g. the moons' two halves), c = the radius on rings "
                        f"(c ~ U{tuple(RING_RADII)}); figure of p(x | c) per class / radius")
    g.add_argument("--flow", choices=["realnvp", "maf", "spline"], default="realnvp",
                   help="affine couplings (realnvp), masked autoregressive layers (maf) or rational-quadratic "
                        "spline couplings (spline: --bins, --tail-bound) (default realnvp)")
    g.add_argument("--couplings", type=positive_int, default=8,
                   help="coupling layers, or MAF layers with --flow maf (default 8)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[256, 256], metavar="H", help="default 256 256")
    g.add_argument("--scale", choices=["tanh", "atan", "none"], default="tanh", help="default tanh")
    g.add_argument("--scale-bound", type=positive_float, default=1.0, help="default 1 (s = tanh(raw))")
    g.add_argument("--actnorm", action="store_true", help="ActNorm before each coupling")
    g.add_argument("--bins", type=positive_int, default=None, help="--flow spline: bins per spline (default 8)")
    g.add_argument("--tail-bound", type=positive_float, default=None, metavar="B",
                   help="--flow spline: the splines live on [-B, B], identity outside (default 5: the toy sets reach "
                        "|x| ~ 3.4)")
    _data_args(p, image=False, toy=True)
    add_train_args(p, epochs=None, batch_size=512, lr=1e-3, epochs_help="default: from --steps")
    common.group(p, "training").add_argument(
        "--objective", choices=OBJECTIVES, default="forward-kl",
        help="with --target: forward-kl = KL(p || q), maximum likelihood on --train-limit samples of the target "
             "(mass-covering); reverse-kl = KL(q || p) - log Z = E_z[log q(f^-1(z)) - log p*(f^-1(z))] on fresh "
             "prior draws, --train-limit of them per epoch (mode-seeking). Without --target only forward-kl "
             "(default forward-kl)")
    p.set_defaults(func=cmd_train, family="flow2d", epochs=None, steps=3000)


# -- helpers --------------------------------------------------------------------------------------
def _is_image(run):
    return run["family"] in ("nice", "maf", "glow") or (run["family"] == "realnvp" and run.get("dataset") == "mnist")


def _nice_hidden(args):
    """nice's --hidden list, checked to be one width repeated."""
    hidden = args.hidden or NICE_HIDDEN
    if len(set(hidden)) > 1:
        raise ValueError(f"--hidden {' '.join(map(str, hidden))}: nice's coupling MLPs use one width for every "
                         f"hidden layer (e.g. --hidden 500 500 500)")
    return list(hidden)


def _toy_run(args, run):
    """``run`` completed for flow2d (or realnvp on a toy set): the flow, its nets, the data sizes, --condition."""
    run.update(family="flow2d", dataset=args.dataset or "moons", couplings=args.couplings or 8,
               hidden=args.hidden or [256, 256], scale=args.scale,
               scale_bound=1.0 if args.scale_bound is None else args.scale_bound, actnorm=args.actnorm,
               batch_size=args.batch_size or 512, train_limit=args.train_limit or TOY_TRAIN,
               test_limit=args.test_limit or TOY_TEST, flow=getattr(args, "flow", "realnvp"))
    if run["flow"] != "realnvp" and run["actnorm"]:
        raise ValueError(f"--actnorm goes with --flow realnvp; the {run['flow']} stack has no ActNorm layers")
    spline_opts = {k: v for k, v in (("bins", getattr(args, "bins", None)),
                                     ("bound", getattr(args, "tail_bound", None))) if v is not None}
    if spline_opts and run["flow"] != "spline":
        raise ValueError(f"--bins / --tail-bound go with --flow spline, not --flow {run['flow']}")
    if run["flow"] == "spline":
        run.update({**SPLINE2D, **spline_opts})
    if getattr(args, "condition", False):
        if args.dataset not in TOY_CLASSES and args.dataset != "rings":
            raise ValueError(f"--condition needs a toy with classes ({', '.join(sorted(TOY_CLASSES))}) or "
                             f"rings; {args.dataset} has none")
        run.update(condition=True, context_dim=TOY_CLASSES.get(args.dataset, 1))
    elif run["dataset"] == "rings":
        raise ValueError("--dataset rings is a conditional density (a ring of radius c): add --condition")
    run.update(_target_options(args))


def _run_from_args(args):
    """The JSON-able options that rebuild the model and the data (stored in the checkpoint)."""
    fam = args.family
    run = {"family": fam, "lr": args.lr, "clip": args.clip, "seed": args.seed, "dtype": args.dtype}
    if fam == "nice":
        run.update(dataset="mnist", couplings=args.couplings, hidden=_nice_hidden(args), prior=args.prior,
                   logit=args.logit, batch_size=args.batch_size)
    elif fam == "realnvp" and args.dataset == "mnist":
        run.update(dataset="mnist", couplings=args.couplings or 8, hidden=args.hidden or [512, 512], mask=args.mask,
                   scale=args.scale, scale_bound=2.0 if args.scale_bound is None else args.scale_bound,
                   actnorm=not args.no_actnorm, alpha=args.alpha, batch_size=args.batch_size or 64)
    elif fam == "maf":
        run.update(dataset="mnist", layers=args.layers, hidden=list(args.hidden), ordering=args.ordering,
                   scale=args.scale, scale_bound=args.scale_bound, actnorm=not args.no_actnorm, alpha=args.alpha,
                   batch_size=args.batch_size)
    elif fam == "glow":
        from ..data import CIFAR_SHAPE, image_shape

        shape = image_shape(args.data)
        name, most = ("cifar10", 5) if shape == CIFAR_SHAPE else ("mnist", 2)
        if shape[1] % 2 ** args.levels:
            raise ValueError(f"--levels {args.levels}: {name}'s {shape[1]}x{shape[2]} images allow --levels 1 to "
                             f"{most} (each level halves H and W)")
        run.update(dataset=name, levels=args.levels, depth=args.depth, hidden=args.hidden,
                   batch_size=args.batch_size, image_shape=list(shape))
    else:  # flow2d, or realnvp on a toy set
        _toy_run(args, run)
    if _is_image(run):
        if fam != "glow":  # refused before a run directory is made
            from ..data import require_grey

            require_grey(args.data)
        run.update(data=args.data, train_limit=args.train_limit, test_limit=args.test_limit)
        if getattr(args, "condition", False):
            if fam not in ("realnvp", "maf"):
                raise ValueError(f"--condition goes with realnvp and maf, not {fam}")
            run.update(condition=True, context_dim=10)
    return run


def _target_options(args):
    """flow2d's --target / --objective as run options ({} for a data set and the default objective)."""
    target, objective = getattr(args, "target", None), getattr(args, "objective", "forward-kl")
    if target is None:
        if objective != "forward-kl":
            raise ValueError(f"--objective {objective} needs --target NAME (an unnormalised density known by its "
                             f"log-density); a data set has only samples: train it by forward-kl")
        return {}
    if args.dataset is not None:
        raise ValueError(f"--dataset {args.dataset} and --target {target}: give one (the target's samples are the "
                         f"data of --objective forward-kl)")
    return {"target": target, "objective": objective, "dataset": f"target-{target}"}


def upgrade_run(run):
    """A stored run's options under today's names: 2-D n_train / n_test -> train_limit / test_limit,
    nice's hidden width + n_hidden -> the --hidden list (checkpoints of older versions)."""
    run = dict(run)
    for old, new in (("n_train", "train_limit"), ("n_test", "test_limit")):
        if old in run:
            run[new] = run.pop(old)
    if run.get("family") == "nice" and not isinstance(run.get("hidden"), (list, tuple)):
        run["hidden"] = [run["hidden"]] * run.pop("n_hidden", 5)
    return run


def build_model(run):
    from ..models import flows

    run, seed = upgrade_run(run), run["seed"]
    if run["family"] == "nice":
        h = run["hidden"]
        return flows.nice(784, run["couplings"], h[0] if h else 1, len(h), prior=run["prior"], logit=run["logit"],
                          seed=seed)
    if run["family"] == "realnvp":
        return flows.realnvp(784, run["couplings"], run["hidden"], mask=run["mask"], image_shape=(28, 28),
                             scale=run["scale"], scale_bound=run["scale_bound"], actnorm=run["actnorm"],
                             alpha=run["alpha"], seed=seed, context_dim=run.get("context_dim", 0))
    if run["family"] == "maf":
        return flows.maf(784, run["layers"], run["hidden"], run["ordering"], alpha=run["alpha"], scale=run["scale"],
                         scale_bound=run["scale_bound"], actnorm=run.get("actnorm", False), seed=seed,
                         context_dim=run.get("context_dim", 0))
    if run["family"] == "glow":
        return flows.glow(tuple(run.get("image_shape", (1, 28, 28))), run["levels"], run["depth"], run["hidden"],
                          seed=seed)
    ctx = run.get("context_dim", 0)  # flow2d --condition
    if run.get("flow", "realnvp") == "maf":
        return flows.maf2d(run["couplings"], run["hidden"], scale=run["scale"], scale_bound=run["scale_bound"],
                           seed=seed, context_dim=ctx)
    if run.get("flow") == "spline":  # runs of older versions stored no bins / bound: theirs were 8 on [-3, 3]
        return flows.spline2d(run["couplings"], run["hidden"], bins=run.get("bins", 8), bound=run.get("bound", 3.0),
                              identity_init=run.get("identity_init", False), seed=seed, context_dim=ctx)
    return flows.realnvp2d(run["couplings"], run["hidden"], scale=run["scale"], scale_bound=run["scale_bound"],
                           actnorm=run["actnorm"], seed=seed, context_dim=ctx)


def model_dim(run):
    """Values per image of an image run's model: C H W of its stored image_shape (784 for the MNIST runs)."""
    return math.prod(run.get("image_shape", (784,)))


def load_data(run):
    """(train, test) host arrays: MNIST (glow: or CIFAR-10) pixels in [0, 1] (test dequantized once, seeded) or
    2-D points."""
    from ..data import check_unit_interval, dequantize, load_dataset, load_mnist, make_toy2d

    run, seed = upgrade_run(run), run["seed"]
    if run.get("target"):
        from ..targets import get_target

        t = get_target(run["target"])
        return (t.sample(run["train_limit"], np.random.default_rng([seed, 11])),
                t.sample(run["test_limit"], np.random.default_rng([seed, 12])))
    if _is_image(run):
        load = load_dataset if run["family"] == "glow" else load_mnist  # the others model 784 pixels
        x_tr, _ = load("train", run["data"], limit=run["train_limit"])
        x_te, _ = load("test", run["data"], limit=run["test_limit"])
        if x_tr.shape[1] != model_dim(run):
            raise ValueError(f"--data {run['data']} now holds {x_tr.shape[1]}-value images; this run's model was "
                             f"built for {model_dim(run)} ({run['dataset']})")
        check_unit_interval("training images", x_tr)
        x_te = dequantize(x_te, np.random.default_rng([seed, 5]))
        return x_tr, x_te
    for k in ("train_limit", "test_limit"):
        if run[k] < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, got {run[k]}")
    if run.get("condition"):
        return tuple(conditional_toy(run, n, np.random.default_rng([seed, k]))[0]
                     for n, k in ((run["train_limit"], 11), (run["test_limit"], 12)))
    return (make_toy2d(run["dataset"], run["train_limit"], np.random.default_rng([seed, 11])),
            make_toy2d(run["dataset"], run["test_limit"], np.random.default_rng([seed, 12])))


def conditional_toy(run, n, rng):
    """(points (n, 2), context (n, C)) of a flow2d --condition run: the one-hot class of a labelled toy, or the
    radius (n, 1) of rings."""
    from ..data import make_rings, make_toy2d_labelled

    if run["dataset"] == "rings":
        return make_rings(n, rng)
    x, y = make_toy2d_labelled(run["dataset"], n, rng)
    return x, np.eye(run["context_dim"])[y]


def load_contexts(run):
    """(train, test) contexts of a --condition run, row for row with :func:`load_data`: MNIST's one-hot labels,
    or those of the 2-D toy (same draws)."""
    if _is_image(run):
        from ..data import load_mnist

        return tuple(np.eye(10)[load_mnist(split, run["data"], limit=run[f"{split}_limit"])[1]]
                     for split in ("train", "test"))
    seed = run["seed"]
    return tuple(conditional_toy(run, n, np.random.default_rng([seed, k]))[1]
                 for n, k in ((run["train_limit"], 11), (run["test_limit"], 12)))


def init_actnorm(flow, train_x, image, seed, n=1000, context=None):
    """Data-dependent ActNorm init on the first ``n`` training examples (dequantized with their own seeded
    noise, so the training RNG stream and hence resume are unaffected) instead of the first minibatch:
    per-pixel statistics of 64 images are too noisy for MNIST's nearly constant border pixels."""
    if not any(getattr(layer, "initialized", True) is False for layer in flow.layers):  # (Channel)ActNorm
        return
    x = train_x[:n]
    if image:
        from ..data import dequantize

        x = dequantize(x, np.random.default_rng([seed, 9]))
    flow.log_prob(x, None if context is None else context[:n])


def evaluate(flow, x_test, image, comm=None, c_test=None):
    """Test metrics: mean NLL (nats), log-likelihood and its two terms (logprior + logdet = ll, see
    :meth:`Flow.nll_terms`), and bits/dim for images (``comm``, of npdgm.distributed: each rank takes its rows of
    the test set and the means are reduced, mean_over_rows; None: one process); ``c_test``: the contexts of a
    conditional flow (the NLL is then -mean log p(x | c))."""
    from ..distributed import mean_over_rows
    from ..models.flows import bits_per_dim

    t = mean_over_rows(len(x_test), lambda r: flow.nll_terms(x_test[r], batch_size=1000,
                                                             context=None if c_test is None else c_test[r]), comm)
    nll = t["nll"]
    out = {"nll": nll, "ll": -nll, "logprior": t["logprior"], "logdet": t["logdet"]}
    if image:
        out["bpd"] = bits_per_dim(nll, flow.dim)
    return out


def evaluate_target(flow, target, x_test, z_test, comm=None):
    """:func:`evaluate` on the target's samples ``x_test`` and both KLs in nats (log Z by quadrature):
    kl_forward = KL(p || q) = E_p[log p*(x)] - log Z + NLL on ``x_test``, and kl_reverse = KL(q || p) =
    E_z[log p_Z(z) - logdet_inv(z) - log p*(f^-1(z))] + log Z on the fixed prior draws ``z_test``."""
    out = evaluate(flow, x_test, False, comm)
    xp = backend.array_module(z_test)
    ref = xp.asarray(x_test, dtype=np.float64)
    logq_minus_logp = 0.0
    for s in range(0, z_test.shape[0], 1000):
        z = z_test[s:s + 1000]
        x, ld_inv = flow.inverse(z, logdet=True)
        logq_minus_logp += float((flow._prior_f(z) - ld_inv - target.log_prob(x.astype(np.float64))).sum())
    out["kl_forward"] = float(target.log_prob(ref).mean()) - target.log_z + out["nll"]
    out["kl_reverse"] = logq_minus_logp / z_test.shape[0] + target.log_z
    return out


def make_reverse_kl_step(model, target):
    """step(xb, yb, rng) of :func:`npdgm.train.fit` for ``--objective reverse-kl``: :meth:`Flow.reverse_kl_and_grad`
    on len(xb) fresh prior draws from the training rng (xb are placeholders: the reverse KL needs no data).
    Logged as train_loss (KL(q || p) - log Z), train_logprior, train_logdet, train_logtarget."""
    from ..kernels.coupling import prior_noise

    dtype = model.flat_params.dtype

    def step(xb, yb, rng, shard=slice(None)):  # the noise of the whole batch, then this rank's rows
        z = prior_noise(model.prior, rng, (int(xb.shape[0]), model.dim), np.float64)[shard]
        return model.reverse_kl_and_grad(backend.to_device(z, dtype), target, zero_grad=False)
    step.shardable = True
    return step


# -- npdgm train nice | realnvp | maf | glow | flow2d ------------------------------------------------------------
@contextlib.contextmanager
def sampling_progress(flow, passes=1, desc="sampling", enabled=None):
    """A tqdm bar on stderr (``enabled`` None: only when stderr is a terminal) counting the coordinates that the
    MAF layers of ``flow`` solve one by one while sampling (D per MAF layer per sampling pass; ``passes``: how many
    sampling calls follow). Flows without MAF layers sample in one pass and get no bar."""
    from tqdm import tqdm

    from ..models.autoregressive import MAF

    mafs = [layer for layer in getattr(flow, "layers", ()) if isinstance(layer, MAF)]
    total = passes * sum(layer.dim for layer in mafs)
    with tqdm(total=total, desc=desc, unit="dim", leave=False, file=sys.stderr,
              disable=not (mafs and (sys.stderr.isatty() if enabled is None else enabled))) as bar:
        for layer in mafs:
            layer.progress = bar.update
        try:
            yield bar
        finally:
            for layer in mafs:
                layer.progress = None


def make_step(model, image):
    """step(xb, yb, rng) of :func:`npdgm.train.fit`: :meth:`Flow.train_step`, one NLL gradient (images:
    dequantized with fresh noise first, and bits/dim reported); logged as train_loss and train_nll."""
    from ..data import dequantize
    from ..models.flows import bits_per_dim

    def step(xb, yb, rng, shard=slice(None)):  # shard: this rank's rows; images are dequantized whole, then sliced
        if not image:  # yb: the contexts of a conditional flow (None otherwise)
            return model.train_step(xb, rng, shard, context=yb)
        t = model.train_step(dequantize(xb, rng), rng, shard, context=yb)
        return dict(t, bpd=bits_per_dim(t["loss"], model.dim))
    step.shardable = True
    return step


def _epochs(run, steps, n_train, image):
    """run["epochs"] of a new run: from --steps on 2-D data (ceil(steps / batches per epoch)), else 10."""
    if run.get("epochs") is None:
        nb = math.ceil(n_train / run["batch_size"])
        run["epochs"] = max(1, math.ceil(steps / nb)) if steps is not None and not image else 10


def _objective(model, run, train_x, test_x, test_c, image):
    """(train_x, step, evaluate(epoch), target or None) of the run: maximum likelihood on the data, or with
    --target the fit to an unnormalised density (reverse-kl: an epoch is len(train_x) prior draws, no data)."""
    step = make_step(model, image)
    evaluate_epoch = lambda e: evaluate(model, test_x, image, common.world(), test_c)  # noqa: E731
    if not run.get("target"):
        return train_x, step, evaluate_epoch, None
    from ..kernels.coupling import prior_noise
    from ..targets import get_target

    target, dtype = get_target(run["target"]), model.flat_params.dtype
    z_test = backend.to_device(prior_noise(model.prior, np.random.default_rng([run["seed"], 13]),
                                           (len(test_x), model.dim), np.float64), dtype)
    evaluate_epoch = lambda e: evaluate_target(model, target, test_x, z_test, common.world())  # noqa: E731
    if run["objective"] == "reverse-kl":
        train_x, step = backend.to_device(np.zeros(tuple(train_x.shape)), dtype), make_reverse_kl_step(model, target)
    return train_x, step, evaluate_epoch, target


def cmd_train(args):
    setup_backend(args)
    if not args.resume:
        run0 = _run_from_args(args)
        args.out = args.out or default_out(run0["family"] + ("" if _is_image(run0) else "-" + run0["dataset"]))
    families = ("realnvp", "flow2d") if args.family == "realnvp" else (args.family,)
    r = common.resume_or_new(args, "flow", lambda a: run0, None, build_model, families=families, upgrade=upgrade_run)
    if r is None:
        return 0
    model, run, out = r
    image = _is_image(run)
    x_tr, x_te = load_data(run)
    _epochs(run, getattr(args, "steps", None), len(x_tr), image)
    dtype = model.flat_params.dtype
    train_x, test_x = backend.to_device(x_tr, dtype), backend.to_device(x_te, dtype)
    train_c = test_c = None
    if run.get("condition"):
        train_c, test_c = (backend.to_device(c, dtype) for c in load_contexts(run))
    train_x, step, evaluate_epoch, target = _objective(model, run, train_x, test_x, test_c, image)
    opt, rng, start = common.start_training(model, run, out, args.resume)
    if not args.resume:
        init_actnorm(model, train_x, image, run["seed"], context=train_c)
    print(f"{run['family']} on {run['dataset']}: {model!r}  train {len(train_x)}  test {len(test_x)}  "
          f"{math.ceil(len(train_x) / run['batch_size'])} steps/epoch  backend {backend.get_backend()} {dtype}  "
          f"-> {out}", flush=True)
    records = common.fit(model, opt, rng, start, run, out, args, step, evaluate_epoch, train_x, train_c)
    if not common.is_root():
        return 0
    summary = {"family": run["family"], "dataset": run["dataset"], "epochs": run["epochs"],
               "steps": records[-1]["step"] if records else 0, "test_n": len(x_te),
               "parameters": model.num_parameters()}
    if records:
        summary.update({k: records[-1][k] for k in ("test_nll", "test_ll", "test_bpd", "test_logprior", "test_logdet",
                                                    "test_kl_forward", "test_kl_reverse") if k in records[-1]})
    if run.get("target"):
        summary.update(target=run["target"], objective=run["objective"], target_log_z=target.log_z)
    common.write_summary(out, summary)
    msg = f"test NLL {summary.get('test_nll', float('nan')):.4f} nats"
    if "test_bpd" in summary:
        msg += f"  ({summary['test_bpd']:.4f} bits/dim; log-likelihood {summary['test_ll']:.2f} nats)"
    if "test_kl_reverse" in summary:
        msg += (f"  KL(q || p) {summary['test_kl_reverse']:.4f}  KL(p || q) {summary['test_kl_forward']:.4f} nats "
                f"({run['objective']})")
    print(msg, flush=True)
    if not args.no_plots:
        common.stage_figures(out, args)
        _figures(model, run, out, records, summary, x_te, image)
    return 0


def conditional_grid(run):
    """(contexts (K, C), names) shown in the p(x | c) figure: every class, or 5 radii across RING_RADII."""
    if run["dataset"] == "rings":
        radii = np.linspace(RING_RADII[0], RING_RADII[1], 5)
        return radii[:, None], [f"c = {r:g}" for r in radii]
    C = run["context_dim"]
    return np.eye(C), [f"class {k}" for k in range(C)]


def _figures(model, run, out, records, summary, x_te, image):
    from ..plots import flows as P

    if image and run.get("condition"):
        P.class_sample_grid(model, os.path.join(out, "samples.png"), seed=run["seed"])
        P.bpd_curves(records, os.path.join(out, "curves.png"), title=f"class-conditional {run['family']} on MNIST")
        P.likelihood_terms(records, os.path.join(out, "terms.png"), title=f"class-conditional {run['family']}")
    elif image:
        with sampling_progress(model):
            P.sample_grids(model, os.path.join(out, "samples.png"), seed=run["seed"],
                           shape=tuple(run.get("image_shape", (28, 28))))
        name = f"{run['family']} on {'CIFAR-10' if run['dataset'] == 'cifar10' else 'MNIST'}"
        P.bpd_curves(records, os.path.join(out, "curves.png"), title=name)
        P.likelihood_terms(records, os.path.join(out, "terms.png"), title=name)
    elif run.get("condition"):
        contexts, names = conditional_grid(run)
        P.conditional_panels(model, contexts, names, os.path.join(out, "density.png"), lim=4.0 if
                             run["dataset"] != "rings" else RING_RADII[1] + 0.8, seed=run["seed"],
                             title=f"{run.get('flow', 'realnvp')} flow p(x | c) on {run['dataset']}: test NLL "
                                   f"{summary.get('test_nll', float('nan')):.3f} nats")
        P.nll_curves(records, os.path.join(out, "curves.png"),
                     title=f"conditional {run.get('flow', 'realnvp')} flow on {run['dataset']}", x="step")
        P.likelihood_terms(records, os.path.join(out, "terms.png"),
                           title=f"conditional {run.get('flow', 'realnvp')} flow on {run['dataset']}", x="step")
    else:
        P.flow2d_panels(model, x_te, os.path.join(out, "density.png"),
                        title=f"{run.get('flow', 'realnvp')} flow on {run['dataset']}: "
                              f"test NLL {summary.get('test_nll', float('nan')):.3f} nats",
                        seed=run["seed"])
        P.nll_curves(records, os.path.join(out, "curves.png"),
                     title=f"{run.get('flow', 'realnvp')} flow on {run['dataset']}", x="step")
        P.likelihood_terms(records, os.path.join(out, "terms.png"),
                           title=f"{run.get('flow', 'realnvp')} flow on {run['dataset']}", x="step")
        if run.get("target"):
            from ..targets import get_target

            P.kl_directions(get_target(run["target"]), [(run["objective"], model, summary)],
                            os.path.join(out, "fit.png"), seed=run["seed"])
    print(f"figures in {out}", flush=True)
