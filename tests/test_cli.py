import subprocess
import sys

import npdgm
from npdgm import cli


def test_gradcheck_command_all_pass(capsys):
    assert cli.main(["gradcheck", "--only", "kernel."]) == 0
    out = capsys.readouterr().out
    assert "kernel.bernoulli_nll:logits" in out and "FAIL" not in out and " 0 failed" in out


def test_gradcheck_unknown_filter(capsys):
    assert cli.main(["gradcheck", "--only", "no-such-check"]) == 2


def test_python_dash_m_works_like_the_script():
    r = subprocess.run([sys.executable, "-m", "npdgm", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "gradcheck" in r.stdout and "train" in r.stdout


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend numpy" in out and "glibc malloc keeps freed memory:" in out and "OPENBLAS_THREAD_TIMEOUT:" in out
