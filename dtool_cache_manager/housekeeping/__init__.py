"""Automatic housekeeping: keep the cache under its limits with a detached background clean.

The post hook calls :func:`after_miss` on every cache miss (hits never pay for this).  It
decides whether a clean is due, takes ``autoclean.lock`` without blocking, and starts
``python -m dtool_cache_manager.housekeeping`` in a new session, handing it the locked
descriptor; the access then returns at once.  The child measures the cache, cleans through
the same plan and executor as ``dtool cache clean`` (so holds are respected), records the
run in ``autoclean.log``, and exits, which releases the lock.

=================  =====================================================================
``trigger``        in the user's process after a miss: the decision, the detached start
``run``            one run: measure, expire, trim, record
``records``        ``autoclean.log``, ``autoclean.lock`` and the status for ``summary``
``settings``       the limits: environment, ``dtool.json``, defaults
``__main__``       the detached child's command line
=================  =====================================================================

See ``docs/housekeeping.rst``.
"""

from .records import AutocleanStatus, RunRecord, status
from .run import Busy, run_now
from .trigger import after_miss

__all__ = ["AutocleanStatus", "Busy", "RunRecord", "after_miss", "run_now", "status"]
