"""npdgm export --format safetensors and npdgm.load of .safetensors: the round trip, the file read by the
safetensors library into the PyTorch mirror (same outputs), and crafted files refused before any tensor is read."""
import json
import os
import sys

import numpy as np
import pytest

import npdgm
from npdgm import cli
from npdgm.io import CheckpointError, load_safetensors, model_to_safetensors
from npdgm.models.vae import VAE


def _vae(**kw):
    m = VAE(**{"x_dim": 12, "hidden": (9,), "z_dim": 3, "seed": 2, **kw})
    m.flat_params[...] += np.random.default_rng(0).standard_normal(m.flat_params.shape).astype(m.dtype) * 0.2
    return m


def test_round_trip_and_cli(tmp_path, capsys):
    m = _vae(likelihood="gaussian")
    m.save(tmp_path / "m.npz")
    assert cli.main(["export", str(tmp_path / "m.npz"), str(tmp_path / "m.safetensors")]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'm.safetensors'}: vae, 9 tensors")
    back = npdgm.load(tmp_path / "m.safetensors")
    assert back.config == m.config and back.kind == "vae"
    np.testing.assert_array_equal(back.flat_params, m.flat_params)
    tensors, meta = load_safetensors(tmp_path / "m.safetensors")
    assert list(tensors) == [n for n, *_ in m.layout()] and tensors["encoder.0.W"].shape == (12, 9)
    assert json.loads(meta["npdgm"])["layout"] == [[n, list(s), o] for n, s, o in m.layout()]
    model_to_safetensors(m, tmp_path / "again.safetensors")     # deterministic bytes
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "m.safetensors").read_bytes()
    assert cli.main(["export", str(tmp_path / "m.npz"), str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_the_safetensors_library_reads_it_into_the_torch_mirror(tmp_path):
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, safe_open

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "mirror"))
    from npdgm.bench import torch_models as M

    m = _vae()
    path = tmp_path / "m.safetensors"
    model_to_safetensors(m, path)
    P = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        cfg = json.loads(f.metadata()["npdgm"])["config"]
    rng = np.random.default_rng(1)
    x, eps = rng.random((5, 12)).astype(np.float32), rng.standard_normal((1, 5, 3)).astype(np.float32)
    _, terms = m.loss(x, eps)
    t = M.vae_terms(P, cfg, torch.from_numpy(x), torch.from_numpy(eps))
    for k in ("loss", "recon", "kl"):
        np.testing.assert_allclose(float(terms[k]), float(t[k]), rtol=1e-6)


def _craft(path, header, data=b"", n=None):
    text = json.dumps(header).encode()
    path.write_bytes((len(text) if n is None else n).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header, data, n, msg", [
    ({}, b"", 1 << 40, "header length 1099511627776 does not fit the file"),
    (None, b"", None, "header is not JSON"),
    ([1, 2], b"", None, "header is a list"),
    ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs dtype F32/F64"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "needs dtype F32/F64"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, None, "do not follow on at 0"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, None, "do not follow on"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4 + b"x" * 10 ** 6, None,
     "the tensors hold 4 bytes but the file has 1000004"),
    ({"__metadata__": {"npdgm": 3}}, b"", None, "must map names to strings"),
])
def test_crafted_files_are_refused_naming_the_file(tmp_path, header, data, n, msg):
    p = tmp_path / "x.safetensors"
    if header is None:
        p.write_bytes((5).to_bytes(8, "little") + b"{nope")
    else:
        _craft(p, header, data, n)
    with pytest.raises(CheckpointError, match=msg) as e:
        npdgm.load(p)
    assert str(e.value).startswith(str(p))


def test_foreign_or_mismatched_tensors_are_refused(tmp_path):
    m = _vae()
    p = tmp_path / "m.safetensors"
    model_to_safetensors(m, p)
    tensors, meta = load_safetensors(p)
    from npdgm.io import save_safetensors

    save_safetensors(p, tensors, {})                                    # no manifest
    with pytest.raises(CheckpointError, match="without npdgm's manifest"):
        npdgm.load(p)
    save_safetensors(p, {**tensors, "extra": np.zeros(3, np.float32)}, meta)
    with pytest.raises(CheckpointError, match=r"tensors \['extra'\] are not parameters"):
        npdgm.load(p)
    save_safetensors(p, {**tensors, "encoder.0.W": np.zeros((12, 8), np.float32)}, meta)
    with pytest.raises(CheckpointError, match="shape"):
        npdgm.load(p)
    bad = json.loads(meta["npdgm"])
    bad["config"]["hidden"] = [10 ** 12]
    save_safetensors(p, tensors, {"npdgm": json.dumps(bad)})
    with pytest.raises(CheckpointError, match="does not fit the stored parameters"):
        npdgm.load(p)
    with pytest.raises(TypeError, match="float32 / float64"):
        save_safetensors(p, {"a": np.zeros(2, np.int64)}, {})


def test_onnx_without_the_onnx_package_is_one_line(tmp_path, capsys, monkeypatch):
    """Runs in the bare venv too: --format onnx names the extra to install, no traceback, writes nothing."""
    monkeypatch.setitem(sys.modules, "onnx", None)          # `import onnx` now raises ImportError
    _vae().save(tmp_path / "m.npz")
    assert cli.main(["export", str(tmp_path / "m.npz"), str(tmp_path / "out"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install 'npdgm[export]'" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
