"""Per-key locks as single bytes of one lock file (POSIX record locks via ``fcntl.lockf``).

One file serves millions of keys without creating a file per item, the kernel drops a dead
process's locks at once, and an uncontended lock costs one syscall.  POSIX record locks belong
to the process, not the thread, so a per-key ``threading.Lock`` serialises threads first.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
from contextlib import contextmanager
from typing import Dict, Iterator, Tuple

from .layout import share_file

_OFFSET_BITS = 62


def key_offset(key: str) -> int:
    """A stable byte offset for ``key``; collisions only make two keys share a lock."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _OFFSET_BITS)


class RangeLockFile:
    """Shared/exclusive locks on one byte per key of ``path``."""

    def __init__(self, path: str, shared: bool = False):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        share_file(self._fd, shared)
        self._thread_locks: Dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def _thread_lock(self, offset: int) -> threading.Lock:
        with self._guard:
            lock = self._thread_locks.get(offset)
            if lock is None:
                lock = self._thread_locks[offset] = threading.Lock()
            return lock

    @contextmanager
    def locked(self, key: str, exclusive: bool) -> Iterator[None]:
        """Hold the lock for ``key``; blocks while another process holds a conflicting one."""
        offset = key_offset(key)
        with self._thread_lock(offset):
            fcntl.lockf(self._fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, 1, offset)
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)

    @contextmanager
    def locked_many(self, keys, exclusive: bool) -> Iterator[None]:
        """Hold the locks of all ``keys`` at once, taken in offset order so that two
        processes locking overlapping sets cannot deadlock."""
        offsets = sorted({key_offset(k) for k in keys})
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        taken = []
        try:
            for offset in offsets:
                thread_lock = self._thread_lock(offset)
                thread_lock.acquire()
                try:
                    fcntl.lockf(self._fd, mode, 1, offset)
                except BaseException:
                    thread_lock.release()
                    raise
                taken.append((offset, thread_lock))
            yield
        finally:
            for offset, thread_lock in reversed(taken):
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
                thread_lock.release()


_OPEN: Dict[Tuple[int, str], RangeLockFile] = {}
_OPEN_GUARD = threading.Lock()


def open_range_lock(path: str, shared: bool = False) -> RangeLockFile:
    """The process's one handle on ``path``.

    Closing *any* descriptor of a file drops *all* of the process's record locks on it, so
    each lock file is opened once per process and never closed.
    """
    key = (os.getpid(), path)
    with _OPEN_GUARD:
        handle = _OPEN.get(key)
        if handle is None:
            handle = _OPEN[key] = RangeLockFile(path, shared)
        return handle
