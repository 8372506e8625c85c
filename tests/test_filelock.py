"""npdgm._filelock: the one exclusive lock behind RUNDIR/.lock (commands.common.lock_run) and the data cache's
NAME/.lock (data.download): flock on POSIX, msvcrt.locking on Windows, no lock where neither exists."""
import errno
import threading
import time

import pytest

from npdgm import _filelock


def test_a_held_lock_is_refused_then_free_once_closed(tmp_path):
    path = str(tmp_path / ".lock")
    first = _filelock.try_lock(path)
    assert first is not None and _filelock.try_lock(path) is None   # two opens exclude each other
    first.close()
    second = _filelock.try_lock(path)
    assert second is not None
    second.close()


def test_wait_lock_says_once_that_it_waits_and_gets_the_lock_when_released(tmp_path):
    path = str(tmp_path / ".lock")
    held, told = _filelock.try_lock(path), []
    threading.Timer(0.3, held.close).start()
    t0 = time.monotonic()
    with _filelock.wait_lock(path, on_wait=lambda: told.append(1), poll=0.02):
        assert time.monotonic() - t0 >= 0.25 and told == [1]


class _FakeMsvcrt:
    """msvcrt.locking's contract: LK_NBLCK raises OSError (EACCES) when another handle holds the byte."""
    LK_NBLCK = 2

    def __init__(self, held):
        self.held, self.calls = held, []

    def locking(self, fd, mode, nbytes):
        self.calls.append((mode, nbytes))
        if self.held:
            raise OSError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("held", [False, True])
def test_without_fcntl_msvcrt_locks_the_first_byte(tmp_path, monkeypatch, held):
    fake = _FakeMsvcrt(held)
    monkeypatch.setattr(_filelock, "fcntl", None)
    monkeypatch.setattr(_filelock, "msvcrt", fake)
    f = _filelock.try_lock(str(tmp_path / ".lock"))
    assert fake.calls == [(fake.LK_NBLCK, 1)] and (f is None) == held
    f and f.close()


def test_with_neither_the_file_is_opened_unlocked(tmp_path, monkeypatch):
    monkeypatch.setattr(_filelock, "fcntl", None)
    monkeypatch.setattr(_filelock, "msvcrt", None)
    with _filelock.try_lock(str(tmp_path / ".lock")) as f:
        assert not f.closed
