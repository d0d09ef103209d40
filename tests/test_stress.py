"""Sustained contention: eight processes read items of two real HTTP datasets while two
processes run the real ``dtool-cache clean`` CLI in a loop, for about a minute.

Every access runs inside ``dcm.hold_scope()`` and reads the returned file before the scope
ends, checking its size and md5 against the dataset manifest: a cleaner removing a file in
use would show as a missing or short file.  The cleaners aim at a quarter of the datasets'
size, so items are evicted and fetched again all the time.  At the end the ledger must agree
with the disk exactly, and its counts with what the children did.

``DCM_STRESS_SECONDS`` sets the duration (default 60); ``DCM_FAULT_SEED`` replays the
random choices (the seed is printed).
"""

import json
import os
import random
import sqlite3
import time

import pytest

import dtool_cache_manager as dcm
from dtool_cache_manager import report
from support import Bookkeeping, disk_files, holds_now
from support.procs import BARRIER, Children

pytestmark = pytest.mark.slow

N_ACCESSORS = 8
N_CLEANERS = 2
ITEMS_PER_DATASET = 12
MAX_ROUNDS = 10_000_000  # belt and braces: every child loop is bounded by count and deadline

# argv: seconds, seed, uri...
ACCESSOR = BARRIER + """
import collections, hashlib, json, random, time
import dtoolcore
import dtool_cache_manager as dcm
seconds, seed, uris = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
rng = random.Random(seed)
datasets = [dtoolcore.DataSet.from_uri(uri) for uri in uris]
ids = [sorted(ds.identifiers) for ds in datasets]
counts = collections.Counter()
bad = []
barrier()
deadline = time.monotonic() + seconds
rounds = 0
while time.monotonic() < deadline and rounds < %(max_rounds)d:
    rounds += 1
    k = rng.randrange(len(datasets))
    ds, ident = datasets[k], rng.choice(ids[k])
    with dcm.hold_scope():
        props = ds.item_properties(ident)  # what the manifest says at this moment
        try:
            path = ds.item_content_abspath(ident)
            with open(path, "rb") as fh:
                data = fh.read()
        except FileNotFoundError as exc:
            bad.append([uris[k], ident, "missing: %%r" %% exc])
        except Exception as exc:  # a failed access is a bad access too; say which
            bad.append([uris[k], ident, "failed: %%r" %% exc])
        else:
            if len(data) != props["size_in_bytes"]:
                bad.append([uris[k], ident, "size %%d, manifest %%d"
                            %% (len(data), props["size_in_bytes"])])
            elif hashlib.md5(data).hexdigest() != props["hash"]:
                bad.append([uris[k], ident, "md5 differs from the manifest"])
    counts[ds.uri + " " + ident] += 1
print(json.dumps({"accesses": sum(counts.values()), "bad": len(bad), "examples": bad[:5],
                  "counts": counts}))
""" % {"max_rounds": MAX_ROUNDS}

# argv: seconds, retain size
CLEANER = BARRIER + """
import json, subprocess, time
seconds, retain = float(sys.argv[1]), sys.argv[2]
errors = []
passes = removed = freed = in_use = 0
barrier()
deadline = time.monotonic() + seconds
while time.monotonic() < deadline and passes < %(max_rounds)d:
    passes += 1
    done = subprocess.run(["dtool-cache", "clean", "--retain-size", retain, "--yes", "--json"],
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or done.stderr.strip():
        errors.append([done.returncode, done.stderr[-2000:]])
    if done.returncode == 0:
        result = json.loads(done.stdout)
        removed += len(result["removed"])
        freed += result["freed_bytes"]
        in_use += len(result["skipped_in_use"])
print(json.dumps({"passes": passes, "removed": removed, "freed": freed, "in_use": in_use,
                  "errors": errors[:3], "num_errors": len(errors)}))
""" % {"max_rounds": MAX_ROUNDS}


def _disk_files(cache_dir):
    return disk_files(cache_dir, partials=False)


def _finish(children, timeout):
    """Wait for every child; each must succeed with nothing on stderr (no warning, no
    traceback).  Returns their stdouts."""
    outputs = []
    for proc in children.procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0 and not err.strip(), (proc.pid, proc.returncode, err)
        outputs.append(out)
    return outputs


def run_together(accessors, cleaners, seconds):
    """Start both groups at once; (accessors' reports, cleaners' reports, seconds taken)."""
    try:
        for group in (accessors, cleaners):
            group.wait_ready()
        started = time.monotonic()
        for group in (accessors, cleaners):
            group.go()
        access_out = [json.loads(out) for out in _finish(accessors, seconds + 300)]
        clean_out = [json.loads(out) for out in _finish(cleaners, seconds + 300)]
        return access_out, clean_out, time.monotonic() - started
    finally:
        accessors.kill_all()
        cleaners.kill_all()


def test_accessors_and_cli_cleaners_under_sustained_contention(http_dataset, cache_dir,
                                                               make_env):
    seconds = float(os.environ.get("DCM_STRESS_SECONDS", "60"))
    seed = int(os.environ.get("DCM_FAULT_SEED") or random.randrange(1 << 30))
    print(f"seed={seed}")
    rng = random.Random(seed)
    datasets = []
    for _ in range(2):
        items = {f"item{i:02d}.bin": rng.randbytes(rng.randint(20 * 1024, 200 * 1024))
                 for i in range(ITEMS_PER_DATASET)}
        datasets.append((http_dataset(items), items))
    total_bytes = sum(len(c) for _, items in datasets for c in items.values())
    retain = total_bytes // 4
    n_items = sum(len(items) for _, items in datasets)
    uris = [ds.uri for ds, _ in datasets]

    env = make_env(cache_dir)
    accessors = Children(ACCESSOR, [(seconds, rng.randrange(1 << 30), *uris)
                                    for _ in range(N_ACCESSORS)], env)
    cleaners = Children(CLEANER, [(seconds, f"{retain}B")] * N_CLEANERS, env)
    access_out, clean_out, elapsed = run_together(accessors, cleaners, seconds)

    accesses = sum(o["accesses"] for o in access_out)
    passes = sum(o["passes"] for o in clean_out)
    removed = sum(o["removed"] for o in clean_out)
    gets = sum(ds.get_count(relpath) for ds, items in datasets for relpath in items)
    figures = (f"stress: seed={seed} {N_ACCESSORS} accessors, {N_CLEANERS} CLI cleaners, "
               f"{elapsed:.1f}s: {accesses} accesses ({accesses / elapsed:.0f}/s), "
               f"{passes} clean passes ({passes / elapsed * 60:.0f}/min), {removed} files "
               f"removed ({sum(o['freed'] for o in clean_out)} bytes), "
               f"{sum(o['in_use'] for o in clean_out)} kept as in use, {gets} item GETs for "
               f"{n_items} items, retain {retain} of {total_bytes} bytes")
    print(figures)

    bad = [o["examples"] for o in access_out if o["bad"]]
    assert sum(o["bad"] for o in access_out) == 0, f"{figures}\nbad accesses: {bad}"
    errors = [o["errors"] for o in clean_out if o["num_errors"]]
    assert sum(o["num_errors"] for o in clean_out) == 0, f"{figures}\nclean errors: {errors}"
    assert all(o["accesses"] > 0 for o in access_out), figures
    assert all(o["passes"] > 0 for o in clean_out), figures
    # Evictions really happened, and evicted items were fetched again.
    assert removed > 0, figures
    assert gets > n_items, figures

    paths = Bookkeeping(cache_dir)
    with dcm.open_ledger(str(cache_dir)) as ledger:
        usage = ledger.conn.execute(
            "SELECT uri, identifier, sum(hits + misses), sum(misses) FROM usage "
            "GROUP BY uri, identifier").fetchall()
    inv = report.inventory(str(cache_dir))
    conn = sqlite3.connect(f"file:{paths.ledger}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], figures
        rows = dict(conn.execute("SELECT relpath, size_bytes FROM items"))
    finally:
        conn.close()

    # The ledger agrees with the disk exactly: same files, same sizes, nothing untracked,
    # no download left half done.
    disk = _disk_files(cache_dir)
    assert rows == disk, f"{figures}\nledger rows {rows}\ndisk {disk}"
    assert sorted(i.relpath for i in inv.items) == sorted(disk), figures
    assert [i.relpath for i in inv.items if i.row is None] == [], figures
    assert inv.partials == (), figures
    expected_sizes = {os.path.relpath(ds.cache_path(cache_dir, relpath), cache_dir): len(c)
                      for ds, items in datasets for relpath, c in items.items()}
    for relpath, size in disk.items():
        assert expected_sizes.get(relpath) == size, (figures, relpath, size)

    # Nobody was killed, so every access was counted exactly once, and every GET of an item
    # was a recorded miss (single flight: a hit never downloads).
    done = {}
    for o in access_out:
        for key, n in o["counts"].items():
            done[key] = done.get(key, 0) + n
    counted = {f"{uri} {ident}": total for uri, ident, total, _ in usage}
    assert counted == done, f"{figures}\nledger {counted}\nchildren {done}"
    misses = sum(m for _, _, _, m in usage)
    assert misses == gets, f"{figures}: {misses} misses recorded, {gets} item GETs served"

    # All children exited: nothing is held and every journal was folded in.
    assert holds_now(cache_dir).empty, figures
    for ds, items in datasets:
        for relpath in items:
            assert dcm.cache_item_lock_counter(ds.uri, ds.identifiers[relpath],
                                               cache_dir=str(cache_dir)) == 0, figures
    assert os.listdir(paths.journal_dir) == [], figures
