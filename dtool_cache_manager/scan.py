"""Scanning the cache directory: what is on disk, whatever the ledger believes.

Files appear behind our back (fetched before install, or by a process without the plugin)
and vanish behind it (jobs move them out of scratch), so the disk is the truth for sizes and
the ledger only adds history.  Symlinks are never followed.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from typing import List, Optional, Tuple

from .layout import META_DIRNAME

PARTIAL_SUFFIX = ".tmp"
_IDENTIFIER = re.compile(r"^[0-9a-f]{40}")


@dataclass(frozen=True)
class CachedFile:
    """One file in the cache directory."""

    relpath: str
    size_bytes: int
    mtime: float
    atime: float = 0.0

    @property
    def identifier(self) -> Optional[str]:
        """The dtool item identifier its name starts with, if any."""
        match = _IDENTIFIER.match(os.path.basename(self.relpath))
        return match.group(0) if match else None


@dataclass(frozen=True)
class CacheScan:
    """What a walk of the cache directory found."""

    cache_dir: str
    files: Tuple[CachedFile, ...]
    partials: Tuple[CachedFile, ...]  # leftover or in-progress '*.tmp' downloads
    skipped: Tuple[Tuple[str, str], ...] = ()  # (relpath, why) of what is not a cached file

    @property
    def total_size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files) + sum(f.size_bytes for f in self.partials)


def scan_cache(cache_dir: str) -> CacheScan:
    """Walk ``cache_dir`` (skipping our bookkeeping); a missing directory is an empty cache.

    Symbolic links and special files are never followed or counted; they are reported in
    ``skipped``, as are directories we may not read.
    """
    files: List[CachedFile] = []
    partials: List[CachedFile] = []
    skipped: List[Tuple[str, str]] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            entries = os.scandir(os.path.join(cache_dir, rel_dir))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except PermissionError:
            skipped.append((rel_dir, "directory not readable"))
            continue
        with entries:
            for entry in entries:
                rel = os.path.join(rel_dir, entry.name) if rel_dir else entry.name
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    if not (rel_dir == "" and entry.name == META_DIRNAME):
                        stack.append(rel)
                elif stat.S_ISREG(st.st_mode):
                    found = CachedFile(rel, st.st_size, st.st_mtime, st.st_atime)
                    (partials if entry.name.endswith(PARTIAL_SUFFIX) else files).append(found)
                elif stat.S_ISLNK(st.st_mode):
                    skipped.append((rel, "symbolic link, not followed"))
                else:
                    skipped.append((rel, "not a regular file"))
    return CacheScan(cache_dir, tuple(sorted(files, key=lambda f: f.relpath)),
                     tuple(sorted(partials, key=lambda f: f.relpath)), tuple(sorted(skipped)))
