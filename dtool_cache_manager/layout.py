"""Where things live: the cache directory, our bookkeeping inside it, and who is accessing.

Everything we write sits in one hidden directory inside the cache, so that everyone sharing a
cache shares the same numbers, and so that a scan of the cache can skip it by name.
"""

from __future__ import annotations

import os
import pwd
import socket
from dataclasses import dataclass
from typing import Optional

from dtoolcore.utils import DEFAULT_CACHE_PATH, get_config_value

META_DIRNAME = ".dtool-cache-manager"
DISABLE_ENV = "DTOOL_CACHE_MANAGER_DISABLE"


def tracking_disabled() -> bool:
    """True when the user switched us off with DTOOL_CACHE_MANAGER_DISABLE=1 (or true/yes)."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def configured_cache_dir(config_path: Optional[str] = None) -> str:
    """The cache directory the brokers use: environment, then dtool.json, then ~/.cache/dtool."""
    value = get_config_value("DTOOL_CACHE_DIRECTORY", config_path=config_path,
                             default=DEFAULT_CACHE_PATH)
    return os.path.abspath(os.path.expanduser(value))


def resolve_cache_dir(cache_dir: Optional[str]) -> str:
    """``cache_dir`` if given, else dtool's configured cache."""
    if cache_dir is None:
        return configured_cache_dir()
    return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))


@dataclass(frozen=True)
class MetaPaths:
    """Paths of our bookkeeping files for one cache directory."""

    cache_dir: str

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


def ensure_dir(path: str) -> None:
    """Create ``path`` (and parents) if needed."""
    os.makedirs(path, exist_ok=True)
