"""What the platform offers, as facilities.py and sharing.py read it, without subprocesses:
the filesystem types they sort, and the words a refusal uses for each."""

import os

from dtool_cache_manager import facilities
from dtool_cache_manager.sharing import COORDINATED, SINGLE_HOST, Registration, Sharing


def test_this_hosts_temporary_directory_is_a_known_local_filesystem(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        magic = facilities.filesystem_magic(fd)
    finally:
        os.close(fd)
    assert magic in facilities.LOCAL_FILESYSTEMS, hex(magic or 0)
    assert facilities.unavailable() is None  # everything tracking needs is here


def test_no_type_is_both_local_and_shared():
    assert not set(facilities.LOCAL_FILESYSTEMS) & set(facilities.SHARED_FILESYSTEMS)


def test_only_a_local_or_declared_cache_without_a_coordinator_is_single_host():
    local = Sharing("ext2/3/4", True, None, None, None)
    nfs = Sharing("nfs", False, None, None, None)
    unknown = Sharing(None, False, None, None, None)
    odd = Sharing("type 0x1234", False, None, None, None)
    declared = Sharing("nfs", False, SINGLE_HOST, "alice", 0.0)
    assert [s.mode for s in (local, nfs, unknown, odd, declared)] == [
        "local", "possibly-shared", "possibly-shared", "possibly-shared", SINGLE_HOST]
    assert [s.single_host for s in (local, nfs, unknown, odd, declared)] == [
        True, False, False, False, True]
    assert nfs.filesystem_text == "a network or FUSE filesystem (nfs)"
    assert unknown.filesystem_text == "a filesystem of a type this platform cannot tell"
    assert odd.filesystem_text == "a filesystem not known to be local (type 0x1234)"
    refusal = nfs.refusal("/c")
    assert refusal.startswith("not removing anything: /c is on a network or FUSE") and \
        "dtool cache init --database postgresql://" in refusal and \
        refusal.endswith("(dtool cache init --single-host)") and "\n" not in refusal
    # A coordinator makes this host's locks not the whole truth, even on a local disk.
    registration = Registration("postgresql://db.example/dcm", "0" * 32, 30, 600)
    coordinated = Sharing("ext2/3/4", True, COORDINATED, "root", 0.0, registration)
    assert (coordinated.mode, coordinated.single_host) == (COORDINATED, False)
