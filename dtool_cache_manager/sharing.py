"""Is a cache used from one host only?  Its filesystem's type, and what its owner declared.

A hold is a lock one kernel keeps, and liveness is what one kernel knows: a process on
another host that reads the same files over NFS, Lustre or GPFS holds nothing a clean here
can see.  So a cache on a filesystem other hosts may share is *possibly shared*, and
nothing is deleted from it (``clean``, ``verify --fix``, ``remove_cache_item_safely``,
automatic housekeeping) unless its owner declared that one host uses it::

    dtool cache init --single-host

The declaration is a small JSON file in the bookkeeping directory, which only its owner
(or root) may write; it is believed only if that directory can be trusted (see
:mod:`cachefs`), and the file is owned by someone trusted and writable by nobody else.

Liveness suffers the same way: a holds file whose ``flock`` this host can take may belong to
a live process of another host, so in a possibly shared cache it is never reaped, nor its
journal deleted (:mod:`holds`); its holder shows as ``user@?``.

Which filesystems are local comes from Linux's ``fstatfs`` (:mod:`facilities`).  Where the
platform cannot tell (macOS, a sandbox that denies the call), the filesystem is unknown,
which counts as possibly shared: the safe side.  A local disk this host exports to others
(an NFS server's own view) looks local: such a cache must not be declared, and needs a
coordinator shared by every host (``docs/multi-host.rst``).

A cache registered with a coordinator (``dtool cache init --database URL``) is
*coordinated*: the declaration then names the PostgreSQL server that every process, user
and host of the cache uses for holds and liveness (:mod:`~dtool_cache_manager.store.
coordinator`), and removals go through it.  The URL never holds a password.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import time
import urllib.parse
from dataclasses import dataclass
from typing import Optional, Tuple

from . import cachefs, facilities
from .cachefs import CacheDir
from .errors import CacheManagerError, InvalidInput

DECLARATION = "sharing.json"  # in the bookkeeping directory
SINGLE_HOST = "single-host"
COORDINATED = "coordinated"
MAX_DECLARATION_BYTES = 4096
HOW_TO_DECLARE = ("its owner can register a coordinator (dtool cache init --database "
                  "postgresql://HOST/DB) or, if only this host uses it, say so "
                  "(dtool cache init --single-host)")
DEFAULT_SESSION_TIMEOUT = 30  # seconds until the server drops a silent host's session
DEFAULT_GRACE_SECONDS = 600  # seconds a cleaned file stays in the trash
MAX_URL_CHARS = 1024


@dataclass(frozen=True)
class Registration:
    """The coordinator of a cache, as its owner registered it (see :func:`url_problem`)."""

    database: str  # a libpq URL without a password
    cache_id: str  # 32 hex digits: the cache's namespace of lock keys on the server
    session_timeout: int  # the bound on noticing a silent host (keepalives, user timeout)
    grace_seconds: int  # how long a cleaned file waits in the trash before it is purged

    def to_json(self) -> dict:
        return {"database": self.database, "cache_id": self.cache_id,
                "session_timeout": self.session_timeout, "grace_seconds": self.grace_seconds}

    @staticmethod
    def from_json(data: dict) -> Optional["Registration"]:
        """The registration in a declaration, or None if any field is not what we write."""
        database, cache_id = data.get("database"), data.get("cache_id")
        timeout, grace = data.get("session_timeout"), data.get("grace_seconds")
        if not isinstance(database, str) or url_problem(database) is not None:
            return None
        if not isinstance(cache_id, str) or not re.fullmatch(r"[0-9a-f]{32}", cache_id):
            return None
        if not _whole(timeout, 2, 3600) or not _whole(grace, 1, 30 * 86400):
            return None
        assert isinstance(timeout, int) and isinstance(grace, int)  # _whole said so
        return Registration(database, cache_id, timeout, grace)


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def url_problem(url: str) -> Optional[str]:
    """Why ``url`` cannot be a coordinator's address (None: it can).  A URL is written into
    the cache, where every member reads it: it must not carry a password (credentials come
    from ``~/.pgpass``, ``PGPASSFILE``, peer or GSSAPI authentication)."""
    if len(url) > MAX_URL_CHARS or any(ord(c) < 32 or c.isspace() for c in url):
        return "it must be one line, without spaces, of at most 1024 characters"
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    except ValueError as exc:
        return f"it is not a URL ({exc})"
    if parts.scheme not in ("postgresql", "postgres"):
        return "it must start with postgresql://"
    if password is not None or "password" in query:
        return ("it must not contain a password: every member can read it; use ~/.pgpass, "
                "PGPASSFILE, peer or GSSAPI authentication")
    if parts.fragment:
        return "it must not have a fragment ('#...')"
    return None


class PossiblyShared(InvalidInput):
    """A removal refused: other hosts may use the cache, and their holds are invisible here.
    Exit status 2 on the command line, as for input that cannot be honoured."""


@dataclass(frozen=True)
class Sharing:
    """What is known about who may use a cache: its filesystem, and its declaration."""

    filesystem: Optional[str]  # as Linux names it ("ext2/3/4", "nfs", "fuse"); None: unknown
    local: bool  # a filesystem only this host's kernel serves
    declared: Optional[str]  # SINGLE_HOST, COORDINATED, or None
    declared_by: Optional[str]  # the declaration file's owner, as the kernel says
    declared_at: Optional[float]
    registration: Optional[Registration] = None  # the coordinator, when COORDINATED

    @property
    def single_host(self) -> bool:
        """Are this host's locks and liveness the whole truth?  Not in a coordinated cache,
        even on a local disk: there the coordinator is."""
        return self.registration is None and (self.local or self.declared == SINGLE_HOST)

    @property
    def possibly_shared(self) -> bool:
        """Other hosts may use the cache, and nothing here can see their holds: no
        coordinator, no declaration, not a local disk.  Removals refuse."""
        return not self.single_host and self.registration is None

    @property
    def mode(self) -> str:
        """``coordinated``, ``local``, ``single-host`` (declared) or ``possibly-shared``."""
        if self.registration is not None:
            return COORDINATED
        if self.local:
            return "local"
        return SINGLE_HOST if self.declared == SINGLE_HOST else "possibly-shared"

    @property
    def filesystem_text(self) -> str:
        if self.filesystem is None:
            return "a filesystem of a type this platform cannot tell"
        if self.local:
            return f"a local filesystem ({self.filesystem})"
        if self.filesystem in facilities.SHARED_FILESYSTEMS.values():
            return f"a network or FUSE filesystem ({self.filesystem})"
        return f"a filesystem not known to be local ({self.filesystem})"

    def refusal(self, cache_dir: str) -> str:
        """The one line a refused removal prints."""
        return (f"not removing anything: {cache_dir} is on {self.filesystem_text}, so other "
                f"hosts may be using its items, and their holds are invisible here; "
                f"{HOW_TO_DECLARE}")

    def to_json(self) -> dict:
        return {"mode": self.mode, "filesystem": self.filesystem, "local": self.local,
                "declared": self.declared, "declared_by": self.declared_by,
                "declared_at": self.declared_at,
                "coordinator": self.registration.to_json() if self.registration else None}


def filesystem_of(cache: CacheDir) -> Tuple[Optional[str], bool]:
    """(name or None, local?) of the filesystem holding the cache's root."""
    magic = facilities.filesystem_magic(cache.root_fd)
    if magic is None:
        return None, False
    if magic in facilities.LOCAL_FILESYSTEMS:
        return facilities.LOCAL_FILESYSTEMS[magic], True
    return facilities.SHARED_FILESYSTEMS.get(magic, f"type {magic:#x}"), False


def sharing_of(cache: CacheDir) -> Sharing:
    """What is known now (read afresh; :func:`known_sharing` remembers it per open cache)."""
    name, local = filesystem_of(cache)
    declared = _read_declaration(cache)
    if declared is None:
        return Sharing(name, local, None, None, None)
    return Sharing(name, local, *declared)


def known_sharing(cache: CacheDir) -> Sharing:
    """:func:`sharing_of`, looked up once per open cache: holds ask for every file whose
    lock they could take (dead here, or alive on another host), hooks at every fetch."""
    if not isinstance(cache.sharing_memo, Sharing):
        cache.sharing_memo = sharing_of(cache)
    return cache.sharing_memo


def registration_of(cache: CacheDir) -> Optional[Registration]:
    """The cache's coordinator, if it has one."""
    return known_sharing(cache).registration if cache.exists else None


def sharing_at(path: str) -> Optional[Sharing]:
    """:func:`sharing_of` the cache at ``path``; None for a cache that does not exist yet
    (dtool's configured one before any access: nothing in it, nothing to say)."""
    if not os.path.isdir(path):
        return None
    with cachefs.open_cache(path, create=False) as cache:
        return sharing_of(cache)


def is_single_host(cache: CacheDir) -> bool:
    """Are this host's locks and liveness the whole truth about the cache?"""
    return known_sharing(cache).single_host


def require_single_host(cache: CacheDir) -> None:
    """Refuse (:class:`PossiblyShared`) to remove anything from a cache other hosts may use,
    unless it has a coordinator (which the caller must then reach)."""
    found = known_sharing(cache)
    if found.possibly_shared:
        raise PossiblyShared(found.refusal(cache.path))


def _read_declaration(cache: CacheDir
                      ) -> Optional[Tuple[str, str, Optional[float], Optional[Registration]]]:
    """(mode, owner's name, time, registration) from the declaration, or None if there is
    none we trust."""
    if cache.meta_fd is None or cache.unsafe is not None:
        return None
    try:
        fd, st = cachefs.open_file(cache.meta_fd, DECLARATION)
    except OSError:
        return None
    try:
        if st.st_uid not in cache.trusted() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) \
                or st.st_nlink != 1:
            return None
        data = json.loads(cachefs.read_at_most(fd, MAX_DECLARATION_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict) or data.get("mode") not in (SINGLE_HOST, COORDINATED):
        return None
    registration = None
    if data["mode"] == COORDINATED:
        registration = Registration.from_json(data)
        if registration is None:
            return None
    at = data.get("declared_at")
    at = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None
    return data["mode"], cachefs.user_name(st.st_uid), at, registration


def declare_at(path: str, single_host: bool) -> None:
    """:func:`declare` for the cache at ``path`` (its bookkeeping made if missing)."""
    with cachefs.open_cache(path) as cache:
        declare(cache, single_host)


def new_registration(cache: CacheDir, database: str, session_timeout: int,
                     grace_seconds: int) -> Registration:
    """A registration for ``cache`` (keeping its lock namespace if it had a coordinator),
    or :class:`InvalidInput` saying what is wrong with the values."""
    problem = url_problem(database)
    if problem is not None:
        raise InvalidInput(f"cannot use that URL as the coordinator: {problem}")
    if not _whole(session_timeout, 2, 3600):
        raise InvalidInput("--session-timeout must be between 2 and 3600 seconds")
    if not _whole(grace_seconds, 1, 30 * 86400) or grace_seconds <= 2 * session_timeout:
        raise InvalidInput(f"--grace must be more than twice the session timeout "
                           f"({2 * session_timeout} s), and at most 30 days: a file cleaned "
                           f"from under a cut-off host stays readable that long")
    before = sharing_of(cache).registration
    cache_id = before.cache_id if before is not None else secrets.token_hex(16)
    return Registration(database, cache_id, session_timeout, grace_seconds)


def declare(cache: CacheDir, single_host: bool,
            registration: Optional[Registration] = None) -> None:
    """Write the declaration: single host, or ``registration`` (its coordinator); with
    neither, remove it.  Only the bookkeeping's owner or root may: :class:`InvalidInput`
    otherwise; a filesystem error is one :class:`CacheManagerError`."""
    if cache.meta_fd is None or not cache.can_write_meta:
        owner = cachefs.user_name(cache.meta_stat.st_uid if cache.meta_stat else None)
        raise InvalidInput(f"only the owner of {cache.meta_path} ({owner}) or root may "
                           "declare how the cache is shared")
    if cache.unsafe is not None:
        raise InvalidInput(f"cannot declare how the cache is shared: {cache.unsafe}")
    declaration = {"version": 1, "mode": SINGLE_HOST, "declared_at": time.time()}
    if registration is not None:
        declaration.update(mode=COORDINATED, **registration.to_json())
    body = json.dumps(declaration)
    cache.sharing_memo = None
    try:
        if single_host or registration is not None:
            cachefs.replace_file(cache.meta_fd, DECLARATION, body.encode() + b"\n",
                                 cachefs.OWN_FILE_MODE)
        else:
            try:
                cachefs.unlink_entry(cache.meta_fd, DECLARATION)
            except FileNotFoundError:
                pass  # nothing to withdraw
    except OSError as exc:
        raise CacheManagerError(f"cannot write {os.path.join(cache.meta_path, DECLARATION)}: "
                                f"{exc.strerror or exc}") from None
