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
coordinator shared by every host (``docs/design.rst``).
"""

from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from typing import Optional, Tuple

from . import cachefs, facilities
from .cachefs import CacheDir
from .errors import CacheManagerError, InvalidInput

DECLARATION = "sharing.json"  # in the bookkeeping directory
SINGLE_HOST = "single-host"
MAX_DECLARATION_BYTES = 4096
HOW_TO_DECLARE = ("if only this host uses it, its owner can say so: "
                  "dtool cache init --single-host")


class PossiblyShared(InvalidInput):
    """A removal refused: other hosts may use the cache, and their holds are invisible here.
    Exit status 2 on the command line, as for input that cannot be honoured."""


@dataclass(frozen=True)
class Sharing:
    """What is known about who may use a cache: its filesystem, and its declaration."""

    filesystem: Optional[str]  # as Linux names it ("ext2/3/4", "nfs", "fuse"); None: unknown
    local: bool  # a filesystem only this host's kernel serves
    declared: Optional[str]  # SINGLE_HOST, or None
    declared_by: Optional[str]  # the declaration file's owner, as the kernel says
    declared_at: Optional[float]

    @property
    def single_host(self) -> bool:
        return self.local or self.declared == SINGLE_HOST

    @property
    def mode(self) -> str:
        """``local``, ``single-host`` (declared) or ``possibly-shared``."""
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
                "declared_at": self.declared_at}


def filesystem_of(cache: CacheDir) -> Tuple[Optional[str], bool]:
    """(name or None, local?) of the filesystem holding the cache's root."""
    magic = facilities.filesystem_magic(cache.root_fd)
    if magic is None:
        return None, False
    if magic in facilities.LOCAL_FILESYSTEMS:
        return facilities.LOCAL_FILESYSTEMS[magic], True
    return facilities.SHARED_FILESYSTEMS.get(magic, f"type {magic:#x}"), False


def sharing_of(cache: CacheDir) -> Sharing:
    name, local = filesystem_of(cache)
    declared = _read_declaration(cache)
    if declared is None:
        return Sharing(name, local, None, None, None)
    return Sharing(name, local, *declared)


def sharing_at(path: str) -> Optional[Sharing]:
    """:func:`sharing_of` the cache at ``path``; None for a cache that does not exist yet
    (dtool's configured one before any access: nothing in it, nothing to say)."""
    if not os.path.isdir(path):
        return None
    with cachefs.open_cache(path, create=False) as cache:
        return sharing_of(cache)


def is_single_host(cache: CacheDir) -> bool:
    """Does only this host use the cache?  Looked up once per open cache: holds ask it for
    every file whose lock they could take (dead here, or alive on another host)."""
    if cache.single_host is None:
        cache.single_host = sharing_of(cache).single_host
    return cache.single_host


def require_single_host(cache: CacheDir) -> None:
    """Refuse (:class:`PossiblyShared`) to remove anything from a cache other hosts may use."""
    if not is_single_host(cache):
        raise PossiblyShared(sharing_of(cache).refusal(cache.path))


def _read_declaration(cache: CacheDir) -> Optional[Tuple[str, str, Optional[float]]]:
    """(mode, owner's name, time) from the declaration, or None if there is none we trust."""
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
    if not isinstance(data, dict) or data.get("mode") != SINGLE_HOST:
        return None
    at = data.get("declared_at")
    at = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else None
    return SINGLE_HOST, cachefs.user_name(st.st_uid), at


def declare_at(path: str, single_host: bool) -> None:
    """:func:`declare` for the cache at ``path`` (its bookkeeping made if missing)."""
    with cachefs.open_cache(path) as cache:
        declare(cache, single_host)


def declare(cache: CacheDir, single_host: bool) -> None:
    """Write (or, with ``single_host`` False, remove) the declaration.  Only the
    bookkeeping's owner or root may: :class:`InvalidInput` otherwise; a filesystem error
    is one :class:`CacheManagerError`."""
    if cache.meta_fd is None or not cache.can_write_meta:
        owner = cachefs.user_name(cache.meta_stat.st_uid if cache.meta_stat else None)
        raise InvalidInput(f"only the owner of {cache.meta_path} ({owner}) or root may "
                           "declare how the cache is shared")
    if cache.unsafe is not None:
        raise InvalidInput(f"cannot declare how the cache is shared: {cache.unsafe}")
    body = json.dumps({"version": 1, "mode": SINGLE_HOST, "declared_at": time.time()})
    try:
        if single_host:
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
