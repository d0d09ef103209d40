"""How many holder processes one PostgreSQL server carries on this machine (issue 17).

The multi-host design holds an item with a session-level advisory lock
(``pg_advisory_lock_shared``) taken by each process that uses the item, on its own
connection, so that the server drops the holds of a process, or of a host, that dies.  A
clean proves an item unused with ``pg_try_advisory_lock``.  So the server must carry one
session per holding process, each with its locks.  This measures that on a real server
started here (``initdb``/``pg_ctl`` as the ``postgres`` user, a Unix socket), in steps of
``--steps`` holders:

- each holder is a connection (a backend process on the server, as a real holder's would
  be) that takes ``--locks`` shared advisory locks, then stays; the client is one process
  with many connections, which costs the server the same as many processes;
- the time to connect and take the locks, per holder (median and 99th percentile);
- the server's memory: the private memory of all its processes (``Private_*`` in
  ``/proc/<pid>/smaps_rollup``), against the same with no holder; the shared memory it
  allocated at start (``shared_memory_size``: buffers and the lock table) comes on top;
- a clean's proof over ``--keys`` items (``pg_try_advisory_lock`` for 512 keys per
  statement, then unlocking them) while the holders hold theirs, against no holder.

Advisory locks live in the server's shared lock table, which has room for
``max_locks_per_transaction * max_connections`` locks in all: its size is part of the
settings printed with the table.

    python benchmarks/coordinator_capacity.py [--steps 100,400,1000] [--locks 100]
                                              [--keys 100000] [--write-rst PATH]

Needs root (to run the server as ``postgres``), PostgreSQL's server binaries
(``/usr/lib/postgresql/*/bin``) and psycopg 3 (``pip install 'psycopg[binary]'``).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence, Tuple

import psycopg

BATCH = 512


def server_binaries() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        raise SystemExit("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return os.path.dirname(found[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def postgres_server(settings: Dict[str, str]) -> Iterator[Tuple[str, str]]:
    """A throw-away server: (conninfo, data directory); stopped and removed afterwards."""
    bindir = server_binaries()
    top = tempfile.mkdtemp(prefix="dcm-pg-")
    data, sockets = os.path.join(top, "data"), os.path.join(top, "sock")
    os.makedirs(sockets)
    shutil.chown(top, "postgres")
    shutil.chown(sockets, "postgres")
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, f"{bindir}/initdb", "-D", data, "-A", "trust", "-U",
                    "postgres"], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    options = " ".join([f"-p {port}", f"-k {sockets}", "-c listen_addresses=''",
                        *(f"-c {k}={v}" for k, v in settings.items())])
    subprocess.run([*as_postgres, f"{bindir}/pg_ctl", "-D", data, "-o", options, "-w",
                    "-l", os.path.join(top, "server.log"), "start"], check=True,
                   stdout=subprocess.DEVNULL)
    try:
        yield f"host={sockets} port={port} user=postgres dbname=postgres", data
    finally:
        subprocess.run([*as_postgres, f"{bindir}/pg_ctl", "-D", data, "-m", "immediate",
                        "-w", "stop"], stdout=subprocess.DEVNULL)
        shutil.rmtree(top, ignore_errors=True)


def server_memory_kib(data: str) -> int:
    """Private memory of the postmaster and every process it started."""
    with open(os.path.join(data, "postmaster.pid")) as fh:
        postmaster = int(fh.readline())
    pids = [postmaster] + [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()]
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith(("Private_Clean:", "Private_Dirty:")):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def hold(conninfo: str, first_key: int, locks: int) -> Tuple[psycopg.Connection, float]:
    start = time.perf_counter()
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute("SELECT pg_advisory_lock_shared(k) FROM generate_series(%s::bigint, %s) k",
                 (first_key, first_key + locks - 1))
    return conn, time.perf_counter() - start


def prove_unused(conninfo: str, keys: int, offset: int) -> float:
    """A clean's proof over ``keys`` items: exclusive try-locks, 512 per statement, each
    batch released before the next (as a clean would after its unlinks)."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        start = time.perf_counter()
        for first in range(offset, offset + keys, BATCH):
            got = conn.execute(
                "SELECT count(*) FILTER (WHERE pg_try_advisory_lock(k)) "
                "FROM generate_series(%s::bigint, %s) k",
                (first, min(first + BATCH, offset + keys) - 1)).fetchone()
            assert got is not None
            conn.execute("SELECT pg_advisory_unlock_all()")
        return time.perf_counter() - start


def measure(steps: Sequence[int], locks: int, keys: int) -> Tuple[List[List[str]], Dict]:
    settings = {"max_connections": str(max(steps) + 10),
                "max_locks_per_transaction": str(max(64, locks)),
                "shared_buffers": "128MB"}
    rows = []
    with postgres_server(settings) as (conninfo, data):
        with psycopg.connect(conninfo) as conn:
            shown = conn.execute("SHOW shared_memory_size").fetchone()
            settings["(shared memory)"] = shown[0] if shown else "?"
        idle_kib = server_memory_kib(data)
        baseline = statistics.median(prove_unused(conninfo, keys, 10 ** 9) for _ in range(3))
        rows.append(["0", "-", "-", f"{idle_kib / 1024:.0f}", "-", f"{baseline:.2f}", "1.00"])
        conns: List[psycopg.Connection] = []
        try:
            for target in steps:
                times = []
                while len(conns) < target:
                    conn, took = hold(conninfo, len(conns) * locks, locks)
                    conns.append(conn)
                    times.append(took)
                kib = server_memory_kib(data)
                # Half the keys the holders hold, half free: the proof meets both.
                proof = statistics.median(prove_unused(conninfo, keys, target * locks - keys // 2)
                                          for _ in range(3))
                times.sort()
                rows.append([str(target), f"{statistics.median(times) * 1e3:.1f}",
                             f"{times[int(len(times) * 0.99) - 1] * 1e3:.1f}",
                             f"{kib / 1024:.0f}", f"{(kib - idle_kib) / target:.0f}",
                             f"{proof:.2f}", f"{proof / baseline:.2f}"])
                print(" | ".join(rows[-1]), flush=True)
        finally:
            for conn in conns:
                conn.close()
    return rows, settings


HEADERS = ["holders", "connect+lock ms (median)", "p99 ms", "server MiB",
           "KiB per holder", "proof s", "vs no holders"]


def table(rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADERS)]
    line = "  ".join("=" * w for w in widths)
    out = [line, "  ".join(h.ljust(w) for h, w in zip(HEADERS, widths)), line]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out + [line])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="100,400,1000")
    parser.add_argument("--locks", type=int, default=100, help="items each holder holds")
    parser.add_argument("--keys", type=int, default=100_000, help="items a clean proves")
    parser.add_argument("--write-rst", metavar="PATH")
    args = parser.parse_args()
    steps = sorted(int(s) for s in args.steps.split(","))
    rows, settings = measure(steps, args.locks, args.keys)
    version = subprocess.run([f"{server_binaries()}/postgres", "--version"],
                             capture_output=True, text=True).stdout.strip()
    text = (f"{version}; {os.cpu_count()} cores; each holder holds {args.locks} items; "
            f"the proof covers {args.keys:,} items\n"
            f"server settings: {', '.join(f'{k}={v}' for k, v in settings.items())}\n\n"
            + table(rows))
    print(text)
    if args.write_rst:
        with open(args.write_rst, "a") as fh:
            fh.write("\n" + text + "\n")


if __name__ == "__main__":
    main()
