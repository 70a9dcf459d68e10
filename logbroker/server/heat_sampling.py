"""Which appended batches the broker decodes for their keys: a byte budget per second (pure).

The produce path never decodes records (request_metrics.py counts from batch headers); to find heavy
keys (server/heavy_keys.py) the leader decodes the keys of a *sample* of appended batches. The sample
is bounded in bytes decoded per second, twice: per partition (`partition_bytes_per_sec`) and for
the whole broker (`broker_bytes_per_sec`), each a token bucket holding at most one second of its
rate. A batch is sampled when both buckets have tokens left (> 0); it then spends its size from both,
which may take them below zero (a debt paid back by time), so a batch larger than the budget is
still sampled now and then, and the decoded bytes per second stay within the rates on average.

So a quiet partition has every batch sampled, a busy one a time-uniform fraction of its batches,
and the key decoding costs the event loop at most about `broker_bytes_per_sec` of record walking
per second however busy the broker is (reading keys costs about 25 us per KiB of small records in
Python: the default 1 MiB/s is at most ~2.5 % of the loop). Rate 0 switches sampling off. Time is an argument (seconds,
monotonic). The per-partition buckets are kept for at most `partitions_max` partitions (the
least recently used is forgotten: it restarts with a full bucket).
"""

from __future__ import annotations

from collections import OrderedDict

PARTITION_BYTES_PER_SEC_DEFAULT = 256 << 10
BROKER_BYTES_PER_SEC_DEFAULT = 1 << 20  # `serve --heat-sample-bytes-per-sec`; the broker gives partitions 1/4 of it
PARTITIONS_MAX_DEFAULT = 10_000


class TokenBucket:
    """Tokens are bytes; refilled at `rate_per_sec`, holding at most one second's worth."""

    def __init__(self, rate_per_sec: float, now_s: float) -> None:
        self.rate_per_sec = rate_per_sec
        self.tokens = rate_per_sec
        self._at_s = now_s

    def refill(self, now_s: float) -> float:
        elapsed = now_s - self._at_s
        if elapsed > 0:
            self._at_s = now_s
            self.tokens = min(self.rate_per_sec, self.tokens + elapsed * self.rate_per_sec)
        return self.tokens


class SampleBudget:
    def __init__(self, partition_bytes_per_sec: float = PARTITION_BYTES_PER_SEC_DEFAULT,
                 broker_bytes_per_sec: float = BROKER_BYTES_PER_SEC_DEFAULT,
                 partitions_max: int = PARTITIONS_MAX_DEFAULT, now_s: float = 0.0) -> None:
        if partition_bytes_per_sec < 0 or broker_bytes_per_sec < 0:
            raise ValueError("sampling rates must be >= 0")
        if partitions_max < 1:
            raise ValueError(f"partitions_max must be >= 1, got {partitions_max}")
        self.partition_bytes_per_sec = partition_bytes_per_sec
        self.partitions_max = partitions_max
        self._broker = TokenBucket(broker_bytes_per_sec, now_s)
        self._partitions: OrderedDict[tuple[str, int], TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.partition_bytes_per_sec > 0 and self._broker.rate_per_sec > 0

    def __len__(self) -> int:
        return len(self._partitions)

    def should_sample(self, topic: str, partition: int, nbytes: int, now_s: float) -> bool:
        """Whether to decode the keys of a batch of `nbytes` appended to (topic, partition) now;
        True spends `nbytes` from both budgets."""
        if not self.enabled:
            return False
        tp = (topic, partition)
        bucket = self._partitions.get(tp)
        if bucket is None:
            bucket = self._partitions[tp] = TokenBucket(self.partition_bytes_per_sec, now_s)
            if len(self._partitions) > self.partitions_max:
                self._partitions.popitem(last=False)
        else:
            self._partitions.move_to_end(tp)
        if bucket.refill(now_s) <= 0 or self._broker.refill(now_s) <= 0:
            return False
        bucket.tokens -= nbytes
        self._broker.tokens -= nbytes
        return True

    def forget(self, topic: str, partition: int) -> None:
        self._partitions.pop((topic, partition), None)
