"""The model registry: ``kind`` -> model class, and loading a checkpoint back into a model.

    @register_model            class VAE(Model): kind = "vae" ...   (every model module does this)
    npdgm.load(path)           -> the model a checkpoint or run directory describes

:mod:`npdgm.io` reads and writes the files (arrays + a JSON manifest) and knows no model; this module
maps the manifest's ``kind`` to a class, bounds its ``config`` by the stored shapes before building
(:func:`check_config_size`), and checks the built model's layout against the stored one
(:func:`model_from_arrays`). Every failure is a :class:`npdgm.io.CheckpointError` naming the file.
Importing :mod:`npdgm` imports every model module, so :data:`MODELS` holds every kind.
"""
from __future__ import annotations

import os

from .. import backend
from ..backend import DTYPES
from ..io import CheckpointError, arrays_from_safetensors, check_finite, check_layout, load_arrays

MODELS = {}  # kind -> class with from_config(config)


def register_model(cls):
    """Class decorator: make ``npdgm.load`` able to rebuild models of ``cls.kind``."""
    MODELS[cls.kind] = cls
    return cls


# Config values that size nothing built at load time: counts and seeds (a seed may be any integer)
# and real-valued options, which an older file may hold as JSON integers (beta: 2).
_UNSIZED = frozenset({"seed", "max_iter", "n_init", "n_samples", "sigma", "beta", "alpha", "labelled_weight",
                      "tol", "reg_covar", "residual_reg", "eps", "scale_bound"})
# Layer spec types (a dict's "type") whose "dim" and "image_shape" size nothing built at load time: fully
# convolutional layers, whose parameters do not depend on H, W or the flat row length (Glow's image layers add
# themselves, npdgm/models/glow_layers.py); their channels C = image_shape[0] and other entries are walked.
SHAPE_FREE_TYPES = set()


def check_config_size(config, layout, path, kind):
    """Refuse, before anything is allocated, a config whose sizes the stored parameters cannot hold.

    Every size in a model config shows up in some parameter's shape, at most halved (a coupling net
    sees half of ``dim``), and every list of sizes has at most one entry per parameter or so; a config
    beyond that (``hidden=[10**12]``) would allocate far more than the file holds. This is a cheap
    bound, not the check: after the build the model's layout must equal the stored one."""
    dims = [d for _, shape, _ in layout for d in shape]
    cap = 2 * max(dims) + 1 if dims else 1 << 20  # a parameter-free model: only masks/permutations of `dim`
    max_len = 2 * len(layout) + 16

    # a convolutional model's x_dim is C H W of its image_shape (checked by the constructor before it
    # allocates) and shows in no parameter's shape; the image_shape entries are walked
    skip = _UNSIZED | ({"x_dim"} if isinstance(config, dict) and "image_shape" in config else set())

    def walk(v, where):
        if isinstance(v, dict):
            free = {"dim", "image_shape"} if v.get("type") in SHAPE_FREE_TYPES else set()
            if free and isinstance(v.get("image_shape"), list):  # its channels C size parameters: walked
                walk(v["image_shape"][:1], f"{where}.image_shape")
            for k, x in v.items():
                if k not in skip and k not in free:
                    walk(x, f"{where}.{k}" if where else str(k))
        elif isinstance(v, list):
            if len(v) > max_len:
                raise CheckpointError(f"{path}: config {where} has {len(v)} entries, more than the {len(layout)} "
                                      f"stored parameters of this {kind} can describe")
            for j, x in enumerate(v):
                walk(x, f"{where}[{j}]")
        elif isinstance(v, int) and not isinstance(v, bool) and v > cap:
            raise CheckpointError(f"{path}: config {where}={v} does not fit the stored parameters (the largest "
                                  f"stored dimension is {max(dims) if dims else 0}); refusing to build this {kind}")

    walk(config, "")


def model_from_arrays(arrays, meta, path="checkpoint", allow_nonfinite=False):
    """Rebuild the model a checkpoint describes and load its weights. The manifest's kind, config and
    layout are checked against the arrays before the model is built, and the built model's layout
    against the manifest's after (see the module docstring); any mismatch is a CheckpointError, and so
    is a NaN/inf parameter unless ``allow_nonfinite`` (to inspect a diverged run)."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the manifest must be a JSON object, got a {type(meta).__name__}")
    kind = meta.get("kind")
    if not isinstance(kind, str):
        raise CheckpointError(f"{path}: the manifest names no model kind (kind={kind!r})")
    if kind not in MODELS:
        raise CheckpointError(f"{path}: unknown model kind {kind!r}; known: {sorted(MODELS)}")
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the manifest has no model config (a JSON object of {kind} constructor "
                              f"arguments), got {config!r:.100}")
    if "layout" not in meta:
        raise CheckpointError(f"{path}: the manifest has no parameter layout")
    dtype = meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise CheckpointError(f"{path}: manifest dtype {dtype!r} is not one of {DTYPES}")
    check_layout(meta["layout"], arrays, dtype, path)
    if not allow_nonfinite:
        for name, _, _ in meta["layout"]:
            check_finite(arrays["param/" + name], f"parameter {name}", path)
    check_config_size(config, meta["layout"], path, kind)
    try:
        with backend.use(dtype=dtype):
            model = MODELS[kind].from_config(config)
    except (TypeError, ValueError, KeyError, IndexError, MemoryError) as e:
        raise CheckpointError(f"{path}: its config does not build a {kind} ({type(e).__name__}: {e})") from e
    stored = [(n, tuple(s), o) for n, s, o in meta["layout"]]
    built = [(n, tuple(s), o) for n, s, o in model.layout()]
    if built != stored:
        diff = next((i for i, (a, b) in enumerate(zip(built, stored)) if a != b), min(len(built), len(stored)))
        show = lambda lay: list(lay[diff]) if diff < len(lay) else "nothing"  # noqa: E731
        raise CheckpointError(f"{path}: weights do not match a {kind} with config {config}: entry "
                              f"{diff} of the layout is {show(stored)} in the file, {show(built)} in the model "
                              f"({len(stored)} vs {len(built)} parameters)")
    state = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    try:
        model.load_state_dict(state)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: weights do not match a {kind} with config {config}: {e}") from e
    return model


def load(path, allow_nonfinite=False):
    """Load a model saved by ``model.save(path)``, a training run directory (its checkpoint), or a
    ``.safetensors`` file written by ``npdgm export --format safetensors``. A parameter holding NaN/inf
    is refused (CheckpointError naming it) unless ``allow_nonfinite=True``."""
    if os.fspath(path).endswith(".safetensors"):
        arrays, meta = arrays_from_safetensors(path)
    else:
        arrays, meta = load_arrays(path)
    return model_from_arrays(arrays, meta, os.fspath(path), allow_nonfinite)
