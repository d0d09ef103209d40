"""Fault injection: SIGKILL at random moments to processes that access, compact, audit and
clean one cache, with a real HTTP broker on loopback, checking the invariants after every kill.

Each iteration starts a victim and one or two companions (cheap ``python -c`` children that
say "ready", wait for "go" on stdin, then loop their role), kills the victim at a random
moment, lets each companion finish at least one more round (so a kill that wedged a lock
would show as a hang), stops the companions through stdin, and checks:

- the ledger passes ``PRAGMA integrity_check`` (read with sqlite3 directly, before the
  package could move a damaged ledger aside) and no ledger was ever moved aside;
- per item, the usage history is >= the accesses the children reported done and <= the
  accesses they started (a kill loses at most the access in flight, never invents one);
- after a reconcile, no ``items`` row points at a missing file, and inventory lists every
  regular file on disk exactly once, tracked or untracked;
- no hold of the killed pid survives, and once every child is dead no item is held and every
  journal has been folded in and removed.

The next iteration's children start (and wait at their barrier, touching nothing in the
cache) while the current one runs, to keep the test short on a small machine.

Replay the random choices with ``DCM_FAULT_SEED=<seed>`` (printed at the start and in every
failure message); ``DCM_FAULT_ITERATIONS`` sets the number of kills (default 200).
"""

import collections
import json
import os
import random
import sqlite3
import sys
import threading
import time

import pytest

import dtool_cache_manager as dcm
from dtool_cache_manager import report
from support import Bookkeeping, disk_files, holds_now
from support.procs import Children

pytestmark = pytest.mark.slow

ROLES = ("accessor", "compactor", "auditor", "cleaner")
BIG_BYTES = 2 * 1024 * 1024
THROTTLE_BYTES_PER_S = 16 * 1024 * 1024  # the big item takes ~0.13 s: kills land mid-download
KILL_WINDOW_S = 0.25
# Each companion completes at least this many rounds (one of them after the kill).
MIN_ROUNDS = {"accessor": 10, "compactor": 3, "auditor": 3, "cleaner": 3}
LIVENESS_TIMEOUT_S = 60.0  # a companion stuck this long after a kill is a wedged lock
CHILD_MAX_LOOPS = 100_000  # a child stops by itself after this many rounds (bounded loop)
CHILD_MAX_SECONDS = 120.0  # ... or after this long, should the parent never say "stop"

# argv: role, cache_dir, uri, seed, retain_bytes, identifiers (JSON), big identifier.
# Output: accessors "start <id>" / "done <id>" around each access, cleaners "removed <n>",
# the others "round" after each round; every child "exit <rounds>" when told to stop.
CHILD = """
import json, os, random, sys, threading, time
role, cache_dir, uri, seed, retain = sys.argv[1:6]
ids, big = json.loads(sys.argv[6]), sys.argv[7]
rng = random.Random(int(seed))
retain = int(retain)
import dtool_cache_manager as dcm
if role == "accessor":
    import dtoolcore
    ds = dtoolcore.DataSet.from_uri(uri)
    assert sorted(ds.identifiers) == ids
elif role == "auditor":
    from dtool_cache_manager import audit
elif role == "cleaner":
    from dtool_cache_manager import planning, report
    from dtool_cache_manager.policies import Rules
    rules = Rules(retain_size_bytes=retain)
else:
    import dtool_cache_manager.api

print("ready", flush=True)
assert sys.stdin.readline().strip() == "go"
stop = threading.Event()


def watch_stdin():
    sys.stdin.readline()  # "stop", or EOF if the parent went away
    stop.set()


threading.Thread(target=watch_stdin, daemon=True).start()
out = sys.stdout
deadline = time.monotonic() + %(max_seconds)r
rounds = 0
while not stop.is_set() and rounds < %(max_loops)d and time.monotonic() < deadline:
    rounds += 1
    if role == "accessor":
        ident = big if rng.random() < 0.25 else rng.choice(ids)
        out.write("start " + ident + "\\n")
        out.flush()
        if rng.random() < 0.8:
            with dcm.hold_scope():
                ds.item_content_abspath(ident)
        else:
            ds.item_content_abspath(ident)  # held until this process ends
        out.write("done " + ident + "\\n")
    elif role == "compactor":
        with dcm.open_ledger(cache_dir):
            pass
        out.write("round\\n")
    elif role == "auditor":
        with dcm.open_ledger(cache_dir) as ledger:
            audit.audit(ledger, "item")
        out.write("round\\n")
    elif rng.random() < 0.5:
        inv = report.inventory(cache_dir)
        plan = planning.plan_clean(inv, rules)
        with dcm.open_ledger(cache_dir) as ledger:
            result = plan.execute(ledger)
        out.write("removed %%d\\n" %% len(result.removed))
    else:
        removed = dcm.remove_cache_item_safely(uri, rng.choice(ids), cache_dir=cache_dir)
        out.write("removed %%d\\n" %% int(removed))
    out.flush()
print("exit", rounds, flush=True)
""" % {"max_seconds": CHILD_MAX_SECONDS, "max_loops": CHILD_MAX_LOOPS}


class Drain:
    """Read a child's stdout and stderr in threads, counting completed rounds as they come,
    so a full pipe never stalls the child and the parent can wait for progress."""

    def __init__(self, proc):
        self.proc = proc
        self.lines, self.err = [], []
        self._cond = threading.Condition()
        self.rounds = 0
        self.threads = [threading.Thread(target=self._read_out, daemon=True),
                        threading.Thread(target=self._read_err, daemon=True)]
        for t in self.threads:
            t.start()

    def _read_out(self):
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                if not line.startswith(("start ", "exit ")):
                    self.rounds += 1
                    self._cond.notify_all()
        with self._cond:
            self.rounds = float("inf")  # EOF: the child is gone, waiting is pointless
            self._cond.notify_all()

    def _read_err(self):
        self.err.append(self.proc.stderr.read())

    def wait_rounds(self, n, timeout):
        with self._cond:
            return self._cond.wait_for(lambda: self.rounds >= n, timeout)

    def join(self, timeout=60):
        """Wait for EOF on both pipes (the child is dead); return (lines, stderr)."""
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), f"pipes of pid {self.proc.pid} still open"
        return list(self.lines), "".join(self.err)


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _integrity(ledger_path):
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def _disk_files(cache_dir):
    return disk_files(cache_dir, partials=False)


def _count_lines(lines):
    """(starts, dones, removed, last start/done line) from one child's output."""
    starts, dones = collections.Counter(), collections.Counter()
    last = None
    removed = 0
    for line in lines:
        word, _, arg = line.partition(" ")
        if word == "start":
            starts[arg] += 1
            last = ("start", arg)
        elif word == "done":
            dones[arg] += 1
            last = ("done", arg)
        elif word == "removed":
            removed += int(arg)
    return starts, dones, removed, last


def _ledger_rows(ledger_path):
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT relpath, size_bytes FROM items"))
    finally:
        conn.close()


class CutDownloads:
    """Stands in for the server's ``handle_error``: counts downloads cut off by a killed
    client (a broken pipe in the server thread) instead of printing their tracebacks."""

    def __init__(self, original):
        self.original = original
        self.count = 0

    def __call__(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            self.count += 1
        else:
            self.original(request, client_address)


def test_sigkill_at_random_moments_keeps_every_invariant(http_dataset, http_server, cache_dir,
                                                         make_env, monkeypatch):
    iterations = int(os.environ.get("DCM_FAULT_ITERATIONS", "200"))
    seed = int(os.environ.get("DCM_FAULT_SEED") or random.randrange(1 << 30))
    print(f"seed={seed}")
    rng = random.Random(seed)

    item_rng = random.Random(seed)
    items = {f"small{i:02d}.bin": item_rng.randbytes(item_rng.randint(1000, 8000))
             for i in range(10)}
    items["big.bin"] = item_rng.randbytes(BIG_BYTES)
    ds = http_dataset(items)
    by_ident = {ident: relpath for relpath, ident in ds.identifiers.items()}
    big_ident = ds.identifiers["big.bin"]
    ids = sorted(by_ident)
    expected_relpath = {ident: os.path.relpath(ds.cache_path(cache_dir, relpath), cache_dir)
                        for relpath, ident in ds.identifiers.items()}
    retain = sum(len(c) for c in items.values()) // 3
    http_server.slow_item_bytes_per_s = THROTTLE_BYTES_PER_S
    cut = CutDownloads(http_server.handle_error)
    monkeypatch.setattr(http_server, "handle_error", cut)

    env = make_env(cache_dir)
    paths = Bookkeeping(cache_dir)
    ledger_path = paths.ledger
    starts, dones, counted = collections.Counter(), collections.Counter(), collections.Counter()
    kills, stats = collections.Counter(), collections.Counter()
    order = []

    def plan(i):
        """Roles of iteration i, victim first; every role is the victim equally often."""
        if i % len(ROLES) == 0:
            order[:] = rng.sample(ROLES, len(ROLES))
        victim_role = order[i % len(ROLES)]
        others = [r for r in ROLES if r != victim_role]
        companions = ["accessor"] if victim_role != "accessor" else [rng.choice(others)]
        if rng.random() < 0.4:
            companions.append(rng.choice([r for r in others if r not in companions]))
        roles = [victim_role] + companions
        argvs = [(role, cache_dir, ds.uri, rng.randrange(1 << 30), retain, json.dumps(ids),
                  big_ident)
                 for role in roles]
        return roles, rng.uniform(0, KILL_WINDOW_S), Children(CHILD, argvs, env)

    t0 = time.monotonic()
    upcoming = plan(0)
    try:
        for i in range(iterations):
            roles, delay, kids = upcoming
            upcoming = None
            victim_role, companions = roles[0], roles[1:]
            victim = kids.procs[0]
            where = f"seed={seed} iteration={i} victim={victim_role} pid={victim.pid} " \
                    f"roles={roles} delay={delay:.3f}s"
            try:
                kids.wait_ready()
                drains = [Drain(p) for p in kids.procs]
                kids.go()
                time.sleep(delay)  # fault timing, not synchronisation
                victim.kill()
                victim.wait()
                kills[victim_role] += 1
                if i + 1 < iterations:
                    upcoming = plan(i + 1)  # starts up and waits at its barrier meanwhile

                # While the companions still run: the ledger is sound, the victim holds
                # nothing, and everyone else still makes progress.
                if os.path.exists(ledger_path):
                    assert _integrity(ledger_path) == [("ok",)], where
                assert victim.pid not in {h.pid for hs in holds_now(cache_dir).paths.values()
                                          for h in hs}, where
                for proc, role, drain in zip(kids.procs[1:], companions, drains[1:]):
                    target = max(MIN_ROUNDS[role], drain.rounds + 1)
                    assert drain.wait_rounds(target, LIVENESS_TIMEOUT_S), (
                        f"{where}: {role} pid {proc.pid} made no progress after the kill")
                for proc in kids.procs[1:]:
                    proc.stdin.write("stop\n")
                    proc.stdin.flush()
                outputs = []
                for proc, drain in zip(kids.procs, drains):
                    proc.wait(timeout=120)
                    outputs.append(drain.join())
            finally:
                kids.kill_all()

            assert victim.returncode == -9, where
            for proc, role, (lines, err) in zip(kids.procs[1:], companions, outputs[1:]):
                assert proc.returncode == 0, f"{where}: {role} pid {proc.pid} failed:\n{err}"
                for sign in ("Traceback", "WARNING", "dtool-cache-manager:"):
                    assert sign not in err, f"{where}: {role} pid {proc.pid}:\n{err}"
                assert lines and lines[-1].startswith("exit "), (where, role, lines[-3:])
                stats[f"{role} rounds"] += int(lines[-1].split()[1])

            for lines, _ in outputs:
                s, d, removed, _ = _count_lines(lines)
                starts.update(s)
                dones.update(d)
                stats["removed"] += removed
            v_starts, _, _, v_last = _count_lines(outputs[0][0])
            if victim_role == "accessor":
                if not v_starts:
                    stats["accessor killed before its first access"] += 1
                elif v_last[0] == "start":
                    stats["accessor killed mid-access"] += 1
                    if v_last[1] == big_ident:
                        stats["... of the 2 MiB item"] += 1

            # Every child of this iteration is dead now (the next one's wait at a barrier).
            if os.path.exists(ledger_path):
                assert _integrity(ledger_path) == [("ok",)], where
            aside = [n for n in _listdir(paths.meta_dir) if ".corrupt-" in n]
            assert aside == [], f"{where}: a ledger was moved aside: {aside}"
            with dcm.open_ledger(str(cache_dir)) as ledger:
                usage = ledger.conn.execute(
                    "SELECT identifier, relpath, sum(hits + misses) FROM usage "
                    "GROUP BY identifier, relpath").fetchall()
            assert _listdir(paths.journal_dir) == [], f"{where}: journals left after folding"
            counted.clear()
            for ident, relpath, total in usage:
                assert ident in by_ident and relpath == expected_relpath[ident], (
                    where, ident, relpath)
                counted[ident] += total
            for ident in ids:
                assert dones[ident] <= counted[ident] <= starts[ident], (
                    f"{where}: {by_ident[ident]} counted {counted[ident]} accesses, but the "
                    f"children finished {dones[ident]} and started {starts[ident]}")

            inv = report.inventory(str(cache_dir))
            stats["rows forgotten by reconcile"] += inv.forgotten
            stats["max partial downloads left"] = max(stats["max partial downloads left"],
                                                      len(inv.partials))
            disk = _disk_files(cache_dir)
            listed = [item.relpath for item in inv.items]
            assert sorted(listed) == sorted(disk), f"{where}: inventory {listed}, disk {disk}"
            rows = _ledger_rows(ledger_path)
            missing = sorted(set(rows) - set(disk))
            assert missing == [], f"{where}: rows point at missing files: {missing}"
            for relpath, size in rows.items():
                assert size == disk[relpath], (where, relpath, size, disk[relpath])
            for item in inv.items:
                assert (item.row is not None) == (item.relpath in rows), (where, item.relpath)
            untracked = sum(1 for item in inv.items if item.row is None)
            stats["max untracked files"] = max(stats["max untracked files"], untracked)

            assert holds_now(cache_dir).empty, where
            for ident in ids:
                assert dcm.cache_item_lock_counter(ds.uri, ident,
                                                   cache_dir=str(cache_dir)) == 0, (
                    where, by_ident[ident])
            assert [n for n in _listdir(paths.holds_dir) if not n.endswith(".new")] == [], (
                where, _listdir(paths.holds_dir))
            stats["orphaned holds/*.new"] = sum(
                1 for n in _listdir(paths.holds_dir) if n.endswith(".new"))
    finally:
        if upcoming is not None:
            upcoming[2].kill_all()

    elapsed = time.monotonic() - t0
    accesses = sum(counted.values())
    gets = sum(ds.get_count(relpath) for relpath in items)
    summary = (f"crash injection: seed={seed} iterations={iterations} in {elapsed:.1f}s; "
               f"kills per role {dict(kills)}; accesses counted {accesses} "
               f"(done {sum(dones.values())}, started {sum(starts.values())}); "
               f"item GETs {gets} (2 MiB item {ds.get_count('big.bin')}), downloads cut by a kill "
               f"{cut.count}; {dict(stats)}")
    print(summary)
    assert sum(kills.values()) == iterations, summary
    assert min(kills[r] for r in ROLES) >= iterations // len(ROLES), summary
    # The faults met real work: accesses were counted, and items were evicted and fetched
    # again, so some kills could land mid-download.
    assert sum(dones.values()) > 0, summary
    if iterations >= 40:
        assert stats["removed"] > 0 and gets > len(items), summary
        assert stats["accessor killed mid-access"] > 0, summary
