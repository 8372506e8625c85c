import gzip
import os

import numpy as np
import pytest

from npdgm import data


def _write_idx(path, arr, magic_type=0x08):
    header = bytes([0, 0, magic_type, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _fake_mnist(d, n_train=6, n_test=4, n_labels=None):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        _write_idx(os.path.join(d, data.FILES[(split, "images")] + ".gz"), rng.integers(0, 256, (n, 28, 28)))
        _write_idx(os.path.join(d, data.FILES[(split, "labels")]), rng.integers(0, 10, n_labels or n))


def test_reads_gz_and_raw_and_scales(tmp_path):
    _fake_mnist(str(tmp_path))
    x, y = data.load_mnist("train", str(tmp_path))
    assert x.shape == (6, 784) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert y.dtype == np.int64 and y.shape == (6,)


def test_bundled_subset_is_real_balanced_mnist(monkeypatch):
    monkeypatch.delenv("NPDGM_DATA", raising=False)
    x, y = data.load_mnist("train")
    xt, yt = data.load_mnist("test")
    assert x.shape == (10_000, 784) and xt.shape == (2_000, 784)
    assert np.array_equal(np.bincount(y), [1000] * 10) and np.array_equal(np.bincount(yt), [200] * 10)
    assert abs(x.mean() - 0.1307) < 0.005  # MNIST's published pixel mean


def test_full_mnist_from_shared(shared_mnist):
    x, y = data.load_mnist("test", shared_mnist)
    assert x.shape == (10_000, 784) and np.bincount(y).sum() == 10_000


def test_env_variable_points_at_a_directory(tmp_path, monkeypatch):
    _fake_mnist(str(tmp_path))
    monkeypatch.setenv("NPDGM_DATA", str(tmp_path))
    assert data.load_mnist("test")[0].shape == (4, 784)


def test_bad_files_are_clear_errors(tmp_path):
    d = str(tmp_path)
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_mnist("train", os.path.join(d, "nope"))
    with pytest.raises(data.DataError, match="has no train-images-idx3-ubyte"):
        data.load_mnist("train", d)
    _fake_mnist(d, n_labels=5)
    with pytest.raises(data.DataError, match="6 images but 5 labels"):
        data.load_mnist("train", d)
    p = os.path.join(d, "bad")
    open(p, "wb").write(b"\x00\x00\x0d\x01abcd")
    with pytest.raises(data.DataError, match="not an unsigned-byte IDX"):
        data.read_idx(p)
    _write_idx(p, np.zeros((3, 4)))
    open(p, "ab").write(b"x")
    with pytest.raises(data.DataError, match="should hold 12 bytes"):
        data.read_idx(p)
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:10])
    with pytest.raises(data.DataError, match="truncated"):
        data.read_idx(p)
    with pytest.raises(ValueError, match="split must be"):
        data.load_mnist("valid", d)


def test_binarize_and_dequantize():
    rng = np.random.default_rng(0)
    x = np.full((1000, 4), 0.3, np.float32)
    assert abs(data.binarize(x, rng).mean() - 0.3) < 0.02
    assert not data.binarize(x).any()
    k = np.arange(256, dtype=np.float32)[None, :] / 255
    y = data.dequantize(np.repeat(k, 50, 0), rng)
    assert (y >= 0).all() and (y < 1).all()
    level = np.floor(y * 256) - np.arange(256)[None, :]
    assert np.abs(level).max() <= 1 and (level == 0).mean() > 0.999  # float32 rounding may touch k + 1
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        data.dequantize(k * 255, rng)
    with pytest.raises(ValueError, match="non-finite"):
        data.binarize(np.array([[np.nan]]))


@pytest.mark.parametrize("name", data.TOYS)
def test_toys_are_seeded_2d(name):
    a = data.make_toy2d(name, 500, np.random.default_rng(3))
    b = data.make_toy2d(name, 500, np.random.default_rng(3))
    assert a.shape == (500, 2) and np.array_equal(a, b) and np.isfinite(a).all()
    assert np.abs(a.mean(0)).max() < 0.5 and 0.5 < a.std(0).min() < 3


def test_unknown_toy():
    with pytest.raises(ValueError, match="unknown 2-D dataset 'swiss'"):
        data.make_toy2d("swiss", 10, np.random.default_rng(0))


def test_subset_builder_is_reproducible(tmp_path):
    _fake_mnist(str(tmp_path), n_train=40, n_test=20)
    a = data.build_subset(str(tmp_path), str(tmp_path / "a.npz"), n_train=10, n_test=10, seed=1)
    b = data.build_subset(str(tmp_path), str(tmp_path / "b.npz"), n_train=10, n_test=10, seed=1)
    with np.load(a) as za, np.load(b) as zb:
        for k in za.files:
            assert np.array_equal(za[k], zb[k])


def test_corrupt_deflate_stream_names_the_file(tmp_path, capsys):
    """A valid gzip header over an invalid deflate block raised zlib.error (no file name) before."""
    _fake_mnist(str(tmp_path))
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF]) + b"\x07not deflate")
    with pytest.raises(data.DataError, match=rf"cannot read {p}: corrupt gzip data \(.*invalid block type"):
        data.read_idx(str(p))
    from npdgm import cli

    assert cli.main(["train", "gmm", "--dataset", "mnist", "--data", str(tmp_path), "--out",
                     str(tmp_path / "run"), "--no-progress", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"npdgm: error: cannot read {p}: corrupt gzip data")


def test_data_that_is_a_file_says_so(tmp_path, capsys):
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(b"x")
    with pytest.raises(data.DataError, match=f"data path {f} is a file, not a directory"):
        data.load_mnist("train", str(f))
    from npdgm import cli

    assert cli.main(["train", "gmm", "--dataset", "mnist", "--data", str(f), "--out", str(tmp_path / "run"),
                     "--no-progress", "--no-plots"]) == 2
    assert f"npdgm: error: data path {f} is a file, not a directory" in capsys.readouterr().err


def test_names_and_the_cache_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("NPDGM_DATA", str(tmp_path))
    with pytest.raises(data.DataError, match=r"NPDGM_DATA=.* holds no MNIST IDX files .*npdgm data download mnist"):
        data.load_mnist("test")
    with pytest.raises(data.DataError, match=r"Fashion-MNIST is not downloaded in the cache .*fashion-mnist: run "
                                             r"`npdgm data download fashion-mnist`"):
        data.load_mnist("test", "fashion-mnist")
    assert data.load_mnist("test", "bundled")[0].shape == (2_000, 784)
    os.makedirs(tmp_path / "mnist")
    _fake_mnist(str(tmp_path / "mnist"))                 # $NPDGM_DATA as a cache: mnist/ inside it
    assert data.load_mnist("test")[0].shape == (4, 784)
    assert data.load_mnist("test", "mnist")[0].shape == (4, 784)
    os.remove(tmp_path / "mnist" / "t10k-labels-idx1-ubyte")
    with pytest.raises(data.DataError, match=r"MNIST is incomplete \(missing t10k-labels-idx1-ubyte\)"):
        data.load_mnist("test", "mnist")


def test_a_name_wins_over_a_directory_of_that_name_and_says_how_to_reach_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NPDGM_DATA", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    os.makedirs("mnist")
    _fake_mnist("mnist")
    with pytest.raises(data.DataError, match=r"for the directory ./mnist here write --data ./mnist"):
        data.load_mnist("test", "mnist")
    assert data.load_mnist("test", "./mnist")[0].shape == (4, 784)



def test_an_idx_set_of_zero_images_names_the_file(tmp_path, capsys):
    """0 images reached load_dataset's reshape before: `cannot reshape array of size 0`, no file named."""
    _fake_mnist(str(tmp_path))
    p = str(tmp_path / "train-images-idx3-ubyte.gz")
    _write_idx(p, np.zeros((0, 28, 28)))
    _write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros(0))
    with pytest.raises(data.DataError, match=rf"^{p} holds 0 images"):
        data.load_mnist("train", str(tmp_path))
    from npdgm import cli

    assert cli.main(["train", "gmm", "--dataset", "mnist", "--data", str(tmp_path), "--out",
                     str(tmp_path / "run"), "--no-progress", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"npdgm: error: {p} holds 0 images (shape (0, 28, 28)): an empty or wrong file"]


def _gzip_bomb(path, header_shape, inflated_mb):
    """A .gz of a few hundred KB: an IDX header declaring ``header_shape`` followed by ``inflated_mb`` MB of
    zeros (concatenated gzip members of 16 MB each, which gzip reads as one stream)."""
    member = gzip.compress(bytes(16 << 20), compresslevel=9, mtime=0)
    header = bytes([0, 0, 8, len(header_shape)]) + b"".join(int(s).to_bytes(4, "big") for s in header_shape)
    with open(path, "wb") as f:
        f.write(gzip.compress(header, mtime=0))
        for _ in range(inflated_mb // 16):
            f.write(member)


@pytest.mark.parametrize("shape, message", [
    ((100, 28, 28), r"should hold 78400 bytes of data for shape \(100, 28, 28\), has more"),
    ((10 ** 6, 28, 28), r"declares shape \(1000000, 28, 28\), 784,000,000 bytes of data, more than the file can "
                        r"hold"),
    ((2 ** 32 - 1, 28, 28), r"declares .* more than the 2,147,483,648 an IDX file is read up to"),
    ((100, 32, 32), r"holds shape \(100, 32, 32\); expected \(N, 28, 28\)"),
])
def test_a_gzip_bomb_is_refused_without_inflating_it(tmp_path, shape, message):
    """A small .gz inflating to GBs was read whole before (`out of memory ()`, no file named). Now the header is
    checked first and the data read only up to its declared size: memory stays far below the inflated size."""
    import tracemalloc

    _fake_mnist(str(tmp_path))
    p = str(tmp_path / "train-images-idx3-ubyte.gz")
    _gzip_bomb(p, shape, inflated_mb=256)
    assert os.path.getsize(p) < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(data.DataError, match=rf"^{p} {message}"):
            data.load_mnist("train", str(tmp_path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2 ** 20:.0f} MiB allocated to refuse a 256 MB gzip bomb"


def test_labels_must_be_one_dimensional_and_a_raw_file_is_checked_against_its_size(tmp_path):
    p = str(tmp_path / "labels")
    _write_idx(p, np.zeros((4, 2)))
    with pytest.raises(data.DataError, match=rf"{p} holds shape \(4, 2\); expected \(N,\)"):
        data.read_idx(p, item_shape=())
    with open(p, "wb") as f:                        # a raw header declaring a billion labels over 3 bytes
        f.write(bytes([0, 0, 8, 1]) + (10 ** 9).to_bytes(4, "big") + b"abc")
    with pytest.raises(data.DataError, match=rf"{p} declares shape \(1000000000,\), 1,000,000,000 bytes of data, "
                                             r"more than the file can hold"):
        data.read_idx(p)


def test_a_data_path_that_is_a_device_is_refused_at_once(tmp_path):
    """--data /dev/zero said `does not exist`; nothing is read from it."""
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero here")
    with pytest.raises(data.DataError, match="data path /dev/zero is not a directory"):
        data.load_mnist("train", "/dev/zero")
    with pytest.raises(data.DataError, match=r"/dev/zero is not an unsigned-byte IDX file \(magic 00000000\)"):
        data.read_idx("/dev/zero")
