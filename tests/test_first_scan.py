"""The first command on a cache filled before the plugin: its scan indexes every file exactly,
goes on where an interrupted one stopped, and shows its progress on a terminal only.

The first scan lists directories in a worker thread and hands SQLite each directory's files
as one JSON array of fixed-width strings (see ``diskindex._list_dir``); the odd ones
(partial downloads, names that are not UTF-8, times before 1970) take another path.  Both
must store what ``lstat`` says, bit for bit, and agree with a later rescan.
"""

import hashlib
import os
import pty
import select
import signal
import subprocess
import sys
import time

from dtool_cache_manager import cachefs

from dtool_cache_manager.store import diskindex
from dtool_cache_manager.store.ledger import Ledger
from support import VENV_BIN, disk_files

def _ident(n):
    return hashlib.sha1(str(n).encode()).hexdigest()


def build_odd_cache(cache):
    """Dataset directories with what a real cache may hold besides plain files."""
    plain = os.path.join(cache, "http", "aaaa-uuid")
    os.makedirs(os.path.join(plain, "nested", "deeper"))
    for i in range(60):
        with open(os.path.join(plain, _ident(i) + ".dat"), "wb") as fh:
            fh.write(b"p" * (i * 13 + 1))
    with open(os.path.join(plain, "nested", "deeper", _ident(99) + ".csv"), "wb") as fh:
        fh.write(b"n" * 5)
    with open(os.path.join(plain, _ident(61) + ".dat.tmp"), "wb") as fh:
        fh.write(b"t" * 77)  # a partial download
    old = os.path.join(plain, _ident(62) + ".dat")
    with open(old, "wb") as fh:
        fh.write(b"o" * 3)
    os.utime(old, ns=(-86_400_000_000_123, -5_000_000_007))  # before 1970
    future = os.path.join(plain, _ident(63) + ".dat")
    with open(future, "wb") as fh:
        fh.write(b"f" * 4)
    os.utime(future, ns=(13_000_000_000_123_456_789, 13_000_000_000_000_000_001))  # 2381
    for name in ('quote"back\\slash\nnewline.dat', "caf\u00e9 \U0001f600.dat", "\x01ctl.dat"):
        with open(os.path.join(plain, name), "wb") as fh:
            fh.write(name.encode("utf-8"))
    odd_dir = os.path.join(os.fsencode(cache), b"http", b"odd \xfe dir")
    os.makedirs(odd_dir)
    for name in (b"\xff\xfe.dat", b"plain.dat"):
        with open(os.path.join(odd_dir, name), "wb") as fh:
            fh.write(b"x" * len(name))
    with open(os.path.join(os.fsencode(plain), b"not \xe9 utf8.dat"), "wb") as fh:
        fh.write(b"u" * 9)
    os.symlink("/etc/passwd", os.path.join(plain, _ident(64) + ".dat"))
    os.mkfifo(os.path.join(plain, _ident(65) + ".dat"))
    past = time.time() - 60
    for root, dirs, _ in os.walk(cache):
        os.utime(root, (past, past))


def indexed_rows(cache):
    """relpath -> (inode, size, mtime, atime, kind) of every row, as stored."""
    with cachefs.open_cache(cache) as handle, Ledger(handle) as ledger:
        return {diskindex.from_db(r[0]): tuple(r[1:]) for r in ledger.conn.execute(
            "SELECT relpath, ino, size_bytes, mtime, atime, kind FROM files")}


def lstat_rows(cache):
    found = {}
    for relpath in disk_files(cache):
        st = os.lstat(os.path.join(cache, relpath))
        kind = diskindex.PARTIAL if relpath.endswith(".tmp") else diskindex.UNTRACKED
        found[relpath] = (st.st_ino, st.st_size, st.st_mtime, st.st_atime, kind)
    return found


def refresh(cache, full=False, progress=None):
    with cachefs.open_cache(cache, create=True) as handle, Ledger(handle) as ledger:
        return diskindex.refresh(ledger.conn, handle, full=full, progress=progress)


def test_the_first_scan_stores_what_lstat_says_and_a_rescan_agrees(tmp_path):
    cache = str(tmp_path / "cache")
    build_odd_cache(cache)
    expected = lstat_rows(cache)
    assert len(expected) == 70
    first = refresh(cache)
    assert (first.rescanned_dirs, first.stat_calls) == (6, 70)  # 6: the root, http, two
    # datasets, nested, deeper; 70: every file (the link and the fifo are told by readdir)
    rows = indexed_rows(cache)
    assert rows == expected  # times compared bit for bit
    with cachefs.open_cache(cache) as handle, Ledger(handle) as ledger:
        files = {f.relpath: f for f in diskindex.all_files(ledger.conn)}
        totals = diskindex.dir_totals(ledger.conn)
        skipped = {s[0] for d in totals for s in d.skipped}
        assert ledger.conn.execute(
            "SELECT count(*) FROM meta WHERE key = ?", (diskindex.BUILDING,)).fetchone()[0] == 0
    assert files["http/aaaa-uuid/" + _ident(5) + ".dat"].identifier == _ident(5)
    assert files["http/aaaa-uuid/caf\u00e9 \U0001f600.dat"].identifier is None
    assert sum(d.num_files for d in totals) == len(expected) - 1  # less the partial
    assert sum(d.file_bytes + d.partial_bytes for d in totals) == sum(
        v[1] for v in expected.values())
    assert skipped == {"http/aaaa-uuid/" + _ident(64) + ".dat",
                       "http/aaaa-uuid/" + _ident(65) + ".dat"}

    again = refresh(cache, full=True)  # every directory listed again, in this thread
    assert (again.rescanned_dirs, again.stat_calls) == (6, 70)
    assert indexed_rows(cache) == expected


SCAN_AND_STOP = """
import sys, time
from dtool_cache_manager import cachefs
from dtool_cache_manager.store import diskindex
from dtool_cache_manager.store.ledger import Ledger
diskindex.COMMIT_FILES = 500  # commit often: a small cache, interrupted after commits


def progress(files):
    if files >= 2000:
        print("indexed", files, flush=True)
        time.sleep(600)  # to be killed here


with cachefs.open_cache(sys.argv[1], create=True) as handle, Ledger(handle) as ledger:
    diskindex.refresh(ledger.conn, handle, progress=progress)
"""


def test_an_interrupted_first_scan_goes_on_where_it_stopped(tmp_path):
    cache = str(tmp_path / "cache")
    for d in range(20):
        folder = os.path.join(cache, "http", f"dataset-{d:02d}")
        os.makedirs(folder)
        for i in range(250):
            with open(os.path.join(folder, _ident(d * 1000 + i) + ".dat"), "wb") as fh:
                fh.write(b"d" * (i + 1))
    child = subprocess.Popen([sys.executable, "-c", SCAN_AND_STOP, cache],
                             stdout=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()  # awaited: printed once 2,000 files are indexed
        assert line.startswith("indexed"), line
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=60) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
        child.stdout.close()
    committed = len(indexed_rows(cache))
    assert 1500 <= committed < 5000, committed  # what was committed stayed committed

    seen = []
    resumed = refresh(cache, progress=seen.append)
    assert seen[-1] == 5000 - committed, "only the directories not yet scanned"
    assert resumed.rescanned_dirs == (5000 - committed) // 250
    assert indexed_rows(cache) == lstat_rows(cache)
    with cachefs.open_cache(cache) as handle, Ledger(handle) as ledger:
        indexes = {r[0] for r in ledger.conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'files'")}
        assert "files_by_last_use" in indexes
        assert ledger.conn.execute("SELECT count(*) FROM meta WHERE key = ?",
                                   (diskindex.BUILDING,)).fetchone()[0] == 0


SUMMARY_ON_A_TERMINAL = """
import sys
from dtool_cache_manager import cli
cli._IndexingProgress.DELAY = cli._IndexingProgress.EVERY = 0.0  # show every update
cli.cache(["summary", "--cache-dir", sys.argv[1]], prog_name="dtool-cache")
"""


def _run_on_a_terminal(code, cache):
    """Run ``code`` with its stderr on a pseudo-terminal; (stdout, what the terminal got)."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-c", code, cache], stdout=subprocess.PIPE,
                                stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        slave = None
        shown = b""
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            assert ready, "the command went quiet"
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the command closed its end
                break
            if not chunk:
                break
            shown += chunk
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, shown
        return out.decode(), shown.decode()
    finally:
        os.close(master)
        if slave is not None:
            os.close(slave)


def test_the_first_scan_shows_its_progress_on_a_terminal_only(tmp_path):
    cache = str(tmp_path / "cache")
    for d in range(3):
        folder = os.path.join(cache, f"dataset-{d}")
        os.makedirs(folder)
        for i in range(40):
            with open(os.path.join(folder, _ident(d * 100 + i) + ".dat"), "wb") as fh:
                fh.write(b"x")
    out, shown = _run_on_a_terminal(SUMMARY_ON_A_TERMINAL, cache)
    assert "120 items in 3 datasets" in out, out
    assert "Indexing the cache: 120 files\u2026" in shown, shown
    assert shown.endswith("\r"), "the line is cleared when done"
    assert "Indexing" not in out, "never on standard output"

    # A later command has nothing to index; piped, nothing is shown either.
    _, shown = _run_on_a_terminal(SUMMARY_ON_A_TERMINAL, cache)
    assert "Indexing" not in shown
    proc = subprocess.run([os.path.join(VENV_BIN, "dtool-cache"), "summary", "--cache-dir",
                           str(tmp_path / "cache")], capture_output=True, text=True)
    assert proc.returncode == 0 and "Indexing" not in proc.stderr + proc.stdout
