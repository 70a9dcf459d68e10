"""The follower fetcher's backoff on the one retry policy: `backoff_initial_ms` doubling up to
`backoff_max_ms`, jitter that only shortens a wait, no attempt bound. Pure: a ManualClock and a
seeded random.Random, no sockets."""

from __future__ import annotations

import random
from dataclasses import dataclass

from logbroker.clock import ManualClock
from logbroker.replication.fetcher import (
    FETCHER_RETRY_JITTER,
    FetcherConfig,
    LeaderFetcher,
    PartitionFetchState,
    fetcher_retry_policy,
)


def test_fetcher_waits_double_from_the_initial_wait_up_to_the_cap() -> None:
    policy = fetcher_retry_policy(FetcherConfig(backoff_initial_ms=50, backoff_max_ms=1000))
    assert [policy.base_ms(n) for n in range(1, 8)] == [50, 100, 200, 400, 800, 1000, 1000]
    assert policy.retries is None and policy.jitter == FETCHER_RETRY_JITTER


def test_fetcher_waits_are_jittered_within_bounds_and_never_give_up() -> None:
    policy = fetcher_retry_policy(FetcherConfig(backoff_initial_ms=50, backoff_max_ms=1000))
    rng = random.Random(14)
    for failures in (1, 2, 5, 20, 1_000_000):
        base = policy.base_ms(failures)
        waits = [policy.delay_ms(failures, rng) for _ in range(200)]
        assert all(w is not None and base * (1 - FETCHER_RETRY_JITTER) <= w <= base for w in waits)
    spread = {policy.delay_ms(20, rng) for _ in range(200)}
    assert len(spread) > 50  # followers of one failed leader do not come back in step
    assert max(w for w in spread if w is not None) <= 1000  # the cap holds with jitter


def test_an_initial_wait_above_the_cap_is_the_cap() -> None:
    policy = fetcher_retry_policy(FetcherConfig(backoff_initial_ms=5_000, backoff_max_ms=1000))
    assert policy.base_ms(1) == 1000


@dataclass
class _StubPartition:
    key: tuple[str, int]
    leader_epoch: int = 0


def test_a_failing_partition_is_delayed_on_the_curve_by_the_fetcher_clock() -> None:
    clock = ManualClock()
    config = FetcherConfig(backoff_initial_ms=10, backoff_max_ms=100)

    def delays(seed: int) -> list[int]:
        fetcher = LeaderFetcher(1, 2, "127.0.0.1:1", config, clock, rng=random.Random(seed))
        state = PartitionFetchState(_StubPartition(("t", 0)), 0)  # type: ignore[arg-type]
        out = []
        for _ in range(6):
            fetcher._delay(state, "NOT_LEADER_OR_FOLLOWER")
            out.append(state.delayed_until_ms - clock.monotonic_ms())
            clock.advance(out[-1])
        assert state.failures == 6 and state.last_error == "NOT_LEADER_OR_FOLLOWER"
        return out

    first = delays(3)
    bases = [10, 20, 40, 80, 100, 100]
    assert all(b * (1 - FETCHER_RETRY_JITTER) <= d <= b for d, b in zip(first, bases, strict=True))
    assert delays(3) == first  # the same seed, the same waits
