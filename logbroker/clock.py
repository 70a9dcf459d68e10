"""Time, injectable: state machines take a clock so tests can drive them with a manual one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...

    def monotonic_ms(self) -> int: ...


class SystemClock:
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms
        self._mono_ms = 0

    def now_ms(self) -> int:
        return self._now_ms

    def monotonic_ms(self) -> int:
        return self._mono_ms

    def advance(self, ms: int) -> None:
        self._now_ms += ms
        self._mono_ms += ms


class FileOffsetClock:
    """The system clock moved by a number of milliseconds read from a file (tests only: the test
    writes `2000` and the broker's share groups see time 2 s ahead, so a delayed record is due
    without a real wait). Re-read every `reread_ms` (default 0: on every reading, so a call made
    after the test wrote the file sees it); a missing or unreadable file is 0."""

    ENV = "LOGBROKER_TEST_CLOCK_OFFSET_FILE"

    def __init__(self, path: str, reread_ms: int = 0) -> None:
        self._path = path
        self._reread_ms = reread_ms
        self._offset_ms = 0
        self._read_at_ms = -reread_ms - 1

    def _offset(self) -> int:
        mono = time.monotonic_ns() // 1_000_000
        if mono - self._read_at_ms > self._reread_ms or self._reread_ms == 0:
            self._read_at_ms = mono
            try:
                with open(self._path) as f:
                    self._offset_ms = int(f.read().strip() or 0)
            except (OSError, ValueError):
                self._offset_ms = 0
        return self._offset_ms

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self._offset()

    def monotonic_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000 + self._offset()


SYSTEM_CLOCK = SystemClock()


def monotonic_s(clock: Clock | None) -> Callable[[], float]:
    """`clock`'s monotonic time in float seconds, for code that counts in seconds. For the system
    clock (None or SYSTEM_CLOCK) it is `time.monotonic` itself: full resolution, no added call."""
    if clock is None or isinstance(clock, SystemClock):
        return time.monotonic
    return lambda: clock.monotonic_ms() / 1000
