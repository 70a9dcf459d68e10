"""A share group's settings (queues): defaults, bounds, and the checks a create or alter passes.

Bounds are the broker's (`ShareLimits`, serve settings); a setting outside them is refused with
INVALID_CONFIG and changes nothing. `dead_letter_topic` holds a template: `{topic}` is replaced by
the source topic's name (default `{topic}.dlq`); the empty string means no dead-letter topic
(dead letters are dropped with a log line).

`ordering`: "none" (default) hands records out in any order to any member; "key" is per-key FIFO
(SQS FIFO message groups, Pulsar Key_Shared): never two records of one key acquired at once, a
key's records in offset order, different keys in parallel (share_partition.py: "Per-key FIFO").

`filter`: a CEL expression over each record's key, headers and timestamp (record_filter.py), ""
for none. It is the group's, not a member's (the members share one window): records it does not
match are settled for the group as they enter the window (ARCHIVED, never handed out, never
dead-lettered: share_partition.add_filtered). Set by the member that creates the group or by an
alter (`queues configure --filter`); a member joining with another filter is refused
(INVALID_FILTER, share_coordinator.py). A bad expression is refused with INVALID_FILTER and the
parser's message. Changing it applies to the records read into the window from then on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from logbroker.cluster.metadata import validate_topic_name
from logbroker.errors import BrokerError, InvalidConfigError

DEAD_LETTER_DEFAULT = "{topic}.dlq"
OFFSET_RESETS = ("latest", "earliest")
ORDERINGS = ("none", "key")


@dataclass(frozen=True)
class ShareLimits:
    lock_ms_max: int = 3_600_000
    max_delivery_attempts_max: int = 100
    max_in_flight_records_max: int = 20_000
    retry_backoff_ms_max: int = 24 * 3600 * 1000


@dataclass(frozen=True)
class ShareSettings:
    lock_ms: int = 30_000
    max_delivery_attempts: int = 5
    retry_backoff_ms: int = 1_000
    retry_backoff_max_ms: int = 60_000
    dead_letter_topic: str = DEAD_LETTER_DEFAULT
    dead_letter_expired: bool = False
    max_in_flight_records: int = 2_000
    auto_offset_reset: str = "latest"
    ordering: str = "none"
    filter: str = ""

    def backoff_ms(self, delivery_count: int) -> int:
        """The wait before redelivering a record that failed its `delivery_count`-th delivery:
        retry_backoff_ms doubling per failure, capped at retry_backoff_max_ms."""
        if self.retry_backoff_ms <= 0:
            return 0
        shift = min(max(delivery_count - 1, 0), 40)
        return min(self.retry_backoff_ms << shift, self.retry_backoff_max_ms)

    def dead_letter_topic_for(self, topic: str) -> str | None:
        if not self.dead_letter_topic:
            return None
        return self.dead_letter_topic.replace("{topic}", topic)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShareSettings:
        """From a stored snapshot (unknown keys ignored; raises ValueError/TypeError on junk)."""
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for k, v in data.items():
            if k not in known:
                continue
            want = type(getattr(cls(), k))
            if not isinstance(v, want) or (want is int and isinstance(v, bool)):
                raise TypeError(f"share setting {k}={v!r} is not a {want.__name__}")
            kwargs[k] = v
        return cls(**kwargs)

    def updated(self, changes: dict[str, Any], limits: ShareLimits) -> ShareSettings:
        """These settings with `changes` applied and checked; raises InvalidConfigError."""
        try:
            new = dataclasses.replace(self, **changes)
        except TypeError as e:
            raise InvalidConfigError(f"unknown share-group setting: {e}") from None
        new.check(limits)
        return new

    def check(self, limits: ShareLimits) -> None:
        def bound(name: str, value: int, low: int, high: int) -> None:
            if not low <= value <= high:
                raise InvalidConfigError(f"{name} {value} is outside [{low}, {high}]")

        bound("lock_ms", self.lock_ms, 1, limits.lock_ms_max)
        bound("max_delivery_attempts", self.max_delivery_attempts, 1, limits.max_delivery_attempts_max)
        bound("retry_backoff_ms", self.retry_backoff_ms, 0, limits.retry_backoff_ms_max)
        bound("retry_backoff_max_ms", self.retry_backoff_max_ms, self.retry_backoff_ms, limits.retry_backoff_ms_max)
        bound("max_in_flight_records", self.max_in_flight_records, 1, limits.max_in_flight_records_max)
        if self.auto_offset_reset not in OFFSET_RESETS:
            raise InvalidConfigError(f"auto_offset_reset {self.auto_offset_reset!r}: use one of {OFFSET_RESETS}")
        if self.ordering not in ORDERINGS:
            raise InvalidConfigError(f"ordering {self.ordering!r}: use one of {ORDERINGS}")
        if self.filter:
            from logbroker.group.record_filter import compile_filter  # cel-python: filtered groups only

            compile_filter(self.filter)  # InvalidFilterError: the parser's message
        if self.dead_letter_topic:
            try:
                validate_topic_name(self.dead_letter_topic.replace("{topic}", "t"))
            except BrokerError as e:
                raise InvalidConfigError(f"dead_letter_topic {self.dead_letter_topic!r}: {e.message}") from None
