"""Where things live: the cache directory, our bookkeeping inside it, and who is accessing.

Everything we write sits in one hidden directory inside the cache, so that everyone sharing a
cache shares the same numbers, and so that a scan of the cache can skip it by name.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional, Union

from .facilities import pwd


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
    return _absolute(str(value), "DTOOL_CACHE_DIRECTORY")


def sanitise_uri(uri: str) -> str:
    """dtoolcore's normal form of a dataset URI (imported on use, as above); TypeError or
    ValueError, with the URI in the message, for what is not one."""
    from dtoolcore.utils import sanitise_uri as sanitise

    if not isinstance(uri, str):
        raise TypeError(f"a dataset URI must be a string, not {type(uri).__name__}")
    if not uri.strip() or "\0" in uri:
        raise ValueError(f"invalid dataset URI {uri!r}")
    try:
        return sanitise(uri)
    except ValueError as exc:
        raise ValueError(f"invalid dataset URI {uri!r}: {exc}") from None


def resolve_cache_dir(cache_dir: Optional[str]) -> str:
    """``cache_dir`` if given, else dtool's configured cache.  TypeError or ValueError for
    what cannot name a directory (an empty string would mean the current directory)."""
    if cache_dir is None:
        return configured_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, not {type(cache_dir).__name__}")
    return _absolute(os.fsdecode(os.fspath(cache_dir)), "cache_dir")


def _absolute(text: str, what: str) -> str:
    if not text.strip() or "\0" in text:
        raise ValueError(f"{what} {text!r} is not a directory name: give a directory, or "
                         "leave it unset for dtool's configured cache")
    return os.path.abspath(os.path.expanduser(text))


def relpath_in(cache_dir: str, abspath: str) -> Optional[str]:
    """``abspath`` relative to ``cache_dir``, lexically; None if it lies outside it or in our
    bookkeeping."""
    prefix = cache_dir + os.sep
    if abspath.startswith(prefix) and os.sep + os.pardir not in abspath:
        rel = abspath[len(prefix):]  # the common case, without relpath()'s normalising
    else:
        rel = os.path.relpath(abspath, cache_dir)
    return rel if is_item_relpath(rel) else None


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


def row_ok(values, kinds: str) -> bool:
    """Do the values of a ledger row have the types we wrote?  Any member may write the
    ledger, and SQLite stores whatever type it is given.  ``kinds`` has a letter per value:
    ``p`` a path (text or bytes), ``s`` text, ``i`` an integer, ``n`` a number; upper case
    when it may be NULL."""
    for value, kind in zip(values, kinds):
        if value is None:
            if kind.islower():
                return False
            continue
        kind = kind.lower()
        if kind == "s" and not isinstance(value, str) \
                or kind == "i" and type(value) is not int \
                or kind == "n" and type(value) not in (int, float) \
                or kind == "p" and not isinstance(value, (str, bytes)):
            return False
    return True


def is_item_relpath(relpath) -> bool:
    """Lexically, can ``relpath`` name a cached item?  Relative, no '..', '.' or empty
    component, no NUL, and not in our bookkeeping directory.  Paths arrive from journals and
    manifests that others write."""
    if not isinstance(relpath, str) or not relpath or "\0" in relpath:
        return False
    parts = relpath.split(os.sep)
    return not (any(p in ("", os.curdir, os.pardir) for p in parts)
                or parts[0] == META_DIRNAME)


def user_at_host(user: str, host: str) -> str:
    """How the ledger, the holds and every listing name a user: ``user@host``."""
    return f"{user}@{host}"


@dataclass(frozen=True)
class Identity:
    """Who is accessing: recorded with every access and every hold."""

    user: str
    host: str
    pid: int

    @property
    def user_at_host(self) -> str:
        return user_at_host(self.user, self.host)


def current_identity() -> Identity:
    """The effective user (not $USER, which survives setuid), this host and this process."""
    uid = os.geteuid()
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    return Identity(user=user, host=socket.gethostname(), pid=os.getpid())
