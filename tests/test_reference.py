"""Reference vectors: deterministic export, check passes on npdgm and fails on a wrong tensor.

tests/reference/kernels-f64 was written by ``npdgm export-reference`` and is committed: checking
it guards every kernel's numbers against silent change (regenerate it only on purpose). It holds one
case per entry of the kernel table (npdgm/kernels/table.py) and adam_step; a new table entry is added
to it as a new case (``export_reference(tmp, names=[...])``, then its .npz and manifest entry copied
in), leaving the stored cases as they are."""
import json
import os

import numpy as np

from npdgm import cli
from npdgm.reference import check_reference, export_reference

COMMITTED = os.path.join(os.path.dirname(__file__), "reference", "kernels-f64")


def test_committed_reference_still_matches():
    rows = check_reference(COMMITTED)
    assert len(rows) >= 30 and all(ok for *_, ok in rows), [r for r in rows if not r[3]]


def test_committed_set_holds_every_kernel_table_entry_with_the_makers_inputs(tmp_path):
    from npdgm.reference import KERNEL_CASES

    with open(os.path.join(COMMITTED, "manifest.json")) as f:
        stored = json.load(f)["cases"]
    assert sorted(stored) == KERNEL_CASES
    # the makers are frozen: a fresh export draws the committed inputs. Some makers pass their draws through
    # exp / softmax / cumsum, whose last bit depends on the CPU's SIMD kernels, so the committed file (made on
    # another machine) is matched to a few ulps, not bit for bit; a changed maker moves them far more.
    export_reference(tmp_path, names=KERNEL_CASES)
    for name in KERNEL_CASES:
        with np.load(os.path.join(COMMITTED, f"{name}.npz")) as a, np.load(tmp_path / f"{name}.npz") as b:
            assert sorted(a.files) == sorted(b.files), name
            for key in (k for k in a.files if k.startswith("input/")):
                assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{name}:{key}"
                np.testing.assert_allclose(b[key], a[key], rtol=1e-13, atol=1e-15, err_msg=f"{name}:{key}")


def test_export_is_deterministic_and_documented(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    export_reference(a, seed=3, names=["linear", "adam_step"])
    export_reference(b, seed=3, names=["linear", "adam_step"])
    for f in ("linear.npz", "adam_step.npz", "manifest.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    m = json.loads((a / "manifest.json").read_text())
    t = m["cases"]["linear"]["tensors"]
    assert t["input/W"] == {"shape": [5, 3], "dtype": "float64"} and "dx = dy @ W.T" in m["cases"]["linear"]["formula"]


def test_check_detects_a_wrong_tensor(tmp_path, capsys):
    export_reference(tmp_path, names=["tanh"])
    p = tmp_path / "tanh.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["grad/x"] = arrays["grad/x"] + 1e-6
    np.savez(p, **arrays)
    assert cli.main(["check-reference", str(tmp_path)]) == 1
    assert "tanh:grad/x" in capsys.readouterr().out


def test_float32_export_checks_within_its_tolerance(tmp_path):
    export_reference(tmp_path, dtype="float32", names=["softplus", "bernoulli_nll"])
    assert all(ok for *_, ok in check_reference(tmp_path))


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["check-reference", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


# -- broken reference directories (issue 12): one clear error naming the file ----------------------
import pytest  # noqa: E402

from npdgm.reference import ReferenceFileError  # noqa: E402


def _one_line_error(capsys, argv):
    assert cli.main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("npdgm: error: "), cap.err
    return err[0]


@pytest.fixture
def refdir(tmp_path):
    export_reference(tmp_path / "ref", names=["tanh", "linear"])
    return tmp_path / "ref"


@pytest.mark.parametrize("text, msg", [
    ('{"cases": {', "not a readable JSON manifest"),
    ("", "not a readable JSON manifest"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ("{}", "missing key(s) ['dtype', 'tolerance', 'cases']"),
    ('{"dtype": "float64", "tolerance": 1e-10, "cases": {}}', "lists no cases"),
    ('{"dtype": "float16", "tolerance": 1e-10, "cases": {"tanh": {"file": "tanh.npz"}}}', "dtype 'float16'"),
    ('{"dtype": "float64", "tolerance": "x", "cases": {"tanh": {"file": "tanh.npz"}}}', "tolerance must be"),
    ('{"dtype": "float64", "tolerance": 1e-10, "cases": {"tanh": {}}}', "case 'tanh' has no \"file\" entry"),
    ('{"dtype": "float64", "tolerance": 1e-10, "cases": {"tanh": {"file": "../tanh.npz"}}}', "must be a file name"),
])
def test_broken_manifest_is_one_error_naming_it(refdir, capsys, text, msg):
    path = refdir / "manifest.json"
    path.write_text(text)
    with pytest.raises(ReferenceFileError) as e:
        check_reference(refdir)
    assert str(e.value).startswith(f"{path}: ") and msg in str(e.value)
    assert msg in _one_line_error(capsys, ["check-reference", str(refdir)])


def test_truncated_missing_and_incomplete_case_files(refdir, capsys):
    npz = refdir / "tanh.npz"
    full = npz.read_bytes()
    npz.write_bytes(full[: len(full) // 2])
    line = _one_line_error(capsys, ["check-reference", str(refdir)])
    assert line.startswith(f"npdgm: error: {npz}: not a readable .npz (corrupt or truncated")
    npz.unlink()
    assert _one_line_error(capsys, ["check-reference", str(refdir)]) == (
        f"npdgm: error: {npz}: missing (listed for case 'tanh' in manifest.json)")
    # a tensor the manifest lists is absent from the file
    export_reference(refdir, names=["tanh", "linear"])
    with np.load(refdir / "linear.npz") as z:
        arrays = {k: z[k] for k in z.files if k != "grad/W"}
    np.savez(refdir / "linear.npz", **arrays)
    assert _one_line_error(capsys, ["check-reference", str(refdir)]) == (
        f"npdgm: error: {refdir / 'linear.npz'}: missing tensor(s) ['grad/W'] listed in manifest.json")
    # an input is absent and the manifest does not list tensors: the case names it
    del arrays["input/b"]
    np.savez(refdir / "linear.npz", **arrays)
    m = json.loads((refdir / "manifest.json").read_text())
    del m["cases"]["linear"]["tensors"]
    (refdir / "manifest.json").write_text(json.dumps(m))
    assert "case 'linear' needs the tensor input/b, which the file lacks" in _one_line_error(
        capsys, ["check-reference", str(refdir)])


def test_export_onto_a_file_or_unwritable_place(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("keep me")
    line = _one_line_error(capsys, ["export-reference", str(f)])
    assert line.startswith(f"npdgm: error: {f} is a file; export-reference writes a directory")
    assert f.read_text() == "keep me"
    # a directory below a regular file cannot be created (root ignores chmod, so not a read-only dir)
    line = _one_line_error(capsys, ["export-reference", str(f / "sub")])
    assert line.startswith(f"npdgm: error: {f / 'sub'}: cannot write the reference vectors (Not a directory")
    with pytest.raises(ReferenceFileError, match="cannot write the reference vectors"):
        export_reference(f / "sub", names=["tanh"])
    with pytest.raises(TypeError, match="seed must be a non-negative integer, got 1.5"):
        export_reference(tmp_path / "r", seed=1.5, names=["tanh"])


def test_crafted_model_case_is_refused_before_building(tmp_path, capsys, monkeypatch):
    export_reference(tmp_path, names=["vae_bernoulli"])
    p = tmp_path / "vae_bernoulli.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    desc = json.loads(arrays["input/model"].tobytes().decode())
    desc["config"]["hidden"] = [10 ** 12]
    arrays["input/model"] = np.frombuffer(json.dumps(desc).encode(), dtype=np.uint8)
    np.savez(p, **arrays)
    from npdgm.models.vae import VAE

    monkeypatch.setattr(VAE, "__init__", lambda *a, **k: pytest.fail("built the crafted model"))
    line = _one_line_error(capsys, ["check-reference", str(tmp_path)])
    assert line.startswith(f"npdgm: error: {p}: case 'vae_bernoulli' cannot run on the stored inputs")
    assert "config hidden[0]=1000000000000 does not fit the stored parameters" in line


def test_a_model_case_of_an_unknown_kind_is_one_error_line(tmp_path, capsys):
    """A reference file naming a model kind this npdgm lacks is bad input (one line), not a KeyError traceback."""
    export_reference(tmp_path, names=["vae_bernoulli"])
    p = tmp_path / "vae_bernoulli.npz"
    with np.load(p) as z:
        arrays = {k: z[k] for k in z.files}
    desc = json.loads(arrays["input/model"].tobytes().decode())
    desc["kind"] = "nosuch"
    arrays["input/model"] = np.frombuffer(json.dumps(desc).encode(), dtype=np.uint8)
    np.savez(p, **arrays)
    line = _one_line_error(capsys, ["check-reference", str(tmp_path)])
    assert line.startswith(f"npdgm: error: {p}: case 'vae_bernoulli' cannot run on the stored inputs")
    assert "model kind 'nosuch'" in line
