"""A full disk or quota (RLIMIT_FSIZE: writes past the limit fail with EFBIG, as they would
with ENOSPC or EDQUOT): data access still works, the journal catches up once space returns
or says how many accesses it could not record, and clean still frees space."""

import json
import os
import resource
import subprocess
import sys

import dtool_cache_manager as dcm

LIMITED = """
import json, os, resource, sys, dtoolcore
from dtool_cache_manager import journal
journal.MAX_PENDING = int(sys.argv[3])
ds = dtoolcore.DataSet.from_uri(sys.argv[1])
ids, n = sorted(ds.identifiers), int(sys.argv[2])
ds.item_content_abspath(ids[0])  # our files exist before the quota bites
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))  # no file may grow any more
paths = [ds.item_content_abspath(ids[k % len(ids)]) for k in range(n)]
ok = all(os.path.getsize(p) > 0 for p in paths)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space returns
ds.item_content_abspath(ids[0])
print(json.dumps({"ok": ok, "paths": len(set(paths))}))
"""


def _fill(ds, cache_dir, make_env):
    code = ("import sys, dtoolcore\nds = dtoolcore.DataSet.from_uri(sys.argv[1])\n"
            "[ds.item_content_abspath(i) for i in ds.identifiers]\n")
    subprocess.run([sys.executable, "-c", code, ds.uri], env=make_env(cache_dir), check=True)


def _count(ds):
    return sum(dcm.num_times_accessed(ds.uri, i) for i in ds.identifiers.values())


def _access_on_a_full_disk(http_dataset, cache_dir, make_env, kept):
    """Fill a cache, then make 30 accesses with the journal's disk full, keeping at most
    ``kept`` lines in memory; returns (dataset, accesses counted before, the run)."""
    ds = http_dataset({f"f{i}.txt": b"x" * 100 for i in range(4)})
    _fill(ds, cache_dir, make_env)
    before = _count(ds)
    run = subprocess.run([sys.executable, "-c", LIMITED, ds.uri, "30", str(kept)],
                         env=make_env(cache_dir), capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return ds, before, run


def test_accesses_survive_a_full_disk_and_the_journal_catches_up(http_dataset, cache_dir,
                                                                 make_env):
    ds, before, run = _access_on_a_full_disk(http_dataset, cache_dir, make_env, kept=100000)
    assert json.loads(run.stdout) == {"ok": True, "paths": 4}
    assert "cannot write the access journal" in run.stderr
    assert "Traceback" not in run.stderr
    assert _count(ds) == before + 1 + 30 + 1  # every access recorded once space returned


def test_what_could_not_be_kept_is_counted(http_dataset, cache_dir, make_env):
    ds, before, run = _access_on_a_full_disk(http_dataset, cache_dir, make_env, kept=5)
    summary = json.loads(subprocess.run(["dtool-cache", "summary", "--json"], check=True,
                                        capture_output=True, text=True,
                                        env=make_env(cache_dir)).stdout)
    lost = summary["lost_records"]
    assert lost >= 30 - 5  # at most 5 lines were kept in memory
    assert f"{lost} accesses could not be recorded" in run.stderr
    assert _count(ds) + lost == before + 1 + 30 + 1  # each access recorded or counted lost


def _no_growth():
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1, hard))


def test_clean_frees_space_on_a_full_disk(http_dataset, cache_dir, make_env):
    ds = http_dataset({f"f{i}.bin": os.urandom(3000) for i in range(4)})
    _fill(ds, cache_dir, make_env)
    run = subprocess.run(["dtool-cache", "clean", "--all", "--yes", "--json"],
                         env=make_env(cache_dir), capture_output=True, text=True,
                         preexec_fn=_no_growth, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["freed_bytes"] == 4 * 3000
    assert "Traceback" not in run.stderr
    assert dcm.cache_num_items() == 0
    with dcm.open_ledger(str(cache_dir)) as ledger:  # space is back: the ledger catches up
        from dtool_cache_manager import report

        report.inventory(str(cache_dir))
        assert ledger.items() == [] or all(
            not os.path.exists(cache_dir / r.relpath) for r in ledger.items())
    with dcm.open_ledger(str(cache_dir)) as ledger:
        assert ledger.items() == []
