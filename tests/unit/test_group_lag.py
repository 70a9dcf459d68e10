"""Consumer lag (group/lag.py): the one definition `groups describe` and the metric share."""

from __future__ import annotations

from logbroker.group.lag import group_lags, partition_lag, wanted_partitions


def test_partition_lag_is_high_watermark_minus_committed() -> None:
    assert partition_lag(3, 10) == 7
    assert partition_lag(10, 10) == 0


def test_committed_past_the_end_is_no_lag() -> None:
    assert partition_lag(12, 10) == 0


def test_unknown_sides_give_no_lag() -> None:
    assert partition_lag(None, 10) is None
    assert partition_lag(3, None) is None
    assert partition_lag(3, -1) is None  # ListOffsets' "no offset"


def test_group_lags_skips_partitions_without_a_known_end() -> None:
    committed = {("b", 0): 5, ("a", 1): 2, ("a", 0): 0}
    ends = {("a", 0): 4, ("a", 1): 2}
    assert list(group_lags(committed, ends)) == [(("a", 0), 4), (("a", 1), 0)]


def test_wanted_partitions_is_the_union_of_commits() -> None:
    assert wanted_partitions([{("a", 0): 1}, {("a", 0): 2, ("b", 1): 0}]) == {("a", 0), ("b", 1)}
