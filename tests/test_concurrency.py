"""Exact counts, crash-proof holds, safe removal and single-flight fetches, with real
processes against a real HTTP broker on loopback."""

import datetime
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import dtool_cache_manager as dcm
from dtool_cache_manager import planning
from dtool_cache_manager.policies import Rules
from support.datasets import file_md5_hex
from support.users import HoldingChild
from support.procs import BARRIER, Children

pytestmark = pytest.mark.slow

ACCESS_LOOP = BARRIER + """
import dtoolcore
uri, n = sys.argv[1], int(sys.argv[2])
ds = dtoolcore.DataSet.from_uri(uri)
ids = sorted(ds.identifiers)
barrier()
for j in range(n):
    ds.item_content_abspath(ids[j % len(ids)])
"""


def test_eight_processes_count_exactly(http_dataset, cache_dir, make_env):
    items = {f"item{i:02d}.txt": f"content {i}\n".encode() * 50 for i in range(20)}
    ds = http_dataset(items)
    kids = Children(ACCESS_LOOP, [(ds.uri, 500)] * 8, make_env(cache_dir))
    kids.wait_ready().go().finish()
    with dcm.open_ledger(str(cache_dir)) as ledger:
        for relpath, ident in ds.identifiers.items():
            (row,) = ledger.items_for(ds.uri, ident)
            assert row.access_count == 8 * 500 // 20 == 200, relpath
            assert row.misses == 1, relpath  # single flight: downloaded once in all
            assert ds.get_count(relpath) == 1
    assert dcm.num_times_accessed(ds.uri, ds.identifiers["item07.txt"]) == 200
    # Every process folded its journal in at exit; nothing is left over.
    assert os.listdir(cache_dir / ".dtool-cache-manager" / "journal") == []


def test_sigkill_releases_holds_at_once(http_dataset, cache_dir, make_env):
    ds = http_dataset({"x.txt": b"x" * 100})
    ident = ds.identifiers["x.txt"]
    holder = HoldingChild(None, ds.uri, [ident], make_env(cache_dir))
    assert dcm.cache_item_lock_counter(ds.uri, ident) == 1
    holder.proc.send_signal(signal.SIGKILL)
    holder.proc.wait()
    assert dcm.cache_item_lock_counter(ds.uri, ident) == 0
    # The dead process's holds file was reaped by that very check.
    assert os.listdir(cache_dir / ".dtool-cache-manager" / "holds") == []


def test_live_holder_blocks_removal(http_dataset, cache_dir, make_env):
    ds = http_dataset({"x.txt": b"x" * 100})
    ident = ds.identifiers["x.txt"]
    with HoldingChild(None, ds.uri, [ident], make_env(cache_dir)) as holder:
        (path,) = holder.paths
        assert dcm.remove_cache_item_safely(ds.uri, ident) is False
        assert os.path.isfile(path)
        holder.finish()
    assert dcm.cache_item_lock_counter(ds.uri, ident) == 0
    last = dcm.last_time_accessed(ds.uri, ident)
    assert dcm.remove_cache_item_safely(ds.uri, ident) is True
    assert not os.path.exists(path)
    # The item's history outlives its file, as in `dtool cache audit --by item`; its last
    # access is then known to the hour, and never later than the removal.
    assert dcm.num_times_accessed(ds.uri, ident) == 1
    after = dcm.last_time_accessed(ds.uri, ident)
    assert last <= after <= last + datetime.timedelta(hours=1)
    assert after.timestamp() <= time.time()
    audit = subprocess.run(["dtool-cache", "audit", "--by", "item", "-f", "json"],
                           env=make_env(cache_dir), capture_output=True, text=True, check=True)
    (row,) = json.loads(audit.stdout)["rows"]
    assert (row["accesses"], row["item_relpath"]) == (1, None)


def test_two_holders_are_counted(http_dataset, cache_dir, make_env):
    ds = http_dataset({"x.txt": b"x" * 100})
    ident = ds.identifiers["x.txt"]
    holders = [HoldingChild(None, ds.uri, [ident], make_env(cache_dir)) for _ in range(2)]
    assert dcm.cache_item_lock_counter(ds.uri, ident) == 2
    holders[0].finish()
    assert dcm.cache_item_lock_counter(ds.uri, ident) == 1
    holders[1].kill()
    assert dcm.cache_item_lock_counter(ds.uri, ident) == 0


def test_hold_scope_and_release_in_process(http_dataset, cache_dir):
    import dtoolcore

    ds = http_dataset({"a.txt": b"a" * 10, "b.txt": b"b" * 10})
    a, b = ds.identifiers["a.txt"], ds.identifiers["b.txt"]
    dataset = dtoolcore.DataSet.from_uri(ds.uri)
    with dcm.hold_scope():
        dataset.item_content_abspath(a)
        assert dcm.cache_item_lock_counter(ds.uri, a) == 1
    assert dcm.cache_item_lock_counter(ds.uri, a) == 0
    dataset.item_content_abspath(b)  # outside a scope: held until exit or release
    assert dcm.cache_item_lock_counter(ds.uri, b) == 1
    assert dcm.remove_cache_item_safely(ds.uri, b) is False
    assert dcm.release(ds.uri, b) == 1
    assert dcm.remove_cache_item_safely(ds.uri, b) is True
    assert dcm.remove_cache_item_safely(ds.uri, a) is True


ACCESS_AND_CHECK = BARRIER + """
import hashlib, json, dtoolcore, dtool_cache_manager as dcm
uri, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
expected = json.loads(sys.argv[4])
import random
rng = random.Random(seed)
ds = dtoolcore.DataSet.from_uri(uri)
bad = 0
barrier()
for _ in range(n):
    ident = rng.choice(sorted(expected))
    with dcm.hold_scope():
        path = ds.item_content_abspath(ident)
        try:
            with open(path, "rb") as fh:
                if hashlib.md5(fh.read()).hexdigest() != expected[ident]:
                    bad += 1
        except FileNotFoundError:
            bad += 1
print(bad)
"""

REMOVE_LOOP = BARRIER + """
import json, random, dtool_cache_manager as dcm
uri, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = sorted(json.loads(sys.argv[4]))
rng = random.Random(seed)
barrier()
print(sum(dcm.remove_cache_item_safely(uri, rng.choice(ids)) for _ in range(n)))
"""


def test_removals_race_accesses_without_harm(http_dataset, cache_dir, make_env):
    items = {f"r{i}.bin": os.urandom(20000 + i) for i in range(4)}
    ds = http_dataset(items)
    import json

    expected = json.dumps(ds.md5)
    seed = random.randrange(1 << 30)
    print("seed", seed)
    env = make_env(cache_dir)
    accessors = Children(ACCESS_AND_CHECK,
                         [(ds.uri, 150, seed + k, expected) for k in range(4)], env)
    removers = Children(REMOVE_LOOP, [(ds.uri, 150, seed + 10 + k, expected) for k in range(2)],
                        env)
    for group in (accessors, removers):
        group.wait_ready()
    for group in (accessors, removers):
        group.go()
    bad = [int(out) for out in accessors.finish()]
    removed = [int(out) for out in removers.finish()]
    assert bad == [0, 0, 0, 0]
    print("removed", removed, "gets", [ds.get_count(r) for r in items])
    assert sum(removed) > 0  # the race really happened
    total_gets = sum(ds.get_count(relpath) for relpath in items)
    assert total_gets > len(items)  # removed items were fetched again


def test_single_flight_miss(http_dataset, http_server, cache_dir, make_env):
    content = os.urandom(32 * 1024 * 1024)
    ds = http_dataset({"big.bin": content})
    ident = ds.identifiers["big.bin"]
    http_server.slow_item_bytes_per_s = 64 * 1024 * 1024  # ~0.5 s per download
    code = BARRIER + """
import dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
barrier()
print(ds.item_content_abspath(sys.argv[2]))
"""
    kids = Children(code, [(ds.uri, ident)] * 4, make_env(cache_dir))
    paths = {out.strip() for out in kids.wait_ready().go().finish()}
    assert paths == {str(ds.cache_path(cache_dir, "big.bin"))}
    assert ds.get_count("big.bin") == 1
    assert file_md5_hex(paths.pop()) == ds.md5[ident]
    with dcm.open_ledger(str(cache_dir)) as ledger:
        (row,) = ledger.items_for(ds.uri, ident)
    assert (row.misses, row.hits) == (1, 3)


LEDGER_LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


def test_a_clean_goes_on_while_another_process_keeps_the_ledger_locked(
        http_dataset, cache_dir, make_env, caplog):
    """The ledger's side of a clean runs on a thread of its own: when it cannot write (here
    another process holds the write lock), the files are removed all the same, the failure
    is said once, and the next command drops the rows of what is gone."""
    ds = http_dataset({f"f{i}.bin": bytes([i]) * 700 for i in range(6)})
    code = ("import sys, dtoolcore\nds = dtoolcore.DataSet.from_uri(sys.argv[1])\n"
            "print('\\n'.join(ds.item_content_abspath(i) for i in sorted(ds.identifiers)))")
    paths = subprocess.run([sys.executable, "-c", code, ds.uri], env=make_env(cache_dir),
                           check=True, capture_output=True, text=True).stdout.split()
    plan = planning.plan(str(cache_dir), Rules(remove_all=True))
    assert len(plan.removals) == 6
    with dcm.open_ledger(str(cache_dir)) as ledger:
        locker = subprocess.Popen([sys.executable, "-c", LEDGER_LOCKER,
                                   ledger.cache.ledger_path],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert locker.stdout.readline() == "locked\n"
            ledger.conn.execute("PRAGMA busy_timeout = 0")  # fail at once, not in 30 s
            with caplog.at_level(logging.WARNING):
                result = plan.execute(ledger)
        finally:
            locker.stdin.close()
            locker.wait(timeout=60)
    assert sorted(o.relpath for o in result.removed) == sorted(r.relpath for r in plan.removals)
    assert not any(os.path.exists(p) for p in paths)
    said = [r for r in caplog.records if "could not update the ledger" in r.getMessage()]
    assert len(said) == 1
    summary = subprocess.run(["dtool-cache", "summary", "--json"], env=make_env(cache_dir),
                             check=True, capture_output=True, text=True)
    assert json.loads(summary.stdout)["num_items"] == 0
    with dcm.open_ledger(str(cache_dir)) as ledger:
        assert ledger.items() == []
