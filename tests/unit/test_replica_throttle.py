"""The replication throttle of a reassignment (replication/replica_throttle.py) and how the follower's
fetcher applies it. Pure: a ManualClock and stub partitions, no sockets."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from logbroker.clock import ManualClock
from logbroker.replication.fetcher import FetcherConfig, LeaderFetcher, PartitionFetchState, _Sent
from logbroker.replication.replica_throttle import FETCH_BYTES_MIN, ReplicaThrottle
from logbroker.v1 import logbroker_pb2 as pb


def test_a_full_bucket_lets_one_burst_through_then_waits_for_the_rate() -> None:
    t = ReplicaThrottle(200_000, now_ms=0)
    assert t.burst_bytes == 20_000 and t.fetch_bytes() == 20_000  # a tenth of a second
    t.consume(20_000, 0)
    assert t.ready_at_ms(0) == 0  # exactly the burst: no debt
    t.consume(20_000, 0)
    assert t.ready_at_ms(0) == 100  # 20 kB more at 200 kB/s
    assert t.ready_at_ms(60) == 100  # the refill counts from the last call
    assert t.ready_at_ms(100) == 100


def test_bytes_over_time_never_exceed_rate_times_time_plus_one_burst() -> None:
    """A fetcher that fetches whenever allowed, each response one burst or a larger batch."""
    clock = ManualClock()
    t = ReplicaThrottle(100_000, clock.monotonic_ms())
    total = 0
    for n in [10_000, 10_000, 64_000, 1, 10_000] * 40:
        now = t.ready_at_ms(clock.monotonic_ms())
        clock.advance(now - clock.monotonic_ms())
        assert total <= 100_000 * now / 1000 + t.burst_bytes  # what came before was paid for by now
        t.consume(n, now)
        total += n
    end = t.ready_at_ms(clock.monotonic_ms())
    assert total <= 100_000 * end / 1000 + t.burst_bytes
    assert end >= (total - t.burst_bytes) * 1000 // 100_000 > 9_000  # 940 kB at 100 kB/s


def test_idle_time_banks_at_most_one_burst() -> None:
    t = ReplicaThrottle(10_000, now_ms=0, burst_bytes=5_000)
    t.consume(5_000, 0)
    assert t.ready_at_ms(3_600_000) == 3_600_000  # an hour idle
    t.consume(5_000, 3_600_000)
    t.consume(10_000, 3_600_000)
    assert t.ready_at_ms(3_600_000) == 3_600_000 + 1_000  # only one burst was banked


def test_small_rates_still_fetch_a_batch_and_bad_rates_are_refused() -> None:
    assert ReplicaThrottle(10, now_ms=0).fetch_bytes() == FETCH_BYTES_MIN
    for bad in (0, -1):
        with pytest.raises(ValueError):
            ReplicaThrottle(bad, now_ms=0)


# -- the fetcher ----------------------------------------------------------------------------------


@dataclass
class _StubLog:
    log_end_offset: int = 0


@dataclass
class _StubPartition:
    key: tuple[str, int]
    leader_epoch: int = 0
    log: _StubLog = field(default_factory=_StubLog)

    def append_as_follower(self, records: bytes, high_watermark: int, log_start_offset: int) -> None:
        self.log.log_end_offset += len(records)  # one "offset" per byte, for the test


def _fetched(fetcher: LeaderFetcher, state: PartitionFetchState, n: int, high_watermark: int) -> None:
    part = state.partition
    r = pb.FetchPartitionResult(topic="t", partition=0, high_watermark=high_watermark, records=b"x" * n)
    fetcher._apply_fetched(_Sent(state, part.log.log_end_offset), r)


def test_a_throttled_follower_behind_the_leader_waits_for_its_bytes() -> None:
    clock = ManualClock()
    fetcher = LeaderFetcher(1, 2, "127.0.0.1:1", FetcherConfig(), clock)
    state = PartitionFetchState(_StubPartition(("t", 0)), 0)  # type: ignore[arg-type]
    state.throttle = ReplicaThrottle(100_000, clock.monotonic_ms())
    _fetched(fetcher, state, 10_000, high_watermark=1_000_000)  # the burst: no wait
    assert state.delayed_until_ms <= clock.monotonic_ms()
    _fetched(fetcher, state, 50_000, high_watermark=1_000_000)
    assert state.delayed_until_ms == clock.monotonic_ms() + 500
    assert state.throttled_bytes == 60_000 and state.failures == 0


def test_a_caught_up_follower_is_never_throttled() -> None:
    clock = ManualClock()
    fetcher = LeaderFetcher(1, 2, "127.0.0.1:1", FetcherConfig(), clock)
    state = PartitionFetchState(_StubPartition(("t", 0)), 0)  # type: ignore[arg-type]
    state.throttle = ReplicaThrottle(1_000, clock.monotonic_ms())
    _fetched(fetcher, state, 50_000, high_watermark=50_000)  # reaches the high watermark: in sync
    assert state.delayed_until_ms <= clock.monotonic_ms() and state.throttled_bytes == 0


def test_an_unthrottled_follower_never_waits() -> None:
    clock = ManualClock()
    fetcher = LeaderFetcher(1, 2, "127.0.0.1:1", FetcherConfig(), clock)
    state = PartitionFetchState(_StubPartition(("t", 0)), 0)  # type: ignore[arg-type]
    _fetched(fetcher, state, 5_000_000, high_watermark=10_000_000)
    assert state.delayed_until_ms <= clock.monotonic_ms()
