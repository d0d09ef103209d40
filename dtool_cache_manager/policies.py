"""Which cached files ``dtool cache clean`` removes: a pure function of the files, rules and time.

No I/O and no clock reads (``now`` is a parameter), so every rule is unit-testable and a dry
run selects exactly what the real run would.

- ``remove_all`` selects every file, whatever the other rules say.
- The filters are ANDed and narrow the candidates: ``older_than_seconds`` keeps files unused
  for at least that long, ``exclude_frequently_accessed=N`` keeps files accessed fewer than N
  times.  A file no hook has seen (``last_access is None``) is the oldest of all; a last access
  in the future (clock skew) counts as just now, never as old.
- ``retain_size_bytes`` then removes the fewest least-recently-used candidates that bring the
  whole cache (every file passed in) down to that size, or all of them if that is not enough.
- Files held by a live process are never removed: a filter or ``remove_all`` that matches one
  reports it in ``skipped_in_use``; ``retain_size_bytes`` simply leaves it, counted in the total.
- No rule selects nothing: the default rule is the CLI's business, not the policy's.

Removal order is least recently used first: untracked, then oldest access, then larger, then
by relpath, so equal inputs always give the same selection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple


@dataclass(frozen=True)
class Candidate:
    """One cached file as the policy sees it."""

    relpath: str  # relative to the cache directory; the unique key
    size_bytes: int
    last_access: Optional[float]  # unix time; None: never seen by a hook, the oldest of all
    access_count: int  # hits + misses (0 when untracked)
    in_use: bool = False  # a live process holds it
    fetch_seconds: float = 0.0  # total measured fetch time, for a future cost-aware policy


@dataclass(frozen=True)
class Rules:
    """What the user asked ``clean`` to remove; all unset means nothing."""

    remove_all: bool = False
    older_than_seconds: Optional[float] = None
    exclude_frequently_accessed: Optional[int] = None  # keep files accessed >= N times
    retain_size_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("older_than_seconds", "exclude_frequently_accessed", "retain_size_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")

    @property
    def empty(self) -> bool:
        """True when no rule is set, so the caller must supply its default."""
        return not self.remove_all and (self.older_than_seconds is None
                                        and self.exclude_frequently_accessed is None
                                        and self.retain_size_bytes is None)


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select`."""

    remove: Tuple[Candidate, ...]  # in removal order
    skipped_in_use: Tuple[Candidate, ...]  # matched the rules but held: never removed

    @property
    def expected_freed_bytes(self) -> int:
        """Bytes freed if every removal succeeds (files in use free nothing)."""
        return sum(c.size_bytes for c in self.remove)


def lru_key(candidate: Candidate, now: float) -> Tuple[bool, float, int, str]:
    """Sort key putting the file to remove first first; see the module docstring."""
    if candidate.last_access is None:
        return (False, 0.0, -candidate.size_bytes, candidate.relpath)
    return (True, min(candidate.last_access, now), -candidate.size_bytes, candidate.relpath)


def _matches_filters(candidate: Candidate, rules: Rules, now: float) -> bool:
    if rules.older_than_seconds is not None and candidate.last_access is not None:
        age = max(0.0, now - candidate.last_access)  # a future access counts as just now
        if age < rules.older_than_seconds:
            return False
    if rules.exclude_frequently_accessed is not None:
        if candidate.access_count >= rules.exclude_frequently_accessed:
            return False
    return True


def select(candidates: Sequence[Candidate], rules: Rules, now: float) -> Selection:
    """Decide which of ``candidates`` (the whole cache) ``rules`` remove at time ``now``."""
    seen = set()
    for c in candidates:
        if c.relpath in seen:
            raise ValueError(f"duplicate candidate relpath {c.relpath!r}")
        seen.add(c.relpath)
    if rules.empty:
        return Selection((), ())
    ordered = sorted(candidates, key=lambda c: lru_key(c, now))
    matched = ordered if rules.remove_all else [
        c for c in ordered if _matches_filters(c, rules, now)]
    if rules.remove_all or rules.retain_size_bytes is None:
        return Selection(tuple(c for c in matched if not c.in_use),
                         tuple(c for c in matched if c.in_use))
    total = sum(c.size_bytes for c in candidates)
    remove = []
    for c in matched:
        if total <= rules.retain_size_bytes:
            break
        if not c.in_use:
            remove.append(c)
            total -= c.size_bytes
    return Selection(tuple(remove), ())
