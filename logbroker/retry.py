"""The one retry policy: exponential backoff with a cap, jitter, an attempt bound and a deadline.

Every place that tries again after a failure (producer and consumer requests, metadata refreshes, the
group member's heartbeats, follower fetchers, the controller's calls to brokers, the worker runtime)
asks a `RetryPolicy` how long to wait, so the curves agree and none of them lacks a bound.

    wait before attempt n+1 (n = failures so far, n >= 1):
        base   = min(max_ms, initial_ms * multiplier ** (n - 1))
        wait   = base * (1 - jitter * u),  u uniform in [0, 1)   ("equal"-style jitter: never above base)
    give up when n > retries (retries None: unbounded) or once the deadline has passed; a wait that
    would end past the deadline is cut short to end at it (one last try then).

Jitter spreads out the clients that a broker failure sent back all at once; it only ever shortens a
wait, so `max_ms` stays a true cap. `Backoff` is the per-operation state (failures so far, deadline),
pure apart from the injected clock and random source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from logbroker.clock import SYSTEM_CLOCK, Clock

RETRY_WAIT_MAX_MS_CEILING = 10 * 60_000
RETRIES_CEILING = 1_000_000


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait after the n-th failure, and when to stop trying.

    RetryPolicy(initial_ms=100, max_ms=1000, jitter=0): waits 100, 200, 400, 800, 1000, 1000, ... ms.
    """

    initial_ms: int = 100
    max_ms: int = 1_000
    multiplier: float = 2.0
    jitter: float = 0.2
    retries: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.initial_ms <= self.max_ms <= RETRY_WAIT_MAX_MS_CEILING:
            raise ValueError(
                f"retry waits must satisfy 0 <= initial_ms <= max_ms <= {RETRY_WAIT_MAX_MS_CEILING}, "
                f"got {self.initial_ms} and {self.max_ms}")
        if self.multiplier < 1.0:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be within 0..1, got {self.jitter}")
        if self.retries is not None and not 0 <= self.retries <= RETRIES_CEILING:
            raise ValueError(f"retries must be within 0..{RETRIES_CEILING}, got {self.retries}")

    def base_ms(self, failures: int) -> int:
        """The capped exponential wait after `failures` (>= 1) failures, before jitter."""
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        if self.initial_ms == 0:
            return 0
        # the exponent is bounded so the float never overflows; the cap is reached long before
        grown = self.initial_ms * self.multiplier ** min(failures - 1, 64)
        return int(min(float(self.max_ms), grown))

    def delay_ms(self, failures: int, rng: random.Random | None = None) -> int | None:
        """The wait before the next attempt after `failures` failed ones; None: give up."""
        if self.retries is not None and failures > self.retries:
            return None
        base = self.base_ms(failures)
        if self.jitter == 0.0 or base == 0:
            return base
        u = (rng or _RNG).random()
        return int(base * (1.0 - self.jitter * u))

    def start(self, deadline_ms: int | None = None, clock: Clock = SYSTEM_CLOCK,
              rng: random.Random | None = None) -> Backoff:
        """The state of one operation retried under this policy; `deadline_ms` on `clock.monotonic_ms()`."""
        return Backoff(self, deadline_ms, clock, rng or _RNG)


@dataclass
class Backoff:
    """One operation's retries: call `failed()` after each failure for the wait before the next try
    (None: stop, the attempts or the deadline are used up); `succeeded()` starts the curve again."""

    policy: RetryPolicy
    deadline_ms: int | None
    clock: Clock
    rng: random.Random
    failures: int = field(default=0)

    def failed(self) -> int | None:
        self.failures += 1
        wait_ms = self.policy.delay_ms(self.failures, self.rng)
        if wait_ms is None:
            return None
        if self.deadline_ms is not None:
            left_ms = self.deadline_ms - self.clock.monotonic_ms()
            if left_ms <= 0:
                return None
            wait_ms = min(wait_ms, left_ms)
        return wait_ms

    def succeeded(self) -> None:
        self.failures = 0

    def remaining_ms(self) -> int | None:
        """Time left before the deadline (None: no deadline); never negative."""
        if self.deadline_ms is None:
            return None
        return max(0, self.deadline_ms - self.clock.monotonic_ms())


_RNG = random.Random()
