"""The disk index: what the cache directory holds, kept in the ledger, refreshed per directory.

A full walk with a ``stat`` per file costs seconds at a million files (``du -sb`` takes 3.3 s
here), yet the disk is the truth: files appear and vanish behind our back.  A directory's
mtime changes whenever an entry is added, removed or renamed in it, so a refresh stats each
known directory and rescans only those whose mtime moved.  A rescan reads names and inode
numbers (free from ``readdir``) and stats only new or replaced entries (a new inode), so a
dataset directory that gained one file costs one ``stat`` plus a name listing.

Like git's index, a directory changed within :data:`RACY_SECONDS` of its scan is not
trusted (a later change within the same clock tick would leave its mtime unchanged): it is
rescanned next time.  What this cannot see, by design: a file rewritten in place under the
same name and inode (dtool never does this; brokers write a temporary file and rename it)
and atime changes of files no hook has seen.  ``refresh(full=True)`` restats everything.

The ``files`` rows also carry the ledger's last access, access count and UUID of each file,
so that reports, ``ls --sort accessed`` and LRU cleaning are index queries, not joins of a
million rows.  The ledger's compaction and removals keep them in step (see :mod:`ledger`).
Everything here is derived: a damaged ledger is rebuilt by one full scan.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from . import cachefs
from .cachefs import CacheDir, Refused
from .layout import META_DIRNAME, from_db, row_ok, to_db

PARTIAL_SUFFIX = ".tmp"
RACY_SECONDS = 2.0  # coarse filesystem clocks tick in 4-10 ms; some network ones in 1-2 s
_IDENTIFIER = re.compile(r"^[0-9a-f]{40}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS dirs (
    relpath TEXT PRIMARY KEY,            -- '' is the cache directory itself
    parent TEXT,
    mtime_ns INTEGER,                    -- as last scanned (NULL: rescan at the next refresh)
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
    partial INTEGER NOT NULL,
    identifier TEXT,                     -- the ledger's (untracked files: from the name)
    uuid TEXT, last_access REAL, access_count INTEGER NOT NULL DEFAULT 0,  -- from the ledger
    last_use REAL NOT NULL               -- last access, else the later of atime and mtime
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_last_use ON files (partial, last_use);
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
    match = _IDENTIFIER.match(os.path.basename(name))
    return match.group(0) if match else None


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


def refresh(conn: sqlite3.Connection, cache: CacheDir, full: bool = False,
            now: Optional[float] = None) -> Refresh:
    """Bring the index up to date with the disk; cheap when little changed.

    Every directory is reached from the cache root without following links (see
    :mod:`cachefs`), so a directory swapped for a link is seen as gone, never listed.
    Runs in its own transaction unless the caller has one open.
    """
    now = time.time() if now is None else now
    known = {from_db(r): m for r, m in conn.execute("SELECT relpath, mtime_ns FROM dirs")}
    fresh_index = "" not in known
    known.setdefault("", None)
    changed: List[Tuple[str, os.stat_result]] = []
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
            elif full or mtime_ns is None or st.st_mtime_ns != mtime_ns:
                changed.append((rel, st))
        if not changed and not gone:
            return Refresh(0, 0, ())
        scanner = _Scanner(conn, dirs, now, full)
        own_transaction = not conn.in_transaction
        if own_transaction:
            conn.execute("BEGIN IMMEDIATE")
        try:
            if fresh_index:
                conn.execute("INSERT OR IGNORE INTO dirs (relpath, parent) VALUES ('', NULL)")
                for name, _ in _SECONDARY_INDEXES:  # built once at the end: several times faster
                    conn.execute(f"DROP INDEX IF EXISTS {name}")
            for rel in sorted(gone, key=len):
                scanner.drop_dir(rel)
            queue = list(changed)
            while queue:
                rel, st = queue.pop()
                queue.extend(scanner.rescan(rel, st))
            if fresh_index:  # rows from before the index existed whose files are gone
                for _, statement in _SECONDARY_INDEXES:
                    conn.execute(statement)
                scanner.vanished.update(r for (r,) in conn.execute(
                    "SELECT relpath FROM items WHERE relpath NOT IN (SELECT relpath FROM files)"))
        except BaseException:
            if own_transaction:
                conn.execute("ROLLBACK")
            raise
        if own_transaction:
            conn.execute("COMMIT")
    vanished = tuple(sorted(map(from_db, scanner.vanished)))
    return Refresh(scanner.rescanned, scanner.stats, vanished)


class _Scanner:
    def __init__(self, conn: sqlite3.Connection, dirs: cachefs.Dirs, now: float, full: bool):
        self.conn = conn
        self.dirs = dirs
        self.now = now
        self.full = full
        self.rescanned = 0
        self.stats = 0
        self.vanished: Set = set()

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

    def rescan(self, rel: str, dir_stat: os.stat_result) -> List[Tuple[str, os.stat_result]]:
        """Rescan one directory; returns its new subdirectories (to scan too)."""
        self.rescanned += 1
        conn = self.conn
        in_dir, params = _in_dir(rel)
        existing = {from_db(r): (ino, tracked) for r, ino, tracked in conn.execute(
            f"SELECT relpath, ino, uuid IS NOT NULL FROM files WHERE {in_dir}", params)}
        old_subdirs = {from_db(r) for (r,) in conn.execute(
            "SELECT relpath FROM dirs WHERE parent = ?", (to_db(rel),))}
        skipped: List[Tuple[str, str]] = []
        present: Set[str] = set()
        to_stat = []
        subdirs = []
        try:
            self.dirs.trim()
            dir_fd = self.dirs.fd(rel)
            # A listing of the directory we opened (not of whatever has its name by now).
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if rel == "" and entry.name == META_DIRNAME:
                        continue
                    child = os.path.join(rel, entry.name) if rel else entry.name
                    if entry.is_dir(follow_symlinks=False):
                        subdirs.append(child)
                    elif entry.is_symlink():
                        skipped.append((child, "symbolic link, not followed"))
                    elif entry.is_file(follow_symlinks=False):
                        present.add(child)
                        known = existing.get(child)
                        if self.full or known is None or known[0] != entry.inode() \
                                or entry.name.endswith(PARTIAL_SUFFIX):
                            to_stat.append((child, entry))
                    else:
                        skipped.append((child, "not a regular file"))
        except (FileNotFoundError, Refused):
            self.drop_dir(rel)
            return []
        except PermissionError:
            # Unreadable: we can neither count nor prove anything gone; keep its rows out.
            conn.execute(f"DELETE FROM files WHERE {in_dir}", params)
            self._store_dir(rel, None, [(rel, "directory not readable")])
            return []
        rows = []
        to_stat.sort(key=lambda pair: pair[0])  # in key order: B-tree appends, not inserts
        for child, entry in to_stat:
            try:
                st = entry.stat(follow_symlinks=False)
                self.stats += 1
            except FileNotFoundError:
                present.discard(child)
                continue
            if not stat.S_ISREG(st.st_mode):
                present.discard(child)
                skipped.append((child, "not a regular file"))
                continue
            rows.append((to_db(child), to_db(rel), st.st_ino, st.st_size, st.st_mtime,
                         st.st_atime, int(child.endswith(PARTIAL_SUFFIX)), identifier_of(child)))
        gone = [r for r in existing if r not in present]
        self.vanished.update(to_db(r) for r in gone if existing[r][1])
        conn.executemany("DELETE FROM files WHERE relpath = ?", [(to_db(r),) for r in gone])
        conn.executemany(
            """INSERT INTO files (relpath, dir, ino, size_bytes, mtime, atime, partial, identifier,
                                  uuid, last_access, access_count, last_use)
               SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, coalesce(i.identifier, ?8), i.uuid,
                      i.last_access, coalesce(i.hits + i.misses, 0),
                      coalesce(i.last_access, max(?5, ?6))
               FROM (SELECT 1) LEFT JOIN items AS i ON i.relpath = ?1
               WHERE true
               ON CONFLICT (relpath) DO UPDATE SET
                 ino = excluded.ino, size_bytes = excluded.size_bytes, mtime = excluded.mtime,
                 atime = excluded.atime, partial = excluded.partial,
                 last_use = coalesce(last_access, max(excluded.mtime, excluded.atime))""", rows)
        for r, in conn.execute("SELECT relpath FROM unindexed WHERE dir = ?", (to_db(rel),)):
            if from_db(r) not in present:
                self.vanished.add(r)
        conn.execute("DELETE FROM unindexed WHERE dir = ?", (to_db(rel),))
        for sub in old_subdirs.difference(subdirs):
            self.drop_dir(sub)
        new = []
        for sub in subdirs:
            if sub in old_subdirs:
                continue  # a known subdirectory is checked by its own mtime
            sub_stat = cachefs.entry_stat(dir_fd, os.path.basename(sub))
            if sub_stat is None or not stat.S_ISDIR(sub_stat.st_mode):
                continue  # swapped for something else since the listing
            conn.execute("INSERT OR REPLACE INTO dirs (relpath, parent) VALUES (?, ?)",
                         (to_db(sub), to_db(rel)))
            new.append((sub, sub_stat))
        trusted = self.now - dir_stat.st_mtime >= RACY_SECONDS
        self._store_dir(rel, dir_stat.st_mtime_ns if trusted else None, skipped)
        return new

    def _store_dir(self, rel: str, mtime_ns: Optional[int], skipped) -> None:
        self.conn.execute(
            """INSERT INTO dirs (relpath, parent, mtime_ns, skipped) VALUES (?, ?, ?, ?)
               ON CONFLICT (relpath) DO UPDATE SET mtime_ns = excluded.mtime_ns,
                                                   skipped = excluded.skipped""",
            (to_db(rel), None if rel == "" else to_db(dirname(rel)), mtime_ns,
             json.dumps(sorted(skipped)) if skipped else None))
        recompute_dirs(self.conn, [rel])


def recompute_dirs(conn: sqlite3.Connection, dirs: Iterable[str]) -> None:
    """Recount the totals of ``dirs`` from their ``files`` rows."""
    for rel in set(dirs):
        in_dir, params = _in_dir(rel)
        conn.execute(
            f"""UPDATE dirs SET (num_files, file_bytes, num_partial, partial_bytes,
                                 num_untracked, untracked_bytes, dataset, last_access) = (
                  SELECT count(*) - coalesce(sum(partial), 0),
                         coalesce(sum(size_bytes * (1 - partial)), 0),
                         coalesce(sum(partial), 0), coalesce(sum(size_bytes * partial), 0),
                         coalesce(sum(uuid IS NULL AND partial = 0), 0),
                         coalesce(sum(size_bytes * (uuid IS NULL AND partial = 0)), 0),
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
        """UPDATE files SET (identifier, uuid, last_access, access_count, last_use) = (
             SELECT identifier, uuid, last_access, hits + misses, last_access FROM items
             WHERE items.relpath = ?1)
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


def note_removed(conn: sqlite3.Connection) -> None:
    """After the files staged by :func:`stage_removed` were removed (or found gone): drop
    their rows and take them off their directories' totals.  A row of another inode is a
    newer file under the same name, already indexed: it stays.  The directories' mtimes
    moved, so the next refresh rescans them anyway (and recounts their latest access)."""
    conn.execute("""CREATE TEMP TABLE IF NOT EXISTS gone_files AS
                      SELECT relpath, dir, size_bytes, partial, uuid FROM files WHERE 0""")
    conn.execute("DELETE FROM temp.gone_files")
    conn.execute("""INSERT INTO temp.gone_files
                      SELECT relpath, files.dir, files.size_bytes, files.partial, files.uuid
                      FROM temp.gone JOIN files USING (relpath)
                      WHERE gone.ino IS NULL OR gone.ino = files.ino""")
    conn.execute("DELETE FROM files WHERE relpath IN (SELECT relpath FROM temp.gone_files)")
    conn.execute("DELETE FROM unindexed WHERE relpath IN (SELECT relpath FROM temp.gone)")
    conn.execute(
        """UPDATE dirs SET (num_files, file_bytes, num_partial, partial_bytes, num_untracked,
                            untracked_bytes) = (
             SELECT dirs.num_files - sum(1 - partial),
                    dirs.file_bytes - sum(size_bytes * (1 - partial)),
                    dirs.num_partial - sum(partial),
                    dirs.partial_bytes - sum(size_bytes * partial),
                    dirs.num_untracked - sum(uuid IS NULL AND partial = 0),
                    dirs.untracked_bytes - sum(size_bytes * (uuid IS NULL AND partial = 0))
             FROM temp.gone_files WHERE gone_files.dir = dirs.relpath)
           WHERE relpath IN (SELECT dir FROM temp.gone_files)""")
    conn.execute("UPDATE dirs SET dataset = NULL WHERE num_files = num_untracked "
                 "AND dataset IS NOT NULL")


# -- queries ---------------------------------------------------------------------------


def select_where_in(conn: sqlite3.Connection, query: str, keys: Sequence) -> Iterator[tuple]:
    """Rows of ``query`` (ending in ``WHERE column``) for ``column IN keys``: one statement
    per 500 keys, not one per key."""
    for start in range(0, len(keys), 500):
        chunk = keys[start:start + 500]
        yield from conn.execute(f"{query} IN ({', '.join('?' * len(chunk))})", chunk)


_FILE_KINDS = "pinnSSNi"  # see layout.row_ok


def _files(rows: Iterable[tuple]) -> Iterator[IndexedFile]:
    """Index rows as IndexedFiles, leaving out any whose fields have the wrong type (the
    ledger is writable by every member)."""
    for values in rows:
        if row_ok(values, _FILE_KINDS):
            yield IndexedFile(from_db(values[0]), *values[1:])


_SELECT_FILES = f"SELECT {', '.join(FILE_COLUMNS)} FROM files"


def all_files(conn: sqlite3.Connection, partial: bool = False) -> List[IndexedFile]:
    return list(_files(conn.execute(
        f"{_SELECT_FILES} WHERE partial = ? ORDER BY relpath", (int(partial),))))


def files_at(conn: sqlite3.Connection, relpaths: Iterable[str]) -> List[IndexedFile]:
    """Complete files at ``relpaths`` (the few that are held)."""
    return list(_files(select_where_in(
        conn, f"SELECT {', '.join(FILE_COLUMNS)} FROM files WHERE partial = 0 AND relpath",
        [to_db(r) for r in relpaths])))


def files_with_identifiers(conn: sqlite3.Connection, identifiers: Iterable[str]
                           ) -> List[IndexedFile]:
    """Complete files whose identifier is one of ``identifiers`` (the few that are held):
    tracked ones through the ledger's identifier index, untracked ones from the directories
    that have any (usually few; an index of its own would cost every removal more)."""
    wanted = set(identifiers)
    if not wanted:
        return []
    found = [f for identifier in sorted(wanted) for f in _files(conn.execute(
        f"{_SELECT_FILES} WHERE relpath IN ({PATHS_OF_IDENTIFIER}) AND partial = 0",
        (identifier,)))]
    for in_dir, params in _dirs_with_untracked(conn):
        found += [f for f in _files(conn.execute(
            f"{_SELECT_FILES} WHERE {in_dir} AND last_access IS NULL AND partial = 0", params))
            if f.identifier in wanted]
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


def _dirs_with_untracked(conn: sqlite3.Connection) -> List[Tuple[str, tuple]]:
    """:func:`_in_dir` of each directory holding untracked files (usually none)."""
    return [_in_dir(from_db(r)) for (r,) in conn.execute(
        "SELECT relpath FROM dirs WHERE num_untracked > 0")]


def by_last_access(conn: sqlite3.Connection, descending: bool,
                   untracked: bool = False) -> Iterator[IndexedFile]:
    """Complete files ordered by last access (untracked, i.e. NULL, lowest), ties by path.

    Tracked files come through ``files_by_last_use`` (for them last use is last access);
    the untracked take a scan, which ``ls`` newest-first never reaches when it has a limit.
    """
    order = "DESC" if descending else "ASC"
    never = (f"{_SELECT_FILES} WHERE partial = 0 AND last_access IS NULL "
             f"ORDER BY relpath {order}")
    tracked = (f"{_SELECT_FILES} WHERE partial = 0 AND last_access IS NOT NULL "
               f"ORDER BY last_use {order}, relpath {order}")
    queries = [never] if untracked else [tracked, never] if descending else [never, tracked]
    for query in queries:
        yield from _files(conn.execute(query))


def by_last_use(conn: sqlite3.Connection) -> Iterator[IndexedFile]:
    """Complete files, least recently used first (ties in no particular order)."""
    yield from _files(conn.execute(f"{_SELECT_FILES} WHERE partial = 0 ORDER BY last_use"))


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
    return [DirTotals(from_db(r[0]), *r[1:9], _skipped(r[9]))
            for r in conn.execute(
                "SELECT relpath, num_files, file_bytes, num_partial, partial_bytes, "
                "num_untracked, untracked_bytes, dataset, last_access, skipped FROM dirs "
                "ORDER BY relpath") if row_ok(r, "piiiiiiSN")]


def partials(conn: sqlite3.Connection) -> List[IndexedFile]:
    return all_files(conn, partial=True)


def count_tracked(conn: sqlite3.Connection) -> int:
    """Complete files with a ledger row, by the directories' totals."""
    return conn.execute("SELECT coalesce(sum(num_files - num_untracked), 0) FROM dirs"
                        ).fetchone()[0]


def count_accessed_since(conn: sqlite3.Connection, since: float) -> int:
    """Complete files accessed at or after ``since``: those used since, counted in
    ``files_by_last_use`` alone (for a tracked file last use is last access), less the
    untracked among them (used by their mtime or atime), from the directories holding any."""
    used = conn.execute("SELECT count(*) FROM files WHERE partial = 0 AND last_use >= ?",
                        (since,)).fetchone()[0]
    for in_dir, params in _dirs_with_untracked(conn):
        used -= conn.execute(f"SELECT count(*) FROM files WHERE {in_dir} AND partial = 0 "
                             "AND last_access IS NULL AND last_use >= ?",
                             (*params, since)).fetchone()[0]
    return used


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
                    f"WHERE {in_dir} AND partial = 0 GROUP BY uuid", params):
                add(uuid or d.relpath, n, nbytes, last)
            continue
        add(d.dataset or d.relpath, d.num_files, d.file_bytes, d.last_access)
    return groups


def uris_of_datasets(conn: sqlite3.Connection) -> Dict[str, List[str]]:
    result: Dict[str, List[str]] = {}
    for uuid, uri in conn.execute("SELECT uuid, uri FROM dataset_uris ORDER BY uuid, uri"):
        result.setdefault(uuid, []).append(uri)
    return result

