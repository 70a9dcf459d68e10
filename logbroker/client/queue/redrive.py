"""Redrive: move dead letters back to the topics they came from (SQS's redrive), at least once.

A dead letter (logbroker/group/share_headers.py) carries its source topic in `logbroker.dlq.topic`.
`redrive` reads the dead-letter topic as a member of a share group (default "redrive", created at
the log start: auto_offset_reset="earliest"), produces each record's copy to its source topic (key,
value and headers, minus the `logbroker.dlq.*` ones) with acks=all, and acknowledges the dead letter
only once the copy is acknowledged by the source topic's leader; a copy that fails releases it (it
comes again). A dead letter without the header cannot be moved: it is acknowledged in the redrive
group (so it is not looked at again) and logged; it stays in the dead-letter topic, as all records
do (acknowledging in a share group deletes nothing). The group's progress is durable, so a second
redrive moves only what was dead-lettered since.

It stops after `max_messages` moved, after `timeout_s`, or when two polls in a row find nothing.
"""

from __future__ import annotations

import logging
import time

from logbroker.client.metadata_cache import MetadataCache
from logbroker.client.producer import FutureRecordMetadata, Producer
from logbroker.client.queue.message import QueueMessage
from logbroker.client.queue.queue_consumer import QueueConsumer
from logbroker.errors import LogbrokerError
from logbroker.group import share_headers

log = logging.getLogger(__name__)

DLQ_HEADER_PREFIX = "logbroker.dlq."
REDRIVE_POLL_MS = 1_000
REDRIVE_BATCH_MAX = 500
_EMPTY_POLLS_TO_STOP = 2


def redrive_copy(message: QueueMessage) -> tuple[str, list[tuple[str, bytes | None]]] | None:
    """(source topic, headers of the copy) for a dead letter, or None when it names no source topic."""
    raw = message.header(share_headers.DLQ_TOPIC)
    if not raw:
        return None
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return topic, [(k, v) for k, v in message.headers if not k.startswith(DLQ_HEADER_PREFIX)]


def redrive(metadata: MetadataCache, dlq_topic: str, group: str = "redrive", max_messages: int | None = None,
            timeout_s: float = 30.0, request_timeout_ms: int = 30_000) -> int:
    """Move dead letters of `dlq_topic` back to their source topics; returns how many were moved."""
    if max_messages is not None and max_messages < 0:
        raise ValueError(f"max_messages must be >= 0, got {max_messages}")
    moved = 0
    empty = 0
    deadline = time.monotonic() + timeout_s
    limit = REDRIVE_BATCH_MAX if max_messages is None else min(max(max_messages, 1), REDRIVE_BATCH_MAX)
    with QueueConsumer(metadata, group, [dlq_topic], auto_offset_reset="earliest", max_poll_records=limit,
                       request_timeout_ms=request_timeout_ms) as consumer, \
            Producer(metadata, acks="all", request_timeout_ms=request_timeout_ms) as producer:
        while (max_messages is None or moved < max_messages) and empty < _EMPTY_POLLS_TO_STOP:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            if max_messages is not None:
                consumer.max_poll_records = min(limit, max_messages - moved)
            messages = consumer.poll(min(REDRIVE_POLL_MS, left_ms))
            empty = 0 if messages else empty + 1
            moved += _move(producer, messages, deadline)
            consumer.commit_acks()
    return moved


def _move(producer: Producer, messages: list[QueueMessage], deadline: float) -> int:
    """Copy each message to its source topic; ack it once the copy is acknowledged, else release it."""
    sent: list[tuple[QueueMessage, FutureRecordMetadata]] = []
    for m in messages:
        copy = redrive_copy(m)
        if copy is None:
            log.warning("redrive: %s-%s@%s has no %s header: left in place", m.topic, m.partition, m.offset,
                        share_headers.DLQ_TOPIC)
            m.ack()
            continue
        topic, headers = copy
        try:
            sent.append((m, producer.send(topic, m.value, key=m.key, headers=headers)))
        except (LogbrokerError, ValueError) as e:
            log.warning("redrive: %s-%s@%s to %s: %s", m.topic, m.partition, m.offset, topic, e)
            m.release()
    try:
        producer.flush(max(deadline - time.monotonic(), 1.0))
    except LogbrokerError as e:  # the futures say which copies made it
        log.warning("redrive: flush: %s", e)
    moved = 0
    for m, fut in sent:
        try:
            fut.result(max(deadline - time.monotonic(), 1.0))
        except Exception as e:  # the copy may not be there: the dead letter stays
            log.warning("redrive: %s-%s@%s not copied: %s", m.topic, m.partition, m.offset, e)
            m.release()
            continue
        m.ack()
        moved += 1
    return moved
