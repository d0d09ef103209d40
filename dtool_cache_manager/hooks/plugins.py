"""Hook dispatch: one pluggy manager, filled from the ``dtool.*_item_content_abspath`` groups.

An entry point may name a plain function, as in the specification
(``name = "pkg:pre_item_content_abspath"``), or a module or object with ``@hookimpl``
functions, as in pytest.  Every implementation is wrapped so that one that raises is logged
and skipped instead of failing the user's data access or the other hooks.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import threading
import types
from typing import Any, Callable, List, Optional, Tuple

import pluggy

from . import hookspecs

logger = logging.getLogger(__name__)

HOOK_GROUPS = {
    "dtool.pre_item_content_abspath": "pre_item_content_abspath",
    "dtool.post_item_content_abspath": "post_item_content_abspath",
}

_manager: Optional[pluggy.PluginManager] = None
_dispatch: Optional["Dispatch"] = None
_lock = threading.Lock()


def manager() -> pluggy.PluginManager:
    """The process's plugin manager, built on first use."""
    global _manager
    if _manager is None:
        with _lock:
            if _manager is None:
                _manager = build_manager()
    return _manager


def dispatch() -> "Dispatch":
    """How the host calls the hooks; rebuilt whenever :func:`register` changes the registry."""
    global _dispatch
    if _dispatch is None:
        _dispatch = Dispatch(manager())
    return _dispatch


_on_change: List[Callable[[], None]] = []  # who keeps a Dispatch: told to drop it


def on_change(callback: Callable[[], None]) -> None:
    """Call ``callback`` whenever :func:`register` changes the registry (the host keeps the
    dispatch in a global for speed; this module never imports the host)."""
    _on_change.append(callback)


def register(plugin: Any, name: Optional[str] = None) -> None:
    """Register a plugin at run time (entry points are found automatically)."""
    global _dispatch
    manager().register(plugin, name=name)
    _dispatch = None
    for callback in _on_change:
        callback()


class Dispatch:
    """Calls the implementations pluggy registered, in pluggy's order.

    pluggy owns discovery, validation and ordering (tryfirst/trylast).  With no wrapper
    registered, calling the implementations in that order is all ``_multicall`` would do, and
    doing it here saves about 7 µs of a 20 µs budget per access (docs/performance.rst).  With
    a wrapper registered, the calls go through pluggy's hook caller unchanged.

    ``warm_hits`` is set when the two hooks are each one implementation that offers the same
    shortcut for a repeated hit (our own :mod:`tracking`, unless other plugins registered):
    a pair of functions, (check before the broker runs, record after it).
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pre = self._caller(pm.hook.pre_item_content_abspath, ("uri", "identifier"))
        self.post = self._caller(pm.hook.post_item_content_abspath,
                                 ("uri", "identifier", "abspath"))
        shortcut = getattr(self.pre, "warm_hits", None)
        same = shortcut is not None and shortcut is getattr(self.post, "warm_hits", None)
        self.warm_hits: Optional[Tuple[Callable, Callable]] = shortcut if same else None

    @staticmethod
    def _caller(hook_caller, params):
        impls = hook_caller.get_hookimpls()
        if any(i.hookwrapper or i.wrapper for i in impls):
            return lambda *args: hook_caller(**dict(zip(params, args)))
        found = []
        for impl in reversed(impls):  # pluggy calls the last registered first
            names = tuple(impl.argnames)
            if names == params:
                found.append(impl.function)
            else:
                index = [params.index(n) for n in names]
                found.append(functools.partial(_call_subset, impl.function, index))
        calls = tuple(found)
        if len(calls) == 1:  # ours alone, the usual case: no loop around it
            return calls[0]

        def call(*args):
            for fn in calls:
                fn(*args)
        return call


def _call_subset(fn: Callable, index, *args):
    return fn(*[args[i] for i in index])


def build_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for group, hook_name in HOOK_GROUPS.items():
        for ep in _entry_points(group):
            try:
                register_entry_point_object(pm, hook_name, ep.load(), _plugin_name(ep))
            except Exception as exc:  # noqa: BLE001 - a broken plugin must not break access
                logger.warning("dtool-cache-manager: ignoring hook entry point %s = %s (%r)",
                               ep.name, ep.value, exc)
    return pm


def register_entry_point_object(pm: pluggy.PluginManager, hook_name: str, obj: Any,
                                name: str) -> None:
    """Register ``obj`` for ``hook_name``: a function, or a module/object whose attribute of
    that name is one.  Only that hook is taken, so one module named in both groups is not
    registered twice."""
    fn = obj if inspect.isroutine(obj) else getattr(obj, hook_name)
    opts = dict(getattr(fn, hookspecs.PROJECT + "_impl", None) or {})
    if not (opts.get("hookwrapper") or opts.get("wrapper") or getattr(fn, "guards_itself", 0)):
        fn = _fail_open(fn)
    plugin = types.SimpleNamespace(**{hook_name: hookspecs.hookimpl(**opts)(fn)})
    pm.register(plugin, name=name)


def _fail_open(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            logger.warning("dtool-cache-manager: hook %s.%s failed (%r); access continues",
                           getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", fn),
                           exc, exc_info=logger.isEnabledFor(logging.DEBUG))
            return None
    # functools.wraps copied the implementation's marker; the caller re-marks the wrapper.
    guarded.__dict__.pop(hookspecs.PROJECT + "_impl", None)
    return guarded


def _plugin_name(ep) -> str:
    dist = getattr(getattr(ep, "dist", None), "name", None) or "?"
    return f"{dist}:{ep.group}:{ep.name}"


def _entry_points(group: str):
    from importlib.metadata import entry_points

    if sys.version_info >= (3, 10):
        return list(entry_points(group=group))
    return list(entry_points().get(group, []))
