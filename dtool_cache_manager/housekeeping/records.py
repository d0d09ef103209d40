"""The records of automatic housekeeping, in the cache's bookkeeping directory:
``autoclean.log`` (one JSON record per run; the last valid line is the last run),
``autoclean.lock`` (held by the run in progress, released by the kernel when it ends), and
the status ``dtool cache summary`` shows.  Any member's run appends to the log; only the
bookkeeping's owner replaces files there, so every line is parsed with type checks.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

from ..facilities import fcntl
from .. import cachefs
from ..cachefs import CacheDir
from . import settings as settings_mod
from .settings import HousekeepingSettings, SettingsError

logger = logging.getLogger(__name__)

LOG_MAX_BYTES = 256 * 1024  # past this, the oldest half of autoclean.log is dropped
RECORD_VERSION = 1

# Why a run started: the size estimate passed the limit, a maximum age is set, nothing has
# been measured yet (or the last run failed), the last measurement is too old to trust, or
# someone ran it by hand.
SIZE, AGE, UNMEASURED, STALE, MANUAL = "size", "age", "unmeasured", "stale", "manual"


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


# -- the log ---------------------------------------------------------------------------


def save(cache_dir: str, record: RunRecord) -> None:
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
    cachefs.replace_file(cache.meta_fd, cachefs.AUTOCLEAN_LOG, kept, cache.infra_mode)


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
