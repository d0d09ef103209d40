"""A cache other hosts may use is never cleaned on one host's word: on a FUSE mount (here
``bindfs``, whose locks are its own, as on NFS with ``local_lock``) every removal refuses
with one line, until the cache's owner declares that only this host uses it."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from support import disk_files, subprocess_env

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
    real.mkdir()
    mount.mkdir()
    subprocess.run(["bindfs", str(real), str(mount)], check=True)
    try:
        yield real, mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


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
    assert "Traceback" not in accessed.stderr  # accesses work (the autoclean they start
    # refuses, and records why: below)
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
