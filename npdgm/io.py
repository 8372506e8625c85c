"""Checkpoints: one ``.npz`` of named arrays plus a JSON manifest, written atomically.

Layout of a model checkpoint (what a port reads):
    __meta__            JSON: {"format": "npdgm-checkpoint", "version", "kind", "config",
                               "layout": [[name, shape, offset], ...], "dtype", ...}
    param/<name>        each parameter, e.g. param/encoder.0.W with shape (in, out)
    ...                 anything else the trainer stores (optimizer state, "opt/m.0", ...)
``layout`` gives every parameter's element offset in the model's flat buffer (C order).

Loading trusts nothing in the file: :func:`load_arrays` reads no pickles and checks that the manifest
is a JSON object whose ``layout`` agrees with the stored arrays (shapes, contiguous offsets, dtype),
and :func:`npdgm.models.registry.model_from_arrays` bounds the config by the stored shapes before it
builds anything, then checks that the model built from the config has exactly the stored layout. Every
failure is a :class:`CheckpointError` naming the file.

This module handles arrays and files only and imports no model: :func:`save_model` takes any object
with ``kind``, ``config``, ``layout()`` and ``state_dict()``; the model registry, ``npdgm.load`` and
the config checks live in :mod:`npdgm.models.registry`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
import zlib

import numpy as np

from .backend import DTYPES
from .validate import check_int

FORMAT = "npdgm-checkpoint"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what was asked of it."""


def atomic_write_bytes(path, write):
    """Call ``write(fileobj)`` on a temp file ``.tmp-*`` beside ``path``, fsync, then rename over
    ``path``: a crash or Ctrl-C leaves either the old file or the new one, never half of one (a kill
    can leave the temp file; ``npdgm train`` removes those when it next opens the run directory). The
    file gets the permissions ``open()`` would give (0666 less the umask), not mkstemp's 0600. An
    OSError (full disk, read-only directory) names ``path`` and leaves the old file as it was."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
        umask = os.umask(0)
        os.umask(umask)
        if hasattr(os, "fchmod"):  # Windows before Python 3.13 has none (and no Unix permission bits)
            os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno is not None:
            why = e.strerror or str(e)
            raise OSError(e.errno, f"{why} (the previous {os.path.basename(path)} is unchanged)"
                          if os.path.exists(path) else why, path) from e
        raise


_WINDOWS = os.name == "nt"


def lock_file(path):
    """Open ``path`` (created if missing) and take an exclusive lock on it without waiting:
    ``fcntl.flock`` on POSIX, ``msvcrt.locking`` of its first byte on Windows. Returns the open file;
    closing it (or the process ending) releases the lock. Raises :class:`BlockingIOError` when another
    process holds it."""
    f = open(path, "a+b")
    try:
        if _WINDOWS:
            import msvcrt  # only on Windows

            f.seek(0)
            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            except OSError as e:  # locked elsewhere: PermissionError (EACCES) or EDEADLOCK
                raise BlockingIOError(e.errno, f"{path} is locked by another process") from e
        else:
            import fcntl  # only on POSIX

            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        f.close()
        raise
    return f


def _json_scalar(o):
    """json.dumps ``default``: NumPy scalars are numbers like Python's (np.int64(3) -> 3)."""
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"manifest value {o!r} of type {type(o).__name__} is not JSON-serializable")


def save_arrays(path, arrays, meta):
    """Atomically write {name: array} and a JSON-able ``meta`` dict to ``path`` (.npz)."""
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload["__meta__"] = np.frombuffer(json.dumps({"format": FORMAT, **meta}, default=_json_scalar).encode(),
                                        dtype=np.uint8)
    atomic_write_bytes(path, lambda f: np.savez(f, **payload))


def load_arrays(path):
    """Read ``(arrays, meta)`` from a checkpoint, with a clear error when it is not one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # np.load would also take a .npy (one array) or a pickle
        try:
            with open(path, "rb") as f:
                head = f.read(6)
        except OSError as e:  # a directory named *.npz, no permission
            raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from e
        what = "a .npy file (one array)" if head == b"\x93NUMPY" else "corrupt or truncated, or not an .npz archive"
        raise CheckpointError(f"{path} is not a readable npdgm checkpoint ({what}; a checkpoint is the "
                              f"checkpoint.npz of a run or a file written by model.save)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, zlib.error) as e:
        raise CheckpointError(f"{path} is not a readable npdgm checkpoint (corrupt or truncated: {e})") from e
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path} has no __meta__ manifest; not an npdgm checkpoint")
    raw = arrays.pop("__meta__")
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CheckpointError(f"{path}: __meta__ must be the UTF-8 bytes of a JSON object (uint8, 1-D), "
                              f"got {raw.dtype} with shape {raw.shape}")
    try:
        meta = json.loads(raw.tobytes().decode())
    except ValueError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the manifest must be a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    if "dtype" in meta and meta["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: manifest dtype {meta['dtype']!r} is not one of {DTYPES}")
    if "layout" in meta:
        check_layout(meta["layout"], arrays, meta.get("dtype", "float32"), path)
    return arrays, meta


def check_layout(layout, arrays, dtype, path="checkpoint"):
    """Check a manifest ``layout`` against the stored arrays, as docs/checkpoints.md promises a port:
    a list of ``[name, shape, offset]``, names unique, ``param/<name>`` stored with exactly ``shape``
    and ``dtype``, offsets contiguous (the first 0, each next = previous offset + previous size)."""
    def bad(msg):
        return CheckpointError(f"{path}: manifest layout {msg}")

    if not isinstance(layout, list):
        raise bad(f"must be a list of [name, shape, offset], got a {type(layout).__name__}")
    seen, expect = set(), 0
    for i, entry in enumerate(layout):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], list)):
            raise bad(f"entry {i} must be [name, shape, offset], got {entry!r:.200}")
        name, shape, offset = entry
        try:
            shape = tuple(check_int(d, f"entry {i} ({name}) shape", lo=0) for d in shape)
            offset = check_int(offset, f"entry {i} ({name}) offset", lo=0)
        except ValueError as e:
            raise bad(str(e)) from e
        if name in seen:
            raise bad(f"names {name!r} twice")
        seen.add(name)
        a = arrays.get("param/" + name)
        if a is None:
            raise bad(f"names {name!r} but the file has no array param/{name}")
        if a.shape != shape:
            raise bad(f"gives {name!r} the shape {list(shape)} but param/{name} has shape {list(a.shape)}")
        if a.dtype != np.dtype(dtype):
            raise bad(f"entry {name!r}: param/{name} is {a.dtype}, the manifest dtype is {dtype}")
        if offset != expect:
            raise bad(f"gives {name!r} the offset {offset}, expected {expect} (offsets are contiguous in "
                      f"layout order: previous offset + previous size)")
        expect += math.prod(shape)


def model_arrays(model):
    """{"param/<name>": host array} and manifest fields for a model."""
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
    dtype = next(iter(arrays.values())).dtype.name if arrays else "float32"
    meta = {"kind": model.kind, "config": model.config,
            "layout": [[n, list(s), o] for n, s, o in model.layout()], "dtype": dtype}
    return arrays, meta


def save_model(model, path, extra_arrays=None, extra_meta=None):
    """Save a model (and optionally trainer state) to ``path`` atomically."""
    from . import __version__

    arrays, meta = model_arrays(model)
    arrays.update(extra_arrays or {})
    save_arrays(path, arrays, {"version": __version__, **meta, **(extra_meta or {})})
