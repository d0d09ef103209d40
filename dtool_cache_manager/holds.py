"""In-use holds: the specification's per-item lock counters, made crash-proof.

Each process that accesses items owns one holds file, ``holds/<token>``, and keeps an
exclusive ``flock`` on it for its whole life.  It appends ``["+", path]`` when it starts
holding a cached file and ``["-", path]`` when it lets it go.  A file's holders are the
*live* holds files that hold its path; a holds file whose lock can be taken belongs to a
dead process (the kernel released the lock when it died, even after SIGKILL), so a crash
never pins an item and nobody has to clean up first.  This is Nix's temp-roots scheme with
systemd-tmpfiles' flock test.

Holds name the cached file's path, relative to the cache: the one thing a removal acts on,
and one that no journal line or ledger row can redirect.  A hold on the http copy of an item
does not keep its s3 copy.

Who holds comes from the kernel, never from the file: the user is the holds file's owner,
the pid the one ``/proc/locks`` gives for its lock (unknown where there is no
``/proc/locks``).  The header a process writes is for people reading the file by hand.

Holding and removing meet at a per-file gate (see :mod:`rangelock`): a hold is written under
the shared gate, a removal checks holders and unlinks under the exclusive gate, so no access
can slip in between the check and the unlink.

In a cache with a coordinator (:mod:`~dtool_cache_manager.store.coordinator`) the gate and
the liveness reach every host through the server: a process also holds each file there (a
shared advisory lock, after its ``+`` line), and marks its holds file with a ``["c"]`` line
once the server holds its liveness lock.  A holds file whose lock this host could take is
then alive if the server says its process is; a marked one whose process has no session is
dead (the process exited, was killed, or its host went silent); an unmarked one (a process
that could not reach the server) is kept as alive, holder ``user@?``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import socket
import stat
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Set, Tuple

from .facilities import fcntl
from . import cachefs
from .cachefs import CacheDir, Refused
from .layout import Identity, is_item_relpath, user_at_host
from .rangelock import GateBusy, RangeLockFile, open_range_lock
from .sharing import is_single_host
from .store.coordinator import Coordinator, CoordinatorUnavailable, coordinator_of

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 1: ["+", uri, uuid, identifier, relpath]; 2: ["+", relpath]
MAX_HOLDS_BYTES = 64 << 20  # a live holds file past this may hold anything (see snapshot)
ORPHAN_SECONDS = 60.0


class HoldKey(NamedTuple):
    """What a process holds, as it saw the item; the file names ``relpath``.

    A named tuple rather than a dataclass: the hot path hashes it on every access.
    """

    uri: str
    uuid: str
    identifier: str
    relpath: str  # the cached file, relative to the cache directory


@dataclass(frozen=True)
class Holder:
    """A live process holding files, as the kernel knows it."""

    user: str
    host: str
    pid: Optional[int]  # None: the platform cannot say
    token: str

    @property
    def user_at_host(self) -> str:
        return user_at_host(self.user, self.host)

    def describe(self) -> str:
        return f"{self.user_at_host} pid {self.pid if self.pid is not None else '?'}"


def gate_key(relpath: str) -> str:
    """The gate of a cached file: the identifier its name starts with (so a file found on
    disk and the access that fetches it meet at the same gate)."""
    return relpath.rsplit("/", 1)[-1][:40]


class HoldsFile:
    """This process's holds in one cache directory."""

    def __init__(self, cache: CacheDir, identity: Identity, token: Optional[str] = None):
        if cache.holds_fd is None:
            raise Refused(errno.ENOENT, cache.holds_unsafe or "no holds directory")
        self.identity = identity
        self.token = token or _new_token(identity)
        try:
            self.gate: Optional[RangeLockFile] = open_range_lock(cache, cachefs.GATE_LOCK)
        except OSError as exc:  # holds still protect; only the race with a removal is open
            logger.debug("dtool-cache-manager: holding without the gate (%r)", exc)
            self.gate = None
        self._dir_fd = os.dup(cache.holds_fd)
        self._fd = self._create_locked()
        # Reentrant: a hold that finds the coordinator's session lost restores this file
        # (start_again) from within _count.
        self._lock = threading.RLock()
        self.permanent: Set[HoldKey] = set()
        self._scoped: Dict[HoldKey, int] = {}
        self._per_path: Dict[str, int] = {}  # held keys per file: '-' only when none is left
        self.coordinator: Optional[Coordinator] = None  # set by coordinate()

    def coordinate(self, coordinator: Coordinator) -> None:
        """From now on, hold files on the coordinator too; mark the holds file so that other
        hosts may judge this process by its session (only after the server holds it)."""
        coordinator.register(self.token)
        with self._lock:
            self.coordinator = coordinator
            for relpath in self._per_path:
                coordinator.hold(relpath)
            self._write(_COORDINATED)

    @property
    def removed(self) -> bool:
        """Did someone remove this process's holds file (another host that took it for
        dead while its coordinator session was lost)?"""
        return cachefs.removed_while_open(self._fd)

    def start_again(self) -> None:
        """A new holds file, under a new token (NFS and FUSE clients may refuse to reuse a
        name they still have open), holding every file held now, registered with the
        coordinator under the new token."""
        with self._lock:
            self.token = _new_token(self.identity)
            old, self._fd = self._fd, self._create_locked()
            os.close(old)
            if self.coordinator is not None:
                self.coordinator.register(self.token)
            self._write(_COORDINATED + b"".join(_line("+", p) for p in self._per_path))

    def _create_locked(self) -> int:
        # Lock under a temporary name, then rename: a file visible under its final name is
        # always locked by a live owner, so a reader can never mistake a newborn for a corpse.
        tmp = self.token + ".new"
        fd = cachefs.create_file(self._dir_fd, tmp, cachefs.OWN_FILE_MODE,
                                 os.O_WRONLY | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            header = ["h", FORMAT_VERSION, self.identity.user, self.identity.host,
                      self.identity.pid, time.time()]
            os.write(fd, (json.dumps(header) + "\n").encode())
            cachefs.rename_entry(self._dir_fd, tmp, self.token)
        except BaseException:
            os.close(fd)
            raise
        return fd

    # -- the hot path -------------------------------------------------------------------

    def hold(self, key: HoldKey, scope: Optional[Set[HoldKey]] = None) -> None:
        """Start holding ``key`` unless already held; inside a scope, until the scope ends.

        Callers on the hot path test ``key in self.permanent`` first and skip the call.
        """
        with self._lock:
            if key in self.permanent or (scope is not None and key in scope):
                return
            if key not in self._scoped:
                self._count(key.relpath, +1)
            if scope is None:
                self.permanent.add(key)
            else:
                self._scoped[key] = self._scoped.get(key, 0) + 1
                scope.add(key)

    def end_scope(self, scope: Set[HoldKey]) -> None:
        with self._lock:
            for key in scope:
                count = self._scoped.get(key, 0) - 1
                if count > 0:
                    self._scoped[key] = count
                    continue
                self._scoped.pop(key, None)
                if key not in self.permanent:
                    self._count(key.relpath, -1)
            scope.clear()

    def release(self, uri: str, identifier: str) -> int:
        """Stop holding every key of (uri, identifier); returns how many were released."""
        with self._lock:
            keys = [k for k in self.permanent | set(self._scoped)
                    if k.uri == uri and k.identifier == identifier]
            for key in keys:
                self.permanent.discard(key)
                self._scoped.pop(key, None)
                self._count(key.relpath, -1)
            return len(keys)

    def _count(self, relpath: str, step: int) -> None:
        count = self._per_path.get(relpath, 0) + step
        if count > 0:
            self._per_path[relpath] = count
        else:
            self._per_path.pop(relpath, None)
        if step > 0 and count == 1:
            self._write_under_gate(relpath)
            if self.coordinator is not None:  # after the line: see the module docs
                self.coordinator.hold(relpath)
        elif step < 0 and count <= 0:
            self._write(_line("-", relpath))
            if self.coordinator is not None:
                self.coordinator.release(relpath)

    def _write_under_gate(self, relpath: str) -> None:
        line = _line("+", relpath)
        if self.gate is None:
            self._write(line)
            return
        try:
            with self.gate.locked(gate_key(relpath), exclusive=False):
                self._write(line)
        except GateBusy:
            # Another process kept the gate past all patience: hold anyway, unguarded.
            logger.warning("dtool-cache-manager: the gate of %r stayed locked; holding it "
                           "without waiting further", relpath)
            self._write(line)

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def close(self) -> None:
        """Drop all holds (the process is leaving): unlink first, then let go of the lock."""
        try:
            cachefs.unlink_entry(self._dir_fd, self.token, same_as=os.fstat(self._fd))
        except OSError:
            pass
        os.close(self._fd)
        os.close(self._dir_fd)


_COORDINATED = json.dumps(["c"]).encode() + b"\n"


def _new_token(identity: Identity) -> str:
    return f"{identity.host}.{identity.pid}.{secrets.token_hex(4)}"


def _line(sign: str, relpath: str) -> bytes:
    return (json.dumps([sign, relpath]) + "\n").encode("utf-8", "surrogateescape")


# -- readers: who holds what ------------------------------------------------------------


@dataclass(frozen=True)
class HoldsSnapshot:
    """Who held what when the holds were read."""

    paths: Dict[str, Tuple[Holder, ...]]  # cached file -> its live holders
    identifiers: Dict[str, Tuple[Holder, ...]]  # format-1 holds that named no file
    unreadable: Tuple[Holder, ...] = ()  # live holders whose holds cannot be read

    def holders_of(self, relpath: str) -> Tuple[Holder, ...]:
        """The live holders of a cached file.  A holder whose holds cannot be read may hold
        anything, so it holds every file: a clean never removes what it cannot prove
        unused."""
        found = self.paths.get(relpath, ()) + self.unreadable
        if self.identifiers:
            found += self.identifiers.get(gate_key(relpath), ())
        if len(found) > 1:
            found = tuple(sorted(set(found), key=_holder_order))
        return found

    @property
    def empty(self) -> bool:
        return not (self.paths or self.identifiers or self.unreadable)


def _holder_order(h: Holder) -> tuple:
    return (h.user, h.host, h.pid or 0, h.token)


class ParsedHolds(NamedTuple):
    paths: Set[str]
    identifiers: Set[str]  # format 1: holds that named no file
    coordinated: bool  # the process marked itself as known to the coordinator


def _parse_holds(data: bytes) -> ParsedHolds:
    """What the lines in ``data`` hold; malformed lines are skipped (a torn last line of a
    process killed mid-write, or anything a member wrote)."""
    coordinated = False
    paths: Dict[str, None] = {}
    v1: Dict[Tuple[str, str], Set[Tuple[Optional[str], str]]] = {}
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            rec = json.loads(raw.decode("utf-8", "surrogateescape"))
        except (ValueError, RecursionError):  # RecursionError: '[[[[...' nested too deep
            continue
        if rec == ["c"]:
            coordinated = True
            continue
        if not isinstance(rec, list) or not rec or rec[0] not in ("+", "-"):
            continue
        if len(rec) == 2 and is_item_relpath(rec[1]):
            if rec[0] == "+":
                paths[rec[1]] = None
            else:
                paths.pop(rec[1], None)
        elif len(rec) == 5 and all(isinstance(v, str) for v in rec[1:4]):
            # Format 1, written by a process that started before an upgrade.
            relpath = rec[4] if is_item_relpath(rec[4]) else None
            held = v1.setdefault((rec[1], rec[3]), set())
            if rec[0] == "+":
                held.add((relpath, rec[3]))
            else:
                held.clear()
    identifiers = set()
    for held in v1.values():
        for relpath, identifier in held:
            if relpath is not None:
                paths[relpath] = None
            else:
                identifiers.add(identifier[:40])
    return ParsedHolds(set(paths), identifiers, coordinated)


def live_holds(cache: CacheDir, reap: bool = True) -> HoldsSnapshot:
    """Every live process's holds.  With ``reap``, delete files left by dead processes
    (where we may: in a sticky directory only their owners and root can)."""
    live: List[Tuple[str, os.stat_result, Optional[ParsedHolds], bool]] = []
    fd_dir = cache.holds_fd
    if fd_dir is None:
        return HoldsSnapshot({}, {})
    for name in os.listdir(fd_dir):
        if name.endswith(".new"):
            if reap:
                _reap_orphan(fd_dir, name)
            continue
        found = _read_one(fd_dir, name, reap, cache)
        if found is not None:
            live.append((name, *found))
    alive_elsewhere = _judged_by_coordinator(cache, live, reap)
    if not live:
        return HoldsSnapshot({}, {})
    pids = cachefs.flock_holders([st for _, st, _, _ in live]) or {}
    host = socket.gethostname()
    paths: Dict[str, List[Holder]] = {}
    identifiers: Dict[str, List[Holder]] = {}
    unreadable = []
    for name, st, held, here in live:
        if here:
            holder = Holder(cachefs.user_name(st.st_uid), host,
                            pids.get((st.st_dev, st.st_ino)), name)
        elif name in alive_elsewhere:  # the coordinator vouches: the host and pid it chose
            holder = Holder(cachefs.user_name(st.st_uid), *_host_and_pid(name), name)
        else:
            # A lock this host cannot see: a process of another host (or a dead one), host
            # and pid unknown.
            holder = Holder(cachefs.user_name(st.st_uid), "?", None, name)
        if held is None:
            unreadable.append(holder)
            continue
        for relpath in held.paths:
            paths.setdefault(relpath, []).append(holder)
        for identifier in held.identifiers:
            identifiers.setdefault(identifier, []).append(holder)
    return HoldsSnapshot({k: tuple(v) for k, v in paths.items()},
                         {k: tuple(v) for k, v in identifiers.items()}, tuple(unreadable))


def _judged_by_coordinator(cache: CacheDir, live: list, reap: bool) -> Set[str]:
    """In a coordinated cache, drop from ``live`` the holds files whose lock this host could
    take and whose process marked itself known to the coordinator but has no session there
    (dead; reaped with ``reap``).  Returns the names the coordinator says are alive.
    Without an answer from the server, every file is kept: nothing is proven dead."""
    elsewhere = [entry for entry in live if not entry[3]]
    if not elsewhere:
        return set()
    try:
        coordinator = coordinator_of(cache)
        if coordinator is None:
            return set()
        alive = coordinator.live_tokens(entry[0] for entry in elsewhere)
    except CoordinatorUnavailable as exc:
        logger.debug("dtool-cache-manager: holds judged without the coordinator (%s)", exc)
        return set()
    for entry in elsewhere:
        name, st, held, _ = entry
        if name not in alive and held is not None and held.coordinated:
            live.remove(entry)
            if reap and cache.holds_fd is not None:
                try:
                    cachefs.unlink_entry(cache.holds_fd, name, same_as=st)
                except OSError:
                    pass  # someone else's, in a sticky directory: its owner or root reaps it
    return alive


def _host_and_pid(token: str) -> Tuple[str, Optional[int]]:
    """The host and pid in a token ``<host>.<pid>.<8 hex>``, as its process's kernel knew
    them (host names may hold dots)."""
    parts = token.rsplit(".", 2)
    if len(parts) == 3 and parts[1].isdigit() and len(parts[1]) < 10:
        return parts[0], int(parts[1])
    return "?", None


def _read_one(dir_fd: int, name: str, reap: bool, cache: CacheDir
              ) -> Optional[Tuple[os.stat_result, Optional[ParsedHolds], bool]]:
    """(stat, what it holds or None if unreadable, held on this host?) of a live holds
    file; None if it is dead, gone, or not a holds file at all (a link, a directory, a FIFO).
    A file whose lock we could take is dead only if no other host may use the cache: a lock
    taken on another host does not reach this one (NFS, Lustre: see sharing)."""
    try:
        fd, st = cachefs.open_file(dir_fd, name)
    except Refused:
        return None
    except FileNotFoundError:
        return None
    except PermissionError:  # another member's unreadable file: the kernel still knows
        found = cachefs.entry_stat(dir_fd, name)
        if found is None or not stat.S_ISREG(found.st_mode):
            return None
        st = found
        locked = cachefs.flock_holders([st])
        # Live (or, with no /proc/locks, possibly live) and unreadable: may hold anything.
        if locked is None or locked:
            return st, None, True
        return (st, None, False) if not is_single_host(cache) else None
    try:
        here = _is_alive(fd)
        if not here and is_single_host(cache):
            if reap:
                try:
                    cachefs.unlink_entry(dir_fd, name, same_as=st)
                except OSError:
                    pass  # someone else's, in a sticky directory: its owner or root reaps it
            return None
        if st.st_size > MAX_HOLDS_BYTES:
            return st, None, here
        return st, _parse_holds(cachefs.read_at_most(fd, MAX_HOLDS_BYTES)), here
    finally:
        os.close(fd)


def _is_alive(fd: int) -> bool:
    """A holds file is live while its owner keeps the flock; taking it means the owner died."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return True
        raise
    return False


def _reap_orphan(dir_fd: int, name: str) -> None:
    """A '.new' holds file whose creator died before renaming it: unlocked and old.  (A
    creator opens it a moment before locking it, hence the age test.)"""
    try:
        fd, st = cachefs.open_file(dir_fd, name)
    except OSError:
        return
    try:
        if time.time() - st.st_mtime > ORPHAN_SECONDS and not _is_alive(fd):
            cachefs.unlink_entry(dir_fd, name, same_as=st)
    except OSError:
        pass
    finally:
        os.close(fd)


def owner_alive(cache: CacheDir, token: str) -> bool:
    """Is the process that owns ``token`` (a holds file and its journal) still running?"""
    if cache.holds_fd is None:
        return False
    try:
        fd, _ = cachefs.open_file(cache.holds_fd, token)
    except PermissionError:
        st = cachefs.entry_stat(cache.holds_fd, token)
        locked = cachefs.flock_holders([st]) if st is not None else {}
        return locked is None or bool(locked)
    except OSError:
        return False
    try:
        if _is_alive(fd):
            return True
        if is_single_host(cache):
            return False
        try:
            coordinator = coordinator_of(cache)
            if coordinator is None or coordinator.live_tokens([token]):
                return True  # without a coordinator another host's lock is invisible
        except CoordinatorUnavailable:
            return True
        return not _parse_holds(cachefs.read_at_most(fd, MAX_HOLDS_BYTES)).coordinated
    finally:
        os.close(fd)


@contextmanager
def exclusive_gates(cache: CacheDir, relpaths: Iterable[str]) -> Iterator[Set[str]]:
    """Shut out new holds of ``relpaths`` while a removal decides and acts.  Yields the
    paths whose gate another process kept past all patience: not to be removed now."""
    by_key: Dict[str, List[str]] = {}
    for relpath in relpaths:
        by_key.setdefault(gate_key(relpath), []).append(relpath)
    with open_range_lock(cache, cachefs.GATE_LOCK).locked_many(
            list(by_key), exclusive=True) as busy:
        yield {relpath for key in busy for relpath in by_key[key]}

