"""The Markdown API reference in docs/api/ is what ``python docs/make_api.py`` writes from today's docstrings
(it reads the sources with ``ast``: no optional package is needed, and the pages are the same everywhere)."""
import importlib.util
import os

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
API = os.path.join(ROOT, "docs", "api")


@pytest.fixture(scope="module")
def make_api():
    spec = importlib.util.spec_from_file_location("make_api", os.path.join(ROOT, "docs", "make_api.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_api_pages_are_up_to_date(make_api):
    pages = make_api.render()
    committed = {f for f in os.listdir(API) if f.endswith(".md")}
    stale = sorted(f for f, text in pages.items() if f not in committed or
                   open(os.path.join(API, f), encoding="utf-8").read() != text)
    extra = sorted(committed - set(pages))
    assert not stale and not extra, (f"docs/api is stale ({', '.join(stale + extra)[:300]}): "
                                     f"run `python docs/make_api.py` and commit docs/api/")


def test_every_public_module_has_a_page_with_its_functions(make_api):
    pages = make_api.render()
    assert "npdgm.kernels.linear.md" in pages and "npdgm.models.vae.md" in pages
    linear = pages["npdgm.kernels.linear.md"]
    assert "### `linear_backward(dy, x, W, need_dx=True)`" in linear
    assert "dW = x.T @ dy" in linear                            # the docstring's math, verbatim
    vae = pages["npdgm.models.vae.md"]
    assert "### class `VAE(" in vae and "#### `VAE.loss_and_grad(x," in vae   # methods, without self
    for name in pages:
        if name != "README.md":
            assert f"]({name})" in pages["README.md"], f"the index does not link {name}"


def test_private_names_are_left_out(make_api, tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "_hidden").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A package."""\n')
    (pkg / "_hidden" / "__init__.py").write_text("")
    (pkg / "_private.py").write_text("")
    (pkg / "mod.py").write_text('"""M."""\ndef f(a, *, b=2):\n    """F."""\ndef _g():\n    pass\n'
                                'class C:\n    def __init__(self, n):\n        """C."""\n'
                                '    def _h(self):\n        pass\n')
    mods = make_api.public_modules(str(pkg))
    assert list(mods) == ["pkg", "pkg.mod"]
    page = make_api.module_page("pkg.mod", mods["pkg.mod"])
    assert "### `f(a, *, b=2)`" in page and "### class `C(n)`" in page and "_g" not in page and "_h" not in page
