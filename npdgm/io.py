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
import re
import stat
import tempfile
import zipfile
import zlib
from typing import NamedTuple

import numpy as np

from ._version import __version__
from .backend import DTYPES
from .runfiles import note_written
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
        note_written(path)  # a run directory lists the files npdgm wrote (npdgm.runfiles)
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


# Bounds on what a file may make the loader do (checked before anything is inflated or allocated).
MAX_MANIFEST_BYTES = 1 << 24   # the JSON manifest of any npdgm model is far smaller
MAX_MANIFEST_DEPTH = 32        # nesting of the manifest's JSON (npdgm writes about 6 levels)
MAX_INFLATION = 32             # declared bytes per byte of file (npdgm stores members uncompressed) ...
INFLATION_SLACK = 1 << 20      # ... plus this much, for a small compressed file
MAX_COUNT = 1 << 53            # epochs and optimizer steps of any real run
_OPT_MEMBER = re.compile(r"opt/[A-Za-z_]+\.[0-9]+")   # optimizer state: opt/m.0, opt/v.0, opt/buf.0


class Header(NamedTuple):
    """What an .npy member declares before its data: shape, dtype (a numpy.dtype), and the data's byte offset
    in the member."""
    shape: tuple
    dtype: object
    fortran: bool
    offset: int


def checkpoint_path(path):
    """``path`` or ``path/checkpoint.npz`` when it is a directory; a CheckpointError unless a regular file
    is there (a device such as /dev/zero or a FIFO would be read without end)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        st = os.stat(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from e
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: cannot read the checkpoint (Is a directory)")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is not a regular file (a device, FIFO or socket); a checkpoint is the "
                              f"checkpoint.npz of a run or a file written by model.save")
    return path


def load_arrays(path):
    """Read ``(arrays, meta)`` from a checkpoint, with a clear error when it is not one.

    Nothing is inflated before it is bounded: the members' declared sizes (zip central directory) must fit
    ``MAX_INFLATION`` x the file size, every member must be an .npy array whose header agrees with its
    declared size, the manifest is read first, and each other member must be one the manifest accounts for
    (:func:`check_members`) before its data is read."""
    path = checkpoint_path(path)
    if not zipfile.is_zipfile(path):  # np.load would also take a .npy (one array) or a pickle
        try:
            with open(path, "rb") as f:
                head = f.read(6)
        except OSError as e:  # no permission
            raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from e
        what = "a .npy file (one array)" if head == b"\x93NUMPY" else "corrupt or truncated, or not an .npz archive"
        raise CheckpointError(f"{path} is not a readable npdgm checkpoint ({what}; a checkpoint is the "
                              f"checkpoint.npz of a run or a file written by model.save)")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = _member_infos(zf, path)
            if "__meta__" not in infos:
                raise CheckpointError(f"{path} has no __meta__ manifest; not an npdgm checkpoint")
            meta = _read_manifest(zf, infos.pop("__meta__"), path)
            headers = {k: _read_header(zf, info, k, path) for k, info in infos.items()}
            check_members(headers, meta, path)
            arrays = {k: _read_data(zf, infos[k], headers[k], k, path) for k in infos}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, ValueError, EOFError,
            zlib.error) as e:
        raise CheckpointError(f"{path} is not a readable npdgm checkpoint (corrupt or truncated: {e})") from e
    return arrays, meta


def _member_infos(zf, path):
    """{name without .npy: ZipInfo}; every member an .npy, no name twice, the declared sizes bounded."""
    infos, declared = {}, 0
    for info in zf.infolist():
        if not info.filename.endswith(".npy"):
            raise CheckpointError(f"{path}: member {info.filename!r} is not an .npy array")
        name = info.filename[:-4]
        if name in infos:
            raise CheckpointError(f"{path}: member {info.filename!r} is stored twice")
        infos[name] = info
        declared += info.file_size
    size = os.path.getsize(path)
    if declared > MAX_INFLATION * size + INFLATION_SLACK:
        raise CheckpointError(f"{path}: its members declare {declared} bytes uncompressed in a file of {size} bytes "
                              f"(more than {MAX_INFLATION}x; a zip bomb?); refusing to inflate them")
    return infos


def _read_header(zf, info, name, path):
    """The .npy header of member ``name``, checked against the member's declared size (only the header is
    inflated)."""
    fmt = np.lib.format
    with zf.open(info) as f:
        try:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except ValueError as e:
            raise CheckpointError(f"{path}: member {name} is not an .npy array ({e})") from e
        offset = f.tell()
    if dtype.hasobject:
        raise CheckpointError(f"{path}: member {name} holds Python objects ({dtype}); checkpoints hold numbers only")
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes != info.file_size:
        raise CheckpointError(f"{path}: member {name} declares shape {list(shape)} of {dtype} ({nbytes} bytes) but "
                              f"the archive declares {max(info.file_size - offset, 0)} bytes of data for it")
    return Header(tuple(shape), dtype, fortran, offset)


def _read_data(zf, info, header, name, path):
    """The array of member ``name`` (its size already checked against ``header``); the CRC is verified."""
    a = np.empty(header.shape[::-1] if header.fortran else header.shape, header.dtype)
    with zf.open(info) as f:
        f.read(header.offset)
        got = f.readinto(memoryview(a.reshape(-1).view(np.uint8))) if a.size else 0
        if got != a.nbytes or f.read(1):
            raise CheckpointError(f"{path}: member {name} holds {got} bytes of data, its header declares {a.nbytes}")
    return a.T if header.fortran else a


def _depth(value):
    """How deep lists and objects nest in a JSON value (a scalar 0, [1] 1, {"a": [1]} 2), counted to one
    past the bound, without recursion."""
    deepest, todo = 0, [(value, 1)] if isinstance(value, (list, dict)) else []
    while todo:
        v, d = todo.pop()
        deepest = max(deepest, d)
        if d <= MAX_MANIFEST_DEPTH:
            todo.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (list, dict)))
    return deepest


def _read_manifest(zf, info, path):
    """The manifest: the JSON object in member __meta__ (uint8 bytes), its depth and fields checked."""
    header = _read_header(zf, info, "__meta__", path)
    if header.dtype != np.uint8 or len(header.shape) != 1:
        raise CheckpointError(f"{path}: __meta__ must be the UTF-8 bytes of a JSON object (uint8, 1-D), "
                              f"got {header.dtype} with shape {header.shape}")
    if header.shape[0] > MAX_MANIFEST_BYTES:
        raise CheckpointError(f"{path}: __meta__ holds {header.shape[0]} bytes, more than a manifest can "
                              f"({MAX_MANIFEST_BYTES})")
    raw = _read_data(zf, info, header, "__meta__", path)
    too_deep = f"{path}: the manifest nests deeper than {MAX_MANIFEST_DEPTH} levels; not an npdgm checkpoint"
    try:
        meta = json.loads(raw.tobytes().decode())
    except RecursionError:
        raise CheckpointError(too_deep) from None
    except ValueError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    if _depth(meta) > MAX_MANIFEST_DEPTH:
        raise CheckpointError(too_deep)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the manifest must be a JSON object, got a {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    if "dtype" in meta and meta["dtype"] not in DTYPES:
        raise CheckpointError(f"{path}: manifest dtype {meta['dtype']!r} is not one of {DTYPES}")
    for field in ("epoch", "opt_t"):  # a training checkpoint's counters
        if field in meta:
            try:
                v = check_int(meta[field], f"manifest field {field}", lo=0)
            except ValueError as e:
                raise CheckpointError(f"{path}: {e}") from e
            if v > MAX_COUNT:
                raise CheckpointError(f"{path}: manifest field {field}={v} is more than any run counts (2**53)")
    return meta


def check_members(headers, meta, path="checkpoint"):
    """Every member must be one the manifest accounts for, with the size it allows: ``param/<name>`` of
    the layout with its shape and dtype, ``param/<buffer>`` a 0-d flag (flows' ActNorm), ``opt/<state>.<i>``
    at most as many elements as the model has parameters (in the model's dtype). A manifest without a
    layout (not a model) bounds nothing beyond :data:`MAX_INFLATION`."""
    if "layout" not in meta:
        return
    layout, dtype = meta["layout"], np.dtype(meta.get("dtype", "float32"))
    check_layout(layout, headers, dtype.name, path)
    names = {"param/" + entry[0] for entry in layout}
    n_params = sum(math.prod(entry[1]) for entry in layout)
    for k, h in headers.items():
        if k in names:
            continue
        if k.startswith("param/"):
            ok, what = h.shape == () and h.dtype == dtype, f"a 0-d {dtype} flag (a buffer outside the layout)"
        elif _OPT_MEMBER.fullmatch(k):
            ok, what = math.prod(h.shape) <= n_params and h.dtype == dtype, \
                f"optimizer state of at most {n_params} {dtype} values (the model's parameters)"
        else:
            raise CheckpointError(f"{path}: unknown member {k} (shape {list(h.shape)}, {h.dtype}); an npdgm "
                                  f"checkpoint holds __meta__, param/* and opt/* only")
        if not ok:
            raise CheckpointError(f"{path}: member {k} has shape {list(h.shape)} of {h.dtype}; expected {what}")


def check_layout(layout, arrays, dtype, path="checkpoint"):
    """Check a manifest ``layout`` against the stored arrays (or their :class:`Header`), as docs/checkpoints.md
    promises a port:
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


def check_finite(a, what, path="checkpoint"):
    """CheckpointError naming ``path`` and ``what`` when the float array ``a`` holds NaN or inf values
    (a diverged run's weights, or a damaged file: they would give NaN samples and metrics)."""
    if a.dtype.kind in "fc":
        bad = a.size - int(np.count_nonzero(np.isfinite(a)))
        if bad:
            raise CheckpointError(f"{path}: {what} holds {bad} NaN/inf value{'s' if bad > 1 else ''} "
                                  f"(of {a.size}); the run diverged or the file is damaged")


def model_arrays(model):
    """{"param/<name>": host array} and manifest fields for a model."""
    arrays = {f"param/{k}": v for k, v in model.state_dict().items()}
    dtype = next(iter(arrays.values())).dtype.name if arrays else "float32"
    meta = {"kind": model.kind, "config": model.config,
            "layout": [[n, list(s), o] for n, s, o in model.layout()], "dtype": dtype}
    return arrays, meta


def save_model(model, path, extra_arrays=None, extra_meta=None):
    """Save a model (and optionally trainer state) to ``path`` atomically."""
    arrays, meta = model_arrays(model)
    arrays.update(extra_arrays or {})
    save_arrays(path, arrays, {"version": __version__, **meta, **(extra_meta or {})})


# -- safetensors: the same weights + manifest in the ecosystem's container ------------------------------------
#: safetensors dtype codes of the float types npdgm stores
ST_DTYPES = {"F32": np.dtype("<f4"), "F64": np.dtype("<f8")}
MAX_ST_HEADER = 1 << 24


def save_safetensors(path, tensors, metadata):
    """Atomically write named host arrays as a ``.safetensors`` file: an unsigned 64-bit little-endian
    header length N, N bytes of JSON ``{name: {"dtype": "F32" | "F64", "shape": [...], "data_offsets":
    [begin, end]}, "__metadata__": {str: str}}`` (padded with spaces to a multiple of 8), then each tensor's
    C-order little-endian bytes in the header's order, ``begin``/``end`` counted from the end of the header."""
    codes = {v: k for k, v in ST_DTYPES.items()}
    header, off, data = {}, 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype.newbyteorder("<") not in codes:
            raise TypeError(f"{name}: safetensors export holds float32 / float64 tensors, got {a.dtype}")
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        header[name] = {"dtype": codes[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
        data.append(a)
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(f):
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for a in data:
            f.write(a.tobytes())
    atomic_write_bytes(path, write)


def load_safetensors(path):
    """``(tensors, metadata)`` of a ``.safetensors`` file. Nothing is trusted: the header must fit the file
    (and 16 MiB), be a JSON object of known float dtypes whose offsets tile the data from 0 to the end of
    the file, each the size of its shape; every failure is a CheckpointError naming the file and the
    tensor, raised before any tensor is read."""
    path = os.fspath(path)

    def bad(msg):
        return CheckpointError(f"{path}: not a readable safetensors file ({msg})")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little") if size >= 8 else None
            if n is None or n > min(size - 8, MAX_ST_HEADER):
                raise bad(f"header length {n} does not fit the file of {size} bytes" if n is not None else
                          f"{size} bytes, shorter than its header length")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise bad(f"header is not JSON: {e}") from e
            if not isinstance(header, dict):
                raise bad(f"header is a {type(header).__name__}, not an object")
            meta = header.pop("__metadata__", {})
            if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
                raise bad("__metadata__ must map names to strings")
            entries, end = [], 8 + n
            for name, e in header.items():
                ok = isinstance(e, dict) and e.get("dtype") in ST_DTYPES and isinstance(e.get("shape"), list) \
                    and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in e["shape"]) \
                    and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                if not ok:
                    raise bad(f"tensor {name!r}: needs dtype F32/F64, a shape of sizes and two data_offsets, "
                              f"got {e!r:.200}")
                entries.append((e["data_offsets"], name, e))
            pos = 0
            for (b, e_), name, e in sorted(entries, key=lambda t: t[0]):
                want = math.prod(e["shape"]) * ST_DTYPES[e["dtype"]].itemsize
                if b != pos or e_ - b != want:
                    raise bad(f"tensor {name!r}: data_offsets {[b, e_]} do not follow on at {pos} with the "
                              f"{want} bytes of shape {e['shape']}")
                pos = e_
            if end + pos != size:
                raise bad(f"the tensors hold {pos} bytes but the file has {size - end} after the header")
            tensors = {}
            for (b, e_), name, e in sorted(entries, key=lambda t: t[0]):
                f.seek(end + b)
                tensors[name] = np.frombuffer(f.read(e_ - b), ST_DTYPES[e["dtype"]]).reshape(e["shape"])
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    return tensors, meta


def model_to_safetensors(model, path):
    """Write a model's parameters by name (``encoder.0.W``, ...) with its manifest (kind, config, layout,
    dtype, version) as the JSON string ``__metadata__["npdgm"]``."""
    arrays, meta = model_arrays(model)
    save_safetensors(path, {k[len("param/"):]: v for k, v in arrays.items()},
                     {"npdgm": json.dumps({"format": FORMAT, "version": __version__, **meta}, default=_json_scalar)})


def arrays_from_safetensors(path):
    """``(arrays, meta)`` as :func:`load_arrays` returns them, from a file :func:`model_to_safetensors`
    wrote: every tensor must be a parameter its manifest's layout names."""
    tensors, st_meta = load_safetensors(path)
    try:
        meta = json.loads(st_meta["npdgm"])
    except KeyError:
        raise CheckpointError(f"{path}: a safetensors file without npdgm's manifest (__metadata__['npdgm']); "
                              f"it holds tensors {sorted(tensors)[:5]}") from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: __metadata__['npdgm'] is not a JSON manifest ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("layout"), list):
        raise CheckpointError(f"{path}: __metadata__['npdgm'] must be a JSON object with a layout")
    arrays = {f"param/{k}": v for k, v in tensors.items()}
    check_layout(meta["layout"], arrays, meta.get("dtype", "float32"), path)
    unknown = sorted(set(tensors) - {str(e[0]) for e in meta["layout"]})
    if unknown:
        raise CheckpointError(f"{path}: tensors {unknown[:5]} are not parameters of the manifest's layout")
    return arrays, meta
