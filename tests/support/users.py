"""Real unix users for shared-cache tests: a group, its members and an outsider.

The tests run as root (as CI does), create the accounts idempotently with ``groupadd`` and
``useradd``, and run children as those users through a ``preexec_fn`` that drops to them
(supplementary groups, gid, uid) and sets a umask, as a login shell would.  What a run
created it removes at its end (:func:`remove_created`); accounts that were there before
are left alone.

Those children run this venv's python, so other users must be able to execute it and import
the installed packages.  A venv made from an interpreter under ``/root`` (pyenv, conda) does
not allow that: :func:`other_users_problem` finds out once per session, and the tests marked
``other_users`` (see ``conftest.py``) then skip with its one-line reason.
"""

import functools
import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Dict, Optional

import pytest

GROUP = "dcmshare"
MEMBERS = ("alice", "bob", "carol")  # alice and bob use the cache, carol manages it
OUTSIDER = "erin"  # not in the group: may read (others have r-x) but not write

needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="needs root to create users and switch to them (CI runs as root, so this runs there)")


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: tuple  # supplementary group ids
    home: str

    @property
    def at_host(self) -> str:
        return f"{self.name}@{socket.gethostname()}"

    def preexec(self, umask: int = 0o022):
        """preexec_fn: become this user, with only its own groups, and set ``umask``."""
        groups, gid, uid = list(self.groups), self.gid, self.uid

        def switch():
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            os.umask(umask)
        return switch

    def env(self, base: Dict[str, str]) -> Dict[str, str]:
        env = dict(base)
        env.update(HOME=self.home, USER=self.name, LOGNAME=self.name)
        return env


_CREATED_USERS: list = []  # in the order made; removed in reverse, then the groups
_CREATED_GROUPS: list = []


def _run(*argv):
    subprocess.run(argv, check=True, capture_output=True, text=True)


def remove_created() -> list:
    """Remove the users, then the groups, this run created; returns what could not be
    removed (with why), for the session to report."""
    failed = []
    for command, names, lookup in (("userdel", _CREATED_USERS, pwd.getpwnam),
                                   ("groupdel", _CREATED_GROUPS, grp.getgrnam)):
        while names:
            name = names.pop()
            try:
                lookup(name)
            except KeyError:  # gone already: userdel removes a user's own group with it
                continue
            try:
                _run(command, name)
            except subprocess.CalledProcessError as exc:
                failed.append(f"{command} {name}: {exc.stderr.strip()}")
    return failed


def ensure_group(name: str = GROUP) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        pass
    try:
        _run("groupadd", name)
        _CREATED_GROUPS.append(name)
    except subprocess.CalledProcessError:
        pass  # created concurrently by another test process: look it up again
    return grp.getgrnam(name).gr_gid


def ensure_user(name: str, group: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        _run("useradd", "-M", "-N", "-g", group, "-s", "/usr/sbin/nologin", name)
        _CREATED_USERS.append(name)
    except subprocess.CalledProcessError:
        pass
    return pwd.getpwnam(name)


# What a child run as another user imports; found in the venv, as the tests' children are.
_IMPORTS = "import dtool_cache_manager, dtoolcore, dtool_cli, dtool_http"


@functools.lru_cache(maxsize=None)
def other_users_problem() -> Optional[str]:
    """None if another unix user can run ``sys.executable`` and import our package and its
    dependencies from the venv; else the one-line reason to skip the tests that need that.

    Tried for real, once per session, as erin (the least privileged of the test users, who
    has only the others' permissions): the interpreter, the directories on the way to it
    (it may be a link into ``/root``), the venv and the installed packages must all let her.
    """
    if os.geteuid() != 0:
        return "needs root to create users and switch to them (CI runs as root)"
    ensure_group(OUTSIDER)
    entry = ensure_user(OUTSIDER, OUTSIDER)
    # Home and cwd "/": a -c script imports from its cwd, and the clone must not stand in.
    erin = User(OUTSIDER, entry.pw_uid, entry.pw_gid, (entry.pw_gid,), "/")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    python = sys.executable
    real = os.path.realpath(python)
    shown = python if real == python else f"{python} (-> {real})"
    try:
        result = run_as(erin, [python, "-c", _IMPORTS], env)
    except (OSError, subprocess.SubprocessError) as exc:  # could not even start it
        return (f"needs other unix users to run {shown}: {exc}; make the venv from an "
                "interpreter they can execute (e.g. /usr/bin/python3)")
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    why = lines[-1] if lines else f"exit status {result.returncode}"
    return (f"needs other unix users to import our packages with {shown}: {why}; make the "
            "venv from /usr/bin/python3 or the like, where they can read it, and install "
            "the package into it (not editable from a directory they cannot enter)")


def make_users(base_dir: str) -> Dict[str, User]:
    """alice, bob, carol in ``dcmshare`` and erin outside it, each with a home in
    ``base_dir`` (which must be traversable by them)."""
    share_gid = ensure_group(GROUP)
    users = {}
    for name in MEMBERS:
        entry = ensure_user(name, GROUP)
        users[name] = User(name, entry.pw_uid, share_gid, (share_gid,),
                           _home(base_dir, name, entry.pw_uid, share_gid))
    ensure_group(OUTSIDER)
    entry = ensure_user(OUTSIDER, OUTSIDER)
    assert share_gid not in os.getgrouplist(OUTSIDER, entry.pw_gid)
    users[OUTSIDER] = User(OUTSIDER, entry.pw_uid, entry.pw_gid, (entry.pw_gid,),
                           _home(base_dir, OUTSIDER, entry.pw_uid, entry.pw_gid))
    return users


def _home(base_dir: str, name: str, uid: int, gid: int) -> str:
    home = os.path.join(base_dir, "home", name)
    os.makedirs(home, exist_ok=True)
    os.chmod(os.path.dirname(home), 0o755)
    os.chown(home, uid, gid)
    os.chmod(home, 0o755)
    return home


def shared_tmp(prefix: str) -> str:
    """A fresh directory everyone can traverse (pytest's tmp_path is private to root)."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    return path


def make_group_cache(base_dir: str, group: str = GROUP) -> str:
    """``<base_dir>/cache``: root:<group>, mode 2775 (setgid, group-writable)."""
    cache = os.path.join(base_dir, "cache")
    os.mkdir(cache)
    os.chown(cache, 0, grp.getgrnam(group).gr_gid)
    os.chmod(cache, 0o2775)
    return cache


def set_up_as_data_manager(cache: str) -> None:
    """What the README asks of whoever sets up a group cache: one ``dtool cache`` command
    as the cache's owner (root here), which makes the bookkeeping theirs and the cache
    directory sticky."""
    result = subprocess.run(["dtool-cache", "summary", "--cache-dir", cache], text=True,
                            capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PATH": os.path.dirname(sys.executable)
                                 + os.pathsep + os.environ.get("PATH", "")})
    assert result.returncode == 0, result.stderr


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def run_as(user: Optional[User], argv, env, timeout=120, **kwargs):
    """Run ``argv`` as ``user`` (None: as ourselves); the CompletedProcess, unchecked."""
    if user is not None:
        env = user.env(env)
        kwargs.setdefault("preexec_fn", user.preexec())
        kwargs.setdefault("cwd", user.home)
    return subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kwargs)


# Plain python access, as a user's script would do it.
ACCESS = """
import sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
for identifier in sys.argv[2:]:
    print(ds.item_content_abspath(identifier))
"""

# Access, then keep the process (and so its in-use holds) alive until told to go.
ACCESS_AND_WAIT = """
import os, sys, dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
for identifier in sys.argv[2:]:
    print(ds.item_content_abspath(identifier), flush=True)
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
"""


def python_access(user: Optional[User], uri, identifiers, env, **kwargs):
    return run_as(user, [sys.executable, "-c", ACCESS, uri, *identifiers], env, **kwargs)


def dtool_fetch(user: Optional[User], uri, identifier, env, **kwargs):
    return run_as(user, ["dtool", "item", "fetch", uri, identifier], env, **kwargs)


def dtool_cache(user: Optional[User], *args, env, **kwargs):
    return run_as(user, ["dtool", "cache", *args], env, **kwargs)


class HoldingChild:
    """A process (as ``user``) that accesses items, then keeps them held until ``finish``.

    ``paths`` are the paths it was given; ``pid`` its process id as it reported it.
    """

    def __init__(self, user: Optional[User], uri, identifiers, env):
        kwargs = {}
        if user is not None:
            env = user.env(env)
            kwargs = dict(preexec_fn=user.preexec(), cwd=user.home)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ACCESS_AND_WAIT, uri, *identifiers], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            **kwargs)
        self.paths = []
        self.pid = None
        for line in self.proc.stdout:
            if line.startswith("ready "):
                self.pid = int(line.split()[1])
                break
            self.paths.append(line.rstrip("\n"))
        if self.pid is None:
            self.proc.kill()
            raise AssertionError(f"holding child failed: {self.proc.communicate()[1]}")
        assert self.pid == self.proc.pid

    def finish(self, timeout=60) -> str:
        """Let it exit; returns its stderr (it must have succeeded)."""
        _, err = self.proc.communicate("go\n", timeout=timeout)
        assert self.proc.returncode == 0, err
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill()
