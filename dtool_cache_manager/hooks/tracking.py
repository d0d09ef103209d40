"""Our own hook implementations, registered through the specification's entry-point groups.

``pre_item_content_abspath`` takes the in-use hold (before the broker can fetch, so a
cleaner cannot slip in); ``post_item_content_abspath`` journals the access and, after a
miss, lets :mod:`~dtool_cache_manager.housekeeping` decide whether to start a background
clean.  Both are per process and per cache directory, and neither opens the ledger: see
``docs/design.rst``.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Set, Tuple

from .. import cachefs
from ..holds import HoldKey, HoldsFile
from .host import current_access
from .hookspecs import hookimpl
from ..facilities import after_fork_in_child
from ..journal import JournalWriter, ManifestRecord
from ..layout import current_identity
from ..sharing import HOW_TO_DECLARE, known_sharing

logger = logging.getLogger(__name__)


class ItemState:
    """What this process keeps per (uri, cached file): its hold key, and the number its
    journal knows the file by, with the size and mtime that number stands for."""

    __slots__ = ("key", "number", "size", "mtime", "session")

    def __init__(self, key: HoldKey, session: "ProcessSession"):
        self.key = key
        self.session = session
        self.number: Optional[int] = None
        self.size = -1
        self.mtime = -1.0


class ProcessSession:
    """This process's holds file and journal in one cache directory."""

    def __init__(self, cache: cachefs.CacheDir):
        self.cache = cache
        identity = current_identity()
        self.holds = HoldsFile(cache, identity)  # first: its lock marks the journal's owner live
        self.journal = JournalWriter(cache, identity, self.holds.token,
                                     on_rotate=self._fold_finished_segments)
        self.items: Dict[Tuple[str, str], ItemState] = {}
        _coordinate_or_warn(cache, self)

    def restore_if_reaped(self) -> None:
        """The coordinator's session was lost and is back: if another host took this process
        for dead meanwhile and removed its holds file and journal, make them again.  The
        accesses journalled after that host folded the journal are lost (docs/multi-host)."""
        if not (self.holds.removed or self.journal.removed):
            return
        logger.warning("dtool-cache-manager: another host took this process for dead while "
                       "its session was lost; its holds and journal start again")
        self.holds.start_again()
        self.journal.start_again(self.holds.token)  # the old one is folded as a dead one's
        for state in list(self.items.values()):
            state.number = None  # described again at its next access

    def _fold_finished_segments(self) -> None:
        """The journal moved on to a new segment: fold the finished ones in and delete them,
        so that a long run's journal stays small (by the access that filled the segment:
        about a second for 32 MiB, every million accesses or so)."""
        self._fold(leaving=False)

    def close(self) -> None:
        """Fold this process's journal in (a later reader does it if that fails, or if the
        ledger's path is not safe to use from here), then drop the holds."""
        self.journal.close()
        self._fold(leaving=True)
        self.holds.close()

    def _fold(self, leaving: bool) -> None:
        if self.cache.unsafe is not None:
            return
        try:
            from ..store.ledger import Ledger

            with Ledger(self.cache, timeout=2.0) as ledger:
                ledger.compact(only_token=self.holds.token, owner_leaving=leaving)
        except Exception as exc:  # noqa: BLE001
            logger.debug("dtool-cache-manager: journal left for later (%r)", exc)


def _coordinate_or_warn(cache: cachefs.CacheDir, session: "ProcessSession") -> None:
    """Once per process and cache: hold through the cache's coordinator, if it has one;
    else warn if other hosts' holds are invisible here (see sharing)."""
    try:
        found = known_sharing(cache)  # one fstatfs and one small read, at the first access
    except Exception:  # noqa: BLE001 - a warning is not worth failing an access for
        return
    if found.registration is not None:
        from ..store.coordinator import CoordinatorUnavailable, coordinator_for

        try:
            coordinator = coordinator_for(found.registration)
            session.holds.coordinate(coordinator)
            coordinator.on_reconnect.append(session.restore_if_reaped)
        except CoordinatorUnavailable as exc:
            logger.warning("dtool-cache-manager: %s; accesses are recorded, and this "
                           "process's holds are kept by cleans on every host until it exits",
                           exc)
        return
    if found.possibly_shared:
        logger.warning("dtool-cache-manager: %s is on %s: accesses are recorded, but holds "
                       "do not reach other hosts, so nothing is cleaned from it; %s",
                       cache.path, found.filesystem_text, HOW_TO_DECLARE)


_sessions: Dict[str, Optional[ProcessSession]] = {}
_sessions_lock = threading.Lock()
_scopes = threading.local()


def session_for(cache_dir: str) -> Optional[ProcessSession]:
    """The session for ``cache_dir``; None (after one warning) if we cannot write there."""
    try:
        return _sessions[cache_dir]
    except KeyError:
        pass
    with _sessions_lock:
        if cache_dir not in _sessions:
            try:
                _sessions[cache_dir] = ProcessSession(cachefs.handle_for(cache_dir))
            except OSError as exc:
                logger.warning("dtool-cache-manager: cannot record usage in %s (%s); accesses "
                               "in this process are not tracked or protected from cleaning",
                               cache_dir, exc)
                _sessions[cache_dir] = None
        return _sessions[cache_dir]


def _current_scope(holds: HoldsFile) -> Optional[Set[HoldKey]]:
    """The innermost scope's keys for ``holds``, or None outside any scope."""
    stack: Optional[List[Dict[HoldsFile, Set[HoldKey]]]] = getattr(_scopes, "stack", None)
    return stack[-1].setdefault(holds, set()) if stack else None


@contextmanager
def hold_scope() -> Iterator[None]:
    """Release, on exit, the holds first taken inside the block (in this thread).

    By default an item stays in use until the process exits; use this around short-lived
    work in long-running processes so that a cleaner may take the items afterwards.
    """
    stack = getattr(_scopes, "stack", None)
    if stack is None:
        stack = _scopes.stack = []
    scope: Dict[HoldsFile, Set[HoldKey]] = {}
    stack.append(scope)
    try:
        yield
    finally:
        stack.pop()
        for holds, keys in scope.items():
            holds.end_scope(keys)


# Both implementations are on the hot path: they guard themselves (no extra wrapper call)
# and do nothing but a set lookup and, for post, one journal line.


@hookimpl(tryfirst=True)
def pre_item_content_abspath(uri, identifier):
    try:
        access = current_access()
        if access is None or access.plan is None:
            return
        assert access.placement.cache_dir is not None  # a plan exists only for a caching broker
        session = _sessions.get(access.placement.cache_dir) or session_for(
            access.placement.cache_dir)
        if session is None:
            return
        plan = access.plan
        state = session.items.get((uri, plan.abspath))
        if state is None:
            state = session.items[(uri, plan.abspath)] = ItemState(
                HoldKey(uri, access.placement.uuid, identifier, plan.relpath), session)
        access.state = state
        holds = session.holds
        if state.key not in holds.permanent:
            holds.hold(state.key, _current_scope(holds))
    except Exception as exc:  # noqa: BLE001
        _warn("could not take the in-use hold", exc)


@hookimpl
def post_item_content_abspath(uri, identifier, abspath):
    try:
        access = current_access()
        if access is None or access.relpath is None or access.placement.cache_dir is None:
            return  # no cache_dir: no session either
        assert access.plan is not None  # host._observe sets relpath only for a planned item
        session = _sessions.get(access.placement.cache_dir)
        if session is None:
            return
        state = access.state
        if state is None or access.relpath != access.plan.relpath:
            # The broker surprised us: hold the file it returned, and describe it afresh.
            state = ItemState(HoldKey(uri, access.placement.uuid, identifier, access.relpath),
                              session)
            session.holds.hold(state.key, _current_scope(session.holds))
        if state.number is None or state.size != access.size or state.mtime != access.mtime:
            plan = access.plan
            state.number = session.journal.describe(
                access.relpath, uri, access.placement.uuid, identifier,
                access.placement.scheme, access.size, access.mtime,
                ManifestRecord(access.relpath, plan.item_relpath, plan.manifest_size,
                               plan.manifest_hash, plan.hash_function))
            state.size, state.mtime = access.size, access.mtime
        # Stamped at completion: after the hold, so after any removal it waited for.
        session.journal.record_access(state.number, time.time(), access.miss,
                                      access.fetch_seconds)
    except Exception as exc:  # noqa: BLE001
        _warn("could not record the access", exc)
        return
    if access.miss:  # only a miss can grow the cache: hits stay as cheap as they were
        _after_miss(access.placement.cache_dir, access.size)


def _after_miss(cache_dir: str, size_bytes: int) -> None:
    """Automatic housekeeping (imported on the first miss, not at start-up); fail-open."""
    try:
        from ..housekeeping.trigger import after_miss

        after_miss(cache_dir, size_bytes)
    except Exception as exc:  # noqa: BLE001
        _warn("automatic housekeeping failed", exc)


def known_warm_hit(placement, plan, uri: str) -> Optional[ItemState]:
    """The item's state if this access is a repeat that both hooks would pass over: the file
    is already held until exit, and it is there, the size and mtime its journal number stands
    for.  Then the host skips the hooks and calls :func:`record_warm_hit` (about 2 µs less
    per access, docs/performance.rst).  None sends the access down the general path."""
    try:
        session = _sessions.get(placement.cache_dir)
        if session is None:
            return None
        state = session.items.get((uri, plan.abspath))
        if state is None or state.number is None or state.key not in session.holds.permanent:
            return None
        st = os.stat(plan.abspath)
    except Exception:  # noqa: BLE001 - the general path reports what is wrong
        return None
    if st.st_size != state.size or st.st_mtime != state.mtime or (
            plan.manifest_size is not None and st.st_size != plan.manifest_size):
        return None
    return state


def record_warm_hit(state: ItemState) -> None:
    """Journal a hit that :func:`known_warm_hit` vouched for, as the post hook would."""
    try:
        state.session.journal.record_access(state.number or 0, time.time(), False, 0.0)
    except Exception as exc:  # noqa: BLE001
        _warn("could not record the access", exc)


setattr(pre_item_content_abspath, "guards_itself", True)
setattr(post_item_content_abspath, "guards_itself", True)
# Both hooks alone may be bypassed for a warm hit: see plugins.Dispatch (one object, so that
# it can tell that both offer the same shortcut).
WARM_HITS = (known_warm_hit, record_warm_hit)
for _hook in (pre_item_content_abspath, post_item_content_abspath):
    setattr(_hook, "warm_hits", WARM_HITS)
del _hook


def _warn(what: str, exc: Exception) -> None:
    logger.warning("dtool-cache-manager: %s (%r); item access continues", what, exc,
                   exc_info=logger.isEnabledFor(logging.DEBUG))


def release(cache_dir: str, uri: str, identifier: str) -> int:
    """Let go of this process's holds on (uri, identifier) in ``cache_dir``."""
    session = _sessions.get(cache_dir)
    return session.holds.release(uri, identifier) if session else 0


@atexit.register
def _close_sessions() -> None:
    _sessions.get("")  # in a forked child without fork hooks: forgets the parent's first
    for session in list(_sessions.values()):
        if session is not None:
            try:
                session.close()
            except Exception as exc:  # noqa: BLE001
                logger.debug("dtool-cache-manager: closing session failed (%r)", exc)
    _sessions.clear()


def _after_fork_in_child() -> None:
    # The child must neither keep the parent's holds alive after the parent dies, nor
    # write into the parent's files: drop the inherited descriptors and start afresh.
    for session in list(dict.values(_sessions)):
        if session is not None:
            for fd in (session.holds._fd, session.journal._fd, session.journal._dir_fd):
                try:
                    os.close(fd)
                except OSError:
                    pass
    _sessions.clear()


class _SessionsOfThisProcess(Dict[str, Optional[ProcessSession]]):
    """The sessions, where the platform cannot tell us of a fork (no
    ``os.register_at_fork``): a child forgets its parent's the first time it looks them up
    (or at its exit), as the fork hook would have made it do."""

    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def get(self, key, default=None):
        if os.getpid() != self.pid:
            self.pid = os.getpid()
            _after_fork_in_child()
        return dict.get(self, key, default)


if not after_fork_in_child(_after_fork_in_child):
    _sessions = _SessionsOfThisProcess()
