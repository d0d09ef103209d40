"""The disk index: what the cache directory holds, kept in the ledger, refreshed per directory.

A full walk with a ``stat`` per file costs seconds at a million files (``du -sb`` takes 3.3 s
here), yet the disk is the truth: files appear and vanish behind our back.  A directory's
mtime changes whenever an entry is added, removed or renamed in it, so a refresh stats each
known directory and rescans only those whose mtime moved.  A rescan reads names and inode
numbers (free from ``readdir``) and stats only new or replaced entries (a new inode), so a
dataset directory that gained one file costs one ``stat`` plus a name listing.

Like git's index, a directory changed within :data:`RACY_SECONDS` of its scan is not
trusted (a later change within the same clock tick would leave its mtime unchanged): it is
checked again next time.

A directory whose mtime moved is first *checked*: one listing of its names and inode
numbers, folded into a digest (:func:`entries_digest`) and compared with the one kept for
it.  Equal, the index already holds exactly those entries: nothing more to do.  This is
what a clean leaves behind: it knows what it removed, and takes those entries off the
digest as it drops their rows, so the next command lists each directory it changed
instead of rescanning it.  What this cannot see, by design: a file rewritten in place under the
same name and inode (dtool never does this; brokers write a temporary file and rename it)
and atime changes of files no hook has seen.  ``refresh(full=True)`` restats everything.

The first scan of a cache (every directory new: a cache filled before the plugin came)
indexes every file: a worker thread lists the next directories while this one stores the
last, each as one statement that SQLite runs without the GIL (:class:`_Prefetcher`); the
secondary indexes are sorted once, at the end; it commits as it goes, so an interrupted
first scan goes on where it stopped.  Untracked files are first-class: ``files.kind`` tells
them from tracked ones and partial downloads, so one index range counts or orders either.

The ``files`` rows also carry the ledger's last access, access count and UUID of each file,
so that reports, ``ls --sort accessed`` and LRU cleaning are index queries, not joins of a
million rows.  The ledger's compaction and removals keep them in step (see :mod:`ledger`).
Everything here is derived: a damaged ledger is rebuilt by one full scan.
"""

from __future__ import annotations

import contextlib
import heapq
import operator
import json
import os
import zlib
import sqlite3
import stat
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import (Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set,
                    Tuple)

from .. import cachefs
from ..cachefs import CacheDir, Refused
from ..layout import META_DIRNAME, from_db, row_ok, to_db

PARTIAL_SUFFIX = ".tmp"
# What a ``files`` row is, in one small integer, so that one index serves tracked and
# untracked files alike (see files_by_last_use).
TRACKED, PARTIAL, UNTRACKED = 0, 1, 2
RACY_SECONDS = 2.0  # coarse filesystem clocks tick in 4-10 ms; some network ones in 1-2 s
_HEX40 = frozenset("0123456789abcdef")

SCHEMA = """
CREATE TABLE IF NOT EXISTS dirs (
    relpath TEXT PRIMARY KEY,            -- '' is the cache directory itself
    parent TEXT,
    mtime_ns INTEGER,                    -- as last scanned (NULL: rescan at the next refresh)
    racy INTEGER NOT NULL DEFAULT 0,     -- scanned within RACY_SECONDS of its mtime: recheck
    entries INTEGER, digest INTEGER,     -- its listing, as entries_digest folds it (NULL: none)
    num_files INTEGER NOT NULL DEFAULT 0, file_bytes INTEGER NOT NULL DEFAULT 0,
    num_partial INTEGER NOT NULL DEFAULT 0, partial_bytes INTEGER NOT NULL DEFAULT 0,
    num_untracked INTEGER NOT NULL DEFAULT 0, untracked_bytes INTEGER NOT NULL DEFAULT 0,
    dataset TEXT,                        -- UUID of its tracked files ('*' when they differ)
    last_access REAL,                    -- the latest of its files' (as of its last count)
    skipped TEXT                         -- JSON [[relpath, why], ...]: entries not counted
);
CREATE INDEX IF NOT EXISTS dirs_by_parent ON dirs (parent);
CREATE TABLE IF NOT EXISTS files (
    relpath TEXT PRIMARY KEY, dir TEXT NOT NULL, ino INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL, mtime REAL NOT NULL, atime REAL NOT NULL,
    kind INTEGER NOT NULL,               -- TRACKED 0, PARTIAL 1 ('*.tmp'), UNTRACKED 2
    identifier TEXT,                     -- the ledger's (NULL: untracked, see _files)
    uuid TEXT, last_access REAL, access_count INTEGER NOT NULL DEFAULT 0,  -- from the ledger
    last_use REAL NOT NULL               -- last access, else the later of atime and mtime
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_last_use ON files (kind, last_use, size_bytes, access_count);
CREATE TABLE IF NOT EXISTS unindexed (relpath TEXT PRIMARY KEY, dir TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dataset_uris (
    uuid TEXT NOT NULL, uri TEXT NOT NULL, PRIMARY KEY (uuid, uri)
) WITHOUT ROWID;
"""

def statements(script: str) -> List[str]:
    """The SQL statements of ``script``, split where SQLite says one is complete (a ';' in a
    comment or a trigger body does not end one)."""
    found, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                found.append(current.strip())
            current = ""
    return found


# Indexes a first refresh builds at the end.  There is no index by directory: a directory's
# files are neighbours in the primary key (see _in_dir), and each index costs every removal.
_SECONDARY_INDEXES = [(s.split()[5], s.strip()) for s in statements(SCHEMA)
                      if s.strip().startswith("CREATE INDEX IF NOT EXISTS files_")]

FILE_COLUMNS = ("relpath", "size_bytes", "mtime", "atime", "identifier", "uuid",
                "last_access", "access_count")


@dataclass(frozen=True)
class IndexedFile:
    """One file of the cache as the index knows it (ledger facts included)."""

    relpath: str
    size_bytes: int
    mtime: float
    atime: float
    identifier: Optional[str]
    uuid: Optional[str]  # None: untracked (never seen by a hook)
    last_access: Optional[float]
    access_count: int


@dataclass(frozen=True)
class Refresh:
    """What a refresh did."""

    rescanned_dirs: int
    stat_calls: int
    vanished: Tuple[str, ...]  # ledger rows whose files are gone: for the caller to reconcile


def dirname(relpath: str) -> str:
    return os.path.dirname(relpath)


def identifier_of(name: str) -> Optional[str]:
    """The identifier a cached file's name starts with (40 hex digits), if it does."""
    head = name[:40]
    return head if len(head) == 40 and _HEX40.issuperset(head) else None


def _under(prefix: str) -> Tuple:
    """Bounds of every path strictly under directory ``prefix``, for a range query."""
    return to_db(prefix + "/"), to_db(prefix + "0")  # '0' follows '/'


def _files_under(rel: str) -> Tuple[str, tuple]:
    """SQL condition and parameters: a ``files`` row anywhere under directory ``rel``.  Two
    ranges of the primary key: a path is stored as text, or as bytes when it is not UTF-8
    (and SQLite orders all text before all bytes)."""
    low, high = _under(rel)
    return ("((relpath >= ? AND relpath < ?) OR (relpath >= ? AND relpath < ?))",
            (low, high, os.fsencode(rel + "/"), os.fsencode(rel + "0")))


def _in_dir(rel: str) -> Tuple[str, tuple]:
    """SQL condition and parameters: a ``files`` row directly in directory ``rel`` (its
    subdirectories' rows lie in the same ranges; the root's files take a scan)."""
    if rel == "":
        return "dir = ''", ()
    under, params = _files_under(rel)
    return f"{under} AND dir = ?", (*params, to_db(rel))


# -- refresh ---------------------------------------------------------------------------


BUILDING = "index_building"  # meta key: a first scan is under way (its indexes come last)
COMMIT_FILES = 100_000  # a first scan commits every so many files: resumed, not restarted
SORT_CACHE_KIB = 8192  # page cache while a first scan sorts its indexes (see _create_indexes)


def refresh(conn: sqlite3.Connection, cache: CacheDir, full: bool = False,
            now: Optional[float] = None,
            progress: Optional[Callable[[int], None]] = None) -> Refresh:
    """Bring the index up to date with the disk; cheap when little changed.

    Every directory is reached from the cache root without following links (see
    :mod:`cachefs`), so a directory swapped for a link is seen as gone, never listed.
    Runs in its own transaction unless the caller has one open.  The first scan of a cache
    builds the index without its secondary indexes (made once at the end: several times
    faster) and commits every :data:`COMMIT_FILES` files, a directory at a time, so that an
    interrupted first scan goes on where it stopped.  ``progress`` is told how many files
    this refresh has indexed so far, after each directory.
    """
    now = time.time() if now is None else now
    known = {from_db(r): m for r, m in conn.execute("SELECT relpath, mtime_ns FROM dirs")}
    checks = {from_db(r): (racy, entries, digest) for r, racy, entries, digest in conn.execute(
        "SELECT relpath, racy, entries, digest FROM dirs WHERE mtime_ns IS NOT NULL")}
    fresh_index = "" not in known
    building = fresh_index or conn.execute("SELECT 1 FROM meta WHERE key = ?",
                                           (BUILDING,)).fetchone() is not None
    known.setdefault("", None)
    changed: List[Tuple[str, os.stat_result]] = []
    confirmed: List[Tuple[str, os.stat_result]] = []  # moved mtime, same entries
    gone: List[str] = []
    with cachefs.Dirs(cache.root_fd) as dirs:
        for rel, mtime_ns in sorted(known.items()):
            dirs.trim()
            try:
                if not cache.exists:
                    raise FileNotFoundError(cache.path)
                if rel == "":
                    st = os.fstat(cache.root_fd)
                else:
                    parent, name = dirs.entry(rel)
                    found = cachefs.entry_stat(parent, name)
                    if found is None:
                        raise FileNotFoundError(rel)
                    st = found
            except (FileNotFoundError, NotADirectoryError, Refused):
                gone.append(rel)
                continue
            except PermissionError:
                continue  # a parent we may not search: its rescan reports it
            if not stat.S_ISDIR(st.st_mode):
                gone.append(rel)
            elif full or mtime_ns is None:
                changed.append((rel, st))
            elif st.st_mtime_ns != mtime_ns or checks[rel][0]:
                digest = _listing_digest(dirs, rel) if checks[rel][2] is not None else None
                if digest is not None and digest == checks[rel][1:]:
                    confirmed.append((rel, st))
                else:
                    changed.append((rel, st))
        if not changed and not gone and not confirmed and not building:
            return Refresh(0, 0, ())
        scanner = _Scanner(conn, dirs, now, full, progress)
        own_transaction = not conn.in_transaction
        if own_transaction:
            conn.execute("BEGIN IMMEDIATE")
        try:
            if fresh_index:
                conn.execute("INSERT OR IGNORE INTO dirs (relpath, parent) VALUES ('', NULL)")
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, '1')", (BUILDING,))
                for name, _ in _SECONDARY_INDEXES:
                    conn.execute(f"DROP INDEX IF EXISTS {name}")
            for rel in sorted(gone, key=len):
                scanner.drop_dir(rel)
            for rel, st in confirmed:
                scanner.confirm(rel, st)
            # Taken from the end, in path order: rows arrive in key order.
            queue = sorted(changed, reverse=True)
            committed = 0
            with contextlib.ExitStack() as stack:
                prefetch = stack.enter_context(_Prefetcher(dirs)) if building else None
                while queue:
                    if prefetch is not None:
                        prefetch.ahead(queue)
                    rel, st = queue.pop()
                    listed = None if prefetch is None else prefetch.take(rel)
                    queue.extend(sorted(scanner.rescan(rel, st, listed), reverse=True))
                    if building and own_transaction and \
                            scanner.files - committed >= COMMIT_FILES:
                        conn.execute("COMMIT")  # what is scanned stays scanned
                        conn.execute("BEGIN IMMEDIATE")
                        committed = scanner.files
            if building:
                if own_transaction:
                    conn.execute("COMMIT")  # the rows are in; the indexes come apart
                    conn.execute("BEGIN IMMEDIATE")
                    _create_indexes(conn)
                else:
                    for _, statement in _SECONDARY_INDEXES:
                        conn.execute(statement)
                conn.execute("DELETE FROM meta WHERE key = ?", (BUILDING,))
                # rows from before the index existed whose files are gone
                scanner.vanished.update(r for (r,) in conn.execute(
                    "SELECT relpath FROM items WHERE relpath NOT IN (SELECT relpath FROM files)"))
        except BaseException:
            if own_transaction and conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if own_transaction:
            conn.execute("COMMIT")
    vanished = tuple(sorted(map(from_db, scanner.vanished)))
    return Refresh(scanner.rescanned, scanner.stats, vanished)


def _create_indexes(conn: sqlite3.Connection) -> None:
    """The secondary indexes of a first scan, in a transaction of their own.  Sorted on
    several threads: with a small page cache SQLite's sorter writes sorted runs to temporary
    files and merges them in parallel (a million files: 0.9-1.1 s against 1.7 s in one
    sort held in memory).  Should the temporary directory be full, sorted in memory."""
    cache_size = conn.execute("PRAGMA cache_size").fetchone()[0]
    threads = conn.execute("PRAGMA threads").fetchone()[0]
    try:
        conn.execute(f"PRAGMA cache_size=-{SORT_CACHE_KIB}")
        conn.execute(f"PRAGMA threads={min(4, os.cpu_count() or 1)}")
        for _, statement in _SECONDARY_INDEXES:
            conn.execute(statement)
    except sqlite3.OperationalError:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        conn.execute(f"PRAGMA cache_size={cache_size}")
        conn.execute("BEGIN IMMEDIATE")
        for _, statement in _SECONDARY_INDEXES:
            conn.execute(statement)
    finally:
        conn.execute(f"PRAGMA cache_size={cache_size}")
        conn.execute(f"PRAGMA threads={threads}")


_DIGEST_MOD = 1 << 62  # SQLite integers are 64-bit
_DIGEST_MUL = 0x9E3779B1


def entries_digest(names: Sequence[str], inodes: Sequence[int]) -> Tuple[int, int]:
    """A directory's listing, its entries' names and inode numbers, folded into (entries, a
    sum of their hashes, see :func:`entry_hash`): it changes when an entry is added, removed,
    renamed or replaced, and a removal can take its entry off without listing the directory
    again (:func:`note_removed`).  Summed in C: it runs for every file of a first scan."""
    encoded = "\0".join(names).encode("utf-8", "surrogateescape").split(b"\0") \
        if names else []
    return len(names), (sum(map(zlib.crc32, encoded)) * _DIGEST_MUL + sum(inodes)) \
        % _DIGEST_MOD


def entry_hash(name: str, ino: int) -> int:
    """One entry's part of a directory's digest (the same in every process)."""
    return zlib.crc32(name.encode("utf-8", "surrogateescape")) * _DIGEST_MUL + ino


def _listing_digest(dirs: cachefs.Dirs, rel: str) -> Optional[Tuple[int, int]]:
    """(entries, digest) of the directory now, from one listing; None if it cannot be
    listed (then it is rescanned, which says why)."""
    names: List[str] = []
    inodes: List[int] = []
    try:
        with os.scandir(dirs.fd(rel)) as it:
            for entry in it:
                if rel or entry.name != META_DIRNAME:
                    names.append(entry.name)
                    inodes.append(entry.inode())
    except (OSError, Refused):
        return None
    return entries_digest(names, inodes)


# Files of one directory, found by a listing: (relpath, dir, ino, size, mtime, atime,
# partial).  The complete files of a whole directory come as one statement, which SQLite
# runs without holding the GIL while the next directory is listed (see _Prefetcher): a JSON
# array (?3) of one string per file, _ROW_FORMAT: inode, size, mtime and atime in
# nanoseconds, each in 20 digits, then the name (?1 is the directory's path with a trailing
# '/', or '' for the root; ?2 its ``dir``).  Cut by position, this costs SQLite half what an
# array per file does, and Python half to write.  A time becomes seconds as os.stat_result
# makes them (whole seconds + nanoseconds * 1e-9, bit for bit).  Partial downloads, names
# that are not UTF-8 (stored as bytes, see layout.to_db) and times before 1970 come as
# parameters instead, one row each.
_ROW_FORMAT = "%020d%020d%020d%020d%s"
_NS_LIMIT = 10 ** 20
_NAME = operator.attrgetter("name")
_LISTED_FROM_JSON = """
    SELECT ?1 || substr(value, 81), ?2, CAST(substr(value, 1, 20) AS INTEGER),
           CAST(substr(value, 21, 20) AS INTEGER),
           CAST(substr(value, 41, 11) AS INTEGER) + CAST(substr(value, 52, 9) AS INTEGER) * 1e-9,
           CAST(substr(value, 61, 11) AS INTEGER) + CAST(substr(value, 72, 9) AS INTEGER) * 1e-9,
           0
    FROM json_each(?3)"""
_LISTED_FROM_PARAMS = "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"


def last_use_of(f: IndexedFile) -> float:
    """When a file was last used, as far as we know: its last access, or for a file no
    hook has seen, the later of its atime and mtime (all there is).  The one rule, used by
    the index (``last_use``, through :func:`last_use_sql`), the LRU order and the
    policies."""
    return f.last_access if f.last_access is not None else max(f.mtime, f.atime)


def last_use_sql(last_access: str, mtime: str, atime: str) -> str:
    """:func:`last_use_of` as an SQL expression of the given columns."""
    return f"coalesce({last_access}, max({mtime}, {atime}))"


def _store_files_sql(listed: str, with_ledger: bool) -> str:
    """Statement storing listed files.  With the ledger, an upsert in which the ledger says
    whether each file is tracked (and lends its facts); without (a new directory and an
    empty ledger: a cache filled before the plugin), plain untracked rows, no join."""
    head = f"""WITH listed (relpath, dir, ino, size_bytes, mtime, atime, partial) AS ({listed})
    INSERT INTO files (relpath, dir, ino, size_bytes, mtime, atime, kind, identifier, uuid,
                       last_access, access_count, last_use)"""
    if not with_ledger:
        return head + f"""
    SELECT relpath, dir, ino, size_bytes, mtime, atime,
           CASE WHEN partial THEN {PARTIAL} ELSE {UNTRACKED} END, NULL, NULL, NULL, 0,
           {last_use_sql("NULL", "mtime", "atime")}
    FROM listed"""
    return head + f"""
    SELECT n.relpath, n.dir, n.ino, n.size_bytes, n.mtime, n.atime,
           CASE WHEN n.partial THEN {PARTIAL} WHEN i.uuid IS NULL THEN {UNTRACKED}
                ELSE {TRACKED} END,
           i.identifier, i.uuid, i.last_access, coalesce(i.hits + i.misses, 0),
           {last_use_sql("i.last_access", "n.mtime", "n.atime")}
    FROM listed AS n LEFT JOIN items AS i ON i.relpath = n.relpath
    WHERE true
    ON CONFLICT (relpath) DO UPDATE SET
      ino = excluded.ino, size_bytes = excluded.size_bytes, mtime = excluded.mtime,
      atime = excluded.atime,
      kind = CASE WHEN excluded.kind = {PARTIAL} THEN {PARTIAL}
                  WHEN uuid IS NULL THEN {UNTRACKED} ELSE {TRACKED} END,
      last_use = {last_use_sql("last_access", "excluded.mtime", "excluded.atime")}"""


# (from JSON, with the ledger) -> statement
_STORE_FILES = {(from_json, with_ledger): _store_files_sql(
    _LISTED_FROM_JSON if from_json else _LISTED_FROM_PARAMS, with_ledger)
    for from_json in (True, False) for with_ledger in (True, False)}


@dataclass
class _Listing:
    """One directory as one listing of its descriptor found it."""

    digest: Tuple[int, int]  # see entries_digest
    subdirs: List[str]  # names
    skipped: List[Tuple[str, str]]  # (relpath, why)
    file_names: List[str]  # regular files, as the listing says (see present)
    missing: Set[str]  # of those, the ones gone or not regular by the time of their stat
    rows_json: str  # complete files stat-ed: a JSON array of _ROW_FORMAT strings
    other_rows: List[tuple]  # (name, ino, size, mtime, atime, partial): partial downloads,
    #                          and names that are not UTF-8 (not JSON's to carry)
    totals: Tuple[int, int, int, int]  # (files, bytes, partial files, bytes) of those rows
    stat_calls: int

    def present(self) -> Set[str]:
        """Names of its regular files (a set made only when a rescan needs it)."""
        return set(self.file_names).difference(self.missing)


def _list_dir(dir_fd: int, prefix: str, known: Optional[Dict[str, int]] = None) -> _Listing:
    """List the directory open at ``dir_fd`` (``prefix``: its path and '/', or '' for the
    cache root) and ``stat`` its files: every one, or, given ``known`` (name -> inode of the
    files indexed), only new or replaced ones and partial downloads.

    Touches no database: a worker thread may run it (see :class:`_Prefetcher`).  One
    ``fstatat`` per file, in one thread: threads measured no faster (the GIL is the limit,
    see ``docs/performance.rst``).  Lean, as it runs for every file of a first scan.
    """
    names: List[str] = []
    inodes: List[int] = []
    file_names: List[str] = []
    subdirs: List[str] = []
    skipped: List[Tuple[str, str]] = []
    to_stat = []
    with os.scandir(dir_fd) as it:
        for entry in it:
            name = entry.name
            if not prefix and name == META_DIRNAME:
                continue
            ino = entry.inode()
            names.append(name)
            inodes.append(ino)
            if entry.is_file(follow_symlinks=False):
                file_names.append(name)
                if known is None or known.get(name) != ino or name.endswith(PARTIAL_SUFFIX):
                    to_stat.append(entry)
            elif entry.is_dir(follow_symlinks=False):
                subdirs.append(name)
            elif entry.is_symlink():
                skipped.append((prefix + name, "symbolic link, not followed"))
            else:
                skipped.append((prefix + name, "not a regular file"))
    rows: List[str] = []
    other_rows: List[tuple] = []
    missing: Set[str] = set()
    files = nbytes = partial = partial_bytes = 0
    utf8_dir = prefix.isascii() or _is_utf8(prefix)
    to_stat.sort(key=_NAME)  # in key order: the B-tree appends rather than inserts
    for entry in to_stat:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            missing.add(entry.name)
            continue
        name = entry.name
        if not stat.S_ISREG(st.st_mode):
            missing.add(name)
            skipped.append((prefix + name, "not a regular file"))
            continue
        if name.endswith(PARTIAL_SUFFIX):
            other_rows.append((name, st.st_ino, st.st_size, st.st_mtime, st.st_atime, True))
            partial += 1
            partial_bytes += st.st_size
            continue
        files += 1
        nbytes += st.st_size
        mtime_ns, atime_ns = st.st_mtime_ns, st.st_atime_ns
        if 0 <= mtime_ns < _NS_LIMIT and 0 <= atime_ns < _NS_LIMIT and utf8_dir and \
                (name.isascii() or _is_utf8(name)):
            rows.append(_ROW_FORMAT % (st.st_ino, st.st_size, mtime_ns, atime_ns, name))
        else:
            other_rows.append((name, st.st_ino, st.st_size, st.st_mtime, st.st_atime, False))
    return _Listing(entries_digest(names, inodes), subdirs, skipped, file_names, missing,
                    json.dumps(rows), other_rows, (files, nbytes, partial, partial_bytes),
                    len(to_stat))


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, kept as surrogates by os.fsdecode
        return False
    return True


def _list_and_close(dir_fd: int, prefix: str) -> _Listing:
    try:
        return _list_dir(dir_fd, prefix)
    finally:
        os.close(dir_fd)


class _Prefetcher:
    """Lists the next few directories of a first scan in a worker thread while this thread
    stores the last one: a directory's rows go to SQLite as one statement, which runs
    without the GIL, so listing and storing overlap on two cores (a million files: 5.7 s
    against 8-10 s one after the other; see ``docs/performance.rst``).  Each descriptor is
    opened here, from the cache root without following links (see :class:`cachefs.Dirs`),
    and duplicated for the worker, which closes it."""

    AHEAD = 16

    def __init__(self, dirs: cachefs.Dirs):
        self.dirs = dirs
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dtool-cache-index")
        self.pending: Dict[str, Tuple["Future[_Listing]", int]] = {}

    def ahead(self, queue: Sequence[Tuple[str, os.stat_result]]) -> None:
        """Start listing the next directories of ``queue`` (taken from its end)."""
        for rel, _ in queue[-self.AHEAD:]:
            if rel in self.pending:
                continue
            try:
                fd = os.dup(self.dirs.fd(rel))
            except OSError:
                continue  # its rescan lists it, and says why it could not
            prefix = rel + "/" if rel else ""
            self.pending[rel] = (self.pool.submit(_list_and_close, fd, prefix), fd)

    def take(self, rel: str) -> Optional[_Listing]:
        """The listing of ``rel``, if one was started and worked."""
        started = self.pending.pop(rel, None)
        if started is None:
            return None
        try:
            return started[0].result()
        except Exception:  # listed again by its rescan, which reports or raises
            return None

    def close(self) -> None:
        for future, fd in self.pending.values():
            if future.cancel():  # never started: its descriptor is still ours
                os.close(fd)
        self.pending.clear()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> "_Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Scanner:
    def __init__(self, conn: sqlite3.Connection, dirs: cachefs.Dirs, now: float, full: bool,
                 progress: Optional[Callable[[int], None]] = None):
        self.conn = conn
        self.dirs = dirs
        self.now = now
        self.full = full
        self.progress = progress
        self.rescanned = 0
        self.stats = 0
        self.files = 0  # rows written, for progress
        self.vanished: Set = set()
        self._ledger_empty: Optional[bool] = None

    def drop_dir(self, rel: str) -> None:
        """A directory that is gone: forget it and everything under it."""
        if rel == "":
            self.vanished.update(r for (r,) in self.conn.execute("SELECT relpath FROM items"))
            for table in ("files", "unindexed"):
                self.conn.execute(f"DELETE FROM {table}")
            self.conn.execute("DELETE FROM dirs WHERE relpath != ''")
            self.conn.execute("UPDATE dirs SET mtime_ns = NULL, num_files = 0, file_bytes = 0,"
                              " num_partial = 0, partial_bytes = 0, num_untracked = 0,"
                              " untracked_bytes = 0, dataset = NULL, skipped = NULL")
            return
        low, high = _under(rel)
        under, params = _files_under(rel)
        self.vanished.update(r for (r,) in self.conn.execute(
            f"SELECT relpath FROM files WHERE {under} AND uuid IS NOT NULL", params))
        self.vanished.update(r for (r,) in self.conn.execute(
            "SELECT relpath FROM unindexed WHERE dir = ? OR (dir >= ? AND dir < ?)",
            (to_db(rel), low, high)))
        self.conn.execute(f"DELETE FROM files WHERE {under}", params)
        for table, column in (("unindexed", "dir"), ("dirs", "relpath")):
            self.conn.execute(f"DELETE FROM {table} WHERE {column} = ? OR "
                              f"({column} >= ? AND {column} < ?)", (to_db(rel), low, high))

    def rescan(self, rel: str, dir_stat: os.stat_result,
               listed: Optional[_Listing] = None) -> List[Tuple[str, os.stat_result]]:
        """Rescan one directory; returns its new subdirectories (to scan too).

        Names come from one listing of the directory we opened, and only new or replaced
        entries are ``stat``-ed; ``listed``, a listing made ahead (every file stat-ed), is
        used if the directory has no rows yet.  Kept lean: the first command on a cache
        filled before the plugin runs this over every file."""
        self.rescanned += 1
        conn = self.conn
        in_dir, params = _in_dir(rel)
        rel_db = to_db(rel)
        existing = {from_db(r): (ino, tracked) for r, ino, tracked in conn.execute(
            f"SELECT relpath, ino, uuid IS NOT NULL FROM files WHERE {in_dir}", params)}
        old_subdirs = {from_db(r) for (r,) in conn.execute(
            "SELECT relpath FROM dirs WHERE parent = ?", (rel_db,))}
        prefix = rel + "/" if rel else ""
        if listed is None or existing:
            known = None if self.full or not existing else \
                {r[len(prefix):]: ino for r, (ino, _) in existing.items()}
            try:
                self.dirs.trim()
                # A listing of the directory we opened (not of whatever has its name now).
                listed = _list_dir(self.dirs.fd(rel), prefix, known)
            except (FileNotFoundError, Refused):
                self.drop_dir(rel)
                return []
            except PermissionError:
                # Unreadable: we can neither count nor prove anything gone; keep its rows out.
                conn.execute(f"DELETE FROM files WHERE {in_dir}", params)
                self._store_dir(rel, None, [(rel, "directory not readable")])
                return []
        self.stats += listed.stat_calls
        if existing:
            present = listed.present()
            gone = [r for r in existing if r[len(prefix):] not in present]
            self.vanished.update(to_db(r) for r in gone if existing[r][1])
            conn.executemany("DELETE FROM files WHERE relpath = ?", [(to_db(r),) for r in gone])
        # Nothing in the ledger (a cache filled before the plugin): every file is untracked,
        # and the directory's totals come from the listing.
        untracked_only = not existing and self.ledger_is_empty()
        if listed.rows_json != "[]":
            conn.execute(_STORE_FILES[True, not untracked_only],
                         (prefix, rel_db, listed.rows_json))
        if listed.other_rows:
            conn.executemany(_STORE_FILES[False, not untracked_only],
                             [(to_db(prefix + name), rel_db, *rest)
                              for name, *rest in listed.other_rows])
        queued = conn.execute("SELECT relpath FROM unindexed WHERE dir = ?", (rel_db,)).fetchall()
        if queued:
            present = listed.present()
            self.vanished.update(r for r, in queued if from_db(r)[len(prefix):] not in present)
            conn.execute("DELETE FROM unindexed WHERE dir = ?", (rel_db,))
        subdirs = [prefix + name for name in listed.subdirs]
        for sub in old_subdirs.difference(subdirs):
            self.drop_dir(sub)
        new = []
        for sub in subdirs:
            if sub in old_subdirs:
                continue  # a known subdirectory is checked by its own mtime
            try:
                sub_stat = cachefs.entry_stat(self.dirs.fd(rel), sub[len(prefix):])
            except (FileNotFoundError, Refused):
                break  # the directory itself went: the next refresh sees it gone
            if sub_stat is None or not stat.S_ISDIR(sub_stat.st_mode):
                continue  # swapped for something else since the listing
            conn.execute("INSERT OR REPLACE INTO dirs (relpath, parent) VALUES (?, ?)",
                         (to_db(sub), rel_db))
            new.append((sub, sub_stat))
        self._store_dir(rel, dir_stat, listed.skipped, listed.digest,
                        listed.totals if untracked_only else None)
        self.files += listed.totals[0] + listed.totals[2]
        if self.progress is not None:
            self.progress(self.files)
        return new

    def ledger_is_empty(self) -> bool:
        if self._ledger_empty is None:
            self._ledger_empty = self.conn.execute("SELECT 1 FROM items LIMIT 1").fetchone() \
                is None
        return self._ledger_empty

    def confirm(self, rel: str, dir_stat: os.stat_result) -> None:
        """A directory whose mtime moved but whose entries are the ones indexed (a clean's
        removals, already taken off its rows and digest): only its mtime is new."""
        self.conn.execute("UPDATE dirs SET mtime_ns = ?, racy = ? WHERE relpath = ?",
                          (dir_stat.st_mtime_ns, self._racy(dir_stat), to_db(rel)))

    def _racy(self, dir_stat: os.stat_result) -> int:
        return int(self.now - dir_stat.st_mtime < RACY_SECONDS)

    def _store_dir(self, rel: str, dir_stat: Optional[os.stat_result], skipped,
                   listing: Optional[Tuple[int, int]] = None,
                   totals: Optional[Tuple[int, int, int, int]] = None) -> None:
        """Record a scanned directory (None: not scanned; rescan next time); its totals
        given (files, bytes, partial files, partial bytes: all untracked) or recounted
        from its rows."""
        self.conn.execute(
            """INSERT INTO dirs (relpath, parent, mtime_ns, racy, entries, digest, skipped)
               VALUES (?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (relpath) DO UPDATE SET
                 mtime_ns = excluded.mtime_ns, racy = excluded.racy,
                 entries = excluded.entries, digest = excluded.digest,
                 skipped = excluded.skipped""",
            (to_db(rel), None if rel == "" else to_db(dirname(rel)),
             None if dir_stat is None else dir_stat.st_mtime_ns,
             0 if dir_stat is None else self._racy(dir_stat),
             None if listing is None else listing[0],
             None if listing is None else listing[1],
             json.dumps(sorted(skipped)) if skipped else None))
        if totals is None:
            recompute_dirs(self.conn, [rel])
            return
        files, nbytes, partial, partial_bytes = totals
        self.conn.execute(
            """UPDATE dirs SET (num_files, file_bytes, num_partial, partial_bytes,
                                num_untracked, untracked_bytes, dataset, last_access) =
                               (?, ?, ?, ?, ?, ?, NULL, NULL) WHERE relpath = ?""",
            (files, nbytes, partial, partial_bytes, files, nbytes, to_db(rel)))


def recompute_dirs(conn: sqlite3.Connection, dirs: Iterable[str]) -> None:
    """Recount the totals of ``dirs`` from their ``files`` rows."""
    for rel in set(dirs):
        in_dir, params = _in_dir(rel)
        conn.execute(
            f"""UPDATE dirs SET (num_files, file_bytes, num_partial, partial_bytes,
                                 num_untracked, untracked_bytes, dataset, last_access) = (
                  SELECT coalesce(sum(kind != {PARTIAL}), 0),
                         coalesce(sum(size_bytes * (kind != {PARTIAL})), 0),
                         coalesce(sum(kind = {PARTIAL}), 0),
                         coalesce(sum(size_bytes * (kind = {PARTIAL})), 0),
                         coalesce(sum(kind = {UNTRACKED}), 0),
                         coalesce(sum(size_bytes * (kind = {UNTRACKED})), 0),
                         CASE WHEN min(uuid) = max(uuid) THEN min(uuid)
                              WHEN min(uuid) IS NULL THEN NULL ELSE '*' END,
                         max(last_access)
                  FROM files WHERE {in_dir})
                WHERE relpath = ?""", (*params, to_db(rel)))


# -- keeping ledger facts in step ------------------------------------------------------


def note_accesses(conn: sqlite3.Connection, relpaths: Sequence, uris: Iterable) -> None:
    """After a compaction: copy the ledger's facts of ``relpaths`` (as stored) into the index.

    A path the index does not know yet (a file fetched since the last refresh) is queued in
    ``unindexed`` and its directory marked for rescanning, so the next refresh finds the file
    or reports the row as vanished.
    """
    if conn.execute("SELECT 1 FROM dirs WHERE relpath = ''").fetchone() is None:
        conn.executemany("INSERT OR IGNORE INTO dataset_uris (uuid, uri) VALUES (?, ?)", uris)
        return  # no index yet: its first refresh reads the ledger
    conn.executemany(
        f"""UPDATE files SET (identifier, uuid, last_access, access_count, last_use, kind) = (
              SELECT identifier, uuid, last_access, hits + misses, last_access,
                     CASE WHEN files.kind = {PARTIAL} THEN {PARTIAL} ELSE {TRACKED} END
              FROM items WHERE items.relpath = ?1)
            WHERE relpath = ?1""", [(r,) for r in relpaths])
    dirs: Set = set()
    missing = []
    for r in relpaths:
        row = conn.execute("SELECT dir FROM files WHERE relpath = ?", (r,)).fetchone()
        if row is None:
            missing.append((r, to_db(dirname(from_db(r)))))
        else:
            dirs.add(from_db(row[0]))
    conn.executemany("INSERT OR IGNORE INTO unindexed (relpath, dir) VALUES (?, ?)", missing)
    for _, d in missing:
        _mark_for_rescan(conn, from_db(d))
    recompute_dirs(conn, dirs)
    conn.executemany("INSERT OR IGNORE INTO dataset_uris (uuid, uri) VALUES (?, ?)", uris)


def _mark_for_rescan(conn: sqlite3.Connection, rel: str) -> None:
    """Rescan ``rel`` next time; an unknown directory is checked from its known ancestor."""
    while True:
        updated = conn.execute("UPDATE dirs SET mtime_ns = NULL WHERE relpath = ?",
                               (to_db(rel),)).rowcount
        if updated or rel == "":
            return
        rel = dirname(rel)


def stage_removed(conn: sqlite3.Connection,
                  removed: Sequence[Tuple[object, float, Optional[int]]]) -> None:
    """Put (relpath as stored, removed_at, inode or None) of removed files in ``temp.gone``,
    for the set statements that drop their rows (this connection's own table)."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS gone (relpath PRIMARY KEY, removed_at REAL, "
                 "ino INTEGER) WITHOUT ROWID")
    conn.execute("DELETE FROM temp.gone")
    conn.executemany("INSERT OR REPLACE INTO temp.gone VALUES (?, ?, ?)", removed)


def _take_off_digests(conn: sqlite3.Connection) -> None:
    """The removed files' entries off their directories' digests (see
    :func:`entries_digest`)."""
    per_dir: Dict[object, List[int]] = {}
    for relpath, dir_db, ino in conn.execute("SELECT relpath, dir, ino FROM temp.gone_files"):
        tally = per_dir.setdefault(dir_db, [0, 0])
        tally[0] += 1
        tally[1] += entry_hash(from_db(relpath).rsplit("/", 1)[-1], ino)
    conn.executemany(
        "UPDATE dirs SET entries = entries - ?, digest = ((digest - ?) % ? + ?) % ? "
        "WHERE relpath = ? AND digest IS NOT NULL",
        [(n, value % _DIGEST_MOD, _DIGEST_MOD, _DIGEST_MOD, _DIGEST_MOD, d)
         for d, (n, value) in per_dir.items()])


def note_removed(conn: sqlite3.Connection) -> None:
    """After the files staged by :func:`stage_removed` were removed (or found gone): drop
    their rows and take them off their directories' totals.  A row of another inode is a
    newer file under the same name, already indexed: it stays.  The directories' mtimes
    moved, so the next refresh rescans them anyway (and recounts their latest access)."""
    conn.execute("""CREATE TEMP TABLE IF NOT EXISTS gone_files AS
                      SELECT relpath, dir, size_bytes, kind, ino FROM files WHERE 0""")
    conn.execute("DELETE FROM temp.gone_files")
    conn.execute("""INSERT INTO temp.gone_files
                      SELECT relpath, files.dir, files.size_bytes, files.kind, files.ino
                      FROM temp.gone JOIN files USING (relpath)
                      WHERE gone.ino IS NULL OR gone.ino = files.ino""")
    _take_off_digests(conn)
    conn.execute("DELETE FROM files WHERE relpath IN (SELECT relpath FROM temp.gone_files)")
    conn.execute("DELETE FROM unindexed WHERE relpath IN (SELECT relpath FROM temp.gone)")
    conn.execute(
        f"""UPDATE dirs SET (num_files, file_bytes, num_partial, partial_bytes, num_untracked,
                             untracked_bytes) = (
              SELECT dirs.num_files - sum(kind != {PARTIAL}),
                     dirs.file_bytes - sum(size_bytes * (kind != {PARTIAL})),
                     dirs.num_partial - sum(kind = {PARTIAL}),
                     dirs.partial_bytes - sum(size_bytes * (kind = {PARTIAL})),
                     dirs.num_untracked - sum(kind = {UNTRACKED}),
                     dirs.untracked_bytes - sum(size_bytes * (kind = {UNTRACKED}))
              FROM temp.gone_files WHERE gone_files.dir = dirs.relpath)
            WHERE relpath IN (SELECT dir FROM temp.gone_files)""")
    conn.execute("UPDATE dirs SET dataset = NULL WHERE num_files = num_untracked "
                 "AND dataset IS NOT NULL")


# -- queries ---------------------------------------------------------------------------


def select_where_in(conn: sqlite3.Connection, query: str, keys: Sequence,
                    params: Sequence = ()) -> Iterator[tuple]:
    """Rows of ``query`` (ending in ``WHERE column``, after ``params``) for
    ``column IN keys``: one statement per 500 keys, not one per key."""
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        yield from conn.execute(f"{query} IN ({', '.join('?' * len(chunk))})",
                                (*params, *chunk))


_FILE_KINDS = "pinnSSNi"  # see layout.row_ok


def _files(rows: Iterable[tuple]) -> Iterator[IndexedFile]:
    """Index rows as IndexedFiles, leaving out any whose fields have the wrong type (the
    ledger is writable by every member)."""
    for values in rows:
        if row_ok(values, _FILE_KINDS):
            relpath = from_db(values[0])
            if values[4] is None:  # an untracked file: its name says
                values = (*values[:4], identifier_of(relpath.rsplit("/", 1)[-1]), *values[5:])
            yield IndexedFile(relpath, *values[1:])


_SELECT_FILES = f"SELECT {', '.join(FILE_COLUMNS)} FROM files"


def all_files(conn: sqlite3.Connection, partial: bool = False) -> List[IndexedFile]:
    """Every complete file (or, with ``partial``, every partial download), by path."""
    kinds = f"= {PARTIAL}" if partial else f"!= {PARTIAL}"
    return list(_files(conn.execute(
        f"{_SELECT_FILES} WHERE +kind {kinds} ORDER BY relpath")))


def files_at(conn: sqlite3.Connection, relpaths: Iterable[str]) -> List[IndexedFile]:
    """Complete files at ``relpaths`` (the few that are held)."""
    return list(_files(select_where_in(
        conn, f"{_SELECT_FILES} WHERE +kind != {PARTIAL} AND relpath",
        [to_db(r) for r in relpaths])))


def files_with_identifiers(conn: sqlite3.Connection, identifiers: Iterable[str]
                           ) -> List[IndexedFile]:
    """Complete files whose identifier is one of ``identifiers`` (held by processes that
    started before holds named files): tracked ones through the ledger's identifier index,
    untracked ones in one pass over the untracked files."""
    wanted = sorted(set(identifiers))
    if not wanted:
        return []
    found = [f for identifier in wanted for f in _files(conn.execute(
        f"{_SELECT_FILES} WHERE relpath IN ({PATHS_OF_IDENTIFIER}) AND +kind = {TRACKED}",
        (identifier,)))]
    found += _files(select_where_in(
        conn, f"{_SELECT_FILES} WHERE kind = {UNTRACKED} AND "
              "CAST(substr(relpath, length(dir) + 1 + (dir != ''), 40) AS TEXT)", wanted))
    return found


# The ledger's paths of one identifier.  Its items are indexed by (uuid, identifier), which
# follows path order, so a clean dirties that index's pages in step with the table's (the
# hash order of an index by identifier cost a clean of 100k items 1.6-2.8 s); an identifier
# alone is then found with a probe per dataset, over a loose index scan of the UUIDs.
PATHS_OF_IDENTIFIER = """
    WITH RECURSIVE datasets(uuid) AS (
      SELECT min(uuid) FROM items
      UNION ALL
      SELECT (SELECT min(uuid) FROM items WHERE items.uuid > datasets.uuid) FROM datasets
      WHERE datasets.uuid IS NOT NULL)
    SELECT items.relpath FROM datasets CROSS JOIN items
    WHERE items.uuid = datasets.uuid AND items.identifier = ?"""


def by_last_access(conn: sqlite3.Connection, descending: bool, untracked: bool = False,
                   limit: Optional[int] = None) -> Iterator[IndexedFile]:
    """Complete files ordered by last access (untracked, i.e. none, lowest), ties by path.

    Tracked files come in order from ``files_by_last_use`` (for them last use is last
    access); untracked ones by path, from the table itself (its key), so that a ``limit``
    stops the walk early whatever the share of untracked files.
    """
    order = "DESC" if descending else "ASC"
    cap = "" if limit is None else f" LIMIT {int(limit)}"
    never = (f"{_SELECT_FILES} WHERE +kind = {UNTRACKED} "  # '+': by the key, not the index
             f"ORDER BY relpath {order}{cap}")
    tracked = (f"{_SELECT_FILES} WHERE kind = {TRACKED} "
               f"ORDER BY last_use {order}, relpath {order}{cap}")
    queries = [never] if untracked else [tracked, never] if descending else [never, tracked]
    for query in queries:
        yield from _files(conn.execute(query))




def in_lru_order(conn: sqlite3.Connection) -> Iterator[Tuple[str, int, float, int]]:
    """(relpath, size, last use, access count) of each complete file, least recently used
    first (ties in no particular order): tracked and untracked ones each in order from
    ``files_by_last_use``, merged.  The index holds all four, so a clean that reads 100k
    files reads no row of the table (0.04 s instead of 0.5 s for their rows)."""
    streams = [_lru_rows(conn.execute(
        f"SELECT relpath, size_bytes, last_use, access_count FROM files WHERE kind = {kind} "
        "ORDER BY last_use")) for kind in (TRACKED, UNTRACKED)]
    yield from heapq.merge(*streams, key=operator.itemgetter(2))


def _lru_rows(rows: Iterable[tuple]) -> Iterator[Tuple[str, int, float, int]]:
    for values in rows:
        if row_ok(values, "pini"):  # any member may write the index: see _files
            yield (from_db(values[0]), *values[1:])


@dataclass(frozen=True)
class DirTotals:
    relpath: str
    num_files: int
    file_bytes: int
    num_partial: int
    partial_bytes: int
    num_untracked: int
    untracked_bytes: int
    dataset: Optional[str]
    last_access: Optional[float]
    skipped: Tuple[Tuple[str, str], ...]


def _skipped(text) -> Tuple[Tuple[str, str], ...]:
    """The ``skipped`` column: JSON we wrote, in a file any member may write."""
    try:
        found = json.loads(text) if isinstance(text, str) else []
    except (ValueError, RecursionError):
        return ()
    if not isinstance(found, list):
        return ()
    return tuple((s[0], s[1]) for s in found if isinstance(s, list) and len(s) == 2
                 and isinstance(s[0], str) and isinstance(s[1], str))


def dir_totals(conn: sqlite3.Connection) -> List[DirTotals]:
    """Every directory's totals (rows whose fields have the wrong type are left out)."""
    return [DirTotals(from_db(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], _skipped(r[9]))
            for r in conn.execute(
                "SELECT relpath, num_files, file_bytes, num_partial, partial_bytes, "
                "num_untracked, untracked_bytes, dataset, last_access, skipped FROM dirs "
                "ORDER BY relpath") if row_ok(r, "piiiiiiSN")]


def partials(conn: sqlite3.Connection) -> List[IndexedFile]:
    return list(_files(conn.execute(f"{_SELECT_FILES} WHERE kind = {PARTIAL}")))


def count_tracked(conn: sqlite3.Connection) -> int:
    """Complete files with a ledger row, by the directories' totals."""
    return conn.execute("SELECT coalesce(sum(num_files - num_untracked), 0) FROM dirs"
                        ).fetchone()[0]


def count_accessed_since(conn: sqlite3.Connection, since: float) -> int:
    """Tracked files accessed at or after ``since``: one range of ``files_by_last_use``
    (for a tracked file last use is last access), however many files are untracked."""
    return conn.execute(f"SELECT count(*) FROM files WHERE kind = {TRACKED} AND last_use >= ?",
                        (since,)).fetchone()[0]


def dataset_groups(conn: sqlite3.Connection, dirs: Sequence[DirTotals]
                   ) -> Dict[str, List[int]]:
    """dataset key -> [items, bytes, last access]: per directory, from totals; a directory
    with several datasets' files (never made by dtool itself) is grouped file by file."""
    groups: Dict[str, list] = {}

    def add(key: str, n: int, nbytes: int, last: Optional[float]) -> None:
        group = groups.setdefault(key, [0, 0, None])
        group[0] += n
        group[1] += nbytes
        if last is not None and (group[2] is None or last > group[2]):
            group[2] = last

    for d in dirs:
        if d.num_files == 0:
            continue
        if d.dataset == "*":
            in_dir, params = _in_dir(d.relpath)
            for uuid, n, nbytes, last in conn.execute(
                    "SELECT uuid, count(*), sum(size_bytes), max(last_access) FROM files "
                    f"WHERE {in_dir} AND +kind != {PARTIAL} GROUP BY uuid", params):
                add(uuid or d.relpath, n, nbytes, last)
            continue
        add(d.dataset or d.relpath, d.num_files, d.file_bytes, d.last_access)
    return groups


def uris_of_datasets(conn: sqlite3.Connection) -> Dict[str, List[str]]:
    result: Dict[str, List[str]] = {}
    for uuid, uri in conn.execute("SELECT uuid, uri FROM dataset_uris ORDER BY uuid, uri"):
        result.setdefault(uuid, []).append(uri)
    return result



class DiskIndex:
    """The index of one open ledger, as callers outside the store see it: the queries they
    need, and no connection (``Ledger.index``)."""

    def __init__(self, conn: sqlite3.Connection, cache: CacheDir):
        self._conn = conn
        self._cache = cache

    def refresh(self, full: bool = False,
                progress: Optional[Callable[[int], None]] = None) -> Refresh:
        return refresh(self._conn, self._cache, full=full, progress=progress)

    def all_files(self, partial: bool = False) -> List[IndexedFile]:
        return all_files(self._conn, partial)

    def files_at(self, relpaths: Iterable[str]) -> List[IndexedFile]:
        return files_at(self._conn, relpaths)

    def files_with_identifiers(self, identifiers: Iterable[str]) -> List[IndexedFile]:
        return files_with_identifiers(self._conn, identifiers)

    def by_last_access(self, descending: bool, untracked: bool = False,
                       limit: Optional[int] = None) -> Iterator[IndexedFile]:
        return by_last_access(self._conn, descending, untracked, limit)

    def in_lru_order(self) -> Iterator[Tuple[str, int, float, int]]:
        return in_lru_order(self._conn)

    def dir_totals(self) -> List[DirTotals]:
        return dir_totals(self._conn)

    def partials(self) -> List[IndexedFile]:
        return partials(self._conn)

    def count_tracked(self) -> int:
        return count_tracked(self._conn)

    def count_accessed_since(self, since: float) -> int:
        return count_accessed_since(self._conn, since)

    def dataset_groups(self, dirs: Sequence[DirTotals]) -> Dict[str, List[int]]:
        return dataset_groups(self._conn, dirs)

    def uris_of_datasets(self) -> Dict[str, List[str]]:
        return uris_of_datasets(self._conn)
