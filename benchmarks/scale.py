"""Summary, ls and clean on caches of a million small items, against du and bare unlink.

Two caches, each timed against ``du -sb`` on its own tree in the same run.

**Tracked**: ``--items`` files in ``--dirs`` dataset directories (laid out as the http
broker lays them out), with one journalled access per file so that the ledger has a row
for each.  Timed:

- ``dtool-cache summary --json``, warm (the disk index built by an earlier run);
- ``dtool-cache ls --sort accessed --limit 100 --json``;
- ``dtool-cache clean --retain-size X --yes`` with X chosen to remove 10 % of the items, and
  a bare ``os.unlink`` loop over those same files (the baseline for clean) in a twin of the
  cache built the same way; ``--clean-rounds`` times in a row (each clean removes the next
  10 % of the items), compared by their medians;
- the summary right after each clean;
- ``dtool cache summary --json`` through dtool-cli, for reference.

**Untracked**: ``--items`` files in ``--untracked-dirs`` directories that dtool filled before
the plugin came: no journal, no ledger, files written over the past ``--untracked-days``
days.  Timed: the first summary (it scans and indexes the whole tree; run ``--repeat``
times, the bookkeeping removed in between), later summaries, ``ls --sort accessed --limit
100`` and ``clean --older-than 30d --dry-run``.  Then half its files gain a journalled access
(the **mixed** cache: the plugin in use for a while) and later summaries are timed again.

Why a twin: how long ext4 takes to unlink a file depends on where its inode and directory
entry lie.  Files put back after the clean would be laid out differently from the build's
originals: one at a time, 100k of them took 32 s as built, 27 s once put back, and 16 s
when put back in the order they are then unlinked in.  The twin's files were written as the
cache's were, so the clean and the loop remove the same files in the same state.

Why rounds: on this VM one unlink loop over the same number of files took 11 s and 21 s a
few minutes apart, so one clean against one loop could say 1.4x or 1.9x of the same code.
Each clean and each loop starts after ``sync``, so that neither waits for the writeback of
what came before it (the first clean once took 20.7 s, then 10.4 and 12.5 s, when it
followed the writing of the index without one).

Each timing is of the real command in a subprocess, start-up included; the median of
``--repeat`` runs (the clean and the unlink: of ``--clean-rounds`` pairs).  The targets it
checks are printed with the table.

    python benchmarks/scale.py [--items 1000000] [--dirs 300] [--untracked-dirs 800]
                               [--write-rst docs/performance.rst]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

DAY = 86400.0
META = ".dtool-cache-manager"
BIN = os.path.dirname(sys.executable)


@dataclass(frozen=True)
class BuiltItem:
    relpath: str
    size: int
    last_access: float  # 0.0: untracked (no journalled access)


def build_cache(cache_dir: str, n_items: int, n_dirs: int, untracked_share: float = 0.0,
                seed: int = 1, now: Optional[float] = None,
                untracked_age_days: float = 0.0) -> List[BuiltItem]:
    """Write the files and one journal of their accesses; returns what was built.

    Untracked files (a share of ``untracked_share``, never journalled) were last modified
    and read up to ``untracked_age_days`` ago, as in a cache dtool filled before the plugin
    came (0: just now, as written).  Directory mtimes are set a minute into the past, as in
    a cache at rest (a directory changed in the last two seconds is always rescanned, see
    ``diskindex``).
    """
    now = time.time() if now is None else now
    rng = random.Random(seed)
    payload = os.urandom(4096)
    items: List[BuiltItem] = []
    journal_dir = os.path.join(cache_dir, META, "journal")
    os.makedirs(journal_dir, exist_ok=True)
    per_dir = -(-n_items // n_dirs)
    lines = [json.dumps(["j", 1, "bench", "benchhost", 1, now]) + "\n"]
    dirs = []
    for d in range(n_dirs):
        uuid = str(uuidlib.UUID(int=rng.getrandbits(128)))
        rel_dir = os.path.join("http", uuid)
        dirs.append(rel_dir)
        os.makedirs(os.path.join(cache_dir, rel_dir), exist_ok=True)
        uri = f"http://127.0.0.1:8080/dataset-{d}"
        for i in range(min(per_dir, n_items - d * per_dir)):
            identifier = hashlib.sha1(f"{d}/{i}".encode()).hexdigest()
            relpath = os.path.join(rel_dir, identifier + ".dat")
            size = rng.randint(100, 2000)
            fd = os.open(os.path.join(cache_dir, relpath), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, payload[:size])
            os.close(fd)
            last = 0.0
            if rng.random() < untracked_share:
                if untracked_age_days:
                    written = now - rng.random() * untracked_age_days * DAY
                    os.utime(os.path.join(cache_dir, relpath), (written, written))
            else:
                last = now - rng.random() * 60 * DAY
                lines.append(json.dumps(
                    ["a", relpath, uri, uuid, identifier, "http", int(last * 1e6), 1, size,
                     int((last - 1) * 1e6), rng.randint(1000, 900000)]) + "\n")
            items.append(BuiltItem(relpath, size, last))
    with open(os.path.join(journal_dir, "bench.journal.jsonl"), "w") as fh:
        fh.writelines(lines)
    past = now - 60
    for rel_dir in dirs + ["http", ""]:
        os.utime(os.path.join(cache_dir, rel_dir), (past, past))
    return items


def lru_first(items: List[BuiltItem]) -> List[BuiltItem]:
    """The build's items in the order ``clean --retain-size`` removes them (untracked files
    count as used at their mtime, i.e. just now, as they were written by the build)."""
    return sorted(items, key=lambda i: (i.last_access or time.time(), -i.size, i.relpath))


def files_apparent_size(cache_dir: str) -> Tuple[int, int]:
    """(du -sb of the tree without our bookkeeping, the part of it that is not files:
    directories' own sizes and symbolic links', which the cache never follows or counts)."""
    out = subprocess.run(["du", "-sb", f"--exclude={META}", cache_dir], check=True,
                         capture_output=True, text=True).stdout
    not_files = 0
    for root, dirnames, filenames in os.walk(cache_dir):
        if root == cache_dir and META in dirnames:
            dirnames.remove(META)
        not_files += os.lstat(root).st_size
        not_files += sum(os.lstat(path).st_size for path in
                         (os.path.join(root, name) for name in filenames)
                         if os.path.islink(path))
    return int(out.split()[0]), not_files


def timed(cmd: List[str], env: Dict[str, str]) -> Tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr}")
    return elapsed, proc.stdout


def median_time(cmd: List[str], env: Dict[str, str], repeat: int) -> Tuple[float, str]:
    runs = [timed(cmd, env) for _ in range(repeat)]
    return statistics.median(t for t, _ in runs), runs[-1][1]


def bare_unlink_seconds(twin_dir: str, relpaths: List[str]) -> float:
    """Time a Python process that unlinks exactly ``relpaths`` in the twin, in path order as
    the clean does (in LRU order it took as long: 21.7 s against 21.0 s).  The twin is
    synced to disk first, as the cache long was: unlinking a file created in the same
    journal transaction costs a fifth as much."""
    os.sync()
    listing = os.path.join(twin_dir, "..", "unlink-list.json")
    with open(listing, "w") as fh:
        json.dump([os.path.join(twin_dir, r) for r in sorted(relpaths)], fh)
    code = ("import json, os, sys\n"
            "for p in json.load(open(sys.argv[1])):\n"
            "    os.unlink(p)\n")
    elapsed, _ = timed([sys.executable, "-c", code, listing], dict(os.environ))
    os.unlink(listing)
    return elapsed


def command_env(cache_dir: str) -> Tuple[Dict[str, str], List[str]]:
    """The environment and ``dtool-cache`` command line for the commands timed on a cache."""
    env = dict(os.environ, DTOOL_CACHE_DIRECTORY=cache_dir)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: byte code cached after one run
    return env, [os.path.join(BIN, "dtool-cache")]


def run_tracked(n_items: int, n_dirs: int, repeat: int, clean_rounds: int,
                workdir: str) -> Tuple[List[List[str]], Dict[str, bool]]:
    cache_dir = os.path.join(workdir, "cache")
    env, dtool_cache = command_env(cache_dir)
    print(f"building {n_items:,} items in {n_dirs} directories under {cache_dir} ...",
          flush=True)
    start = time.perf_counter()
    built_at = time.time()
    items = build_cache(cache_dir, n_items, n_dirs, now=built_at)
    twin_dir = os.path.join(workdir, "twin")
    if build_cache(twin_dir, n_items, n_dirs, now=built_at) != items:
        raise SystemExit("the twin differs from the cache")
    os.sync()
    print(f"  built it and its twin in {time.perf_counter() - start:.0f} s", flush=True)

    first, _ = timed(dtool_cache + ["summary", "--json"], env)
    if not os.path.isfile(os.path.join(cache_dir, META, "ledger.sqlite3")):
        raise SystemExit("no ledger was written: the commands fell back to a read-only view")
    print(f"  first summary (folds {n_items:,} journal records, builds the index): "
          f"{first:.1f} s", flush=True)
    du_total, dir_bytes = files_apparent_size(cache_dir)  # the build makes no links
    du_seconds, _ = median_time(["du", "-sb", f"--exclude={META}", cache_dir], env, repeat)
    summary_seconds, out = median_time(dtool_cache + ["summary", "--json"], env, repeat)
    summary = json.loads(out)
    ls_seconds, out = median_time(dtool_cache + ["ls", "--sort", "accessed", "--limit", "100",
                                                 "--json"], env, repeat)
    listed = json.loads(out)
    dtool_seconds, _ = median_time([os.path.join(BIN, "dtool"), "cache", "summary", "--json"],
                                   env, repeat)

    order = lru_first(items)
    n_remove = n_items // 10
    rounds = []  # (clean seconds, unlink seconds)
    after_clean = []  # (seconds, items) of the summary that follows each clean
    removed_ok = True
    for r in range(clean_rounds):
        expected = order[r * n_remove:(r + 1) * n_remove]
        retain = sum(i.size for i in order[(r + 1) * n_remove:])
        os.sync()  # as before the bare unlink: see the module docstring
        clean_seconds, out = timed(dtool_cache + ["clean", "--retain-size", str(retain),
                                                  "--yes", "--json"], env)
        removed = json.loads(out)["removed"]
        removed_ok &= sorted(removed) == sorted(i.relpath for i in expected)
        unlink_seconds = bare_unlink_seconds(twin_dir, removed)
        rounds.append((clean_seconds, unlink_seconds))
        print(f"  round {r + 1}: clean {clean_seconds:.2f} s, bare unlink "
              f"{unlink_seconds:.2f} s ({clean_seconds / unlink_seconds:.2f}x)", flush=True)
        # The clean changed every directory; the next command rescans them (so each clean
        # starts from the same state, this is timed apart).
        after_seconds, out = timed(dtool_cache + ["summary", "--json"], env)
        after_clean.append((after_seconds, json.loads(out)["num_items"]))
    after_seconds = statistics.median(t for t, _ in after_clean)
    clean_seconds = statistics.median(c for c, _ in rounds)
    unlink_seconds = statistics.median(u for _, u in rounds)
    ratios = ", ".join(f"{c / u:.2f}" for c, u in rounds)

    files_total = du_total - dir_bytes
    checks = {
        "summary total == du apparent size of the files":
            summary["total_size_bytes"] == files_total,
        "summary items == items built": summary["num_items"] == n_items,
        "ls lists the 100 most recently used":
            [i["path"] for i in listed] == [i.relpath for i in order[::-1][:100]],
        "each clean removed exactly the next 10 % least recently used": removed_ok,
        "summary after each clean == items left":
            [n for _, n in after_clean] == [n_items - (r + 1) * n_remove
                                            for r in range(clean_rounds)],
        "warm summary <= 0.1x du -sb": summary_seconds <= 0.1 * du_seconds,
        "ls under 0.3 s": ls_seconds < 0.3,
        "clean at most 1.5x the bare unlink (medians)": clean_seconds <= 1.5 * unlink_seconds,
        "summary right after a clean <= 0.2x du -sb": after_seconds <= 0.2 * du_seconds,
    }
    rows = [
        ["du -sb (baseline)", f"{du_seconds:.2f}", "", f"{du_total:,} B "
         f"({files_total:,} in files + {dir_bytes:,} in directory entries)"],
        ["dtool-cache summary --json, warm", f"{summary_seconds:.2f}",
         f"{summary_seconds / du_seconds:.2f}x du",
         f"{summary['total_size_bytes']:,} B in {summary['num_items']:,} items"],
        ["dtool-cache ls --sort accessed --limit 100 --json", f"{ls_seconds:.2f}", "",
         f"{len(listed)} items"],
        ["dtool-cache clean --retain-size X --yes (median)", f"{clean_seconds:.2f}",
         f"{clean_seconds / unlink_seconds:.2f}x the bare unlink",
         f"{n_remove:,} files per clean; rounds {ratios}x"],
        ["bare os.unlink of the same files (baseline, median)", f"{unlink_seconds:.2f}", "",
         "clean: " + ", ".join(f"{c:.1f}" for c, _ in rounds)
         + " s; unlink: " + ", ".join(f"{u:.1f}" for _, u in rounds) + " s"],
        ["dtool cache summary --json (dtool-cli, for reference)", f"{dtool_seconds:.2f}",
         "", "dtool-cli start-up included"],
        ["first summary: folds the journal, builds the index", f"{first:.2f}", "",
         "once per cache"],
        ["summary right after a clean (checks the directories it changed)",
         f"{after_seconds:.2f}", f"{after_seconds / du_seconds:.2f}x du",
         "median; then " + ", ".join(f"{n:,}" for _, n in after_clean) + " items"],
    ]
    report_checks(checks)
    return rows, checks


def report_checks(checks: Dict[str, bool]) -> None:
    for name, ok in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}")


def journal_accesses(cache_dir: str, items: List[BuiltItem], share: float, seed: int = 2,
                     now: Optional[float] = None) -> List[BuiltItem]:
    """A finished process's journal with one access of a ``share`` of ``items`` (written
    as build_cache writes its own); returns the items as they are now."""
    now = time.time() if now is None else now
    rng = random.Random(seed)
    lines = [json.dumps(["j", 1, "bench", "benchhost", 2, now]) + "\n"]
    result = []
    for item in items:
        if rng.random() < share:
            uuid = item.relpath.split("/")[1]
            identifier = item.relpath.rsplit("/", 1)[1][:40]
            last = now - rng.random() * 60 * DAY
            lines.append(json.dumps(
                ["a", item.relpath, f"http://127.0.0.1:8080/{uuid}", uuid, identifier, "http",
                 int(last * 1e6), 0, item.size, int((last - 1) * 1e6), 0]) + "\n")
            item = BuiltItem(item.relpath, item.size, last)
        result.append(item)
    path = os.path.join(cache_dir, META, "journal", f"mixed-{seed}.journal.jsonl")
    with open(path, "w") as fh:
        fh.writelines(lines)
    return result


def run_untracked(n_items: int, n_dirs: int, days: float, repeat: int,
                  workdir: str) -> Tuple[List[List[str]], Dict[str, bool]]:
    cache_dir = os.path.join(workdir, "untracked")
    env, dtool_cache = command_env(cache_dir)
    print(f"building {n_items:,} untracked items in {n_dirs} directories, written over "
          f"{days:g} days, under {cache_dir} ...", flush=True)
    start = time.perf_counter()
    items = build_cache(cache_dir, n_items, n_dirs, untracked_share=1.0, seed=3,
                        untracked_age_days=days)
    shutil.rmtree(os.path.join(cache_dir, META))  # dtool alone: no bookkeeping at all
    os.sync()
    print(f"  built it in {time.perf_counter() - start:.0f} s", flush=True)
    du_cmd = ["du", "-sb", f"--exclude={META}", cache_dir]
    du_seconds, _ = median_time(du_cmd, env, repeat)

    firsts = []
    for _ in range(repeat):
        shutil.rmtree(os.path.join(cache_dir, META), ignore_errors=True)
        seconds, out = timed(dtool_cache + ["summary", "--json"], env)
        firsts.append(seconds)
    first_seconds = statistics.median(firsts)
    first = json.loads(out)
    du_after, _ = median_time(du_cmd, env, repeat)  # and again: the page cache may have moved
    du_seconds = statistics.median([du_seconds, du_after])
    summary_seconds, out = median_time(dtool_cache + ["summary", "--json"], env, repeat)
    summary = json.loads(out)
    ls_seconds, out = median_time(dtool_cache + ["ls", "--sort", "accessed", "--limit", "100",
                                                 "--json"], env, repeat)
    listed = json.loads(out)
    written = {i.relpath: os.stat(os.path.join(cache_dir, i.relpath)).st_mtime for i in items}
    before = time.time()
    plan_seconds, out = median_time(dtool_cache + ["clean", "--older-than", "30d",
                                                   "--dry-run"], env, repeat)
    after = time.time()
    # The totals are the plan's last line (its files are listed per dataset beyond 20).
    planned = int(re.fullmatch(r"Would remove (\d+) files?, freeing .*\.",
                               out.strip().splitlines()[-1]).group(1))
    # Files cross the 30-day line as the runs go: count at both ends of the last run.
    old_at = lambda t: sum(1 for m in written.values() if t - m >= 30 * DAY)  # noqa: E731

    mixed = journal_accesses(cache_dir, items, 0.5)
    tracked = sum(1 for i in mixed if i.last_access)
    fold_seconds, _ = timed(dtool_cache + ["summary", "--json"], env)
    mixed_seconds, out = median_time(dtool_cache + ["summary", "--json"], env, repeat)
    mixed_summary = json.loads(out)
    du_total, dir_bytes = files_apparent_size(cache_dir)

    checks = {
        "first summary total == du apparent size of the files":
            first["total_size_bytes"] == du_total - dir_bytes
            and first["num_untracked"] == n_items,
        "ls on the untracked cache: none accessed, so ties by path (descending)":
            [i["path"] for i in listed] == sorted(i.relpath for i in items)[::-1][:100],
        "the dry run plans exactly the files older than 30 days":
            old_at(before) <= planned <= old_at(after),
        "mixed summary counts the tracked and untracked files":
            (mixed_summary["num_items"], mixed_summary["num_untracked"])
            == (n_items, n_items - tracked),
        "first summary (untracked) <= 3x du -sb": first_seconds <= 3 * du_seconds,
        "later summary (untracked) <= 0.1x du -sb": summary_seconds <= 0.1 * du_seconds,
        "ls --sort accessed --limit 100 (untracked) <= 0.5x du -sb":
            ls_seconds <= 0.5 * du_seconds,
        "clean --older-than 30d --dry-run (untracked) <= 0.5x du -sb":
            plan_seconds <= 0.5 * du_seconds,
        "later summary (mixed) <= 0.1x du -sb": mixed_seconds <= 0.1 * du_seconds,
    }
    ratio = lambda seconds: f"{seconds / du_seconds:.2f}x du"  # noqa: E731
    rows = [
        ["du -sb (baseline), untracked cache", f"{du_seconds:.2f}", "",
         f"{du_total:,} B; {n_items:,} files in {n_dirs} directories"],
        ["first summary: scans and indexes every file", f"{first_seconds:.2f}",
         ratio(first_seconds), "runs: " + ", ".join(f"{t:.2f}" for t in firsts) + " s"],
        ["dtool-cache summary --json, later (untracked)", f"{summary_seconds:.2f}",
         ratio(summary_seconds), f"{summary['num_untracked']:,} untracked"],
        ["dtool-cache ls --sort accessed --limit 100 (untracked)", f"{ls_seconds:.2f}",
         ratio(ls_seconds), f"{len(listed)} items"],
        ["dtool-cache clean --older-than 30d --dry-run (untracked)", f"{plan_seconds:.2f}",
         ratio(plan_seconds), f"{planned:,} files planned (written {days:g} days back)"],
        ["first summary once half the files were accessed", f"{fold_seconds:.2f}",
         ratio(fold_seconds), f"folds {tracked:,} journalled accesses"],
        ["dtool-cache summary --json, later (mixed)", f"{mixed_seconds:.2f}",
         ratio(mixed_seconds), f"{tracked:,} tracked, "
                               f"{mixed_summary['num_untracked']:,} untracked"],
    ]
    report_checks(checks)
    return rows, checks


def table(sections: List[Tuple[str, List[List[str]]]], n_items: int,
          checks: Dict[str, bool]) -> str:
    """One table per cache, each under its title, then the targets."""
    header = ["operation", "seconds", "vs baseline", "result"]
    out: List[str] = []
    for title, rows in sections:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(4)]
        line = "  ".join("=" * w for w in widths)
        out += [title, "", line,
                "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), line]
        out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        out += [line, ""]
    out.append(f"{n_items:,} items per cache, {os.cpu_count()} cores.  Targets:")
    out.append("")
    out += [f"- {'met' if ok else 'NOT met'}: {name}" for name, ok in checks.items()]
    return "\n".join(out)


def write_rst(path: str, text: str) -> None:
    start, end = ".. scale-start", ".. scale-end"
    with open(path) as fh:
        page = fh.read()
    block = f"{start}\n\n{text}\n\n{end}"
    if start in page and end in page:
        page = page[:page.index(start)] + block + page[page.index(end) + len(end):]
    else:
        page = page.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as fh:
        fh.write(page)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--dirs", type=int, default=300)
    parser.add_argument("--untracked-dirs", type=int, default=800)
    parser.add_argument("--untracked-days", type=float, default=33.0,
                        help="the untracked files were written over this many days "
                             "(33: a tenth of them are older than 30 days)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--clean-rounds", type=int, default=3,
                        help="cleans in a row, each removing the next 10 %% of the items")
    parser.add_argument("--only", choices=("tracked", "untracked"),
                        help="time one of the two caches")
    parser.add_argument("--workdir", help="build here (default: a temporary directory, "
                                          "removed afterwards)")
    parser.add_argument("--write-rst", metavar="PATH")
    args = parser.parse_args()
    if min(args.items, args.dirs, args.untracked_dirs, args.repeat, args.clean_rounds) < 1:
        parser.error("--items, --dirs, --untracked-dirs, --repeat and --clean-rounds must "
                     "be >= 1")
    workdir = args.workdir or tempfile.mkdtemp(prefix="dcm-scale-")
    sections: List[Tuple[str, List[List[str]]]] = []
    checks: Dict[str, bool] = {}
    try:
        if args.only != "untracked":
            rows, found = run_tracked(args.items, args.dirs, args.repeat, args.clean_rounds,
                                      workdir)
            sections.append((f"*tracked: {args.items:,} files in {args.dirs} directories, "
                             f"each accessed once*", rows))
            checks.update(found)
        if args.only != "tracked":
            rows, found = run_untracked(args.items, args.untracked_dirs, args.untracked_days,
                                        args.repeat, workdir)
            sections.append((f"*untracked, then mixed: {args.items:,} files in "
                             f"{args.untracked_dirs} directories, filled before install*",
                             rows))
            checks.update(found)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = table(sections, args.items, checks)
    print()
    print(text)
    if args.write_rst:
        write_rst(args.write_rst, text)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
