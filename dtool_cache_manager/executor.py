"""The executor: the only code that deletes cached files.

It removes a file only when it can prove nobody uses it: under the item's exclusive gate it
checks for live holders, checks that the path is a regular file inside the cache directory,
then unlinks.  When in doubt it keeps the file and says why.  A clean is planned first (a
:class:`CleanPlan` reports ``expected_freed_bytes`` before :meth:`CleanPlan.execute`, as in
huggingface_hub's delete strategies), so a dry run shows exactly what the real run does.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

from .holds import Holder, exclusive_gate, holders_of
from .layout import MetaPaths, is_item_relpath
from .ledger import ItemRow, Ledger

logger = logging.getLogger(__name__)

STALE_PARTIAL_SECONDS = 3600.0  # a '*.tmp' untouched this long is no download in progress


@dataclass(frozen=True)
class RemovalOutcome:
    """What happened to one item."""

    relpath: str
    removed: bool
    freed_bytes: int = 0
    holders: Tuple[Holder, ...] = ()
    reason: str = ""


def is_inside(cache_dir: str, relpath: str) -> bool:
    """True if ``relpath`` can name a cached item: a relative path with no '..', no NUL,
    not in our bookkeeping directory, and no symlinked directory leading out of the cache.

    Ledger rows come from journals any member can write, so every path is checked here
    before anything is read or removed.
    """
    return is_item_relpath(relpath) and _inside(cache_dir, os.path.join(cache_dir, relpath))


def _inside(cache_dir: str, abspath: str) -> bool:
    """True if ``abspath``'s directory really is inside the cache (symlinks resolved)."""
    real_cache = os.path.realpath(cache_dir)
    real_parent = os.path.realpath(os.path.dirname(abspath))
    return real_parent == real_cache or real_parent.startswith(real_cache + os.sep)


def _unlink_checked(paths: MetaPaths, relpath: str, identifier: str, holders_fn,
                    on_removed: Callable[[], None]) -> RemovalOutcome:
    """Check and unlink under the item's exclusive gate; ``on_removed`` updates the ledger."""
    abspath = os.path.join(paths.cache_dir, relpath)
    if not is_inside(paths.cache_dir, relpath):
        return RemovalOutcome(relpath, False, reason="path is outside the cache directory")
    with exclusive_gate(paths, identifier):
        holders = holders_fn()
        if holders:
            return RemovalOutcome(relpath, False, holders=tuple(holders), reason="in use")
        try:
            st = os.lstat(abspath)
        except FileNotFoundError:
            _record(on_removed, relpath)
            return RemovalOutcome(relpath, False, reason="already gone from disk")
        if not stat.S_ISREG(st.st_mode):
            return RemovalOutcome(relpath, False, reason="not a regular file")
        os.unlink(abspath)
        _record(on_removed, relpath)
    return RemovalOutcome(relpath, True, freed_bytes=st.st_size)


def _record(on_removed: Callable[[], None], relpath: str) -> None:
    """Update the ledger after an unlink; if it cannot be written (disk full), the file is
    still gone and the next reconcile drops its row."""
    try:
        on_removed()
    except sqlite3.Error as exc:
        logger.warning("dtool-cache-manager: removed %s but could not update the ledger (%s); "
                       "the next run reconciles it", relpath, exc)


def remove_item(ledger: Ledger, row: ItemRow, uri: Optional[str] = None) -> RemovalOutcome:
    """Remove ``row``'s file and ledger entry unless a live process holds it.

    The holds, not the ledger, decide: with a read-only view of the ledger (a full disk) the
    file still goes, and the next reconcile drops its row.
    """
    paths = ledger.paths
    return _unlink_checked(
        paths, row.relpath, row.identifier,
        lambda: holders_of(paths, row.identifier, uuid=row.uuid, uri=uri, relpath=row.relpath),
        lambda: ledger.forget([row.relpath]))


def remove_untracked(paths: MetaPaths, relpath: str) -> RemovalOutcome:
    """Remove a file no hook has seen; any hold on its identifier keeps it (we cannot tell
    which dataset it belongs to, so we err towards keeping)."""
    identifier = os.path.basename(relpath)[:40]
    return _unlink_checked(paths, relpath, identifier,
                           lambda: holders_of(paths, identifier), lambda: None)


def forget_if_vanished(ledger: Ledger, row: ItemRow) -> bool:
    """Reconcile: drop the row of a file deleted or moved behind our back.

    Done under the gate, and not while anyone holds the item (it may be fetching it again).
    A row whose path leads outside the cache cannot be ours: it is dropped at once.
    """
    paths = ledger.paths
    if not is_inside(paths.cache_dir, row.relpath):
        logger.warning("dtool-cache-manager: dropping a ledger row whose path leaves the cache: "
                       "%r", row.relpath)
        ledger.forget([row.relpath])
        return True
    with exclusive_gate(paths, row.identifier):
        if os.path.lexists(os.path.join(paths.cache_dir, row.relpath)):
            return False
        if holders_of(paths, row.identifier, uuid=row.uuid, relpath=row.relpath):
            return False
        ledger.forget([row.relpath])
    return True


# -- cleaning -------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRemoval:
    relpath: str
    size_bytes: int
    row: Optional[ItemRow]  # None: untracked


@dataclass(frozen=True)
class CleanResult:
    removed: Tuple[RemovalOutcome, ...]
    skipped: Tuple[RemovalOutcome, ...]  # in use (with holders) or refused (with reason)

    @property
    def freed_bytes(self) -> int:
        return sum(o.freed_bytes for o in self.removed)


@dataclass(frozen=True)
class CleanPlan:
    """What a clean will do; nothing happens until :meth:`execute`."""

    paths: MetaPaths
    removals: Tuple[PlannedRemoval, ...]
    skipped_in_use: Tuple[Tuple[str, Tuple[Holder, ...]], ...]
    stale_partials: Tuple[PlannedRemoval, ...]
    skipped_entries: Tuple[Tuple[str, str], ...] = ()  # (path, why) never considered

    @property
    def expected_freed_bytes(self) -> int:
        return sum(r.size_bytes for r in self.removals + self.stale_partials)

    def execute(self, ledger: Ledger,
                progress: Optional[Callable[[PlannedRemoval], None]] = None) -> CleanResult:
        removed, skipped = [], []
        for planned in self.removals + self.stale_partials:
            try:
                outcome = self._remove(ledger, planned)
            except OSError as exc:  # e.g. permission denied in a shared cache: keep going
                outcome = RemovalOutcome(planned.relpath, False, reason=str(exc))
            (removed if outcome.removed else skipped).append(outcome)
            if progress is not None:
                progress(planned)
        skipped += [RemovalOutcome(relpath, False, holders=holders, reason="in use")
                    for relpath, holders in self.skipped_in_use]
        return CleanResult(tuple(removed), tuple(skipped))

    def _remove(self, ledger: Ledger, planned: PlannedRemoval) -> RemovalOutcome:
        if planned.row is not None:
            return remove_item(ledger, planned.row)
        if planned in self.stale_partials:
            return _remove_stale_partial(self.paths, planned.relpath)
        return remove_untracked(self.paths, planned.relpath)


def _remove_stale_partial(paths: MetaPaths, relpath: str) -> RemovalOutcome:
    """A leftover download; re-checked so a download that resumed is left alone."""
    abspath = os.path.join(paths.cache_dir, relpath)
    if not is_inside(paths.cache_dir, relpath):
        return RemovalOutcome(relpath, False, reason="path is outside the cache directory")
    try:
        st = os.lstat(abspath)
    except FileNotFoundError:
        return RemovalOutcome(relpath, False, reason="already gone from disk")
    if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < STALE_PARTIAL_SECONDS:
        return RemovalOutcome(relpath, False, reason="download in progress")
    os.unlink(abspath)
    return RemovalOutcome(relpath, True, freed_bytes=st.st_size)
