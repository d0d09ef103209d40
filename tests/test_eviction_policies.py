"""Eviction policies for ``--retain-size`` on hand-made rows: exact removal orders."""

import pytest

from dtool_cache_manager.policies import (
    POLICIES, Candidate, Rules, cost_order, cost_value, lfu_order, lru_key, lru_order,
    mean_seconds_per_byte, removal_order, select, seconds_per_fetch)

NOW = 1_700_000_000.0
DAY = 86400.0


def cand(relpath, size, days_ago=None, count=0, secs=0.0, misses=0, in_use=False):
    """A candidate last accessed ``days_ago`` days before NOW (None: untracked)."""
    last = None if days_ago is None else NOW - days_ago * DAY
    return Candidate(relpath, size, last, count, in_use=in_use, fetch_seconds=secs,
                     misses=misses)


def names(items):
    return [c.relpath for c in items]


# Sizes in bytes, fetch seconds measured; LRU order: u a b c d.
ROWS = [
    cand("d", 100, 1, count=1, secs=50.0, misses=1),    # value 1*50/100   = 0.5
    cand("b", 300, 20, count=4, secs=6.0, misses=2),    # value 4*3/300    = 0.04
    cand("u", 50, None),                                # untracked: value 0
    cand("a", 200, 40, count=9, secs=10.0, misses=1),   # value 9*10/200   = 0.45
    cand("c", 400, 10, count=2, secs=80.0, misses=4),   # value 2*20/400   = 0.1
]


def test_policies_constant():
    assert POLICIES == ("lru", "lfu", "cost")
    assert Rules().policy == "lru"


@pytest.mark.parametrize("policy", POLICIES)
def test_valid_policies_accepted(policy):
    assert Rules(retain_size_bytes=0, policy=policy).policy == policy


@pytest.mark.parametrize("policy", ["LRU", "fifo", ""])
def test_unknown_policy_rejected(policy):
    with pytest.raises(ValueError, match="policy"):
        Rules(policy=policy)
    with pytest.raises(ValueError, match="policy"):
        removal_order(ROWS, policy, NOW)


def test_negative_fallback_rejected():
    with pytest.raises(ValueError, match="fallback_seconds_per_byte"):
        Rules(fallback_seconds_per_byte=-1.0)


def test_policy_alone_is_not_a_rule():
    assert Rules(policy="cost").empty


# -- lru ------------------------------------------------------------------------------------


def test_lru_order_matches_lru_key_sort():
    assert names(lru_order(ROWS, NOW)) == ["u", "a", "b", "c", "d"]
    for rows in (ROWS, ROWS[::-1]):
        assert lru_order(rows, NOW) == sorted(rows, key=lambda c: lru_key(c, NOW))


def test_lru_default_select_unchanged():
    rules = Rules(retain_size_bytes=600)  # 1050 total -> remove u a b (550) -> 500
    assert select(ROWS, rules, NOW) == select(ROWS, Rules(retain_size_bytes=600, policy="lru"),
                                              NOW)
    assert names(select(ROWS, rules, NOW).remove) == ["u", "a", "b"]


# -- lfu ------------------------------------------------------------------------------------


def test_lfu_order():
    assert names(lfu_order(ROWS, NOW)) == ["u", "d", "c", "b", "a"]  # counts 0 1 2 4 9


def test_lfu_ties_lru_then_larger_then_relpath():
    rows = [cand("new", 10, 1, count=3), cand("old", 10, 9, count=3),
            cand("small", 5, 5, count=3), cand("big", 50, 5, count=3),
            cand("y", 7, 5, count=3), cand("x", 7, 5, count=3), cand("rare", 1, 0, count=2)]
    expected = ["rare", "old", "big", "x", "y", "small", "new"]
    for order in (rows, rows[::-1], rows[3:] + rows[:3]):
        assert names(lfu_order(order, NOW)) == expected


def test_lfu_select_retain_size():
    sel = select(ROWS, Rules(retain_size_bytes=600, policy="lfu"), NOW)
    assert names(sel.remove) == ["u", "d", "c"]  # 1050 - 550 = 500


# -- cost -----------------------------------------------------------------------------------


def test_seconds_per_fetch():
    assert seconds_per_fetch(cand("x", 1, 1, count=5, secs=12.0, misses=4)) == 3.0
    assert seconds_per_fetch(cand("x", 1, 1, count=5, secs=12.0, misses=0)) == 12.0
    assert seconds_per_fetch(cand("x", 1, 1, count=5)) is None


def test_cost_values_and_order():
    values = {c.relpath: cost_value(c, 0.0) for c in ROWS}
    assert values == pytest.approx({"u": 0.0, "b": 0.04, "c": 0.1, "a": 0.45, "d": 0.5})
    assert names(cost_order(ROWS, NOW)) == ["u", "b", "c", "a", "d"]


def test_cost_select_keeps_dearest_per_byte():
    sel = select(ROWS, Rules(retain_size_bytes=600, policy="cost"), NOW)
    assert names(sel.remove) == ["u", "b", "c"]  # 1050 - 750 = 300: keeps a and d
    sel = select(ROWS, Rules(retain_size_bytes=800, policy="cost"), NOW)
    assert names(sel.remove) == ["u", "b"]  # 1050 - 350 = 700


def test_cost_ties_in_lru_order():
    rows = [cand("new", 100, 1, count=1, secs=1.0), cand("old", 100, 9, count=1, secs=1.0),
            cand("b", 200, 5, count=1, secs=2.0), cand("a", 200, 5, count=1, secs=2.0),
            cand("big", 400, 5, count=1, secs=4.0)]  # every value is 0.01
    expected = ["old", "big", "a", "b", "new"]
    for order in (rows, rows[::-1]):
        assert names(cost_order(order, NOW)) == expected


def test_cost_zero_size_files_go_last_unless_worthless():
    rows = [cand("empty", 0, 1, count=3, secs=0.3, misses=1),  # counts as 1 byte: 0.9
            cand("worthless", 0, 1),                            # saves nothing: 0
            cand("big", 1000, 1, count=1, secs=1.0, misses=1)]  # 0.001
    assert names(cost_order(rows, NOW)) == ["worthless", "big", "empty"]
    sel = select(rows, Rules(retain_size_bytes=0, policy="cost"), NOW)
    assert names(sel.remove) == ["worthless", "big"]  # 0 bytes reached: empty stays


def test_mean_seconds_per_byte_is_ratio_of_sums():
    # Measured: b (3 s/fetch, 300 B), c (20 s/fetch, 400 B); d, a too.
    assert mean_seconds_per_byte(ROWS) == pytest.approx((50 + 3 + 10 + 20) / 1000)
    assert mean_seconds_per_byte([cand("x", 10, 1, count=1)]) == 1.0
    assert mean_seconds_per_byte([]) == 1.0
    assert mean_seconds_per_byte([cand("z", 0, 1, count=1, secs=2.0, misses=1)]) == 1.0


def test_cost_missing_fetch_time_uses_fallback():
    # slow: 1 s per 100 B measured; fast: 0.1 s per 100 B; unknown: size * fallback.
    rows = [cand("slow", 100, 1, count=1, secs=1.0, misses=1),
            cand("fast", 100, 1, count=1, secs=0.1, misses=1),
            cand("unknown", 100, 1, count=1)]
    # Default fallback (1.1 s / 200 B) puts unknown between fast and slow.
    assert names(cost_order(rows, NOW)) == ["fast", "unknown", "slow"]
    assert names(cost_order(rows, NOW, 0.0)) == ["unknown", "fast", "slow"]
    assert names(cost_order(rows, NOW, 1.0)) == ["fast", "slow", "unknown"]
    assert names(select(rows, Rules(retain_size_bytes=200, policy="cost"), NOW).remove) == [
        "fast"]
    rules = Rules(retain_size_bytes=200, policy="cost", fallback_seconds_per_byte=0.0)
    assert names(select(rows, rules, NOW).remove) == ["unknown"]


def test_select_cost_fallback_uses_whole_cache_not_just_matched():
    # Only 'unknown' and 'fast' pass the filter; 'slow' (frequent) still sets the mean rate.
    rows = [cand("slow", 100, 30, count=5, secs=50.0, misses=5),  # 0.1 s/B, kept by filter
            cand("fast", 100, 30, count=2, secs=0.2, misses=2),   # value 2*0.1/100 = 0.002
            cand("unknown", 100, 30, count=1)]                    # value = the mean rate
    rules = Rules(exclude_frequently_accessed=5, retain_size_bytes=200, policy="cost")
    assert names(select(rows, rules, NOW).remove) == ["fast"]  # 10.1 s / 200 B > 0.002
    # Over the matched rows alone the mean would be fast's 0.001 s/B: unknown would go first.
    assert names(cost_order(rows[1:], NOW)) == ["unknown", "fast"]


def test_cost_without_measurements_orders_like_lfu():
    rows = [cand(n, s, d, count=k) for n, s, d, k in
            [("a", 10, 5, 3), ("b", 99, 2, 1), ("c", 7, 9, 1), ("d", 1, None, 0), ("e", 5, 1, 3)]]
    assert names(cost_order(rows, NOW)) == names(lfu_order(rows, NOW)) == [
        "d", "c", "b", "a", "e"]


# -- select with a policy -------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_only_orders_retain_size(policy):
    """Filters and remove_all report in lru order whatever the policy."""
    assert names(select(ROWS, Rules(remove_all=True, policy=policy), NOW).remove) == [
        "u", "a", "b", "c", "d"]
    assert names(select(ROWS, Rules(older_than_seconds=5 * DAY, policy=policy),
                        NOW).remove) == ["u", "a", "b", "c"]


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_never_removes_in_use(policy):
    rows = ROWS + [cand("held", 1000, None, in_use=True)]
    sel = select(rows, Rules(retain_size_bytes=0, policy=policy), NOW)
    assert "held" not in names(sel.remove)
    assert sorted(names(sel.remove)) == ["a", "b", "c", "d", "u"]
    assert sel.skipped_in_use == ()


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_with_filter_and_retain_size(policy):
    # Fewer than 5 accesses: u b c d (a is protected); the total still counts a.
    rules = Rules(exclude_frequently_accessed=5, retain_size_bytes=700, policy=policy)
    expected = {"lru": ["u", "b"], "lfu": ["u", "d", "c"], "cost": ["u", "b"]}[policy]
    assert names(select(ROWS, rules, NOW).remove) == expected


def test_existing_candidates_default_to_unmeasured():
    c = Candidate("x", 10, NOW, 2)
    assert (c.fetch_seconds, c.misses) == (0.0, 0)
    assert seconds_per_fetch(c) is None
