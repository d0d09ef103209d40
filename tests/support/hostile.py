"""Support for the randomized hostile-member test (``tests/test_hostile_random.py``).

* :data:`AGENT` is the code of bob's long-lived helper process: it runs as bob, reads JSON
  commands on stdin and answers each with one JSON line on stdout.  It replaces entries of a
  shared cache with hostile things, and races replacements against a running command
  (``renameat2(RENAME_EXCHANGE)`` in a loop, or on inotify events), until told to stop.
* :class:`Sentinel` is a root-owned tree outside the cache (named like cache entries) plus a
  root-only secret; :func:`snapshot` records it so that any change, or any read (atime; our own
  reads use ``O_NOATIME``), shows.
* :func:`files_containing` looks for the secret in files, never following symlinks nor
  opening FIFOs.
* :func:`run_command` runs a command with a timeout, resource limits, and a Python stack
  dump (faulthandler) when it hangs.
* :data:`VICTIM_ACCESS` is a user's script that accesses items and reports, per item, where
  an exception came from (the plugin or upstream).
"""

import hashlib
import json
import os
import resource
import select
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

META = ".dtool-cache-manager"
SPARSE_BYTES = 40 << 30
READ_BOUND = 8 << 20  # the secret is looked for in the first and last 8 MiB of a file
NOATIME = getattr(os, "O_NOATIME", 0)

# -- bob's helper process --------------------------------------------------------------

AGENT = r'''
import ctypes, errno, fcntl, json, os, platform, select, shutil, stat, struct, sys
import threading, traceback

libc = ctypes.CDLL(None, use_errno=True)
SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}.get(platform.machine())
AT_FDCWD, RENAME_EXCHANGE = -100, 2
IN_ACCESS, IN_OPEN = 0x1, 0x20
IN_NONBLOCK, IN_CLOEXEC = 0o4000, 0o2000000
REFUSED = {errno.EPERM, errno.EACCES, errno.EEXIST, errno.EROFS, errno.ENOTEMPTY,
           errno.EBUSY, errno.EXDEV}
MAX_FLOCKED = 64

libc.inotify_init1.argtypes = [ctypes.c_int]
libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


def exchange(a, b):
    """renameat2(a, b, RENAME_EXCHANGE): swap two names atomically."""
    if SYS_RENAMEAT2 is None:
        raise OSError(errno.ENOSYS, "no renameat2 number for " + platform.machine())
    r = libc.syscall(ctypes.c_long(SYS_RENAMEAT2), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(a),
                     ctypes.c_int(AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(RENAME_EXCHANGE))
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def classify(exc):
    return "refused" if exc.errno in REFUSED else "failed"


def outcome(result, step, exc):
    return {"result": result, "step": step,
            "error": "%s: %s" % (errno.errorcode.get(exc.errno, exc.errno), exc.strerror)}


flocked = []  # descriptors we keep flock'ed: files that look like a live process's
sparse = []  # huge sparse files we made, removed at "cleanup"


def keep_flocked(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    flocked.append(fd)
    while len(flocked) > MAX_FLOCKED:
        os.close(flocked.pop(0))
    return True


def write_new(path, data, mode=0o664):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def create(path, req):
    kind = req["kind"]
    if kind.startswith("link_"):
        os.symlink(req["target"], path)
    elif kind == "fifo":
        os.mkfifo(path, 0o666)
    elif kind == "dir_empty":
        os.mkdir(path, req["mode"])
    elif kind == "dir_files":
        os.mkdir(path, req["mode"])
        for name, data in req["files"]:
            write_new(os.path.join(path, name), data.encode("latin-1"))
    elif kind == "hardlink":
        os.link(req["scratch"], path)
    elif kind == "sparse":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o664)
        try:
            os.ftruncate(fd, req["size"])
        finally:
            os.close(fd)
        sparse.append(path)
    else:  # garbage, json_wrong, forged: a regular file with these bytes
        write_new(path, req["data"].encode("latin-1"))


def replace(req):
    path = req["path"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        return outcome("failed", "lstat", exc)
    if st is not None:
        try:
            if req["how"] == "aside":
                os.rename(path, os.path.join(os.path.dirname(path), req["aside"]))
            elif stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except OSError as exc:
            return outcome(classify(exc), "move aside" if req["how"] == "aside" else "remove",
                           exc)
    try:
        create(path, req)
    except OSError as exc:
        return outcome(classify(exc), "create", exc)
    result = {"result": "done", "moved": st is not None}
    if req.get("flock") and req["kind"] in ("garbage", "json_wrong", "forged", "hardlink",
                                             "sparse"):
        result["flocked"] = keep_flocked(path)
    return result


class Race:
    """Swaps names until told to stop, then puts every swapped pair back."""

    def __init__(self, req):
        self.req = req
        self.stop_r, self.stop_w = os.pipe()
        self.pairs = {}  # (a, b) -> number of successful exchanges
        self.errors = {}
        self.events = 0
        self.thread = None

    def _swap(self, a, b):
        try:
            exchange(a, b)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno, str(exc.errno))
            self.errors[name] = self.errors.get(name, 0) + 1
            return False
        self.pairs[(a, b)] = self.pairs.get((a, b), 0) + 1
        return True

    # -- exchange: a real entry and a symlink to the sentinel, back and forth -------------

    def start_exchange(self):
        real, link = self.req["real"].encode(), self.req["link"].encode()
        try:
            os.symlink(self.req["target"], link)
        except OSError as exc:
            return outcome(classify(exc), "make link", exc)
        try:
            exchange(real, link)
        except OSError as exc:
            try:
                os.unlink(link)
            except OSError:
                pass
            return outcome(classify(exc), "first exchange", exc)
        self.pairs[(real, link)] = 1
        self.thread = threading.Thread(target=self._exchange_loop, args=(real, link),
                                       daemon=True)
        self.thread.start()
        return {"result": "started"}

    def _exchange_loop(self, real, link):
        fn = libc.syscall
        args = (ctypes.c_long(SYS_RENAMEAT2), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(real),
                ctypes.c_int(AT_FDCWD), ctypes.c_char_p(link), ctypes.c_uint(RENAME_EXCHANGE))
        count, failures = 1, 0
        while True:
            r, _, _ = select.select([self.stop_r], [], [], 0)
            if r:
                break
            for _ in range(64):
                if fn(*args) == 0:
                    count += 1
                else:
                    failures += 1
            if failures > 10000:
                break  # one of the names is gone for good
        self.pairs[(real, link)] = count
        if failures:
            self.errors["exchange-failed"] = failures

    # -- inotify: swap an entry with a symlink as soon as someone opens it --------------

    def start_inotify(self):
        watched = self.req["dir"].encode()
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            return outcome("failed", "inotify_init1", OSError(e, os.strerror(e)))
        if libc.inotify_add_watch(fd, watched, IN_OPEN | IN_ACCESS) < 0:
            e = ctypes.get_errno()
            os.close(fd)
            exc = OSError(e, os.strerror(e))
            return outcome(classify(exc), "inotify_add_watch", exc)
        self.thread = threading.Thread(target=self._inotify_loop, args=(fd, watched),
                                       daemon=True)
        self.thread.start()
        return {"result": "started"}

    def _target_for(self, name):
        names = self.req["names"]
        if name in names:
            return names[name]
        candidate = os.path.join(self.req["entry_dir"], name)
        return candidate if os.path.lexists(candidate) else self.req["fallback"]

    def _inotify_loop(self, fd, watched):
        links = {}  # entry -> its symlink's name
        parent = os.path.dirname(watched)
        try:
            while True:
                r, _, _ = select.select([fd, self.stop_r], [], [])
                if self.stop_r in r:
                    break
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                names, off = [], 0
                while off + 16 <= len(data):
                    _, mask, _, length = struct.unpack_from("iIII", data, off)
                    name = data[off + 16:off + 16 + length].rstrip(b"\0")
                    off += 16 + length
                    self.events += 1
                    if name.startswith(b".x-") or name in names:
                        continue
                    names.append(name)
                for name in names:
                    if name:
                        entry = os.path.join(watched, name)
                        target = self._target_for(name.decode("utf-8", "surrogateescape"))
                    else:
                        entry = watched
                        target = self.req["dir_target"]
                    link = links.get(entry)
                    if link is None:
                        link = os.path.join(os.path.dirname(entry),
                                            b".x-" + os.urandom(4).hex().encode())
                        try:
                            os.symlink(target, link)
                        except OSError as exc:
                            key = "link " + errno.errorcode.get(exc.errno, str(exc.errno))
                            self.errors[key] = self.errors.get(key, 0) + 1
                            continue
                        links[entry] = link
                    self._swap(entry, link)
        finally:
            os.close(fd)

    # -- stop and put things back ---------------------------------------------------------

    def stop(self):
        os.write(self.stop_w, b"x")
        if self.thread is not None:
            self.thread.join()
        unrestored = []
        swaps = 0
        for (a, b), count in self.pairs.items():
            swaps += count
            if count % 2 == 0:
                continue
            try:
                exchange(a, b)  # the real entry is under b's name: swap it back
                continue
            except OSError:
                pass
            # One name is gone: if the real entry is still at b and a is free, rename it back.
            try:
                if not os.path.lexists(a):
                    os.rename(b, a)
                    continue
            except OSError:
                pass
            unrestored.append(os.fsdecode(a))
        os.close(self.stop_r)
        os.close(self.stop_w)
        return {"result": "stopped", "swaps": swaps, "events": self.events,
                "errors": self.errors, "unrestored": unrestored}


race = None


def handle(req):
    global race
    op = req["op"]
    if op == "replace":
        return replace(req)
    if op == "race":
        if race is not None:
            return {"result": "error", "error": "a race is running"}
        race = Race(req)
        answer = race.start_exchange() if req["mode"] == "exchange" else race.start_inotify()
        if answer["result"] != "started":
            os.close(race.stop_r)
            os.close(race.stop_w)
            race = None
        return answer
    if op == "stop":
        if race is None:
            return {"result": "stopped", "swaps": 0, "events": 0, "errors": {},
                    "unrestored": []}
        answer, race = race.stop(), None
        return answer
    if op == "cleanup":
        removed = 0
        for path in list(sparse):
            try:
                st = os.lstat(path)
                if st.st_uid == os.geteuid() and stat.S_ISREG(st.st_mode) and \
                        st.st_size >= 1 << 30:
                    os.unlink(path)
                    removed += 1
            except OSError:
                pass
        sparse.clear()
        while flocked:
            os.close(flocked.pop())
        return {"result": "cleaned", "removed": removed}
    if op == "ping":
        return {"result": "pong", "uid": os.geteuid()}
    return {"result": "error", "error": "unknown op %r" % op}


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "quit":
        break
    try:
        answer = handle(req)
    except Exception:
        answer = {"result": "error", "error": traceback.format_exc()}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
'''


class Agent:
    """bob's helper: one process for the whole test, driven over a pipe."""

    def __init__(self, user, env, stderr_path: str):
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", AGENT], env=user.env(env), cwd=user.home,
            preexec_fn=user.preexec(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._stderr)
        self._buffer = b""
        self.stderr_path = stderr_path
        answer = self.request({"op": "ping"})
        assert answer.get("uid") == user.uid, answer

    def request(self, req: dict, timeout: float = 60.0) -> dict:
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        line = self._readline(timeout)
        answer = json.loads(line)
        if answer.get("result") == "error":
            raise AssertionError(f"bob's agent failed on {req.get('op')}: {answer['error']}")
        return answer

    def _readline(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise AssertionError(f"bob's agent did not answer within {timeout} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                with open(self.stderr_path, "rb") as fh:
                    err = fh.read()[-4000:].decode(errors="replace")
                raise AssertionError(f"bob's agent died: {err}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


# -- the sentinel tree outside the cache ------------------------------------------------


@dataclass
class Entry:
    kind: str  # file, dir, link, other
    mode: int
    uid: int
    gid: int
    size: int
    ino: int
    nlink: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    digest: Optional[str]  # sha256 of a file's content; a link's target


def _open_noatime(path, flags):
    """Open without touching the access time, so that our own reads do not look like the
    plugin's; falls back to a plain open where O_NOATIME is refused."""
    try:
        return os.open(path, flags | NOATIME)
    except PermissionError:
        return os.open(path, flags)


def _digest(path) -> str:
    fd = _open_noatime(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        h = hashlib.sha256()
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    finally:
        os.close(fd)


def list_dir(path) -> List[bytes]:
    """Names in directory ``path`` (bytes), read without updating its access time; the last
    component is not followed if it is a symlink."""
    fd = _open_noatime(os.fsencode(path),
                       os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return sorted(os.fsencode(n) for n in os.listdir(fd))
    finally:
        os.close(fd)


def walk(top) -> Dict[bytes, os.stat_result]:
    """Every entry under ``top`` -> its lstat; symlinks never followed, dirs read O_NOATIME."""
    top = os.fsencode(top)
    found = {}
    stack = [b""]
    while stack:
        rel = stack.pop()
        try:
            names = list_dir(os.path.join(top, rel) if rel else top)
        except OSError:
            continue
        for name in names:
            sub = os.path.join(rel, name) if rel else name
            try:
                st = os.lstat(os.path.join(top, sub))
            except OSError:
                continue
            found[sub] = st
            if stat.S_ISDIR(st.st_mode):
                stack.append(sub)
    return found


def snapshot(top) -> Dict[bytes, Entry]:
    """What ``top`` holds, in enough detail that any write, chmod, chown, link, unlink, or
    read (atime: the tree is back-dated, so relatime updates it on any read) shows."""
    top_b = os.fsencode(top)
    result = {}
    entries = dict(walk(top_b))
    entries[b"."] = os.lstat(top_b)
    for rel, st in entries.items():
        path = top_b if rel == b"." else os.path.join(top_b, rel)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            kind, digest = "file", _digest(path)
        elif stat.S_ISDIR(mode):
            kind, digest = "dir", None
        elif stat.S_ISLNK(mode):
            kind, digest = "link", os.fsdecode(os.readlink(path))
        else:
            kind, digest = "other", None
        result[rel] = Entry(kind, stat.S_IMODE(mode), st.st_uid, st.st_gid, st.st_size,
                            st.st_ino, st.st_nlink, st.st_mtime_ns, st.st_ctime_ns,
                            st.st_atime_ns, digest)
    return result


def compare_snapshots(before: Dict[bytes, Entry], after: Dict[bytes, Entry]) -> List[str]:
    """Human-readable differences (empty if none)."""
    problems = []
    for rel in sorted(set(before) - set(after)):
        problems.append(f"{os.fsdecode(rel)}: removed (was {before[rel].kind})")
    for rel in sorted(set(after) - set(before)):
        problems.append(f"{os.fsdecode(rel)}: created ({after[rel].kind}, uid "
                        f"{after[rel].uid}, mode {after[rel].mode:o})")
    for rel in sorted(set(before) & set(after)):
        old, new = before[rel], after[rel]
        if old == new:
            continue
        changed = []
        for field in ("kind", "mode", "uid", "gid", "ino", "nlink", "size", "digest",
                      "mtime_ns", "ctime_ns", "atime_ns"):
            a, b = getattr(old, field), getattr(new, field)
            if a != b:
                if field == "mode":
                    a, b = f"{a:o}", f"{b:o}"
                label = {"atime_ns": "atime (read or listed)", "digest": "content",
                         "ctime_ns": "ctime (metadata changed)",
                         "mtime_ns": "mtime (written)"}.get(field, field)
                changed.append(f"{label} {a} -> {b}")
        problems.append(f"{os.fsdecode(rel)}: " + "; ".join(changed))
    return problems


@dataclass
class Sentinel:
    """``outside``: root's tree next to the cache, its files named like cache entries."""

    top: str
    secret_path: str
    token: bytes
    dirs: Dict[str, str]  # role -> path: root, meta, holds, journal, ds, void


def build_sentinel(top: str, token: bytes, host: str, items: List[dict],
                   age_seconds: float = 60 * 86400.0) -> Sentinel:
    """Create the sentinel tree at ``top`` (root-owned, dirs 0755, files 0644, the secret
    0600), every time stamp back-dated by ``age_seconds``.

    ``items`` describe real cached items ({relpath, name, uri, uuid, identifier, size}), so
    that the files here look like them: a symlink into this tree makes them look cached.
    """
    dirs = {"root": top, "meta": os.path.join(top, "meta"),
            "holds": os.path.join(top, "meta", "holds"),
            "journal": os.path.join(top, "meta", "journal"), "ds": os.path.join(top, "ds"),
            "void": os.path.join(top, "void")}
    for path in dirs.values():
        os.makedirs(path, exist_ok=True)
    now = time.time()
    old = now - age_seconds

    def put(path, data, mode=0o644):
        with open(path, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)

    secret_path = os.path.join(top, "secret.txt")
    put(secret_path, token + b"\n", 0o600)
    put(os.path.join(top, "notes.txt"), b"root's notes, outside the cache\n")
    meta = dirs["meta"]
    for name in ("gate.lock", "fetch.lock", "autoclean.lock"):
        put(os.path.join(meta, name), b"")
    put(os.path.join(meta, "autoclean.log"), b'{"sentinel": "autoclean.log"}\n')
    put(os.path.join(meta, "autoclean.json"), b'{"sentinel": "autoclean.json"}\n')
    ledger = os.path.join(meta, "ledger.sqlite3")
    con = sqlite3.connect(ledger)
    con.execute("CREATE TABLE sentinel (relpath TEXT PRIMARY KEY, note TEXT)")
    con.executemany("INSERT INTO sentinel VALUES (?, ?)",
                    [(i["relpath"], "outside") for i in items])
    con.commit()
    con.close()
    os.chmod(ledger, 0o644)
    token_name = f"{host}.1.deadbeef"
    holds = [json.dumps(["h", 1, "alice", host, 1, old])]
    journal = [json.dumps(["j", 1, "alice", host, 1, old])]
    for i in items:
        holds.append(json.dumps(["+", i["uri"], i["uuid"], i["identifier"], i["relpath"]]))
        journal.append(json.dumps(["a", i["relpath"], i["uri"], i["uuid"], i["identifier"],
                                   "http", int(old * 1e6), 1, i["size"], int(old * 1e6), 1000]))
    put(os.path.join(dirs["holds"], token_name), ("\n".join(holds) + "\n").encode())
    put(os.path.join(dirs["holds"], f"{host}.2.cafebabe.new"), holds[0].encode() + b"\n")
    put(os.path.join(dirs["journal"], token_name + ".jsonl"),
        ("\n".join(journal) + "\n").encode())
    put(os.path.join(dirs["journal"], "x.jsonl"), journal[0].encode() + b"\n")
    for i in items:  # files named like the real cached items, of the same size
        put(os.path.join(dirs["ds"], i["name"]), b"s" * i["size"])
    put(os.path.join(dirs["ds"], "f" * 40 + ".txt"), b"outside, named like an item\n")
    put(os.path.join(dirs["ds"], "e" * 40 + ".txt.tmp"), b"outside, named like a partial\n")
    put(os.path.join(dirs["ds"], "ledger.sqlite3"), b"not a database\n")
    # Back-date everything, deepest first (setting a file's times leaves its dir's alone).
    for rel in sorted(walk(top), key=lambda p: -p.count(b"/")):
        os.utime(os.path.join(os.fsencode(top), rel), (old, old), follow_symlinks=False)
    for path in sorted(dirs.values(), key=lambda p: -p.count("/")):
        os.chmod(path, 0o755)
        os.utime(path, (old, old))
    return Sentinel(top, secret_path, token, dirs)


# -- where the secret may have leaked ---------------------------------------------------


def files_containing(tops, needle: bytes, skip_uid: Optional[int] = None,
                     skip_over: int = 1 << 20, exclude=()) -> List[str]:
    """Regular files under ``tops`` whose first or last ``READ_BOUND`` bytes hold ``needle``.

    Symlinks are never followed and only regular files are read (opened with O_NOFOLLOW and
    O_NONBLOCK, then checked with fstat, so a FIFO swapped in cannot block us).  Files of
    ``skip_uid`` larger than ``skip_over`` (the member's own sparse junk) are skipped.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    found = []
    for top in tops:
        top_b = os.fsencode(top)
        for rel, st in walk(top_b).items():
            if not stat.S_ISREG(st.st_mode):
                continue
            path = os.path.join(top_b, rel)
            if os.fsdecode(path) in excluded:
                continue
            if st.st_uid == skip_uid and st.st_size > skip_over:
                continue
            try:
                fd = _open_noatime(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                   | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fst = os.fstat(fd)
                if not stat.S_ISREG(fst.st_mode):
                    continue
                if fst.st_uid == skip_uid and fst.st_size > skip_over:
                    continue
                data = os.pread(fd, READ_BOUND * 2, 0) if fst.st_size <= READ_BOUND * 2 else \
                    os.pread(fd, READ_BOUND, 0) + os.pread(fd, READ_BOUND,
                                                           fst.st_size - READ_BOUND)
            finally:
                os.close(fd)
            if needle in data:
                found.append(os.fsdecode(path))
    return found


# -- running commands -------------------------------------------------------------------

MEMORY_LIMIT = 4 << 30  # address space: a command reading a 40 GiB file fails, not the host
FILE_LIMIT = 256 << 20  # largest file a command may write: a copied sparse file stops here


def limits_preexec(user=None):
    """preexec_fn: become ``user`` (if given), then cap memory and file size."""
    switch = user.preexec() if user is not None else None

    def preexec():
        if switch is not None:
            switch()
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
    return preexec


@dataclass
class Ran:
    argv: list
    returncode: Optional[int]
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


def run_command(argv, env, timeout: float, user=None, cwd=None) -> Ran:
    """Run ``argv`` (as ``user``, or as ourselves) under :func:`limits_preexec`.  On timeout
    the child gets SIGABRT first: with PYTHONFAULTHANDLER set it prints every thread's
    stack, which says where it hung; then it is killed."""
    if user is not None:
        env = user.env(env)
        cwd = cwd or user.home
    start = time.monotonic()
    proc = subprocess.Popen([str(a) for a in argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=limits_preexec(user), start_new_session=True)
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.kill(proc.pid, signal.SIGABRT)
            out, err = proc.communicate(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            out, err = proc.communicate()
    seconds = time.monotonic() - start
    return Ran(list(argv), proc.returncode, out.decode("utf-8", "replace"),
               err.decode("utf-8", "replace"), seconds, timed_out)


def tail(text: str, lines: int = 12) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# -- the victim's data accesses --------------------------------------------------------

# A user's script: access each (uri, identifier) in turn; report each outcome as a JSON line,
# with the files of the traceback's frames when the access raised.  faulthandler dumps every
# thread's stack and exits if the whole run (exit hooks included) takes too long.
VICTIM_ACCESS = r'''
import faulthandler, json, sys, traceback
faulthandler.dump_traceback_later(float(sys.argv[1]), exit=True)
import dtoolcore
datasets = {}
status = 0
for uri, identifier in json.loads(sys.argv[2]):
    try:
        ds = datasets.get(uri)
        if ds is None:
            ds = datasets[uri] = dtoolcore.DataSet.from_uri(uri)
        path = ds.item_content_abspath(identifier)
        print(json.dumps({"ok": True, "identifier": identifier, "path": path}), flush=True)
    except Exception as exc:
        frames = [f.filename for f in traceback.extract_tb(exc.__traceback__)]
        print(json.dumps({"ok": False, "identifier": identifier, "error": repr(exc)[:500],
                          "type": type(exc).__module__ + "." + type(exc).__qualname__,
                          "frames": frames}), flush=True)
        status = 3
sys.exit(status)
'''


def _is_plugin_file(filename: str) -> bool:
    return "dtool_cache_manager" in filename


def _is_library_file(filename: str) -> bool:
    return "site-packages" in filename or _is_plugin_file(filename)


def raised_by_plugin(frames: List[str]) -> bool:
    """Did the exception come from the plugin?  The innermost frame in third-party or plugin
    code decides: the plugin wraps every access, so its frames are in every broker error's
    traceback too, but outside the broker's."""
    for filename in reversed(frames):
        if _is_library_file(filename):
            return _is_plugin_file(filename)
    return False


def plugin_error_type(type_name: str) -> bool:
    """Is this an exception class of the plugin's own (a deliberate, documented refusal such
    as "this item is incomplete"), rather than a builtin one escaping from its code?"""
    return type_name.startswith("dtool_cache_manager.")


def hung_in_plugin(dump: str) -> bool:
    """Same question for a faulthandler dump (most recent call first), any thread."""
    for block in dump.split("\n\n"):
        for line in block.splitlines():
            line = line.strip()
            if line.startswith("File "):
                filename = line.split('"')[1] if '"' in line else line
                if _is_library_file(filename):
                    if _is_plugin_file(filename):
                        return True
                    break
    return False


# -- what bob writes ----------------------------------------------------------------------

# Well-formed JSON of the wrong shape, one per line: every parser of ours must skip them.
JSON_WRONG = [
    '{}', '[1]', '["h"]', '["+", 5]', '[]', 'null', '"text"', '1e999', 'true', 'NaN',
    '["j", 1]', '["j", 1, 5, null, "pid", "t"]', '["m", 5]', '["m", "x", 1, "size", 2, 3]',
    '["x", "many"]', '["x", -1e308]', '["-"]', '["+", "u", "v", 7, null]',
    '["+", {"a": 1}, [], null, 5]', '["h", 1, "bob", "host", "pid", []]',
    '["a", 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]',
    '["a", "x", "u", "uu", "i", "http", "t", 1, 1, 1, 1]',
    '["a", "ds/x.txt", "u", "uu", "i", "http", 1e400, 1, -5, 0, 0]',
    '["a", "ds/x.txt", "u", "uu", "i", "http", Infinity, 1, 1e300, NaN, -Infinity]',
    '{"start": "yesterday"}', '{"start": NaN, "end": Infinity, "warnings": 5}',
    '{"version": 1, "warnings": [1, 2]}',
    '[' * 50000 + ']' * 50000,  # deeper than the interpreter's recursion limit
    '{"a": ' * 20000 + '1' + '}' * 20000,
]


def latin1(data: bytes) -> str:
    """Bytes through JSON to the agent (which encodes them back with latin-1)."""
    return data.decode("latin-1")


def garbage(rng) -> bytes:
    size = rng.choice([1, 17, 512, 4096, 65536])
    data = bytearray(rng.getrandbits(8) for _ in range(min(size, 4096)))
    if size > len(data):
        data = data * (size // len(data))
    if rng.random() < 0.5:
        data[rng.randrange(len(data))] = 10  # a newline somewhere: a line to parse
    return bytes(data)


def json_wrong(rng, header: Optional[list] = None) -> bytes:
    lines = [json.dumps(header)] if header is not None else []
    lines += rng.sample(JSON_WRONG, rng.randint(1, 3))
    return ("\n".join(lines) + "\n").encode()


@dataclass
class ForgeryContext:
    """What bob knows: the items (relpath, uri, uuid, identifier, size), the host, names
    outside the cache and of others' bookkeeping."""

    host: str
    cache: str
    items: List[dict]
    outside_files: List[str]  # absolute paths of sentinel files
    bookkeeping: List[str]  # cache-relative names of our bookkeeping files


def forged_relpaths(rng, ctx: ForgeryContext) -> List[str]:
    """Paths a forged record names: real items, and paths out of the cache or into our
    bookkeeping, spelt relative, with '..', and absolute."""
    outside = rng.choice(ctx.outside_files)
    rel_out = os.path.relpath(outside, ctx.cache)
    item = rng.choice(ctx.items)
    options = [item["relpath"], rel_out, outside,
               os.path.join(item["relpath"].split("/")[0], "..", rel_out),
               rng.choice(ctx.bookkeeping), os.path.join(".", rel_out),
               os.path.dirname(rel_out)]
    return rng.sample(options, rng.randint(1, 4))


def _size_of(ctx, relpath):
    path = relpath if os.path.isabs(relpath) else os.path.join(ctx.cache, relpath)
    try:
        return os.lstat(path).st_size
    except OSError:
        return 100


def forged(rng, role: str, ctx: ForgeryContext) -> bytes:
    """Valid-looking records forging another user, naming paths from
    :func:`forged_relpaths`, in the format ``role`` expects."""
    now = time.time()
    user = rng.choice(["alice", "carol", "root"])
    pid = rng.randint(2, 4_000_000)
    when = rng.choice([now - 90 * 86400, now - 7200, now + 30 * 86400])
    relpaths = forged_relpaths(rng, ctx)
    item = rng.choice(ctx.items)
    if role == "holds":
        lines = [["h", 1, user, ctx.host, pid, when]]
        lines += [["+", item["uri"], item["uuid"], item["identifier"], r] for r in relpaths]
        if rng.random() < 0.3:  # a release of an item someone else holds
            lines.append(["-", item["uri"], item["uuid"], item["identifier"], item["relpath"]])
    elif role == "autoclean":
        record = {"start": when, "end": when + 1, "pid": pid, "user": f"{user}@{ctx.host}",
                  "trigger": "size", "triggered_by": None, "max_size_bytes": 1,
                  "max_age_seconds": None, "target_size_bytes": 0,
                  "size_before_bytes": 10 ** 15, "size_after_bytes": 10 ** 15,
                  "removed": 0, "freed_bytes": 0, "skipped_in_use": 0, "error": None,
                  "warnings": relpaths, "version": 1}
        lines = [record]
    else:  # a journal (also what lands in any other file bob forges)
        lines = [["j", 1, user, ctx.host, pid, when]]
        for r in relpaths:
            size = _size_of(ctx, r)
            lines.append(["m", r, item["relpath"].split("/", 1)[-1], size, "0" * 32,
                          "md5sum_hexdigest"])
            lines.append(["a", r, item["uri"], item["uuid"], item["identifier"], "http",
                          int(when * 1e6), rng.randint(0, 1), size, int(when * 1e6), 1000])
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()
