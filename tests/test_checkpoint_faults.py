"""Crafted checkpoints (issue 12): every one ends in a CheckpointError naming the file, before the model
is built when the manifest itself is wrong, and as one `npdgm: error:` line from the CLI.
Issue 23: a hostile file (zip bomb, unknown or pickled members, lying headers, crafted fields, NaN weights)."""
import io as pyio
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import npdgm
from npdgm import cli, io
from npdgm.models import registry
from npdgm.models import flows as F
from npdgm.models.vae import VAE


def _vae_file(tmp_path, name="m.npz"):
    p = tmp_path / name
    VAE(x_dim=6, hidden=[4], z_dim=2).save(p)
    return p


def _write(p, arrays, meta):
    """An .npz with any __meta__ (a JSON value, or raw bytes), bypassing save_arrays."""
    raw = meta if isinstance(meta, bytes) else json.dumps(meta).encode()
    np.savez(p, __meta__=np.frombuffer(raw, dtype=np.uint8), **arrays)
    return p


class Replace:
    """Returned by an edit: store this value as the whole manifest."""

    def __init__(self, value):
        self.value = value


def _crafted(tmp_path, edit, name="bad.npz"):
    """The tiny VAE's checkpoint with ``edit(arrays, meta)`` applied in place (or a Replace)."""
    arrays, meta = io.load_arrays(_vae_file(tmp_path, "good.npz"))
    r = edit(arrays, meta)
    return _write(tmp_path / name, arrays, r.value if isinstance(r, Replace) else meta)


def _no_build(monkeypatch):
    """Fail the test if anything tries to build a model (the checks must come first)."""
    def boom(cls, config):
        raise AssertionError(f"built a {cls.kind} from a crafted checkpoint")
    for cls in set(registry.MODELS.values()):
        monkeypatch.setattr(cls, "from_config", classmethod(boom))


CASES = {
    # name: (edit, message)
    "meta is a list": (lambda a, m: Replace([m]), r"manifest must be a JSON object, got a list"),
    "meta is a string": (lambda a, m: Replace("npdgm-checkpoint"), r"manifest must be a JSON object, got a str"),
    "hidden=[10**12]": (lambda a, m: m["config"].update(hidden=[10 ** 12]),
                        r"config hidden\[0\]=1000000000000 does not fit the stored parameters"),
    "a million layers": (lambda a, m: m["config"].update(hidden=[4] * 10 ** 6), r"config hidden has 1000000 entries"),
    "missing config": (lambda a, m: m.pop("config"), r"manifest has no model config"),
    "config is a list": (lambda a, m: m.update(config=[6, [4], 2]), r"manifest has no model config"),
    "missing kind": (lambda a, m: m.pop("kind"), r"names no model kind"),
    "missing layout": (lambda a, m: m.pop("layout"), r"manifest has no parameter layout"),
    "bad dtype": (lambda a, m: m.update(dtype="float16"), r"manifest dtype 'float16' is not one of"),
    "layout offset shifted": (lambda a, m: m["layout"][2].__setitem__(2, m["layout"][2][2] + 1),
                              r"manifest layout gives 'encoder.2.W' the offset 29, expected 28"),
    "layout offsets swapped": (lambda a, m: (m["layout"][0].__setitem__(2, 24), m["layout"][1].__setitem__(2, 0)),
                               r"manifest layout gives 'encoder.0.W' the offset 24, expected 0"),
    "layout shape disagrees": (lambda a, m: m["layout"][0].__setitem__(1, [4, 6]),
                               r"gives 'encoder.0.W' the shape \[4, 6\] but param/encoder.0.W has shape \[6, 4\]"),
    "layout negative size": (lambda a, m: m["layout"][0].__setitem__(1, [-6, 4]),
                             r"entry 0 \(encoder.0.W\) shape must be a non-negative integer, got -6"),
    "layout float offset": (lambda a, m: m["layout"][1].__setitem__(2, 24.0),
                            r"entry 1 \(encoder.0.b\) offset must be a non-negative integer, got 24.0"),
    "layout names a missing array": (lambda a, m: a.pop("param/decoder.0.b"),
                                     r"names 'decoder.0.b' but the file has no array param/decoder.0.b"),
    "layout entry malformed": (lambda a, m: m["layout"].__setitem__(3, "encoder.2.b"),
                               r"entry 3 must be \[name, shape, offset\]"),
    "layout is a dict": (lambda a, m: m.update(layout={}), r"layout must be a list"),
    "array dtype disagrees": (lambda a, m: a.update({"param/encoder.0.b": a["param/encoder.0.b"].astype(np.float64)}),
                              r"param/encoder.0.b is float64, the manifest dtype is float32"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_manifest_is_refused_before_building(tmp_path, monkeypatch, case):
    edit, msg = CASES[case]
    p = _crafted(tmp_path, edit)
    _no_build(monkeypatch)
    with pytest.raises(io.CheckpointError, match=msg) as e:
        npdgm.load(p)
    assert str(p) in str(e.value)


def test_relabelled_kind_is_refused(tmp_path):
    # a vae's config and arrays labelled "flow": the flow constructor rejects the config
    p = _crafted(tmp_path, lambda a, m: m.update(kind="flow"))
    with pytest.raises(io.CheckpointError, match=rf"{p}: its config does not build a flow \(TypeError"):
        npdgm.load(p)
    # labelled "cvae": the config builds (num_classes defaults to 10) but its layout is not the stored one
    p = _crafted(tmp_path, lambda a, m: m.update(kind="cvae"), "cvae.npz")
    with pytest.raises(io.CheckpointError, match=r"weights do not match a cvae .* entry 0 of the layout is "
                                                 r"\['encoder.0.W', \(6, 4\), 0\] in the file, "
                                                 r"\['encoder.0.W', \(16, 4\), 0\] in the model"):
        npdgm.load(p)


def test_config_within_bounds_but_not_the_stored_model(tmp_path):
    p = _crafted(tmp_path, lambda a, m: m["config"].update(z_dim=3))
    with pytest.raises(io.CheckpointError, match=rf"{p}: weights do not match a vae .* entry 2 of the layout"):
        npdgm.load(p)


def test_npy_file_and_non_dict_meta_through_load_arrays(tmp_path):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(io.CheckpointError, match=rf"{npy} is not a readable npdgm checkpoint \(a .npy file"):
        npdgm.load(npy)
    p = _write(tmp_path / "l.npz", {}, [1, 2])
    with pytest.raises(io.CheckpointError, match=rf"{p}: the manifest must be a JSON object, got a list"):
        io.load_arrays(p)
    p = _write(tmp_path / "f.npz", {}, b"\xff\xfe")
    with pytest.raises(io.CheckpointError, match=rf"{p}: manifest is not valid JSON"):
        io.load_arrays(p)
    (tmp_path / "d" / "checkpoint.npz").mkdir(parents=True)   # a run directory whose checkpoint is a directory
    with pytest.raises(io.CheckpointError, match=r"checkpoint.npz: cannot read the checkpoint \(Is a directory"):
        npdgm.load(tmp_path / "d")
    np.savez(tmp_path / "m.npz", __meta__=np.zeros(3))
    with pytest.raises(io.CheckpointError, match=r"__meta__ must be the UTF-8 bytes of a JSON object"):
        io.load_arrays(tmp_path / "m.npz")
    with pytest.raises(io.CheckpointError, match=r"manifest must be a JSON object, got a list"):
        registry.model_from_arrays({}, [], "given")


def test_valid_checkpoints_still_load_exactly(tmp_path, rng):
    m = VAE(x_dim=6, hidden=[4, 3], z_dim=2, likelihood="gaussian")
    m.flat_params[...] = rng.standard_normal(m.flat_params.shape).astype(np.float32)
    m.save(tmp_path / "v.npz")
    assert np.array_equal(npdgm.load(tmp_path / "v.npz").flat_params, m.flat_params)
    f = F.realnvp(dim=16, n_couplings=2, hidden=(6,), image_shape=(4, 4))   # buffers outside the layout
    f.forward(rng.uniform(0.1, 0.9, (8, 16)).astype(np.float32))
    f.save(tmp_path / "f.npz")
    assert np.array_equal(npdgm.load(tmp_path / "f.npz").flat_params, f.flat_params)
    # integers the size bound must not take for sizes: a big seed, a real option stored as a JSON int
    p = _crafted(tmp_path, lambda a, m: m["config"].update(seed=2 ** 40, beta=100, n_samples=1000), "s.npz")
    assert npdgm.load(p).config["seed"] == 2 ** 40
    g = F.Flow([F.Permutation(5, seed=3)])                                 # no parameters at all
    g.save(tmp_path / "g.npz")
    assert npdgm.load(tmp_path / "g.npz").config == g.config


@pytest.mark.parametrize("case, msg", [("hidden=[10**12]", "does not fit the stored parameters"),
                                       ("meta is a list", "manifest must be a JSON object"),
                                       ("layout offset shifted", "offset 29, expected 28")])
def test_cli_sample_prints_one_error_line(tmp_path, capsys, monkeypatch, case, msg):
    p = _crafted(tmp_path, CASES[case][0])
    _no_build(monkeypatch)
    assert cli.main(["sample", str(p), "--n", "2", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"npdgm: error: {p}") and msg in err[0], err
    assert not (tmp_path / "s.png").exists()


def test_cli_sample_on_npy_and_missing_config(tmp_path, capsys):
    npy = tmp_path / "x.npy"
    np.save(npy, np.zeros(3))
    assert cli.main(["sample", str(npy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"npdgm: error: {npy} is not a readable npdgm checkpoint (a .npy file (one array); a checkpoint "
                   f"is the checkpoint.npz of a run or a file written by model.save)"]
    p = _crafted(tmp_path, lambda a, m: m.pop("config"))
    assert cli.main(["sample", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{p}: the manifest has no model config" in err[0]


def test_numpy_scalars_in_a_manifest_are_numbers(tmp_path):
    p = tmp_path / "n.npz"
    io.save_arrays(p, {"a": np.arange(2)}, {"kind": "x", "epoch": np.int64(3), "lr": np.float32(0.5),
                                             "done": np.bool_(True), "sizes": [np.int32(4)]})
    meta = io.load_arrays(p)[1]
    assert meta["epoch"] == 3 and meta["lr"] == 0.5 and meta["done"] is True and meta["sizes"] == [4]
    with pytest.raises(TypeError, match="manifest value .* of type ndarray is not JSON-serializable"):
        io.save_arrays(p, {}, {"kind": "x", "bad": np.zeros(2)})


# -- issue 23: a hostile checkpoint (zip bomb, crafted members and fields, NaN weights) ------------------
TINY_VAE = ["--train-limit", "100", "--test-limit", "20", "--hidden", "8", "--z-dim", "2", "--batch-size", "50",
            "--iwae-n", "4", "--iwae-k", "2", "--impute-steps", "1", "--impute-k", "0", "--impute-n", "4",
            "--no-progress", "--no-plots"]


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A finished 1-epoch VAE training run (copy it before changing it)."""
    out = str(tmp_path_factory.mktemp("ckpt") / "vae")
    assert cli.main(["train", "vae", *TINY_VAE, "--epochs", "1", "--out", out]) == 0
    return out


def _crafted_run(vae_run, tmp_path, edit):
    """A copy of ``vae_run`` whose checkpoint has ``edit(arrays, meta)`` applied."""
    import shutil

    out = str(tmp_path / "run")
    shutil.copytree(vae_run, out)
    arrays, meta = io.load_arrays(out)
    edit(arrays, meta)
    _write(os.path.join(out, "checkpoint.npz"), arrays, meta)
    return out


def _npy_bytes(shape, dtype, data=b""):
    """The bytes of an .npy member: a header declaring ``shape`` and ``dtype``, then ``data``."""
    buf = pyio.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue() + data


def _add_member(p, name, payload, deflate=True):
    with zipfile.ZipFile(p, "a", compression=zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED) as z:
        z.writestr(name, payload)
    return p


@pytest.fixture
def inflated(monkeypatch):
    """The number of bytes read out of zip members (what the loader inflated), as a one-item list."""
    count, real = [0], zipfile.ZipExtFile.read

    def read(self, n=-1):
        data = real(self, n)
        count[0] += len(data)
        return data

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    return count


def test_unknown_member_is_refused_before_it_is_inflated(tmp_path, inflated):
    p = _add_member(_vae_file(tmp_path), "extra.npy", _npy_bytes((1 << 18,), "float32", bytes(1 << 20)))
    with pytest.raises(io.CheckpointError, match=rf"{p}: unknown member extra \(shape \[262144\], float32\)"):
        npdgm.load(p)
    assert inflated[0] < 64 << 10, inflated[0]     # before: the whole member (1 MiB) was inflated


def test_zip_bomb_is_refused_before_inflating(tmp_path, inflated):
    # 8 MiB of zeros deflate to ~8 KB: the declared size is far beyond what the file can honestly hold
    p = _add_member(_vae_file(tmp_path), "opt/m.0.npy", _npy_bytes((1 << 21,), "float32", bytes(8 << 20)))
    assert os.path.getsize(p) < 64 << 10
    with pytest.raises(io.CheckpointError, match=rf"{p}: its members declare \d+ bytes uncompressed in a file of "
                                                 rf"\d+ bytes .*a zip bomb"):
        io.load_arrays(p)
    assert inflated[0] == 0, inflated[0]


def test_declared_shape_beyond_the_member_is_refused_before_allocating(tmp_path):
    # a (10**12,) optimizer state whose header lies about the 16 bytes that follow (before: MemoryError)
    p = _add_member(_vae_file(tmp_path), "opt/m.0.npy", _npy_bytes((10 ** 12,), "float32", bytes(16)), False)
    with pytest.raises(io.CheckpointError, match=rf"{p}: member opt/m.0 declares shape \[1000000000000\] of float32 "
                                                 rf"\(4000000000000 bytes\) but the archive declares 16 bytes"):
        io.load_arrays(p)
    # an honest header, but more optimizer state than the model has parameters
    p = _add_member(_vae_file(tmp_path, "big.npz"), "opt/v.0.npy", _npy_bytes((999,), "float32", bytes(3996)))
    with pytest.raises(io.CheckpointError, match=r"member opt/v.0 has shape \[999\] of float32; expected optimizer "
                                                 r"state of at most \d+ float32 values"):
        io.load_arrays(p)


@pytest.mark.parametrize("member", ["__meta__.npy", "param/encoder.0.b.npy"])
def test_pickle_member_is_refused(tmp_path, member):
    src = _vae_file(tmp_path)
    p = tmp_path / "p.npz"
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(p, "w") as b:
        for info in a.infolist():
            b.writestr(info.filename, pickle.dumps({"x": 1}) if info.filename == member else a.read(info))
    with pytest.raises(io.CheckpointError, match=rf"{p}: member {member[:-4]} is not an .npy array"):
        npdgm.load(p)                               # before: AttributeError: 'bytes' object has no attribute ...


def test_deeply_nested_manifest_is_refused(tmp_path):
    p = _write(tmp_path / "deep.npz", {}, b"[" * 100000 + b"]" * 100000)
    with pytest.raises(io.CheckpointError, match=rf"{p}: the manifest nests deeper than 32 levels"):
        npdgm.load(p)                               # before: RecursionError
    p = _crafted(tmp_path, lambda a, m: m["config"].update(hidden=json.loads("[" * 40 + "]" * 40)), "d40.npz")
    with pytest.raises(io.CheckpointError, match=r"nests deeper than 32 levels"):
        npdgm.load(p)


@pytest.mark.parametrize("field, value, msg", [
    ("epoch", "abc", r"manifest field epoch must be a non-negative integer, got 'abc' \(str\)"),
    ("epoch", None, r"manifest field epoch must be a non-negative integer, got None"),
    ("epoch", 1.5, r"manifest field epoch must be a non-negative integer, got 1.5"),
    ("opt_t", -5, r"manifest field opt_t must be a non-negative integer, got -5"),
    ("opt_t", 2 ** 80, r"manifest field opt_t=\d+ is more than any run counts"),
])
def test_bad_training_counters_are_refused(vae_run, tmp_path, field, value, msg):
    out = _crafted_run(vae_run, tmp_path, lambda a, m: m.update({field: value}))
    with pytest.raises(io.CheckpointError, match=rf"{out}/checkpoint.npz: {msg}"):
        io.load_arrays(out)


@pytest.mark.parametrize("rng, msg", [
    ({"bit_generator": "seed"}, r"names the bit generator 'seed'; npdgm writes only \['PCG64'\]"),
    ({"bit_generator": "MT19937", "state": {}}, r"names the bit generator 'MT19937'"),
    ({"bit_generator": "PCG64", "state": "x"}, r"is not a valid PCG64 state"),
    ([1, 2], r"names the bit generator None"),
])
def test_rng_field_names_no_function(vae_run, tmp_path, monkeypatch, rng, msg):
    from npdgm import optim, train

    out = _crafted_run(vae_run, tmp_path, lambda a, m: m.update(rng=json.dumps(rng)))
    monkeypatch.setattr(np.random, "seed", lambda *a: pytest.fail("the file chose np.random.seed"))
    opt = optim.Adam(npdgm.load(out), lr=1e-3)
    with pytest.raises(io.CheckpointError, match=rf"{out}/checkpoint.npz: manifest field rng {msg}"):
        train.restore_checkpoint(out, opt)


@pytest.mark.parametrize("field, value, msg", [
    ("batch_size", 0, "run.args.batch_size must be a positive integer, got 0"),
    ("lr", 0.0, "run.args.lr must be > 0, got 0"),
    ("epochs", "3", "run.args.epochs must be a non-negative integer, got '3' (str)"),
])
def test_cli_resume_refuses_bad_stored_options(vae_run, tmp_path, capsys, field, value, msg):
    out = _crafted_run(vae_run, tmp_path, lambda a, m: m["run"]["args"].update({field: value}))
    capsys.readouterr()
    assert cli.main(["train", "vae", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"npdgm: error: {out}/checkpoint.npz: manifest field {msg}"], err   # before: ZeroDivisionError


def test_dev_zero_fails_fast():
    # before: zipfile.is_zipfile read /dev/zero without end (here: until a 1.5 GB address-space limit)
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 29, 3 << 29)); import npdgm\n"
            "try:\n    npdgm.load('/dev/zero')\nexcept npdgm.io.CheckpointError as e:\n    print(e)\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.startswith("/dev/zero is not a regular file"), (r.stdout, r.stderr[-500:])


def _nan_weights(a, m):
    a["param/encoder.0.W"].flat[[0, 5, 7]] = [np.nan, np.inf, -np.inf]


def test_nonfinite_weights_are_refused_by_load(tmp_path):
    p = _crafted(tmp_path, _nan_weights)
    with pytest.raises(io.CheckpointError, match=rf"{p}: parameter encoder.0.W holds 3 NaN/inf values \(of 24\)"):
        npdgm.load(p)                               # before: loaded silently
    m = npdgm.load(p, allow_nonfinite=True)         # to inspect a diverged run
    assert np.isnan(m.params["encoder.0.W"]).sum() == 1


@pytest.mark.parametrize("argv", [["sample", "{run}", "--n", "4", "--out", "{tmp}/s.png"],
                                  ["evaluate", "{run}", "--method", "elbo", "--n-images", "4"],
                                  ["train", "vae", "--resume", "{run}", "--epochs", "2", "--no-progress",
                                   "--no-plots"]])
def test_cli_refuses_nonfinite_weights(vae_run, tmp_path, capsys, argv):
    out = _crafted_run(vae_run, tmp_path, _nan_weights)
    capsys.readouterr()
    code = cli.main([a.format(run=out, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"npdgm: error: {out}: parameter encoder.0.W holds 3 NaN/inf values (of 6272); "
                                 f"the run diverged or the file is damaged"], (code, err)
    assert not (tmp_path / "s.png").exists()


def test_resume_refuses_nonfinite_optimizer_state(vae_run, tmp_path, capsys):
    def inf_v(a, m):
        a["opt/v.0"][3] = np.inf
    out = _crafted_run(vae_run, tmp_path, inf_v)
    capsys.readouterr()
    assert cli.main(["train", "vae", "--resume", out, "--epochs", "2", "--no-progress", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"npdgm: error: {out}/checkpoint.npz: optimizer state opt/v.0 holds 1 NaN/inf value (of 13396); "
                   f"the run diverged or the file is damaged"], err


def test_resume_with_another_command_names_both_kinds(vae_run, capsys):
    capsys.readouterr()
    assert cli.main(["train", "nice", "--resume", vae_run, "--epochs", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"npdgm: error: --resume {vae_run}: {vae_run} holds a vae run, not a nice run: `npdgm train "
                   f"nice` cannot continue it (continue it with `npdgm train vae --resume {vae_run}`)"], err
