"""The one retry policy: capped exponential waits, jitter that only shortens, attempts and deadline."""

from __future__ import annotations

import random

import pytest

from logbroker.clock import ManualClock
from logbroker.retry import RetryPolicy


def test_waits_double_up_to_the_cap_without_jitter() -> None:
    policy = RetryPolicy(initial_ms=100, max_ms=1000, jitter=0.0)
    assert [policy.delay_ms(n) for n in range(1, 7)] == [100, 200, 400, 800, 1000, 1000]
    assert policy.delay_ms(10_000) == 1000  # no overflow far out


def test_jitter_only_shortens_a_wait_and_spreads_them() -> None:
    policy = RetryPolicy(initial_ms=100, max_ms=1000, jitter=0.5)
    rng = random.Random(7)
    waits = [policy.delay_ms(3, rng) for _ in range(200)]
    assert all(w is not None and 200 <= w <= 400 for w in waits)
    assert len(set(waits)) > 20


def test_retries_bound_the_attempts() -> None:
    policy = RetryPolicy(initial_ms=10, max_ms=100, jitter=0.0, retries=2)
    backoff = policy.start()
    assert backoff.failed() == 10
    assert backoff.failed() == 20
    assert backoff.failed() is None
    backoff.succeeded()
    assert backoff.failed() == 10


def test_deadline_cuts_the_last_wait_and_then_stops() -> None:
    clock = ManualClock()
    backoff = RetryPolicy(initial_ms=100, max_ms=1000, jitter=0.0).start(
        deadline_ms=clock.monotonic_ms() + 250, clock=clock)
    assert backoff.failed() == 100
    clock.advance(100)
    assert backoff.failed() == 150  # 200 would end past the deadline
    clock.advance(150)
    assert backoff.remaining_ms() == 0
    assert backoff.failed() is None


@pytest.mark.parametrize("kwargs", [
    {"initial_ms": -1}, {"initial_ms": 10, "max_ms": 5}, {"max_ms": 10**9}, {"multiplier": 0.5},
    {"jitter": 1.5}, {"retries": -1},
])
def test_bad_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]
