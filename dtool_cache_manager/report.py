"""Reports: the disk (the truth for sizes) joined with the ledger (history) and the holds.

:func:`inventory` is the one join every command starts from; it also reconciles the ledger
with the disk, forgetting rows whose files were deleted or moved behind our back.  The rest
is pure assembly into frozen dataclasses; printing is :mod:`formatting`'s job.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from dtoolcore.utils import sanitise_uri

from .api import open_ledger
from .executor import (STALE_PARTIAL_SECONDS, CleanPlan, PlannedRemoval,
                       forget_if_vanished, is_inside)
from .holds import Holder, holders_in, live_holds
from .layout import MetaPaths
from .ledger import ItemRow
from .params import BadInput
from .policies import Candidate, Rules, select
from .scan import CachedFile, scan_cache

logger = logging.getLogger(__name__)

DAY = 86400.0
AGE_BUCKETS = (("last day", DAY), ("last week", 7 * DAY), ("last month", 30 * DAY))


@dataclass(frozen=True)
class ItemView:
    """One cached file: what the disk says, what the ledger remembers, who holds it."""

    file: CachedFile
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
    def last_use_estimate(self) -> float:
        """Last access, or for untracked files the later of atime and mtime (all we have)."""
        if self.row and self.row.last_access:
            return self.row.last_access
        return max(self.file.atime, self.file.mtime)

    @property
    def dataset_key(self) -> str:
        """The dataset UUID; for an untracked file, that of tracked files beside it, else
        its directory."""
        if self.row:
            return self.row.uuid
        return self.neighbour_uuid or os.path.dirname(self.file.relpath)

    def matches_dataset(self, wanted: str) -> bool:
        return wanted in (self.dataset_key, *self.uris) or (
            self.row is None and wanted == os.path.basename(self.dataset_key))


@dataclass(frozen=True)
class Inventory:
    cache_dir: str
    items: Tuple[ItemView, ...]
    partials: Tuple[CachedFile, ...]
    skipped: Tuple[Tuple[str, str], ...]  # (path, why): symlinks, special files, bad rows
    forgotten: int  # ledger rows dropped because their files had vanished
    lost_records: int

    @property
    def total_size_bytes(self) -> int:
        return sum(i.size_bytes for i in self.items) + sum(p.size_bytes for p in self.partials)


def inventory(cache_dir: str, dataset: Optional[str] = None) -> Inventory:
    """Everything in ``cache_dir``, optionally only one dataset's items (URI or UUID)."""
    disk = scan_cache(cache_dir)
    paths = MetaPaths(cache_dir)
    on_disk = {f.relpath for f in disk.files}
    forgotten = 0
    skipped = list(disk.skipped)
    with open_ledger(cache_dir) as ledger:
        rows = {row.relpath: row for row in ledger.items()}
        for relpath, row in list(rows.items()):
            if not is_inside(cache_dir, relpath):
                skipped.append((relpath, "ledger row names no cached item (outside the cache or "
                                         "our bookkeeping); dropped"))
                del rows[relpath]
            if relpath not in on_disk and not ledger.readonly:
                forgotten += _reconcile(ledger, row)
        uris = {relpath: tuple(ledger.uris_of(relpath)) for relpath in rows}
        lost = ledger.lost_records()
    holds = live_holds(paths, reap=os.access(paths.holds_dir, os.W_OK))
    dir_uuid = {os.path.dirname(r): row.uuid for r, row in rows.items()}
    items = tuple(ItemView(f, rows.get(f.relpath), uris.get(f.relpath, ()),
                           _holders(f, rows.get(f.relpath), holds),
                           dir_uuid.get(os.path.dirname(f.relpath)))
                  for f in disk.files)
    partials = disk.partials
    if dataset is not None:
        wanted = _normalise_dataset(dataset)
        items = tuple(i for i in items if i.matches_dataset(wanted))
        if not items:
            raise BadInput(f"no cached items of dataset {dataset!r} in {cache_dir} "
                           "(give its URI or UUID as `dtool cache ls` shows it)")
        dirs = {os.path.dirname(i.relpath) for i in items}
        partials = tuple(p for p in partials if os.path.dirname(p.relpath) in dirs)
    return Inventory(cache_dir, items, partials, tuple(skipped), forgotten, lost)


def _reconcile(ledger, row: ItemRow) -> int:
    try:
        return int(forget_if_vanished(ledger, row))
    except (OSError, sqlite3.Error) as exc:  # e.g. a full disk: report, reconcile later
        logger.warning("dtool-cache-manager: could not reconcile %s (%s)", row.relpath, exc)
        return 0


def _normalise_dataset(value: str) -> str:
    return sanitise_uri(value) if "://" in value else value.strip().rstrip("/")


def _holders(found: CachedFile, row: Optional[ItemRow], holds) -> Tuple[Holder, ...]:
    """Holders of a file: by exact item when tracked, by identifier alone when not."""
    if row is None:
        return tuple(holders_in(holds, found.identifier))
    return tuple(holders_in(holds, row.identifier, uuid=row.uuid, relpath=found.relpath))


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
    pid: int
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


def summarize(cache_dir: str, now: Optional[float] = None) -> Summary:
    inv = inventory(cache_dir)
    now = time.time() if now is None else now
    groups: Dict[str, list] = {}
    holders: Dict[Holder, List[int]] = {}
    ages = {name: 0 for name, _ in AGE_BUCKETS}
    ages.update({"older": 0, "never tracked": 0})
    for item in inv.items:
        group = groups.setdefault(item.dataset_key, [set(), 0, 0, None])
        group[0].update(item.uris)
        group[1] += 1
        group[2] += item.size_bytes
        if item.last_access and (group[3] is None or item.last_access > group[3]):
            group[3] = item.last_access
        ages[_age_bucket(item.last_access, now)] += 1
        for holder in item.holders:
            tally = holders.setdefault(holder, [0, 0])
            tally[0] += 1
            tally[1] += item.size_bytes
    datasets = tuple(sorted(
        (DatasetSummary(key, tuple(sorted(g[0])), g[1], g[2], g[3]) for key, g in groups.items()),
        key=lambda d: (-d.size_bytes, d.key)))
    untracked = [i for i in inv.items if i.row is None]
    return Summary(
        cache_directory=cache_dir,
        total_size_bytes=inv.total_size_bytes,
        num_items=len(inv.items),
        num_datasets=len(datasets),
        num_in_use=sum(1 for i in inv.items if i.holders),
        num_untracked=len(untracked),
        untracked_size_bytes=sum(i.size_bytes for i in untracked),
        num_partial=len(inv.partials),
        partial_size_bytes=sum(p.size_bytes for p in inv.partials),
        age_distribution=ages,
        in_use_by=tuple(HolderSummary(h.user_at_host, h.pid, n, size)
                        for h, (n, size) in sorted(holders.items(),
                                                   key=lambda kv: (kv[0].user, kv[0].pid))),
        datasets=datasets,
        lost_records=inv.lost_records,
    )


def _age_bucket(last_access: Optional[float], now: float) -> str:
    if last_access is None:
        return "never tracked"
    age = now - last_access
    for name, limit in AGE_BUCKETS:
        if age < limit:
            return name
    return "older"


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
        raise BadInput(f"invalid sort {text!r}: use one of size, accessed, count, name, "
                       "optionally followed by :asc or :desc")
    return key, (SORT_KEYS[key][1] if not order else order == "desc")


def list_items(inv: Inventory, sort: str = "accessed", limit: Optional[int] = None,
               in_use: bool = False, untracked: bool = False) -> Sequence[ItemView]:
    key, descending = parse_sort(sort)
    items = [i for i in inv.items
             if (not in_use or i.holders) and (not untracked or i.row is None)]
    items.sort(key=SORT_KEYS[key][0], reverse=descending)
    return items if limit is None else items[:limit]


# -- clean -----------------------------------------------------------------------------


def plan_clean(inv: Inventory, rules: Rules, now: Optional[float] = None) -> CleanPlan:
    """Which files a clean removes (see :mod:`policies`), and leftover partial downloads."""
    now = time.time() if now is None else now
    by_relpath = {item.relpath: item for item in inv.items}
    candidates = [Candidate(relpath=i.relpath, size_bytes=i.size_bytes,
                            last_access=i.last_use_estimate, access_count=i.access_count,
                            in_use=bool(i.holders),
                            fetch_seconds=i.row.fetch_seconds if i.row else 0.0,
                            misses=i.row.misses if i.row else 0)
                  for i in inv.items]
    selection = select(candidates, rules, now)
    removals = tuple(PlannedRemoval(c.relpath, c.size_bytes, by_relpath[c.relpath].row)
                     for c in selection.remove)
    skipped = tuple((c.relpath, by_relpath[c.relpath].holders)
                    for c in selection.skipped_in_use)
    stale = tuple(PlannedRemoval(p.relpath, p.size_bytes, None) for p in inv.partials
                  if now - p.mtime >= STALE_PARTIAL_SECONDS)
    return CleanPlan(MetaPaths(inv.cache_dir), removals, skipped, stale, inv.skipped)
