"""Per-key locks as single bytes of one lock file (POSIX record locks via ``fcntl.lockf``).

One file serves millions of keys without creating a file per item, the kernel drops a dead
process's locks at once, and an uncontended lock costs one syscall.  POSIX record locks belong
to the process, not the thread, so a per-key ``threading.Lock`` serialises threads first.

Any member of a shared cache may lock bytes of these files too, and could keep one locked
for ever.  So a wait is never unbounded: a lock is retried with a growing pause until
:data:`PATIENCE` seconds have passed, then :class:`GateBusy` says so and the caller goes on
without it (an access holds anyway; a removal keeps the file).
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
import time
from contextlib import contextmanager
from typing import (TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Sequence, Set,
                    Tuple)

from .facilities import fcntl
from . import cachefs

if TYPE_CHECKING:
    from .cachefs import CacheDir

_OFFSET_BITS = 62
PATIENCE = 30.0  # seconds a lock is waited for; legitimate holders keep one for milliseconds


class GateBusy(OSError):
    """A lock another process kept locked longer than we wait."""


def key_offset(key: str) -> int:
    """A stable byte offset for ``key``; collisions only make two keys share a lock."""
    digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - _OFFSET_BITS)


class RangeLockFile:
    """Shared/exclusive locks on one byte per key of an open lock file."""

    def __init__(self, fd: int):
        self._fd = fd
        self._thread_locks: Dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def _thread_lock(self, offset: int) -> threading.Lock:
        with self._guard:
            lock = self._thread_locks.get(offset)
            if lock is None:
                lock = self._thread_locks[offset] = threading.Lock()
            return lock

    def _lock(self, offset: int, mode: int, deadline: float, patience: float = 0.0,
              progress: Optional[Callable[[], object]] = None) -> bool:
        """Lock one byte, waiting until ``deadline`` (monotonic) at most; a ``progress``
        whose value changes moves the deadline ``patience`` seconds on."""
        pause = 0.001
        seen = progress() if progress is not None else None
        while True:
            try:
                fcntl.lockf(self._fd, mode | fcntl.LOCK_NB, 1, offset)
                return True
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            now = time.monotonic()
            if progress is not None:
                current = progress()
                if current != seen:
                    seen, deadline = current, now + patience
            if now >= deadline:
                return False
            time.sleep(min(pause, deadline - now))  # backing off, not synchronising
            pause = min(pause * 2, 0.1)

    @contextmanager
    def locked(self, key: str, exclusive: bool, patience: float = PATIENCE,
               progress: Optional[Callable[[], object]] = None) -> Iterator[None]:
        """Hold the lock for ``key``; :class:`GateBusy` if another process keeps it past
        ``patience`` seconds (counted from the last change of ``progress()``, if given)."""
        offset = key_offset(key)
        with self._thread_lock(offset):
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            if not self._lock(offset, mode, time.monotonic() + patience, patience, progress):
                raise GateBusy(errno.EAGAIN, f"lock {key!r} is kept by another process")
            try:
                yield
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)

    @contextmanager
    def locked_many(self, keys: Sequence[str], exclusive: bool,
                    patience: float = PATIENCE) -> Iterator[Set[str]]:
        """Hold the locks of ``keys`` at once, taken in offset order so that two processes
        locking overlapping sets cannot deadlock.  Yields the keys whose lock could not be
        had within ``patience`` (one deadline for all)."""
        offsets: Dict[int, List[str]] = {}
        for key in keys:
            offsets.setdefault(key_offset(key), []).append(key)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + patience
        taken: List[Tuple[int, threading.Lock]] = []
        busy: Set[str] = set()
        try:
            for offset in sorted(offsets):
                thread_lock = self._thread_lock(offset)
                thread_lock.acquire()
                try:
                    got = self._lock(offset, mode, deadline)
                except BaseException:
                    thread_lock.release()
                    raise
                if got:
                    taken.append((offset, thread_lock))
                else:
                    thread_lock.release()
                    busy.update(offsets[offset])
            yield busy
        finally:
            for offset, thread_lock in reversed(taken):
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, offset)
                thread_lock.release()


_OPEN: Dict[Tuple[int, str, str], RangeLockFile] = {}
_OPEN_GUARD = threading.Lock()


def open_range_lock(cache: "CacheDir", name: str) -> RangeLockFile:
    """The process's one handle on the lock file ``name`` of ``cache``'s bookkeeping.

    Closing *any* descriptor of a file drops *all* of the process's record locks on it, so
    each lock file is opened once per process and never closed.  Opened without following
    links, and only as a regular file with a single name.
    """
    key = (os.getpid(), cache.path, name)
    with _OPEN_GUARD:
        handle = _OPEN.get(key)
        if handle is None:
            if cache.meta_fd is None:
                raise cachefs.Refused(errno.ENOENT, f"{cache.meta_path} is missing")
            fd, _ = cachefs.open_file(cache.meta_fd, name, os.O_RDWR, single_link=True)
            handle = _OPEN[key] = RangeLockFile(fd)
        return handle
