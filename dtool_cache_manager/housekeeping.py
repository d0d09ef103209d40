"""Automatic housekeeping: keep the cache under its limits with a detached background clean.

The post hook calls :func:`after_miss` on every cache miss (hits never pay for this).  It
decides from cached settings and one ``stat`` whether a clean is due, takes
``autoclean.lock`` without blocking, and starts ``python -m dtool_cache_manager.housekeeping``
in a new session, handing it the locked descriptor; the access then returns at once.  The
child measures the cache, cleans through the same plan and executor as ``dtool cache clean``
(so holds are respected), records the run in ``autoclean.log``, and exits, which releases
the lock.  The last line of the log is the last run's record: any member's run can append
to the log, while only the bookkeeping's owner may replace files there.

The size the hook compares with the limit is an estimate: the size the last run measured
plus what *this* process fetched since that run started.  Other processes' fetches are only
seen at the next measurement: when some process's estimate passes the limit, or at least
once a day while misses occur.  See ``docs/housekeeping.rst``.
"""

from __future__ import annotations

import argparse
import collections
import errno
import fcntl
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple, Union

from . import cachefs
from . import settings as settings_mod
from .cachefs import CacheDir
from .layout import DISABLE_ENV, current_identity
from .settings import HousekeepingSettings, SettingsError

logger = logging.getLogger(__name__)

LOW_WATER = 0.9  # an over-size cache is cleaned down to 90% of the limit, as ccache does
LOG_MAX_BYTES = 256 * 1024  # past this, the oldest half of autoclean.log is dropped
RECORD_VERSION = 1
CHILD_MODULE = "dtool_cache_manager.housekeeping"

# Why a run started: the size estimate passed the limit, a maximum age is set, nothing has
# been measured yet (or the last run failed), the last measurement is too old to trust, or
# someone ran it by hand.
SIZE, AGE, UNMEASURED, STALE, MANUAL = "size", "age", "unmeasured", "stale", "manual"
REMEASURE_SECONDS = 86400.0  # measure at least daily (while misses occur): see due()


# -- the record of one run -------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """One automatic clean, as logged.  Plain JSON: any group member can write these files,
    so they are parsed with type checks and never unpickled."""

    start: float  # unix time; the size was measured just after it
    end: float
    pid: int  # the process that cleaned
    user: str  # user@host of that process
    trigger: str  # SIZE, AGE, UNMEASURED, STALE or MANUAL
    triggered_by: Optional[int]  # pid whose cache miss started it; None when run by hand
    max_size_bytes: Optional[int]
    max_age_seconds: Optional[float]
    target_size_bytes: Optional[int]  # LOW_WATER of the limit; None without a size limit
    size_before_bytes: Optional[int]  # None if the run failed before measuring
    size_after_bytes: Optional[int]  # measured size minus what the run freed
    removed: int
    freed_bytes: int
    skipped_in_use: int  # files the rules chose but a live process held
    error: Optional[str]  # None: the run succeeded
    warnings: Tuple[str, ...] = ()
    version: int = RECORD_VERSION

    def to_json(self) -> dict:
        data = asdict(self)
        data["warnings"] = list(self.warnings)
        return data

    @classmethod
    def from_json(cls, data: object) -> Optional["RunRecord"]:
        """The record in ``data``, or None if any field is missing or of the wrong type."""
        if not isinstance(data, dict):
            return None
        values: Dict[str, Any] = {}  # each checked against _FIELD_TYPES below
        for f in fields(cls):
            value = data.get(f.name)
            if f.name == "warnings":
                if not isinstance(value, list) or not all(isinstance(w, str) for w in value):
                    return None
                value = tuple(value)
            elif not _has_type(value, _FIELD_TYPES[f.name]):
                return None
            values[f.name] = value
        return cls(**values)


_NUMBER, _INT, _STR = "number", "int", "str"
_FIELD_TYPES = {
    "start": (_NUMBER,), "end": (_NUMBER,), "pid": (_INT,), "user": (_STR,),
    "trigger": (_STR,), "triggered_by": (_INT, None), "max_size_bytes": (_INT, None),
    "max_age_seconds": (_NUMBER, None), "target_size_bytes": (_INT, None),
    "size_before_bytes": (_INT, None), "size_after_bytes": (_INT, None), "removed": (_INT,),
    "freed_bytes": (_INT,), "skipped_in_use": (_INT,), "error": (_STR, None),
    "version": (_INT,),
}


def _has_type(value: object, kinds: Tuple[Optional[str], ...]) -> bool:
    if value is None:
        return None in kinds
    if isinstance(value, bool):
        return False
    if _INT in kinds and isinstance(value, int):
        return True
    if _NUMBER in kinds and isinstance(value, (int, float)):
        return math.isfinite(value)
    return _STR in kinds and isinstance(value, str)


LOG_TAIL_BYTES = 64 * 1024  # where the last run's record is looked for


def read_last_run(cache: CacheDir) -> Optional[RunRecord]:
    """The last run's record: the last valid line of the log (read from its end, bounded),
    or None if there is none."""
    if cache.meta_fd is None:
        return None
    try:
        fd, st = cachefs.open_file(cache.meta_fd, cachefs.AUTOCLEAN_LOG)
    except OSError:
        return None
    try:
        start = max(0, st.st_size - LOG_TAIL_BYTES)
        tail = cachefs.read_at_most(fd, LOG_TAIL_BYTES, start)
    except OSError:
        return None
    finally:
        os.close(fd)
    for line in reversed(tail.split(b"\n")):
        try:
            record = RunRecord.from_json(json.loads(line))
        except (ValueError, RecursionError):
            continue
        if record is not None:
            return record
    return None


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


def target_size(max_size_bytes: int) -> int:
    """What an over-size cache is cleaned down to: the low-water mark, so that a cache that
    keeps growing is not cleaned again at the very next interval."""
    return int(max_size_bytes * LOW_WATER)


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
    _tallies.clear()
    _children.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


# -- the lock --------------------------------------------------------------------------


def try_lock(cache: CacheDir) -> Optional[int]:
    """A descriptor holding ``autoclean.lock`` exclusively, or None if a run holds it.
    (``flock`` needs only read access, so members open the owner's file read-only.)"""
    if cache.meta_fd is None:
        raise cachefs.Refused(errno.ENOENT, f"{cache.meta_path} is missing")
    fd, _ = cachefs.open_file(cache.meta_fd, cachefs.AUTOCLEAN_LOCK, single_link=True)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_holder(cache: CacheDir) -> Optional[Tuple[str, Optional[int]]]:
    """(user, pid) of the process holding ``autoclean.lock``, as the kernel says; None if
    nobody holds it.  A member could hold it for ever: ``summary`` names them."""
    if cache.meta_fd is None:
        return None
    try:
        fd, st = cachefs.open_file(cache.meta_fd, cachefs.AUTOCLEAN_LOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        pass
    except OSError:  # e.g. no locks on this file system: we cannot tell, so say no
        return None
    finally:
        os.close(fd)  # closing drops our test lock too
    pid = (cachefs.flock_holders([st]) or {}).get((st.st_dev, st.st_ino))
    return cachefs.user_name(cachefs.process_uid(pid) if pid else None), pid


# -- one run (in the child, or in the foreground for `dtool cache autoclean`) -----------


class Busy(RuntimeError):
    """Another automatic clean holds the lock."""


def run_now(cache_dir: str, settings: Optional[HousekeepingSettings] = None) -> RunRecord:
    """Run one automatic clean in this process, under the lock; :class:`Busy` if another
    one is running.  ``dtool cache autoclean`` uses this."""
    with cachefs.open_cache(cache_dir) as cache:
        fd = try_lock(cache)
        if fd is None:
            holder = lock_holder(cache)
            who = f" by {holder[0]} (pid {holder[1] or '?'})" if holder else ""
            raise Busy(f"an automatic clean of {cache_dir} is already running{who}")
    try:
        return run_clean(cache_dir, MANUAL, settings=settings)
    finally:
        os.close(fd)


def run_clean(cache_dir: str, trigger: str, triggered_by: Optional[int] = None,
              settings: Optional[HousekeepingSettings] = None) -> RunRecord:
    """Measure, clean if over a limit, and record the run.  The caller holds the lock.

    Every failure ends up in the record (and so in the log), never raised.
    """
    start = time.time()
    identity = current_identity()
    outcome, error = _Outcome(), None
    with _CapturedWarnings() as captured:
        try:
            settings = settings or settings_mod.load()
            _measure_and_clean(cache_dir, settings, outcome)
        except Exception as exc:  # noqa: BLE001 - recorded, not lost
            error = f"{type(exc).__name__}: {exc}"
    record = RunRecord(
        start=start, end=time.time(), pid=identity.pid, user=identity.user_at_host,
        trigger=trigger, triggered_by=triggered_by,
        max_size_bytes=settings.max_size_bytes if settings else None,
        max_age_seconds=settings.max_age_seconds if settings else None,
        target_size_bytes=outcome.target, size_before_bytes=outcome.size_before,
        size_after_bytes=outcome.size_after, removed=outcome.removed,
        freed_bytes=outcome.freed, skipped_in_use=outcome.skipped_in_use, error=error,
        warnings=tuple(captured.messages))
    _save(cache_dir, record)
    return record


@dataclass
class _Outcome:
    size_before: Optional[int] = None
    size_after: Optional[int] = None
    target: Optional[int] = None
    removed: int = 0
    freed: int = 0
    skipped_in_use: int = 0


def _measure_and_clean(cache_dir: str, settings: HousekeepingSettings,
                       outcome: _Outcome) -> None:
    """Expire what is older than the maximum age, then, if still over the size limit, remove
    the least recently used down to the low-water mark.  The two limits are independent:
    either may remove a file (one Rules with both would AND them).  ``outcome`` is filled
    as it goes, so a failure half-way still records what was done.  The ledger is opened,
    and the journals folded, once for the whole run."""
    from . import report
    from .store.ledger import open_ledger
    from .policies import Rules

    with open_ledger(cache_dir) as ledger:
        outcome.size_before = outcome.size_after = report.summary_of(
            report.refreshed(ledger)).total_size_bytes
        if settings.max_age_seconds is not None:
            _clean(ledger, Rules(older_than_seconds=settings.max_age_seconds), outcome)
        if settings.max_size_bytes is not None:
            outcome.target = target_size(settings.max_size_bytes)
            if outcome.size_after > settings.max_size_bytes:
                _clean(ledger, Rules(retain_size_bytes=outcome.target), outcome)


def _clean(ledger, rules, outcome: _Outcome) -> None:
    """One pass through the path ``dtool cache clean`` takes: plan, then execute."""
    from . import planning

    result = planning.plan_in(ledger, rules, now=time.time()).execute(ledger)
    outcome.removed += len(result.removed)
    outcome.freed += result.freed_bytes
    outcome.skipped_in_use += sum(1 for o in result.skipped if o.holders)
    assert outcome.size_after is not None  # _measure_and_clean measured it before any pass
    outcome.size_after -= result.freed_bytes


class _CapturedWarnings(logging.Handler):
    """Our loggers' warnings during a run, kept for the record (the child has no stderr)."""

    LIMIT = 20

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: List[str] = []
        self._logger = logging.getLogger("dtool_cache_manager")

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.messages) < self.LIMIT:
            self.messages.append(record.getMessage())

    def __enter__(self) -> "_CapturedWarnings":
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self._logger.removeHandler(self)


def _save(cache_dir: str, record: RunRecord) -> None:
    """Append to the log, under the lock, so nobody else writes it meanwhile."""
    line = (json.dumps(record.to_json(), sort_keys=True) + "\n").encode()
    try:
        with cachefs.open_cache(cache_dir, create=False) as cache:
            _append_log(cache, line)
    except OSError as exc:
        logger.warning("dtool-cache-manager: could not record the automatic clean in %s "
                       "(%s)", os.path.join(cache_dir, cachefs.AUTOCLEAN_LOG), exc)


def _append_log(cache: CacheDir, line: bytes) -> None:
    """One line at the end of the log (a file with one name, never through a link); the
    bookkeeping's owner keeps it short by dropping its older half."""
    if cache.meta_fd is None:
        raise cachefs.Refused(errno.ENOENT, f"{cache.meta_path} is missing")
    fd, _ = cachefs.open_file(cache.meta_fd, cachefs.AUTOCLEAN_LOG, os.O_WRONLY | os.O_APPEND,
                              single_link=True)
    try:
        os.write(fd, line)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if size > LOG_MAX_BYTES and cache.can_write_meta:
        _shorten_log(cache)


def _shorten_log(cache: CacheDir) -> None:
    assert cache.meta_fd is not None
    fd, st = cachefs.open_file(cache.meta_fd, cachefs.AUTOCLEAN_LOG)
    try:
        data = cachefs.read_at_most(fd, LOG_MAX_BYTES // 2, max(0, st.st_size - LOG_MAX_BYTES // 2))
    finally:
        os.close(fd)
    kept = data[data.find(b"\n") + 1:]  # from the first whole line
    tmp = f"{cachefs.AUTOCLEAN_LOG}.new-{os.getpid()}"
    out = cachefs.create_file(cache.meta_fd, tmp, cache.infra_mode)
    try:
        os.write(out, kept)
    finally:
        os.close(out)
    cachefs.rename_entry(cache.meta_fd, tmp, cachefs.AUTOCLEAN_LOG)


# -- status ----------------------------------------------------------------------------


@dataclass(frozen=True)
class AutocleanStatus:
    """What ``dtool cache summary`` shows about housekeeping."""

    settings: Optional[HousekeepingSettings]  # None when a setting is malformed
    settings_error: Optional[str]
    last_run: Optional[RunRecord]
    holder: Optional[Tuple[str, Optional[int]]]  # (user, pid) holding autoclean.lock

    @property
    def running(self) -> bool:
        return self.holder is not None


def status(cache_dir: str, settings: Optional[HousekeepingSettings] = None,
           error: Optional[str] = None) -> AutocleanStatus:
    """The settings in effect (read now unless given), the last run and who runs one now.
    Creates nothing."""
    if settings is None and error is None:
        try:
            settings = settings_mod.load()
        except SettingsError as exc:
            error = str(exc)
    try:
        cache = cachefs.open_cache(cache_dir, create=False)
    except OSError:
        return AutocleanStatus(settings, error, None, None)
    with cache:
        return AutocleanStatus(settings, error, read_last_run(cache), lock_holder(cache))


# -- the detached child ----------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dtool_cache_manager.housekeeping``: one run.  Started by the hook with the
    lock already held (``--lock-fd``); by hand, it takes the lock itself."""
    parser = argparse.ArgumentParser(prog=f"python -m {CHILD_MODULE}")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--trigger", default=MANUAL)
    parser.add_argument("--triggered-by", type=int, default=None)
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="inherited descriptor that already holds autoclean.lock")
    args = parser.parse_args(argv)
    cache_dir = os.path.abspath(args.cache_dir)
    from .privileges import work_as_cache_owner

    work_as_cache_owner(cache_dir)  # as root: the cache owner's rights, never more
    if args.lock_fd is None:
        try:
            record = run_now(cache_dir)
        except Busy:
            return 0
    else:
        fcntl.flock(args.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op check
        record = run_clean(cache_dir, args.trigger, args.triggered_by)
    return 0 if record.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
