"""The clients' retry settings mapped onto the one retry policy (logbroker/retry.py).

Producer, consumer, metadata cache, group member and coordinator client keep Kafka's user-facing
`retry_backoff_ms` (and the producer's `retries`, `delivery_timeout_ms`); each becomes

    RetryPolicy(initial_ms=retry_backoff_ms, max_ms=max(retry_backoff_ms, RETRY_BACKOFF_MAX_MS),
                multiplier=2, jitter=CLIENT_RETRY_JITTER, retries=retries)

so waits go retry_backoff_ms, 2x, 4x, ... up to 1 s (a base above 1 s is kept as the cap), each
shortened by up to 20 % so clients a broker failure sent back at once do not return at once.
"""

from __future__ import annotations

from logbroker.retry import RETRIES_CEILING, RetryPolicy

RETRY_BACKOFF_MAX_MS = 1_000
CLIENT_RETRY_JITTER = 0.2


def client_retry_policy(retry_backoff_ms: int, retries: int | None = None,
                        jitter: float = CLIENT_RETRY_JITTER) -> RetryPolicy:
    """The policy for a client's `retry_backoff_ms` (and `retries`; None or above the policy's
    ceiling: bounded by the caller's deadline only)."""
    if retries is not None and retries > RETRIES_CEILING:
        retries = None
    return RetryPolicy(initial_ms=retry_backoff_ms, max_ms=max(retry_backoff_ms, RETRY_BACKOFF_MAX_MS),
                       multiplier=2.0, jitter=jitter, retries=retries)


def retry_backoff_s(attempts: int, retry_backoff_ms: int) -> float:
    """The wait before jitter after `attempts` failures: retry_backoff_ms * 2**(attempts-1), at most
    RETRY_BACKOFF_MAX_MS (or the base, when that is larger)."""
    return client_retry_policy(retry_backoff_ms, jitter=0.0).base_ms(max(attempts, 1)) / 1000
