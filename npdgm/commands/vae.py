"""``npdgm train vae``, ``npdgm impute RUNDIR`` (``npdgm sample RUNDIR`` is commands/sample.py).

    npdgm train vae                                    # bundled 10k/2k MNIST subset, offline
    npdgm train vae --data mnist --epochs 10 --out runs/vae-full
    npdgm train vae --resume runs/vae-full --epochs 20 # continue bit-for-bit to epoch 20
    npdgm train vae --data mnist --z-dim 50 --free-bits 0.25     # free bits: 0.25 nats per latent dimension
    npdgm train vae --data mnist --posterior iaf:2               # q(z|x) = Gaussian then 2 IAF steps
    npdgm train vae --posterior iaf:2 --iaf-context              # ... each step also sees the encoder's h
    npdgm sample runs/vae-full --n 100
    npdgm impute runs/vae-full --rows 10 18

A run directory gets checkpoint.npz, metrics.jsonl (one JSON object per epoch: train_* averaged over
the epoch's batches, test_* on the test set), metrics.csv (the same records),
summary.json (final test -ELBO, test_nll = the IWAE estimate of -log p(x), imputation errors) and the
figures; docs/metrics.md lists every key.
"""
from __future__ import annotations

import math
import os

import numpy as np

from .. import backend
from ..data import MNIST_SHAPE
from . import common
from .common import add_train_args, nonneg_float, nonneg_int, positive_float, positive_int, setup_backend

DEFAULT_EPOCHS = 10
IWAE_BATCH = 100  # test images per IWAE block: its log-weights are (k, IWAE_BATCH) float64
MODEL_KEYS = ("z_dim", "hidden", "activation", "likelihood", "sigma", "n_samples", "beta", "init", "free_bits",
              "posterior", "iaf_hidden", "iaf_context", "arch", "channels")
RUN_KEYS = ("data", "binarize", "train_limit", "test_limit", "epochs", "batch_size", "lr", "clip", "seed",
            "iwae_k", "iwae_n", "impute_rows", "impute_steps", "impute_k", "impute_n", "dtype", "objective", "k",
            "kl_warmup")


def _posterior(spec):
    """argparse type of --posterior: "gaussian" or "iaf:K" (K >= 1)."""
    import argparse

    from ..models.iaf_posterior import parse_posterior
    try:
        parse_posterior(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec


def sigma_arg(spec):
    """argparse type of --sigma: a positive float (fixed decoder std) or "learned-z" (a variance head)."""
    return spec if spec == "learned-z" else positive_float(spec)


def add_vae_model_args(p, decoder="p(x|z)", z_dim_help="latent size (default 20)"):
    """The model options the VAE and the CVAE share; returns the "model" group for more."""
    g = common.group(p, "model")
    g.add_argument("--z-dim", type=positive_int, default=20, help=z_dim_help)
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[400], metavar="H",
                   help="encoder hidden sizes; the decoder uses them reversed (default 400)")
    g.add_argument("--activation", default="relu",
                   choices=["relu", "tanh", "leaky_relu", "elu", "softplus", "sigmoid"],
                   help="hidden-layer nonlinearity (default relu)")
    g.add_argument("--likelihood", choices=["bernoulli", "gaussian"], default="bernoulli",
                   help=f"decoder {decoder}: bernoulli (BCE from logits) or gaussian (default bernoulli)")
    g.add_argument("--sigma", type=sigma_arg, default=None, metavar="{SIGMA,learned-z}",
                   help="gaussian: fixed decoder std (the MSE form), or learned-z: a variance head sigma_theta(z), "
                        "one variance per pixel and image (vae only) (default: learn a per-pixel log-variance)")
    g.add_argument("--n-samples", type=positive_int, default=1, help="noise samples per image in the loss (default 1)")
    g.add_argument("--beta", type=nonneg_float, default=1.0, help="weight of the KL term (default 1)")
    return g


def _add_evaluation_options(p):
    """The end-of-training estimates: IWAE log p(x) and the imputation check."""
    d = common.group(p, "evaluation")   # a stage's settings carry its name: --iwae-k, --impute-steps, ...
    d.add_argument("--iwae-k", type=positive_int, default=100,
                   help="importance samples for log p(x) at the end (default 100)")
    d.add_argument("--iwae-n", type=nonneg_int, default=1000,
                   help="test images for the IWAE estimate (default 1000; 0 skips it)")
    d.add_argument("--impute-rows", type=nonneg_int, nargs=2, default=[10, 18], metavar=("START", "STOP"),
                   help="image rows [START, STOP) hidden for the imputation check (default 10 18)")
    d.add_argument("--impute-steps", type=nonneg_int, default=50, help="encode/decode iterations (default 50)")
    d.add_argument("--impute-k", type=nonneg_int, default=100,
                   help="importance samples for E[x_missing | x_observed] (default 100; 0 skips it)")
    d.add_argument("--impute-n", type=positive_int, default=500,
                   help="test images for the imputation errors (default 500)")


def add_vae_options(p, colour=False):
    """Every ``npdgm train vae`` option but the training loop's: model, data and evaluation (``train m1`` takes
    them for the VAE it trains)."""
    g = add_vae_model_args(p, z_dim_help="latent size (default 20; 2 adds the latent figures, 3 the 3-D scatter)")
    g.add_argument("--objective", choices=["elbo", "iwae"], default="elbo",
                   help="training loss: elbo (-ELBO, --n-samples, --beta) or iwae (the k-sample importance-"
                        "weighted bound, Burda et al. 2016) (default elbo)")
    g.add_argument("--k", type=positive_int, default=5, help="--objective iwae: importance samples per image "
                                                              "(default 5)")
    g.add_argument("--kl-warmup", type=nonneg_float, default=0.0, metavar="EPOCHS",
                   help="--objective elbo: the KL weight rises linearly from 0 to --beta over the first EPOCHS epochs, "
                        "step by step (default 0: off)")
    g.add_argument("--free-bits", type=nonneg_float, default=0.0, metavar="L",
                   help="--objective elbo, gaussian posterior: free bits (Kingma et al. 2016), the KL term becomes "
                        "sum_j max(L, batch-mean KL_j), L nats per latent dimension; with --kl-warmup the weight "
                        "ramps on that term (default 0: off)")
    g.add_argument("--posterior", type=_posterior, default="gaussian", metavar="{gaussian,iaf:K}",
                   help="q(z|x): gaussian, or iaf:K = that Gaussian then K inverse autoregressive flow steps "
                        "(Kingma et al. 2016; KL by Monte Carlo) (default gaussian)")
    g.add_argument("--iaf-hidden", type=positive_int, nargs="+", default=[200, 200], metavar="H",
                   help="--posterior iaf:K: hidden sizes of each step's MADE (default 200 200)")
    g.add_argument("--iaf-context", action="store_true",
                   help="--posterior iaf:K: feed the encoder's last hidden layer h to every IAF step as its context "
                        "(Kingma et al. 2016; default: the steps see z only)")
    g.add_argument("--init", default="torch", help="weight init (default torch = PyTorch's Linear default)")
    g.add_argument("--arch", choices=["mlp", "conv"], default="mlp",
                   help="mlp: --hidden Linear layers; conv: 4x4 stride-2 convolutions with --channels, transposed "
                        "ones in the decoder (DCGAN-style; docs/convolution.md) (default mlp)")
    g.add_argument("--channels", type=positive_int, nargs="+", default=[32, 64], metavar="C",
                   help="--arch conv: channels of the encoder's convolutions, the decoder's reversed (default 32 64)")
    d = common.group(p, "data")
    common.add_data_arg(d, colour=colour)
    d.add_argument("--binarize", choices=["none", "static", "dynamic"], default="none",
                   help="none: grey levels in [0, 1] (PyTorch example); static: x > 0.5; dynamic: a new "
                        "Bernoulli(x) draw per batch (test set drawn once) (default none)")
    d.add_argument("--train-limit", type=positive_int, default=None,
                   help="use the first N training images (default: all)")
    d.add_argument("--test-limit", type=positive_int, default=None, help="use the first N test images (default: all)")
    _add_evaluation_options(p)


def register(commands, train_commands):
    p = train_commands.add_parser(
        "vae", help="variational autoencoder on MNIST",
        description="Train a VAE (Gaussian encoder, Bernoulli or Gaussian decoder) on MNIST with hand-written "
                    "gradients. Loss = -ELBO in nats per image (summed over pixels, averaged over the batch).")
    add_vae_options(p, colour=True)
    add_train_args(p, epochs=DEFAULT_EPOCHS, batch_size=128, lr=1e-3)
    p.set_defaults(func=cmd_train, epochs=None)  # None: DEFAULT_EPOCHS, or the stored value on --resume

    if "impute" not in commands.choices:
        i = commands.add_parser("impute", help="fill hidden rows of test digits with a trained VAE",
                                description="Hide image rows of test digits and fill them in with the VAE in "
                                            "RUNDIR (--n, --k, --steps as train vae's --impute-n/-k/-steps).")
        i.add_argument("rundir", metavar="RUNDIR", help="run directory or checkpoint .npz")
        d = common.group(i, "data")
        common.add_data_arg(d, default="the run's data")
        d.add_argument("--n", type=positive_int, default=1000, help="test images for the error (default 1000)")
        e = common.group(i, "evaluation")
        e.add_argument("--rows", type=nonneg_int, nargs=2, default=[10, 18], metavar=("START", "STOP"),
                       help="image rows [START, STOP) to hide (default 10 18)")
        e.add_argument("--steps", type=nonneg_int, default=50, help="encode/decode iterations (default 50)")
        e.add_argument("--k", type=nonneg_int, default=100,
                       help="importance samples for E[x_missing | x_observed] (default 100; 0 skips it)")
        o = common.group(i, "output")
        o.add_argument("--show", type=nonneg_int, default=10, help="images in the figure (default 10)")
        o.add_argument("--png", "--out", default=None, dest="out", metavar="PNG",
                       help="figure path (default RUNDIR/imputation.png; --out is its old name)")
        common.group(i, "run").add_argument("--backend", choices=backend.BACKENDS, default=None,
                                            help="array backend (default: $NPDGM_BACKEND or numpy)")
        i.set_defaults(func=cmd_impute)


# -- helpers --------------------------------------------------------------------------------------
def row_mask(n, rows, shape=MNIST_SHAPE):
    """(n, C*H*W) boolean mask of images ``shape`` (C, H, W) flattened in that order, True on image rows
    [start, stop) of every channel."""
    start, stop = rows
    side = shape[1]
    if not (0 <= start < stop <= side):
        raise ValueError(f"rows must satisfy 0 <= START < STOP <= {side}, got {start} {stop}")
    m = np.zeros(shape, dtype=bool)
    m[:, start:stop] = True
    return np.broadcast_to(m.ravel(), (n, m.size)).copy()


def model_image_shape(model):
    """(C, H, W) of the images a VAE models: its conv arch's image_shape, else MNIST's (1, 28, 28)."""
    return tuple(model.config.get("image_shape", MNIST_SHAPE))


def imputation_errors(model, x, mean_image, rows, steps, k=100, seed=0):
    """Hide rows [start, stop) of every image in x and fill them (1) by ``steps`` encode -> decode
    iterations (:meth:`VAE.impute`, the seed's method; missing pixels start at the mean image) and
    (2) by the importance-sampled E[x_missing | x_observed] with k samples (:meth:`VAE.conditional_mean`;
    k = 0 skips it). Returns (metrics, masked, imputed, cond_mean) as host arrays; metrics holds the
    mean squared error per missing pixel of both and of the baselines (mean image, zeros)."""
    mask = row_mask(len(x), rows, model_image_shape(model))
    xd, md = backend.to_device(x, model.dtype), backend.to_device(mask)
    fill = backend.to_device(mean_image, model.dtype)
    imputed = backend.to_host(model.impute(xd, md, steps=steps, fill=fill))
    err = lambda y: float(np.mean((np.asarray(y, np.float64)[mask] - np.asarray(x, np.float64)[mask]) ** 2))
    metrics = {"impute_rows": list(rows), "impute_steps": int(steps), "impute_n": int(len(x)),
               "impute_mse_vae": err(imputed)}
    cond = None
    if k:
        rng = np.random.default_rng([seed, 3])
        cond = np.concatenate([backend.to_host(model.conditional_mean(xd[s:s + 100], md[s:s + 100], k=k, fill=fill,
                                                                      rng=rng)) for s in range(0, len(x), 100)])
        metrics.update(impute_k=int(k), impute_mse_vae_cond_mean=err(cond))
    metrics.update(impute_mse_mean_image=err(np.broadcast_to(mean_image, x.shape)),
                   impute_mse_zero_fill=err(np.zeros_like(x)))
    return metrics, np.where(mask, 0.5, x), imputed, cond


def _imputation_line(m):
    cm = f"  E[x_miss|x_obs] (k={m['impute_k']}) {m['impute_mse_vae_cond_mean']:.4f}" if "impute_k" in m else ""
    return (f"imputation of rows {m['impute_rows'][0]}..{m['impute_rows'][1] - 1} on {m['impute_n']} test images, "
            f"MSE per missing pixel:  VAE {m['impute_steps']} steps {m['impute_mse_vae']:.4f}{cm}  "
            f"mean image {m['impute_mse_mean_image']:.4f}  zero fill {m['impute_mse_zero_fill']:.4f}")


def evaluate_nelbo(model, x, seed, batch=1000, comm=None):
    """Test -ELBO (and its terms) averaged over x, with fixed noise (rng seeded by ``seed``). ``comm`` (of
    npdgm.distributed; None: this process alone): each rank takes its rows of every batch (the batch's noise
    drawn whole, then sliced) and the sums are all-reduced, the numbers of one process."""
    from .. import distributed

    comm = comm or distributed.Single()
    rng = np.random.default_rng([seed, 1])
    sums, n = {"nelbo": 0.0, "recon": 0.0, "kl": 0.0}, len(x)
    for s in range(0, n, batch):
        xb = x[s:s + batch]
        eps = backend.to_device(rng.standard_normal((1, len(xb), model.z_dim), dtype=np.float32), model.dtype)
        r = distributed.rows(len(xb), comm)
        if r.stop > r.start:
            _, t = model.loss(xb[r], eps[:, r])  # one noise sample per image whatever n_samples is
            for key in sums:
                sums[key] += float(t[key]) * (r.stop - r.start)
    tot = comm.allreduce_sum(list(sums.values()))
    return {k: float(v) / n for k, v in zip(sums, tot)}


def iwae(model, x, k, seed, batch=IWAE_BATCH):
    """Mean IWAE estimate of log p(x) over x (nats per image), fixed noise."""
    rng = np.random.default_rng([seed, 2])
    tot = 0.0
    for s in range(0, len(x), batch):
        tot += float(backend.to_host(model.log_likelihood(x[s:s + batch], k, rng=rng)).sum())
    return tot / len(x)


# -- npdgm train vae ------------------------------------------------------------------------------
def _image_shape(args):
    """(C, H, W) of a new run's --data; CIFAR-10's colour images need --arch conv (the MLP VAE's figures and
    imputation assume 28x28 grey)."""
    from ..data import image_shape

    shape = image_shape(args.data)
    if shape != MNIST_SHAPE and args.arch != "conv":
        raise ValueError(f"--data {args.data} holds {shape[1]}x{shape[2]} colour images: train them with --arch conv "
                         f"(the MLP VAE models 28x28 grey images)")
    return shape


def _check_new_run(args):
    """A new run's image shape (see ``_image_shape``), its sizes and scales checked before a run directory is
    made; MNIST's on --resume (the stored model knows its own)."""
    if args.resume:
        return MNIST_SHAPE
    shape = _image_shape(args)
    check_sigma(args.sigma, args.dtype, math.prod(shape))
    check_eval_sizes(vars(args))
    return shape


def check_sigma(sigma, dtype, x_dim=784):
    """ValueError naming --sigma when the fixed decoder std is so small that the Gaussian loss and its gradient,
    of size x_dim / sigma^2, or Adam's square of the gradient overflow ``dtype`` before any update: sigma must be
    >= sqrt(x_dim / sqrt(max)) (float32: 6.6e-09). None (a learned variance) passes."""
    if sigma is None or isinstance(sigma, str):   # learned: per pixel, or a variance head ("learned-z")
        return
    lo = math.sqrt(x_dim / math.sqrt(float(np.finfo(dtype).max)))
    if sigma < lo:
        raise ValueError(f"--sigma {sigma:g} is too small for {np.dtype(dtype).name}: the Gaussian decoder's loss "
                         f"and gradients scale as 1/sigma^2 = 1e{-2 * math.log10(sigma):.0f} and overflow before the "
                         f"first update; give --sigma >= {lo:.2g}"
                         + (" (or --dtype float64)" if np.dtype(dtype) != np.float64 else ""))


def check_eval_sizes(run):
    """ValueError naming --iwae-k, before any training, when the final IWAE estimate would not fit in the memory
    the backend has now: its log-weights are k x min(iwae_n, IWAE_BATCH) float64, held twice (the array and the
    exp of its shifted copy). The other evaluation options need memory bounded by the test set."""
    k, n = run.get("iwae_k", 100), min(run.get("iwae_n", 1000), IWAE_BATCH)
    need, free = 2 * 8 * k * n, backend.available_memory()
    if n and free is not None and need > free:
        raise ValueError(f"--iwae-k {k}: the final IWAE estimate of log p(x) would hold {need / 2**30:.3g} GiB of "
                         f"importance weights ({k} x {n} test images x 8 bytes, twice) but {free / 2**30:.3g} GiB "
                         f"are available; lower --iwae-k (or skip the estimate with --iwae-n 0)")


def make_step(model, dynamic, objective="elbo", k=5, warmup_steps=0, start_step=0):
    """step(xb, yb, rng) of :func:`npdgm.train.fit`: :meth:`VAE.train_step` (``objective`` "iwae": the
    k-sample IWAE bound) after the policies of the run: ``dynamic``, a new Bernoulli(x) draw of the batch
    first; KL warm-up, at step t (counted from ``start_step``) the KL weight is beta min(1, t / warmup_steps)
    (model.beta holds it; the configured beta stays in model.config). With free bits (model.free_bits) the
    warm-up weight multiplies the free-bits KL term; free bits with the IWAE objective or beta = 0 are refused."""
    dtype, beta, count = model.dtype, model.config["beta"], [start_step]
    if objective == "iwae" and warmup_steps:
        raise ValueError("--kl-warmup applies to --objective elbo (the IWAE bound has no separate KL term)")
    if getattr(model, "free_bits", 0.0):
        if objective == "iwae":
            raise ValueError("--free-bits applies to --objective elbo (the IWAE bound has no separate KL term)")
        if not beta:
            raise ValueError("--free-bits shapes the KL term, which --beta 0 removes; give --beta > 0")

    def step(xb, yb, rng, shard=slice(None)):  # shard: this rank's rows; the noise is drawn for the whole batch
        if warmup_steps:
            model.beta = beta * min(1.0, count[0] / warmup_steps)
            count[0] += 1
        if dynamic:
            xb = (backend.to_device(rng.random(xb.shape, dtype=np.float32)) < xb).astype(dtype)
        return model.train_step(xb, rng, shard, objective, k)
    step.shardable = True
    return step


def cmd_train(args):
    from ..models.vae import VAE

    setup_backend(args)
    shape = _check_new_run(args)
    cfg = {k: getattr(args, k) for k in MODEL_KEYS}
    r = common.resume_or_new(args, "vae", RUN_KEYS, DEFAULT_EPOCHS,
                             lambda run: VAE(x_dim=math.prod(shape), image_shape=shape, seed=run["seed"], **cfg))
    if r is None:
        return 0
    model, run, out = r
    check_eval_sizes(run)
    row_mask(1, run["impute_rows"], model_image_shape(model))
    seed = run["seed"]
    x_tr, _ = common.load_image_data(run["data"], "train", run["train_limit"], run["binarize"], seed, colour=True)
    x_te, y_te = common.load_image_data(run["data"], "test", run["test_limit"], run["binarize"], seed, colour=True)
    train_x = model.check_x(x_tr, "training images")   # validated once, before any training
    test_x = model.check_x(x_te, "test images")
    opt, rng, start = common.start_training(model, run, out, args.resume)
    print(f"vae {model.config}  {model.num_parameters()} parameters  train {len(train_x)}  test {len(test_x)}  "
          f"backend {backend.get_backend()} {model.dtype}  -> {out}", flush=True)
    per_epoch = -(-len(train_x) // run["batch_size"])
    step = make_step(model, run["binarize"] == "dynamic", run.get("objective", "elbo"), run.get("k", 5),
                     round(run.get("kl_warmup", 0) * per_epoch), start * per_epoch)
    records = common.fit(model, opt, rng, start, run, out, args, step,
                         lambda e: evaluate_nelbo(model, test_x, seed, comm=common.world()), train_x)
    if not common.is_root():
        return 0
    model.beta = model.config["beta"]
    summary = _summary(model, run, records, test_x)
    n_imp = max(10, min(run.get("impute_n", 500), len(x_te)))
    try:
        imp, failed = imputation_errors(model, x_te[:n_imp], x_tr.mean(axis=0), run["impute_rows"],
                                        run["impute_steps"], run.get("impute_k", 100), seed), None
        summary.update(imp[0])
        print(_imputation_line(imp[0]), flush=True)
    except FloatingPointError as e:  # the model overflows: summary.json still records what is known (null + listed)
        failed, summary["impute_mse_vae"] = e, float("nan")
    try:
        common.write_summary(out, summary)
    except FloatingPointError as e:
        raise FloatingPointError(f"{e}" + (f"; {failed}" if failed else "")) from None
    if not args.no_plots:
        common.stage_figures(out, args)
        _figures(model, run, out, records, summary, x_te, y_te, imp)
    return 0


def active_units(model, x, threshold=0.01, batch=1000):
    """Latent dimensions in use (Burda et al. 2016): A_u = Cov_x(E_q[z_u | x]) > ``threshold``, the variance
    over the images x of the posterior mean; an unused dimension has q(z_u|x) = p(z_u) for every x."""
    mu = np.concatenate([backend.to_host(model.encode(x[s:s + batch])[0]) for s in range(0, len(x), batch)])
    return int((mu.astype(np.float64).var(axis=0) > threshold).sum())


def _summary(model, run, records, test_x):
    """summary.json of a VAE run: the last test -ELBO and, on ``iwae_n`` test images, the IWAE
    estimate test_nll of -log p(x) (test_ll = -test_nll) beside the ELBO on the same images."""
    seed = run["seed"]
    summary = {"epochs": run["epochs"], "test_n": len(test_x), "active_units": active_units(model, test_x)}
    if records:
        summary.update({k: records[-1][k] for k in ("test_nelbo", "test_recon", "test_kl") if k in records[-1]})
    n_iw = min(run["iwae_n"], len(test_x))
    if n_iw:
        summary.update(iwae_k=run["iwae_k"], iwae_n=n_iw,
                       test_nelbo_iwae_subset=evaluate_nelbo(model, test_x[:n_iw], seed)["nelbo"])
        summary["test_ll"] = iwae(model, test_x[:n_iw], run["iwae_k"], seed)
        summary["test_nll"] = -summary["test_ll"]
        print(f"test -ELBO {summary['test_nelbo_iwae_subset']:.3f}   IWAE -log p(x) (k={run['iwae_k']}) "
              f"{summary['test_nll']:.3f}  nats/image on {n_iw} test images", flush=True)
    return summary


def _figures(model, run, out, records, summary, x_te, y_te, imp):
    from ..plots import vae as P

    _, masked, imputed, cond = imp
    P.curves(records, os.path.join(out, "curves.png"), summary)
    P.reconstructions(model, x_te[:20], os.path.join(out, "reconstructions.png"))
    P.samples(model, os.path.join(out, "samples.png"), rng=run["seed"])
    a, b = _pairs(y_te)
    P.interpolation(model, x_te[a], x_te[b], os.path.join(out, "interpolation.png"))
    P.imputation(x_te[:10], masked[:10], imputed[:10], os.path.join(out, "imputation.png"),
                 cond_mean=None if cond is None else cond[:10],
                 title=f"imputation of rows {run['impute_rows'][0]}-{run['impute_rows'][1] - 1} "
                       f"({run['impute_steps']} encode/decode steps)", shape=model_image_shape(model))
    if model.likelihood == "gaussian":
        P.mean_and_std(model, os.path.join(out, "decoder_std.png"), rng=run["seed"])
    if model.z_dim == 2:
        P.latent_scatter(model, x_te[:5000], y_te[:5000], os.path.join(out, "latent.png"))
        P.manifold(model, os.path.join(out, "manifold.png"))
    elif model.z_dim == 3:
        P.latent_scatter_3d(model, x_te[:5000], y_te[:5000], os.path.join(out, "latent3d.png"))
    print(f"figures in {out}", flush=True)


def _pairs(labels, n=5):
    """Indices (a, b) of n pairs of test digits of different classes (the first image of each class)."""
    firsts = {}
    for i, c in enumerate(np.asarray(labels)):
        firsts.setdefault(int(c), i)
    classes = sorted(firsts)
    nc = len(classes)
    if nc < 2:
        idx = list(range(min(2 * n, len(labels))))
        return idx[0::2], idx[1::2]
    return ([firsts[classes[i % nc]] for i in range(n)], [firsts[classes[(i + nc // 2) % nc]] for i in range(n)])


# -- npdgm impute --------------------------------------------------------------------------------
def _rundir(path):
    return path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))


def cmd_impute(args):
    setup_backend(args)
    if args.out:
        common.check_out_file(args.out, "--out")
    model, meta = common.load_vae(args.rundir)
    row_mask(1, args.rows, model_image_shape(model))
    run = common.run_args(meta)
    data = args.data or run.get("data")
    binz, seed = run.get("binarize", "none"), run.get("seed", 0)
    x_tr, _ = common.load_image_data(data, "train", run.get("train_limit"), binz, seed, colour=True)
    x_te, _ = common.load_image_data(data, "test", None, binz, seed, colour=True)
    if x_te.shape[1] != model.x_dim:
        raise ValueError(f"--data {data} holds {x_te.shape[1]}-value images; the VAE in {args.rundir} models "
                         f"{model.x_dim} ({'x'.join(map(str, model_image_shape(model)))})")
    x = x_te[:args.n]
    m, masked, imputed, cond = imputation_errors(model, x, x_tr.mean(axis=0), args.rows, args.steps, args.k, seed)
    print(_imputation_line(m))
    if args.show:
        from ..plots import vae as P

        out = args.out or os.path.join(_rundir(args.rundir), "imputation.png")
        k = min(args.show, len(x))
        P.imputation(x[:k], masked[:k], imputed[:k], out, cond_mean=None if cond is None else cond[:k],
                     title=f"imputation of rows {args.rows[0]}-{args.rows[1] - 1} ({args.steps} steps)",
                     shape=model_image_shape(model))
        print(out)
    return 0
