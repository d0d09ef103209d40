"""The disk index stays exact: 20,000 items built as ``benchmarks/scale.py`` builds a million.

Speed is the benchmark's business; here every figure the fast paths report (summary from
per-directory totals, ``ls`` from the last-access index, LRU cleaning from the last-use
index) is compared with an independent walk of the disk and with the general path that
builds every item's view, before and after files appear, vanish and are replaced behind
our back.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dtool_cache_manager import planning, report

from dtool_cache_manager.store import diskindex
from dtool_cache_manager.store.ledger import Ledger
from dtool_cache_manager import cachefs
from dtool_cache_manager.policies import Rules
from support import VENV_BIN, disk_files

N_ITEMS, N_DIRS = 20_000, 40
_SCALE = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "scale.py")


def _scale_module():
    spec = importlib.util.spec_from_file_location("scale_benchmark", _SCALE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


SCALE = _scale_module()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("scale") / "cache")
    items = SCALE.build_cache(cache, N_ITEMS, N_DIRS, untracked_share=0.1)
    return cache, {i.relpath: i for i in items}


def cli(cache, *args):
    env = dict(os.environ, DTOOL_CACHE_DIRECTORY=cache)
    proc = subprocess.run([os.path.join(VENV_BIN, "dtool-cache"), *args, "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_summary_matches_disk(cache, built_items):
    disk = disk_files(cache, partials=False)
    partial = {r: s for r, s in disk_files(cache).items() if r not in disk}
    before = time.time()
    summary = cli(cache, "summary")
    after = time.time()
    assert summary["total_size_bytes"] == sum(disk.values()) + sum(partial.values())
    du_total, not_files = SCALE.files_apparent_size(cache)
    assert summary["total_size_bytes"] == du_total - not_files
    assert summary["num_items"] == len(disk)
    assert summary["num_partial"] == len(partial)
    tracked = {r for r in disk if built_items.get(r) and built_items[r].last_access}
    assert summary["num_untracked"] == len(disk) - len(tracked)
    assert summary["untracked_size_bytes"] == sum(s for r, s in disk.items() if r not in tracked)
    assert sum(summary["age_distribution"].values()) == len(disk)
    assert summary["age_distribution"]["never tracked"] == len(disk) - len(tracked)
    # Accessed within the last day, week, month: counted from the index alone, exactly
    # (between the counts as of just before and just after the command).
    accessed = [built_items[r].last_access for r in tracked]
    reported = 0
    for name, limit in report.AGE_BUCKETS:
        reported += summary["age_distribution"][name]
        assert sum(t >= after - limit for t in accessed) <= reported <= \
            sum(t >= before - limit for t in accessed), name
    by_dir = {}
    for relpath, size in disk.items():
        by_dir.setdefault(os.path.dirname(relpath), []).append(size)
    assert sorted((d["num_items"], d["size_bytes"]) for d in summary["datasets"]) == \
        sorted((len(sizes), sum(sizes)) for sizes in by_dir.values())
    inv = report.inventory(cache)  # the general path agrees too
    assert inv.total_size_bytes == summary["total_size_bytes"]
    assert sorted(i.relpath for i in inv.items) == sorted(disk)
    return summary


def refresh_count(cache):
    with cachefs.open_cache(cache) as handle:
        assert os.path.isfile(handle.ledger_path), "the commands must use a real ledger"
        with Ledger(handle) as ledger:
            return diskindex.refresh(ledger.conn, handle)


def test_summary_ls_and_clean_are_exact_at_20k_items(built):
    cache, items = built
    assert_summary_matches_disk(cache, items)
    again = refresh_count(cache)
    assert (again.rescanned_dirs, again.stat_calls) == (0, 0), "a cache at rest: no rescan"

    # Behind our back: files appear, vanish, are replaced; a dataset goes, another comes.
    dirs = sorted({os.path.dirname(r) for r in items})
    added = os.path.join(cache, dirs[0], "f" * 40 + ".new")
    with open(added, "wb") as fh:
        fh.write(b"n" * 777)
    removed = sorted(r for r in items if r.startswith(dirs[1] + "/"))[:5]
    for relpath in removed:
        os.unlink(os.path.join(cache, relpath))
    replaced = sorted(r for r in items if r.startswith(dirs[2] + "/"))[0]
    tmp = os.path.join(cache, dirs[2], "upload.part")
    with open(tmp, "wb") as fh:
        fh.write(b"r" * 5000)
    os.rename(tmp, os.path.join(cache, replaced))
    shutil.rmtree(os.path.join(cache, dirs[3]))
    os.makedirs(os.path.join(cache, "http", "new-dataset"))
    with open(os.path.join(cache, "http", "new-dataset", "a" * 40 + ".txt"), "wb") as fh:
        fh.write(b"x" * 1234)
    os.symlink("/etc/passwd", os.path.join(cache, dirs[4], "b" * 40 + ".lnk"))
    with open(os.path.join(cache, dirs[5], "c" * 40 + ".dat.tmp"), "wb") as fh:
        fh.write(b"p" * 99)
    for relpath in [r for r in items if r.startswith(dirs[3] + "/")] + removed:
        del items[relpath]

    changed = refresh_count(cache)
    # dirs 0, 1, 2, 4, 5, the 'http' parent (one dataset gone, one new) and the new dataset
    assert changed.rescanned_dirs == 7, changed
    assert changed.stat_calls == 4  # the new file, the replaced one, the partial, the new dataset's
    summary = assert_summary_matches_disk(cache, items)
    assert summary["num_datasets"] == N_DIRS  # one gone, one new
    with cachefs.open_cache(cache) as handle, Ledger(handle) as ledger:
        rows = {row.relpath for row in ledger.items()}
    assert not rows.intersection(removed) and replaced in rows  # same path: same item
    assert not any(r.startswith(dirs[3] + "/") for r in rows), "vanished rows reconciled"

    # ls: the most recently used, from the index, equal to a sort of everything.
    listed = cli(cache, "ls", "--sort", "accessed", "--limit", "100")
    newest = sorted((i for i in items.values() if i.last_access),
                    key=lambda i: (i.last_access, i.relpath), reverse=True)[:100]
    assert [i["path"] for i in listed] == [i.relpath for i in newest]
    oldest = cli(cache, "ls", "--sort", "accessed:asc", "--limit", "50")
    untracked = sorted(r for r in disk_files(cache, partials=False)
                       if not (items.get(r) and items[r].last_access))
    assert [i["path"] for i in oldest] == untracked[:50]

    # The fast plan (index order, read only as far as needed) equals the general one.
    now = time.time()
    total = summary["total_size_bytes"] - summary["partial_size_bytes"]
    for rules in (Rules(retain_size_bytes=int(total * 0.9)),
                  Rules(retain_size_bytes=0),
                  Rules(older_than_seconds=30 * 86400),
                  Rules(older_than_seconds=20 * 86400, exclude_frequently_accessed=1,
                        retain_size_bytes=int(total * 0.95)),
                  Rules(remove_all=True)):
        fast = planning.plan(cache, rules, now=now)
        general = planning.plan_clean(report.inventory(cache), rules, now=now)
        assert fast.removals == general.removals, rules
        assert fast.expected_freed_bytes == general.expected_freed_bytes

    lru_first = [r.relpath for r in planning.plan(cache, Rules(retain_size_bytes=0)).removals]
    cleaned = cli(cache, "clean", "--retain-size", str(int(total * 0.9)), "--yes")
    # Complete files in LRU order, then the partial download nobody is fetching.
    files = [r for r in cleaned["removed"] if not r.endswith(".tmp")]
    assert files == lru_first[:len(files)]
    assert [r for r in cleaned["removed"] if r.endswith(".tmp")] == [
        os.path.join(dirs[5], "c" * 40 + ".dat.tmp")]
    for relpath in cleaned["removed"]:
        items.pop(relpath, None)
    after = assert_summary_matches_disk(cache, items)
    assert after["total_size_bytes"] - after["partial_size_bytes"] <= int(total * 0.9)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Half the files tracked, half left by dtool before the plugin came (up to 60 days old)."""
    cache = str(tmp_path_factory.mktemp("mixed") / "cache")
    items = SCALE.build_cache(cache, 2 * N_ITEMS, 2 * N_DIRS, untracked_share=0.5, seed=2,
                              untracked_age_days=60)
    return cache, {i.relpath: i for i in items}


def last_use_on_disk(cache, items):
    """relpath -> when each file on disk was last used, from the build and lstat alone: its
    last journalled access, else the later of its mtime and atime."""
    found = {}
    for relpath in disk_files(cache, partials=False):
        built = items.get(relpath)
        if built is not None and built.last_access:
            found[relpath] = built.last_access
        else:
            st = os.lstat(os.path.join(cache, relpath))
            found[relpath] = max(st.st_mtime, st.st_atime)
    return found


def assert_listing_and_plans_match_disk(cache, items):
    disk = disk_files(cache, partials=False)
    listed = cli(cache, "ls")
    assert {i["path"]: i["size_bytes"] for i in listed} == disk
    assert {i["path"] for i in listed if i["tracked"]} == \
        {r for r in disk if items[r].last_access}
    newest = sorted((r for r in disk if items[r].last_access),
                    key=lambda r: (items[r].last_access, r), reverse=True)[:100]
    assert [i["path"] for i in cli(cache, "ls", "--sort", "accessed", "--limit", "100")] \
        == newest
    never = sorted(r for r in disk if not items[r].last_access)
    assert [i["path"] for i in cli(cache, "ls", "--sort", "accessed:asc", "--limit", "100")] \
        == never[:100]

    used = last_use_on_disk(cache, items)
    now = time.time()
    month = 30 * 86400
    older = planning.plan(cache, Rules(older_than_seconds=month), now=now)
    assert {r.relpath for r in older.removals} == {r for r, t in used.items() if now - t >= month}
    assert older.expected_freed_bytes == sum(disk[r.relpath] for r in older.removals)
    # Least recently used first, until half the bytes are left: tracked and untracked alike.
    total = sum(disk.values())
    lru = sorted(used, key=lambda r: (used[r], -disk[r], r))
    expected, left = [], total
    for relpath in lru:
        if left <= total // 2:
            break
        expected.append(relpath)
        left -= disk[relpath]
    half = planning.plan(cache, Rules(retain_size_bytes=total // 2), now=now)
    assert [r.relpath for r in half.removals] == expected
    for rules in (Rules(older_than_seconds=month), Rules(retain_size_bytes=total // 2)):
        general = planning.plan_clean(report.inventory(cache), rules, now=now)
        assert planning.plan(cache, rules, now=now).removals == general.removals
    return used


def test_untracked_and_tracked_alike_agree_with_the_disk_before_and_after_a_clean(mixed):
    cache, items = mixed
    tracked = sum(1 for i in items.values() if i.last_access)
    assert min(tracked, len(items) - tracked) > 0.45 * len(items)
    assert_summary_matches_disk(cache, items)
    used = assert_listing_and_plans_match_disk(cache, items)

    month = 30 * 86400
    before = time.time()
    cleaned = cli(cache, "clean", "--older-than", "30d", "--yes")
    after = time.time()
    removed = set(cleaned["removed"])
    surely = {r for r, t in used.items() if t <= before - month}
    maybe = {r for r, t in used.items() if t <= after - month}
    assert surely <= removed <= maybe and len(removed) > 0.2 * len(items)
    assert any(not items[r].last_access for r in removed) and \
        any(items[r].last_access for r in removed), "both kinds are cleaned"
    assert not removed & set(disk_files(cache)), "removed from the disk"
    for relpath in removed:
        del items[relpath]

    # The clean took its removals off the index: the next command lists each directory it
    # changed once to confirm it, and rescans none.
    again = refresh_count(cache)
    assert (again.rescanned_dirs, again.stat_calls) == (0, 0), again
    summary = assert_summary_matches_disk(cache, items)
    assert summary["num_items"] == len(disk_files(cache, partials=False)) == len(items)
    assert_listing_and_plans_match_disk(cache, items)
