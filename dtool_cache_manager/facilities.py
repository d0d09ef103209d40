"""What this platform offers, found once at import, so that loading the package never fails.

dtool runs on Linux, macOS and Windows, and our entry points load inside every dtool
process.  A module here never imports a platform-specific facility itself: it takes it
from this module, which says what is missing and why.

=====================  ===========================  =====================================
facility               where it is missing          what we do without it
=====================  ===========================  =====================================
``fcntl`` (POSIX       Windows                      tracking is off in that process (one
locks, ``flock``)                                   warning); ``dtool cache`` says why
``pwd``, ``openat``    Windows                      as without ``fcntl``
(``dir_fd``),
``O_NOFOLLOW``
``os.register_at_``    Windows (and any Python      a forked child notices by its pid
``fork``               built without it)            that its state is its parent's
``/proc/locks``,       macOS, BSD, containers       a holder's pid is unknown (its user
``/proc/<pid>``        without ``/proc``            is its holds file's owner); liveness
                                                    is the lock itself
``fstatfs`` type       every platform but Linux     the filesystem counts as possibly
                       (and Linux with the call     shared by several hosts, unless the
                       denied)                      cache was declared single-host
``openat2``            never used                   every walk is component by component
                                                    with ``O_NOFOLLOW`` (see cachefs)
=====================  ===========================  =====================================

Record locks are classic POSIX ones (``F_SETLK`` through ``fcntl.lockf``), never Linux's
``F_OFD_*``: they exist wherever ``fcntl`` does.  Their one trap, that closing *any*
descriptor of a file drops all of the process's locks on it, is why :mod:`rangelock` keeps
one descriptor per lock file per process.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Optional

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]  # used only where unavailable() is None

try:
    import pwd
except ImportError:  # Windows
    pwd = None  # type: ignore[assignment]  # used only where unavailable() is None


# Opening files relative to a directory descriptor without following links: how cachefs
# reaches everything in a cache.  Windows has none of it (no dir_fd, no O_NOFOLLOW): the
# flags are 0 there, never used, since unavailable() then turns tracking off.
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def unavailable() -> Optional[str]:
    """Why cache tracking cannot run on this platform, in one phrase; None if it can."""
    missing = [name for name, module in (("fcntl", fcntl), ("pwd", pwd)) if module is None]
    if os.open not in os.supports_dir_fd or not (O_DIRECTORY and O_NOFOLLOW):
        missing.append("openat with O_NOFOLLOW")
    if not missing:
        return None
    return (f"it needs POSIX file locks, user accounts and directory-relative file access "
            f"({', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing on "
            f"{sys.platform}): see the README's Platforms section")


def after_fork_in_child(callback: Callable[[], None]) -> bool:
    """Run ``callback`` in a forked child, if the platform can say when one starts.
    False: the caller must notice a fork itself (by its pid)."""
    register = getattr(os, "register_at_fork", None)
    if register is None:
        return False
    register(after_in_child=callback)
    return True


# -- the filesystem's type --------------------------------------------------------------

# Linux's statfs(2) magic numbers (linux/magic.h).  Local: one host's kernel sees every
# lock and process using it.
LOCAL_FILESYSTEMS: Dict[int, str] = {
    0xEF53: "ext2/3/4", 0x58465342: "xfs", 0x9123683E: "btrfs", 0x01021994: "tmpfs",
    0x794C7630: "overlayfs", 0x2FC12FC1: "zfs", 0xF2F52010: "f2fs", 0x858458F6: "ramfs",
    0xCA451A4E: "bcachefs", 0x3434: "nilfs", 0x52654973: "reiserfs", 0x3153464A: "jfs",
    0x4D44: "vfat", 0x2011BAB0: "exfat", 0x5346544E: "ntfs", 0x7366746E: "ntfs3",
    0x73717368: "squashfs", 0x28CD3D45: "cramfs", 0x9660: "iso9660", 0x15013346: "udf",
    0xABBA1974: "xenfs", 0x62656572: "sysfs", 0x9FA0: "proc",
}
# Network, cluster and FUSE filesystems: other hosts may use the same files (a FUSE
# filesystem may be sshfs, a bindfs of an NFS mount, ...: we cannot tell).
SHARED_FILESYSTEMS: Dict[int, str] = {
    0x6969: "nfs", 0x517B: "smb", 0xFF534D42: "cifs", 0xFE534D42: "smb2",
    0x0BD00BD0: "lustre", 0x47504653: "gpfs", 0x00C36400: "ceph", 0x5346414F: "afs",
    0x6B414653: "kafs", 0x01021997: "9p", 0x65735546: "fuse", 0x19830326: "beegfs",
    0xAAD7AAEA: "panfs", 0x7461636F: "ocfs2", 0x01161970: "gfs2", 0x13661366: "orangefs",
    0x564C: "ncp", 0x73757245: "coda", 0x6E667364: "nfsd", 0x786F4256: "vboxsf",
}


def filesystem_magic(fd: int) -> Optional[int]:
    """The type of the filesystem holding ``fd``, as Linux's ``fstatfs`` tells it; None
    where the platform cannot tell (not Linux, no ``ctypes``, the call denied)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        buf = ctypes.create_string_buffer(512)  # struct statfs: 120 bytes on 64-bit Linux
        if libc.fstatfs(fd, buf) != 0:
            return None
        size = ctypes.sizeof(ctypes.c_long)  # f_type is the first field, a long
        return int.from_bytes(buf.raw[:size], sys.byteorder, signed=True) & 0xFFFFFFFF
    except (ImportError, OSError, AttributeError):
        return None
