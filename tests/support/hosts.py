"""Simulated hosts on this machine: namespaces, a bridge, and a bindfs mount each.

A "host" is a pid + uts + net + mount namespace set whose pid 1 is a tiny reaper.  Its
processes see their own hostname, their own pids (pid 1 is the host's init, and pids
repeat across hosts), reach the root namespace only through a veth on a bridge (so
a PostgreSQL server on the bridge address is "the server", and the link can be cut),
and see the shared cache through a bindfs mount of their own: locks are per mount, as
on NFS with ``local_lock``.  Killing pid 1 makes the kernel kill every process of the
host at once, which is what a crashed host looks like to the others.

Everything needs root; ``available()`` says why it cannot run elsewhere.
"""

import fcntl
import functools
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional

#: Simulated networks are 10.201.<n>.0/24; the PostgreSQL fixture trusts 10.201.0.0/16.
NET_PREFIX = "10.201"
_NETWORK_LOCK = "/tmp/dcm-hosts-network.lock"
_TOOLS = ("ip", "nsenter", "unshare", "bindfs", "setpriv")
_NAMESPACES = ("pid", "mnt", "net", "uts")

# pid 1 of a host: set the hostname, say "ready" (so that unshare has finished setting
# up the mounts), then reap orphans forever.  SIGCHLD stays blocked so none is lost
# between a wait and the next sigwait.
_INIT = r"""
import os, signal, socket, sys
socket.sethostname(sys.argv[1])
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
print("ready", flush=True)
os.close(1)
while True:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
    signal.sigwait({signal.SIGCHLD})
"""


def _wait_until(predicate, timeout, what):
    """Poll ``predicate`` until true; fail after ``timeout`` seconds saying ``what``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling interval, not synchronisation


def _ip(*args, check=True):
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {result.stderr.strip()}")
    return result


def link_exists(name):
    return _ip("link", "show", "dev", name, check=False).returncode == 0


def _links():
    return os.listdir("/sys/class/net")


def _pids():
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _namespace_ids(pid):
    """{"pid": "pid:[4026...]", ...} of a process; {} if it is gone or a zombie."""
    ids = {}
    for ns in _NAMESPACES:
        try:
            ids[ns] = os.readlink(f"/proc/{pid}/ns/{ns}")
        except OSError:
            return {}
    return ids


def _unescape_mountinfo(field):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def fuse_mounts(pid, mountpoint=None):
    """(major:minor, mountpoint, fstype) of the FUSE mounts that process ``pid`` sees."""
    found = []
    try:
        with open(f"/proc/{pid}/mountinfo") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        sep = fields.index("-")
        fstype, point = fields[sep + 1], _unescape_mountinfo(fields[4])
        if fstype.startswith("fuse") and (mountpoint is None or point == mountpoint):
            found.append((fields[2], point, fstype))
    return found


def all_fuse_mounts(mountpoint=None):
    """The FUSE mounts (as ``fuse_mounts``) seen by any process, in any mount namespace."""
    found = set()
    for pid in _pids():
        found.update(fuse_mounts(pid, mountpoint))
    return found


def _sorry():
    if os.geteuid() != 0:
        return "simulated hosts need root (namespaces, bridges, FUSE mounts)"
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        return f"simulated hosts need {', '.join(missing)}"
    if not os.path.exists("/dev/fuse"):
        return "simulated hosts need /dev/fuse for their bindfs mounts"
    probe = "dcmprobe" + secrets.token_hex(2)
    made = _ip("link", "add", "name", probe, "type", "bridge", check=False)
    if made.returncode != 0:
        return f"cannot create a bridge: {made.stderr.strip()}"
    _ip("link", "del", probe, check=False)
    ns = subprocess.run(["unshare", "--pid", "--uts", "--net", "--mount", "--fork",
                         "--mount-proc", "true"], capture_output=True, text=True,
                        timeout=60, stdin=subprocess.DEVNULL)
    if ns.returncode != 0:
        return f"cannot create namespaces: {ns.stderr.strip()}"
    return None


@functools.lru_cache(maxsize=None)
def available() -> Optional[str]:
    """None if hosts can be simulated here, else why not (a reason for pytest.skip)."""
    return _sorry()


class Network:
    """A bridge with address 10.201.<n>.1/24, <n> unused by any interface or route here.

    The bridge address is where hosts reach the root namespace (the "server").
    """

    def __init__(self):
        self.name = None
        with open(_NETWORK_LOCK, "a") as lock:  # one choice of <n> at a time on this machine
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.subnet = self._free_subnet()
            name = "dcmbr" + secrets.token_hex(2)
            while any(link.startswith(name) for link in _links()):
                name = "dcmbr" + secrets.token_hex(2)  # its veths' names must be free too
            # A fixed MAC: a bridge otherwise takes the lowest of its ports' addresses, so
            # its own changes when a host (and its veth) goes, and the other hosts' ARP
            # entries for the server go stale.
            _ip("link", "add", "name", name, "address",
                "02:dc:" + ":".join(secrets.token_hex(4)[k:k + 2] for k in range(0, 8, 2)),
                "type", "bridge")
            self.name = name
            try:
                self.server_address = f"{NET_PREFIX}.{self.subnet}.1"
                _ip("addr", "add", f"{self.server_address}/24", "dev", name)
                _ip("link", "set", name, "up")
            except BaseException:
                self.close()
                raise

    @staticmethod
    def _free_subnet():
        used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show").stdout
        taken = {int(n) for n in re.findall(rf"\b{re.escape(NET_PREFIX)}\.(\d+)\.", used)}
        free = [n for n in range(1, 255) if n not in taken]
        if not free:
            raise RuntimeError(f"no free {NET_PREFIX}.<n>.0/24 subnet")
        return free[0]

    def host_address(self, index):
        return f"{NET_PREFIX}.{self.subnet}.{index + 10}"

    def close(self):
        if self.name is not None and link_exists(self.name):
            _ip("link", "del", self.name)
        self.name = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class SimulatedHost:
    """A host called ``name`` on ``network`` at 10.201.<n>.<index+10>, with ``shared_dir``
    mounted (bindfs) at ``mountpoint`` in its own mount namespace.

    Run commands in it with ``run``/``popen``; ``kill_all()`` crashes it; ``partition()``
    and ``heal()`` cut and restore its link to the bridge.
    """

    def __init__(self, network, name, index, shared_dir, mountpoint):
        self.network = network
        self.name = name
        self.index = index
        self.shared_dir = os.path.realpath(shared_dir)
        self.mountpoint = os.path.realpath(mountpoint)
        self.address = network.host_address(index)
        self.veth = f"{network.name}h{index}"
        if len(self.veth) > 15:
            raise ValueError(f"interface name {self.veth!r} is longer than 15 characters")
        self.pid1 = None
        self.namespaces = {}
        self.mount_device = None
        self._unshare = None
        self._stderr = tempfile.TemporaryFile()
        self._closed = False
        try:
            self._start_init()
            self._start_network()
            self._mount()
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------

    def _start_init(self):
        self._unshare = subprocess.Popen(
            ["unshare", "--pid", "--uts", "--net", "--mount", "--fork",
             "--propagation", "private", "--kill-child", "--mount-proc",
             sys.executable, "-c", _INIT, self.name],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr)
        with self._unshare.stdout:
            line = self._unshare.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"host {self.name}: init did not start: {self._errors()}")
        upid = self._unshare.pid
        with open(f"/proc/{upid}/task/{upid}/children") as fh:
            self.pid1 = int(fh.read().split()[0])
        self.namespaces = _namespace_ids(self.pid1)
        if not self.namespaces:
            raise RuntimeError(f"host {self.name}: init vanished: {self._errors()}")

    def _start_network(self):
        _ip("link", "add", self.veth, "type", "veth",
            "peer", "name", "eth0", "netns", str(self.pid1))
        _ip("link", "set", self.veth, "master", self.network.name)
        _ip("link", "set", self.veth, "up")
        inside = "\n".join([f"addr add {self.address}/24 dev eth0", "link set eth0 up",
                            "link set lo up"]) + "\n"
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "--net", "--", "ip", "-batch", "-"],
            input=inside, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"host {self.name}: network setup: {result.stderr.strip()}")

    def _mount(self):
        # bindfs inside the host's pid namespace: killing the host kills its daemon.  No
        # kernel caching of names and attributes: NFS revalidates them when a file is opened
        # (close-to-open), but FUSE would trust a cached name of a file another host removed
        # for a second, and bindfs then opens it by that name (ENOENT).
        result = self.run(["bindfs", "-o", "entry_timeout=0,attr_timeout=0,negative_timeout=0",
                           self.shared_dir, self.mountpoint])
        if result.returncode != 0:
            raise RuntimeError(f"host {self.name}: bindfs: {result.stderr.strip()}")
        _wait_until(lambda: fuse_mounts(self.pid1, self.mountpoint), 30,
                    f"the bindfs mount at {self.mountpoint} on host {self.name}")
        self.mount_device = fuse_mounts(self.pid1, self.mountpoint)[0][0]

    def _errors(self):
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    # -- use -----------------------------------------------------------------------------

    def argv(self, cmd, cwd=None):
        """``cmd`` as a process of this host.  ``setpriv --pdeathsig KILL`` makes it die
        with the ``nsenter`` that waits for it, so killing a Popen kills the process."""
        wd = [f"--wdns={cwd}"] if cwd is not None else []
        return ["nsenter", "-t", str(self.pid1), "--pid", "--uts", "--net", "--mount",
                *wd, "--", "setpriv", "--pdeathsig", "KILL", "--", *map(str, cmd)]

    def run(self, cmd, env=None, **kw):
        """subprocess.run in the host: captured text output, no stdin, 120 s timeout.
        ``cwd`` is resolved inside the host (its mountpoint is not the root's)."""
        options = dict(capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
        if "stdout" in kw or "stderr" in kw:
            options.pop("capture_output")
        if "input" in kw:
            options.pop("stdin")
        options.update(kw)
        return subprocess.run(self.argv(cmd, options.pop("cwd", None)), env=env, **options)

    def popen(self, cmd, env=None, **kw):
        """subprocess.Popen in the host (stdin /dev/null unless given).  Its ``pid`` is
        that of ``nsenter``; ``outer_pid(proc)`` is the process's own."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(cmd, kw.pop("cwd", None)), env=env, **kw)

    def outer_pid(self, proc, timeout=30):
        """The root-namespace pid of the process a ``popen`` started (nsenter's child)."""
        path = f"/proc/{proc.pid}/task/{proc.pid}/children"

        def child():
            try:
                with open(path) as fh:
                    return fh.read().split()
            except OSError:
                return ["gone"]
        _wait_until(child, timeout, f"the child of nsenter {proc.pid}")
        found = child()
        if found == ["gone"]:
            raise ProcessLookupError(f"nsenter {proc.pid} has exited")
        return int(found[0])

    def inner_pid(self, outer_pid):
        """The pid that process ``outer_pid`` (root namespace) has inside this host."""
        if _namespace_ids(outer_pid).get("pid") != self.namespaces["pid"]:
            raise ValueError(f"process {outer_pid} is not a process of host {self.name}")
        with open(f"/proc/{outer_pid}/status") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
        raise ValueError(f"no NSpid for process {outer_pid}")

    def processes(self):
        """Root-namespace pids of the live processes in any of this host's namespaces
        (``nsenter`` parents included: they hold its mount and net namespaces)."""
        ours = set(self.namespaces.values())
        return [pid for pid in _pids() if ours & set(_namespace_ids(pid).values())]

    # -- failures ------------------------------------------------------------------------

    @property
    def alive(self):
        """True until the host's init is gone (killed by ``kill_all`` or otherwise)."""
        return self._unshare is not None and self._unshare.poll() is None

    def kill_all(self, timeout=30):
        """Crash the host: SIGKILL its pid 1, so the kernel kills all its processes, and
        return once none is left."""
        if self.pid1 is None:  # init never came up: --kill-child takes it along
            if self.alive:
                self._unshare.kill()
            if self._unshare is not None:
                self._unshare.wait(timeout=timeout)
            return
        if self.alive:
            try:
                os.kill(self.pid1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._unshare is not None:
            # unshare 2.38 says "sigprocmask unblock failed" when its child is killed.
            self._unshare.wait(timeout=timeout)
        _wait_until(lambda: not self.processes(), timeout,
                    f"the processes of host {self.name} to be gone")

    def partition(self):
        """Cut the host off: packets between it and the bridge are dropped."""
        _ip("link", "set", self.veth, "down")

    def heal(self):
        """Restore the link.  Packets sent during the partition wait on unresolved ARP
        entries and would go out late (a stale SYN then broke the first new connection
        about 4 times in 5), so both sides' neighbour entries are flushed first."""
        result = self.run(["ip", "neigh", "flush", "dev", "eth0"])
        if result.returncode != 0:
            raise RuntimeError(f"host {self.name}: ip neigh flush: {result.stderr.strip()}")
        _ip("neigh", "flush", "dev", self.network.name, "to", self.address)
        _ip("link", "set", self.veth, "up")

    def close(self, timeout=30):
        """Kill the host and wait till its mount, processes and interfaces are gone."""
        if self._closed:
            return
        try:
            self.kill_all(timeout)
            if self.mount_device is not None:
                _wait_until(lambda: not self._mount_seen(), timeout,
                            f"the bindfs mount of host {self.name} to be gone")
            if link_exists(self.veth):
                _ip("link", "del", self.veth, check=False)  # may race the netns's teardown
            _wait_until(lambda: not link_exists(self.veth), timeout,
                        f"interface {self.veth} to be gone")
        finally:
            self._stderr.close()
            self._closed = True

    def _mount_seen(self):
        return any(dev == self.mount_device
                   for dev, _, _ in all_fuse_mounts(self.mountpoint))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
