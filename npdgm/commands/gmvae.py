"""``npdgm train gmvae``: a VAE with a learned Gaussian-mixture prior on MNIST, and how well its components cluster.

    npdgm train gmvae                                    # bundled 10k/2k MNIST subset, offline
    npdgm train gmvae --data mnist --epochs 20 --components 10 --z-dim 10 --out runs/gmvae

The run directory gets checkpoint.npz, metrics.jsonl / metrics.csv (train_* over the epoch's batches; test_nelbo,
test_recon, test_kl and test_cluster_acc on the test set), summary.json (the last test terms, the cluster accuracy
and purity of argmax_c p(c | mu(x)) against the digit labels, the component -> digit map, the IWAE -log p(x)) and
the figures curves.png, clusters.png (the test codes' means in 2-D, coloured by digit and by component) and
components.png (samples of every component).
"""
from __future__ import annotations

import os

import numpy as np

from .. import backend
from . import common
from .common import add_train_args, nonneg_float, nonneg_int, positive_int, setup_backend
from .cvae import add_data_args
from .vae import evaluate_nelbo

DEFAULT_EPOCHS = 10
MODEL_KEYS = ("z_dim", "hidden", "components", "activation", "weights", "prior_scale", "n_samples", "beta", "init")
RUN_KEYS = ("data", "binarize", "train_limit", "test_limit", "epochs", "batch_size", "lr", "clip", "seed", "dtype",
            "iwae_k", "iwae_n")


def register(commands, train_commands):
    p = train_commands.add_parser(
        "gmvae", help="VAE with a Gaussian-mixture prior (clusters) on MNIST",
        description="Train a VAE whose prior is a learned mixture of C Gaussians, p(z) = sum_c pi_c N(m_c, "
                    "diag e^s_c), on MNIST with hand-written gradients (KL by one-sample Monte Carlo). Loss = -ELBO "
                    "in nats per image; the components are scored as clusters of the digits.")
    g = common.group(p, "model")
    g.add_argument("--z-dim", type=positive_int, default=10, help="latent size (default 10)")
    g.add_argument("--components", type=positive_int, default=10, help="mixture components C (default 10)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[400], metavar="H",
                   help="encoder hidden sizes; the decoder uses them reversed (default 400)")
    g.add_argument("--activation", default="relu", choices=["relu", "tanh", "leaky_relu", "elu", "softplus", "sigmoid"],
                   help="hidden-layer nonlinearity (default relu)")
    g.add_argument("--weights", choices=["uniform", "learned"], default="uniform",
                   help="mixture weights pi: uniform 1/C, or learned softmax logits (default uniform)")
    g.add_argument("--prior-scale", type=nonneg_float, default=1.0,
                   help="std of the initial component means m_c ~ N(0, s^2 I) (default 1)")
    g.add_argument("--n-samples", type=positive_int, default=1, help="noise samples per image in the loss (default 1)")
    g.add_argument("--beta", type=nonneg_float, default=1.0, help="weight of the KL term (default 1)")
    g.add_argument("--init", default="torch", help="weight init (default torch)")
    add_data_args(p)
    e = common.group(p, "evaluation")
    e.add_argument("--iwae-k", type=positive_int, default=100, help="importance samples for log p(x) (default 100)")
    e.add_argument("--iwae-n", type=nonneg_int, default=500, help="test images for the IWAE estimate (default 500; "
                                                                  "0 skips it)")
    add_train_args(p, epochs=DEFAULT_EPOCHS, batch_size=128, lr=1e-3)
    p.set_defaults(func=cmd_train, epochs=None)


def cluster_scores(model, x, labels, batch=1000):
    """{"cluster_acc", "purity", "cluster_map"} of the components argmax_c p(c | mu(x)) against ``labels``, and the
    components (host array)."""
    from ..cluster import cluster_accuracy, purity

    comp = np.concatenate([model.predict(x[s:s + batch]) for s in range(0, len(x), batch)])
    labels = np.asarray(labels).astype(np.int64)
    acc, mapping = cluster_accuracy(comp, labels)
    return {"cluster_acc": acc, "purity": purity(comp, labels),
            "cluster_map": {str(k): v for k, v in sorted(mapping.items())}}, comp


def _iwae_and_report(model, test_x, run, summary, scores):
    """Add the IWAE -log p(x) of the first --iwae-n test images to ``summary``; print the run's last line."""
    n_iw = min(run["iwae_n"], len(test_x))
    if n_iw:
        g = np.random.default_rng([run["seed"], 2])
        ll = np.concatenate([np.asarray(backend.to_host(model.log_likelihood(test_x[s:min(s + 100, n_iw)],
                                                                             run["iwae_k"], rng=g)))
                             for s in range(0, n_iw, 100)])
        summary.update(iwae_k=run["iwae_k"], iwae_n=n_iw, test_nll=-float(ll.mean()))
    print(f"test -ELBO {summary.get('test_nelbo', float('nan')):.3f} nats/image   cluster accuracy "
          f"{scores['cluster_acc']:.3f}  purity {scores['purity']:.3f} ({model.components} components, "
          f"{len(test_x)} test digits)" + (f"   IWAE -log p(x) (k={run['iwae_k']}) {summary['test_nll']:.3f}"
                                           if n_iw else ""), flush=True)


def _figures(model, out, args, records, summary, x_te, y_te, comp, scores, seed):
    """curves.png, clusters.png (latent means by label and by component), components.png."""
    from ..plots import gmvae as PG
    from ..plots import vae as PV

    common.stage_figures(out, args)
    PV.curves(records, os.path.join(out, "curves.png"), summary)
    n = min(len(x_te), 5000)
    PG.clusters(model, x_te[:n], y_te[:n], comp[:n], os.path.join(out, "clusters.png"), acc=scores["cluster_acc"])
    PG.components(model, os.path.join(out, "components.png"), rng=seed)
    print(f"figures in {out}", flush=True)


def cmd_train(args):
    from ..models.gmvae import GMVAE

    setup_backend(args)
    cfg = {k: getattr(args, k) for k in MODEL_KEYS}
    r = common.resume_or_new(args, "gmvae", RUN_KEYS, DEFAULT_EPOCHS,
                             lambda run: GMVAE(x_dim=784, seed=run["seed"], **cfg))
    if r is None:
        return 0
    model, run, out = r
    seed = run["seed"]
    x_tr, _ = common.load_image_data(run["data"], "train", run["train_limit"], run["binarize"], seed)
    x_te, y_te = common.load_image_data(run["data"], "test", run["test_limit"], run["binarize"], seed)
    train_x, test_x = model.check_x(x_tr, "training images"), model.check_x(x_te, "test images")
    opt, rng, start = common.start_training(model, run, out, args.resume)
    print(f"gmvae {model.config}  {model.num_parameters()} parameters  train {len(train_x)}  test {len(test_x)}  "
          f"backend {backend.get_backend()} {model.dtype}  -> {out}", flush=True)
    step = common.binarizing_step(model, run["binarize"] == "dynamic")

    def evaluate(epoch):
        m = evaluate_nelbo(model, test_x, seed, comm=common.world())
        m["cluster_acc"] = cluster_scores(model, test_x, y_te)[0]["cluster_acc"]
        return m

    records = common.fit(model, opt, rng, start, run, out, args, step, evaluate, train_x)
    if not common.is_root():
        return 0
    scores, comp = cluster_scores(model, test_x, y_te)
    summary = {"epochs": run["epochs"], "test_n": len(test_x), "components": model.components, **scores}
    if records:
        summary.update({k: records[-1][k] for k in ("test_nelbo", "test_recon", "test_kl") if k in records[-1]})
    _iwae_and_report(model, test_x, run, summary, scores)
    common.write_summary(out, summary)
    if not args.no_plots:
        _figures(model, out, args, records, summary, x_te, y_te, comp, scores, seed)
    return 0
