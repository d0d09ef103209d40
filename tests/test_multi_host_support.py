"""Tests of the multi-host test infrastructure (``support/hosts.py``, ``support/postgres.py``).

Several simulated hosts share one cache directory (each through its own bindfs mount)
and one real PostgreSQL server; these tests prove the simulation has the properties
that multi-host tests will rely on: own hostnames and pids, shared files but per-mount
locks, sessions that die with their host or its network link, and a clean teardown.
They check the fixtures only, not the (possibly half-written) plugin.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from support import hosts, postgres
from support.datasets import make_local_dataset
from support.servers import CountingDtoolHTTPServer

psycopg = pytest.importorskip("psycopg")

ADVISORY_KEY = 42


def _require(reason):
    if reason:
        pytest.skip(reason)


def _host_env():
    """Environment for python in a host: the plugin stays out of the way."""
    env = dict(os.environ, DTOOL_CACHE_MANAGER_DISABLE="1")
    env.pop("PYTHONPATH", None)
    return env


def _await(predicate, timeout, what):
    """Poll ``predicate`` until true; return how long it took, fail after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        time.sleep(0.02)  # polling interval, not synchronisation
    return time.monotonic() - start


def _leftovers(net_name, mountpoint, made):
    """What a closed network and its closed hosts left behind (empty when clean)."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    found = [f"link: {line.split(':')[1].strip()}" for line in links.splitlines()
             if net_name and net_name in line]
    found += [f"FUSE mount {dev} at {point}"
              for dev, point, _ in hosts.all_fuse_mounts(str(mountpoint))]
    for host in made:
        found += [f"process {pid} of host {host.name}" for pid in host.processes()]
        if host.pid1 is not None and os.path.exists(f"/proc/{host.pid1}"):
            found.append(f"init {host.pid1} of host {host.name}")
    return found


@pytest.fixture
def network():
    _require(hosts.available())
    net = hosts.Network()
    name = net.name
    with net:
        yield net
    assert not hosts.link_exists(name), f"bridge {name} left behind"


@pytest.fixture
def shared(tmp_path):
    """(shared_dir, mountpoint): the cache directory and where every host mounts it."""
    shared_dir, mountpoint = tmp_path / "shared", tmp_path / "mnt"
    shared_dir.mkdir()
    mountpoint.mkdir()
    return shared_dir, mountpoint


@pytest.fixture
def make_host(network, shared):
    """Factory: ``make_host(name) -> SimulatedHost`` on ``network``, sharing ``shared``."""
    made = []

    def make(name):
        host = hosts.SimulatedHost(network, name, len(made), *shared)
        made.append(host)
        return host

    yield make
    for host in made:
        host.close()
    left = _leftovers(None, shared[1], made)
    assert not left, left


@pytest.fixture
def pg(tmp_path, network):
    """A PostgreSQL server on 127.0.0.1 (for the test) and the bridge (for the hosts)."""
    _require(postgres.available())
    with postgres.PostgresServer(tmp_path / "pg",
                                 listen=("127.0.0.1", network.server_address)) as server:
        yield server


# -- hosts: names, pids, files, locks -----------------------------------------------------

PROC_VIEW = textwrap.dedent("""
    import json, os, socket
    cmdlines = {}
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdlines[int(pid)] = fh.read().split(b"\\0")
        except OSError:
            pass
    init_args = [a.decode() for a in cmdlines[1] if a]
    print(json.dumps({"pid": os.getpid(), "init_last_arg": init_args[-1],
                      "hostname": socket.gethostname(), "pids": sorted(cmdlines)}))
""")


def test_hosts_have_their_own_hostnames_and_pids(make_host):
    alpha, beta = make_host("alpha"), make_host("beta")
    views = {}
    for host in (alpha, beta):
        result = host.run(["hostname"])
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == host.name
        result = host.run([sys.executable, "-c", PROC_VIEW], env=_host_env())
        assert result.returncode == 0, result.stderr
        views[host.name] = json.loads(result.stdout)
    assert socket.gethostname() not in ("alpha", "beta")
    for host in (alpha, beta):
        view = views[host.name]
        assert view["hostname"] == host.name
        # pid 1 is this host's own init (whose last argument is the host's name) ...
        assert view["init_last_arg"] == host.name
        assert host.inner_pid(host.pid1) == 1
        # ... and the host sees only its own few processes, not the machine's.
        assert len(view["pids"]) < 10, view["pids"]
    assert alpha.pid1 != beta.pid1
    assert set(views["alpha"]["pids"]) & set(views["beta"]["pids"]) >= {1}


def test_a_popen_process_has_an_inner_pid(make_host):
    alpha = make_host("alpha")
    proc = alpha.popen([sys.executable, "-c", "import os, sys; print(os.getpid(), flush=True);"
                        " sys.stdin.readline()"], env=_host_env(), stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
    try:
        printed = int(proc.stdout.readline())
        outer = alpha.outer_pid(proc)
        assert alpha.inner_pid(outer) == printed
        assert outer != printed
        with pytest.raises(ValueError):
            alpha.inner_pid(os.getpid())  # the test itself is not on the host
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0


FLOCK = textwrap.dedent("""
    import fcntl, sys
    fh = open(sys.argv[1], "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy", flush=True)
        sys.exit(0)
    print("locked", flush=True)
    sys.stdin.readline()
""")


def test_files_are_shared_but_locks_are_per_mount(make_host, shared):
    shared_dir, mountpoint = shared
    alpha, beta = make_host("alpha"), make_host("beta")
    wrote = alpha.run(["sh", "-c", f"echo from-alpha > {mountpoint}/note"])
    assert wrote.returncode == 0, wrote.stderr
    read = beta.run(["cat", f"{mountpoint}/note"])
    assert (read.returncode, read.stdout) == (0, "from-alpha\n"), read.stderr
    assert (shared_dir / "note").read_text() == "from-alpha\n"
    assert not (mountpoint / "note").exists()  # the mounts exist only inside the hosts

    lock_file = f"{mountpoint}/lock"
    holder = alpha.popen([sys.executable, "-c", FLOCK, lock_file], env=_host_env(),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        same_mount = alpha.run([sys.executable, "-c", FLOCK, lock_file], env=_host_env())
        assert same_mount.stdout.strip() == "busy", same_mount.stderr  # the lock is real
        other_mount = beta.run([sys.executable, "-c", FLOCK, lock_file], env=_host_env())
        assert other_mount.stdout.strip() == "locked", other_mount.stderr
    finally:
        holder.stdin.close()
        assert holder.wait(timeout=60) == 0


# -- PostgreSQL sessions from hosts ---------------------------------------------------------

HOLDER = textwrap.dedent("""
    import json, os, sys
    import psycopg
    conn = psycopg.connect(sys.argv[1], autocommit=True, **json.loads(sys.argv[2]))
    conn.execute("SELECT pg_advisory_lock_shared(%s)", (int(sys.argv[3]),))
    print(json.dumps({
        "backend": conn.execute("SELECT pg_backend_pid()").fetchone()[0],
        "keepalives_idle": conn.execute("SHOW tcp_keepalives_idle").fetchone()[0],
    }), flush=True)
    sys.stdin.readline()
    os._exit(0)  # no goodbye to a server that may be unreachable
""")

KEEPALIVE_OPTIONS = {
    "keepalives": 1, "keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 2,
    "tcp_user_timeout": 3000,
    "options": "-c tcp_keepalives_idle=1 -c tcp_keepalives_interval=1 "
               "-c tcp_keepalives_count=2 -c tcp_user_timeout=3000",
}


def advisory_holders(pg, key=ADVISORY_KEY):
    """[(backend pid, mode, client address)] of the granted advisory locks on ``key``."""
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        return conn.execute(
            "SELECT l.pid, l.mode, host(a.client_addr) FROM pg_locks l"
            " LEFT JOIN pg_stat_activity a ON a.pid = l.pid"
            " WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = %s"
            " AND l.objsubid = 1 AND l.granted", (key,)).fetchall()


def _start_holder(host, url, options=None):
    proc = host.popen([sys.executable, "-c", HOLDER, url, json.dumps(options or {}),
                       str(ADVISORY_KEY)], env=_host_env(), stdin=subprocess.PIPE,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=60)
        pytest.fail(f"lock holder on {host.name} failed: {proc.stderr.read()}")
    return proc, json.loads(line)


def test_a_dead_hosts_session_and_lock_go_away(make_host, network, pg):
    alpha = make_host("alpha")
    holder, info = _start_holder(alpha, pg.url(host=network.server_address))
    assert advisory_holders(pg) == [(info["backend"], "ShareLock", alpha.address)]

    alpha.kill_all()
    assert not alpha.alive
    assert holder.wait(timeout=60) == -9
    took = _await(lambda: not advisory_holders(pg), 5, "the dead host's lock to go")
    print(f"lock of a killed host released after {took:.2f} s")


def test_a_partitioned_hosts_session_is_dropped_and_the_host_reconnects(make_host, network,
                                                                        pg):
    alpha = make_host("alpha")
    url = pg.url(host=network.server_address)
    holder, info = _start_holder(alpha, url, KEEPALIVE_OPTIONS)
    try:
        assert info["keepalives_idle"] == "1"  # the server-side options took
        assert advisory_holders(pg) == [(info["backend"], "ShareLock", alpha.address)]

        alpha.partition()
        took = _await(lambda: not advisory_holders(pg), 20,
                      f"the partitioned host's lock to go\n{pg.log()[-2000:]}")
        print(f"lock of a partitioned host released after {took:.2f} s")
        assert took < 15
        assert "could not receive data from client" in pg.log()  # dropped, not closed
        assert alpha.alive  # the host lives on; only its session is gone
        cut_off = alpha.run([sys.executable, "-c", textwrap.dedent("""
            import sys, psycopg
            try:
                psycopg.connect(sys.argv[1], connect_timeout=2).close()
            except psycopg.OperationalError:
                sys.exit(3)
        """), url], env=_host_env())
        assert cut_off.returncode == 3, (cut_off.stdout, cut_off.stderr)

        alpha.heal()
        again = alpha.run([sys.executable, "-c", textwrap.dedent("""
            import sys, psycopg
            with psycopg.connect(sys.argv[1], connect_timeout=10) as conn:
                print(conn.execute("SELECT pg_try_advisory_lock(%s)",
                                   (int(sys.argv[2]),)).fetchone()[0])
        """), url, str(ADVISORY_KEY)], env=_host_env())
        assert (again.returncode, again.stdout.strip()) == (0, "True"), again.stderr
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


# -- other servers --------------------------------------------------------------------------

FETCH = textwrap.dedent("""
    import sys, urllib.request
    with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
        sys.stdout.write(response.read().decode())
""")


def test_the_dataset_server_on_the_bridge_is_reachable_from_a_host(make_host, network,
                                                                   tmp_path):
    alpha = make_host("alpha")
    served = tmp_path / "datasets"
    served.mkdir()
    make_local_dataset(served, "remote", {"a.txt": b"hello"})
    server = CountingDtoolHTTPServer(served, host=network.server_address).start()
    try:
        assert server.base_url.startswith(f"http://{network.server_address}:")
        manifest = alpha.run([sys.executable, "-c", FETCH,
                              f"{server.base_url}/remote/http_manifest.json"], env=_host_env())
        assert manifest.returncode == 0, manifest.stderr
        (item_url,) = json.loads(manifest.stdout)["item_urls"].values()
        item = alpha.run([sys.executable, "-c", FETCH, item_url], env=_host_env())
        assert (item.returncode, item.stdout) == (0, "hello"), item.stderr
        assert server.item_get_count("remote", "a.txt") == 1
        # The host's 127.0.0.1 is its own: the root namespace's loopback is out of reach.
        port = server.server_address[1]
        loopback = alpha.run([sys.executable, "-c", FETCH, f"http://127.0.0.1:{port}/"],
                             env=_host_env())
        assert loopback.returncode != 0 and "refused" in loopback.stderr, loopback.stderr
    finally:
        server.stop()


def test_postgres_restarts_with_its_data(tmp_path):
    _require(postgres.available())
    with postgres.PostgresServer(tmp_path / "pg") as pg:
        pg.create_role("dcm")
        pg.create_database("dcmdb", owner="dcm")
        with psycopg.connect(pg.url(user="dcm", db="dcmdb"), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (7)")
        assert pg.url(user="dcm", db="dcmdb") == f"postgresql://dcm@127.0.0.1:{pg.port}/dcmdb"
        port = pg.port
        pg.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.url(), connect_timeout=5).close()
        pg.start()
        assert pg.port == port
        assert pg.psql("SELECT x FROM kept", db="dcmdb").strip() == "7"
        with pytest.raises(RuntimeError, match="no_such_table"):
            pg.psql("SELECT * FROM no_such_table")
        root = pg.root
    assert not os.path.exists(root) and not os.path.exists(tmp_path / "pg")


def test_everything_is_cleaned_up(tmp_path):
    _require(hosts.available() or postgres.available())
    shared_dir, mountpoint = tmp_path / "shared", tmp_path / "mnt"
    shared_dir.mkdir()
    mountpoint.mkdir()
    with hosts.Network() as net:
        net_name = net.name
        with postgres.PostgresServer(tmp_path / "pg",
                                     listen=("127.0.0.1", net.server_address)) as pg, \
                hosts.SimulatedHost(net, "alpha", 0, shared_dir, mountpoint) as alpha, \
                hosts.SimulatedHost(net, "beta", 1, shared_dir, mountpoint) as beta:
            pg_root = pg.root
            made = [alpha, beta]
            sleepers = [host.popen(["sleep", "1000"]) for host in made]
            inner = [host.outer_pid(proc) for host, proc in zip(made, sleepers)]
            holder, _ = _start_holder(beta, pg.url(host=net.server_address))
            assert len(hosts.all_fuse_mounts(str(mountpoint))) == 2
            assert all(hosts.link_exists(host.veth) for host in made)
            alpha.kill_all()
            alpha.close()
            alpha.close()  # idempotent
        assert not beta.alive
        assert [proc.wait(timeout=60) for proc in sleepers + [holder]] == [-9, -9, -9]
    assert _leftovers(net_name, mountpoint, made) == []
    assert not any(os.path.exists(f"/proc/{pid}") for pid in inner)
    assert not os.path.exists(pg_root)
    assert not [line for line in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                                text=True).stdout.splitlines()
                if net_name in line]
