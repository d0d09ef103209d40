"""The store: the ledger (what was used, by whom, when) and the disk index (what is on
disk), in one SQLite database in the cache's bookkeeping directory.

This package is the only one that imports a database driver or holds SQL; everything else
asks it for operations (:class:`~dtool_cache_manager.store.ledger.Ledger`'s methods and
:class:`~dtool_cache_manager.store.diskindex.DiskIndex`, as ``Ledger.index``); no
connection leaves it.  Its database errors reach callers as :data:`DatabaseError`, so
that they need not import the driver either.

Locking
    SQLite in WAL mode: readers never block, one writer at a time, with a busy timeout.
    Holds, gates and fetch locks are not here: see :mod:`~dtool_cache_manager.holds`.
Performance
    Accesses never write here: processes append to journals, folded in batches by readers
    (see ``docs/performance.rst``).
Filesystems
    One host only: SQLite must not be used from several hosts at once (NFS, Lustre), so
    a cache shared by several hosts needs a database server (see ``docs/reliability.rst``).
"""

import sqlite3

#: The driver's base error, for callers that must tell a database failure from others.
DatabaseError = sqlite3.Error
