"""The usage ledger: one SQLite file per cache directory, fed from the access journals.

Why SQLite in WAL mode: readers never block the compactor or each other, a transaction makes
each batch of journal lines count exactly once (the journal offset is committed with the
counts), and its rows are plain SQL that anyone can query.  The hot path never opens it; see
:mod:`journal` and ``docs/design.rst``.

In a cache with a coordinator, several hosts use the ledger, and WAL's shared memory does
not reach across hosts.  There every use of the ledger holds the coordinator's ``ledger``
lock from before SQLite opens the file until after it closes it, so that one process of
one host at a time has it open, and the ledger keeps a rollback journal (``TRUNCATE``
mode) instead of a WAL: opening after the previous user closed is what NFS's
close-to-open consistency makes safe (``docs/multi-host.rst``).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from .. import cachefs, holds, journal
from . import diskindex
from ..cachefs import CacheDir
from ..errors import CacheManagerError, UnsafeCache
from ..layout import (from_db, is_item_relpath, resolve_cache_dir, row_ok, to_db,
                     user_at_host)
from .coordinator import coordinator_of

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 9
CACHE_KIB = 262144  # page cache: a million-file index fits, so updates do not thrash
# A removal is remembered this long, so that an access journalled before it and folded in
# after it does not bring back the row (see _Batch); a later straggler is reconciled away.
REMOVALS_KEPT_SECONDS = 86400.0
LEDGER_FILES = cachefs.LEDGER_FILES
COMMIT_EVERY = 8192  # rows a clean drops per transaction (see RemovalRecorder)
FOLD_BATCH = 200_000  # journal records applied per batch of statements

Removed = Tuple[str, float, Optional[int]]  # (relpath, removed_at, inode or None)


def _add_column(conn: sqlite3.Connection, table: str, column: str) -> None:
    """Add ``column`` (name and type) unless the table has it or is not there yet (then the
    schema makes it as it is now)."""
    existing = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    if existing and column.split()[0] not in existing:
        conn.execute(f"ALTER TABLE {table} ADD COLUMN {column}")


def _rename_column(conn: sqlite3.Connection, table: str, old: str, new: str) -> None:
    if old in {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}:
        conn.execute(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")


def _add_dirs_last_access(conn: sqlite3.Connection) -> None:
    _add_column(conn, "dirs", "last_access REAL")
    conn.execute("UPDATE dirs SET mtime_ns = NULL")  # the next refresh recounts them all


def _rebuild(conn: sqlite3.Connection, table: str, definition: str) -> None:
    """Copy ``table`` into its new definition (SQLite cannot alter a table's storage)."""
    columns = ", ".join(r[1] for r in conn.execute(f"PRAGMA table_info({table})"))
    if not columns:
        return  # not made yet: the schema makes it as it is now
    conn.execute(definition.format(name=f"{table}_new"))
    conn.execute(f"INSERT INTO {table}_new ({columns}) SELECT {columns} FROM {table}")
    conn.execute(f"DROP TABLE {table}")  # with its indexes and triggers
    conn.execute(f"ALTER TABLE {table}_new RENAME TO {table}")


# Upgrades from each older version, applied in order in one transaction (a step is SQL or a
# function of the connection).  Version 3 adds the disk index (see :mod:`diskindex`); it is
# derived, so the first refresh fills it.  Version 4 drops three indexes that every removal
# paid for (a clean of 100k of a million items: 13.3 s of ledger statements became 7.3 s).
# Version 5 stores items and removals by path (no rowid, so no second B-tree of paths),
# indexes items by (uuid, identifier), which follows path order, instead of by identifier,
# whose hash order made a clean dirty that index's pages at random, and counts removed rows
# without a trigger.  Version 6 remembers the inode of each journal it read.  Version 7 tells
# untracked files from tracked ones in ``files.kind`` (was ``partial``), so that one index
# range counts or orders either kind: a summary of a cache of untracked files no longer
# scans the table once per directory; and keeps a digest of each directory's entries, so a
# directory a clean changed is checked with one listing instead of rescanned.  Version 8
# puts each file's size and access count in ``files_by_last_use``, so that a clean plans
# from the index alone, without reading a row of the table per file it removes.  Version 9
# indexes ``usage`` by item, for an item's history (``num_times_accessed``) after removal.
_MIGRATIONS = {
    1: ("ALTER TABLE items ADD COLUMN hash_function TEXT",
        "ALTER TABLE usage ADD COLUMN miss_bytes INTEGER NOT NULL DEFAULT 0"),
    2: ("DROP INDEX IF EXISTS items_by_last_access",  # files_by_last_access serves instead
        *diskindex.statements(diskindex.SCHEMA),
        "INSERT OR REPLACE INTO meta VALUES ('item_rows', (SELECT count(*) FROM items))",
        """INSERT OR IGNORE INTO dataset_uris (uuid, uri)
           SELECT DISTINCT items.uuid, item_uris.uri FROM items JOIN item_uris USING (relpath)"""),
    3: (_add_dirs_last_access,
        "DROP INDEX IF EXISTS item_uris_by_uri",  # the index of items serves items_for
        "DROP INDEX IF EXISTS files_by_dir",  # a directory's files are a primary key range
        "DROP INDEX IF EXISTS files_by_last_access",  # files_by_last_use serves instead
        "DROP INDEX IF EXISTS files_by_last_use"),  # made again on (partial, last_use): it
                                                    # then counts without reading rows
    4: (lambda conn: _rebuild(conn, "items", _ITEMS_TABLE),
        lambda conn: _rebuild(conn, "removals", _REMOVALS_TABLE)),
    5: (lambda conn: _add_column(conn, "journals", "ino INTEGER"),),  # a new file, old name
    6: (lambda conn: _rename_column(conn, "files", "partial", "kind"),
        f"UPDATE files SET kind = {diskindex.UNTRACKED} WHERE kind = 0 AND uuid IS NULL",
        lambda conn: _add_column(conn, "dirs", "racy INTEGER NOT NULL DEFAULT 0"),
        lambda conn: _add_column(conn, "dirs", "entries INTEGER"),
        lambda conn: _add_column(conn, "dirs", "digest INTEGER"),
        lambda conn: _add_column(conn, "journals", "hour INTEGER")),
    7: ("DROP INDEX IF EXISTS files_by_last_use",),  # made again with two more columns
    8: (),  # usage_by_item: the schema's statements make it
}

_ITEMS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    relpath TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    identifier TEXT NOT NULL,
    scheme TEXT NOT NULL,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    first_cached REAL,
    last_access REAL,
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0,
    fetch_seconds REAL NOT NULL DEFAULT 0,
    item_relpath TEXT,
    manifest_size INTEGER,
    manifest_hash TEXT,
    hash_function TEXT
) WITHOUT ROWID"""
_REMOVALS_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (relpath TEXT PRIMARY KEY, removed_at REAL NOT NULL)
WITHOUT ROWID"""

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
{_ITEMS_TABLE.format(name="items")};
CREATE INDEX IF NOT EXISTS items_by_dataset ON items (uuid, identifier);
CREATE TABLE IF NOT EXISTS item_uris (
    relpath TEXT NOT NULL, uri TEXT NOT NULL, PRIMARY KEY (relpath, uri)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS item_users (
    relpath TEXT NOT NULL, user TEXT NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0,
    last_access REAL,
    PRIMARY KEY (relpath, user)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS usage (
    hour INTEGER NOT NULL, relpath TEXT NOT NULL, user TEXT NOT NULL, uri TEXT NOT NULL,
    uuid TEXT NOT NULL, identifier TEXT NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0,
    hit_bytes INTEGER NOT NULL DEFAULT 0, miss_bytes INTEGER NOT NULL DEFAULT 0,
    fetch_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, relpath, user, uri)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS usage_by_item ON usage (identifier, uri);
{_REMOVALS_TABLE.format(name="removals")};
CREATE TABLE IF NOT EXISTS journals (token TEXT PRIMARY KEY, offset INTEGER NOT NULL,
                                     ino INTEGER, hour INTEGER);
CREATE TABLE IF NOT EXISTS journal_items (
    token TEXT NOT NULL, number INTEGER NOT NULL, relpath TEXT NOT NULL, uri TEXT NOT NULL,
    uuid TEXT NOT NULL, identifier TEXT NOT NULL, scheme TEXT NOT NULL,
    size INTEGER NOT NULL, mtime REAL NOT NULL,
    PRIMARY KEY (token, number)
) WITHOUT ROWID;
""" + diskindex.SCHEMA


# The number of ``items`` rows: counting a million rows costs 0.1 s, and every command
# compares it with the disk index's tracked files to catch stray rows.  Inserts are counted
# by a trigger; removals by the one statement that deletes rows (:meth:`Ledger._drop_removed`),
# which a trigger would cost a row update per row.
_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS items_counted_in AFTER INSERT ON items BEGIN
         UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'item_rows'; END""",
)


class LedgerError(CacheManagerError):
    """The ledger cannot be opened or written."""


class _Unusable(Exception):
    """A file that is a database but not a ledger we can use: moved aside like garbage."""


@dataclass(frozen=True)
class ItemRow:
    """One cached file as the ledger knows it."""

    relpath: str
    uuid: str
    identifier: str
    scheme: str
    size_bytes: int
    first_cached: Optional[float]
    last_access: Optional[float]
    hits: int
    misses: int
    fetch_seconds: float
    item_relpath: Optional[str]
    manifest_size: Optional[int]
    manifest_hash: Optional[str]
    hash_function: Optional[str]

    @property
    def access_count(self) -> int:
        return self.hits + self.misses


_ITEM_COLUMNS = ", ".join(ItemRow.__dataclass_fields__)


_ITEM_KINDS = "psssiNNiinSISS"  # see layout.row_ok


def _item_row(values) -> Optional[ItemRow]:
    """The row as an ItemRow, or None if a field has the wrong type (see layout.row_ok)."""
    return ItemRow(from_db(values[0]), *values[1:]) if row_ok(values, _ITEM_KINDS) else None


@dataclass
class _ItemTotals:
    """One file's accesses in a batch, as they change its ``items`` row."""

    __slots__ = ("uuid", "identifier", "scheme", "size_bytes", "first_cached", "last_access",
                 "hits", "misses", "fetch_seconds")
    uuid: str
    identifier: str
    scheme: str
    size_bytes: int  # as of the latest access
    first_cached: float  # the earliest mtime seen
    last_access: float
    hits: int
    misses: int
    fetch_seconds: float

    def row(self) -> tuple:
        return (self.uuid, self.identifier, self.scheme, self.size_bytes, self.first_cached,
                self.last_access, self.hits, self.misses, self.fetch_seconds)


@dataclass
class _UserTotals:
    """One user's accesses of one file in a batch (an ``item_users`` row)."""

    __slots__ = ("hits", "misses", "last_access")
    hits: int
    misses: int
    last_access: float


@dataclass
class _HourTotals:
    """Accesses of one file through one URI by one user in one hour (a ``usage`` row)."""

    __slots__ = ("uuid", "identifier", "hits", "misses", "hit_bytes", "miss_bytes",
                 "fetch_seconds")
    uuid: str
    identifier: str
    hits: int
    misses: int
    hit_bytes: int
    miss_bytes: int
    fetch_seconds: float

    def row(self) -> tuple:
        return (self.uuid, self.identifier, self.hits, self.misses, self.hit_bytes,
                self.miss_bytes, self.fetch_seconds)


class _Batch:
    """Journal records folded in memory, so one compaction issues one statement per row."""

    def __init__(self, removed_at: Dict[str, float]):
        self.removed_at = removed_at
        self.items: Dict[str, _ItemTotals] = {}
        self.uris: Set[Tuple[str, str]] = set()
        self.users: Dict[Tuple[str, str], _UserTotals] = {}
        self.usage: Dict[Tuple[int, str, str, str], _HourTotals] = {}
        self.manifests: Dict[str, journal.ManifestRecord] = {}
        self.lost = 0

    def add(self, rec) -> None:
        if isinstance(rec, journal.ManifestRecord):
            if is_item_relpath(rec.relpath):
                self.manifests[rec.relpath] = rec
            return
        if isinstance(rec, journal.LostRecord):
            self.lost += rec.count
            return
        if not is_item_relpath(rec.relpath):
            logger.warning("dtool-cache-manager: ignoring a journal record for %r: not a "
                           "cached item's path", rec.relpath)
            return
        hit, miss = (0, 1) if rec.miss else (1, 0)
        self.add_accesses(user_at_host(rec.user, rec.host), rec.relpath, rec.uri, rec.uuid,
                          rec.identifier, rec.scheme, rec.size, rec.mtime, int(rec.t // 3600),
                          rec.t <= self.removed_at.get(rec.relpath, float("-inf")),
                          hit, miss, rec.fetch_seconds * miss, rec.t)

    def add_accesses(self, user: str, relpath: str, uri: str, uuid: str, identifier: str,
                     scheme: str, size: int, mtime: float, hour: int, before_removal: bool,
                     hits: int, misses: int, fetch_seconds: float, last: float) -> None:
        """Accesses of one file in one hour, by ``user`` (user@host), added up; ``last`` the
        latest of them.  Those from before the file's last removal only add history."""
        use = self.usage.get((hour, relpath, user, uri))
        if use is None:
            use = self.usage[(hour, relpath, user, uri)] = _HourTotals(
                uuid, identifier, 0, 0, 0, 0, 0.0)
        use.hits += hits
        use.misses += misses
        use.hit_bytes += size * hits
        use.miss_bytes += size * misses
        use.fetch_seconds += fetch_seconds
        if before_removal:
            return  # the file these accesses saw has since been removed
        item = self.items.get(relpath)
        if item is None:
            item = self.items[relpath] = _ItemTotals(uuid, identifier, scheme, size, mtime,
                                                     last, 0, 0, 0.0)
        if last >= item.last_access:
            item.size_bytes = size  # size as of the latest access
        item.first_cached = min(item.first_cached, mtime)
        item.last_access = max(item.last_access, last)
        item.hits += hits
        item.misses += misses
        item.fetch_seconds += fetch_seconds
        self.uris.add((relpath, uri))
        who = self.users.get((relpath, user))
        if who is None:
            who = self.users[(relpath, user)] = _UserTotals(0, 0, last)
        who.hits += hits
        who.misses += misses
        who.last_access = max(who.last_access, last)


def _names_item(relpath: str, identifier: str) -> bool:
    """Does a record's identifier belong to the file it names?  (A cached file's name starts
    with its item's identifier.)"""
    return bool(identifier) and relpath.rsplit("/", 1)[-1].startswith(identifier)


class _Folding:
    """Journal records gathered across journals and applied in batches of
    :data:`FOLD_BATCH`: few statements for many small journals, bounded memory for a big
    one.  Format-2 accesses name their file by a number, defined earlier in the journal
    (perhaps in an earlier segment, folded before: then ``journal_items`` has it)."""

    def __init__(self) -> None:
        self.records: List[object] = []
        self.compact: List[Tuple[str, str, journal.HourSection]] = []
        self.pending = 0
        self.defs: Dict[str, Dict[int, Optional[journal.ItemDefinition]]] = {}
        self.new_defs: List[Tuple[str, journal.ItemDefinition]] = []
        self.applied = 0
        self.mismatched: Dict[str, Tuple[int, str]] = {}  # journal -> (count, writer)
        self.unknown: Dict[str, Tuple[int, str]] = {}

    def add(self, conn: sqlite3.Connection, records: List[object],
            source: journal.OpenJournal) -> None:
        defs = self.defs.setdefault(source.token, {})
        for rec in records:
            if isinstance(rec, journal.HourSection):
                self.compact.append((source.token, user_at_host(source.user, source.host), rec))
                self.pending += rec.count
                continue
            if isinstance(rec, journal.ItemDefinition):
                if is_item_relpath(rec.relpath) and _names_item(rec.relpath, rec.identifier):
                    defs[rec.number] = rec
                    self.new_defs.append((source.token, rec))
                else:
                    defs[rec.number] = None  # its accesses are ignored (and counted)
                    self._count(self.mismatched, source)
                continue
            if isinstance(rec, journal.AccessRecord) \
                    and not _names_item(rec.relpath, rec.identifier):
                self._count(self.mismatched, source)
                continue
            self.records.append(rec)
            self.pending += 1
        if self.pending >= FOLD_BATCH:
            self.flush(conn)

    @staticmethod
    def _count(tally: Dict[str, Tuple[int, str]], source: journal.OpenJournal,
               n: int = 1) -> None:
        count, _ = tally.get(source.name, (0, source.user))
        tally[source.name] = (count + n, source.user)

    def flush(self, conn: sqlite3.Connection) -> None:
        records, self.records = self.records, []
        compact, self.compact = self.compact, []
        self.pending = 0
        self._remember_definitions(conn)
        for token, _, section in compact:
            self._recall_definitions(conn, token, section.numbers())
        relpaths = {r.relpath for r in records if isinstance(r, journal.AccessRecord)}
        relpaths.update(d.relpath for defs in self.defs.values() for d in defs.values() if d)
        batch = _Batch(_removal_times(conn, relpaths))
        for rec in records:
            batch.add(rec)
        applied = sum(isinstance(r, journal.AccessRecord) for r in records)
        for token, user, section in compact:
            applied += self._add_compact(batch, token, user, section)
        Ledger._apply(conn, batch)
        self.applied += applied
        for name, (count, writer) in self.mismatched.items():
            logger.warning("dtool-cache-manager: ignored %d access records in journal %r "
                           "(written by %s) that name another item's file", count, name,
                           writer)
        for name, (count, writer) in self.unknown.items():
            logger.warning("dtool-cache-manager: %d accesses in journal %r (written by %s) "
                           "name items it never described: counted as lost", count, name,
                           writer)
        self.mismatched.clear()
        self.unknown.clear()

    def _add_compact(self, batch: "_Batch", token: str, user: str,
                     section: journal.HourSection) -> int:
        """Add an hour of a journal's format-2 accesses into ``batch`` per (file, before or
        after the file's last removal): the hits come counted per file; only a file removed
        within that very hour has its hits split at the removal, one by one."""
        defs = self.defs.get(token, {})
        start = section.hour * journal.HOUR_US
        sums: Dict[Tuple[int, bool], List[int]] = {}  # -> [hits, misses, fetch µs, last µs]

        def tally(number: int, before: bool, hits: int, misses: int, fetch: int,
                  last: int) -> None:
            entry = sums.get((number, before))
            if entry is None:
                sums[(number, before)] = [hits, misses, fetch, last]
            else:
                entry[0] += hits
                entry[1] += misses
                entry[2] += fetch
                entry[3] = max(entry[3], last)

        unknown = 0
        for number, (hits, last_us) in section.hits.items():
            d = defs.get(number)
            if d is None:
                unknown += hits
                continue
            removed = batch.removed_at.get(d.relpath)
            removed_us = -1 if removed is None else removed * 1e6
            if removed_us < start or removed_us >= start + journal.HOUR_US:
                tally(number, removed_us >= start, hits, 0, 0, start + last_us)
                continue
            for us in section.hit_times(number):  # removed within the hour: split there
                tally(number, start + us <= removed_us, 1, 0, 0, start + us)
        for number, us, fetch in section.misses:
            d = defs.get(number)
            if d is None:
                unknown += 1
                continue
            removed = batch.removed_at.get(d.relpath)
            t = start + us
            tally(number, removed is not None and t <= removed * 1e6, 0, 1, fetch, t)
        for (number, before), (hits, misses, fetch, last) in sums.items():
            d = defs[number]
            assert d is not None
            batch.add_accesses(user, d.relpath, d.uri, d.uuid, d.identifier, d.scheme, d.size,
                               d.mtime, section.hour, before, hits, misses, fetch / 1e6,
                               last / 1e6)
        if unknown:
            batch.lost += unknown
            count, _ = self.unknown.get(token, (0, user))
            self.unknown[token] = (count + unknown, user)
        return section.count - unknown

    def _remember_definitions(self, conn: sqlite3.Connection) -> None:
        """Keep this fold's definitions for later folds and later segments."""
        conn.executemany(
            "INSERT OR REPLACE INTO journal_items (token, number, relpath, uri, uuid, "
            "identifier, scheme, size, mtime) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(token, d.number, to_db(d.relpath), d.uri, d.uuid, d.identifier, d.scheme,
              d.size, d.mtime) for token, d in self.new_defs])
        self.new_defs.clear()

    def _recall_definitions(self, conn: sqlite3.Connection, token: str,
                            numbers: Iterable[int]) -> None:
        """Definitions from earlier folds of the numbers this fold has not seen."""
        defs = self.defs.setdefault(token, {})
        missing = [n for n in numbers if n not in defs]
        for row in diskindex.select_where_in(
                conn, "SELECT number, relpath, uri, uuid, identifier, scheme, size, mtime "
                      "FROM journal_items WHERE token = ? AND number", missing, (token,)):
            if row_ok(row, "ipssssin") and is_item_relpath(from_db(row[1])):
                defs[row[0]] = journal.ItemDefinition(row[0], from_db(row[1]), *row[2:])
        for n in missing:
            defs.setdefault(n, None)


class Ledger:
    """A connection to one cache directory's ledger.

    SQLite opens files by name, so the ledger is opened only where no member can swap its
    files or the directories on its path (``cache.unsafe`` is None: see :mod:`cachefs`).
    Only the bookkeeping's owner (or root) creates, upgrades in place or moves aside a
    ledger; members write into the existing files.  The connection may move to another
    thread (a clean records its removals on one), but only one thread uses it at a time.
    """

    def __init__(self, cache: CacheDir, readonly: bool = False, timeout: float = 30.0):
        self.cache = cache
        self.readonly = readonly
        self.timeout = timeout
        self._coordination = ExitStack()  # the coordinator's ledger lock, if any
        coordinator = coordinator_of(cache)  # raises CoordinatorUnavailable
        self.coordinated = coordinator is not None
        if coordinator is not None:  # raises CoordinatorBusy
            self._coordination.enter_context(
                coordinator.exclusive("ledger", patience=timeout))
        try:
            self.conn = self._open()  # the store's alone: callers outside use the methods
        except BaseException:
            self._coordination.close()
            raise

    @property
    def _journal_mode(self) -> str:
        return "TRUNCATE" if self.coordinated else "WAL"

    @property
    def index(self) -> diskindex.DiskIndex:
        """The disk index kept in this ledger (see :mod:`diskindex`)."""
        return diskindex.DiskIndex(self.conn, self.cache)

    # -- opening, corruption and schema ------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        cache = self.cache
        path = cache.ledger_path
        exists = cache.meta_fd is not None and \
            cachefs.entry_stat(cache.meta_fd, cachefs.LEDGER) is not None
        if not exists and (self.readonly or not cache.can_write_meta):
            # Nothing to read (yet): journals fold into a private in-memory ledger.
            self.readonly = True
            return self._memory()
        if cache.unsafe is not None:
            raise UnsafeLedger(f"cannot use the ledger: {cache.unsafe}")
        if self.readonly:
            # A read-only member folds pending journals into a private in-memory copy.
            return self._read_only_copy(path)
        try:
            return self._open_writable(path, exists)
        except (sqlite3.DatabaseError, _Unusable) as exc:
            if not is_corruption(exc):
                raise LedgerError(f"cannot open ledger {path}: {exc}") from exc
            move_aside(cache, exc)
            return self._open_writable(path, False)

    def _read_only_copy(self, path: str) -> sqlite3.Connection:
        # Without write access a WAL database opens only while its -shm exists; when it
        # does not, read the file as immutable (the copy is made at once, so it is brief).
        for query in ("mode=ro", "mode=ro&immutable=1"):
            try:
                source = sqlite3.connect(f"file:{path}?{query}", uri=True, timeout=self.timeout,
                                         isolation_level=None)
                try:
                    self._check_version(source)
                    conn = sqlite3.connect(":memory:", isolation_level=None,
                                           check_same_thread=False)
                    source.backup(conn)
                finally:
                    source.close()
                version = self._version(conn)
                if version < SCHEMA_VERSION:  # the copy is ours to upgrade
                    self._migrate(conn, version)
                return conn
            except sqlite3.OperationalError as exc:
                error = exc
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"cannot read ledger {path}: {exc}") from exc
        raise LedgerError(f"cannot read ledger {path}: {error}")

    @staticmethod
    def _memory() -> sqlite3.Connection:
        conn = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
        conn.executescript(_SCHEMA)
        return conn

    def _open_writable(self, path: str, exists: bool) -> sqlite3.Connection:
        if not exists:
            self._create(path)
        # mode=rw: never create a database where the ledger should be
        conn = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=self.timeout,
                               isolation_level=None, check_same_thread=False)
        try:
            if self.coordinated:  # per connection (only WAL is recorded in the file); a
                conn.execute("PRAGMA journal_mode=TRUNCATE")  # WAL ledger switches here
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            conn.execute("BEGIN IMMEDIATE")  # creators and upgraders take turns
            version = self._version(conn)
            if version < SCHEMA_VERSION:
                self._migrate(conn, version)
            conn.execute("COMMIT")
            self._check_version(conn)
        except BaseException:
            conn.close()
            raise
        self._keep_wal_files()
        return conn

    def _create(self, path: str) -> None:
        """Build a new ledger aside, then link it into place: many processes may find no
        ledger at once, and SQLite refuses (at once, whatever the timeout) to switch a file
        another process is creating to WAL mode.  Exactly one link wins."""
        meta_fd = self.cache.meta_fd
        assert meta_fd is not None
        tmp = f"{cachefs.LEDGER}.new-{os.getpid()}-{threading.get_ident()}"
        conn = sqlite3.connect(os.path.join(self.cache.meta_path, tmp), isolation_level=None)
        try:
            conn.execute(f"PRAGMA journal_mode={self._journal_mode}")  # WAL: in the file
            conn.execute("BEGIN IMMEDIATE")
            self._version(conn)
            conn.execute("COMMIT")
        finally:
            conn.close()
        try:
            fd, _ = cachefs.open_file(meta_fd, tmp, single_link=True)
            try:
                os.fchmod(fd, self.cache.infra_mode)  # members write into it
            finally:
                os.close(fd)
            cachefs.link_entry(meta_fd, tmp, cachefs.LEDGER)
        except FileExistsError:
            pass  # another process won; use theirs
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    cachefs.unlink_entry(meta_fd, tmp + suffix)
                except OSError:
                    pass

    def _keep_wal_files(self) -> None:
        """Members may not create files in the bookkeeping directory, yet a connection that
        writes needs the ``-wal`` and ``-shm`` files: the owner keeps them there (SQLite
        removes them when the last connection closes; they are then made again, empty)."""
        cache = self.cache
        if cache.meta_fd is None or not cache.can_write_meta or not cache.shared:
            return
        for name in (cachefs.ROLLBACK_JOURNAL,) if self.coordinated else cachefs.WAL_FILES:
            try:
                os.close(cachefs.create_file(cache.meta_fd, name, cache.infra_mode))
            except FileExistsError:
                pass
            except OSError as exc:
                logger.debug("dtool-cache-manager: cannot make %s (%r)", name, exc)

    @staticmethod
    def _version(conn: sqlite3.Connection) -> int:
        """The schema version, creating the schema in an empty database."""
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            for statement in diskindex.statements(_SCHEMA):
                conn.execute(statement)
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            conn.execute("INSERT INTO meta VALUES ('item_rows', 0)")
            for trigger in _TRIGGERS:
                conn.execute(trigger)
            return SCHEMA_VERSION
        if "meta" not in tables:
            raise _Unusable("it has no meta table: not a ledger of ours")
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _migrate(conn: sqlite3.Connection, version: int) -> None:
        if version not in _MIGRATIONS:
            raise _Unusable(f"schema {version} is too old to upgrade")
        logger.info("dtool-cache-manager: upgrading ledger schema %d -> %d", version,
                    SCHEMA_VERSION)
        for old in range(version, SCHEMA_VERSION):
            for step in _MIGRATIONS[old]:
                step(conn) if callable(step) else conn.execute(step)
        for statement in diskindex.statements(_SCHEMA):  # tables and indexes added since
            conn.execute(statement)
        for trigger in _TRIGGERS:
            conn.execute(trigger)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     (str(SCHEMA_VERSION),))

    @staticmethod
    def _check_version(conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None and int(row[0]) > SCHEMA_VERSION:
            raise LedgerError(f"ledger schema {row[0]} is newer than this dtool-cache-manager "
                              f"understands ({SCHEMA_VERSION}); upgrade dtool-cache-manager")

    def close(self) -> None:
        try:
            self.conn.close()
            if not self.readonly:
                self._keep_wal_files()
        finally:
            self._coordination.close()  # only once SQLite let go of the file

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # -- compaction --------------------------------------------------------------------

    def compact(self, only_token: Optional[str] = None, owner_leaving: bool = False) -> int:
        """Fold journals into the ledger (only those of the process ``only_token``, if
        given; ``owner_leaving``: that process is exiting); returns the number of accesses
        applied.

        Journals of dead processes, and segments their process has moved on from, are
        deleted once folded in, where we may (in a sticky directory: our own, or everyone's
        as the bookkeeping's owner or root); a journal we may not delete keeps its offset, so
        it is never counted twice.  Read-only ledgers fold into their in-memory view without
        deleting anything.
        """
        cache = self.cache
        finished: List[Tuple[str, os.stat_result]] = []
        folding = _Folding()
        files = journal.journal_files(cache)
        last_segment = {token: seq for _, token, seq in files}  # in segment order: the last
        liveness: Dict[str, bool] = {}
        with self._transaction() if not self.readonly else _nothing() as conn:
            conn = conn or self.conn
            offsets = {t: (o, ino, hour) for t, o, ino, hour in conn.execute(
                "SELECT token, offset, ino, hour FROM journals")}
            for name, token, seq in files:
                if only_token is not None and token != only_token:
                    continue
                opened, why = journal.open_journal(cache, name, token, seq)
                if opened is None:
                    if why != "gone":
                        logger.warning("dtool-cache-manager: not reading journal %r: %s",
                                       name, why)
                    continue
                try:
                    offset, ino, hour = offsets.get(name, (0, None, None))
                    if ino is not None and ino != opened.stat.st_ino:
                        offset, hour = 0, None  # another file under a name we read before
                    if not isinstance(hour, int) or not 0 <= hour < journal.MAX_HOUR:
                        hour = None
                    consumed, malformed = offset, 0
                    for records, consumed, bad, hour in journal.read_records(opened, offset,
                                                                             hour):
                        folding.add(conn, records, opened)
                        malformed += bad
                    if malformed:
                        logger.warning("dtool-cache-manager: skipped %d malformed lines in "
                                       "journal %r (written by %s)", malformed, name,
                                       opened.user)
                    if not self.readonly:
                        conn.execute("INSERT OR REPLACE INTO journals (token, offset, ino, "
                                     "hour) VALUES (?, ?, ?, ?)",
                                     (name, consumed, opened.stat.st_ino, hour))
                    # Done with: a segment its process has moved on from, or the last
                    # of a process that has gone (or is going: its own exit fold).
                    if seq < last_segment[token]:
                        finished.append((name, opened.stat))
                    else:
                        if token not in liveness:
                            liveness[token] = not owner_leaving \
                                and holds.owner_alive(cache, token)
                        if not liveness[token]:
                            finished.append((name, opened.stat))
                finally:
                    opened.close()
            folding.flush(conn)
        if not self.readonly and finished:
            self._delete_journals(finished)
        return folding.applied

    def _delete_journals(self, finished: Sequence[Tuple[str, os.stat_result]]) -> None:
        cache = self.cache
        deleted = []
        for name, st in finished:
            try:
                assert cache.journal_fd is not None
                cachefs.unlink_entry(cache.journal_fd, name + journal.SUFFIX, same_as=st)
            except FileNotFoundError:
                pass
            except OSError:
                continue  # another member's, in a sticky directory: its offset stays
            deleted.append((name,))
        if deleted:
            remaining = {token for _, token, _ in journal.journal_files(cache)}
            with self._transaction() as conn:
                conn.executemany("DELETE FROM journals WHERE token = ?", deleted)
                # the definitions of processes none of whose journals are left
                gone = [(t,) for (t,) in conn.execute("SELECT DISTINCT token FROM journal_items")
                        if t not in remaining]
                conn.executemany("DELETE FROM journal_items WHERE token = ?", gone)

    @staticmethod
    def _apply(conn: sqlite3.Connection, batch: _Batch) -> None:
        conn.executemany(
            """INSERT INTO items (relpath, uuid, identifier, scheme, size_bytes, first_cached,
                                  last_access, hits, misses, fetch_seconds)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (relpath) DO UPDATE SET
                 size_bytes = CASE WHEN excluded.last_access >= coalesce(last_access, 0)
                                   THEN excluded.size_bytes ELSE size_bytes END,
                 first_cached = min(coalesce(first_cached, excluded.first_cached),
                                    excluded.first_cached),
                 last_access = max(coalesce(last_access, 0), excluded.last_access),
                 hits = hits + excluded.hits, misses = misses + excluded.misses,
                 fetch_seconds = fetch_seconds + excluded.fetch_seconds""",
            [(to_db(relpath), *v.row()) for relpath, v in batch.items.items()])
        conn.executemany("INSERT OR IGNORE INTO item_uris (relpath, uri) VALUES (?, ?)",
                         [(to_db(r), uri) for r, uri in batch.uris])
        conn.executemany(
            """INSERT INTO item_users (relpath, user, hits, misses, last_access)
               VALUES (?, ?, ?, ?, ?)
               ON CONFLICT (relpath, user) DO UPDATE SET
                 hits = hits + excluded.hits, misses = misses + excluded.misses,
                 last_access = max(coalesce(last_access, 0), excluded.last_access)""",
            [(to_db(relpath), user, v.hits, v.misses, v.last_access)
             for (relpath, user), v in batch.users.items()])
        conn.executemany(
            """INSERT INTO usage (hour, relpath, user, uri, uuid, identifier, hits, misses,
                                  hit_bytes, miss_bytes, fetch_seconds)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (hour, relpath, user, uri) DO UPDATE SET
                 hits = hits + excluded.hits, misses = misses + excluded.misses,
                 hit_bytes = hit_bytes + excluded.hit_bytes,
                 miss_bytes = miss_bytes + excluded.miss_bytes,
                 fetch_seconds = fetch_seconds + excluded.fetch_seconds""",
            [(hour, to_db(relpath), user, uri, *v.row())
             for (hour, relpath, user, uri), v in batch.usage.items()])
        conn.executemany(
            """UPDATE items SET item_relpath = ?, manifest_size = ?, manifest_hash = ?,
                                hash_function = ?
               WHERE relpath = ? AND manifest_size IS NULL AND manifest_hash IS NULL""",
            [(m.item_relpath, m.manifest_size, m.manifest_hash, m.hash_function,
              to_db(m.relpath)) for m in batch.manifests.values()])
        diskindex.note_accesses(
            conn, [to_db(r) for r in batch.items],
            {(batch.items[r].uuid, uri) for r, uri in batch.uris if r in batch.items})
        if batch.lost:
            conn.execute("""INSERT INTO meta VALUES ('lost_records', ?)
                            ON CONFLICT (key) DO UPDATE SET
                              value = CAST(value AS INTEGER) + excluded.value""",
                         (batch.lost,))

    def row_count(self) -> int:
        """Rows in ``items``, as the triggers counted them."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'item_rows'").fetchone()
        return int(row[0]) if row else self.conn.execute("SELECT count(*) FROM items"
                                                          ).fetchone()[0]

    def lost_records(self) -> int:
        """Accesses that processes could not journal (full disk, quota), as they reported."""
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'lost_records'").fetchone()
        return int(row[0]) if row else 0

    # -- queries -----------------------------------------------------------------------

    def items(self) -> List[ItemRow]:
        return [row for row in map(_item_row, self.conn.execute(
            f"SELECT {_ITEM_COLUMNS} FROM items")) if row is not None]

    def item(self, relpath: str) -> Optional[ItemRow]:
        row = self.conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE relpath = ?",
                                (to_db(relpath),)).fetchone()
        return _item_row(row) if row else None

    def items_for(self, uri: str, identifier: str) -> List[ItemRow]:
        """Rows of the files that (uri, identifier) was served from."""
        return [row for row in map(_item_row, self.conn.execute(
            f"""SELECT {_ITEM_COLUMNS} FROM items
                WHERE relpath IN ({diskindex.PATHS_OF_IDENTIFIER}) AND EXISTS (
                  SELECT 1 FROM item_uris
                  WHERE item_uris.relpath = items.relpath AND item_uris.uri = ?)""",
            (identifier, uri))) if row is not None]

    def names_of(self, relpaths: Sequence[str]) -> Dict[str, Tuple[str, Optional[str]]]:
        """relpath -> (dataset UUID, the item's name in its dataset, if the manifest gave
        one) for those of ``relpaths`` the ledger tracks."""
        found: Dict[str, Tuple[str, Optional[str]]] = {}
        for relpath, uuid, name in diskindex.select_where_in(
                self.conn, "SELECT relpath, uuid, item_relpath FROM items WHERE relpath",
                [to_db(r) for r in relpaths]):
            if isinstance(uuid, str):
                found[from_db(relpath)] = (uuid, name if isinstance(name, str) else None)
        return found

    def datasets_of_dirs(self, dirs: Sequence[str]) -> Dict[str, str]:
        """directory -> the dataset UUID of the tracked files in it, where there is one."""
        found: Dict[str, str] = {}
        for relpath, dataset in diskindex.select_where_in(
                self.conn, "SELECT relpath, dataset FROM dirs WHERE relpath",
                [to_db(d) for d in dirs]):
            if isinstance(dataset, str) and dataset != "*":
                found[from_db(relpath)] = dataset
        return found

    def rows_not_indexed(self) -> List[str]:
        """Paths of rows that name no file of the disk index (written by hand, or by a
        hostile member): the rows a refresh must check."""
        return [from_db(r) for (r,) in self.conn.execute(
            "SELECT relpath FROM items AS i WHERE NOT EXISTS "
            "(SELECT 1 FROM files AS f WHERE f.relpath = i.relpath)")]

    def uris_of_files(self) -> Dict[str, Tuple[str, ...]]:
        """relpath -> every URI the file was read through, sorted."""
        found: Dict[str, List[str]] = {}
        for relpath, uri in self.conn.execute(
                "SELECT relpath, uri FROM item_uris ORDER BY relpath, uri"):
            found.setdefault(from_db(relpath), []).append(uri)
        return {relpath: tuple(uris) for relpath, uris in found.items()}

    def uris_of_datasets(self) -> Dict[str, Tuple[str, ...]]:
        """dataset UUID -> every URI its items were read through."""
        return {k: tuple(v) for k, v in diskindex.uris_of_datasets(self.conn).items()}

    # -- usage history, for audit -------------------------------------------------------

    def usage_since(self, first_hour: Optional[int]
                    ) -> Iterator[Tuple[str, str, str, str, int, int, int]]:
        """(relpath, user@host, uri, uuid, hits, misses, hit bytes) summed over the hours
        from ``first_hour`` on (None: all), one row per file, user and URI."""
        for relpath, *rest in self.conn.execute(
                """SELECT relpath, user, uri, uuid, sum(hits), sum(misses), sum(hit_bytes)
                   FROM usage WHERE ? IS NULL OR hour >= ?
                   GROUP BY relpath, user, uri, uuid""", (first_hour, first_hour)):
            yield (from_db(relpath), *rest)

    def fetch_totals_per_file(self) -> Iterator[Tuple[str, float, int]]:
        """(relpath, fetch seconds, misses) over all history, for files ever missed."""
        for relpath, seconds, misses in self.conn.execute(
                """SELECT relpath, sum(fetch_seconds), sum(misses) FROM usage
                   GROUP BY relpath HAVING sum(misses) > 0"""):
            yield from_db(relpath), seconds, misses

    def miss_totals_per_file(self) -> Iterator[Tuple[str, str, int, float]]:
        """(relpath, uri, bytes fetched, fetch seconds) over all history of misses."""
        for relpath, uri, miss_bytes, seconds in self.conn.execute(
                """SELECT relpath, uri, sum(miss_bytes), sum(fetch_seconds) FROM usage
                   WHERE misses > 0 GROUP BY relpath, uri"""):
            yield from_db(relpath), uri, miss_bytes, seconds

    def schemes(self) -> Dict[str, str]:
        """relpath -> broker scheme, of the files the ledger knows."""
        return {from_db(r): scheme for r, scheme in self.conn.execute(
            "SELECT relpath, scheme FROM items")}

    def history_of(self, uri: str, identifier: str) -> Tuple[int, Optional[float]]:
        """(accesses, last access) of (uri, identifier) over all its recorded history, the
        files since removed included, as ``audit --by item`` counts them.  The last access
        is exact while a file is cached; of removed files ``usage`` keeps the hour, so it is
        the end of that hour, or the removal if that came first."""
        count, removed_last = self.conn.execute(
            """SELECT sum(u.hits + u.misses),
                      max(min(u.hour * 3600 + 3600, coalesce(r.removed_at, 1e300)))
               FROM usage AS u LEFT JOIN removals AS r ON r.relpath = u.relpath
               WHERE u.identifier = ? AND u.uri = ?""", (identifier, uri)).fetchone()
        cached = [r.last_access for r in self.items_for(uri, identifier) if r.last_access]
        last = max(cached) if cached else removed_last
        return int(count or 0), (float(last) if last is not None else None)

    def uris_of(self, relpath: str) -> List[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT uri FROM item_uris WHERE relpath = ? ORDER BY uri", (to_db(relpath),))]

    def users_of(self, relpath: str) -> Dict[str, Tuple[int, int, float]]:
        """user@host -> (hits, misses, last_access)."""
        return {r[0]: (r[1], r[2], r[3]) for r in self.conn.execute(
            "SELECT user, hits, misses, last_access FROM item_users WHERE relpath = ?",
            (to_db(relpath),))}

    # -- removal -----------------------------------------------------------------------

    def forget(self, relpaths: Iterable[str], removed_at: Optional[float] = None) -> None:
        """Drop rows of removed files; accesses journalled before ``removed_at`` stay history."""
        when = time.time() if removed_at is None else removed_at
        self.forget_removed([(r, when, None) for r in relpaths], keep_newer=False)

    def forget_removed(self, removed: Sequence[Removed], keep_newer: bool = True) -> None:
        """Drop the rows of removed files, given as (relpath, removed_at, inode) (see
        :meth:`recording_removals`)."""
        with self.recording_removals(keep_newer) as recorder:
            recorder.record(sorted(removed, key=lambda r: r[0]))

    @contextmanager
    def recording_removals(self, keep_newer: bool = True) -> Iterator["RemovalRecorder"]:
        """Transactions in which a clean drops the rows of the files it removed, batch by
        batch while it goes on unlinking (so the two overlap); committed at the end, also
        when the clean is interrupted: what was recorded is true."""
        recorder = RemovalRecorder(self, keep_newer)
        try:
            recorder.ready()
            yield recorder
            recorder.ready()
            self.conn.execute("DELETE FROM removals WHERE removed_at < ?",
                              (time.time() - REMOVALS_KEPT_SECONDS,))
        finally:
            if self.conn.in_transaction:  # an error may have rolled it back already
                self.conn.execute("COMMIT")

    def _drop_removed(self, removed: Sequence[Removed], keep_newer: bool) -> None:
        """A few set statements over the batch staged in ``temp.gone``: each runs its
        B-tree work in one call, without the interpreter (and its lock) in between."""
        conn = self.conn
        diskindex.stage_removed(conn, [(to_db(r), when, ino) for r, when, ino in removed])
        if keep_newer:
            deleted = conn.execute("""DELETE FROM items WHERE relpath IN (
                              SELECT gone.relpath FROM temp.gone JOIN items USING (relpath)
                              WHERE coalesce(items.last_access, 0) <= gone.removed_at)""")
        else:
            deleted = conn.execute(
                "DELETE FROM items WHERE relpath IN (SELECT relpath FROM temp.gone)")
        conn.execute("UPDATE meta SET value = CAST(value AS INTEGER) - ? WHERE key = 'item_rows'",
                     (deleted.rowcount,))
        for table in ("item_uris", "item_users"):
            conn.execute(f"""DELETE FROM {table} WHERE relpath IN (
                               SELECT relpath FROM temp.gone WHERE NOT EXISTS (
                                 SELECT 1 FROM items WHERE items.relpath = gone.relpath))""")
        conn.execute("INSERT OR REPLACE INTO removals SELECT relpath, removed_at FROM temp.gone")
        diskindex.note_removed(conn)


class RemovalRecorder:
    """Drops the ledger rows of removed files, given as (relpath, removed_at, inode), and
    commits every :data:`COMMIT_EVERY` rows, so that a long clean lets the accesses'
    compactions take turns and the ledger's checkpoints stay small and happen while it
    unlinks, not all at its end.  Batches in path order visit each B-tree page once.

    With ``keep_newer``, a row whose last access is after its removal (the file was fetched
    again meanwhile and that access already folded in) is kept, as is an index row of a
    different inode (the new file, already indexed).
    """

    def __init__(self, ledger: Ledger, keep_newer: bool):
        self.ledger = ledger
        self.keep_newer = keep_newer
        self.pending = 0

    def ready(self) -> None:
        """Take the ledger's write lock again if a commit gave it up.  Call it where no
        item gate is held: locks are taken ledger first, then gates."""
        if not self.ledger.conn.in_transaction:
            self.ledger.conn.execute("BEGIN IMMEDIATE")

    def record(self, removed: Sequence[Removed]) -> None:
        self.ready()
        self.ledger._drop_removed(removed, self.keep_newer)
        self.pending += len(removed)
        if self.pending >= COMMIT_EVERY:
            self.ledger.conn.execute("COMMIT")
            self.pending = 0


def _removal_times(conn: sqlite3.Connection, relpaths: Iterable[str]) -> Dict[str, float]:
    """When each of ``relpaths`` was last removed, if it was: only the paths being folded in,
    as a clean may have just recorded a hundred thousand removals."""
    return {from_db(r): t for r, t in diskindex.select_where_in(
        conn, "SELECT relpath, removed_at FROM removals WHERE relpath",
        [to_db(r) for r in relpaths])}


@contextmanager
def _nothing() -> Iterator[None]:
    yield None



# SQLite's primary result codes that mean the file is damaged (SQLITE_CORRUPT,
# SQLITE_NOTADB); busy, locked, read-only, full or I/O errors are reported instead.
_DAMAGE_CODES = {11, 26}


def is_corruption(exc: Exception) -> bool:
    """Only damage moves a ledger aside; a busy or read-only ledger is an error to report.
    Classified by SQLite's result code (Python 3.11 and later give it); a ledger missing a
    table or column of ours is damaged too, and older Pythons are judged by the message."""
    if isinstance(exc, _Unusable):
        return True
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc).lower()
    if "no such table" in text or "no such column" in text:
        return True
    if isinstance(code, int):
        return code & 0xFF in _DAMAGE_CODES  # extended codes keep the primary in the low byte
    return any(s in text for s in ("not a database", "malformed", "corrupt"))


def move_aside(cache: CacheDir, why: Exception) -> str:
    """Keep a damaged ledger for inspection and make room for a new one; the cached files
    are not touched, and journals not yet folded are folded into the new ledger.  Only the
    bookkeeping's owner (or root) may."""
    if cache.meta_fd is None or not cache.can_write_meta:
        owner = cachefs.user_name(cache.meta_stat.st_uid if cache.meta_stat else None)
        raise LedgerError(f"the ledger {cache.ledger_path} is damaged ({why}); its owner "
                          f"({owner}) rebuilds it at their next 'dtool cache' command")
    aside = ""
    for name in LEDGER_FILES:
        aside = aside or cachefs.rename_aside(cache.meta_fd, name, "corrupt")
    logger.warning("dtool-cache-manager: ledger %s is unreadable (%s); moved it to %s and "
                   "started a new one (no cached file was touched)", cache.ledger_path, why,
                   aside)
    return aside


class UnsafeLedger(LedgerError, UnsafeCache):
    """The ledger's path could be swapped by a member: it is not opened at all."""


# -- opening, with recovery --------------------------------------------------------------


@contextmanager
def open_ledger(cache_dir: Optional[str] = None) -> Iterator[Ledger]:
    """The ledger with every journal folded in.

    If we may not write it (a read-only member of a shared cache) or cannot (a full disk),
    the journals are folded into a private in-memory copy instead, with a warning for the
    latter.  A ledger found damaged while folding is moved aside and rebuilt.  Where the
    ledger could be swapped by a member (see ``docs/security.rst``), raises
    :class:`~dtool_cache_manager.errors.UnsafeCache` with a one-line reason.
    """
    path = resolve_cache_dir(cache_dir)
    cache = cachefs.open_cache(path, repair=True) if os.path.isdir(path) \
        else cachefs.absent(path)
    try:
        ledger = _open(cache, readonly=not _writable(cache))
    except BaseException:
        cache.close()
        raise
    try:
        yield ledger
    finally:
        ledger.close()
        cache.close()


def _open(cache: cachefs.CacheDir, readonly: bool) -> Ledger:
    try:
        ledger = Ledger(cache, readonly=readonly)
    except UnsafeLedger:
        raise
    except LedgerError as exc:
        if readonly:
            raise
        if cache.can_write_meta or "readonly" not in str(exc):
            logger.warning("dtool-cache-manager: %s; showing a read-only view", exc)
        return _open(cache, readonly=True)
    try:
        ledger.compact()
    except sqlite3.DatabaseError as exc:
        ledger.close()
        if readonly:
            raise LedgerError(f"cannot read ledger {cache.ledger_path}: {exc}") from exc
        if not is_corruption(exc):  # e.g. a full disk
            logger.warning("dtool-cache-manager: could not fold the journals into %s (%s); "
                           "figures may lag until it can be written", cache.ledger_path, exc)
            return _open(cache, readonly=True)
        move_aside(cache, exc)
        ledger = Ledger(cache)
        ledger.compact()
    return ledger


def _writable(cache: cachefs.CacheDir) -> bool:
    """May we write the ledger?  Its owner may; a member may write an existing one."""
    if cache.meta_fd is None:
        return False
    if cache.can_write_meta:
        return True
    st = cachefs.entry_stat(cache.meta_fd, cachefs.LEDGER)
    return st is not None and os.access(cache.ledger_path, os.W_OK)
