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

import os
import sys

from . import KEEP_HEAP, __version__, backend
from .bench import run as bench_run
from .commands import cvae, data, evaluate, flows, gmm, m1, m2, sample, vae
from .commands.common import (ArgumentParser, add_train_args, default_out, nonneg_int,  # noqa: F401
                              release_locks, setup_backend, typed_options)

COMMAND_MODULES = (vae, flows, gmm, cvae, m1, m2, sample, data, evaluate)


def _cmd_gradcheck(args):
    from . import checks  # noqa: F401  (registers the kernel and module checks)
    from . import gradcheck, models  # noqa: F401  (models register their own)

    rows = gradcheck.run_all(args.only, seed=args.seed)
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
    print(f"malloc keeps freed memory: {KEEP_HEAP} (NPDGM_KEEP_HEAP; glibc only)")
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

    m = export_reference(args.outdir, args.dtype, args.seed)
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
    g.add_argument("--only", nargs="*", default=None,
                   help="run checks whose name contains any of these (default: every check)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seed of the check inputs (default 0)")
    g.set_defaults(func=_cmd_gradcheck)
    sub.add_parser("info", help="versions, backend and BLAS").set_defaults(func=_cmd_info)
    e = sub.add_parser("export-reference", help="write reference inputs/outputs/gradients for porting")
    e.add_argument("outdir")
    e.add_argument("--dtype", choices=backend.DTYPES, default="float64", help="float type (default float64)")
    e.add_argument("--seed", type=nonneg_int, default=0, help="seed of the reference inputs (default 0)")
    e.set_defaults(func=_cmd_export_reference)
    c = sub.add_parser("check-reference", help="re-run npdgm against a reference directory")
    c.add_argument("outdir")
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


def main(argv=None):
    """Run ``npdgm ARGV``; returns the exit code (0 ok, 2 error, 130 Ctrl-C). Errors print one
    ``npdgm: error: ...`` line to stderr (NPDGM_DEBUG=1 shows the traceback instead)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        args = build_parser().parse_args(argv)
        args.typed = typed_options(build_parser(), argv)  # what the user typed (--resume compares it)
    except SystemExit as e:
        return e.code
    from .io import CheckpointError

    try:
        with backend.use():  # a command's --backend / --dtype end with it (matters when called from Python)
            return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, KeyError, backend.BackendError, CheckpointError, FloatingPointError,
            OSError, MemoryError) as e:
        if os.environ.get("NPDGM_DEBUG"):
            raise
        msg = _os_error(e) if isinstance(e, OSError) else str(e) if not isinstance(e, MemoryError) else \
            f"out of memory ({e})"
        print(f"npdgm: error: {' '.join(msg.split())}", file=sys.stderr)
        return 2
    finally:
        release_locks()


if __name__ == "__main__":
    sys.exit(main())
