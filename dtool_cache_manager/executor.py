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
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .holds import (Holder, by_identifier, exclusive_gate, exclusive_gates, holders_of,
                    holders_of_file, live_holds)
from .layout import MetaPaths, is_item_relpath
from .ledger import ItemRow, Ledger, RemovalRecorder, Removed

logger = logging.getLogger(__name__)

STALE_PARTIAL_SECONDS = 3600.0  # a '*.tmp' untouched this long is no download in progress
ALREADY_GONE = "already gone from disk"


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
    return _under(os.path.realpath(os.path.dirname(abspath)), os.path.realpath(cache_dir))


def _under(real: str, real_cache: str) -> bool:
    return real == real_cache or real.startswith(real_cache + os.sep)


def _record(on_removed: Callable[[], None], what: str) -> None:
    """Update the ledger after an unlink; if it cannot be written (disk full), the file is
    still gone and the next reconcile drops its row."""
    try:
        on_removed()
    except sqlite3.Error as exc:
        logger.warning("dtool-cache-manager: removed %s but could not update the ledger (%s); "
                       "the next run reconciles it", what, exc)


def remove_item(ledger: Ledger, row: ItemRow, uri: Optional[str] = None) -> RemovalOutcome:
    """Remove ``row``'s file and ledger entry unless a live process holds it.

    Checked and unlinked under the item's exclusive gate.  The holds, not the ledger,
    decide: with a read-only view of the ledger (a full disk) the file still goes, and the
    next reconcile drops its row.  The ledger is written after the gate is released, as a
    clean writes it (never wait for the ledger while holding a gate: a clean holds the
    ledger while it waits for gates).
    """
    paths, relpath = ledger.paths, row.relpath
    abspath = os.path.join(paths.cache_dir, relpath)
    if not is_inside(paths.cache_dir, relpath):
        return RemovalOutcome(relpath, False, reason="path is outside the cache directory")
    with exclusive_gate(paths, row.identifier):
        holders = holders_of(paths, row.identifier, uuid=row.uuid, uri=uri, relpath=relpath)
        if holders:
            return RemovalOutcome(relpath, False, holders=tuple(holders), reason="in use")
        try:
            st = os.lstat(abspath)
            if not stat.S_ISREG(st.st_mode):
                return RemovalOutcome(relpath, False, reason="not a regular file")
            os.unlink(abspath)
            outcome, ino = RemovalOutcome(relpath, True, freed_bytes=st.st_size), st.st_ino
        except FileNotFoundError:
            outcome, ino = RemovalOutcome(relpath, False, reason=ALREADY_GONE), None
        removed_at = time.time()
    _record(lambda: ledger.forget_removed([(relpath, removed_at, ino)]), relpath)
    return outcome


def forget_vanished(ledger: Ledger, rows: Sequence[ItemRow]) -> int:
    """Reconcile: drop the rows of files deleted or moved behind our back; returns how many.

    In batches, as a clean removes: under the items' gates and one snapshot of the holds, a
    row goes only if its path holds nothing and nobody holds the item (it may be fetching
    it again); the ledger is written after the gates are released.  A row whose path leads
    outside the cache cannot be ours: it is dropped at once.
    """
    paths = ledger.paths
    forgotten = 0
    for start in range(0, len(rows), BATCH_SIZE):
        batch = rows[start:start + BATCH_SIZE]
        gone: List[str] = []
        inside = []
        for row in batch:
            if is_inside(paths.cache_dir, row.relpath):
                inside.append(row)
            else:
                logger.warning("dtool-cache-manager: dropping a ledger row whose path leaves "
                               "the cache: %r", row.relpath)
                gone.append(row.relpath)
        with exclusive_gates(paths, {row.identifier for row in inside}):
            held = by_identifier(live_holds(paths))
            removed_at = time.time()
            gone += [row.relpath for row in inside
                     if not os.path.lexists(os.path.join(paths.cache_dir, row.relpath))
                     and not holders_of_file(held, row.identifier, row.uuid, row.relpath)]
        if gone:
            ledger.forget(gone, removed_at)  # whatever its rows claim
            forgotten += len(gone)
    return forgotten


# -- cleaning -------------------------------------------------------------------------

BATCH_SIZE = 512  # removals decided under one set of gates and one snapshot of the holds
# An unlink mostly waits for the filesystem: 100k take 21 s one at a time and 7-9 s four at
# a time here, when each thread works in directories of its own (unlinks in one directory
# wait for each other on its lock).  See CleanPlan.execute.
UNLINK_THREADS = 4


@dataclass(frozen=True)
class PlannedRemoval:
    relpath: str
    size_bytes: int
    identifier: Optional[str]
    uuid: Optional[str]  # None: untracked, so any hold on its identifier keeps it


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
        """Remove the planned files in path order, while the ledger drops the previous
        batch's rows (see :func:`remove_batch`).  Each batch takes a run of paths from each
        of :data:`UNLINK_THREADS` regions of the sorted list, one region per unlinking
        thread, so that the threads work in different directories and the ledger's rows
        are still dropped in a few runs of key order (a clean of 100k of a million items:
        17-21 s striped over the threads in one directory, 15-16 s this way)."""
        done: Dict[str, RemovalOutcome] = {}
        ordered = regions_interleaved(sorted(self.removals, key=lambda r: r.relpath),
                                      UNLINK_THREADS, BATCH_SIZE)
        with _LedgerUpdates(ledger) as updates, _Directories(self.paths.cache_dir) as folders, \
                ThreadPoolExecutor(UNLINK_THREADS, "dtool-cache-unlink") as pool:
            for start in range(0, len(ordered), BATCH_SIZE):
                batch = ordered[start:start + BATCH_SIZE]
                updates.ready()  # before the batch's gates: ledger first, then gates
                outcomes = remove_batch(self.paths, folders, pool, batch, updates.gone,
                                        meanwhile=updates.record_pending)
                for planned, outcome in zip(batch, outcomes):
                    done[planned.relpath] = outcome
                    if progress is not None:
                        progress(planned)
        removed, skipped = [], []
        for planned in self.removals:  # reported in the plan's order, as a dry run shows it
            outcome = done[planned.relpath]
            (removed if outcome.removed else skipped).append(outcome)
        for planned in self.stale_partials:
            try:
                outcome = _remove_stale_partial(self.paths, planned.relpath)
            except OSError as exc:
                outcome = RemovalOutcome(planned.relpath, False, reason=str(exc))
            (removed if outcome.removed else skipped).append(outcome)
            if progress is not None:
                progress(planned)
        skipped += [RemovalOutcome(relpath, False, holders=holders, reason="in use")
                    for relpath, holders in self.skipped_in_use]
        return CleanResult(tuple(removed), tuple(skipped))


def regions_interleaved(ordered: Sequence[PlannedRemoval], regions: int, batch_size: int
                        ) -> List[PlannedRemoval]:
    """``ordered`` cut into ``regions`` contiguous regions, then interleaved so that each
    run of ``batch_size`` holds an equal run from every region, in order."""
    per_region = max(1, -(-len(ordered) // regions))
    parts = [ordered[k:k + per_region] for k in range(0, len(ordered), per_region)]
    run = max(1, batch_size // max(1, len(parts)))
    return [planned for start in range(0, per_region, run) for part in parts
            for planned in part[start:start + run]]


class _LedgerUpdates:
    """The ledger side of a clean (:meth:`Ledger.recording_removals`): drops the rows of
    what is gone, a batch behind the unlinks, and commits as it goes and at the end, also
    when the clean is interrupted.  A ledger that cannot be written (disk full) is reported
    once and the clean goes on: the files are gone, and the next reconcile drops their
    rows."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.gone: List[Removed] = []  # filled by remove_batch
        self._recorded = 0
        self._recorder: Optional[RemovalRecorder] = None
        self._transaction = ExitStack()
        self._failed = False

    def __enter__(self) -> "_LedgerUpdates":
        try:
            self._recorder = self._transaction.enter_context(self.ledger.recording_removals())
        except sqlite3.Error as exc:
            self._give_up(exc)
        return self

    def ready(self) -> None:
        if self._recorder is not None:
            try:
                self._recorder.ready()
            except sqlite3.Error as exc:
                self._give_up(exc)

    def record_pending(self) -> None:
        pending, self._recorded = self.gone[self._recorded:], len(self.gone)
        if pending and self._recorder is not None:
            try:
                self._recorder.record(pending)
            except sqlite3.Error as exc:
                self._give_up(exc)

    def __exit__(self, *_) -> None:
        self.record_pending()
        try:
            self._transaction.close()  # commits
        except sqlite3.Error as exc:
            self._give_up(exc)

    def _give_up(self, exc: sqlite3.Error) -> None:
        if not self._failed:
            logger.warning("dtool-cache-manager: could not update the ledger after removing "
                           "files (%s); the next run reconciles it", exc)
        self._failed, self._recorder = True, None


class _Directories:
    """Open handles on the cache's directories, each checked once to lie inside the cache.

    Files are then examined and unlinked relative to the handle (``dir_fd``), so a directory
    swapped for a symbolic link after the check still cannot lead a removal outside the
    cache, and no removal pays for resolving its whole path again.
    """

    KEEP_OPEN = 128  # between batches; a batch may open up to BATCH_SIZE more

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.real_cache = os.path.realpath(cache_dir)
        self._fds: Dict[str, Optional[int]] = {}

    def fd(self, folder: str) -> Optional[int]:
        """A handle on ``folder`` (relative), or None if it is not a directory inside.
        It stays open until :meth:`trim`, so unlinks in flight can use it."""
        if folder in self._fds:
            return self._fds[folder]
        try:
            fd = os.open(os.path.join(self.cache_dir, folder),
                         os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            fd = None
        if fd is not None and not self._really_inside(fd, folder):
            os.close(fd)
            fd = None
        self._fds[folder] = fd
        return fd

    def trim(self) -> None:
        """Between batches: close the least recently opened handles beyond KEEP_OPEN."""
        for folder in list(self._fds)[:max(0, len(self._fds) - self.KEEP_OPEN)]:
            fd = self._fds.pop(folder)
            if fd is not None:
                os.close(fd)

    def _really_inside(self, fd: int, folder: str) -> bool:
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # no /proc: the resolved path must be the directory we opened
            real = os.path.realpath(os.path.join(self.cache_dir, folder))
            opened, found = os.fstat(fd), os.stat(real)
            if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
                return False
        return _under(real, self.real_cache)

    def close(self) -> None:
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "_Directories":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def remove_batch(paths: MetaPaths, folders: _Directories, pool: ThreadPoolExecutor,
                 batch: Sequence[PlannedRemoval], gone: List[Removed],
                 meanwhile: Callable[[], None] = lambda: None) -> List[RemovalOutcome]:
    """Remove a batch of files, each unless a live process holds it; appends what is gone
    from disk to ``gone`` as (relpath, removed_at, inode) for the ledger.

    The same proof as :func:`remove_item`, paid once per batch: every item's exclusive gate
    is taken (in a fixed order, so two cleaners cannot deadlock), then the holds are read
    once; a hold taken after that read waits at its gate until the batch is done, and its
    access then finds the file gone and fetches it again.  The unlinks run on ``pool``
    (an unlink mostly waits for the filesystem, so a few at once take a third of the time)
    while this thread runs ``meanwhile``: the ledger update of the previous batch.  That
    update comes after the gates were released: an access after the removal is journalled
    later than ``removed_at``, so its row is kept (see :meth:`Ledger.recording_removals`).
    """
    folders.trim()  # no unlink is in flight now
    outcomes: List[Optional[RemovalOutcome]] = [None] * len(batch)
    todo = []
    for n, planned in enumerate(batch):
        folder = os.path.dirname(planned.relpath)
        dir_fd = folders.fd(folder) if is_item_relpath(planned.relpath) else None
        if dir_fd is None:
            outcomes[n] = RemovalOutcome(planned.relpath, False,
                                         reason="path is outside the cache directory")
        else:
            todo.append((n, dir_fd))
    with exclusive_gates(paths, {_gate_identifier(batch[n]) for n, _ in todo}):
        held = by_identifier(live_holds(paths))
        free = []
        for n, dir_fd in todo:
            holders = holders_of_file(held, _gate_identifier(batch[n]), batch[n].uuid,
                                      batch[n].relpath)
            if holders:
                outcomes[n] = RemovalOutcome(batch[n].relpath, False, holders=holders,
                                             reason="in use")
            else:
                free.append((n, dir_fd))
        per_thread = max(1, -(-len(free) // UNLINK_THREADS))  # the batch's regions, in turn
        shares = [free[k:k + per_thread] for k in range(0, len(free), per_thread)]
        unlinking = [pool.submit(_unlink_each, [(dir_fd, batch[n]) for n, dir_fd in share])
                     for share in shares]
        try:
            meanwhile()
        finally:
            inodes = {}
            for share, unlinked in zip(shares, unlinking):
                for (n, _), (outcome, ino) in zip(share, unlinked.result()):
                    outcomes[n], inodes[n] = outcome, ino
            removed_at = time.time()  # before any access can take a hold again
            gone.extend((batch[n].relpath, removed_at, ino) for n, ino in inodes.items()
                        if outcomes[n].removed or outcomes[n].reason == ALREADY_GONE)
    return outcomes  # type: ignore[return-value]


def _gate_identifier(planned: PlannedRemoval) -> str:
    return planned.identifier or os.path.basename(planned.relpath)[:40]


def _unlink_each(jobs: Sequence[Tuple[int, PlannedRemoval]]
                 ) -> List[Tuple[RemovalOutcome, Optional[int]]]:
    return [_unlink_regular_file(dir_fd, planned) for dir_fd, planned in jobs]


def _unlink_regular_file(dir_fd: int, planned: PlannedRemoval
                         ) -> Tuple[RemovalOutcome, Optional[int]]:
    """Under the gates, not held: the outcome, and the inode removed (0 when the file was
    already gone)."""
    name = os.path.basename(planned.relpath)
    try:
        st = os.lstat(name, dir_fd=dir_fd)
        if not stat.S_ISREG(st.st_mode):
            return RemovalOutcome(planned.relpath, False, reason="not a regular file"), None
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return RemovalOutcome(planned.relpath, False, reason=ALREADY_GONE), 0
    except OSError as exc:  # e.g. permission denied in a shared cache: keep going
        return RemovalOutcome(planned.relpath, False, reason=str(exc)), None
    return RemovalOutcome(planned.relpath, True, freed_bytes=st.st_size), st.st_ino


def _remove_stale_partial(paths: MetaPaths, relpath: str) -> RemovalOutcome:
    """A leftover download; re-checked so a download that resumed is left alone."""
    abspath = os.path.join(paths.cache_dir, relpath)
    if not is_inside(paths.cache_dir, relpath):
        return RemovalOutcome(relpath, False, reason="path is outside the cache directory")
    try:
        st = os.lstat(abspath)
    except FileNotFoundError:
        return RemovalOutcome(relpath, False, reason=ALREADY_GONE)
    if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < STALE_PARTIAL_SECONDS:
        return RemovalOutcome(relpath, False, reason="download in progress")
    os.unlink(abspath)
    return RemovalOutcome(relpath, True, freed_bytes=st.st_size)
