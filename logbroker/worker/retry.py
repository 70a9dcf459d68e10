"""How often, and after how long, the worker runtime retries a record whose handler raised.

The worker keeps its own knobs (`--retries`, `--retry-backoff-ms`, `--retry-backoff-max-ms`) and maps
them onto the one retry policy (logbroker/retry.py):

    logbroker.retry.RetryPolicy(initial_ms=min(backoff_ms, backoff_max_ms), max_ms=backoff_max_ms,
                                multiplier=2, jitter=0, retries=retries)

Jitter is 0: a worker retries its own record, not a crowd's call to one broker, and the waits stay
exactly as documented (and as the tests assert).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logbroker import retry

RETRIES_MAX = 100
BACKOFF_MAX_MS_CEILING = retry.RETRY_WAIT_MAX_MS_CEILING


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first failure, waiting `backoff_ms`, doubling up to `backoff_max_ms`.

    retries=3, backoff_ms=100: attempts at 0, +100, +200, +400 ms, then the record has failed.
    """

    retries: int = 3
    backoff_ms: int = 100
    backoff_max_ms: int = 5_000
    policy: retry.RetryPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= RETRIES_MAX:
            raise ValueError(f"retries must be between 0 and {RETRIES_MAX}, got {self.retries}")
        if self.backoff_ms < 0 or not 0 <= self.backoff_max_ms <= BACKOFF_MAX_MS_CEILING:
            raise ValueError(f"backoff_ms must be >= 0 and backoff_max_ms within 0..{BACKOFF_MAX_MS_CEILING}")
        object.__setattr__(self, "policy", retry.RetryPolicy(
            initial_ms=min(self.backoff_ms, self.backoff_max_ms), max_ms=self.backoff_max_ms,
            multiplier=2.0, jitter=0.0, retries=self.retries))

    def delay_ms(self, failures: int) -> int | None:
        """Wait before the next attempt after `failures` failed ones; None: give up."""
        return self.policy.delay_ms(failures)
