"""Audit: who the cache served, and roughly how much waiting it saved them.

Reads only the ``usage`` table (hourly aggregates that outlive item removal), so removed
items still count.  A hit saved what fetching that item took when it was last missed; the
duration is averaged over all history, not just the window, because an item is usually
fetched once and then hit for weeks.  Items never seen missing (fetched before tracking
began) fall back to their broker scheme's observed throughput and are marked estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Set, Tuple

from .store.ledger import Ledger

GROUPINGS = ("user", "dataset", "item")


@dataclass(frozen=True)
class AuditRow:
    """One user, dataset or item's use of the cache."""

    key: str  # user@host, dataset UUID, or the cached file's path in the cache
    accesses: int
    hits: int
    misses: int
    hit_rate: float  # hits / accesses; 0.0 when there were no accesses
    bytes_served_from_cache: int  # sum of hit bytes
    estimated_seconds_saved: float
    estimated: bool  # True if any part used the scheme-throughput fallback
    uris: Tuple[str, ...] = ()  # of a dataset or an item: every URI it was read through
    item_relpath: Optional[str] = None  # of an item: its name in its dataset, if known


def audit(ledger: Ledger, by: str, since: Optional[float] = None) -> Tuple[AuditRow, ...]:
    """Usage grouped ``by`` "user", "dataset" or "item", most time saved first.

    ``since`` is a unix time; usage is kept in hour buckets, so a bucket counts whole if it
    ends after ``since`` (``hour * 3600 + 3600 > since``): the window may reach up to an
    hour further back than asked.
    """
    if by not in GROUPINGS:
        raise ValueError(f"cannot group by {by!r}; choose one of {', '.join(GROUPINGS)}")
    per_fetch = _seconds_per_fetch(ledger)
    scheme_of = _schemes(ledger)
    per_byte = _seconds_per_byte(ledger, scheme_of)
    totals: Dict[str, list] = {}
    uris: Dict[str, Set[str]] = {}
    for relpath, user, uri, uuid, hits, misses, hit_bytes in _window(ledger, since):
        if hits and relpath in per_fetch:
            saved, estimated = hits * per_fetch[relpath], False
        elif hits:
            rate = per_byte.get(scheme_of.get(relpath) or _scheme(uri))
            saved, estimated = (hit_bytes * rate if rate is not None else 0.0), True
        else:
            saved, estimated = 0.0, False
        key = {"user": user, "dataset": uuid or uri, "item": relpath}[by]
        if by != "user" and uri:
            uris.setdefault(key, set()).add(uri)
        acc = totals.setdefault(key, [0, 0, 0, 0.0, False])
        acc[0] += hits
        acc[1] += misses
        acc[2] += hit_bytes
        acc[3] += saved
        acc[4] = acc[4] or estimated
    names = ledger.names_of(sorted(totals)) if by == "item" else {}
    rows = (_row(key, hits, misses, hit_bytes, saved, estimated,
                 tuple(sorted(uris.get(key, ()))), names.get(key, (None, None))[1])
            for key, (hits, misses, hit_bytes, saved, estimated) in totals.items())
    return tuple(sorted(rows, key=lambda r: (-r.estimated_seconds_saved, r.key)))


def totals(rows: Iterable[AuditRow]) -> AuditRow:
    """All ``rows`` added up, under the key "TOTAL"."""
    rows = tuple(rows)
    return _row("TOTAL", sum(r.hits for r in rows), sum(r.misses for r in rows),
                sum(r.bytes_served_from_cache for r in rows),
                sum(r.estimated_seconds_saved for r in rows), any(r.estimated for r in rows))


def _row(key: str, hits: int, misses: int, hit_bytes: int, saved: float,
         estimated: bool, uris: Tuple[str, ...] = (), item_relpath: Optional[str] = None
         ) -> AuditRow:
    accesses = hits + misses
    return AuditRow(key, accesses, hits, misses, hits / accesses if accesses else 0.0,
                    hit_bytes, saved, estimated, uris, item_relpath)


def _window(ledger: Ledger, since: Optional[float]):
    # hour * 3600 + 3600 > since  <=>  hour >= floor(since / 3600), which uses the key's index.
    return ledger.usage_since(int(since // 3600) if since is not None else None)


def _seconds_per_fetch(ledger: Ledger) -> Dict[str, float]:
    """relpath -> mean measured fetch duration, over all history."""
    return {relpath: seconds / misses
            for relpath, seconds, misses in ledger.fetch_totals_per_file()}


def _schemes(ledger: Ledger) -> Dict[str, str]:
    """relpath -> broker scheme of the items the ledger still knows."""
    return ledger.schemes()


def _seconds_per_byte(ledger: Ledger, scheme_of: Dict[str, str]) -> Dict[str, float]:
    """scheme -> observed fetch seconds per byte, over all history of that scheme's items."""
    sums: Dict[str, list] = {}
    for relpath, uri, miss_bytes, seconds in ledger.miss_totals_per_file():
        acc = sums.setdefault(scheme_of.get(relpath) or _scheme(uri), [0, 0.0])
        acc[0] += miss_bytes
        acc[1] += seconds
    return {scheme: seconds / nbytes for scheme, (nbytes, seconds) in sums.items()
            if nbytes > 0 and seconds > 0}


def _scheme(uri: str) -> str:
    """The scheme of a removed item's dataset, from the uri its accesses recorded."""
    if not uri:
        return ""
    from dtoolcore.utils import generous_parse_uri  # on use: keeps the CLI's start-up short

    return generous_parse_uri(uri).scheme or "file"
