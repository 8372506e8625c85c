"""Every ```python block of README.md and docs/*.md runs as pasted: alone, in a fresh interpreter, in an empty
directory, without warnings. A block that cannot run here (it needs a trained run or an extra) carries the
marker comment ``# not run by tests: <why>`` on its first line; SKIPPED keeps that list short and explicit."""
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
MARKER = "# not run by tests:"
SKIPPED = {("docs/checkpoints.md", 2),  # (page, block number): needs a trained run and torch
           ("docs/export.md", 1), ("docs/porting.md", 1), ("docs/porting.md", 2)}  # an exported run + extra


def python_blocks(text):
    """The bodies of the ```python fenced blocks of a Markdown text, in order."""
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


BLOCKS = [(page, i + 1, body) for page in PAGES
          for i, body in enumerate(python_blocks(open(os.path.join(ROOT, page)).read()))]


def test_python_blocks_are_found():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n"]
    assert sum(page == "README.md" for page, _, _ in BLOCKS) >= 3


def test_skip_markers_match_the_list():
    marked = {(page, n) for page, n, body in BLOCKS if body.startswith(MARKER)}
    assert marked == SKIPPED


@pytest.mark.parametrize("page,n,body", [b for b in BLOCKS if not b[2].startswith(MARKER)],
                         ids=[f"{p}#{n}" for p, n, b in BLOCKS if not b.startswith(MARKER)])
def test_python_block_runs_as_pasted(page, n, body, tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "PYTHONWARNINGS": "default", "MPLBACKEND": "Agg"}
    env.pop("NPDGM_BACKEND", None)
    r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"{page}, python block {n}:\n{body}\n{r.stderr}"
    assert "Warning" not in r.stderr, f"{page}, python block {n} warns:\n{r.stderr}"


TIME = re.compile(r"(?<![\w.^])\d+(?:\.\d+)?(?:\s?-\s?\d+(?:\.\d+)?)? ?(?:s|ms|min|minutes|seconds|hours?)\b(?![/\w])")
DATE = re.compile(r"\b20\d\d-\d\d-\d\d\b")


def undated_timings(text):
    """(section heading, [timings]) for every section (a Markdown heading to the next) that states a wall-clock
    time outside code and math but neither a date (YYYY-MM-DD, when it was measured) nor "not measured"."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\$\$.*?\$\$|\$[^$\n]*\$", "", text, flags=re.S)
    out = []
    for section in re.split(r"^(?=#{1,6} )", text, flags=re.M):
        times = TIME.findall(section)
        if times and not DATE.search(section) and "not measured" not in section:
            out.append((section.splitlines()[0], times))
    return out


def test_undated_timings_are_found():
    assert undated_timings("# A\ntrains in ~10-20 s on 2 cores\n# B\n2 ms (measured 2026-12-01)\n") == [
        ("# A", ["10-20 s"])]
    assert undated_timings("# A\n```\nsleep 5 s\n```\n$2 s \\theta$ and 3 bits/dim, 5 steps\n") == []


@pytest.mark.parametrize("page", PAGES)
def test_every_timing_is_dated(page):
    """A time a reader will compare with their own says when (and the section says on what) it was measured."""
    assert undated_timings(open(os.path.join(ROOT, page)).read()) == []
