"""An I/O rate limit: a token bucket over an injected monotonic clock and sleep (Kafka's Throttler
for the log cleaner). Used by the scrubber (replication/scrubber.py, reads) and the log cleaner
(storage/log_cleaner.py, reads and writes of a clean pass), each from its own thread.

`consume(n)` returns once `n` bytes fit in `bytes_per_sec` on average; idle time banks at most
`burst_bytes` (so a long pause never buys an unbounded burst); `bytes_per_sec <= 0` is no limit.
A debt is paid by one sleep; whatever that sleep really took (an early wake-up from a stop event),
the next call refills from then. Thread-safe: threads sharing one Throttle share its rate (a
caller sleeps holding the lock, so the others wait their turn behind its debt, as Kafka's).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

CHUNK_BYTES_MAX = 1 << 20  # one read; also the default burst
CHUNK_BYTES_MIN = 4096


class Throttle:
    """A token bucket: `consume(n)` returns once `n` bytes fit in `bytes_per_sec` (<= 0: no limit).
    `monotonic_s` and `sleep` are injected (tests pass a manual clock whose sleep advances it)."""

    def __init__(
        self, bytes_per_sec: int, monotonic_s: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep, burst_bytes: int = CHUNK_BYTES_MAX,
    ) -> None:
        self.bytes_per_sec = bytes_per_sec
        self.burst_bytes = max(1, burst_bytes)
        self._monotonic_s = monotonic_s
        self._sleep = sleep
        self._tokens = 0.0
        self._last = monotonic_s()
        self._lock = threading.Lock()

    def consume(self, n: int) -> None:
        rate = self.bytes_per_sec
        if rate <= 0:
            return
        with self._lock:
            self._consume(n, rate)

    def _consume(self, n: int, rate: int) -> None:
        now = self._monotonic_s()
        self._tokens = min(float(self.burst_bytes), self._tokens + (now - self._last) * rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            self._sleep(-self._tokens / rate)
            # whatever the sleep really took, the debt is paid: the next call refills from here
            self._last = max(self._last, self._monotonic_s())
            self._tokens = 0.0

    def chunk_bytes(self) -> int:
        """A read size that keeps each sleep near a tenth of a second."""
        if self.bytes_per_sec <= 0:
            return CHUNK_BYTES_MAX
        return max(CHUNK_BYTES_MIN, min(CHUNK_BYTES_MAX, self.bytes_per_sec // 10))
