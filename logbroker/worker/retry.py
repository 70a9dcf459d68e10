"""How often, and after how long, the worker runtime retries a record whose handler raised."""

from __future__ import annotations

from dataclasses import dataclass

RETRIES_MAX = 100
BACKOFF_MAX_MS_CEILING = 10 * 60_000


@dataclass(frozen=True)
class RetryPolicy:
    """`retries` more attempts after the first failure, waiting `backoff_ms`, doubling up to `backoff_max_ms`.

    retries=3, backoff_ms=100: attempts at 0, +100, +200, +400 ms, then the record has failed.
    """

    retries: int = 3
    backoff_ms: int = 100
    backoff_max_ms: int = 5_000

    def __post_init__(self) -> None:
        if not 0 <= self.retries <= RETRIES_MAX:
            raise ValueError(f"retries must be between 0 and {RETRIES_MAX}, got {self.retries}")
        if self.backoff_ms < 0 or not 0 <= self.backoff_max_ms <= BACKOFF_MAX_MS_CEILING:
            raise ValueError(f"backoff_ms must be >= 0 and backoff_max_ms within 0..{BACKOFF_MAX_MS_CEILING}")

    def delay_ms(self, failures: int) -> int | None:
        """Wait before the next attempt after `failures` failed ones; None: give up."""
        assert failures >= 1
        if failures > self.retries:
            return None
        return min(self.backoff_max_ms, self.backoff_ms << min(failures - 1, 30))
