"""Reports: the disk (the truth for sizes) joined with the ledger (history) and the holds.

Every command starts from :func:`indexed`: the disk index brought up to date (see
:mod:`diskindex`) and ledger rows of files deleted or moved behind our back forgotten.
``summary``, ``ls --sort accessed`` and LRU cleaning then answer from the index alone, so
they stay fast at a million files; anything else builds the full :func:`inventory`.  The
rest is pure assembly into frozen dataclasses; printing is :mod:`formatting`'s job.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .store import DatabaseError
from . import cachefs
from .cachefs import CacheDir
from .store.diskindex import DiskIndex, IndexedFile
from .errors import InvalidInput
from .executor import forget_vanished
from .holds import Holder, HoldsSnapshot, live_holds
from .layout import is_item_relpath, sanitise_uri
from .store.ledger import ItemRow, Ledger, open_ledger

logger = logging.getLogger(__name__)

DAY = 86400.0
AGE_BUCKETS = (("last day", DAY), ("last week", 7 * DAY), ("last month", 30 * DAY))


def dataset_key_of(relpath: str, uuid: Optional[str], neighbour_uuid: Optional[str]) -> str:
    """The one rule listings group by: a file's dataset UUID; for an untracked file, that of
    the tracked files beside it, else its directory."""
    return uuid or neighbour_uuid or os.path.dirname(relpath)


@dataclass(frozen=True)
class ItemView:
    """One cached file: what the disk says, what the ledger remembers, who holds it."""

    file: IndexedFile
    row: Optional[ItemRow]  # None: untracked (never seen by a hook)
    uris: Tuple[str, ...]
    holders: Tuple[Holder, ...]
    neighbour_uuid: Optional[str] = None  # dataset of tracked files in the same directory

    @property
    def relpath(self) -> str:
        return self.file.relpath

    @property
    def size_bytes(self) -> int:
        return self.file.size_bytes

    @property
    def uuid(self) -> Optional[str]:
        return self.row.uuid if self.row else None

    @property
    def identifier(self) -> Optional[str]:
        return self.row.identifier if self.row else self.file.identifier

    @property
    def access_count(self) -> int:
        return self.row.access_count if self.row else 0

    @property
    def last_access(self) -> Optional[float]:
        return self.row.last_access if self.row else None

    @property
    def dataset_key(self) -> str:
        """The dataset UUID; for an untracked file, that of tracked files beside it, else
        its directory."""
        return dataset_key_of(self.relpath, self.row.uuid if self.row else None,
                              self.neighbour_uuid)

    @property
    def item_relpath(self) -> Optional[str]:
        """The item's name in its dataset (from the manifest), if the ledger knows it."""
        return self.row.item_relpath if self.row else None


@dataclass(frozen=True)
class Inventory:
    cache_dir: str
    items: Tuple[ItemView, ...]
    partials: Tuple[IndexedFile, ...]
    skipped: Tuple[Tuple[str, str], ...]  # (path, why): symlinks, special files, bad rows
    forgotten: int  # ledger rows dropped because their files had vanished
    lost_records: int

    @property
    def total_size_bytes(self) -> int:
        return sum(i.size_bytes for i in self.items) + sum(p.size_bytes for p in self.partials)


@dataclass
class Indexed:
    """The ledger, its disk index up to date, and what bringing it up to date dropped."""

    ledger: Ledger
    forgotten: int  # rows of files deleted or moved behind our back
    dropped: List[Tuple[str, str]]  # (relpath, why) of rows that name no cached item

    @property
    def disk(self) -> DiskIndex:
        return self.ledger.index

    @property
    def cache(self) -> CacheDir:
        return self.ledger.cache


STRAY_ROW = "ledger row names no cached item (outside the cache or our bookkeeping); dropped"


_progress: contextvars.ContextVar[Optional[Callable[[int], None]]] = contextvars.ContextVar(
    "dtool_cache_manager_progress", default=None)


@contextmanager
def reporting_progress(callback: Callable[[int], None]) -> Iterator[None]:
    """Within the block, scans of the cache tell ``callback`` how many files they indexed
    so far (the CLI shows a line on a terminal; see :func:`diskindex.refresh`)."""
    token = _progress.set(callback)
    try:
        yield
    finally:
        _progress.reset(token)


@contextmanager
def indexed(cache_dir: str, full_rescan: bool = False) -> Iterator[Indexed]:
    """The ledger (opened, and journals folded, once) with its disk index brought up to
    date: see :func:`refreshed`."""
    with open_ledger(cache_dir) as ledger:
        yield refreshed(ledger, full_rescan)


def refreshed(ledger: Ledger, full_rescan: bool = False) -> Indexed:
    """``ledger`` with its disk index brought up to date and rows of vanished files dropped
    (forgotten under their gates, never while held).  Again after a clean, the scan only
    checks the directories it changed.

    Rows the index never saw (written into the ledger by hand, or by a hostile member) show
    as more rows than tracked files; only then are all rows compared with the index.
    """
    result = Indexed(ledger, 0, [])
    disk = ledger.index
    refresh = disk.refresh(full=full_rescan, progress=_progress.get())
    suspects = list(refresh.vanished)
    if ledger.row_count() > disk.count_tracked():
        suspects += ledger.rows_not_indexed()
    rows = [row for row in map(ledger.item, sorted(set(suspects))) if row is not None]
    result.dropped += [(row.relpath, STRAY_ROW) for row in rows
                       if not is_item_relpath(row.relpath)]
    if rows and not ledger.readonly:
        result.forgotten += _reconcile(ledger, rows)
    return result


def inventory(cache_dir: str, dataset: Optional[str] = None) -> Inventory:
    """Everything in ``cache_dir``, optionally only one dataset's items (URI or UUID)."""
    with indexed(cache_dir) as index:
        return inventory_of(index, dataset)


def inventory_of(index: Indexed, dataset: Optional[str] = None) -> Inventory:
    """:func:`inventory` from an open, refreshed ledger.  Builds a view of every file: the
    general path, for what the index cannot answer alone."""
    cache_dir = index.cache.path
    ledger, disk = index.ledger, index.disk
    holds = live_holds(index.cache)
    files = disk.all_files()
    on_disk = {f.relpath for f in files}
    rows = {row.relpath: row for row in ledger.items() if row.relpath in on_disk}
    skipped = [s for d in disk.dir_totals() for s in d.skipped] + index.dropped
    uris = ledger.uris_of_files()
    partials = tuple(disk.partials())
    lost = ledger.lost_records()
    dir_uuid = {os.path.dirname(r): row.uuid for r, row in rows.items()}
    items = tuple(ItemView(f, rows.get(f.relpath), tuple(uris.get(f.relpath, ())),
                           holds.holders_of(f.relpath), dir_uuid.get(os.path.dirname(f.relpath)))
                  for f in files)
    if dataset is not None:
        items = _only_dataset(items, dataset, cache_dir)
        dirs = {os.path.dirname(i.relpath) for i in items}
        partials = tuple(p for p in partials if os.path.dirname(p.relpath) in dirs)
    return Inventory(cache_dir, items, partials, tuple(sorted(skipped)), index.forgotten, lost)


def _only_dataset(items: Sequence[ItemView], dataset: str, cache_dir: str
                  ) -> Tuple[ItemView, ...]:
    """One dataset's files, by the rule every listing groups by: its UUID.  A URI names
    the dataset(s) read through it, so ``--dataset http://...`` also takes the files that
    came through s3; a directory names its untracked files."""
    wanted = normalise_dataset(dataset)
    keys = {wanted} | {i.dataset_key for i in items if wanted in i.uris}
    chosen = tuple(i for i in items if i.dataset_key in keys or (
        i.row is None and wanted == os.path.basename(i.dataset_key)))
    if not chosen:
        raise InvalidInput(f"no cached items of dataset {dataset!r} in {cache_dir} "
                       "(give its URI or UUID as `dtool cache ls` shows it)")
    return chosen


def _reconcile(ledger, rows: Sequence[ItemRow]) -> int:
    try:
        return forget_vanished(ledger, rows)
    except (OSError, DatabaseError) as exc:  # e.g. a full disk: report, reconcile later
        logger.warning("dtool-cache-manager: could not reconcile %d ledger rows (%s)",
                       len(rows), exc)
        return 0


def normalise_dataset(value: str) -> str:
    return sanitise_uri(value) if "://" in value else value.strip().rstrip("/")


def held_files(disk: DiskIndex, holds: HoldsSnapshot
               ) -> Dict[str, Tuple[IndexedFile, Tuple[Holder, ...]]]:
    """Files on disk that live processes hold, found through the index by path (and, for
    holds of processes older than this version, by identifier).  A holder whose holds
    cannot be read holds every file."""
    if holds.empty:
        return {}
    if holds.unreadable:
        candidates = disk.all_files()
    else:
        candidates = disk.files_at(holds.paths)
        if holds.identifiers:
            candidates += disk.files_with_identifiers(holds.identifiers)
    found = {}
    for f in candidates:
        holders = holds.holders_of(f.relpath)
        if holders:
            found[f.relpath] = (f, holders)
    return found


def _views(ledger: Ledger, files: Sequence[IndexedFile], holds) -> List[ItemView]:
    """Item views of a few files (a page of ``ls``), read row by row."""
    views = []
    for f in files:
        row = ledger.item(f.relpath)
        neighbour = None
        if row is None:
            neighbour = ledger.datasets_of_dirs([os.path.dirname(f.relpath)]).get(
                os.path.dirname(f.relpath))
        views.append(ItemView(f, row, tuple(ledger.uris_of(f.relpath)) if row else (),
                              holds.holders_of(f.relpath), neighbour))
    return views


# -- summary ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSummary:
    """One dataset's share of the cache."""

    key: str  # the dataset UUID, or the directory for files the ledger never saw
    uris: Tuple[str, ...]
    num_items: int
    size_bytes: int
    last_access: Optional[float]


@dataclass(frozen=True)
class HolderSummary:
    user: str  # user@host
    pid: Optional[int]  # None: the platform cannot say
    num_items: int
    size_bytes: int


@dataclass(frozen=True)
class Summary:
    """``dtool cache summary``."""

    cache_directory: str
    total_size_bytes: int
    num_items: int
    num_datasets: int
    num_in_use: int
    num_untracked: int
    untracked_size_bytes: int
    num_partial: int
    partial_size_bytes: int
    age_distribution: Dict[str, int]  # bucket -> items last used in it
    in_use_by: Tuple[HolderSummary, ...]
    datasets: Tuple[DatasetSummary, ...]
    lost_records: int  # accesses processes could not journal (full disk)
    # A coordinated clean's files, kept for hosts that were cut off (docs/multi-host.rst).
    trash_files: int = 0
    trash_size_bytes: int = 0


def summarize(cache_dir: str, now: Optional[float] = None, full_rescan: bool = False) -> Summary:
    """``dtool cache summary``: :func:`summary_of` a ledger opened for it."""
    with indexed(cache_dir, full_rescan) as index:
        return summary_of(index, now)


def summary_of(index: Indexed, now: Optional[float] = None) -> Summary:
    """From the disk index's per-directory totals: no walk, no per-file work."""
    now = time.time() if now is None else now
    cache_dir = index.cache.path
    ledger, disk = index.ledger, index.disk
    dirs = disk.dir_totals()
    groups = disk.dataset_groups(dirs)
    uris = disk.uris_of_datasets()
    recent = [disk.count_accessed_since(now - limit) for _, limit in AGE_BUCKETS]
    held = held_files(disk, live_holds(index.cache))
    lost = ledger.lost_records()
    trash_files, trash_bytes = cachefs.trash_usage(index.cache)
    num_items = sum(d.num_files for d in dirs)
    num_untracked = sum(d.num_untracked for d in dirs)
    ages = {name: n - previous
            for (name, _), n, previous in zip(AGE_BUCKETS, recent, [0] + recent[:-1])}
    ages["older"] = num_items - num_untracked - recent[-1]
    ages["never tracked"] = num_untracked
    holders: Dict[Holder, List[int]] = {}
    for f, who in held.values():
        for holder in who:
            tally = holders.setdefault(holder, [0, 0])
            tally[0] += 1
            tally[1] += f.size_bytes
    datasets = tuple(sorted(
        (DatasetSummary(key, tuple(uris.get(key, ())), n, nbytes, last)
         for key, (n, nbytes, last) in groups.items()),
        key=lambda d: (-d.size_bytes, d.key)))
    return Summary(
        cache_directory=cache_dir,
        total_size_bytes=sum(d.file_bytes + d.partial_bytes for d in dirs),
        num_items=num_items,
        num_datasets=len(datasets),
        num_in_use=len(held),
        num_untracked=num_untracked,
        untracked_size_bytes=sum(d.untracked_bytes for d in dirs),
        num_partial=sum(d.num_partial for d in dirs),
        partial_size_bytes=sum(d.partial_bytes for d in dirs),
        age_distribution=ages,
        in_use_by=tuple(HolderSummary(h.user_at_host, h.pid, n, size)
                        for h, (n, size) in sorted(holders.items(),
                                                   key=lambda kv: (kv[0].user, kv[0].pid))),
        datasets=datasets,
        lost_records=lost,
        trash_files=trash_files,
        trash_size_bytes=trash_bytes,
    )


# -- ls --------------------------------------------------------------------------------

SORT_KEYS = {
    "size": (lambda i: (i.size_bytes, i.relpath), True),
    "accessed": (lambda i: (i.last_access or 0.0, i.relpath), True),
    "count": (lambda i: (i.access_count, i.relpath), True),
    "name": (lambda i: i.relpath, False),
}


def parse_sort(text: str) -> Tuple[str, bool]:
    """``size|accessed|count|name[:asc|desc]`` -> (key, descending)."""
    key, _, order = text.partition(":")
    if key not in SORT_KEYS or order not in ("", "asc", "desc"):
        raise InvalidInput(f"invalid sort {text!r}: use one of size, accessed, count, name, "
                       "optionally followed by :asc or :desc")
    return key, (SORT_KEYS[key][1] if not order else order == "desc")


def list_items(inv: Inventory, sort: str = "accessed", limit: Optional[int] = None,
               in_use: bool = False, untracked: bool = False) -> Sequence[ItemView]:
    key, descending = parse_sort(sort)
    items = [i for i in inv.items
             if (not in_use or i.holders) and (not untracked or i.row is None)]
    items.sort(key=SORT_KEYS[key][0], reverse=descending)
    return items if limit is None else items[:limit]


def list_cached(cache_dir: str, sort: str = "accessed", limit: Optional[int] = None,
                in_use: bool = False, untracked: bool = False,
                dataset: Optional[str] = None) -> Sequence[ItemView]:
    """``dtool cache ls``: by last access from the index's order, in-use items from the
    holds; any other listing builds the whole :func:`inventory`."""
    key, descending = parse_sort(sort)
    if dataset is not None or (key != "accessed" and not in_use):
        return list_items(inventory(cache_dir, dataset), sort, limit, in_use, untracked)
    with indexed(cache_dir) as index:
        holds = live_holds(index.cache)
        if in_use:
            files = [f for f, _ in held_files(index.disk, holds).values()
                     if not untracked or f.uuid is None]
        else:
            files = list(itertools.islice(
                index.disk.by_last_access(descending, untracked, limit), limit))
        views = _views(index.ledger, files, holds)
    views.sort(key=SORT_KEYS[key][0], reverse=descending)
    return views if limit is None else views[:limit]
