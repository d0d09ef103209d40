"""Entry-point target that switches tracking on wherever dtool builds a dataset.

dtoolcore loads every ``dtool.storage_brokers`` entry point each time it builds a dataset
object (``DataSet.from_uri``, ``dtool`` commands, ``dtoolcore.copy`` ...), always before any
``item_content_abspath`` call.  Importing this module installs the wrapper.

The object the entry point names, :class:`CacheTracking`, is not a storage broker: it only
has the ``key`` that dtoolcore and ``dtool --version`` read.  That key can never be the
scheme of a URI, so dtoolcore never routes a dataset to it, and the ``file`` broker stays
dtoolcore's own.  Why not a ``.pth`` file or the ``dtool.cli`` group: see
``docs/design.rst``.

Loading this module can never fail: dtoolcore imports it while it builds *any* dataset, so
an exception here would break every dtool command.  Where the platform lacks what tracking
needs (:mod:`~dtool_cache_manager.facilities`), or anything else goes wrong, tracking is off
in this process, with one warning, and dtool works as without the plugin.
"""

import logging

logger = logging.getLogger(__name__)

#: What ``dtool --version`` prints in its "Storage brokers" list for this entry point.
#: Parentheses, spaces and the colon cannot appear in a URI scheme (RFC 3986), so no URI
#: reaches it; no comma, because that list separates its fields with commas.
KEY = "(cache tracking: no URI scheme)"


class CacheTracking:
    """The ``dtool.storage_brokers`` entry point of dtool-cache-manager: not a broker.

    dtoolcore puts ``{key: class}`` for every entry point of that group into its lookup and
    picks a broker by the scheme of the URI, which is never ``KEY``.
    """

    key = KEY

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{KEY!r} is dtool-cache-manager's activation hook, "
                        "not a storage broker: use a URI with a real scheme")


def _activate() -> None:
    try:
        from ..facilities import unavailable
        from ..layout import DISABLE_ENV, tracking_disabled

        if tracking_disabled():
            return
        why = unavailable()
        if why is not None:
            if not _is_cache_command():  # that command says why, in its one line
                logger.warning("dtool-cache-manager: cache tracking is off: %s; dtool works "
                               "as without the plugin (%s=1 silences this)", why, DISABLE_ENV)
            return
        from .host import install

        install()
    except Exception as exc:  # noqa: BLE001 - the user's dtool comes first
        logger.warning("dtool-cache-manager: cache tracking is off: it failed to start "
                       "(%r); dtool works as without the plugin", exc)


def _is_cache_command() -> bool:
    """Is this process ``dtool cache ...`` or ``dtool-cache``?  (dtool-cli loads every
    storage-broker entry point at start-up, for ``--version``.)"""
    import os
    import sys

    name = os.path.basename(sys.argv[0]) if sys.argv else ""
    command = [arg for arg in sys.argv[1:] if not arg.startswith("-")][:1]  # past --debug
    return name == "dtool-cache" or (name == "dtool" and command == ["cache"])


_activate()
