"""Output: human tables (sizes and times via humanfriendly) and stable JSON."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
from typing import Optional

import humanfriendly
from humanfriendly.tables import format_pretty_table

from .report import Summary


def iso_utc(timestamp: Optional[float]) -> Optional[str]:
    if timestamp is None:
        return None
    return _dt.datetime.fromtimestamp(timestamp, tz=_dt.timezone.utc).isoformat(
        timespec="seconds")


def ago(timestamp: Optional[float]) -> str:
    if timestamp is None:
        return "never"
    return humanfriendly.format_timespan(max(0.0, time.time() - timestamp), max_units=1) + " ago"


def size(n: int) -> str:
    return humanfriendly.format_size(n, binary=True)


def render_summary(summary: Summary, as_json: bool) -> str:
    if as_json:
        data = dataclasses.asdict(summary)
        for ds in data["datasets"]:
            ds["last_access"] = iso_utc(ds["last_access"])
        return json.dumps(data, indent=2)
    lines = [
        f"Cache directory: {summary.cache_directory}",
        f"Total size:      {size(summary.total_size_bytes)} "
        f"({summary.total_size_bytes} bytes)",
        f"Items:           {summary.num_items} in {summary.num_datasets} datasets",
        f"In use now:      {summary.num_in_use}",
        f"Untracked:       {summary.num_untracked} (on disk, never seen by a hook)",
        f"Partial:         {summary.num_partial} leftover '*.tmp' "
        f"({size(summary.partial_size_bytes)})",
    ]
    if summary.datasets:
        rows = [[d.uris[0] if d.uris else d.key, str(d.num_items), size(d.size_bytes),
                 ago(d.last_access)] for d in summary.datasets]
        lines += ["", format_pretty_table(
            rows, ["Dataset", "Items", "Size", "Last access"])]
    return "\n".join(lines)
