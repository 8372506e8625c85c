"""What must work off Linux (the classifiers say "OS Independent"): the run-directory lock and atomic
writes. The Windows branches run here with a stand-in ``msvcrt`` and without ``os.fchmod`` (the lock's own
tests: tests/test_filelock.py)."""
import errno
import os
import pathlib
import sys
import types

import pytest

from npdgm import _filelock, io
from npdgm.commands import common

PKG = pathlib.Path(io.__file__).parent


class FakeMsvcrt(types.ModuleType):
    """``msvcrt.locking`` on byte ranges of a path: a second non-blocking lock of a byte fails with EACCES."""
    LK_NBLCK = 2

    def __init__(self):
        super().__init__("msvcrt")
        self.held, self.calls = set(), []

    def locking(self, fd, mode, nbytes):
        key = (os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?",
               os.lseek(fd, 0, os.SEEK_CUR), nbytes)
        self.calls.append((mode, key[1:]))
        if key in self.held:
            raise PermissionError(errno.EACCES, "Permission denied")
        self.held.add(key)


def test_lock_run_on_windows_says_another_process_uses_the_directory(tmp_path, monkeypatch):
    fake = FakeMsvcrt()
    monkeypatch.setattr(_filelock, "fcntl", None)
    monkeypatch.setattr(_filelock, "msvcrt", fake)
    try:
        common.lock_run(str(tmp_path))
        assert fake.calls == [(FakeMsvcrt.LK_NBLCK, (0, 1))]          # the first byte, without waiting
        with pytest.raises(ValueError, match=f"another npdgm process is using {tmp_path}"):
            common.lock_run(str(tmp_path))
    finally:
        common.release_locks()


def test_atomic_writes_without_fchmod(tmp_path, monkeypatch):
    """Windows before Python 3.13 has no os.fchmod: every checkpoint write raised AttributeError."""
    monkeypatch.delattr(os, "fchmod", raising=False)
    io.atomic_write_bytes(tmp_path / "a.bin", lambda f: f.write(b"abc"))
    assert (tmp_path / "a.bin").read_bytes() == b"abc"


def test_no_module_imports_a_posix_only_module_outside_the_lock():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if any(line.strip() in ("import fcntl", "import termios", "import resource")
                        for line in p.read_text().splitlines()) and p.name != "_filelock.py"]
    assert offenders == []


def test_peak_rss_without_proc_or_resource_is_none(monkeypatch):
    from npdgm.bench import harness

    monkeypatch.setattr(harness, "_proc_status_kb", lambda key: None)
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows
    assert harness.peak_rss_mb() is None
