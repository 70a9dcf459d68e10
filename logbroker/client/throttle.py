"""Broker throttling as a client sees it: a response's `throttle_time_ms` (the caller is over its
quota, server/apis/throttling.py) means no request to that broker until that long after the
request was sent. The broker already delayed its answer by up to its own bound, so usually the time
has passed when the answer arrives; the rest is waited here. Pure: times are arguments (monotonic
seconds). The counters are what the clients expose (`Producer.throttle`, `Consumer.throttle`).
"""

from __future__ import annotations

MAX_THROTTLE_MS = 60_000  # a broker's answer is trusted this far, no further


class BrokerThrottle:
    def __init__(self) -> None:
        self._until: dict[str, float] = {}  # broker address -> no request before (monotonic s)
        self.throttled_responses = 0
        self.throttle_time_ms_total = 0
        self.last_throttle_time_ms = 0

    def on_response(self, address: str, sent_at: float, throttle_time_ms: int) -> float | None:
        """Take in one response's throttle time; returns when the broker may be asked again (None: now)."""
        if throttle_time_ms <= 0:
            return None
        throttle_ms = min(throttle_time_ms, MAX_THROTTLE_MS)
        self.throttled_responses += 1
        self.throttle_time_ms_total += throttle_ms
        self.last_throttle_time_ms = throttle_ms
        until = sent_at + throttle_ms / 1000.0
        if until > self._until.get(address, 0.0):
            self._until[address] = until
        return until

    def blocked_until(self, address: str, now: float) -> float | None:
        """When `address` may be asked again, or None when it may be now."""
        until = self._until.get(address)
        if until is None:
            return None
        if until <= now:
            del self._until[address]
            return None
        return until
