"""The producer, the public class: `send()` and `send_many()` append to per-partition record
batches; one sender thread ships them (with `linger_ms=0`, the calling thread ships its own batch
when no other thread is shipping). The parts, as Kafka's Java producer is split:

    future.py       FutureRecordMetadata / FutureRecordsMetadata and the per-batch result they share
    batch.py        ProducerBatch, the per-partition batches, the per-topic state; a record's charge
    accumulator.py  RecordAccumulator: appending, buffer memory, which batches are ready (drain)
    idempotence.py  ProducerIdentity: the idempotent producer's id, epoch and per-partition sequences
    sender.py       Sender: the thread that ships drained batches and handles responses and retries
    producer.py     Producer: checks arguments, appends (send() inlines the append: see below)

Data flow::

    send() ─────┐
    send_many() ┴> PartitionBatches.open (a BatchBuilder) ──sealed──> .queue ──> drain ──> Sender
                                                                                  │ one Produce per leader
    future.result() <── _BatchResult.complete() <── response (reader thread) ──> completions

The hot path is `send()`: one lock acquisition, one BatchBuilder.append, one small future object.
Futures are `FutureRecordMetadata`: three slots pointing at the batch's shared `_BatchResult` (no
`concurrent.futures.Future` per record). Callbacks run on the sender thread when the batch completes.

The batch path is `send_many()`: the whole call is checked with C-level passes over the values
(types, lengths), then appended batch by batch (one lock acquisition and one
BatchBuilder.append_many per batch, one C builder call per record) and gets ONE future,
`FutureRecordsMetadata`, holding a (batch result, first delta, count) segment per batch; the
per-record RecordMetadata are built only if `result()` is called. ~0.15 us per 100-byte record
against ~0.7 us for `send()`.

Memory is bounded by `buffer_memory_bytes` (an upper-bound estimate of each record's encoded size is
charged at send() / send_many() and released when its batch completes); both block up to
`max_block_ms` when it is full. Requests are bounded by `max_request_bytes`, in-flight requests per broker by
`max_in_flight_requests`, retries by `delivery_timeout_ms` and `retries` (the wait between tries:
logbroker/client/backoff.py). Deadlines, linger and backoffs run on the injected `clock`.

`encryption_key_file` (client/encryption.py): send() and send_many() seal each non-null value before
it is appended (the size charged is the sealed one); without it they do nothing more per record than
one attribute test. `client_id` (logbroker/client_id.py) rides on every connection and call.

send() appends in this class (the accumulator's state is its own, by inheritance) rather than
calling into the accumulator: one more Python call per record costs about a quarter of send().
"""

from __future__ import annotations

import contextlib
import itertools
import operator
import os
import threading
import time
from collections.abc import Sequence

from logbroker.client.backoff import client_retry_policy
from logbroker.client.encryption import Sealer, load_key_file
from logbroker.client.metadata_cache import MetadataCache, metadata_for
from logbroker.client.producer.accumulator import REQUEST_OVERHEAD_BYTES, RecordAccumulator
from logbroker.client.producer.batch import (
    RECORD_OVERHEAD_BYTES,
    TopicState,
    normalize_headers,
    place_key,
    to_bytes,
)
from logbroker.client.producer.delivery import with_delivery_headers
from logbroker.client.producer.future import (
    FutureRecordMetadata,
    FutureRecordsMetadata,
    _BatchResult,
    failed_future,
    failed_records_future,
)
from logbroker.client.producer.idempotence import ProducerIdentity, init_producer_id
from logbroker.client.producer.sender import Sender
from logbroker.client.sasl import SaslConfig
from logbroker.clock import SYSTEM_CLOCK, Clock
from logbroker.cluster.priority_levels import PRIORITY_LEVELS_MAX, level_topic
from logbroker.errors import (
    BrokerUnavailableError,
    InvalidPriorityError,
    KafkaTimeoutError,
    LogbrokerError,
    MessageTooLargeError,
    UnknownTopicOrPartitionError,
)
from logbroker.storage.producer_state import BATCHES_KEPT
from logbroker.storage.record_batch import COMPRESSION_GZIP, COMPRESSION_NONE, HEADER_SIZE, CopiedRecord
from logbroker.tls import TlsConfig

# How long send() waits for a topic the brokers call unknown (a just-created topic may still be
# reaching them) before raising UnknownTopicOrPartitionError.
UNKNOWN_TOPIC_WAIT_MS = 3_000
# An idempotent producer's batches of one partition per request: BATCHES_KEPT of them may be in flight,
# so requests of 1 keep several on the wire at once (the next leaves while the broker appends one).
PIPELINED_BATCHES_PER_REQUEST = 1

# Record timestamps are wall-clock time read per record (a call to the injected clock per send()
# would cost more than the rest of its bookkeeping); deadlines and linger use the injected clock.
_time_ns = time.time_ns


def parse_acks(acks: int | str) -> int:
    if acks in ("all", -1, "-1"):
        return -1
    if acks in (1, "1"):
        return 1
    if acks in (0, "0"):
        return 0
    raise ValueError(f"acks must be 'all', -1, 1 or 0, not {acks!r}")


class Producer(RecordAccumulator):
    """Sends records to topics; thread-safe (any number of threads may call send())."""

    def __init__(
        self,
        bootstrap: str | Sequence[str] | MetadataCache,
        *,
        acks: int | str = "all",
        linger_ms: int = 5,
        batch_size_bytes: int = 1 << 20,
        max_request_bytes: int = 8 << 20,
        delivery_timeout_ms: int = 120_000,
        request_timeout_ms: int = 30_000,
        retries: int = 2**31 - 1,
        retry_backoff_ms: int = 100,
        buffer_memory_bytes: int = 64 << 20,
        max_block_ms: int = 60_000,
        compression: str | None = None,
        max_in_flight_requests: int = 5,
        metadata_max_age_ms: int = 300_000,
        transport: str = "tcp",
        clock: Clock | None = None,
        tls: TlsConfig | bool | None = None,
        sasl: SaslConfig | None = None,
        client_id: str | None = None,
        encryption_key_file: str | os.PathLike[str] | None = None,
        encryption_key_id: str | None = None,
        enable_idempotence: bool | None = None,
        producer_name: str | None = None,
    ) -> None:
        """`client_id`: the name brokers log (and later apply quotas) for this producer
        (logbroker/client_id.py; None: "logbroker-python"; ValueError when malformed).
        `encryption_key_file`: seal every non-null value with AES-256-GCM before it leaves the
        process (client/encryption.py: file format, what stays plaintext), with the file's current
        key or `encryption_key_id`; EncryptionKeyError when the file cannot be used.
        `enable_idempotence` (idempotence.py): None (the default) turns it on with acks='all' and off
        otherwise, True requires acks='all', False writes producerId -1 as a plain producer.
        `producer_name`: a stable name for an idempotent producer; a new producer with the same name
        fences this one (its batches then fail with InvalidProducerEpochError)."""
        sealer = _sealer(encryption_key_file, encryption_key_id)
        if linger_ms < 0 or retry_backoff_ms < 0 or max_block_ms < 0 or retries < 0:
            raise ValueError("linger_ms, retry_backoff_ms, max_block_ms and retries must be >= 0")
        if batch_size_bytes <= HEADER_SIZE + RECORD_OVERHEAD_BYTES:
            raise ValueError(f"batch_size_bytes must be above {HEADER_SIZE + RECORD_OVERHEAD_BYTES}")
        if max_request_bytes < batch_size_bytes + REQUEST_OVERHEAD_BYTES:
            raise ValueError("max_request_bytes must exceed batch_size_bytes by at least 1 KiB")
        if buffer_memory_bytes < batch_size_bytes:
            raise ValueError("buffer_memory_bytes must be at least batch_size_bytes")
        if request_timeout_ms <= 0 or delivery_timeout_ms < linger_ms + request_timeout_ms:
            raise ValueError("delivery_timeout_ms must be at least linger_ms + request_timeout_ms")
        if max_in_flight_requests < 1:
            raise ValueError("max_in_flight_requests must be at least 1")
        if compression not in (None, "none", "gzip"):
            raise ValueError(f"compression must be None or 'gzip', not {compression!r}")
        self._acks = parse_acks(acks)
        self._sealer = sealer
        idempotent = _idempotent(self._acks, enable_idempotence, producer_name)
        self._max_request_bytes = max_request_bytes
        self._max_record_bytes = min(max_request_bytes - REQUEST_OVERHEAD_BYTES - HEADER_SIZE, buffer_memory_bytes)
        self._retry_backoff_ms = retry_backoff_ms
        metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, retry_backoff_ms, transport,
                                                     clock, tls, sasl, client_id)
        super().__init__(
            metadata, linger_ms=linger_ms, batch_size_bytes=batch_size_bytes, max_request_bytes=max_request_bytes,
            delivery_timeout_ms=delivery_timeout_ms, buffer_memory_bytes=buffer_memory_bytes,
            max_block_ms=max_block_ms, compression=COMPRESSION_GZIP if compression == "gzip" else COMPRESSION_NONE,
            max_in_flight_requests=max_in_flight_requests, metadata_max_age_ms=metadata_max_age_ms, clock=clock,
        )
        self._clock = clock or SYSTEM_CLOCK
        self._streams = metadata.client_streams()  # ours, even on a shared cache; the sender's only
        self.identity = (ProducerIdentity(
            lambda req, timeout_s: init_producer_id(metadata, req, timeout_s), producer_name or "",
            client_retry_policy(retry_backoff_ms), request_timeout_ms / 1000) if idempotent else None)
        if idempotent:  # a partition's batches in several requests at once (batch.py)
            self.partition_batches_per_request_max = PIPELINED_BATCHES_PER_REQUEST
            self.partition_in_flight_batches_max = BATCHES_KEPT
        self._sender = Sender(self, metadata, self._streams, acks=self._acks,
                              request_timeout_ms=request_timeout_ms, retries=retries,
                              retry_backoff_ms=retry_backoff_ms, identity=self.identity)
        self._ship_inline = self._sender.ship_inline  # bound once: send() calls it per record with linger_ms=0
        self._sender.start()

    # -- send ------------------------------------------------------------------------------

    def send(
        self, topic: str, value: bytes | str | None, key: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None = None,
        partition: int | None = None, timestamp_ms: int | None = None,
        delay_ms: int | None = None, deliver_at_ms: int | None = None, ttl_ms: int | None = None, priority: int = 0,
    ) -> FutureRecordMetadata:
        """Queue one record; the future resolves to its RecordMetadata once the broker has it.
        `delay_ms` / `deliver_at_ms` (ms since the epoch) and `ttl_ms` become the record's delivery
        headers for share groups (client/producer/delivery.py; ValueError when out of bounds).
        `priority` (0 lowest .. priority_levels-1): share groups get higher levels first (`_level_log`).

        Blocks only while the topic's metadata is unknown or buffer_memory_bytes is full, each at most
        max_block_ms (then KafkaTimeoutError). A record too large to ever send gets a failed future
        (MessageTooLargeError). With a key file, the value is sealed for `topic` (client/encryption.py).
        A keyed record follows its key to its new partition if the topic grows (reroute.py).
        """
        if value is not None and value.__class__ is not bytes:
            value = to_bytes(value, "value")
        if key is not None and key.__class__ is not bytes:
            key = to_bytes(key, "key")
        if self._sealer is not None:  # sealed for the user's topic, not a level log; a null value marked too
            value, headers = self._sealer.value(topic, value), self._sealer.headers(headers)
        if timestamp_ms is None:
            timestamp_ms = _time_ns() // 1_000_000
        topic = self._level_log(topic, priority) if priority else topic
        if delay_ms is not None or deliver_at_ms is not None or ttl_ms is not None:
            headers = with_delivery_headers(headers, _time_ns() // 1_000_000, delay_ms, deliver_at_ms, ttl_ms)
        ts = self._topics.get(topic)
        if ts is None:
            ts = self._topic_state(topic)
        size = RECORD_OVERHEAD_BYTES + (0 if value is None else len(value)) + (0 if key is None else len(key))
        hdrs = None
        if headers:
            hdrs, hsize = normalize_headers(headers)
            size += hsize
        if size > self._max_record_bytes:
            return failed_future(topic, -1 if partition is None else partition, MessageTooLargeError(
                f"record of ~{size} bytes exceeds what the producer can send "
                f"(max_request_bytes {self._max_request_bytes}, buffer_memory_bytes {self._buffer_memory_bytes})"
            ), timestamp_ms)
        placed = 0  # the partition count the key was placed by; 0: by the user (ProducerBatch.placed_by)
        if not (pinned := partition is not None):  # pinned: the user's choice, never re-routed (reroute.py)
            if key is not None:
                placed, cache = ts.hashing  # one consistent (count, memo) pair: TopicState
                partition = cache[key] if key in cache else place_key(key, placed, cache)
        elif not 0 <= partition < ts.partitions:
            self._check_partition(ts, partition)
        limit = self._batch_size_bytes
        lock = self._lock
        lock.acquire()
        try:
            if self._closed:
                raise LogbrokerError("send() after close()")
            if self._buffered_bytes + size > self._buffer_memory_bytes:
                self._wait_for_buffer(size)
            acc = ts.accs[ts.sticky if partition is None else partition]
            b = acc.open
            delta = -1 if b is None else b.builder.try_append(  # type: ignore[union-attr]
                timestamp_ms, key, value, hdrs, size, limit)
            if delta < 0:
                if partition is None:
                    acc = ts.accs[self._next_sticky(ts)]  # the sticky batch shipped or filled up
                    b = acc.open
                    if b is not None:
                        delta = b.builder.try_append(  # type: ignore[union-attr]
                            timestamp_ms, key, value, hdrs, size, limit)
                if delta < 0:
                    b = self._new_batch(acc, timestamp_ms)
                    delta = b.builder.append(timestamp_ms, key, value, hdrs)  # type: ignore[union-attr]
            b.charged += size  # type: ignore[union-attr]
            self._buffered_bytes += size
            if pinned:
                b.pin(delta, 1)  # type: ignore[union-attr]
            if key is not None and placed < b.placed_by:  # type: ignore[union-attr]
                b.placed_by = placed  # type: ignore[union-attr]
        finally:
            lock.release()
        if self._ship_inline_enabled:
            self._ship_inline()
        return FutureRecordMetadata(b.result, delta, timestamp_ms)  # type: ignore[union-attr]

    def send_many(
        self,
        topic: str,
        values: Sequence[bytes | str | None],
        keys: Sequence[bytes | str | None] | None = None,
        *,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None = None,
        timestamp_ms: int | None = None,
        priority: int = 0,
    ) -> FutureRecordsMetadata:
        """Queue many records at once: what `send` does for each, at a fraction of its cost per record.

        Record i is (keys[i], values[i]) (`keys` None: every key null), each carrying `headers`
        and stamped `timestamp_ms` (default: now), both shared by the call. Records go where `send`
        would put them: to `partition` if given, else keyed ones by the key's consistent hash and
        null-key ones to the sticky partition; they join the same per-partition batches as `send`'s
        (a `send` and a `send_many` from one thread keep their order within a partition), filling
        one batch after another; `priority` as in `send`. Returns ONE future (FutureRecordsMetadata) for the whole call.

        Everything is checked before any record is queued: a value or key neither bytes, str nor
        None, or `keys` of another length, raises TypeError / ValueError; an unknown topic or
        partition raises as in `send`; a record too large to ever send gives an already failed future
        (MessageTooLargeError). In each case nothing of the call is queued.

        Blocks as `send` does while the topic's metadata is unknown or buffer_memory_bytes is full
        (a call larger than the free buffer waits for room batch by batch). If max_block_ms passes
        while it waits, KafkaTimeoutError is raised: the records queued before stay queued (their
        batches are delivered; `flush()` waits for them), the rest are not.
        """
        if self._sealer is not None:
            values, headers = self._sealed_many(topic, values, headers)
        if priority:
            topic = self._level_log(topic, priority)
        fut = self._queue_many(topic, values, keys, partition, headers, timestamp_ms)
        if self._ship_inline_enabled:
            self._ship_inline()
        return fut

    def send_records(self, topic: str, partition: int, records: Sequence[CopiedRecord]) -> FutureRecordsMetadata:
        """Queue records read from another log into `partition`, as they are: each
        (timestamp_ms, key, value, headers) keeps its own timestamp and headers. The copy path (the
        mirror, logbroker/mirror/): per record only the encoding, no checks or partitioning, and ONE
        future for the call (`FutureRecordsMetadata.runs()` gives the offsets without an object per
        record).

        Keys and values must be bytes or None and headers (str, bytes or None) pairs, as a Consumer
        returns them: a record of another type raises TypeError with the records before it queued.
        A record too large for a request fails its batch at the broker. Not with a key file (the
        values would not be sealed): ValueError. Blocks as `send_many` does for metadata and buffer
        memory.
        """
        if self._sealer is not None:
            raise ValueError("send_records() copies records as they are: not with a key file")
        ts = self._topics.get(topic)
        if ts is None:
            ts = self._topic_state(topic)
        if not 0 <= partition < ts.partitions:
            self._check_partition(ts, partition)
        segments: list[tuple[_BatchResult, int, int]] = []
        if records:
            self.append_copies(ts, partition, records, segments)
            if self._ship_inline_enabled:
                self._ship_inline()
        return FutureRecordsMetadata(topic, segments, None, records[0][0] if records else -1, len(records))

    def _sealed_many(
        self, topic: str, values: Sequence[bytes | str | None],
        headers: Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None,
    ) -> tuple[list[bytes | None], list[tuple[str, bytes | str | None]]]:
        """send_many()'s values sealed (each with its own nonce) and its shared headers marked."""
        sealer = self._sealer
        assert sealer is not None
        if isinstance(values, str | bytes | bytearray | memoryview):
            raise TypeError(f"send_many() takes a sequence of values, not one {type(values).__name__}")
        seal = sealer.value
        sealed = [None if v is None else seal(topic, v if v.__class__ is bytes else to_bytes(v, "value"))
                  for v in values]
        return sealed, sealer.headers(headers)

    def _queue_many(
        self, topic: str, values: Sequence[bytes | str | None], keys: Sequence[bytes | str | None] | None,
        partition: int | None, headers: Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None,
        timestamp_ms: int | None,
    ) -> FutureRecordsMetadata:
        """send_many() up to queueing its records (its checks, then append_records)."""
        vals, ks, lens = _checked_records(values, keys)
        n = len(vals)
        if timestamp_ms is None:
            timestamp_ms = _time_ns() // 1_000_000
        ts = self._topics.get(topic)
        if ts is None:
            ts = self._topic_state(topic)
        if n == 0:
            return FutureRecordsMetadata(topic, [], None, timestamp_ms, 0)
        per_record = RECORD_OVERHEAD_BYTES
        hdrs = None
        if headers:
            hdrs, hsize = normalize_headers(headers)
            per_record += hsize
        largest = per_record + max(lens)
        if largest > self._max_record_bytes:
            return failed_records_future(topic, -1 if partition is None else partition, MessageTooLargeError(
                f"a record of ~{largest} bytes exceeds what the producer can send "
                f"(max_request_bytes {self._max_request_bytes}, buffer_memory_bytes {self._buffer_memory_bytes})"
            ), n, timestamp_ms)
        if partition is not None and not 0 <= partition < ts.partitions:
            self._check_partition(ts, partition)

        segments: list[tuple[_BatchResult, int, int]] = []
        if partition is not None or ks is None:
            self.append_records(ts, partition, ks, vals, lens, timestamp_ms, hdrs, per_record, segments,
                                pinned=partition is not None)
            return FutureRecordsMetadata(topic, segments, None, timestamp_ms, n)
        # Keyed: each partition's records in input order; null keys go sticky (partition -1 here).
        placed, cache = ts.hashing  # one consistent (count, memo) pair: TopicState
        memo: dict[bytes | None, int] = cache  # type: ignore[assignment]  # None is never in it
        parts: list[int] = list(map(memo.get, ks, itertools.repeat(-2)))  # -2: not in the memo
        if -2 in parts:
            for i, p in enumerate(parts):
                if p == -2:
                    k = ks[i]
                    parts[i] = -1 if k is None else place_key(k, placed, cache)
        first = parts[0]
        if parts.count(first) == n:
            self.append_records(ts, None if first < 0 else first, ks, vals, lens, timestamp_ms, hdrs,
                                 per_record, segments, placed=placed)
            return FutureRecordsMetadata(topic, segments, None, timestamp_ms, n)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(parts):
            g = groups.get(p)
            if g is None:
                groups[p] = [i]
            else:
                g.append(i)
        order: list[int] = []
        for p, idx in groups.items():
            self.append_records(
                ts, None if p < 0 else p, [ks[i] for i in idx], [vals[i] for i in idx], [lens[i] for i in idx],
                timestamp_ms, hdrs, per_record, segments, placed=placed,
            )
            order += idx
        return FutureRecordsMetadata(topic, segments, order, timestamp_ms, n)

    def _topic_state(self, topic: str) -> TopicState:
        """Wait for the topic's metadata: up to max_block_ms while no broker answers, and up to
        UNKNOWN_TOPIC_WAIT_MS (within max_block_ms) while brokers answer that the topic does not
        exist (brokers do not auto-create topics; a new one may still be reaching them)."""
        if not isinstance(topic, str) or not topic:
            raise TypeError("topic must be a non-empty str")
        start = self._monotonic()
        deadline = start + self._max_block_s
        unknown_deadline = start + min(self._max_block_s, UNKNOWN_TOPIC_WAIT_MS / 1000)
        backoff = client_retry_policy(self._retry_backoff_ms).start(clock=self._clock)
        while True:
            try:
                n = self._metadata.partitions_for(topic)
                break
            except UnknownTopicOrPartitionError:
                remaining = unknown_deadline - self._monotonic()
                if remaining <= 0 or self._closed:
                    raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist") from None
            except BrokerUnavailableError as e:
                remaining = deadline - self._monotonic()
                if remaining <= 0 or self._closed:
                    raise KafkaTimeoutError(f"no metadata for topic {topic!r}: {e}") from e
            wait_ms = backoff.failed()  # no attempt bound, no deadline of its own: never None
            time.sleep(min((wait_ms or 0) / 1000, remaining))
        with self._lock:
            ts = self._topics.get(topic)
            if ts is None:
                ts = TopicState(topic, n)
                self._topics[topic] = ts
            return ts

    def _level_log(self, topic: str, priority: int) -> str:
        """The log of `topic`'s records of `priority` (> 0): its hidden level topic
        (cluster/priority_levels.py; RecordMetadata names it), which exists only if the topic was
        created with more levels; else InvalidPriorityError, and nothing is queued."""
        if type(priority) is not int or not 0 <= priority < PRIORITY_LEVELS_MAX:
            raise InvalidPriorityError(f"priority {priority!r} is not an integer in [0, {PRIORITY_LEVELS_MAX - 1}]")
        name = level_topic(topic, priority)
        if name in self._topics:
            return name
        if topic not in self._topics:
            self._topic_state(topic)  # the topic itself must exist (UnknownTopicOrPartitionError)
        try:
            self._metadata.partitions_for(name)
        except UnknownTopicOrPartitionError:
            raise InvalidPriorityError(f"topic {topic!r} has no priority level {priority} (create it with "
                                       f"priority_levels > {priority})") from None
        return name

    def _check_partition(self, ts: TopicState, partition: int) -> None:
        self._metadata.refresh([ts.name])
        n = self._metadata.cached_partitions(ts.name)
        if n is not None and n > ts.partitions:
            with self._lock:
                ts.grow(n)
        if not 0 <= partition < ts.partitions:
            raise UnknownTopicOrPartitionError(
                f"partition {partition} of topic {ts.name!r} does not exist (it has {ts.partitions})"
            )

    def flush(self, timeout: float | None = None) -> None:
        """Send everything queued now and wait until each of those records is done (delivered or failed).

        Raises KafkaTimeoutError if `timeout` seconds pass first.
        """
        if threading.current_thread() is self._sender.thread:
            raise LogbrokerError("flush() from a producer callback would deadlock")
        deadline = None if timeout is None else self._monotonic() + timeout
        with self._lock:
            results = [b.result for b in self._incomplete]
            self._flushing += 1
            self._sender_cond.notify()
        try:
            for r in results:
                remaining = None if deadline is None else max(0.0, deadline - self._monotonic())
                if not r.wait(remaining):
                    raise KafkaTimeoutError(f"flush() timed out after {timeout} s")
        finally:
            with self._lock:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> None:
        """Deliver what is queued (up to `timeout` s; None: up to delivery_timeout_ms), then stop.

        Records still undelivered at the deadline fail with KafkaTimeoutError. Never blocks past
        `timeout`. From a callback (the sender thread) it does not wait at all.
        """
        on_sender = threading.current_thread() is self._sender.thread
        deadline = None if timeout is None else self._monotonic() + timeout
        with self._lock:
            already = self._closed
            self._closed = True
            self._space_cond.notify_all()
        if not already and not on_sender and (timeout is None or timeout > 0):
            with contextlib.suppress(KafkaTimeoutError):
                self.flush(timeout)
        with self._lock:
            self._sender.stop()
        if on_sender:
            return
        remaining = None if deadline is None else max(0.0, deadline - self._monotonic())
        self._sender.thread.join(remaining)
        if self._owns_metadata:
            self._metadata.close()  # also cancels whatever is still in flight

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partitions_for(self, topic: str) -> int:
        return self._metadata.partitions_for(topic)

    @property
    def metrics(self) -> dict[str, int]:
        with self._lock:
            return {
                "buffered_bytes": self._buffered_bytes,
                "incomplete_batches": len(self._incomplete),
                "in_flight_requests": sum(self._in_flight_per_broker.values()),
            }


def _checked_records(
    values: Sequence[bytes | str | None], keys: Sequence[bytes | str | None] | None,
) -> tuple[Sequence[bytes | None], Sequence[bytes | None] | None, list[int]]:
    """send_many()'s values and keys as bytes (or None), and each record's key + value length: C-level
    passes over the lists when they hold bytes only. Raises TypeError / ValueError on bad input."""
    if values.__class__ is not list and values.__class__ is not tuple:
        if isinstance(values, str | bytes | bytearray | memoryview):
            raise TypeError(f"send_many() takes a sequence of values, not one {type(values).__name__}")
        values = list(values)
    n = len(values)
    if set(map(type, values)) == {bytes}:  # the fast path: C loops only
        vals: Sequence[bytes | None] = values  # type: ignore[assignment]
        lens = list(map(len, vals))  # type: ignore[arg-type]
    else:
        vals = [v if v is None or v.__class__ is bytes else to_bytes(v, "value") for v in values]
        lens = [0 if v is None else len(v) for v in vals]
    ks: Sequence[bytes | None] | None = None
    if keys is not None:
        if keys.__class__ is not list and keys.__class__ is not tuple:
            if isinstance(keys, str | bytes | bytearray | memoryview):
                raise TypeError(f"send_many() takes a sequence of keys, not one {type(keys).__name__}")
            keys = list(keys)
        if len(keys) != n:
            raise ValueError(f"send_many: {len(keys)} keys for {n} values")
        if set(map(type, keys)) == {bytes}:
            ks = keys  # type: ignore[assignment]
            klens = list(map(len, ks))  # type: ignore[arg-type]
        else:
            ks = [k if k is None or k.__class__ is bytes else to_bytes(k, "key") for k in keys]
            klens = [0 if k is None else len(k) for k in ks]
        lens = list(map(operator.add, lens, klens))
    return vals, ks, lens


def _sealer(key_file: str | os.PathLike[str] | None, key_id: str | None) -> Sealer | None:
    """The end-to-end encryption of a producer with `key_file` (None: none)."""
    if key_file is None:
        if key_id is not None:
            raise ValueError("encryption_key_id needs encryption_key_file")
        return None
    return Sealer(load_key_file(key_file), key_id)


def _idempotent(acks: int, enable_idempotence: bool | None, producer_name: str | None) -> bool:
    """Whether a producer with these options is idempotent (ValueError for a contradiction)."""
    if enable_idempotence and acks != -1:
        raise ValueError("enable_idempotence=True needs acks='all'")
    idempotent = enable_idempotence if enable_idempotence is not None else acks == -1
    if producer_name is not None and not idempotent:
        raise ValueError("producer_name needs an idempotent producer (acks='all', enable_idempotence not False)")
    return idempotent
