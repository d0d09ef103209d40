"""A cache shared by several hosts, coordinated through a real PostgreSQL server.

Each simulated host (``support/hosts.py``) has its own pid, uts, net and mount namespaces,
its own ``bindfs`` mount of the shared directory (locks per mount, as NFS with
``local_lock``) at the same path, and a veth to the bridge where the server and the datasets'
HTTP server listen.  Processes are the real ``dtool`` command and python running dtoolcore.
"""

import hashlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from typing import List

import pytest

from support import hosts, postgres, subprocess_env
from support.datasets import item_identifier, make_local_dataset
from support.procs import Children
from support.servers import CountingDtoolHTTPServer

psycopg = pytest.importorskip("psycopg")

LONG_TIMEOUT = 30  # seconds: a release well before this is the socket's close, not a timeout
SHORT_TIMEOUT = 4  # seconds: the bound the partition test measures against


def _require(reason):
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def network():
    _require(hosts.available())
    with hosts.Network() as net:
        yield net


@pytest.fixture(scope="module")
def pg(network, tmp_path_factory):
    """The coordinator: on 127.0.0.1 for the test, on the bridge for the hosts."""
    _require(postgres.available())
    with postgres.PostgresServer(tmp_path_factory.mktemp("pg"),
                                 listen=("127.0.0.1", network.server_address)) as server:
        server.create_database("dcm", "postgres")
        yield server


@pytest.fixture(scope="module")
def datasets(network, tmp_path_factory):
    """Real dtool datasets over HTTP, on the bridge, where every host reaches them."""
    server = CountingDtoolHTTPServer(tmp_path_factory.mktemp("http-datasets"),
                                     host=network.server_address).start()
    yield server
    server.stop()


@dataclass
class Dataset:
    uri: str
    name: str
    identifiers: List[str]
    md5: dict  # identifier -> md5 hex
    relpath: dict  # identifier -> the item's relpath in the dataset


_names = iter(range(1, 1 << 30))


def make_dataset(server, items):
    name = f"mh{next(_names)}"
    make_local_dataset(server.directory, name, items)
    ids = {item_identifier(relpath): relpath for relpath in items}
    return Dataset(f"{server.base_url}/{name}", name, sorted(ids),
                   {i: hashlib.md5(items[r]).hexdigest() for i, r in ids.items()}, ids)


@dataclass
class Cluster:
    """Hosts sharing one cache (``cache`` on every host; ``real`` in this namespace)."""

    network: object
    pg: object
    shared: str
    mountpoint: str
    hosts: dict = field(default_factory=dict)

    @property
    def cache(self):
        return os.path.join(self.mountpoint, "cache")

    @property
    def real(self):
        return os.path.join(self.shared, "cache")

    @property
    def url(self):
        return self.pg.url(self.network.server_address, db="dcm")

    def host(self, name):
        if name not in self.hosts:
            self.hosts[name] = hosts.SimulatedHost(self.network, name, len(self.hosts) + 1,
                                                   self.shared, self.mountpoint)
        return self.hosts[name]

    def env(self, extra=None):
        return subprocess_env(self.cache, extra)

    def dtool(self, host, *args, expect=0):
        result = self.host(host).run(["dtool", "cache", *map(str, args)], env=self.env())
        assert result.returncode == expect, (args, result.returncode, result.stdout,
                                             result.stderr)
        return result

    def register(self, timeout=LONG_TIMEOUT, grace=None):
        grace = grace or 2 * timeout + 1
        self.dtool("host-a", "init", "--database", self.url, "--session-timeout", timeout,
                   "--grace", grace)

    def python(self, host, code, *args, **kw):
        return self.host(host).popen([sys.executable, "-c", code, *map(str, args)],
                                     env=self.env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, **kw)

    def locks_from(self, host):
        """How many advisory locks the server holds for sessions from ``host``."""
        with psycopg.connect(self.pg.url("127.0.0.1", db="dcm"), autocommit=True) as conn:
            return conn.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.client_addr = %s",
                (self.host(host).address,)).fetchone()[0]

    def disk(self):
        """The cached items' files, relative to the cache (bookkeeping left out)."""
        found = set()
        for top, dirs, files in os.walk(self.real):
            dirs[:] = [d for d in dirs if d != ".dtool-cache-manager"]
            found |= {os.path.relpath(os.path.join(top, f), self.real) for f in files}
        return found

    def trash(self):
        return os.listdir(os.path.join(self.real, ".dtool-cache-manager", "trash"))


@pytest.fixture
def cluster(network, pg, tmp_path):
    shared, mountpoint = tmp_path / "shared", tmp_path / "mnt"
    (shared / "cache").mkdir(parents=True)
    mountpoint.mkdir()
    made = Cluster(network, pg, str(shared), str(mountpoint))
    yield made
    for host in made.hosts.values():
        host.close()


def await_condition(predicate, timeout, what):
    """Poll ``predicate`` until true (this is what the test awaits, not a pause); returns
    how long it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


# A process that holds items on command.  stdin: "hold ID...", "open ID" (opens the item's
# file and reads half of it), "finish" (reads the rest, prints the md5), "exit".
HOLDER = textwrap.dedent("""
    import hashlib, json, os, socket, sys
    import dtoolcore
    ds = dtoolcore.DataSet.from_uri(sys.argv[1])
    fh = first = None
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "hold":
            paths = [ds.item_content_abspath(i) for i in args]
            print(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "paths": paths}), flush=True)
        elif cmd == "open":
            fh = open(ds.item_content_abspath(args[0]), "rb")
            first = fh.read(os.fstat(fh.fileno()).st_size // 2)
            print("opened", flush=True)
        elif cmd == "finish":
            print(hashlib.md5(first + fh.read()).hexdigest(), flush=True)
        elif cmd == "exit":
            break
""")

FETCH = textwrap.dedent("""
    import hashlib, json, sys
    import dtoolcore
    ds = dtoolcore.DataSet.from_uri(sys.argv[1])
    out = {}
    for i in sys.argv[2:]:
        with open(ds.item_content_abspath(i), "rb") as fh:
            out[i] = hashlib.md5(fh.read()).hexdigest()
    print(json.dumps(out))
""")


def fetch(cluster, host, ds, ids):
    proc = cluster.python(host, FETCH, ds.uri, *ids)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out) == {i: ds.md5[i] for i in ids}, err
    return err


def command(holder, line):
    holder.stdin.write(line + "\n")
    holder.stdin.flush()
    answer = holder.stdout.readline()
    if not answer:
        holder.kill()
        pytest.fail(f"the holder ended without answering {line!r}: {holder.stderr.read()}")
    return answer.strip()


def in_use(cluster, host):
    """{relpath: [(user@host, pid)]} as ``dtool cache ls --in-use`` shows it on ``host``."""
    items = json.loads(cluster.dtool(host, "ls", "--in-use", "--json").stdout)
    return {i["path"]: [(h["user"], h["pid"]) for h in i["holders"]] for i in items}


def relpath_of(ds, identifier):
    return f"{ds.name}/{identifier}{os.path.splitext(ds.relpath[identifier])[1]}"


def test_a_hold_is_seen_and_kept_by_another_host_and_ends_when_its_process_is_killed(
        cluster, datasets):
    ds = make_dataset(datasets, {f"f{i}.txt": os.urandom(2000 + i) for i in range(3)})
    cluster.register()
    fetch(cluster, "host-a", ds, ds.identifiers)
    held = ds.identifiers[0]
    holder = cluster.python("host-a", HOLDER, ds.uri)
    try:
        seen = json.loads(command(holder, f"hold {held}"))
        assert seen["host"] == "host-a"
        # host-b sees the hold, with the user, host and pid host-a's kernel knows.
        assert in_use(cluster, "host-b") == {relpath_of(ds, held): [("root@host-a",
                                                                      seen["pid"])]}
        cleaned = cluster.dtool("host-b", "clean", "--all", "--yes")
        assert "in use by root@host-a (pid %d)" % seen["pid"] in cleaned.stdout
        assert cluster.disk() == {relpath_of(ds, held)}
        assert len(cluster.trash()) == 2  # the others wait out the grace period there
        summary = json.loads(cluster.dtool("host-a", "summary", "--json").stdout)
        assert (summary["trash_files"], summary["num_in_use"]) == (2, 1)
        assert summary["sharing"]["mode"] == "coordinated"

        os.kill(cluster.host("host-a").outer_pid(holder), signal.SIGKILL)
        holder.wait(timeout=30)
        took = await_condition(lambda: cluster.locks_from("host-a") == 0, LONG_TIMEOUT / 3,
                               "the killed holder's locks released")
        print(f"killed holder released after {took:.3f} s")
    finally:
        holder.kill()
        holder.wait()
    assert in_use(cluster, "host-b") == {}
    # What the killed process journalled counts (its journal folded on another host): the
    # fetching process's access and its own; a crash loses at most a line being written.
    listed = json.loads(cluster.dtool("host-b", "ls", "--json").stdout)
    assert [(i["identifier"], i["access_count"]) for i in listed] == [(held, 2)]
    cluster.dtool("host-b", "clean", "--all", "--yes")
    assert cluster.disk() == set()


def test_killing_every_process_of_a_host_releases_its_holds_at_once(cluster, datasets):
    ds = make_dataset(datasets, {"a.bin": os.urandom(5000), "b.bin": os.urandom(6000)})
    cluster.register()
    holder = cluster.python("host-a", HOLDER, ds.uri)
    seen = json.loads(command(holder, f"hold {' '.join(ds.identifiers)}"))
    assert set(in_use(cluster, "host-b")) == {relpath_of(ds, i) for i in ds.identifiers}
    cluster.dtool("host-b", "clean", "--all", "--yes")
    assert len(cluster.disk()) == 2

    cluster.host("host-a").kill_all()  # a host crash, as its peers see it
    took = await_condition(lambda: cluster.locks_from("host-a") == 0, LONG_TIMEOUT / 3,
                           "the dead host's locks released")
    print(f"dead host released after {took:.3f} s (pid {seen['pid']} on host-a)")
    assert in_use(cluster, "host-b") == {}
    cluster.dtool("host-b", "clean", "--all", "--yes")
    assert cluster.disk() == set()
    # host-b knew host-a's holds file for dead (it had marked itself coordinated): reaped.
    assert os.listdir(os.path.join(cluster.real, ".dtool-cache-manager", "holds")) == []


def test_a_cut_off_host_is_released_within_the_session_timeout_and_keeps_reading(
        cluster, datasets):
    big = os.urandom(1 << 20)
    ds = make_dataset(datasets, {"big.bin": big, "other.bin": os.urandom(3000)})
    big_id = next(i for i in ds.identifiers if ds.relpath[i] == "big.bin")
    other_id = next(i for i in ds.identifiers if i != big_id)
    cluster.register(timeout=SHORT_TIMEOUT, grace=2 * SHORT_TIMEOUT + 1)
    holder = cluster.python("host-a", HOLDER, ds.uri)
    try:
        json.loads(command(holder, f"hold {big_id}"))
        assert command(holder, f"open {big_id}") == "opened"
        cluster.dtool("host-b", "clean", "--all", "--yes")
        assert relpath_of(ds, big_id) in cluster.disk()

        cluster.host("host-a").partition()
        took = await_condition(lambda: cluster.locks_from("host-a") == 0,
                               SHORT_TIMEOUT + 2, "the cut-off host's locks released")
        print(f"partitioned host released after {took:.2f} s (bound {SHORT_TIMEOUT} s)")
        # Its holds file says it was coordinated, and its session is gone: not a holder.
        assert in_use(cluster, "host-b") == {}
        cluster.dtool("host-b", "clean", "--all", "--yes")
        assert relpath_of(ds, big_id) not in cluster.disk()
        # The file went to the trash: the cut-off host reads on, whole and right.
        assert command(holder, "finish") == hashlib.md5(big).hexdigest()

        cluster.host("host-a").heal()
        answer = json.loads(command(holder, f"hold {other_id}"))  # its next round trip
        assert answer["host"] == "host-a"
        # Back, it held its files again (the one in the trash is not on disk to show).
        assert in_use(cluster, "host-b") == {relpath_of(ds, other_id): [("root@host-a",
                                                                       answer["pid"])]}
        _, warnings = holder.communicate("exit\n", timeout=60)
        assert "was lost" in warnings and "took back 1 holds" in warnings and \
            "start again" in warnings, warnings
    finally:
        holder.kill()
        holder.wait()
    # After the grace period, by the server's clock, a clean purges the trash.
    await_condition(lambda: not cluster.dtool("host-b", "clean", "--all", "--yes")
                    or not cluster.trash(), 4 * SHORT_TIMEOUT + 10, "the trash purged")


def test_concurrent_misses_on_two_hosts_download_once(cluster, datasets):
    items = {"x.bin": os.urandom(2 << 20), "y.bin": os.urandom(1 << 20)}
    ds = make_dataset(datasets, items)
    cluster.register()
    datasets.slow_item_bytes_per_s = 4 << 20  # downloads that overlap
    try:
        procs = [cluster.python(host, "import sys\nsys.stdin.readline()\n" + FETCH, ds.uri,
                                *ds.identifiers) for host in ("host-a", "host-b", "host-c")]
        for proc in procs:  # all started and waiting: go
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert json.loads(out) == ds.md5
    finally:
        datasets.slow_item_bytes_per_s = None
    for identifier in ds.identifiers:
        assert datasets.item_get_count(ds.name, ds.relpath[identifier]) == 1


COUNTER = textwrap.dedent("""
    import sys
    import dtoolcore
    ds = dtoolcore.DataSet.from_uri(sys.argv[1])
    rounds = int(sys.argv[2])
    sys.stdin.readline()
    for _ in range(rounds):
        for identifier in sorted(ds.identifiers):
            ds.item_content_abspath(identifier)
""")


def test_exact_counts_from_four_hosts_of_four_processes(cluster, datasets):
    ds = make_dataset(datasets, {f"c{i}.txt": os.urandom(100 + i) for i in range(5)})
    cluster.register()
    rounds = 25
    procs = [cluster.python(host, COUNTER, ds.uri, rounds)
             for host in ("host-a", "host-b", "host-c", "host-d") for _ in range(4)]
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err
    listed = json.loads(cluster.dtool("host-c", "ls", "--json").stdout)
    assert {i["identifier"]: i["access_count"] for i in listed} == {
        i: 16 * rounds for i in ds.identifiers}
    assert sum(i["misses"] for i in listed) == len(ds.identifiers)


def test_a_shared_cache_without_a_coordinator_is_not_cleaned(cluster, datasets):
    ds = make_dataset(datasets, {"n.txt": b"n" * 100})
    fetch(cluster, "host-a", ds, ds.identifiers)
    refused = cluster.dtool("host-b", "clean", "--all", "--yes", expect=2)
    assert refused.stderr.count("\n") == 1 and "dtool cache init --database" in refused.stderr
    assert cluster.disk() == {relpath_of(ds, ds.identifiers[0])}


def test_with_the_coordinator_down_accesses_work_and_cleans_refuse(cluster, datasets):
    ds = make_dataset(datasets, {"d1.txt": b"1" * 300, "d2.txt": b"2" * 400})
    cluster.register()
    fetch(cluster, "host-a", ds, ds.identifiers[:1])
    cluster.pg.stop()
    try:
        warnings = fetch(cluster, "host-b", ds, ds.identifiers)  # a hit and a miss
        assert "cannot reach the coordinator" in warnings and "Traceback" not in warnings
        refused = cluster.dtool("host-a", "clean", "--all", "--yes", expect=1)
        assert refused.stderr.count("\n") == 1, refused.stderr
        assert "cannot reach the coordinator" in refused.stderr
        assert len(cluster.disk()) == 2
    finally:
        cluster.pg.start()
    cluster.dtool("host-a", "clean", "--all", "--yes")
    assert cluster.disk() == set()


@pytest.mark.slow
def test_four_hosts_of_accessors_and_two_cleaning_hosts_under_sustained_contention(
        cluster, datasets):
    """tests/test_stress.py across hosts: 4 hosts x 4 accessors read and check items while
    cleaners on host-a and host-b run the real CLI in a loop, for ``DCM_STRESS_SECONDS``."""
    from test_stress import ACCESSOR, CLEANER, run_together  # the single-host test's

    seconds = float(os.environ.get("DCM_STRESS_SECONDS", "60"))
    seed = int(os.environ.get("DCM_FAULT_SEED") or random.randrange(1 << 30))
    print(f"seed={seed}")
    rng = random.Random(seed)
    made = []
    for _ in range(2):
        items = {f"item{i:02d}.bin": rng.randbytes(rng.randint(20 * 1024, 200 * 1024))
                 for i in range(12)}
        made.append((make_dataset(datasets, items), items))
    total_bytes = sum(len(c) for _, items in made for c in items.values())
    n_items = sum(len(items) for _, items in made)
    cluster.register()
    uris = [ds.uri for ds, _ in made]
    names = ("host-a", "host-b", "host-c", "host-d")
    accessors = Children.of([cluster.python(host, ACCESSOR, seconds,
                                            rng.randrange(1 << 30), *uris)
                             for host in names for _ in range(4)])
    cleaners = Children.of([cluster.python(host, CLEANER, seconds, f"{total_bytes // 4}B")
                            for host in names[:2]])
    access_out, clean_out, elapsed = run_together(accessors, cleaners, seconds)

    accesses = sum(o["accesses"] for o in access_out)
    removed = sum(o["removed"] for o in clean_out)
    passes = sum(o["passes"] for o in clean_out)
    gets = sum(datasets.item_get_count(ds.name, relpath) for ds, items in made
               for relpath in items)
    figures = (f"multi-host stress: seed={seed} 4 hosts x 4 accessors, 2 cleaning hosts, "
               f"{elapsed:.1f}s: {accesses} accesses ({accesses / elapsed:.0f}/s), {passes} "
               f"clean passes ({passes / elapsed * 60:.0f}/min), {removed} files removed, "
               f"{sum(o['in_use'] for o in clean_out)} kept as in use, {gets} item GETs for "
               f"{n_items} items")
    print(figures)
    bad = [o["examples"] for o in access_out if o["bad"]]
    assert sum(o["bad"] for o in access_out) == 0, f"{figures}\nbad accesses: {bad}"
    errors = [o["errors"] for o in clean_out if o["num_errors"]]
    assert sum(o["num_errors"] for o in clean_out) == 0, f"{figures}\nclean errors: {errors}"
    assert removed > 0 and gets > n_items, figures

    # The ledger agrees with the disk exactly, and counts every access once.
    import dtool_cache_manager as dcm
    with dcm.open_ledger(cluster.real) as ledger:
        rows = dict(ledger.conn.execute("SELECT relpath, size_bytes FROM items"))
        usage = ledger.conn.execute("SELECT uri, identifier, sum(hits + misses) FROM usage "
                                    "GROUP BY uri, identifier").fetchall()
        assert ledger.conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    disk = {relpath: os.path.getsize(os.path.join(cluster.real, relpath))
            for relpath in cluster.disk()}
    assert rows == disk, f"{figures}\nledger {rows}\ndisk {disk}"
    done = {}
    for o in access_out:
        for key, n in o["counts"].items():
            done[key] = done.get(key, 0) + n
    assert {f"{uri} {ident}": n for uri, ident, n in usage} == done, figures


def test_init_registers_a_coordinator_and_refuses_what_it_cannot_use(pg, datasets, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    env = subprocess_env(cache)

    def init(*args, expect=0):
        done = subprocess.run(["dtool", "cache", "init", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == expect, (args, done.stdout, done.stderr)
        return done

    url = pg.url("127.0.0.1", db="dcm")
    ds = make_dataset(datasets, {"w.txt": b"w" * 50})
    subprocess.run([sys.executable, "-c", FETCH, ds.uri, *ds.identifiers], env=env,
                   check=True, capture_output=True)  # a WAL ledger, from before
    declaration = cache / ".dtool-cache-manager" / "sharing.json"
    secret = url.replace("postgres@", "postgres:hunter2@")
    for args, expect, said in [
            (["--database", secret], 2, "must not contain a password"),
            (["--database", "mysql://db/x"], 2, "must start with postgresql://"),
            (["--database", url.replace(str(pg.port), "1")], 1, "cannot reach"),
            (["--database", url, "--session-timeout", 30, "--grace", 60], 2, "more than twice"),
            (["--database", url, "--single-host"], 2, "cannot be used together"),
            (["--grace", 100], 2, "go with --database")]:
        done = init(*args, expect=expect)
        assert done.stderr.count("\n") == 1 and said in done.stderr, done.stderr
        assert "hunter2" not in done.stderr and not declaration.exists()

    shown = json.loads(init("--database", url, "--json").stdout)
    assert shown["mode"] == "coordinated" and shown["coordinator"]["database"] == url
    cache_id = shown["coordinator"]["cache_id"]
    ledger = str(cache / ".dtool-cache-manager" / "ledger.sqlite3")
    conn = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)
    try:  # switched from WAL under the coordinator's lock, rows kept
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal"
        assert conn.execute("SELECT count(*) FROM items").fetchone()[0] == 1
    finally:
        conn.close()
    with open(ledger, "rb") as fh:
        assert fh.read(20)[18:20] == b"\x01\x01"  # file format: rollback journal, not WAL
    assert (cache / ".dtool-cache-manager" / "trash").is_dir()
    # Registering again (a new URL or timeouts) keeps the cache's lock namespace.
    again = json.loads(init("--database", url, "--session-timeout", 10, "--json").stdout)
    assert again["coordinator"]["cache_id"] == cache_id
    assert again["coordinator"]["session_timeout"] == 10
    assert "has a coordinator" in init("--single-host", expect=2).stderr
    assert "possibly several" not in init().stdout
    assert json.loads(init("--no-database", "--json").stdout)["coordinator"] is None
    assert not declaration.exists()
