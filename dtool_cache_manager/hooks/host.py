"""Host integration: make the hooks fire around ``dtoolcore.DataSet.item_content_abspath``.

Upstream dtoolcore calls no hook, so :func:`install` replaces the method with a wrapper that:

1. works out where the broker will cache the item (so it can tell a hit from a miss by the
   file's presence before the call, not by guessing afterwards);
2. calls every ``pre_item_content_abspath`` hook (ours takes the in-use hold);
3. calls the broker, and if the file is missing or truncated, does so under a per-item fetch
   lock so that concurrent misses in many processes download it once (single flight);
   a fetched file whose size is not the manifest's is fetched once more, and never handed
   out (:class:`~dtool_cache_manager.errors.IncompleteItemError`);
4. calls every ``post_item_content_abspath`` hook (ours journals the access).

The host comes first: any fault in steps 1, 2 or 4 is logged and the broker's path returned
unchanged.  Only the broker's own exceptions, and an incomplete download, reach the caller.

The manifest comes from the dataset's server, so identifiers and paths are checked before we
act on a planned path: a plan is made only for a file directly inside the dataset's own
directory in the cache, and everything we do there goes through descriptors (see
:mod:`cachefs`).
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import dtoolcore
from dtoolcore.utils import generous_parse_uri

from .. import cachefs
from ..errors import IncompleteItemError
from ..layout import configured_cache_dir, is_item_relpath, relpath_in, tracking_disabled
from ..rangelock import open_range_lock

logger = logging.getLogger(__name__)

_MARK = "_dtool_cache_manager_wrapper"
_PLACEMENT = "_dtool_cache_manager_placement"

#: The unpatched method; ``None`` until :func:`install` runs.
ORIGINAL_ITEM_CONTENT_ABSPATH: Optional[Callable[[Any, str], str]] = None

_install_lock = threading.Lock()
_local = threading.local()  # .access: the Access whose hooks run in this thread


@dataclass(frozen=True)
class ItemPlan:
    """Where the broker will put one item, and what the manifest says it should be."""

    abspath: str
    relpath: str  # relative to the cache directory: the dataset's directory, then the name
    manifest_size: Optional[int]
    manifest_hash: Optional[str]
    hash_function: Optional[str]
    item_relpath: Optional[str]


@dataclass(frozen=True)
class DatasetPlacement:
    """Where one dataset's items land in the cache; worked out once per DataSet object."""

    cache_dir: Optional[str]  # None: not a caching broker (file://), nothing to track
    uri: str
    uuid: str
    scheme: str
    item_dir: str  # directory the broker writes this dataset's items to
    extensions: bool  # True when cache file names keep the item's extension
    dir_relpath: str  # item_dir relative to the cache directory, checked: no '..', no link
    plans: Dict[str, ItemPlan] = field(default_factory=dict, compare=False, repr=False)


class Access:
    """One call in progress; hooks read it with :func:`current_access`."""

    __slots__ = ("placement", "identifier", "plan", "started", "abspath", "relpath", "miss",
                 "size", "mtime", "fetch_seconds", "state")

    def __init__(self, placement: DatasetPlacement, identifier: str, plan: Optional[ItemPlan]):
        self.placement = placement
        self.identifier = identifier
        self.plan = plan
        self.started = 0.0  # stamped once the pre hooks (the hold) are done
        self.abspath: Optional[str] = None
        self.relpath: Optional[str] = None
        self.miss = False
        self.size = 0
        self.mtime = 0.0
        self.fetch_seconds = 0.0
        self.state: Any = None  # per-process bookkeeping of our own pre hook, for post

    @property
    def tracked(self) -> bool:
        return self.plan is not None


def current_access() -> Optional[Access]:
    """The access whose hooks are running in this thread, for hooks that want more context."""
    return getattr(_local, "access", None)


def install() -> bool:
    """Wrap ``DataSet.item_content_abspath``; idempotent.  Returns True if it wrapped now."""
    global ORIGINAL_ITEM_CONTENT_ABSPATH
    with _install_lock:
        current = dtoolcore.DataSet.item_content_abspath
        if getattr(current, _MARK, False):
            return False
        original = current

        def item_content_abspath(self, identifier):
            if _disabled:
                return original(self, identifier)
            return _tracked_call(self, identifier, original)

        item_content_abspath.__doc__ = original.__doc__
        setattr(item_content_abspath, "__wrapped__", original)  # as functools.wraps would
        setattr(item_content_abspath, _MARK, True)
        ORIGINAL_ITEM_CONTENT_ABSPATH = original
        dtoolcore.DataSet.item_content_abspath = item_content_abspath
        return True


_disabled = tracking_disabled()


def set_enabled(enabled: bool) -> None:
    """Switch tracking on or off in this process (DTOOL_CACHE_MANAGER_DISABLE at start-up)."""
    global _disabled
    _disabled = not enabled


def _warn(what: str) -> None:
    logger.warning("dtool-cache-manager: %s; item access continues untracked", what,
                   exc_info=logger.isEnabledFor(logging.DEBUG))


_dispatch = None  # plugins.Dispatch, loaded on first access to keep dtoolcore's import light


def _hooks():
    global _dispatch, _watching
    if _dispatch is None:
        from . import plugins

        if not _watching:
            plugins.on_change(_forget_dispatch)
            _watching = True
        _dispatch = plugins.dispatch()
    return _dispatch


_watching = False  # whether plugins will tell us to drop the dispatch


def _forget_dispatch() -> None:
    """A plugin was registered at run time: build the dispatch again on the next access."""
    global _dispatch
    _dispatch = None


def _tracked_call(dataset, identifier: str, original) -> str:
    # The hot path, kept flat on purpose (docs/performance.rst): a warm hit costs one stat,
    # the two hook dispatches and one journal line; a repeated warm hit with only our own
    # hooks registered skips the dispatches (``Dispatch.warm_hits``).  Every step of ours is
    # guarded; only the broker's own exceptions reach the caller.
    try:
        placement = dataset.__dict__.get(_PLACEMENT) or placement_of(dataset)
        plan = placement.plans.get(identifier) or _plan(placement, dataset, identifier)
        hooks = _dispatch or _hooks()
        warm = hooks.warm_hits
        state = None if warm is None or plan is None else warm[0](placement, plan,
                                                                  placement.uri)
        access = None if state is not None else Access(placement, identifier, plan)
    except Exception as exc:  # noqa: BLE001
        _warn(f"could not prepare tracking ({exc!r})")
        state = access = None
    if state is not None and plan is not None and warm is not None:  # warm: set if state is
        started = time.time()
        abspath = original(dataset, identifier)
        try:
            if abspath == plan.abspath:
                warm[1](state)
                return abspath
            # The broker surprised us: let the post hooks judge it, as on the general path.
            access = Access(placement, identifier, plan)
            access.state, access.started = state, started
            access.size, access.mtime = state.size, state.mtime
        except Exception as exc:  # noqa: BLE001
            _warn(f"post hooks failed ({exc!r})")
            return abspath
        return _after_broker(access, plan, hooks, abspath)
    if access is None:  # outside the except block, so a broker error is not chained to ours
        return original(dataset, identifier)

    previous = getattr(_local, "access", None)
    _local.access = access
    try:
        try:
            hooks.pre(placement.uri, identifier)
        except Exception as exc:  # noqa: BLE001 - each hook is guarded; this is pluggy itself
            _warn(f"pre hooks failed ({exc!r})")
        access.started = time.time()  # after the hold, which may have waited for a removal
        if plan is None or _is_hit(access, plan):
            abspath = original(dataset, identifier)
        else:
            abspath = _fetch_single_flight(access, plan, dataset, identifier, original)
        return _after_broker(access, plan, hooks, abspath)
    finally:
        _local.access = previous


def _after_broker(access: Access, plan: Optional[ItemPlan], hooks, abspath: str) -> str:
    """Tell the post hooks (fail-open) what the broker returned, and return it."""
    previous = getattr(_local, "access", None)
    _local.access = access
    try:
        if plan is not None:
            _observe(access, plan, abspath)
        hooks.post(access.placement.uri, access.identifier, abspath)
    except Exception as exc:  # noqa: BLE001
        _warn(f"post hooks failed ({exc!r})")
    finally:
        _local.access = previous
    return abspath


# -- where will the broker put it? -----------------------------------------------------


def placement_of(dataset) -> DatasetPlacement:
    """Where ``dataset``'s items are cached, memoised on the DataSet object like the broker's
    own cache path, which brokers also fix when the object is built."""
    placement = dataset.__dict__.get(_PLACEMENT)
    if placement is None:
        placement = dataset.__dict__[_PLACEMENT] = _work_out_placement(dataset)
    return placement


def _work_out_placement(dataset) -> DatasetPlacement:
    uri = dataset.uri
    scheme = generous_parse_uri(uri).scheme or "file"
    broker = dataset._storage_broker
    if scheme == "file":
        return DatasetPlacement(None, uri, dataset.uuid, scheme, "", True, "")
    cache_dir = None
    for name, value in vars(broker).items():
        if name.endswith("cache_abspath") and isinstance(value, str):
            cache_dir = value  # the broker's own idea beats re-reading the config
            break
    if cache_dir is None:
        cache_dir = configured_cache_dir(getattr(broker, "config_path", None))
    # http(s) brokers cache under the dataset's URL path, the others under the UUID.
    subdir = broker.uuid if scheme in ("http", "https") and isinstance(
        getattr(broker, "uuid", None), str) else dataset.uuid
    # dtool-s3/ecs derive the extension from an encoded handle and so never keep one.
    extensions = scheme not in ("s3", "ecs")
    normalised = os.path.abspath(os.path.expanduser(cache_dir))
    dir_relpath = _plain_relpath(subdir)
    if dir_relpath is None:
        # A UUID or URL path from the server that leaves the dataset's directory ('..', an
        # absolute path, our bookkeeping): the broker does what it does; we do nothing.
        logger.warning("dtool-cache-manager: not tracking %s: its cache directory %r is not "
                       "a plain directory inside %s", uri, subdir, normalised)
        return DatasetPlacement(None, uri, dataset.uuid, scheme, "", True, "")
    # Predicted paths are built from the broker's own string, so they compare equal to
    # what it returns; the bookkeeping uses the normalised directory.
    return DatasetPlacement(normalised, uri, dataset.uuid, scheme,
                            os.path.join(cache_dir, subdir), extensions, dir_relpath)


def _plain_relpath(subdir) -> Optional[str]:
    """``subdir`` (a UUID, or a URL path with its slashes) as a path inside the cache, or
    None if it is none: absolute, with a '.' or '..' component, a NUL, or our
    bookkeeping.  Empty components (a trailing '/', '//') are what the OS makes of them."""
    if not isinstance(subdir, str) or subdir.startswith("/"):
        return None
    parts = [p for p in subdir.split("/") if p]
    relpath = "/".join(parts)
    return relpath if is_item_relpath(relpath) else None


_MAX_NAME = 255  # bytes in a file name on the filesystems caches live on


def _file_name(identifier, item_relpath, extensions: bool) -> Optional[str]:
    """The name the broker gives the item's file, if it is a plain name (the identifier and
    extension come from the server's manifest: nothing with '/', NUL, '.' or '..')."""
    if not isinstance(identifier, str):
        return None
    name = identifier
    if extensions and isinstance(item_relpath, str):
        name += os.path.splitext(item_relpath)[1]
    if not name or name in (".", "..") or "/" in name or "\0" in name \
            or len(os.fsencode(name)) > _MAX_NAME:
        return None
    return name


def _plan(placement: DatasetPlacement, dataset, identifier: str) -> Optional[ItemPlan]:
    plan = placement.plans.get(identifier)
    if plan is None and placement.cache_dir is not None:
        # The DataSet caches its manifest; read the cache directly, the property logs.
        manifest = dataset.__dict__.get("_manifest_cache") or dataset._manifest
        props = manifest["items"].get(identifier)
        if not isinstance(props, dict):
            return None  # not an item of this dataset: the broker will say so
        item_relpath = props.get("relpath")
        name = _file_name(identifier, item_relpath, placement.extensions)
        if name is None:
            logger.warning("dtool-cache-manager: not tracking item %r of %s: its name in the "
                           "manifest would leave the dataset's cache directory", identifier,
                           placement.uri)
            return None
        size, digest, function = (props.get("size_in_bytes"), props.get("hash"),
                                  manifest.get("hash_function"))
        plan = placement.plans[identifier] = ItemPlan(
            abspath=os.path.join(placement.item_dir, name),
            relpath=f"{placement.dir_relpath}/{name}",
            manifest_size=size if isinstance(size, int) and not isinstance(size, bool)
            and 0 <= size < 1 << 62 else None,
            manifest_hash=digest if isinstance(digest, str) else None,
            hash_function=function if isinstance(function, str) else None,
            item_relpath=item_relpath if isinstance(item_relpath, str) else None,
        )
    return plan


# -- fetching: single flight, truncation repair, hit/miss ---------------------------------


FETCH_PATIENCE = 120.0  # seconds a miss waits for another's download that makes no progress


def _fetch_single_flight(access: Access, plan: ItemPlan, dataset, identifier: str,
                         original) -> str:
    """Fetch a missing item under its fetch lock, so concurrent misses download it once.

    Only misses take the lock, so concurrent hits never wait on one another.  The wait
    lasts while the download in progress grows, and at most :data:`FETCH_PATIENCE` seconds
    without progress (a member could keep the lock for ever).  If the lock cannot be had
    (read-only cache, no lock support), fetch as upstream does.
    """
    placement = access.placement
    assert placement.cache_dir is not None  # a plan exists only for a caching broker
    have_lock = False
    try:
        cache = cachefs.handle_for(placement.cache_dir)
        fetch_lock = open_range_lock(cache, cachefs.FETCH_LOCK)
        locked = fetch_lock.locked(plan.relpath, exclusive=True, patience=FETCH_PATIENCE,
                                   progress=lambda: _partial_size(plan))
        locked.__enter__()
        have_lock = True
    except Exception as exc:  # noqa: BLE001
        logger.debug("dtool-cache-manager: no fetch lock for %s (%r)", plan.abspath, exc)
    if not have_lock:  # outside the except block: the broker's error is not chained to ours
        return _timed_miss(access, dataset, identifier, original)
    elsewhere = _fetch_lock_on_coordinator(cache, plan)
    try:
        if _is_hit(access, plan):  # another process fetched it while we waited
            return original(dataset, identifier)
        return _fetch_checked(access, plan, cache, dataset, identifier, original)
    finally:
        for held in (elsewhere, locked):  # each released even if the other fails
            try:
                if held is not None:
                    held.__exit__(None, None, None)
            except Exception as exc:  # noqa: BLE001
                _warn(f"could not release the fetch lock ({exc!r})")


def _fetch_lock_on_coordinator(cache: "cachefs.CacheDir", plan: ItemPlan):
    """In a cache with a coordinator, the item's fetch lock on the server as well (taken
    after this host's, so that one process per host waits there): misses on several hosts
    download once, and never into one ``.tmp`` at a time.  None (fail-open) without one."""
    try:
        from ..store.coordinator import coordinator_of

        coordinator = coordinator_of(cache)
        if coordinator is None:
            return None
        held = coordinator.exclusive(
            "fetch", plan.relpath, patience=FETCH_PATIENCE, progress=lambda: _partial_size(plan))
        held.__enter__()
        return held
    except Exception as exc:  # noqa: BLE001
        global _warned_no_fetch_lock
        log = logger.debug if _warned_no_fetch_lock else logger.warning
        _warned_no_fetch_lock = True
        log("dtool-cache-manager: fetching %s without the coordinator's fetch lock, so "
            "another host may fetch it at the same time (%s)", plan.abspath, exc)
        return None


_warned_no_fetch_lock = False  # once per process: then every miss would say it again


def _partial_size(plan: ItemPlan) -> Optional[int]:
    """How far the download in progress has come (what the lock's waiter watches)."""
    try:
        return os.stat(plan.abspath + ".tmp").st_size
    except OSError:
        return None


def _fetch_checked(access: Access, plan: ItemPlan, cache: "cachefs.CacheDir", dataset,
                   identifier: str, original) -> str:
    """Under the fetch lock: clear the way, fetch, check the size; once more if it is wrong.

    Everything we do to the dataset's directory goes through its descriptor, opened from the
    cache root without following links.  A fault of ours is logged and the broker called
    as upstream would; only an incomplete file raises.
    """
    parts = plan.relpath.split("/")
    dir_fd = _dataset_dir(cache, parts[:-1])
    name = parts[-1]
    try:
        for attempt in (1, 2):
            if dir_fd is not None:
                _clear_way(dir_fd, name, plan)
            abspath = _timed_miss(access, dataset, identifier, original)
            if abspath != plan.abspath:
                return abspath
            if dir_fd is None:
                dir_fd = _dataset_dir(cache, parts[:-1], create=False)
                if dir_fd is None:
                    return abspath
            found = cachefs.entry_stat(dir_fd, name)
            if found is None or plan.manifest_size is None \
                    or found.st_size == plan.manifest_size:
                break
            logger.warning("dtool-cache-manager: %s has %d bytes, the manifest says %d "
                           "(fetch %d of 2)", plan.abspath, found.st_size, plan.manifest_size,
                           attempt)
        else:
            assert dir_fd is not None and found is not None
            _discard(dir_fd, name)
            raise IncompleteItemError(
                f"item {identifier} ({plan.item_relpath or name}) of {access.placement.uri} "
                f"came with {found.st_size} bytes twice, but its manifest says "
                f"{plan.manifest_size}: not handing out an incomplete file")
        if found is not None:
            access.size, access.mtime = found.st_size, found.st_mtime
            if cache.shared:
                _share_item_file(dir_fd, name)
        return abspath
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _dataset_dir(cache: "cachefs.CacheDir", parts, create: bool = True) -> Optional[int]:
    """The dataset's directory, reached without links.  In a shared cache it is created
    group-writable before the broker makes it with the user's umask (then nobody else in
    the group could add items or clean them)."""
    try:
        if create and cache.shared:
            return cachefs.make_dirs(cache.root_fd, parts, cachefs.SHARED_DIR_MODE)
        return cachefs.walk(cache.root_fd, parts)
    except FileNotFoundError:
        return None
    except OSError as exc:
        where = os.path.join(cache.path, *parts)
        if isinstance(exc, PermissionError):
            logger.warning("dtool-cache-manager: %s is not group-writable and is not yours "
                           "(%s); ask its owner to run: chmod g+ws %s", where, exc, where)
        else:
            _warn(f"not acting in {where!r} ({exc})")
        return None


def _clear_way(dir_fd: int, name: str, plan: ItemPlan) -> None:
    """Under the fetch lock nobody else downloads this item: a ``.tmp`` left by a killed
    download (which may be another member's, and unwritable for us) and a file of the
    wrong size go, so the broker fetches afresh.  Readers that opened them keep them."""
    _discard(dir_fd, name + ".tmp", regular=False)
    found = cachefs.entry_stat(dir_fd, name)
    if found is not None and plan.manifest_size is not None \
            and found.st_size != plan.manifest_size:
        logger.warning("dtool-cache-manager: %s has %d bytes, the manifest says %d; fetching "
                       "it again", plan.abspath, found.st_size, plan.manifest_size)
        _discard(dir_fd, name)


def _discard(dir_fd: int, name: str, regular: bool = True) -> None:
    try:
        cachefs.unlink_entry(dir_fd, name, regular=regular)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.debug("dtool-cache-manager: could not remove %r (%r)", name, exc)


def _is_hit(access: Access, plan: ItemPlan) -> bool:
    """True if the planned file is there with the manifest's size; records its stat.  (A
    ``stat`` by name on the hot path: it only reads, and decides nothing but hit or miss.)"""
    try:
        st = os.stat(plan.abspath)
    except OSError:
        return False
    if plan.manifest_size is not None and st.st_size != plan.manifest_size:
        return False
    access.size, access.mtime = st.st_size, st.st_mtime
    return True


def _share_item_file(dir_fd: int, name: str) -> None:
    """Let the group read an item we fetched; a 077 umask would lock everyone else out.
    Read-only is enough (and protects the content): removal needs the directory's write bit.
    Only our own file with a single name: a chmod never reaches through a hard link."""
    try:
        fd, st = cachefs.open_file(dir_fd, name, single_link=True)
    except OSError as exc:
        logger.debug("dtool-cache-manager: cannot share %r (%r)", name, exc)
        return
    try:
        if st.st_uid == os.geteuid() and not st.st_mode & stat.S_IRGRP:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) | stat.S_IRGRP)
    except OSError as exc:
        logger.debug("dtool-cache-manager: cannot share %r (%r)", name, exc)
    finally:
        os.close(fd)


def _timed_miss(access: Access, dataset, identifier: str, original) -> str:
    start = time.perf_counter()
    abspath = original(dataset, identifier)
    access.fetch_seconds = time.perf_counter() - start
    access.miss = True
    return abspath


def _observe(access: Access, plan: ItemPlan, abspath: str) -> None:
    """Fill in what the post hooks need to know about the path the broker returned."""
    access.abspath = abspath
    if abspath == plan.abspath:
        access.relpath = plan.relpath
        if access.miss and not access.size:  # a miss that was not fetched under our lock
            st = os.stat(abspath)
            access.size, access.mtime = st.st_size, st.st_mtime
        return
    # The broker put it somewhere we did not plan for: judge the miss by the file's mtime.
    cache_dir = access.placement.cache_dir
    assert cache_dir is not None
    access.relpath = relpath_in(cache_dir, os.path.abspath(abspath))
    st = os.stat(abspath)
    access.size, access.mtime = st.st_size, st.st_mtime
    if not access.miss and st.st_mtime >= access.started - 0.01:
        access.miss = True
        access.fetch_seconds = time.time() - access.started
    logger.debug("dtool-cache-manager: planned %s, broker returned %s", plan.abspath, abspath)
