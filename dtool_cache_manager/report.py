"""Reports: the disk (the truth for sizes) joined with the ledger (history) and the holds.

Pure assembly into frozen dataclasses; printing is :mod:`formatting`'s job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from .api import open_ledger
from .holds import live_holds
from .layout import MetaPaths
from .scan import scan_cache


@dataclass(frozen=True)
class DatasetSummary:
    """One dataset's share of the cache."""

    key: str  # the dataset UUID, or the directory for files the ledger never saw
    uris: Tuple[str, ...]
    num_items: int
    size_bytes: int
    last_access: Optional[float]


@dataclass(frozen=True)
class Summary:
    """``dtool cache summary``."""

    cache_directory: str
    total_size_bytes: int
    num_items: int
    num_datasets: int
    num_in_use: int
    num_untracked: int
    num_partial: int
    partial_size_bytes: int
    datasets: Tuple[DatasetSummary, ...]


def summarize(cache_dir: str) -> Summary:
    disk = scan_cache(cache_dir)
    paths = MetaPaths(cache_dir)
    with open_ledger(cache_dir) as ledger:
        rows = {row.relpath: row for row in ledger.items()}
        uris = {relpath: tuple(ledger.uris_of(relpath)) for relpath in rows}
    held = {key.relpath for keys in live_holds(paths, reap=False).values() for key in keys}
    groups: Dict[str, list] = {}
    untracked = in_use = 0
    for found in disk.files:
        row = rows.get(found.relpath)
        if row is None:
            untracked += 1
        in_use += found.relpath in held
        key = row.uuid if row else os.path.dirname(found.relpath)
        group = groups.setdefault(key, [set(), 0, 0, None])
        if row:
            group[0].update(uris[found.relpath])
            if row.last_access and (group[3] is None or row.last_access > group[3]):
                group[3] = row.last_access
        group[1] += 1
        group[2] += found.size_bytes
    datasets = tuple(sorted(
        (DatasetSummary(key, tuple(sorted(g[0])), g[1], g[2], g[3]) for key, g in groups.items()),
        key=lambda d: (-d.size_bytes, d.key)))
    return Summary(
        cache_directory=cache_dir,
        total_size_bytes=disk.total_size_bytes,
        num_items=len(disk.files),
        num_datasets=len(datasets),
        num_in_use=in_use,
        num_untracked=untracked,
        num_partial=len(disk.partials),
        partial_size_bytes=sum(p.size_bytes for p in disk.partials),
        datasets=datasets,
    )
