"""Per-process, append-only access journals: the hot path's only write.

Each access appends one JSON line with a single ``os.write`` on an ``O_APPEND`` descriptor
(about 4 µs, no lock, no fsync), so processes never contend and a crash loses at most the
line being written.  The ledger folds journals in later, in batches, as Cargo's global cache
tracker defers its last-use writes.  Lines are plain JSON: anyone can read them, and nothing
is ever unpickled.

Record kinds (first element of each line)::

    ["j", version, user, host, pid, started]                       header
    ["a", relpath, uri, uuid, identifier, scheme, t_us, miss, size, mtime_us, fetch_us]
    ["m", relpath, item_relpath, manifest_size, manifest_hash, hash_function]  once per item
                                                                      per process
    ["x", count]     accesses this process could not journal (full disk or quota)

When a write fails (ENOSPC, EDQUOT, EFBIG) the lines wait in memory and are written, in
order, by the next write that succeeds; past ``MAX_PENDING`` lines they are only counted,
and the count is journalled as an ``x`` record once space returns.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from .layout import Identity, MetaPaths, ensure_dir, share_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIX = ".jsonl"
MAX_PENDING = 100_000  # lines kept in memory while the disk is full


@dataclass(frozen=True)
class AccessRecord:
    """One access as the journal stores it."""

    user: str
    host: str
    t: float
    relpath: str
    uri: str
    uuid: str
    identifier: str
    scheme: str
    miss: bool
    size: int
    mtime: float
    fetch_seconds: float


@dataclass(frozen=True)
class ManifestRecord:
    """What the dataset manifest says an item should be, so verify needs no network."""

    relpath: str
    item_relpath: Optional[str]
    manifest_size: Optional[int]
    manifest_hash: Optional[str]
    hash_function: Optional[str]  # as the manifest names it, e.g. "md5sum_hexdigest"


@dataclass(frozen=True)
class LostRecord:
    """Accesses a process could not journal, as it reported once it could write again."""

    count: int


class JournalWriter:
    """This process's journal in one cache directory."""

    def __init__(self, paths: MetaPaths, identity: Identity, token: str):
        ensure_dir(paths.journal_dir, paths.shared)
        self.path = os.path.join(paths.journal_dir, token + SUFFIX)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                           0o666)
        share_file(self._fd, paths.shared)
        self._pending: collections.deque = collections.deque()  # unwritten bytes, in order
        self._lost = 0
        self._lock = threading.Lock()
        header = ["j", FORMAT_VERSION, identity.user, identity.host, identity.pid, time.time()]
        os.write(self._fd, (json.dumps(header) + "\n").encode())

    def describe(self, relpath: str, uri: str, uuid: str, identifier: str, scheme: str,
                 manifest: Optional[ManifestRecord]) -> bytes:
        """Write the item's manifest facts once; return the line prefix for its accesses.

        The caller keeps the prefix, so that each access only formats five numbers.
        """
        if manifest is not None:
            line = json.dumps(["m", manifest.relpath, manifest.item_relpath,
                               manifest.manifest_size, manifest.manifest_hash,
                               manifest.hash_function]) + "\n"
            self._emit(line.encode("utf-8", "surrogateescape"), counts=False)
        return ('["a",' + json.dumps([relpath, uri, uuid, identifier, scheme])[1:-1]
                + ",").encode("utf-8", "surrogateescape")

    def record_access(self, prefix: bytes, t: float, miss: bool, size: int, mtime: float,
                      fetch_seconds: float) -> None:
        """One access, one ``os.write``: a crash loses at most this line."""
        # Integers (µs) format in half the time of floats.
        self._emit(prefix + b"%d,%d,%d,%d,%d]\n" % (t * 1e6, miss, size, mtime * 1e6,
                                                     fetch_seconds * 1e6))

    def _emit(self, line: bytes, counts: bool = True) -> None:
        """Write ``line``; ``counts`` says whether it records an access (for the lost tally)."""
        if self._pending:  # keep the order: older lines first
            self._hold_back(line, None, counts)
            self.flush()
            return
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            self._hold_back(line, exc, counts)
            return
        if written < len(line):  # the disk filled up mid-line: finish the line later
            self._hold_back(line[written:], None, counts, must_keep=True)

    def _hold_back(self, data: bytes, exc: Optional[OSError], counts: bool,
                   must_keep: bool = False) -> None:
        with self._lock:
            if not self._pending:
                logger.warning("dtool-cache-manager: cannot write the access journal %s (%s); "
                               "keeping accesses in memory until space returns", self.path,
                               exc or "disk full")
            if must_keep or len(self._pending) < MAX_PENDING:
                self._pending.append(data)
            elif counts:
                self._lost += 1

    def flush(self) -> bool:
        """Write what the disk refused before; True once nothing is left over."""
        with self._lock:
            while self._pending:
                chunk = self._pending[0]
                try:
                    written = os.write(self._fd, chunk)
                except OSError:
                    return False
                if written < len(chunk):
                    self._pending[0] = chunk[written:]
                    return False
                self._pending.popleft()
            if self._lost:
                marker = ('["x",%d]\n' % self._lost).encode()
                try:
                    if os.write(self._fd, marker) != len(marker):
                        return False  # cannot happen at a line start short of a full disk
                except OSError:
                    return False
                logger.warning("dtool-cache-manager: %d accesses could not be recorded while "
                               "the disk was full", self._lost)
                self._lost = 0
            return True

    def close(self) -> None:
        if self._pending or self._lost:
            self.flush()
        os.close(self._fd)


def parse_journal(data: bytes, user: str = "?", host: str = "?") -> Tuple[List[object], int]:
    """Records from ``data`` and the number of bytes consumed.

    ``user`` and ``host`` attribute the records when ``data`` starts after the header.

    A trailing line without its newline is a write still in progress (or torn by a crash),
    so it is left for the next pass rather than consumed.
    """
    end = data.rfind(b"\n") + 1
    records: List[object] = []
    for raw in data[:end].split(b"\n"):
        if not raw:
            continue
        try:
            rec = json.loads(raw.decode("utf-8", "surrogateescape"))
            kind = rec[0]
            if kind == "j":
                _expect(rec[2:4], str)
                user, host = rec[2], rec[3]
            elif kind == "a":
                _expect(rec[1:6], str)
                _expect(rec[6:11], (int, float))
                records.append(AccessRecord(user, host, rec[6] / 1e6, rec[1], rec[2], rec[3],
                                            rec[4], rec[5], bool(rec[7]), int(rec[8]),
                                            rec[9] / 1e6, rec[10] / 1e6))
            elif kind == "m":
                _expect(rec[1:2], str)
                records.append(ManifestRecord(rec[1], _optional(rec[2], str),
                                              _optional(rec[3], int), _optional(rec[4], str),
                                              _optional(rec[5], str)))
            elif kind == "x":
                _expect(rec[1:2], int)
                records.append(LostRecord(rec[1]))
        except (ValueError, IndexError, TypeError, KeyError):
            logger.warning("dtool-cache-manager: skipping a malformed journal line: %r",
                           raw[:200])
    return records, end


def _expect(values, kind) -> None:
    """Journals are written by any member of a shared cache: check every field's type."""
    for value in values:
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise TypeError(f"unexpected {value!r} in a journal line")


def _optional(value, kind):
    if value is not None:
        _expect([value], kind)
    return value


def read_header(path: str) -> Tuple[str, str]:
    """(user, host) from a journal's first line; the header is needed to attribute a resumed read."""
    with open(path, "rb") as fh:
        first = fh.readline()
    rec = json.loads(first.decode("utf-8", "surrogateescape"))
    return rec[2], rec[3]


def iter_journals(paths: MetaPaths) -> Iterator[Tuple[str, str]]:
    """(token, path) of every journal file."""
    try:
        names = os.listdir(paths.journal_dir)
    except FileNotFoundError:
        return
    for name in sorted(names):
        if name.endswith(SUFFIX):
            yield name[: -len(SUFFIX)], os.path.join(paths.journal_dir, name)
