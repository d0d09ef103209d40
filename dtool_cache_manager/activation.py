"""Entry-point target that switches tracking on wherever dtool builds a dataset.

dtoolcore loads every ``dtool.storage_brokers`` entry point each time it builds a dataset
object (``DataSet.from_uri``, ``dtool`` commands, ``dtoolcore.copy`` ...), always before any
``item_content_abspath`` call.  Importing this module installs the wrapper; the object the
entry point names is dtoolcore's own ``DiskStorageBroker`` (same class, same ``file`` key),
so the broker table dtool builds is unchanged.  Why not a ``.pth`` file or the ``dtool.cli``
group: see ``docs/design.rst``.
"""

from dtoolcore.storagebroker import DiskStorageBroker  # noqa: F401  (the entry point's object)

from .host import install
from .layout import tracking_disabled

if not tracking_disabled():
    install()
