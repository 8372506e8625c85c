"""What an installed npdgm promises: its runtime dependencies, the files its wheel and sdist carry, README links
that work on a package index, and an import that leaves the environment of child processes alone."""
import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _third_party_imports():
    """Top-level modules imported anywhere in npdgm/ (at module level or inside functions)."""
    names = set()
    for d, _, files in os.walk(os.path.join(ROOT, "npdgm")):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(d, f)) as fh:
                    tree = ast.parse(fh.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Import):
                        names.update(a.name.split(".")[0] for a in node.names)
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"npdgm"}


def test_runtime_dependencies_are_numpy_matplotlib_tqdm_and_everything_else_is_an_extra():
    meta = _pyproject()["project"]
    deps = {re.split(r"[<>=!~; \[]", d)[0] for d in meta["dependencies"]}
    assert deps == {"numpy", "matplotlib", "tqdm"}
    extras = meta["optional-dependencies"]
    assert {"gpu-cuda12", "gpu-cuda13", "fast", "numba", "mpi", "torch", "docs", "test", "dev",
            "tensorboard"} <= set(extras)
    assert "gpu" not in extras  # one CUDA major per extra, named
    assert any(d.startswith("cupy-cuda12x") for d in extras["gpu-cuda12"])
    assert any(d.startswith("cupy-cuda13x") for d in extras["gpu-cuda13"])
    assert any(d.startswith("scikit-learn") for d in extras["test"])
    # every third-party module npdgm imports is a dependency or an extra (imported lazily, guarded)
    provided = {"numpy", "matplotlib", "tqdm", "cupy", "torch", "threadpoolctl", "numexpr", "numba", "mpi4py",
                "pooch", "platformdirs", "tensorboard", "tensorboardX", "onnx"}
    assert {"onnx", "onnxruntime"} <= {re.split(r"[<>=!~; \[]", d)[0] for d in extras["export"]}
    assert _third_party_imports() <= provided, _third_party_imports() - provided
    assert "scipy" not in _third_party_imports()


def test_classifiers_license_and_urls():
    meta = _pyproject()["project"]
    versions = {c.rsplit(":: ", 1)[1] for c in meta["classifiers"] if re.search(r"Python :: 3\.\d+$", c)}
    assert versions == {"3.10", "3.11", "3.12", "3.13"}
    assert meta["requires-python"] == ">=3.10"
    assert meta["license"] == "MIT" and "LICENSE" in meta["license-files"]
    assert "Copyright (c) 2026 the npdgm authors" in open(os.path.join(ROOT, "LICENSE")).read()
    assert set(meta["urls"]) >= {"Homepage", "Source", "Issues", "Documentation"}


def test_bundled_mnist_notice_ships_with_the_data():
    import npdgm.bundled

    here = os.path.dirname(npdgm.bundled.__file__)
    notice = open(os.path.join(here, "NOTICE.md")).read()
    for phrase in ("Yann LeCun", "Corinna Cortes", "CC BY-SA 3.0", "mnist_subset.npz"):
        assert phrase in notice, phrase
    cfg = _pyproject()["tool"]["setuptools"]
    assert "NOTICE.md" in cfg["package-data"]["npdgm.bundled"] and "*.npz" in cfg["package-data"]["npdgm.bundled"]
    assert "npdgm/bundled/NOTICE.md" in _pyproject()["project"]["license-files"]


def test_sdist_manifest_carries_what_the_tests_read():
    text = open(os.path.join(ROOT, "MANIFEST.in")).read()
    for d in ("tests", "docs", "benchmarks", "examples", "npdgm"):
        assert re.search(rf"^graft {d}$", text, re.M), d


def test_readme_links_are_absolute():
    """The README is the package's long description: a relative link is dead on a package index."""
    text = open(os.path.join(ROOT, "README.md")).read()
    home = _pyproject()["project"]["urls"]["Source"]
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        assert re.match(r"https?://|#", target), f"README.md: relative link {target}"
        m = re.match(re.escape(home) + r"/(?:blob|tree)/main/([^#]+)", target)
        if m:  # a link into this repository names a file that exists
            assert os.path.exists(os.path.join(ROOT, m.group(1))), f"README.md: {target} names no file"


_SEEN_AT_NUMPY_IMPORT = r"""
import os, sys
class Spy:
    seen = "unset"
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and Spy.seen == "unset":
            Spy.seen = os.environ.get("OPENBLAS_THREAD_TIMEOUT")
        return None
sys.meta_path.insert(0, Spy())
{first}
import npdgm
print(Spy.seen, os.environ.get("OPENBLAS_THREAD_TIMEOUT"))
"""


@pytest.mark.parametrize("preset, first, want", [
    (None, "", "None None"),             # import npdgm has no process-wide side effect (issue 25)
    ("20", "", "20 20"),                 # a user's value is theirs
    (None, "import numpy", "None None"),
])
def test_import_npdgm_leaves_openblas_thread_timeout_alone(preset, first, want):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    code = _SEEN_AT_NUMPY_IMPORT.replace("{first}", first)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want


def test_the_dynamic_version_is_read_from_its_own_module():
    """pyproject reads the version from npdgm/_version.py (the module io.py and cli.py import), not the facade."""
    import npdgm
    from npdgm import _version

    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "npdgm._version.__version__"}
    assert npdgm.__version__ == _version.__version__
