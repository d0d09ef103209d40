"""Loaded at start-up by every Python process whose PYTHONPATH holds this directory (tests
put it there for subprocesses): hides the platform facilities named in
``DCM_HIDE_FACILITIES`` (comma-separated), as a platform without them would.

- ``fcntl``: the module cannot be imported (as on Windows).
- ``register_at_fork``: ``os.register_at_fork`` is gone (as on Windows), while ``os.fork``
  stays, so that the fallback is tested with real forks.
- ``proc_locks``: ``/proc/locks`` and ``/proc/<pid>`` cannot be opened or stat'ed (as on
  macOS).
- ``openat2``, ``statfs``: the kernel refuses those system calls with ENOSYS, through a
  seccomp filter (as on a kernel or sandbox without them); ``statfs`` covers ``statfs``
  and ``fstatfs``.
- ``windows``: what Python lacks on Windows, as far as our code can tell: no ``fcntl``,
  ``pwd`` or ``grp``, no ``os.register_at_fork``, no ``O_NOFOLLOW``/``O_DIRECTORY``, and
  ``dir_fd`` supported by no function.

A name this file does not know stops the process: a typo must not pass as a hidden facility.
"""

import builtins
import ctypes
import errno
import io
import os
import re
import struct
import sys

KNOWN = {"fcntl", "register_at_fork", "proc_locks", "openat2", "statfs", "windows"}
HIDDEN = {name for name in os.environ.get("DCM_HIDE_FACILITIES", "").split(",") if name}
if HIDDEN - KNOWN:
    sys.exit(f"sitecustomize: unknown facilities {sorted(HIDDEN - KNOWN)}")

if "windows" in HIDDEN:
    HIDDEN |= {"fcntl", "register_at_fork"}
    __import__("tempfile")  # reads O_NOFOLLOW at import (guarded by hasattr)
    sys.modules["pwd"] = sys.modules["grp"] = None
    del os.O_NOFOLLOW, os.O_DIRECTORY
    os.supports_dir_fd = set()

if "fcntl" in HIDDEN:
    sys.modules["fcntl"] = None  # import fcntl -> ModuleNotFoundError

if "register_at_fork" in HIDDEN:
    # The stdlib's random calls it unguarded wherever os.fork exists (a Python without it
    # has no fork either); every other user checks for it, as ours do.
    __import__("random")  # imported before the attribute goes
    del os.register_at_fork

if "proc_locks" in HIDDEN:
    _PROC = re.compile(r"^/proc/(locks|\d+)(/|$)")

    def _hidden(path):
        try:
            text = os.fsdecode(path)
        except TypeError:
            return False
        return bool(_PROC.match(text))

    def _refuse(path):
        raise FileNotFoundError(errno.ENOENT, "hidden by the test's sitecustomize", path)

    def _wrap(real):
        def wrapper(path, *args, **kwargs):
            if not isinstance(path, int) and _hidden(path):
                _refuse(path)
            return real(path, *args, **kwargs)
        return wrapper

    builtins.open = io.open = _wrap(io.open)
    for _name in ("open", "stat", "lstat", "listdir"):
        _real = getattr(os, _name)
        setattr(os, _name, _wrap(_real))
        for _supports in (os.supports_dir_fd, os.supports_fd, os.supports_follow_symlinks):
            if _real in _supports:  # what the real one supports, the wrapper does
                _supports.add(getattr(os, _name))

# x86_64 and aarch64 system call numbers (openat2 is 437 on every architecture).
_SYSCALLS = {
    "x86_64": (0xC000003E, {"openat2": [437], "statfs": [137, 138]}),
    "aarch64": (0xC00000B7, {"openat2": [437], "statfs": [43, 44]}),
}


def _deny_syscalls(numbers, arch):
    """A seccomp filter returning ENOSYS for ``numbers``, allowing everything else."""
    BPF_LD_W_ABS, BPF_JEQ_K, BPF_RET_K = 0x20, 0x15, 0x06
    ALLOW, ERRNO = 0x7FFF0000, 0x00050000
    prog = [(BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            (BPF_JEQ_K, 1, 0, arch),
            (BPF_RET_K, 0, 0, ALLOW),  # another ABI (e.g. x32): leave it alone
            (BPF_LD_W_ABS, 0, 0, 0)]  # seccomp_data.nr
    for i, nr in enumerate(numbers):
        prog.append((BPF_JEQ_K, len(numbers) - i, 0, nr))
    prog += [(BPF_RET_K, 0, 0, ALLOW), (BPF_RET_K, 0, 0, ERRNO | errno.ENOSYS)]
    filters = b"".join(struct.pack("HBBI", *op) for op in prog)
    buf = ctypes.create_string_buffer(filters, len(filters))
    fprog = struct.pack("HxxxxxxP", len(prog), ctypes.addressof(buf))
    fprog_buf = ctypes.create_string_buffer(fprog, len(fprog))
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 38, 22, 2
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, fprog_buf, 0, 0) != 0:
        sys.exit(f"sitecustomize: seccomp failed: {os.strerror(ctypes.get_errno())}")


_denied = [name for name in ("openat2", "statfs") if name in HIDDEN]
if _denied:
    machine = os.uname().machine
    if machine not in _SYSCALLS:
        sys.exit(f"sitecustomize: no system call numbers for {machine}")
    arch, table = _SYSCALLS[machine]
    _deny_syscalls([nr for name in _denied for nr in table[name]], arch)
