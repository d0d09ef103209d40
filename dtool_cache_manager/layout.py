"""Where things live: the cache directory, our bookkeeping inside it, and who is accessing.

Everything we write sits in one hidden directory inside the cache, so that everyone sharing a
cache shares the same numbers, and so that a scan of the cache can skip it by name.
"""

from __future__ import annotations

import functools
import os
import pwd
import socket
import stat
from dataclasses import dataclass
from typing import Optional, Union


META_DIRNAME = ".dtool-cache-manager"
DISABLE_ENV = "DTOOL_CACHE_MANAGER_DISABLE"


def tracking_disabled() -> bool:
    """True when the user switched us off with DTOOL_CACHE_MANAGER_DISABLE=1 (or true/yes)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configured_cache_dir(config_path: Optional[str] = None) -> str:
    """The cache directory the brokers use: environment, then dtool.json, then ~/.cache/dtool."""
    value = os.environ.get("DTOOL_CACHE_DIRECTORY") if config_path is None else None
    if value is None:  # as dtool decides; its import costs the CLI 50 ms, so only when needed
        from dtoolcore.utils import DEFAULT_CACHE_PATH, get_config_value

        value = get_config_value("DTOOL_CACHE_DIRECTORY", config_path=config_path,
                                 default=DEFAULT_CACHE_PATH)
    return os.path.abspath(os.path.expanduser(value))


def sanitise_uri(uri: str) -> str:
    """dtoolcore's normal form of a dataset URI (imported on use, as above)."""
    from dtoolcore.utils import sanitise_uri as sanitise

    return sanitise(uri)


def resolve_cache_dir(cache_dir: Optional[str]) -> str:
    """``cache_dir`` if given, else dtool's configured cache."""
    if cache_dir is None:
        return configured_cache_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


@dataclass(frozen=True)
class MetaPaths:
    """Paths of our bookkeeping files for one cache directory."""

    cache_dir: str

    @functools.cached_property
    def shared(self) -> bool:
        """A group-writable cache is shared: then everything we create is group-writable."""
        return is_shared(self.cache_dir)

    @property
    def meta_dir(self) -> str:
        return os.path.join(self.cache_dir, META_DIRNAME)

    @property
    def ledger(self) -> str:
        return os.path.join(self.meta_dir, "ledger.sqlite3")

    @property
    def journal_dir(self) -> str:
        return os.path.join(self.meta_dir, "journal")

    @property
    def holds_dir(self) -> str:
        return os.path.join(self.meta_dir, "holds")

    @property
    def gate_lock(self) -> str:
        """Byte-range lock file that makes 'check holders, then unlink' atomic against holds."""
        return os.path.join(self.meta_dir, "gate.lock")

    @property
    def fetch_lock(self) -> str:
        """Byte-range lock file that makes concurrent misses of one item download it once."""
        return os.path.join(self.meta_dir, "fetch.lock")

    def relpath(self, abspath: str) -> Optional[str]:
        """Path relative to the cache directory, or None if ``abspath`` lies outside it."""
        prefix = self.cache_dir + os.sep
        if abspath.startswith(prefix) and os.sep + os.pardir not in abspath:
            rel = abspath[len(prefix):]  # the common case, without relpath()'s normalising
        else:
            rel = os.path.relpath(abspath, self.cache_dir)
        if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir:
            return None
        if rel.split(os.sep, 1)[0] == META_DIRNAME:
            return None
        return rel


def to_db(relpath: str) -> Union[str, bytes]:
    """A path as SQLite stores it: text, or the raw bytes of a name that is not UTF-8
    (SQLite text must be valid UTF-8; such names come from a shared directory)."""
    try:
        relpath.encode("utf-8")
        return relpath
    except UnicodeEncodeError:
        return os.fsencode(relpath)


def from_db(value: Union[str, bytes]) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def is_item_relpath(relpath) -> bool:
    """Lexically, can ``relpath`` name a cached item?  Relative, no '..', no NUL, and not in
    our bookkeeping directory.  Paths arrive from journals any group member can write."""
    if not isinstance(relpath, str) or not relpath or "\0" in relpath:
        return False
    parts = relpath.split(os.sep)
    return not (os.path.isabs(relpath) or os.pardir in parts or parts[0] == META_DIRNAME)


@dataclass(frozen=True)
class Identity:
    """Who is accessing: recorded with every access and every hold."""

    user: str
    host: str
    pid: int

    @property
    def user_at_host(self) -> str:
        return f"{self.user}@{self.host}"


def current_identity() -> Identity:
    """The effective user (not $USER, which survives setuid), this host and this process."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Identity(user=user, host=socket.gethostname(), pid=os.getpid())


def is_shared(cache_dir: str) -> bool:
    try:
        return bool(os.stat(cache_dir).st_mode & stat.S_IWGRP)
    except OSError:
        return False


SHARED_DIR_MODE = 0o2775  # group rwx, setgid so new entries keep the cache's group
SHARED_FILE_MODE = 0o664


def ensure_dir(path: str, shared: bool = False) -> None:
    """Create ``path`` (and parents); in a shared cache, make what we own group-writable,
    whatever the umask (huggingface_hub#1141, #2580)."""
    if not shared:
        os.makedirs(path, exist_ok=True)
        return
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        ensure_dir(parent, shared)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    share_dir(path)


def share_dir(path: str) -> None:
    """Make a directory we own group-writable (and setgid); others' we leave alone."""
    st = os.stat(path)
    if st.st_uid == os.geteuid() and (st.st_mode & 0o7777) | SHARED_DIR_MODE != st.st_mode & 0o7777:
        os.chmod(path, (st.st_mode & 0o7777) | SHARED_DIR_MODE)


def share_file(path_or_fd, shared: bool) -> None:
    """Make a file we just created group-readable and -writable in a shared cache."""
    if not shared:
        return
    fd = path_or_fd if isinstance(path_or_fd, int) else None
    st = os.fstat(fd) if fd is not None else os.stat(path_or_fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o777 == SHARED_FILE_MODE:
        return  # someone else's file, or already right
    if fd is not None:
        os.fchmod(fd, SHARED_FILE_MODE)
    else:
        os.chmod(path_or_fd, SHARED_FILE_MODE)


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if we can; someone else may have removed it first."""
    try:
        os.unlink(path)
    except OSError:
        pass
