"""The producer (logbroker/client/producer/producer.py says how its parts fit together)."""

from logbroker.client.backoff import retry_backoff_s
from logbroker.client.call_errors import is_retriable, needs_metadata, rpc_error
from logbroker.client.producer.future import (
    FutureRecordMetadata,
    FutureRecordsMetadata,
    FutureTimeoutError,
    RecordMetadata,
    _BatchResult,
    failed_future,
    failed_records_future,
)
from logbroker.client.producer.producer import Producer, parse_acks

__all__ = [
    "FutureRecordMetadata", "FutureRecordsMetadata", "FutureTimeoutError", "Producer", "RecordMetadata",
    "_BatchResult", "failed_future", "failed_records_future", "is_retriable", "needs_metadata", "parse_acks",
    "retry_backoff_s", "rpc_error",
]
