"""Replay a synthetic access trace through a simulated cache under each eviction policy.

Why: ``--policy`` changes which files ``dtool cache clean --retain-size`` keeps; this shows
what that costs in hit rate, bytes fetched and fetch seconds on a workload where items differ
wildly in size and in how dear they are to fetch again.

The workload (seeded, so the numbers are reproducible):

* ``--items`` items with Zipf(``--zipf``) popularity, sizes log-uniform 10 KB - 100 MB;
* each item lives behind one of three brokers of very different speed (see ``BROKERS``);
  a fetch takes ``size / bandwidth + latency`` seconds;
* ``--accesses`` accesses drawn by popularity; the first ``--warmup`` fraction only warms
  the cache and is not counted.

The cache: a miss fetches the item and inserts it; whenever the cache is then over capacity
``C`` the real :func:`dtool_cache_manager.policies.select` runs with
``Rules(retain_size_bytes=C, policy=...)`` over every cached item, the one just fetched being
in use.  As with the ledger, access counts and fetch times survive an item's removal.

Run:  python benchmarks/policy_simulation.py [--seed N] [--items N] [--accesses N]
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import math
import random
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

from dtool_cache_manager.policies import POLICIES, Candidate, Rules, select

MB = 1_000_000
# name, bandwidth (bytes/s), latency (s), share of items
BROKERS = (("s3-local", 500 * MB, 0.01, 0.5),
           ("smb-site", 50 * MB, 0.05, 0.25),
           ("http-remote", 2 * MB, 0.5, 0.25))
CACHE_FRACTIONS = (0.01, 0.05, 0.10, 0.25)


@dataclass(frozen=True)
class Item:
    relpath: str
    size: int
    broker: str
    fetch_seconds: float


@dataclass
class Result:
    hits: int = 0
    accesses: int = 0
    bytes_fetched: int = 0
    fetch_seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0


def make_catalogue(rng: random.Random, n: int) -> List[Item]:
    """Items with log-uniform sizes, each behind a broker drawn by its share."""
    lo, hi = math.log(10_000), math.log(100 * MB)
    shares = [b[3] for b in BROKERS]
    items = []
    for i in range(n):
        size = int(math.exp(rng.uniform(lo, hi)))
        name, bandwidth, latency, _ = rng.choices(BROKERS, weights=shares)[0]
        items.append(Item(f"item{i:05d}", size, name, size / bandwidth + latency))
    return items


def make_trace(rng: random.Random, n_items: int, n_accesses: int, zipf: float) -> List[int]:
    """Item indices drawn with Zipf popularity; rank is independent of size and broker."""
    ranks = list(range(n_items))
    rng.shuffle(ranks)
    cum = list(itertools.accumulate(1.0 / (r + 1) ** zipf for r in ranks))
    return [bisect.bisect(cum, rng.random() * cum[-1]) for _ in range(n_accesses)]


def simulate(items: Sequence[Item], trace: Sequence[int], capacity: int, policy: str,
             warmup: int) -> Result:
    """Hit/miss accounting of ``trace`` through a cache cleaned by ``select`` at ``capacity``."""
    rules = Rules(retain_size_bytes=capacity, policy=policy)
    cached: Dict[int, None] = {}
    used = 0
    count = [0] * len(items)
    misses = [0] * len(items)
    last = [0.0] * len(items)
    seconds = [0.0] * len(items)
    result = Result()
    for t, i in enumerate(trace):
        item = items[i]
        count[i] += 1
        last[i] = float(t)
        counted = t >= warmup
        result.accesses += counted
        if i in cached:
            result.hits += counted
            continue
        misses[i] += 1
        seconds[i] += item.fetch_seconds
        if counted:
            result.bytes_fetched += item.size
            result.fetch_seconds += item.fetch_seconds
        cached[i] = None
        used += item.size
        if used > capacity:
            rows = [Candidate(items[j].relpath, items[j].size, last[j], count[j], in_use=j == i,
                              fetch_seconds=seconds[j], misses=misses[j]) for j in cached]
            for c in select(rows, rules, float(t)).remove:
                j = int(c.relpath[4:])
                del cached[j]
                used -= items[j].size
    return result


def run(args: argparse.Namespace) -> Tuple[List[str], float]:
    rng = random.Random(args.seed)
    items = make_catalogue(rng, args.items)
    trace = make_trace(rng, args.items, args.accesses, args.zipf)
    catalogue_bytes = sum(it.size for it in items)
    warmup = int(args.warmup * len(trace))
    started = time.perf_counter()
    lines = [f"catalogue: {len(items)} items, {catalogue_bytes / 1e9:.1f} GB",
             f"trace: {len(trace)} accesses, Zipf s={args.zipf}, seed {args.seed}; "
             f"first {warmup} not counted"]
    lines += [f"broker {n:<11} {bw / MB:>4g} MB/s + {lat * 1000:>3g} ms, {share:.0%} of items"
              for n, bw, lat, share in BROKERS]
    lines += ["",
             f"{'cache':>14}  {'policy':<6} {'hit rate':>8} {'GB fetched':>10} "
             f"{'fetch hours':>11}"]
    wins = []
    for fraction in CACHE_FRACTIONS:
        capacity = int(fraction * catalogue_bytes)
        label = f"{fraction:.0%} {capacity / 1e9:.2f} GB"
        results = {p: simulate(items, trace, capacity, p, warmup) for p in POLICIES}
        for policy, r in results.items():
            lines.append(f"{label:>14}  {policy:<6} {r.hit_rate:>8.1%} "
                         f"{r.bytes_fetched / 1e9:>10.1f} {r.fetch_seconds / 3600:>11.2f}")
            label = ""
        lru, cost = results["lru"].fetch_seconds, results["cost"].fetch_seconds
        if cost < lru:
            wins.append(f"{fraction:.0%} (-{1 - cost / lru:.0%})")
    lines.append("")
    lines.append("cost beats lru (fewer fetch seconds) at: " + (", ".join(wins) or "none"))
    return lines, time.perf_counter() - started


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--accesses", type=int, default=30_000)
    parser.add_argument("--zipf", type=float, default=0.9)
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction not counted")
    args = parser.parse_args(argv)
    lines, elapsed = run(args)
    print("\n".join(lines))
    print(f"({elapsed:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
