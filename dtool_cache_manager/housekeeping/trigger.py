"""The trigger, in the user's process: after each cache miss, decide from cached settings
and one ``stat`` whether an automatic clean is due, and if so start one, detached, holding
the lock.  Never raises and never waits: the user's access comes first.

The size compared with the limit is an estimate: the size the last run measured plus what
*this* process fetched since that run started.  Other processes' fetches are only seen at
the next measurement: when some process's estimate passes the limit, or at least once a
day while misses occur.  See ``docs/housekeeping.rst``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import subprocess
import sys
import time
from typing import Deque, Dict, List, Optional, Tuple, Union

from .. import cachefs
from ..cachefs import CacheDir
from ..facilities import after_fork_in_child
from ..layout import DISABLE_ENV
from . import settings as settings_mod
from .records import (AGE, SIZE, STALE, UNMEASURED, RunRecord, read_last_run, try_lock)
from .settings import HousekeepingSettings, SettingsError

logger = logging.getLogger(__name__)

CHILD_MODULE = "dtool_cache_manager.housekeeping"  # run with -m: see __main__.py
REMEASURE_SECONDS = 86400.0  # measure at least daily (while misses occur): see due()


# -- the decision (pure) ---------------------------------------------------------------


def due(settings: HousekeepingSettings, last: Optional[RunRecord], fetched_since: int,
        now: float) -> Optional[str]:
    """Why an automatic clean should start now, or None: a limit is set, no run started
    within the interval, and the size estimate is over the limit, or a maximum age is set,
    or nothing has been measured yet, or the last measurement is over a day old (the
    estimate misses other processes' fetches, which many small fetchers could add up).
    A last run in the future (clock skew) does not block."""
    if not settings.limits_set:
        return None
    elapsed = None if last is None else now - last.start
    if elapsed is not None and 0 <= elapsed < settings.interval_seconds:
        return None
    if last is None or last.size_after_bytes is None:
        return UNMEASURED
    if settings.max_size_bytes is not None and \
            last.size_after_bytes + fetched_since > settings.max_size_bytes:
        return SIZE
    if settings.max_age_seconds is not None:
        return AGE
    assert elapsed is not None  # last is not None here, so elapsed was computed
    if not 0 <= elapsed < REMEASURE_SECONDS:
        return STALE
    return None


# -- the hook side (in the user's process) ---------------------------------------------


class _Tally:
    """What this process knows about one cache: its own fetches since the last run it has
    seen, and when it last started a run."""

    MAX_BUCKETS = 4096

    def __init__(self) -> None:
        self.fetches: Deque[List[int]] = collections.deque()  # [second, bytes], oldest first
        self.fetched_bytes = 0
        self.last_spawn = -math.inf
        self.state_key: Optional[Tuple[int, int, int]] = None
        self.last_run: Optional[RunRecord] = None

    def add(self, when: float, size_bytes: int) -> None:
        second = math.floor(when)
        if self.fetches and self.fetches[-1][0] == second:
            self.fetches[-1][1] += size_bytes
        else:
            self.fetches.append([second, size_bytes])
            if len(self.fetches) > self.MAX_BUCKETS:  # merge the two oldest: counts them as
                oldest = self.fetches.popleft()       # newer, so never underestimates
                self.fetches[0][1] += oldest[1]
        self.fetched_bytes += size_bytes

    def observe(self, cache: CacheDir, force: bool = False) -> Optional[RunRecord]:
        """The last run; the log is read again only when its stat changes."""
        key = _stat_key(cache)
        if force or key != self.state_key:
            self.state_key = key
            self.last_run = read_last_run(cache) if key is not None else None
            if self.last_run is not None:
                self._forget_before(self.last_run.start)
        return self.last_run

    def _forget_before(self, start: float) -> None:
        # A fetch in the second the run started may or may not have been measured: keep it.
        while self.fetches and self.fetches[0][0] < math.floor(start):
            self.fetched_bytes -= self.fetches.popleft()[1]


_tallies: Dict[str, _Tally] = {}
_children: List[subprocess.Popen] = []
_SettingsOrError = Union[HousekeepingSettings, SettingsError]
_settings_cache: Optional[Tuple[tuple, _SettingsOrError]] = None  # (fingerprint, the outcome)
_warned: set = set()


def after_miss(cache_dir: str, size_bytes: int) -> None:
    """Called by the post hook after a cache miss; may start a background clean.

    Never raises and never waits: the user's access comes first.
    """
    try:
        if not _FORK_HOOKS and os.getpid() != _pid:
            _forget_after_fork()
        settings = _hook_settings()
        if settings is None or not settings.limits_set:
            return
        _reap_children()
        now = time.time()
        tally = _tallies.get(cache_dir) or _tallies.setdefault(cache_dir, _Tally())
        tally.add(now, size_bytes)
        if now - tally.last_spawn < settings.interval_seconds:
            return  # this process started one within the interval: not even a stat
        cache = cachefs.handle_for(cache_dir)
        reason = due(settings, tally.observe(cache), tally.fetched_bytes, now)
        if reason is not None:
            _start_background(cache, settings, tally, now)
    except Exception as exc:  # noqa: BLE001
        _warn_once(f"automatic housekeeping failed ({exc!r}); item access continues")


def _hook_settings() -> Optional[HousekeepingSettings]:
    """The settings, parsed again only when the environment or the config file changed; a
    malformed value switches housekeeping off with one warning per process."""
    global _settings_cache
    path = settings_mod.config_path()
    fingerprint = (path, _file_key(path), tuple(os.environ.get(k) for k in settings_mod.KEYS))
    cached = _settings_cache
    if cached is None or cached[0] != fingerprint:
        try:
            result: _SettingsOrError = settings_mod.load(path=path)
        except SettingsError as exc:
            result = exc
        cached = _settings_cache = (fingerprint, result)
    if isinstance(cached[1], SettingsError):
        _warn_once(f"automatic housekeeping is off: {cached[1]}")
        return None
    return cached[1]


def _start_background(cache: CacheDir, settings: HousekeepingSettings, tally: _Tally,
                      now: float) -> None:
    fd = try_lock(cache)
    if fd is None:
        return  # a run is in progress
    try:
        # Another process may have finished a run between our look and the lock.
        reason = due(settings, tally.observe(cache, force=True), tally.fetched_bytes, now)
        if reason is None:
            return
        tally.last_spawn = now  # also when spawning fails: do not retry at every miss
        env = dict(os.environ)
        env[DISABLE_ENV] = "1"
        child = subprocess.Popen(
            [sys.executable, "-m", CHILD_MODULE, "--cache-dir", cache.path,
             "--trigger", reason, "--triggered-by", str(os.getpid()), "--lock-fd", str(fd)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(fd,), start_new_session=True, env=env,
            cwd=os.sep)  # not the user's directory: `-m` puts it first on sys.path
        _children.append(child)  # reaped without waiting at a later miss (no zombies pile up)
    finally:
        os.close(fd)  # the child's copy keeps the lock


def _reap_children() -> None:
    if _children:
        _children[:] = [child for child in _children if child.poll() is None]


def _file_key(path: str) -> Optional[Tuple[int, int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _stat_key(cache: CacheDir) -> Optional[Tuple[int, int, int]]:
    st = cachefs.entry_stat(cache.meta_fd, cachefs.AUTOCLEAN_LOG) \
        if cache.meta_fd is not None else None
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("dtool-cache-manager: %s", message)


def _forget_after_fork() -> None:
    # A forked child has fetched nothing yet and started no run.
    global _pid
    _pid = os.getpid()
    _tallies.clear()
    _children.clear()


_pid = os.getpid()
_FORK_HOOKS = after_fork_in_child(_forget_after_fork)  # else after_miss compares pids
