"""``npdgm data ...``: download MNIST / Fashion-MNIST / CIFAR-10 into the cache and show what it holds.

    npdgm data download mnist                   # into the cache ($NPDGM_DATA or ~/.cache/npdgm), then --data mnist
    npdgm data download fashion-mnist --dir D   # into D/fashion-mnist; NPDGM_DATA=D ... --data fashion-mnist
    npdgm data download cifar10                 # CIFAR-10's binary archive (163 MiB, md5-checked), then --data cifar10
    npdgm data download mnist --mirror URL      # your own copy of the .gz files first, then the built-in mirrors
    npdgm data list                             # the cache directory and what is in it
    npdgm data path mnist                       # one directory, for scripts

The work is done by ``npdgm.data.download`` (mirrors in order, resumable ``.part`` files, a checksum per file);
why it is plain urllib and not pooch is said in ``npdgm/data.py``.
"""
from __future__ import annotations

import os

from .common import group


def register(commands, train_commands):
    from ..data import DATASETS

    names = tuple(DATASETS)
    p = commands.add_parser("data", help="download MNIST / Fashion-MNIST / CIFAR-10 into the cache; list the cache",
                            description="Data sets for --data NAME. The cache is $NPDGM_DATA, else the user cache "
                                        "directory (~/.cache/npdgm on Linux), one subdirectory per data set.")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    d = sub.add_parser("download", help="fetch a data set's files (checksum-checked, resumable)",
                       description="Fetch the files of each named data set (the four IDX .gz files of MNIST or "
                                   "Fashion-MNIST, CIFAR-10's binary .tar.gz) into DIR/NAME, trying the mirrors in "
                                   "order. An interrupted download resumes from its .part file; a file whose "
                                   "checksum (sha256; md5 for CIFAR-10, whose authors publish only that) differs "
                                   "from the published one is deleted. Then train with --data NAME.")
    d.add_argument("names", nargs="*", default=["mnist"], metavar="NAME",  # choices + nargs="*" rejects a list default
                   help=f"data sets to fetch: {', '.join(names)} (default mnist)")
    g = group(d, "data")
    g.add_argument("--dir", default=None, help="cache directory (default $NPDGM_DATA or the user cache directory)")
    g.add_argument("--mirror", action="append", default=[], metavar="URL",
                   help="a base URL holding the data set's files, tried before the built-in mirrors (repeatable; "
                        "default: only the built-in ones)")
    g.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a mirror is given up "
                                                               "(default 30)")
    group(d, "run").add_argument("--no-progress", action="store_true",
                                 help="no progress bar (none either when stderr is not a terminal)")
    d.set_defaults(func=_cmd_download)
    ls = sub.add_parser("list", help="the cache directory and the data sets in it")
    group(ls, "data").add_argument("--dir", default=None,
                                   help="cache directory (default $NPDGM_DATA or the user cache directory)")
    ls.set_defaults(func=_cmd_list)
    pa = sub.add_parser("path", help="print the cache directory, or one data set's directory")
    pa.add_argument("name", nargs="?", choices=names, default=None, metavar="NAME",
                    help=f"a data set: {', '.join(names)} (default: print the cache directory itself)")
    group(pa, "data").add_argument("--dir", default=None,
                                   help="cache directory (default $NPDGM_DATA or the user cache directory)")
    pa.set_defaults(func=_cmd_path)


def _root(args):
    from ..data import data_root

    return os.path.abspath(os.path.expanduser(args.dir)) if args.dir else data_root()


def _cmd_download(args):
    from ..data import DATASETS, data_root, dataset_dir, download, parse_checksum

    root = _root(args)
    progress = False if args.no_progress else None
    names = list(dict.fromkeys(args.names))
    for name in names:
        dataset_dir(name, root)  # an unknown name fails before anything is fetched
    for name in names:
        d = download(name, root, progress=progress, timeout=args.timeout, log=print, mirrors=args.mirror)
        if os.path.abspath(root) == os.path.abspath(data_root()):
            hint = f"--data {name}"
        else:
            hint = f"--data {d}  (or NPDGM_DATA={root} and --data {name})"
        files = DATASETS[name].files
        algos = "/".join(sorted({parse_checksum(c)[0] for _, c in files.values()}))
        print(f"{name}: {len(files)} file{'s' if len(files) > 1 else ''} in {d}, {algos} checked; train with {hint}")
    return 0


def _cmd_list(args):
    from ..data import DATASETS, cache_status

    root = _root(args)
    origin = ("--dir" if args.dir else "$NPDGM_DATA" if os.environ.get("NPDGM_DATA")
              else "the user cache directory; set NPDGM_DATA to move it")
    print(f"cache: {root}  ({origin})")
    for name, src in DATASETS.items():
        d, ok, bad, parts = cache_status(name, root)
        n = len(src.files)
        if len(ok) == n:
            state, hint = "complete", ""
        else:
            state = "missing" if not (ok or bad or parts) else f"partial {len(ok)}/{n}" + \
                (f", {len(bad)} other size" if bad else "") + (f", {len(parts)} .part" if parts else "")
            hint = f"  <- npdgm data download {name}"
        print(f"  {name:<14} {state:<22} {d}{hint}")
    print(f"  {'bundled':<14} {'always':<22} inside the package: 10,000 train / 2,000 test MNIST images "
          f"(the default without --data)")
    return 0


def _cmd_path(args):
    from ..data import dataset_dir

    root = _root(args)
    print(dataset_dir(args.name, root) if args.name else root)
    return 0
