"""The API reference: pdoc renders every public module of npdgm from its docstrings, offline
(`python -m pdoc npdgm -o docs/api`, see docs/api.md). Skipped where pdoc is not installed."""
import importlib
import pkgutil

import pytest

import npdgm


def public_modules():
    return sorted(m.name for m in pkgutil.walk_packages(npdgm.__path__, "npdgm.")
                  if not any(part.startswith("_") for part in m.name.split(".")))


def test_api_reference_has_a_page_per_public_module(tmp_path):
    pdoc = pytest.importorskip("pdoc")
    pdoc.render.configure(docformat="google")
    pdoc.pdoc("npdgm", output_directory=tmp_path)
    for name in public_modules():
        page = tmp_path.joinpath(*name.split(".")).with_suffix(".html")
        assert page.exists(), (f"no API page for {name}: pdoc skips a submodule that its package's __all__ "
                               f"does not list; add it there")
        doc = importlib.import_module(name).__doc__
        assert doc and doc.strip(), f"{name} has no module docstring to render"
    assert "hand-written" in (tmp_path / "npdgm.html").read_text()
