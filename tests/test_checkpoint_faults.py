"""Crafted checkpoints (issue 12): every one ends in a CheckpointError naming the file, before the model
is built when the manifest itself is wrong, and as one `npdgm: error:` line from the CLI."""
import json

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
