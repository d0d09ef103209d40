"""In-use holds: the spec's per-item lock counters, made crash-proof.

Each process that accesses items owns one holds file, ``holds/<token>``, and keeps an
exclusive ``flock`` on it for its whole life.  It appends ``+`` when it starts holding an
item and ``-`` when it lets it go.  An item's holders are the *live* files that hold it; a
file whose lock can be taken belongs to a dead process (the kernel released the lock when it
died, even after SIGKILL), so a crash never pins an item and nobody has to clean up first.
This is Nix's temp-roots scheme with systemd-tmpfiles' flock test.

Holding and removing meet at a per-item gate (see :mod:`rangelock`): a hold is written under
the shared gate, a removal checks holders and unlinks under the exclusive gate, so no access
can slip in between the check and the unlink.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, FrozenSet, Iterator, List, NamedTuple, Optional, Set, Tuple

from .layout import Identity, MetaPaths, ensure_dir, share_file, unlink_quietly
from .rangelock import open_range_lock

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


class HoldKey(NamedTuple):
    """What a hold names: the item as the accessing process saw it.

    A named tuple rather than a dataclass: the hot path hashes it on every access.
    """

    uri: str
    uuid: str
    identifier: str
    relpath: Optional[str] = None  # cache-relative path, when known before the fetch

    def line(self, sign: str) -> bytes:
        return (json.dumps([sign, self.uri, self.uuid, self.identifier, self.relpath])
                + "\n").encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Holder:
    """A live process holding items."""

    user: str
    host: str
    pid: int
    token: str

    @property
    def user_at_host(self) -> str:
        return f"{self.user}@{self.host}"

    def describe(self) -> str:
        return f"{self.user_at_host} pid {self.pid}"


def gate_key(identifier: str) -> str:
    """Gate by identifier alone: a file found on disk without a ledger row still has one."""
    return identifier


class HoldsFile:
    """This process's holds in one cache directory."""

    def __init__(self, paths: MetaPaths, identity: Identity, token: Optional[str] = None):
        self.paths = paths
        self.identity = identity
        self.token = token or f"{identity.host}.{identity.pid}.{secrets.token_hex(4)}"
        ensure_dir(paths.holds_dir, paths.shared)
        self.gate = open_range_lock(paths.gate_lock, paths.shared)
        self.path = os.path.join(paths.holds_dir, self.token)
        self._fd = self._create_locked()
        self._lock = threading.Lock()
        self.permanent: Set[HoldKey] = set()
        self._scoped: Dict[HoldKey, int] = {}

    def _create_locked(self) -> int:
        # Lock under a temporary name, then rename: a file visible under its final name is
        # always locked by a live owner, so a reader can never mistake a newborn for a corpse.
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                     0o666)
        try:
            share_file(fd, self.paths.shared)
            fcntl.flock(fd, fcntl.LOCK_EX)
            header = [
                "h", FORMAT_VERSION, self.identity.user, self.identity.host,
                self.identity.pid, time.time(),
            ]
            os.write(fd, (json.dumps(header) + "\n").encode())
            os.rename(tmp, self.path)
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
                self._write_under_gate(key, "+")
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
                    self._write(key.line("-"))
            scope.clear()

    def release(self, uri: str, identifier: str) -> int:
        """Stop holding every key of (uri, identifier); returns how many were released."""
        with self._lock:
            keys = [k for k in self.permanent | set(self._scoped)
                    if k.uri == uri and k.identifier == identifier]
            for key in keys:
                self.permanent.discard(key)
                self._scoped.pop(key, None)
                self._write(key.line("-"))
            return len(keys)

    def _write_under_gate(self, key: HoldKey, sign: str) -> None:
        with self.gate.locked(gate_key(key.identifier), exclusive=False):
            self._write(key.line(sign))

    def _write(self, data: bytes) -> None:
        os.write(self._fd, data)

    def close(self) -> None:
        """Drop all holds (the process is leaving): unlink first, then let go of the lock."""
        unlink_quietly(self.path)
        os.close(self._fd)


# -- readers: who holds what ------------------------------------------------------------


def _parse_holds(data: bytes) -> Tuple[Optional[Holder], FrozenSet[HoldKey]]:
    holder = None
    held: Set[HoldKey] = set()
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            rec = json.loads(raw.decode("utf-8", "surrogateescape"))
        except ValueError:
            continue  # a torn final line of a process killed mid-write
        if rec[0] == "h":
            holder = Holder(user=rec[2], host=rec[3], pid=rec[4], token="")
        elif rec[0] in "+-":
            key = HoldKey(uri=rec[1], uuid=rec[2], identifier=rec[3], relpath=rec[4])
            if rec[0] == "+":
                held.add(key)
            else:
                held = {k for k in held
                        if not (k.uri == key.uri and k.identifier == key.identifier)}
    return holder, frozenset(held)


def owner_alive(paths: MetaPaths, token: str) -> bool:
    """Is the process that owns ``token`` (a holds file and its journal) still running?"""
    try:
        fd = os.open(os.path.join(paths.holds_dir, token), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return _is_alive(fd)
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


def live_holds(paths: MetaPaths, reap: bool = True) -> Dict[Holder, FrozenSet[HoldKey]]:
    """Every live process's holds.  With ``reap``, delete files left by dead processes."""
    result: Dict[Holder, FrozenSet[HoldKey]] = {}
    try:
        names = os.listdir(paths.holds_dir)
    except FileNotFoundError:
        return result
    for name in names:
        path = os.path.join(paths.holds_dir, name)
        if name.endswith(".new"):
            if reap:
                _reap_orphan(path)
            continue
        try:
            # O_RDWR where we may, so that reaping works; a read-only member can still read.
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            if not _is_alive(fd):
                if reap:
                    unlink_quietly(path)
                continue
            with os.fdopen(os.dup(fd), "rb") as fh:
                holder, held = _parse_holds(fh.read())
            if holder is not None and held:
                result[Holder(holder.user, holder.host, holder.pid, name)] = held
        finally:
            os.close(fd)
    return result


ORPHAN_SECONDS = 60.0


def _reap_orphan(path: str) -> None:
    """A '.new' holds file whose creator died before renaming it: unlocked and old.  (A
    creator opens it a moment before locking it, hence the age test.)"""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if time.time() - os.fstat(fd).st_mtime > ORPHAN_SECONDS and not _is_alive(fd):
            unlink_quietly(path)
    finally:
        os.close(fd)


def holders_of(paths: MetaPaths, identifier: str, uuid: Optional[str] = None,
               uri: Optional[str] = None, relpath: Optional[str] = None) -> List[Holder]:
    """Live holders of an item, read now (see :func:`holders_in`)."""
    return holders_in(live_holds(paths), identifier, uuid, uri, relpath)


def holders_in(holds: Dict[Holder, FrozenSet[HoldKey]], identifier: Optional[str],
               uuid: Optional[str] = None, uri: Optional[str] = None,
               relpath: Optional[str] = None) -> List[Holder]:
    """Holders of an item in a snapshot from :func:`live_holds`.

    Matches on the identifier plus any of uuid, uri or relpath that the caller knows; with
    none of them, on the identifier alone, which errs towards keeping the file.
    """
    known = [v for v in (uuid, uri, relpath) if v is not None]
    found = []
    for holder, keys in holds.items():
        for key in keys:
            if key.identifier != identifier:
                continue
            if not known or key.uuid == uuid or key.uri == uri or (
                    relpath is not None and key.relpath == relpath):
                found.append(holder)
                break
    return sorted(found, key=lambda h: (h.user, h.host, h.pid))


def holders_of_file(split: Dict[str, Dict[Holder, FrozenSet[HoldKey]]],
                    identifier: Optional[str], uuid: Optional[str],
                    relpath: str) -> Tuple[Holder, ...]:
    """Holders of a cached file in a snapshot split by :func:`by_identifier`: by the exact
    item when it is tracked (its UUID known), by identifier alone when not, which errs
    towards keeping the file."""
    return tuple(holders_in(split.get(identifier, {}), identifier, uuid=uuid,
                            relpath=relpath if uuid is not None else None))


def by_identifier(holds: Dict[Holder, FrozenSet[HoldKey]]
                  ) -> Dict[str, Dict[Holder, FrozenSet[HoldKey]]]:
    """A snapshot split by identifier, so that matching a million files against it costs a
    dictionary lookup each: ``holders_in(split.get(identifier, {}), identifier, ...)``."""
    split: Dict[str, Dict[Holder, Set[HoldKey]]] = {}
    for holder, keys in holds.items():
        for key in keys:
            split.setdefault(key.identifier, {}).setdefault(holder, set()).add(key)
    return {ident: {h: frozenset(k) for h, k in held.items()} for ident, held in split.items()}


@contextmanager
def exclusive_gate(paths: MetaPaths, identifier: str) -> Iterator[None]:
    """Shut out new holds of ``identifier`` while a removal decides and acts."""
    with open_range_lock(paths.gate_lock, paths.shared).locked(gate_key(identifier),
                                                               exclusive=True):
        yield


@contextmanager
def exclusive_gates(paths: MetaPaths, identifiers) -> Iterator[None]:
    """:func:`exclusive_gate` for a batch of removals at once."""
    with open_range_lock(paths.gate_lock, paths.shared).locked_many(
            [gate_key(i) for i in identifiers], exclusive=True):
        yield
