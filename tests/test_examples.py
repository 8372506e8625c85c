"""The examples fail with one line that says what to install, never a bare traceback."""
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

HIDE_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = [sys.argv[1]]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")


def test_port_to_torch_without_torch_names_the_extra():
    script = os.path.join(ROOT, "examples", "port_to_torch.py")
    r = subprocess.run([sys.executable, "-c", HIDE_TORCH, script], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr  # one line, no traceback
    assert 'pip install "npdgm[torch]"' in r.stderr
