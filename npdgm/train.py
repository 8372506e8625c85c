"""The training loop every model shares: batches, progress bar, evaluation, metrics log,
atomic checkpoints and bit-for-bit resume.

A run directory holds
    checkpoint.npz   model weights + optimizer state + host RNG state + epoch (atomic)
    metrics.jsonl    one JSON object per finished epoch
    metrics.csv      the same records, one column per key (rewritten atomically with each record)
    *.png            figures written by the model's command
    .npdgm-files     the names of the files npdgm wrote there (npdgm.runfiles; --overwrite removes those)

All randomness of a run (shuffling and every noise array) comes from one host NumPy
Generator whose state is checkpointed, so ``--resume`` continues exactly where the run
stopped, and the NumPy and CuPy backends see the same noise.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from . import backend
from .io import CheckpointError, atomic_write_bytes, check_finite, checkpoint_path, load_arrays, save_model
from .runfiles import note_written

LOSS_REFRESH_S = 0.25  # the progress bar's loss= is at most this old


def rng_state_json(rng):
    return json.dumps(rng.bit_generator.state)


# The bit generators npdgm writes (np.random.default_rng): a file names one of these, never a function to call.
BIT_GENERATORS = {"PCG64": np.random.PCG64}


def rng_from_json(s, path="checkpoint"):
    """The Generator whose ``bit_generator.state`` :func:`rng_state_json` wrote; CheckpointError naming
    ``path`` and the field for anything else."""
    def bad(why):
        return CheckpointError(f"{path}: manifest field rng {why}")

    if not isinstance(s, str):
        raise bad(f"must be the JSON text of a generator state, got {type(s).__name__}")
    try:
        state = json.loads(s)
    except (ValueError, RecursionError) as e:
        raise bad(f"is not valid JSON ({type(e).__name__})") from None
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if not isinstance(name, str) or name not in BIT_GENERATORS:
        raise bad(f"names the bit generator {name!r:.60}; npdgm writes only {sorted(BIT_GENERATORS)}")
    bg = BIT_GENERATORS[name]()
    try:
        bg.state = state
    except (TypeError, ValueError, KeyError, OverflowError) as e:
        raise bad(f"is not a valid {name} state ({e})") from None
    return np.random.Generator(bg)


def save_checkpoint(out, model, optimizer, rng, epoch, run_meta):
    """Write RUNDIR/checkpoint.npz atomically: model, optimizer state, RNG state, epoch."""
    extra = {f"opt/{k}": v for k, v in optimizer.state_dict().items() if k != "t"}
    meta = {"epoch": epoch, "opt_t": optimizer.t, "rng": rng_state_json(rng), "run": run_meta}
    save_model(model, os.path.join(out, "checkpoint.npz"), extra, meta)


def restore_checkpoint(out, optimizer):
    """Load optimizer state from RUNDIR/checkpoint.npz; returns (rng, epoch). The state must be finite (an
    inf in Adam's v would freeze its parameters) and the fields epoch, opt_t and rng valid."""
    path = checkpoint_path(out)
    arrays, meta = load_arrays(path)
    for field in ("epoch", "rng"):
        if field not in meta:
            raise CheckpointError(f"{path}: the manifest has no field {field}; not a training checkpoint")
    state = {k[len("opt/"):]: v for k, v in arrays.items() if k.startswith("opt/")}
    for k, v in state.items():
        check_finite(v, f"optimizer state opt/{k}", path)
    state["t"] = meta.get("opt_t", 0)
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: optimizer state does not match the model: {e}") from e
    return rng_from_json(meta["rng"], path), meta["epoch"]


def dumps(obj, indent=None):
    """``(text, nonfinite)``: strict JSON of ``obj`` (``allow_nan=False``) with every NaN/inf float
    written as null and its key listed in ``nonfinite`` (and under "nonfinite" in a dict)."""
    bad = []

    def clean(v, key):
        if isinstance(v, (float, np.floating)):
            if math.isfinite(v):
                return float(v)
            bad.append(key)
            return None
        if isinstance(v, dict):
            return {k: clean(x, f"{key}.{k}" if key else k) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x, key) for x in v]
        return v

    c = clean(obj, "")
    if bad and isinstance(c, dict):
        c["nonfinite"] = sorted(set(bad))
    return json.dumps(c, indent=indent, allow_nan=False), sorted(set(bad))


def write_json(path, obj):
    """Atomically write ``obj`` as strict JSON (see :func:`dumps`); returns the non-finite keys."""
    text, bad = dumps(obj, indent=1)
    atomic_write_bytes(path, lambda f: f.write((text + "\n").encode()))
    return bad


def read_metrics(out):
    """The records of RUNDIR/metrics.jsonl. A last line cut short (the process was killed while
    appending it) is dropped; any other line that is not a JSON object raises CheckpointError."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f.read().split("\n"), 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            r = json.loads(line)
        except ValueError as e:
            if i == lines[-1][0]:
                break  # an append cut short by a kill
            raise CheckpointError(f"{path}, line {i}: not a JSON record ({e})") from e
        if not isinstance(r, dict):
            raise CheckpointError(f"{path}, line {i}: expected a JSON object, got {type(r).__name__}")
        records.append(r)
    return records


def append_line(path, line):
    """Append ``line`` and a newline to ``path``; an OSError (full disk) names the file."""
    try:
        note_written(path)
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from e


def write_csv(out, records):
    """Atomically write RUNDIR/metrics.csv: one row per record, one column per key (in the order the
    keys first appear), an empty cell where a record lacks the key, lists joined by spaces."""
    import csv
    import io

    cols = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    cell = lambda v: "" if v is None else " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    for r in records:
        w.writerow([cell(r.get(c)) for c in cols])
    atomic_write_bytes(os.path.join(out, "metrics.csv"), lambda f: f.write(buf.getvalue().encode()))


RECORD_HOOKS = []  # callables (out, record) run after each logged record (npdgm.tensorboard adds one)


def log_record(out, rec, records):
    """Append ``rec`` to RUNDIR/metrics.jsonl (strict JSON, see :func:`dumps`), rewrite metrics.csv
    from ``records`` + rec and pass the record to each of :data:`RECORD_HOOKS`; returns its non-finite keys."""
    line, bad = dumps(rec)
    append_line(os.path.join(out, "metrics.jsonl"), line)
    write_csv(out, [*records, json.loads(line)])
    for hook in RECORD_HOOKS:
        hook(out, json.loads(line))
    return bad


def _truncate_metrics(out, epoch):
    """Keep only the records of epochs <= ``epoch`` (those the checkpoint has seen); returns them."""
    keep = [r for r in read_metrics(out) if isinstance(r.get("epoch", 0), int) and r.get("epoch", 0) <= epoch]
    atomic_write_bytes(os.path.join(out, "metrics.jsonl"),
                       lambda f: f.write("".join(dumps(r)[0] + "\n" for r in keep).encode()))
    write_csv(out, keep)
    return keep


def _last_checkpoint(out, epoch, bad_epochs):
    """What the run directory holds after a stop, said truthfully."""
    if epoch == 0:
        return f"no checkpoint was written to {out} (no epoch finished)"
    if epoch in bad_epochs:
        return (f"the last checkpoint in {out} (epoch {epoch}) is intact but its evaluation was already "
                f"non-finite")
    return f"the last checkpoint in {out} (epoch {epoch}) is intact"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit` (on this rank, or on another one that told this one): ``out`` and
    ``saved`` (the epoch of its checkpoint, 0 for none) say what the run directory holds; ``str()`` says it
    in one line, with how to continue."""

    def __init__(self, out, saved, where=""):
        self.out, self.saved = out, saved
        super().__init__(f"interrupted{where}: " + (f"the checkpoint in {out} holds epoch {saved}; continue with "
                                                    f"--resume {out}" if saved else
                                                    f"no epoch finished, so {out} holds no checkpoint; run the "
                                                    f"same command again to start over"))


def _count_nonfinite(a):
    """``(n_nan, n_inf)`` of array ``a`` (host or device), ``(0, 0)`` when it is finite (one pass then)."""
    xp = backend.array_module(a)
    if bool(xp.isfinite(a).all()):
        return 0, 0
    return int(xp.isnan(a).sum()), int(xp.isinf(a).sum())


def nonfinite_state(model, optimizer):
    """Where training has left the finite numbers: the first model parameter, then the first optimizer state
    array (Adam's m and v: a gradient whose square overflows makes v inf and freezes its parameters although
    the loss stays finite) holding NaN or inf, as ``"parameter NAME (N NaN, M inf)"``; None when all are
    finite. Reads ``optimizer.state_dict()`` from outside: any optimizer with a state dict works."""
    arrays = [(f"parameter {k}", v) for k, v in model.params.items()]
    arrays += [(f"optimizer state {k}", v) for k, v in optimizer.state_dict().items() if hasattr(v, "shape")]
    for name, a in arrays:
        n_nan, n_inf = _count_nonfinite(a)
        if n_nan or n_inf:
            return f"{name} ({n_nan} NaN, {n_inf} inf)"
    return None


class Diverged(FloatingPointError):
    """Training left the finite numbers; the message says where and what the run directory holds."""


def _diverged(what, out, saved, bad_epochs, first):
    """Diverged(``what`` + the state of the run directory + advice). ``first``: the loss was already non-finite
    at the initial parameters, before any update, so the learning rate is not the cause."""
    if first:
        return Diverged(f"{what}, at the initial parameters (before any update): the learning rate is not the "
                        f"cause; an option of the model or the data makes the loss overflow (a scale too small or "
                        f"too large for the dtype); {_last_checkpoint(out, saved, bad_epochs)}")
    return Diverged(f"{what}; {_last_checkpoint(out, saved, bad_epochs)}: lower the learning rate or add --clip")


def progress_bar(total, desc, enabled=True, **kw):
    """A tqdm bar on stderr, or None when not ``enabled``, when stderr is not a terminal (a log file would get
    every redraw; callers print one line per epoch or stage there) or without tqdm."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr, **kw)


def stage(message, enabled=True):
    """Print one ``message ...`` line to stderr before a long stage (figures, estimates) so no work is silent."""
    if enabled:
        print(f"{message} ...", file=sys.stderr, flush=True)


def progress(items, desc, enabled=True):
    """Iterate ``items`` (a sized iterable) behind a progress bar on a terminal; elsewhere one ``desc ...`` line."""
    bar = progress_bar(len(items), desc, enabled)
    if bar is None:
        stage(desc, enabled)
        yield from items
        return
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _batches(train_x, train_y, perm, batch_size):
    """(xb, yb) minibatches of ``train_x`` (and ``train_y``, else None) in the order ``perm``."""
    def take(a, idx):
        xp = backend.array_module(a)
        return a[xp.asarray(idx)] if xp is not np else a[idx]
    for s in range(0, len(perm), batch_size):
        idx = perm[s:s + batch_size]
        yield take(train_x, idx), None if train_y is None else take(train_y, idx)


def _shard_step(model, step, xb, yb, rng, comm):
    """``step`` on this rank's shard [lo, hi) of the global batch (its noise drawn for the whole batch and
    sliced, see npdgm.distributed), gradient scaled by N n_r / B and all-reduced (mean over ranks): every rank
    ends with the full-batch gradient; the loss terms are the shard-size-weighted sums over ranks."""
    from .distributed import shard_bounds

    b = int(xb.shape[0])
    lo, hi = shard_bounds(b, comm.rank, comm.size)
    terms = step(xb, yb, rng, shard=slice(lo, hi))
    keys = list(terms)  # the same order on every rank (the same step code)
    w = (hi - lo) / b
    if w != 1.0 / comm.size:
        model.flat_grads *= w * comm.size
    comm.allreduce_mean_(model.flat_grads)
    vals = comm.allreduce_sum([w * float(terms[k]) for k in keys])
    return dict(zip(keys, vals))


def _epoch(model, optimizer, train_x, train_y, batch_size, rng, step, clip, bar, stop, comm=None):
    """One pass over the shuffled data: zero grads, ``step``, clip, ``optimizer.step()``; returns the
    sums of the step terms. ``stop(i, loss)`` is called every 50 batches, on the last, and with a bar whenever
    LOSS_REFRESH_S seconds have passed (the bar's loss= stays current; reading the loss syncs a GPU)."""
    from .optim import clip_grad_norm

    perm = rng.permutation(int(train_x.shape[0]))
    nb, sums, shown = math.ceil(len(perm) / batch_size), {}, time.perf_counter()
    for i, (xb, yb) in enumerate(_batches(train_x, train_y, perm, batch_size)):
        model.zero_grad()
        terms = step(xb, yb, rng) if comm is None or comm.size == 1 else _shard_step(model, step, xb, yb, rng, comm)
        if clip:
            clip_grad_norm(model, clip)
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        if bar is not None:
            bar.update(1)
        due = bar is not None and time.perf_counter() - shown >= LOSS_REFRESH_S
        if due or i % 50 == 0 or i == nb - 1:
            shown = time.perf_counter()
            stop(i, float(terms["loss"]))
    return sums


def fit(model, optimizer, train_x, train_y=None, *, epochs, batch_size, out, rng, step, evaluate=None,
        start_epoch=0, run_meta=None, progress=True, log=print, clip=None, comm=None):
    """Train for epochs ``start_epoch + 1 .. epochs``.

    train_y: labels (or any per-example array) batched alongside train_x, or None.
    step(xb, yb, rng) -> dict of scalar arrays including "loss"; it must fill the model's grads
                     (the loop zeroes them before and runs ``optimizer.step()`` after); yb is None
                     without train_y.
    evaluate(epoch) -> dict of floats (test metrics, logged as test_<key>; a key "val_..." (validation metrics)
                     is logged as it is), optional; called on every rank (each may take its
                     share of the test set, npdgm.distributed.rows / mean_over_rows, and reduce).
    comm: a communicator of npdgm.distributed (None: one process). With N > 1 ranks each rank runs
          ``step(xb, yb, rng, shard=slice(lo, hi))`` on its shard of the same global batch (the step draws the
          noise of the whole batch, then slices), the gradient is all-reduced to the full-batch mean, and
          rank 0 alone writes metrics and checkpoints.
    Returns the list of epoch records. On Ctrl-C (or when another rank was interrupted) it raises
    :class:`Interrupted`, which says what the last checkpoint holds (it is left intact). A non-finite
    loss or epoch metric raises FloatingPointError (the epoch's record is logged with null values and
    a "nonfinite" list, no checkpoint is written for it).
    """
    n = int(train_x.shape[0])
    if n == 0:
        raise ValueError("training set is empty")
    if train_y is not None and len(train_y) != n:
        raise ValueError(f"train_y has {len(train_y)} rows, train_x {n}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    root = comm is None or comm.rank == 0  # rank 0 alone writes metrics and checkpoints
    if comm is not None and comm.size > 1:
        if 0 < n % batch_size < comm.size or batch_size < comm.size:
            raise ValueError(f"with {comm.size} ranks every batch needs >= {comm.size} examples (batch size "
                             f"{batch_size}, last batch {n % batch_size or batch_size}); change --batch-size")
        comm.check_same(model.flat_params, "initial parameters")
        comm.share(model, optimizer)  # one node: grads, params, optimizer state in shared memory
    os.makedirs(out, exist_ok=True)
    if start_epoch:
        logged = _truncate_metrics(out, start_epoch) if root else read_metrics(out)
    else:
        if root:
            atomic_write_bytes(os.path.join(out, "metrics.jsonl"), lambda f: None)
        logged = []
    bad_epochs = {r.get("epoch") for r in logged if r.get("nonfinite") or dumps(r)[1]}
    nb = math.ceil(n / batch_size)
    records, saved, bar = [], start_epoch, None
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            bar = progress_bar(nb, f"epoch {epoch}/{epochs}", progress and root)

            def stop(i, loss):
                if not math.isfinite(loss):   # the all-reduced loss: every rank stops here, rank 0 reports
                    raise _said_by_rank0(_diverged(f"loss became {loss} at epoch {epoch}, batch {i}", out, saved,
                                                   bad_epochs, first=start_epoch == 0 and epoch == 1 and i == 0))
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}")
            try:  # a model's own non-finite check (e.g. a flow layer's output) gets the run directory's state
                sums = _epoch(model, optimizer, train_x, train_y, batch_size, rng, step, clip, bar, stop, comm)
                train_seconds = round(time.perf_counter() - t0, 3)
                if where := nonfinite_state(model, optimizer):
                    raise _said_by_rank0(_diverged(f"epoch {epoch} left a non-finite {where}", out, saved,
                                                   bad_epochs, False))
                evaluated = evaluate(epoch) if evaluate is not None else {}  # on every rank (it may reduce)
            except Diverged:
                raise
            except FloatingPointError as e:
                raise _said_by_rank0(_diverged(
                    f"epoch {epoch}: {e}", out, saved, bad_epochs,
                    first=start_epoch == 0 and epoch == 1 and getattr(optimizer, "t", 1) == 0)) from e
            finally:
                if bar is not None:
                    bar.close()
                    bar = None
            rec = {"epoch": epoch, "step": epoch * nb, **{f"train_{k}": float(v) / nb for k, v in sums.items()}}
            rec["train_seconds"] = train_seconds
            rec.update({k if k.startswith("val_") else f"test_{k}": float(v) for k, v in evaluated.items()})
            # the record is the same on every rank (evaluate reduces): every rank stops on a non-finite one,
            # rank 0 alone writes it (logged with null + "nonfinite", not checkpointed) and says so
            bad = log_record(out, rec, logged) if root else dumps(rec)[1]
            if root:
                logged.append(json.loads(dumps(rec)[0]))
            if bad:
                raise _said_by_rank0(_diverged(f"epoch {epoch} gave non-finite " +
                                               ", ".join(f"{k}={rec[k]}" for k in bad), out, saved, bad_epochs,
                                               False))
            records.append(rec)
            if root:
                save_checkpoint(out, model, optimizer, rng, epoch, run_meta or {})
                log("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
            saved = epoch   # on every rank: the epoch of rank 0's checkpoint
    except KeyboardInterrupt as e:
        if bar is not None:
            bar.close()
        where = f" (on rank {e.rank})" if getattr(e, "rank", None) is not None else ""
        raise _said_by_rank0(Interrupted(out, saved, where)) from e
    return records


def _said_by_rank0(exc):
    """Mark ``exc`` as raised alike on every rank of a data-parallel run: only rank 0 prints it (it alone
    knows the run directory, see :func:`npdgm.cli.main`)."""
    exc.rank0_reports = True
    return exc


# -- npdgm.fit: the loop above with what `npdgm train` wires around it ----------------------------------------
def _fit_parts(model, x, y, seed):
    """(x, y, step, evaluate) for :func:`fit_model`: the model's own ``train_step`` and its test metrics
    (-ELBO and its terms with fixed noise for a VAE / CVAE, mean NLL for a flow)."""
    kind = getattr(model, "kind", None)
    if kind == "vae":
        x = model.check_x(x)

        def step(xb, yb, rng, shard=slice(None)):
            return model.train_step(xb, rng, shard)
        step.shardable = True

        def loss(xb, yb, rng):
            return model.loss(xb, rng=rng)[1]
    elif kind == "cvae":
        if y is None:
            raise ValueError("a cvae trains on labelled data: pass y (B,) integer labels")
        x = model.check_x(x)
        y = model.check_y(y, x.shape[0])

        def step(xb, yb, rng):
            return model.train_step(xb, yb, rng)

        def loss(xb, yb, rng):
            return model.loss(xb, yb, rng=rng)[1]
    elif kind == "flow":
        model._validate("x", x)
        backend.check_finite("x", x)

        def step(xb, yb, rng, shard=slice(None)):
            return model.train_step(xb, rng, shard)
        step.shardable = True
        loss = None
    else:
        raise TypeError(f"npdgm.fit trains vae, cvae and flow models, not {kind!r}: use `npdgm train {kind}` "
                        f"(M2's labelled + unlabelled batches) or the model's own fit (EM for the GMMs)")

    def evaluate(test_x, test_y, batch=1000):
        if loss is None:
            return {"nll": model.nll(test_x, batch_size=batch)}
        rng, sums = np.random.default_rng([seed, 1]), {}
        for s in range(0, len(test_x), batch):
            xb, yb = test_x[s:s + batch], None if test_y is None else test_y[s:s + batch]
            terms = loss(xb, yb, rng)
            for k in ("nelbo", "recon", "kl"):
                sums[k] = sums.get(k, 0.0) + float(terms[k]) * len(xb)
        return {k: v / len(test_x) for k, v in sums.items()}
    return x, y, step, evaluate


def fit_model(model, x, y=None, *, out, epochs=10, batch_size=128, lr=1e-3, seed=0, test_x=None, test_y=None,
              resume=False, clip=None, progress=True, log=print):
    """Train a VAE, CVAE or flow on ``x`` (and labels ``y`` for a CVAE) with Adam, as ``npdgm train`` does:
    a progress bar, test metrics each epoch when ``test_x`` is given, metrics.jsonl / metrics.csv and an
    atomic checkpoint.npz in the run directory ``out`` after every epoch. ``resume=True`` continues the
    run in ``out`` (weights, optimizer state, RNG) where it stopped, bit for bit; without it ``out`` must
    not hold a checkpoint yet. Randomness (shuffling, noise) comes from ``default_rng(seed)``.
    Exported as ``npdgm.fit``. Returns the records of every epoch in ``out``/metrics.jsonl."""
    from .optim import Adam

    x, y, step, evaluate = _fit_parts(model, x, y, seed)
    if test_x is not None:
        test_x = _fit_parts(model, test_x, test_y, seed)[0]
    ckpt = os.path.join(os.fspath(out), "checkpoint.npz")
    opt = Adam(model, lr=lr)
    if not resume:
        if os.path.exists(ckpt):
            raise FileExistsError(f"{out} already holds a run (checkpoint.npz): pass resume=True to continue it, "
                                  f"or another out")
        rng, start = np.random.default_rng(seed), 0
    else:
        arrays, meta = load_arrays(ckpt)
        def plain(config):  # as stored (JSON lists for tuples), the initialisation seed aside
            return {k: v for k, v in json.loads(json.dumps(config)).items() if k != "seed"}
        if meta.get("kind") != model.kind or plain(meta.get("config") or {}) != plain(model.config):
            raise CheckpointError(f"{ckpt} holds a {meta.get('kind')} with config {meta.get('config')}, not this "
                                  f"{model.kind} ({model.config})")
        model.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
        rng, start = restore_checkpoint(out, opt)
    run = {"api": "npdgm.fit", "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "clip": clip}
    fit(model, opt, x, y, epochs=epochs, batch_size=batch_size, out=out, rng=rng, step=step, start_epoch=start,
        evaluate=None if test_x is None else (lambda epoch: evaluate(test_x, test_y)), run_meta={"args": run},
        progress=progress, log=log, clip=clip)
    return read_metrics(out)
