"""Which cached files ``dtool cache clean`` removes: a pure function of the files, rules and time.

No I/O and no clock reads (``now`` is a parameter), so every rule is unit-testable and a dry
run selects exactly what the real run would.

- ``remove_all`` selects every file, whatever the other rules say.
- The filters are ANDed and narrow the candidates: ``older_than_seconds`` keeps files unused
  for at least that long, ``exclude_frequently_accessed=N`` keeps files accessed fewer than N
  times.  A file no hook has seen (``last_access is None``) is the oldest of all; a last access
  in the future (clock skew) counts as just now, never as old.
- ``retain_size_bytes`` then removes the fewest candidates, in the order of ``policy``, that
  bring the whole cache (every file passed in) down to that size, or all of them if that is not
  enough.  ``policy`` (see :data:`POLICIES`) only orders this step:

  - ``lru`` (default): least recently used first, the order below;
  - ``lfu``: fewest accesses first; ties least recently used first (the ``lru`` order);
  - ``cost``: lowest :func:`cost_value` first, i.e. the fewest fetch seconds saved per byte
    kept, so what is dearest to fetch again stays; ties in the ``lru`` order.
- Files held by a live process are never removed: a filter or ``remove_all`` that matches one
  reports it in ``skipped_in_use``; ``retain_size_bytes`` simply leaves it, counted in the total.
- No rule selects nothing: the default rule is the CLI's business, not the policy's.

The ``lru`` order, in which the filters and ``remove_all`` always report, is least recently
used first: untracked, then oldest access, then larger, then by relpath, so equal inputs always
give the same selection; the other policies break their ties with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

POLICIES = ("lru", "lfu", "cost")  # orders for the retain-size step; "lru" is the default


@dataclass(frozen=True)
class Candidate:
    """One cached file as the policy sees it."""

    relpath: str  # relative to the cache directory; the unique key
    size_bytes: int
    last_access: Optional[float]  # unix time; None: never seen by a hook, the oldest of all
    access_count: int  # hits + misses (0 when untracked)
    in_use: bool = False  # a live process holds it
    fetch_seconds: float = 0.0  # total measured fetch time over all misses; 0.0: unmeasured
    misses: int = 0  # fetches that fetch_seconds sums over (0 with a time counts as 1)


@dataclass(frozen=True)
class Rules:
    """What the user asked ``clean`` to remove; all unset means nothing."""

    remove_all: bool = False
    older_than_seconds: Optional[float] = None
    exclude_frequently_accessed: Optional[int] = None  # keep files accessed >= N times
    retain_size_bytes: Optional[int] = None
    policy: str = "lru"  # removal order for retain_size_bytes, one of POLICIES
    fallback_seconds_per_byte: Optional[float] = None  # cost: for unmeasured files; None: mean

    def __post_init__(self) -> None:
        for name in ("older_than_seconds", "exclude_frequently_accessed", "retain_size_bytes",
                     "fallback_seconds_per_byte"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")

    @property
    def in_lru_order(self) -> bool:
        """True when the selection only needs the candidates in ``lru`` order (as an index
        can stream them): the ``lru`` policy, or no size to retain (the policy then decides
        nothing)."""
        return self.policy == "lru" or self.remove_all or self.retain_size_bytes is None

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


def seconds_per_fetch(candidate: Candidate) -> Optional[float]:
    """Mean measured seconds of one fetch of the file, or None when never measured."""
    if candidate.fetch_seconds <= 0:
        return None
    return candidate.fetch_seconds / max(candidate.misses, 1)


def mean_seconds_per_byte(candidates: Sequence[Candidate]) -> float:
    """Fallback fetch rate for unmeasured files: measured seconds per fetch over their bytes.

    A ratio of sums, so a few tiny latency-bound files do not dominate it; 1.0 when nothing
    is measured, which then makes ``cost`` order exactly like ``lfu`` (any constant would).
    """
    measured = [(s, c.size_bytes) for c in candidates
                for s in (seconds_per_fetch(c),) if s is not None]
    total_bytes = sum(size for _, size in measured)
    if total_bytes <= 0:
        return 1.0
    return sum(s for s, _ in measured) / total_bytes


def cost_value(candidate: Candidate, fallback_seconds_per_byte: float) -> float:
    """Fetch seconds saved per byte kept: ``access_count * seconds_per_fetch / size_bytes``.

    GreedyDual-Size-like: keeping a file saves a refetch each time it is wanted again (its
    access frequency times its fetch cost) and costs its bytes.  An unmeasured file is assumed
    to take ``size_bytes * fallback_seconds_per_byte`` per fetch.  A zero-byte file counts as
    one byte: removing it frees nothing, so it goes last unless it saves nothing either.
    """
    per_fetch = seconds_per_fetch(candidate)
    if per_fetch is None:
        per_fetch = candidate.size_bytes * fallback_seconds_per_byte
    return candidate.access_count * per_fetch / max(candidate.size_bytes, 1)


def lru_order(candidates: Sequence[Candidate], now: float) -> List[Candidate]:
    """Least recently used first (see :func:`lru_key`): today's and the default order."""
    return sorted(candidates, key=lambda c: lru_key(c, now))


def lfu_order(candidates: Sequence[Candidate], now: float) -> List[Candidate]:
    """Fewest accesses first; ties least recently used, then larger, then by relpath."""
    return sorted(candidates, key=lambda c: (c.access_count, lru_key(c, now)))


def cost_order(candidates: Sequence[Candidate], now: float,
               fallback_seconds_per_byte: Optional[float] = None) -> List[Candidate]:
    """Lowest :func:`cost_value` first; ties in ``lru`` order.

    ``fallback_seconds_per_byte`` defaults to :func:`mean_seconds_per_byte` of ``candidates``.
    """
    if fallback_seconds_per_byte is None:
        fallback_seconds_per_byte = mean_seconds_per_byte(candidates)
    rate = fallback_seconds_per_byte
    return sorted(candidates, key=lambda c: (cost_value(c, rate), lru_key(c, now)))


def removal_order(candidates: Sequence[Candidate], policy: str, now: float,
                  fallback_seconds_per_byte: Optional[float] = None) -> List[Candidate]:
    """``candidates`` in the order ``policy`` removes them, the first to go first."""
    if policy == "lru":
        return lru_order(candidates, now)
    if policy == "lfu":
        return lfu_order(candidates, now)
    if policy == "cost":
        return cost_order(candidates, now, fallback_seconds_per_byte)
    raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")


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
    total = sum(c.size_bytes for c in candidates)
    if rules.in_lru_order:
        return select_in_lru_order(lru_order(candidates, now), total, rules, now)
    assert rules.retain_size_bytes is not None  # else in_lru_order would have been True
    matched = [c for c in lru_order(candidates, now) if _matches_filters(c, rules, now)]
    fallback = rules.fallback_seconds_per_byte
    if rules.policy == "cost" and fallback is None:
        fallback = mean_seconds_per_byte(candidates)  # the whole cache: the most measurements
    return Selection(tuple(_until_retained(removal_order(matched, rules.policy, now, fallback),
                                           total, rules.retain_size_bytes)), ())


def select_in_lru_order(ordered: Iterable[Candidate], total_bytes: int, rules: Rules,
                        now: float) -> Selection:
    """:func:`select` for candidates already in ``lru`` order (as an index query yields them),
    reading only as far as the rules need: a 10 % clean of a million files reads 10 %.

    ``total_bytes`` is the size of every candidate; ``rules.policy`` must be ``lru`` unless
    no size is to be retained.
    """
    if rules.empty:
        return Selection((), ())
    if not rules.in_lru_order:
        raise ValueError("select_in_lru_order orders by lru only")
    matched = ordered if rules.remove_all else _filtered_in_lru_order(ordered, rules, now)
    if rules.remove_all or rules.retain_size_bytes is None:
        remove: List[Candidate] = []
        held: List[Candidate] = []
        for c in matched:
            (held if c.in_use else remove).append(c)
        return Selection(tuple(remove), tuple(held))
    return Selection(tuple(_until_retained(matched, total_bytes, rules.retain_size_bytes)), ())


def _filtered_in_lru_order(ordered: Iterable[Candidate], rules: Rules,
                           now: float) -> Iterator[Candidate]:
    for c in ordered:
        if _matches_filters(c, rules, now):
            yield c
        elif (rules.older_than_seconds is not None and c.last_access is not None
              and max(0.0, now - c.last_access) < rules.older_than_seconds):
            return  # in lru order, everything after this was used more recently still


def _until_retained(ordered: Iterable[Candidate], total: int, retain: int) -> List[Candidate]:
    """The first of ``ordered`` not in use, until the cache is down to ``retain`` bytes."""
    remove = []
    for c in ordered:
        if total <= retain:
            break
        if not c.in_use:
            remove.append(c)
            total -= c.size_bytes
    return remove
