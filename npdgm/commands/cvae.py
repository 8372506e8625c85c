"""``npdgm train cvae``: conditional VAE on MNIST (labels as one-hot inputs to encoder and decoder).

    npdgm train cvae                                         # bundled 10k/2k MNIST subset, offline
    npdgm train cvae --data mnist --epochs 10 --out runs/cvae-full
    npdgm train cvae --resume runs/cvae-full --epochs 20     # continue bit-for-bit

The run directory gets checkpoint.npz, metrics.jsonl / metrics.csv (train_* over the epoch's batches, test_* on the
test set with its labels: -ELBO of log p(x|y) in nats per image), summary.json and the figures:
curves.png, classes.png (one row per digit class sampled from the prior) and style_transfer.png
(a test digit encoded with its label and decoded under every label).
"""
from __future__ import annotations

import os

import numpy as np

from .. import backend
from . import common
from .common import add_train_args, positive_float, positive_int, setup_backend
from .vae import add_vae_model_args, check_sigma

DEFAULT_EPOCHS = 10
DEFAULT_LABEL_SCALE = 10.0  # ~2 sqrt(z_dim 20): the label path learns faster than z's (npdgm.models.cvae docstring)
MODEL_KEYS = ("z_dim", "hidden", "activation", "likelihood", "sigma", "n_samples", "beta", "init", "label_scale")
RUN_KEYS = ("data", "binarize", "train_limit", "test_limit", "epochs", "batch_size", "lr", "clip", "seed", "dtype")


def add_data_args(p, binarize="none"):
    d = common.group(p, "data")
    common.add_data_arg(d)
    d.add_argument("--binarize", choices=["none", "static", "dynamic"], default=binarize,
                   help="none: grey levels in [0, 1]; static: x > 0.5; dynamic: a new Bernoulli(x) draw per "
                        f"batch (test set drawn once) (default {binarize})")
    d.add_argument("--train-limit", type=positive_int, default=None,
                   help="use the first N training images (default: all)")
    d.add_argument("--test-limit", type=positive_int, default=None, help="use the first N test images (default: all)")


def register(commands, train_commands):
    p = train_commands.add_parser(
        "cvae", help="conditional VAE on MNIST (sample a chosen digit)",
        description="Train a conditional VAE q(z|x,y), p(x|z,y) on MNIST with hand-written gradients; the label "
                    "enters both networks as a one-hot vector. Loss = -ELBO of log p(x|y) in nats per image.")
    g = add_vae_model_args(p, decoder="p(x|z,y)")
    g.add_argument("--init", default="torch", help="weight init (default torch)")
    g.add_argument("--label-scale", type=positive_float, default=DEFAULT_LABEL_SCALE, metavar="S",
                   help="the label enters both networks as S times its one-hot vector; 1 = the plain one-hot, with "
                        "which a 20-latent CVAE learns to ignore the label (its z carries the class) "
                        f"(default {DEFAULT_LABEL_SCALE:g})")
    add_data_args(p)
    add_train_args(p, epochs=DEFAULT_EPOCHS, batch_size=128, lr=1e-3)
    p.set_defaults(func=cmd_train, epochs=None)


def first_of_each_class(labels, num_classes=10):
    """Index of the first example of every class present (in class order)."""
    firsts = {}
    for i, c in enumerate(np.asarray(labels)):
        firsts.setdefault(int(c), i)
    return [firsts[c] for c in range(num_classes) if c in firsts]


def evaluate_cvae(model, x, y, seed, batch=1000, comm=None):
    """Test -ELBO of log p(x|y) (and its terms) averaged over x with fixed noise. ``comm`` (None: this process
    alone): each rank takes its rows of every batch (the batch's noise drawn whole, then sliced) and the sums
    are all-reduced."""
    from .. import distributed

    comm = comm or distributed.Single()
    rng = np.random.default_rng([seed, 1])
    sums, n = {"nelbo": 0.0, "recon": 0.0, "kl": 0.0}, len(x)
    for s in range(0, n, batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        eps = backend.to_device(rng.standard_normal((1, len(xb), model.z_dim), dtype=np.float32), model.dtype)
        r = distributed.rows(len(xb), comm)
        if r.stop > r.start:
            _, t = model.loss(xb[r], yb[r], eps[:, r])
            for k in sums:
                sums[k] += float(t[k]) * (r.stop - r.start)
    tot = comm.allreduce_sum(list(sums.values()))
    return {k: float(v) / n for k, v in zip(sums, tot)}


def make_step(model, dynamic):
    """step(xb, yb, rng) of :func:`npdgm.train.fit`: :meth:`CVAE.train_step` on the labelled batch
    (``dynamic``: a new Bernoulli(x) draw of the batch first). Under N ranks (``shard``: this rank's rows)
    the step's noise is drawn for the whole batch as train_step draws it, then the shard's rows go through
    :meth:`CVAE.loss_and_grad` (tests/test_distributed.py checks it against train_step)."""
    dtype = model.dtype

    def step(xb, yb, rng, shard=slice(None)):
        if dynamic:
            xb = (backend.to_device(rng.random(xb.shape, dtype=np.float32)) < xb).astype(dtype)
        if shard == slice(None):
            return model.train_step(xb, yb, rng)
        eps = model.training_noise(rng, model.n_samples, xb.shape[0])[:, shard]
        _, t = model.loss_and_grad(xb[shard], yb[shard], eps, check=False, zero_grad=False)
        return {key: t[key] for key in ("loss", "nelbo", "recon", "kl")}
    step.shardable = True
    return step


def cmd_train(args):
    from ..models.cvae import CVAE

    setup_backend(args)
    if not args.resume:
        check_sigma(args.sigma, args.dtype)
    r = common.resume_or_new(
        args, "cvae", RUN_KEYS, DEFAULT_EPOCHS,
        lambda run: CVAE(x_dim=784, num_classes=10, seed=run["seed"], **{k: getattr(args, k) for k in MODEL_KEYS}))
    if r is None:
        return 0
    model, run, out = r
    seed = run["seed"]
    x_tr, y_tr = common.load_image_data(run["data"], "train", run["train_limit"], run["binarize"], seed)
    x_te, y_te = common.load_image_data(run["data"], "test", run["test_limit"], run["binarize"], seed)
    train_x = model.check_x(x_tr, "training images")
    test_x = model.check_x(x_te, "test images")
    y_tr = model.check_y(y_tr, len(x_tr), "training labels")
    y_te = model.check_y(y_te, len(x_te), "test labels")
    opt, rng, start = common.start_training(model, run, out, args.resume)
    print(f"cvae {model.config}  {model.num_parameters()} parameters  train {len(train_x)}  test {len(test_x)}  "
          f"backend {backend.get_backend()} {model.dtype}  -> {out}", flush=True)
    records = common.fit(model, opt, rng, start, run, out, args, make_step(model, run["binarize"] == "dynamic"),
                         lambda e: evaluate_cvae(model, test_x, y_te, seed, comm=common.world()), train_x, y_tr)
    if not common.is_root():
        return 0
    summary = {"epochs": run["epochs"], "test_n": len(test_x)}
    if records:
        summary.update({k: records[-1][k] for k in ("test_nelbo", "test_recon", "test_kl") if k in records[-1]})
        print(f"test -ELBO of log p(x|y): {summary['test_nelbo']:.3f} nats/image", flush=True)
    common.write_summary(out, summary)
    if not args.no_plots:
        common.stage_figures(out, args)
        conditional_figures(model, out, records, x_te, y_te, seed)
    return 0


def conditional_figures(model, out, records, x_te, y_te, seed, curves=None):
    """curves.png (``curves(records, path)``, default the VAE's), classes.png and style_transfer.png
    (the CVAE and M2 draw the same two figures)."""
    from ..plots import cvae as PC
    from ..plots import vae as PV

    (curves or PV.curves)(records, os.path.join(out, "curves.png"))
    PC.class_grid(model, os.path.join(out, "classes.png"), rng=seed)
    idx = first_of_each_class(y_te)
    PC.style_transfer(model, x_te[idx], y_te[idx], os.path.join(out, "style_transfer.png"))
    print(f"figures in {out}", flush=True)
