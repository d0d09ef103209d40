"""One automatic clean: measure the cache, expire and trim it through the same plan and
executor as ``dtool cache clean`` (so holds are respected), and record the run.  It runs in
the detached child the trigger starts (``python -m dtool_cache_manager.housekeeping``), or
in the foreground for ``dtool cache autoclean``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import List, Optional

from .. import cachefs
from ..layout import current_identity
from . import settings as settings_mod
from .records import MANUAL, RunRecord, lock_holder, save, try_lock
from .settings import HousekeepingSettings

LOW_WATER = 0.9  # an over-size cache is cleaned down to 90% of the limit, as ccache does


def target_size(max_size_bytes: int) -> int:
    """What an over-size cache is cleaned down to: the low-water mark, so that a cache that
    keeps growing is not cleaned again at the very next interval."""
    return int(max_size_bytes * LOW_WATER)


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
    save(cache_dir, record)
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
    from .. import report
    from ..policies import Rules
    from ..store.ledger import open_ledger

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
    from .. import planning

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
