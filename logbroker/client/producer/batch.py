"""A producer batch and the per-partition and per-topic state that holds batches (Kafka's
`ProducerBatch` and the deques of `RecordAccumulator`), plus what a record is charged.

A batch's life (transitions made by the accumulator and the sender, under the producer's lock)::

    OPEN      records are appended by send(); it is `queue.open`
      │ full (the next record would pass batch_size_bytes), or the accumulator found it ready
      │ (linger_ms passed, flush() or close() waiting, buffer_memory_bytes exhausted)
      v
    SEALED    in `queue.queue`, oldest first; retried batches go back to its front
      │ drained when the partition is not muted and its leader is known, with the sealed batches
      │ behind it (back to back in one `records`, up to max_request_bytes)
      v
    IN FLIGHT counted in `queue.in_flight`; the partition is muted (at most one request per
      │       partition on the wire, so retries cannot reorder a partition), except for an idempotent
      │       producer, whose partition takes up to BATCHES_KEPT batches in flight in several requests:
      │       the broker refuses a batch out of sequence, and the producer resends it after the batch
      │       before it (`PartitionBatches.sent`, sender.py), as Kafka's
      │       max.in.flight.requests.per.connection=5 with idempotence; from the partition's first
      │       acknowledged batch under the producer's id on
      ├─ success ──────────────────────────────> DONE (futures resolve to RecordMetadata)
      ├─ retriable error, before the deadline ─> SEALED again after a backoff (the retry policy)
      ├─ refused because the topic grew (or behind such a batch) ─> REROUTE (in `acc.reroute`)
      └─ other error, or deadline passed ──────> DONE (futures raise)
    REROUTE   its records (and the partition's later ones) are appended to fresh batches, each
              where its key hashes now (reroute.py); it is DONE, its futures follow the records

    Any not-in-flight batch older than delivery_timeout_ms fails with KafkaTimeoutError.

Times (`created`, `deadline`, `retry_at`) are seconds on the producer's monotonic clock.
"""

from __future__ import annotations

import random
from collections import deque

from logbroker.client.producer.future import _BatchResult
from logbroker.cluster.hashing import partition_for_key
from logbroker.storage.record_batch import BatchBuilder

# Upper bound of a record's encoded size beyond its key, value and headers: length (5), attributes
# (1), timestampDelta (10), offsetDelta (5), keyLength (5), valueLength (5), headerCount (5).
RECORD_OVERHEAD_BYTES = 36
# Per header beyond its key and value bytes: keyLength (5) + valueLength (5).
HEADER_OVERHEAD_BYTES = 10
KEY_CACHE_ENTRIES = 1 << 16
# A batch's `placed_by` while none of its keyed records was placed by hashing (or it has none): the
# largest declaration, so a broker checks nothing (ProducePartition.keys_placed_by_partitions).
PLACED_BY_ANY = (1 << 31) - 1


class ProducerBatch:
    __slots__ = ("acc", "builder", "result", "created", "deadline", "retry_at", "attempts",
                 "charged", "payload", "record_count", "last_error", "solo", "sequenced", "order",
                 "producer_id", "base_sequence", "generation", "pinned", "reroutes", "placed_by")

    def __init__(self, acc: PartitionBatches, builder: BatchBuilder, now: float, deadline: float) -> None:
        self.acc = acc
        self.builder: BatchBuilder | None = builder
        self.result = _BatchResult(acc.topic, acc.partition)
        self.created = now
        self.deadline = deadline
        self.retry_at = 0.0
        self.attempts = 0
        self.charged = 0
        self.payload: bytes | None = None
        self.record_count = 0
        self.last_error: BaseException | None = None
        self.solo = False  # ship alone: it was in a request a non-retriable error rejected as a whole
        self.sequenced = False  # encoded with an idempotent producer's id and sequence
        self.order = 0  # sequenced: its place in the partition's sequence (a producer-wide counter)
        self.producer_id = -1  # sequenced: the producer id it was encoded with
        self.base_sequence = -1  # sequenced: its first record's sequence
        self.generation = acc.ts.generation if acc.ts is not None else 0  # its topic's growths when opened
        # (first delta, count) of the records sent with an explicit partition (reroute.py); None: none
        self.pinned: list[tuple[int, int]] | None = None
        self.reroutes = 0  # how many times its records were re-routed (reroute.py)
        # The fewest partitions any of its keyed records was placed by (hashed over); 0: a keyed
        # record placed by the user. Sent as keys_placed_by_partitions: a grown topic's broker decodes
        # the keys only when this is below its count (cluster/lineage.py).
        self.placed_by = PLACED_BY_ANY

    def pin(self, first: int, count: int) -> None:
        """Records first .. first+count-1 were sent to a partition the user chose."""
        if self.pinned is None:
            self.pinned = [(first, count)]
        else:
            self.pinned.append((first, count))

    def size_bytes(self) -> int:
        if self.payload is not None:
            return len(self.payload)
        assert self.builder is not None
        return self.builder.size_bytes


class PartitionBatches:
    __slots__ = ("topic", "partition", "open", "queue", "in_flight", "sent", "confirmed_producer_id", "ts",
                 "reroute", "reroute_known")

    def __init__(self, topic: str, partition: int, ts: TopicState | None = None) -> None:
        self.topic = topic
        self.partition = partition
        self.ts = ts
        # Batches refused because the topic grew (and those swept along behind them), waiting to be
        # re-routed (reroute.py): while not None the partition ships nothing
        self.reroute: list[ProducerBatch] | None = None
        self.reroute_known = False  # the producer's partition count explains a refusal (reroute.explained)
        self.open: ProducerBatch | None = None
        self.queue: deque[ProducerBatch] = deque()
        self.in_flight = 0  # batches in requests not answered yet
        # Sequenced batches sent and not finished (in flight, or back in the queue for a retry), in
        # sequence order: the first is the one the broker expects next.
        self.sent: dict[ProducerBatch, None] = {}
        # The producer id a batch of this partition was acknowledged under: until then one batch at a
        # time (a broker takes any sequence from a producer id it does not know, so a first batch
        # that failed must not be overtaken by the next)
        self.confirmed_producer_id = -1

    def idle(self) -> bool:
        return self.open is None and not self.queue and self.in_flight == 0 and self.reroute is None

    def unresolved(self) -> int:
        """Its batches not done yet (open, queued, in flight, waiting to be re-routed)."""
        return (self.open is not None) + len(self.queue) + self.in_flight + len(self.reroute or ())

    def requeue(self, b: ProducerBatch) -> None:
        """A batch back for a retry: at the queue front, after the retried batches of lower sequence."""
        queue = self.queue
        i = 0
        if b.sequenced:
            while i < len(queue) and queue[i].sequenced and queue[i].order < b.order:
                i += 1
        queue.insert(i, b)


class TopicState:
    """Per topic: partition count, accumulators, the sticky partition and a key -> partition memo.

    The memo spares send() the jump hash (~0.7 us in Python) for keys seen before; it holds at
    most KEY_CACHE_ENTRIES keys. `hashing` is (the partition count, the memo of that count), one
    attribute that `grow` replaces as a whole: a send() racing with a growth reads a consistent pair,
    so the count a key was placed by is known exactly (ProducerBatch.placed_by) without the lock.

    Growth (reroute.py): `generation` counts the growths seen; `old_batches` is how many batches
    opened before the last growth are not done yet. While there are any, the partitions from
    `held_from` on (the new ones) ship nothing: a moved key's records still in an old partition
    (perhaps refused there and re-routed to the front of its new partition) go first.
    """

    __slots__ = ("name", "partitions", "accs", "sticky", "hashing", "generation", "old_batches", "held_from")

    def __init__(self, name: str, partitions: int) -> None:
        self.name = name
        self.generation = 0
        self.old_batches = 0
        self.held_from = partitions
        self.accs = [PartitionBatches(name, p, self) for p in range(partitions)]
        self.partitions = partitions
        self.sticky = random.randrange(partitions)
        self.hashing: tuple[int, dict[bytes, int]] = (partitions, {})

    def grow(self, partitions: int) -> None:
        """The topic has `partitions` now (more than before; with the producer's lock held)."""
        # Only the partitions new now are held: one created by an earlier growth may hold batches
        # opened before this one, which must ship. (Two growths within a round trip may so let a
        # key moved twice overtake its own record: reroute.py.)
        self.old_batches = sum(acc.unresolved() for acc in self.accs)
        self.held_from = self.partitions
        self.generation += 1
        for p in range(len(self.accs), partitions):
            self.accs.append(PartitionBatches(self.name, p, self))
        self.partitions = partitions  # after accs grew: send() reads it without the lock
        self.hashing = (partitions, {})  # count and memo together (class doc)

    def held(self, partition: int) -> bool:
        """Whether `partition` waits for the batches opened before the last growth (class doc)."""
        return self.old_batches > 0 and partition >= self.held_from

    def retired(self, b: ProducerBatch) -> None:
        """`b` is done (delivered, failed or re-routed)."""
        if b.generation < self.generation and self.old_batches > 0:
            self.old_batches -= 1


def place_key(key: bytes, count: int, cache: dict[bytes, int]) -> int:
    """The key's partition among `count` (a memo miss), remembered in `cache` (the memo of that count)."""
    p = partition_for_key(key, count)
    if len(cache) >= KEY_CACHE_ENTRIES:
        cache.clear()
    cache[key] = p
    return p


def to_bytes(data: object, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")


def normalize_headers(headers: object) -> tuple[list[tuple[str, bytes | None]], int]:
    items = headers.items() if isinstance(headers, dict) else headers
    out: list[tuple[str, bytes | None]] = []
    size = 5
    for hk, hv in items:  # type: ignore[attr-defined]
        if not isinstance(hk, str):
            raise TypeError(f"header keys must be str, not {type(hk).__name__}")
        if hv is not None and hv.__class__ is not bytes:
            hv = to_bytes(hv, "header value")
        out.append((hk, hv))
        size += HEADER_OVERHEAD_BYTES + len(hk.encode()) + (len(hv) if hv is not None else 0)
    return out, size
