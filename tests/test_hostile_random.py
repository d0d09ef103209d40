"""A hostile member of a shared cache, at random: nothing bob does may make the plugin, run
by someone else (root included), step outside the cache, leak a file, hang, crash, or remove
what a live process holds.

The threat model: a shared cache is a directory a unix group can write, so any member can
create, rename, replace and remove any entry the group can write, at any moment -- also while
other users' commands run.  The data manager runs ``dtool cache`` commands as root.

Setup: users alice, bob (members) in a group cache (root:dcmshare 2775) with two datasets
served over HTTP; alice accesses some items, and a process of hers keeps two of them held for
the whole test.  Outside the cache: a sentinel tree of root's, named like cache entries, a
root-only secret, and a scratch file of bob's (for hard links).

Each round (``random.Random`` seeded by ``DCM_HOSTILE_SEED``, or a fresh seed printed as
``hostile seed: N``; ``DCM_HOSTILE_ROUNDS`` rounds, 300 by default):

1. bob (a helper process running as bob, see ``support/hostile.py``) replaces one entry of
   the bookkeeping or of the cached content with a hostile thing (a symlink out, a FIFO, a
   directory, a hard link to his file, a 40 GiB sparse file, garbage, JSON of the wrong
   shape, forged records); or, one round in four, he races: swaps an entry with a symlink out
   of the cache back and forth (``renameat2(RENAME_EXCHANGE)``), or whenever inotify says
   someone opened it, until the command ends.  What the kernel refuses is counted, not an
   error: hardened bookkeeping should refuse a lot.
2. One command runs: ``summary``, ``ls``, ``audit``, ``clean --all --yes``, ``verify --fix``
   or ``autoclean`` as root (each ``--json``), or data accesses as alice; each at least 30
   times in 300 rounds.
3. Then: the sentinel tree is unchanged (content, modes, owners, entries, and access times:
   nothing read it), bob's scratch file was not written through a link, the secret is in no
   file under the cache, the command neither hung nor crashed (exit 0, or 1 with a one-line
   ``Error:`` or JSON on stdout), and alice's held items and her holding process are intact.
   An access of alice's may fail with the broker's own error when bob replaced the item's
   directory (upstream behaviour); it must not fail or hang in the plugin.

Nothing is undone between rounds: the damage accumulates, as it would.  A failure names the
seed and round; ``DCM_HOSTILE_SEED=S DCM_HOSTILE_ROUNDS=R`` replays the same choices (the
file system's timing may still differ).  ``DCM_HOSTILE_KEEP_GOING=1`` records every failure
(repairing the sentinel after each) and fails at the end; ``DCM_HOSTILE_TIMEOUT`` sets the
per-command timeout (60 s).
"""

import collections
import hashlib
import json
import os
import random
import secrets
import shutil
import socket
import stat
import sys
import time

import pytest

from support import VENV_BIN, subprocess_env
from support.hostile import (META, SPARSE_BYTES, VICTIM_ACCESS, Agent, ForgeryContext,
                             build_sentinel, compare_snapshots, files_containing, forged,
                             garbage, hung_in_plugin, json_wrong, latin1, list_dir,
                             plugin_error_type, raised_by_plugin, run_command, snapshot, tail)
from support.users import (HoldingChild, make_group_cache, needs_root, python_access, remove_tree,
                           shared_tmp)

pytestmark = needs_root

ROUNDS = int(os.environ.get("DCM_HOSTILE_ROUNDS", "300"))
KEEP_GOING = os.environ.get("DCM_HOSTILE_KEEP_GOING", "").strip() not in ("", "0")
TIMEOUT = float(os.environ.get("DCM_HOSTILE_TIMEOUT", "60"))
RACE_SHARE = 0.25  # rounds in which bob races the command instead of replacing before it
CLEANUP_EVERY = 50  # bob removes his sparse files (and lets go of his locks) this often
DTOOL_CACHE = os.path.join(VENV_BIN, "dtool-cache")

COMMANDS = {
    "summary": ["summary", "--json"],
    "ls": ["ls", "--json"],
    "audit": ["audit", "--json"],
    "clean": ["clean", "--all", "--yes", "--json"],
    "verify-fix": ["verify", "--fix", "--json"],
    "autoclean": ["autoclean", "--json"],
    "victim": None,  # alice's data accesses
}
EXTRA_PER_BLOCK = 3  # each block of rounds runs every command once, plus this many at random

KINDS = ("link_dir", "link_secret", "link_dangling", "link_scratch", "fifo", "dir_empty",
         "dir_files", "hardlink", "sparse", "garbage", "json_wrong", "forged")
META_FILES = ("gate.lock", "fetch.lock", "autoclean.lock", "autoclean.log", "autoclean.json",
              "ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm")
TARGETS = ("meta_dir", "holds_dir", "journal_dir", "holds_file", "holds_file",
           "journal_file", "journal_file", *META_FILES, "dataset_dir", "item_file",
           "item_file", "item_tmp")

DS1 = {"a.txt": b"a" * 100, "b.txt": b"b" * 200, "c.txt": b"c" * 300, "d.txt": b"d" * 400,
       "e.bin": b"e" * 500}
DS2 = {"f.txt": b"f" * 150, "g.txt": b"g" * 250, "h.dat": b"h" * 350, "i.txt": b"i" * 450}
HELD = ("a.txt", "b.txt")  # alice's holding process keeps these (of DS1) for the whole test


def schedule(seed: int, rounds: int):
    """The command of each round: blocks of every command once plus a few at random, so each
    runs at least rounds // 10 times, and a shorter run is a prefix of a longer one."""
    names = list(COMMANDS)
    order, block = [], 0
    while len(order) < rounds:
        rng = random.Random(f"{seed}/schedule/{block}")
        chunk = names + [rng.choice(names) for _ in range(EXTRA_PER_BLOCK)]
        rng.shuffle(chunk)
        order += chunk
        block += 1
    return order[:rounds]


class Failed(AssertionError):
    pass


class Game:
    def __init__(self, seed, base, users):
        self.seed = seed
        self.base = base
        self.users = users
        self.alice, self.bob = users["alice"], users["bob"]
        self.host = socket.gethostname()
        self.failures = []
        self.history = collections.deque(maxlen=6)  # bob's latest moves, for the messages
        self.where = "setup"
        self.round = -1
        self.reported_leaks = set()
        self.held_check = True
        self.holder = self.agent = None
        self.started = time.monotonic()
        self.cmd_seconds = collections.defaultdict(list)
        self.cmd_status = collections.defaultdict(collections.Counter)
        self.by_kind = collections.defaultdict(collections.Counter)
        self.by_target = collections.defaultdict(collections.Counter)
        self.races = collections.defaultdict(collections.Counter)
        self.victim_stats = collections.Counter()
        self.scratch_upstream = 0

    def setup(self, http_dataset):
        base = self.base
        self.cache = make_group_cache(base)
        self.meta = os.path.join(self.cache, META)
        self.env = subprocess_env(self.cache, {"PYTHONFAULTHANDLER": "1"})
        self.env.pop("DTOOL_CACHE_MAX_SIZE", None)
        self.env.pop("DTOOL_CACHE_MAX_AGE", None)
        self.env_limit = dict(self.env, DTOOL_CACHE_MAX_SIZE="1KB")
        self.ds1, self.ds2 = http_dataset(DS1), http_dataset(DS2)
        self.items = []
        for ds, contents in ((self.ds1, DS1), (self.ds2, DS2)):
            for relpath, content in contents.items():
                path = str(ds.cache_path(self.cache, relpath))
                self.items.append(dict(
                    ds=ds, item=relpath, identifier=ds.identifiers[relpath], path=path,
                    relpath=os.path.relpath(path, self.cache), name=os.path.basename(path),
                    uri=ds.uri, uuid=ds.uuid, size=len(content),
                    md5=hashlib.md5(content).hexdigest()))
        self.held = [i for i in self.items if i["ds"] is self.ds1 and i["item"] in HELD]

        # alice uses the cache; her holding process keeps two items for the whole test.
        for ds, names in ((self.ds1, ["a.txt", "b.txt", "c.txt"]), (self.ds2, ["f.txt"])):
            done = python_access(self.alice, ds.uri, [ds.identifiers[n] for n in names],
                                 self.env)
            assert done.returncode == 0, done.stderr
        self.start_holder()
        # The data manager has looked at the cache once before bob starts.
        ran = run_command([DTOOL_CACHE, "summary", "--json"], self.env, TIMEOUT, cwd=base)
        assert ran.returncode == 0 and "Traceback" not in ran.stderr, ran.stderr

        self.outside = os.path.join(base, "outside")
        self.token = b"SECRET-" + secrets.token_hex(16).encode()
        self.build_sentinel()
        self.scratch = os.path.join(base, "bob-scratch")
        self.make_scratch()
        self.agent = Agent(self.bob, self.env, os.path.join(base, "bob-agent.stderr"))
        self.setup_seconds = time.monotonic() - self.started

    # -- fixtures of the game ------------------------------------------------------------

    def start_holder(self):
        self.holder = HoldingChild(self.alice, self.ds1.uri,
                                   [i["identifier"] for i in self.held], self.env)

    def build_sentinel(self):
        if os.path.lexists(self.outside):
            shutil.rmtree(self.outside)
        self.sentinel = build_sentinel(self.outside, self.token, self.host, [
            {k: i[k] for k in ("relpath", "name", "uri", "uuid", "identifier", "size")}
            for i in self.items])
        self.before = snapshot(self.outside)
        self.outside_files = sorted(
            os.path.join(self.outside, os.fsdecode(rel)) for rel, e in self.before.items()
            if e.kind == "file")

    def make_scratch(self):
        with open(self.scratch, "wb"):
            pass
        os.chown(self.scratch, self.bob.uid, self.bob.gid)
        os.chmod(self.scratch, 0o666)

    def scratch_state(self):
        try:
            st = os.lstat(self.scratch)
        except FileNotFoundError:
            return None
        with open(self.scratch, "rb") as fh:
            digest = hashlib.sha256(fh.read(64 << 20)).hexdigest()
        return dict(digest=digest, mode=oct(st.st_mode), uid=st.st_uid, gid=st.st_gid,
                    size=st.st_size, mtime_ns=st.st_mtime_ns)

    def alice_token(self):
        try:
            for name in list_dir(os.path.join(self.meta, "holds")):
                if f".{self.holder.pid}.".encode() in name:
                    return os.fsdecode(name)
        except OSError:
            pass
        return f"{self.host}.{self.holder.pid}.00000000"

    def forgery(self):
        token = self.alice_token()
        return ForgeryContext(self.host, self.cache, self.items, self.outside_files, [
            f"{META}/gate.lock", f"{META}/ledger.sqlite3", f"{META}/holds/{token}",
            f"{META}/journal/{token}.s0.jsonl", f"{META}/holds", META])

    # -- failures ------------------------------------------------------------------------

    def fail(self, what):
        earlier = "".join(f"\n    {move}" for move in list(self.history)[:-1])
        msg = (f"hostile seed {self.seed}, round {self.round}: {self.where}\n  {what}\n"
               f"  replay: DCM_HOSTILE_SEED={self.seed} DCM_HOSTILE_ROUNDS={self.round + 1}"
               + (f"\n  bob's moves in the rounds before (the damage accumulates):{earlier}"
                  if earlier else ""))
        self.failures.append(msg)
        print("\nFAILURE " + msg, flush=True)
        if not KEEP_GOING:
            raise Failed(msg)

    # -- bob's moves ---------------------------------------------------------------------

    def pick_target(self, rng):
        role = rng.choice(TARGETS)
        meta = self.meta
        if role == "meta_dir":
            return role, meta
        if role in ("holds_dir", "journal_dir"):
            return role, os.path.join(meta, role.split("_")[0])
        if role in META_FILES:
            return role, os.path.join(meta, role)
        if role in ("holds_file", "journal_file"):
            directory = os.path.join(meta, role.split("_")[0])
            try:
                existing = [os.fsdecode(n) for n in list_dir(directory)]
            except OSError:
                existing = []
            if existing and rng.random() < 0.6:
                return role, os.path.join(directory, rng.choice(existing))
            token = f"{self.host}.{rng.randint(2, 4_000_000)}.{rng.getrandbits(32):08x}"
            names = (["h.x.1", token, token + ".new"] if role == "holds_file"
                     else ["x.jsonl", token + ".jsonl", token + ".s0.jsonl", "journal.jsonl"])
            return role, os.path.join(directory, rng.choice(names))
        if role == "dataset_dir":
            return role, os.path.join(self.cache, self.ds2.name)  # DS1's holds alice's items
        item = rng.choice(self.items)
        if role == "item_tmp":
            return role, item["path"] + ".tmp"
        item = rng.choice([i for i in self.items if i not in self.held])
        return role, item["path"]

    def counterpart(self, path):
        """The sentinel directory playing the part of ``path`` (a cache directory)."""
        s = self.sentinel.dirs
        return {self.meta: s["meta"], os.path.join(self.meta, "holds"): s["holds"],
                os.path.join(self.meta, "journal"): s["journal"], self.cache: s["root"],
                os.path.join(self.cache, self.ds1.name): s["ds"],
                os.path.join(self.cache, self.ds2.name): s["ds"]}.get(path)

    def replace_request(self, rng, role, path, kind):
        s = self.sentinel.dirs
        aside = rng.choice([f".bob-{rng.getrandbits(32):08x}",
                            f"{os.path.basename(path)}.{rng.getrandbits(16):04x}"])
        req = {"op": "replace", "path": path, "kind": kind, "aside": aside,
               "how": rng.choice(["aside", "remove"])}
        content_role = ("holds" if role.startswith("holds") else
                        "autoclean" if role.startswith("autoclean.") else "journal")
        if kind == "link_dir":
            mine = self.counterpart(path)
            req["target"] = mine if mine and rng.random() < 0.6 else rng.choice(list(s.values()))
        elif kind == "link_secret":
            req["target"] = self.sentinel.secret_path
        elif kind == "link_dangling":
            directory = rng.choice([s["void"], s["void"], s["meta"], s["holds"], s["journal"],
                                    s["ds"]])
            name = os.path.basename(path)
            if os.path.lexists(os.path.join(directory, name)):
                name = "missing-" + name
            req["target"] = os.path.join(directory, name)
        elif kind == "link_scratch":
            req["target"] = self.scratch
        elif kind in ("dir_empty", "dir_files"):
            req["mode"] = rng.choice([0o755, 0o2775, 0o777, 0o700])
            if kind == "dir_files":
                req["files"] = self.dir_files(rng, role)
        elif kind == "hardlink":
            req["scratch"] = self.scratch
        elif kind == "sparse":
            req["size"] = SPARSE_BYTES
        elif kind == "garbage":
            req["data"] = latin1(garbage(rng))
        elif kind == "json_wrong":
            header = None
            if rng.random() < 0.5:
                header = (["h", 1, "bob", self.host, 4242, time.time()]
                          if content_role == "holds" else
                          ["j", 1, "bob", self.host, 4242, time.time()])
            req["data"] = latin1(json_wrong(rng, header))
        elif kind == "forged":
            req["data"] = latin1(forged(rng, content_role, self.forgery()))
        parent = os.path.basename(os.path.dirname(path))
        if parent == "holds" or role == "autoclean.lock":
            req["flock"] = rng.random() < 0.7  # looks like a live process's file
        return req

    def dir_files(self, rng, role):
        files = []
        for n in range(rng.randint(1, 3)):
            if role == "holds_dir":
                name = f"{self.host}.{rng.randint(2, 99999)}.{rng.getrandbits(32):08x}"
                data = forged(rng, "holds", self.forgery())
            elif role == "journal_dir":
                name = f"x{n}.jsonl"
                data = forged(rng, "journal", self.forgery())
            else:
                name = rng.choice([f"{rng.getrandbits(160):040x}.txt", f"x{n}.jsonl",
                                   "ledger.sqlite3", f"a{n}.tmp", "gate.lock"])
                data = garbage(rng) if rng.random() < 0.5 else forged(rng, "journal",
                                                                     self.forgery())
            if name not in dict(files):
                files.append((name, latin1(data)))
        return files

    def bob_replaces(self, rng):
        role, path = self.pick_target(rng)
        kind = rng.choice(KINDS)
        req = self.replace_request(rng, role, path, kind)
        answer = self.agent.request(req)
        result = answer["result"]
        self.by_kind[kind][result] += 1
        self.by_target[role][result] += 1
        desc = (f"bob replaced {os.path.relpath(path, self.cache)} ({role}) by {kind} "
                f"[{req['how']}{', flocked' if answer.get('flocked') else ''}]")
        if result != "done":
            desc = (f"bob tried to replace {os.path.relpath(path, self.cache)} ({role}) by "
                    f"{kind} [{req['how']}]: {result} at {answer['step']} ({answer['error']})")
        return desc

    def race_request(self, rng):
        s = self.sentinel.dirs
        meta = self.meta
        if rng.random() < 0.6:
            pairs = [(meta, s["meta"]), (os.path.join(meta, "holds"), s["holds"]),
                     (os.path.join(meta, "journal"), s["journal"]),
                     (os.path.join(self.cache, self.ds1.name), s["ds"]),
                     (os.path.join(self.cache, self.ds2.name), s["ds"]),
                     (os.path.join(meta, "ledger.sqlite3"),
                      os.path.join(s["meta"], "ledger.sqlite3")),
                     (os.path.join(meta, "autoclean.json"), self.sentinel.secret_path),
                     (os.path.join(meta, "gate.lock"), os.path.join(s["meta"], "gate.lock"))]
            token = self.alice_token()
            pairs.append((os.path.join(meta, "journal", token + ".s0.jsonl"),
                          os.path.join(s["journal"], f"{self.host}.1.deadbeef.jsonl")))
            item = rng.choice([i for i in self.items if i not in self.held])
            pairs.append((item["path"], os.path.join(s["ds"], item["name"])))
            real, target = rng.choice(pairs)
            link = os.path.join(os.path.dirname(real), f".x-{rng.getrandbits(32):08x}")
            return {"op": "race", "mode": "exchange", "real": real, "link": link,
                    "target": target}
        watched = rng.choice([self.cache, meta, os.path.join(meta, "holds"),
                              os.path.join(meta, "journal"),
                              os.path.join(self.cache, self.ds1.name),
                              os.path.join(self.cache, self.ds2.name)])
        names = {META: s["meta"], self.ds1.name: s["ds"], self.ds2.name: s["ds"],
                 "holds": s["holds"], "journal": s["journal"]}
        return {"op": "race", "mode": "inotify", "dir": watched,
                "dir_target": self.counterpart(watched), "entry_dir": self.counterpart(watched),
                "names": names, "fallback": self.sentinel.secret_path}

    def bob_races(self, rng):
        req = self.race_request(rng)
        answer = self.agent.request(req)
        mode, result = req["mode"], answer["result"]
        self.races[mode][result] += 1
        what = req.get("real") or req["dir"]
        desc = (f"bob races ({mode}) on {os.path.relpath(what, self.cache)}"
                if result == "started" else
                f"bob could not race ({mode}) on {os.path.relpath(what, self.cache)}: "
                f"{result} at {answer['step']} ({answer['error']})")
        return desc, result == "started", mode

    # -- one round -----------------------------------------------------------------------

    def play(self, rounds):
        order = schedule(self.seed, rounds)
        for self.round, command in enumerate(order):
            rng = random.Random(f"{self.seed}/{self.round}")
            if self.round and self.round % CLEANUP_EVERY == 0:
                self.agent.request({"op": "cleanup"})
            racing = rng.random() < RACE_SHARE
            if racing:
                action, started, mode = self.bob_races(rng)
            else:
                action, started = self.bob_replaces(rng), False
            self.where = f"`{command}` after: {action}"
            self.history.append(f"round {self.round}: {action}")
            scratch_before = self.scratch_state()
            try:
                if command == "victim":
                    outcome = self.victim_round(rng)
                else:
                    outcome = self.root_round(command)
            finally:
                if started:
                    stopped = self.agent.request({"op": "stop"})
                    self.races[mode]["swaps"] += stopped["swaps"]
                    self.races[mode]["inotify events"] += stopped["events"]
                    note = f" (swapped {stopped['swaps']} times"
                    if stopped["unrestored"]:
                        self.races[mode]["unrestored"] += 1
                        note += f"; bob could not put back {stopped['unrestored']}"
                    self.where += note + ")"
            self.check(command, outcome, scratch_before)

    def root_round(self, command):
        env = self.env_limit if command == "autoclean" else self.env
        ran = run_command([DTOOL_CACHE, *COMMANDS[command]], env, TIMEOUT, cwd=self.base)
        self.cmd_seconds[command].append(ran.seconds)
        self.cmd_status[command]["timeout" if ran.timed_out else ran.returncode] += 1
        shown = f"`dtool-cache {' '.join(COMMANDS[command])}` as root"
        if ran.timed_out:
            self.fail(f"{shown} hung (no exit within {TIMEOUT:.0f} s); its stacks:\n"
                      f"{tail(ran.stderr, 40)}")
        elif "Traceback" in ran.stderr:
            self.fail(f"{shown} crashed (exit {ran.returncode}):\n{tail(ran.stderr, 30)}")
        elif ran.returncode not in (0, 1):
            self.fail(f"{shown} exited {ran.returncode}:\n{tail(ran.stderr)}")
        else:
            try:
                json.loads(ran.stdout)
                parsed = True
            except ValueError:
                parsed = False
            last = (ran.stderr.strip().splitlines() or [""])[-1]
            if ran.returncode == 0 and not parsed:
                self.fail(f"{shown} exited 0 without JSON on stdout: {ran.stdout[-500:]!r}")
            elif ran.returncode == 1 and not (parsed or last.startswith("Error:")):
                self.fail(f"{shown} exited 1 with neither JSON nor a one-line error:\n"
                          f"{tail(ran.stderr)}")
        return {"ran": ran, "scratch_upstream": False}

    def victim_round(self, rng):
        chosen = rng.sample(self.items, rng.randint(2, 4))
        pairs, scratch_upstream = [], False
        try:
            scratch_id = (os.stat(self.scratch).st_dev, os.stat(self.scratch).st_ino)
        except OSError:
            scratch_id = None
        for item in chosen:
            tmp = item["path"] + ".tmp"
            try:
                st = os.lstat(tmp)
            except OSError:
                st = None
            if st is not None and stat.S_ISFIFO(st.st_mode):
                # The broker opens '<item>.tmp' for writing and would wait for a reader
                # forever: upstream behaviour, not the plugin's.
                self.victim_stats["skipped: FIFO at .tmp (upstream would hang)"] += 1
                continue
            if st is not None and self.leads_to(tmp, scratch_id) and not self.cached(item):
                # A miss: the broker writes '<item>.tmp', through a link to bob's file too.
                scratch_upstream = True
            pairs.append([item["uri"], item["identifier"]])
        if not pairs:
            return {"ran": None, "scratch_upstream": scratch_upstream}
        argv = [sys.executable, "-c", VICTIM_ACCESS, str(max(TIMEOUT - 10, 5)),
                json.dumps(pairs)]
        ran = run_command(argv, self.env, TIMEOUT, user=self.alice)
        self.cmd_seconds["victim"].append(ran.seconds)
        self.cmd_status["victim"]["timeout" if ran.timed_out else ran.returncode] += 1
        shown = f"alice's access of {len(pairs)} items"
        if self.token in ran.stdout.encode() or self.token in ran.stderr.encode():
            self.fail(f"{shown} showed alice the root-only secret:\n{tail(ran.stderr)}")
        faulthandler_timeout = "Timeout (" in ran.stderr
        if ran.timed_out or faulthandler_timeout:
            if hung_in_plugin(ran.stderr) or ran.timed_out:
                self.fail(f"{shown} hung in the plugin; its stacks:\n{tail(ran.stderr, 40)}")
            else:
                self.victim_stats["hung upstream (broker)"] += 1
            return {"ran": ran, "scratch_upstream": scratch_upstream}
        if "Traceback" in ran.stderr and "dtool_cache_manager" in ran.stderr:
            self.fail(f"{shown} printed a traceback through the plugin (exit "
                      f"{ran.returncode}):\n{tail(ran.stderr, 30)}")
        if ran.returncode not in (0, 3):
            self.fail(f"{shown} exited {ran.returncode}:\n{tail(ran.stderr, 30)}")
        for line in ran.stdout.splitlines():
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if report["ok"]:
                self.victim_stats["ok"] += 1
            elif not raised_by_plugin(report["frames"]):
                self.victim_stats["failed upstream (broker)"] += 1
            elif plugin_error_type(report["type"]):
                # The plugin refused on purpose, with an error of its own, e.g. to hand out
                # an item bob damaged and it could not repair: a refusal, not a crash.
                self.victim_stats[f"refused by the plugin ({report['type']})"] += 1
            else:
                self.victim_stats["crashed in the plugin"] += 1
                self.fail(f"{shown}: the plugin raised {report['error']} "
                          f"(frames {report['frames'][-4:]})")
        return {"ran": ran, "scratch_upstream": scratch_upstream}

    @staticmethod
    def leads_to(path, file_id):
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == file_id

    @staticmethod
    def cached(item):
        try:
            return os.stat(item["path"]).st_size == item["size"]
        except OSError:
            return False

    # -- the checks ----------------------------------------------------------------------

    def check(self, command, outcome, scratch_before):
        # Outside the cache: nothing created, written, chmod'ed, chown'ed, removed or read.
        diffs = compare_snapshots(self.before, snapshot(self.outside))
        if diffs:
            shown = "\n    ".join(diffs[:15])
            more = f"\n    ... and {len(diffs) - 15} more" if len(diffs) > 15 else ""
            self.fail(f"outside the cache, root's sentinel tree changed:\n    {shown}{more}")
            self.build_sentinel()  # only reached with KEEP_GOING
        # bob's own file outside: not written, chmod'ed or chown'ed through a link.
        scratch_after = self.scratch_state()
        if scratch_after != scratch_before:
            if outcome["scratch_upstream"] and scratch_after is not None:
                self.scratch_upstream += 1  # the broker wrote '<item>.tmp' through bob's link
            else:
                self.fail(f"bob's file outside the cache changed: {scratch_before} -> "
                          f"{scratch_after}")
                if scratch_after is None:
                    self.make_scratch()
        # The secret: in no file under the cache (nor anywhere else in the sentinel tree).
        leaks = [p for p in files_containing([self.cache, self.outside], self.token,
                                             skip_uid=self.bob.uid,
                                             exclude=[self.sentinel.secret_path])
                 if p not in self.reported_leaks]
        if leaks:
            self.reported_leaks.update(leaks)
            self.fail(f"the root-only secret was copied into {leaks}")
        # alice's held items: still there, unchanged; her holding process alive.
        if self.held_check:
            lost = []
            for item in self.held:
                try:
                    st = os.lstat(item["path"])
                    with open(item["path"], "rb") as fh:
                        md5 = hashlib.md5(fh.read()).hexdigest()
                    if not stat.S_ISREG(st.st_mode) or md5 != item["md5"]:
                        lost.append(f"{item['relpath']} changed")
                except OSError as exc:
                    lost.append(f"{item['relpath']}: {exc.strerror}")
            if lost:
                self.fail(f"items alice's live process (pid {self.holder.pid}) holds were "
                          f"removed or changed: {lost}")
                done = python_access(self.alice, self.ds1.uri,
                                     [i["identifier"] for i in self.held], self.env)
                self.held_check = done.returncode == 0
        if self.holder.proc.poll() is not None:
            self.fail(f"alice's holding process died (exit {self.holder.proc.returncode}): "
                      f"{tail(self.holder.proc.stderr.read())}")
            self.start_holder()
        if self.agent.proc.poll() is not None:
            raise AssertionError("bob's agent died (a fault of the test)")

    # -- the end -------------------------------------------------------------------------

    def report(self):
        lines = [f"\nhostile seed {self.seed}: {self.round + 1} rounds in "
                 f"{time.monotonic() - self.started:.1f} s (setup {self.setup_seconds:.1f} s)"
                 if hasattr(self, "setup_seconds") else f"\nhostile seed {self.seed}"]
        lines.append(f"{'command':12} {'rounds':>6} {'mean s':>7} {'max s':>7}  exit statuses")
        for command in COMMANDS:
            secs = self.cmd_seconds.get(command, [])
            if secs:
                lines.append(f"{command:12} {len(secs):6d} {sum(secs) / len(secs):7.2f} "
                             f"{max(secs):7.2f}  {dict(self.cmd_status[command])}")
            else:
                lines.append(f"{command:12} {0:6d}")
        lines.append(f"alice's accesses: {dict(self.victim_stats)}; bob's file written by "
                     f"the broker through a '.tmp' link: {self.scratch_upstream}")
        lines.append(f"{'bob: kind':16} {'done':>5} {'refused':>8} {'failed':>7}")
        for kind in KINDS:
            c = self.by_kind.get(kind, collections.Counter())
            lines.append(f"{kind:16} {c['done']:5d} {c['refused']:8d} {c['failed']:7d}")
        lines.append(f"{'bob: target':20} {'done':>5} {'refused':>8} {'failed':>7}")
        for target in dict.fromkeys(TARGETS):
            c = self.by_target.get(target, collections.Counter())
            lines.append(f"{target:20} {c['done']:5d} {c['refused']:8d} {c['failed']:7d}")
        for mode, c in sorted(self.races.items()):
            lines.append(f"races ({mode}): {dict(c)}")
        if self.failures:
            lines.append(f"{len(self.failures)} failure(s); the first at round "
                         f"{self.failures[0].split('round ', 1)[1].split(':', 1)[0]}")
        print("\n".join(lines), flush=True)

    def close(self):
        if self.agent is not None:
            try:
                self.agent.request({"op": "stop"}, timeout=30)
            except AssertionError:
                pass
            self.agent.close()
        if self.holder is not None:
            self.holder.kill()


@pytest.mark.timeout(3600)
def test_a_hostile_member_cannot_turn_the_plugin_against_others(http_dataset, users):
    seed_text = os.environ.get("DCM_HOSTILE_SEED", "").strip()
    seed = int(seed_text) if seed_text else random.SystemRandom().randrange(2 ** 32)
    print(f"\nhostile seed: {seed}", flush=True)
    base = shared_tmp("dcm-hostile-random-")
    game = None
    try:
        game = Game(seed, base, users)
        game.setup(http_dataset)
        game.play(ROUNDS)
    finally:
        if game is not None:
            game.report()
            game.close()
        remove_tree(base)
    if game.failures:
        raise Failed(f"{len(game.failures)} failure(s):\n" + "\n".join(game.failures[:20]))
