"""Capture real output of ``dtool cache`` commands for the documentation.

Builds a small but realistic cache and runs the real commands against it, so that every
example in ``docs/cli/`` is true output, not hand-written:

1. two local dtool datasets ("rnaseq-2026", "microscopy") with items of varied sizes;
2. served over HTTP on 127.0.0.1 (the test suite's ``CountingDtoolHTTPServer``, throttled so
   that fetch times are measurable);
3. ``dtool item fetch`` run as real subprocesses, several times per item, with
   ``DTOOL_CACHE_DIRECTORY`` pointing at a fresh temporary cache;
4. one item fetched before tracking (``DTOOL_CACHE_MANAGER_DISABLE=1``) and then used
   (so its time saved is estimated), one fetched with tracking off and never again (an
   untracked file, back-dated 45 days), and a stale ``*.tmp`` partial download (2 h old);
5. a subprocess that accesses one item and then waits, so that item is in use;
6. each documented command, its stdout, stderr and exit status written to
   ``docs/cli/_examples/<name>.txt``.

The temporary cache path becomes ``~/.cache/dtool`` and the server's address
``http://example.org``, so the examples read naturally (tables are redrawn to fit).
With setuptools >= 80.9, dtool-cli 0.7.1 prints a ``pkg_resources is deprecated``
UserWarning on every ``dtool`` command where this package's .pth file is not installed
(an editable install); those lines come from dtool-cli and are filtered out.

Run from anywhere with the project's venv first on PATH::

    export PATH=/path/to/dtool-cache-manager/.venv/bin:$PATH
    python docs/examples/make_examples.py

``--keep`` leaves the temporary directory in place (its path is printed).  ``--check``
writes nothing: it compares the output with the committed examples and exits 1 on any
difference beyond what changes from run to run (times, pids, UUIDs, host names, column
widths, the order of rows) — ``tests/test_docs_examples.py`` runs it.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
OUT_DIR = os.path.join(REPO, "docs", "cli", "_examples")
sys.path.insert(0, os.path.join(REPO, "tests"))

import dtoolcore  # noqa: E402
import dtoolcore.utils  # noqa: E402
from humanfriendly.tables import format_pretty_table  # noqa: E402
from humanfriendly.terminal import ansi_strip  # noqa: E402
from support.datasets import make_local_dataset  # noqa: E402
from support.servers import CountingDtoolHTTPServer  # noqa: E402

PLACEHOLDER_CACHE = "~/.cache/dtool"
PLACEHOLDER_URL = "http://example.org"
THROUGHPUT = 4_000_000  # bytes per second the server sends item bodies at
KB = 1000

# name -> {relpath: size in bytes}
DATASETS = {
    "rnaseq-2026": {
        "sample_A_R1.fastq.gz": 610 * KB,
        "sample_A_R2.fastq.gz": 587 * KB,
        "sample_B_R1.fastq.gz": 402 * KB,
        "sample_B_R2.fastq.gz": 389 * KB,
        "counts.tsv": 38 * KB,
    },
    "microscopy": {
        "plate1/A01.tif": 320 * KB,
        "plate1/A02.tif": 318 * KB,
        "plate1/B01.tif": 250 * KB,
        "plate1/B02.tif": 251 * KB,
    },
}

# (dataset, relpath) -> number of tracked `dtool item fetch` runs
FETCHES = [
    ("rnaseq-2026", "counts.tsv", 9),
    ("rnaseq-2026", "sample_A_R1.fastq.gz", 6),
    ("rnaseq-2026", "sample_A_R2.fastq.gz", 4),
    ("rnaseq-2026", "sample_B_R1.fastq.gz", 2),
    ("rnaseq-2026", "sample_B_R2.fastq.gz", 1),
    ("microscopy", "plate1/A01.tif", 3),
    ("microscopy", "plate1/A02.tif", 1),
]
FETCHED_BEFORE_TRACKING = ("microscopy", "plate1/B01.tif", 2)  # then this many tracked hits
UNTRACKED = ("microscopy", "plate1/B02.tif")  # fetched with tracking off, never again
HELD = ("rnaseq-2026", "sample_A_R1.fastq.gz")  # a live process keeps it in use
TRUNCATED = ("rnaseq-2026", "sample_B_R2.fastq.gz")  # damaged for `verify`
CORRUPTED = ("microscopy", "plate1/A02.tif")  # same size, different bytes

# (name, argv after `dtool`); run in this order
COMMANDS = [
    ("summary", ["cache", "summary"]),
    ("summary_json", ["cache", "summary", "--json"]),
    ("ls", ["cache", "ls", "--limit", "5"]),
    ("ls_json", ["cache", "ls", "--sort", "size:desc", "--json", "--limit", "2"]),
    ("ls_count", ["cache", "ls", "--sort", "count"]),
    ("audit_user", ["cache", "audit", "--by", "user"]),
    ("audit_dataset", ["cache", "audit", "--by", "dataset", "--since", "30d"]),
    ("audit_item", ["cache", "audit", "--by", "item"]),
    ("verify_hash", ["cache", "verify", "--hash"]),  # after damage(): see main()
    ("verify_fix", ["cache", "verify", "--fix"]),
    ("clean_default_dry_run", ["cache", "clean", "--dry-run"]),
    ("clean_dry_run", ["cache", "clean", "--dry-run", "--retain-size", "1MB"]),
    ("clean_dry_run_frequent", ["cache", "clean", "--dry-run", "--retain-size", "1MB",
                                "--exclude-frequently-accessed", "5"]),
    ("clean_no_yes", ["cache", "clean", "--all"]),  # stdin is not a terminal: refused
    ("clean_all", ["cache", "clean", "--all", "--yes"]),
    ("bad_size", ["cache", "clean", "--retain-size", "1XB"]),
    ("bad_age", ["cache", "clean", "--older-than", "banana"]),
    ("bad_combination", ["cache", "clean", "--all", "--retain-size", "1TB"]),
    ("bad_option", ["cache", "ls", "--limit", "-1"]),
    ("init", ["cache", "init"]),
]

HOLDER_CODE = """
import sys
import dtoolcore
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
print(ds.item_content_abspath(sys.argv[2]), flush=True)
sys.stdin.readline()  # hold the item until the parent says so
"""

_WARNING_LINE = re.compile(r"UserWarning: pkg_resources is deprecated")

# What differs between two runs of this script, masked before --check compares.
_VOLATILE = [
    (re.compile(r"\d+(\.\d+)? (second|minute|hour|day|week|month|year)s? ago"), "<ago>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00"), "<time>"),
    (re.compile(r"pid \d+"), "pid <pid>"),
    (re.compile(r'"pid": \d+'), '"pid": <pid>'),
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"~?\d+(\.\d+)? (milli)?seconds?"), "<duration>"),
    (re.compile(r'"(estimated_seconds_saved|fetch_seconds)": [0-9.e+-]+'), r'"\1": <n>'),
    (re.compile(r"[\w.-]+@[\w.-]+"), "<user@host>"),
    (re.compile(r"-{3,}"), "---"),
    (re.compile(r" +"), " "),
]
_RULE = re.compile(r"^-{3,}$")


def dtool_env(cache_dir, **extra):
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["DTOOL_CACHE_DIRECTORY"] = cache_dir
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("DTOOL_CACHE_MANAGER_DISABLE", None)
    env.update(extra)
    return env


def build_datasets(base_dir):
    rng = random.Random(2026)
    for name, items in DATASETS.items():
        make_local_dataset(base_dir, name,
                           {relpath: rng.randbytes(size) for relpath, size in items.items()})


def identifier(relpath):
    return dtoolcore.utils.generate_identifier(relpath)


def fetch(uri, relpath, env):
    """``dtool item fetch``; return the cached file's path."""
    proc = subprocess.run(["dtool", "item", "fetch", uri, identifier(relpath)], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"dtool item fetch {uri} {relpath} failed:\n{proc.stderr}")
    return proc.stdout.strip().splitlines()[-1]


def strip_warnings(text):
    """Drop dtool-cli's pkg_resources UserWarning and the source line Python prints after it."""
    out, skip_next = [], False
    for line in text.splitlines():
        if skip_next:
            skip_next = False
            if line.startswith("  "):
                continue
        if _WARNING_LINE.search(line):
            skip_next = True
            continue
        out.append(line)
    return "\n".join(out)


def stabilise(text, cache_dir, base_url):
    for path in {cache_dir, os.path.realpath(cache_dir)}:
        text = text.replace(path, PLACEHOLDER_CACHE)
    for pattern, replacement in _LOCAL_FILESYSTEM:  # /tmp may be ext4, tmpfs, xfs ...
        text = pattern.sub(replacement, text)
    return text.replace(base_url, PLACEHOLDER_URL)


_LOCAL_FILESYSTEM = [
    (re.compile(r"(a local filesystem, )[^)]+(\))"), r"\1ext2/3/4\2"),
    (re.compile(r'("filesystem": )"[^"]*"(,\s*"local": true)'), r'\1"ext2/3/4"\2'),
    (re.compile(r"^(Filesystem: +)\S+( \(local\))$", re.M), r"\1ext2/3/4\2"),
]


def rerender_tables(text):
    """Re-draw humanfriendly tables whose cells the placeholders made shorter."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        j = i
        while j < len(lines) and (_RULE.match(lines[j]) or lines[j].startswith("| ")):
            j += 1
        block = lines[i:j]
        if len(block) >= 3 and _RULE.match(block[0]) and _RULE.match(block[-1]):
            rows = [[cell.strip() for cell in line[2:-2].split(" | ")]
                    for line in block if line.startswith("| ")]
            table = format_pretty_table(rows[1:], rows[0])
            out += ansi_strip(table).split("\n")
            i = j
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def comparable(text):
    """``text`` without what changes from run to run: masked, rows in sorted order."""
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return sorted(line.strip() for line in text.splitlines())


def documented_examples():
    """The example files the pages of docs/cli include."""
    names = set()
    for page in glob.glob(os.path.join(REPO, "docs", "cli", "*.rst")):
        with open(page, encoding="utf-8") as fh:
            names.update(re.findall(r"literalinclude:: _examples/(\w+)\.txt", fh.read()))
    return names


def check(outputs):
    """Exit status 1, with a diff, where an example is not what the command prints now."""
    problems = []
    made = set(outputs)
    for name in sorted(documented_examples() - made):
        problems.append(f"{name}: documented but not made by this script (add it to COMMANDS)")
    for name in sorted(made):
        path = os.path.join(OUT_DIR, f"{name}.txt")
        try:
            with open(path, encoding="utf-8") as fh:
                committed = fh.read()
        except FileNotFoundError:
            problems.append(f"{name}: {path} is missing")
            continue
        if comparable(committed) != comparable(outputs[name]):
            diff = difflib.unified_diff(committed.splitlines(), outputs[name].splitlines(),
                                        f"{name}.txt (committed)", f"{name}.txt (now)",
                                        lineterm="")
            problems.append(f"{name}: differs\n" + "\n".join(diff))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        print("Run: python docs/examples/make_examples.py (and review the diff)",
              file=sys.stderr)
    return 1 if problems else 0


def run_command(argv, env, cache_dir, base_url):
    proc = subprocess.run(["dtool", *argv], env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    output = stabilise(strip_warnings(proc.stdout), cache_dir, base_url)
    output = rerender_tables(output).rstrip("\n")
    text = f"$ {shlex.join(['dtool', *argv])}\n"
    if output:
        text += output + "\n"
    if proc.returncode != 0:
        text += f"$ echo $?\n{proc.returncode}\n"
    return text, proc.returncode


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed examples instead of writing them")
    args = parser.parse_args()
    outputs = {}

    if shutil.which("dtool") != os.path.join(os.path.dirname(sys.executable), "dtool"):
        print("warning: `dtool` on PATH is not this venv's; prepending it for subprocesses",
              file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix="dcm-examples-")
    datasets_dir = os.path.join(tmp, "datasets")
    cache_dir = os.path.join(tmp, "cache")
    os.makedirs(datasets_dir)
    os.makedirs(cache_dir)
    env = dtool_env(cache_dir)
    env_off = dtool_env(cache_dir, DTOOL_CACHE_MANAGER_DISABLE="1")

    build_datasets(datasets_dir)
    server = CountingDtoolHTTPServer(datasets_dir).start()
    server.slow_item_bytes_per_s = THROUGHPUT
    holder = None
    try:
        uri = {name: f"{server.base_url}/{name}" for name in DATASETS}

        # Cached before this package was installed: first one later used, second never.
        ds, relpath, hits = FETCHED_BEFORE_TRACKING
        fetch(uri[ds], relpath, env_off)
        for _ in range(hits):
            fetch(uri[ds], relpath, env)
        path = fetch(uri[UNTRACKED[0]], UNTRACKED[1], env_off)
        old = time.time() - 45 * 86400
        os.utime(path, (old, old))

        paths = {}
        for ds, relpath, count in FETCHES:
            for _ in range(count):
                path = paths[ds, relpath] = fetch(uri[ds], relpath, env)
            print(f"fetched {ds}/{relpath} x{count}: {path}")

        # A leftover partial download, untouched for two hours.
        partial = os.path.join(os.path.dirname(path), identifier("plate1/C01.tif") + ".tif.tmp")
        with open(partial, "wb") as fh:
            fh.write(random.Random(1).randbytes(123 * KB))
        two_hours_ago = time.time() - 2 * 3600
        os.utime(partial, (two_hours_ago, two_hours_ago))

        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER_CODE, uri[HELD[0]], identifier(HELD[1])],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        held_path = holder.stdout.readline().strip()
        if not held_path:
            raise RuntimeError("the holder process did not access its item")
        print(f"holding {held_path} (pid {holder.pid})")

        for name, argv in COMMANDS:
            if name == "verify_hash":
                damage(paths)
            outputs[name], status = run_command(argv, env, cache_dir, server.base_url)
            print(f"{name}: exit {status}")
    finally:
        if holder is not None and holder.poll() is None:
            holder.stdin.write("\n")
            holder.stdin.flush()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
        server.stop()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.check:
        sys.exit(check(outputs))
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, text in outputs.items():
        with open(os.path.join(OUT_DIR, f"{name}.txt"), "w") as fh:
            fh.write(text)


def damage(paths):
    """Truncate one cached file and overwrite bytes in another (its size stays right)."""
    path = paths[TRUNCATED]
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 3)
    with open(paths[CORRUPTED], "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\0" * 16)


if __name__ == "__main__":
    main()
