"""Exclusive advisory locks on a lock file, shared by the run directory (``RUNDIR/.lock``) and the data
cache (``CACHE/NAME/.lock``).

POSIX: ``fcntl.flock`` (held per open file, so two opens in one process exclude each other as well);
Windows: ``msvcrt.locking`` on the file's first byte. A platform with neither (WebAssembly builds of
Python, which run one process) gets the open file without a lock. The lock file itself is never deleted:
removing it while another process waits on it would let a third lock a new file of the same name.
"""
from __future__ import annotations

import errno
import time

try:
    import fcntl
except ImportError:  # Windows, WebAssembly
    fcntl = None
try:
    import msvcrt
except ImportError:  # every platform but Windows
    msvcrt = None


def _lock(f):
    """Take the lock on the open file ``f`` without waiting: True, or False when someone else holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        elif msvcrt is not None:
            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
    except (BlockingIOError, PermissionError):  # EAGAIN / EWOULDBLOCK (flock), EACCES (msvcrt)
        return False
    except OSError as e:
        if e.errno == getattr(errno, "EDEADLOCK", None):  # msvcrt, on some Windows versions
            return False
        raise
    return True


def try_lock(path):
    """The open lock file ``path``, locked by us (close it to release), or None when another holder has it."""
    f = open(path, "a+b")
    try:
        locked = _lock(f)
    except OSError:
        f.close()
        raise
    if locked:
        return f
    f.close()
    return None


def wait_lock(path, on_wait=None, poll=0.1):
    """The open lock file ``path``, locked by us; when another holder has it, call ``on_wait()`` once and
    poll every ``poll`` seconds until it is free (Ctrl-C stops the wait)."""
    f = open(path, "a+b")
    try:
        told = False
        while not _lock(f):
            if not told and on_wait is not None:
                on_wait()
            told = True
            time.sleep(poll)
    except BaseException:  # Ctrl-C while waiting
        f.close()
        raise
    return f
