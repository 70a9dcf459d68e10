"""Per-partition bytes in/out per second from two samples of the leaders' counters
(logbroker/cluster/leader_rates.py), with the size-growth fallback."""

from __future__ import annotations

import pytest

from logbroker.cluster.leader_rates import LeaderCounters, PartitionRate, rates

A, B, C, D, E, F = (("t", p) for p in range(6))


def test_rates_from_counter_deltas_and_fallbacks() -> None:
    first = {
        A: LeaderCounters(0, 1_000, 500),
        B: LeaderCounters(1, 5_000, 0),
        C: LeaderCounters(1, 9_000, 9_000),  # the leader changes to 2 before the second sample
        D: LeaderCounters(2, 700, 0),  # missing from the second sample
        F: LeaderCounters(0, 50_000, 100),  # the counter goes down (the broker restarted)
    }
    second = {
        A: LeaderCounters(0, 3_000, 1_500),
        B: LeaderCounters(1, 5_000, 0),
        C: LeaderCounters(2, 40, 0),
        F: LeaderCounters(0, 10, 0),
        ("t", 9): LeaderCounters(0, 1, 1),  # not asked for: left out
    }
    sizes_first = {A: 100, B: 100, C: 1_000, D: -1, E: 10, F: 0}
    sizes_second = {A: 100, B: 100, C: 1_600, D: 900, E: 8, F: 400}
    got = rates([A, B, C, D, E, F], first, second, sizes_first, sizes_second, elapsed_s=2.0)
    assert got == {
        A: PartitionRate(1_000.0, 500.0, "counters"),  # the sizes (unchanged) are not used
        B: PartitionRate(0.0, 0.0, "counters"),
        C: PartitionRate(300.0, 0.0, "size"),  # leader changed: the size grew 600 in 2 s
        D: PartitionRate(0.0, 0.0, "none"),  # missing, and its first size unknown (-1)
        E: PartitionRate(0.0, 0.0, "size"),  # missing from both; the size shrank: 0, not negative
        F: PartitionRate(200.0, 0.0, "size"),  # counter reset: the size growth
    }


def test_rates_missing_from_the_first_sample_or_without_sizes() -> None:
    second = {A: LeaderCounters(1, 8_000, 4_000)}
    got = rates([A, B], {}, second, {A: 0}, {A: 2_000, B: 5}, elapsed_s=4.0)
    assert got == {A: PartitionRate(500.0, 0.0, "size"), B: PartitionRate(0.0, 0.0, "none")}


def test_rates_need_a_positive_window() -> None:
    with pytest.raises(ValueError):
        rates([A], {}, {}, {}, {}, elapsed_s=0.0)
