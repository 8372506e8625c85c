"""Read npdgm checkpoints through their manifest only (no npdgm import), as a port would.

The format is documented in docs/checkpoints.md:

    checkpoint.npz
      __meta__          uint8 bytes of a JSON manifest: {"format": "npdgm-checkpoint", "kind", "config",
                        "dtype", "layout": [[name, shape, offset], ...], ...}
      param/<name>      every parameter, C order; a Linear's W is (in, out), its b (out,)
      opt/m.0, opt/v.0  (training runs) Adam's moments, flat, in the same layout as the parameters

``layout`` lists the parameters in flat-buffer order; parameter ``name`` occupies the elements
[offset, offset + prod(shape)) of the flat buffer, reshaped to ``shape`` in C order.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np


def read_checkpoint(path):
    """(manifest dict, {array name: ndarray}) from a checkpoint .npz or a run directory."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.npz")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    manifest = json.loads(arrays.pop("__meta__").tobytes().decode("utf-8"))
    if manifest.get("format") != "npdgm-checkpoint":
        raise ValueError(f"{path}: not an npdgm checkpoint (format {manifest.get('format')!r})")
    return manifest, arrays


def flat_buffer(manifest, arrays):
    """The model's flat parameter buffer, assembled from ``param/<name>`` at the layout's offsets."""
    layout = manifest["layout"]
    total = sum(math.prod(shape) for _, shape, _ in layout)
    flat = np.empty(total, dtype=np.dtype(manifest["dtype"]))
    for name, shape, offset in layout:
        a = arrays[f"param/{name}"]
        if list(a.shape) != list(shape):
            raise ValueError(f"param/{name} has shape {a.shape}, the layout says {shape}")
        flat[offset:offset + a.size] = a.ravel(order="C")
    return flat


def unflatten(flat, layout):
    """{name: array view} of a flat buffer (NumPy or torch) by the layout."""
    out = {}
    for name, shape, offset in layout:
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].reshape(tuple(shape))
    return out


def torch_parameters(path, dtype=None):
    """(manifest, {name: torch leaf tensor with requires_grad}) loaded from a checkpoint.

    ``dtype`` defaults to torch.float64 (the mirror's precision); pass None-equivalent to keep the file's."""
    import torch

    manifest, arrays = read_checkpoint(path)
    flat = torch.from_numpy(flat_buffer(manifest, arrays))
    flat = flat.to(torch.float64 if dtype is None else dtype)
    params = {n: t.clone().requires_grad_(True) for n, t in unflatten(flat, manifest["layout"]).items()}
    return manifest, params


def rel_err(a, b):
    """max |a - b| / max |b|: the comparison of every mirror test (they pass at 1e-8 in float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b), initial=0.0)) / max(float(np.max(np.abs(b), initial=0.0)), 1e-300)
