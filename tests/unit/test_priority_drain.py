"""The level-draining decisions of share groups over priority levels (group/priority_drain.py) and
the level topic names and configs (cluster/priority_levels.py)."""

from __future__ import annotations

import pytest

from logbroker.cluster.metadata import normalize_topic_config
from logbroker.cluster.priority_levels import level_topic, parse_level_topic, parse_weights
from logbroker.errors import InvalidConfigError
from logbroker.group.priority_drain import CREDIT_BOUND, LevelDrain, drain


def _taker(backlog: dict[int, int]):
    def take(level: int, n: int) -> int:
        k = min(n, backlog[level])
        backlog[level] -= k
        return k
    return take


def test_strict_takes_the_highest_level_first_then_the_next() -> None:
    backlog = {0: 1000, 3: 7, 9: 10}
    got = drain(LevelDrain(), backlog, 500, _taker(backlog))
    assert got == {9: 10, 3: 7, 0: 483}


def test_strict_never_gives_a_lower_level_anything_while_a_higher_one_has_records() -> None:
    backlog = {0: 10_000, 1: 10_000}
    d = LevelDrain()
    for _ in range(10):
        assert drain(d, backlog, 100, _taker(backlog)) == {1: 100}


@pytest.mark.parametrize("budget", [1, 3, 10, 500])
def test_weighted_mix_follows_the_weights_while_both_levels_are_backlogged(budget: int) -> None:
    backlog = {0: 10**9, 1: 10**9}
    d = LevelDrain((1, 9))
    total = {0: 0, 1: 0}
    for _ in range(2000 // budget + 10):
        for lv, n in drain(d, backlog, budget, _taker(backlog)).items():
            total[lv] += n
    share = total[1] / (total[0] + total[1])
    assert abs(share - 0.9) < 0.02, total


def test_weighted_is_work_conserving_when_a_level_is_empty() -> None:
    backlog = {0: 0, 1: 10_000}
    d = LevelDrain((1, 9))
    for _ in range(5):
        assert drain(d, backlog, 100, _taker(backlog)) == {1: 100, 0: 0}
    # no debt was built up: as soon as level 0 has records the weights hold again, from the start
    backlog[0] = 10_000
    got = drain(d, backlog, 100, _taker(backlog))
    assert got == {1: 90, 0: 10}


def test_credits_stay_bounded_and_reset_when_weights_change() -> None:
    d = LevelDrain((1, 1000))
    for _ in range(100):
        d.passes([0, 1], 10_000)
    assert all(abs(c) <= CREDIT_BOUND for c in d.credit.values())
    d.set_weights((1, 2))
    assert d.credit == {}


def test_level_topic_names_round_trip() -> None:
    assert level_topic("orders", 0) == "orders"
    assert level_topic("orders", 9) == "__priority.9.orders"
    assert parse_level_topic("__priority.9.orders") == ("orders", 9)
    assert parse_level_topic("orders") == ("orders", 0)
    assert parse_level_topic("__priority.0.orders") == ("__priority.0.orders", 0)


def test_priority_configs_are_checked() -> None:
    assert normalize_topic_config({})["priority_levels"] == "1"
    assert normalize_topic_config({"priority_levels": "10"})["priority_levels"] == "10"
    for bad in ({"priority_levels": "0"}, {"priority_levels": "11"}, {"priority_levels": "x"},
                {"priority_levels": "2", "priority_weights": "1,2,3"}, {"priority_weights": "1,9"},
                {"priority_levels": "2", "priority_weights": "0,9"}, {"priority_levels": "2", "priority_weights": "a,b"}):
        with pytest.raises(InvalidConfigError):
            normalize_topic_config(bad)
    assert parse_weights("1,9", 2) == (1, 9)
    assert parse_weights("", 2) == ()
