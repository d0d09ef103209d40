"""Per-process, append-only access journals: the hot path's only write.

Each access appends one line with a single ``os.write`` on an ``O_APPEND`` descriptor
(about 4 µs, no lock, no fsync), so processes never contend and a crash loses at most the
line being written.  The ledger folds journals in later, in batches, as Cargo's global cache
tracker defers its last-use writes.  Lines are plain JSON: anyone can read them, and nothing
is ever unpickled.

A process describes each cached file once and then refers to it by a number, so that a warm
access costs a line of about 17 bytes (format 2)::

    ["j", 2, user, host, pid, started, segment]                       header
    ["i", number, relpath, uri, uuid, identifier, scheme, size, mtime_us]   an item, as
                                            the process saw it (a new number if it changes)
    ["m", relpath, item_relpath, manifest_size, manifest_hash, hash_function]  once per item
    ["h", hour]                             the hour (since the epoch) of the accesses after
                                            it: written before the first access of a segment
                                            and whenever the hour changes
    [number, us]                            a hit, ``us`` microseconds into that hour
                                            (always 10 digits: compared as text in bulk)
    [number, us, fetch_us]                  a miss, and how long the fetch took
    ["x", count]     accesses this process could not journal (full disk or quota)

The ledger counts accesses per item and hour, so a reader folds a stretch of hits with a few
regular-expression passes and a ``Counter``, never a Python loop per line (a million
accesses: about 0.2 s, see :class:`HourSection`).

Format 1 journals (``["a", relpath, uri, uuid, identifier, scheme, t_us, miss, size,
mtime_us, fetch_us]`` per access, written before an upgrade) are still read.

**Segments.**  A process writes ``<token>.s<n>.jsonl``; past :data:`SEGMENT_BYTES` it
starts the next segment and folds the finished ones into the ledger (see
``tracking.ProcessSession``), so a process that makes millions of accesses keeps its
journal small and its exit fold short.  The numbers go on across segments: the ledger keeps
each process's item definitions (``journal_items``) until its last segment is gone.

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
import operator
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

from . import cachefs
from .cachefs import CacheDir, Refused
from .layout import Identity

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
SUFFIX = ".jsonl"
SEGMENT_BYTES = 32 << 20  # a segment past this is closed (two at most: 64 MiB on disk)
_SEGMENT = re.compile(r"^(?P<token>.+)\.s(?P<seq>[0-9]{1,9})$")
MAX_PENDING = 100_000  # lines kept in memory while the disk is full
MAX_LINE = 64 * 1024  # a longer line is skipped as it streams by
MAX_JOURNAL_BYTES = 8 << 30  # a journal past this is not read (a sparse file, say)
_MAX_INT = 1 << 62  # sizes and microsecond times: SQLite's integers stop at 2**63
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
HOUR_US = 3_600_000_000
MAX_HOUR = 10 ** 9
CHUNK_BYTES = 1 << 20  # format 2 is read in chunks of complete lines of at most this
# Format-2 lines, matched in bulk; their fields are checked after (see parse_chunk): an item
# number below 10**18, microseconds into an hour below HOUR_US, a fetch below 10**15 µs, an
# hour below MAX_HOUR (so that hour * HOUR_US fits SQLite's integers).
_HOUR_MARK = re.compile(rb'^\["h",([0-9]{1,9})\]\n', re.M)
_ACCESS = re.compile(rb"^\[([0-9]+),([0-3][0-9]{9})(?:,([0-9]+))?\]$", re.M)
_PAST_THE_HOUR = b"%010d" % HOUR_US  # microseconds come in 10 digits: compared as text
_RECORD = re.compile(rb'^\[".*$', re.M)  # the other kinds: JSON with a name first
_EMPTY = re.compile(rb"^\n", re.M)
_HIT_NUMBER = re.compile(rb"^\[([0-9]{1,18}),", re.M)
_DIGITS_AS_D = bytes.maketrans(b"0123456789d", b"ddddddddddx")  # a written 'd' is no digit
_PAST_THE_HOUR_AFTER_COMMA = re.compile(rb",(?:[4-9]|3[6-9])")  # 10 digits >= 3,600,000,000
FEW_NUMBERS = 64  # distinct items a stretch may hold for it to be counted by bytes.count
_FIRST = operator.itemgetter(0)
_SECOND = operator.itemgetter(1)
_THIRD = operator.itemgetter(2)
_FIRST_TWO = operator.itemgetter(0, 1)


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


@dataclass(frozen=True)
class ItemDefinition:
    """A cached file as one process saw it, under the number its accesses use (format 2)."""

    number: int
    relpath: str
    uri: str
    uuid: str
    identifier: str
    scheme: str
    size: int
    mtime: float


@dataclass(frozen=True)
class HourSection:
    """Format-2 accesses of one hour in a stretch of one journal, counted without a Python
    loop per line: hits per item number (with the latest written), misses one by one.  The
    text is kept for the rare item whose file was removed within that hour: its hits are
    then split at the removal (:meth:`hit_times`)."""

    hour: int
    hits: Dict[int, Tuple[int, int]]  # number -> (hits, µs into the hour of the last written)
    misses: List[Tuple[int, int, int]]  # (number, µs into the hour, fetch µs), in order
    text: bytes

    @property
    def count(self) -> int:
        return sum(n for n, _ in self.hits.values()) + len(self.misses)

    def numbers(self) -> Set[int]:
        return set(self.hits).union(n for n, _, _ in self.misses)

    def hit_times(self, number: int) -> List[int]:
        """µs into the hour of each hit of ``number``, in order."""
        pattern = re.compile(rb"^\[0*%d,([0-3][0-9]{9})\]$" % number, re.M)
        return [int(us) for us in pattern.findall(self.text) if us < _PAST_THE_HOUR]


def segment_name(token: str, seq: int) -> str:
    return f"{token}.s{seq}{SUFFIX}"


class JournalWriter:
    """This process's journal in one cache directory.

    ``on_rotate`` is called (by the access that filled a segment) once the next segment is
    open: the session folds the finished ones there.
    """

    def __init__(self, cache: CacheDir, identity: Identity, token: str,
                 on_rotate: Optional[Callable[[], None]] = None):
        if cache.journal_fd is None:
            raise Refused(errno.ENOENT, f"{cache.meta_path}/{cachefs.JOURNAL} is missing")
        self.identity = identity
        self.token = token
        self.on_rotate = on_rotate
        self._dir_fd = os.dup(cache.journal_fd)
        self._meta_path = cache.meta_path
        self._seq = 0
        self._numbers = 0
        self._hour = -1  # of the last hour mark written in this segment
        self._manifests: Set[str] = set()
        self._pending: collections.deque = collections.deque()  # unwritten bytes, in order
        self._lost = 0
        self._lock = threading.Lock()
        self._fd = -1
        self._open_segment()

    @property
    def path(self) -> str:
        """The segment being written (for messages)."""
        return os.path.join(self._meta_path, cachefs.JOURNAL, segment_name(self.token, self._seq))

    def _open_segment(self) -> None:
        fd = cachefs.create_file(self._dir_fd, segment_name(self.token, self._seq),
                                 cachefs.OWN_FILE_MODE, os.O_WRONLY | os.O_APPEND)
        header = (json.dumps(["j", FORMAT_VERSION, self.identity.user, self.identity.host,
                              self.identity.pid, time.time(), self._seq]) + "\n").encode()
        try:
            os.write(fd, header)
        except BaseException:
            os.close(fd)
            raise
        old, self._fd, self._written = self._fd, fd, len(header)
        self._hour = -1
        if old >= 0:
            os.close(old)

    def describe(self, relpath: str, uri: str, uuid: str, identifier: str, scheme: str,
                 size: int, mtime: float, manifest: Optional[ManifestRecord]) -> int:
        """Write the item's definition (and its manifest facts, once per file); return the
        number its accesses use.  The caller keeps it while the file's size and mtime stay
        the same, so that each access only formats two numbers."""
        if manifest is not None and relpath not in self._manifests:
            self._manifests.add(relpath)
            line = json.dumps(["m", manifest.relpath, manifest.item_relpath,
                               manifest.manifest_size, manifest.manifest_hash,
                               manifest.hash_function]) + "\n"
            self._emit(line.encode("utf-8", "surrogateescape"), counts=False)
        number, self._numbers = self._numbers, self._numbers + 1
        line = json.dumps(["i", number, relpath, uri, uuid, identifier, scheme, size,
                           int(mtime * 1e6)]) + "\n"
        self._emit(line.encode("utf-8", "surrogateescape"), counts=False)
        return number

    def record_access(self, number: int, t: float, miss: bool, fetch_seconds: float) -> None:
        """One access, one ``os.write`` (with the hour's mark, when the hour is new): a crash
        loses at most this line."""
        hour, us = divmod(int(t * 1e6), HOUR_US)
        if miss:
            line = b"[%d,%010d,%d]\n" % (number, us, fetch_seconds * 1e6)
        else:
            line = b"[%d,%010d]\n" % (number, us)
        if hour != self._hour:
            line = b'["h",%d]\n' % hour + line
            self._hour = hour
        self._emit(line)
        if self._written > SEGMENT_BYTES and not self._pending:
            self._rotate()

    @property
    def removed(self) -> bool:
        """Did someone remove the segment being written (another host that took this
        process for dead while its coordinator session was lost, and folded it)?"""
        return cachefs.removed_while_open(self._fd)

    def start_again(self, token: str) -> None:
        """Go on in a new journal under ``token`` (the holds file's new one).  The caller
        must describe its items afresh: definitions stay with the old journal."""
        self.token, self._seq = token, 0
        self._open_segment()
        self._manifests.clear()

    def _rotate(self) -> None:
        """Close this segment and open the next; then let the session fold what is done."""
        self._seq += 1
        try:
            self._open_segment()
        except OSError as exc:  # e.g. a full disk: go on in this segment
            self._seq -= 1
            logger.debug("dtool-cache-manager: cannot start a new journal segment (%r)", exc)
            return
        if self.on_rotate is not None:
            self.on_rotate()

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
        self._written += written
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
            else:
                self._hour = -1  # the line may have carried the hour's mark: mark again
                if counts:
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
        os.close(self._dir_fd)


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


def parse_chunk(data: bytes, user: str, host: str, hour: Optional[int]
                ) -> Tuple[List[object], int, Optional[int]]:
    """Records from ``data``, complete format-2 lines, whose accesses are in ``hour`` until a
    mark says otherwise: (records, malformed lines, the hour in force at the end).  Accesses
    come as one :class:`HourSection` per hour; the other records are parsed as JSON."""
    records: List[object] = []
    malformed = 0
    parts = _HOUR_MARK.split(data) if b'["h",' in data else [data]  # text, hour, text...
    hours = [hour] + [int(h) for h in parts[1::2]]
    for section_hour, text in zip(hours, parts[0::2]):
        if not text:
            continue
        hits_only = _count_few_hits(text)
        if hits_only is not None:
            if section_hour is None:  # accesses before any mark: no time to count them at
                malformed += text.count(b"\n")
            elif hits_only:
                records.append(HourSection(section_hour, hits_only, [], text))
            continue
        # One pass for the accesses; the rare other lines only looked for where they are.
        accesses = _ACCESS.findall(text)  # (number, us, fetch or b'' for a hit)
        others = _RECORD.findall(text) if b'["' in text else []
        empty = len(_EMPTY.findall(text)) if b"\n\n" in text or text[:1] == b"\n" else 0
        malformed += text.count(b"\n") - empty - len(accesses) - len(others)
        parsed, bad = parse_lines([r if len(r) <= MAX_LINE else None for r in others],
                                  user, host)
        records += parsed
        malformed += bad
        if not accesses:
            continue
        if section_hour is None:  # accesses before any mark: no time to count them at
            malformed += len(accesses)
            continue
        if max(map(_SECOND, accesses)) >= _PAST_THE_HOUR:  # in C: all 10 digits
            valid = [a for a in accesses if a[1] < _PAST_THE_HOUR]
            malformed += len(accesses) - len(valid)
            accesses = valid
        misses, hits = [], accesses
        if any(map(_THIRD, accesses)):  # in C; misses are few
            misses = [a for a in accesses if a[2]]
            hits = [a for a in accesses if not a[2]]
        counted: Dict[int, Tuple[int, int]] = {}
        last = dict(map(_FIRST_TWO, hits))  # in C: each number's last written time wins
        for raw_number, n in collections.Counter(map(_FIRST, hits)).items():
            if len(raw_number) > 18:
                malformed += n
                continue
            number = int(raw_number)
            before = counted.get(number)  # '07' and '7' are one number
            us = int(last[raw_number])
            counted[number] = (n, us) if before is None else (before[0] + n, max(us, before[1]))
        checked = [(int(n), int(us), int(f)) for n, us, f in misses
                   if len(n) <= 18 and len(f) <= 15]
        malformed += len(misses) - len(checked)
        if counted or checked:
            records.append(HourSection(section_hour, counted, checked, text))
    return records, malformed, hours[-1]


def _count_few_hits(text: bytes) -> Optional[Dict[int, Tuple[int, int]]]:
    """Hits per number (and the last one's µs) of a stretch made only of well-formed hits of
    at most :data:`FEW_NUMBERS` items, the usual shape of a training loop's journal, by a
    few ``bytes`` scans in C instead of a match per line (a million lines: 0.55 s -> 0.15 s).
    None: another shape, for the general path to judge line by line.

    Why the scans prove the shape, for ``lines`` complete lines: every line starts with
    ``[n,`` for a candidate ``n`` (their counts after a newline add up to ``lines``), ends
    with ``,`` + 10 digits + ``]`` (that many such endings), and holds one comma (that many
    commas), so the two commas are one and the line is exactly ``[n,dddddddddd]``."""
    lines = text.count(b"\n")
    candidates = set(_HIT_NUMBER.findall(text, 0, 1 << 16))  # writers reuse a few numbers
    if (not lines or not candidates or len(candidates) > FEW_NUMBERS or text[-1:] != b"\n"
            or text.count(b",") != lines
            or text.translate(_DIGITS_AS_D).count(b",dddddddddd]\n") != lines
            or _PAST_THE_HOUR_AFTER_COMMA.search(text)):
        return None
    framed = b"\n" + text
    counted: Dict[int, Tuple[int, int]] = {}
    found = 0
    for raw_number in candidates:
        number = int(raw_number)
        if b"%d" % number != raw_number:  # '07': the general path merges it with '7'
            return None
        key = b"\n[%s," % raw_number
        n = framed.count(key)
        at = framed.rfind(key) + len(key)
        counted[number] = (n, int(framed[at:at + 10]))
        found += n
    return counted if found == lines else None


def _record(rec, user: str, host: str) -> Optional[object]:
    if not isinstance(rec, list) or not rec:
        raise TypeError("not a record")
    kind = rec[0]
    if kind == "j":
        return None  # its claims are the writer's; attribution comes from the kernel
    if kind == "i":
        if len(rec) != 9:
            raise TypeError("wrong length")
        _expect(rec[1:2], int)
        _expect(rec[2:7], str)
        _expect(rec[7:8], int)
        _expect(rec[8:9], float)
        return ItemDefinition(int(rec[1]), rec[2], rec[3], rec[4], rec[5], rec[6],
                              int(rec[7]), rec[8] / 1e6)
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
    """A journal file opened for reading, with the user the kernel says wrote it."""

    name: str  # the file's name without its suffix: '<token>' (format 1) or '<token>.s<n>'
    token: str  # the writing process's token (its holds file's name)
    seq: int  # the segment (-1: format 1, one file per process)
    fd: int
    stat: os.stat_result
    user: str
    host: str
    version: int

    def close(self) -> None:
        os.close(self.fd)


def journal_files(cache: CacheDir) -> List[Tuple[str, str, int]]:
    """(name, token, segment) of every journal file, each process's in segment order."""
    if cache.journal_fd is None:
        return []
    found = []
    for entry in os.listdir(cache.journal_fd):
        if not entry.endswith(SUFFIX):
            continue
        name = entry[:-len(SUFFIX)]
        match = _SEGMENT.match(name)
        found.append((name, match.group("token"), int(match.group("seq"))) if match
                     else (name, name, -1))
    return sorted(found, key=lambda f: (f[1], f[2]))


def open_journal(cache: CacheDir, name: str, token: str, seq: int
                 ) -> Tuple[Optional[OpenJournal], str]:
    """The journal file ``name``, or (None, why it cannot be read)."""
    assert cache.journal_fd is not None
    try:
        fd, st = cachefs.open_file(cache.journal_fd, name + SUFFIX, single_link=True)
    except FileNotFoundError:
        return None, "gone"
    except (Refused, PermissionError) as exc:
        return None, str(exc) if isinstance(exc, Refused) else "not readable"
    if st.st_size > MAX_JOURNAL_BYTES:
        os.close(fd)
        return None, f"over {MAX_JOURNAL_BYTES >> 30} GiB"
    host, version = _header(fd)
    return OpenJournal(name, token, seq, fd, st, cachefs.user_name(st.st_uid), host,
                       version), ""


def _header(fd: int) -> Tuple[str, int]:
    """(host, format) from the header.  The host is what the writer claims (nothing on one
    host can check it), kept if it looks like a host name; the user comes from the file's
    owner instead."""
    head = cachefs.read_at_most(fd, 4096).split(b"\n", 1)[0]
    try:
        rec = json.loads(head.decode("utf-8", "strict"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        rec = None
    if not (isinstance(rec, list) and len(rec) > 3 and rec[0] == "j"):
        return "?", 1
    host = rec[3] if isinstance(rec[3], str) and _HOST.match(rec[3]) else "?"
    version = 2 if rec[1] == 2 else 1
    return host, version


def read_records(journal: OpenJournal, offset: int, hour: Optional[int] = None,
                 upto: Optional[int] = None
                 ) -> Iterator[Tuple[List[object], int, int, Optional[int]]]:
    """(records, offset after them, malformed lines, hour in force after them) in batches,
    from ``offset`` (where ``hour`` was in force, for format 2): bounded memory however long
    the journal."""
    end = journal.stat.st_size if upto is None else upto
    if journal.version >= 2:
        for data, after in cachefs.iter_chunks(journal.fd, offset, end, CHUNK_BYTES):
            if data is None:  # a line longer than a chunk
                yield [], after, 1, hour
                continue
            records, malformed, hour = parse_chunk(data, journal.user, journal.host, hour)
            yield records, after, malformed, hour
        return
    batch: List[Optional[bytes]] = []
    last = offset
    for line, after in cachefs.iter_lines(journal.fd, offset, end, MAX_LINE):
        batch.append(line)
        last = after
        if len(batch) >= 100_000:
            records, malformed = parse_lines(batch, journal.user, journal.host)
            yield records, last, malformed, None
            batch = []
    records, malformed = parse_lines(batch, journal.user, journal.host)
    yield records, last, malformed, None
