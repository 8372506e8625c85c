"""``npdgm train m1``: M1 (Kingma et al. 2014), a VAE's latent means as features for a classifier.

    npdgm train m1 --vae runs/vae --labels 100 --out runs/m1        # features of a trained VAE run
    npdgm train m1 --labels 100 --data mnist --epochs 30 --out runs/m1   # train the VAE first (OUT/vae)
    npdgm train m2 --features m1:runs/m1 --labels 100 ...             # M1+M2: M2 on the M1 codes

Without ``--vae`` the VAE is trained first, into OUT/vae, with the ``npdgm train vae`` options (defaults as in
the paper: --hidden 600 600, --z-dim 50, softplus, dynamic binarization); ``npdgm train vae --resume OUT/vae``
continues it. M1 then maps every image to mu(x) = E_q[z|x] (the VAE run's data, binarization and limits;
``dynamic``: one fixed Bernoulli draw per image, training and test images alike), keeps the active units
(std over the training images of mu_j(x) > --active-std, as Kingma et al.'s code does; m1.json records them
and ``--features m1:OUT`` gives M2 these units alone), centers the codes and
divides them by one scale (the root mean variance over all training images; one scale, not one per
dimension, so inactive latent units stay near 0: :func:`npdgm.models.m1.standardizer`), and fits softmax
regression with an L2 penalty (:mod:`npdgm.models.m1`, which says why not an SVM) on the --labels labelled
images (balanced, chosen by --seed: :func:`balanced_labels`, which ``npdgm train m2`` uses too) among the
training images that ``--val`` leaves (:func:`validation_split`; the held-out ones give val_error). --l2 cv
(the default) picks the penalty by 5-fold cross-validation on the labelled images alone. The labelled-only
baseline is the same classifier, penalty chosen the same way, on the raw pixels of the same labelled images.

OUT gets m1.json (the VAE checkpoint and its sha256: what ``--features m1:OUT`` loads and checks) and
summary.json (test_error, val_error, baseline_test_error, the penalties and their cross-validated errors).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from ..data import sha256_file
from . import common
from .common import setup_backend

PAPER_DEFAULTS = {"hidden": [600, 600], "z_dim": 50, "activation": "softplus", "binarize": "dynamic"}


_VAE_ONLY = set()     # the train vae options: they shape the VAE that m1 trains, so --vae refuses them
_NOT_VAE_ONLY = {"data", "seed", "out", "overwrite", "resume", "backend", "no_progress", "no_plots"}


def register(commands, train_commands):
    from .vae import add_vae_options

    p = train_commands.add_parser(
        "m1", help="M1: a VAE's latent means as features for a classifier trained on a few labels",
        description="M1 (Kingma et al. 2014): encode every image with a VAE (given by --vae, or trained first with "
                    "the train vae options into OUT/vae), fit L2-penalized softmax regression on the codes mu(x) of "
                    "the --labels labelled images, report the test error beside the same classifier on raw pixels.")
    m = common.group(p, "model")
    m.add_argument("--vae", metavar="RUN", default=None,
                   help="a trained VAE run directory or checkpoint (default: train one into OUT/vae first)")
    m.add_argument("--labels", type=common.positive_int, default=100,
                   help="labelled training images, balanced over the 10 classes (default 100)")
    m.add_argument("--val", type=common.nonneg_int, default=None, metavar="N",
                   help="validation images held out of the labelled pool; the classifier's error on them is "
                        "reported as val_error (default: a sixth of the training images, 10000 of MNIST's 60000; "
                        "0: none)")
    m.add_argument("--l2", default="cv", type=_l2_type,
                   help="L2 penalty of the classifier, or cv: the best of 1e-6 .. 1 by 5-fold cross-validation "
                        "on the labelled images (default cv)")
    m.add_argument("--active-std", type=common.nonneg_float, default=0.1, metavar="S",
                   help="keep the latent units whose posterior mean mu_j(x) has a standard deviation over the "
                        "training images above S (the active units; Kingma et al.'s code: 0.1) as the features, "
                        "here and for M1+M2 (npdgm train m2 --features m1:OUT); 0 keeps every unit (default 0.1)")
    before = {a.dest for a in p._actions}
    add_vae_options(p)
    common.add_train_args(p, epochs=10, batch_size=128, lr=1e-3)
    _VAE_ONLY.update({a.dest for a in p._actions} - before - _NOT_VAE_ONLY)
    for a in p._actions:   # the paper's VAE for M1 (600-600 softplus, 50 latent, binarized MNIST)
        if a.dest in PAPER_DEFAULTS:
            a.default = PAPER_DEFAULTS[a.dest]
            a.help = a.help.split(" (default")[0] + " (default " + (
                " ".join(map(str, a.default)) if isinstance(a.default, list) else str(a.default)) + " for M1)"
    p.set_defaults(func=cmd_train, epochs=None)


def _l2_type(s):
    import argparse

    if s == "cv":
        return s
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be cv or a number >= 0, got {s!r}") from None
    if not np.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"must be cv or a number >= 0, got {s}")
    return v


def balanced_labels(y, n, num_classes=10, seed=0):
    """Indices of n training examples, n / num_classes of each class, drawn without replacement
    (seeded); sorted. ValueError when n is not a positive multiple of num_classes, exceeds the
    data, or a class has too few examples."""
    y = np.asarray(y)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"--labels must be a positive integer, got {n!r}")
    if n > len(y):
        raise ValueError(f"--labels {n} exceeds the {len(y)} training images")
    if n % num_classes:
        raise ValueError(f"--labels {n} cannot be balanced over {num_classes} classes; use a multiple of "
                         f"{num_classes} (e.g. {max(num_classes, n - n % num_classes)})")
    per = n // num_classes
    rng = np.random.default_rng([seed, 11])
    out = []
    for c in range(num_classes):
        pool = np.flatnonzero(y == c)
        if len(pool) < per:
            raise ValueError(f"--labels {n} needs {per} images of class {c} but the training set has {len(pool)}")
        out.append(rng.choice(pool, per, replace=False))
    return np.sort(np.concatenate(out))


def validation_size(n_train, val=None):
    """The --val count for ``n_train`` training images: ``val`` (0: no split), or by default a sixth of them
    (10000 of MNIST's 60000). ValueError when it leaves fewer than 10 training images."""
    val = n_train // 6 if val is None else val
    if val and n_train - val < 10:
        raise ValueError(f"--val {val} leaves {n_train - val} of the {n_train} training images for training; "
                         f"lower --val")
    return val


def validation_split(n_train, val, seed=0):
    """(train indices, validation indices) of ``n_train`` training examples: ``val`` of them drawn without
    replacement (seeded), disjoint from the rest; both sorted. The labelled subset (:func:`balanced_labels`)
    is then drawn from the training part, and the epoch (m2) is chosen on the validation part."""
    held = np.sort(np.random.default_rng([seed, 17]).choice(n_train, val, replace=False))
    keep = np.ones(n_train, bool)
    keep[held] = False
    return np.flatnonzero(keep), held


def chosen_epoch(records, key="val_error"):
    """The record of the epoch with the lowest ``key`` (the earliest of ties); None when no record has it."""
    have = [r for r in records if r.get(key) is not None]
    return min(have, key=lambda r: (r[key], r["epoch"])) if have else None


# -- the link from an M1 run to its VAE: path + checksum ------------------------------------------
def vae_checkpoint(path):
    """The checkpoint file of a VAE run directory or checkpoint path (ValueError when absent)."""
    p = os.path.join(path, "checkpoint.npz") if os.path.isdir(path) else path
    if not os.path.isfile(p):
        raise ValueError(f"{path}: no VAE checkpoint there (expected a run directory with checkpoint.npz)")
    return p


def resolve_m1(run):
    """(VAE checkpoint path, its sha256 as the M1 run recorded it, the kept latent units or None) of ``run``: an
    M1 run directory (its m1.json) or a VAE run directory / checkpoint itself (sha256 of the file now, every
    unit)."""
    rec = os.path.join(run, "m1.json") if os.path.isdir(run) else None
    if rec and os.path.isfile(rec):
        with open(rec) as f:
            meta = json.load(f)
        p = meta.get("vae")
        if not isinstance(p, str) or not isinstance(meta.get("vae_sha256"), str):
            raise ValueError(f"{rec} names no VAE checkpoint and checksum (vae, vae_sha256)")
        keep = meta.get("keep")
        if keep is not None and (not isinstance(keep, list) or not all(isinstance(k, int) for k in keep)):
            raise ValueError(f"{rec}: keep must be a list of latent unit indices, got {keep!r}")
        return (p if os.path.isabs(p) else os.path.join(run, p)), meta["vae_sha256"], keep
    if not os.path.exists(run):
        raise ValueError(f"M1 run {run} does not exist")
    p = vae_checkpoint(run)
    return p, sha256_file(p), None


def load_m1_vae(run, expect_sha256=None, prune=True):
    """The VAE of the M1 run ``run`` (see :func:`resolve_m1`), with (path, sha256): restricted to the active
    latent units the M1 run kept (m1.json "keep", :func:`npdgm.models.m1.prune_latents`) unless ``prune`` is
    False. ValueError when its checkpoint is missing, differs from the checksum recorded in m1.json, or from
    ``expect_sha256`` (the one an M1+M2 run stored when it started): the codes M2 learned on would not be these."""
    from ..models.m1 import prune_latents

    path, sha, keep = resolve_m1(run)
    if not os.path.isfile(path):
        raise ValueError(f"M1 run {run}: its VAE checkpoint {path} is missing")
    now = sha256_file(path)
    if now != sha:
        raise ValueError(f"M1 run {run}: its VAE checkpoint {path} changed since the M1 run recorded it (sha256 "
                         f"{now[:12]}.. != {sha[:12]}..); train M1 again or restore that checkpoint")
    if expect_sha256 is not None and now != expect_sha256:
        raise ValueError(f"M1 run {run}: its VAE checkpoint {path} is not the one this run was trained on (sha256 "
                         f"{now[:12]}.. != {expect_sha256[:12]}..); the features would differ: restore it, or "
                         f"start a new run")
    model, meta = common.load_vae(path)
    if prune and keep is not None and len(keep) < model.z_dim:
        model = prune_latents(model, keep)
    return model, meta, path, now


def vae_run_data(meta, data=None):
    """(data, binarize, train_limit, test_limit, seed) of the VAE run in checkpoint ``meta``."""
    run = common.run_args(meta)
    return (data or run.get("data"), run.get("binarize", "none"), run.get("train_limit"), run.get("test_limit"),
            run.get("seed", 0))


def load_images(data, split, limit, binarize, seed):
    """Images for M1 features: as the VAE run saw them, ``dynamic`` binarization as one fixed draw per image
    (the test set's is the one every command uses; the training set's is seeded [seed, 8])."""
    from ..data import binarize as _binarize

    x, y = common.load_image_data(data, split, limit, binarize, seed)
    if binarize == "dynamic" and split == "train":
        x = _binarize(x, np.random.default_rng([seed, 8]))
    return x, y


# -- npdgm train m1 ---------------------------------------------------------------------------------
def _train_vae(args, out):
    """Train the M1 VAE into OUT/vae with the train vae options of ``args``; returns its directory."""
    import copy

    from . import vae as V

    a = copy.copy(args)
    a.out, a.resume, a.typed, a.model = os.path.join(out, "vae"), None, set(), "vae"
    print(f"m1: training the VAE into {a.out}", flush=True)
    V.cmd_train(a)
    return a.out


def fit_m1(X_lab, y_lab, X_te, y_te, l2, seed, name):
    """Softmax regression on (X_lab, y_lab) (penalty ``l2`` or cross-validated), its test error on
    (X_te, y_te). Returns a dict of results keyed with ``name``."""
    from ..models.m1 import L2_GRID, SoftmaxRegression, choose_l2

    t0 = time.perf_counter()
    cv = None
    if l2 == "cv":
        l2, cv = choose_l2(X_lab, y_lab, 10, seed=seed)
    clf = SoftmaxRegression(10, l2).fit(X_lab, y_lab)
    res = {f"{name}test_error": clf.error_rate(X_te, y_te), f"{name}train_error": clf.error_rate(X_lab, y_lab),
           f"{name}l2": l2, f"{name}iterations": clf.info["iterations"],
           f"{name}seconds": round(time.perf_counter() - t0, 2)}
    if cv is not None:
        res[f"{name}cv_errors"] = {f"{k:g}": v for k, v in cv.items()}
        res[f"{name}l2_grid"] = [float(g) for g in L2_GRID]
    return res, clf


def m1_features(model, x_tr, x_te, active_std, path):
    """(train, test features, kept units, mean, scale): mu(x) of the active units (std over the training images
    > ``active_std``), centered and divided by one scale (:func:`npdgm.models.m1.standardizer`)."""
    from ..models.m1 import active_units, standardizer, vae_features

    f_tr, f_te = vae_features(model, x_tr), vae_features(model, x_te)
    keep = active_units(f_tr, active_std)
    if len(keep) == 0:
        raise ValueError(f"no latent unit of {path} has std_x mu_j(x) > {active_std:g} (--active-std): the VAE "
                         f"encodes nothing; train it longer or lower --active-std")
    f_tr, f_te = f_tr[:, keep], f_te[:, keep]
    mean, scale = standardizer(f_tr)
    return (f_tr - mean) / scale, (f_te - mean) / scale, keep, mean, scale


def _check_args(args):
    """Refuse what m1 cannot do before its run directory is made: --resume, VAE options beside --vae, a missing
    --vae run."""
    if args.resume:
        raise ValueError("npdgm train m1 has no --resume: continue its VAE with npdgm train vae --resume OUT/vae, "
                         "then run npdgm train m1 --vae OUT/vae")
    typed = getattr(args, "typed", set()) or set()
    if args.vae and typed & _VAE_ONLY:
        opt = "--" + sorted(typed & _VAE_ONLY)[0].replace("_", "-")
        raise ValueError(f"{opt} applies to the VAE that m1 trains without --vae; with --vae {args.vae} the VAE run's "
                         f"options and data are used (drop {opt})")
    if args.vae:
        resolve_m1(args.vae)


def cmd_train(args):
    setup_backend(args)
    _check_args(args)
    out = common.new_run_dir(args.out or common.default_out("m1"), args.overwrite, "m1")
    common.track(out, {}, 0)
    vae_dir = args.vae or _train_vae(args, out)
    common.track(out, {}, 0, note=f"{out} holds no M1 result yet; the VAE in {vae_dir} is trained: npdgm train m1 "
                                  f"--vae {vae_dir} --out NEWDIR fits the classifier on it")
    model, meta, path, sha = load_m1_vae(vae_dir, prune=False)
    data, binz, tr_lim, te_lim, vseed = vae_run_data(meta, args.data if args.vae else None)
    x_tr, y_tr = load_images(data, "train", tr_lim, binz, vseed)
    x_te, y_te = load_images(data, "test", te_lim, binz, vseed)
    val = validation_size(len(y_tr), args.val)
    tr, va = validation_split(len(y_tr), val, args.seed)
    lab = tr[balanced_labels(y_tr[tr], args.labels, 10, args.seed)]   # labelled images from the training part
    t0 = time.perf_counter()
    f_tr, f_te, keep, mean, scale = m1_features(model, x_tr, x_te, args.active_std, path)
    print(f"m1: features mu(x) of {len(x_tr)} training and {len(x_te)} test images from {path} (z_dim "
          f"{model.z_dim}, {len(keep)} active: std > {args.active_std:g}, {time.perf_counter() - t0:.1f} s); "
          f"classifier on {len(lab)} labelled images", flush=True)
    res, clf = fit_m1(f_tr[lab], y_tr[lab], f_te, y_te, args.l2, args.seed, "")
    base, base_clf = fit_m1(np.asarray(x_tr[lab], np.float64), y_tr[lab], np.asarray(x_te, np.float64), y_te,
                            args.l2, args.seed, "baseline_")
    if val:
        res["val_error"] = clf.error_rate(f_tr[va], y_tr[va])
        base["baseline_val_error"] = base_clf.error_rate(np.asarray(x_tr[va], np.float64), y_tr[va])
    rel = os.path.relpath(path, out)
    link = {"vae": rel if not rel.startswith("..") else os.path.abspath(path), "vae_sha256": sha,
            "labels": args.labels, "val": val, "seed": args.seed, "data": data, "binarize": binz,
            "active_std": args.active_std, "keep": [int(k) for k in keep]}
    common.write_json(os.path.join(out, "m1.json"), link)
    summary = {"classifier": "softmax regression, L2 (npdgm.models.m1)", "features": "VAE posterior mean mu(x) of the "
               "active units, centered, one scale", "feature_dim": int(len(keep)), "z_dim": int(model.z_dim),
               "active_std": args.active_std, "vae": link["vae"], "vae_sha256": sha,
               "labels": args.labels, "seed": args.seed, "test_n": len(x_te), "train_n": len(tr), "val_n": val,
               **res, **base,
               "baseline_input": "raw pixels"}
    common.write_summary(out, summary)
    from ..io import atomic_write_bytes

    atomic_write_bytes(os.path.join(out, "classifier.npz"),   # logits: ((mu - mean) / scale) W + b
                       lambda f: np.savez(f, W=clf.W, b=clf.b, mean=mean, scale=scale))
    print(f"M1 test error {res['test_error']:.4f} (l2 {res['l2']:g}" +
          (f", validation error {res['val_error']:.4f}" if val else "") + ")  vs labelled-only baseline on pixels "
          f"{base['baseline_test_error']:.4f} (l2 {base['baseline_l2']:g})  -> {out}", flush=True)
    return 0
