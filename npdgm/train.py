"""The training loop every model shares: batches, progress bar, evaluation, metrics log,
atomic checkpoints and bit-for-bit resume.

A run directory holds
    checkpoint.npz   model weights + optimizer state + host RNG state + epoch (atomic)
    metrics.jsonl    one JSON object per finished epoch
    metrics.csv      the same records, one column per key (rewritten atomically with each record)
    *.png            figures written by the model's command

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
from .io import CheckpointError, atomic_write_bytes, load_arrays, save_model


def rng_state_json(rng):
    return json.dumps(rng.bit_generator.state)


def rng_from_json(s):
    state = json.loads(s)
    bg = getattr(np.random, state["bit_generator"])()
    bg.state = state
    return np.random.Generator(bg)


def save_checkpoint(out, model, optimizer, rng, epoch, run_meta):
    """Write RUNDIR/checkpoint.npz atomically: model, optimizer state, RNG state, epoch."""
    extra = {f"opt/{k}": v for k, v in optimizer.state_dict().items() if k != "t"}
    meta = {"epoch": epoch, "opt_t": optimizer.t, "rng": rng_state_json(rng), "run": run_meta}
    save_model(model, os.path.join(out, "checkpoint.npz"), extra, meta)


def restore_checkpoint(out, optimizer):
    """Load optimizer state from RUNDIR/checkpoint.npz; returns (rng, epoch)."""
    arrays, meta = load_arrays(out)
    state = {k[len("opt/"):]: v for k, v in arrays.items() if k.startswith("opt/")}
    state["t"] = meta.get("opt_t", 0)
    try:
        optimizer.load_state_dict(state)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{out}: optimizer state does not match the model: {e}") from e
    return rng_from_json(meta["rng"]), int(meta["epoch"])


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


def log_record(out, rec, records):
    """Append ``rec`` to RUNDIR/metrics.jsonl (strict JSON, see :func:`dumps`) and rewrite metrics.csv
    from ``records`` + rec; returns the record's non-finite keys."""
    line, bad = dumps(rec)
    append_line(os.path.join(out, "metrics.jsonl"), line)
    write_csv(out, [*records, json.loads(line)])
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


def _progress(total, desc, enabled):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


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
    sums of the step terms. ``stop(i, loss)`` is called every 50 batches and on the last."""
    from .optim import clip_grad_norm

    perm = rng.permutation(int(train_x.shape[0]))
    nb, sums = math.ceil(len(perm) / batch_size), {}
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
        if i % 50 == 0 or i == nb - 1:
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
    Returns the list of epoch records. On Ctrl-C the last checkpoint is left intact. A non-finite
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
    records, saved = [], start_epoch
    try:
        for epoch in range(start_epoch + 1, epochs + 1):
            t0 = time.perf_counter()
            bar = _progress(nb, f"epoch {epoch}/{epochs}", progress and root)

            def stop(i, loss):
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at epoch {epoch}, batch {i}; "
                                             f"{_last_checkpoint(out, saved, bad_epochs)}: lower the learning rate "
                                             f"or add --clip")
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}")
            sums = _epoch(model, optimizer, train_x, train_y, batch_size, rng, step, clip, bar, stop, comm)
            if bar is not None:
                bar.close()
            rec = {"epoch": epoch, "step": epoch * nb, **{f"train_{k}": float(v) / nb for k, v in sums.items()}}
            rec["train_seconds"] = round(time.perf_counter() - t0, 3)
            if evaluate is not None:  # on every rank: it may split the test set over the ranks and reduce
                rec.update({k if k.startswith("val_") else f"test_{k}": float(v)
                            for k, v in evaluate(epoch).items()})
            if not root:  # the other ranks write nothing
                records.append(rec)
                continue
            bad = log_record(out, rec, logged)
            logged.append(json.loads(dumps(rec)[0]))
            if bad:  # this epoch is logged (null + "nonfinite") but not checkpointed
                raise FloatingPointError(
                    f"epoch {epoch} gave non-finite " + ", ".join(f"{k}={rec[k]}" for k in bad) +
                    f"; {_last_checkpoint(out, saved, bad_epochs)}: lower the learning rate or add --clip")
            records.append(rec)
            save_checkpoint(out, model, optimizer, rng, epoch, run_meta or {})
            saved = epoch
            log("  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()))
    except KeyboardInterrupt:
        log(f"\ninterrupted: " + (f"the checkpoint in {out} holds epoch {saved}; continue with --resume {out}"
                                  if saved else f"no epoch finished, {out} holds no checkpoint"))
        raise
    return records
