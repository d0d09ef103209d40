"""Verify: do the cached files still match what their dataset manifests promised?

Brokers never re-check a cached file, so a truncated download or a flipped bit is served
for ever.  The ledger recorded each item's manifest size and hash when it was accessed, so
checking needs no network.  Files are reached from the cache root without following links
and hashed through the descriptor of the very file examined (see :mod:`cachefs`); with
``fix``, a damaged file goes through :func:`executor.remove_item`, only if it is still the
file examined, which keeps anything a live process holds, and the next access fetches a
good copy.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

from . import cachefs, executor
from .cachefs import Refused
from .holds import Holder
from .layout import is_item_relpath
from .store.ledger import ItemRow, Ledger, LedgerError

OK = "ok"
MISSING = "missing"
WRONG_SIZE = "wrong size"
HASH_MISMATCH = "hash mismatch"
UNVERIFIABLE = "unverifiable"

# Manifests name their hash function as dtoolcore.filehasher does.  Only these are known:
# the name comes from a shared file.
_HASHERS: Dict[str, str] = {"md5sum_hexdigest": "md5", "sha1sum_hexdigest": "sha1",
                            "sha256sum_hexdigest": "sha256"}


@dataclass(frozen=True)
class VerifyResult:
    """One ledger item checked against its manifest entry."""

    relpath: str
    status: str  # "ok", "missing", "wrong size", "hash mismatch" or "unverifiable"
    detail: str = ""
    expected_size: Optional[int] = None
    actual_size: Optional[int] = None
    fixed: bool = False
    holders: Tuple[Holder, ...] = ()  # live holders, when ``fix`` had to leave the file


def verify(ledger: Ledger, check_hash: bool = False,
           fix: bool = False) -> Tuple[VerifyResult, ...]:
    """Check every item the ledger knows, in relpath order.

    ``check_hash`` also hashes each file (reading it in chunks; slow for big caches).  With
    ``fix``, rows of missing files are forgotten and damaged files removed, unless held.
    """
    if fix and ledger.readonly:
        raise LedgerError("cannot fix: the ledger is read-only for this user")
    if fix:
        executor.require_safe_holds(ledger.cache)
    results = []
    with cachefs.Dirs(ledger.cache.root_fd) as dirs:
        for row in sorted(ledger.items(), key=lambda r: r.relpath):
            dirs.trim()
            result, st = _check(dirs, row, check_hash)
            if fix and result.status in (MISSING, WRONG_SIZE, HASH_MISMATCH):
                result = _fix(ledger, row, result, st)
            results.append(result)
    return tuple(results)


def _check(dirs: cachefs.Dirs, row: ItemRow,
           check_hash: bool) -> Tuple[VerifyResult, Optional[os.stat_result]]:
    expected = row.manifest_size
    if not is_item_relpath(row.relpath):
        return VerifyResult(row.relpath, UNVERIFIABLE, "not a path to a cached item "
                            "(outside the cache, or our bookkeeping)", expected), None
    try:
        dir_fd, name = dirs.entry(row.relpath)
        found = cachefs.entry_stat(dir_fd, name)
        if found is None:
            raise FileNotFoundError(row.relpath)
        st = found
    except FileNotFoundError:
        return VerifyResult(row.relpath, MISSING, "not on disk", expected), None
    except Refused:
        return VerifyResult(row.relpath, UNVERIFIABLE, "its directory is a symbolic link or "
                            "not a directory: not followed", expected), None
    except OSError as exc:
        return VerifyResult(row.relpath, UNVERIFIABLE, exc.strerror or str(exc), expected), None
    if not stat.S_ISREG(st.st_mode):
        return VerifyResult(row.relpath, UNVERIFIABLE, "not a regular file", expected), st
    actual = st.st_size
    if expected is not None and actual != expected:
        return VerifyResult(row.relpath, WRONG_SIZE,
                            f"{actual} bytes on disk, the manifest says {expected}",
                            expected, actual), st
    if check_hash:  # a matching hash vouches for the content even without a size
        status, detail = _check_hash(dir_fd, name, st, row)
        return VerifyResult(row.relpath, status, detail, expected, actual), st
    if expected is None:
        return VerifyResult(row.relpath, UNVERIFIABLE, "no manifest size recorded",
                            expected, actual), st
    return VerifyResult(row.relpath, OK, "", expected, actual), st


def _check_hash(dir_fd: int, name: str, examined: os.stat_result,
                row: ItemRow) -> Tuple[str, str]:
    if not row.manifest_hash or not row.hash_function:
        return UNVERIFIABLE, "no manifest hash recorded"
    algorithm = _HASHERS.get(row.hash_function)
    if algorithm is None:
        return UNVERIFIABLE, f"unknown hash function {row.hash_function!r}"
    try:
        fd, st = cachefs.open_file(dir_fd, name)
    except OSError as exc:
        return UNVERIFIABLE, f"cannot read it ({exc.strerror or exc})"
    try:
        if (st.st_dev, st.st_ino) != (examined.st_dev, examined.st_ino):
            return UNVERIFIABLE, "replaced while verifying"
        hasher = hashlib.new(algorithm)
        offset = 0
        while True:
            chunk = os.pread(fd, 1 << 20, offset)
            if not chunk:
                break
            hasher.update(chunk)
            offset += len(chunk)
    finally:
        os.close(fd)
    actual = hasher.hexdigest()
    if actual.lower() != row.manifest_hash.strip().lower():
        return HASH_MISMATCH, f"{row.hash_function} is {actual}, the manifest says " \
                              f"{row.manifest_hash}"
    return OK, ""


def _fix(ledger: Ledger, row: ItemRow, result: VerifyResult,
         st: Optional[os.stat_result]) -> VerifyResult:
    """Remove a damaged file (only the very file examined), or forget a missing one (if it
    is still missing), through the executor's gate."""
    if st is None:
        if executor.forget_vanished(ledger, [row]):
            return replace(result, fixed=True)
        return replace(result, detail=f"{result.detail}; back on disk or in use, left alone")
    outcome = executor.remove_item(ledger, row, same_as=st)
    if outcome.holders:
        who = ", ".join(h.describe() for h in outcome.holders)
        return replace(result, detail=f"{result.detail}; kept, in use by {who}",
                       holders=outcome.holders)
    if outcome.removed or ledger.item(row.relpath) is None:
        return replace(result, fixed=True)
    if "replaced" in outcome.reason:  # re-fetched by an access meanwhile: judge it next time
        return replace(result, detail=f"{result.detail}; changed while verifying, left alone")
    return replace(result, detail=f"{result.detail}; kept, {outcome.reason}")
