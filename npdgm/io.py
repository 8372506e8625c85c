"""Checkpoints: one ``.npz`` of named arrays plus a JSON manifest, written atomically.

Layout of a model checkpoint (what a port reads):
    __meta__            JSON: {"format": "npdgm-checkpoint", "version", "kind", "config",
                               "layout": [[name, shape, offset], ...], "dtype", ...}
    param/<name>        each parameter, e.g. param/encoder.0.W with shape (in, out)
    ...                 anything else the trainer stores (optimizer state, "opt/m.0", ...)
``layout`` gives every parameter's element offset in the model's flat buffer (C order).
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np

FORMAT = "npdgm-checkpoint"
MODELS = {}  # kind -> class with from_config(config)


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not match what was asked of it."""


def register_model(cls):
    """Class decorator: make ``npdgm.load`` able to rebuild models of ``cls.kind``."""
    MODELS[cls.kind] = cls
    return cls


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


def save_arrays(path, arrays, meta):
    """Atomically write {name: array} and a JSON-able ``meta`` dict to ``path`` (.npz)."""
    payload = {k: np.asarray(v) for k, v in arrays.items()}
    payload["__meta__"] = np.frombuffer(json.dumps({"format": FORMAT, **meta}).encode(), dtype=np.uint8)
    atomic_write_bytes(path, lambda f: np.savez(f, **payload))


def load_arrays(path):
    """Read ``(arrays, meta)`` from a checkpoint, with a clear error when it is not one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    if not os.path.exists(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable npdgm checkpoint (corrupt or truncated: {e})") from e
    if "__meta__" not in arrays:
        raise CheckpointError(f"{path} has no __meta__ manifest; not an npdgm checkpoint")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except ValueError as e:
        raise CheckpointError(f"{path}: manifest is not valid JSON ({e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}, expected {FORMAT!r}")
    return arrays, meta


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


def model_from_arrays(arrays, meta, path="checkpoint"):
    """Rebuild the model a checkpoint describes and load its weights (shape/dtype checked)."""
    from . import backend

    kind = meta.get("kind")
    if kind not in MODELS:
        # importing the model package registers every model kind
        from . import models  # noqa: F401
    if kind not in MODELS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; known: {sorted(MODELS)}")
    with backend.use(dtype=meta.get("dtype", "float32")):
        model = MODELS[kind].from_config(meta["config"])
    state = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not match a {kind} with config {meta['config']}: {e}") from e
    return model


def load(path):
    """Load a model saved by ``model.save(path)`` or a training run directory (its checkpoint)."""
    arrays, meta = load_arrays(path)
    return model_from_arrays(arrays, meta, os.fspath(path))
