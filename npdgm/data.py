"""Data: MNIST and Fashion-MNIST IDX files, CIFAR-10's binary version, the download cache, the bundled offline
subset, binarization/dequantization, 2-D toy sets.

Where the images come from (the ``data`` argument of ``load_dataset`` / ``load_mnist``, ``--data`` on the CLI):
    1. a data set name, ``mnist`` or ``fashion-mnist``: its directory in the cache, filled by
       ``npdgm data download NAME`` (``bundled`` names the subset below);
    2. a directory holding the four IDX files (``train-images-idx3-ubyte[.gz]`` etc.);
    3. nothing: ``$NPDGM_DATA`` when set (a directory of IDX files, or a cache holding ``mnist/``),
       else the subset bundled inside the package (10,000 train / 2,000 test real MNIST images),
       so the main job runs offline on a fresh machine.
Pixels come back as floats in [0, 1], shape (N, 784). Fashion-MNIST is the same format (28x28, 10 classes).
``cifar10`` (or a directory holding ``cifar-10-binary.tar.gz`` or its ``.bin`` batch files) gives (N, 3072):
32x32 colour images flattened in (C, H, W) order, read straight from the archive (see ``read_cifar_archive``).

The cache is ``$NPDGM_DATA`` or the platform's user cache directory (``$XDG_CACHE_HOME/npdgm`` or
``~/.cache/npdgm`` on Linux, ``~/Library/Caches/npdgm`` on macOS, ``%LOCALAPPDATA%/npdgm/Cache`` on Windows),
one subdirectory per data set.

The downloader is ~100 lines of urllib rather than pooch + platformdirs: npdgm's runtime dependencies are numpy,
matplotlib and tqdm only, and pooch would still need a custom downloader for what is asked here (trying mirrors
in order, resuming a ``.part`` file with an HTTP Range request, restarting cleanly when a server ignores Range);
the cache directory rule above is the three lines platformdirs would give. Each file is checked against its
published checksum (MNIST's: the sha256 of tensorflow_datasets' url_checksums, matching torchvision's md5 lists;
CIFAR-10's: the md5 its authors publish, the only one they do); a file that fails is deleted and the next mirror
is tried.

Rebuild the bundled subset (reproducible, seeded) from a directory of the full MNIST files:
    python -m npdgm.data build-subset MNIST_DIR npdgm/bundled/mnist_subset.npz
"""
from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import math
import os
import posixpath
import sys
import tarfile
import zlib
from typing import NamedTuple

import numpy as np

from ._filelock import wait_lock
from .backend import array_module, check_finite
from ._version import __version__

BUNDLED = os.path.join(os.path.dirname(__file__), "bundled", "mnist_subset.npz")
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

DATA_HELP = ("mnist or fashion-mnist (from the cache: npdgm data download NAME), bundled, or a directory of the four "
             "IDX files (default $NPDGM_DATA, else the bundled 10k/2k MNIST subset)")  # for the commands' --data
IMAGE_DATA_HELP = DATA_HELP.replace("mnist or fashion-mnist", "mnist, fashion-mnist or cifar10").replace(
    "IDX files", "IDX files or CIFAR-10's binary archive")  # for the commands that also take CIFAR-10

MNIST_SHAPE = (1, 28, 28)
CIFAR_SHAPE = (3, 32, 32)
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_DIR = "cifar-10-batches-bin"                          # the archive's one directory
CIFAR_RECORD = 1 + math.prod(CIFAR_SHAPE)                   # 3073 bytes: the label, then the R, G, B planes
CIFAR_BATCH_RECORDS = 10_000                                # records per published batch file: a member's bound
CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)), "test": ("test_batch.bin",)}


class Source(NamedTuple):
    """A downloadable data set: its mirrors (base URLs ending in /, tried in order) and, per file, (size in
    bytes, checksum as published: a sha256 hex digest, or ``"md5:<hex>"`` for a source that publishes only an
    md5). ``kind``: "idx" (the four IDX .gz files of a 28x28 grey set) or "cifar" (CIFAR-10's binary archive)."""
    title: str
    licence: str
    mirrors: tuple
    files: dict
    kind: str = "idx"


DATASETS = {
    "mnist": Source(
        "MNIST", "CC BY-SA 3.0, Yann LeCun and Corinna Cortes",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/",           # torchvision's
         "https://storage.googleapis.com/cvdf-datasets/mnist/",      # tensorflow_datasets'
         "https://raw.githubusercontent.com/fgnt/mnist/master/"),
        {"train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
         "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
         "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
         "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6")}),
    "fashion-mnist": Source(
        "Fashion-MNIST", "MIT, Zalando SE",
        ("https://storage.googleapis.com/tensorflow/tf-keras-datasets/",                 # Keras'
         "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",                  # Zalando's
         "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"),
        {"train-images-idx3-ubyte.gz": (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
         "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
         "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
         "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5")}),
    "cifar10": Source(
        "CIFAR-10", "Alex Krizhevsky, Vinod Nair, Geoffrey Hinton (2009); no licence stated, cite the tech report",
        ("https://www.cs.toronto.edu/~kriz/",                                            # the authors'
         "https://storage.googleapis.com/s4tf-hosted-binaries/datasets/CIFAR10/"),       # Swift for TensorFlow's
        {CIFAR_ARCHIVE: (170052171, "md5:c32a1d4ab5d03f1284b67883e8d87530")}, kind="cifar"),
}


class DataError(ValueError):
    """A data file is missing, of the wrong kind, truncated, or inconsistent."""


IDX_MAX_BYTES = 1 << 31  # 2 GiB of pixels (2.7 million 28x28 images): a header declaring more is refused
DEFLATE_MAX_RATIO = 1032   # deflate inflates at most ~1032x: a .gz of c bytes holds at most ~1032 c bytes


def read_idx(path, item_shape=None, max_bytes=IDX_MAX_BYTES):
    """Read an IDX file (raw or .gz): magic 0x0000 08 <ndim>, big-endian uint32 sizes, uint8 data.

    The header's shape is checked before any data is read: against ``item_shape`` (the sizes after the
    first, e.g. (28, 28) for images, () for labels; None: any), ``max_bytes``, and what the file can hold
    (a raw file its size less the header, a .gz at most ``DEFLATE_MAX_RATIO`` times its size). The data is
    read with that bound, so a gzip bomb inflates no further than its header declares."""
    gz, n, shape = str(path).endswith(".gz"), 0, ()
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[:3] != b"\0\0\x08":
                raise DataError(f"{path} is not an unsigned-byte IDX file (magic {magic.hex() or 'empty'})")
            dims = f.read(4 * magic[3])
            if len(dims) < 4 * magic[3]:
                raise DataError(f"{path} is truncated inside its header")
            shape = tuple(int.from_bytes(dims[i:i + 4], "big") for i in range(0, len(dims), 4))
            n = math.prod(shape)
            _check_idx_shape(path, shape, item_shape, max_bytes, _idx_capacity(path, gz) - 4 - len(dims))
            raw = f.read(n + 1)  # one byte past the declared data tells a longer file
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    except zlib.error as e:  # a corrupt deflate stream inside a well-formed gzip header
        raise DataError(f"cannot read {path}: corrupt gzip data ({e})") from e
    except MemoryError:
        raise DataError(f"cannot read {path}: its {n:,} bytes of data (shape {shape}) do not fit in memory") from None
    if len(raw) != n:
        raise DataError(f"{path} should hold {n} bytes of data for shape {shape}, has "
                        f"{'more' if len(raw) > n else len(raw)} (truncated or wrong file)")
    return np.frombuffer(raw, dtype=np.uint8, count=n).reshape(shape)


def _idx_capacity(path, gz):
    """The most bytes ``path`` can hold once read: its size, times ``DEFLATE_MAX_RATIO`` for a .gz (plus
    slack for its header); None for a file of no known size (a pipe, a device)."""
    if not os.path.isfile(path):
        return None
    size = os.path.getsize(path)
    return size * DEFLATE_MAX_RATIO + 1024 if gz else size


def _check_idx_shape(path, shape, item_shape, max_bytes, capacity):
    """DataError naming ``path`` unless the IDX header's ``shape`` is plausible (see ``read_idx``)."""
    n = math.prod(shape)
    if item_shape is not None and (len(shape) != 1 + len(item_shape) or shape[1:] != tuple(item_shape)):
        want = "(N" + "".join(f", {s}" for s in item_shape) + (",)" if not item_shape else ")")
        raise DataError(f"{path} holds shape {shape}; expected {want}")
    if n > max_bytes:
        raise DataError(f"{path} declares shape {shape}, {n:,} bytes of data: more than the {max_bytes:,} "
                        f"an IDX file is read up to (a wrong or hostile file)")
    if capacity is not None and n > capacity:
        raise DataError(f"{path} declares shape {shape}, {n:,} bytes of data, more than the file can hold "
                        f"(truncated or wrong file)")


def _idx_path(data_dir, name):
    """``data_dir/name`` or ``data_dir/name.gz``, whichever exists, else None."""
    for cand in (name, name + ".gz"):
        p = os.path.join(data_dir, cand)
        if os.path.isfile(p):
            return p
    return None


def _find(data_dir, name):
    p = _idx_path(data_dir, name)
    if p is None:
        raise DataError(f"{data_dir} has no {name} or {name}.gz (expected the four IDX files of MNIST or "
                        f"Fashion-MNIST)")
    return p


def _missing(data_dir):
    """The IDX files (of FILES) that ``data_dir`` lacks."""
    return [n for n in FILES.values() if _idx_path(data_dir, n) is None]


def _check_pair(images, labels, where):
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{where}: images must have shape (N, 28, 28), got {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataError(f"{where}: labels must be classes 0..9, found {int(labels.max())}")


def data_root():
    """The download cache: ``$NPDGM_DATA``, else the platform's user cache directory + ``npdgm``."""
    env = os.environ.get("NPDGM_DATA")
    if env:
        return os.path.expanduser(env)
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")
        return os.path.join(base, "npdgm", "Cache")
    if sys.platform == "darwin":
        return os.path.join(os.path.expanduser("~"), "Library", "Caches", "npdgm")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(xdg if os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache"), "npdgm")


def dataset_dir(name, root=None):
    """Where data set ``name`` lives in the cache ``root`` (default ``data_root()``)."""
    _source(name)
    return os.path.join(root or data_root(), name)


def _source(name):
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(DATASETS)}")
    return DATASETS[name]


def resolve_data(data=None):
    """The directory to read the IDX files from, or None for the bundled subset.

    ``data``: a data set name (``mnist``, ``fashion-mnist``: its cache directory; ``bundled``), a directory,
    or None (``$NPDGM_DATA``: a directory of IDX files, or a cache holding ``mnist/``; unset: bundled).
    A name wins over a directory of the same name in the working directory: write ``./mnist`` for that."""
    if data is None:
        env = os.environ.get("NPDGM_DATA")
        if not env:
            return None
        env = os.path.expanduser(env)
        cached = os.path.join(env, "mnist")
        for d in (env, cached):
            if os.path.isdir(d) and not _missing(d):
                return d
        raise DataError(f"NPDGM_DATA={env} holds no MNIST IDX files (looked in {env} and {cached}): fill it with "
                        f"`npdgm data download mnist`, or pass --data bundled / unset NPDGM_DATA for the bundled "
                        f"subset")
    data = os.fspath(data)
    if data == "bundled":
        return None
    if data in DATASETS:
        d = dataset_dir(data)
        wanted = FILES.values() if DATASETS[data].kind == "idx" else [CIFAR_ARCHIVE]
        missing = (_missing(d) if DATASETS[data].kind == "idx" else _cifar_missing(d)) if os.path.isdir(d) \
            else list(wanted)
        if missing:
            here = (f"; for the directory ./{data} here write --data ./{data}" if os.path.isdir(data) else "")
            state = ("is not downloaded" if len(missing) == len(wanted)
                     else f"is incomplete (missing {', '.join(missing)})")
            raise DataError(f"{DATASETS[data].title} {state} in the cache {d}: run `npdgm data download {data}` "
                            f"(the cache is $NPDGM_DATA or the user cache directory){here}")
        return d
    names = ", ".join([*DATASETS, "bundled"])
    if os.path.isfile(data):
        raise DataError(f"data path {data} is a file, not a directory: give the directory that holds the four IDX "
                        f"files, or a data set name ({names})")
    if os.path.exists(data) and not os.path.isdir(data):  # a device, a pipe, a socket
        raise DataError(f"data path {data} is not a directory: give the directory that holds the four IDX "
                        f"files, or a data set name ({names})")
    if not os.path.isdir(data):
        raise DataError(f"data directory {data} does not exist (or name a data set: {names})")
    return data


def load_uint8(split="train", data=None):
    """(images uint8 (N, 28, 28), labels uint8 (N,)) for ``split`` in {"train", "test"}; ``data`` as in
    ``resolve_data``. A CIFAR-10 directory gives images (N, 3, 32, 32) (see ``load_cifar_uint8``)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = resolve_data(data)
    if data_dir is not None and is_cifar_dir(data_dir):
        return load_cifar_uint8(split, data_dir)
    if data_dir is None:
        with np.load(BUNDLED) as z:
            images, labels = z[f"{split}_images"], z[f"{split}_labels"]
        where = f"bundled subset ({split})"
    else:
        images_path = _find(data_dir, FILES[(split, "images")])
        images = read_idx(images_path, item_shape=(28, 28))
        if len(images) == 0:
            raise DataError(f"{images_path} holds 0 images (shape {images.shape}): an empty or wrong file")
        labels = read_idx(_find(data_dir, FILES[(split, "labels")]), item_shape=())
        where = f"{data_dir} ({split})"
    _check_pair(images, labels, where)
    return images, labels


def load_dataset(split="train", data=None, dtype=np.float32, limit=None):
    """(x, labels) of MNIST, Fashion-MNIST, any 28x28 IDX set or CIFAR-10: x float (N, C H W) in [0, 1]
    (pixel / 255; (N, 784) grey, or (N, 3072) colour flattened in (C, H, W) order), labels int64 (N,).
    ``data`` as in ``resolve_data``; ``limit`` keeps the first ``limit`` examples."""
    images, labels = load_uint8(split, data)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.reshape(len(images), -1).astype(dtype) / dtype(255), labels.astype(np.int64)


def load_mnist(split="train", data=None, dtype=np.float32, limit=None):
    """``load_dataset`` for the models of 28x28 grey images (784 pixels): CIFAR-10 is refused in one line
    naming the commands that take it."""
    require_grey(data)
    return load_dataset(split, data, dtype, limit)


def require_grey(data, takes="npdgm train glow or npdgm train vae --arch conv"):
    """DataError in one line unless ``data`` holds 28x28 grey images (for the commands that model 784 pixels)."""
    if image_shape(data) != MNIST_SHAPE:
        raise DataError(f"--data {data} is CIFAR-10 (32x32 colour, 3072 values per image); this command models "
                        f"28x28 grey images (784 pixels): train CIFAR-10 with {takes}")


load_mnist_uint8 = load_uint8        # the historical name


def image_shape(data=None):
    """(C, H, W) of the images ``data`` (as in ``resolve_data``) holds: (3, 32, 32) for CIFAR-10, else
    (1, 28, 28). Resolves ``data``, so a missing data set fails here with its usual error."""
    if data is not None and os.fspath(data) in DATASETS:
        kind = DATASETS[os.fspath(data)].kind
        resolve_data(data)
        return CIFAR_SHAPE if kind == "cifar" else MNIST_SHAPE
    d = resolve_data(data)
    return CIFAR_SHAPE if d is not None and is_cifar_dir(d) else MNIST_SHAPE


# -- CIFAR-10, binary version: records of 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32) -------------
def is_cifar_dir(d):
    """Whether directory ``d`` holds CIFAR-10: its archive, or the .bin batch files (in ``d`` or
    ``d/cifar-10-batches-bin``)."""
    return os.path.isfile(os.path.join(d, CIFAR_ARCHIVE)) or _cifar_bin_dir(d) is not None


def _cifar_bin_dir(d):
    """The directory (``d`` or ``d/cifar-10-batches-bin``) holding extracted batch files, else None."""
    for cand in (d, os.path.join(d, CIFAR_DIR)):
        if any(os.path.isfile(os.path.join(cand, f)) for names in CIFAR_FILES.values() for f in names):
            return cand
    return None


def _cifar_missing(d):
    """What the cache directory ``d`` of CIFAR-10 lacks: [] with the archive (or extracted batch files)."""
    return [] if is_cifar_dir(d) else [CIFAR_ARCHIVE]


def check_cifar_member_size(size, where):
    """DataError naming ``where`` unless ``size`` bytes are 1 to CIFAR_BATCH_RECORDS whole 3073-byte records."""
    if size > CIFAR_BATCH_RECORDS * CIFAR_RECORD:
        raise DataError(f"{where} declares {size:,} bytes, more than a CIFAR-10 batch file's "
                        f"{CIFAR_BATCH_RECORDS:,} records ({CIFAR_BATCH_RECORDS * CIFAR_RECORD:,} bytes): refused "
                        f"before reading (a wrong or hostile file)")
    if size <= 0 or size % CIFAR_RECORD:
        raise DataError(f"{where} holds {size:,} bytes, not a whole number of {CIFAR_RECORD}-byte records "
                        f"(1 label + 3x32x32 pixels): truncated or not a CIFAR-10 batch file")


def cifar_records(raw, where):
    """(images uint8 (N, 3, 32, 32), labels uint8 (N,)) from the bytes of one batch file: record i is
    ``raw[3073 i]`` (the label 0..9) then 3072 pixel bytes, the R, G and B planes of 32x32 row-major."""
    check_cifar_member_size(len(raw), where)
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = rec[:, 0].copy()
    if labels.max() > 9:
        raise DataError(f"{where}: labels must be classes 0..9, found {int(labels.max())} (not a CIFAR-10 batch)")
    return rec[:, 1:].reshape(-1, *CIFAR_SHAPE).copy(), labels


def _member_name(path, name):
    """The batch file name of archive member ``name``, refusing names that leave the archive's directory."""
    parts = name.split("/")
    if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or (parts[0].endswith(":")):
        raise DataError(f"{path} holds a member named {name!r}, outside the archive's directory: refused "
                        f"(a broken or hostile archive)")
    return posixpath.basename(posixpath.normpath(name)) if posixpath.dirname(posixpath.normpath(name)) in (
        "", CIFAR_DIR) else None


def read_cifar_archive(path, names):
    """{name: bytes} of the batch files ``names`` read straight from CIFAR-10's ``.tar.gz`` (nothing is
    extracted). Every member is checked before a byte of it is read: its name stays inside the archive (no
    absolute path, no ``..``), it is a regular file or a directory (no link, device or fifo), and it declares
    at most one batch file's size; a wanted member must hold whole 3073-byte records. Members are read as a
    stream, all of them (one gzip pass, whichever split is wanted), so a truncated archive fails with its name."""
    found = {}
    try:
        with tarfile.open(path, "r|gz") as tar:
            for m in tar:
                base = _member_name(path, m.name)
                if not (m.isreg() or m.isdir()):
                    raise DataError(f"{path}: member {m.name!r} is a {_tar_type(m)}, not a regular file: refused "
                                    f"(the published archive holds regular files only)")
                if m.size > CIFAR_BATCH_RECORDS * CIFAR_RECORD:  # any member, wanted or not
                    check_cifar_member_size(m.size, f"{path}: member {m.name}")
                if base not in names or m.isdir():
                    continue
                if base in found:
                    raise DataError(f"{path} holds {base} twice: a broken or hostile archive")
                check_cifar_member_size(m.size, f"{path}: member {m.name}")
                raw = tar.extractfile(m).read(m.size)
                if len(raw) != m.size:
                    raise DataError(f"{path}: member {m.name} stops after {len(raw):,} of {m.size:,} bytes "
                                    f"(a truncated archive)")
                found[base] = raw
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e or type(e).__name__} (a truncated or corrupt archive: delete it "
                        f"and run npdgm data download cifar10 again)") from e
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{path} has no {', '.join(missing)} (expected CIFAR-10's binary version, "
                        f"{CIFAR_DIR}/data_batch_1..5.bin and test_batch.bin)")
    return found


def _tar_type(m):
    return ("symbolic link" if m.issym() else "hard link" if m.islnk() else "device" if m.isdev()
            else "fifo" if m.isfifo() else "special member")


def _read_cifar_bin(path):
    """The bytes of an extracted batch file, its size checked before it is read."""
    try:
        check_cifar_member_size(os.path.getsize(path), path)
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from e


def load_cifar_uint8(split, data_dir):
    """(images uint8 (N, 3, 32, 32), labels uint8 (N,)) of CIFAR-10's ``split`` from ``data_dir``: its
    ``cifar-10-binary.tar.gz`` (read in place), else the extracted ``.bin`` files; train = data_batch_1..5
    in order, test = test_batch."""
    names = CIFAR_FILES[split]
    archive = os.path.join(data_dir, CIFAR_ARCHIVE)
    if os.path.isfile(archive):
        raw, where = read_cifar_archive(archive, names), archive
    else:
        d = _cifar_bin_dir(data_dir)
        missing = [n for n in names if not os.path.isfile(os.path.join(d, n))]
        if missing:
            raise DataError(f"{d} has no {', '.join(missing)} (expected CIFAR-10's batch files data_batch_1..5.bin "
                            f"and test_batch.bin, or {CIFAR_ARCHIVE})")
        raw, where = {n: _read_cifar_bin(os.path.join(d, n)) for n in names}, d
    parts = [cifar_records(raw[n], f"{where}: {n}") for n in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def check_unit_interval(name, x):
    """ValueError unless every value of ``x`` is finite and in [0, 1]."""
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
    xp = array_module(x)
    u = xp.asarray(rng.random(x.shape, dtype=np.float32), dtype=x.dtype)
    y = (xp.rint(x * (levels - 1)) + u) / levels
    return xp.minimum(y, np.nextafter(x.dtype.type(1), x.dtype.type(0)), out=y)


# -- 2-D toy densities -------------------------------------------------------------------------
TOYS = ("moons", "circles", "8gaussians", "checkerboard", "spirals")


# classes of the labelled toys (make_toy2d_labelled): moons upper 0 / lower 1, circles r = 1 -> 0 / r = 2 -> 1,
# 8gaussians the mode k, spirals the arm (+ 0 / - 1); checkerboard has none
TOY_CLASSES = {"moons": 2, "circles": 2, "8gaussians": 8, "spirals": 2}
RING_RADII = (0.5, 2.5)  # make_rings: the radius c ~ U(0.5, 2.5)


def _toy2d(name, n, rng):
    """(points (n, 2), class labels (n,) int64 or None) of a toy (one draw for both)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if name == "moons":
        t = rng.uniform(0, np.pi, n)
        upper = rng.random(n) < 0.5
        x = np.where(upper, np.cos(t), 1 - np.cos(t))
        y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
        p = np.stack([x, y], 1) + rng.normal(0, 0.05, (n, 2))
        return (p - [0.5, 0.25]) * 2, (~upper).astype(np.int64)
    if name == "circles":
        inner = rng.random(n) < 0.5
        r = np.where(inner, 1.0, 2.0)
        t = rng.uniform(0, 2 * np.pi, n)
        return np.stack([r * np.cos(t), r * np.sin(t)], 1) + rng.normal(0, 0.08, (n, 2)), (~inner).astype(np.int64)
    if name == "8gaussians":
        k = rng.integers(0, 8, n)
        c = np.stack([np.cos(k * np.pi / 4), np.sin(k * np.pi / 4)], 1) * 2
        return c + rng.normal(0, 0.2, (n, 2)), k.astype(np.int64)
    if name == "checkerboard":
        x1 = rng.uniform(-2, 2, n)
        x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2 + (np.floor(x1) % 2)
        return np.stack([x1, x2], 1), None
    if name == "spirals":
        t = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
        minus = rng.random(n) >= 0.5
        sign = np.where(minus, -1.0, 1.0)
        p = sign[:, None] * np.stack([t * np.cos(t), t * np.sin(t)], 1) / 3
        return p + rng.normal(0, 0.1, (n, 2)), minus.astype(np.int64)
    raise ValueError(f"unknown 2-D dataset {name!r}; expected one of {TOYS}")


def make_toy2d(name, n, rng):
    """n points (n, 2) float64 of a 2-D toy density, roughly centered with unit-ish scale."""
    return _toy2d(name, n, rng)[0]


def make_toy2d_labelled(name, n, rng):
    """(points (n, 2), labels (n,) int64) of a toy with classes (:data:`TOY_CLASSES`): the same points as
    :func:`make_toy2d` with the same generator; ValueError for a toy without classes."""
    if name not in TOY_CLASSES:
        raise ValueError(f"the 2-D dataset {name!r} has no classes; class-conditional toys: {sorted(TOY_CLASSES)}")
    return _toy2d(name, n, rng)


def make_rings(n, rng, radii=RING_RADII, noise=0.05):
    """(points (n, 2), radius c (n, 1)) of the continuous-context toy: c ~ U(radii), x on the circle of radius c
    at a uniform angle, plus N(0, noise^2) per coordinate. p(x | c) is a ring whose size is c."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    c = rng.uniform(radii[0], radii[1], n)
    t = rng.uniform(0, 2 * np.pi, n)
    return np.stack([c * np.cos(t), c * np.sin(t)], 1) + rng.normal(0, noise, (n, 2)), c[:, None]


# -- the bundled subset -----------------------------------------------------------------------
def build_subset(src_dir, out_path=BUNDLED, n_train=10_000, n_test=2_000, seed=0):
    """Write a class-stratified random subset of MNIST to ``out_path`` (reproducible for a seed)."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = load_uint8(split, src_dir)
        idx = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:n // 10] for c in range(10)]))
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images[idx], labels[idx]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    return out_path


# -- download: mirrors in order, resumable .part files, checksums -----------------------------
class DownloadError(DataError):
    """No mirror delivered a file with the published checksum."""


def file_digest(path, algorithm="sha256"):
    """The hex digest of ``path``'s bytes by ``algorithm`` (sha256, md5)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path):
    return file_digest(path, "sha256")


def parse_checksum(checksum):
    """(algorithm, hex digest) of a registry checksum: ``"md5:<32 hex>"``, ``"sha256:<64 hex>"`` or a bare
    sha256 hex digest. md5 is accepted only because some sources (CIFAR-10) publish nothing else: it still
    tells a corrupt or truncated download, which is what the check is for."""
    algorithm, _, digest = checksum.rpartition(":")
    algorithm = algorithm or "sha256"
    width = {"sha256": 64, "md5": 32}.get(algorithm)
    if width is None or len(digest) != width or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"checksum {checksum!r}: expected a sha256 hex digest, 'sha256:<hex>' or 'md5:<hex>'")
    return algorithm, digest


def _reason(e):
    """A short reason for a failed request: HTTP 404 Not Found, [Errno 111] Connection refused, ..."""
    import urllib.error

    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _declared_length(resp):
    """The body length a response declares (its Content-Length), or None when it declares none."""
    try:
        n = int(resp.headers.get("Content-Length", ""))
    except ValueError:
        return None
    return n if n >= 0 else None


def _append_body(resp, part, start, size, bar):
    """Write ``resp``'s body into ``part`` from byte ``start`` (``start`` = 0: a new file), never past ``size``
    bytes: a body longer than the ``size - start`` bytes left is another file (``part`` removed, ValueError).
    Return the number of body bytes written."""
    left, sent = size - start, 0
    with open(part, "ab" if start else "wb") as f:
        while True:
            chunk = resp.read(min(1 << 16, left - sent + 1))  # one byte past the end tells a longer body
            if not chunk:
                return sent
            if sent + len(chunk) > left:
                break
            f.write(chunk)
            sent += len(chunk)
            bar.update(len(chunk))
    os.remove(part)
    raise ValueError(f"sends more than the published {size:,} bytes: another file, stopped there and removed")


def _fetch(url, part, size, bar, timeout, attempts=3):
    """Append ``url``'s bytes to ``part`` from its current length (HTTP Range) until it holds ``size`` bytes.
    A server that ignores Range (200 instead of 206) or rejects it (416) gets a clean restart from byte 0; a
    connection cut mid-file is resumed, up to ``attempts`` requests in all while each one makes progress.
    Nothing past ``size`` bytes is read: a larger Content-Length is refused before the body, a longer body
    without one is cut one byte past the end (and the ``part`` removed)."""
    import urllib.error
    import urllib.request

    for _ in range(attempts):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        if have >= size:
            return
        headers = {"User-Agent": f"npdgm/{__version__}"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # the .part does not fit this server's file: start over
                os.remove(part)
                continue
            raise
        with resp:
            if have and (resp.status != 206 or
                         not resp.headers.get("Content-Range", "").startswith(f"bytes {have}-")):
                have = 0  # Range ignored: the body is the whole file
            body = _declared_length(resp)
            if body is not None and body > size - have:
                raise ValueError(f"declares {body:,} bytes{f' from byte {have:,}' if have else ''} where the "
                                 f"published file has {size:,}: another file, not fetched")
            bar.reset(total=size)
            bar.update(have)
            sent = _append_body(resp, part, have, size, bar)
        got = os.path.getsize(part)
        if sent == body and got != size:  # a whole response, but another file than the published one
            os.remove(part)
            raise ValueError(f"serves {got:,} bytes where the published file has {size:,}: another file, removed")
        if got <= have:
            break
    got = os.path.getsize(part)
    if got < size:
        raise ConnectionError(f"connection closed after {got} of {size} bytes")


def download(name, root=None, progress=None, timeout=30.0, log=None, mirrors=()):
    """Fetch the files of data set ``name`` (MNIST's four IDX files, CIFAR-10's archive) into
    ``dataset_dir(name, root)``; return that directory.

    Each file: mirrors in order, into ``FILE.part`` (resumed by a later call), checked against its published
    checksum (sha256, or md5 where that is all a source publishes; a mismatch deletes it and tries the next
    mirror), then renamed to ``FILE``. A file already there is checked, never overwritten. One download at a
    time per data set directory: a second one waits for the lock on ``DIR/.lock`` and then finds the files
    there. ``progress``: a tqdm bar per file (None: when stderr is a terminal). ``log``: a function given one
    line per file. ``mirrors``: base URLs tried before the built-in ones (a local or institutional copy)."""
    src = _source(name)
    d = dataset_dir(name, root)
    try:
        os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the cache directory {d}: {e}") from e
    lock_path = os.path.join(d, ".lock")

    def waiting():
        log and log(f"{name}: another download into {d} holds {lock_path}; waiting for it to end")

    try:
        lock = wait_lock(lock_path, on_wait=waiting)
    except OSError as e:
        if not (isinstance(e, PermissionError) or e.errno == errno.EROFS):
            raise DataError(f"cannot lock the cache directory {d} ({lock_path}): {e}") from e
        lock = contextlib.nullcontext()  # a read-only cache: nobody downloads into it, its files are checked
    with lock:
        progress = sys.stderr.isatty() if progress is None else progress
        urls = (*(m if m.endswith("/") else m + "/" for m in mirrors), *src.mirrors)
        for fname, (size, checksum) in src.files.items():
            _download_file(name, os.path.join(d, fname), size, checksum, urls, progress, timeout, log)
    return d


def _download_file(name, target, size, checksum, mirrors, progress, timeout, log):
    """One file of ``download``: ``target`` checked if present, else fetched from the first good mirror."""
    import http.client

    from tqdm import tqdm

    fname = os.path.basename(target)
    algo, sha = parse_checksum(checksum)
    if os.path.exists(target):
        got = file_digest(target, algo)
        if got != sha:
            raise DataError(f"{target} is already there but is not the published file ({algo} {got}, expected "
                            f"{sha}); delete it and run the download again")
        log and log(f"{name}/{fname}: present, {algo} ok")
        return
    part, tried = target + ".part", []
    for mirror in mirrors:
        url = mirror + fname
        with tqdm(total=size, desc=fname, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                  disable=not progress) as bar:
            try:
                _fetch(url, part, size, bar, timeout)
            except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, timeouts, resets: OSError
                tried.append(f"{url} ({_reason(e)})")
                continue
        got = file_digest(part, algo)
        if got == sha:
            os.replace(part, target)
            log and log(f"{name}/{fname}: {size:,} bytes from {mirror}, {algo} ok")
            return
        os.remove(part)
        tried.append(f"{url} ({algo} {got} instead of {sha}: file removed)")
    kept = f"; {os.path.getsize(part):,} bytes kept in {part} for the next try" if os.path.exists(part) else ""
    raise DownloadError(f"could not download {name} file {fname} from any mirror: {'; '.join(tried)}{kept}")


def cache_status(name, root=None):
    """(directory, files present with the published size, files with another size, .part files) of ``name``."""
    src, d = _source(name), dataset_dir(name, root)
    ok, bad, parts = [], [], []
    for fname, (size, _) in src.files.items():
        p = os.path.join(d, fname)
        if os.path.isfile(p):
            (ok if os.path.getsize(p) == size else bad).append(fname)
        if os.path.isfile(p + ".part"):
            parts.append(fname + ".part")
    return d, ok, bad, parts


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "build-subset":
        print(build_subset(sys.argv[2], *(sys.argv[3:4] or [BUNDLED])))
    else:
        print(__doc__)
        sys.exit(2)
