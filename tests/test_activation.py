"""Hooks fire with no code change: plain dtoolcore in a fresh interpreter, and the dtool CLI."""

import subprocess
import sys

import pytest

import dtool_cache_manager as dcm
from support import run_python

ITEMS = {"a.txt": b"alpha" * 1000, "data/b.bin": b"\x00\x01" * 5000}

THREE_ACCESSES = """
import sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
for _ in range(3):
    print(ds.item_content_abspath(sys.argv[2]))
assert "dtool_cache_manager.api" not in sys.modules
"""


def _three_accesses(uri, identifier, env):
    result = subprocess.run([sys.executable, "-c", THREE_ACCESSES, uri, identifier], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def _assert_one_miss_two_hits(uri, identifier, cache_dir):
    with dcm.open_ledger(str(cache_dir)) as ledger:
        (row,) = ledger.items_for(uri, identifier)
    assert (row.misses, row.hits) == (1, 2)
    assert dcm.num_times_accessed(uri, identifier, cache_dir=str(cache_dir)) == 3
    assert row.fetch_seconds > 0


def test_fresh_interpreter_http(http_dataset, cache_dir, make_env):
    ds = http_dataset(ITEMS)
    ident = ds.identifiers["a.txt"]
    paths = _three_accesses(ds.uri, ident, make_env(cache_dir))
    assert paths == [str(ds.cache_path(cache_dir, "a.txt"))] * 3
    _assert_one_miss_two_hits(ds.uri, ident, cache_dir)
    assert ds.get_count("a.txt") == 1


def test_fresh_interpreter_s3(s3_dataset, cache_dir, make_env):
    ds = s3_dataset(ITEMS)
    ident = ds.identifiers["data/b.bin"]
    paths = _three_accesses(ds.uri, ident, make_env(cache_dir, ds.env))
    assert paths == [str(ds.cache_path(cache_dir, "data/b.bin"))] * 3
    _assert_one_miss_two_hits(ds.uri, ident, cache_dir)


def test_dtool_item_fetch_cli(http_dataset, cache_dir, make_env):
    ds = http_dataset(ITEMS)
    ident = ds.identifiers["data/b.bin"]
    env = make_env(cache_dir)
    for _ in range(3):
        out = subprocess.run(["dtool", "item", "fetch", ds.uri, ident], env=env,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == str(ds.cache_path(cache_dir, "data/b.bin"))
    _assert_one_miss_two_hits(ds.uri, ident, cache_dir)
    with dcm.open_ledger(str(cache_dir)) as ledger:
        (row,) = ledger.items_for(ds.uri, ident)
        assert row.relpath == f"{ds.name}/{ident}.bin"
        assert row.manifest_size == 10000 and row.item_relpath == "data/b.bin"
        assert row.scheme == "http" and row.uuid == ds.uuid
        (user,) = ledger.users_of(row.relpath)
        assert ledger.users_of(row.relpath)[user][:2] == (2, 1)


def test_disable_env_turns_everything_off(http_dataset, cache_dir, make_env):
    ds = http_dataset(ITEMS)
    ident = ds.identifiers["a.txt"]
    env = make_env(cache_dir, {"DTOOL_CACHE_MANAGER_DISABLE": "1"})
    _three_accesses(ds.uri, ident, env)
    assert not (cache_dir / ".dtool-cache-manager").exists()
    assert dcm.num_times_accessed(ds.uri, ident, cache_dir=str(cache_dir)) == 0


def test_set_enabled_switches_tracking_at_run_time(http_dataset, cache_dir, make_env):
    """host.set_enabled(False) leaves accesses untracked until set_enabled(True)."""
    ds = http_dataset(ITEMS)
    ident = ds.identifiers["a.txt"]
    code = THREE_ACCESSES.replace("for _ in range(3):", """from dtool_cache_manager.hooks import host
host.set_enabled(False)
print(ds.item_content_abspath(sys.argv[2]))
host.set_enabled(True)
for _ in range(2):""")
    result = subprocess.run([sys.executable, "-c", code, ds.uri, ident],
                            env=make_env(cache_dir), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert dcm.num_times_accessed(ds.uri, ident, cache_dir=str(cache_dir)) == 2


def test_file_datasets_are_not_cache_items(tmp_path, cache_dir, make_env):
    from support.datasets import item_identifier, make_local_dataset

    uri = make_local_dataset(tmp_path, "local", ITEMS)
    _three_accesses(uri, item_identifier("a.txt"), make_env(cache_dir))
    assert dcm.cache_num_items(cache_dir=str(cache_dir)) == 0
    with dcm.open_ledger(str(cache_dir)) as ledger:
        assert ledger.items() == []


# --- `dtool --version`: our entry point is not a second `file` broker (issue 14, item 9) ---

BROKER_LOOKUP = """
import dtoolcore
from dtoolcore.storagebroker import DiskStorageBroker
lookup = dtoolcore._generate_storage_broker_lookup()
assert lookup["file"] is DiskStorageBroker, lookup
print("\\n".join(f"{k}={v.__module__}.{v.__qualname__}" for k, v in lookup.items()))
"""


def _storage_broker_lines(version_text):
    lines = version_text.splitlines()
    start = lines.index("Storage brokers:") + 1
    end = lines.index("", start) if "" in lines[start:] else len(lines)
    return lines[start:end]


def test_dtool_version_lists_one_file_broker(http_dataset, cache_dir, make_env):
    import dtoolcore
    from urllib.parse import urlparse

    from dtool_cache_manager.hooks.activation import KEY

    env = make_env(cache_dir)
    out = subprocess.run(["dtool", "--version"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    brokers = _storage_broker_lines(out.stdout)
    assert [b for b in brokers if b.startswith("file,")] == [
        f"file, dtoolcore, version {dtoolcore.__version__}"], out.stdout
    ours = [b for b in brokers if ", dtool-cache-manager, " in b]
    assert ours == [f"{KEY}, dtool-cache-manager, version {dcm.__version__}"], out.stdout
    assert urlparse(f"{KEY}://host/x").scheme == ""  # no URI can name our key as its scheme

    # dtoolcore's own lookup, in a fresh interpreter: "file" is still dtoolcore's broker
    lookup = run_python(BROKER_LOOKUP, env)
    assert lookup.returncode == 0, lookup.stderr
    assert f"{KEY}=dtool_cache_manager.hooks.activation.CacheTracking" in lookup.stdout.split("\n")

    # and the entry point still switches tracking on: one miss, two hits
    ds = http_dataset(ITEMS)
    ident = ds.identifiers["a.txt"]
    assert _three_accesses(ds.uri, ident, env) == [str(ds.cache_path(cache_dir, "a.txt"))] * 3
    _assert_one_miss_two_hits(ds.uri, ident, cache_dir)
