"""``npdgm train ae [--denoise P]``: a plain or denoising autoencoder on MNIST, the baseline beside the VAE.

    npdgm train ae                                       # plain autoencoder, bundled MNIST subset
    npdgm train ae --denoise 0.3                         # denoising: 30% of the input pixels zeroed per step
    npdgm train ae --vae runs/vae-full                   # codes_vs_prior.png also shows that VAE's samples

The run directory gets checkpoint.npz, metrics.jsonl / metrics.csv (train_recon; test_recon = BCE of the clean test
images in nats per image, the VAE's reconstruction term; test_mse per pixel), summary.json (those, and how far the
codes are from N(0, I)) and the figures curves.png, reconstructions.png and codes_vs_prior.png (docs/autoencoders.md).
"""
from __future__ import annotations

import os

import numpy as np

from .. import backend
from . import common
from .common import add_train_args, positive_int, setup_backend
from .cvae import add_data_args

DEFAULT_EPOCHS = 10
MODEL_KEYS = ("z_dim", "hidden", "activation", "denoise", "init")
RUN_KEYS = ("data", "binarize", "train_limit", "test_limit", "epochs", "batch_size", "lr", "clip", "seed", "dtype")


def _probability(s):
    import argparse

    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {s!r}") from None
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be a probability in [0, 1), got {s}")
    return v


def register(commands, train_commands):
    p = train_commands.add_parser(
        "ae", help="plain / denoising autoencoder on MNIST (the VAE's baseline)",
        description="Train a deterministic autoencoder (BCE from logits, nats per image) on MNIST with hand-written "
                    "gradients; --denoise P zeroes each input pixel with probability P (a denoising autoencoder). "
                    "codes_vs_prior.png shows why its codes do not sample: decoding z ~ N(0, I).")
    g = common.group(p, "model")
    g.add_argument("--z-dim", type=positive_int, default=20, help="code size (default 20)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[400], metavar="H",
                   help="encoder hidden sizes; the decoder uses them reversed (default 400)")
    g.add_argument("--activation", default="relu", choices=["relu", "tanh", "leaky_relu", "elu", "softplus", "sigmoid"],
                   help="hidden-layer nonlinearity (default relu)")
    g.add_argument("--denoise", type=_probability, default=0.0, metavar="P",
                   help="masking noise: zero each input pixel with probability P during training (default 0: a "
                        "plain autoencoder)")
    g.add_argument("--init", default="torch", help="weight init (default torch)")
    add_data_args(p)
    common.group(p, "output").add_argument(
        "--vae", default=None, metavar="RUNDIR",
        help="a trained VAE run (npdgm train vae) whose prior samples codes_vs_prior.png shows beside the "
             "autoencoder's (default: none)")
    add_train_args(p, epochs=DEFAULT_EPOCHS, batch_size=128, lr=1e-3)
    p.set_defaults(func=cmd_train, epochs=None)


def evaluate_ae(model, x, batch=1000):
    """{"recon": BCE of the clean images in nats per image, "mse": squared error per pixel of E[x | code]}."""
    bce, se = 0.0, 0.0
    for s in range(0, len(x), batch):
        xb = x[s:s + batch]
        bce += float(model.loss(xb)[0]) * len(xb)
        se += float(((model.reconstruct(xb) - xb) ** 2).sum())
    return {"recon": bce / len(x), "mse": se / (len(x) * model.x_dim)}


def code_stats(model, x, batch=1000):
    """How far the codes g(x) are from N(0, I): their per-dimension mean and std, and the mean squared norm
    E|z|^2 (z_dim under N(0, I))."""
    z = np.concatenate([np.asarray(backend.to_host(model.encode(x[s:s + batch])), np.float64)
                        for s in range(0, len(x), batch)])
    return {"code_mean_abs": float(np.abs(z.mean(0)).mean()), "code_std_mean": float(z.std(0).mean()),
            "code_sq_norm": float((z * z).sum(1).mean()), "prior_sq_norm": float(model.z_dim)}


def _load_vae_run(path, z_dim):
    import npdgm

    vae = npdgm.load(path)
    if getattr(vae, "kind", None) != "vae":
        raise ValueError(f"--vae {path}: holds a {getattr(vae, 'kind', '?')} model, not a vae run")
    return vae


def cmd_train(args):
    from ..models.autoencoder import Autoencoder

    setup_backend(args)
    vae = _load_vae_run(args.vae, args.z_dim) if args.vae else None   # a bad --vae fails before training
    r = common.resume_or_new(args, "ae", RUN_KEYS, DEFAULT_EPOCHS,
                             lambda run: Autoencoder(x_dim=784, seed=run["seed"],
                                                     **{k: getattr(args, k) for k in MODEL_KEYS}))
    if r is None:
        return 0
    model, run, out = r
    seed = run["seed"]
    x_tr, _ = common.load_image_data(run["data"], "train", run["train_limit"], run["binarize"], seed)
    x_te, _ = common.load_image_data(run["data"], "test", run["test_limit"], run["binarize"], seed)
    train_x, test_x = model.check_x(x_tr, "training images"), model.check_x(x_te, "test images")
    opt, rng, start = common.start_training(model, run, out, args.resume)
    kind = f"denoising autoencoder (P={model.denoise:g})" if model.denoise else "autoencoder"
    print(f"{kind} {model.config}  {model.num_parameters()} parameters  train {len(train_x)}  test {len(test_x)}  "
          f"backend {backend.get_backend()} {model.dtype}  -> {out}", flush=True)
    step = common.binarizing_step(model, run["binarize"] == "dynamic")
    records = common.fit(model, opt, rng, start, run, out, args, step, lambda e: evaluate_ae(model, test_x), train_x)
    if not common.is_root():
        return 0
    summary = {"epochs": run["epochs"], "test_n": len(test_x), "denoise": model.denoise, **code_stats(model, test_x)}
    if records:
        summary.update({k: records[-1][k] for k in ("test_recon", "test_mse") if k in records[-1]})
        print(f"test reconstruction: BCE {summary['test_recon']:.3f} nats/image, MSE {summary['test_mse']:.4f} per "
              f"pixel; codes: E|z|^2 {summary['code_sq_norm']:.2f} (N(0, I): {model.z_dim})", flush=True)
    common.write_summary(out, summary)
    if not args.no_plots:
        from ..plots import autoencoder as PA

        common.stage_figures(out, args)
        PA.curves(records, os.path.join(out, "curves.png"))
        keep = model.corrupt_mask(np.random.default_rng([seed, 4]), (10, model.x_dim))
        PA.reconstructions(model, x_te[:10], keep, os.path.join(out, "reconstructions.png"))
        PA.codes_vs_prior(model, x_te[:2000], os.path.join(out, "codes_vs_prior.png"), vae=vae, rng=seed)
        print(f"figures in {out}", flush=True)
    return 0
