"""``npdgm ...`` and ``python -m npdgm ...``.

    npdgm gradcheck              check every kernel, module and model backward (float64)
    npdgm train <model> ...      train a model into a run directory (see npdgm train -h)
    npdgm info                   versions, backend, BLAS
    npdgm export-reference DIR   reference vectors for ports; npdgm check-reference DIR re-checks them
    npdgm bench ...              time training steps on npdgm-NumPy / npdgm-CuPy / PyTorch (see npdgm bench -h)

Each model family adds its own subcommands from ``npdgm/commands/<family>.py`` (listed in
``COMMAND_MODULES``) through ``register(commands, train_commands)``; ``npdgm sample`` (any run) is
``npdgm/commands/sample.py``. Imports go downward only: cli -> commands -> models; no command imports cli.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import numpy as np

from . import accel, backend, distributed
from ._version import __version__
from .bench import run as bench_run
from .commands import autoencoder, cvae, data, evaluate, export, flows, gmm, gmvae, m1, m2, sample, study, vae
from .commands.common import (ArgumentParser, add_train_args, config_argv, default_out, format_config,  # noqa: F401
                              group, interrupt_note, nonneg_int, read_config, release_locks, setup_backend,
                              typed_options)
from .train import Interrupted, progress

COMMAND_MODULES = (vae, flows, gmm, gmvae, autoencoder, cvae, m1, m2, sample, data, evaluate, export, study)


def _cmd_gradcheck(args):
    from . import checks  # noqa: F401  (registers the kernel and module checks)
    from . import gradcheck, models  # noqa: F401  (models register their own)

    rows = gradcheck.run_all(args.only, seed=args.seed, progress=lambda items: progress(items, "gradcheck"))
    if not rows:
        print(f"no check matches {args.only}", file=sys.stderr)
        return 2
    print(gradcheck.format_table(rows))
    return 0 if all(r[4] for r in rows) else 1


INFO_PACKAGES = ("matplotlib", "tqdm", "torch", "numba", "numexpr", "mpi4py", "threadpoolctl", "tensorboardX")


def package_versions(names=INFO_PACKAGES):
    """{distribution name: its installed version, or "not installed"}, read from the package metadata
    (nothing is imported, so torch costs no start-up time here)."""
    from importlib import metadata

    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _cmd_info(args):
    import platform

    import numpy

    from .data import data_root

    print(f"npdgm {__version__}  python {platform.python_version()}  numpy {numpy.__version__}  "
          f"{platform.system()} {platform.machine()}")
    print("optional: " + "  ".join(f"{name} {version}" for name, version in package_versions().items()))
    print(f"data cache: {data_root()} (NPDGM_DATA {'set' if os.environ.get('NPDGM_DATA') else 'unset'})")
    try:
        name, problem = backend.get_backend(), None
    except backend.BackendError as e:  # a bad NPDGM_BACKEND: reported, not a traceback
        name, problem = "unusable", e
    print(f"backend {name}  dtype {backend.get_dtype()}  cupy usable: {backend.cupy_available()}")
    if problem:
        print(f"problem: {problem} (commands without --backend stop with this error)")
    engines = [e for e in accel.AUTO_ORDER if accel.engine_available(e)]
    print(f"fast wing: --accel auto runs {engines[0] if engines else 'threads (no numba / numexpr)'}; "
          f"installed engines: {', '.join(engines) or 'none'}; process settings at switch-on:")
    for line in accel.process.describe():
        print(f"  {line}")
    try:
        from threadpoolctl import threadpool_info

        for t in threadpool_info():
            print(f"  {t.get('internal_api')} {t.get('version')} threads={t.get('num_threads')} "
                  f"arch={t.get('architecture')}")
    except ImportError:
        pass
    return 0


def _cmd_export_reference(args):
    from .reference import export_reference

    m = export_reference(args.outdir, args.dtype, args.seed,
                         progress=lambda items: progress(items, f"reference cases -> {args.outdir}"))
    print(f"wrote {len(m['cases'])} reference cases ({args.dtype}, seed {args.seed}) to {args.outdir}")
    return 0


def _cmd_check_reference(args):
    from .reference import check_reference

    rows = check_reference(args.outdir)
    w = max(len(f"{c}:{t}") for c, t, _, _ in rows)
    for case, tensor, err, ok in rows:
        print(f"{case + ':' + tensor:<{w}}  {err:10.2e}  {'ok' if ok else 'MISMATCH'}")
    bad = sum(not r[3] for r in rows)
    print(f"{len(rows) - bad} tensors match, {bad} mismatch")
    return 0 if bad == 0 else 1


def build_parser():
    p = ArgumentParser(prog="npdgm", description="Deep generative models with hand-written gradients.")
    p.add_argument("--version", action="version", version=f"npdgm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("gradcheck", help="finite-difference check of every backward (float64)")
    group(g, "evaluation").add_argument("--only", nargs="*", default=None,
                                        help="run checks whose name contains any of these (default: every check)")
    group(g, "run").add_argument("--seed", type=nonneg_int, default=0, help="seed of the check inputs (default 0)")
    g.set_defaults(func=_cmd_gradcheck)
    sub.add_parser("info", help="versions, backend and BLAS").set_defaults(func=_cmd_info)
    e = sub.add_parser("export-reference", help="write reference inputs/outputs/gradients for porting")
    e.add_argument("outdir", metavar="OUTDIR", help="directory to write the .npz cases and manifest.json into "
                                                    "(made if missing)")
    r = group(e, "run")
    r.add_argument("--dtype", choices=backend.DTYPES, default="float64", help="float type (default float64)")
    r.add_argument("--seed", type=nonneg_int, default=0, help="seed of the reference inputs (default 0)")
    e.set_defaults(func=_cmd_export_reference)
    c = sub.add_parser("check-reference", help="re-run npdgm against a reference directory")
    c.add_argument("outdir", metavar="OUTDIR", help="a directory written by npdgm export-reference")
    c.set_defaults(func=_cmd_check_reference)
    bench_run.register(sub)   # npdgm bench: npdgm/bench/run.py
    t = sub.add_parser("train", help="train a model (npdgm train -h lists them)")
    tsub = t.add_subparsers(dest="model", required=True, metavar="MODEL")
    for module in COMMAND_MODULES:
        module.register(sub, tsub)
    return p


def _os_error(e):
    """One line for an OSError: the file, then what went wrong."""
    if e.filename is None:
        return str(e)
    return f"{e.filename}: {e.strerror or e}" + (f" -> {e.filename2}" if e.filename2 else "")


def _leaf_parser(parser, args):
    """The subparser that parsed ``args`` (``npdgm train vae``'s for a train command)."""
    for name in (args.command, getattr(args, "model", None)):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or name is None:
            break
        parser = subs[0].choices[name]
    return parser


def _with_config(argv, args):
    """``argv`` with the options of ``--config FILE`` put before the typed ones (typed ones win), less --config."""
    leaf = _leaf_parser(build_parser(), args)
    tokens = config_argv(leaf, read_config(args.config), args.config)
    rest, skip = [], False
    for a in argv[2:]:
        if skip or a.startswith("--config="):
            skip = False
            continue
        skip = a == "--config"
        if not skip:
            rest.append(a)
    return argv[:2] + tokens + rest


def _parse(argv):
    """(args, argv after --config) of ``npdgm ARGV``; SystemExit on an argparse error or -h."""
    args = build_parser().parse_args(argv)
    if getattr(args, "config", None):
        argv = _with_config(argv, args)
        args = build_parser().parse_args(argv)
    return args, argv


@contextlib.contextmanager
def quiet_numpy():
    """NumPy's floating-point warnings (``RuntimeWarning: overflow encountered in exp``) off while a command
    runs, in every thread: the commands check their numbers themselves (a diverged run, a non-finite summary
    or model) and say in one error line which epoch, option, parameter or file is at fault."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero|underflow) encountered",
                                RuntimeWarning)
        yield


def main(argv=None):
    """Run ``npdgm ARGV``; returns the exit code (0 ok, 2 error, 130 Ctrl-C). Errors print one
    ``npdgm: error: ...`` line to stderr (NPDGM_DEBUG=1 shows the traceback instead)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args, argv = _parse(argv)
        args.typed = typed_options(build_parser(), argv)  # what the user typed (--resume compares it)
    except SystemExit as e:
        return e.code
    except (ValueError, OSError) as e:  # a --config file that cannot be read
        print(f"npdgm: error: {_os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", None):
        print(format_config(_leaf_parser(build_parser(), args), args, args.print_config))
        return 0
    wing = accel.state()   # a command's --accel ends with it, as its --backend / --dtype do
    try:
        with backend.use(), quiet_numpy():  # a command's --backend / --dtype end with it (called from Python)
            return args.func(args) or 0
    except KeyboardInterrupt as e:
        comm = distributed.world()
        if comm.size > 1 and not isinstance(e.__cause__ or e, distributed.RankInterrupted):
            comm.interrupt()   # the other ranks stop at their next collective instead of waiting for its timeout
        if comm.rank == 0:     # the ranks share rank 0's run directory: it alone says what it holds
            note = str(e) if isinstance(e, Interrupted) else f"interrupted: {interrupt_note()}".rstrip(": ")
            print(f"npdgm: {note}", file=sys.stderr, flush=True)
        if comm.size > 1:  # a collective the interrupted rank left cannot finish: MPI_Finalize would complain
            release_locks()
            sys.stdout.flush()
            comm.part()
            os._exit(130)
        return 130
    except (ValueError, backend.BackendError, FloatingPointError, OSError, MemoryError) as e:
        # user errors (bad options, files, checkpoints: ValueError and its kin CheckpointError, DataError...);
        # a KeyError / TypeError / AttributeError is a bug in npdgm and keeps its traceback
        if os.environ.get("NPDGM_DEBUG"):
            raise
        if getattr(e, "rank0_reports", False) and distributed.world().rank != 0:
            return 2   # raised alike on every rank (a diverged data-parallel run): rank 0 says it once
        msg = _os_error(e) if isinstance(e, OSError) else str(e) if not isinstance(e, MemoryError) else \
            f"out of memory ({e})"
        print(f"npdgm: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    finally:
        accel.set_state(wing)
        release_locks()


if __name__ == "__main__":
    sys.exit(main())
