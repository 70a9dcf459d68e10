"""retention.segments_to_delete: the pure retention decision, with a manual clock."""

from __future__ import annotations

from typing import NamedTuple

from logbroker.clock import ManualClock
from logbroker.storage.retention import segments_to_delete

DAY_MS = 24 * 3600 * 1000


class Seg(NamedTuple):
    base_offset: int
    size_bytes: int


# four segments of 100 bytes: [0, 10), [10, 20), [20, 30), and the active one from 30
SEGS = [Seg(0, 100), Seg(10, 100), Seg(20, 100), Seg(30, 100)]


def decide(clock: ManualClock, timestamps: list[int], *, retention_ms: int = -1, retention_bytes: int = -1,
           high_watermark: int = 40, log_start_offset: int = 0, asked: list[int] | None = None) -> int:
    def timestamp_ms(i: int) -> int:
        if asked is not None:
            asked.append(i)
        return timestamps[i]

    return segments_to_delete(
        SEGS, sum(s.size_bytes for s in SEGS), timestamp_ms, retention_ms=retention_ms,
        retention_bytes=retention_bytes, now_ms=clock.now_ms(), high_watermark=high_watermark,
        log_start_offset=log_start_offset,
    )


def test_unlimited_retention_deletes_nothing():
    clock = ManualClock()
    assert decide(clock, [0, 0, 0, 0]) == 0


def test_time_retention_deletes_segments_older_than_retention_ms_oldest_first():
    clock = ManualClock()
    now = clock.now_ms()
    stamps = [now - 3 * DAY_MS, now - 2 * DAY_MS, now - DAY_MS, now]
    assert decide(clock, stamps, retention_ms=7 * DAY_MS) == 0
    clock.advance(5 * DAY_MS)  # the first is 8 days old, the second 7 days exactly (not past it)
    assert decide(clock, stamps, retention_ms=7 * DAY_MS) == 1
    clock.advance(1)
    assert decide(clock, stamps, retention_ms=7 * DAY_MS) == 2
    clock.advance(10 * DAY_MS)  # everything is old, but the active segment never goes
    assert decide(clock, stamps, retention_ms=7 * DAY_MS) == 3


def test_a_young_segment_stops_the_pass_even_if_a_later_one_is_old():
    clock = ManualClock()
    now = clock.now_ms()
    assert decide(clock, [now - 10 * DAY_MS, now, now - 10 * DAY_MS, now], retention_ms=DAY_MS) == 1


def test_size_retention_keeps_the_log_at_or_above_retention_bytes():
    clock = ManualClock()
    now = clock.now_ms()
    stamps = [now] * 4
    assert decide(clock, stamps, retention_bytes=400) == 0
    assert decide(clock, stamps, retention_bytes=300) == 1
    assert decide(clock, stamps, retention_bytes=250) == 1
    assert decide(clock, stamps, retention_bytes=0) == 3  # never the active segment


def test_segments_below_the_log_start_offset_go():
    clock = ManualClock()
    now = clock.now_ms()
    stamps = [now] * 4
    assert decide(clock, stamps, log_start_offset=9) == 0  # the first segment still holds offset 9
    assert decide(clock, stamps, log_start_offset=10) == 1
    assert decide(clock, stamps, log_start_offset=25) == 2


def test_nothing_at_or_above_the_high_watermark_is_deleted():
    clock = ManualClock()
    stamps = [0, 0, 0, 0]
    assert decide(clock, stamps, retention_ms=1, high_watermark=9) == 0
    assert decide(clock, stamps, retention_ms=1, high_watermark=10) == 1
    assert decide(clock, stamps, retention_ms=1, high_watermark=29) == 2
    assert decide(clock, stamps, retention_bytes=0, log_start_offset=40, high_watermark=20) == 2


def test_timestamps_are_asked_only_for_the_segments_examined():
    clock = ManualClock()
    now = clock.now_ms()
    asked: list[int] = []
    assert decide(clock, [now - 10 * DAY_MS, now, now, now], retention_ms=DAY_MS, asked=asked) == 1
    assert asked == [0, 1]
    asked.clear()
    assert decide(clock, [now] * 4, asked=asked) == 0  # unlimited: none asked
    assert asked == []
