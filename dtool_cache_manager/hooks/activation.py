"""Entry-point target that switches tracking on wherever dtool builds a dataset.

dtoolcore loads every ``dtool.storage_brokers`` entry point each time it builds a dataset
object (``DataSet.from_uri``, ``dtool`` commands, ``dtoolcore.copy`` ...), always before any
``item_content_abspath`` call.  Importing this module installs the wrapper.

The object the entry point names, :class:`CacheTracking`, is not a storage broker: it only
has the ``key`` that dtoolcore and ``dtool --version`` read.  That key can never be the
scheme of a URI, so dtoolcore never routes a dataset to it, and the ``file`` broker stays
dtoolcore's own.  Why not a ``.pth`` file or the ``dtool.cli`` group: see
``docs/design.rst``.
"""

from .host import install
from ..layout import tracking_disabled

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


if not tracking_disabled():
    install()
