"""Reference vectors: deterministic export, check passes on npdgm and fails on a wrong tensor.

tests/reference/kernels-f64 was written by ``npdgm export-reference`` and is committed: checking
it guards every kernel's numbers against silent change (regenerate it only on purpose)."""
import json
import os

import numpy as np

from npdgm import cli
from npdgm.reference import check_reference, export_reference

COMMITTED = os.path.join(os.path.dirname(__file__), "reference", "kernels-f64")


def test_committed_reference_still_matches():
    rows = check_reference(COMMITTED)
    assert len(rows) >= 30 and all(ok for *_, ok in rows), [r for r in rows if not r[3]]


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
