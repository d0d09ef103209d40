"""``python -m dtool_cache_manager.housekeeping``: the detached child the trigger starts,
or one run by hand."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..facilities import fcntl
from .records import MANUAL
from .run import Busy, run_clean, run_now
from .trigger import CHILD_MODULE


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dtool_cache_manager.housekeeping``: one run.  Started by the hook with the
    lock already held (``--lock-fd``); by hand, it takes the lock itself."""
    parser = argparse.ArgumentParser(prog=f"python -m {CHILD_MODULE}")
    parser.add_argument("--cache-dir", required=True)
    parser.add_argument("--trigger", default=MANUAL)
    parser.add_argument("--triggered-by", type=int, default=None)
    parser.add_argument("--lock-fd", type=int, default=None,
                        help="inherited descriptor that already holds autoclean.lock")
    args = parser.parse_args(argv)
    cache_dir = os.path.abspath(args.cache_dir)
    from ..privileges import work_as_cache_owner

    work_as_cache_owner(cache_dir)  # as root: the cache owner's rights, never more
    if args.lock_fd is None:
        try:
            record = run_now(cache_dir)
        except Busy:
            return 0
    else:
        fcntl.flock(args.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op check
        record = run_clean(cache_dir, args.trigger, args.triggered_by)
    return 0 if record.error is None else 1


if __name__ == "__main__":
    sys.exit(main())
