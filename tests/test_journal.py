"""Compact, bounded journals for long runs: a few bytes per access, segments folded while
the process runs, exact counts after SIGKILL at any moment, old journals still read.

A training loop reads the same items epoch after epoch from one process.  Each warm access
must cost the journal a short line (format 2: a number per item), the journal must stay
small however long the run (segments, folded while it runs), and a SIGKILL at any moment
(writing, rotating, folding) may lose at most the access in flight.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest

import dtool_cache_manager as dcm
from dtool_cache_manager import cachefs, journal
from dtool_cache_manager.holds import HoldsFile
from dtool_cache_manager.store.ledger import Ledger

META = ".dtool-cache-manager"

# Accesses items round-robin, reporting each completed access; journal segments are tiny so
# that rotations (and the folds they trigger) happen every few dozen accesses.
LOOP = """
import os, sys
from dtool_cache_manager import journal
journal.SEGMENT_BYTES = int(sys.argv[3])
import dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
ids = sorted(ds.identifiers)
n = int(sys.argv[2])
for i in range(n):
    ds.item_content_abspath(ids[i % len(ids)])
    os.write(1, b"%d\\n" % (i + 1))
"""


def journal_files(cache_dir):
    return sorted(n for n in os.listdir(os.path.join(cache_dir, META, "journal"))
                  if n.endswith(".jsonl"))


def counted(ds, cache_dir):
    return sum(dcm.num_times_accessed(ds.uri, ident, cache_dir=str(cache_dir))
               for ident in ds.identifiers.values())


def test_a_warm_access_costs_the_journal_a_short_line(http_dataset, cache_dir, make_env):
    """After the first access of each item, an access adds at most 32 bytes."""
    ds = http_dataset({f"f{i}.bin": b"x" * 10 for i in range(5)})
    code = LOOP.replace('os.write(1, b"%d\\n" % (i + 1))', "pass") + """
from dtool_cache_manager.hooks import tracking
session = tracking._sessions[os.environ["DTOOL_CACHE_DIRECTORY"]]
before = os.fstat(session.journal._fd).st_size
for i in range(2000):
    ds.item_content_abspath(ids[i % len(ids)])
print((os.fstat(session.journal._fd).st_size - before) / 2000)
"""
    result = subprocess.run([sys.executable, "-c", code, ds.uri, "5", str(1 << 30)],
                            env=make_env(cache_dir), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    per_access = float(result.stdout.split()[-1])
    assert per_access <= 32, per_access
    assert counted(ds, cache_dir) == 2005


def test_a_repeated_hit_takes_the_shortcut_and_leaves_it_when_the_file_changes(
        http_dataset, cache_dir, make_env):
    """Repeat hits skip the hooks' general path (plugins.Dispatch.warm_hits), but a file
    whose mtime changed is described afresh, and a path the broker did not plan for is
    recorded as that path: every access is counted, none twice."""
    ds = http_dataset({"a.bin": b"a" * 10, "b.bin": b"b" * 10})
    a, b = ds.identifiers["a.bin"], ds.identifiers["b.bin"]
    code = """
import os, shutil, sys
import dtoolcore
from dtool_cache_manager.hooks import host, tracking
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
a, b = sys.argv[2], sys.argv[3]
calls = []
known = tracking.known_warm_hit
def spy(*args):
    state = known(*args)
    calls.append(state is not None)
    return state
host._hooks().warm_hits = (spy, tracking.record_warm_hit)
path_a = ds.item_content_abspath(a)  # a miss: fetched and described
path_b = ds.item_content_abspath(b)
for _ in range(3):
    ds.item_content_abspath(a)  # hits: the shortcut
os.utime(path_a, (1, 1))  # another member touches the file: a new definition
ds.item_content_abspath(a)
ds.item_content_abspath(a)
elsewhere = os.path.join(os.path.dirname(os.path.dirname(path_a)), "elsewhere")
os.mkdir(elsewhere)
moved = shutil.copy(path_a, elsewhere)
os.utime(moved, (1, 1))  # long there: a hit
ds._storage_broker.get_item_abspath = lambda identifier: moved  # the broker surprises us
ds.item_content_abspath(a)
print(calls)
"""
    result = subprocess.run([sys.executable, "-c", code, ds.uri, a, b],
                            env=make_env(cache_dir), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    # First access of each: no state yet; after the utime: no; the surprise: checked first.
    assert result.stdout.split("\n")[0] == str([False, False, True, True, True, False, True,
                                                 True])
    assert "Traceback" not in result.stderr and "ignored" not in result.stderr
    assert dcm.num_times_accessed(ds.uri, a, cache_dir=str(cache_dir)) == 7
    assert dcm.num_times_accessed(ds.uri, b, cache_dir=str(cache_dir)) == 1


def test_a_long_run_keeps_its_journal_small_and_every_access_counted(http_dataset, cache_dir,
                                                                     make_env):
    """4,000 accesses with 2 KiB segments: the process rotates and folds as it goes, never
    has more than two segments, and every access is counted once."""
    ds = http_dataset({f"f{i}.bin": b"y" * 20 for i in range(7)})
    proc = subprocess.Popen([sys.executable, "-c", LOOP, ds.uri, "4000", "2048"],
                            env=make_env(cache_dir), stdout=subprocess.PIPE, text=True)
    most = 0
    for line in proc.stdout:  # a line per access: look at the journal as it goes
        most = max(most, len(journal_files(cache_dir)))
    assert proc.wait(timeout=300) == 0
    assert 1 <= most <= 2, most
    assert journal_files(cache_dir) == []  # folded at exit, all segments gone
    assert counted(ds, cache_dir) == 4000
    with cachefs.open_cache(str(cache_dir)) as cache, Ledger(cache) as ledger:
        leftovers = ledger.conn.execute("SELECT count(*) FROM journal_items").fetchone()[0]
    assert leftovers == 0  # the process's item definitions went with its last segment


@pytest.mark.slow
def test_sigkill_while_writing_rotating_or_folding_loses_at_most_one_access(
        http_dataset, cache_dir, make_env):
    """Kill a long-running accessor at random moments (its segments are a few hundred bytes,
    so it is as often rotating or folding as accessing): the counts are then exact, less
    at most the access in flight, and nothing is counted twice."""
    seed = int(os.environ.get("DCM_FAULT_SEED") or random.randrange(1 << 30))
    print(f"seed={seed}")
    rng = random.Random(seed)
    ds = http_dataset({f"f{i}.bin": bytes([65 + i]) * 30 for i in range(5)})
    env = make_env(cache_dir)
    done_total = 0
    for round_ in range(12):
        proc = subprocess.Popen([sys.executable, "-c", LOOP, ds.uri, "100000", "300"],
                                env=env, stdout=subprocess.PIPE, text=True)
        target = rng.randint(50, 800)
        done = 0
        for line in proc.stdout:
            done = int(line)
            if done >= target:
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"seed={seed} round={round_}"
        # Lines may still have been in the pipe after ``done``: read what is left.
        rest = proc.stdout.read().split()
        done = int(rest[-1]) if rest else done
        done_total += done
        total = counted(ds, cache_dir)  # folds the dead process's segments
        assert done_total <= total <= done_total + 1, (
            f"seed={seed} round={round_}: counted {total}, completed {done_total}")
        done_total = total  # an in-flight access that made it in is a real access
    assert journal_files(cache_dir) == []


def test_a_journal_written_before_the_upgrade_is_still_read(http_dataset, cache_dir):
    """A format-1 journal (one full line per access) of a process that exited before the
    upgrade, left for the next reader: every access counts, attributed to its owner."""
    ds = http_dataset({"a.txt": b"a" * 100})
    ident = ds.identifiers["a.txt"]
    relpath = str(ds.cache_path(cache_dir, "a.txt").relative_to(cache_dir))
    cachefs.open_cache(str(cache_dir)).close()  # the bookkeeping, as the old version left it
    host = socket.gethostname()
    t = int(time.time() * 1e6)
    lines = [["j", 1, "someone", host, 4242, time.time()],
             ["m", relpath, "a.txt", 100, ds.md5[ident], "md5sum_hexdigest"],
             ["a", relpath, ds.uri, ds.uuid, ident, "http", t - 2_000_000, 1, 100, t, 5000],
             ["a", relpath, ds.uri, ds.uuid, ident, "http", t - 1_000_000, 0, 100, t, 0],
             ["a", relpath, ds.uri, ds.uuid, ident, "http", t, 0, 100, t, 0]]
    path = os.path.join(cache_dir, META, "journal", f"{host}.4242.0badf00d.jsonl")
    with open(path, "w") as fh:
        fh.writelines(json.dumps(line) + "\n" for line in lines)
    assert dcm.num_times_accessed(ds.uri, ident, cache_dir=str(cache_dir)) == 3
    with cachefs.open_cache(str(cache_dir)) as cache, Ledger(cache) as ledger:
        row = ledger.item(relpath)
        users = ledger.users_of(relpath)
    assert (row.hits, row.misses, row.manifest_size) == (2, 1, 100)
    me = cachefs.user_name(os.geteuid())
    assert set(users) == {f"{me}@{host}"}  # the file's owner, not the header's 'someone'
    assert not os.path.exists(path)  # its process is gone: folded and removed


def test_journal_segments_are_read_in_order_across_folds(tmp_path):
    """Numbers defined in one segment and used in the next, folded by separate compactions
    (the definitions are kept in the ledger between them)."""
    cache = cachefs.open_cache(str(tmp_path))
    try:
        holds = HoldsFile(cache, dcm_identity(), "h.1.abc")  # its flock: the writer is alive
        writer = journal.JournalWriter(cache, dcm_identity(), "h.1.abc")
        number = writer.describe("ds/" + "a" * 40, "s3://b/ds", "u", "a" * 40, "s3", 5, 1.0,
                                 None)
        writer.record_access(number, 100.0, True, 0.5)
        with Ledger(cache) as ledger:
            assert ledger.compact() == 1
        writer._rotate()
        for t in (101.0, 102.0):
            writer.record_access(number, t, False, 0.0)
        with Ledger(cache) as ledger:
            assert ledger.compact() == 2  # the finished segment is deleted, the new kept
            row = ledger.item("ds/" + "a" * 40)
            assert (row.hits, row.misses, row.last_access) == (2, 1, 102.0)
        assert [n for n in os.listdir(cache.journal_fd)] == ["h.1.abc.s1.jsonl"]
        writer.close()
        holds.close()
    finally:
        cache.close()


def dcm_identity():
    from dtool_cache_manager.layout import Identity

    return Identity("tester", "h", 1)


H = journal.HOUR_US


def test_a_chunk_is_counted_per_item_and_hour_and_odd_lines_are_malformed():
    """Hits counted per number and hour (the last written kept), misses one by one, and
    every line that is not a well-formed record counted as malformed, none trusted."""
    data = b"".join([
        b'["j",2,"alice","h",1,0.0,0]\n',
        b'[0,0000000005]\n',  # before any hour mark: no time to count it at
        b'["h",100]\n',
        b'[0,0000000010]\n[1,0000000020]\n[0,0000000030]\n[007,0000000040]\n',
        b'[1,0000000050,1500]\n',  # a miss, with its fetch
        b'\n',  # an empty line: skipped, not malformed
        b'[2,3600000000]\n',  # past the hour
        b'[2,5]\n',  # not 10 digits
        b'[1234567890123456789,0000000001]\n',  # a number over 18 digits
        b'garbage\n["i",1]\n["h",-1]\n',  # no record; a definition too short; no hour
        b'["h",101]\n[0,0000000001]\n',
    ])
    records, malformed, hour = journal.parse_chunk(data, "alice", "h", None)
    sections = [r for r in records if isinstance(r, journal.HourSection)]
    assert [(s.hour, s.hits, s.misses) for s in sections] == [
        (100, {0: (2, 30), 7: (1, 40), 1: (1, 20)}, [(1, 50, 1500)]),
        (101, {0: (1, 1)}, [])]
    assert malformed == 1 + 3 + 3
    assert hour == 101  # in force for the next chunk
    assert sections[0].hit_times(7) == [40] and sections[0].count == 5
    # The next chunk goes on in that hour.
    records, malformed, hour = journal.parse_chunk(b"[3,0000000002]\n", "alice", "h", 101)
    assert (records[0].hour, records[0].hits, malformed) == (101, {3: (1, 2)}, 0)


def _sections(data, few_numbers, monkeypatch):
    monkeypatch.setattr(journal, "FEW_NUMBERS", few_numbers)
    records, malformed, hour = journal.parse_chunk(data, "alice", "h", None)
    return [(r.hour, r.hits, r.misses) for r in records], malformed, hour


ODD_LINES = [
    b"[3,%09d]\n" % 7, b"[3,%011d]\n" % 7, b"[03,0000000007]\n", b"[3,3600000000]\n",
    b"[3,4000000000]\n", b"[3,000000000d]\n", b"[3,0000000007,5]\n", b"[3,00,00000007]\n",
    b"[3,0000000007]]\n", b"[[3,0000000007]\n", b"[3,0000000007]x\n", b"\n",
    b"[3,5,0000000007]\n", b"[3,0000000007,0000000007]\n", b'["i",1]\n',
    b"[%d,0000000007]\n" % (10 ** 18), b"[99,0000000007]\n", None]


@pytest.mark.parametrize("odd", ODD_LINES)
def test_the_shortcut_for_a_few_items_counts_exactly_as_the_general_path(odd, monkeypatch):
    """A stretch of hits of a few items is counted with bytes scans (FEW_NUMBERS); one odd
    line anywhere must send it down the general path, so both always give the same result."""
    rng = random.Random(0)
    lines = [b"[%d,%010d]\n" % (rng.randrange(5), rng.randrange(H)) for _ in range(300)]
    far = lines * 20  # about 100 KB: past the first 64 KiB the candidates are sampled from
    stretches = [lines] if odd is None else [
        [odd] + lines, lines[:150] + [odd] + lines[150:], lines + [odd], far + [odd]]
    for stretch in stretches:
        body = b"".join(stretch)
        if odd is None:  # nothing odd: the shortcut must be what counts it
            assert journal._count_few_hits(body) is not None
        data = b'["h",100]\n' + body
        shortcut = _sections(data, 64, monkeypatch)
        general = _sections(data, -1, monkeypatch)
        assert shortcut == general
        assert sum(n for n, _ in shortcut[0][0][1].values()) >= 300


def test_the_writer_marks_the_hour_and_a_removal_within_it_splits_the_hits(tmp_path):
    """Hits before a removal in the same hour only add history; those after count for the
    file now cached.  A segment starts with its hour's mark; a new hour gets one."""
    cache = cachefs.open_cache(str(tmp_path))
    try:
        writer = journal.JournalWriter(cache, dcm_identity(), "h.2.abc")
        relpath = "ds/" + "b" * 40
        number = writer.describe(relpath, "s3://b/ds", "u", "b" * 40, "s3", 5, 1.0, None)
        hour = int(time.time() // 3600) - 2  # recent: removals are remembered for a while
        start = hour * 3600.0
        for t in (start + 10, start + 20, start + 30, start + 40, start + 3600 + 5):
            writer.record_access(number, t, False, 0.0)
        with open(writer.path, "rb") as fh:
            lines = fh.read().splitlines()
        assert json.loads(lines[1]) == ["i", 0, relpath, "s3://b/ds", "u", "b" * 40, "s3", 5,
                                        1000000]
        assert lines[2:] == [b'["h",%d]' % hour, b"[0,0010000000]", b"[0,0020000000]",
                             b"[0,0030000000]", b"[0,0040000000]", b'["h",%d]' % (hour + 1),
                             b"[0,0005000000]"]
        assert all(len(line) + 1 <= 32 for line in lines[-5:])
        writer.close()
        with Ledger(cache) as ledger:
            ledger.forget([relpath], removed_at=start + 25)  # between the 2nd and 3rd hit
            assert ledger.compact() == 5
            row = ledger.item(relpath)
            assert (row.hits, row.misses, row.last_access) == (3, 0, start + 3605)
            history = ledger.conn.execute(
                "SELECT hour, sum(hits) FROM usage WHERE relpath = ? GROUP BY hour",
                (relpath,)).fetchall()
            assert history == [(hour, 4), (hour + 1, 1)]  # every access is history
    finally:
        cache.close()


def test_chunks_hold_complete_lines_and_skip_a_line_longer_than_a_chunk(tmp_path):
    one, two = b"[1,0000000001]\n", b"[2,0000000002]\n"
    data = one * 3 + b"x" * 50 + b"\n" + two + b"[3,00"  # the last line is being written
    path = tmp_path / "segment"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = list(cachefs.iter_chunks(fd, 0, len(data), 32))
    finally:
        os.close(fd)
    assert chunks == [(one * 2, 30), (one, 45), (None, 96), (two, 111)]
