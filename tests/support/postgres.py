"""A throw-away real PostgreSQL server, for tests of coordination through PostgreSQL.

The server runs as the unix user ``postgres`` (it refuses to run as root) from a fresh
directory under /tmp, because pytest's base temp dir is root-only (0700) and the
server could not reach its data dir there.  Authentication is ``trust``: the tests are
about locks and sessions, not passwords, and a URL never carries a password.
"""

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from typing import Optional

PG_USER = "postgres"


def _bin_dir():
    """The newest installed PostgreSQL's bin dir (one with ``initdb``), or None."""
    found = []
    for path in glob.glob("/usr/lib/postgresql/*/bin"):
        version = os.path.basename(os.path.dirname(path))
        if os.path.isfile(os.path.join(path, "initdb")) and version.isdigit():
            found.append((int(version), path))
    return max(found)[1] if found else None


def available() -> Optional[str]:
    """None if a server can run here, else why not (a reason for pytest.skip)."""
    if _bin_dir() is None:
        return "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb)"
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        return f"no unix user {PG_USER!r} to run PostgreSQL as"
    if os.geteuid() != 0:
        return "running the PostgreSQL server as user postgres needs root"
    if shutil.which("runuser") is None:
        return "no runuser to run the PostgreSQL server as user postgres"
    return None


def _free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _quote_ident(name):
    return '"' + name.replace('"', '""') + '"'


class PostgresServer:
    """A PostgreSQL server on ``listen`` addresses and a unix socket, trust auth.

    ``settings`` (name -> value) become ``-c name=value`` server options.  ``start()``
    after ``stop()`` restarts on the same data dir and port, so data persists.
    """

    def __init__(self, base_dir, listen=("127.0.0.1",), settings=None):
        self.base_dir = str(base_dir)
        self.listen = tuple(listen)
        self.settings = dict(settings or {})
        self.bin_dir = _bin_dir()
        self.port = None
        self.root = None  # the /tmp dir holding data, socket and log
        self.data_dir = None
        self.socket_dir = None
        self.log_path = None
        self.running = False

    # -- lifecycle -----------------------------------------------------------------------

    def start(self):
        """Create the cluster on first call, then start the server and wait till it serves."""
        if self.root is None:
            self._init()
        options = (f"-p {self.port} -k {self.socket_dir} "
                   f"-c listen_addresses={','.join(self.listen)} "
                   "-c fsync=off -c max_connections=200")
        for name, value in self.settings.items():
            options += f" -c {name}={value}"
        self._pg_ctl("-l", self.log_path, "-w", "-t", "60", "-o", options, "start")
        self.running = True
        return self

    def _init(self):
        os.makedirs(self.base_dir, exist_ok=True)
        uid, gid = pwd.getpwnam(PG_USER)[2:4]
        self.root = tempfile.mkdtemp(prefix="dcm-pg-")
        os.chmod(self.root, 0o755)
        os.chown(self.root, uid, gid)
        # Points from the test's tmp dir at the server's files, for whoever debugs a failure.
        os.symlink(self.root, os.path.join(self.base_dir, "pg-root"))
        self.data_dir = os.path.join(self.root, "data")
        self.socket_dir = os.path.join(self.root, "sock")
        self.log_path = os.path.join(self.root, "server.log")
        os.mkdir(self.socket_dir, 0o755)
        os.chown(self.socket_dir, uid, gid)
        self._as_postgres(os.path.join(self.bin_dir, "initdb"), "-D", self.data_dir,
                          "-A", "trust", "--no-sync", "-U", PG_USER, "-E", "UTF8")
        hba = ["local all all trust", "host all all 127.0.0.1/32 trust",
               "host all all 10.201.0.0/16 trust"]
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "w") as fh:
            fh.write("\n".join(hba) + "\n")
        self.port = _free_port()

    def stop(self):
        """Stop the server (fast shutdown: sessions are ended) and wait till it is down."""
        if self.running or self._postmaster_pid():
            self._pg_ctl("-w", "-t", "60", "-m", "fast", "stop")
        self.running = False

    def _postmaster_pid(self):
        """The pid in postmaster.pid, if any: a failed ``pg_ctl -w start`` may leave the
        server running."""
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as fh:
                return int(fh.readline())
        except (OSError, TypeError, ValueError):
            return None

    def close(self):
        """Stop the server and remove everything it had on disk."""
        try:
            self.stop()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.close()  # __exit__ will not run: do not leave a server or its files
            raise

    def __exit__(self, *exc):
        self.close()

    # -- use -----------------------------------------------------------------------------

    def url(self, host="127.0.0.1", user=PG_USER, db="postgres"):
        """A libpq URL for a TCP connection (trust auth, so never a password)."""
        return f"postgresql://{user}@{host}:{self.port}/{db}"

    def psql(self, sql, db="postgres", user=PG_USER):
        """Run ``sql`` with psql over the unix socket; return its unaligned, tuples-only
        stdout.  Raises RuntimeError with psql's stderr if any statement fails."""
        result = subprocess.run(
            [os.path.join(self.bin_dir, "psql"), "-X", "-q", "-A", "-t",
             "-v", "ON_ERROR_STOP=1", "-h", self.socket_dir, "-p", str(self.port),
             "-U", user, "-d", db, "-c", sql],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            cwd=self.root)
        if result.returncode != 0:
            raise RuntimeError(f"psql failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def create_role(self, name, superuser=False):
        self.psql(f"CREATE ROLE {_quote_ident(name)} LOGIN "
                  f"{'SUPERUSER' if superuser else 'NOSUPERUSER'}")

    def create_database(self, name, owner):
        self.psql(f"CREATE DATABASE {_quote_ident(name)} OWNER {_quote_ident(owner)}")

    def log(self):
        """The server's log so far (for assertion messages)."""
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()
        except (OSError, TypeError):
            return ""

    # -- internals -----------------------------------------------------------------------

    def _pg_ctl(self, *args):
        self._as_postgres(os.path.join(self.bin_dir, "pg_ctl"), "-D", self.data_dir, *args)

    def _as_postgres(self, *argv):
        # cwd: postgres may not enter the caller's (often root-only) working directory.
        result = subprocess.run(["runuser", "-u", PG_USER, "--", *argv], cwd=self.root,
                                capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise RuntimeError(f"{os.path.basename(argv[0])} failed ({result.returncode}): "
                               f"{result.stderr.strip()}\n{self.log()[-4000:]}")
        return result.stdout
