"""CIFAR-10 (binary version) without the network: a small archive in the real format (cifar-10-batches-bin/
data_batch_1..5.bin and test_batch.bin, records of 1 label byte + 3072 pixel bytes) served from a loopback
http.server (test_download's), registered as a test source with its own size and md5; downloaded, resumed,
loaded, trained on (glow, conv VAE); crafted archives refused with one clear line."""
import gzip
import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from npdgm import cli, data
from test_download import _dead_url, cache, server  # noqa: F401  (fixtures)

ARCHIVE = data.CIFAR_ARCHIVE
MEMBERS = [*data.CIFAR_FILES["train"], *data.CIFAR_FILES["test"]]


def _records(rng, n):
    """(bytes of n records, images (n, 3, 32, 32), labels (n,))."""
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    raw = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1).tobytes()
    return raw, images, labels


def _archive(members, extra=()):
    """A .tar.gz of (name, bytes) regular files under cifar-10-batches-bin/, then ``extra`` TarInfo members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.addfile(_dir_info())
        for name, body in members:
            info = tarfile.TarInfo(f"{data.CIFAR_DIR}/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for info, body in extra:
            tar.addfile(info, io.BytesIO(body) if body is not None else None)
    return buf.getvalue()


def _dir_info():
    info = tarfile.TarInfo(data.CIFAR_DIR)
    info.type = tarfile.DIRTYPE
    return info


def _fake_cifar(seed=0, n_train=3, n_test=2):
    """(archive bytes, {split: (images, labels)}): n_train records in each train batch, n_test in the test one,
    and the two text members of the real archive."""
    rng = np.random.default_rng(seed)
    members, arrays = [], {"train": ([], []), "test": ([], [])}
    for name in MEMBERS:
        split = "test" if name == "test_batch.bin" else "train"
        raw, images, labels = _records(rng, n_test if split == "test" else n_train)
        members.append((name, raw))
        arrays[split][0].append(images)
        arrays[split][1].append(labels)
    members += [("batches.meta.txt", b"airplane\nautomobile\n"), ("readme.html", b"<html></html>")]
    return _archive(members), {k: (np.concatenate(a), np.concatenate(b)) for k, (a, b) in arrays.items()}


def _register(monkeypatch, srv, body, mirrors):
    srv.files[f"/cifar10/{ARCHIVE}"] = body
    md5 = hashlib.md5(body).hexdigest()
    src = data.Source("CIFAR-10", "test", tuple(mirrors), {ARCHIVE: (len(body), f"md5:{md5}")}, kind="cifar")
    monkeypatch.setitem(data.DATASETS, "cifar10", src)


def test_download_resume_and_load_by_name(server, cache, monkeypatch, capsys):  # noqa: F811
    body, arrays = _fake_cifar(0)
    _register(monkeypatch, server, body, [_dead_url(), server.url + "/cifar10/"])
    with pytest.raises(data.DataError, match="CIFAR-10 is not downloaded .* `npdgm data download cifar10`"):
        data.load_dataset("train", "cifar10")
    server.cuts[f"/cifar10/{ARCHIVE}"], server.cut_at = 1, 1000        # the first response stops after 1000 bytes
    assert cli.main(["data", "download", "cifar10", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "md5 ok" in out and "cifar10: 1 file in" in out and "md5 checked; train with --data cifar10" in out
    assert [r for p, r in server.requests if p.startswith("/cifar10/")] == [None, "bytes=1000-"]
    assert sorted(os.listdir(cache / "cifar10")) == [".lock", ARCHIVE]
    assert data.image_shape("cifar10") == (3, 32, 32) and data.image_shape("bundled") == (1, 28, 28)
    for split, n in (("train", 15), ("test", 2)):
        x, y = data.load_dataset(split, "cifar10")
        images, labels = arrays[split]
        assert x.shape == (n, 3072) and x.dtype == np.float32 and np.array_equal(y, labels)
        assert np.array_equal(np.rint(x * 255).astype(np.uint8).reshape(n, 3, 32, 32), images)  # (C, H, W) order
    assert cli.main(["data", "list"]) == 0
    assert "cifar10        complete" in capsys.readouterr().out
    assert cli.main(["data", "download", "cifar10", "--no-progress"]) == 0   # present: checked, not fetched
    assert "present, md5 ok" in capsys.readouterr().out


def test_an_archive_with_another_md5_is_removed_and_the_next_mirror_tried(server, cache, monkeypatch):  # noqa: F811
    body, _ = _fake_cifar(1)
    server.files[f"/bad/{ARCHIVE}"] = body[:-5] + b"XXXXX"
    _register(monkeypatch, server, body, [server.url + "/bad/"])
    with pytest.raises(data.DownloadError, match=rf"/bad/{ARCHIVE} \(md5 \w{{32}} instead of \w{{32}}: file removed"):
        data.download("cifar10", progress=False)
    assert os.listdir(cache / "cifar10") == [".lock"]
    _register(monkeypatch, server, body, [server.url + "/bad/", server.url + "/cifar10/"])
    data.download("cifar10", progress=False)
    assert (cache / "cifar10" / ARCHIVE).read_bytes() == body


def test_checksum_forms():
    assert data.parse_checksum("md5:" + "a" * 32) == ("md5", "a" * 32)
    assert data.parse_checksum("b" * 64) == data.parse_checksum("sha256:" + "b" * 64) == ("sha256", "b" * 64)
    for bad in ("md5:" + "a" * 64, "sha1:" + "a" * 40, "A" * 64, "md5:xyz"):
        with pytest.raises(ValueError, match="checksum"):
            data.parse_checksum(bad)


def _tar_info(name, size=0, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = size, kind, link
    return info


def _declaring(name, size):
    """A .tar.gz whose one member declares ``size`` bytes but carries 10 (the header is checked first)."""
    return gzip.compress(_tar_info(name, size).tobuf() + bytes(10))


GOOD = _records(np.random.default_rng(5), 2)[0]


@pytest.mark.parametrize("body, says", [
    (lambda: _archive([("data_batch_1.bin", GOOD)], [(_tar_info("../evil.bin", 3), b"abc")]),
     r"holds a member named '../evil.bin', outside the archive's directory: refused"),
    (lambda: _archive([], [(_tar_info("/etc/data_batch_1.bin", 3), b"abc")]),
     r"member named '/etc/data_batch_1.bin', outside the archive's directory"),
    (lambda: _archive([], [(_tar_info(f"{data.CIFAR_DIR}/data_batch_1.bin", kind=tarfile.SYMTYPE,
                                      link="/etc/passwd"), None)]),
     r"member 'cifar-10-batches-bin/data_batch_1.bin' is a symbolic link, not a regular file: refused"),
    (lambda: _declaring(f"{data.CIFAR_DIR}/data_batch_1.bin", 10_001 * 3073),
     r"member cifar-10-batches-bin/data_batch_1.bin declares 30,733,073 bytes, more than a CIFAR-10 batch file's "
     r"10,000 records .* refused before reading"),
    (lambda: _declaring(f"{data.CIFAR_DIR}/readme.html", 1 << 33),
     r"member cifar-10-batches-bin/readme.html declares 8,589,934,592 bytes"),
    (lambda: _archive([("data_batch_1.bin", GOOD + b"x" * 100)]),
     r"member cifar-10-batches-bin/data_batch_1.bin holds 6,246 bytes, not a whole number of 3073-byte records"),
    (lambda: _archive([("data_batch_1.bin", b"\x0c" + GOOD[1:])]),
     r"data_batch_1.bin: labels must be classes 0..9, found 12"),
    (lambda: _archive([("data_batch_1.bin", GOOD)] * 2), r"holds data_batch_1.bin twice"),
    (lambda: _archive([("data_batch_1.bin", GOOD)])[:-40], r"cannot read .*: .* \(a truncated or corrupt archive"),
    (lambda: _archive([("test_batch.bin", GOOD)]), r"has no data_batch_1.bin \(expected CIFAR-10's binary"),
    (lambda: b"not a gzip file at all", r"cannot read .*cifar-10-binary.tar.gz: "),
])
def test_crafted_archives_are_refused_in_one_line(tmp_path, capsys, monkeypatch, body, says):
    monkeypatch.delenv("NPDGM_DEBUG", raising=False)
    (tmp_path / ARCHIVE).write_bytes(body())
    with pytest.raises(data.DataError, match=says):
        raw = data.read_cifar_archive(str(tmp_path / ARCHIVE), ["data_batch_1.bin"])
        data.cifar_records(raw["data_batch_1.bin"], f"{tmp_path / ARCHIVE}: data_batch_1.bin")
    assert cli.main(["train", "glow", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("npdgm: error: ") and "Traceback" not in err
    assert not (tmp_path / "evil.bin").exists() and not (tmp_path.parent / "evil.bin").exists()


def test_extracted_batch_files_load_and_an_odd_size_names_the_file(tmp_path):
    body, arrays = _fake_cifar(2, n_train=1, n_test=4)
    d = tmp_path / "extracted"
    os.makedirs(d / data.CIFAR_DIR)
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        for m in tar.getmembers():
            if m.isreg():
                (d / m.name).write_bytes(tar.extractfile(m).read())
    x, y = data.load_dataset("test", str(d))                        # DIR/cifar-10-batches-bin/*.bin
    assert x.shape == (4, 3072) and np.array_equal(y, arrays["test"][1])
    assert data.load_dataset("train", str(d / data.CIFAR_DIR), limit=3)[0].shape == (3, 3072)
    p = d / data.CIFAR_DIR / "data_batch_3.bin"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(data.DataError, match=rf"{p} holds 3,072 bytes, not a whole number of 3073-byte records"):
        data.load_dataset("train", str(d))


def test_tile_lays_out_colour_images_in_chw_order():
    from npdgm.plots import tile

    x = np.zeros((2, 3, 2, 2))
    x[0, 0] = 1.0                        # image 0 red
    x[1, 2, 1, 1] = 0.5                  # image 1: blue at (1, 1)
    grid = tile(x.reshape(2, -1), 2, (3, 2, 2), pad=1)
    assert grid.shape == (4, 7, 3)
    assert np.array_equal(grid[1:3, 1:3], np.broadcast_to([1.0, 0, 0], (2, 2, 3)))
    assert np.array_equal(grid[2, 5], [0, 0, 0.5]) and np.array_equal(grid[1, 4], [0, 0, 0])
    assert tile(np.ones((1, 4)), 1, (1, 2, 2)).shape == (4, 4)    # one channel: grey, as before


def test_row_mask_hides_the_rows_of_every_channel():
    from npdgm.commands.vae import row_mask

    m = row_mask(2, (30, 32), (3, 32, 32)).reshape(2, 3, 32, 32)
    assert m[:, :, 30:].all() and not m[:, :, :30].any()
    with pytest.raises(ValueError, match="STOP <= 32"):
        row_mask(1, (30, 33), (3, 32, 32))


@pytest.fixture
def cifar_cache(server, cache, monkeypatch):  # noqa: F811
    """A downloaded test CIFAR-10 (8 records per train batch, 6 test) in $NPDGM_DATA/cifar10."""
    body, _ = _fake_cifar(3, n_train=8, n_test=6)
    _register(monkeypatch, server, body, [server.url + "/cifar10/"])
    data.download("cifar10", progress=False)
    return cache


def test_glow_trains_on_cifar10_and_samples_colour(cifar_cache, tmp_path):
    """3 levels 32 -> 16 -> 8 -> 4 on 40 images, 2 steps, then npdgm sample from the run."""
    out = tmp_path / "glow"
    assert cli.main(["train", "glow", "--data", "cifar10", "--levels", "3", "--depth", "1", "--hidden", "4",
                     "--batch-size", "20", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    s = json.load(open(out / "summary.json"))
    assert s["dataset"] == "cifar10" and s["steps"] == 2 and s["test_n"] == 6
    assert s["test_bpd"] == pytest.approx(s["test_nll"] / 3072 / np.log(2) + 8)
    assert (out / "samples.png").exists()
    assert cli.main(["sample", str(out), "--n", "2", "--temperatures", "0.5"]) == 0


def test_conv_vae_trains_on_cifar10(cifar_cache, tmp_path):
    out = tmp_path / "vae"
    assert cli.main(["train", "vae", "--arch", "conv", "--channels", "4", "8", "--data", "cifar10", "--batch-size",
                     "20", "--epochs", "1", "--iwae-n", "0", "--impute-steps", "1", "--impute-k", "0",
                     "--impute-rows", "24", "32", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    s = json.load(open(out / "summary.json"))
    assert s["epochs"] == 1 and s["test_n"] == 6 and s["test_nelbo"] > 1000 and "impute_mse_vae" in s
    import npdgm

    model = npdgm.load(out)
    assert model.config["image_shape"] == [3, 32, 32] and model.x_dim == 3072


@pytest.mark.parametrize("argv, says", [
    (["train", "nice"], "this command models 28x28 grey images (784 pixels): train CIFAR-10 with npdgm train glow"),
    (["train", "maf"], "this command models 28x28 grey images"),
    (["train", "vae"], "--data cifar10 holds 32x32 colour images: train them with --arch conv"),
    (["train", "cvae", "--epochs", "1"], "this command models 28x28 grey images"),
    (["train", "gmm", "--dataset", "mnist"], "this command models 28x28 grey images"),
    (["train", "glow", "--levels", "6"], "--levels 6: cifar10's 32x32 images allow --levels 1 to 5"),
])
def test_commands_for_784_pixels_refuse_cifar10_in_one_line(cifar_cache, tmp_path, capsys, monkeypatch, argv, says):
    monkeypatch.delenv("NPDGM_DEBUG", raising=False)
    capsys.readouterr()
    assert cli.main([*argv, "--data", "cifar10", "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npdgm: error: ") and says in err[0], err
