"""`dtool cache ...` end to end: the real dtool executable in subprocesses, against real
http and s3 datasets on loopback.  Every figure is checked against what the test computes
itself from the disk and its own count of accesses."""

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time

import dtoolcore
import pytest

import dtool_cache_manager as dcm
from support import disk_files, subprocess_env
from support.users import HoldingChild

DAY = 86400


def dtool_cache(*args, env, check=True):
    result = subprocess.run(["dtool", "cache", *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def fetch(uri, identifier, env):
    result = subprocess.run(["dtool", "item", "fetch", uri, identifier], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_hold_on_the_http_copy_leaves_the_s3_copy_of_the_same_item_free(
        http_dataset, s3_dataset, cache_dir, make_env):
    """One dataset read over http and over s3 is two cached files.  Holds name the file, so
    a process holding the http copy keeps that one alone: summary counts one item in use,
    ``ls --in-use`` lists it alone, and ``clean --all`` removes the s3 copy."""
    web = http_dataset({"a.txt": b"a" * 700})
    bucket = s3_dataset({"other.txt": b"o"})  # sets up S3; web's dataset is copied beside it
    s3_uri = dtoolcore.copy(web.local_uri, bucket.uri.rsplit("/", 1)[0])
    env = make_env(cache_dir, bucket.env)
    ident = web.identifiers["a.txt"]
    s3_path = fetch(s3_uri, ident, env)
    with HoldingChild(None, web.uri, [ident], env) as holder:
        (http_path,) = holder.paths
        assert http_path != s3_path and os.path.exists(s3_path)
        summary = json.loads(dtool_cache("summary", "--json", env=env).stdout)
        assert (summary["num_items"], summary["num_in_use"]) == (2, 1)
        in_use = json.loads(dtool_cache("ls", "--in-use", "--json", env=env).stdout)
        assert [os.path.join(cache_dir, r["path"]) for r in in_use] == [http_path]
        cleaned = json.loads(dtool_cache("clean", "--all", "--yes", "--json", env=env).stdout)
        assert [os.path.join(cache_dir, p) for p in cleaned["removed"]] == [s3_path]
        assert [os.path.join(cache_dir, s["path"])
                for s in cleaned["skipped_in_use"]] == [http_path]
        holder.finish()
    assert os.path.exists(http_path) and not os.path.exists(s3_path)


def test_one_dataset_read_over_http_and_s3_is_one_dataset_everywhere(
        http_dataset, s3_dataset, cache_dir, make_env):
    """summary, ``ls --dataset`` (by either URI or the UUID) and ``audit --by dataset``
    group by one rule, the UUID, and list both URIs; every listing names each file's item
    (its relpath in the dataset) beside the cache path."""
    web = http_dataset({"sub/run3/image.tif": b"i" * 300, "notes.txt": b"n" * 200})
    bucket = s3_dataset({"other.txt": b"o"})
    s3_uri = dtoolcore.copy(web.local_uri, bucket.uri.rsplit("/", 1)[0])
    env = make_env(cache_dir, bucket.env)
    names = {ident: relpath for relpath, ident in web.identifiers.items()}
    for uri in (web.uri, web.uri, s3_uri):
        for ident in names:
            fetch(uri, ident, env)
    fetch(s3_uri, web.identifiers["notes.txt"], env)  # http: 2 + 2; s3: 2 + 1
    summary = json.loads(dtool_cache("summary", "-f", "json", env=env).stdout)
    (dataset,) = summary["datasets"]
    assert dataset["key"] == web.uuid and dataset["uris"] == sorted([web.uri, s3_uri])
    assert (dataset["num_items"], dataset["size_bytes"]) == (4, 1000)
    text = dtool_cache("summary", env=env).stdout
    assert web.uri in text and f"+ {s3_uri}" in text and "grouped by UUID" in text

    for wanted in (web.uri, s3_uri, web.uuid):
        listed = json.loads(dtool_cache("ls", "--dataset", wanted, "-f", "json",
                                        env=env).stdout)
        assert len(listed) == 4 and {r["dataset"] for r in listed} == {web.uuid}
        assert sorted(r["item_relpath"] for r in listed) == sorted(list(names.values()) * 2)
        assert {tuple(r["uris"]) for r in listed} == {(web.uri,), (s3_uri,)}
    table = dtool_cache("ls", "--dataset", s3_uri, env=env).stdout
    assert "sub/run3/image.tif" in table and "Cached file" in table

    audit = json.loads(dtool_cache("audit", "--by", "dataset", "-f", "json", env=env).stdout)
    (row,) = audit["rows"]
    assert (row["key"], row["uris"], row["accesses"]) == (
        web.uuid, sorted([web.uri, s3_uri]), 7)
    items = json.loads(dtool_cache("audit", "--by", "item", "-f", "json", env=env).stdout)
    assert sorted((r["item_relpath"], r["accesses"]) for r in items["rows"]) == [
        ("notes.txt", 2), ("notes.txt", 2), ("sub/run3/image.tif", 1),
        ("sub/run3/image.tif", 2)]
    assert "sub/run3/image.tif" in dtool_cache("audit", "--by", "item", env=env).stdout

    plan = json.loads(dtool_cache("clean", "--all", "--dry-run", "-f", "json",
                                  env=env).stdout)
    assert sorted((i["item_relpath"], i["dataset"]) for i in plan["items"]) == sorted(
        (name, web.uuid) for name in list(names.values()) * 2)
    assert {i["path"] for i in plan["items"]} == set(plan["removed"])
    text = dtool_cache("clean", "--all", "--dry-run", env=env).stdout
    assert "sub/run3/image.tif" in text and f"{web.uri} + {s3_uri}: 4 files" in text \
        or f"{s3_uri} + {web.uri}: 4 files" in text


def test_scripted_session_figures(http_dataset, s3_dataset, cache_dir, make_env):
    web = http_dataset({"a.txt": b"a" * 1000, "b.txt": b"b" * 3000})
    bucket = s3_dataset({"c.bin": b"c" * 5000})
    env = make_env(cache_dir, bucket.env)
    plan = [(web, "a.txt", 3), (web, "b.txt", 1), (bucket, "c.bin", 2)]
    for ds, relpath, times in plan:
        for _ in range(times):
            fetch(ds.uri, ds.identifiers[relpath], env)
    disk = disk_files(cache_dir)

    summary = json.loads(dtool_cache("summary", "--json", env=env).stdout)
    assert summary["cache_directory"] == str(cache_dir)
    assert summary["total_size_bytes"] == sum(disk.values()) == 9000
    assert summary["num_items"] == len(disk) == 3
    assert (summary["num_datasets"], summary["num_in_use"], summary["num_untracked"]) == (2, 0, 0)
    by_key = {d["key"]: d for d in summary["datasets"]}
    assert by_key[web.uuid]["size_bytes"] == 4000 and by_key[bucket.uuid]["num_items"] == 1

    rows = json.loads(dtool_cache("ls", "--json", env=env).stdout)
    assert len(rows) == 3
    for ds, relpath, times in plan:
        (row,) = [r for r in rows if r["identifier"] == ds.identifiers[relpath]]
        assert row["path"] in disk and row["size_bytes"] == disk[row["path"]]
        assert (row["access_count"], row["hits"], row["misses"]) == (times, times - 1, 1)
        assert (row["uri"], row["uuid"], row["in_use"]) == (ds.uri, ds.uuid, 0)
        assert row["last_access"].endswith("+00:00") and row["first_cached"]
    assert [r["access_count"] for r in json.loads(
        dtool_cache("ls", "--json", "--sort", "count", "--limit", 2, env=env).stdout)] == [3, 2]

    with dcm.open_ledger(str(cache_dir)) as ledger:
        per_fetch = {r.relpath: r.fetch_seconds / r.misses for r in ledger.items()}
    audit = json.loads(dtool_cache("audit", "--by", "dataset", "--json", env=env).stdout)
    for ds in (web, bucket):
        (row,) = [r for r in audit["rows"] if r["key"] == ds.uuid]
        assert row["uris"] == [ds.uri]
        mine = [(relpath, times) for d, relpath, times in plan if d is ds]
        assert row["accesses"] == sum(t for _, t in mine)
        assert row["misses"] == len(mine) and row["hits"] == sum(t - 1 for _, t in mine)
        assert row["bytes_served_from_cache"] == sum(
            (t - 1) * disk[[p for p in disk if ds.identifiers[r] in p][0]] for r, t in mine)
        assert row["estimated_seconds_saved"] == pytest.approx(sum(
            (t - 1) * per_fetch[[p for p in disk if ds.identifiers[r] in p][0]]
            for r, t in mine))
    assert audit["total"]["accesses"] == 6
    users = json.loads(dtool_cache("audit", "--by", "user", "--json", env=env).stdout)
    assert [(r["accesses"], r["hits"], r["misses"]) for r in users["rows"]] == [(6, 3, 3)]


# -- the rules -------------------------------------------------------------------------

RULE_ITEMS = 50


@pytest.fixture(scope="module")
def fifty_item_cache(http_server, tmp_path_factory):
    """50 real cached items; last use i days ago and (i % 7) + 1 accesses for item i."""
    from support.datasets import make_local_dataset

    items = {f"item{i:02d}.dat": os.urandom(1000 + 37 * i) for i in range(RULE_ITEMS)}
    make_local_dataset(http_server.directory, "fifty", items)
    cache = tmp_path_factory.mktemp("fifty") / "cache"
    env = subprocess_env(cache)
    code = ("import sys, dtoolcore\nds = dtoolcore.DataSet.from_uri(sys.argv[1])\n"
            "[ds.item_content_abspath(i) for i in ds.identifiers]\n")
    subprocess.run([sys.executable, "-c", code, f"{http_server.base_url}/fifty"], env=env,
                   check=True, timeout=120)
    now = time.time()
    truth = {}
    with dcm.open_ledger(str(cache)) as ledger:
        for row in ledger.items():
            i = int(row.item_relpath[4:6])
            last, count = now - i * DAY - 600, (i % 7) + 1
            ledger.conn.execute("UPDATE items SET last_access = ?, hits = ?, misses = 1 "
                                "WHERE relpath = ?", (last, count - 1, row.relpath))
            truth[row.relpath] = (last, count, row.size_bytes)
    return cache, truth


def expected_removals(truth, older_days=None, exclude=None, retain=None, remove_all=False,
                      policy="lru"):
    """A reference model of the rules, written independently of the package."""
    now = time.time()
    if remove_all:
        return set(truth)
    cands = [p for p, (last, count, size) in truth.items()
             if (older_days is None or now - last >= older_days * DAY)
             and (exclude is None or count < exclude)]
    if retain is None:
        return set(cands)
    total = sum(size for _, _, size in truth.values())
    chosen = set()
    order = (lambda p: truth[p][0]) if policy == "lru" else (lambda p: (truth[p][1], truth[p][0]))
    for p in sorted(cands, key=order):
        if total <= retain:
            break
        chosen.add(p)
        total -= truth[p][2]
    return chosen


RULES = [
    (["--all"], dict(remove_all=True)),
    (["--older-than", "10d"], dict(older_days=10)),
    (["--older-than", "10"], dict(older_days=10)),
    (["--older-than", "2w"], dict(older_days=14)),
    (["--exclude-frequently-accessed", "5"], dict(exclude=5)),
    (["--retain-size", "40KB"], dict(retain=40000)),
    (["--retain-size", "0"], dict(retain=0)),
    (["--older-than", "10d", "--exclude-frequently-accessed", "5"], dict(older_days=10, exclude=5)),
    (["--older-than", "10d", "--retain-size", "60KB"], dict(older_days=10, retain=60000)),
    (["--exclude-frequently-accessed", "3", "--retain-size", "60KB"], dict(exclude=3, retain=60000)),
    (["--older-than", "5d", "--exclude-frequently-accessed", "6", "--retain-size", "50KB"],
     dict(older_days=5, exclude=6, retain=50000)),
    ([], dict(older_days=30)),
    (["--retain-size", "40KB", "--policy", "lfu"], dict(retain=40000, policy="lfu")),
    (["--older-than", "3d", "--retain-size", "50KB", "--policy", "lfu"],
     dict(older_days=3, retain=50000, policy="lfu")),
]


@pytest.mark.parametrize("args, model", RULES, ids=[" ".join(a) or "default" for a, _ in RULES])
def test_each_rule_removes_exactly_the_expected_set(args, model, fifty_item_cache, tmp_path):
    source, truth = fifty_item_cache
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    env = subprocess_env(cache)
    expected = expected_removals(truth, **model)
    assert 0 < len(expected) <= RULE_ITEMS  # every case removes something, not everything by luck

    dry = json.loads(dtool_cache("clean", *args, "--dry-run", "--json", env=env).stdout)
    assert dry["dry_run"] is True and set(dry["removed"]) == expected
    assert dry["freed_bytes"] == sum(truth[p][2] for p in expected)
    assert disk_files(cache) == {p: t[2] for p, t in truth.items()}  # nothing removed

    real = json.loads(dtool_cache("clean", *args, "--yes", "--json", env=env).stdout)
    assert real["dry_run"] is False
    assert real["removed"] == dry["removed"] and real["freed_bytes"] == dry["freed_bytes"]
    assert set(disk_files(cache)) == set(truth) - expected
    if not args:
        assert "No rule given" not in json.dumps(real)  # JSON stays machine-readable
        text = dtool_cache("clean", "--dry-run", env=env).stdout
        assert "--older-than 30d" in text


# -- in use, untracked, vanished -------------------------------------------------------

def test_clean_all_keeps_what_a_live_process_holds(http_dataset, cache_dir, make_env):
    ds = http_dataset({f"f{i}.txt": b"x" * (100 + i) for i in range(5)})
    env = make_env(cache_dir)
    for ident in ds.identifiers.values():
        fetch(ds.uri, ident, env)
    held = ds.identifiers["f2.txt"]
    with HoldingChild(None, ds.uri, [held], env) as holder:
        (held_path,) = holder.paths
        result = json.loads(dtool_cache("clean", "--all", "--yes", "--json", env=env).stdout)
        text = dtool_cache("clean", "--all", "--yes", env=env).stdout
        holder.finish()
    relpath = os.path.relpath(held_path, cache_dir)
    assert len(result["removed"]) == 4 and relpath not in result["removed"]
    me = f"{pwd.getpwuid(os.geteuid()).pw_name}@{socket.gethostname()}"
    assert result["skipped_in_use"] == [
        {"path": relpath, "holders": [{"user": me, "pid": holder.pid}]}]
    assert f"in use by {me} (pid {holder.pid})" in text
    assert disk_files(cache_dir) == {relpath: 102}


def test_untracked_and_vanished_files_are_reconciled(http_dataset, cache_dir, make_env,
                                                     tmp_path):
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200, "c.txt": b"c" * 300})
    env = make_env(cache_dir)
    paths = {r: fetch(ds.uri, i, env) for r, i in ds.identifiers.items()}
    stranger = cache_dir / "fetched-before-install"
    stranger.mkdir()
    (stranger / ("f" * 40 + ".csv")).write_bytes(b"u" * 50)
    shutil.move(paths["b.txt"], tmp_path / "moved-by-a-job")  # vanishes behind our back

    summary = json.loads(dtool_cache("summary", "--json", env=env).stdout)
    assert summary["num_items"] == 3 and summary["num_untracked"] == 1
    assert summary["total_size_bytes"] == 100 + 300 + 50
    listed = json.loads(dtool_cache("ls", "--json", env=env).stdout)
    assert sorted(r["size_bytes"] for r in listed) == [50, 100, 300]
    untracked = json.loads(dtool_cache("ls", "--untracked", "--json", env=env).stdout)
    assert [r["path"] for r in untracked] == [f"fetched-before-install/{'f' * 40}.csv"]
    with dcm.open_ledger(str(cache_dir)) as ledger:  # the vanished row was forgotten
        assert {r.item_relpath for r in ledger.items()} == {"a.txt", "c.txt"}

    result = json.loads(dtool_cache("clean", "--all", "--yes", "--json", env=env).stdout)
    assert result["freed_bytes"] == 450 and len(result["removed"]) == 3
    assert disk_files(cache_dir) == {}
    again = json.loads(dtool_cache("clean", "--all", "--yes", "--json", env=env).stdout)
    assert (again["removed"], again["freed_bytes"]) == ([], 0)


# A download in progress, as the cleaner sees it: a live process holding the file's fetch
# lock (every download of ours runs under it), until told to go.
FETCHING = """
import sys
from dtool_cache_manager import cachefs
from dtool_cache_manager.rangelock import open_range_lock
cache = cachefs.handle_for(sys.argv[1])
with open_range_lock(cache, cachefs.FETCH_LOCK).locked(sys.argv[2], exclusive=True):
    print("fetching", flush=True)
    sys.stdin.readline()
"""


def test_a_uri_with_a_trailing_slash_is_tracked_in_the_same_place(http_dataset, cache_dir,
                                                                   make_env):
    """The http broker keeps the URL path as it was given ('ds/' for '.../ds/'): the cached
    file is the same, and so is its count."""
    ds = http_dataset({"a.txt": b"a" * 10})
    ident = ds.identifiers["a.txt"]
    env = make_env(cache_dir)
    assert fetch(ds.uri + "/", ident, env) == str(ds.cache_path(cache_dir, "a.txt"))
    assert fetch(ds.uri, ident, env) == str(ds.cache_path(cache_dir, "a.txt"))
    listed = json.loads(dtool_cache("ls", "--json", env=env).stdout)
    assert [(r["path"], r["access_count"]) for r in listed] == [
        (str(ds.cache_path(cache_dir, "a.txt").relative_to(cache_dir)), 2)]


def test_dead_partial_downloads_are_removed_live_ones_kept(cache_dir, make_env):
    """A '*.tmp' nobody is fetching (its fetch lock is free) is a dead download's, however
    new; one whose fetch lock a live process holds is kept, however old."""
    (cache_dir / "ds").mkdir()
    dead, live = cache_dir / "ds" / "old.tmp", cache_dir / "ds" / "new.tmp"
    dead.write_bytes(b"s" * 10)
    live.write_bytes(b"f" * 20)
    two_hours_ago = time.time() - 7200
    os.utime(live, (two_hours_ago, two_hours_ago))
    env = make_env(cache_dir)
    assert json.loads(dtool_cache("summary", "--json", env=env).stdout)["num_partial"] == 2
    fetcher = subprocess.Popen([sys.executable, "-c", FETCHING, str(cache_dir), "ds/new"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               env=env)
    try:
        assert fetcher.stdout.readline() == "fetching\n"
        result = json.loads(dtool_cache("clean", "--all", "--yes", "--json", env=env).stdout)
        assert result["removed"] == ["ds/old.tmp"] and result["freed_bytes"] == 10
        assert live.exists() and not dead.exists()
    finally:
        fetcher.communicate("go\n", timeout=60)
    result = json.loads(dtool_cache("clean", "--all", "--yes", "--json", env=env).stdout)
    assert result["removed"] == ["ds/new.tmp"] and not live.exists()


# -- bad input -------------------------------------------------------------------------

BAD = [
    ["clean", "--retain-size", "1XB", "--yes"],
    ["clean", "--retain-size", "-5GB", "--yes"],
    ["clean", "--older-than", "-3d", "--yes"],
    ["clean", "--older-than", "banana", "--yes"],
    ["clean", "--all", "--retain-size", "1TB", "--yes"],
    ["clean", "--all", "--older-than", "3d", "--yes"],
    ["clean", "--all", "--yes", "--cache-dir", "/nonexistent/dtool-cache"],
    ["clean", "--all", "--yes", "--dataset", "no-such-dataset"],
    ["clean", "--all"],  # no TTY and no --yes
    ["ls", "--dataset", "http://127.0.0.1:9/unknown"],
    ["ls", "--sort", "colour"],
    ["audit", "--since", "yesterday-ish"],
]


@pytest.mark.parametrize("args", BAD, ids=[" ".join(a) for a in BAD])
def test_bad_input_is_one_line_exit_2_and_deletes_nothing(args, http_dataset, cache_dir,
                                                          make_env):
    ds = http_dataset({"a.txt": b"a" * 10})
    env = make_env(cache_dir)
    fetch(ds.uri, ds.identifiers["a.txt"], env)
    before = disk_files(cache_dir)
    result = dtool_cache(*args, env=env, check=False)
    ours = [line for line in result.stderr.splitlines() if "pkg_resources" not in line]
    assert result.returncode == 2, result.stderr
    assert len(ours) == 1 and ours[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert disk_files(cache_dir) == before


def _in_a_terminal(args, env, answer=None):
    """Run a command with a real pseudo-terminal as its stdin/stdout and answer its prompt
    (if ``answer`` is given)."""
    import pty

    main, child = pty.openpty()
    proc = subprocess.Popen(args, env=env, stdin=child, stdout=child, stderr=child)
    os.close(child)
    output = b""
    if answer is not None:
        while b"Proceed?" not in output:
            output += os.read(main, 4096)
        os.write(main, answer)
    try:
        while True:
            chunk = os.read(main, 4096)
            if not chunk:
                break
            output += chunk
    except OSError:  # EIO: the child closed the terminal
        pass
    proc.wait(timeout=60)
    os.close(main)
    return proc.returncode, output.decode()


def test_interactive_clean_shows_the_plan_and_asks(http_dataset, cache_dir, make_env):
    ds = http_dataset({"a.txt": b"a" * 10})
    env = make_env(cache_dir)
    fetch(ds.uri, ds.identifiers["a.txt"], env)
    code, out = _in_a_terminal(["dtool-cache", "clean", "--all"], env, b"n\n")
    assert code == 1 and "Would remove 1 file," in out and "Aborted" in out
    assert len(disk_files(cache_dir)) == 1
    code, out = _in_a_terminal(["dtool-cache", "clean", "--all"], env, b"y\n")
    assert code == 0 and "Removed 1 file," in out
    assert disk_files(cache_dir) == {}


def test_a_long_interactive_plan_is_summarised_with_its_totals_right_above_the_prompt(
        http_dataset, cache_dir, make_env):
    """Past 20 files the plan shows a line per dataset, and its totals are the last line
    before ``Proceed?``; ``--list`` shows every file, still with the totals last."""
    ds = http_dataset({f"dir/f{i:02d}.txt": b"x" * 10 for i in range(25)})
    env = make_env(cache_dir)
    for ident in ds.identifiers.values():
        fetch(ds.uri, ident, env)
    for extra, files_shown in (([], 0), (["--list"], 25)):
        code, out = _in_a_terminal(["dtool-cache", "clean", "--all", *extra], env, b"n\n")
        before_prompt = out[:out.index("Proceed?")].rstrip().splitlines()
        assert code == 1 and before_prompt[-1] == "Would remove 25 files, freeing 250 bytes."
        assert sum(f"dir/f{i:02d}.txt" in out for i in range(25)) == files_shown
        assert ("--list shows every file" in out) == (not extra)
        assert f"{ds.uri}: 25 files, 250 bytes" in out
    assert len(disk_files(cache_dir)) == 25


def test_tables_fit_an_80_column_terminal_with_s3_paths(http_dataset, s3_dataset, cache_dir,
                                                        make_env):
    """On a terminal, long URIs and paths lose their middle so that every table line fits;
    piped, they are whole."""
    web = http_dataset({"a/very/long/directory/name/for/an/item/image.tif": b"i" * 30})
    bucket = s3_dataset({"other.txt": b"o"})
    s3_uri = dtoolcore.copy(web.local_uri, bucket.uri.rsplit("/", 1)[0])
    env = make_env(cache_dir, {**bucket.env, "COLUMNS": "80"})
    for uri in (web.uri, s3_uri):
        fetch(uri, web.identifiers["a/very/long/directory/name/for/an/item/image.tif"], env)
    cut = []
    for command in (["ls"], ["summary"], ["audit", "--by", "item"],
                    ["audit", "--by", "dataset"]):
        code, out = _in_a_terminal(["dtool-cache", *command], env)
        cut.append("…" in out)
        lines = re.sub(r"\x1b\[[0-9;]*m", "", out.replace("\r", "")).splitlines()
        shown = [line for line in lines if not line.startswith("Cache directory:")]
        assert code == 0 and len(shown) >= 5 and max(map(len, shown)) <= 80, out
        piped = dtool_cache(*command, env=env).stdout
        assert max(map(len, piped.splitlines())) > 80  # whole, for grep
    assert cut[0] and cut[2]  # the paths of ls and audit --by item lost their middle


def test_verify_reports_and_fixes_damage(http_dataset, cache_dir, make_env):
    ds = http_dataset({"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    env = make_env(cache_dir)
    good = fetch(ds.uri, ds.identifiers["a.bin"], env)
    bad = fetch(ds.uri, ds.identifiers["b.bin"], env)
    with open(bad, "r+b") as fh:
        fh.write(b"X")  # same size, different content
    assert dtool_cache("verify", env=env).returncode == 0  # sizes are fine
    found = dtool_cache("verify", "--hash", "--json", env=env, check=False)
    assert found.returncode == 1
    status = {r["path"]: r["status"] for r in json.loads(found.stdout)}
    assert status == {os.path.relpath(good, cache_dir): "ok",
                      os.path.relpath(bad, cache_dir): "hash mismatch"}
    fixed = dtool_cache("verify", "--hash", "--fix", env=env, check=False)
    assert fixed.returncode == 0 and "(fixed)" in fixed.stdout
    assert not os.path.exists(bad) and os.path.exists(good)
    assert fetch(ds.uri, ds.identifiers["b.bin"], env) == bad  # fetched again, intact
    assert open(bad, "rb").read() == b"b" * 1000


@pytest.mark.parametrize("command", ["", "summary", "ls", "clean", "audit", "verify",
                                     "config", "autoclean"])
def test_help_fits_80_columns_and_cuts_no_sentence(command, tmp_path):
    env = dict(subprocess_env(tmp_path), COLUMNS="80")
    shown = subprocess.run(["dtool", "cache", *command.split(), "-h"], env=env, check=True,
                           capture_output=True, text=True, timeout=60).stdout
    lines = shown.splitlines()
    assert max(map(len, lines)) <= 80, shown
    cut = [line for line in lines[1:] if line.rstrip().endswith("...")]  # not the usage line
    assert not cut, shown


@pytest.mark.parametrize("command", ["summary", "ls", "audit", "config", "clean --dry-run"])
def test_format_json_is_json_and_contradictions_are_refused(command, http_dataset, cache_dir,
                                                            make_env):
    """dtool's own commands take ``-f/--format json``; ``--json`` stays as its alias."""
    ds = http_dataset({"a.txt": b"a" * 300})
    env = make_env(cache_dir)
    fetch(ds.uri, ds.identifiers["a.txt"], env)
    args = command.split()
    shown = [json.loads(dtool_cache(*args, *how, env=env).stdout)
             for how in (["--json"], ["-f", "json"], ["--format", "json"])]
    assert shown[0] == shown[1] == shown[2]
    table = dtool_cache(*args, "--format", "table", env=env).stdout
    default = dtool_cache(*args, env=env).stdout  # ages (and widths) move between runs

    def words(text):
        return text.splitlines()[1].replace("|", " ").split()

    assert words(table) == words(default) and not table.startswith(("{", "["))
    refused = dtool_cache(*args, "--json", "-f", "table", env=env, check=False)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.splitlines() == ["Error: --json and --format table contradict "
                                           "each other"]


def test_a_clean_and_an_autoclean_open_the_ledger_once(http_dataset, cache_dir, make_env,
                                                      monkeypatch):
    """Opening the ledger folds every journal: a clean (plan, names, execute) and an
    autoclean with both limits (measure, expire, trim) each do it once."""
    from click.testing import CliRunner

    from dtool_cache_manager import cli
    from dtool_cache_manager.housekeeping import run, settings
    from dtool_cache_manager.store import ledger

    ds = http_dataset({f"f{i}.txt": b"x" * 1000 for i in range(6)})
    env = make_env(cache_dir)
    for ident in ds.identifiers.values():
        fetch(ds.uri, ident, env)
    opened = []
    real_init = ledger.Ledger.__init__

    def counting_init(self, *args, **kwargs):
        opened.append(args)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(ledger.Ledger, "__init__", counting_init)
    result = CliRunner().invoke(cli.cache, ["clean", "--retain-size", "4000", "--yes",
                                            "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert "Removed 2 files" in result.output and len(opened) == 1

    opened.clear()
    limits = settings.load({settings.MAX_SIZE: "3000", settings.MAX_AGE: "1d"},
                           str(cache_dir.parent / "no-config.json"))
    outcome = run._Outcome()
    run._measure_and_clean(str(cache_dir), limits, outcome)
    assert (outcome.size_before, outcome.size_after, len(opened)) == (4000, 2000, 1)
