"""The cluster member's retries (re-registration, offline-replica reports, controlled shutdown) on the
one retry policy: capped, jittered, bounded by attempts or the shutdown deadline. Pure: a ManualClock
and a seeded random.Random."""

from __future__ import annotations

import random

from logbroker.clock import ManualClock
from logbroker.server.cluster_member import (
    CONTROLLED_SHUTDOWN_RETRY,
    OFFLINE_REPORT_ATTEMPTS_MAX,
    OFFLINE_REPORT_RETRY,
    REREGISTER_RETRY,
)


def test_reregistration_and_offline_reports_give_up_after_their_attempts_within_a_minute() -> None:
    for policy, attempts in ((REREGISTER_RETRY, 60), (OFFLINE_REPORT_RETRY, OFFLINE_REPORT_ATTEMPTS_MAX)):
        backoff = policy.start(rng=random.Random(14))
        waits: list[int] = []
        while (wait := backoff.failed()) is not None:
            waits.append(wait)
        assert len(waits) == attempts - 1 and backoff.failures == attempts  # then it gives up
        bases = [policy.base_ms(n) for n in range(1, attempts)]
        assert bases[:5] == [100, 200, 400, 800, 1000] and max(bases) == 1000
        assert all(b * (1 - policy.jitter) <= w <= b for w, b in zip(waits, bases, strict=True))
        assert 40_000 <= sum(waits) <= 60_000


def test_controlled_shutdown_waits_stop_at_its_deadline() -> None:
    clock = ManualClock()
    backoff = CONTROLLED_SHUTDOWN_RETRY.start(clock.monotonic_ms() + 1_200, clock, random.Random(14))
    waits: list[int] = []
    while (wait := backoff.failed()) is not None:
        assert 400 <= wait <= 500 or clock.monotonic_ms() + wait == 1_200
        waits.append(wait)
        clock.advance(wait)
    assert clock.monotonic_ms() == 1_200 and 3 <= len(waits) <= 4  # never past the deadline
