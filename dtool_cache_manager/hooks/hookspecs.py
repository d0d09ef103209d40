"""Hook specifications, in the form of the user's spec (pluggy project name ``dtool``).

Implementations may accept any subset of a spec's arguments (pluggy matches them by name).
For more context than the arguments carry (dataset UUID, cache directory, hit or miss, fetch
time), an implementation may call :func:`dtool_cache_manager.hooks.host.current_access`.
"""

import pluggy

PROJECT = "dtool"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def pre_item_content_abspath(uri, identifier):
    """Called before the broker looks up, and if need be fetches, an item.

    :param uri: the dataset URI (as dtoolcore normalised it)
    :param identifier: the item identifier
    """


@hookspec
def post_item_content_abspath(uri, identifier, abspath):
    """Called after the broker returned the item's path.

    :param uri: the dataset URI (as dtoolcore normalised it)
    :param identifier: the item identifier
    :param abspath: the path the caller is about to receive
    """
