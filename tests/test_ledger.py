"""The journal and the ledger on their own: formats, exactly-once folding, removals,
corruption and schema versions."""

import datetime as dt
import json
import os
import pwd
import sqlite3
import subprocess
import sys
import time

import pytest

import dtool_cache_manager as dcm
from dtool_cache_manager import cachefs, journal
from dtool_cache_manager.store import ledger as ledger_mod
from dtool_cache_manager.layout import Identity
from dtool_cache_manager.store.ledger import Ledger, LedgerError


def _writer(paths, token="h.1.t"):
    return journal.JournalWriter(paths, Identity("alice", "h", 1), token)


def _access(writer, relpath, t, miss=False, size=10, uri="s3://b/u"):
    number = writer.describe(relpath, uri, "u", relpath.rsplit("/", 1)[-1], "s3", size, t - 5,
                             None)
    writer.record_access(number, t, miss, 0.25 if miss else 0.0)


def _cache(tmp_path):
    return cachefs.open_cache(str(tmp_path))


def _lines(tmp_path, data):
    """(line or None, offset after it) of ``data``, as a reader streams a journal."""
    (tmp_path / "j").write_bytes(data)
    fd = os.open(tmp_path / "j", os.O_RDONLY)
    try:
        return list(cachefs.iter_lines(fd, 0, len(data), journal.MAX_LINE))
    finally:
        os.close(fd)


def test_torn_last_line_waits_for_the_next_pass(tmp_path):
    data = b'["j",1,"alice","h",1,0]\n["a","u/x","u","x","x","s3",1000000,0,5,0,0]\n["a","r'
    lines = _lines(tmp_path, data)
    records, malformed = journal.parse_lines([line for line, _ in lines], "alice", "h")
    assert len(records) == 1 and malformed == 0
    assert lines[-1][1] == data.rfind(b"\n") + 1  # consumed up to the torn line, not into it


def test_long_lines_are_skipped_as_they_stream_by(tmp_path):
    """A line over the cap (a member's junk, a file of zeros) is skipped without being held
    in memory; the lines around it still count."""
    good = b'["a","u/x","u","x","x","s3",1000000,0,5,0,0]\n'
    data = good + b"z" * (3 * journal.MAX_LINE) + b"\n" + good + b"y" * (2 << 20)
    lines = _lines(tmp_path, data)
    assert [line for line, _ in lines] == [good[:-1], None, good[:-1]]
    assert lines[-1][1] == data.rfind(b"\n") + 1


def test_compaction_counts_exactly_once_and_deletes_dead_journals(tmp_path):
    paths = _cache(tmp_path)
    writer = _writer(paths)  # no holds file: its owner counts as dead
    now = time.time()
    _access(writer, "u/a", now - 10, miss=True)
    _access(writer, "u/a", now - 5)
    _access(writer, "u/b", now - 1)
    with Ledger(paths) as led:
        assert led.compact() == 3
        assert led.compact() == 0  # nothing twice
        a = led.item("u/a")
        assert (a.hits, a.misses, a.fetch_seconds) == (1, 1, pytest.approx(0.25))
        assert a.last_access == pytest.approx(now - 5, abs=1e-5)
        assert a.first_cached == pytest.approx(now - 15, abs=1e-5)
        # Attributed to the journal file's owner, as the kernel says (us), whatever its
        # header claims ("alice").
        me = pwd.getpwuid(os.geteuid()).pw_name
        assert led.users_of("u/a") == {f"{me}@h": (1, 1, pytest.approx(now - 5, abs=1e-5))}
    assert not os.path.exists(writer.path)


def test_an_access_before_a_removal_does_not_resurrect_the_row(tmp_path):
    paths = _cache(tmp_path)
    writer = _writer(paths)
    t = time.time()
    _access(writer, "u/a", t - 2, miss=True)
    with Ledger(paths) as led:
        led.forget(["u/a"], removed_at=t)  # removed after that access, before folding it
        led.compact()
        assert led.item("u/a") is None
        hits, misses = led.conn.execute(
            "SELECT sum(hits), sum(misses) FROM usage WHERE relpath='u/a'").fetchone()
        assert (hits, misses) == (0, 1)  # still part of the history


def test_concurrent_compactors_never_double_count(http_dataset, cache_dir, make_env):
    ds = http_dataset({f"f{i}": b"x" * 10 for i in range(5)})
    code = ("import sys, dtoolcore, dtool_cache_manager as dcm\n"
            "ds = dtoolcore.DataSet.from_uri(sys.argv[1])\n"
            "for k in range(300):\n"
            "    ds.item_content_abspath(sorted(ds.identifiers)[k % 5])\n"
            "    if k % 25 == 0:\n"
            "        with dcm.open_ledger():\n"
            "            pass\n")
    env = make_env(cache_dir)
    procs = [subprocess.Popen([sys.executable, "-c", code, ds.uri], env=env) for _ in range(4)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0, 0, 0]
    for ident in ds.identifiers.values():
        assert dcm.num_times_accessed(ds.uri, ident) == 4 * 300 // 5


def test_api_times_are_utc_and_days_are_fractional(http_dataset, cache_dir, make_env):
    import dtoolcore

    ds = http_dataset({"a": b"a"})
    ident = ds.identifiers["a"]
    assert dcm.last_time_accessed(ds.uri, ident) is None
    assert dcm.num_days_since_last_accessed(ds.uri, ident) is None
    before = dt.datetime.now(dt.timezone.utc)
    dtoolcore.DataSet.from_uri(ds.uri).item_content_abspath(ident)
    last = dcm.last_time_accessed(ds.uri, ident)
    assert last.tzinfo is not None and last.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(seconds=1) <= last <= dt.datetime.now(dt.timezone.utc)
    assert 0 <= dcm.num_days_since_last_accessed(ds.uri, ident) < 1 / 24
    assert dcm.num_times_accessed(ds.uri, ident) == 1


def test_cache_size_and_items_count_the_disk(http_dataset, cache_dir):
    import dtoolcore

    ds = http_dataset({"a": b"a" * 100, "b": b"b" * 250})
    dataset = dtoolcore.DataSet.from_uri(ds.uri)
    for ident in ds.identifiers.values():
        dataset.item_content_abspath(ident)
    (cache_dir / ds.name / "partial.tmp").write_bytes(b"p" * 7)
    assert dcm.cache_num_items() == 2
    assert dcm.cache_size() == 100 + 250 + 7  # partial downloads use space too


def test_newer_schema_is_refused_not_overwritten(tmp_path):
    paths = _cache(tmp_path)
    with Ledger(paths) as led:
        led.conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(LedgerError, match="newer"):
        Ledger(paths)
    conn = sqlite3.connect(paths.ledger_path)
    assert conn.execute("SELECT value FROM meta").fetchone() == ("99",)


def test_ledger_rows_are_plain_sql(tmp_path):
    paths = _cache(tmp_path)
    _access(_writer(paths), "u/a", time.time(), miss=True)
    with Ledger(paths) as led:
        led.compact()
    rows = sqlite3.connect(paths.ledger_path).execute(
        "SELECT relpath, uuid, scheme, hits, misses FROM items").fetchall()
    assert rows == [("u/a", "u", "s3", 0, 1)]


def test_a_new_ledger_is_a_file_whose_row_count_the_triggers_keep(tmp_path):
    """A schema that fails to build would only show as a read-only in-memory view in the
    commands (they fall back so that users still get figures); here it must fail."""
    paths = _cache(tmp_path)
    writer = _writer(paths)
    now = time.time()
    for name in ("u/a", "u/b", "u/c"):
        _access(writer, name, now - 3, miss=True)
    with Ledger(paths) as led:
        assert not led.readonly and os.path.isfile(paths.ledger_path)
        led.compact()
        assert led.row_count() == 3
        led.forget(["u/b"])
        led.forget_removed([("u/c", now - 10, None)])  # accessed after this removal: kept
        counted = led.conn.execute("SELECT count(*) FROM items").fetchone()[0]
        assert led.row_count() == counted == 2


def test_there_is_one_upgrade_step_per_older_version_in_order():
    """An ordered, append-only list, as Cargo's migrations: a new schema adds one step at
    the end, and every older ledger is upgraded through all the steps after it."""
    from dtool_cache_manager.store.ledger import _MIGRATIONS, SCHEMA_VERSION

    assert list(_MIGRATIONS) == list(range(1, SCHEMA_VERSION))
