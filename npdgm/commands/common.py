"""What every ``npdgm train <model>`` shares: option types, the training options, and the run
directory (a new one, ``--overwrite``, ``--resume``, its lock and the leftovers of a killed run).

A run directory is owned by one process at a time (:func:`npdgm.io.lock_file` on ``RUNDIR/.lock``:
flock on POSIX, msvcrt.locking on Windows). A new run
refuses a directory that already holds files unless ``--overwrite`` is given; ``--resume RUN`` keeps
the run's stored options: it applies a new --lr, --epochs, --clip or --data (and logs it), and
refuses any other option that differs from the stored run.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import shutil
import sys

from .. import backend, tensorboard
from ..io import lock_file

# -- option types: argparse calls them on what the user typed; the message names the option ----------


def _number(kind, lo=None, strict=False):
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {s!r}")
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if lo is not None and (v <= lo if strict else v < lo):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {lo}, got {s}")
        return v
    return parse


positive_int = _number(int, 1)               # n >= 1
nonneg_int = _number(int, 0)                 # n >= 0
positive_float = _number(float, 0, True)     # finite, > 0
nonneg_float = _number(float, 0)             # finite, >= 0
finite_float = _number(float)                # finite


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``npdgm: error: --opt must ... (see PROG -h)``."""

    def error(self, message):
        m = re.match(r"argument (\S+?)(?:/\S+)?: (must .*)", message)
        self.exit(2, f"npdgm: error: {f'{m[1]} {m[2]}' if m else message} (see {self.prog} -h)\n")


def add_run_dir_args(g, resume=True):
    """--out, --overwrite (and --resume) of a run directory."""
    g.add_argument("--out", default=None, help="run directory (default runs/<model>-<time>); an existing "
                                               "directory with files is refused unless --overwrite")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run in --out even if it holds an older run (whose files are removed)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to RUNDIR/tensorboard (needs tensorboardX: "
                        "pip install \"npdgm[tensorboard]\")")
    if resume:
        g.add_argument("--resume", metavar="RUNDIR", default=None,
                       help="continue the run in RUNDIR (or RUNDIR/checkpoint.npz) from its last checkpoint with its "
                            "stored options; --epochs, --lr, --clip and --data may change, others must match "
                            "(default: start a new run)")


def add_train_args(p, epochs=10, batch_size=128, lr=1e-3, epochs_help=None, batch_help=None):
    """Options every ``npdgm train <model>`` shares. A run's options are stored in its checkpoint, so
    with --resume an option not typed keeps the run's value (the help says so where it matters)."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=nonneg_int, default=epochs,
                   help=f"number of epochs ({epochs_help or f'default {epochs}'}; on --resume the stored value)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size,
                   help=f"minibatch size ({batch_help or f'default {batch_size}'})")
    g.add_argument("--lr", type=positive_float, default=lr,
                   help=f"Adam learning rate (default {lr:g}; on --resume the stored value)")
    g.add_argument("--clip", type=positive_float, default=None,
                   help="clip the global gradient norm to this value (default: no clipping; on --resume the "
                        "stored value)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed of initialization, shuffling and noise (default 0)")
    g.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend (default: $NPDGM_BACKEND or numpy)")
    g.add_argument("--dtype", choices=backend.DTYPES, default="float32", help="float type (default float32)")
    add_run_dir_args(g)
    g.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI ranks (default: on when started by mpiexec -n N, N > 1)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="skip the figures")


def setup_backend(args):
    from .. import distributed

    if getattr(args, "backend", None):
        backend.set_backend(args.backend)
    if getattr(args, "dtype", None):
        backend.set_dtype(args.dtype)
    if hasattr(args, "distributed"):
        distributed.init(args.distributed, gpu=backend.get_backend() == "cupy")
    if getattr(args, "tensorboard", False):  # until release_locks(): the command's end
        tensorboard.enable()


def world():
    """The communicator of this process (npdgm.distributed.world(): Single unless launched on N > 1 ranks)."""
    from .. import distributed

    return distributed.world()


def is_root():
    """True on rank 0 (or in a single process): the rank that writes files and prints results."""
    from .. import distributed

    return distributed.world().rank == 0


def default_out(name):
    import time

    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def typed_options(parser, argv):
    """The dests of the options the user typed in ``argv``: ``parser`` (consumed: its defaults are
    suppressed) parses ``argv`` again, so only typed options reach the namespace."""
    def suppress(p):
        p._defaults.clear()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    suppress(sp)
            else:
                a.default = argparse.SUPPRESS
    suppress(parser)
    return set(vars(parser.parse_args(argv)))


# -- the run directory ------------------------------------------------------------------------------
RUN_FILES = ("checkpoint.npz", "metrics.jsonl", "summary.json", "baseline.json")
_LOCKS = []  # open lock files of this process, closed by release_locks()


def lock_run(out):
    """Hold an exclusive lock on OUT/.lock until :func:`release_locks` (or the process ends)."""
    if not is_root():  # the other ranks of a data-parallel run share rank 0's lock
        return
    try:
        f = lock_file(os.path.join(out, ".lock"))
    except BlockingIOError:
        raise ValueError(f"another npdgm process is using {out} (it holds {os.path.join(out, '.lock')}); "
                         f"wait for it to end or choose another --out") from None
    _LOCKS.append(f)


def release_locks():
    """The end of a command: unlock its run directories and close its TensorBoard event files."""
    tensorboard.disable()
    while _LOCKS:
        _LOCKS.pop().close()


def remove_leftovers(out):
    """Delete the temp files (``.tmp-*``, see :func:`npdgm.io.atomic_write_bytes`) that a killed
    process left behind; safe while we hold the lock."""
    for p in glob.glob(os.path.join(glob.escape(out), ".tmp-*")):
        os.remove(p)


def new_run_dir(out, overwrite):
    """Create and lock the run directory ``out`` for a new run: refused when ``out`` is a file, or
    holds files and ``overwrite`` is false (with it, the old run's files and figures are removed)."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is an existing file, not a run directory")
    os.makedirs(out, exist_ok=True)
    if not is_root():  # rank 0 checks, locks and cleans the directory for the other ranks of a data-parallel run
        return out
    lock_run(out)
    remove_leftovers(out)
    files = sorted(f for f in os.listdir(out) if f != ".lock")
    if files and not overwrite:
        raise ValueError(f"--out {out} already holds files ({', '.join(files[:4])}{', ...' if len(files) > 4 else ''})"
                         f"; continue that run with --resume {out}, replace it with --overwrite, or pick a new --out")
    for f in files:
        if f in RUN_FILES or f.endswith(".png"):
            os.remove(os.path.join(out, f))
        elif f == tensorboard.FOLDER:
            shutil.rmtree(os.path.join(out, f))
    return out


# options that say how to run, not what is trained: never compared with the stored run
_NEUTRAL = {"resume", "out", "overwrite", "no_progress", "no_plots", "backend", "command", "model", "func",
            "tensorboard"}
_CHANGEABLE = ("epochs", "lr", "clip", "data")


def _same(a, b):
    norm = lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else v
    return norm(a) == norm(b)


def apply_typed(args, run, config, log=print, derived=()):
    """Compare the options typed with ``--resume`` with the stored run (``run`` from the checkpoint,
    ``config`` the model's, less its ``derived`` keys): apply --epochs/--lr/--clip/--data (and
    $NPDGM_DATA over a stored data path) to ``run`` and log them; raise ValueError, before applying
    anything, for any other option that differs or is not stored."""
    typed = getattr(args, "typed", None)   # set by cli.main; without it only a given --epochs counts
    typed = {"epochs"} if typed is None and getattr(args, "epochs", None) is not None else typed or set()
    show = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    changes = []
    for k in sorted(typed - _NEUTRAL):
        opt, new = "--" + k.replace("_", "-"), getattr(args, k)
        if k in _CHANGEABLE:
            if not _same(run.get(k), new):
                changes.append((k, opt, new))
        elif k in run or (k in config and k not in derived):
            old = run[k] if k in run else config[k]
            if not _same(old, new):
                raise ValueError(f"--resume {args.resume}: {opt} {show(new)} differs from the run's {show(old)}; a "
                                 f"resumed run keeps its options (only --epochs, --lr, --clip, --data may change): "
                                 f"drop {opt} or start a new run with --out")
        else:
            raise ValueError(f"--resume {args.resume}: {opt} cannot be given with --resume (the run keeps the "
                             f"options it was started with; only --epochs, --lr, --clip, --data may change)")
    for k, opt, new in changes:
        log(f"resume: {opt} {run.get(k)} -> {new}")
        run[k] = new
    env = os.environ.get("NPDGM_DATA")
    if "data" in run and "data" not in typed and env and run["data"] != env:
        log(f"resume: data {run['data']} -> {env} ($NPDGM_DATA)")
        run["data"] = env
    return run


def resume_dir(path):
    """The run directory of ``--resume PATH`` (a run directory or its checkpoint.npz)."""
    if os.path.isfile(path):
        if os.path.basename(path) != "checkpoint.npz":
            raise ValueError(f"--resume {path}: give a run directory or its checkpoint.npz")
        return os.path.dirname(path) or "."
    if not os.path.isdir(path):
        raise ValueError(f"--resume {path}: no such run directory")
    return path


def _epochs_done(out):
    """The epoch of OUT/checkpoint.npz, or None when there is none."""
    from ..io import load_arrays

    if not os.path.isfile(os.path.join(out, "checkpoint.npz")):
        return None
    return int(load_arrays(out)[1].get("epoch", 0))


def resume_or_new(args, kind, new_run, default_epochs, build, families=None, derived=(), log=print, upgrade=None):
    """``(model, run, out)`` for a new run or ``--resume``, with the run directory locked; None when
    ``--resume`` asks for no more epochs than the run has done (it says so and changes nothing).

    new_run: tuple of option names kept in the run record, or ``f(args) -> dict``;
    build(run) -> a new model; families: the stored ``run["family"]`` values this command continues;
    derived: model config keys computed from options rather than copied (a typed one is refused);
    upgrade(run) -> run: maps the option names of an older stored run to today's (before comparing)."""
    if args.resume:
        return _resume(args, kind, default_epochs, families, derived, log, upgrade or (lambda r: r))
    done = _epochs_done(args.out) if args.epochs == 0 and args.out and not args.overwrite else None
    if done is not None:
        log(f"{args.out}: already at epoch {done} (asked for 0 epochs); nothing changed")
        return None
    run = new_run(args) if callable(new_run) else {k: getattr(args, k) for k in new_run}
    if default_epochs is not None or args.epochs is not None:
        run["epochs"] = default_epochs if args.epochs is None else args.epochs
    out = new_run_dir(args.out or default_out(kind), args.overwrite)
    return build(run), run, out


def run_args(meta):
    """The training options a checkpoint's meta stores (``meta["run"]["args"]``); {} when it has none."""
    run = meta.get("run")
    args = run.get("args") if isinstance(run, dict) else None
    return args if isinstance(args, dict) else {}


def _stored_run(out, args, kind, families):
    """(arrays, meta, run options) of OUT/checkpoint.npz, checked to be a resumable ``kind`` run."""
    from ..io import CheckpointError, load_arrays

    arrays, meta = load_arrays(out)
    run = meta.get("run")
    run = run.get("args") if isinstance(run, dict) else None
    if not isinstance(run, dict):
        raise CheckpointError(f"{out}/checkpoint.npz holds no training options (saved by model.save?); "
                              f"it cannot be resumed")
    if meta.get("kind") != kind or (families and run.get("family") not in families):
        held = meta.get("kind") if not families else f"{meta.get('kind')} ({run.get('family')})"
        raise ValueError(f"--resume {args.resume}: the checkpoint holds a {held!r} run, not a "
                         f"{kind if not families else '/'.join(families)} run")
    return arrays, meta, dict(run)


def _resume(args, kind, default_epochs, families, derived, log, upgrade):
    from ..models.registry import model_from_arrays

    out = resume_dir(args.resume)
    if args.out and os.path.realpath(args.out) != os.path.realpath(out):
        raise ValueError(f"--out {args.out} and --resume {args.resume} name different directories; a resumed run "
                         f"writes into its own directory (drop --out)")
    if args.overwrite:
        raise ValueError("--overwrite starts a new run and --resume continues one: give only one of them")
    lock_run(out)
    if is_root():  # the other ranks of a data-parallel run leave the directory to rank 0 (no race with its writes)
        remove_leftovers(out)
    arrays, meta, run = _stored_run(out, args, kind, families)
    run = upgrade(run)
    args.resume = out
    apply_typed(args, run, meta.get("config", {}), log, derived)
    done = int(meta.get("epoch", 0))
    run.setdefault("epochs", default_epochs or done)
    if run["epochs"] < done or (run["epochs"] == done and os.path.exists(os.path.join(out, "summary.json"))):
        log(f"{out}: already at epoch {done} (asked for {run['epochs']}); nothing changed")
        return None
    backend.set_dtype(meta.get("dtype", "float32"))
    return model_from_arrays(arrays, meta, out), run, out


def start_training(model, run, out, resume):
    """(Adam at run["lr"], rng, first epoch): rng and epoch restored from OUT/checkpoint.npz on
    --resume, else a new Generator(run["seed"]) and 0."""
    import numpy as np

    from .. import optim, train

    opt = optim.Adam(model, lr=run["lr"])
    rng, start = train.restore_checkpoint(out, opt) if resume else (np.random.default_rng(run["seed"]), 0)
    return opt, rng, start


def fit(model, opt, rng, start, run, out, args, step, evaluate, train_x, train_y=None):
    """``npdgm.train.fit`` with the run's options (and the communicator of npdgm.distributed.world(): the
    step must accept ``shard=`` under N > 1 ranks); returns the records of metrics.jsonl (all epochs)."""
    from .. import distributed, train

    comm = distributed.world()
    if comm.size > 1 and not getattr(step, "shardable", False):
        raise ValueError(f"this model does not support data-parallel training yet ({comm.size} ranks)")
    train.fit(model, opt, train_x, train_y, epochs=run["epochs"], batch_size=run["batch_size"], out=out, rng=rng,
              step=step, evaluate=evaluate, start_epoch=start, run_meta={"args": run},
              progress=not args.no_progress, clip=run["clip"], comm=comm)
    return train.read_metrics(out)


def write_json(path, obj):
    """Atomically write ``obj`` as strict JSON (NaN/inf as null, see :func:`npdgm.train.dumps`);
    returns the non-finite keys."""
    from ..train import write_json as _write

    return _write(path, obj)


def check_out_file(path, opt):
    """ValueError naming ``opt`` unless ``path`` can be written as a file (checked before any work):
    not a directory, below a directory (existing or to be made, not below a file) we may write."""
    if os.path.isdir(path):
        raise ValueError(f"{opt} {path} is a directory; give a file name")
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise ValueError(f"{opt} {path}: {d} is a file, not a directory")
    if not os.access(d, os.W_OK):
        raise ValueError(f"{opt} {path}: directory {d} is not writable")
    return path


def write_summary(out, summary):
    """Write OUT/summary.json as strict JSON; FloatingPointError (after writing, non-finite values
    as null and listed under "nonfinite") when a value is NaN or infinite."""
    bad = write_json(os.path.join(out, "summary.json"), summary)
    if bad:
        raise FloatingPointError(f"{os.path.join(out, 'summary.json')}: non-finite "
                                 + ", ".join(f"{k}={summary.get(k)}" for k in bad)
                                 + "; the model's numbers are not usable (lower --lr or add --clip)")
