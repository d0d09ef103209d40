"""Every filesystem operation inside a cache directory, through directory descriptors.

A shared cache is hostile ground: any member of its group can rename, replace or remove any
entry the group can write, at any moment, and a data manager often works there as root.  So
nothing here acts on a name that was checked a moment before.  The rules are those of
systemd-tmpfiles and gnulib ``fts`` with ``FTS_PHYSICAL``:

1. The cache root is opened once, by the path the user configured (symbolic links in that
   path are the user's choice).  Below it, every directory is opened one component at a
   time, relative to its parent's descriptor, with ``O_NOFOLLOW|O_DIRECTORY``: a symbolic
   link anywhere inside the cache is refused, never followed.
2. What was opened is what we act on: ``fstat`` the descriptor, ``fchmod``/``fchown`` it,
   unlink relative to the verified directory's descriptor.  Unlinking never follows a link,
   so the worst a swap can do is make us remove another entry *of the same directory*.
3. Files are opened ``O_NOFOLLOW|O_NONBLOCK`` and used only when they are regular files: a
   FIFO cannot block us, a device cannot be read.  Files we write into or change the mode
   of must have one link, so a hard link cannot carry a write outside.
4. Reads are bounded: whole-file reads have a cap, journals are streamed line by line with a
   cap on a line.

Trust
-----
Our bookkeeping lives in ``.dtool-cache-manager/`` (:data:`~layout.META_DIRNAME`).  In a
shared cache it is mode 2755: only its owner (the cache directory's owner, or root) creates,
renames or removes entries there, so the ledger's files cannot be swapped by a member and
SQLite, which opens files by name, may use them.  Members write only inside ``holds/`` and
``journal/`` (mode 3775, sticky like ``/tmp``), each in files of their own.  For that to
hold, the cache root must itself be sticky (members could otherwise rename the whole
bookkeeping directory), and the bookkeeping directories must belong to someone the process
trusts: root, itself, and (for anyone but root) the cache directory's owner.  Commands
repair what their user may repair (root adopts a member's bookkeeping for the cache owner,
an owner adds the sticky bit); what they may not, they refuse with one line that says how to
fix it.  See ``docs/security.rst``.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

from .facilities import O_CLOEXEC, O_DIRECTORY, O_NOFOLLOW, O_NONBLOCK, pwd
from .errors import CacheManagerError
from .layout import META_DIRNAME

_logger = logging.getLogger(__name__)

HOLDS = "holds"
JOURNAL = "journal"
LEDGER = "ledger.sqlite3"
LEDGER_FILES = (LEDGER, LEDGER + "-wal", LEDGER + "-shm", LEDGER + "-journal")
WAL_FILES = LEDGER_FILES[1:3]  # a ledger in WAL mode (one host)
ROLLBACK_JOURNAL = LEDGER_FILES[3]  # a coordinated ledger's journal (several hosts)
GATE_LOCK = "gate.lock"  # byte-range locks: 'check holders, then unlink' against holds
FETCH_LOCK = "fetch.lock"  # byte-range locks: concurrent misses of one item download once
AUTOCLEAN_LOCK = "autoclean.lock"  # flock'ed by the automatic clean in progress
AUTOCLEAN_LOG = "autoclean.log"  # one JSON line per automatic clean
TRASH = "trash"  # a coordinated cache's cleaned files, kept for their grace period
INFRA_FILES = (GATE_LOCK, FETCH_LOCK, AUTOCLEAN_LOCK, AUTOCLEAN_LOG)

SHARED_DIR_MODE = 0o2775  # dataset directories: group rwx, setgid keeps the cache's group
META_MODE_SHARED = 0o2755  # the bookkeeping directory: only its owner adds or removes entries
STICKY_DIR_MODE = 0o3775  # holds/ and journal/: members add entries, remove only their own
SHARED_FILE_MODE = 0o664  # lock, log and ledger files: every member writes them
OWN_FILE_MODE = 0o644  # per-process files: readable by all, written by their owner only

_DIR_FLAGS = os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
_FILE_FLAGS = O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC
_WRITE_BITS = stat.S_IWGRP | stat.S_IWOTH


class Refused(OSError):
    """An entry we do not act on: a symbolic link, a FIFO where a file belongs, a hard link
    where we would write, a file over its size cap.  ``str()`` is one line naming it."""

    def __str__(self) -> str:
        return str(self.strerror)


class CacheUnavailable(CacheManagerError, OSError):
    """The cache directory itself cannot be opened (missing, not a directory, not ours to
    read); the message is one line."""

    def __str__(self) -> str:
        return str(self.strerror)


# -- primitives ------------------------------------------------------------------------


def components(relpath: str) -> List[str]:
    """The components of a path inside the cache; :class:`Refused` for anything else
    (absolute, empty parts, '.', '..', NUL).  Paths come from shared files."""
    parts = relpath.split("/") if isinstance(relpath, str) else []
    if not parts or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise Refused(errno.EINVAL, f"not a path inside the cache: {relpath!r}")
    return parts


def open_dir(dir_fd: int, name: str) -> int:
    """``name`` in ``dir_fd`` as a directory, never through a symbolic link."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise Refused(exc.errno, f"{name!r} is not a directory (a symbolic link or "
                                     "another kind of file)") from None
        raise


def walk(root_fd: int, parts: Sequence[str]) -> int:
    """A new descriptor of the directory ``parts`` below ``root_fd``, opened a component at
    a time.  The caller closes it."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            child = open_dir(fd, part)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_dirs(root_fd: int, parts: Sequence[str], mode: int) -> int:
    """Like :func:`walk`, creating missing directories with ``mode`` (which a umask cannot
    narrow: we set it on what we made).  Directories of ours that lack a bit of ``mode``
    get it; others' are left alone."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            try:
                os.mkdir(part, mode, dir_fd=fd)
            except FileExistsError:
                pass
            child = open_dir(fd, part)
            os.close(fd)
            fd = child
            widen_own(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def widen_own(fd: int, mode: int) -> None:
    """Add the bits of ``mode`` to the file or directory open as ``fd`` if it is ours."""
    st = os.fstat(fd)
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) | mode != stat.S_IMODE(st.st_mode):
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | mode)


def open_file(dir_fd: int, name: str, flags: int = os.O_RDONLY, mode: int = OWN_FILE_MODE,
              single_link: bool = False) -> Tuple[int, os.stat_result]:
    """(descriptor, stat) of the regular file ``name`` in ``dir_fd``.  Never follows a
    link nor blocks on a FIFO; with ``single_link``, refuses a file with other names."""
    try:
        fd = os.open(name, flags | _FILE_FLAGS, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(exc.errno, f"{name!r} is a symbolic link") from None
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, opened for writing
            raise Refused(exc.errno, f"{name!r} is not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(errno.EINVAL, f"{name!r} is not a regular file")
        if single_link and st.st_nlink > 1:  # (0: removed meanwhile, harmless)
            raise Refused(errno.EMLINK, f"{name!r} has other names (a hard link)")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def create_file(dir_fd: int, name: str, mode: int, flags: int = os.O_WRONLY) -> int:
    """A new file of ours (``O_EXCL``: never an existing entry), with exactly ``mode``."""
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def entry_stat(dir_fd: int, name: str) -> Optional[os.stat_result]:
    """The entry itself (a link is not followed), or None if there is none."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def unlink_entry(dir_fd: int, name: str, regular: bool = True,
                 same_as: Optional[os.stat_result] = None) -> os.stat_result:
    """Remove ``name`` from the verified directory ``dir_fd``; returns what it was.

    With ``regular``, only a regular file; with ``same_as``, only that very file (same
    device and inode).  Unlinking never follows a link: a swap between the check and the
    unlink can only make us remove another entry of this same directory.
    """
    st = _entry_to_remove(dir_fd, name, regular, same_as)
    os.unlink(name, dir_fd=dir_fd)
    return st


def _entry_to_remove(dir_fd: int, name: str, regular: bool,
                     same_as: Optional[os.stat_result]) -> os.stat_result:
    """What ``name`` is, if it may be unlinked or moved away: Refused if it is not a
    regular file (with ``regular``) or not the very file ``same_as``."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if regular and not stat.S_ISREG(st.st_mode):
        raise Refused(errno.EINVAL, f"{name!r} is not a regular file")
    if same_as is not None and (st.st_dev, st.st_ino) != (same_as.st_dev, same_as.st_ino):
        raise Refused(errno.ESTALE, f"{name!r} was replaced meanwhile")
    return st


def move_entry(dir_fd: int, name: str, to_fd: int, new_name: str,
               same_as: Optional[os.stat_result] = None) -> os.stat_result:
    """Move the regular file ``name`` (with ``same_as``, only that very file) to
    ``new_name`` in the verified directory ``to_fd`` on the same filesystem; returns what it
    was.  As :func:`unlink_entry`, a swap can only make us move another entry of ``dir_fd``."""
    st = _entry_to_remove(dir_fd, name, True, same_as)
    os.rename(name, new_name, src_dir_fd=dir_fd, dst_dir_fd=to_fd)
    return st


def open_trash(cache: "CacheDir") -> Optional[int]:
    """The trash directory, made by the bookkeeping's owner (group-writable in a shared
    cache, as a dataset directory is: whoever may remove an item may move it here)."""
    if cache.meta_fd is None:
        return None
    return _open_sub(cache, TRASH, SHARED_DIR_MODE if cache.shared else 0o755, create=True,
                     repair=False)


def trash_usage(cache: "CacheDir") -> Tuple[int, int]:
    """(files, bytes) waiting in the trash; (0, 0) without one."""
    if cache.meta_fd is None:
        return 0, 0
    try:
        fd = open_dir(cache.meta_fd, TRASH)
    except OSError:
        return 0, 0
    files = size = 0
    try:
        for name in os.listdir(fd):
            st = entry_stat(fd, name)
            if st is not None and stat.S_ISREG(st.st_mode):
                files, size = files + 1, size + st.st_size
    finally:
        os.close(fd)
    return files, size


def purge_trash(trash_fd: int, trashed_before: int) -> Tuple[int, int]:
    """Unlink the regular files in the trash whose names say they were moved there before
    ``trashed_before`` (``<seconds>.<unique>``, by the coordinator's clock); returns
    (files, bytes).  Anything else there is left alone."""
    files = size = 0
    for name in os.listdir(trash_fd):
        stamp = name.split(".", 1)[0]
        if not (stamp.isdigit() and len(stamp) < 12 and int(stamp) < trashed_before):
            continue
        try:
            st = unlink_entry(trash_fd, name)
        except OSError:
            continue  # another's purge got there first, or not a regular file
        files, size = files + 1, size + st.st_size
    return files, size


def removed_while_open(fd: int) -> bool:
    """Was the file open on ``fd`` removed by someone?  (No name left; on NFS and FUSE, a
    file another host removed answers ESTALE or ENOENT.)"""
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESTALE):
            return True
        raise


def rename_entry(dir_fd: int, name: str, new_name: str) -> None:
    """Rename within one verified directory (replacing ``new_name``, as ``rename`` does)."""
    os.replace(name, new_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def replace_file(dir_fd: int, name: str, data: bytes, mode: int) -> None:
    """Make ``data`` the content of ``name`` in the verified directory: written whole and
    synced under a new name of ours (``O_EXCL``), then renamed over it, so that a reader
    sees the old file or the new one, never part of either.  On failure the temporary file
    goes."""
    tmp = f"{name}.new-{os.getpid()}"
    fd = create_file(dir_fd, tmp, mode)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        rename_entry(dir_fd, tmp, name)
    except BaseException:
        try:
            unlink_entry(dir_fd, tmp)
        except OSError:
            pass
        raise


def link_entry(dir_fd: int, name: str, new_name: str) -> None:
    """A second name in the same verified directory; FileExistsError if it is taken."""
    os.link(name, new_name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)


def rename_aside(dir_fd: int, name: str, why: str) -> str:
    """Move ``name`` out of the way inside its own directory; returns the new name ('' if
    another process moved or removed it first)."""
    aside = f"{name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    try:
        os.rename(name, aside, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except FileNotFoundError:
        return ""
    return aside


def read_at_most(fd: int, limit: int, offset: int = 0) -> bytes:
    """Up to ``limit`` bytes from ``offset``: bounded, whatever size the file claims."""
    chunks = []
    while limit > 0:
        chunk = os.pread(fd, min(limit, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def iter_chunks(fd: int, start: int, end: int, size: int
                ) -> Iterator[Tuple[Optional[bytes], int]]:
    """(chunk, offset after it) between ``start`` and ``end``: chunks of at most ``size``
    bytes of complete lines.  A line longer than ``size`` comes as (None, offset after it):
    skipped, never held in memory.  A last line without its newline is a write in progress:
    not yielded."""
    offset = start
    while offset < end:
        data = os.pread(fd, min(size, end - offset), offset)
        if not data:
            return
        cut = data.rfind(b"\n")
        if cut >= 0:
            yield data[:cut + 1], offset + cut + 1
            offset += cut + 1
            continue
        if len(data) < size:
            return  # the line being written
        skip = offset + len(data)  # a line longer than a chunk: find its end
        while skip < end:
            data = os.pread(fd, min(size, end - skip), skip)
            if not data:
                return
            newline = data.find(b"\n")
            if newline >= 0:
                break
            skip += len(data)
        else:
            return
        offset = skip + newline + 1
        yield None, offset


def iter_lines(fd: int, start: int, end: int, max_line: int
               ) -> Iterator[Tuple[Optional[bytes], int]]:
    """(line, offset after it) for each complete line between ``start`` and ``end``, read in
    chunks; a line longer than ``max_line`` comes as None (skipped, never held in memory).
    A last line without its newline is a write in progress: not yielded."""
    offset, pending, skipping = start, b"", False
    while offset < end:
        chunk = os.pread(fd, min(1 << 20, end - offset), offset)
        if not chunk:
            break
        base = offset - len(pending)
        offset += len(chunk)
        data, pending = pending + chunk, b""
        begin = 0
        while True:
            newline = data.find(b"\n", begin)
            if newline < 0:
                break
            if skipping:
                skipping = False
                yield None, base + newline + 1
            else:
                line = data[begin:newline]
                yield (line if len(line) <= max_line else None), base + newline + 1
            begin = newline + 1
        rest = data[begin:]
        if skipping or len(rest) > max_line:
            skipping = True  # drop it as it streams by
        else:
            pending = rest


# -- directories under a root, each opened once ----------------------------------------


class Dirs:
    """Descriptors of directories below a root, each opened from its parent's descriptor
    (never through a link) and kept, least recently used closed first.  Not thread-safe:
    workers may use descriptors the owning thread handed them until its next :meth:`trim`."""

    def __init__(self, root_fd: int, keep: int = 256):
        self.root_fd = root_fd
        self.keep = keep
        self._fds: "OrderedDict[str, int]" = OrderedDict()

    def fd(self, rel: str) -> int:
        """The directory ``rel`` ('' is the root); :class:`Refused` or OSError if it is not
        a directory reached without links."""
        if rel == "":
            return self.root_fd
        fd = self._fds.get(rel)
        if fd is not None:
            self._fds.move_to_end(rel)
            return fd
        parent, _, name = rel.rpartition("/")
        components(rel)
        fd = open_dir(self.fd(parent), name)
        self._fds[rel] = fd
        return fd

    def entry(self, relpath: str) -> Tuple[int, str]:
        """(descriptor of its directory, its name) for a path below the root."""
        parts = components(relpath)
        return self.fd("/".join(parts[:-1])), parts[-1]

    def trim(self) -> None:
        while len(self._fds) > self.keep:
            _, fd = self._fds.popitem(last=False)
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "Dirs":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- the kernel's view of locks and processes ------------------------------------------


def flock_holders(stats: Sequence[os.stat_result]) -> Optional[Dict[Tuple[int, int], int]]:
    """(device, inode) -> pid of the process holding a ``flock`` write lock on it, for the
    files in ``stats``, as the kernel lists them in ``/proc/locks``.  None where there is no
    ``/proc/locks``: a pid is then unknown, never guessed."""
    wanted = {(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino): (st.st_dev, st.st_ino)
              for st in stats}
    found: Dict[Tuple[int, int], int] = {}
    if not wanted:
        return found
    try:
        with open("/proc/locks", "rb") as fh:
            text = fh.read(16 << 20)
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 14342 fe:00:2146397 0 EOF"; waiters carry a "->"
        if len(fields) < 6 or fields[1] != b"FLOCK" or fields[3] != b"WRITE":
            continue
        try:
            pid = int(fields[4])
            major, minor, ino = fields[5].split(b":")
            key = (int(major, 16), int(minor, 16), int(ino))
        except ValueError:
            continue
        if key in wanted and pid > 0:
            found.setdefault(wanted[key], pid)
    return found


def process_uid(pid: int) -> Optional[int]:
    """The effective owner of a live process, as the kernel reports it."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def user_name(uid: Optional[int]) -> str:
    """The account name of ``uid`` (its number if it has none)."""
    if uid is None:
        return "?"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# -- the cache and its bookkeeping -----------------------------------------------------


@dataclass
class CacheDir:
    """An open cache directory: descriptors of its root and bookkeeping, and what may be
    trusted there (see the module docs).  ``unsafe``: why SQLite may not open the ledger by
    its path (None: it may).  ``holds_unsafe``: why holds cannot prove an item unused."""

    path: str
    root_fd: int
    root_stat: os.stat_result
    meta_fd: Optional[int] = None
    meta_stat: Optional[os.stat_result] = None
    holds_fd: Optional[int] = None
    journal_fd: Optional[int] = None
    unsafe: Optional[str] = None
    holds_unsafe: Optional[str] = None
    repairs: List[str] = field(default_factory=list)
    # What sharing.sharing_of found, once looked up (a sharing.Sharing; None: not yet).
    sharing_memo: Optional[object] = None

    @property
    def shared(self) -> bool:
        """A cache others may write into: we then share what we create with its group."""
        return bool(self.root_stat.st_mode & _WRITE_BITS)

    @property
    def meta_path(self) -> str:
        return os.path.join(self.path, META_DIRNAME)

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.meta_path, LEDGER)

    @property
    def can_write_meta(self) -> bool:
        """May this process add or remove entries of the bookkeeping directory itself?"""
        if self.meta_stat is None:
            return False
        euid = os.geteuid()
        return euid == 0 or (euid == self.meta_stat.st_uid
                             and bool(self.meta_stat.st_mode & stat.S_IWUSR))

    @property
    def infra_mode(self) -> int:
        return SHARED_FILE_MODE if self.shared else OWN_FILE_MODE

    def trusted(self) -> FrozenSet[int]:
        """Who may be trusted with the bookkeeping: root, ourselves and, for anyone but
        root, the cache directory's owner (who could move the whole bookkeeping anyway)."""
        euid = os.geteuid()
        return frozenset({0, euid} | ({self.root_stat.st_uid} if euid != 0 else set()))

    def meta_dirs(self) -> Dirs:
        """Directories below the bookkeeping directory (needs it open)."""
        if self.meta_fd is None:
            raise Refused(errno.ENOENT, f"{self.meta_path} is missing")
        return Dirs(self.meta_fd)

    @property
    def exists(self) -> bool:
        return self.root_fd >= 0

    def close(self) -> None:
        for fd in (self.journal_fd, self.holds_fd, self.meta_fd, self.root_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.journal_fd = self.holds_fd = self.meta_fd = None
        self.root_fd = -1

    def __enter__(self) -> "CacheDir":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(path: str, create: bool = True, repair: bool = False,
               make_root: bool = False) -> CacheDir:
    """Open the cache at ``path`` and its bookkeeping (see the module docs).

    ``create``: make the bookkeeping where it is missing and we may; ``make_root``: the
    cache directory too (as a broker would).  ``repair`` (commands, not data accesses): fix
    modes and owners we may fix, move entries of the wrong kind out of the way, and, as
    root, adopt the bookkeeping for the cache directory's owner.  Raises OSError only for
    the cache directory itself.
    """
    try:
        if make_root:
            os.makedirs(path, exist_ok=True)
        root_fd = os.open(path, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    except OSError as exc:
        raise CacheUnavailable(exc.errno, f"cannot open the cache directory {path}: "
                                          f"{exc.strerror}") from None
    cache = CacheDir(path, root_fd, os.fstat(root_fd))
    try:
        _prepare(cache, create, repair)
    except BaseException:
        cache.close()
        raise
    return cache


def _prepare(cache: CacheDir, create: bool, repair: bool) -> None:
    euid, root = os.geteuid(), cache.root_stat
    if repair and cache.shared and not root.st_mode & stat.S_ISVTX and euid in (0, root.st_uid):
        os.fchmod(cache.root_fd, stat.S_IMODE(root.st_mode) | stat.S_ISVTX)
        cache.root_stat = os.fstat(cache.root_fd)
        cache.repairs.append(f"made {cache.path} sticky (chmod +t)")
    cache.meta_fd = _open_meta(cache, create, repair)
    if cache.meta_fd is None:
        cache.unsafe = cache.holds_unsafe = cache.unsafe or f"{cache.meta_path} is missing"
        return
    cache.meta_stat = os.fstat(cache.meta_fd)
    if repair:
        _repair_meta(cache)
    cache.unsafe = _meta_problem(cache)
    sub_mode = STICKY_DIR_MODE if cache.shared else 0o755
    for name in (HOLDS, JOURNAL):
        fd = _open_sub(cache, name, sub_mode, create, repair)
        setattr(cache, f"{name}_fd", fd)
    cache.holds_unsafe = cache.unsafe or _holds_problem(cache)
    if create and cache.can_write_meta:
        _make_infra(cache, repair)


def _open_meta(cache: CacheDir, create: bool, repair: bool) -> Optional[int]:
    mode = META_MODE_SHARED if cache.shared else 0o755
    for _ in range(2):
        try:
            return open_dir(cache.root_fd, META_DIRNAME)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(META_DIRNAME, mode, dir_fd=cache.root_fd)
            except FileExistsError:
                continue
            except PermissionError:
                return None  # a member who may only read the cache
            fd = open_dir(cache.root_fd, META_DIRNAME)
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, mode)
            return fd
        except Refused:
            if not (repair and os.geteuid() in (0, cache.root_stat.st_uid)):
                cache.unsafe = (f"{cache.meta_path} is not a directory (a link, or another "
                                "kind of file); ask the cache's owner "
                                f"({user_name(cache.root_stat.st_uid)}) to run any "
                                "'dtool cache' command there, which moves it aside")
                return None
            aside = rename_aside(cache.root_fd, META_DIRNAME, "unsafe")
            cache.repairs.append(f"moved {cache.meta_path}, not a directory, to {aside}")
    return None


def _repair_meta(cache: CacheDir) -> None:
    """Root adopts the bookkeeping for the cache's owner; its owner (or root) takes the
    group's write bit off it."""
    assert cache.meta_fd is not None and cache.meta_stat is not None
    euid, owner = os.geteuid(), cache.root_stat.st_uid
    if euid == 0 and cache.meta_stat.st_uid != owner:
        was = user_name(cache.meta_stat.st_uid)
        os.fchown(cache.meta_fd, owner, -1)
        cache.repairs.append(f"gave {cache.meta_path} (was {was}'s) to {user_name(owner)}")
    mode = stat.S_IMODE(os.fstat(cache.meta_fd).st_mode)
    if mode & _WRITE_BITS and euid in (0, cache.meta_stat.st_uid):
        os.fchmod(cache.meta_fd, mode & ~_WRITE_BITS)
        cache.repairs.append(f"made {cache.meta_path} writable by its owner only")
    cache.meta_stat = os.fstat(cache.meta_fd)


def _meta_problem(cache: CacheDir) -> Optional[str]:
    meta, root = cache.meta_stat, cache.root_stat
    assert meta is not None
    owner = user_name(root.st_uid)
    if cache.shared and not root.st_mode & stat.S_ISVTX:
        return (f"{cache.path} is writable by its group without the sticky bit, so any "
                f"member could swap its bookkeeping; ask its owner ({owner}) to run "
                f"'chmod +t {cache.path}' (any 'dtool cache' command they run does it)")
    if meta.st_uid not in cache.trusted():
        return (f"{cache.meta_path} belongs to {user_name(meta.st_uid)}, not to the cache's "
                f"owner ({owner}); ask root to run any 'dtool cache' command on "
                f"{cache.path} once, which gives it to {owner}")
    if meta.st_mode & _WRITE_BITS:
        return (f"{cache.meta_path} is writable by others than its owner; ask "
                f"{user_name(meta.st_uid)} (or root) to run any 'dtool cache' command "
                f"on {cache.path} once, which fixes it")
    return None


def _open_sub(cache: CacheDir, name: str, mode: int, create: bool, repair: bool
              ) -> Optional[int]:
    """holds/ or journal/: a real directory, sticky in a shared cache."""
    assert cache.meta_fd is not None
    writer = cache.can_write_meta
    for _ in range(2):
        try:
            fd = open_dir(cache.meta_fd, name)
        except FileNotFoundError:
            if not (create and writer):
                return None
            try:
                os.mkdir(name, mode, dir_fd=cache.meta_fd)
            except FileExistsError:
                pass
            continue
        except Refused:
            if not (repair and writer):
                return None
            aside = rename_aside(cache.meta_fd, name, "unsafe")
            cache.repairs.append(f"moved {name}/, not a directory, to {aside}")
            continue
        st = os.fstat(fd)
        euid, owner = os.geteuid(), cache.root_stat.st_uid
        if repair and euid == 0 and st.st_uid != owner:
            os.fchown(fd, owner, -1)
            cache.repairs.append(f"gave {name}/ (was {user_name(st.st_uid)}'s) to "
                                 f"{user_name(owner)}")
            st = os.fstat(fd)
        want = stat.S_IMODE(st.st_mode) | mode
        if (st.st_uid == euid or (repair and euid == 0)) and want != stat.S_IMODE(st.st_mode) \
                and (repair or st.st_uid == euid):
            os.fchmod(fd, want)
        return fd
    return None


def _holds_problem(cache: CacheDir) -> Optional[str]:
    if cache.holds_fd is None:
        return f"{cache.meta_path}/{HOLDS} is missing or not a directory"
    st = os.fstat(cache.holds_fd)
    where = f"{cache.meta_path}/{HOLDS}"
    if st.st_uid not in cache.trusted():
        return (f"{where} belongs to {user_name(st.st_uid)}, who could hide other members' "
                f"holds; ask root to run any 'dtool cache' command on {cache.path} once")
    if st.st_mode & _WRITE_BITS and not st.st_mode & stat.S_ISVTX:
        return (f"{where} lets any member remove others' holds (no sticky bit); ask "
                f"{user_name(st.st_uid)} to run 'chmod +t {where}'")
    return None


def _make_infra(cache: CacheDir, repair: bool) -> None:
    """The lock and log files, made once by the bookkeeping's owner.  In repair mode, an
    entry of the wrong kind is removed (a link, a FIFO, a hard link: only the name goes) or,
    a directory, moved aside; root gives them to the cache's owner."""
    assert cache.meta_fd is not None
    if repair:
        _remove_dead_creations(cache.meta_fd)
    for name in INFRA_FILES + (LEDGER_FILES if repair else ()):
        st = entry_stat(cache.meta_fd, name)
        # A link count of 0 is a file being removed (SQLite drops -wal and -shm when its
        # last connection closes): only more than one name makes a hard link.
        if st is not None and repair and (not stat.S_ISREG(st.st_mode) or st.st_nlink > 1) \
                and not _being_created(cache.meta_fd, name, st):
            if name in LEDGER_FILES:
                for ledger_name in LEDGER_FILES:  # a ledger goes aside with its WAL
                    if entry_stat(cache.meta_fd, ledger_name) is not None:
                        rename_aside(cache.meta_fd, ledger_name, "corrupt")
                _logger.warning("dtool-cache-manager: moved the ledger in %s aside: %s was "
                                "not a regular file with one name (no cached file was "
                                "touched) [mode %o, links %d]", cache.meta_path, name,
                                st.st_mode, st.st_nlink)
                continue
            if stat.S_ISDIR(st.st_mode):
                rename_aside(cache.meta_fd, name, "unsafe")
            else:
                try:
                    os.unlink(name, dir_fd=cache.meta_fd)
                except FileNotFoundError:
                    pass
            cache.repairs.append(f"replaced {name}, which was not a regular file")
            st = None
        if st is None and name in INFRA_FILES:
            try:
                os.close(create_file(cache.meta_fd, name, cache.infra_mode))
            except FileExistsError:
                pass
        elif st is not None and repair and os.geteuid() == 0:
            _adopt_file(cache, name)


def _remove_dead_creations(meta_fd: int) -> None:
    """``ledger.sqlite3.new-<pid>-...`` left by a process killed while creating the ledger
    (its second name would otherwise keep the ledger looking like a hard link)."""
    for name in os.listdir(meta_fd):
        if not name.startswith(LEDGER + ".new-"):
            continue
        try:
            pid = int(name[len(LEDGER) + 5:].split("-", 1)[0])
            os.kill(pid, 0)
            continue  # its creator is still at work
        except ProcessLookupError:
            pass
        except (ValueError, OSError):
            continue
        st = entry_stat(meta_fd, name)
        if st is not None and time.time() - st.st_mtime > 60:
            try:
                os.unlink(name, dir_fd=meta_fd)
            except OSError:
                pass


def _being_created(meta_fd: int, name: str, st: os.stat_result) -> bool:
    """Is ``name`` a new ledger another process is linking into place (see
    ``Ledger._create``): a regular file whose second name is ``<name>.new-...``?"""
    if name != LEDGER or not stat.S_ISREG(st.st_mode) or st.st_nlink != 2:
        return False
    for other in os.listdir(meta_fd):
        if other.startswith(LEDGER + ".new-"):
            found = entry_stat(meta_fd, other)
            if found is not None and (found.st_dev, found.st_ino) == (st.st_dev, st.st_ino):
                return True
    return False


def _adopt_file(cache: CacheDir, name: str) -> None:
    """As root: give a bookkeeping file to the cache's owner (opened only when needed: a
    process drops its record locks on a file whenever it closes any descriptor of it)."""
    assert cache.meta_fd is not None
    st = entry_stat(cache.meta_fd, name)
    if st is None or st.st_uid == cache.root_stat.st_uid:
        return
    try:
        fd, st = open_file(cache.meta_fd, name, single_link=True)
    except OSError:
        return
    try:
        os.fchown(fd, cache.root_stat.st_uid, -1)
        os.fchmod(fd, cache.infra_mode)
    finally:
        os.close(fd)


# -- one handle per process and cache, for the hooks -----------------------------------

_handles: Dict[Tuple[int, str], CacheDir] = {}
_handles_lock = threading.Lock()


def handle_for(cache_dir: str) -> CacheDir:
    """This process's open handle on ``cache_dir`` (made on first use, kept open).  Raises
    OSError if the cache directory cannot be opened."""
    key = (os.getpid(), cache_dir)
    cache = _handles.get(key)
    if cache is None:
        with _handles_lock:
            cache = _handles.get(key)
            if cache is None:
                cache = _handles[key] = open_cache(cache_dir, create=True, make_root=True)
    return cache


def absent(path: str) -> CacheDir:
    """A cache directory that does not exist yet: nothing in it, nothing to open."""
    fake = os.stat_result((stat.S_IFDIR | 0o755, 0, 0, 2, os.geteuid(), os.getegid(), 0, 0,
                           0, 0))
    return CacheDir(path, -1, fake, unsafe=f"{path} does not exist",
                    holds_unsafe=f"{path} does not exist")
