"""A cache other hosts may use is never cleaned on one host's word: on a FUSE mount (here
``bindfs``, whose locks are its own, as on NFS with ``local_lock``) every removal refuses
with one line, until the cache's owner declares that only this host uses it."""

import json
from contextlib import contextmanager
import os
import shutil
import subprocess
import sys

import pytest

from support import autoclean_log, disk_files, subprocess_env, wait_for_autoclean
from support.users import ACCESS_AND_WAIT

pytestmark = pytest.mark.skipif(
    shutil.which("bindfs") is None or os.geteuid() != 0,
    reason="needs bindfs and root to mount it (CI installs bindfs and runs as root)")

REMOVE = """
import sys
import dtool_cache_manager as dcm
try:
    print(dcm.remove_cache_item_safely(sys.argv[1], sys.argv[2]))
except Exception as exc:
    print(type(exc).__name__, exc)
"""


@pytest.fixture
def mounted(tmp_path):
    """A directory and a bindfs mount of it: the same files, through a FUSE filesystem."""
    real, mount = tmp_path / "real", tmp_path / "mount"
    with bindfs_mounts(real, mount):
        yield real, mount


@contextmanager
def bindfs_mounts(real, *mounts):
    """Mounts of ``real``, each with locks of its own (as NFS with local_lock)."""
    real.mkdir()
    done = []
    try:
        for mount in mounts:
            mount.mkdir()
            subprocess.run(["bindfs", str(real), str(mount)], check=True)
            done.append(mount)
        yield
    finally:
        for mount in done:
            subprocess.run(["umount", str(mount)], check=True)


def on_host(name, argv):
    """``argv`` as a process of host ``name``: its own pid and uts namespaces."""
    return ["unshare", "--pid", "--uts", "--fork", "--kill-child", "sh", "-c",
            'hostname "$0" && exec "$@"', name, *map(str, argv)]


def dtool_cache(*args, env, expect=0):
    result = subprocess.run(["dtool", "cache", *map(str, args)], env=env, capture_output=True,
                            text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == expect, (args, result.stdout, result.stderr)
    return result


def test_removals_refuse_on_a_fuse_mount_until_the_owner_declares_one_host(http_dataset,
                                                                           mounted):
    real, mount = mounted
    ds = http_dataset({f"f{i}.txt": b"x" * (10 + i) for i in range(3)})
    env = subprocess_env(mount, {"DTOOL_CACHE_MAX_SIZE": "1"})
    fetch = [sys.executable, "-c", "import sys, dtoolcore\nds = dtoolcore.DataSet.from_uri("
             "sys.argv[1])\nfor i in ds.identifiers: ds.item_content_abspath(i)", ds.uri]
    accessed = subprocess.run(fetch, env=env, capture_output=True, text=True, check=True)
    # Accesses work, with one warning per process (the autoclean they start refuses).
    warnings = [line for line in accessed.stderr.splitlines() if "dtool-cache-manager" in line]
    assert len(warnings) == 1 and "holds do not reach other hosts" in warnings[0] and \
        "(fuse)" in warnings[0] and "Traceback" not in accessed.stderr, accessed.stderr
    wait_for_autoclean(mount)  # the one the misses started: it refused, and logged why
    (run,) = autoclean_log(real)
    assert run["error"].startswith("PossiblyShared: not removing anything"), run
    assert (run["removed"], run["size_before_bytes"]) == (0, 10 + 11 + 12)
    before = disk_files(real)
    assert len(before) == 3

    shown = json.loads(dtool_cache("init", "--json", env=env).stdout)
    assert (shown["mode"], shown["filesystem"], shown["local"]) == ("possibly-shared", "fuse",
                                                                    False)
    for args in (["clean", "--all", "--yes"], ["verify", "--fix"], ["autoclean"]):
        refused = dtool_cache(*args, env=env, expect=2)
        (line,) = refused.stderr.strip().splitlines()
        assert line.startswith("Error: not removing anything") and "fuse" in line and \
            "dtool cache init --single-host" in line, refused.stderr
    identifier = ds.identifiers["f0.txt"]
    removed = subprocess.run([sys.executable, "-c", REMOVE, ds.uri, identifier], env=env,
                             capture_output=True, text=True, check=True)
    assert removed.stdout.startswith("PossiblyShared not removing anything"), removed.stdout
    assert disk_files(real) == before

    summary = dtool_cache("summary", env=env).stdout
    assert "Hosts:           possibly several" in summary
    assert json.loads(dtool_cache("summary", "--json", env=env).stdout)["sharing"]["mode"] \
        == "possibly-shared"
    listed = dtool_cache("ls", env=env)
    assert "other hosts' use of it is not shown" in listed.stderr
    dry = dtool_cache("clean", "--all", "--dry-run", env=env)  # a dry run shows the plan
    assert "Would remove 3 files" in dry.stdout and "nothing is removed" in dry.stderr

    declared = dtool_cache("init", "--single-host", env=env).stdout
    assert "this host only, as root declared on" in declared
    quiet_env = subprocess_env(mount)  # no limit: no automatic clean races the one below
    accessed = subprocess.run(fetch, env=quiet_env, capture_output=True, text=True,
                              check=True)
    assert "dtool-cache-manager" not in accessed.stderr  # declared: no warning
    # A declaration anyone could have written is not believed.
    declaration = mount / ".dtool-cache-manager" / "sharing.json"  # not past bindfs's cache
    os.chmod(declaration, 0o666)
    assert json.loads(dtool_cache("init", "--json", env=env).stdout)["mode"] == \
        "possibly-shared"
    os.chmod(declaration, 0o644)
    cleaned = json.loads(dtool_cache("clean", "--all", "--yes", "--json", env=env).stdout)
    assert len(cleaned["removed"]) == 3 and disk_files(real) == {}

    withdrawn = json.loads(dtool_cache("init", "--no-single-host", "--json", env=env).stdout)
    assert withdrawn["mode"] == "possibly-shared" and not declaration.exists()
    dtool_cache("clean", "--all", "--yes", env=env, expect=2)


def test_a_cache_on_a_local_disk_needs_no_declaration(tmp_path):
    env = subprocess_env(tmp_path)
    shown = json.loads(dtool_cache("init", "--json", env=env).stdout)
    assert (shown["mode"], shown["local"], shown["declared"]) == ("local", True, None)
    assert "Hosts:           this host only (a local filesystem" in \
        dtool_cache("summary", env=env).stdout


def test_a_hold_on_host_a_is_kept_when_host_b_cleans(http_dataset, tmp_path):
    """Two hosts, each with its own mount of the shared cache, pids and hostname.  Host B
    cannot see host A's locks: it shows A's hold as a holder it cannot place, leaves A's
    holds file alone (it cannot prove A dead), and refuses to clean."""
    shared, mount_a, mount_b = tmp_path / "shared", tmp_path / "host-a", tmp_path / "host-b"
    ds = http_dataset({"held.txt": b"h" * 100, "free.txt": b"f" * 50})
    held, free = ds.identifiers["held.txt"], ds.identifiers["free.txt"]
    with bindfs_mounts(shared, mount_a, mount_b):
        env_a, env_b = subprocess_env(mount_a), subprocess_env(mount_b)
        holder = subprocess.Popen(on_host("host-a", [sys.executable, "-c", ACCESS_AND_WAIT,
                                                     ds.uri, held]),
                                  env=env_a, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            holder.stdout.readline()  # the held file's path
            ready = holder.stdout.readline().split()
            assert ready[:1] == ["ready"], holder.communicate()
            assert ready[1] == "1"  # pid 1 in host A's own pid namespace
            subprocess.run(on_host("host-b", [sys.executable, "-c", ACCESS_AND_WAIT, ds.uri,
                                              free]),
                           env=env_b, input="go\n", capture_output=True, text=True, check=True)
            holds_dir = shared / ".dtool-cache-manager" / "holds"
            a_holds = os.listdir(holds_dir)
            assert len(a_holds) == 1
            before = disk_files(shared)
            assert len(before) == 2

            def on_b(*args, expect=0):
                result = subprocess.run(on_host("host-b", ["dtool", "cache", *args]),
                                        env=env_b, capture_output=True, text=True,
                                        timeout=120, stdin=subprocess.DEVNULL)
                assert result.returncode == expect, (args, result.stdout, result.stderr)
                return result

            summary = json.loads(on_b("summary", "--json").stdout)
            assert summary["sharing"]["mode"] == "possibly-shared"
            assert summary["num_in_use"] == 1
            assert [(h["user"], h["pid"]) for h in summary["in_use_by"]] == [("root@?", None)]
            refused = on_b("clean", "--all", "--yes", expect=2)
            assert "not removing anything" in refused.stderr
            assert disk_files(shared) == before
            assert os.listdir(holds_dir) == a_holds  # not reaped by a host that cannot see it
        finally:
            holder.communicate("go\n", timeout=60)
        assert holder.returncode == 0, holder.stderr
