"""Audit and verify against real datasets on loopback, filled by real subprocesses.

Expected numbers are worked out from the ledger's ``items`` rows (what the hooks measured),
not from the audit's own ``usage`` queries, so the two paths check each other.
"""

import dataclasses
import os
import subprocess
import sys

import pytest

from dtool_cache_manager.api import open_ledger
from dtool_cache_manager.audit import AuditRow, audit, totals
from dtool_cache_manager.layout import current_identity
from dtool_cache_manager.verify import verify
from support.datasets import file_md5_hex
from support.users import HoldingChild

ACCESS = """
import sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
[ds.item_content_abspath(i) for i in sys.argv[2:]]
"""



def _access(ds, relpaths, env):
    """One fresh process accessing ``relpaths`` in order; the plugin hooks in by itself."""
    ids = [ds.identifiers[r] for r in relpaths]
    proc = subprocess.run([sys.executable, "-c", ACCESS, ds.uri, *ids], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _row(ledger, ds, relpath):
    (row,) = ledger.items_for(ds.uri, ds.identifiers[relpath])
    return row


def _relpath(ds, cache_dir, relpath):
    return os.path.relpath(ds.cache_path(cache_dir, relpath), cache_dir)


def _by_key(rows):
    return {r.key: r for r in rows}


def _by_relpath(results):
    return {r.relpath: r for r in results}


def _approx(row):
    return dataclasses.replace(
        row, estimated_seconds_saved=pytest.approx(row.estimated_seconds_saved))


def _statuses(results):
    return {r.relpath: r.status for r in results}


# -- audit ------------------------------------------------------------------------------


def test_audit_counts_exactly(http_dataset, cache_dir, make_env):
    sizes = {"a.bin": 300_000, "b.bin": 50_000, "c.txt": 1000}
    ds = http_dataset({relpath: os.urandom(n) for relpath, n in sizes.items()})
    env = make_env(cache_dir)
    _access(ds, ["a.bin", "b.bin"], env)  # two misses
    _access(ds, ["a.bin", "a.bin", "b.bin", "c.txt"], env)  # three hits, a miss
    _access(ds, ["a.bin"], env)  # a hit
    me = current_identity().user_at_host

    with open_ledger(str(cache_dir)) as ledger:
        rows = {relpath: _row(ledger, ds, relpath) for relpath in sizes}
        by_item = audit(ledger, by="item")
        by_user = audit(ledger, by="user")
        by_dataset = audit(ledger, by="dataset")
        with pytest.raises(ValueError):
            audit(ledger, by="colour")

    assert {r: (rows[r].hits, rows[r].misses) for r in sizes} == {
        "a.bin": (3, 1), "b.bin": (1, 1), "c.txt": (0, 1)}
    expected = {}
    for relpath, row in rows.items():
        assert row.fetch_seconds > 0
        saved = row.hits * row.fetch_seconds / row.misses
        expected[row.relpath] = AuditRow(
            key=row.relpath, accesses=row.hits + row.misses, hits=row.hits, misses=row.misses,
            hit_rate=row.hits / (row.hits + row.misses),
            bytes_served_from_cache=row.hits * sizes[relpath],
            estimated_seconds_saved=pytest.approx(saved), estimated=False,
            uris=(ds.uri,), item_relpath=relpath)
    assert _by_key(by_item) == expected
    # Most time saved first; c.txt was never hit, so it saved nothing.
    assert [r.key for r in by_item][-1] == rows["c.txt"].relpath
    savings = [r.estimated_seconds_saved for r in by_item]
    assert savings == sorted(savings, reverse=True)

    total = totals(by_item)
    assert total == AuditRow(
        key="TOTAL", accesses=7, hits=4, misses=3, hit_rate=4 / 7,
        bytes_served_from_cache=3 * 300_000 + 50_000,
        estimated_seconds_saved=pytest.approx(sum(savings)), estimated=False)
    (user_row,) = by_user
    (dataset_row,) = by_dataset
    # A dataset is its UUID, with every URI it was read through.
    assert (user_row.key, dataset_row.key, dataset_row.uris) == (me, ds.uuid, (ds.uri,))
    # Same numbers however grouped (savings summed in another order: approx).
    for grouped in (user_row, dataset_row):
        assert _approx(grouped) == dataclasses.replace(total, key=grouped.key,
                                                       uris=grouped.uris)


def test_audit_since_window_uses_hour_buckets(http_dataset, cache_dir, make_env):
    size = 100_000
    ds = http_dataset({"a.bin": os.urandom(size)})
    _access(ds, ["a.bin", "a.bin", "a.bin"], make_env(cache_dir))  # a miss, two hits

    with open_ledger(str(cache_dir)) as ledger:
        row = _row(ledger, ds, "a.bin")
        # Synthetic history two days ago, by another user: five hits and one miss that took
        # 7 s.  Written straight into the usage table as the compactor would have.
        old_hour = int(row.last_access // 3600) - 48
        ledger.conn.execute(
            "INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (old_hour, row.relpath, "old@elsewhere", ds.uri, row.uuid, row.identifier,
             5, 1, 5 * size, size, 7.0))
        everything = _by_key(audit(ledger, by="item"))[row.relpath]
        recent = _by_key(audit(ledger, by="item", since=(old_hour + 1) * 3600))[row.relpath]
        # A bucket counts whole when it ends after `since`: its last second still includes it.
        edge = _by_key(audit(ledger, by="item", since=old_hour * 3600 + 3599))[row.relpath]
        users = _by_key(audit(ledger, by="user", since=(old_hour + 1) * 3600))
        old_users = _by_key(audit(ledger, by="user"))

    # The fetch duration is averaged over all history, whatever the window.
    per_fetch = (row.fetch_seconds + 7.0) / 2
    assert (row.hits, row.misses) == (2, 1)
    assert (everything.hits, everything.misses) == (7, 2)
    assert everything.estimated_seconds_saved == pytest.approx(7 * per_fetch)
    assert (recent.hits, recent.misses, recent.bytes_served_from_cache) == (2, 1, 2 * size)
    assert recent.estimated_seconds_saved == pytest.approx(2 * per_fetch)
    assert edge == everything
    assert list(users) == [current_identity().user_at_host]
    assert old_users["old@elsewhere"].estimated_seconds_saved == pytest.approx(5 * per_fetch)
    assert not any(r.estimated for r in (everything, recent))


def test_audit_throughput_fallback_is_estimated(http_dataset, s3_dataset, cache_dir,
                                                make_env):
    content = {"fetched.bin": os.urandom(200_000), "placed.bin": os.urandom(80_000)}
    s3_content = {"placed.dat": os.urandom(30_000)}
    ds = http_dataset(content)
    s3 = s3_dataset(s3_content)
    # Files put into the cache by hand (as if fetched before tracking began): their first
    # tracked access is a hit, so no fetch of theirs was ever measured.
    for remote, relpath, data in ((ds, "placed.bin", content["placed.bin"]),
                                  (s3, "placed.dat", s3_content["placed.dat"])):
        path = remote.cache_path(cache_dir, relpath)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    _access(ds, ["fetched.bin", "fetched.bin", "placed.bin", "placed.bin"], make_env(cache_dir))
    _access(s3, ["placed.dat"], make_env(cache_dir, s3.env))

    with open_ledger(str(cache_dir)) as ledger:
        fetched = _row(ledger, ds, "fetched.bin")
        placed = _row(ledger, ds, "placed.bin")
        placed_s3 = _row(ledger, s3, "placed.dat")
        by_item = _by_key(audit(ledger, by="item"))
        by_dataset = _by_key(audit(ledger, by="dataset"))

    assert (fetched.hits, fetched.misses) == (1, 1)
    assert (placed.hits, placed.misses) == (2, 0)
    assert (placed_s3.hits, placed_s3.misses) == (1, 0)
    assert by_item[fetched.relpath].estimated is False
    assert by_item[fetched.relpath].estimated_seconds_saved == pytest.approx(
        fetched.fetch_seconds)
    # http throughput, as observed on fetched.bin, times the bytes placed.bin served.
    seconds_per_byte = fetched.fetch_seconds / (fetched.misses * len(content["fetched.bin"]))
    assert by_item[placed.relpath].estimated is True
    assert by_item[placed.relpath].estimated_seconds_saved == pytest.approx(
        2 * 80_000 * seconds_per_byte)
    assert by_item[placed.relpath].bytes_served_from_cache == 2 * 80_000
    # Nothing was ever fetched over s3: no throughput to go on, so nothing claimed.
    assert by_item[placed_s3.relpath].estimated is True
    assert by_item[placed_s3.relpath].estimated_seconds_saved == 0.0
    assert by_item[placed_s3.relpath].hit_rate == 1.0
    assert by_dataset[ds.uuid].estimated is True
    assert by_dataset[s3.uuid].estimated is True
    assert totals(by_dataset.values()).estimated is True


# -- verify -----------------------------------------------------------------------------


def test_verify_finds_and_fixes_damage(http_dataset, cache_dir, make_env):
    names = ["trunc.bin", "flip.bin", "held.bin", "gone.bin", "good.bin"]
    ds = http_dataset({name: os.urandom(100_000) for name in names})
    env = make_env(cache_dir)
    _access(ds, names, env)
    rel = {name: _relpath(ds, cache_dir, name) for name in names}
    path = {name: ds.cache_path(cache_dir, name) for name in names}
    # It takes its hold on a good file (a hit).
    with HoldingChild(None, ds.uri, [ds.identifiers["held.bin"]], env) as holder:
        os.truncate(path["trunc.bin"], 50_000)
        os.truncate(path["held.bin"], 10)
        with open(path["flip.bin"], "r+b") as fh:  # same size, one byte changed
            first = fh.read(1)
            fh.seek(0)
            fh.write(bytes([first[0] ^ 0xFF]))
        os.unlink(path["gone.bin"])  # deleted behind our back

        with open_ledger(str(cache_dir)) as ledger:
            plain = verify(ledger)
            hashed = verify(ledger, check_hash=True)
            assert all(p.is_file() for n, p in path.items() if n != "gone.bin")
            fixed = {r.relpath: r for r in verify(ledger, check_hash=True, fix=True)}
            remaining = {r.relpath for r in ledger.items()}
        holder.finish()

    assert _statuses(plain) == {rel["trunc.bin"]: "wrong size", rel["flip.bin"]: "ok",
                                rel["held.bin"]: "wrong size", rel["gone.bin"]: "missing",
                                rel["good.bin"]: "ok"}
    trunc = _by_relpath(plain)[rel["trunc.bin"]]
    assert (trunc.expected_size, trunc.actual_size, trunc.fixed) == (100_000, 50_000, False)
    assert _statuses(hashed)[rel["flip.bin"]] == "hash mismatch"
    assert _statuses(hashed)[rel["good.bin"]] == "ok"

    for name in ("trunc.bin", "flip.bin", "gone.bin"):
        assert fixed[rel[name]].fixed, name
        assert not path[name].exists(), name
        assert rel[name] not in remaining, name
    held = fixed[rel["held.bin"]]
    assert (held.status, held.fixed) == ("wrong size", False)
    assert [h.pid for h in held.holders] == [holder.pid]
    assert "in use by" in held.detail
    assert path["held.bin"].is_file()
    assert (fixed[rel["good.bin"]].status, fixed[rel["good.bin"]].fixed) == ("ok", False)
    assert remaining == {rel["held.bin"], rel["good.bin"]}

    # The holder has gone, so the damaged file can go too; then fresh fetches are good.
    with open_ledger(str(cache_dir)) as ledger:
        (again,) = [r for r in verify(ledger, fix=True) if r.relpath == rel["held.bin"]]
        assert (again.status, again.fixed, again.holders) == ("wrong size", True, ())
    _access(ds, names, env)
    with open_ledger(str(cache_dir)) as ledger:
        assert set(_statuses(verify(ledger, check_hash=True)).values()) == {"ok"}
    for name in names:
        assert file_md5_hex(path[name]) == ds.md5[ds.identifiers[name]]
    assert ds.get_count("trunc.bin") == 2 and ds.get_count("good.bin") == 1


def test_verify_unverifiable_rows_and_symlinks(http_dataset, cache_dir, make_env, tmp_path):
    names = ["x.bin", "y.bin", "z.bin"]
    ds = http_dataset({name: os.urandom(5000) for name in names})
    _access(ds, names, make_env(cache_dir))
    rel = {name: _relpath(ds, cache_dir, name) for name in names}
    # z.bin becomes a symlink to a file outside the cache: never followed, never removed.
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not yours")
    os.unlink(ds.cache_path(cache_dir, "z.bin"))
    os.symlink(outside, ds.cache_path(cache_dir, "z.bin"))

    with open_ledger(str(cache_dir)) as ledger:
        # Damage the recorded manifest facts directly, as an old or foreign ledger might have.
        ledger.conn.execute("UPDATE items SET hash_function = 'crc32_hexdigest' "
                            "WHERE relpath = ?", (rel["x.bin"],))
        ledger.conn.execute("UPDATE items SET manifest_size = NULL, manifest_hash = NULL "
                            "WHERE relpath = ?", (rel["y.bin"],))
        plain = _by_relpath(verify(ledger))
        hashed = _by_relpath(verify(ledger, check_hash=True, fix=True))

    assert plain[rel["x.bin"]].status == "ok"  # the size alone still checks out
    assert hashed[rel["x.bin"]].status == "unverifiable"
    assert "crc32_hexdigest" in hashed[rel["x.bin"]].detail
    assert plain[rel["y.bin"]].status == hashed[rel["y.bin"]].status == "unverifiable"
    assert plain[rel["z.bin"]].status == hashed[rel["z.bin"]].status == "unverifiable"
    assert plain[rel["z.bin"]].detail == "not a regular file"
    assert not any(r.fixed for r in hashed.values())
    assert os.path.islink(ds.cache_path(cache_dir, "z.bin"))
    assert outside.read_bytes() == b"not yours"
