"""bench/rebalance_pause.py's figure: the longest gap between acknowledgements over a window."""

from __future__ import annotations

from bench.rebalance_pause import longest_gap_s


def test_the_longest_gap_overlapping_the_window_counts_its_edges() -> None:
    acks = [0.0, 0.1, 0.2, 1.5, 1.6, 3.0, 3.1]
    assert longest_gap_s(acks, 1.0, 1.55) == 1.5 - 0.2  # begins before the window
    assert longest_gap_s(acks, 1.0, 2.0) == 3.0 - 1.6  # the longest of two overlapping it
    assert longest_gap_s(acks, 2.0, 2.5) == 3.0 - 1.6  # covers the whole window
    assert round(longest_gap_s(acks, 0.05, 0.15), 6) == 0.1


def test_nothing_acknowledged_after_the_window_is_a_pause_until_its_end() -> None:
    assert longest_gap_s([0.0, 0.1], 0.5, 2.0) == 2.0 - 0.1
    assert longest_gap_s([], 0.5, 2.0) == 1.5
