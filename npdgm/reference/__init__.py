"""Reference vectors for people porting npdgm's kernels and models to another framework.

    npdgm export-reference OUTDIR [--dtype float64|float32] [--seed S]
    npdgm check-reference OUTDIR

``export-reference`` writes, for every registered case, ``OUTDIR/<case>.npz`` holding
``input/<name>`` (inputs, parameters, noise and the upstream gradient ``input/dy``),
``output/<name>`` and ``grad/<name>``, plus ``OUTDIR/manifest.json`` (names, shapes, dtypes,
formulas, tolerances, npdgm version). The same seed writes identical files.
``check-reference`` re-runs npdgm on the stored inputs and reports the max error of every
output and gradient tensor: the check a port runs, and a regression test for npdgm itself.

A case is ``make(rng, dtype) -> inputs`` and ``run(inputs) -> (outputs, grads)``
(:mod:`npdgm.reference.cases`): one per kernel table entry and the Adam update
(:mod:`npdgm.reference.kernels`, the set ``tests/reference/kernels-f64``), the whole models and flow
layers (:mod:`npdgm.reference.models`, ``tests/reference/models-f64``). A reference directory that
cannot be read (broken or empty manifest, a missing or truncated case file, a missing tensor) or
written raises :class:`ReferenceFileError` naming the file.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib

import numpy as np

from .. import backend
from .._version import __version__
from ..validate import check_int
from . import kernels, models  # noqa: F401  (register the kernel and the model cases)
from .cases import CASES, register  # noqa: F401  (register: for cases added from outside)
from .kernels import KERNEL_CASES  # noqa: F401
from .models import MODEL_CASES  # noqa: F401


class ReferenceFileError(ValueError):
    """A reference directory is unreadable, inconsistent or cannot be written; the message names the file."""


TOLERANCE = {"float64": 1e-10, "float32": 1e-4}  # max |error| / max(1, |reference|) per tensor


# -- export / check ---------------------------------------------------------------------------
def export_reference(outdir, dtype="float64", seed=0, names=None, progress=None):
    """Write every case's .npz and manifest.json into ``outdir``; returns the manifest.
    progress(items) -> iterable: wraps the (name, case) pairs (e.g. npdgm.train.progress)."""
    dt = np.dtype(dtype)
    if dt.name not in backend.DTYPES:
        raise ValueError(f"dtype must be one of {backend.DTYPES}, got {dtype!r}")
    seed = check_int(seed, "seed", lo=0)
    outdir = os.fspath(outdir)
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise ReferenceFileError(f"{outdir} is a file; export-reference writes a directory of .npz files "
                                 f"and manifest.json (give a new or existing directory)")
    try:
        return _export(outdir, dt, seed, names, progress or iter)
    except OSError as e:
        where = e.filename or outdir
        raise ReferenceFileError(f"{where}: cannot write the reference vectors ({e.strerror or e})") from e


def _export(outdir, dt, seed, names, progress):
    """export_reference's writing part (any OSError is reported by the caller, naming the file)."""
    os.makedirs(outdir, exist_ok=True)
    manifest = {"npdgm_version": __version__, "dtype": dt.name, "seed": seed,
                "tolerance": TOLERANCE[dt.name], "error": "max|npdgm - reference| / max(1, max|reference|)",
                "cases": {}}
    with backend.use("numpy", dt.name):
        for name, case in progress([(n, c) for n, c in sorted(CASES.items()) if not names or n in names]):
            inputs = case["make"](np.random.default_rng([seed, zlib.crc32(name.encode())]), dt)
            outputs, grads = case["run"](inputs)
            arrays = {**{f"input/{k}": v for k, v in inputs.items()},
                      **{f"output/{k}": backend.to_host(v) for k, v in outputs.items()},
                      **{f"grad/{k}": backend.to_host(v) for k, v in grads.items()}}
            with open(os.path.join(outdir, f"{name}.npz"), "wb") as f:
                np.savez(f, **arrays)
            manifest["cases"][name] = {
                "file": f"{name}.npz", "formula": case["formula"],
                "tensors": {k: {"shape": list(np.shape(v)), "dtype": str(np.asarray(v).dtype)}
                            for k, v in arrays.items()}}
    with open(os.path.join(outdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def _read_manifest(outdir):
    """manifest.json of ``outdir``, checked: an object with a known dtype, a tolerance and >= 1 case."""
    path = os.path.join(outdir, "manifest.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{outdir} has no manifest.json (write one with npdgm export-reference)")

    def bad(msg):
        return ReferenceFileError(f"{path}: {msg} (rewrite it with npdgm export-reference)")

    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError, a directory
        raise bad(f"not a readable JSON manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise bad(f"expected a JSON object, got a {type(manifest).__name__}")
    missing = [k for k in ("dtype", "tolerance", "cases") if k not in manifest]
    if missing:
        raise bad(f"missing key(s) {missing}")
    if manifest["dtype"] not in backend.DTYPES:
        raise bad(f"dtype {manifest['dtype']!r} is not one of {backend.DTYPES}")
    tol = manifest["tolerance"]
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < float("inf"):
        raise bad(f"tolerance must be a non-negative number, got {tol!r}")
    cases = manifest["cases"]
    if not isinstance(cases, dict) or not cases:
        raise bad("lists no cases" if isinstance(cases, dict) else f"cases must be an object, got {cases!r:.80}")
    for name, entry in cases.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise bad(f"case {name!r} has no \"file\" entry")
        if os.path.basename(entry["file"]) != entry["file"]:
            raise bad(f"case {name!r}: file {entry['file']!r} must be a file name inside {outdir}")
    return manifest


def _read_case(outdir, name, entry):
    """{key: array} of a case file, every tensor the manifest lists present."""
    path = os.path.join(outdir, entry["file"])
    if not os.path.isfile(path):
        raise ReferenceFileError(f"{path}: missing (listed for case {name!r} in manifest.json)")
    try:
        with np.load(path, allow_pickle=False) as z:
            stored = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error, AttributeError) as e:
        raise ReferenceFileError(f"{path}: not a readable .npz (corrupt or truncated: {e})") from e
    listed = entry.get("tensors", {})
    absent = sorted(k for k in listed if k not in stored) if isinstance(listed, dict) else []
    if absent:
        raise ReferenceFileError(f"{path}: missing tensor(s) {absent} listed in manifest.json")
    return stored


def check_reference(outdir):
    """Re-run npdgm on ``outdir``'s stored inputs; returns [(case, tensor, error, passed)]."""
    outdir = os.fspath(outdir)
    manifest = _read_manifest(outdir)
    tol, rows = manifest["tolerance"], []
    with backend.use("numpy", manifest["dtype"]):
        for name, entry in manifest["cases"].items():
            if name not in CASES:
                rows.append((name, "-", float("inf"), False))
                continue
            stored = _read_case(outdir, name, entry)
            inputs = {k[len("input/"):]: v for k, v in stored.items() if k.startswith("input/")}
            try:
                outputs, grads = CASES[name]["run"](inputs)
            except KeyError as e:
                if not (e.args and isinstance(e.args[0], str) and e.args[0] not in inputs):
                    raise
                raise ReferenceFileError(f"{os.path.join(outdir, entry['file'])}: case {name!r} needs the "
                                         f"tensor input/{e.args[0]}, which the file lacks") from e
            except (ValueError, TypeError, IndexError) as e:
                raise ReferenceFileError(f"{os.path.join(outdir, entry['file'])}: case {name!r} cannot run on the "
                                         f"stored inputs ({type(e).__name__}: {e})") from e
            got = {**{f"output/{k}": v for k, v in outputs.items()}, **{f"grad/{k}": v for k, v in grads.items()}}
            for key in sorted(k for k in stored if not k.startswith("input/")):
                if key not in got:
                    rows.append((name, key, float("inf"), False))
                    continue
                ref = stored[key].astype(np.float64)
                err = float(np.max(np.abs(backend.to_host(got[key]) - ref), initial=0.0)) / max(
                    1.0, float(np.max(np.abs(ref), initial=0.0)))
                rows.append((name, key, err, err <= tol))
    return rows
