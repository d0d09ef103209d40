"""Fail open for access, fail safe for deletion: faults in our bookkeeping never break a
user's data access, and are reported through logging."""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

import dtool_cache_manager as dcm
from support.datasets import file_md5_hex
from support.procs import as_user

ACCESS = """
import sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
for _ in range(2):
    print(ds.item_content_abspath(sys.argv[2]))
"""


def _access(uri, identifier, env, **kwargs):
    return subprocess.run([sys.executable, "-c", ACCESS, uri, identifier], env=env,
                          capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def shared_tmp():
    """A directory other users can traverse (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix="dcm-failsafe-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to another user "
                    "(CI runs as root, so this always runs there)")
@pytest.mark.other_users
def test_cache_directory_we_cannot_write(http_dataset, shared_tmp, make_env):
    """A read-only member of a shared cache: hits still work, with a clear warning."""
    ds = http_dataset({"a.txt": b"a" * 1000})
    ident = ds.identifiers["a.txt"]
    cache = os.path.join(shared_tmp, "cache")
    env = make_env(cache, {"HOME": shared_tmp})
    first = _access(ds.uri, ident, env)  # root fills the cache (and our bookkeeping)
    assert first.returncode == 0, first.stderr
    for root, dirs, files in os.walk(cache):
        os.chmod(root, 0o755)
    nobody = _access(ds.uri, ident, env, preexec_fn=as_user(65534, 65534))
    assert nobody.returncode == 0, nobody.stderr
    assert nobody.stdout.split() == first.stdout.split()
    assert "WARNING" in nobody.stderr or "cannot record usage" in nobody.stderr
    assert "cannot record usage in" in nobody.stderr
    assert "Traceback" not in nobody.stderr
    assert file_md5_hex(nobody.stdout.split()[0]) == ds.md5[ident]
    # Root's own two accesses are recorded; nobody's could not be.
    assert dcm.num_times_accessed(ds.uri, ident, cache_dir=cache) == 2


def test_bookkeeping_path_blocked(http_dataset, cache_dir, make_env):
    """Even root cannot create our directory when a file sits in its place."""
    ds = http_dataset({"a.txt": b"a" * 1000})
    ident = ds.identifiers["a.txt"]
    (cache_dir / ".dtool-cache-manager").write_bytes(b"not a directory")
    result = _access(ds.uri, ident, make_env(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "cannot record usage in" in result.stderr
    assert file_md5_hex(result.stdout.split()[0]) == ds.md5[ident]


def test_garbage_ledger_is_moved_aside(http_dataset, cache_dir, make_env):
    ds = http_dataset({"a.txt": b"a" * 1000})
    ident = ds.identifiers["a.txt"]
    meta = cache_dir / ".dtool-cache-manager"
    meta.mkdir()
    (meta / "ledger.sqlite3").write_bytes(os.urandom(8192))
    result = _access(ds.uri, ident, make_env(cache_dir))
    assert result.returncode == 0, result.stderr
    assert file_md5_hex(result.stdout.split()[0]) == ds.md5[ident]
    assert "is unreadable" in result.stderr and "moved it to" in result.stderr
    assert any(name.startswith("ledger.sqlite3.corrupt-") for name in os.listdir(meta))
    assert dcm.num_times_accessed(ds.uri, ident) == 2  # rebuilt from the journal


def test_truncated_cache_file_is_fetched_again(http_dataset, cache_dir, make_env):
    ds = http_dataset({"a.bin": os.urandom(50000)})
    ident = ds.identifiers["a.bin"]
    path = ds.cache_path(cache_dir, "a.bin")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"partial")  # e.g. left by a full disk; upstream would serve it forever
    result = _access(ds.uri, ident, make_env(cache_dir))
    assert result.returncode == 0, result.stderr
    assert "fetching it again" in result.stderr
    assert file_md5_hex(path) == ds.md5[ident]
    with dcm.open_ledger() as ledger:
        (row,) = ledger.items_for(ds.uri, ident)
    assert (row.misses, row.hits) == (1, 1)


def test_broker_errors_still_reach_the_caller(http_dataset, cache_dir, make_env):
    ds = http_dataset({"a.txt": b"a"})
    result = _access(ds.uri, "0" * 40, make_env(cache_dir))
    assert result.returncode == 1
    assert "KeyError" in result.stderr
    assert "dtool-cache-manager:" not in result.stderr  # no warning of ours
    assert "During handling of the above exception" not in result.stderr
