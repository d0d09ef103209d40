"""A hostile member's tools, and the victim's evidence, for the security regression tests.

Everything a hostile member does here runs in a real process as that unix user (never as
root pretending), so the kernel decides what the member may do: an attempt the kernel
refuses (EPERM/EACCES) is reported as *refused*, which is a safe outcome, and the test goes
on to its assertions.  The evidence side (sentinel trees outside the cache, a root-only
secret, scans of the cache for that secret) is read by root, without following symlinks.

The ctypes helpers (``inotify``, ``renameat2``) exist as source text too, so that the very
same code runs inside the member's processes.
"""

import grp
import hashlib
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from .users import GROUP, User

META = ".dtool-cache-manager"
LEGACY_DIR_MODE = 0o2775  # what today's code gives the bookkeeping directories

# -- ctypes helpers, as source (exec'd here and in the member's processes) -------------------

CTYPES_SRC = r'''
import ctypes as _ctypes
import os as _os
import select as _select
import struct as _struct

_libc = _ctypes.CDLL(None, use_errno=True)
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276}[_os.uname().machine]
_AT_FDCWD = -100
RENAME_EXCHANGE = 2

IN_ACCESS, IN_MODIFY, IN_CLOSE_WRITE, IN_OPEN = 0x1, 0x2, 0x8, 0x20
IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x80, 0x100, 0x200
_IN_CLOEXEC, _IN_NONBLOCK = 0o2000000, 0o4000


def _check(result, what):
    if result < 0:
        err = _ctypes.get_errno()
        raise OSError(err, _os.strerror(err), what)
    return result


def exchange(a, b):
    """renameat2(a, b, RENAME_EXCHANGE): swap two names atomically."""
    _check(_libc.syscall(_ctypes.c_long(_SYS_RENAMEAT2), _ctypes.c_int(_AT_FDCWD),
                         _ctypes.c_char_p(_os.fsencode(a)), _ctypes.c_int(_AT_FDCWD),
                         _ctypes.c_char_p(_os.fsencode(b)), _ctypes.c_uint(RENAME_EXCHANGE)),
           f"renameat2({a!r}, {b!r})")


class Inotify:
    """inotify_init1 / inotify_add_watch; events are (wd, mask, name)."""

    def __init__(self):
        self.fd = _check(_libc.inotify_init1(_IN_CLOEXEC | _IN_NONBLOCK), "inotify_init1")
        self.paths = {}

    def add_watch(self, path, mask):
        wd = _check(_libc.inotify_add_watch(self.fd, _os.fsencode(path), _ctypes.c_uint32(mask)),
                    f"inotify_add_watch({path!r})")
        self.paths[wd] = path
        return wd

    def read(self, timeout):
        """Events available within ``timeout`` seconds (None: wait for ever); [] if none."""
        if not _select.select([self.fd], [], [], timeout)[0]:
            return []
        try:
            data = _os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        events, pos = [], 0
        while pos < len(data):
            wd, mask, _cookie, size = _struct.unpack_from("iIII", data, pos)
            name = data[pos + 16:pos + 16 + size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            events.append((wd, mask, name))
            pos += 16 + size
        return events

    def close(self):
        _os.close(self.fd)
'''

_CTYPES: dict = {}
exec(CTYPES_SRC, _CTYPES)  # our own source, shared with the member's processes
exchange = _CTYPES["exchange"]
Inotify = _CTYPES["Inotify"]
IN_ACCESS, IN_OPEN, IN_CREATE, IN_MOVED_TO = (
    _CTYPES[n] for n in ("IN_ACCESS", "IN_OPEN", "IN_CREATE", "IN_MOVED_TO"))


def wait_for_entry(directory: str, accept, timeout: float = 60.0) -> str:
    """Wait (inotify, no polling) until a name for which ``accept(name)`` is true exists in
    ``directory``; returns that name.  Names present before the watch count too."""
    ino = Inotify()
    try:
        ino.add_watch(directory, IN_CREATE | IN_MOVED_TO)
        for name in os.listdir(directory):  # after the watch: nothing can slip between
            if accept(name):
                return name
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"nothing accepted appeared in {directory} in {timeout} s")
            for _, _, name in ino.read(left):
                if accept(name):
                    return name
    finally:
        ino.close()


# -- running code as a member ----------------------------------------------------------------

#: Prelude of every member script: ``attempt(what, fn, *args)`` runs one step, and a refusal
#: by the kernel (EPERM/EACCES) is reported, not raised.
PRELUDE = CTYPES_SRC + r'''
import errno, json, os, sys

REFUSED = []


def attempt(what, fn, *args, **kwargs):
    """Run one step of the attack; False (and reported) if the kernel refused it."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EACCES):
            raise
        REFUSED.append([what, str(exc)])
        print(json.dumps(["refused", what, str(exc)]), flush=True)
        return False
    return True
'''


@dataclass
class Attempt:
    """What a member's attack script did: ``refused`` lists the steps the kernel refused."""

    result: subprocess.CompletedProcess
    refused: List[Tuple[str, str]] = field(default_factory=list)
    lines: List[str] = field(default_factory=list)

    @property
    def planted(self) -> bool:
        return not self.refused


def run_as_member(user: User, code: str, *args, env: Dict[str, str], timeout: float = 60,
                  cwd: Optional[str] = None) -> Attempt:
    """Run ``PRELUDE + code`` as ``user``; fails the test on any error but a refusal."""
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + code, *[str(a) for a in args]],
        env=user.env(env), preexec_fn=user.preexec(), cwd=cwd or user.home,
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"{user.name}'s attack script failed:\n{result.stderr}"
    attempt = Attempt(result)
    for line in result.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            attempt.lines.append(line)
            continue
        if isinstance(rec, list) and rec[:1] == ["refused"]:
            attempt.refused.append((rec[1], rec[2]))
        else:
            attempt.lines.append(line)
    return attempt


# Steps a member performs, one per argv item (JSON): [op, args...]
STEPS = r'''
import base64

def aside(path):
    """Move whatever is at ``path`` out of the way (a member cannot delete others' trees)."""
    if os.path.lexists(path):
        os.rename(path, path + ".aside-" + os.urandom(4).hex())

OPS = {
    "symlink": lambda target, path: os.symlink(target, path),
    "aside": aside,
    "mkdir": lambda path: os.mkdir(path),
    "mkfifo": lambda path: os.mkfifo(path),
    "write": lambda path, b64, mode: _write(path, base64.b64decode(b64), mode),
    "truncate": lambda path, size: _truncate(path, size),
    "rename": lambda a, b: os.rename(a, b),
    "exchange": lambda a, b: exchange(a, b),
    "chmod": lambda path, mode: os.chmod(path, mode),
    "unlink": lambda path: os.unlink(path),
    "utime": lambda path, t: os.utime(path, (t, t), follow_symlinks=False),
}

def _write(path, data, mode):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)

def _truncate(path, size):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)

for raw in sys.argv[1:]:
    op, *args = json.loads(raw)
    if not attempt(f"{op} {args[0]}", OPS[op], *args):
        break  # a step the kernel refused: the trap is not (fully) planted
print(json.dumps(["steps done"]), flush=True)
'''


def member_steps(user: User, env: Dict[str, str], *steps: Sequence) -> Attempt:
    """Perform ``steps`` as ``user``: each ``(op, *args)`` with op one of symlink, aside,
    mkdir, mkfifo, write (data as bytes), truncate, rename, exchange, chmod, unlink, utime.
    The first refused step stops the rest."""
    import base64

    argv = []
    for op, *args in steps:
        if op == "write":
            path, data, *mode = args
            args = [path, base64.b64encode(data).decode(), mode[0] if mode else 0o644]
        argv.append(json.dumps([op, *[os.fspath(a) if isinstance(a, os.PathLike) else a
                                      for a in args]]))
    return run_as_member(user, STEPS, *argv, env=env)


# A member's process that keeps an exclusive flock on a file until told to go.
FLOCK_HOLDER = r'''
import fcntl
path, content, mode = sys.argv[1].replace("{pid}", str(os.getpid())), sys.argv[2], int(sys.argv[3])
fd = None
if content == "-":
    def _open():
        global fd
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
else:
    data = bytes.fromhex(content)
    def _open():
        global fd
        fd = os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        os.fchmod(fd, mode)
        os.write(fd, data)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(path + ".new", path)  # visible only once locked, as the package does
if attempt(f"open {path}", _open):
    fcntl.flock(fd, fcntl.LOCK_EX)
    print(json.dumps(["ready", os.getpid()]), flush=True)
else:
    print(json.dumps(["ready", None]), flush=True)
sys.stdin.readline()
'''


class FlockHolder:
    """A process of ``user`` holding an exclusive flock on ``path`` until :meth:`finish`.

    With ``content`` (bytes) it creates the file with that content first (locked before it
    appears under its name; ``{pid}`` in ``path`` becomes its pid); without, it opens an
    existing file read-only (flock needs no more).  ``pid`` is its real process id;
    ``refused`` says the kernel refused the open.
    """

    def __init__(self, user: User, path: str, env: Dict[str, str],
                 content: Optional[bytes] = None, mode: int = 0o644):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + FLOCK_HOLDER, path,
             "-" if content is None else content.hex(), str(mode)],
            env=user.env(env), preexec_fn=user.preexec(), cwd=user.home,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.refused = None
        self.pid = None
        for line in self.proc.stdout:
            rec = json.loads(line)
            if rec[0] == "refused":
                self.refused = rec[2]
            elif rec[0] == "ready":
                self.pid = rec[1]
                break
        else:
            self.proc.kill()
            raise AssertionError(f"flock holder failed: {self.proc.communicate()[1]}")
        assert self.pid is None or self.pid == self.proc.pid

    def finish(self) -> None:
        if self.proc.poll() is None:
            self.proc.communicate("go\n", timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


class Swapper:
    """A member's process swapping two names with renameat2(RENAME_EXCHANGE) as fast as it
    can, until stopped; :meth:`pause` stops it (SIGSTOP, awaited with waitpid) so the
    test can look at a still scene, :meth:`resume` lets it go on.  ``refused`` is set if
    the kernel refused the first exchange (it then exits)."""

    CODE = r'''
a, b = sys.argv[1], sys.argv[2]
if attempt(f"exchange {a}", exchange, a, b):
    print(json.dumps(["swapping"]), flush=True)
    n = 1
    while True:
        exchange(a, b)
        n += 1
'''

    def __init__(self, user: User, a: str, b: str, env: Dict[str, str]):
        self.a, self.b = a, b
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + self.CODE, a, b], env=user.env(env),
            preexec_fn=user.preexec(), cwd=user.home, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rec = json.loads(self.proc.stdout.readline() or '["died"]')
        self.refused = rec[2] if rec[0] == "refused" else None
        if rec[0] not in ("swapping", "refused"):
            raise AssertionError(f"swapper failed: {self.proc.communicate()[1]}")

    @property
    def running(self) -> bool:
        return self.refused is None

    def pause(self) -> None:
        if self.running:
            os.kill(self.proc.pid, signal.SIGSTOP)
            _, status = os.waitpid(self.proc.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status

    def resume(self) -> None:
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.communicate()


# -- the legacy layout ---------------------------------------------------------------------


def legacy_layout(cache: str) -> None:
    """Make the bookkeeping directories group-writable as today's code leaves them (an old
    cache), so that a member may plant traps in them whatever a newer version made."""
    meta = os.path.join(cache, META)
    for path in (meta, os.path.join(meta, "holds"), os.path.join(meta, "journal")):
        st = os.lstat(path) if os.path.lexists(path) else None
        if st is not None and stat.S_ISDIR(st.st_mode):
            os.chmod(path, LEGACY_DIR_MODE)
            os.chown(path, -1, grp.getgrnam(GROUP).gr_gid)


# -- evidence: sentinel trees and secrets outside the cache --------------------------------


class Sentinel:
    """A directory outside the cache whose every entry must stay exactly as it is."""

    def __init__(self, path: str, owner: Tuple[int, int] = (0, 0), mode: int = 0o755):
        self.path = path
        os.mkdir(path)
        os.chown(path, *owner)
        os.chmod(path, mode)
        self.owner = owner

    def add(self, name: str, content: bytes = b"", mode: int = 0o644,
            mtime: Optional[float] = None) -> str:
        path = os.path.join(self.path, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(content)
        os.chown(path, *self.owner)
        os.chmod(path, mode)
        if mtime is not None:
            os.utime(path, (mtime, mtime))
        return path

    def snapshot(self) -> Dict[str, tuple]:
        return snapshot(self.path)


def snapshot(top: str, exclude: Sequence[str] = ()) -> Dict[str, tuple]:
    """relpath -> (kind, mode, uid, gid, content digest or link target) of ``top`` and
    everything under it, symlinks never followed; ``exclude``: names at the top skipped."""
    found = {".": _describe(top)}
    for root, dirs, files in os.walk(top):
        if root == top:
            dirs[:] = [d for d in dirs if d not in exclude]
            files = [f for f in files if f not in exclude]
        for name in dirs + files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, top)] = _describe(path)
    return found


def _describe(path: str) -> tuple:
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return ("link", mode, st.st_uid, st.st_gid, os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", mode, st.st_uid, st.st_gid, None)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as fh:
            return ("file", mode, st.st_uid, st.st_gid, hashlib.sha256(fh.read()).hexdigest())
    return ("other", mode, st.st_uid, st.st_gid, stat.S_IFMT(st.st_mode))


def snapshot_diff(before: Dict[str, tuple], after: Dict[str, tuple]) -> List[str]:
    """What changed between two snapshots, readable; [] when identical."""
    changes = []
    for rel in sorted(set(before) | set(after)):
        if rel not in after:
            changes.append(f"deleted {rel} {before[rel][:2]}")
        elif rel not in before:
            changes.append(f"created {rel} {after[rel]}")
        elif before[rel] != after[rel]:
            changes.append(f"changed {rel}: {before[rel]} -> {after[rel]}")
    return changes


@dataclass(frozen=True)
class Secret:
    """A root-only (0600) file outside the cache; ``token`` is what must never leak."""

    path: str
    token: bytes
    content: bytes


def make_secret(path: str) -> Secret:
    token = b"SECRET-" + secrets.token_hex(16).encode()
    content = b"root's eyes only: " + token + b"\nline two of the secret\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.chown(path, 0, 0)
    return Secret(path, token, content)


def secret_intact(secret: Secret) -> List[str]:
    """[] if the secret file is still root's, 0600 and unchanged; else what changed."""
    problems = []
    st = os.lstat(secret.path)
    if not stat.S_ISREG(st.st_mode):
        return [f"{secret.path} is no longer a regular file"]
    if stat.S_IMODE(st.st_mode) != 0o600:
        problems.append(f"mode {oct(stat.S_IMODE(st.st_mode))}, was 0o600")
    if (st.st_uid, st.st_gid) != (0, 0):
        problems.append(f"owner {st.st_uid}:{st.st_gid}, was 0:0")
    with open(secret.path, "rb") as fh:
        data = fh.read()
    if data != secret.content:
        problems.append(f"content changed: {data[:300]!r}")
    return problems


SCAN_LIMIT = 16 << 20  # bytes read of each file: enough for anything a command writes


def files_containing(top: str, needle: bytes, limit: int = SCAN_LIMIT) -> List[str]:
    """Regular files under ``top`` (symlinks and special files skipped, nothing followed)
    whose first ``limit`` bytes contain ``needle``."""
    found = []
    for root, dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(root, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                data, tail = b"", b""
                while len(data) < limit:
                    chunk = os.read(fd, min(1 << 20, limit - len(data)))
                    if not chunk:
                        break
                    if needle in tail + chunk:
                        found.append(path)
                        break
                    tail = chunk[-len(needle):]
                    data += b"x" * len(chunk)  # count only; keep memory flat
            finally:
                os.close(fd)
    return found


def entries(top: str) -> Dict[str, tuple]:
    """relpath -> (kind, link target) of everything under ``top`` (not following links):
    what a command must neither create nor delete."""
    found = {}
    if not os.path.lexists(top):
        return found
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                found[os.path.relpath(path, top)] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                found[os.path.relpath(path, top)] = ("dir",)
            else:
                found[os.path.relpath(path, top)] = ("file",)
    return found
