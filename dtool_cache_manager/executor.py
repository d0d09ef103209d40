"""The executor: the only code that deletes cached files.

It removes a file only when it can prove nobody uses it: under the file's exclusive gate it
reads the live holds, then unlinks the file if nobody holds its path and it is a regular
file, relative to its directory's descriptor, opened from the cache root without following
links (see :mod:`cachefs`).  When in doubt it keeps the file and says why.  Holds whose
directory another member could tamper with prove nothing: then it removes nothing
(:class:`~dtool_cache_manager.errors.UnsafeCache`).  A clean is planned first (a
:class:`CleanPlan` reports ``expected_freed_bytes`` before :meth:`CleanPlan.execute`, as in
huggingface_hub's delete strategies), so a dry run shows exactly what the real run does.

In a cache with a coordinator, a removal also claims each file on the server (which fails
while any process of any host holds it), and moves it to the trash instead of unlinking
it: a host cut off from the server may still be reading it, and its open files stay valid
there.  The trash is purged after the registered grace period (:class:`Coordination`).
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import cachefs
from .cachefs import CacheDir, Refused
from .errors import CacheManagerError, UnsafeCache
from .holds import Holder, exclusive_gates, live_holds
from .layout import is_item_relpath
from .store import DatabaseError
from .store.ledger import ItemRow, Ledger, Removed, open_ledger
from .rangelock import GateBusy, open_range_lock
from .sharing import require_single_host
from .store.coordinator import Coordinator, CoordinatorBusy, coordinator_of

logger = logging.getLogger(__name__)

ALREADY_GONE = "already gone from disk"
GATE_BUSY = "its gate stayed locked by another process; not removed now"
THROUGH_LINK = "its directory is a symbolic link or not a directory; not followed"


@dataclass(frozen=True)
class RemovalOutcome:
    """What happened to one item."""

    relpath: str
    removed: bool
    freed_bytes: int = 0
    holders: Tuple[Holder, ...] = ()
    reason: str = ""


def require_safe_holds(cache: CacheDir) -> None:
    """Holds that a member could hide prove nothing, holds taken on another host are not
    seen here without a coordinator (and a coordinator that cannot be reached proves
    nothing), and without the gate a hold could slip in between the check and the unlink:
    then refuse to remove anything."""
    require_single_host(cache)
    coordinator_of(cache)  # CoordinatorUnavailable: one line, nothing removed
    if cache.holds_unsafe is not None:
        raise UnsafeCache(f"not removing anything: {cache.holds_unsafe}")
    try:
        open_range_lock(cache, cachefs.GATE_LOCK)
    except OSError as exc:
        raise UnsafeCache(f"not removing anything: cannot use "
                          f"{os.path.join(cache.meta_path, cachefs.GATE_LOCK)} ({exc})") from None


def _record(on_removed: Callable[[], None], what: str) -> None:
    """Update the ledger after an unlink; if it cannot be written (disk full), the file is
    still gone and the next reconcile drops its row."""
    try:
        on_removed()
    except DatabaseError as exc:
        logger.warning("dtool-cache-manager: removed %s but could not update the ledger (%s); "
                       "the next run reconciles it", what, exc)


def remove_item(ledger: Ledger, row: ItemRow,
                same_as: Optional[os.stat_result] = None) -> RemovalOutcome:
    """Remove ``row``'s file and ledger entry unless a live process holds it.

    Checked and unlinked under the file's exclusive gate; with ``same_as``, only that very
    file (as examined by the caller).  The holds, not the ledger, decide: with a read-only
    view of the ledger (a full disk) the file still goes, and the next reconcile drops its
    row.  The ledger is written after the gate is released, as a clean writes it (never
    wait for the ledger while holding a gate: a clean holds the ledger while it waits for
    gates).
    """
    cache, relpath = ledger.cache, row.relpath
    require_safe_holds(cache)
    if not is_item_relpath(relpath):
        return RemovalOutcome(relpath, False, reason=OUTSIDE)
    with cachefs.Dirs(cache.root_fd) as dirs, _coordination(cache) as coordination:
        try:
            dir_fd, name = dirs.entry(relpath)
        except Refused:
            return RemovalOutcome(relpath, False, reason=THROUGH_LINK)
        except FileNotFoundError:
            dir_fd, name = None, ""
        with exclusive_gates(cache, [relpath]) as busy, _claimed(coordination, [relpath]) \
                as claimed:
            if busy:
                return RemovalOutcome(relpath, False, reason=GATE_BUSY)
            holders = live_holds(cache).holders_of(relpath)
            if claimed is not None and relpath not in claimed:
                holders = holders or (ELSEWHERE,)
            if holders:
                return RemovalOutcome(relpath, False, holders=holders, reason="in use")
            outcome, ino = (_dispose(coordination, dir_fd, name, relpath, same_as)
                            if dir_fd is not None else (RemovalOutcome(
                                relpath, False, reason=ALREADY_GONE), 0))
            removed_at = time.time()
    if outcome.removed or outcome.reason == ALREADY_GONE:
        _record(lambda: ledger.forget_removed([(relpath, removed_at, ino or None)]), relpath)
    return outcome


OUTSIDE = "path is outside the cache directory"
ELSEWHERE = Holder("?", "?", None, "a session on the coordinator")  # held, holds file unread


class Coordination:
    """A removal's use of a cache's coordinator: it claims files on the server, and moves
    the claimed ones to the trash, stamped by the server's clock; the trash is purged of
    what waited longer than the grace period when it opens."""

    def __init__(self, cache: CacheDir, coordinator: Coordinator):
        self.coordinator = coordinator
        grace_seconds = coordinator.registration.grace_seconds
        fd = cachefs.open_trash(cache)
        if fd is None:
            raise UnsafeCache(f"not removing anything: {cache.meta_path}/{cachefs.TRASH} is "
                              f"missing; its owner makes it by running: dtool cache init "
                              f"--cache-dir {cache.path}")
        self.trash_fd = fd
        self.stamp = int(coordinator.now())
        files, size = cachefs.purge_trash(fd, self.stamp - grace_seconds)
        if files:
            logger.info("dtool-cache-manager: purged %d files (%d bytes) cleaned more than "
                        "%d s ago from the trash", files, size, grace_seconds)

    def move_to_trash(self, dir_fd: int, name: str,
                      same_as: Optional[os.stat_result] = None) -> os.stat_result:
        """Move a claimed file to the trash (EXDEV: the trash is on another filesystem)."""
        unique = f"{self.stamp}.{os.getpid()}-{secrets.token_hex(8)}"
        return cachefs.move_entry(dir_fd, name, self.trash_fd, unique, same_as=same_as)

    def close(self) -> None:
        os.close(self.trash_fd)


def open_coordination(cache: CacheDir) -> Optional[Coordination]:
    """The coordination of a removal from ``cache``; None if it has no coordinator."""
    coordinator = coordinator_of(cache)
    return None if coordinator is None else Coordination(cache, coordinator)


def _dispose(coordination: Optional[Coordination], dir_fd: int, name: str, relpath: str,
             same_as: Optional[os.stat_result] = None
             ) -> Tuple[RemovalOutcome, Optional[int]]:
    """Under the gates (and claims), not held: unlink the file, or with a coordinator move
    it to the trash.  The outcome, and the inode removed (0 when it was already gone)."""
    try:
        st = (cachefs.unlink_entry(dir_fd, name, same_as=same_as) if coordination is None
              else coordination.move_to_trash(dir_fd, name, same_as))
    except FileNotFoundError:
        return RemovalOutcome(relpath, False, reason=ALREADY_GONE), 0
    except OSError as exc:  # Refused, or e.g. permission denied in a shared cache: go on
        return RemovalOutcome(relpath, False, reason=str(exc)), None
    return RemovalOutcome(relpath, True, freed_bytes=st.st_size), st.st_ino


@contextmanager
def _claimed(coordination: Optional[Coordination], relpaths: Sequence[str]
             ) -> Iterator[Optional[set]]:
    """The paths claimed on the coordinator (None without one), until the block ends."""
    if coordination is None:
        yield None
        return
    claimed = coordination.coordinator.claim(relpaths)
    try:
        yield claimed
    finally:
        if claimed:
            coordination.coordinator.unclaim(claimed)


def forget_vanished(ledger: Ledger, rows: Sequence[ItemRow]) -> int:
    """Reconcile: drop the rows of files deleted or moved behind our back; returns how many.

    In batches, as a clean removes: under the files' gates and one snapshot of the holds, a
    row goes only if its path holds nothing and nobody holds it (it may be fetching it
    again); the ledger is written after the gates are released.  A row whose path cannot
    name a cached file is dropped at once.
    """
    cache = ledger.cache
    forgotten = 0
    with cachefs.Dirs(cache.root_fd) as dirs:
        for start in range(0, len(rows), BATCH_SIZE):
            batch = rows[start:start + BATCH_SIZE]
            gone: List[str] = []
            inside = []
            for row in batch:
                if is_item_relpath(row.relpath):
                    inside.append(row)
                else:
                    logger.warning("dtool-cache-manager: dropping a ledger row whose path "
                                   "leaves the cache: %r", row.relpath)
                    gone.append(row.relpath)
            dirs.trim()
            with exclusive_gates(cache, [row.relpath for row in inside]) as busy:
                held = live_holds(cache)
                removed_at = time.time()
                gone += [row.relpath for row in inside
                         if row.relpath not in busy and not _exists(dirs, row.relpath)
                         and not held.holders_of(row.relpath)]
            if gone:
                ledger.forget(gone, removed_at)  # whatever its rows claim
                forgotten += len(gone)
    return forgotten


def _exists(dirs: cachefs.Dirs, relpath: str) -> bool:
    """Is there an entry at ``relpath``, reached without links?  (A path through a link
    is no cached file of ours: it does not exist.)"""
    try:
        dir_fd, name = dirs.entry(relpath)
    except (FileNotFoundError, Refused):
        return False
    except OSError:
        return True  # cannot tell: keep the row
    return cachefs.entry_stat(dir_fd, name) is not None


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

    cache_dir: str
    removals: Tuple[PlannedRemoval, ...]
    skipped_in_use: Tuple[Tuple[str, Tuple[Holder, ...]], ...]
    stale_partials: Tuple[PlannedRemoval, ...]
    skipped_entries: Tuple[Tuple[str, str], ...] = ()  # (path, why) never considered

    @property
    def expected_freed_bytes(self) -> int:
        return sum(r.size_bytes for r in self.removals + self.stale_partials)

    def execute(self, ledger: Optional[Ledger] = None,
                progress: Optional[Callable[[PlannedRemoval], None]] = None) -> CleanResult:
        """Carry the plan out: on ``ledger`` if the caller has the cache's ledger open
        already (a command opens and folds it once), else on one opened for the run."""
        if ledger is None:
            with open_ledger(self.cache_dir) as opened:
                return self._execute(opened, progress)
        return self._execute(ledger, progress)

    def _execute(self, ledger: Ledger,
                 progress: Optional[Callable[[PlannedRemoval], None]]) -> CleanResult:
        """Remove the planned files in path order, while a thread of its own drops their
        ledger rows a batch behind (see :class:`_LedgerUpdates`).  Each batch takes a run
        of paths from each of :data:`UNLINK_THREADS` regions of the sorted list, one region
        per unlinking thread, so that the threads work in different directories and the
        ledger's rows are still dropped in a few runs of key order (a clean of 100k of a
        million items: 17-21 s striped over the threads in one directory, 15-16 s this
        way)."""
        cache = ledger.cache
        require_safe_holds(cache)
        done: Dict[str, RemovalOutcome] = {}
        ordered = regions_interleaved(sorted(self.removals, key=lambda r: r.relpath),
                                      UNLINK_THREADS, BATCH_SIZE)
        with _LedgerUpdates(ledger) as updates, cachefs.Dirs(cache.root_fd, 128) as folders, \
                ThreadPoolExecutor(UNLINK_THREADS, "dtool-cache-unlink") as pool, \
                _coordination(cache) as coordination:
            for start in range(0, len(ordered), BATCH_SIZE):
                batch = ordered[start:start + BATCH_SIZE]
                gone: List[Removed] = []
                outcomes = remove_batch(cache, folders, pool, batch, gone, coordination)
                updates.record(gone)  # the gates are released: see remove_batch
                for planned, outcome in zip(batch, outcomes):
                    done[planned.relpath] = outcome
                    if progress is not None:
                        progress(planned)
        removed: List[RemovalOutcome] = []
        skipped: List[RemovalOutcome] = []
        for planned in self.removals:  # reported in the plan's order, as a dry run shows it
            outcome = done[planned.relpath]
            (removed if outcome.removed else skipped).append(outcome)
        for planned in self.stale_partials:
            try:
                outcome = _remove_stale_partial(cache, planned.relpath)
            except OSError as exc:
                outcome = RemovalOutcome(planned.relpath, False, reason=str(exc))
            (removed if outcome.removed else skipped).append(outcome)
            if progress is not None:
                progress(planned)
        skipped += [RemovalOutcome(relpath, False, holders=holders, reason="in use")
                    for relpath, holders in self.skipped_in_use]
        return CleanResult(tuple(removed), tuple(skipped))


@contextmanager
def _coordination(cache: CacheDir) -> Iterator[Optional[Coordination]]:
    coordination = open_coordination(cache)
    try:
        yield coordination
    finally:
        if coordination is not None:
            coordination.close()


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
    """The ledger side of a clean (:meth:`Ledger.recording_removals`), on a thread of its
    own: it drops the rows of what is gone, batch by batch behind the unlinks, and commits
    as it goes and at the end, also when the clean is interrupted.

    A thread of its own, so that a commit, which writes back every page the batches before
    it changed (100-200 ms at a million items), never holds up the unlinks: at one ledger
    update per batch between the unlinks, the unlinks waited 1.5-2 s of a 12 s clean.  The
    thread takes the ledger's lock while the unlinking thread takes gates, but never waits
    for a gate, and the unlinking thread waits for it only at the end, with no gate held:
    no cycle.  Until then the clean's ledger connection is this thread's alone.

    A ledger that cannot be written (disk full) is reported once and the clean goes on:
    the files are gone, and the next reconcile drops their rows."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._batches: "queue.SimpleQueue[Optional[List[Removed]]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._record_all, name="dtool-cache-ledger",
                                        daemon=True)
        self._error: Optional[BaseException] = None

    def __enter__(self) -> "_LedgerUpdates":
        self._thread.start()
        return self

    def record(self, removed: List[Removed]) -> None:
        if removed:
            self._batches.put(removed)

    def __exit__(self, *_) -> None:
        self._batches.put(None)
        self._thread.join()
        if self._error is not None:  # not a database error: a fault to report as it is
            raise self._error

    def _record_all(self) -> None:
        try:
            with self.ledger.recording_removals() as recorder:
                for removed in iter(self._batches.get, None):
                    recorder.record(removed)
        except DatabaseError as exc:
            logger.warning("dtool-cache-manager: could not update the ledger after removing "
                           "files (%s); the next run reconciles it", exc)
        except BaseException as exc:  # noqa: B902  # handed to the clean's own thread
            self._error = exc


def remove_batch(cache: CacheDir, folders: cachefs.Dirs, pool: ThreadPoolExecutor,
                 batch: Sequence[PlannedRemoval], gone: List[Removed],
                 coordination: Optional[Coordination] = None) -> List[RemovalOutcome]:
    """Remove a batch of files, each unless a live process holds it; appends what is gone
    from disk to ``gone`` as (relpath, removed_at, inode) for the ledger.

    The same proof as :func:`remove_item`, paid once per batch: every file's exclusive gate
    is taken (in a fixed order, so two cleaners cannot deadlock), then the holds are read
    once; a hold taken after that read waits at its gate until the batch is done, and its
    access then finds the file gone and fetches it again.  The unlinks run on ``pool``
    (an unlink mostly waits for the filesystem, so a few at once take a third of the time).
    With a coordinator, the files are claimed on the server after the gates and before the
    holds are read, and the claimed ones go to the trash (see :class:`Coordination`).
    The ledger drops the rows of ``gone`` after the gates were released: an access after
    the removal is journalled later than ``removed_at``, so its row is kept (see
    :meth:`Ledger.recording_removals`).
    """
    folders.trim()  # no unlink is in flight now
    outcomes: List[Optional[RemovalOutcome]] = [None] * len(batch)
    todo = []
    for n, planned in enumerate(batch):
        try:
            dir_fd, name = folders.entry(planned.relpath)
        except Refused as exc:
            outcomes[n] = RemovalOutcome(planned.relpath, False, reason=THROUGH_LINK
                                         if exc.errno != errno.EINVAL else OUTSIDE)
            continue
        except FileNotFoundError:
            outcomes[n] = RemovalOutcome(planned.relpath, False, reason=ALREADY_GONE)
            continue
        except OSError as exc:
            outcomes[n] = RemovalOutcome(planned.relpath, False, reason=str(exc))
            continue
        todo.append((n, dir_fd, name))
    relpaths = [batch[n].relpath for n, _, _ in todo]
    with exclusive_gates(cache, relpaths) as busy, \
            _claimed(coordination, [r for r in relpaths if r not in busy]) as claimed:
        held = live_holds(cache)
        free = []
        for n, dir_fd, name in todo:
            relpath = batch[n].relpath
            holders = held.holders_of(relpath)
            if relpath in busy:
                outcomes[n] = RemovalOutcome(relpath, False, reason=GATE_BUSY)
            elif claimed is not None and relpath not in claimed:
                outcomes[n] = RemovalOutcome(relpath, False, holders=holders or (ELSEWHERE,),
                                             reason="in use")
            elif holders:
                outcomes[n] = RemovalOutcome(relpath, False, holders=holders, reason="in use")
            else:
                free.append((n, dir_fd, name))
        per_thread = max(1, -(-len(free) // UNLINK_THREADS))  # the batch's regions, in turn
        shares = [free[k:k + per_thread] for k in range(0, len(free), per_thread)]
        unlinking = [pool.submit(_dispose_each, coordination,
                                 [(dir_fd, name, batch[n].relpath) for n, dir_fd, name in share])
                     for share in shares]
        unlinks = {}  # n: (outcome, inode) of each file unlinked above
        for share, unlinked in zip(shares, unlinking):
            for (n, _, _), (outcome, ino) in zip(share, unlinked.result()):
                outcomes[n], unlinks[n] = outcome, (outcome, ino)
        removed_at = time.time()  # before any access can take a hold again
        gone.extend((batch[n].relpath, removed_at, ino) for n, (outcome, ino) in unlinks.items()
                    if outcome.removed or outcome.reason == ALREADY_GONE)
    return outcomes  # type: ignore[return-value]  # every slot was filled above


def _dispose_each(coordination: Optional[Coordination], jobs: Sequence[Tuple[int, str, str]]
                  ) -> List[Tuple[RemovalOutcome, Optional[int]]]:
    return [_dispose(coordination, dir_fd, name, relpath) for dir_fd, name, relpath in jobs]


def partial_is_stale(cache: CacheDir, relpath: str) -> bool:
    """Is the ``*.tmp`` at ``relpath`` left by a dead download?  Every download of ours runs
    under its file's fetch lock: if nobody holds it, nobody is fetching that file.
    (Processes without the plugin take no lock; see ``docs/reliability.rst``.)"""
    try:
        lock = open_range_lock(cache, cachefs.FETCH_LOCK)
        with lock.locked(relpath[:-len(PARTIAL_SUFFIX)], exclusive=True, patience=0.0), \
                _no_download_elsewhere(cache, relpath):
            return True
    except (GateBusy, OSError, CacheManagerError):
        return False


@contextmanager
def _no_download_elsewhere(cache: CacheDir, relpath: str) -> Iterator[None]:
    """With a coordinator: hold the download lock of a partial's file on the server (a
    download on another host holds it); CoordinatorBusy if taken."""
    coordinator = coordinator_of(cache)
    if coordinator is None:
        yield
        return
    with coordinator.exclusive("fetch", relpath[:-len(PARTIAL_SUFFIX)], patience=0.0):
        yield


PARTIAL_SUFFIX = ".tmp"


def _remove_stale_partial(cache: CacheDir, relpath: str) -> RemovalOutcome:
    """A leftover download, removed under its fetch lock so that no download starts
    meanwhile; a download in progress (its lock held) is left alone."""
    try:
        lock = open_range_lock(cache, cachefs.FETCH_LOCK)
        with cachefs.Dirs(cache.root_fd) as dirs, \
                lock.locked(relpath[:-len(PARTIAL_SUFFIX)], exclusive=True, patience=0.0), \
                _no_download_elsewhere(cache, relpath):
            dir_fd, name = dirs.entry(relpath)
            outcome, _ = _dispose(None, dir_fd, name, relpath)  # partials: never read
            return outcome
    except (GateBusy, CoordinatorBusy):
        return RemovalOutcome(relpath, False, reason="download in progress")
    except FileNotFoundError:
        return RemovalOutcome(relpath, False, reason=ALREADY_GONE)
    except Refused:
        return RemovalOutcome(relpath, False, reason=THROUGH_LINK)
