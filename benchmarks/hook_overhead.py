"""Measure the per-access cost of usage tracking on a warm dtool cache.

Three variants of "give me the cached path of an item" are timed against
the same HTTP dataset, served locally so that the real http storage broker
and real cache files are used:

* bare    - dtoolcore's unpatched ``DataSet.item_content_abspath``;
* tracked - ``ds.item_content_abspath`` as patched by dtool-cache-manager;
* naive   - the specification's design (sqlitedict + filelock on every access),
            see ``naive_sqlitedict.py``.

Then a long run: one process making ``--long-calls`` warm accesses (a training loop reading
the same items epoch after epoch), timed from its start to its exit (the fold of its
journal included), with tracking against without; the bytes its journal took per access,
and the most the journal directory held at any moment (sampled every few milliseconds).

Run:  python benchmarks/hook_overhead.py [--calls N] [--items K] [--long-calls M]
                                          [--write-rst docs/performance.rst]
"""

import argparse
import datetime
import functools
import gc
import http.server
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import dtoolcore
from dtool_http.server import DtoolHTTPRequestHandler

from naive_sqlitedict import NaiveTracker

DISABLE_VAR = "DTOOL_CACHE_MANAGER_DISABLE"
MAX_TRACKED_OVERHEAD_US = 20.0
MAX_LONG_RUN_OVERHEAD_US = 6.0
MAX_JOURNAL_BYTES_PER_ACCESS = 32.0
MAX_JOURNAL_ON_DISK = 64 * 2 ** 20
MIN_RATIO = 50.0
ROUNDS = 20
SETTLE_CALLS = 100  # untimed calls after each switch: re-warm CPU caches the last variant evicted
RST_START = ".. hook-overhead-start"
RST_END = ".. hook-overhead-end"


class QuietHandler(DtoolHTTPRequestHandler):
    """dtool_http's handler (it builds http_manifest.json on the fly), minus logging."""

    def log_message(self, *args):
        pass


def make_dataset(base_dir, n_items):
    """Create a frozen local dataset of ``n_items`` 1 KiB files; return its name."""
    name = "hook-overhead"
    os.makedirs(base_dir)
    with dtoolcore.DataSetCreator(name, base_dir) as creator:
        for i in range(n_items):
            with open(creator.prepare_staging_abspath_promise(f"item-{i:04d}.bin"), "wb") as fh:
                fh.write(bytes([i % 256]) * 1024)
    return name


def serve(directory):
    """Serve ``directory`` on 127.0.0.1:<ephemeral> from a background thread.

    ``directory=`` instead of dtool_http's os.chdir, so the process cwd is untouched.
    """
    handler = functools.partial(QuietHandler, directory=directory)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def load_original():
    """Return (unpatched item_content_abspath, note about where it came from).

    Call after opening a dataset: the package patches (and records the
    original) when dtoolcore first loads its storage-broker entry points.
    """
    try:
        from dtool_cache_manager.hooks import host
        original = getattr(host, "ORIGINAL_ITEM_CONTENT_ABSPATH", None)
    except ImportError:
        original = None
    if original is not None:
        return original, None
    return dtoolcore.DataSet.item_content_abspath, (
        "dtool_cache_manager.hooks.host.ORIGINAL_ITEM_CONTENT_ABSPATH not available (None or "
        f"missing): bare/naive use dtoolcore.DataSet.item_content_abspath with {DISABLE_VAR}=1"
    )


def is_patched(ds):
    """True if ``ds.item_content_abspath`` is no longer dtoolcore's own code."""
    func = getattr(ds.item_content_abspath, "__func__", ds.item_content_abspath)
    code = getattr(func, "__code__", None)
    return code is None or os.path.realpath(code.co_filename) != os.path.realpath(
        dtoolcore.__file__
    )


def time_calls(fn, identifiers, n):
    """Per-call wall time in ns of ``n`` calls, round-robin over ``identifiers``."""
    samples = []
    clock = time.perf_counter_ns
    for k in range(n):
        identifier = identifiers[k % len(identifiers)]
        t0 = clock()
        fn(identifier)
        samples.append(clock() - t0)
    return samples


def run_variants(variants, identifiers, calls, naive_calls):
    """Interleave the variants in rounds, in shuffled order, to cancel drift.

    ``variants`` maps name -> (fn, value for DISABLE_VAR, None to unset it).
    A few untimed calls after each switch keep one variant's after-effects
    (e.g. sqlitedict's worker thread) out of the next one's samples.
    Returns (name -> median ns per call, timed calls per variant).
    """
    def switch_to(name):
        fn, env = variants[name]
        if env is None:
            os.environ.pop(DISABLE_VAR, None)
        else:
            os.environ[DISABLE_VAR] = env
        time_calls(fn, identifiers, SETTLE_CALLS)
        return fn

    names = list(variants)
    per_round = {name: max(1, (naive_calls if name == "naive" else calls) // ROUNDS)
                 for name in names}
    samples = {name: [] for name in names}
    rng = random.Random(0)
    for name in names:  # warm-up: first access downloads / creates records
        switch_to(name)
        time_calls(variants[name][0], identifiers, len(identifiers))
    gc.collect()
    gc.disable()  # keep collector pauses out of µs-scale samples
    try:
        for _ in range(ROUNDS):
            rng.shuffle(names)
            for name in names:
                samples[name] += time_calls(switch_to(name), identifiers, per_round[name])
    finally:
        gc.enable()
        os.environ.pop(DISABLE_VAR, None)
    return ({name: statistics.median(s) for name, s in samples.items()},
            {name: n * ROUNDS for name, n in per_round.items()})


def format_report(medians, n_calls, n_items, notes, patched):
    """Plain-text report: header, notes, table, verdict."""
    bare = medians["bare"]
    over = {name: (ns - bare) / 1000 for name, ns in medians.items()}
    ratio = over["naive"] / over["tracked"] if over["tracked"] > 0 else float("inf")
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count()
    lines = [
        f"machine: nproc={nproc}, Python {platform.python_version()}, "
        f"dtoolcore {dtoolcore.__version__}, {platform.system()} {platform.machine()}",
        f"date: {datetime.date.today().isoformat()}",
        f"timed calls: bare {n_calls['bare']}, tracked {n_calls['tracked']}, naive "
        f"{n_calls['naive']}; {n_items} items of 1 KiB, "
        f"{ROUNDS} shuffled interleaved rounds, warm cache, median per call",
    ]
    for note in notes:
        lines += textwrap.wrap(note, 88, initial_indent="note: ", subsequent_indent="      ")
    lines += ["", f"{'variant':<10}{'median µs/call':>16}{'overhead vs bare µs':>22}"]
    for name in ("bare", "tracked", "naive"):
        lines.append(f"{name:<10}{medians[name] / 1000:>16.1f}{over[name]:>22.1f}")
    lines.append("")
    ok_over = over["tracked"] <= MAX_TRACKED_OVERHEAD_US
    ok_ratio = ratio >= MIN_RATIO
    if not patched:
        verdict = "FAIL (tracking not active: 'tracked' ran the unpatched method)"
    else:
        verdict = "PASS" if ok_over and ok_ratio else "FAIL"
    ratio_txt = f"{ratio:.0f}" if ratio != float("inf") else "inf (tracked overhead <= 0, noise)"
    lines.append(
        f"ratio naive_overhead / tracked_overhead = {ratio_txt} "
        f"[target >= {MIN_RATIO:.0f}: {'ok' if ok_ratio else 'missed'}]; "
        f"tracked overhead {over['tracked']:.1f} µs "
        f"[target <= {MAX_TRACKED_OVERHEAD_US:.0f} µs: {'ok' if ok_over else 'missed'}] "
        f"=> {verdict}"
    )
    return "\n".join(lines)


# One long-running process: warm accesses round-robin, then exit.  It reports the bytes its
# journal took: every finished segment's, plus the last one's (counted before the exit fold).
LONG_RUN = r"""
import functools, json, os, sys
from dtool_cache_manager import journal
finished = []
rotate = journal.JournalWriter._rotate


def counting_rotate(self):
    finished.append(self._written)
    rotate(self)


journal.JournalWriter._rotate = counting_rotate
import dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
broker = ds._storage_broker
broker.get_manifest = functools.lru_cache(maxsize=None)(broker.get_manifest)
ids = sorted(ds.identifiers)
access = ds.item_content_abspath
for i in range(int(sys.argv[2])):
    access(ids[i % len(ids)])
from dtool_cache_manager.hooks import tracking
session = tracking._sessions.get(os.environ["DTOOL_CACHE_DIRECTORY"])
written = None if session is None else sum(finished) + session.journal._written
print(json.dumps({"journal_bytes": written}), flush=True)
"""


def journal_bytes_on_disk(journal_dir):
    total = 0
    try:
        entries = list(os.scandir(journal_dir))
    except FileNotFoundError:
        return 0
    for entry in entries:
        if entry.name.endswith(".jsonl"):
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # folded and removed meanwhile
                pass
    return total


def time_long_run(uri, cache_dir, calls, tracked):
    """(seconds from start to exit, journal bytes it wrote, most bytes on disk at once)."""
    env = dict(os.environ)
    if tracked:
        env.pop(DISABLE_VAR, None)
    else:
        env[DISABLE_VAR] = "1"
    journal_dir = os.path.join(cache_dir, ".dtool-cache-manager", "journal")
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], journal_bytes_on_disk(journal_dir))
            stop.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", LONG_RUN, uri, str(calls)], env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"the long run failed:\n{proc.stderr}")
    written = json.loads(proc.stdout.splitlines()[-1])["journal_bytes"]
    return seconds, written, peak[0]


def run_long(uri, cache_dir, calls, repeat):
    """Both variants ``repeat`` times, in adjacent pairs (which of the two goes first
    alternates); medians, and each pair's difference.  The machine's speed drifts by more
    than the overhead between minutes, so the overhead is the median of the pairs'
    differences: each compares runs made seconds apart."""
    runs = {"disabled": [], "tracked": []}
    for round_ in range(repeat):
        for name in (("disabled", "tracked") if round_ % 2 == 0 else ("tracked", "disabled")):
            runs[name].append(time_long_run(uri, cache_dir, calls, name == "tracked"))
    seconds = {name: statistics.median(r[0] for r in rs) for name, rs in runs.items()}
    pairs = [t[0] - d[0] for d, t in zip(runs["disabled"], runs["tracked"])]
    written = max(r[1] for r in runs["tracked"])
    peak = max(r[2] for r in runs["tracked"])
    return seconds, pairs, written, peak


def format_long_report(calls, repeat, seconds, pairs, written, peak):
    overhead_us = statistics.median(pairs) / calls * 1e6
    per_access = written / calls
    checks = [
        (f"overhead {overhead_us:.1f} µs per access (median of the pairs)",
         f"<= {MAX_LONG_RUN_OVERHEAD_US:.0f} µs", overhead_us <= MAX_LONG_RUN_OVERHEAD_US),
        (f"journal {per_access:.1f} B per access", f"<= {MAX_JOURNAL_BYTES_PER_ACCESS:.0f} B",
         per_access <= MAX_JOURNAL_BYTES_PER_ACCESS),
        (f"journal on disk at most {peak / 2 ** 20:.1f} MiB",
         f"<= {MAX_JOURNAL_ON_DISK // 2 ** 20} MiB", peak <= MAX_JOURNAL_ON_DISK),
    ]
    lines = [
        f"long run: one process, {calls:,} warm accesses, start to exit (exit fold included), "
        f"median of {repeat} adjacent pairs",
        "",
        f"{'variant':<10}{'seconds':>10}{'µs/access':>12}",
    ]
    for name in ("disabled", "tracked"):
        lines.append(f"{name:<10}{seconds[name]:>10.2f}{seconds[name] / calls * 1e6:>12.2f}")
    lines.append("")
    lines.append("overhead of each pair, µs per access: "
                 + ", ".join(f"{p / calls * 1e6:.1f}" for p in pairs))
    lines.append("")
    lines += [f"{what} [target {target}: {'ok' if ok else 'missed'}]"
              for what, target, ok in checks]
    lines.append("=> " + ("PASS" if all(ok for _, _, ok in checks) else "FAIL"))
    return "\n".join(lines)


def write_rst(path, report):
    """Put ``report`` between the hook-overhead markers of ``path`` (created if missing)."""
    block = "\n".join(
        [RST_START, "", ".. code-block:: text", ""]
        + [("   " + line).rstrip() for line in report.splitlines()]
        + ["", RST_END]
    )
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        start, end = text.find(RST_START), text.find(RST_END)
        if 0 <= start < end:
            text = text[:start] + block + text[end + len(RST_END):]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = "Performance\n===========\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000,
                        help="timed calls for bare and tracked")
    parser.add_argument("--naive-calls", type=int, default=1000,
                        help="timed calls for naive (about 3 ms each)")
    parser.add_argument("--items", type=int, default=20, help="items in the dataset")
    parser.add_argument("--long-calls", type=int, default=1_000_000,
                        help="warm accesses of the long run (0: skip it)")
    parser.add_argument("--long-repeat", type=int, default=5,
                        help="pairs of long runs, tracked and disabled (medians)")
    parser.add_argument("--write-rst", metavar="PATH", help="also write the table into PATH")
    args = parser.parse_args(argv)
    if min(args.calls, args.naive_calls, args.items) < 1:
        parser.error("--calls, --naive-calls and --items must be >= 1")
    if args.long_calls < 0 or args.long_repeat < 1:
        parser.error("--long-calls must be >= 0 and --long-repeat >= 1")

    notes = []
    with tempfile.TemporaryDirectory(prefix="dtool-hook-overhead-") as tmp:
        cache_dir = os.path.join(tmp, "cache")
        os.makedirs(cache_dir)
        # Before anything reads it: the package and the broker both use this cache.
        os.environ["DTOOL_CACHE_DIRECTORY"] = cache_dir
        if os.environ.pop(DISABLE_VAR, None) is not None:
            notes.append(f"{DISABLE_VAR} was set in the environment; unset for 'tracked'")

        datasets_dir = os.path.join(tmp, "datasets")
        name = make_dataset(datasets_dir, args.items)
        server, thread = serve(datasets_dir)
        naive = None
        try:
            port = server.server_address[1]
            ds = dtoolcore.DataSet.from_uri(f"http://127.0.0.1:{port}/{name}")
            # Upstream re-downloads the manifest on every get_item_abspath
            # (2-4 ms here), which would drown a µs-scale difference.
            broker = ds._storage_broker
            broker.get_manifest = functools.lru_cache(maxsize=None)(broker.get_manifest)
            notes.append(
                "the http broker's get_manifest() is memoised on this dataset instance "
                "(upstream re-downloads the manifest on every access, 2-4 ms); "
                "everything else is real: real broker, real cache files"
            )

            original, fallback_note = load_original()
            if fallback_note:
                notes.append(fallback_note)
            patched = is_patched(ds)
            if not patched:
                notes.append("ds.item_content_abspath is not patched: 'tracked' == bare")

            naive = NaiveTracker(cache_dir)
            naive_fn = naive.wrap(original)
            variants = {
                "bare": (lambda i: original(ds, i), "1"),
                "tracked": (lambda i: ds.item_content_abspath(i), None),
                "naive": (lambda i: naive_fn(ds, i), "1"),
            }
            identifiers = sorted(ds.identifiers)
            medians, n_calls = run_variants(variants, identifiers, args.calls, args.naive_calls)
            if args.long_calls:
                long_report = format_long_report(
                    args.long_calls, args.long_repeat,
                    *run_long(ds.uri, cache_dir, args.long_calls, args.long_repeat))
        finally:
            if naive is not None:
                naive.close()
            server.shutdown()
            server.server_close()
            thread.join()

    report = format_report(medians, n_calls, args.items, notes, patched)
    if args.long_calls:
        report += "\n\n" + long_report
    print(report)
    if args.write_rst:
        write_rst(args.write_rst, report)
        print(f"\nwrote {args.write_rst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
