"""The replication throttle of a reassignment: a follower replica being added by a reassignment
(in the partition's `adding_replicas`, and still behind the leader) fetches at most
`bytes_per_sec` on average (Kafka's follower.replication.throttled.rate). A pure token bucket over
monotonic milliseconds given by the caller (the fetcher passes its clock's), no sleeping: the fetcher
asks `ready_at_ms` when the partition may be fetched again and delays it until then.

- `consume(n, now_ms)`: `n` bytes arrived. The bucket refills at `bytes_per_sec` up to `burst_bytes`
  (idle time never buys more than one burst) and may go into debt: a fetch returns at least one
  whole batch, however large, so its bytes are paid for afterwards.
- `ready_at_ms(now_ms)`: `now_ms` if no debt, else when the refill has paid it.
- `fetch_bytes()`: the partition_max_bytes to ask for, so that one response is about one burst.

The rate is per partition and per follower. In-sync replication is never throttled: the fetcher
applies this only to a partition whose PartitionState names this broker among `adding_replicas` with
a rate, and only while the replica is behind the leader's high watermark after a fetch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

REPLICATION_THROTTLE_BYTES_PER_SEC_MAX = 1 << 40  # a request's bound (0: unthrottled)
FETCH_BYTES_MIN = 1024  # at least one small batch per request
BURST_MS = 100  # the default burst: a tenth of a second at the rate


@dataclass
class ReplicaThrottle:
    bytes_per_sec: int
    now_ms: int  # when the bucket starts: full (one burst)
    burst_bytes: int = 0  # 0: BURST_MS at the rate
    _tokens: float = field(init=False)
    _last_ms: int = field(init=False)

    def __post_init__(self) -> None:
        if self.bytes_per_sec <= 0:
            raise ValueError(f"bytes_per_sec must be positive, not {self.bytes_per_sec}")
        if self.burst_bytes <= 0:
            self.burst_bytes = max(FETCH_BYTES_MIN, self.bytes_per_sec * BURST_MS // 1000)
        self._tokens = float(self.burst_bytes)
        self._last_ms = self.now_ms

    def _refill(self, now_ms: int) -> None:
        if now_ms > self._last_ms:
            self._tokens = min(float(self.burst_bytes),
                               self._tokens + (now_ms - self._last_ms) * self.bytes_per_sec / 1000)
            self._last_ms = now_ms

    def consume(self, n: int, now_ms: int) -> None:
        self._refill(now_ms)
        self._tokens -= max(0, n)

    def ready_at_ms(self, now_ms: int) -> int:
        self._refill(now_ms)
        if self._tokens >= 0:
            return now_ms
        return now_ms + math.ceil(-self._tokens * 1000 / self.bytes_per_sec)

    def fetch_bytes(self) -> int:
        return self.burst_bytes
