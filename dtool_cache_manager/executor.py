"""The executor: the only code that deletes cached files.

It removes a file only when it can prove nobody uses it: under the item's exclusive gate it
checks for live holders, checks that the path is a regular file inside the cache directory,
then unlinks.  When in doubt it keeps the file and says why.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from typing import Optional, Tuple

from .holds import Holder, exclusive_gate, holders_of
from .ledger import ItemRow, Ledger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RemovalOutcome:
    """What happened to one item."""

    relpath: str
    removed: bool
    freed_bytes: int = 0
    holders: Tuple[Holder, ...] = ()
    reason: str = ""


def _inside(cache_dir: str, abspath: str) -> bool:
    real_cache = os.path.realpath(cache_dir)
    real_parent = os.path.realpath(os.path.dirname(abspath))
    return real_parent == real_cache or real_parent.startswith(real_cache + os.sep)


def remove_item(ledger: Ledger, row: ItemRow, uri: Optional[str] = None) -> RemovalOutcome:
    """Remove ``row``'s file and ledger entry unless a live process holds it."""
    paths = ledger.paths
    abspath = os.path.join(paths.cache_dir, row.relpath)
    if os.path.isabs(row.relpath) or not _inside(paths.cache_dir, abspath):
        return RemovalOutcome(row.relpath, False, reason="path is outside the cache directory")
    with exclusive_gate(paths, row.identifier):
        holders = holders_of(paths, row.identifier, uuid=row.uuid, uri=uri, relpath=row.relpath)
        if holders:
            return RemovalOutcome(row.relpath, False, holders=tuple(holders), reason="in use")
        try:
            st = os.lstat(abspath)
        except FileNotFoundError:
            ledger.forget([row.relpath])
            return RemovalOutcome(row.relpath, False, reason="already gone from disk")
        if not stat.S_ISREG(st.st_mode):
            return RemovalOutcome(row.relpath, False, reason="not a regular file")
        os.unlink(abspath)
        ledger.forget([row.relpath])
    return RemovalOutcome(row.relpath, True, freed_bytes=st.st_size)
