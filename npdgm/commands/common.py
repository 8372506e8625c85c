"""What every ``npdgm train <model>`` shares: option types, the training options, and the run
directory (a new one, ``--overwrite``, ``--resume``, its lock and the leftovers of a killed run).

A run directory is owned by one process at a time (an exclusive lock on ``RUNDIR/.lock``:
flock on POSIX, msvcrt.locking on Windows, :mod:`npdgm._filelock`). A new run
refuses a directory that already holds files unless ``--overwrite`` is given, which removes only the
files npdgm wrote there (:mod:`npdgm.runfiles`) and only in a directory that holds an npdgm run; a run
of the same command stopped before its first checkpoint is started over. ``--resume RUN`` keeps
the run's stored options: it applies a new --lr, --epochs, --clip, --data or evaluation-only option
(--iwae-k, ...) and logs it, and refuses any other option that differs from the stored run. After Ctrl-C,
:func:`interrupt_note` says what the run directory holds.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import re
import shutil

import numpy as np

from .. import accel, backend, runfiles, tensorboard
from .._filelock import try_lock
from ..data import binarize as binarize_images
from ..data import load_dataset, load_mnist
from ..io import load_arrays
from ..models.registry import model_from_arrays

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


# option groups, the same titles in every subcommand (an option shared by commands sits in the same one)
GROUPS = ("model", "data", "evaluation", "sampling", "training", "output", "run")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help shows its default: a help's own ``default X`` reads ``default: X``, and
    ``(default: X)`` is added where the help names none (so -h shows defaults one way in every subcommand)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.help == argparse.SUPPRESS or action.default == argparse.SUPPRESS:
            return text
        text = re.sub(r"(^|\(|; )default (?=\S)", r"\1default: ", text)
        return text if "default: " in text else text + f" (default: {show_default(action)})"


def show_default(action):
    """An option's default as a user types it: lists space-separated, None as none, flags as off/on."""
    v = action.default
    if action.nargs == 0 and isinstance(v, bool):
        v = "on" if v else "off"
    elif v is None:
        v = "none"
    elif isinstance(v, (list, tuple)):
        v = " ".join(map(str, v))
    return str(v).replace("%", "%%")


def group(parser, title):
    """The option group ``title`` (one of GROUPS) of ``parser``, made on first use: options of one kind added
    by several helpers land in one section of -h."""
    assert title in GROUPS, title
    for g in parser._action_groups:
        if g.title == title:
            return g
    return parser.add_argument_group(title)


def add_data_arg(g, default=None, colour=False):
    """--data: a data set name or a directory (the names listed in the help; ``colour``: CIFAR-10 too)."""
    from ..data import DATA_HELP, IMAGE_DATA_HELP

    text = IMAGE_DATA_HELP if colour else DATA_HELP
    help = text if default is None else text.split(" (default")[0] + f" (default: {default})"
    g.add_argument("--data", default=None, metavar="NAME|DIR", help=help)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``npdgm: error: --opt must ... (see PROG -h)``, and whose -h shows
    every option's default (DefaultsHelpFormatter)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*a, **kw)

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
    g = group(p, "training")
    g.add_argument("--epochs", type=nonneg_int, default=epochs,
                   help=f"number of epochs ({epochs_help or f'default {epochs}'}; on --resume the stored value)")
    g.add_argument("--batch-size", "--batch", type=positive_int, default=batch_size, dest="batch_size",
                   help=f"minibatch size ({batch_help or f'default {batch_size}'})")
    g.add_argument("--lr", type=positive_float, default=lr,
                   help=f"Adam learning rate (default {lr:g}; on --resume the stored value)")
    g.add_argument("--clip", type=positive_float, default=None,
                   help="clip the global gradient norm to this value (default: no clipping; on --resume the "
                        "stored value)")
    r = group(p, "run")
    r.add_argument("--seed", type=nonneg_int, default=0, help="seed of initialization, shuffling and noise (default 0)")
    r.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend (default: $NPDGM_BACKEND or numpy)")
    r.add_argument("--dtype", choices=backend.DTYPES, default="float32", help="float type (default float32)")
    add_accel_arg(r)
    add_run_dir_args(r)
    r.add_argument("--distributed", action="store_true",
                   help="data-parallel over MPI ranks (default: on when started by mpiexec -n N, N > 1)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar, no stage lines")
    r.add_argument("--no-plots", action="store_true", help="skip the figures")
    r.add_argument("--config", metavar="FILE", default=None,
                   help="read options from FILE: .json, or .toml with Python >= 3.11, as --print-config writes "
                        "them; options typed on the command line win (default: none)")
    r.add_argument("--print-config", nargs="?", const="json", choices=("json", "toml"), default=None,
                   help="print the effective options as a --config file (json, or toml) and exit (default: off)")


# -- --config / --print-config: a run's options as a file ----------------------------------------------
CONFIG_SKIP = {"config", "print_config", "help"}


def read_config(path):
    """``{dest: value}`` of a --config file: JSON, or TOML where tomllib exists (Python >= 3.11)."""
    import json

    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        try:
            import tomllib
        except ImportError:
            raise ValueError(f"--config {path}: reading TOML needs Python >= 3.11 (tomllib); write the options as "
                             f"JSON (--print-config json)") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--config {path}: not valid TOML ({e})") from None
    else:
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a table of option = value, got {type(data).__name__}")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _config_actions(parser):
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in CONFIG_SKIP}


def config_argv(parser, values, path):
    """The command-line tokens that give ``values`` ({dest: value}) to ``parser``'s options (argparse then
    checks them as if typed; null = the default)."""
    actions, argv = _config_actions(parser), []
    for k, v in values.items():
        a = actions.get(k)
        if a is None:
            raise ValueError(f"--config {path}: {parser.prog} has no option {k!r}")
        if v is None:
            continue
        if a.nargs == 0:
            if not isinstance(v, bool):
                raise ValueError(f"--config {path}: {k} is a flag: true or false, got {v!r}")
            argv += [a.option_strings[0]] if v != a.default else []
        else:
            argv += [a.option_strings[0], *map(str, v if isinstance(v, list) else [v])]
    return argv


def format_config(parser, args, fmt="json"):
    """The effective options of ``args`` as a --config file (TOML leaves out the unset ones: it has no null)."""
    import json

    values = {k: getattr(args, k) for k in _config_actions(parser) if hasattr(args, k)}
    if fmt == "json":
        return json.dumps(values, indent=2)
    return "\n".join(f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None)


def add_accel_arg(g):
    """--accel: the fast wing (npdgm.accel) for this command; :func:`setup_backend` switches it."""
    g.add_argument("--accel", choices=accel.CHOICES, default="auto",
                   help="fast wing: fused kernels, fused Linear+ReLU, threaded/fused Adam (default auto: the "
                        "fastest installed engine, numba then numexpr; off: the reference kernels, bit for bit; "
                        "the checkpoint records what ran)")


def setup_backend(args):
    from .. import distributed

    if getattr(args, "backend", None):
        backend.set_backend(args.backend)
    if getattr(args, "dtype", None):
        backend.set_dtype(args.dtype)
    if getattr(args, "accel", None):
        accel.enable(args.accel)
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


def stage_figures(out, args):
    """The line that says figures are being drawn (they can take a while), on rank 0 unless --no-progress."""
    from ..train import stage

    stage(f"drawing figures into {out}", is_root() and not getattr(args, "no_progress", False))


def default_out(name):
    """A new directory runs/NAME-YYYYMMDD-HHMMSS, made here by rank 0 (``-2``, ``-3``, ... appended while
    that name is taken: ``os.mkdir`` fails on a name another run made in the same second); every rank of a
    data-parallel run gets rank 0's name."""
    import time

    base = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    made = _make_new_dir(base) if is_root() else None
    made = world().bcast(made)
    if isinstance(made, OSError):
        raise ValueError(f"cannot make the run directory {base} (give --out): {made.strerror or made}")
    return made


def _make_new_dir(base, tries=1000):
    """The first of BASE, BASE-2, BASE-3, ... that did not exist, made atomically; the OSError otherwise."""
    try:
        os.makedirs(os.path.dirname(base), exist_ok=True)
        for i in range(1, tries + 1):
            path = base if i == 1 else f"{base}-{i}"
            try:
                os.mkdir(path)
                return path
            except FileExistsError:
                continue
        return FileExistsError(17, f"{tries} run directories of that name exist")
    except OSError as e:
        return e


def typed_options(parser, argv):
    """The dests of the options the user typed in ``argv``: ``parser`` (consumed: its defaults are
    suppressed) parses ``argv`` again, so only typed options reach the namespace. Positionals keep their
    defaults (argparse checks an absent optional positional's default against its choices) and are left out."""
    positional = set()

    def suppress(p):
        p._defaults.clear()
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    suppress(sp)
            elif a.option_strings:
                a.default = argparse.SUPPRESS
            else:
                positional.add(a.dest)
    suppress(parser)
    return set(vars(parser.parse_args(argv))) - positional


# -- the run directory ------------------------------------------------------------------------------
_LOCKS = []  # open lock files of this process, closed by release_locks()


def lock_run(out):
    """Hold an exclusive lock on OUT/.lock until :func:`release_locks` (or the process ends)."""
    if not is_root():  # the other ranks of a data-parallel run share rank 0's lock
        return
    f = try_lock(os.path.join(out, ".lock"))
    if f is None:
        raise ValueError(f"another npdgm process is using {out} (it holds {os.path.join(out, '.lock')}); "
                         f"wait for it to end or choose another --out")
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


def _listing(files):
    return ", ".join(files[:4]) + (", ..." if len(files) > 4 else "")


def new_run_dir(out, overwrite, kind="run", log=print):
    """Create and lock the run directory ``out`` for a new ``kind`` run (the command's name) and start its
    list of written files (:mod:`npdgm.runfiles`). An existing directory must be empty, or hold an npdgm
    run: with ``overwrite`` the files npdgm wrote there are removed (nothing else); without it only a
    ``kind`` run that stopped before its first checkpoint, holding nothing but npdgm's files, is reused.
    Anything else is refused with one line naming --out."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is an existing file, not a run directory")
    if os.path.islink(out) and not os.path.exists(out):
        raise ValueError(f"--out {out} is a symbolic link that leads nowhere (a loop or a missing target); "
                         f"give a directory")
    if is_root():
        runfiles.note_written(os.path.normpath(out))  # a run made inside a run directory is one of its files
    try:
        os.makedirs(out, exist_ok=True)
    except FileExistsError as e:
        raise ValueError(f"--out {out}: {e.filename or out} exists and is not a directory (a file, or a symbolic "
                         f"link that leads nowhere)") from None
    if not is_root():  # rank 0 checks, locks and cleans the directory for the other ranks of a data-parallel run
        return out
    lock_run(out)
    remove_leftovers(out)
    files = sorted(f for f in os.listdir(out) if f not in (".lock", runfiles.LIST))
    tb = os.path.join(out, tensorboard.FOLDER)
    if files:
        held = runfiles.npdgm_names(out)
        if held is None:
            raise ValueError(f"--out {out} holds files that npdgm did not write ({_listing(files)}); a run needs a "
                             f"new or empty directory: pick another --out")
        theirs = [f for f in files if f not in held[1] and f != tensorboard.FOLDER]
        unfinished = not runfiles.has_results(out)
        if not overwrite and not (unfinished and held[0] == kind and not theirs):
            if unfinished:
                raise ValueError(f"--out {out} holds {f'a {held[0]} run' if held[0] else 'a run'} stopped before its "
                                 f"first checkpoint ({_listing(files)}), nothing to resume: start again there with "
                                 f"--overwrite, or pick a new --out")
            raise ValueError(f"--out {out} already holds files ({_listing(files)}); continue that run with --resume "
                             f"{out}, replace it with --overwrite, or pick a new --out")
        if not overwrite:
            log(f"{out}: reusing the directory of a {kind} run that stopped before its first checkpoint")
        runfiles.remove_written(out)
        if os.path.isdir(tb):   # --tensorboard's event files (not listed: tensorboardX writes them)
            shutil.rmtree(tb)
    runfiles.start_list(out, kind)
    return out


# options that say how to run, not what is trained: never compared with the stored run
_NEUTRAL = {"resume", "out", "overwrite", "no_progress", "no_plots", "backend", "command", "model", "func",
            "tensorboard"}
_CHANGEABLE = ("epochs", "lr", "clip", "data")
# options of the evaluation after training only (they change no trained number): a run that ran out of memory in
# its final IWAE estimate is finished with a smaller --iwae-k
_EVALUATION = ("iwae_k", "iwae_n", "impute_rows", "impute_steps", "impute_k", "impute_n")


def _same(a, b):
    norm = lambda v: [norm(x) for x in v] if isinstance(v, (list, tuple)) else v
    return norm(a) == norm(b)


def apply_typed(args, run, config, log=print, derived=()):
    """Compare the options typed with ``--resume`` with the stored run (``run`` from the checkpoint,
    ``config`` the model's, less its ``derived`` keys): apply --epochs/--lr/--clip/--data (and
    $NPDGM_DATA over a stored data path) and the evaluation-only options (--iwae-k, ...) to ``run`` and
    log them; raise ValueError, before applying anything, for any other option that differs or is not stored."""
    typed = getattr(args, "typed", None)   # set by cli.main; without it only a given --epochs counts
    typed = {"epochs"} if typed is None and getattr(args, "epochs", None) is not None else typed or set()
    show = lambda v: " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v
    changes = []
    for k in sorted(typed - _NEUTRAL):
        opt, new = "--" + k.replace("_", "-"), getattr(args, k)
        if k in _CHANGEABLE or k in _EVALUATION:
            if not _same(run.get(k), new):
                changes.append((k, opt, new))
        elif k in run or (k in config and k not in derived):
            old = run[k] if k in run else config[k]
            if not _same(old, new):
                raise ValueError(f"--resume {args.resume}: {opt} {show(new)} differs from the run's {show(old)}; a "
                                 f"resumed run keeps its options (only --epochs, --lr, --clip, --data and evaluation "
                                 f"options such as --iwae-k may change): drop {opt} or start a new run with --out")
        else:
            raise ValueError(f"--resume {args.resume}: {opt} cannot be given with --resume (the run keeps the "
                             f"options it was started with; only --epochs, --lr, --clip, --data and evaluation "
                             f"options such as --iwae-k may change)")
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
        r = _resume(args, kind, default_epochs, families, derived, log, upgrade or (lambda r: r))
        if r is None:
            return None
        model, run, out, done = r
        return model, run, track(out, run, done)
    done = _epochs_done(args.out) if args.epochs == 0 and args.out and not args.overwrite else None
    if done is not None:
        log(f"{args.out}: already at epoch {done} (asked for 0 epochs); nothing changed")
        return None
    run = new_run(args) if callable(new_run) else {k: getattr(args, k) for k in new_run}
    if default_epochs is not None or args.epochs is not None:
        run["epochs"] = default_epochs if args.epochs is None else args.epochs
    out = new_run_dir(args.out or default_out(kind), args.overwrite, getattr(args, "model", None) or kind, log)
    return build(run), run, track(out, run, done=0)


# -- what an interrupted run leaves --------------------------------------------------------------------
_RUN = {}   # the run directory this process trains in: "out", "done" (epoch of its checkpoint), "epochs"


def track(out, run, done, note=None):
    """Remember ``out`` as this process's run, its checkpoint at epoch ``done`` of ``run["epochs"]`` (see
    :func:`interrupt_note`; ``note``: what to say instead); returns ``out``."""
    _RUN.clear()
    _RUN.update(out=out, done=done, epochs=run.get("epochs"), note=note)
    return out


def interrupt_note():
    """One line on what the run directory of this process holds after Ctrl-C outside the training loop
    (which says it itself, :class:`npdgm.train.Interrupted`) and how to continue; "" without a run."""
    if not _RUN:
        return ""
    out, done, epochs = _RUN["out"], _RUN["done"], _RUN["epochs"]
    if _RUN["note"]:
        return _RUN["note"]
    if not done:
        return f"no epoch finished, so {out} holds no checkpoint; run the same command again to start over"
    if done == epochs:
        return (f"training finished (the checkpoint in {out} holds epoch {done}) but its summary was not written; "
                f"--resume {out} writes it")
    return f"the checkpoint in {out} holds epoch {done}; continue with --resume {out}"


def load_image_data(data, split, limit, binarize, seed, colour=False):
    """(x, y) of the ``split`` ("train" | "test") of the image data set ``data`` (a name or directory), its
    first ``limit`` rows; ``binarize`` "static": x > 0.5; "dynamic": the test set drawn once from Bernoulli(x)
    with ``seed`` (the training batches are drawn per step by the train loop); "none": grey levels.
    ``colour``: CIFAR-10 too (``load_dataset``), else 784-pixel images only (``load_mnist``)."""
    x, y = (load_dataset if colour else load_mnist)(split, data, limit=limit)
    if binarize == "static":
        x = binarize_images(x)
    elif binarize == "dynamic" and split == "test":
        x = binarize_images(x, np.random.default_rng([seed, 7]))  # test set drawn once, fixed
    return x, y


def binarizing_step(model, dynamic):
    """step(xb, yb, rng, shard) of :func:`npdgm.train.fit`: ``model.train_step`` on the batch, binarized afresh
    (pixel ~ Bernoulli(grey level), from the run's rng) when ``dynamic``; data-parallel ready (the batch is
    binarized whole, then the model takes its shard)."""
    def step(xb, yb, rng, shard=slice(None)):
        if dynamic:
            xb = (backend.to_device(rng.random(xb.shape, dtype=np.float32)) < xb).astype(model.dtype)
        return model.train_step(xb, rng, shard)
    step.shardable = True
    return step


def load_vae(path):
    """(model, meta) of the VAE checkpoint or run directory ``path``; ValueError naming it for another kind."""
    arrays, meta = load_arrays(path)
    if meta.get("kind") != "vae":
        raise ValueError(f"{path} holds a {meta.get('kind')!r} model; this command handles vae runs")
    return model_from_arrays(arrays, meta, os.fspath(path)), meta


def run_args(meta):
    """The training options a checkpoint's meta stores (``meta["run"]["args"]``); {} when it has none."""
    run = meta.get("run")
    args = run.get("args") if isinstance(run, dict) else None
    return args if isinstance(args, dict) else {}


def _run_name(kind, run):
    """The ``npdgm train`` command of a stored run: its flow family (nice, realnvp, ...) or its kind."""
    family = run.get("family")
    return family if kind == "flow" and isinstance(family, str) else str(kind)


# the shared training options a stored run must hold valid values of (a file may be crafted or damaged)
_STORED_CHECKS = {"epochs": dict(lo=0), "batch_size": dict(lo=1), "seed": dict(lo=0)}


def _check_stored_options(run, path):
    """CheckpointError naming ``path`` and the field unless the stored epochs, batch_size, seed are
    integers in range and lr (and clip, when set) finite and > 0."""
    from ..io import CheckpointError
    from ..validate import check_float, check_int

    try:
        for k, bounds in _STORED_CHECKS.items():
            if k in run:
                check_int(run[k], f"run.args.{k}", **bounds)
        for k in ("lr", "clip"):
            if k in run and (run[k] is not None or k == "lr"):
                check_float(run[k], f"run.args.{k}", lo=0, strict_lo=True)
    except ValueError as e:
        raise CheckpointError(f"{path}: manifest field {e}") from e


def _stored_run(out, args, kind, families):
    """(arrays, meta, run options) of OUT/checkpoint.npz, checked to be a resumable ``kind`` run."""
    from ..io import CheckpointError, checkpoint_path, load_arrays

    path = checkpoint_path(out)
    arrays, meta = load_arrays(path)
    run = meta.get("run")
    run = run.get("args") if isinstance(run, dict) else None
    if not isinstance(run, dict):
        raise CheckpointError(f"{path} holds no training options (saved by model.save?); it cannot be resumed")
    if meta.get("kind") != kind or (families and run.get("family") not in families):
        held, asked = _run_name(meta.get("kind"), run), getattr(args, "model", None) or kind
        raise ValueError(f"--resume {args.resume}: {out} holds a {held} run, not a {asked} run: `npdgm train "
                         f"{asked}` cannot continue it (continue it with `npdgm train {held} --resume {args.resume}`)")
    _check_stored_options(run, path)
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
    return model_from_arrays(arrays, meta, out), run, out, done


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
              step=step, evaluate=evaluate, start_epoch=start, run_meta={"args": run, "accel": accel.engine()},
              progress=not args.no_progress, clip=run["clip"], comm=comm)
    track(out, run, done=run["epochs"])
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
    _probe_dir(d, f"{opt} {path}")
    return path


def _probe_dir(d, what):
    """ValueError naming ``what`` unless a file can be created (and is removed again) in the directory ``d``:
    os.access says yes for a read-write mount of /proc or /sys, where no file can be made."""
    import shutil
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".npdgm-probe-"):
            pass
    except OSError as e:
        try:
            virtual = shutil.disk_usage(d).total == 0
        except OSError:
            virtual = False
        why = "a virtual filesystem (it reports no size), not one for files" if virtual else e.strerror or str(e)
        raise ValueError(f"{what}: cannot create a file in {d}: {why}") from None


def write_summary(out, summary):
    """Write OUT/summary.json as strict JSON; FloatingPointError (after writing, non-finite values
    as null and listed under "nonfinite") when a value is NaN or infinite."""
    bad = write_json(os.path.join(out, "summary.json"), summary)
    if bad:
        raise FloatingPointError(f"{os.path.join(out, 'summary.json')}: non-finite "
                                 + ", ".join(f"{k}={summary.get(k)}" for k in bad)
                                 + "; the model's numbers are not usable (lower --lr or add --clip)")
