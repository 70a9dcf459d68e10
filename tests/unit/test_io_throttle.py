"""The token bucket shared by the scrubber and the log cleaner (storage/io_throttle.py), with an
injected clock whose sleep advances it."""

from __future__ import annotations

import threading

import pytest

from logbroker.storage.io_throttle import CHUNK_BYTES_MAX, CHUNK_BYTES_MIN, Throttle


class ManualClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_throttle_idle_time_banks_at_most_one_burst():
    clock = ManualClock()
    throttle = Throttle(1000, clock.monotonic, clock.sleep, burst_bytes=500)
    clock.now += 3600  # an hour idle
    throttle.consume(500)
    assert clock.sleeps == []
    throttle.consume(1000)
    assert clock.sleeps == [pytest.approx(1.0)]


def test_throttle_average_rate_and_no_limit_at_zero():
    clock = ManualClock()
    throttle = Throttle(1000, clock.monotonic, clock.sleep, burst_bytes=100)
    for _ in range(50):
        throttle.consume(100)
    assert clock.now - 100.0 == pytest.approx(5.0)  # 5000 bytes at 1000 bytes/s, nothing banked at start
    unlimited = Throttle(0, clock.monotonic, clock.sleep)
    before = len(clock.sleeps)
    unlimited.consume(1 << 40)
    assert len(clock.sleeps) == before
    assert unlimited.chunk_bytes() == CHUNK_BYTES_MAX
    assert Throttle(1, clock.monotonic, clock.sleep).chunk_bytes() == CHUNK_BYTES_MIN


def test_throttle_shared_by_threads_keeps_one_rate():
    clock = ManualClock()
    lock = threading.Lock()

    def sleep(seconds: float) -> None:
        with lock:
            clock.sleep(seconds)

    throttle = Throttle(1000, clock.monotonic, sleep, burst_bytes=100)

    def work() -> None:
        for _ in range(20):
            throttle.consume(50)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert clock.now - 100.0 == pytest.approx(4 * 20 * 50 / 1000)
