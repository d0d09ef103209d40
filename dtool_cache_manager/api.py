"""The Python API of the user's spec.

Every function takes ``cache_dir=None``, meaning dtool's configured cache, and the dataset
``uri`` as the user gave it (normalised with ``dtoolcore.utils.sanitise_uri``).  Readers fold
pending journals into the ledger first, so the numbers include accesses made a moment ago by
processes that are still running.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sqlite3
import time
from contextlib import contextmanager
from typing import Iterator, List, Optional

from . import diskindex, executor
from .holds import holders_of
from .layout import MetaPaths, resolve_cache_dir, sanitise_uri
from .ledger import ItemRow, Ledger, LedgerError, is_corruption, move_aside

logger = logging.getLogger(__name__)


@contextmanager
def open_ledger(cache_dir: Optional[str] = None) -> Iterator[Ledger]:
    """The ledger with every journal folded in.

    If we may not write it (a read-only member of a shared cache) or cannot (a full disk),
    the journals are folded into a private in-memory copy instead, with a warning for the
    latter.  A ledger found damaged while folding is moved aside and rebuilt.
    """
    paths = MetaPaths(resolve_cache_dir(cache_dir))
    ledger = _open(paths, readonly=not _writable(paths))
    try:
        yield ledger
    finally:
        ledger.close()


def _open(paths: MetaPaths, readonly: bool) -> Ledger:
    try:
        ledger = Ledger(paths, readonly=readonly)
    except LedgerError as exc:
        if readonly:
            raise
        logger.warning("dtool-cache-manager: %s; showing a read-only view", exc)
        return _open(paths, readonly=True)
    try:
        ledger.compact()
    except sqlite3.DatabaseError as exc:
        ledger.close()
        if readonly:
            raise LedgerError(f"cannot read ledger {paths.ledger}: {exc}") from exc
        if not is_corruption(exc):  # e.g. a full disk
            logger.warning("dtool-cache-manager: could not fold the journals into %s (%s); "
                           "figures may lag until it can be written", paths.ledger, exc)
            return _open(paths, readonly=True)
        move_aside(paths.ledger, exc)
        ledger = Ledger(paths)
        ledger.compact()
    return ledger


def _writable(paths: MetaPaths) -> bool:
    target = paths.meta_dir if os.path.isdir(paths.meta_dir) else paths.cache_dir
    return os.access(target, os.W_OK)


def _rows(uri: str, identifier: str, cache_dir: Optional[str]) -> List[ItemRow]:
    with open_ledger(cache_dir) as ledger:
        return ledger.items_for(sanitise_uri(uri), identifier)


def num_times_accessed(uri: str, identifier: str, cache_dir: Optional[str] = None) -> int:
    """How many times the item was accessed through the cache (hits + misses); 0 if never."""
    return sum(r.access_count for r in _rows(uri, identifier, cache_dir))


def last_time_accessed(uri: str, identifier: str,
                       cache_dir: Optional[str] = None) -> Optional[_dt.datetime]:
    """When the item was last accessed (UTC, timezone-aware), or None if never."""
    times = [r.last_access for r in _rows(uri, identifier, cache_dir) if r.last_access]
    if not times:
        return None
    return _dt.datetime.fromtimestamp(max(times), tz=_dt.timezone.utc)


def num_days_since_last_accessed(uri: str, identifier: str,
                                 cache_dir: Optional[str] = None) -> Optional[float]:
    """Days (fractional) since the last access, or None if never accessed."""
    last = last_time_accessed(uri, identifier, cache_dir)
    if last is None:
        return None
    return (time.time() - last.timestamp()) / 86400.0


def cache_item_lock_counter(uri: str, identifier: str, cache_dir: Optional[str] = None) -> int:
    """Number of live processes holding the item; a killed process stops counting at once."""
    paths = MetaPaths(resolve_cache_dir(cache_dir))
    return len(holders_of(paths, identifier, uri=sanitise_uri(uri)))


def remove_cache_item_safely(uri: str, identifier: str, cache_dir: Optional[str] = None) -> bool:
    """Remove the item's cached file and ledger row unless a live process holds it.

    Returns True if a file was removed.  The check and the unlink happen under the item's
    exclusive gate, so no access can take a hold in between.
    """
    uri = sanitise_uri(uri)
    with open_ledger(cache_dir) as ledger:
        rows = ledger.items_for(uri, identifier)
        outcomes = [executor.remove_item(ledger, row, uri=uri) for row in rows]
    return any(o.removed for o in outcomes)


def release(uri: str, identifier: str, cache_dir: Optional[str] = None) -> int:
    """Stop this process holding the item, so a cleaner may take it; returns holds released."""
    from . import tracking

    return tracking.release(resolve_cache_dir(cache_dir), sanitise_uri(uri), identifier)


def hold_scope(*args, **kwargs):
    """See :func:`tracking.hold_scope` (imported on use: the CLI never needs the hooks)."""
    from . import tracking

    return tracking.hold_scope(*args, **kwargs)


def cache_size(cache_dir: Optional[str] = None) -> int:
    """Bytes of cached item files on disk (partial downloads included, our bookkeeping not)."""
    return sum(d.file_bytes + d.partial_bytes for d in _dir_totals(cache_dir))


def cache_num_items(cache_dir: Optional[str] = None) -> int:
    """Number of complete cached item files on disk."""
    return sum(d.num_files for d in _dir_totals(cache_dir))


def _dir_totals(cache_dir: Optional[str]) -> List[diskindex.DirTotals]:
    from .report import indexed  # report builds on this module

    with indexed(resolve_cache_dir(cache_dir)) as index:
        return diskindex.dir_totals(index.conn)
