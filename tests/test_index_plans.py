"""The queries behind summary, ls and a clean's plan: one pass over per-directory totals or
one indexed query, whatever the number of directories holding untracked files.

Each command runs in this process with SQLite's trace on; the statements it sent are
counted (they must not grow with the number of directories) and each one reading ``files``
is explained (``EXPLAIN QUERY PLAN``): the counts and orders that matter must come from
``files_by_last_use``, never from a scan of the table.
"""

import os
import sqlite3
import time

import pytest

from dtool_cache_manager import planning, report
from dtool_cache_manager.store import ledger as ledger_module
from dtool_cache_manager.policies import Rules


def build(cache_dir, n_dirs, files_per_dir=20):
    """Untracked files in ``n_dirs`` dataset directories (a cache filled before install)."""
    past = time.time() - 3 * 86400
    for d in range(n_dirs):
        folder = cache_dir / f"ds{d:03d}"
        folder.mkdir()
        for i in range(files_per_dir):
            path = folder / (f"{d:04d}{i:036d}" + ".dat")
            path.write_bytes(b"x" * (i + 1))
            os.utime(path, (past, past))


@pytest.fixture
def traced(monkeypatch):
    """The SQL statements the ledger's connections send, as SQLite expanded them."""
    statements = []
    connect = sqlite3.connect

    def tracing_connect(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(ledger_module.sqlite3, "connect", tracing_connect)
    return statements


COMMANDS = {
    "summary": lambda cache: report.summarize(cache),
    "ls": lambda cache: report.list_cached(cache, "accessed", 100),
    "clean --older-than 30d":
        lambda cache: planning.plan(cache, Rules(older_than_seconds=30 * 86400)),
    "clean --retain-size": lambda cache: planning.plan(cache, Rules(retain_size_bytes=100)),
}


def _reads_files(statement):
    text = " ".join(statement.split())
    return text.upper().startswith(("SELECT", "WITH")) and (
        " FROM files" in text or " FROM FILES" in text)


LRU_ORDER = "SELECT relpath, size_bytes, last_use, access_count FROM files WHERE kind ="


def _run(cache_dir, traced, command):
    report.summarize(str(cache_dir))  # index it first: the commands are timed warm
    traced.clear()
    COMMANDS[command](str(cache_dir))
    return [s for s in traced if _reads_files(s)]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_queries_do_not_grow_with_the_directories_of_untracked_files(tmp_path, traced,
                                                                     command, monkeypatch):
    counts = []
    for n_dirs in (3, 12):
        cache_dir = tmp_path / f"cache{n_dirs}"
        cache_dir.mkdir()
        monkeypatch.setenv("DTOOL_CACHE_DIRECTORY", str(cache_dir))
        build(cache_dir, n_dirs)
        counts.append(len(_run(cache_dir, traced, command)))
    assert counts[0] == counts[1], (command, counts)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_query_of_files_uses_the_index_or_stops_early(tmp_path, traced, command,
                                                           monkeypatch):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    monkeypatch.setenv("DTOOL_CACHE_DIRECTORY", str(cache_dir))
    build(cache_dir, 6)
    queries = _run(cache_dir, traced, command)
    assert queries
    ledger_path = cache_dir / ".dtool-cache-manager" / "ledger.sqlite3"
    conn = sqlite3.connect(f"file:{ledger_path}?mode=ro", uri=True)
    try:
        for query in queries:
            plan = " / ".join(row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + query))
            scans = "SCAN files" in plan
            limited = " LIMIT " in query.upper()  # a walk by the key that stops early
            assert not scans or limited, f"{command}: {query}\n  -> {plan}"
            if "count(" in query and "kind" in query or query.startswith(LRU_ORDER):
                assert "COVERING INDEX files_by_last_use" in plan, f"{query}\n  -> {plan}"
        if command.startswith("clean"):  # planned from the index alone
            assert any(query.startswith(LRU_ORDER) for query in queries), queries
    finally:
        conn.close()


def test_a_plan_executes_itself(tmp_path):
    """As huggingface_hub's ``DeleteCacheStrategy.execute()``: no argument needed."""
    cache = tmp_path / "cache"
    cache.mkdir()
    build(cache, 2, files_per_dir=3)
    plan = planning.plan(str(cache), Rules(retain_size_bytes=6))
    assert len(plan.removals) == 2 and plan.expected_freed_bytes == 6  # all as old: larger first
    result = plan.execute()
    assert result.freed_bytes == plan.expected_freed_bytes
    assert sorted(o.relpath for o in result.removed) == sorted(r.relpath for r in plan.removals)
    assert not any((cache / r.relpath).exists() for r in plan.removals)
    assert report.summarize(str(cache)).total_size_bytes == 2 * (1 + 2 + 3) - result.freed_bytes
