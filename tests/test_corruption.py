"""A damaged or old ledger: detected, moved aside with a warning, rebuilt from the disk and
the journals; an old schema is upgraded in place.  No cached file is ever deleted for it."""

import json
import logging
import os
import sqlite3
import subprocess
import sys

import pytest

import dtool_cache_manager as dcm
from dtool_cache_manager.store import ledger as ledger_module
from dtool_cache_manager.store.ledger import SCHEMA_VERSION

ACCESS_ALL = ("import sys, dtoolcore\nds = dtoolcore.DataSet.from_uri(sys.argv[1])\n"
              "for i in sorted(ds.identifiers):\n    ds.item_content_abspath(i)\n")

# The schema of dtool-cache-manager's first ledger (version 1), kept verbatim to test the
# upgrade: items lacked hash_function and usage lacked miss_bytes.
SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (relpath TEXT PRIMARY KEY, uuid TEXT NOT NULL, identifier TEXT NOT NULL,
    scheme TEXT NOT NULL, size_bytes INTEGER NOT NULL DEFAULT 0, first_cached REAL,
    last_access REAL, hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0,
    fetch_seconds REAL NOT NULL DEFAULT 0, item_relpath TEXT, manifest_size INTEGER,
    manifest_hash TEXT);
CREATE TABLE item_uris (relpath TEXT NOT NULL, uri TEXT NOT NULL,
    PRIMARY KEY (relpath, uri)) WITHOUT ROWID;
CREATE TABLE item_users (relpath TEXT NOT NULL, user TEXT NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0, last_access REAL,
    PRIMARY KEY (relpath, user)) WITHOUT ROWID;
CREATE TABLE usage (hour INTEGER NOT NULL, relpath TEXT NOT NULL, user TEXT NOT NULL,
    uri TEXT NOT NULL, uuid TEXT NOT NULL, identifier TEXT NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0, misses INTEGER NOT NULL DEFAULT 0,
    hit_bytes INTEGER NOT NULL DEFAULT 0, fetch_seconds REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, relpath, user, uri)) WITHOUT ROWID;
CREATE TABLE removals (relpath TEXT PRIMARY KEY, removed_at REAL NOT NULL);
CREATE TABLE journals (token TEXT PRIMARY KEY, offset INTEGER NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
"""


@pytest.fixture
def filled(http_dataset, cache_dir, make_env):
    """A cache of three items, each accessed once, folded into the ledger."""
    ds = http_dataset({f"f{i}.bin": os.urandom(5000 + i) for i in range(3)})
    subprocess.run([sys.executable, "-c", ACCESS_ALL, ds.uri], env=make_env(cache_dir),
                   check=True, timeout=120)
    with dcm.open_ledger(str(cache_dir)) as ledger:
        assert len(ledger.items()) == 3
    return ds


def _disk(cache_dir):
    return sorted(os.path.join(r, f) for r, d, fs in os.walk(cache_dir)
                  if ".dtool-cache-manager" not in r for f in fs)


def _damage(path, how):
    if how == "garbage":
        with open(path, "wb") as fh:
            fh.write(os.urandom(20000))
    elif how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)
    elif how == "zeroed pages":
        with open(path, "r+b") as fh:
            fh.seek(4096)
            fh.write(b"\0" * 8192)


@pytest.mark.parametrize("how", ["garbage", "truncated", "zeroed pages"])
def test_damaged_ledger_is_moved_aside_and_rebuilt(how, filled, cache_dir, make_env, caplog):
    meta = cache_dir / ".dtool-cache-manager"
    files_before = _disk(cache_dir)
    # A live process has accesses in its journal; they must survive the rebuild.
    holder = subprocess.Popen(
        [sys.executable, "-c", ACCESS_ALL + "print('done', flush=True)\nsys.stdin.readline()\n",
         filled.uri], env=make_env(cache_dir), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    try:
        assert holder.stdout.readline().strip() == "done"
        with dcm.open_ledger(str(cache_dir)):  # fold the live journal into the old ledger
            pass
        with sqlite3.connect(meta / "ledger.sqlite3") as conn:  # checkpoint: data in the file
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        _damage(meta / "ledger.sqlite3", how)
        with caplog.at_level(logging.WARNING):
            summary = subprocess.run(["dtool-cache", "summary", "--json"], capture_output=True,
                                     text=True, env=make_env(cache_dir))
        assert summary.returncode == 0, summary.stderr
        assert "is unreadable" in summary.stderr and "moved it to" in summary.stderr
        assert "Traceback" not in summary.stderr
        assert any(n.startswith("ledger.sqlite3.corrupt-") for n in os.listdir(meta))
        assert _disk(cache_dir) == files_before  # nothing deleted because of corruption
        data = json.loads(summary.stdout)
        assert data["num_items"] == 3  # the disk is the truth for what is cached
        # The live process's journal was folded into the new ledger: its 3 accesses count.
        for ident in filled.identifiers.values():
            assert dcm.num_times_accessed(filled.uri, ident) == 1
        with sqlite3.connect(meta / "ledger.sqlite3") as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        holder.communicate("\n")


def test_schema_v1_is_upgraded_in_place(tmp_path):
    cache = tmp_path / "cache"
    meta = cache / ".dtool-cache-manager"
    meta.mkdir(parents=True)
    with sqlite3.connect(meta / "ledger.sqlite3") as conn:
        conn.executescript(SCHEMA_V1)
        conn.execute("INSERT INTO items (relpath, uuid, identifier, scheme, size_bytes, "
                     "last_access, hits, misses, fetch_seconds) VALUES "
                     "('u/x', 'u', 'x', 's3', 10, 1000.0, 4, 1, 0.5)")
        conn.execute("INSERT INTO usage VALUES (0, 'u/x', 'a@h', 's3://b/u', 'u', 'x', "
                     "4, 1, 40, 0.5)")
    with dcm.open_ledger(str(cache)) as ledger:
        (row,) = ledger.items()
        assert (row.relpath, row.hits, row.misses, row.hash_function) == ("u/x", 4, 1, None)
        assert ledger.conn.execute("SELECT miss_bytes, hit_bytes FROM usage").fetchone() == (0, 40)
        assert ledger.conn.execute(
            "SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            str(SCHEMA_VERSION),)
    assert not [n for n in os.listdir(meta) if "corrupt" in n]


# What version 8 changed, to turn a version 8 ledger into a version 7 one.
TO_SCHEMA_V8 = """
DROP INDEX usage_by_item;
UPDATE meta SET value = '8' WHERE key = 'schema_version';
"""

TO_SCHEMA_V7 = """
DROP INDEX files_by_last_use;
CREATE INDEX files_by_last_use ON files (kind, last_use);
UPDATE meta SET value = '7' WHERE key = 'schema_version';
"""

# What version 7 changed, to turn a version 7 ledger into a version 6 one.
TO_SCHEMA_V6 = """
UPDATE files SET kind = 0 WHERE kind = 2;
ALTER TABLE files RENAME COLUMN kind TO partial;
ALTER TABLE journals DROP COLUMN hour;
UPDATE meta SET value = '6' WHERE key = 'schema_version';
"""

# What version 6 added, to turn a version 6 ledger into a version 5 one.
TO_SCHEMA_V5 = """
CREATE TABLE journals_v5 (token TEXT PRIMARY KEY, offset INTEGER NOT NULL);
INSERT INTO journals_v5 SELECT token, offset FROM journals;
DROP TABLE journals;
ALTER TABLE journals_v5 RENAME TO journals;
UPDATE meta SET value = '5' WHERE key = 'schema_version';
"""

TO_SCHEMA_V4 = f"""
{ledger_module._ITEMS_TABLE.format(name="items_v4").replace("WITHOUT ROWID", "")};
INSERT INTO items_v4 SELECT * FROM items;
DROP TABLE items;
ALTER TABLE items_v4 RENAME TO items;
CREATE INDEX items_by_identifier ON items (identifier, uuid);
CREATE TRIGGER items_counted_in AFTER INSERT ON items BEGIN
  UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'item_rows'; END;
CREATE TRIGGER items_counted_out AFTER DELETE ON items BEGIN
  UPDATE meta SET value = CAST(value AS INTEGER) - 1 WHERE key = 'item_rows'; END;
CREATE TABLE removals_v4 (relpath TEXT PRIMARY KEY, removed_at REAL NOT NULL);
INSERT INTO removals_v4 SELECT * FROM removals;
DROP TABLE removals;
ALTER TABLE removals_v4 RENAME TO removals;
UPDATE meta SET value = '4' WHERE key = 'schema_version';
"""

# What version 4 dropped or changed, to turn a version 4 ledger into a version 3 one.
TO_SCHEMA_V3 = """
ALTER TABLE dirs DROP COLUMN last_access;
DROP INDEX files_by_last_use;
CREATE INDEX files_by_last_use ON files (last_use) WHERE partial = 0;
CREATE INDEX files_by_dir ON files (dir, last_access);
CREATE INDEX files_by_last_access ON files (last_access);
CREATE INDEX item_uris_by_uri ON item_uris (uri);
UPDATE meta SET value = '3' WHERE key = 'schema_version';
"""


DOWNGRADES = [TO_SCHEMA_V8, TO_SCHEMA_V7, TO_SCHEMA_V6, TO_SCHEMA_V5, TO_SCHEMA_V4,
              TO_SCHEMA_V3]


@pytest.mark.parametrize("downgrade", [DOWNGRADES[:n] for n in range(1, 7)],
                         ids=["v8", "v7", "v6", "v5", "v4", "v3"])
def test_older_schema_is_upgraded_in_place(downgrade, filled, cache_dir, make_env):
    """Version 4 drops three indexes every removal paid for, version 5 stores items by path
    and counts their removal without a trigger, version 6 remembers each journal's inode,
    version 7 tells untracked files from tracked ones in the index, version 8 plans a clean
    from the index alone, version 9 indexes usage by item; the figures stay the same, and the
    count of rows stays right through a clean."""
    env = make_env(cache_dir)

    def report():
        return [json.loads(subprocess.run(
            ["dtool-cache", *args, "--json"], capture_output=True, text=True, check=True,
            env=env).stdout) for args in (["summary"], ["ls", "--sort", "accessed"])]

    def schema(kind):
        return {r[0]: r[1] for r in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = ? AND sql IS NOT NULL", (kind,))}

    before = report()
    ledger_path = cache_dir / ".dtool-cache-manager" / "ledger.sqlite3"
    with sqlite3.connect(ledger_path) as conn:
        for script in downgrade:
            conn.executescript(script)
    assert report() == before
    with sqlite3.connect(ledger_path) as conn:
        indexes, triggers, tables = schema("index"), schema("trigger"), schema("table")
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'"
                            ).fetchone() == (str(SCHEMA_VERSION),)
        assert conn.execute("SELECT max(last_access) FROM dirs").fetchone()[0] is not None
    assert set(indexes) == {"items_by_dataset", "dirs_by_parent", "files_by_last_use",
                            "usage_by_item"}
    assert "size_bytes, access_count" in indexes["files_by_last_use"]
    assert set(triggers) == {"items_counted_in"}
    assert "WITHOUT ROWID" in tables["items"] and "WITHOUT ROWID" in tables["removals"]
    assert "ino" in tables["journals"]
    assert before[0]["num_items"] == 3 and len(before[1]) == 3

    subprocess.run(["dtool-cache", "clean", "--retain-size", "0", "--yes"], check=True,
                   capture_output=True, env=env)
    with sqlite3.connect(ledger_path) as conn:
        assert conn.execute("SELECT value, (SELECT count(*) FROM items) FROM meta "
                            "WHERE key = 'item_rows'").fetchone() == ("0", 0)
    assert report()[0]["num_items"] == 0


@pytest.mark.parametrize("setup", [
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);"
    "INSERT INTO meta VALUES ('schema_version', '0');",
    "CREATE TABLE something_else (x);",
])
def test_unknown_old_schema_is_moved_aside(setup, tmp_path, caplog):
    cache = tmp_path / "cache"
    meta = cache / ".dtool-cache-manager"
    meta.mkdir(parents=True)
    with sqlite3.connect(meta / "ledger.sqlite3") as conn:
        conn.executescript(setup)
    with caplog.at_level(logging.WARNING, logger="dtool_cache_manager"):
        with dcm.open_ledger(str(cache)) as ledger:
            assert ledger.items() == []
    assert "moved it to" in caplog.text
    assert [n for n in os.listdir(meta) if n.startswith("ledger.sqlite3.corrupt-")]
