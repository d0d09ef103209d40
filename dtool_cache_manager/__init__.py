"""dtool-cache-manager: usage tracking, in-use holds and safe cleaning for the dtool cache.

The specification's API is importable from here; it loads lazily, so that the
``dtool --version`` scan of plugins and the activation entry point stay cheap.
"""

__version__ = "0.1.0"

_API = (
    "num_times_accessed",
    "last_time_accessed",
    "num_days_since_last_accessed",
    "cache_item_lock_counter",
    "remove_cache_item_safely",
    "release",
    "hold_scope",
    "cache_size",
    "cache_num_items",
    "open_ledger",
)

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'dtool_cache_manager' has no attribute {name!r}")
