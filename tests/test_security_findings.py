"""Security regression tests: a hostile member of a shared cache's group against root.

Every test here reproduces one finding of the security review with real parts: real unix
users (alice, bob and carol in ``dcmshare``), real ``dtool``/``dtool-cache`` commands and real
HTTP datasets on 127.0.0.1.  The hostile member plants each trap as himself, in a process
running as that user; when the kernel refuses a step (a newer layout: a bookkeeping
directory that is not group-writable, a sticky directory), that is a safe outcome and the
test goes on to its assertions.  Most traps are planted in the *legacy* layout that today's
code creates (``.dtool-cache-manager``, ``holds`` and ``journal`` group-writable, forced so
as root to imitate an old cache), then root (or a member) runs a command, and the test
asserts the safe outcome:

* no traceback; exit status 0, or 1 with a one-line ``Error: ...`` (bad input: exit 2);
* nothing outside the cache deleted, created, modified, chmod'ed or chown'ed (a sentinel
  tree compared by entries, bytes, modes and owners);
* no byte of a root-only file ever lands in a file under the cache;
* an item a live process of another member holds survives cleaning;
* holders are named by who owns the holds file and the pid of its live process;
* every command finishes in bounded time.
"""

import hashlib
import json
import os
import re
import resource
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional

import dtoolcore.utils
import pytest

from support import subprocess_env
from support.attacks import (PRELUDE, FlockHolder, Sentinel, Swapper, entries, exchange,
                             files_containing, legacy_layout, make_secret, member_steps,
                             secret_intact, snapshot, snapshot_diff, wait_for_entry)
from support.datasets import file_md5_hex
from support.users import (HoldingChild, User, make_group_cache, needs_root, python_access,
                           remove_tree, run_as, shared_tmp)

pytestmark = needs_root

META = ".dtool-cache-manager"
TIMEOUT = 60  # seconds any command may take; longer is a failure
HANG_TIMEOUT = 30  # for the traps that made commands hang for ever
HOST = socket.gethostname()


@dataclass
class Scene:
    base: str  # a fresh directory (0755, root's), removed afterwards
    cache: str  # <base>/cache: root:dcmshare 2775, as a data manager sets it up
    cwd: str  # an empty directory root's commands run in
    env: Dict[str, str]
    sentinel: Sentinel  # <base>/sentinel: root's files outside the cache
    users: Dict[str, User]

    @property
    def meta(self) -> str:
        return os.path.join(self.cache, META)

    def bk(self, *names) -> str:
        """A path in the bookkeeping directory."""
        return os.path.join(self.meta, *names)


@pytest.fixture
def scene(users):
    base = shared_tmp("dcm-security-")
    try:
        cache = make_group_cache(base)
        cwd = os.path.join(base, "cwd")
        os.mkdir(cwd)
        sentinel = Sentinel(os.path.join(base, "sentinel"))
        sentinel.add("precious.txt", b"root's precious file: must survive\n")
        sentinel.add("notes.jsonl", b'["j", 1, "root", "host", 1, 0]\n', mode=0o600)
        sentinel.add("sub/deeper.bin", os.urandom(64), mode=0o640)
        yield Scene(base, cache, cwd, subprocess_env(cache), sentinel, users)
    finally:
        remove_tree(base)


# -- helpers ---------------------------------------------------------------------------


def command(scene, *args, user: Optional[User] = None, timeout=TIMEOUT, extra_env=None,
            exe=("dtool", "cache"), preexec_fn=None):
    """Run ``dtool cache ARGS`` as ``user`` (None: root, in an empty directory); a timeout
    fails the test (the finding: the command would not finish)."""
    env = dict(scene.env, **(extra_env or {}))
    kwargs = {"cwd": scene.cwd} if user is None else {}
    if preexec_fn is not None:
        kwargs["preexec_fn"] = preexec_fn
    try:
        return run_as(user, [*exe, *args], env, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired:
        pytest.fail(f"`{' '.join(exe)} {' '.join(args)}` did not finish within {timeout} s")


def safe(result, allow=(0, 1)):
    """No traceback; exit 0, or 1 with a one-line ``Error: ...`` on stderr."""
    where = f"{result.args[2:]} exited {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr + result.stdout, where
    assert result.returncode in allow, where
    if result.returncode == 1 and 0 in allow:
        err = result.stderr.strip().splitlines()
        assert len(err) >= 1 and err[-1].startswith("Error: "), where
    return result


def json_of(result):
    safe(result, allow=(0,))
    return json.loads(result.stdout)


def access(scene, user, ds, relpaths):
    """``user`` accesses items for real (plain python, as a user's script does)."""
    result = python_access(user, ds.uri, [ds.identifiers[r] for r in relpaths], scene.env,
                           timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    return [ds.cache_path(scene.cache, r) for r in relpaths]


def relpath(scene, ds, item):
    return str(ds.cache_path(scene.cache, item).relative_to(scene.cache))


def assert_sentinel_intact(scene, before, what=""):
    changes = snapshot_diff(before, scene.sentinel.snapshot())
    assert changes == [], f"{what}: outside the cache: {changes}"


def plant(member, scene, *steps):
    """The member plants a trap (steps as for ``member_steps``) in the legacy layout.  A
    step the kernel refuses is a safe outcome: it is reported (see ``-rP``), not failed."""
    legacy_layout(scene.cache)
    attempt = member_steps(member, scene.env, *steps)
    print(f"{member.name} planted {[s[0] for s in steps]}: "
          f"{'refused ' + str(attempt.refused) if attempt.refused else 'done'}")
    return attempt


def token(pid=99999):
    return f"{HOST}.{pid}.{secrets.token_hex(4)}"


def dataset_dir(ds, scene):
    return os.path.dirname(ds.cache_path(scene.cache, next(iter(ds.identifiers))))


def served_path(ds, relpath):
    """The file the test HTTP server serves for ``relpath`` of ``ds``."""
    return os.path.join(dtoolcore.utils.generous_parse_uri(ds.local_uri).path, "data", relpath)


def _limit_memory():
    gib = 1 << 30
    resource.setrlimit(resource.RLIMIT_AS, (4 * gib, 4 * gib))


# == Critical ===========================================================================


def test_symlinked_holds_dir_never_reaps_files_outside(http_dataset, scene):
    """Finding 1 (critical): bob replaces ``holds/`` by a symlink to a directory outside the
    cache full of regular files; root's ``summary`` (and ``ls``, ``clean``) "reaped dead
    holds files" through it, unlinking every unlocked file there.

    Safe: root's commands exit cleanly (0, or 1 with a one-line error) and the outside
    directory keeps every file, byte, mode and owner."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100})
    access(scene, alice, ds, ["a.txt"])
    outside = Sentinel(os.path.join(scene.base, "outside"))  # regular files only
    for n in range(5):
        outside.add(f"file-{n}.txt", f"root's file {n}\n".encode(), mode=0o600 + 0o44 * (n % 2))
    plant(bob, scene, ("aside", scene.bk("holds")), ("symlink", outside.path, scene.bk("holds")))
    before = outside.snapshot()
    for args in (("summary", "--json"), ("ls", "--json"), ("clean", "--all", "--yes", "--json")):
        result = command(scene, *args)
        changes = snapshot_diff(before, outside.snapshot())
        assert changes == [], f"root's {args[0]} acted outside the cache: {changes}"
        safe(result)


def _root_clean(scene, ds, n):
    return [command(scene, "clean", "--all", "--yes")]


def _root_miss(scene, ds, n):
    # a new item each time: a miss takes the fetch lock
    result = python_access(None, ds.uri, [ds.identifiers[f"m{n}.txt"]], scene.env,
                           timeout=TIMEOUT, cwd=scene.cwd)
    return [result]


def _root_autoclean(scene, ds, n):
    limit = {"DTOOL_CACHE_MAX_SIZE": "1GB"}
    return [command(scene, "autoclean", extra_env=limit),
            command(scene, "summary", extra_env=limit)]


LOCK_TRIGGERS = {"gate.lock": _root_clean, "fetch.lock": _root_miss,
                 "autoclean.lock": _root_autoclean, "autoclean.log": _root_autoclean}


@pytest.mark.parametrize("name", sorted(LOCK_TRIGGERS))
def test_symlinked_lock_and_log_files_are_never_followed(http_dataset, scene, name):
    """Finding 2 (critical): bob replaces ``gate.lock``, ``fetch.lock``, ``autoclean.lock``
    or ``autoclean.log`` by a symlink.  Root's clean (gate.lock), data access with a miss
    (fetch.lock) or ``autoclean``/``summary`` (autoclean.*) opened it O_CREAT|O_RDWR through
    the link: a root-only 0600 file became 0664 (readable by all), got JSON appended, and a
    dangling link made root create a file wherever bob pointed it.

    Safe: the root-only file keeps its mode, owner and bytes, and no file appears at the
    dangling link's target (nothing outside the cache changes)."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    items = {"a.txt": b"a" * 100, "m1.txt": b"1" * 10, "m2.txt": b"2" * 20}
    ds = http_dataset(items)
    access(scene, alice, ds, ["a.txt"])
    secret = make_secret(os.path.join(scene.base, "root-only"))
    trigger = LOCK_TRIGGERS[name]

    problems = []

    # 1. a symlink to a root-only file
    plant(bob, scene, ("aside", scene.bk(name)), ("symlink", secret.path, scene.bk(name)))
    results = trigger(scene, ds, 1)
    problems += [f"root followed {name} to a 0600 file: {p}" for p in secret_intact(secret)]
    problems += [f"the secret was copied into {p}"
                 for p in files_containing(scene.cache, secret.token)]

    # 2. a dangling symlink into a directory of root's
    access(scene, alice, ds, ["a.txt"])  # something to clean again
    before = scene.sentinel.snapshot()
    created = os.path.join(scene.sentinel.path, "created-by-root")
    plant(bob, scene, ("aside", scene.bk(name)), ("symlink", created, scene.bk(name)))
    results += trigger(scene, ds, 2)
    problems += [f"root followed a dangling {name}: {c}"
                 for c in snapshot_diff(before, scene.sentinel.snapshot())]
    assert problems == [], "\n".join(problems)
    for result in results:
        safe(result)


def test_symlinked_journal_dir_never_deletes_files_outside(http_dataset, scene):
    """Finding 3a (critical): bob replaces ``journal/`` by a symlink to a directory outside
    the cache; root's ``summary`` "compacted" every ``*.jsonl`` there, then unlinked them.

    Safe: root's ``summary``, ``ls`` and ``audit`` exit cleanly and the outside directory is
    unchanged."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100})
    access(scene, alice, ds, ["a.txt"])
    scene.sentinel.add("history.jsonl", b"root's own journal of things\n")
    scene.sentinel.add(f"{token(1)}.jsonl", b'["j", 1, "root", "h", 1, 0]\n["x", 1]\n')
    plant(bob, scene, ("aside", scene.bk("journal")),
          ("symlink", scene.sentinel.path, scene.bk("journal")))
    before = scene.sentinel.snapshot()
    for args in (("summary", "--json"), ("ls", "--json"), ("audit", "--json")):
        result = command(scene, *args)
        assert_sentinel_intact(scene, before, f"after root's {args[0]}")
        safe(result)


def test_journal_symlink_to_a_root_only_file_never_leaks_it(http_dataset, scene):
    """Finding 3b (critical): bob plants ``journal/<token>.jsonl`` as a symlink to a
    root-only (0600) file; root's ``dtool cache autoclean`` read it as a journal and copied
    its first 200 bytes (as a "malformed journal line" warning) into ``autoclean.log``,
    which the whole group reads.

    Safe: no byte of the secret appears in any file under the cache, and the secret file is
    unchanged (mode, owner, bytes; not deleted)."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100})
    access(scene, alice, ds, ["a.txt"])
    secret = make_secret(os.path.join(scene.base, "root-only"))
    plant(bob, scene, ("symlink", secret.path, scene.bk("journal", f"{token()}.jsonl")))
    limit = {"DTOOL_CACHE_MAX_SIZE": "1GB"}
    results = [command(scene, "autoclean", extra_env=limit),
               command(scene, "summary", extra_env=limit)]
    leaked = files_containing(scene.cache, secret.token)
    assert leaked == [], f"the root-only file's content was copied into {leaked}"
    assert secret_intact(secret) == []
    for result in results:
        safe(result)


# A member's process: creates many dead holds files (so root takes a while reading them),
# watches the holds directory, and at root's first look at one of them swaps the dataset
# directory for a symlink out of the cache.
WATCH_AND_SWAP = r'''
import select
holds_dir, a, b, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])

def create_bait():
    for n in range(count):
        os.close(os.open(os.path.join(holds_dir, "slow-%05d" % n),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))

attempt("create holds files", create_bait)
ino = Inotify()
ino.add_watch(holds_dir, IN_OPEN | IN_ACCESS)
print(json.dumps(["armed"]), flush=True)
outcome = "not triggered"
while outcome == "not triggered":
    ready = select.select([ino.fd, sys.stdin], [], [])[0]
    if ino.fd in ready:
        if any(name.startswith("slow-") for _, _, name in ino.read(0)):
            outcome = "swapped" if attempt(f"exchange {a}", exchange, a, b) else "refused"
    elif sys.stdin in ready:
        break
print(json.dumps([outcome]), flush=True)
sys.stdin.readline()
'''

REMOVE_SAFELY = """
import sys
import dtool_cache_manager as dcm
try:
    print(dcm.remove_cache_item_safely(sys.argv[1], sys.argv[2], cache_dir=sys.argv[3]))
except Exception as exc:  # refusing is a safe outcome for the API
    print("raised", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("how", ["verify --fix", "remove_cache_item_safely"])
def test_check_then_unlink_race_never_deletes_outside(http_dataset, scene, how):
    """Finding 4 (critical): ``verify --fix`` and the API's ``remove_cache_item_safely``
    check the item's path, then read every holds file, then unlink by name.  bob, watching
    the holds directory with inotify, swaps the dataset directory (his own) for a symlink
    to a directory outside the cache at root's first look at a holds file (IN_OPEN), so
    root's unlink by name lands outside and deletes a file there.

    Safe: the outside file of the same name survives (the whole outside tree unchanged)."""
    bob = scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 1000})
    (cached,) = access(scene, bob, ds, ["a.txt"])  # the dataset directory is bob's
    name = os.path.basename(cached)
    scene.sentinel.add(name, b"root's file that happens to share the item's name\n")
    if how == "verify --fix":  # damaged: verify --fix will remove it
        assert member_steps(bob, scene.env, ("truncate", str(cached), 10)).planted
    ds_dir = os.path.dirname(cached)
    legacy_layout(scene.cache)
    assert member_steps(bob, scene.env, ("symlink", scene.sentinel.path, ds_dir + ".swap")
                        ).planted
    before = scene.sentinel.snapshot()

    watcher = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + WATCH_AND_SWAP, scene.bk("holds"), ds_dir,
         ds_dir + ".swap", "3000"],
        env=bob.env(scene.env), preexec_fn=bob.preexec(), cwd=bob.home,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in watcher.stdout:
            lines.append(json.loads(line))
            if lines[-1] == ["armed"]:
                break
        assert lines and lines[-1] == ["armed"], watcher.stderr.read()
        if how == "verify --fix":
            result = command(scene, "verify", "--fix", "--json")
        else:
            result = run_as(None, [sys.executable, "-c", REMOVE_SAFELY, ds.uri,
                                   ds.identifiers["a.txt"], scene.cache], scene.env,
                            timeout=TIMEOUT, cwd=scene.cwd)
        out, err = watcher.communicate("go\n", timeout=TIMEOUT)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0, err
    outcome = [json.loads(line) for line in out.splitlines()][-1][0]
    print(f"bob's swap: {outcome}; root's {how}: exit {result.returncode} "
          f"{result.stdout.strip()[-300:]} {result.stderr.strip()[-300:]}")
    assert_sentinel_intact(scene, before, f"root's {how} (bob's swap: {outcome})")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode in (0, 1), result.stderr


# == High ===============================================================================


def test_stale_partial_removal_race_never_deletes_outside(http_dataset, scene):
    """Finding 5 (high): ``clean`` removes a stale ``*.tmp`` partial by checking its
    directory, then unlinking it by name.  bob swaps his dataset directory with a symlink
    to a directory outside the cache (renameat2 RENAME_EXCHANGE, in a loop) while root
    cleans; outside sits a same-named ``*.tmp`` older than an hour, and root's unlink by
    name lands on it.

    Safe: over many cleans racing the swapper, the outside ``*.tmp`` survives (the whole
    outside tree is unchanged)."""
    bob = scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100})
    (cached,) = access(scene, bob, ds, ["a.txt"])  # the dataset directory is bob's
    ds_dir = os.path.dirname(cached)
    partial = os.path.basename(cached)[:40] + ".bin.tmp"
    two_hours_ago = time.time() - 7200
    scene.sentinel.add(partial, b"root's old partial, outside the cache\n", mtime=two_hours_ago)
    legacy_layout(scene.cache)

    def leave_partial():  # bob's leftover download, stale
        if not os.path.lexists(os.path.join(ds_dir, partial)):
            assert member_steps(bob, scene.env,
                                ("write", os.path.join(ds_dir, partial), b"p" * 50),
                                ("utime", os.path.join(ds_dir, partial), two_hours_ago)
                                ).planted

    leave_partial()
    assert member_steps(bob, scene.env, ("symlink", scene.sentinel.path, ds_dir + ".swap")
                        ).planted
    before = scene.sentinel.snapshot()
    swapper = Swapper(bob, ds_dir, ds_dir + ".swap", scene.env)
    results = []
    try:
        for attempt in range(30):
            swapper.pause()
            if os.path.islink(ds_dir):  # a still scene: the real directory in place
                exchange(ds_dir, ds_dir + ".swap")
            leave_partial()
            swapper.resume()
            results.append(command(scene, "clean", "--yes", "--json", exe=("dtool-cache",)))
            swapper.pause()
            changes = snapshot_diff(before, scene.sentinel.snapshot())
            assert changes == [], f"clean {attempt + 1} deleted outside the cache: {changes}"
            swapper.resume()
    finally:
        swapper.stop()
    print(f"swapper: {'refused ' + swapper.refused if swapper.refused else 'ran'}; cleans "
          f"exited {sorted(r.returncode for r in results)}")
    for result in results:
        assert "Traceback" not in result.stderr, result.stderr
    assert_sentinel_intact(scene, before, "cleans racing the swapper")


def test_hostile_manifest_identifier_never_acts_outside(http_dataset, scene):
    """Finding 6 (high): a dataset's manifest names an item ``../../victim/x``.  When alice
    accesses it in a group-writable cache, the plugin's hook takes the path the identifier
    leads to (outside the cache) for a truncated download: it unlinks alice's file there
    (``_discard_if_truncated``) and chmods her directory to 2775 (``_prepare_shared_dirs``).

    Safe: whatever becomes of the access (upstream may fail or return that path), alice's
    file outside keeps its bytes and her directory its mode."""
    alice = scene.users["alice"]
    ds = http_dataset({"x.txt": b"x" * 100})
    manifest_path = os.path.join(dtoolcore.utils.generous_parse_uri(ds.local_uri).path,
                                 ".dtool", "manifest.json")
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    hostile = "../../victim/x"
    manifest["items"][hostile] = dict(manifest["items"][ds.identifiers["x.txt"]])
    with open(manifest_path, "w") as fh:
        json.dump(manifest, fh)
    victim = Sentinel(os.path.join(scene.base, "victim"), owner=(alice.uid, alice.gid),
                      mode=0o700)
    victim.add("x.txt", b"alice's own notes\n")  # not the manifest's 100 bytes
    before = victim.snapshot()

    # the dataset's own item first (its cache directory exists), then the hostile one
    python_access(alice, ds.uri, [ds.identifiers["x.txt"], hostile], scene.env,
                  timeout=TIMEOUT)
    changes = snapshot_diff(before, victim.snapshot())
    assert changes == [], f"alice's access acted outside the cache: {changes}"


def test_fifo_journal_never_blocks_commands(http_dataset, scene):
    """Finding 7 (high): bob plants a FIFO named ``journal/<token>.jsonl``; every command
    opened it to fold it in and blocked for ever.

    Safe: root's ``summary`` (and ``ls``) finish in bounded time, without a traceback."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100})
    access(scene, alice, ds, ["a.txt"])
    plant(bob, scene, ("mkfifo", scene.bk("journal", f"{token()}.jsonl")))
    summary = json_of(command(scene, "summary", "--json", timeout=HANG_TIMEOUT))
    assert summary["num_items"] == 1
    safe(command(scene, "ls", "--json", timeout=HANG_TIMEOUT))


# == Medium =============================================================================


def test_huge_sparse_journal_is_read_in_bounded_memory(http_dataset, scene):
    """Finding 8 (medium): bob truncates a journal to 40 GiB (sparse: no disk used); readers
    read it whole and die with MemoryError (a traceback), so no command works.

    Safe: root's ``summary`` and ``ls`` (run with a 4 GiB address-space limit) finish in
    bounded time with exit 0, or 1 and a one-line error; never a traceback."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100})
    access(scene, alice, ds, ["a.txt"])
    plant(bob, scene, ("truncate", scene.bk("journal", f"{token()}.jsonl"), 40 << 30))
    for args in (("summary", "--json"), ("ls", "--json")):
        safe(command(scene, *args, preexec_fn=_limit_memory))


def _holds_file(scene, member, content):
    """A live holds file of ``member`` with ``content`` (kept by a flock of his process)."""
    legacy_layout(scene.cache)
    return FlockHolder(member, scene.bk("holds", token()), scene.env, content=content)


def _header(user="bob", pid=99999):
    return json.dumps(["h", 1, user, HOST, pid, time.time()]) + "\n"


MALFORMED = {
    "holds-dict": lambda s, ds: _holds_file(s, s.users["bob"], b'{"a": 1}\n'),
    "holds-list-of-ints": lambda s, ds: _holds_file(s, s.users["bob"], b"[1, 2]\n"),
    "holds-short-header": lambda s, ds: _holds_file(s, s.users["bob"], b'["h"]\n'),
    "holds-short-hold": lambda s, ds: _holds_file(
        s, s.users["bob"], (_header() + '["+", 5]\n').encode()),
    "holds-directory": lambda s, ds: plant(s.users["bob"], s,
                                           ("mkdir", s.bk("holds", token()))),
    "journal-directory": lambda s, ds: plant(s.users["bob"], s,
                                             ("mkdir", s.bk("journal", f"{token()}.jsonl"))),
    "journal-of-another-member-0600": lambda s, ds: plant(
        s.users["alice"], s,
        ("write", s.bk("journal", f"{token()}.jsonl"),
         _header("alice").replace('"h"', '"j"').encode(), 0o600)),
    "journal-header-garbage-after-fold": None,  # see below: needs a live process
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_bookkeeping_never_crashes_commands(http_dataset, scene, case):
    """Finding 9 (medium): holds files of the wrong JSON shape (``{"a": 1}``, ``[1, 2]``,
    ``["h"]``, ``["+", 5]``) kept live by bob, a directory inside ``holds/``, a directory
    named ``journal/x.jsonl``, another member's 0600 journal (read by carol), and a live
    journal whose header line bob rewrote after its first fold: each crashed commands with
    a traceback.

    Safe: ``summary`` and ``ls`` exit 0 (or 1 with a one-line error), no traceback, and a
    successful summary counts the cached items right."""
    alice, bob, carol = (scene.users[n] for n in ("alice", "bob", "carol"))
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    access(scene, alice, ds, ["a.txt", "b.txt"])
    runner = carol if case == "journal-of-another-member-0600" else None
    holders = []
    try:
        if case == "journal-header-garbage-after-fold":
            legacy_layout(scene.cache)
            holder = HoldingChild(bob, ds.uri, [ds.identifiers["a.txt"]], scene.env)
            holders.append(holder)
            (journal,) = [os.path.join(scene.bk("journal"), n)
                          for n in os.listdir(scene.bk("journal")) if f".{holder.pid}." in n]
            json_of(command(scene, "summary", "--json"))  # folds it: its offset is recorded
            with open(journal, "rb") as fh:
                first = fh.readline()
            garbage = b"{}" + b" " * (len(first) - 3) + b"\n"  # valid JSON, wrong shape
            # bob rewrites his own journal in place (same inode, same length)
            assert member_steps(bob, scene.env, ("write", journal,
                                                 garbage + fh_rest(journal, len(first)))
                                ).planted
        else:
            planted = MALFORMED[case](scene, ds)
            if isinstance(planted, FlockHolder):
                holders.append(planted)
        for args in (("summary", "--json"), ("ls", "--json")):
            result = safe(command(scene, *args, user=runner))
            if args[0] == "summary" and result.returncode == 0:
                assert json.loads(result.stdout)["num_items"] == 2
    finally:
        for holder in holders:
            holder.__exit__()


def fh_rest(path, offset):
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read()


def test_holders_are_named_by_the_holds_files_owner(http_dataset, scene):
    """Finding 10 (medium): bob writes a holds file whose header claims ``alice`` pid 1,
    holding every item, and keeps it live with a flock of his own process: ``clean --all``
    (and ``ls --in-use``, ``summary``) then report the items in use by ``alice (pid 1)``.

    Safe: the items are kept (a live process holds them) and attributed to bob -- the
    user owning the holds file -- and to the real pid of his live process, everywhere."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    access(scene, alice, ds, ["a.txt", "b.txt"])
    rel = {r: relpath(scene, ds, r) for r in ds.identifiers}
    lines = _header("alice", 1) + "".join(
        json.dumps(["+", ds.uri, ds.uuid, ds.identifiers[r], rel[r]]) + "\n" for r in rel)
    legacy_layout(scene.cache)
    name = f"{HOST}.{{pid}}.{secrets.token_hex(4)}"  # named as the package names it
    with FlockHolder(bob, scene.bk("holds", name), scene.env, content=lines.encode()) as liar:
        if liar.refused:
            pytest.fail(f"bob may not create a holds file: {liar.refused}")

        def bob_and_pid(holders):
            return [(h["user"].split("@")[0], h["pid"]) for h in holders]

        listed = json_of(command(scene, "ls", "--in-use", "--json"))
        assert {r["path"]: bob_and_pid(r["holders"]) for r in listed} == {
            p: [("bob", liar.pid)] for p in rel.values()}
        summary = json_of(command(scene, "summary", "--json"))
        assert [(h["user"].split("@")[0], h["pid"], h["num_items"])
                for h in summary["in_use_by"]] == [("bob", liar.pid, 2)]
        cleaned = json_of(command(scene, "clean", "--all", "--yes", "--json"))
        assert cleaned["removed"] == []
        assert {s["path"]: bob_and_pid(s["holders"]) for s in cleaned["skipped_in_use"]} == {
            p: [("bob", liar.pid)] for p in rel.values()}
        for r in rel:
            assert ds.cache_path(scene.cache, r).is_file()


def test_forged_journal_line_never_unprotects_a_held_item(http_dataset, scene):
    """Finding 11 (medium): bob writes a journal with one access record for an existing
    item's path but another uuid and identifier; folding it rewrote the ledger row's
    identity, and ``clean --all`` then no longer matched alice's hold and deleted the item
    her live process holds.

    Safe: the held item survives ``clean --all --yes`` (reported in use by alice's live
    process) and ``verify --fix``."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    access(scene, alice, ds, ["a.txt", "b.txt"])
    rel_a = relpath(scene, ds, "a.txt")
    with HoldingChild(alice, ds.uri, [ds.identifiers["a.txt"]], scene.env) as holder:
        json_of(command(scene, "summary", "--json"))  # alice's journal folded: bob's comes later
        now = int(time.time() * 1e6)
        forged = ["a", rel_a, ds.uri, "f" * 8 + "-0000-4000-8000-" + "0" * 12,
                  hashlib.sha1(b"something else").hexdigest(), "http", now, 0, 100, now, 0]
        journal = _header("bob").replace('"h"', '"j"') + json.dumps(forged) + "\n"
        plant(bob, scene, ("write", scene.bk("journal", f"{token()}.jsonl"), journal.encode()))
        verified = command(scene, "verify", "--fix", "--json")
        assert "Traceback" not in verified.stderr and verified.returncode in (0, 1), \
            verified.stderr
        cleaned = json_of(command(scene, "clean", "--all", "--yes", "--json"))
        survived = ds.cache_path(scene.cache, "a.txt").is_file()
        holder.finish()
    assert survived, f"alice's held item was deleted: {cleaned}"
    assert rel_a not in cleaned["removed"]
    assert [(s["path"], [(h["user"].split("@")[0], h["pid"]) for h in s["holders"]])
            for s in cleaned["skipped_in_use"]] == [(rel_a, [("alice", holder.pid)])]


SLOW_FETCH = """
import sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
ds.item_content_abspath(sys.argv[2])
"""


def _killed_download(scene, http_server, member, ds, item):
    """``member`` starts fetching ``item`` slowly and is SIGKILLed once its partial
    download appears (awaited with inotify); returns the partial's name."""
    ds_dir = dataset_dir(ds, scene)
    name = os.path.basename(ds.cache_path(scene.cache, item))
    existing = set(os.listdir(ds_dir))
    http_server.slow_item_bytes_per_s = 20_000
    try:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_FETCH, ds.uri, ds.identifiers[item]],
                                env=member.env(scene.env), preexec_fn=member.preexec(),
                                cwd=member.home, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            partial = wait_for_entry(ds_dir, lambda n: n != name and n not in existing,
                                     timeout=TIMEOUT)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
    finally:
        http_server.slow_item_bytes_per_s = None
    assert proc.returncode == -signal.SIGKILL
    return partial


def test_killed_download_never_blocks_other_members(http_dataset, http_server, scene):
    """Finding 12 (medium): bob's download is SIGKILLed part-way and leaves ``<item>.tmp``,
    bob's and 0644; then every other member's access to that item failed with
    PermissionError, and ``clean`` kept the dead partial as "in progress".

    Safe: alice's access then succeeds with the right content (md5), and a
    ``clean --all`` removes a dead partial (no live fetch holds it)."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"fast.txt": b"f" * 100, "slow.bin": os.urandom(400_000),
                       "slow2.bin": os.urandom(400_000)})
    access(scene, bob, ds, ["fast.txt"])  # the dataset directory exists
    ds_dir = dataset_dir(ds, scene)

    problems = []

    partials = [_killed_download(scene, http_server, bob, ds, "slow.bin")]
    result = python_access(alice, ds.uri, [ds.identifiers["slow.bin"]], scene.env,
                           timeout=TIMEOUT)
    cached = str(ds.cache_path(scene.cache, "slow.bin"))
    if result.returncode != 0:
        problems.append(f"alice cannot fetch after bob's killed download: "
                        f"{result.stderr.strip().splitlines()[-1:]}")
    elif result.stdout.strip() != cached or \
            file_md5_hex(cached) != ds.md5[ds.identifiers["slow.bin"]]:
        problems.append(f"alice got {result.stdout.strip()}, not the right content")

    partials.append(_killed_download(scene, http_server, bob, ds, "slow2.bin"))
    assert os.path.lexists(os.path.join(ds_dir, partials[-1]))
    cleaned = json_of(command(scene, "clean", "--all", "--yes", "--json"))
    left = [n for n in partials if os.path.lexists(os.path.join(ds_dir, n))]
    if left:
        problems.append(f"root's clean kept the dead partials {left}: {cleaned}")
    assert problems == [], "\n".join(problems)


TRUNCATED_ACCESS = """
import json, sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
try:
    path = ds.item_content_abspath(sys.argv[2])
except OSError as exc:
    print(json.dumps(["error", [c.__name__ for c in type(exc).__mro__], str(exc)]))
else:
    print(json.dumps(["path", path]))
"""


def test_short_download_is_an_error_not_a_truncated_file(http_dataset, scene):
    """Finding 13 (medium): the server sends 3,333 of the item's 10,000 bytes; the access
    returned the short file although the manifest gives the size.

    Safe: the access raises an OSError naming the item (identifier or relpath), no
    truncated file is left at the cache path, and once the server serves the whole
    content the next access succeeds with it."""
    alice = scene.users["alice"]
    content = os.urandom(10_000)
    ds = http_dataset({"a.bin": content})
    served = served_path(ds, "a.bin")
    with open(served, "r+b") as fh:
        fh.truncate(3333)
    ident = ds.identifiers["a.bin"]
    cached = ds.cache_path(scene.cache, "a.bin")

    result = run_as(alice, [sys.executable, "-c", TRUNCATED_ACCESS, ds.uri, ident], scene.env,
                    timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert not (cached.exists() and cached.stat().st_size != len(content)), \
        f"a truncated file is left in the cache ({cached.stat().st_size} bytes): {outcome}"
    assert outcome[0] == "error", f"the access returned a short file: {outcome}"
    assert "OSError" in outcome[1] and (ident in outcome[2] or "a.bin" in outcome[2]), outcome

    with open(served, "wb") as fh:
        fh.write(content)
    result = run_as(alice, [sys.executable, "-c", TRUNCATED_ACCESS, ds.uri, ident], scene.env,
                    timeout=TIMEOUT)
    assert json.loads(result.stdout.splitlines()[-1]) == ["path", str(cached)], result.stderr
    assert file_md5_hex(cached) == ds.md5[ident]


# == Bad input ==========================================================================

BAD_CLI = {
    "dataset-unparsable-uri": ["clean", "--dataset", "http://[::1", "--dry-run"],
    "ls-limit-too-big": ["ls", "--limit", "99999999999999999999999999"],
    "audit-since-too-long": ["audit", "--since", "99999999999999999999999w"],
    "cache-dir-is-a-file": ["summary"],  # DTOOL_CACHE_DIRECTORY=<a regular file>
    "cache-dir-proc-fd": ["summary", "--cache-dir", "/proc/self/fd/0"],
    "cache-dir-empty": ["summary", "--cache-dir", ""],
    "retain-size-fraction": ["clean", "--retain-size", "1.5", "--yes"],
}


@pytest.mark.parametrize("case", sorted(BAD_CLI))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(http_dataset, scene, case):
    """Finding 14 (bad input): an unparsable ``--dataset`` URI, a ``--limit`` or ``--since``
    too big for the machine, a cache directory that is a regular file, ``/proc/self/fd/0``
    or the empty string (which made a ledger in the current directory), and a bare
    fractional size (``--retain-size 1.5`` meant 1 byte: it emptied the cache) each crashed,
    or did damage.

    Safe: exit 2 with one ``Error: ...`` line on stderr, no traceback, nothing created in the
    current directory, the cache (and the regular file) unchanged."""
    alice = scene.users["alice"]
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    access(scene, alice, ds, ["a.txt", "b.txt"])
    safe(command(scene, "summary"))  # settled: journals folded, index built
    not_a_dir = os.path.join(scene.base, "not-a-directory")
    with open(not_a_dir, "wb") as fh:
        fh.write(b"a regular file\n")
    extra = {"DTOOL_CACHE_DIRECTORY": not_a_dir} if case == "cache-dir-is-a-file" else None
    items_before = snapshot(scene.cache, exclude=(META,))
    all_before = entries(scene.cache)
    file_before = snapshot(not_a_dir)

    result = command(scene, *BAD_CLI[case], extra_env=extra)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert os.listdir(scene.cwd) == [], f"created in the current directory: " \
                                        f"{os.listdir(scene.cwd)}"
    changed = snapshot_diff(items_before, snapshot(scene.cache, exclude=(META,)))
    changed += snapshot_diff(all_before, entries(scene.cache))
    assert changed == [], f"{BAD_CLI[case]} changed the cache: {changed}"
    assert snapshot(not_a_dir) == file_before
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr)
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, \
        result.stderr


BAD_API = {
    "cache_size-empty-dir": ("dcm.cache_size(cache_dir='')", "ValueError"),
    "num_times_accessed-none": ("dcm.num_times_accessed(None, None)", "TypeError"),
    "num_times_accessed-int-uri": ("dcm.num_times_accessed(123, 'x')", "TypeError"),
}

CALL = """
import json, sys
import dtool_cache_manager as dcm
try:
    result = eval(sys.argv[1])
except Exception as exc:
    print(json.dumps([[c.__name__ for c in type(exc).__mro__], str(exc)]))
else:
    print(json.dumps([["returned"], repr(result)]))
"""


@pytest.mark.parametrize("case", sorted(BAD_API))
def test_bad_api_arguments_raise_and_change_nothing(http_dataset, scene, case):
    """Finding 14 (bad input, Python API): ``cache_size(cache_dir='')`` measured (and made
    a ledger in) the current directory; ``num_times_accessed(None, None)`` and
    ``num_times_accessed(123, "x")`` did not raise TypeError.

    Safe: ValueError / TypeError as stated, and nothing created in the current directory."""
    call, expected = BAD_API[case]
    result = run_as(None, [sys.executable, "-c", CALL, call], scene.env, timeout=TIMEOUT,
                    cwd=scene.cwd)
    assert result.returncode == 0, result.stderr
    raised, message = json.loads(result.stdout.splitlines()[-1])
    assert os.listdir(scene.cwd) == [], f"created in the current directory: " \
                                        f"{os.listdir(scene.cwd)}"
    assert expected in raised, f"{call}: {raised[0]} {message}"


# == Robustness ========================================================================


def test_ledger_replaced_by_a_directory_is_rebuilt(http_dataset, scene):
    """Finding 15: bob replaces ``ledger.sqlite3`` by a directory; every command then
    exited 1.

    Safe: root's ``summary`` exits 0 (the bad ledger moved aside and a new one built), the
    next ``summary`` too, and both count the cached items right."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100, "b.txt": b"b" * 200})
    access(scene, alice, ds, ["a.txt", "b.txt"])
    ledger = scene.bk("ledger.sqlite3")
    plant(bob, scene, *[("aside", ledger + s) for s in ("", "-wal", "-shm")],
          ("mkdir", ledger))
    for _ in range(2):
        summary = json_of(command(scene, "summary", "--json"))
        assert (summary["num_items"], summary["total_size_bytes"]) == (2, 300)


def _names_holder(data, user, pid) -> bool:
    """Is there, somewhere in ``data`` (parsed JSON), an object naming ``user`` and ``pid``?"""
    if isinstance(data, dict):
        values = list(data.values())
        has_pid = any(v == pid or v == str(pid) for v in values if not isinstance(v, bool))
        has_user = any(isinstance(v, str) and v.split("@")[0] == user for v in values)
        return (has_pid and has_user) or any(_names_holder(v, user, pid) for v in values)
    if isinstance(data, list):
        return any(_names_holder(v, user, pid) for v in data)
    return False


def test_summary_names_who_holds_the_autoclean_lock(http_dataset, scene):
    """Finding 16: bob keeps an exclusive flock on ``autoclean.lock`` for ever, which
    silently disables housekeeping: ``summary`` only said "one is running now".

    Safe: ``summary`` (text and --json) names the holder: bob's user name and the real pid
    of his process."""
    alice, bob = scene.users["alice"], scene.users["bob"]
    ds = http_dataset({"a.txt": b"a" * 100})
    access(scene, alice, ds, ["a.txt"])
    limit = {"DTOOL_CACHE_MAX_SIZE": "1GB"}
    safe(command(scene, "autoclean", extra_env=limit), allow=(0,))  # the lock file exists
    legacy_layout(scene.cache)
    with FlockHolder(bob, scene.bk("autoclean.lock"), scene.env) as squatter:
        if squatter.refused:
            pytest.fail(f"bob may not even read autoclean.lock: {squatter.refused}")
        text = safe(command(scene, "summary", extra_env=limit), allow=(0,)).stdout
        data = json_of(command(scene, "summary", "--json", extra_env=limit))
    pid = re.compile(rf"(?<!\d){squatter.pid}(?!\d)")
    assert any(re.search(r"\bbob\b", line) and pid.search(line) for line in text.splitlines()
               ), f"summary does not name bob (pid {squatter.pid}):\n{text}"
    assert _names_holder(data, "bob", squatter.pid), data.get("housekeeping")
