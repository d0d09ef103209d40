"""What a coordinator (PostgreSQL, issue 17) costs an access and a clean, against one host.

Two parts, each against the single-host mode (a cache on a local disk, no coordinator) in
the same run, with a real server started here (``initdb``/``pg_ctl`` as ``postgres``,
reached over TCP on 127.0.0.1, as hosts reach it over the network):

- **accesses** of a real HTTP dataset (dtool_http's server on 127.0.0.1; the broker's
  manifest memoised, as in ``hook_overhead.py``), in fresh processes: the first access of
  a process (where a coordinated process connects and registers), the first access of each
  further item (one round trip for the hold), and warm hits (no round trip), each minus
  the same call with tracking disabled;
- **a clean of --clean-items files** out of a cache built as ``scale.py`` builds one: the
  single-host clean unlinks them, the coordinated one claims them on the server (512 per
  statement) and moves them to the trash; the purge of that trash, after the grace period,
  is timed too.

    python benchmarks/coordinated.py [--items 200] [--warm-calls 20000]
                                     [--clean-items 100000] [--write-rst PATH]

Needs root, PostgreSQL's server binaries and psycopg 3 (``pip install '.[bench]'``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from coordinator_capacity import postgres_server  # noqa: E402
from hook_overhead import make_dataset, serve  # noqa: E402
from scale import build_cache, lru_first  # noqa: E402

BIN = os.path.dirname(sys.executable)
RST_START = ".. coordinated-start"
RST_END = ".. coordinated-end"
MAX_WARM_OVERHEAD_US = 20.0

# argv: uri, warm calls.  Prints the microseconds of: the first access, each further
# item's first access (median), and each warm hit (median of rounds).
ACCESSES = textwrap.dedent("""
    import functools, json, statistics, sys, time
    import dtoolcore
    uri, calls = sys.argv[1], int(sys.argv[2])
    ds = dtoolcore.DataSet.from_uri(uri)
    broker = ds._storage_broker  # upstream downloads the manifest at every access (2-4 ms)
    broker.get_manifest = functools.lru_cache(maxsize=None)(broker.get_manifest)
    ids = sorted(ds.identifiers)
    get = ds.item_content_abspath
    start = time.perf_counter()
    get(ids[0])
    first = time.perf_counter() - start
    further = []
    for identifier in ids[1:]:
        start = time.perf_counter()
        get(identifier)
        further.append(time.perf_counter() - start)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for n in range(calls // 5):
            get(ids[n % len(ids)])
        rounds.append((time.perf_counter() - start) / (calls // 5))
    print(json.dumps([first * 1e6, statistics.median(further) * 1e6,
                      statistics.median(rounds) * 1e6]))
""")


def dtool_cache(cache_dir: str, *args: str, extra: Dict[str, str] = {}) -> Tuple[float, str]:
    env = dict(os.environ, DTOOL_CACHE_DIRECTORY=cache_dir, **extra)
    start = time.perf_counter()
    done = subprocess.run([os.path.join(BIN, "dtool-cache"), *args], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"dtool-cache {' '.join(args)} failed: {done.stderr}")
    return seconds, done.stdout


def register(cache_dir: str, url: str, grace: int) -> None:
    os.makedirs(cache_dir, exist_ok=True)
    dtool_cache(cache_dir, "init", "--database", url, "--session-timeout", "2", "--grace",
                str(grace))


def accesses(uri: str, cache_dir: str, calls: int, disabled: bool) -> List[float]:
    env = dict(os.environ, DTOOL_CACHE_DIRECTORY=cache_dir)
    if disabled:
        env["DTOOL_CACHE_MANAGER_DISABLE"] = "1"
    done = subprocess.run([sys.executable, "-c", ACCESSES, uri, str(calls)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def measure_accesses(url: str, items: int, calls: int, work: str) -> List[List[str]]:
    base = os.path.join(work, "datasets")
    name = make_dataset(base, items)
    server, _ = serve(base)
    uri = f"http://127.0.0.1:{server.server_address[1]}/{name}"
    rows = []
    try:
        results = {}
        for mode in ("single-host", "coordinated"):
            cache = os.path.join(work, f"access-{mode}")
            if mode == "coordinated":
                register(cache, url, 61)
            accesses(uri, cache, 100, disabled=False)  # fetch everything once
            runs = [(accesses(uri, cache, calls, disabled=True),
                     accesses(uri, cache, calls, disabled=False)) for _ in range(3)]
            results[mode] = [statistics.median(t[k] - b[k] for b, t in runs)
                             for k in range(3)]
            results[mode + " bare"] = [statistics.median(b[k] for b, _ in runs)
                                       for k in range(3)]
        names = ["first access of a process", "first access of each further item",
                 "warm hit"]
        for k, name in enumerate(names):
            single, coordinated = results["single-host"][k], results["coordinated"][k]
            rows.append([name, f"{results['single-host bare'][k]:,.1f}", f"{single:,.1f}",
                         f"{coordinated:,.1f}", f"{coordinated - single:+,.1f}"])
    finally:
        server.shutdown()
    return rows


def measure_clean(url: str, n_clean: int, work: str) -> Tuple[List[List[str]], bool]:
    n_items = n_clean + n_clean // 10
    grace = 5
    rows, ok = [], True
    for mode in ("single-host", "coordinated"):
        cache = os.path.join(work, f"clean-{mode}")
        if mode == "coordinated":
            register(cache, url, grace)
        print(f"building {n_items:,} items for the {mode} clean ...", flush=True)
        built_at = time.time()
        items = build_cache(cache, n_items, max(1, n_items // 2000), now=built_at)
        dtool_cache(cache, "summary", "--json")  # folds the journal, builds the index
        order = lru_first(items)
        retain = sum(i.size for i in order[n_clean:])
        os.sync()
        seconds, out = dtool_cache(cache, "clean", "--retain-size", str(retain), "--yes",
                                   "--json")
        removed = json.loads(out)["removed"]
        ok &= sorted(removed) == sorted(i.relpath for i in order[:n_clean])
        rows.append([f"clean of {n_clean:,} of {n_items:,} files, {mode}", f"{seconds:.2f}",
                     "unlinks them" if mode == "single-host"
                     else "claims them on the server, moves them to the trash"])
        if mode == "coordinated":
            trash = os.path.join(cache, ".dtool-cache-manager", "trash")
            ok &= len(os.listdir(trash)) == n_clean
            deadline = built_at + 2 * grace + 1
            while time.time() < deadline:  # the grace period is what is measured around
                time.sleep(deadline - time.time())
            os.sync()
            purge, _ = dtool_cache(cache, "clean", "--retain-size", str(retain), "--yes",
                                   "--json")
            ok &= os.listdir(trash) == []
            rows.append([f"the next clean, after the {grace} s grace period: purges the "
                         f"trash", f"{purge:.2f}", f"{n_clean:,} unlinks"])
    return rows, ok


def table(header: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(r[k]) for r in [header] + rows) for k in range(len(header))]
    line = "  ".join("=" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line, fmt(header), line, *map(fmt, rows), line])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--warm-calls", type=int, default=20000)
    parser.add_argument("--clean-items", type=int, default=100_000)
    parser.add_argument("--write-rst", metavar="PATH")
    args = parser.parse_args()
    with postgres_server({"listen_addresses": "127.0.0.1", "fsync": "off"}) as (info, _), \
            tempfile.TemporaryDirectory(prefix="dcm-coordinated-", dir="/var/tmp") as work:
        port = dict(p.split("=", 1) for p in info.split())["port"]
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        access_rows = measure_accesses(url, args.items, args.warm_calls, work)
        clean_rows, clean_ok = measure_clean(url, args.clean_items, work)
    warm_overhead = float(access_rows[2][3].replace(",", ""))
    text = "\n\n".join([
        table(["per access (µs)", "tracking off", "single-host: added", "coordinated: added",
               "coordinated - single-host"], access_rows),
        table(["clean", "seconds", "what it does"], clean_rows)])
    print(text)
    checks = {f"warm hit with a coordinator adds <= {MAX_WARM_OVERHEAD_US:g} µs":
              warm_overhead <= MAX_WARM_OVERHEAD_US,
              "each clean removed exactly the planned files; the purge emptied the trash":
              clean_ok}
    for name, passed in checks.items():
        print(f"{'ok  ' if passed else 'FAIL'} {name}")
    if args.write_rst:
        with open(args.write_rst) as fh:
            doc = fh.read()
        start, end = doc.index(RST_START), doc.index(RST_END)
        block = "\n".join("   " + line if line else "" for line in text.splitlines())
        doc = doc[:start] + RST_START + "\n\n.. code-block:: text\n\n" + block + "\n\n" + \
            doc[end:]
        with open(args.write_rst, "w") as fh:
            fh.write(doc)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
