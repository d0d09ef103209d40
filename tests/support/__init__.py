"""Test support: real dtool datasets served on loopback, and subprocess helpers.

Everything here talks to real servers on 127.0.0.1 and runs real executables, so
that tests exercise the same code paths as users (no mocks).
"""

import json
import os
import subprocess
import sys

#: The venv's bin directory; subprocesses must find ``dtool`` and ``moto_server`` here.
VENV_BIN = os.path.dirname(sys.executable)


def subprocess_env(cache_dir, extra=None):
    """Return an environment for a child process using ``cache_dir`` as dtool cache.

    PYTHONPATH is dropped so the child imports the installed packages (as a user
    would), and the venv bin dir goes first on PATH so ``dtool`` is the venv's.
    """
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["DTOOL_CACHE_DIRECTORY"] = str(cache_dir)
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    if extra:
        env.update({k: str(v) for k, v in extra.items()})
    return env


def run_python(code, env, timeout=120):
    """Run ``code`` in a fresh interpreter; return the CompletedProcess unchecked."""
    return subprocess.run(
        [sys.executable, "-c", code],
        env=env, capture_output=True, text=True, timeout=timeout,
    )


def disk_files(cache_dir, partials=True):
    """relpath -> size of the regular files in a cache, walked independently of the package
    (our bookkeeping excluded; symlinks never followed; '*.tmp' only with ``partials``)."""
    found = {}
    for root, dirs, files in os.walk(cache_dir):
        if root == str(cache_dir):
            dirs[:] = [d for d in dirs if d != ".dtool-cache-manager"]
        for name in files:
            path = os.path.join(root, name)
            if (not partials and name.endswith(".tmp")) or os.path.islink(path) \
                    or not os.path.isfile(path):
                continue
            found[os.path.relpath(path, cache_dir)] = os.path.getsize(path)
    return found


class Bookkeeping:
    """Where the package keeps its bookkeeping in ``cache_dir`` (for tests that look)."""

    def __init__(self, cache_dir):
        self.cache_dir = str(cache_dir)
        self.meta_dir = os.path.join(self.cache_dir, ".dtool-cache-manager")
        self.ledger = os.path.join(self.meta_dir, "ledger.sqlite3")
        self.journal_dir = os.path.join(self.meta_dir, "journal")
        self.holds_dir = os.path.join(self.meta_dir, "holds")


def holds_now(cache_dir):
    """The live holds of ``cache_dir`` as the package reads them (a HoldsSnapshot)."""
    from dtool_cache_manager import cachefs
    from dtool_cache_manager.holds import live_holds

    with cachefs.open_cache(str(cache_dir), create=False) as cache:
        return live_holds(cache)


# Blocks until it can take the autoclean lock, i.e. until no automatic clean is running.
_WAIT_FOR_AUTOCLEAN = """
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
except FileNotFoundError:
    sys.exit(0)
fcntl.flock(fd, fcntl.LOCK_EX)
"""


def wait_for_autoclean(cache_dir, timeout=120):
    """Return once no automatic clean of ``cache_dir`` runs (its lock is free)."""
    lock = os.path.join(cache_dir, ".dtool-cache-manager", "autoclean.lock")
    subprocess.run([sys.executable, "-c", _WAIT_FOR_AUTOCLEAN, lock], check=True,
                   timeout=timeout)


def autoclean_log(cache_dir):
    """The automatic cleans' records, oldest first."""
    path = os.path.join(cache_dir, ".dtool-cache-manager", "autoclean.log")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh]
