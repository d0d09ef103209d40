"""`dtool cache summary` through the real dtool executable and the standalone script."""

import json
import subprocess


def _run(args, env):
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)


def test_summary_of_a_fetched_cache(http_dataset, cache_dir, make_env):
    ds = http_dataset({"a.txt": b"a" * 300, "b.txt": b"b" * 200})
    env = make_env(cache_dir)
    fetched = _run(["dtool", "item", "fetch", ds.uri, ds.identifiers["a.txt"]], env)
    assert fetched.returncode == 0, fetched.stderr
    (cache_dir / "untracked-ds").mkdir()
    (cache_dir / "untracked-ds" / ("0" * 40)).write_bytes(b"u" * 50)
    for command in (["dtool", "cache", "summary", "--json"], ["dtool-cache", "summary", "--json"]):
        result = _run(command, env)
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data["cache_directory"] == str(cache_dir)
        assert data["total_size_bytes"] == 350
        assert (data["num_items"], data["num_datasets"], data["num_untracked"]) == (2, 2, 1)
        assert data["num_in_use"] == 0
        by_key = {d["key"]: d for d in data["datasets"]}
        assert by_key[ds.uuid]["uris"] == [ds.uri] and by_key[ds.uuid]["size_bytes"] == 300
    table = _run(["dtool", "cache", "summary"], env)
    assert table.returncode == 0 and ds.uri in table.stdout and "350 bytes" in table.stdout


def test_summary_of_a_missing_cache_is_empty(tmp_path, make_env):
    missing = tmp_path / "nowhere"
    result = _run(["dtool-cache", "summary", "--json"], make_env(missing))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_items"] == 0
    assert not missing.exists()
