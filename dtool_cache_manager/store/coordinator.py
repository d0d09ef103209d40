"""The coordinator: one PostgreSQL server that every host of a shared cache reaches.

Hosts that share a cache over NFS, Lustre or GPFS see each other's files but neither each
other's locks nor each other's processes.  The coordinator's session-level advisory locks
stand in for both: the server keeps them for every host at once and drops them when the
session ends (the process exits, is killed, or its host goes silent).

Locking
    Four kinds of advisory lock, each on a 63-bit key made from the cache's ``cache_id``
    (a keyed BLAKE2b hash, :func:`lock_key`), so caches share one database without
    meeting:

    * ``process:<token>``, exclusive, by every process with holds, for its life: the
      liveness of its holds file and journal on any host;
    * ``hold:<relpath>``, shared, by each process that holds the cached file, taken before
      the broker may fetch it; a clean takes it exclusive with ``pg_try_advisory_lock``,
      which succeeds only if no session on any host holds the file;
    * ``fetch:<relpath>``, exclusive, around a miss: concurrent misses on several hosts
      download once;
    * ``ledger``, exclusive, around every use of the SQLite ledger, so that one process of
      one host at a time opens it (see :mod:`~dtool_cache_manager.store.ledger`).

    Waits are bounded: a statement waits at most :data:`LOCK_STEP` seconds
    (``lock_timeout``), and callers decide whether to wait again.
Performance
    A warm hit never talks to the server: a process takes a file's hold once, with one
    round trip at its first access of that file, and keeps it.  A clean claims a batch of
    files with one statement.  Connecting costs a few milliseconds, once per process.
Filesystems
    The server's clock stamps the trash (no skew between hosts), and nothing here trusts a
    file's content: liveness is a lock the server holds, never a pid written in a file.

A session the process loses (a partition, a restarted server) is noticed at its next round
trip; the process then connects again, takes its holds again and warns.  Meanwhile a clean
on another host may have moved its files to the trash, where open files stay readable for
the grace period (``docs/multi-host.rst``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set

from ..cachefs import CacheDir
from ..errors import CacheManagerError
from ..facilities import after_fork_in_child
from ..sharing import Registration, registration_of

logger = logging.getLogger(__name__)

LOCK_STEP = 1.0  # seconds one lock statement waits (lock_timeout) before we look again
HOLD_PATIENCE = 30.0  # seconds a hold waits for a clean's claim on the file
CONNECT_TIMEOUT = 5  # seconds to reach the server
RECONNECT_AFTER = 10.0  # seconds between attempts to reach a server that was down
APPLICATION_NAME = "dtool-cache-manager"


class CoordinatorUnavailable(CacheManagerError):
    """The coordinator cannot be reached (or psycopg is missing): nothing is removed."""


class CoordinatorBusy(CacheManagerError):
    """A lock on the coordinator stayed taken past the caller's patience."""


def lock_key(cache_id: str, kind: str, name: str = "") -> int:
    """The advisory lock key of ``kind:name`` in the cache ``cache_id`` (63 bits, so that
    pg_locks shows it as two non-negative halves)."""
    digest = hashlib.blake2b(f"{kind}:{name}".encode("utf-8", "surrogateescape"),
                             digest_size=8, key=bytes.fromhex(cache_id)).digest()
    return int.from_bytes(digest, "big") >> 1


def connection_settings(session_timeout: int) -> Dict[str, object]:
    """libpq parameters that bound how long a silent peer keeps a session, on both ends.

    Client side: TCP keepalives and ``tcp_user_timeout``.  Server side, set per session so
    that no site configuration is needed: the same keepalives (the server drops the
    session of a host that stopped answering, and with it its locks), ``tcp_user_timeout``
    and ``client_connection_check_interval`` (PostgreSQL 14+) for a backend that waits."""
    idle = max(1, session_timeout // 3)
    interval = max(1, session_timeout // 6)
    count = max(1, (session_timeout - idle) // interval)
    millis = session_timeout * 1000
    server = (f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval={interval} "
              f"-c tcp_keepalives_count={count} -c tcp_user_timeout={millis} "
              f"-c client_connection_check_interval={min(millis, 5000)} "
              f"-c lock_timeout={int(LOCK_STEP * 1000)}")
    return {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT, "keepalives": 1,
            "keepalives_idle": idle, "keepalives_interval": interval,
            "keepalives_count": count, "tcp_user_timeout": millis, "options": server,
            "application_name": APPLICATION_NAME}


def _driver():
    try:
        import psycopg
    except ImportError:
        raise CoordinatorUnavailable(
            "this cache is coordinated through PostgreSQL, but psycopg is not installed: "
            "pip install 'dtool-cache-manager[postgres]'") from None
    return psycopg


class Coordinator:
    """One process's session with a cache's coordinator.  Thread-safe (one lock); every
    method but :meth:`hold` and :meth:`release` raises :class:`CoordinatorUnavailable` when
    the server cannot be reached."""

    def __init__(self, registration: Registration):
        self.registration = registration
        self._lock = threading.RLock()
        self._conn = None
        self._process_key: Optional[int] = None
        self._held: Set[int] = set()  # hold keys this process has taken (shared)
        self._down_since: Optional[float] = None
        self.sessions_lost = 0
        self.pid = os.getpid()
        # Called once a lost session is replaced: another host may have taken this process
        # for dead meanwhile, and reaped its holds file and journal.
        self.on_reconnect: List[Callable[[], None]] = []
        self._connect()

    # -- the session -----------------------------------------------------------------

    def _connect(self) -> None:
        psycopg = _driver()
        try:
            self._conn = psycopg.connect(
                self.registration.database,
                **connection_settings(self.registration.session_timeout))
        except psycopg.Error as exc:
            self._conn = None
            raise CoordinatorUnavailable(
                f"cannot reach the coordinator {self.registration.database}: "
                f"{_one_line(exc)}") from None
        self._down_since = None

    def _run(self, sql: str, args: Sequence[object] = ()) -> List[tuple]:
        """One statement.  A session found lost is replaced once (its locks taken back)
        and the statement run again; CoordinatorUnavailable if that fails too."""
        psycopg = _driver()
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None or self._conn.closed:
                    self._reconnect()
                assert self._conn is not None
                try:
                    cur = self._conn.execute(sql, args)
                    return cur.fetchall() if cur.description else []
                except psycopg.errors.LockNotAvailable:
                    raise
                except psycopg.OperationalError as exc:
                    self._lost(exc)
                    if attempt == 2:
                        raise CoordinatorUnavailable(
                            f"lost the coordinator {self.registration.database}: "
                            f"{_one_line(exc)}") from None
            raise AssertionError("unreachable")

    def _lost(self, exc: Exception) -> None:
        self.sessions_lost += 1
        logger.warning("dtool-cache-manager: the session with the coordinator %s was lost "
                       "(%s); connecting again", self.registration.database, _one_line(exc))
        try:
            if self._conn is not None:
                self._conn.close()
        except Exception:  # noqa: BLE001 - it is gone either way
            pass
        self._conn = None

    def _reconnect(self) -> None:
        """Connect again and take back this process's locks (its liveness and holds)."""
        if self._down_since is not None and \
                time.monotonic() - self._down_since < RECONNECT_AFTER:
            raise CoordinatorUnavailable(
                f"the coordinator {self.registration.database} was unreachable moments ago")
        psycopg = _driver()
        try:
            self._connect()
            self._take_back()
        except (CoordinatorUnavailable, psycopg.OperationalError) as exc:
            self._down_since = time.monotonic()
            if self._conn is not None:
                self._lost(exc)
            if isinstance(exc, CoordinatorUnavailable):
                raise
            raise CoordinatorUnavailable(f"lost the coordinator {self.registration.database} "
                                         f"again: {_one_line(exc)}") from None
        for restore in self.on_reconnect:
            try:
                restore()
            except Exception as exc:  # noqa: BLE001
                logger.warning("dtool-cache-manager: could not restore this process's "
                               "bookkeeping after a lost session (%r)", exc)

    def _take_back(self) -> None:
        """Take this process's liveness lock and holds again.  Either may still be taken:
        by a clean's claim (for milliseconds), or by this process's previous session, which
        the server drops within the session timeout; so wait that long."""
        assert self._conn is not None
        patience = self.registration.session_timeout + HOLD_PATIENCE
        for sql, args, what in [
                ("SELECT pg_advisory_lock(%s)", (self._process_key,), "its liveness"),
                ("SELECT pg_advisory_lock_shared(k) FROM unnest(%s::bigint[]) k",
                 (sorted(self._held),), f"{len(self._held)} holds")]:
            if args[0] is None or args[0] == []:
                continue
            deadline = time.monotonic() + patience
            while True:
                try:
                    self._conn.execute(sql, args)  # all or nothing: one statement
                    break
                except _driver().errors.LockNotAvailable:
                    if time.monotonic() > deadline:
                        logger.warning("dtool-cache-manager: could not take back %s on the "
                                       "coordinator; this host's holds file still names its "
                                       "files", what)
                        break
        if self._held:
            logger.warning("dtool-cache-manager: took back %d holds on the coordinator; a "
                           "clean on another host may have moved some of these files to the "
                           "trash meanwhile (they are fetched again when next used)",
                           len(self._held))

    def close(self) -> None:
        """End the session: the server drops its locks."""
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001
                    pass
                self._conn = None

    def abandon_after_fork(self) -> None:
        """In a forked child: never touch the parent's session.  The socket is pointed at
        /dev/null first, so that closing it (now or when collected) cannot end the parent's
        session with a goodbye on the shared connection."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            fd = conn.fileno()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except Exception:  # noqa: BLE001
            pass
        _abandoned.append(conn)  # never collected: no goodbye at all

    def key(self, kind: str, name: str = "") -> int:
        return lock_key(self.registration.cache_id, kind, name)

    # -- a process's liveness and holds -----------------------------------------------

    def register(self, token: str) -> None:
        """Take the lock that says the process owning ``token`` is alive (letting go of the
        one of its previous token, if any)."""
        key = self.key("process", token)
        with self._lock:
            self._run("SELECT pg_advisory_lock(%s)", (key,))
            old, self._process_key = self._process_key, key
            if old is not None and old != key:
                self._run("SELECT pg_advisory_unlock(%s)", (old,))

    def hold(self, relpath: str) -> bool:
        """Hold ``relpath`` on the server (shared: many processes may).  Waits while a clean
        has claimed it, at most :data:`HOLD_PATIENCE` seconds.  Never raises: returns False
        (after a warning) if the hold could not be taken; the holds file still names it."""
        key = self.key("hold", relpath)
        deadline = time.monotonic() + HOLD_PATIENCE
        while True:
            try:
                with self._lock:
                    self._run("SELECT pg_advisory_lock_shared(%s)", (key,))
                    self._held.add(key)
                return True
            except CoordinatorUnavailable as exc:
                logger.warning("dtool-cache-manager: no hold on the coordinator for %s (%s); "
                               "this host's holds file still names it", relpath, exc)
                return False
            except Exception as exc:  # noqa: BLE001 - a lock timeout: a clean's claim
                if not _is_lock_timeout(exc) or time.monotonic() > deadline:
                    logger.warning("dtool-cache-manager: no hold on the coordinator for %s "
                                   "(%s)", relpath, _one_line(exc))
                    return False

    def release(self, relpath: str) -> None:
        """Stop holding ``relpath`` (never raises)."""
        key = self.key("hold", relpath)
        with self._lock:
            if key not in self._held:
                return
            self._held.discard(key)
            try:
                self._run("SELECT pg_advisory_unlock_shared(%s)", (key,))
            except Exception as exc:  # noqa: BLE001 - a lost session dropped it anyway
                logger.debug("dtool-cache-manager: release of %s failed (%r)", relpath, exc)

    def live_tokens(self, tokens: Iterable[str]) -> Set[str]:
        """Which of ``tokens`` belong to a process whose session is alive, on any host."""
        by_key = {self.key("process", token): token for token in tokens}
        if not by_key:
            return set()
        rows = self._run(_HELD_KEYS + " AND l.mode = 'ExclusiveLock'", (list(by_key),))
        return {by_key[row[0]] for row in rows if row[0] in by_key}

    # -- removals ---------------------------------------------------------------------

    def claim(self, relpaths: Sequence[str]) -> Set[str]:
        """Take the hold locks of ``relpaths`` exclusively where nobody holds them; returns
        the claimed paths.  A hold waits until :meth:`unclaim`."""
        by_key = {self.key("hold", relpath): relpath for relpath in relpaths}
        if not by_key:
            return set()
        rows = self._run("SELECT k FROM unnest(%s::bigint[]) AS k WHERE pg_try_advisory_lock(k)",
                         (sorted(by_key),))
        return {by_key[row[0]] for row in rows}

    def unclaim(self, relpaths: Iterable[str]) -> None:
        keys = sorted(self.key("hold", relpath) for relpath in relpaths)
        if keys:
            self._run("SELECT pg_advisory_unlock(k) FROM unnest(%s::bigint[]) AS k", (keys,))

    def now(self) -> float:
        """The server's clock, which every host shares (the trash's timestamps)."""
        return float(self._run("SELECT extract(epoch FROM clock_timestamp())")[0][0])

    # -- exclusive locks: the ledger, a download ----------------------------------------

    @contextmanager
    def exclusive(self, kind: str, name: str = "", patience: float = 30.0,
                  progress: Optional[Callable[[], object]] = None) -> Iterator[None]:
        """Hold ``kind:name`` exclusively.  Waits while ``progress()`` changes, or at most
        ``patience`` seconds without a change; then :class:`CoordinatorBusy`."""
        key = self.key(kind, name)
        self._wait_exclusive(key, kind, patience, progress)
        try:
            yield
        finally:
            try:
                self._run("SELECT pg_advisory_unlock(%s)", (key,))
            except CoordinatorUnavailable:
                pass  # the session is gone, and the lock with it

    def _wait_exclusive(self, key: int, kind: str, patience: float,
                        progress: Optional[Callable[[], object]]) -> None:
        last = progress() if progress else None
        deadline = time.monotonic() + patience
        while True:
            if patience <= LOCK_STEP:
                if self._run("SELECT pg_try_advisory_lock(%s)", (key,))[0][0]:
                    return
            else:
                try:
                    self._run("SELECT pg_advisory_lock(%s)", (key,))
                    return
                except CoordinatorUnavailable:
                    raise
                except Exception as exc:  # noqa: BLE001
                    if not _is_lock_timeout(exc):
                        raise
            now = progress() if progress else None
            if now != last:
                last, deadline = now, time.monotonic() + patience
            elif time.monotonic() >= deadline:
                raise CoordinatorBusy(f"another process kept the coordinator's {kind} lock "
                                      f"for more than {patience:g} s")


# Keys of granted advisory locks (bigint form: objsubid 1) among %s, in this database.
_HELD_KEYS = """
SELECT (l.classid::bigint << 32) | l.objid::bigint
FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND ((l.classid::bigint << 32) | l.objid::bigint) = ANY(%s::bigint[])"""


def _is_lock_timeout(exc: BaseException) -> bool:
    return isinstance(exc, _driver().errors.LockNotAvailable)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# -- one session per cache and process --------------------------------------------------

_sessions: Dict[str, Coordinator] = {}
_unreachable: Dict[str, float] = {}  # cache_id -> when connecting last failed (monotonic)
_sessions_lock = threading.Lock()
_abandoned: List[object] = []  # a forked child's inherited connections, never closed


def coordinator_for(registration: Registration) -> Coordinator:
    """This process's session with ``registration``'s coordinator (connected on first
    use); :class:`CoordinatorUnavailable` if it cannot be reached.  After a failed attempt
    the next waits :data:`RECONNECT_AFTER` seconds: a host cut off from the server would
    otherwise wait for the connect timeout at every miss."""
    found = _sessions.get(registration.cache_id)
    if found is not None and found.registration == registration and found.pid == os.getpid():
        return found
    with _sessions_lock:
        found = _sessions.get(registration.cache_id)
        if found is not None and found.pid != os.getpid():  # a child the fork hook missed
            _after_fork_in_child()
            found = None
        if found is None or found.registration != registration:
            failed = _unreachable.get(registration.cache_id)
            if failed is not None and time.monotonic() - failed < RECONNECT_AFTER:
                raise CoordinatorUnavailable(f"the coordinator {registration.database} was "
                                             f"unreachable moments ago")
            try:
                found = Coordinator(registration)
            except CoordinatorUnavailable:
                _unreachable[registration.cache_id] = time.monotonic()
                raise
            _unreachable.pop(registration.cache_id, None)
            _sessions[registration.cache_id] = found
        return found


def coordinator_of(cache: CacheDir) -> Optional[Coordinator]:
    """:func:`coordinator_for` the cache's registration; None if it has no coordinator."""
    registration = registration_of(cache)
    return None if registration is None else coordinator_for(registration)


def check_server(registration: Registration) -> str:
    """Connect once and return the server's version, or raise CoordinatorUnavailable
    (what ``dtool cache init --database`` checks before it registers a server)."""
    coordinator = Coordinator(registration)
    try:
        version = str(coordinator._run("SHOW server_version")[0][0])
        number = int(coordinator._run("SHOW server_version_num")[0][0])
    finally:
        coordinator.close()
    if number < 140000:
        raise CoordinatorUnavailable(f"the coordinator runs PostgreSQL {version}; "
                                     "version 14 or later is needed")
    return version


def _after_fork_in_child() -> None:
    for coordinator in list(_sessions.values()):
        coordinator.abandon_after_fork()
    _sessions.clear()
    _unreachable.clear()


after_fork_in_child(_after_fork_in_child)
