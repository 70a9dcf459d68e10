"""QueueMessage: one record a share consumer holds, and the calls that settle it.

A message is settled at most once: `ack()`, `release(delay_ms)` or `reject(reason)`; a second
settle raises MessageAlreadySettledError. Settling only queues the acknowledgement: it rides on the
consumer's next `poll()` (or `commit_acks()` / `close()`). A message handed out before the member was
fenced or rejoined is no longer this member's: settling it is accepted and dropped (the broker has
already made the record available again).
"""

from __future__ import annotations

from typing import Protocol

from logbroker.client.queue.acks import ACCEPTED, REJECT, RELEASE, Ack
from logbroker.cluster.priority_levels import parse_level_topic
from logbroker.storage.record_batch import RecordHeaders


class MessageAlreadySettledError(Exception):
    """ack/release/reject called on a message that was already settled."""


class Settler(Protocol):
    def settle(self, message: QueueMessage, ack: Ack) -> None: ...


class QueueMessage:
    """One record of a share group, held by this member under a lock until settled."""

    __slots__ = ("_consumer", "delivery_count", "generation", "headers", "key", "log_topic", "offset", "partition",
                 "priority", "settled", "timestamp", "topic", "value")

    def __init__(self, consumer: Settler, generation: int, topic: str, partition: int, offset: int,
                 key: bytes | None, value: bytes | None, headers: RecordHeaders, timestamp: int,
                 delivery_count: int) -> None:
        self._consumer = consumer
        self.generation = generation  # the consumer's membership generation it was handed out in
        # `topic` is the user's topic; a record of priority k > 0 lives in that topic's hidden level
        # log (cluster/priority_levels.py), named by `log_topic`, which its acknowledgement names
        self.log_topic = topic
        self.topic, self.priority = parse_level_topic(topic)
        self.partition = partition
        self.offset = offset
        self.key = key
        self.value = value
        self.headers = headers
        self.timestamp = timestamp
        self.delivery_count = delivery_count
        self.settled = False  # set under the consumer's lock

    def ack(self) -> None:
        """Done with it: the broker never hands it out again."""
        self._consumer.settle(self, ACCEPTED)

    def release(self, delay_ms: int = 0) -> None:
        """Give it back: redelivered no sooner than `delay_ms` from now (0: the group's retry backoff)."""
        self._consumer.settle(self, Ack(RELEASE, int(delay_ms)))

    def reject(self, reason: str = "") -> None:
        """Poison: the broker dead-letters it (the reason, <= 1024 characters, becomes a header)."""
        self._consumer.settle(self, Ack(REJECT, 0, reason))

    def header(self, name: str) -> bytes | None:
        """The value of the first header called `name`, or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def __repr__(self) -> str:
        return (f"QueueMessage({self.topic}-{self.partition}@{self.offset}, priority={self.priority}, delivery_count={self.delivery_count}, "
                f"key={self.key!r}, value={self.value!r:.60})")
