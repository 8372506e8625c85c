"""Data: MNIST IDX files, the bundled offline subset, binarization/dequantization, 2-D toy sets.

Where MNIST comes from, first match wins:
    1. an explicit directory (``--data DIR``),
    2. ``$NPDGM_DATA``,
    3. the subset bundled inside the package (10,000 train / 2,000 test real MNIST images),
so the main job runs offline on a fresh machine. A directory must hold the four IDX files
(``train-images-idx3-ubyte[.gz]`` etc.). Pixels come back as floats in [0, 1], shape (N, 784).

Rebuild the bundled subset (reproducible, seeded):
    python -m npdgm.data build-subset ../shared/data/mnist npdgm/bundled/mnist_subset.npz
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import sys

import numpy as np

BUNDLED = os.path.join(os.path.dirname(__file__), "bundled", "mnist_subset.npz")
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
MD5 = {  # of the uncompressed files
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",)


class DataError(ValueError):
    """A data file is missing, of the wrong kind, truncated, or inconsistent."""


def read_idx(path):
    """Read an IDX file (raw or .gz): magic 0x0000 08 <ndim>, big-endian uint32 sizes, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    n = math.prod(shape)
    if len(raw) - header != n:
        raise DataError(f"{path} should hold {n} bytes of data for shape {shape}, has {len(raw) - header} "
                        f"(truncated or wrong file)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(data_dir, name):
    for cand in (name, name + ".gz"):
        p = os.path.join(data_dir, cand)
        if os.path.exists(p):
            return p
    raise DataError(f"{data_dir} has no {name} or {name}.gz (expected the four MNIST IDX files)")


def _check_pair(images, labels, where):
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{where}: images must have shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{where}: labels must be digits 0..9, found {int(labels.max())}")


def load_mnist_uint8(split="train", data_dir=None):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) for ``split`` in {"train", "test"}."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = data_dir or os.environ.get("NPDGM_DATA") or None
    if data_dir is None:
        with np.load(BUNDLED) as z:
            images, labels = z[f"{split}_images"], z[f"{split}_labels"]
        where = f"bundled subset ({split})"
    else:
        if not os.path.isdir(data_dir):
            raise DataError(f"data directory {data_dir} does not exist")
        images = read_idx(_find(data_dir, FILES[(split, "images")]))
        labels = read_idx(_find(data_dir, FILES[(split, "labels")]))
        where = f"{data_dir} ({split})"
    _check_pair(images, labels, where)
    return images, labels


def load_mnist(split="train", data_dir=None, dtype=np.float32, limit=None):
    """(x, labels): x float (N, 784) in [0, 1] (pixel / 255), labels int64 (N,).
    ``limit`` keeps the first ``limit`` examples."""
    images, labels = load_mnist_uint8(split, data_dir)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.reshape(len(images), -1).astype(dtype) / dtype(255), labels.astype(np.int64)


def check_unit_interval(name, x):
    """ValueError unless every value of ``x`` is finite and in [0, 1]."""
    from .backend import array_module, check_finite

    check_finite(name, x)
    xp = array_module(x)
    lo, hi = float(xp.min(x)), float(xp.max(x))
    if lo < 0 or hi > 1:
        raise ValueError(f"{name} must lie in [0, 1] (found values in [{lo:g}, {hi:g}]); "
                         f"scale pixels to [0, 1] first")


def binarize(x, rng=None):
    """Binary images from intensities in [0, 1]: a Bernoulli(x) sample with ``rng`` (dynamic
    binarization, a new sample each call), or the threshold x > 0.5 without one (static)."""
    check_unit_interval("x", x)
    if rng is None:
        return (x > 0.5).astype(x.dtype)
    return (rng.random(x.shape, dtype=np.float32) < x).astype(x.dtype)


def dequantize(x, rng, levels=256):
    """Uniform dequantization of 8-bit data scaled to [0, 1]:  y = (k + u) / 256 with k = round(255 x)
    and u ~ U(0, 1), clipped below 1 against float rounding. A density on y then bounds the discrete
    likelihood: log P(k) >= log p(y) - D log 256."""
    check_unit_interval("x", x)
    from .backend import array_module

    xp = array_module(x)
    u = xp.asarray(rng.random(x.shape, dtype=np.float32), dtype=x.dtype)
    y = (xp.rint(x * (levels - 1)) + u) / levels
    return xp.minimum(y, np.nextafter(x.dtype.type(1), x.dtype.type(0)), out=y)


# -- 2-D toy densities -------------------------------------------------------------------------
TOYS = ("moons", "circles", "8gaussians", "checkerboard", "spirals")


def make_toy2d(name, n, rng):
    """n points (n, 2) float64 of a 2-D toy density, roughly centered with unit-ish scale."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if name == "moons":
        t = rng.uniform(0, np.pi, n)
        upper = rng.random(n) < 0.5
        x = np.where(upper, np.cos(t), 1 - np.cos(t))
        y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
        p = np.stack([x, y], 1) + rng.normal(0, 0.05, (n, 2))
        return (p - [0.5, 0.25]) * 2
    if name == "circles":
        r = np.where(rng.random(n) < 0.5, 1.0, 2.0)
        t = rng.uniform(0, 2 * np.pi, n)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1) + rng.normal(0, 0.08, (n, 2))
    if name == "8gaussians":
        k = rng.integers(0, 8, n)
        c = np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], 1) * 2
        return c + rng.normal(0, 0.2, (n, 2))
    if name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + (np.floor(x1) % 2)
        return np.stack([x1, x2], 1)
    if name == "spirals":
        t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
        sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
        p = sign[:, None] * np.stack([t * np.cos(t), t * np.sin(t)], 1) / 3
        return p + rng.normal(0, 0.1, (n, 2))
    raise ValueError(f"unknown 2-D dataset {name!r}; expected one of {TOYS}")


# -- the bundled subset and the optional download ----------------------------------------------
def build_subset(src_dir, out_path=BUNDLED, n_train=10_000, n_test=2_000, seed=0):
    """Write a class-stratified random subset of MNIST to ``out_path`` (reproducible for a seed)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = load_mnist_uint8(split, src_dir)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n // 10] for c in range(10)]))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[idx], labels[idx]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    return out_path


def download_mnist(dst, mirrors=MIRRORS):
    """Download the four MNIST files into ``dst`` and verify their MD5 sums (needs network)."""
    import urllib.request

    os.makedirs(dst, exist_ok=True)
    for name, md5 in MD5.items():
        target = os.path.join(dst, name + ".gz")
        if not os.path.exists(target):
            err = None
            for m in mirrors:
                try:
                    urllib.request.urlretrieve(m + name + ".gz", target + ".part")
                    os.replace(target + ".part", target)
                    break
                except OSError as e:
                    err = e
            else:
                raise DataError(f"could not download {name}.gz: {err}")
        got = hashlib.md5(gzip.open(target).read()).hexdigest()
        if got != md5:
            os.remove(target)
            raise DataError(f"{name}.gz failed its checksum (md5 {got}, expected {md5}); removed it")
    return dst


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "build-subset":
        print(build_subset(sys.argv[2], *(sys.argv[3:4] or [BUNDLED])))
    elif len(sys.argv) == 3 and sys.argv[1] == "download":
        print(download_mnist(sys.argv[2]))
    else:
        print(__doc__)
        sys.exit(2)
