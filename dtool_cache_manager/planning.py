"""Clean planning: which files a clean removes (by :mod:`policies`), what each is called,
and leftover partial downloads: a :class:`~dtool_cache_manager.executor.CleanPlan`, whose
``expected_freed_bytes`` is known before it executes itself.

The ``lru`` order is read from the disk index as far as the rules need (a 10 % clean of a
million files reads 10 %); other policies and ``--dataset`` need the whole inventory of
:mod:`report`.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple, cast

from . import cachefs
from .cachefs import CacheDir
from .executor import CleanPlan, PlannedRemoval, partial_is_stale
from .holds import live_holds
from .policies import Candidate, Rules, Selection, lru_key, select, select_in_lru_order
from .report import Inventory, dataset_key_of, held_files, inventory_of, refreshed
from .store import diskindex
from .store.diskindex import IndexedFile
from .store.ledger import ItemRow, Ledger, open_ledger


@dataclass(frozen=True)
class Naming:
    """Which dataset each of some cached files belongs to, and the item's name there: what
    a plan shows beside the cache path.  Datasets are grouped as everywhere: by UUID
    (untracked files: that of the tracked files in their directory, else the directory)."""

    files: Dict[str, Tuple[str, Optional[str]]]  # relpath -> (dataset key, item's name)
    uris: Dict[str, Tuple[str, ...]]  # dataset key -> every URI it was read through


def naming(ledger: Ledger, relpaths: Sequence[str]) -> Naming:
    names = ledger.names_of(relpaths)
    untracked_dirs = sorted({os.path.dirname(r) for r in relpaths if r not in names})
    dir_datasets = ledger.datasets_of_dirs(untracked_dirs)
    uris = ledger.uris_of_datasets()
    files = {}
    for relpath in relpaths:
        uuid, name = names.get(relpath, (None, None))
        files[relpath] = (dataset_key_of(relpath, uuid,
                                         dir_datasets.get(os.path.dirname(relpath))), name)
    return Naming(files, {key: uris.get(key, ()) for key, _ in files.values()})


def plan_clean(inv: Inventory, rules: Rules, now: Optional[float] = None) -> CleanPlan:
    """Which files a clean removes (see :mod:`policies`), and leftover partial downloads."""
    now = time.time() if now is None else now
    by_relpath = {item.relpath: item for item in inv.items}
    selection = select([_candidate(i.file, bool(i.holders), i.row) for i in inv.items],
                       rules, now)
    skipped = tuple((c.relpath, by_relpath[c.relpath].holders)
                    for c in selection.skipped_in_use)
    stale: Tuple[PlannedRemoval, ...] = ()
    if inv.partials:
        with cachefs.open_cache(inv.cache_dir, create=False) as cache:
            stale = _stale_partials(cache, inv.partials)
    return _plan(inv.cache_dir, selection, skipped, stale, inv.skipped)


def plan(cache_dir: str, rules: Rules, dataset: Optional[str] = None,
         now: Optional[float] = None) -> CleanPlan:
    """:func:`plan_in` a ledger opened for it."""
    with open_ledger(cache_dir) as ledger:
        return plan_in(ledger, rules, dataset, now)


def plan_in(ledger: Ledger, rules: Rules, dataset: Optional[str] = None,
            now: Optional[float] = None) -> CleanPlan:
    """:func:`plan_clean` for ``dtool cache clean``, on the open ``ledger`` (its index
    refreshed first): the ``lru`` order is read from the index, only as far as the rules
    need; other policies and ``--dataset`` need every row."""
    index = refreshed(ledger)
    if dataset is not None or not rules.in_lru_order:
        return plan_clean(inventory_of(index, dataset), rules, now)
    now = time.time() if now is None else now
    cache_dir = index.cache.path
    disk = index.disk
    dirs = disk.dir_totals()
    held = held_files(disk, live_holds(index.cache))

    def stream() -> Iterator[Candidate]:
        for relpath, size_bytes, last_use, access_count in disk.in_lru_order():
            yield Candidate(relpath, size_bytes, last_use, access_count, relpath in held)

    selection = select_in_lru_order(_lru_groups(stream(), now),
                                    sum(d.file_bytes for d in dirs), rules, now)
    stale = _stale_partials(index.cache, disk.partials())
    skipped = tuple((c.relpath, held[c.relpath][1]) for c in selection.skipped_in_use)
    return _plan(cache_dir, selection, skipped, stale,
                 tuple(sorted([s for d in dirs for s in d.skipped] + index.dropped)))


def _candidate(f: IndexedFile, in_use: bool, row: Optional[ItemRow] = None) -> Candidate:
    """A file as the policies see it; untracked files are as old as their atime or mtime."""
    return Candidate(relpath=f.relpath, size_bytes=f.size_bytes,
                     last_access=diskindex.last_use_of(f),
                     access_count=f.access_count, in_use=in_use,
                     fetch_seconds=row.fetch_seconds if row else 0.0,
                     misses=row.misses if row else 0)


def _lru_groups(stream: Iterable[Candidate], now: float) -> Iterator[Candidate]:
    """The index orders by last use alone; put each run of equal keys in full ``lru`` order
    (larger first, then by path), as :func:`policies.lru_key` does."""
    # The index's candidates always carry their last use (diskindex.last_use_of), never None.
    for _, group in itertools.groupby(stream, key=lambda c: min(cast(float, c.last_access), now)):
        yield from sorted(group, key=lambda c: lru_key(c, now))


def _stale_partials(cache: CacheDir, partials: Iterable[IndexedFile]
                    ) -> Tuple[PlannedRemoval, ...]:
    """Partial downloads nobody is fetching now (their fetch lock is free)."""
    return tuple(PlannedRemoval(p.relpath, p.size_bytes) for p in partials
                 if partial_is_stale(cache, p.relpath))


def _plan(cache_dir: str, selection: Selection, skipped, stale: Tuple[PlannedRemoval, ...],
          skipped_entries) -> CleanPlan:
    removals = tuple(PlannedRemoval(c.relpath, c.size_bytes) for c in selection.remove)
    return CleanPlan(cache_dir, removals, skipped, stale, tuple(skipped_entries))
