"""Root in other users' caches, and holds nobody else can read.

A data manager runs ``dtool cache`` as root.  In a cache another user owns, that user
controls every name, so root works there with that user's rights (as logrotate's ``su``):
whatever they planted can at most reach their own files.  And a live process whose holds
cannot be read may hold anything: a clean then removes nothing and names the holder.
"""

import json
import os
import subprocess
import sys

import pytest

from support import subprocess_env
from support.users import (HoldingChild, dtool_cache, make_group_cache, needs_root, python_access,
                           remove_tree, run_as, set_up_as_data_manager, shared_tmp)

pytestmark = needs_root

META = ".dtool-cache-manager"


@pytest.fixture
def base():
    path = shared_tmp("dcm-priv-")
    yield path
    remove_tree(path)


def _owners(top):
    """path -> owner uid of everything under ``top`` (links not followed)."""
    found = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            found[path] = os.lstat(path).st_uid
    return found


def test_root_works_in_a_users_cache_with_that_users_rights(http_dataset, users, base):
    """alice's own cache: she replaced the gate lock by a link to a root-only file.  Root's
    summary and clean work, everything they create in her cache is hers, and root's file
    is neither read, written, nor chmod'ed."""
    alice = users["alice"]
    cache = os.path.join(base, "alice-cache")
    os.mkdir(cache, 0o755)
    os.chown(cache, alice.uid, alice.gid)
    secret = os.path.join(base, "root-only")
    with open(secret, "w") as fh:
        fh.write("root's\n")
    os.chmod(secret, 0o600)
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    env = subprocess_env(cache)
    result = python_access(alice, ds.uri, list(ds.identifiers.values()), env)
    assert result.returncode == 0, result.stderr
    gate = os.path.join(cache, META, "gate.lock")
    result = run_as(alice, [sys.executable, "-c",
                            "import os, sys; os.unlink(sys.argv[1]); "
                            "os.symlink(sys.argv[2], sys.argv[1])", gate, secret], env)
    assert result.returncode == 0, result.stderr

    summary = dtool_cache(None, "summary", "--json", env=env)
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["num_items"] == 2
    cleaned = dtool_cache(None, "clean", "--all", "--yes", "--json", env=env)
    assert "Traceback" not in cleaned.stderr, cleaned.stderr
    if cleaned.returncode == 0:  # alice's link repaired by alice's rights: clean went on
        assert len(json.loads(cleaned.stdout)["removed"]) == 2
    else:  # or refused in one line: the gate was not usable
        assert cleaned.returncode == 1 and cleaned.stderr.startswith("Error: "), cleaned.stderr

    owners = _owners(cache)
    assert owners and set(owners.values()) == {alice.uid}, owners
    st = os.stat(secret)
    assert (st.st_mode & 0o7777, st.st_uid) == (0o600, 0)
    with open(secret) as fh:
        assert fh.read() == "root's\n"


def test_root_refuses_a_cache_owned_by_nobody_it_can_name(base):
    cache = os.path.join(base, "orphan")
    os.mkdir(cache, 0o755)
    os.chown(cache, 54321, 54321)  # a uid with no account
    result = dtool_cache(None, "summary", env=subprocess_env(cache))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "no account" in line, line
    assert os.listdir(cache) == []


# bob's process: a holds file only he can read, locked for as long as he runs.
UNREADABLE_HOLDS = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.fchmod(fd, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'["+", "anything"]\\n')
print("holding", flush=True)
sys.stdin.readline()
"""


def test_holds_nobody_can_read_keep_everything(http_dataset, users, base):
    """bob's live process keeps a holds file carol may not read: carol's clean cannot prove
    anything unused, so it removes nothing, and names bob (as the kernel knows him)."""
    alice, bob, carol = users["alice"], users["bob"], users["carol"]
    cache = make_group_cache(base)
    set_up_as_data_manager(cache)
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    env = subprocess_env(cache)
    assert python_access(alice, ds.uri, list(ds.identifiers.values()), env).returncode == 0
    holds = os.path.join(cache, META, "holds", "bob.host.1.secret")
    proc = subprocess.Popen([sys.executable, "-c", UNREADABLE_HOLDS, holds],
                            env=bob.env(env), preexec_fn=bob.preexec(), cwd=bob.home,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "holding\n"
        cleaned = dtool_cache(carol, "clean", "--all", "--yes", "--json", env=env)
        assert cleaned.returncode == 0, cleaned.stderr
        result = json.loads(cleaned.stdout)
        assert result["removed"] == []
        holders = {(h["user"].split("@")[0], h["pid"])
                   for s in result["skipped_in_use"] for h in s["holders"]}
        assert holders == {("bob", proc.pid)}
        assert len(result["skipped_in_use"]) == 2
    finally:
        proc.communicate("go\n", timeout=60)
    # bob's process has gone: nothing is held any more.
    cleaned = json.loads(dtool_cache(carol, "clean", "--all", "--yes", "--json",
                                     env=env).stdout)
    assert len(cleaned["removed"]) == 2


def test_a_hold_on_one_copy_keeps_only_that_copy(http_dataset, users, base):
    """Holds name the cached file: alice holding her item keeps that file, while the same
    item's identifier elsewhere (a file of another dataset directory) is free."""
    alice = users["alice"]
    cache = make_group_cache(base)
    set_up_as_data_manager(cache)
    ds = http_dataset({"a.txt": b"a" * 100})
    twin = http_dataset({"a.txt": b"a" * 100})  # same relpath, so the same identifier
    env = subprocess_env(cache)
    ident = ds.identifiers["a.txt"]
    assert twin.identifiers["a.txt"] == ident
    assert python_access(alice, twin.uri, [ident], env).returncode == 0
    with HoldingChild(alice, ds.uri, [ident], env) as holder:
        cleaned = json.loads(dtool_cache(None, "clean", "--all", "--yes", "--json",
                                         env=env).stdout)
        held = str(ds.cache_path(cache, "a.txt").relative_to(cache))
        free = str(twin.cache_path(cache, "a.txt").relative_to(cache))
        assert cleaned["removed"] == [free]
        assert [s["path"] for s in cleaned["skipped_in_use"]] == [held]
        holder.finish()
