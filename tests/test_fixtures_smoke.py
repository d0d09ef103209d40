"""Smoke tests for the fixtures: real brokers, fresh subprocesses, real ``dtool``."""

import json
import os
import subprocess
import textwrap

from support import run_python
from support.datasets import file_md5_hex

# These tests check the fixtures only, not the (possibly half-written) plugin.
DISABLE = {"DTOOL_CACHE_MANAGER_DISABLE": "1"}

TWO_ACCESSES = textwrap.dedent("""
    import json, os
    import dtoolcore
    ds = dtoolcore.DataSet.from_uri({uri!r})
    first = ds.item_content_abspath({identifier!r})
    inode = os.stat(first).st_ino
    second = ds.item_content_abspath({identifier!r})
    print(json.dumps({{"first": first, "second": second,
                      "same_file": os.stat(second).st_ino == inode}}))
""")


def _two_accesses(uri, identifier, env):
    proc = run_python(TWO_ACCESSES.format(uri=uri, identifier=identifier), env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_http_dataset_cached_once(http_dataset, cache_dir, make_env):
    ds = http_dataset({"a.txt": b"hello http\n", "sub/b.bin": os.urandom(4096)})
    ident = ds.identifiers["sub/b.bin"]

    out = _two_accesses(ds.uri, ident, make_env(cache_dir, DISABLE))

    expected = ds.cache_path(cache_dir, "sub/b.bin")
    assert expected == cache_dir / ds.name / (ident + ".bin")
    assert out["first"] == out["second"] == str(expected)
    assert out["same_file"]
    assert file_md5_hex(expected) == ds.md5[ident]
    assert ds.get_count("sub/b.bin") == 1
    assert ds.get_count("a.txt") == 0


def test_s3_dataset_cached_once(s3_dataset, cache_dir, make_env):
    ds = s3_dataset({"a.txt": b"hello s3\n", "big.dat": os.urandom(1 << 20)})
    ident = ds.identifiers["big.dat"]

    out = _two_accesses(ds.uri, ident, make_env(cache_dir, {**ds.env, **DISABLE}))

    expected = ds.cache_path(cache_dir, "big.dat")
    assert expected == cache_dir / ds.uuid / ident  # sic: dtool-s3 drops the extension
    assert out["first"] == out["second"] == str(expected)
    assert out["same_file"], "second access must not re-download the item"
    assert file_md5_hex(expected) == ds.md5[ident]


def test_dtool_item_fetch_executable(http_dataset, cache_dir, make_env):
    ds = http_dataset({"x/y.txt": b"fetched by the dtool CLI\n"})
    ident = ds.identifiers["x/y.txt"]

    proc = subprocess.run(
        ["dtool", "item", "fetch", ds.uri, ident],
        env=make_env(cache_dir, DISABLE), capture_output=True, text=True, timeout=120,
    )

    assert proc.returncode == 0, proc.stderr
    path = proc.stdout.strip()
    assert path == str(ds.cache_path(cache_dir, "x/y.txt"))
    assert file_md5_hex(path) == ds.md5[ident]
    assert ds.get_count("x/y.txt") == 1
