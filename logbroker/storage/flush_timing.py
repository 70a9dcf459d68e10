"""How long log flushes take: one process-wide, thread-safe histogram of flush durations.

Observed by `SegmentFlusher` (the fsync of a rolled segment and its directory, on the flusher's
thread) and `LocalLog.flush` (waiting for those, the active segment's msync, the index sync), and
rendered by server/metrics.py as `logbroker_log_flush_duration_seconds`. A lock, not the event
loop, guards it: flushes run on several threads, and are rare enough for a lock to cost nothing.
"""

from __future__ import annotations

import bisect
import threading

# seconds: an fsync on a quiet SSD is ~1 ms, on a busy disk or network volume up to seconds
FLUSH_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class FlushTimes:
    def __init__(self, bounds: tuple[float, ...] = FLUSH_BUCKETS_S) -> None:
        self.bounds = bounds
        self._lock = threading.Lock()
        self._counts = [0] * (len(bounds) + 1)  # per bucket, the last +Inf
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            self._counts[i] += 1
            self._sum += seconds

    def snapshot(self) -> tuple[list[int], float]:
        """(cumulative counts per bucket, the last for +Inf; sum of seconds)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        running = 0
        cumulative = []
        for c in counts:
            running += c
            cumulative.append(running)
        return cumulative, total


LOG_FLUSHES = FlushTimes()
