"""LogThrottle (logbroker/log_throttle.py): at most one line per interval per key, bounded keys."""

from __future__ import annotations

from logbroker.log_throttle import OVERFLOW_KEY, LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_one_line_per_interval_per_key_counting_the_suppressed():
    clock = Clock()
    t = LogThrottle(interval_s=10, monotonic=clock)
    lines = []
    for _ in range(1_000):  # 1,000 events over 100 s, from two sources
        lines += [(key, n) for key in ("a", "b") if (n := t.event(key))]
        clock.now_s += 0.1
    assert t.total == 2_000
    assert len(lines) <= 2 * 11
    assert lines[:2] == [("a", 1), ("b", 1)]
    assert sum(n for _, n in lines) + t.suppressed("a") + t.suppressed("b") == 2_000  # nothing unaccounted


def test_keys_are_bounded():
    clock = Clock()
    t = LogThrottle(interval_s=10, keys_max=2, monotonic=clock)
    assert t.event("a") == 1 and t.event("b") == 1
    assert t.event("c") == 1  # counted under OVERFLOW_KEY: nobody else to drop yet
    assert t.event("d") == 0 and t.suppressed(OVERFLOW_KEY) == 1
    clock.now_s += 10
    assert t.event("e") == 1  # the expired keys were dropped to make room
    assert len(t._last_line) <= 2
