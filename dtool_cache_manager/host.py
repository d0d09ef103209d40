"""Host integration: make the hooks fire around ``dtoolcore.DataSet.item_content_abspath``.

Upstream dtoolcore calls no hook, so :func:`install` replaces the method with a wrapper that:

1. works out where the broker will cache the item (so it can tell a hit from a miss by the
   file's presence before the call, not by guessing afterwards);
2. calls every ``pre_item_content_abspath`` hook (ours takes the in-use hold);
3. calls the broker, and if the file is missing or truncated, does so under a per-item fetch
   lock so that concurrent misses in many processes download it once (single flight);
4. calls every ``post_item_content_abspath`` hook (ours journals the access).

The host comes first: any fault in steps 1, 2 or 4 is logged and the broker's path returned
unchanged.  Only the broker's own exceptions reach the caller.
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

from .layout import MetaPaths, configured_cache_dir, ensure_dir, tracking_disabled
from .rangelock import open_range_lock

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
    relpath: Optional[str]  # relative to the cache directory
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
    paths: Optional[MetaPaths]
    plans: Dict[str, ItemPlan] = field(default_factory=dict, compare=False, repr=False)


class Access:
    """One call in progress; hooks read it with :func:`current_access`."""

    __slots__ = ("placement", "identifier", "plan", "started", "abspath", "relpath", "miss",
                 "size", "mtime", "fetch_seconds", "state")

    def __init__(self, placement: DatasetPlacement, identifier: str, plan: Optional[ItemPlan]):
        self.placement = placement
        self.identifier = identifier
        self.plan = plan
        self.started = time.time()
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
        item_content_abspath.__wrapped__ = original
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
    global _dispatch
    if _dispatch is None:
        from . import plugins

        _dispatch = plugins.dispatch()
    return _dispatch


def _tracked_call(dataset, identifier: str, original) -> str:
    # The hot path, kept flat on purpose (docs/performance.rst): a warm hit costs one stat,
    # the two hook dispatches and one journal line.  Every step of ours is guarded; only the
    # broker's own exceptions reach the caller.
    try:
        placement = dataset.__dict__.get(_PLACEMENT) or placement_of(dataset)
        plan = placement.plans.get(identifier) or _plan(placement, dataset, identifier)
        access = Access(placement, identifier, plan)
        hooks = _dispatch or _hooks()
    except Exception as exc:  # noqa: BLE001
        _warn(f"could not prepare tracking ({exc!r})")
        access = None
    if access is None:  # outside the except block, so a broker error is not chained to ours
        return original(dataset, identifier)

    uri = placement.uri
    previous = getattr(_local, "access", None)
    _local.access = access
    try:
        try:
            hooks.pre(uri, identifier)
        except Exception as exc:  # noqa: BLE001 - each hook is guarded; this is pluggy itself
            _warn(f"pre hooks failed ({exc!r})")
        access.started = time.time()  # after the hold, which may have waited for a removal
        if plan is None or _is_hit(access, plan):
            abspath = original(dataset, identifier)
        else:
            abspath = _fetch_single_flight(access, plan, dataset, identifier, original)
        try:
            if plan is not None:
                _observe(access, plan, abspath)
            hooks.post(uri, identifier, abspath)
        except Exception as exc:  # noqa: BLE001
            _warn(f"post hooks failed ({exc!r})")
        return abspath
    finally:
        _local.access = previous


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
        return DatasetPlacement(None, uri, dataset.uuid, scheme, "", True, None)
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
    # Predicted paths are built from the broker's own string, so they compare equal to
    # what it returns; the bookkeeping uses the normalised directory.
    paths = MetaPaths(os.path.abspath(os.path.expanduser(cache_dir)))
    return DatasetPlacement(paths.cache_dir, uri, dataset.uuid, scheme,
                            os.path.join(cache_dir, subdir), extensions, paths)


def _plan(placement: DatasetPlacement, dataset, identifier: str) -> Optional[ItemPlan]:
    plan = placement.plans.get(identifier)
    if plan is None and placement.cache_dir is not None:
        # The DataSet caches its manifest; read the cache directly, the property logs.
        manifest = dataset.__dict__.get("_manifest_cache") or dataset._manifest
        props = manifest["items"].get(identifier)
        if props is None:
            return None  # not an item of this dataset: the broker will say so
        item_relpath = props.get("relpath")
        name = identifier
        if placement.extensions and item_relpath:
            name += os.path.splitext(item_relpath)[1]
        abspath = os.path.join(placement.item_dir, name)
        plan = placement.plans[identifier] = ItemPlan(
            abspath=abspath,
            relpath=placement.paths.relpath(os.path.abspath(abspath)),
            manifest_size=props.get("size_in_bytes"),
            manifest_hash=props.get("hash"),
            hash_function=manifest.get("hash_function"),
            item_relpath=item_relpath,
        )
    return plan


# -- fetching: single flight, truncation repair, hit/miss ---------------------------------


def _fetch_single_flight(access: Access, plan: ItemPlan, dataset, identifier: str,
                         original) -> str:
    """Fetch a missing item under its fetch lock, so concurrent misses download it once.

    Only misses take the lock, so concurrent hits never wait on one another.  If the lock
    cannot be had (read-only cache, no lock support), fetch as upstream does.
    """
    try:
        paths = access.placement.paths
        locked = open_range_lock(paths.fetch_lock, paths.shared).locked(
            plan.abspath, exclusive=True)
        locked.__enter__()
    except Exception as exc:  # noqa: BLE001
        logger.debug("dtool-cache-manager: no fetch lock for %s (%r)", plan.abspath, exc)
        return _timed_miss(access, dataset, identifier, original)
    try:
        if _is_hit(access, plan):  # another process fetched it while we waited
            return original(dataset, identifier)
        _discard_if_truncated(plan)
        if paths.shared:
            _prepare_shared_dirs(paths, os.path.dirname(os.path.abspath(plan.abspath)))
        return _timed_miss(access, dataset, identifier, original)
    finally:
        try:
            locked.__exit__(None, None, None)
        except Exception as exc:  # noqa: BLE001
            _warn(f"could not release the fetch lock ({exc!r})")


def _is_hit(access: Access, plan: ItemPlan) -> bool:
    """True if the planned file is there with the manifest's size; records its stat."""
    try:
        st = os.stat(plan.abspath)
    except OSError:
        return False
    if plan.manifest_size is not None and st.st_size != plan.manifest_size \
            and plan.abspath not in _refetched:
        return False
    access.size, access.mtime = st.st_size, st.st_mtime
    return True


_refetched: set = set()


def _discard_if_truncated(plan: ItemPlan) -> None:
    """Upstream never re-fetches a damaged file; move it out of the broker's way, once.

    Called under the fetch lock, so it cannot race another process's repair.  Readers that
    already opened the file keep their descriptor.
    """
    try:
        found = os.stat(plan.abspath).st_size
    except OSError:
        return
    if found == plan.manifest_size:
        return
    logger.warning("dtool-cache-manager: %s has %d bytes, the manifest says %d; fetching it "
                   "again", plan.abspath, found, plan.manifest_size)
    _refetched.add(plan.abspath)
    try:
        os.unlink(plan.abspath)
    except OSError:
        pass


def _prepare_shared_dirs(paths: MetaPaths, item_dir: str) -> None:
    """Create the dataset's directories group-writable before the broker does.

    Brokers create them with the user's umask (often 755): then nobody else in the group
    could add items there or clean them.  Directories made earlier by others we cannot fix;
    say so, since the broker is about to fail on them.
    """
    try:
        ensure_dir(item_dir, shared=True)
    except OSError as exc:
        logger.warning("dtool-cache-manager: %s is not group-writable and is not yours (%s); "
                       "ask its owner to run: chmod g+ws %s", item_dir, exc, item_dir)


def _share_item_file(abspath: str, st: os.stat_result) -> None:
    """Let the group read an item we fetched; a 077 umask would lock everyone else out.
    Read-only is enough (and protects the content): removal needs the directory's write bit."""
    if st.st_uid == os.geteuid() and not st.st_mode & stat.S_IRGRP:
        try:
            os.chmod(abspath, (st.st_mode & 0o7777) | stat.S_IRGRP)
        except OSError as exc:
            logger.debug("dtool-cache-manager: cannot share %s (%r)", abspath, exc)


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
        if access.miss:
            st = os.stat(abspath)
            access.size, access.mtime = st.st_size, st.st_mtime
            if access.placement.paths.shared:
                _share_item_file(abspath, st)
        return
    # The broker put it somewhere we did not plan for: judge the miss by the file's mtime.
    access.relpath = access.placement.paths.relpath(os.path.abspath(abspath))
    st = os.stat(abspath)
    access.size, access.mtime = st.st_size, st.st_mtime
    if not access.miss and st.st_mtime >= access.started - 0.01:
        access.miss = True
        access.fetch_seconds = time.time() - access.started
    logger.debug("dtool-cache-manager: planned %s, broker returned %s", plan.abspath, abspath)
