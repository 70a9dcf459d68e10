"""Re-routing the records of a batch its broker refused because the topic grew (pure).

A grown topic's leader refuses a batch holding a key that hashes to another partition under the new
count (PARTITION_COUNT_CHANGED, logbroker/cluster/lineage.py). The producer then sends that batch's
records again, each to where it belongs now, without letting any record overtake an earlier record
of its key:

1. The refused batch goes to its partition's `reroute` list (batch.py) and the partition ships
   nothing more. Its batches still in flight are answered first: those refused too (out of
   sequence behind it, or for the same reason, or a retriable error) join the list, those accepted
   are done (an accepted batch holds no moved key: the broker checks every batch).
2. When nothing of the partition is in flight and the producer knows the new count (its metadata
   grew the topic since the batch was opened, or its count puts a key of the batch elsewhere:
   `explained`), the sender re-routes (`split_queue`): the
   refused batches, the queued batches after the first of them, and the open batch, in their
   original order, are decoded and their records appended to fresh batches, each record to the
   partition `target` names, in order. Batches of the partition queued before the first refused one
   (retries of earlier sequences) stay where they are, ahead.
3. A record of a moved key goes to a new partition, which has held everything since the producer
   learned of the growth (batch.TopicState: new partitions wait for every batch opened before it),
   so the re-routed records are put at the front of its queue, ahead of the records sent after the
   growth. Records staying in the partition go to the back of its queue (everything after them was
   taken along).

Each record's future follows it (future.py `_BatchResult.moved`): it resolves to the partition and
offset where the record finally landed. A record sent with an explicit partition is not moved: if
its key hashes elsewhere now it fails with PartitionCountChangedError (the user chose the
partition), else it goes back to its partition. A record re-routed REROUTES_MAX times whose batch is
refused again fails as well, and so does one whose delivery_timeout_ms has passed.

Limits: a topic grown twice within one round trip may let a key that moved twice overtake its own
record (only the partitions new at the last growth are held). A refused batch waits for the new
count at most until its delivery_timeout_ms, then its records fail.

Decoding a refused batch costs what the consumer pays per record; it happens once per partition per
growth, and nothing is kept per record on the send path (only the ranges of explicitly partitioned
records, `ProducerBatch.pinned`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

from logbroker.cluster.hashing import partition_for_key

REROUTES_MAX = 1  # re-routes of a record; a record re-routed this often and refused again fails
FAILED = -1  # `target`: the record fails


class Sequenced(Protocol):
    @property
    def sequenced(self) -> bool: ...

    @property
    def order(self) -> int: ...


B = TypeVar("B", bound=Sequenced)


def split_queue(refused: Sequence[B], queue: Sequence[B]) -> tuple[list[B], list[B]]:
    """(kept, moving): the queued batches that stay at the queue front (sequenced before the first
    refused one: retries of earlier batches), and the batches to re-route in their original order
    (the refused ones and the rest of the queue; sequenced batches by their sequence order, then
    batches never sent, in queue order). The open batch, if any, comes after `moving`."""
    first = min((b.order for b in refused if b.sequenced), default=None)
    kept = [q for q in queue if q.sequenced and first is not None and q.order < first]
    sent = sorted([*refused, *(q for q in queue if q.sequenced and q not in kept)],
                  key=lambda b: b.order if b.sequenced else -1)
    unsent = [q for q in queue if not q.sequenced]
    return kept, sent + unsent


def is_pinned(pinned: Sequence[tuple[int, int]] | None, delta: int) -> bool:
    """Whether record `delta` of a batch was sent to a partition the user chose."""
    return pinned is not None and any(first <= delta < first + count for first, count in pinned)


def target(key: bytes | None, pinned: bool, exhausted: bool, partition: int, partitions: int) -> int:
    """Where a record of `partition`'s re-routed batches goes under `partitions`, or FAILED.
    `exhausted`: its batch was refused after REROUTES_MAX re-routes."""
    if exhausted:
        return FAILED
    if key is None:
        return partition  # no key, no order to keep across partitions: back where it was
    placed = partition_for_key(key, partitions)
    if pinned:
        return partition if placed == partition else FAILED
    return placed


def explained(keys: Iterable[bytes | None], partition: int, partitions: int) -> bool:
    """Whether `partitions` explains why `partition` refused a batch with these keys (one of them
    hashes elsewhere): the producer knows the new count already (it may have learnt it before the
    refusal, or have started after the growth), else it waits for its metadata to show it."""
    return any(k is not None and partition_for_key(k, partitions) != partition for k in keys)


def runs(targets: Sequence[int]) -> list[tuple[int, int, int]]:
    """Consecutive records with one target: (target, start, end), in order."""
    out: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(targets) + 1):
        if i == len(targets) or targets[i] != targets[start]:
            if targets:
                out.append((targets[start], start, i))
            start = i
    return out
