"""The order a clean removes in: every planned file once, each batch a run from every region."""
import pytest

from dtool_cache_manager.executor import PlannedRemoval, regions_interleaved


def _planned(n):
    return [PlannedRemoval(f"http/u{k // 100:04d}/{k:06d}.dat", 1)
            for k in range(n)]


@pytest.mark.parametrize("n", [0, 1, 3, 511, 512, 513, 5000, 100_003])
def test_every_planned_file_comes_once(n):
    ordered = _planned(n)
    assert sorted(regions_interleaved(ordered, 4, 512), key=lambda p: p.relpath) == ordered


def test_each_batch_takes_an_ordered_run_from_every_region():
    ordered = _planned(4096)
    interleaved = regions_interleaved(ordered, 4, 512)
    first = interleaved[:512]
    # one run of 128 from each quarter, each run in path order
    assert [p.relpath for p in first[:128]] == [p.relpath for p in ordered[:128]]
    assert [p.relpath for p in first[128:256]] == [p.relpath for p in ordered[1024:1152]]
    assert [p.relpath for p in first[384:]] == [p.relpath for p in ordered[3072:3200]]
    assert [p.relpath for p in interleaved[512:640]] == [p.relpath for p in ordered[128:256]]
