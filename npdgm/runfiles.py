"""Which files of a run directory npdgm wrote: the list ``RUNDIR/.npdgm-files``.

``npdgm train`` starts the list when it makes a run directory (:func:`start_list`); every file npdgm
writes there (:func:`npdgm.io.atomic_write_bytes`, the metrics appends, a nested run directory) adds its
name first (:func:`note_written`), so a killed write leaves at most a listed name without its file, never
an unlisted file. ``--overwrite`` and the reuse of a run stopped before its first checkpoint remove only
listed names, never a user's photo that happens to lie beside them. A run directory made before the list
existed falls back to :data:`KNOWN`, the names npdgm writes.

The list is text: a header line ``# npdgm KIND run ...``, then one file name per line (a plain name:
no ``/``, not ``.`` or ``..``; a line without its newline, cut short by a kill, is ignored).
"""
from __future__ import annotations

import os
import re

LIST = ".npdgm-files"
#: the names a run directory of any npdgm version before the list may hold (figures, records, results)
KNOWN = ("checkpoint.npz", "metrics.jsonl", "metrics.csv", "summary.json", "baseline.json", "m1.json",
         "classifier.npz", "vae", "curves.png", "reconstructions.png", "samples.png", "interpolation.png",
         "imputation.png", "latent.png", "manifold.png", "density.png", "means.png", "classes.png",
         "style_transfer.png")
#: files whose presence marks a directory made before the list as an npdgm run
RUN_MARKS = ("checkpoint.npz", "metrics.jsonl", "summary.json", "m1.json")
_HEADER = re.compile(r"# npdgm (\S+) run")


def _plain(name):
    return bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def start_list(out, kind):
    """Begin OUT/.npdgm-files of a new ``kind`` run (an empty list)."""
    with open(os.path.join(out, LIST), "w") as f:
        f.write(f"# npdgm {kind} run: the files npdgm wrote here (--overwrite removes these, nothing else)\n")


def read_list(out):
    """``(kind, names)`` of OUT/.npdgm-files, or None when OUT keeps no list (or it is unreadable)."""
    try:
        with open(os.path.join(out, LIST), errors="replace") as f:
            lines = f.read().split("\n")[:-1]   # the last piece has no newline: cut short by a kill
    except OSError:
        return None
    m = _HEADER.match(lines[0]) if lines else None
    return (m[1] if m else None), [n for n in lines[1:] if _plain(n)]


def note_written(path):
    """Add the name of ``path`` to the list of its directory, when that directory keeps one (a run
    directory of ``npdgm train``); call it before writing ``path``."""
    d, name = os.path.split(os.path.abspath(os.fspath(path)))
    if name == LIST or not _plain(name):
        return
    held = read_list(d)
    if held is None or name in held[1]:
        return
    try:
        with open(os.path.join(d, LIST), "a") as f:
            f.write(name + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), os.path.join(d, LIST)) from e


def npdgm_names(out):
    """``(kind, names)``: the names npdgm wrote in OUT (its list; :data:`KNOWN` with kind None for a run
    directory made before the list), or None when OUT holds no npdgm run."""
    held = read_list(out)
    if held is not None:
        return held
    if any(os.path.isfile(os.path.join(out, f)) for f in RUN_MARKS):
        return None, list(KNOWN)
    return None


def has_results(out):
    """True when OUT (or a run directory npdgm made inside it) holds a checkpoint or a summary: work
    that a new run must not throw away unasked."""
    if any(os.path.exists(os.path.join(out, f)) for f in ("checkpoint.npz", "summary.json")):
        return True
    held = npdgm_names(out)
    return any(os.path.isdir(os.path.join(out, n)) and not os.path.islink(os.path.join(out, n))
               and has_results(os.path.join(out, n)) for n in (held[1] if held else ()))


def remove_written(out):
    """Delete the files npdgm wrote in the run directory OUT (:func:`npdgm_names`; a nested run directory
    the same way, then the directory itself when nothing else is left in it) and the list; keep any
    other file."""
    held = npdgm_names(out)
    for name in held[1] if held else ():
        p = os.path.join(out, name)
        if os.path.isdir(p) and not os.path.islink(p):
            if npdgm_names(p) is not None:
                remove_written(p)
                for f in (".lock",):
                    if os.path.exists(os.path.join(p, f)):
                        os.remove(os.path.join(p, f))
                if not os.listdir(p):
                    os.rmdir(p)
        elif os.path.lexists(p):
            os.remove(p)
    if os.path.exists(os.path.join(out, LIST)):
        os.remove(os.path.join(out, LIST))
