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


SYSTEM_CLOCK = SystemClock()


def monotonic_s(clock: Clock | None) -> Callable[[], float]:
    """`clock`'s monotonic time in float seconds, for code that counts in seconds. For the system
    clock (None or SYSTEM_CLOCK) it is `time.monotonic` itself: full resolution, no added call."""
    if clock is None or isinstance(clock, SystemClock):
        return time.monotonic
    return lambda: clock.monotonic_ms() / 1000
