"""The Python API of the dtool cache manager specification.

Every function takes ``cache_dir=None``, meaning dtool's configured cache, and the dataset
``uri`` as the user gave it (normalised with ``dtoolcore.utils.sanitise_uri``).  Readers fold
pending journals into the ledger first, so the numbers include accesses made a moment ago by
processes that are still running.
"""

from __future__ import annotations

import datetime as _dt
import os
import time
from typing import List, Optional, Tuple

from . import cachefs, executor, sharing
from .store import coordinator
from .store import diskindex
from .holds import live_holds
from .layout import resolve_cache_dir, sanitise_uri
from .store.ledger import open_ledger


def _check_item(uri: str, identifier: str) -> str:
    """The normalised URI; TypeError or ValueError for what cannot name an item."""
    if not isinstance(identifier, str):
        raise TypeError(f"an item identifier must be a string, not {type(identifier).__name__}")
    if not identifier:
        raise ValueError("empty item identifier")
    return sanitise_uri(uri)


def _history(uri: str, identifier: str, cache_dir: Optional[str]) -> Tuple[int, Optional[float]]:
    uri = _check_item(uri, identifier)
    with open_ledger(cache_dir) as ledger:
        return ledger.history_of(uri, identifier)


def num_times_accessed(uri: str, identifier: str, cache_dir: Optional[str] = None) -> int:
    """How many times the item was accessed through the cache (hits + misses); 0 if never.

    All recorded history, as ``dtool cache audit --by item`` counts it: accesses of copies
    since removed count too.  (``dtool cache ls`` shows the uses of the copy now cached.)"""
    return _history(uri, identifier, cache_dir)[0]


def last_time_accessed(uri: str, identifier: str,
                       cache_dir: Optional[str] = None) -> Optional[_dt.datetime]:
    """When the item was last accessed (UTC, timezone-aware), or None if never: exact while
    it is cached; once removed, to the hour (usage history is kept per hour)."""
    last = _history(uri, identifier, cache_dir)[1]
    if last is None:
        return None
    return _dt.datetime.fromtimestamp(last, tz=_dt.timezone.utc)


def num_days_since_last_accessed(uri: str, identifier: str,
                                 cache_dir: Optional[str] = None) -> Optional[float]:
    """Days (fractional) since the last access, or None if never accessed."""
    last = last_time_accessed(uri, identifier, cache_dir)
    if last is None:
        return None
    return (time.time() - last.timestamp()) / 86400.0


def cache_item_lock_counter(uri: str, identifier: str, cache_dir: Optional[str] = None) -> int:
    """Number of live processes holding the item's cached files; a killed process stops
    counting at once."""
    uri = _check_item(uri, identifier)
    with open_ledger(cache_dir) as ledger:
        holds = live_holds(ledger.cache)
        relpaths = {row.relpath for row in ledger.items_for(uri, identifier)}
        # A file held but not yet journalled (its first fetch in progress) has no row yet.
        relpaths.update(p for p in holds.paths if p.rsplit("/", 1)[-1].startswith(identifier)
                        and ledger.item(p) is None)
    return len({h for relpath in relpaths for h in holds.holders_of(relpath)})


def remove_cache_item_safely(uri: str, identifier: str, cache_dir: Optional[str] = None) -> bool:
    """Remove the item's cached file and ledger row unless a live process holds it.

    Returns True if a file was removed.  The check and the unlink happen under the item's
    exclusive gate, so no access can take a hold in between.
    """
    uri = _check_item(uri, identifier)
    with open_ledger(cache_dir) as ledger:
        rows = ledger.items_for(uri, identifier)
        outcomes = [executor.remove_item(ledger, row) for row in rows]
    return any(o.removed for o in outcomes)


def release(uri: str, identifier: str, cache_dir: Optional[str] = None) -> int:
    """Stop this process holding the item, so a cleaner may take it; returns holds released."""
    from .hooks import tracking

    uri = _check_item(uri, identifier)
    return tracking.release(resolve_cache_dir(cache_dir), uri, identifier)


def hold_scope(*args, **kwargs):
    """See :func:`tracking.hold_scope` (imported on use: the CLI never needs the hooks)."""
    from .hooks import tracking

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
        return index.disk.dir_totals()


def register_coordinator(database: str, cache_dir: Optional[str] = None,
                         session_timeout: int = sharing.DEFAULT_SESSION_TIMEOUT,
                         grace_seconds: int = sharing.DEFAULT_GRACE_SECONDS
                         ) -> sharing.Registration:
    """Make the PostgreSQL server at ``database`` the coordinator of the cache, for every
    process, user and host that uses it (``dtool cache init --database``).

    The server is reached first (:class:`~dtool_cache_manager.store.coordinator.
    CoordinatorUnavailable` if it cannot be, or is older than PostgreSQL 14).  Then the
    registration is written, the trash made, and the ledger switched from WAL to a rollback
    journal under the coordinator's ledger lock.  Only the bookkeeping's owner or root may
    (:class:`~dtool_cache_manager.errors.InvalidInput`, as for a URL with a password)."""
    path = resolve_cache_dir(cache_dir)
    with cachefs.open_cache(path) as cache:
        registration = sharing.new_registration(cache, database, session_timeout,
                                                grace_seconds)
        coordinator.check_server(registration)
        sharing.declare(cache, False, registration)
        trash = cachefs.open_trash(cache)
        if trash is not None:
            os.close(trash)
    with open_ledger(path):  # switches the journal mode, alone on every host
        pass
    return registration
