"""``npdgm train gmm``: a Gaussian mixture fitted by EM, the classical baseline beside the deep models.

    npdgm train gmm --dataset moons                        # K=10 full covariances on the flows' moons data
    npdgm train gmm --dataset spirals --components 32
    npdgm train gmm --dataset mnist                         # bundled subset: PCA to 50 dims, K=10
    npdgm train gmm --dataset mnist --data mnist --pca-dim 50 --components 20

A run directory gets checkpoint.npz (``npdgm.load`` rebuilds the model), metrics.jsonl and metrics.csv
(one record per EM iteration, iteration 0 = the initialization: train_nll / test_nll = mean negative
log-likelihood in nats per point), summary.json and the figures (docs/metrics.md lists every key).

2-D toys: the training and test points are drawn exactly as ``npdgm train flow2d`` draws them (same
seeds, same sizes), so the test NLL sits in the same column as the flows'.

MNIST: the pixels are uniformly dequantized once (the test set with the very noise ``npdgm train nice``
/ ``realnvp`` use at the same --seed), projected on the top --pca-dim principal components, and the mixture
is fitted there. The reported test_nll is a proper density on the 784 pixel dimensions: the mixture on
the PCA coordinates times a Gaussian on the 784 - d discarded directions (--residual full: each principal
direction keeps its own variance; isotropic: one shared variance, as probabilistic PCA). The change of
basis is a rotation (Jacobian 1), so it is comparable with the flows' NLL in nats per image and with
bits/dim = (NLL / 784 + log 256) / log 2. test_nll_pca, the mixture's NLL in the d PCA coordinates
alone, is a density on R^d, NOT comparable with pixel-space numbers.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

from .. import backend
from . import common
from .common import default_out, nonneg_float, nonneg_int, positive_int, setup_backend

from ..data import TOYS
from .flows import TOY_TEST, TOY_TRAIN, upgrade_run

DATASETS = TOYS + ("mnist",)


def register(commands, train_commands):
    p = train_commands.add_parser(
        "gmm", help="Gaussian mixture fitted by EM (2-D toys, or MNIST on PCA-reduced pixels)",
        description="Gaussian mixture p(x) = sum_k pi_k N(x; mu_k, Sigma_k) fitted by EM (closed-form E and M "
                    "steps, no gradients). On MNIST the mixture lives on the top --pca-dim principal components "
                    "and a Gaussian covers the discarded directions, so the test NLL is a density on the "
                    "(dequantized) pixels, comparable with the flows' NLL.")
    common.group(p, "data").add_argument("--dataset", choices=DATASETS, default="moons", help="default moons")
    g = common.group(p, "model")
    g.add_argument("--components", type=positive_int, default=10, help="mixture components K (default 10)")
    g.add_argument("--covariance-type", choices=("full", "diag", "spherical"), default="full", help="default full")
    g.add_argument("--init", choices=("kmeans", "k-means++", "random", "random_from_data"), default="kmeans",
                   help="initialization (default kmeans: k-means++ seeding then Lloyd iterations)")
    g.add_argument("--n-init", type=positive_int, default=1, help="initializations tried, best kept (default 1)")
    g.add_argument("--max-iter", type=positive_int, default=200, help="most EM iterations (default 200)")
    g.add_argument("--tol", type=nonneg_float, default=1e-4,
                   help="stop when the mean train log-likelihood changes by less than this (default 1e-4)")
    g.add_argument("--reg-covar", type=nonneg_float, default=1e-6, help="added to covariance diagonals (default 1e-6)")
    g.add_argument("--pca-dim", type=positive_int, default=50, help="MNIST: principal components kept (default 50)")
    g.add_argument("--residual", choices=("full", "isotropic"), default="full",
                   help="MNIST: Gaussian on the discarded directions: full (each keeps its own variance, the ML "
                        "Gaussian on the complement; default) or isotropic (one shared variance, as PPCA)")
    g.add_argument("--residual-reg", type=nonneg_float, default=1e-5,
                   help="MNIST: added to the variances of the discarded directions (default 1e-5, chosen on "
                        "held-out training images; the smallest are ~1e-6, pixels that are always black)")
    d = common.group(p, "data")
    common.add_data_arg(d)
    # --n-train / --n-test: the 2-D spelling of older versions, still accepted
    d.add_argument("--train-limit", "--n-train", type=positive_int, default=None, dest="train_limit", metavar="N",
                   help=f"MNIST: use the first N training images (default: all); 2-D: training points drawn "
                        f"(default {TOY_TRAIN}, as flow2d)")
    d.add_argument("--test-limit", "--n-test", type=positive_int, default=None, dest="test_limit", metavar="N",
                   help=f"MNIST: use the first N test images (default: all); 2-D: test points drawn "
                        f"(default {TOY_TEST}, as flow2d)")
    r = common.group(p, "run")
    r.add_argument("--seed", type=nonneg_int, default=0,
                   help="seed of the data draw, dequantization and init (default 0)")
    r.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend (default: $NPDGM_BACKEND or numpy)")
    r.add_argument("--dtype", choices=backend.DTYPES, default="float64",
                   help="float type of EM (default float64: covariance factorizations in 50-D want it)")
    common.add_run_dir_args(r, resume=False)
    r.add_argument("--distributed", action="store_true",
                   help="data-parallel EM over MPI ranks (default: on when started by mpiexec -n N, N > 1)")
    r.add_argument("--no-progress", action="store_true", help="no per-iteration log lines, no stage lines")
    r.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.set_defaults(func=cmd_train)


def _run_from_args(args):
    run = {k: getattr(args, k) for k in ("dataset", "components", "covariance_type", "init", "n_init", "max_iter",
                                         "tol", "reg_covar", "seed", "dtype")}
    if args.dataset == "mnist":
        run.update(pca_dim=args.pca_dim, residual=args.residual, residual_reg=args.residual_reg, data=args.data,
                   train_limit=args.train_limit, test_limit=args.test_limit)
    else:
        run.update(train_limit=args.train_limit or TOY_TRAIN, test_limit=args.test_limit or TOY_TEST)
    return run


def load_data(run):
    """(train, test) host float64 arrays. Toys: as flow2d draws them. MNIST: dequantized pixels in [0, 1)."""
    from ..data import check_unit_interval, dequantize, load_mnist, make_toy2d

    run, seed = upgrade_run(run), run["seed"]
    if run["dataset"] != "mnist":  # the same generators as npdgm train flow2d, so the test sets coincide
        return (make_toy2d(run["dataset"], run["train_limit"], np.random.default_rng([seed, 11])),
                make_toy2d(run["dataset"], run["test_limit"], np.random.default_rng([seed, 12])))
    x_tr, _ = load_mnist("train", run["data"], limit=run["train_limit"])
    x_te, _ = load_mnist("test", run["data"], limit=run["test_limit"])
    check_unit_interval("training images", x_tr)
    x_tr = dequantize(x_tr, np.random.default_rng([seed, 4]))
    x_te = dequantize(x_te, np.random.default_rng([seed, 5]))   # the flows' test noise at this seed
    return x_tr.astype(np.float64), x_te.astype(np.float64)


def build_model(run):
    from ..models.gmm import GaussianMixture, PCAGaussianMixture

    kw = dict(n_components=run["components"], covariance_type=run["covariance_type"], reg_covar=run["reg_covar"],
              tol=run["tol"], max_iter=run["max_iter"], init=run["init"], n_init=run["n_init"], seed=run["seed"])
    if run["dataset"] == "mnist":
        return PCAGaussianMixture(784, run["pca_dim"], residual=run["residual"], residual_reg=run["residual_reg"],
                                  **kw)
    return GaussianMixture(**kw)


def make_callback(model, train_x, test_x, out, mnist, log):
    """(callback(trial, it, ll) for ``model.fit``, records): each EM iteration's record (train/test
    NLL; on MNIST also the PCA-space NLLs and test bits/dim) appended to metrics.jsonl / .csv."""
    from ..models.flows import bits_per_dim
    from ..train import log_record

    records, const, t0 = [], {}, time.perf_counter()

    def test_terms():  # constant parts of the full-space density, once PCA has run (before the first callback)
        if not const:
            const.update(train_res=float(model.residual_logprob(train_x).mean()),
                         test_res=float(model.residual_logprob(test_x).mean()), test_z=model.project(test_x))
        return const

    def callback(trial, it, ll):
        rec = {"epoch": it, "iteration": it, "init": trial}
        if mnist:
            c = test_terms()
            ll_te_pca = model.gmm.score(c["test_z"])
            rec.update(train_nll=-(ll + c["train_res"]), test_nll=-(ll_te_pca + c["test_res"]),
                       train_nll_pca=-ll, test_nll_pca=-ll_te_pca)
            rec["test_bpd"] = bits_per_dim(rec["test_nll"], 784)
        else:
            rec.update(train_nll=-ll, test_nll=-model.score(test_x))
        rec["seconds"] = round(time.perf_counter() - t0, 3)
        log_record(out, rec, records)
        records.append(rec)
        if log:
            print("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()),
                  file=sys.stderr, flush=True)
    return callback, records


def cmd_train(args):
    setup_backend(args)
    run = _run_from_args(args)
    x_tr, x_te = load_data(run)
    mnist = run["dataset"] == "mnist"
    if mnist and run["pca_dim"] > x_tr.shape[1]:
        raise ValueError(f"--pca-dim must be <= {x_tr.shape[1]}, got {run['pca_dim']}")
    dt = backend.get_dtype()
    train_x, test_x = backend.to_device(x_tr, dt), backend.to_device(x_te, dt)
    out = common.new_run_dir(args.out or default_out(f"gmm-{run['dataset']}"), args.overwrite, "gmm")
    common.track(out, {}, 0)
    model = build_model(run)
    print(f"gmm on {run['dataset']}: K={run['components']} {run['covariance_type']}"
          + (f" on PCA-{run['pca_dim']}" if mnist else "")
          + f"  train {len(x_tr)}  test {len(x_te)}  backend {backend.get_backend()} {dt}  -> {out}", flush=True)
    callback, records = make_callback(model, train_x, test_x, out, mnist, not args.no_progress)
    t0 = time.perf_counter()
    model.fit(train_x, callback=callback if common.is_root() else None, comm=common.world())  # EM split over ranks
    if not common.is_root():
        return 0
    model.save(os.path.join(out, "checkpoint.npz"), extra_meta={"run": {"args": run}})
    summary = _summary(model, run, train_x, test_x, t0)
    common.write_summary(out, summary)
    gm = model.gmm if mnist else model
    msg = (f"EM: {gm.n_iter_} iterations ({'converged' if gm.converged_ else 'max-iter reached'}); "
           f"train NLL {summary['train_nll']:.4f}  test NLL {summary['test_nll']:.4f} nats per point")
    if mnist:
        msg += (f" on [0,1]^784 ({summary['test_bpd']:.4f} bits/dim); in the {run['pca_dim']}-d PCA space alone "
                f"{summary['test_nll_pca']:.2f} nats (not comparable with pixel-space NLLs)")
    print(msg, flush=True)
    if not args.no_plots:
        common.stage_figures(out, args)
        _figures(model, run, out, records, summary, x_te)
    return 0


def _summary(model, run, train_x, test_x, t0):
    from ..models.flows import bits_per_dim

    mnist = run["dataset"] == "mnist"
    gm = model.gmm if mnist else model
    test_ll = model.score(test_x)
    summary = {"model": "gmm", "dataset": run["dataset"], "components": run["components"],
               "covariance_type": run["covariance_type"], "n_iter": gm.n_iter_, "converged": gm.converged_,
               "parameters": model.n_parameters(), "train_n": len(train_x), "test_n": len(test_x),
               "train_nll": -model.score(train_x), "test_nll": -test_ll, "test_ll": test_ll,
               "seconds": round(time.perf_counter() - t0, 3)}
    if mnist:
        summary.update(pca_dim=run["pca_dim"], residual=run["residual"], residual_reg=run["residual_reg"],
                       test_bpd=bits_per_dim(-test_ll, 784),
                       test_nll_pca=-float(model.score_samples_pca(test_x).mean()),
                       nll_space=f"dequantized pixels [0,1]^784 (PCA mixture x {run['residual']} Gaussian on the "
                                 "orthogonal complement); test_nll_pca is on the PCA coordinates only")
    else:
        summary.update(bic=gm.bic(train_x), nll_space="R^2 (nats per point)")
    return summary


def _figures(model, run, out, records, summary, x_te):
    from ..plots import gmm as P

    finals = {}
    for r in records:
        finals[r["init"]] = r["train_nll"]
    best = min(finals, key=finals.get) if finals else 0
    last = [r for r in records if r["init"] == best]   # the curve of the initialization that was kept
    if run["dataset"] == "mnist":
        P.mnist_figures(model, os.path.join(out, "means.png"), os.path.join(out, "samples.png"), seed=run["seed"])
    else:
        P.gmm2d_panels(model, x_te, os.path.join(out, "density.png"), seed=run["seed"],
                       title=f"{run['dataset']}: GMM K={run['components']} {run['covariance_type']}, "
                             f"test NLL {summary['test_nll']:.3f} nats")
    P.em_curves(last, os.path.join(out, "curves.png"), title=f"EM on {run['dataset']} (iteration 0 = initialization)")
    print(f"figures in {out}", flush=True)
