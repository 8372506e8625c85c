"""``npdgm train m2``: the semi-supervised VAE M2 (Kingma et al. 2014) with a few labels.

    npdgm train m2 --labels 100                                   # bundled 10k/2k subset, offline
    npdgm train m2 --labels 100 --data mnist --epochs 30 --out runs/m2-100
    npdgm train m2 --resume runs/m2-100 --epochs 60               # continue bit-for-bit

``--labels N`` keeps the labels of N training images, N/10 per class (seeded by --seed); every
training image is used as unlabelled data. Each step takes --batch-size unlabelled images (an epoch is
one pass over them) and --labelled-batch labelled images drawn with replacement from the N (resampled
every step). Inputs are binarized dynamically by default (a fresh Bernoulli(x) draw each time an image
is used; the test set is drawn once).

Step loss (see :class:`npdgm.models.m2.M2`), N training images of which N_l labelled:

    lambda_l * mean_l [-ELBO_beta(x, y)] + alpha * lambda_l * mean_l CE(q(y|x), y) + mean_u U_beta(x)
    lambda_l = min(1, K N_l / N)          K = --label-boost, alpha = --alpha (default 0.1 N / N_l)

K = 1 is the paper's objective (the data-set sum divided by N, every image counted once, the paper's
alpha = 0.1 N on the mean cross-entropy); K = N / N_l weighs the labelled and unlabelled batches alike.
--beta weighs the KL term inside -ELBO while training (reported bounds use beta = 1).

``--val N`` (default: a sixth of the training images, 10000 of MNIST's 60000; 0: none) holds N training images
out, neither labelled nor unlabelled data; each epoch logs their classification error (val_error), and
summary.json reports the epoch with the lowest one (chosen_epoch) and its test error (test_error_at_chosen_epoch)
beside the last epoch's. ``--beta 1 --label-boost 1`` is M2 as published; --beta 3 (the default) makes class
information dearer in z than in y, so the decoder uses y, and --label-boost 100 weighs the labelled batch.

M1+M2 (``--features m1:RUN``, RUN an ``npdgm train m1`` run or a VAE run): M2 learns on the latent codes of
the M1 VAE instead of pixels, on the active units the M1 run kept. ``--m1-codes fixed`` (the default, as Kingma
et al.'s code): q(z1|x) = (mu, logvar) of every training image is computed once (one fixed binarization, the one
M1 uses) and each step draws z1 ~ q(z1|x) from it; ``step``: each step binarizes and encodes its images afresh.
The test codes are the means mu(x); M2's decoder is Gaussian with a learned per-dimension
variance (``M2(likelihood="gaussian")``). The checkpoint stores the VAE checkpoint's path and sha256:
--resume and ``npdgm evaluate RUN --method classify`` refuse a missing or changed M1 VAE.

Before training, a baseline is trained in the same run: the same classifier architecture on the N
labelled images alone (cross-entropy, Adam, the same input binarization), and its test error is kept in
baseline.json / summary.json and drawn in curves.png beside M2's test error per epoch.

metrics.jsonl (and metrics.csv) per epoch: train_* averaged over the epoch's steps (labelled = mean L(x, y),
ce, unlabelled = mean U(x), both with the KL weighted by beta; entropy, acc_l), test_error (classifier on every
test image), test_nelbo_xy (mean -ELBO(x, y) with the true labels) and test_nelbo_x (mean U(x) >= -log p(x)) on
--eval-n test images, in nats per image.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .. import backend
from . import common
from .common import add_train_args, nonneg_float, nonneg_int, positive_float, positive_int, setup_backend
from .cvae import add_data_args, conditional_figures
from .m1 import balanced_labels  # noqa: F401  (npdgm.commands.m2.balanced_labels: the labelled subset of m1 and m2)
from .m1 import chosen_epoch, validation_size, validation_split

DEFAULT_EPOCHS = 10
DEFAULT_LABEL_BOOST = 100.0
DEFAULT_BETA = 3.0
RUN_KEYS = ("data", "binarize", "train_limit", "test_limit", "epochs", "batch_size", "lr", "clip", "seed", "dtype",
            "labels", "labelled_batch", "eval_n", "baseline_steps", "baseline_lr", "features", "m1_codes", "val")


def register(commands, train_commands):
    p = train_commands.add_parser(
        "m2", help="semi-supervised VAE M2 on MNIST with few labels",
        description="Train M2 (Kingma et al. 2014): classifier q(y|x), q(z|x,y), p(x|y,z), uniform p(y); labelled "
                    "loss -ELBO(x,y) + alpha CE, unlabelled loss sum_y q(y|x) (-ELBO(x,y)) - H(q(y|x)) summed over "
                    "all classes exactly. Reports the test classification error each epoch and a labelled-only "
                    "baseline classifier.")
    g = common.group(p, "model")
    g.add_argument("--labels", type=positive_int, default=100,
                   help="number of labelled training images, balanced over the 10 classes (default 100)")
    g.add_argument("--alpha", type=nonneg_float, default=None,
                   help="weight of a labelled image's cross-entropy relative to its -ELBO (default 0.1 N/N_labels: "
                        "the paper's alpha = 0.1 N on the mean cross-entropy; on --resume the stored value)")
    g.add_argument("--label-boost", type=positive_float, default=DEFAULT_LABEL_BOOST,
                   help="labelled images count this many times in the data-set objective: the mean labelled "
                        "-ELBO gets weight K N_labels/N per step, the mean cross-entropy alpha times that "
                        f"(1 = the paper's objective; N/N_labels = labelled and unlabelled batches weighted "
                        f"alike; default {DEFAULT_LABEL_BOOST:g})")
    g.add_argument("--beta", type=nonneg_float, default=DEFAULT_BETA,
                   help="weight of the KL term inside -ELBO(x,y) during training (1 = M2 as published; > 1 makes "
                        "class information dearer in z than in y, so the decoder uses y; default %(default)g). "
                        "Reported bounds always use 1")
    g.add_argument("--z-dim", type=positive_int, default=50, help="latent size (default 50, as in the paper)")
    g.add_argument("--hidden", type=positive_int, nargs="+", default=[500], metavar="H",
                   help="encoder hidden sizes, decoder reversed (default 500, as in the paper)")
    g.add_argument("--classifier-hidden", type=positive_int, nargs="+", default=None, metavar="H",
                   help="classifier hidden sizes (default: the --hidden sizes)")
    g.add_argument("--activation", default="softplus",
                   choices=["relu", "tanh", "leaky_relu", "elu", "softplus", "sigmoid"], help="default softplus")
    g.add_argument("--init", default="torch", help="weight init (default torch)")
    g.add_argument("--features", default=None, metavar="m1:RUN",
                   help="M1+M2: train M2 on the latent codes z1 ~ q(z1|x) of the VAE of the M1 run RUN (npdgm train "
                        "m1, or a VAE run), drawn afresh each step, with a Gaussian decoder (default: pixels)")
    g.add_argument("--m1-codes", choices=["fixed", "step"], default="fixed",
                   help="M1+M2: fixed = q(z1|x) (mu, logvar) of every training image computed once (one fixed "
                        "binarization, as M1 encodes them and as Kingma et al.'s code does), z1 drawn from it each "
                        "step; step = binarize and encode the images afresh each step (the M1 VAE's forward pass "
                        "in every step, ~1/3 of its time) (default fixed)")
    g.add_argument("--labelled-batch", type=positive_int, default=None,
                   help="labelled images per step, drawn with replacement (default: the --batch-size value)")
    _add_evaluation_args(p)
    add_data_args(p, binarize="dynamic")
    add_train_args(p, epochs=DEFAULT_EPOCHS, batch_size=100, lr=1e-3)
    p.set_defaults(func=cmd_train, epochs=None)


def _add_evaluation_args(p):
    """The validation split, the per-epoch test terms and the labelled-only baseline classifier."""
    e = common.group(p, "evaluation")
    e.add_argument("--val", type=nonneg_int, default=None, metavar="N",
                   help="validation images held out of the training set (neither labelled nor unlabelled data); "
                        "their error each epoch chooses the epoch whose test error is reported (default: a sixth "
                        "of the training images, 10000 of MNIST's 60000; 0: no split, the last epoch)")
    e.add_argument("--eval-n", type=nonneg_int, default=2000,
                   help="test images for the per-epoch ELBO terms (default 2000; the error uses all)")
    e.add_argument("--baseline-steps", type=nonneg_int, default=1000,
                   help="full-batch Adam steps of the labelled-only classifier (default 1000; 0 skips it)")
    e.add_argument("--baseline-lr", type=positive_float, default=1e-3, help="its learning rate (default 1e-3)")


def _binarizer(kind, dtype):
    if kind != "dynamic":
        return lambda xb, rng: xb
    return lambda xb, rng: (backend.to_device(rng.random(xb.shape, dtype=np.float32)) < xb).astype(dtype)


def train_baseline(model_cfg, x_l, y_l, x_te, y_te, steps, lr, binarize, seed, log=print):
    """The M2 classifier architecture trained on the labelled images alone (full batch, cross-entropy,
    Adam). Returns {"baseline_test_error", "baseline_train_error", "baseline_steps", ...}."""
    from .. import optim
    from ..kernels import softmax_ce_backward, softmax_ce_forward
    from ..models.m2 import M2

    t0 = time.perf_counter()
    clf = M2(**dict(model_cfg, seed=model_cfg["seed"] + 1)).classifier  # same architecture, other init
    clf.flatten()
    opt = optim.Adam(clf, lr=lr)
    rng = np.random.default_rng([seed, 13])
    dtype = clf.flat_params.dtype
    xp = backend.array_module(clf.flat_params)
    bin_ = _binarizer(binarize, dtype)
    yd = xp.asarray(y_l)
    w = xp.full(len(y_l), 1.0 / len(y_l), dtype=dtype)
    for i in range(steps):
        clf.zero_grad()
        s = clf.forward(bin_(x_l, rng))
        clf.backward(softmax_ce_backward(w, s, yd), need_dx=False)
        opt.step()
    def err(x, y):
        pred = xp.concatenate([clf.forward(x[i:i + 2000]).argmax(axis=1) for i in range(0, len(x), 2000)])
        return float((backend.to_host(pred) != y).mean())
    ce = float(softmax_ce_forward(clf.forward(x_l), yd).mean())
    res = {"baseline_test_error": err(x_te, y_te), "baseline_train_error": err(x_l, y_l), "baseline_train_ce": ce,
           "baseline_steps": steps, "baseline_lr": lr, "baseline_seconds": round(time.perf_counter() - t0, 1)}
    log(f"baseline (classifier on the {len(y_l)} labelled images alone, {steps} steps): test error "
        f"{res['baseline_test_error']:.4f}  train error {res['baseline_train_error']:.4f}")
    return res


def evaluate_m2(model, x_te, y_te, n_eval, seed, batch=500, comm=None):
    """test_error on all of x_te; test_nelbo_xy / test_nelbo_x on the first n_eval, fixed noise. ``comm``
    (None: this process alone): each rank takes its rows (of x_te; of every batch, the batch's noise drawn
    whole and sliced) and the sums are all-reduced."""
    from .. import distributed

    comm = comm or distributed.Single()
    res = {"error": distributed.mean_over_rows(len(x_te), lambda r: model.error_rate(x_te[r], y_te[r]), comm)}
    if n_eval:
        rng = np.random.default_rng([seed, 1])
        sxy = sx = 0.0
        C, Z = model.num_classes, model.z_dim
        for s in range(0, n_eval, batch):
            xb, yb = x_te[s:min(s + batch, n_eval)], y_te[s:min(s + batch, n_eval)]
            e1 = backend.to_device(rng.standard_normal((len(xb), Z), dtype=np.float32), model.dtype)
            e2 = backend.to_device(rng.standard_normal((C, len(xb), Z), dtype=np.float32), model.dtype)
            r = distributed.rows(len(xb), comm)
            if r.stop > r.start:
                sxy += float(model.nelbo(xb[r], yb[r], eps=e1[r]).sum())
                sx += float(model.nelbo(xb[r], eps=e2[:, r]).sum())
        sxy, sx = comm.allreduce_sum([sxy, sx])
        res.update(nelbo_xy=float(sxy) / n_eval, nelbo_x=float(sx) / n_eval)
    return res


def _build(args, loaded):
    """build(run) for :func:`common.resume_or_new`: a new M2 (alpha and the labelled weight follow from
    N, --labels, --alpha and --label-boost); the training set it loads is kept in ``loaded``."""
    def build(run):
        x_tr, y_tr = loaded["train"] = common.load_image_data(args.data, "train", args.train_limit, "none", args.seed)
        run["val"] = validation_size(len(y_tr), args.val)
        tr, _ = validation_split(len(y_tr), run["val"], args.seed)
        balanced_labels(y_tr[tr], args.labels, 10, args.seed)        # the errors before any work
        x_dim, lik = 784, {}
        if args.features:                                            # M1+M2: the M1 VAE's codes
            vae, _, path, sha = loaded["m1"] = load_features(args.features)
            run.update(features="m1:" + os.path.abspath(args.features[3:]), features_vae=os.path.abspath(path),
                       features_sha256=sha)
            x_dim, lik = vae.z_dim, {"likelihood": "gaussian"}
        ratio = 0.1 * len(tr) / args.labels if args.alpha is None else args.alpha   # CE : -ELBO per labelled image
        lam = min(1.0, args.label_boost * args.labels / len(tr))                     # lambda_l
        from ..models.m2 import M2

        return M2(x_dim=x_dim, num_classes=10, hidden=args.hidden, z_dim=args.z_dim,
                  classifier_hidden=args.classifier_hidden, activation=args.activation, alpha=ratio * lam,
                  labelled_weight=lam, beta=args.beta, seed=args.seed, init=args.init, **lik)
    return build


def load_features(spec, expect_sha256=None):
    """(VAE, meta, checkpoint path, sha256) of ``--features m1:RUN`` (see :func:`npdgm.commands.m1.load_m1_vae`:
    ValueError when the VAE is missing or differs from ``expect_sha256``)."""
    from .m1 import load_m1_vae

    if not isinstance(spec, str) or not spec.startswith("m1:") or len(spec) == 3:
        raise ValueError(f"--features {spec}: expected m1:RUN (an npdgm train m1 run or a VAE run directory)")
    return load_m1_vae(spec[3:], expect_sha256)


def feature_encoder(vae):
    """encode(x, rng) -> z1 ~ q(z1|x) of the M1 VAE (:func:`code_sampler` on its encoder's output): M2's input
    under M1+M2 with ``--m1-codes step``."""
    sample = code_sampler(vae.z_dim)
    return lambda x, rng: sample(vae.encoder.forward(x), rng)


def _data(model, run, loaded):
    """(train_x, x_lab, y_lab, test_x, x_te, y_te, val_x, y_val) of an M2 run: the training images less the
    --val held out (unlabelled), the --labels balanced labelled ones among them, the test set (host x_te for
    the figures), the validation set. M1+M2: the training images stay images (each step encodes them);
    test_x, x_te and val_x are codes mu(x)."""
    if run.get("features"):
        return _feature_data(model, run, loaded)
    x_tr, y_tr, lab, x_te, y_te, x_va, y_va = _images(run, loaded)
    train_x = model.check_x(x_tr, "training images")
    test_x = model.check_x(x_te, "test images")
    y_te = model.check_y(y_te, len(x_te), "test labels")
    y_lab = model.check_y(y_tr[lab], len(lab), "labels")
    x_lab = train_x[model.xp.asarray(lab)] if model.xp is not np else train_x[lab]
    return (train_x, x_lab, y_lab, test_x, x_te, y_te, model.check_x(x_va, "validation images"),
            model.check_y(y_va, len(x_va), "validation labels"))


def _images(run, loaded):
    """(x_tr, y_tr, labelled indices, x_te, y_te, x_val, y_val) of an M2 run: the training images less the
    run's --val validation images (:func:`npdgm.commands.m1.validation_split`; runs from before --val: none),
    binarized once when --binarize static; the --labels balanced indices among them; the test images; the
    validation images (binarized like the test set: dynamic draws them once)."""
    from ..data import binarize

    seed = run["seed"]
    x_all, y_all = loaded.get("train") or common.load_image_data(run["data"], "train", run["train_limit"], "none", seed)
    tr, va = validation_split(len(y_all), run.get("val", 0), seed)
    x_tr, y_tr, x_va, y_va = x_all[tr], y_all[tr], x_all[va], y_all[va]
    lab = balanced_labels(y_tr, run["labels"], 10, seed)
    if run["binarize"] == "static":
        x_tr, x_va = binarize(x_tr), binarize(x_va)
    elif run["binarize"] == "dynamic":
        x_va = binarize(x_va, np.random.default_rng([seed, 8]))  # drawn once, as the test set
    x_te, y_te = common.load_image_data(run["data"], "test", run["test_limit"], run["binarize"], seed)
    return x_tr, y_tr, lab, x_te, y_te, x_va, y_va


def code_sampler(z_dim):
    """sample(h, rng) -> z1 = mu + exp(logvar / 2) eps (kernels.reparameterize_forward) for rows h = [mu | logvar]
    (n, 2 z_dim) of q(z1|x), eps ~ N(0, I) from ``rng`` (float32 like all run noise)."""
    from ..kernels import reparameterize_forward

    def sample(h, rng):
        mu, logvar = h[:, :z_dim], h[:, z_dim:]
        eps = backend.to_device(rng.standard_normal(mu.shape, dtype=np.float32), h.dtype)
        return reparameterize_forward(mu, logvar, eps)
    return sample


def posterior_codes(vae, x, batch=1000):
    """[mu | logvar] (n, 2 z_dim) of q(z1|x) for images x, on the VAE's backend."""
    return vae.xp.concatenate([vae.encoder.forward(x[s:s + batch]) for s in range(0, len(x), batch)])


def _feature_data(model, run, loaded):
    from ..models.m1 import vae_features
    from .m1 import load_images

    vae = (loaded.get("m1") or load_features(run["features"], run.get("features_sha256")))[0]
    loaded["m1"] = (vae,)
    x_tr, y_tr, lab, x_te, y_te, x_va, y_va = _images(run, loaded)
    if run.get("m1_codes", "step") == "fixed":   # the training images' q(z1|x) once: one fixed binarization
        x_fix, _ = load_images(run["data"], "train", run["train_limit"], run["binarize"], run["seed"])
        x_fix = x_fix[validation_split(len(x_fix), run.get("val", 0), run["seed"])[0]]
        x_tr = posterior_codes(vae, vae.check_x(x_fix, "training images"))
        train_x = x_tr
    else:
        train_x = vae.check_x(x_tr, "training images")
    f_te = vae_features(vae, vae.check_x(x_te, "test images"))
    test_x = model.check_x(f_te, "test codes")
    y_te = model.check_y(y_te, len(x_te), "test labels")
    y_lab = model.check_y(y_tr[lab], len(lab), "labels")
    x_lab = train_x[model.xp.asarray(lab)] if model.xp is not np else train_x[lab]
    val_x = model.check_x(vae_features(vae, vae.check_x(x_va, "validation images")), "validation codes")
    return train_x, x_lab, y_lab, test_x, f_te, y_te, val_x, model.check_y(y_va, len(x_va), "validation labels")


def _baseline(out, run, model, x_lab, y_lab, test_x, y_te):
    """The labelled-only baseline: read from OUT/baseline.json, or trained and written there."""
    path = os.path.join(out, "baseline.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    if not run["baseline_steps"]:
        return {}
    # under N ranks every rank trains it (the same numbers, no rank waits at the start), rank 0 prints and writes it
    binarize = "none" if run.get("features") else run["binarize"]   # M1+M2: x_lab are the labelled codes mu(x)
    baseline = train_baseline(model.config, x_lab, y_lab, test_x, y_te, run["baseline_steps"], run["baseline_lr"],
                              binarize, run["seed"], log=print if common.is_root() else lambda *a, **k: None)
    if common.is_root():
        common.write_json(path, baseline)
    return baseline


def make_step(model, x_lab, y_lab, labelled_batch, binarize, encode=None):
    """step(xb, yb, rng) of :func:`npdgm.train.fit`: xb is the unlabelled batch; a labelled batch of
    ``labelled_batch`` is drawn with replacement from (x_lab, y_lab); ``encode(x, rng)`` (M1+M2) maps both
    batches to codes; then :meth:`M2.train_step`.
    Under N ranks see :func:`shard_step` (``shard``: this rank's rows of the unlabelled batch)."""
    from .. import distributed

    BL, xp, comm = labelled_batch, model.xp, distributed.world()
    bin_ = _binarizer(binarize, model.dtype)
    if BL < comm.size:
        raise ValueError(f"with {comm.size} ranks the labelled batch needs >= {comm.size} examples "
                         f"(--labelled-batch {BL})")

    def step(xb, yb, rng, shard=slice(None)):
        li = rng.integers(0, len(y_lab), BL)
        xl = bin_(x_lab[xp.asarray(li)] if xp is not np else x_lab[li], rng)
        xu = bin_(xb, rng)
        if encode is not None:
            xl, xu = encode(xl, rng), encode(xu, rng)
        if shard == slice(None):
            return model.train_step(xl, y_lab[li], xu, rng)
        return shard_step(model, xl, y_lab[li], xu, rng, distributed.rows(BL, comm), shard)
    step.shardable = True
    return step


def shard_step(model, x_l, y_l, x_u, rng, rl, ru):
    """This rank's share of :meth:`M2.train_step`: the noise of both whole batches drawn as train_step draws
    it, then the rows ``rl`` of the labelled batch (B_l) and ``ru`` of the unlabelled one (B_u). The loss
    is a mean over each batch, and npdgm.train.fit weights a rank's gradient and terms by its unlabelled
    share n_u / B_u, so the labelled part (gradient and terms) is scaled by c = (n_l / B_l) / (n_u / B_u)
    first: sum_r (n_u,r / B_u) (c_r g_l,r + g_u,r) = the full-batch gradient."""
    draw = lambda shape: backend.to_device(rng.standard_normal(shape, dtype=np.float32), model.dtype)
    eps_l = draw((x_l.shape[0], model.z_dim))
    eps_u = draw((model.num_classes, x_u.shape[0], model.z_dim))
    c = ((rl.stop - rl.start) / x_l.shape[0]) / ((ru.stop - ru.start) / x_u.shape[0])
    _, tl = model.loss_and_grad(x_l[rl], y_l[rl], None, eps_l[rl], None, check=False, zero_grad=False)
    model.flat_grads *= c
    _, tu = model.loss_and_grad(None, None, x_u[ru], None, eps_u[:, ru], check=False, zero_grad=False)
    t = {k: c * tl[k] for k in ("labelled", "ce", "acc_l")}
    t.update(unlabelled=tu["unlabelled"], entropy=tu["entropy"], loss=c * tl["loss"] + tu["loss"])
    return {k: t[k] for k in ("loss", "labelled", "ce", "unlabelled", "entropy", "acc_l")}


def make_evaluate(model, test_x, y_te, n_eval, seed, baseline, val_x=None, y_val=None):
    """evaluate(epoch) of :func:`npdgm.train.fit`: :func:`evaluate_m2`, and with a validation set its
    classification error (logged as val_error), printed beside the baseline."""
    from .. import distributed

    def evaluate(epoch):
        r = evaluate_m2(model, test_x, y_te, n_eval, seed, comm=common.world())
        if val_x is not None and len(val_x):
            r["val_error"] = distributed.mean_over_rows(len(val_x), lambda s: model.error_rate(val_x[s], y_val[s]),
                                                        common.world())
        if common.is_root():
            print(f"epoch {epoch}: " + (f"validation error {r['val_error']:.4f}  " if "val_error" in r else "") +
                  f"test error {r['error']:.4f}" +
                  (f"  (baseline {baseline['baseline_test_error']:.4f})" if baseline else "") +
                  (f"  test -ELBO(x,y) {r['nelbo_xy']:.2f}  U(x) {r['nelbo_x']:.2f}" if n_eval else ""), flush=True)
        return r
    return evaluate


def _m1_inputs(model, run, loaded, x_lab):
    """(encode, baseline inputs): M1+M2, the step's z1 sampler and the labelled codes mu(x); else (None, x_lab).
    ``--m1-codes fixed``: x_lab are the labelled images' [mu | logvar] rows already."""
    if not run.get("features"):
        return None, x_lab
    from ..models.m1 import vae_features

    vae = loaded["m1"][0]
    fixed = run.get("m1_codes", "step") == "fixed"
    print(f"M1+M2: M2 on the codes of {run['features']} ({run['features_vae']}, sha256 "
          f"{run['features_sha256'][:12]}.., {vae.z_dim} units, z1 drawn each step from q(z1|x) "
          f"{'computed once' if fixed else 'of that step binarization'})", flush=True)
    if fixed:
        return code_sampler(vae.z_dim), model.check_x(x_lab[:, :vae.z_dim], "labelled codes")
    return feature_encoder(vae), model.check_x(vae_features(vae, x_lab), "labelled codes")


def _summarize(summary, records, n_eval, n_val, baseline):
    """Add the last epoch's test numbers and the epoch chosen on the validation set to ``summary``; print them."""
    last = records[-1]
    summary.update(test_error=last.get("test_error"), test_nelbo_xy=last.get("test_nelbo_xy"),
                   test_nelbo_x=last.get("test_nelbo_x"), eval_n=n_eval,
                   seconds_per_epoch=float(np.median([r["train_seconds"] for r in records])))
    best = chosen_epoch(records)
    if best is not None:          # the epoch chosen on the validation set, and its test error
        summary.update(val_n=n_val, chosen_epoch=best["epoch"], val_error=best["val_error"],
                       test_error_at_chosen_epoch=best.get("test_error"))
    print(f"M2 test error {summary['test_error']:.4f} (last epoch)" +
          (f"; {best.get('test_error'):.4f} at epoch {best['epoch']}, chosen on validation (error "
           f"{best['val_error']:.4f})" if best else "") +
          (f"  vs labelled-only baseline {baseline['baseline_test_error']:.4f}" if baseline else ""), flush=True)


def cmd_train(args):
    setup_backend(args)
    if not args.resume and args.labelled_batch is None:  # data-dependent default, fixed into the run
        args.labelled_batch = args.batch_size
    loaded = {}
    r = common.resume_or_new(args, "m2", RUN_KEYS, DEFAULT_EPOCHS, _build(args, loaded), derived=("alpha",),
                             upgrade=lambda run: {"m1_codes": "step", "val": 0, **run})   # before --m1-codes, --val
    if r is None:
        return 0
    model, run, out = r
    train_x, x_lab, y_lab, test_x, x_te, y_te, val_x, y_val = _data(model, run, loaded)
    n_eval = min(run["eval_n"], len(test_x))
    opt, rng, start = common.start_training(model, run, out, args.resume)
    print(f"m2 {model.config}  {model.num_parameters()} parameters  unlabelled {len(train_x)}  labelled {len(y_lab)} "
          f"({len(y_lab) // 10}/class)  validation {len(y_val)}  test {len(test_x)}  backend {backend.get_backend()} "
          f"{model.dtype}  -> {out}", flush=True)
    encode, base_x = _m1_inputs(model, run, loaded, x_lab)
    baseline = _baseline(out, run, model, base_x, y_lab, test_x, y_te)
    step = make_step(model, x_lab, y_lab, run["labelled_batch"],
                     "none" if run.get("features") and run["m1_codes"] == "fixed" else run["binarize"], encode)
    records = common.fit(model, opt, rng, start, run, out, args, step,
                         make_evaluate(model, test_x, y_te, n_eval, run["seed"], baseline, val_x, y_val), train_x)
    if not common.is_root():
        return 0
    summary = {"epochs": run["epochs"], "labels": run["labels"], "alpha_step": model.alpha,
               "labelled_weight": model.labelled_weight, "beta": model.beta, "test_n": len(test_x), **baseline}
    if encode is not None:
        summary.update(features=run["features"], features_vae=run["features_vae"],
                       features_sha256=run["features_sha256"], baseline_input="M1 codes mu(x)")
    if records:
        _summarize(summary, records, n_eval, len(y_val), baseline)
    common.write_summary(out, summary)
    if not args.no_plots:
        common.stage_figures(out, args)
        from ..plots import m2 as PM

        curves = lambda rec, path: PM.curves(rec, path, baseline)  # noqa: E731
        if encode is None:
            conditional_figures(model, out, records, x_te, y_te, run["seed"], curves=curves)
        else:                                          # M2 generates codes, not images: the curves only
            curves(records, os.path.join(out, "curves.png"))
    return 0
