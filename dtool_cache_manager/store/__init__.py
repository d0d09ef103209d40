"""The store: the ledger (what was used, by whom, when) and the disk index (what is on
disk), in one SQLite database in the cache's bookkeeping directory.

This package is the only one that imports a database driver or holds SQL; everything else
asks it for operations (:class:`~dtool_cache_manager.store.ledger.Ledger`'s methods and
:class:`~dtool_cache_manager.store.diskindex.DiskIndex`, as ``Ledger.index``); no
connection leaves it.  Its database errors reach callers as :data:`DatabaseError`, so
that they need not import the driver either.

The coordinator (:mod:`~dtool_cache_manager.store.coordinator`) is here too: a PostgreSQL
server's advisory locks, for caches several hosts share; it is the only importer of psycopg.

Locking
    SQLite in WAL mode: readers never block, one writer at a time, with a busy timeout.
    Holds, gates and fetch locks are not here: see :mod:`~dtool_cache_manager.holds`.  In a
    coordinated cache, every use of the ledger holds the coordinator's ledger lock.
Performance
    Accesses never write here: processes append to journals, folded in batches by readers
    (see ``docs/performance.rst``).
Filesystems
    SQLite must not be used from several hosts at once (NFS, Lustre) in WAL mode: a cache
    shared by several hosts has a coordinator, whose lock lets one process of one host at
    a time open the ledger, kept with a rollback journal (``docs/multi-host.rst``).
"""

import sqlite3

#: The driver's base error, for callers that must tell a database failure from others.
DatabaseError = sqlite3.Error
