"""docs/ cannot rot silently: every page's "Check it" commands name gradcheck entries, test files, -k
selections and reference directories that exist, and every relative link resolves.

A documented test command whose files all need an optional extra (``pytest.importorskip("torch")`` at the top
of every file, as ``tests/mirror/``) must still name files that exist, but whether it selects a test is
checked only where that extra is installed: on a bare ``pip install -e ".[dev]"`` it skips them all."""
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(f for f in os.listdir(DOCS) if f.endswith(".md"))
TOPICS = ["linear-and-activations.md", "bce-from-logits.md", "gaussian-likelihoods.md", "elbo.md",
          "reparameterization.md", "kl-closed-form.md", "iwae-logsumexp.md", "change-of-variables.md",
          "coupling-layers.md", "inverse-backward.md", "adam.md", "checkpoints.md"]
NO_GRADCHECK = {"adam.md", "checkpoints.md"}  # nothing to differentiate: checked by tests and reference vectors


def _read(page):
    with open(os.path.join(DOCS, page)) as f:
        return f.read()


def _commands(text):
    """Shell lines inside fenced code blocks that are not python."""
    out = []
    for lang, body in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang == "python" or lang == "json":
            continue
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def _check_it(text):
    m = re.search(r"^## Check it\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return _commands(m.group(1)) if m else []


def _gradcheck_names():
    from npdgm import checks, gradcheck, models  # noqa: F401  (as `npdgm gradcheck` does)

    return list(gradcheck.CHECKS)


def test_index_lists_every_topic_page():
    index = _read("README.md")
    assert set(TOPICS) <= set(PAGES)
    for page in TOPICS:
        assert f"]({page})" in index, f"docs/README.md does not link {page}"


@pytest.mark.parametrize("page", PAGES)
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", _read(page)):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = os.path.normpath(os.path.join(DOCS, target.split("#")[0]))
        assert os.path.exists(path), f"{page}: broken link {target}"


@pytest.mark.parametrize("page", TOPICS)
def test_every_topic_page_has_a_check_it_section_that_names_real_checks(page):
    cmds = _check_it(_read(page))
    assert cmds, f"{page} has no '## Check it' section with commands"
    known = _gradcheck_names()
    n_gradcheck = 0
    for words in cmds:
        if words[:2] == ["npdgm", "gradcheck"]:
            assert "--only" in words, f"{page}: {' '.join(words)} should name its checks with --only"
            names = words[words.index("--only") + 1:]
            assert names
            for name in names:
                assert any(name in k for k in known), f"{page}: no gradcheck entry matches {name!r}"
            n_gradcheck += 1
    if page not in NO_GRADCHECK:
        assert n_gradcheck, f"{page} shows no `npdgm gradcheck --only ...` command"


def _pytest_commands():
    for page in PAGES:
        for words in _commands(_read(page)):
            if words[:3] == ["python", "-m", "pytest"]:
                yield page, words[3:]


MODULE_SKIP = re.compile(r"^(?:\w+\s*=\s*)?pytest\.importorskip\(\s*[\"']([\w.]+)[\"']", re.M)


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package is missing
        return False


def _extras_needed(path):
    """Modules without which every test under ``path`` (a file or a folder) skips at import: the
    module-level ``pytest.importorskip`` calls its test files all share."""
    full = os.path.join(ROOT, path)
    files = [full] if os.path.isfile(full) else glob.glob(os.path.join(full, "**", "test_*.py"), recursive=True)
    needs = None
    for f in files:
        with open(f) as fh:
            mods = set(MODULE_SKIP.findall(fh.read()))
        needs = mods if needs is None else needs & mods
    return needs or set()


def _runnable(paths, installed=_installed):
    """The documented test paths whose optional extras are installed here."""
    return [p for p in paths if all(installed(m) for m in _extras_needed(p))]


def test_extras_of_documented_test_paths():
    assert _extras_needed("tests/mirror/") == {"torch"}
    assert _extras_needed("tests/mirror/test_port_example.py") == {"torch"}
    assert _extras_needed("tests/test_vae.py") == set()          # only some of its tests need torch
    paths = ["tests/test_vae.py", "tests/mirror/test_mirror_vae.py"]
    assert _runnable(paths, installed=lambda m: m != "torch") == ["tests/test_vae.py"]
    assert _runnable(paths, installed=lambda m: True) == paths


def test_every_pytest_command_names_existing_files_and_selects_tests():
    runs, files = [], set()
    for page, args in _pytest_commands():
        paths = [a for a in args if a.startswith("tests/")]
        assert paths, f"{page}: pytest command without a test path: {args}"
        for p in paths:
            assert os.path.exists(os.path.join(ROOT, p)), f"{page}: {p} does not exist"
        paths = _runnable(paths)  # a command for an extra that is not installed here selects nothing: fine
        if not paths:
            continue
        files.update(paths)
        k = args[args.index("-k") + 1] if "-k" in args else None
        runs.append((page, paths, k))
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "", *sorted(files)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert ids, out.stdout + out.stderr
    for page, paths, k in runs:
        selected = [i for i in ids if any(i.startswith(p.rstrip("/")) for p in paths)]
        if k:
            expr = re.sub(r"[\w\-\[\]=.,]+", lambda m: m.group(0) if m.group(0) in ("and", "or", "not")
                          else f"({m.group(0).lower()!r} in i.lower())", k)
            selected = [i for i in selected if eval(expr, {"i": i})]  # noqa: S307 (our own docs)
        assert selected, f"{page}: `pytest {' '.join(paths)} -k {k!r}` selects no test"


def test_every_check_reference_directory_exists():
    for page in PAGES:
        for words in _commands(_read(page)):
            if words[:2] == ["npdgm", "check-reference"]:
                assert os.path.exists(os.path.join(ROOT, words[2], "manifest.json")), (page, words)


def test_checkpoint_page_states_the_layout_conventions():
    text = _read("checkpoints.md")
    for phrase in ("(in, out)", "C (row-major) order", "offset", "numpy.load", "torch", "opt/m.0"):
        assert phrase in text, phrase
