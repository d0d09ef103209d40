"""Automatic housekeeping end to end: real dtoolcore accesses in subprocesses start a real
detached clean.  Tests wait for a clean by blocking on its lock (flock), never on a sleep:
an access that starts a clean hands the locked descriptor to the child before it returns,
so once the access has returned, taking the lock means the clean has finished."""

import fcntl
import json
import logging
import os
import pwd
import socket
import subprocess
import sys

import dtoolcore.utils
import pytest

from dtool_cache_manager.housekeeping import records as hk_records, run as hk_run, \
    trigger as hk_trigger
from dtool_cache_manager.housekeeping import settings as st
from dtool_cache_manager import cachefs
from support import autoclean_log as log_entries, disk_files, wait_for_autoclean
from support.datasets import file_md5_hex
from support.users import HoldingChild

KB = 1000
META = ".dtool-cache-manager"

# Accesses the given items in order, each in a hold scope (a long-running job that lets go
# of what it has finished with); one JSON line per access, after it returned.
ACCESS = """
import json, os, sys, time, dtoolcore
import dtool_cache_manager as dcm
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
for identifier in sys.argv[2:]:
    with dcm.hold_scope():
        t0 = time.perf_counter()
        path = ds.item_content_abspath(identifier)
        latency = time.perf_counter() - t0
    print(json.dumps({"pid": os.getpid(), "path": path, "returned": time.time(),
                      "latency": latency}), flush=True)
"""

# Holds an item's gate shared, as an access does while it takes its hold: a removal of that
# item (which takes the gate exclusively) waits until this process is told to go.
GATE = """
import sys
from dtool_cache_manager import cachefs
from dtool_cache_manager.holds import gate_key
from dtool_cache_manager.rangelock import open_range_lock
cache = cachefs.handle_for(sys.argv[1])
with open_range_lock(cache, cachefs.GATE_LOCK).locked(gate_key(sys.argv[2]), False):
    print("ready", flush=True)
    sys.stdin.readline()
"""

@pytest.fixture
def hk_env(cache_dir, make_env, tmp_path):
    """``hk_env(**settings)``: a subprocess env with only these housekeeping settings and a
    private HOME, so no real dtool.json can interfere."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)

    def make(**settings):
        env = make_env(cache_dir, {"HOME": str(home)})
        for key in (*st.KEYS, "DTOOL_CACHE_MANAGER_DISABLE"):
            env.pop(key, None)
        env.update({f"DTOOL_CACHE_{k.upper()}": str(v) for k, v in settings.items()})
        return env

    make.home = home
    return make


def lock_path(cache_dir):
    return os.path.join(cache_dir, META, "autoclean.lock")


def lock_is_held(cache_dir):
    fd = os.open(lock_path(cache_dir), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def access(ds, identifiers, env):
    result = subprocess.run([sys.executable, "-c", ACCESS, ds.uri, *identifiers], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()], result.stderr


def dtool_cache(*args, env, via_dtool=False):
    """``dtool-cache ARGS`` (or ``dtool cache ARGS``, whose dtool-cli adds a pkg_resources
    warning on stderr)."""
    command = ["dtool", "cache"] if via_dtool else ["dtool-cache"]
    return subprocess.run([*command, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_over_the_limit_a_background_clean_keeps_held_items(http_dataset, cache_dir, hk_env):
    """The acceptance test: DTOOL_CACHE_MAX_SIZE set, items accessed until the cache is over
    it; the access that crossed it starts a clean and returns while the clean still runs;
    afterwards the cache is under the limit, the held item is there and the run is logged."""
    names = [f"f{i}.bin" for i in range(6)]
    ds = http_dataset({name: bytes([65 + i]) * (10 * KB) for i, name in enumerate(names)})
    ids = [ds.identifiers[name] for name in names]
    env = hk_env(max_size="50KB", autoclean_interval="0s")
    me = f"{pwd.getpwuid(os.geteuid()).pw_name}@{socket.gethostname()}"

    # A live process holds the oldest item.  Its miss is the first with a limit set, so it
    # starts a run that only measures the cache (10 KB, under the limit).
    holder = HoldingChild(None, ds.uri, [ids[0]], env)
    (held_path,) = holder.paths
    gate = None
    try:
        wait_for_autoclean(cache_dir)
        (first,) = log_entries(cache_dir)
        assert (first["trigger"], first["triggered_by"]) == ("unmeasured", holder.pid)
        assert (first["size_before_bytes"], first["removed"], first["error"]) == (
            10 * KB, 0, None)

        # An access of f1 is "in progress" (its gate held): a clean must wait for it.
        gate = subprocess.Popen([sys.executable, "-c", GATE, str(cache_dir), ids[1]],
                                env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True)
        assert gate.stdout.readline().strip() == "ready"

        # 10 KB measured + this process's 10 KB per miss: the fifth miss is over 50 KB.
        accesses, stderr = access(ds, ids[1:6], env)
        assert stderr == ""
        assert sum(disk_files(cache_dir).values()) == 60 * KB  # over the limit now
        # The access process has exited, yet the clean it started is still running.
        assert lock_is_held(cache_dir)
        assert len(log_entries(cache_dir)) == 1
    finally:
        if gate is not None:
            gate.communicate("\n", timeout=60)
    try:
        wait_for_autoclean(cache_dir)
        # Checked while the holder still lives: it must still be protected.
        disk = disk_files(cache_dir)
        held_relpath = os.path.relpath(held_path, cache_dir)
    finally:
        holder.finish()

    assert sum(disk.values()) < 50 * KB
    assert held_relpath in disk and file_md5_hex(held_path) == ds.md5[ids[0]]
    assert sorted(disk) == sorted(os.path.relpath(a["path"], cache_dir)
                                  for a in [{"path": held_path}] + accesses[2:])

    first_run, run = log_entries(cache_dir)
    assert first_run == first
    trigger = accesses[-1]
    assert (run["trigger"], run["triggered_by"], run["user"]) == ("size", trigger["pid"], me)
    assert run["pid"] not in (trigger["pid"], os.getpid(), holder.pid)
    assert (run["max_size_bytes"], run["target_size_bytes"]) == (50 * KB, 45 * KB)
    assert (run["size_before_bytes"], run["size_after_bytes"]) == (60 * KB, 40 * KB)
    assert (run["removed"], run["freed_bytes"], run["error"]) == (2, 20 * KB, None)
    assert run["max_age_seconds"] is None and run["warnings"] == []
    assert accesses[-2]["returned"] < run["start"] <= run["end"]
    assert trigger["returned"] < run["end"]  # the access did not wait for the clean

    warm = sorted(a["latency"] for a in accesses[1:-1])  # the first miss also loads modules
    print(f"\ntriggering access (miss + start of the clean): {trigger['latency'] * 1e3:.1f} ms;"
          f" the process's other warm misses: median {warm[len(warm) // 2] * 1e3:.1f} ms; "
          f"the clean, which had to wait for an access in progress, took "
          f"{(run['end'] - run['start']) * 1e3:.0f} ms")

    # `summary` shows the limit, the last run and what it freed.
    summary = json.loads(dtool_cache("summary", "--json", env=env, via_dtool=True).stdout)[
        "housekeeping"]
    assert (summary["max_size_bytes"], summary["interval_seconds"]) == (50 * KB, 0.0)
    assert summary["running"] is False and summary["settings_error"] is None
    assert (summary["last_run"]["freed_bytes"], summary["last_run"]["removed"]) == (20 * KB, 2)
    assert summary["last_run"]["size_after_bytes"] == 40 * KB
    text = dtool_cache("summary", env=env).stdout
    assert "Limits:          max size 50KB (env); checked at most every 0s (env)" in text
    assert "(over the size limit): removed 2 files, freed 19.53 KiB; 39.06 KiB after" in text


def test_no_second_run_within_the_interval(http_dataset, cache_dir, hk_env):
    ds = http_dataset({f"f{i}.bin": b"x" * (10 * KB) for i in range(3)})
    ids = list(ds.identifiers.values())
    hourly = hk_env(max_size="5KB", autoclean_interval="1h")

    access(ds, ids[:1], hourly)  # the first miss with a limit: a run
    wait_for_autoclean(cache_dir)
    assert [e["trigger"] for e in log_entries(cache_dir)] == ["unmeasured"]

    access(ds, ids[1:2], hourly)  # over the limit again, but within the hour
    wait_for_autoclean(cache_dir)  # a run started by that access would hold the lock now
    assert [e["trigger"] for e in log_entries(cache_dir)] == ["unmeasured"]
    assert os.path.relpath(ds.cache_path(cache_dir, "f1.bin"), cache_dir) in disk_files(
        cache_dir)

    # The same miss with no interval does start one: the check above could have failed.
    access(ds, ids[2:3], hk_env(max_size="5KB", autoclean_interval="0s"))
    wait_for_autoclean(cache_dir)
    assert [e["trigger"] for e in log_entries(cache_dir)] == ["unmeasured", "size"]


@pytest.mark.parametrize("where", ["env", "config"])
def test_a_bad_setting_never_fails_an_access(http_dataset, cache_dir, hk_env, where):
    ds = http_dataset({f"f{i}.txt": f"item {i}".encode() for i in range(3)})
    ids = list(ds.identifiers.values())
    if where == "env":
        env = hk_env(max_size="lots")
    else:
        env = hk_env()
        config = hk_env.home / ".config" / "dtool" / "dtool.json"
        config.parent.mkdir(parents=True)
        config.write_text(json.dumps({st.MAX_AGE: "soon"}))

    accesses, stderr = access(ds, ids, env)
    assert [file_md5_hex(a["path"]) for a in accesses] == [ds.md5[i] for i in ids]
    warnings = [line for line in stderr.splitlines() if "automatic housekeeping is off" in line]
    assert len(warnings) == 1, stderr  # once per process, not once per access
    assert ("DTOOL_CACHE_MAX_SIZE" if where == "env" else "DTOOL_CACHE_MAX_AGE") in warnings[0]
    assert "Traceback" not in stderr
    assert log_entries(cache_dir) == []  # no run was started

    summary = dtool_cache("summary", "--json", env=env)
    assert summary.returncode == 0, summary.stderr
    assert "invalid" in json.loads(summary.stdout)["housekeeping"]["settings_error"]
    autoclean = dtool_cache("autoclean", env=env)
    assert autoclean.returncode == 2
    assert autoclean.stderr.startswith("Error: ") and autoclean.stderr.count("\n") == 1


def test_config_round_trip(hk_env, cache_dir):
    env = hk_env()
    config = hk_env.home / ".config" / "dtool" / "dtool.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"DTOOL_CACHE_DIRECTORY": str(cache_dir)}))

    written = dtool_cache("config", "DTOOL_CACHE_MAX_SIZE", "50GB", env=env, via_dtool=True)
    assert written.returncode == 0, written.stderr
    assert json.loads(config.read_text()) == {"DTOOL_CACHE_DIRECTORY": str(cache_dir),
                                              "DTOOL_CACHE_MAX_SIZE": "50GB"}
    assert dtool_cache("config", "DTOOL_CACHE_MAX_SIZE", env=env).stdout == "50GB\n"

    env_age = dict(env, DTOOL_CACHE_MAX_AGE="2w")
    listed = json.loads(dtool_cache("config", "--json", env=env_age).stdout)
    assert listed["config_path"] == str(config)
    assert [(s["key"], s["value"], s["parsed"], s["source"]) for s in listed["settings"]] == [
        ("DTOOL_CACHE_MAX_SIZE", "50GB", 50 * 10 ** 9, "config"),
        ("DTOOL_CACHE_MAX_AGE", "2w", 14 * 86400.0, "env"),
        ("DTOOL_CACHE_AUTOCLEAN_INTERVAL", "1h", 3600.0, "default")]
    table = dtool_cache("config", env=env).stdout
    assert "| DTOOL_CACHE_MAX_SIZE           | 50GB  | 46.57 GiB | config  |" in table

    # The hook and `summary` read the file too.
    summary = json.loads(dtool_cache("summary", "--json", env=env).stdout)["housekeeping"]
    assert summary["max_size_bytes"] == 50 * 10 ** 9 and summary["last_run"] is None

    removed = dtool_cache("config", "DTOOL_CACHE_MAX_SIZE", "--unset", env=env)
    assert removed.returncode == 0, removed.stderr
    assert json.loads(config.read_text()) == {"DTOOL_CACHE_DIRECTORY": str(cache_dir)}
    unset = dtool_cache("config", "DTOOL_CACHE_MAX_SIZE", env=env)
    assert (unset.returncode, unset.stdout) == (0, "")


@pytest.mark.parametrize("args", [
    ["DTOOL_CACHE_MAX_SIZE", "lots"],
    ["DTOOL_CACHE_MAX_AGE", "-3d"],
    ["DTOOL_CACHE_AUTOCLEAN_INTERVAL", "soon"],
    ["DTOOL_CACHE_MAX_SIZES", "5GB"],
    ["DTOOL_CACHE_MAX_SIZE", "5GB", "--unset"],
])
def test_bad_config_input_is_one_line_and_writes_nothing(hk_env, args):
    env = hk_env()
    config = hk_env.home / ".config" / "dtool" / "dtool.json"
    config.parent.mkdir(parents=True)
    config.write_text('{"DTOOL_CACHE_MAX_SIZE": "1TB"}')
    result = dtool_cache("config", *args, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1
    assert config.read_text() == '{"DTOOL_CACHE_MAX_SIZE": "1TB"}'


def test_autoclean_by_hand_uses_the_same_path(http_dataset, cache_dir, hk_env):
    ds = http_dataset({f"f{i}.bin": b"y" * (10 * KB) for i in range(4)})
    access(ds, list(ds.identifiers.values()), hk_env())  # no limit: nothing happens
    assert log_entries(cache_dir) == []
    assert dtool_cache("autoclean", env=hk_env()).returncode == 2  # no limit set

    result = dtool_cache("autoclean", "--json", env=hk_env(max_size="25KB"))
    assert result.returncode == 0, result.stderr
    run = json.loads(result.stdout)
    assert (run["trigger"], run["triggered_by"], run["removed"]) == ("manual", None, 2)
    assert (run["size_before_bytes"], run["size_after_bytes"]) == (40 * KB, 20 * KB)
    assert sum(disk_files(cache_dir).values()) == 20 * KB
    assert log_entries(cache_dir) == [run]
    with cachefs.open_cache(str(cache_dir)) as cache:
        assert hk_records.read_last_run(cache).to_json() == run  # the log's last line

        # Another run holds the lock: this one says so and does nothing.
        fd = hk_records.try_lock(cache)
    try:
        busy = dtool_cache("autoclean", env=hk_env(max_size="1KB"))
    finally:
        os.close(fd)
    assert busy.returncode == 1 and "already running" in busy.stderr
    assert len(log_entries(cache_dir)) == 1


def test_status_creates_nothing_and_sees_a_running_clean(tmp_path, cache_dir, monkeypatch):
    for key in st.KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(dtoolcore.utils, "DEFAULT_CONFIG_PATH", str(tmp_path / "dtool.json"))
    monkeypatch.setenv("DTOOL_CACHE_MAX_AGE", "30d")
    missing = tmp_path / "nowhere"
    status = hk_records.status(str(missing))
    assert (status.running, status.last_run, status.settings.max_age_seconds) == (
        False, None, 30 * 86400.0)
    assert not missing.exists()

    with cachefs.open_cache(str(cache_dir)) as cache:
        fd = hk_records.try_lock(cache)
        try:
            status = hk_records.status(str(cache_dir))
            assert status.running is True
            me = pwd.getpwuid(os.geteuid()).pw_name
            assert status.holder == (me, os.getpid())  # named as the kernel knows it
            assert hk_records.try_lock(cache) is None  # only one run at a time
        finally:
            os.close(fd)
    assert hk_records.status(str(cache_dir)).running is False


def test_the_hook_reaps_its_children_and_never_raises(tmp_path, cache_dir, monkeypatch,
                                                      caplog):
    """In this process: after_miss starts a real child, the next miss reaps it (no zombie
    is left behind), and a cache it cannot use only costs one warning."""
    for key in st.KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("DTOOL_CACHE_MAX_SIZE", "1TB")
    monkeypatch.setenv("DTOOL_CACHE_AUTOCLEAN_INTERVAL", "0s")
    monkeypatch.setenv("HOME", str(tmp_path))  # the child's dtool.json: none
    monkeypatch.setattr(dtoolcore.utils, "DEFAULT_CONFIG_PATH", str(tmp_path / "dtool.json"))
    monkeypatch.setattr(hk_trigger, "_tallies", {})
    monkeypatch.setattr(hk_trigger, "_children", [])
    monkeypatch.setattr(hk_trigger, "_warned", set())

    hk_trigger.after_miss(str(cache_dir), 10)  # never measured: starts a run
    (child,) = hk_trigger._children
    wait_for_autoclean(cache_dir)
    hk_trigger.after_miss(str(cache_dir), 10)  # measured, under the limit: no run; reaps the child
    assert hk_trigger._children == [] and child.returncode == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # reaped: not a zombie of ours any more
    (run,) = log_entries(cache_dir)
    assert (run["trigger"], run["triggered_by"]) == ("unmeasured", os.getpid())

    caplog.set_level(logging.WARNING)
    (cache_dir / "a-file").write_bytes(b"")
    for _ in range(3):
        assert hk_trigger.after_miss(str(cache_dir / "a-file" / "x"), 10) is None
    failures = [r for r in caplog.records if "automatic housekeeping failed" in r.message]
    assert len(failures) == 1


def test_in_a_group_shared_cache_the_files_are_group_writable(cache_dir, monkeypatch,
                                                              tmp_path):
    """Any member's miss may start the next run, so any member must be able to lock and log,
    whatever the umask of the member who ran first."""
    os.chmod(cache_dir, 0o2775)
    for key in st.KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(dtoolcore.utils, "DEFAULT_CONFIG_PATH", str(tmp_path / "dtool.json"))
    monkeypatch.setenv("DTOOL_CACHE_MAX_SIZE", "1GB")
    old_umask = os.umask(0o077)
    try:
        run = hk_run.run_now(str(cache_dir))
    finally:
        os.umask(old_umask)
    assert run.error is None and run.trigger == "manual"
    for name in ("autoclean.lock", "autoclean.log"):
        path = os.path.join(cache_dir, META, name)
        assert os.stat(path).st_mode & 0o777 == 0o664, path
