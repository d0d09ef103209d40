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

A journal is its owner's alone (mode 0644 in a sticky directory), so its accesses are
attributed to the unix user who owns the file, as the kernel says, whatever the header
claims.  Readers open journals without following links or blocking on FIFOs, stream them
with a cap on a line (:data:`MAX_LINE`) and on a file (:data:`MAX_JOURNAL_BYTES`), check
the type of every field, and never copy a line's bytes into a message: a member may have
planted anything there.
"""

from __future__ import annotations

import collections
import errno
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from . import cachefs
from .cachefs import CacheDir, Refused
from .layout import Identity

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUFFIX = ".jsonl"
MAX_PENDING = 100_000  # lines kept in memory while the disk is full
MAX_LINE = 64 * 1024  # a longer line is skipped as it streams by
MAX_JOURNAL_BYTES = 8 << 30  # a journal past this is not read (a sparse file, say)
_MAX_INT = 1 << 62  # sizes and microsecond times: SQLite's integers stop at 2**63
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


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

    def __init__(self, cache: CacheDir, identity: Identity, token: str):
        if cache.journal_fd is None:
            raise Refused(errno.ENOENT, f"{cache.meta_path}/{cachefs.JOURNAL} is missing")
        name = token + SUFFIX
        self.path = os.path.join(cache.meta_path, cachefs.JOURNAL, name)  # for messages
        self._fd = cachefs.create_file(cache.journal_fd, name, cachefs.OWN_FILE_MODE,
                                       os.O_WRONLY | os.O_APPEND)
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


def parse_lines(lines: Iterable[Optional[bytes]], user: str, host: str
                ) -> Tuple[List[object], int]:
    """Records from journal ``lines`` (None: a line over :data:`MAX_LINE`), attributed to
    ``user`` and ``host``, and the number of lines skipped as malformed."""
    records: List[object] = []
    malformed = 0
    for raw in lines:
        if raw is None:
            malformed += 1
            continue
        if not raw:
            continue
        try:
            record = _record(json.loads(raw.decode("utf-8", "surrogateescape")), user, host)
        except (ValueError, IndexError, TypeError, KeyError, OverflowError, RecursionError):
            malformed += 1
            continue
        if record is not None:
            records.append(record)
    return records, malformed


def _record(rec, user: str, host: str) -> Optional[object]:
    if not isinstance(rec, list) or not rec:
        raise TypeError("not a record")
    kind = rec[0]
    if kind == "j":
        return None  # its claims are the writer's; attribution comes from the kernel
    if kind == "a":
        if len(rec) != 11:
            raise TypeError("wrong length")
        _expect(rec[1:6], str)
        _expect([rec[6], rec[9]], float)  # microseconds since the epoch
        _expect([rec[7], rec[8], rec[10]], int)  # miss, size, fetch microseconds
        return AccessRecord(user, host, rec[6] / 1e6, rec[1], rec[2], rec[3], rec[4], rec[5],
                            bool(rec[7]), int(rec[8]), rec[9] / 1e6, rec[10] / 1e6)
    if kind == "m":
        _expect(rec[1:2], str)
        size = _optional(rec[3], int)
        return ManifestRecord(rec[1], _optional(rec[2], str),
                              None if size is None else int(size),
                              _optional(rec[4], str), _optional(rec[5], str))
    if kind == "x":
        _expect(rec[1:2], int)
        return LostRecord(int(rec[1]))
    raise TypeError("unknown record")


def _expect(values, kind) -> None:
    """Journals are written by any member of a shared cache: check every field's type, and
    range (a number SQLite cannot store, or a time that is no time, is refused)."""
    for value in values:
        if kind is str:
            if not isinstance(value, str):
                raise TypeError("unexpected field in a journal line")
        elif not isinstance(value, (int, float)) or isinstance(value, bool) \
                or not -_MAX_INT < value < _MAX_INT or (kind is int and value < 0) \
                or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError("number out of range in a journal line")


def _optional(value, kind):
    if value is not None:
        _expect([value], kind)
    return value


@dataclass
class OpenJournal:
    """A journal opened for reading, with the user the kernel says wrote it."""

    token: str
    fd: int
    stat: os.stat_result
    user: str
    host: str

    def close(self) -> None:
        os.close(self.fd)


def tokens(cache: CacheDir) -> List[str]:
    """The tokens of the journal files, in name order."""
    if cache.journal_fd is None:
        return []
    return sorted(name[:-len(SUFFIX)] for name in os.listdir(cache.journal_fd)
                  if name.endswith(SUFFIX))


def open_journal(cache: CacheDir, token: str) -> Tuple[Optional[OpenJournal], str]:
    """The journal of ``token``, or (None, why it cannot be read)."""
    assert cache.journal_fd is not None
    try:
        fd, st = cachefs.open_file(cache.journal_fd, token + SUFFIX, single_link=True)
    except FileNotFoundError:
        return None, "gone"
    except (Refused, PermissionError) as exc:
        return None, str(exc) if isinstance(exc, Refused) else "not readable"
    if st.st_size > MAX_JOURNAL_BYTES:
        os.close(fd)
        return None, f"over {MAX_JOURNAL_BYTES >> 30} GiB"
    return OpenJournal(token, fd, st, cachefs.user_name(st.st_uid), _claimed_host(fd)), ""


def _claimed_host(fd: int) -> str:
    """The host the header names (nothing on one host can check it), if it looks like a
    host name; the user comes from the file's owner instead."""
    head = cachefs.read_at_most(fd, 4096).split(b"\n", 1)[0]
    try:
        rec = json.loads(head.decode("utf-8", "strict"))
        host = rec[3] if isinstance(rec, list) and len(rec) > 3 and rec[0] == "j" else None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        host = None
    return host if isinstance(host, str) and _HOST.match(host) else "?"


def read_records(journal: OpenJournal, offset: int, upto: Optional[int] = None
                 ) -> Iterable[Tuple[List[object], int, int]]:
    """(records, offset after them, malformed lines) in batches, from ``offset``: bounded
    memory however long the journal."""
    end = journal.stat.st_size if upto is None else upto
    batch: List[Optional[bytes]] = []
    last = offset
    for line, after in cachefs.iter_lines(journal.fd, offset, end, MAX_LINE):
        batch.append(line)
        last = after
        if len(batch) >= 50_000:
            records, malformed = parse_lines(batch, journal.user, journal.host)
            yield records, last, malformed
            batch = []
    records, malformed = parse_lines(batch, journal.user, journal.host)
    yield records, last, malformed
