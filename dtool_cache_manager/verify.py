"""Verify: do the cached files still match what their dataset manifests promised?

Brokers never re-check a cached file, so a truncated download or a flipped bit is served
for ever.  The ledger recorded each item's manifest size and hash when it was accessed, so
checking needs no network.  Files are examined with ``lstat`` and never through symlinks;
with ``fix``, damaged files go through :func:`executor.remove_item`, which keeps anything a
live process holds, and the next access fetches a good copy.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

from dtoolcore import filehasher

from . import executor
from .holds import Holder
from .ledger import ItemRow, Ledger, LedgerError

OK = "ok"
MISSING = "missing"
WRONG_SIZE = "wrong size"
HASH_MISMATCH = "hash mismatch"
UNVERIFIABLE = "unverifiable"

# Manifests name their hash function as dtoolcore does, e.g. "md5sum_hexdigest".  Only these
# one-argument hex-digest functions are looked up: the name comes from a shared file.
_HASHERS: Dict[str, Callable[[str], str]] = {
    name: getattr(filehasher, name) for name in dir(filehasher)
    if name.endswith("sum_hexdigest") and name != "hashsum_hexdigest"
}


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
    results = []
    for row in sorted(ledger.items(), key=lambda r: r.relpath):
        result, st = _check(ledger.paths.cache_dir, row, check_hash)
        if fix and result.status in (MISSING, WRONG_SIZE, HASH_MISMATCH):
            result = _fix(ledger, row, result, st)
        results.append(result)
    return tuple(results)


def _check(cache_dir: str, row: ItemRow,
           check_hash: bool) -> Tuple[VerifyResult, Optional[os.stat_result]]:
    expected = row.manifest_size
    if not executor.is_inside(cache_dir, row.relpath):
        return VerifyResult(row.relpath, UNVERIFIABLE, "not a path to a cached item "
                            "(outside the cache, or our bookkeeping)", expected), None
    abspath = os.path.join(cache_dir, row.relpath)
    try:
        st = os.lstat(abspath)
    except FileNotFoundError:
        return VerifyResult(row.relpath, MISSING, "not on disk", expected), None
    if not stat.S_ISREG(st.st_mode):
        return VerifyResult(row.relpath, UNVERIFIABLE, "not a regular file", expected), st
    actual = st.st_size
    if expected is not None and actual != expected:
        return VerifyResult(row.relpath, WRONG_SIZE,
                            f"{actual} bytes on disk, the manifest says {expected}",
                            expected, actual), st
    if check_hash:  # a matching hash vouches for the content even without a size
        status, detail = _check_hash(abspath, row)
        return VerifyResult(row.relpath, status, detail, expected, actual), st
    if expected is None:
        return VerifyResult(row.relpath, UNVERIFIABLE, "no manifest size recorded",
                            expected, actual), st
    return VerifyResult(row.relpath, OK, "", expected, actual), st


def _check_hash(abspath: str, row: ItemRow) -> Tuple[str, str]:
    if not row.manifest_hash or not row.hash_function:
        return UNVERIFIABLE, "no manifest hash recorded"
    hasher = _HASHERS.get(row.hash_function)
    if hasher is None:
        return UNVERIFIABLE, f"unknown hash function {row.hash_function!r}"
    actual = hasher(abspath)  # dtoolcore reads in 64 KiB chunks
    if actual.lower() != row.manifest_hash.strip().lower():
        return HASH_MISMATCH, f"{row.hash_function} is {actual}, the manifest says " \
                              f"{row.manifest_hash}"
    return OK, ""


def _fix(ledger: Ledger, row: ItemRow, result: VerifyResult,
         st: Optional[os.stat_result]) -> VerifyResult:
    """Remove a damaged file, or forget a missing one, through the executor's gate."""
    if st is not None and not _unchanged(ledger.paths.cache_dir, row.relpath, st):
        # Replaced since we looked (say, re-fetched by an access): judge it next time.
        return replace(result, detail=f"{result.detail}; changed while verifying, left alone")
    outcome = executor.remove_item(ledger, row)
    if outcome.holders:
        who = ", ".join(h.describe() for h in outcome.holders)
        return replace(result, detail=f"{result.detail}; kept, in use by {who}",
                     holders=outcome.holders)
    if outcome.removed or ledger.item(row.relpath) is None:
        return replace(result, fixed=True)
    return replace(result, detail=f"{result.detail}; kept, {outcome.reason}")


def _unchanged(cache_dir: str, relpath: str, before: os.stat_result) -> bool:
    try:
        now = os.lstat(os.path.join(cache_dir, relpath))
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_size, now.st_mtime_ns) == (
        before.st_ino, before.st_size, before.st_mtime_ns)

