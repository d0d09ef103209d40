"""A cache shared by a unix group, with real users (the issue's setup).

"The setup is a group-owned cache directory with the setgid bit and group write.  Two members
(alice, bob) and a data manager (carol) are real unix users, created by the tests or switched
to with setuid/setgid; CI runs as root."  erin is not in the group: others have r-x, so she
may read the cache but not write it.

Every child runs as its user with ``umask 022`` (what most accounts have), which is exactly
the case where upstream brokers create directories nobody else in the group can write.
"""

import grp
import json
import os
import stat
import subprocess
import sys

import pytest

import dtool_cache_manager as dcm
from support import subprocess_env
from support.datasets import file_md5_hex
from support.users import (GROUP, HoldingChild, dtool_cache, dtool_fetch, make_group_cache,
                           needs_root, python_access, remove_tree, run_as, set_up_as_data_manager,
                           shared_tmp)

pytestmark = needs_root

META = ".dtool-cache-manager"


@pytest.fixture
def cache():
    """``<fresh dir 0755>/cache``, root:dcmshare, mode 2775, set up by its data manager
    (root) as the README says."""
    base = shared_tmp("dcm-group-")
    cache = make_group_cache(base)
    set_up_as_data_manager(cache)
    yield cache
    remove_tree(base)


def ok(result):
    """stdout of a child that must have succeeded without any complaint of ours."""
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Permission denied" not in result.stderr, result.stderr
    assert "dtool-cache-manager:" not in result.stderr, result.stderr  # no warning at all
    return result.stdout


def cache_files(cache):
    """relpath -> (size, owner uid) of every file outside our bookkeeping."""
    found = {}
    for root, dirs, files in os.walk(cache):
        dirs[:] = [d for d in dirs if not (root == cache and d == META)]
        for name in files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            found[os.path.relpath(path, cache)] = (st.st_size, st.st_uid)
    return found


def relpath(ds, cache, item):
    return str(ds.cache_path(cache, item).relative_to(cache))


def test_members_share_items_whoever_fetched_first(http_dataset, users, cache):
    """bob fetches first, alice adds other items of the same dataset, both hit each other's
    files, carol deletes from the directory bob's fetch made: no permission error anywhere,
    and the ledger records each access under its user."""
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    ds = http_dataset({"a.txt": b"a" * 1000, "b.txt": b"b" * 2000, "c.txt": b"c" * 3000})
    ia, ib, ic = (ds.identifiers[r] for r in ("a.txt", "b.txt", "c.txt"))
    rel = {r: relpath(ds, cache, r) for r in ("a.txt", "b.txt", "c.txt")}
    env = subprocess_env(cache)

    # bob first, through the dtool executable: the dataset directory is his.
    assert ok(dtool_fetch(bob, ds.uri, ia, env)).strip() == str(ds.cache_path(cache, "a.txt"))
    dataset_dir = os.path.dirname(ds.cache_path(cache, "a.txt"))
    assert os.stat(dataset_dir).st_uid == bob.uid
    # alice adds items of that dataset (plain python, then dtool) and hits bob's file.
    printed = ok(python_access(alice, ds.uri, [ib, ia], env)).split("\n")
    assert printed[:2] == [str(ds.cache_path(cache, "b.txt")), str(ds.cache_path(cache, "a.txt"))]
    assert ok(dtool_fetch(alice, ds.uri, ic, env)).strip() == str(ds.cache_path(cache, "c.txt"))
    # bob hits alice's file.
    assert ok(python_access(bob, ds.uri, [ib], env)).strip() == str(ds.cache_path(cache, "b.txt"))

    on_disk = cache_files(cache)
    assert on_disk == {rel["a.txt"]: (1000, bob.uid), rel["b.txt"]: (2000, alice.uid),
                       rel["c.txt"]: (3000, alice.uid)}
    for item in ("a.txt", "b.txt", "c.txt"):
        assert file_md5_hex(ds.cache_path(cache, item)) == ds.md5[ds.identifiers[item]]
    assert ds.get_count("a.txt") == ds.get_count("b.txt") == ds.get_count("c.txt") == 1

    listed = {r["path"]: r for r in json.loads(ok(dtool_cache(carol, "ls", "--json", env=env)))}
    assert set(listed) == set(rel.values())
    assert [(listed[rel[r]]["hits"], listed[rel[r]]["misses"]) for r in ("a.txt", "b.txt", "c.txt")
            ] == [(1, 1), (1, 1), (0, 1)]
    assert all(r["uri"] == ds.uri and r["tracked"] for r in listed.values())
    with dcm.open_ledger(cache) as ledger:
        users_a = ledger.users_of(rel["a.txt"])
        users_b = ledger.users_of(rel["b.txt"])
        users_c = ledger.users_of(rel["c.txt"])
    assert {u: v[:2] for u, v in users_a.items()} == {bob.at_host: (0, 1), alice.at_host: (1, 0)}
    assert {u: v[:2] for u, v in users_b.items()} == {alice.at_host: (0, 1), bob.at_host: (1, 0)}
    assert {u: v[:2] for u, v in users_c.items()} == {alice.at_host: (0, 1)}
    audit = json.loads(ok(dtool_cache(carol, "audit", "--by", "user", "--json", env=env)))
    assert {r["key"]: (r["hits"], r["misses"]) for r in audit["rows"]} == {
        alice.at_host: (1, 2), bob.at_host: (1, 1)}

    # carol deletes alice's and bob's files from bob's directory.
    cleaned = json.loads(ok(dtool_cache(carol, "clean", "--dataset", ds.uri, "--all", "--yes",
                                        "--json", env=env)))
    assert sorted(cleaned["removed"]) == sorted(rel.values())
    assert cleaned["skipped"] == [] and cleaned["skipped_in_use"] == []
    assert cleaned["freed_bytes"] == 6000
    assert cache_files(cache) == {}

    # ... and the members go on using the dataset: re-fetched into the same directory.
    assert ok(python_access(alice, ds.uri, [ia], env)).strip() == str(ds.cache_path(cache, "a.txt"))
    assert ok(dtool_fetch(bob, ds.uri, ib, env)).strip() == str(ds.cache_path(cache, "b.txt"))
    assert set(cache_files(cache)) == {rel["a.txt"], rel["b.txt"]}


HOLD_LEDGER_OPEN = """
import sys
import dtool_cache_manager as dcm
with dcm.open_ledger(sys.argv[1]) as ledger:
    print(len(ledger.items()), flush=True)
    sys.stdin.readline()
"""


def test_members_write_what_they_must_and_nothing_else(http_dataset, users, cache):
    """With umask 022: what every member must write is group-writable and in the cache's
    group (the ledger with its -wal and -shm, the lock and log files, dataset directories);
    holds/ and journal/ are sticky, so a member adds files there and removes only her own;
    each process's holds file and journal are writable by its owner only; the bookkeeping
    directory itself is the data manager's alone; items are at least group-readable."""
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    other = http_dataset({"x.txt": b"x" * 300})
    env = subprocess_env(cache)
    ok(dtool_fetch(bob, ds.uri, ds.identifiers["a.txt"], env))  # bob folds into the ledger
    ok(python_access(alice, other.uri, [other.identifiers["x.txt"]], env))
    with HoldingChild(alice, ds.uri, [ds.identifiers["b.txt"]], env) as holder:
        # carol keeps the ledger open while we look.
        reader = subprocess.Popen([sys.executable, "-c", HOLD_LEDGER_OPEN, cache],
                                  env=carol.env(env), preexec_fn=carol.preexec(), cwd=carol.home,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            assert reader.stdout.readline().strip() == "3", reader.stderr.read()
            modes = _walk_modes(cache)
        finally:
            _, err = reader.communicate("go\n", timeout=60)
        assert reader.returncode == 0, err
        holder.finish()

    gid = grp.getgrnam(GROUP).gr_gid
    meta = os.path.join(cache, META)
    shared_files = ["ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm", "gate.lock",
                    "fetch.lock", "autoclean.lock", "autoclean.log"]
    for name in shared_files + ["holds", "journal"]:
        assert os.path.join(meta, name) in modes, (name, sorted(modes))
    per_process = [p for p in modes if os.path.dirname(p) in (
        os.path.join(meta, "holds"), os.path.join(meta, "journal"))]
    assert per_process  # alice's holds file and journal, while she held b.txt

    bad = []
    for path, (mode, owner_gid, kind) in sorted(modes.items()):
        if path == meta:
            want, what = (0o2755, 0o7777), "bookkeeping directory: setgid, owner-writable only"
        elif path in (os.path.join(meta, "holds"), os.path.join(meta, "journal")):
            want, what = (0o3775, 0o7777), "sticky, setgid, group-rwx"
        elif path in [os.path.join(meta, n) for n in shared_files]:
            want, what = (0o660, 0o660), "group-rw"
        elif path in per_process:
            want, what = (0o644, 0o7777), "writable by its owner only"
        elif kind == "dir":
            want, what = (0o2070, 0o2070), "dataset directory: group-rwx + setgid"
        else:
            want, what = (0o040, 0o040), "item file: group-readable"
        if mode & want[1] != want[0]:
            bad.append((path, oct(mode), what))
        if owner_gid != gid:
            bad.append((path, owner_gid, f"not in group {GROUP}"))
    assert bad == []
    assert os.stat(cache).st_mode & 0o7777 == 0o3775  # made sticky by the data manager
    # The brokers' dataset directories were made by our host before the miss.
    for d in (ds, other):
        dataset_dir = os.path.dirname(d.cache_path(cache, next(iter(d.identifiers))))
        assert modes[dataset_dir][2] == "dir"


def test_a_members_bookkeeping_is_refused_by_others_until_root_adopts_it(http_dataset,
                                                                         users):
    """A sticky cache set up without its data manager: bob's first access makes the
    bookkeeping and the ledger, so they are his.  alice's accesses are still tracked and
    held, but her commands, which would trust a ledger bob controls, refuse in one line
    saying what to do, and so does her clean; root's first command gives the bookkeeping
    to the cache's owner, and everything works for all."""
    alice, bob = users["alice"], users["bob"]
    base = shared_tmp("dcm-group-")
    try:
        cache = make_group_cache(base)
        os.chmod(cache, 0o3775)
        ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
        env = subprocess_env(cache)
        ok(dtool_fetch(bob, ds.uri, ds.identifiers["a.txt"], env))
        assert os.stat(os.path.join(cache, META)).st_uid == bob.uid
        assert os.stat(os.path.join(cache, META, "ledger.sqlite3")).st_uid == bob.uid
        result = dtool_fetch(alice, ds.uri, ds.identifiers["b.txt"], env)
        assert result.returncode == 0, result.stderr
        for args in (("summary",), ("clean", "--all", "--yes")):
            refused = dtool_cache(alice, *args, env=env)
            assert refused.returncode == 1 and "Traceback" not in refused.stderr
            (line,) = refused.stderr.strip().splitlines()
            assert line.startswith("Error: ") and "dtool cache" in line, line
        assert len(cache_files(cache)) == 2

        ok(dtool_cache(None, "summary", env=env))  # root adopts
        assert os.stat(os.path.join(cache, META)).st_uid == 0
        assert os.stat(cache).st_mode & stat.S_ISVTX
        summary = json.loads(ok(dtool_cache(alice, "summary", "--json", env=env)))
        assert (summary["num_items"], summary["num_untracked"]) == (2, 0)
        audit = json.loads(ok(dtool_cache(alice, "audit", "--json", env=env)))
        assert {r["key"] for r in audit["rows"]} == {alice.at_host, bob.at_host}
    finally:
        remove_tree(base)


def _walk_modes(cache):
    """path -> (mode, gid, 'dir'|'file') of everything under ``cache`` (not the cache itself)."""
    found = {}
    for root, dirs, files in os.walk(cache):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            found[path] = (stat.S_IMODE(st.st_mode), st.st_gid,
                           "dir" if stat.S_ISDIR(st.st_mode) else "file")
    return found


def test_data_manager_clean_all_keeps_what_alice_holds(http_dataset, users, cache):
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200, "c.txt": b"c" * 300})
    rel = {r: relpath(ds, cache, r) for r in ds.identifiers}
    env = subprocess_env(cache)
    ok(python_access(bob, ds.uri, list(ds.identifiers.values()), env))
    with HoldingChild(alice, ds.uri, [ds.identifiers["b.txt"]], env) as holder:
        assert holder.paths == [str(ds.cache_path(cache, "b.txt"))]
        text = ok(dtool_cache(carol, "clean", "--all", "--yes", "--dry-run", env=env))
        result = json.loads(ok(dtool_cache(carol, "clean", "--all", "--yes", "--json", env=env)))
        assert sorted(result["removed"]) == sorted([rel["a.txt"], rel["c.txt"]])
        assert result["skipped_in_use"] == [
            {"path": rel["b.txt"], "holders": [{"user": alice.at_host, "pid": holder.pid}]}]
        assert result["skipped"] == []
        assert f"in use by {alice.at_host} (pid {holder.pid})" in text
        assert set(cache_files(cache)) == {rel["b.txt"]}
        # alice can still read her item, and carol's summary names her.
        assert file_md5_hex(holder.paths[0]) == ds.md5[ds.identifiers["b.txt"]]
        summary = json.loads(ok(dtool_cache(carol, "summary", "--json", env=env)))
        assert [(h["user"], h["pid"], h["num_items"]) for h in summary["in_use_by"]] == [
            (alice.at_host, holder.pid, 1)]
        holder.finish()
    # Once alice's process has gone, nothing holds the item any more.
    again = json.loads(ok(dtool_cache(carol, "clean", "--all", "--yes", "--json", env=env)))
    assert again["removed"] == [rel["b.txt"]] and again["skipped_in_use"] == []
    assert cache_files(cache) == {}


ERIN_READS = """
import hashlib, sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
path = ds.item_content_abspath(sys.argv[2])
with open(path, "rb") as fh:
    print(path, hashlib.md5(fh.read()).hexdigest())
"""


def test_reader_outside_the_group_reads_and_reports(http_dataset, users, cache):
    """erin may read the cache but not write it: reports work and agree with root's, cached
    items can be read with a clear warning that her use is not recorded, and nothing
    crashes."""
    alice, bob, erin = users["alice"], users["bob"], users["erin"]
    ds = http_dataset({"a.txt": b"a" * 1000, "b.txt": b"b" * 2000})
    ia, ib = ds.identifiers["a.txt"], ds.identifiers["b.txt"]
    env = subprocess_env(cache)
    ok(dtool_fetch(bob, ds.uri, ia, env))
    ok(python_access(bob, ds.uri, [ib], env))
    with HoldingChild(alice, ds.uri, [ia], env) as holder:
        views = {}
        for who in (erin, None, erin):  # erin before root folds the journals, and after
            for args in (("summary", "--json"), ("ls", "--json"), ("audit", "--json"),
                         ("audit", "--by", "item", "--json")):
                result = dtool_cache(who, *args, env=env)
                assert result.returncode == 0, result.stderr
                assert "Traceback" not in result.stderr, result.stderr
                views.setdefault(args, []).append(json.loads(result.stdout))
            for args in (("summary",), ("ls",), ("audit",)):  # the human tables too
                result = dtool_cache(who, *args, env=env)
                assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        for args, (erin_before, root, erin_after) in views.items():
            assert erin_before == root == erin_after, args
        summary = views[("summary", "--json")][0]
        assert (summary["num_items"], summary["total_size_bytes"], summary["num_in_use"]) == (
            2, 3000, 1)
        assert summary["in_use_by"][0]["user"] == alice.at_host
        assert len(views[("ls", "--json")][0]) == 2
        assert views[("audit", "--json")][0]["total"]["accesses"] == 3

        # erin reads a cached item: through python, and through the dtool executable.
        result = run_as(erin, [sys.executable, "-c", ERIN_READS, ds.uri, ia], env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == [str(ds.cache_path(cache, "a.txt")), ds.md5[ia]]
        assert "cannot record usage in" in result.stderr
        assert "Traceback" not in result.stderr
        fetched = dtool_fetch(erin, ds.uri, ib, env)
        assert fetched.returncode == 0, fetched.stderr
        assert fetched.stdout.strip() == str(ds.cache_path(cache, "b.txt"))
        assert "cannot record usage in" in fetched.stderr
        assert "Traceback" not in fetched.stderr

        # erin cannot clean: refused in one line, nothing removed.
        refused = dtool_cache(erin, "clean", "--all", "--yes", env=env)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr
        assert len(cache_files(cache)) == 2
        holder.finish()
    # Her reads were not recorded (she cannot write), everyone else's were.
    assert dcm.num_times_accessed(ds.uri, ia, cache_dir=cache) == 2
    assert dcm.num_times_accessed(ds.uri, ib, cache_dir=cache) == 1


def test_a_miss_the_reader_may_not_write_fails_with_the_brokers_error_alone(http_dataset,
                                                                            users, cache):
    """erin may not write the cache, so the broker cannot store what she misses: she gets the
    broker's own error as upstream raises it, not chained to one of ours (no "During
    handling of the above exception"), and her use is not recorded."""
    erin = users["erin"]
    ds = http_dataset({"c.txt": b"c" * 500})
    env = subprocess_env(cache)
    result = python_access(erin, ds.uri, [ds.identifiers["c.txt"]], env)
    assert result.returncode != 0
    assert result.stderr.splitlines()[-1].startswith("PermissionError"), result.stderr
    assert "During handling of the above exception" not in result.stderr, result.stderr
    assert "fetch.lock" not in result.stderr, result.stderr
    assert cache_files(cache) == {}
