"""The clean policy on hand-made candidates: exact selections, no cache directory involved."""

import pytest

from dtool_cache_manager.policies import Candidate, Rules, Selection, lru_key, select

NOW = 1_700_000_000.0
DAY = 86400.0


def cand(relpath, size, days_ago=None, count=0, in_use=False):
    """A candidate last accessed ``days_ago`` days before NOW (None: untracked)."""
    last = None if days_ago is None else NOW - days_ago * DAY
    return Candidate(relpath, size, last, count, in_use=in_use)


def names(items):
    return [c.relpath for c in items]


# A small cache, LRU order: u (untracked), a (40d), b (20d), c (10d), d (1d), e (future).
CACHE = [
    cand("d", 100, 1, count=9),
    cand("b", 300, 20, count=1),
    cand("u", 50, None),
    cand("e", 70, -2, count=3),  # accessed "in the future": clock skew
    cand("a", 200, 40, count=5),
    cand("c", 400, 10, count=2),
]
TOTAL = 1120


def run(rules, candidates=CACHE, now=NOW):
    return select(candidates, rules, now)


def test_no_rule_selects_nothing():
    assert Rules().empty
    assert run(Rules()) == Selection((), ())


def test_remove_all_selects_everything_in_lru_order():
    sel = run(Rules(remove_all=True))
    assert names(sel.remove) == ["u", "a", "b", "c", "d", "e"]
    assert sel.skipped_in_use == ()
    assert sel.expected_freed_bytes == TOTAL


def test_remove_all_skips_in_use():
    cache = [cand("x", 10, 5), cand("y", 20, 6, in_use=True), cand("z", 30, None, in_use=True)]
    sel = run(Rules(remove_all=True), cache)
    assert names(sel.remove) == ["x"]
    assert names(sel.skipped_in_use) == ["z", "y"]
    assert sel.expected_freed_bytes == 10


def test_remove_all_ignores_other_rules():
    rules = Rules(remove_all=True, older_than_seconds=100 * DAY,
                  exclude_frequently_accessed=1, retain_size_bytes=10 ** 9)
    assert names(run(rules).remove) == ["u", "a", "b", "c", "d", "e"]


def test_older_than_alone():
    sel = run(Rules(older_than_seconds=15 * DAY))
    assert names(sel.remove) == ["u", "a", "b"]
    assert sel.expected_freed_bytes == 550


def test_older_than_boundary_is_inclusive():
    assert names(run(Rules(older_than_seconds=20 * DAY)).remove) == ["u", "a", "b"]
    assert names(run(Rules(older_than_seconds=20 * DAY + 1)).remove) == ["u", "a"]


def test_older_than_zero_matches_everything_including_future():
    assert names(run(Rules(older_than_seconds=0)).remove) == ["u", "a", "b", "c", "d", "e"]


def test_future_access_is_never_old():
    cache = [cand("future", 10, -3650), cand("old", 10, 2)]
    assert names(run(Rules(older_than_seconds=1 * DAY), cache).remove) == ["old"]
    assert names(run(Rules(older_than_seconds=1), cache).remove) == ["old"]


def test_untracked_always_matches_older_than():
    cache = [cand("u", 10, None), cand("fresh", 10, 0)]
    assert names(run(Rules(older_than_seconds=10_000 * DAY), cache).remove) == ["u"]


def test_exclude_frequently_accessed_alone():
    sel = run(Rules(exclude_frequently_accessed=3))
    assert names(sel.remove) == ["u", "b", "c"]  # counts 0, 1, 2; a=5, d=9, e=3 kept


def test_exclude_frequently_accessed_edges():
    assert names(run(Rules(exclude_frequently_accessed=1)).remove) == ["u"]
    assert run(Rules(exclude_frequently_accessed=0)) == Selection((), ())
    assert names(run(Rules(exclude_frequently_accessed=10)).remove) == [
        "u", "a", "b", "c", "d", "e"]


def test_older_than_and_exclude_are_anded():
    sel = run(Rules(older_than_seconds=5 * DAY, exclude_frequently_accessed=5))
    assert names(sel.remove) == ["u", "b", "c"]  # a is old but frequent; d, e recent


def test_retain_size_alone_removes_fewest_lru():
    sel = run(Rules(retain_size_bytes=800))  # 1120 -> remove u(50) a(200) b(300) -> 570
    assert names(sel.remove) == ["u", "a", "b"]
    assert sel.expected_freed_bytes == 550
    assert names(run(Rules(retain_size_bytes=870)).remove) == ["u", "a"]  # exactly 870


def test_retain_size_already_met_removes_nothing():
    assert run(Rules(retain_size_bytes=TOTAL)) == Selection((), ())
    assert run(Rules(retain_size_bytes=10 ** 12)) == Selection((), ())


def test_retain_size_zero_removes_everything():
    sel = run(Rules(retain_size_bytes=0))
    assert names(sel.remove) == ["u", "a", "b", "c", "d", "e"]
    assert sel.expected_freed_bytes == TOTAL
    assert sel.skipped_in_use == ()


def test_retain_size_never_picks_in_use_and_counts_them():
    cache = [cand("held", 500, None, in_use=True), cand("a", 100, 9), cand("b", 100, 8),
             cand("c", 100, 7)]
    sel = run(Rules(retain_size_bytes=650), cache)  # 800 total; held stays and counts
    assert names(sel.remove) == ["a", "b"]
    assert sel.skipped_in_use == ()


def test_retain_size_unreachable_removes_all_eligible():
    cache = [cand("held", 500, 30, in_use=True), cand("a", 100, 9), cand("b", 100, 8)]
    sel = run(Rules(retain_size_bytes=100), cache)
    assert names(sel.remove) == ["a", "b"]
    assert sel.skipped_in_use == ()
    assert sel.expected_freed_bytes == 200


def test_older_than_and_retain_size():
    # Candidates older than 5 days: u a b c (950); the total still counts d and e.
    sel = run(Rules(older_than_seconds=5 * DAY, retain_size_bytes=600))
    assert names(sel.remove) == ["u", "a", "b"]  # 1120 - 550 = 570 <= 600
    sel = run(Rules(older_than_seconds=5 * DAY, retain_size_bytes=100))
    assert names(sel.remove) == ["u", "a", "b", "c"]  # unreachable: every candidate


def test_exclude_and_retain_size():
    # Accessed fewer than 3 times: u b c; a (the older one) is protected.
    sel = run(Rules(exclude_frequently_accessed=3, retain_size_bytes=800))
    assert names(sel.remove) == ["u", "b"]  # 1120 - 350 = 770


def test_all_three_filters_and_retain():
    rules = Rules(older_than_seconds=15 * DAY, exclude_frequently_accessed=3,
                  retain_size_bytes=1100)
    assert names(run(rules).remove) == ["u"]  # candidates u b; 1120 - 50 = 1070
    rules = Rules(older_than_seconds=15 * DAY, exclude_frequently_accessed=3,
                  retain_size_bytes=1000)
    assert names(run(rules).remove) == ["u", "b"]  # 1120 - 350 = 770


def test_filters_without_retain_skip_in_use():
    cache = [cand("x", 10, 30, in_use=True), cand("y", 20, 40), cand("z", 30, 1, in_use=True)]
    sel = run(Rules(older_than_seconds=7 * DAY), cache)
    assert names(sel.remove) == ["y"]
    assert names(sel.skipped_in_use) == ["x"]  # z did not match: neither removed nor skipped
    assert sel.expected_freed_bytes == 20


def test_filters_with_retain_do_not_report_in_use():
    cache = [cand("x", 10, 30, in_use=True), cand("y", 20, 40)]
    sel = run(Rules(older_than_seconds=7 * DAY, retain_size_bytes=0), cache)
    assert names(sel.remove) == ["y"]
    assert sel.skipped_in_use == ()


def test_untracked_are_oldest_larger_first():
    cache = [cand("t", 10, 10_000), cand("u1", 5, None), cand("u2", 50, None)]
    assert names(run(Rules(remove_all=True), cache).remove) == ["u2", "u1", "t"]
    assert names(run(Rules(retain_size_bytes=15), cache).remove) == ["u2"]


def test_future_timestamps_order_as_now():
    # Both future accesses count as "now", so they tie with a current one: size, then name.
    cache = [cand("f1", 10, -1), cand("f2", 30, -100), cand("now", 20, 0), cand("old", 1, 3)]
    assert names(run(Rules(remove_all=True), cache).remove) == ["old", "f2", "now", "f1"]


def test_ties_broken_by_size_then_relpath_whatever_the_input_order():
    cache = [cand("b", 10, 5), cand("a", 10, 5), cand("c", 99, 5), cand("z", 1, 6)]
    expected = ["z", "c", "a", "b"]
    for order in (cache, cache[::-1], cache[1:] + cache[:1]):
        assert names(run(Rules(remove_all=True), order).remove) == expected
        assert names(run(Rules(retain_size_bytes=0), order).remove) == expected
    assert names(run(Rules(retain_size_bytes=100), cache).remove) == ["z", "c"]


def test_lru_key_orders_untracked_first():
    assert lru_key(cand("x", 1, None), NOW) < lru_key(cand("y", 1, 10_000), NOW)


def test_empty_cache():
    assert run(Rules(remove_all=True), []) == Selection((), ())
    assert run(Rules(retain_size_bytes=0), []) == Selection((), ())


def test_expected_freed_bytes_sums_removals_only():
    sel = Selection((cand("a", 3), cand("b", 4)), (cand("c", 100, in_use=True),))
    assert sel.expected_freed_bytes == 7
    assert Selection((), ()).expected_freed_bytes == 0


def test_duplicate_relpath_is_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        run(Rules(remove_all=True), [cand("a", 1), cand("a", 2)])


@pytest.mark.parametrize("field", ["older_than_seconds", "exclude_frequently_accessed",
                                   "retain_size_bytes"])
def test_negative_rules_are_rejected(field):
    with pytest.raises(ValueError, match=field):
        Rules(**{field: -1})


def test_rules_empty():
    assert not Rules(remove_all=True).empty
    assert not Rules(retain_size_bytes=0).empty
    assert not Rules(older_than_seconds=0).empty
    assert not Rules(exclude_frequently_accessed=0).empty
