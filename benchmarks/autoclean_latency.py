"""What automatic housekeeping adds to a cache miss, measured on ``housekeeping.after_miss``.

The post hook calls ``after_miss`` after every miss.  This times its three paths in this
process, against a temporary cache:

- no limit set (the default): settings looked up, nothing else;
- a limit set, no clean due: one ``stat`` of the log, whose last line is the last run;
- a clean due: take the lock, start the detached child, return (the child is then waited
  for here, outside the timing, by blocking on its lock).

Run with the project's venv: ``python benchmarks/autoclean_latency.py``.  The end-to-end
figure (a real access over HTTP that starts a clean) is printed by the acceptance test:
``pytest -s tests/test_housekeeping.py -k over_the_limit``.
"""

from __future__ import annotations

import fcntl
import os
import statistics
import tempfile
import time

import dtoolcore.utils

from dtool_cache_manager import cachefs
from dtool_cache_manager.housekeeping import trigger


def timed(fn, n):
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples), max(samples)


def wait_for_run(meta_dir):
    fd = os.open(os.path.join(meta_dir, cachefs.AUTOCLEAN_LOCK), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.close(fd)


def main():
    tmp = tempfile.mkdtemp(prefix="autoclean-latency-")
    dtoolcore.utils.DEFAULT_CONFIG_PATH = os.path.join(tmp, "dtool.json")  # no user config
    os.environ["HOME"] = tmp
    cache = os.path.join(tmp, "cache")
    cachefs.open_cache(cache, make_root=True).close()  # the bookkeeping, as a first access
    files = os.path.join(cache, ".dtool-cache-manager")
    for key in ("DTOOL_CACHE_MAX_SIZE", "DTOOL_CACHE_MAX_AGE"):
        os.environ.pop(key, None)

    trigger.after_miss(cache, 1)
    rows = [("no limit set",) + timed(lambda: trigger.after_miss(cache, 1), 2000)]

    os.environ["DTOOL_CACHE_MAX_SIZE"] = "1TB"
    os.environ["DTOOL_CACHE_AUTOCLEAN_INTERVAL"] = "0s"
    trigger.after_miss(cache, 1)  # never measured: starts the first run
    wait_for_run(files)
    trigger.after_miss(cache, 1)
    rows.append(("limit set, no clean due",) + timed(lambda: trigger.after_miss(cache, 1), 2000))

    def start_one():
        wait_for_run(files)
        os.truncate(os.path.join(files, cachefs.AUTOCLEAN_LOG), 0)  # "never measured" again
        t0 = time.perf_counter()
        trigger.after_miss(cache, 1)
        return time.perf_counter() - t0

    spawns = [start_one() for _ in range(20)]
    wait_for_run(files)
    rows.append(("clean due: start it", statistics.median(spawns), max(spawns)))

    print(f"{'after_miss path':28s} {'median':>10s} {'max':>10s}")
    for name, median, worst in rows:
        print(f"{name:28s} {median * 1e6:8.1f} µs {worst * 1e6:8.1f} µs")


if __name__ == "__main__":
    main()
