"""``npdgm ...`` and ``python -m npdgm ...``.

    npdgm gradcheck              check every kernel, module and model backward (float64)
    npdgm train <model> ...      train a model into a run directory (see npdgm train -h)
    npdgm info                   versions, backend, BLAS
    npdgm export-reference DIR   reference vectors for ports; npdgm check-reference DIR re-checks them
    npdgm bench ...              time training steps on npdgm-NumPy / npdgm-CuPy / PyTorch (see npdgm bench -h)

Each model family adds its own subcommands from ``npdgm/commands/<family>.py`` (listed in
``COMMAND_MODULES``) through ``register(commands, train_commands)``.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__, backend

COMMAND_MODULES = ("vae", "flows", "gmm", "cvae", "m2", "data")


def add_train_args(p, epochs=10, batch_size=128, lr=1e-3):
    """Options every ``npdgm train <model>`` shares."""
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help=f"number of epochs (default {epochs})")
    g.add_argument("--batch-size", type=int, default=batch_size, help=f"minibatch size (default {batch_size})")
    g.add_argument("--lr", type=float, default=lr, help=f"Adam learning rate (default {lr:g})")
    g.add_argument("--clip", type=float, default=None, help="clip the global gradient norm to this value")
    g.add_argument("--seed", type=int, default=0, help="seed of initialization, shuffling and noise (default 0)")
    g.add_argument("--backend", choices=backend.BACKENDS, default=None,
                   help="array backend (default: $NPDGM_BACKEND or numpy)")
    g.add_argument("--dtype", choices=backend.DTYPES, default="float32", help="float type (default float32)")
    g.add_argument("--out", default=None, help="run directory (default runs/<model>-<time>)")
    g.add_argument("--resume", metavar="RUNDIR", default=None,
                   help="continue the run in RUNDIR from its last checkpoint (same options are reused)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plots", action="store_true", help="skip the figures")


def setup_backend(args):
    if getattr(args, "backend", None):
        backend.set_backend(args.backend)
    if getattr(args, "dtype", None):
        backend.set_dtype(args.dtype)


def default_out(name):
    import time

    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def _cmd_gradcheck(args):
    from . import checks  # noqa: F401  (registers the kernel and module checks)
    from . import gradcheck, models  # noqa: F401  (models register their own)

    rows = gradcheck.run_all(args.only, seed=args.seed)
    if not rows:
        print(f"no check matches {args.only}", file=sys.stderr)
        return 2
    print(gradcheck.format_table(rows))
    return 0 if all(r[4] for r in rows) else 1


def _cmd_info(args):
    import platform

    import numpy

    print(f"npdgm {__version__}  python {platform.python_version()}  numpy {numpy.__version__}")
    try:
        name, problem = backend.get_backend(), None
    except backend.BackendError as e:  # a bad NPDGM_BACKEND: reported, not a traceback
        name, problem = "unusable", e
    print(f"backend {name}  dtype {backend.get_dtype()}  cupy usable: {backend.cupy_available()}")
    if problem:
        print(f"problem: {problem} (commands without --backend stop with this error)")
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
    p = argparse.ArgumentParser(prog="npdgm", description="Deep generative models with hand-written gradients.")
    p.add_argument("--version", action="version", version=f"npdgm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("gradcheck", help="finite-difference check of every backward (float64)")
    g.add_argument("--only", nargs="*", default=None, help="run checks whose name contains any of these")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=_cmd_gradcheck)
    sub.add_parser("info", help="versions, backend and BLAS").set_defaults(func=_cmd_info)
    e = sub.add_parser("export-reference", help="write reference inputs/outputs/gradients for porting")
    e.add_argument("outdir")
    e.add_argument("--dtype", choices=backend.DTYPES, default="float64")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_cmd_export_reference)
    c = sub.add_parser("check-reference", help="re-run npdgm against a reference directory")
    c.add_argument("outdir")
    c.set_defaults(func=_cmd_check_reference)
    importlib.import_module(".bench.run", __package__).register(sub)   # npdgm bench: npdgm/bench/run.py
    t = sub.add_parser("train", help="train a model (npdgm train -h lists them)")
    tsub = t.add_subparsers(dest="model", required=True, metavar="MODEL")
    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(sub, tsub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .io import CheckpointError

    try:
        with backend.use():  # a command's --backend / --dtype end with it (matters when called from Python)
            return args.func(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, TypeError, KeyError, FileNotFoundError, backend.BackendError, CheckpointError,
            FloatingPointError) as e:
        if os.environ.get("NPDGM_DEBUG"):
            raise
        print(f"npdgm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
