"""Record headers with a meaning for queues (share groups), shared by the producer, the share-group
coordinator and the clients.

Delivery headers, set by `Producer.send(..., delay_ms=, deliver_at_ms=, ttl_ms=)`: values are
ASCII decimal integers (milliseconds). Plain consumers and consumer groups ignore them and read
every record in offset order; share groups hand a record out no sooner than `DELIVER_AT_MS`
(wall clock, ms since the epoch) and never once `TTL_MS` has passed since it became deliverable.

Dead-letter headers, added by the coordinator to a record it moves to a dead-letter topic (the key,
value and other headers are the original's): where it came from, how often it was delivered, why
it was dead-lettered (`REASON_*`), the consumer's reason text (reject only) and when.
"""

from __future__ import annotations

DELIVER_AT_MS = "logbroker.deliver-at-ms"
TTL_MS = "logbroker.ttl-ms"

DLQ_TOPIC = "logbroker.dlq.topic"
DLQ_PARTITION = "logbroker.dlq.partition"
DLQ_OFFSET = "logbroker.dlq.offset"
DLQ_DELIVERY_COUNT = "logbroker.dlq.delivery-count"
DLQ_REASON = "logbroker.dlq.reason"
DLQ_REASON_TEXT = "logbroker.dlq.reason-text"
DLQ_TIME_MS = "logbroker.dlq.time-ms"

REASON_REJECTED = "rejected"
REASON_MAX_ATTEMPTS = "max-attempts"
REASON_EXPIRED = "expired"

DELAY_MAX_MS = 30 * 24 * 3600 * 1000  # a delivery time at most 30 days ahead
TTL_MAX_MS = 365 * 24 * 3600 * 1000
REASON_TEXT_MAX_CHARS = 1024


def parse_ms(value: bytes | None) -> int | None:
    """A delivery header's value, or None when absent or not a non-negative decimal integer (a
    malformed header is ignored, never fatal: the record is then delivered as if it had none)."""
    if value is None or not 0 < len(value) <= 19 or not value.isdigit():
        return None
    return int(value)
