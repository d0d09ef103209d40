"""Child processes that start together: each says 'ready', then waits for 'go' on stdin.

The barrier is an event (a line on a pipe), never a sleep.
"""

import os
import subprocess
import sys

# Prelude for child code: call barrier() when set up, to wait for the parent's go-ahead.
BARRIER = """
import sys


def barrier():
    print("ready", flush=True)
    assert sys.stdin.readline().strip() == "go"
"""


class Children:
    def __init__(self, code, argvs, env, preexec_fn=None):
        self.procs = [
            subprocess.Popen([sys.executable, "-c", code, *map(str, argv)], env=env,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, preexec_fn=preexec_fn)
            for argv in argvs
        ]

    @classmethod
    def of(cls, procs):
        """Children already started some other way (in a simulated host, say)."""
        group = cls.__new__(cls)
        group.procs = list(procs)
        return group

    def wait_ready(self):
        for proc in self.procs:
            line = proc.stdout.readline()
            assert line.strip() == "ready", (line, proc.stderr.read())
        return self

    def go(self):
        for proc in self.procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return self

    def finish(self, timeout=300):
        """Wait for all; return their stdouts.  Fails with the stderr of any that failed."""
        outputs = []
        for proc in self.procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err
            outputs.append(out)
        return outputs

    def kill_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def as_user(uid, gid):
    """preexec_fn that switches a child to (uid, gid) with no supplementary groups."""
    def switch():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    return switch
