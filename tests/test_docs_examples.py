"""The documentation's examples are the commands' real output.

``docs/examples/make_examples.py --check`` builds the examples' cache again (http datasets
on 127.0.0.1, the real ``dtool`` command), runs every documented command and compares with
the committed ``docs/cli/_examples``; what changes from run to run (times, pids, UUIDs, the
host name, column widths, the order of rows) is masked first."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_documented_example_is_what_the_command_prints_now():
    result = subprocess.run([sys.executable, os.path.join("docs", "examples", "make_examples.py"),
                             "--check"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
