"""The naive tracking design, kept only as a benchmark baseline.

This is the design from the dtool cache manager specification: per-item counters in a
sqlitedict, every update a read-modify-write under a file lock, once before
the access (lock counter + 1) and once after it (count + 1, last access
time, lock counter - 1).  It is correct but costs two locked, committed
SQLite transactions per access; ``hook_overhead.py`` measures how much
cheaper the real implementation is.
"""

import json
import os
import time

import filelock
import sqlitedict


class NaiveTracker:
    """Usage counters in ``<cache_dir>/naive.sqlite``, guarded by ``naive.lock``."""

    def __init__(self, cache_dir):
        # JSON codec, never pickle: the database may be shared between users.
        self._db = sqlitedict.SqliteDict(
            os.path.join(cache_dir, "naive.sqlite"),
            autocommit=True,
            encode=json.dumps,
            decode=json.loads,
        )
        self._lock = filelock.FileLock(os.path.join(cache_dir, "naive.lock"))

    @staticmethod
    def _key(uri, identifier):
        return json.dumps([uri, identifier])

    def _update(self, uri, identifier, change):
        """Read-modify-write one record under the file lock."""
        key = self._key(uri, identifier)
        with self._lock:
            record = self._db.get(
                key, {"lock_count": 0, "count": 0, "last_access": None}
            )
            change(record)
            self._db[key] = record

    def pre(self, uri, identifier):
        """Mark the item in use before its content is fetched."""
        def change(record):
            record["lock_count"] += 1
        self._update(uri, identifier, change)

    def post(self, uri, identifier, abspath):
        """Register the access and release the in-use mark."""
        def change(record):
            record["count"] += 1
            record["last_access"] = time.time()
            record["abspath"] = abspath
            record["lock_count"] -= 1
        self._update(uri, identifier, change)

    def wrap(self, original):
        """Return ``original(dataset, identifier)`` with pre/post hooks around it."""
        def tracked(dataset, identifier):
            uri = dataset.uri
            self.pre(uri, identifier)
            abspath = original(dataset, identifier)
            self.post(uri, identifier, abspath)
            return abspath
        return tracked

    def close(self):
        self._db.close()
