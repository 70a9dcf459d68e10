"""The producer: `send()` and `send_many()` append to per-partition record batches; one sender
thread ships them (with `linger_ms=0`, the calling thread ships its own batch when no other thread
is shipping: `_ship_inline`). Requests under WIRE_REQUEST_BYTES_MAX go on the record transport
(logbroker/wire.py) where the broker has one, bigger ones on a gRPC stream.

Data flow::

    send() ─────┐
    send_many() ┴> _PartitionAccumulator.open (a BatchBuilder) ──sealed──> .queue ──> sender thread
                                                                                  │ one Produce per leader
    future.result() <── _BatchResult.complete() <── response (reader thread) ──> .completions

A batch's life, and the transitions the producer makes (all under `_lock`, except `complete`)::

    OPEN      records are appended by send(); it is `acc.open`
      │ full (the next record would pass batch_size_bytes), or the sender found it ready
      │ (linger_ms passed, flush() or close() waiting, buffer_memory_bytes exhausted)
      v
    SEALED    in `acc.queue`, oldest first; retried batches go back to its front
      │ the sender picks the queue head when the partition is not muted and its leader is known,
      │ with the sealed batches behind it (back to back in one `records`, up to max_request_bytes)
      v
    IN FLIGHT `acc.in_flight`; the partition is muted (at most one request per partition on the
      │       wire, so retries cannot reorder a partition), the leader's in-flight count is raised
      ├─ success ──────────────────────────────> DONE (futures resolve to RecordMetadata)
      ├─ retriable error, before the deadline ─> SEALED again after retry_backoff_ms (exponential)
      └─ other error, or deadline passed ──────> DONE (futures raise)

    Any not-in-flight batch older than delivery_timeout_ms fails with KafkaTimeoutError.

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
`max_in_flight_requests`, retries by `delivery_timeout_ms`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc

from logbroker.client.call_errors import is_retriable, needs_metadata, rpc_error
from logbroker.client.metadata_cache import LogThrottle, MetadataCache, metadata_for
from logbroker.client.transport import on_reader_thread
from logbroker.cluster.hashing import partition_for_key
from logbroker.errors import (
    BrokerUnavailableError,
    KafkaTimeoutError,
    LogbrokerError,
    MessageTooLargeError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
    error_for,
)
from logbroker.storage.record_batch import COMPRESSION_GZIP, COMPRESSION_NONE, HEADER_SIZE, BatchBuilder
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)

# Upper bound of a record's encoded size beyond its key, value and headers: length (5), attributes
# (1), timestampDelta (10), offsetDelta (5), keyLength (5), valueLength (5), headerCount (5).
RECORD_OVERHEAD_BYTES = 36
# Per header beyond its key and value bytes: keyLength (5) + valueLength (5).
HEADER_OVERHEAD_BYTES = 10
# Room kept in a request for its protobuf framing (per partition: topic, partition, tags).
REQUEST_OVERHEAD_BYTES = 1024
RETRY_BACKOFF_MAX_MS = 1_000
# Produce requests with fewer record bytes than this take the record transport (when the broker has
# one); bigger ones a gRPC stream (streams.BrokerStreams.send says why). The consumer draws its line
# for fetches at the same size (consumer.STREAM_FETCH_RESPONSE_BYTES_MAX).
WIRE_REQUEST_BYTES_MAX = 64 << 10
KEY_CACHE_ENTRIES = 1 << 16
# How long send() waits for a topic the brokers call unknown (a just-created topic may still be
# reaching them) before raising UnknownTopicOrPartitionError.
UNKNOWN_TOPIC_WAIT_MS = 3_000

_time_ns = time.time_ns
_monotonic = time.monotonic


class RecordMetadata(NamedTuple):
    """Where a record landed. `offset` is -1 with acks=0."""

    topic: str
    partition: int
    offset: int
    timestamp: int


class FutureTimeoutError(KafkaTimeoutError, TimeoutError):
    """`result()` / `exception()` timed out (also a builtin TimeoutError, as concurrent.futures raises)."""


# ---------------------------------------------------------------------------------------------
# Futures

# Guards every _BatchResult's done flag, event and callbacks. Taken once per batch completion and
# per waiter / callback registration, never per send().
_RESULT_LOCK = threading.Lock()


class _BatchResult:
    """The completion shared by every record of one batch."""

    __slots__ = ("topic", "partition", "base_offset", "log_append_time_ms", "error", "done",
                 "_event", "_callbacks")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.base_offset = -1
        self.log_append_time_ms = -1
        self.error: BaseException | None = None
        self.done = False
        self._event: threading.Event | None = None
        self._callbacks: list[tuple[Callable[[Any], object], Any]] | None = None

    def wait(self, timeout: float | None) -> bool:
        if self.done:
            return True
        with _RESULT_LOCK:
            if self.done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def add_callback(self, fn: Callable[[Any], object], future: Any) -> bool:
        """Store the callback; False if the result is already done (the caller runs it)."""
        with _RESULT_LOCK:
            if self.done:
                return False
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append((fn, future))
            return True

    def complete(self, base_offset: int, log_append_time_ms: int, error: BaseException | None) -> None:
        with _RESULT_LOCK:
            if self.done:
                return
            self.base_offset = base_offset
            self.log_append_time_ms = log_append_time_ms
            self.error = error
            self.done = True
            event = self._event
            callbacks = self._callbacks
            self._callbacks = None
        if event is not None:
            event.set()
        if callbacks:
            for fn, fut in callbacks:
                _run_callback(fn, fut)


def _run_callback(fn: Callable[[Any], object], fut: Any) -> None:
    try:
        fn(fut)
    except Exception:
        log.exception("exception calling callback for %r", fut)


class FutureRecordMetadata:
    """The future of one sent record, with the `concurrent.futures.Future` API.

    `result()` returns RecordMetadata or raises the delivery error; callbacks get this future as
    their one argument and run on the producer's sender thread (or at once, in the caller's thread,
    if the record is already done).
    """

    __slots__ = ("_result", "_delta", "_timestamp")

    def __init__(self, result: _BatchResult, delta: int, timestamp: int) -> None:
        self._result = result
        self._delta = delta
        self._timestamp = timestamp

    def done(self) -> bool:
        return self._result.done

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return not self._result.done

    def cancel(self) -> bool:
        """Records cannot be taken back once sent: always False."""
        return False

    def result(self, timeout: float | None = None) -> RecordMetadata:
        r = self._result
        if not r.done and not r.wait(timeout):
            raise FutureTimeoutError(f"record not delivered within {timeout} s")
        if r.error is not None:
            raise r.error
        offset = r.base_offset + self._delta if r.base_offset >= 0 else -1
        ts = r.log_append_time_ms if r.log_append_time_ms >= 0 else self._timestamp
        return RecordMetadata(r.topic, r.partition, offset, ts)

    get = result  # kafka-python spelling

    def exception(self, timeout: float | None = None) -> BaseException | None:
        r = self._result
        if not r.done and not r.wait(timeout):
            raise FutureTimeoutError(f"record not delivered within {timeout} s")
        return r.error

    def add_done_callback(self, fn: Callable[[FutureRecordMetadata], object]) -> None:
        if not self._result.add_callback(fn, self):
            _run_callback(fn, self)

    def __repr__(self) -> str:
        r = self._result
        state = "pending" if not r.done else ("error" if r.error is not None else "done")
        return f"<FutureRecordMetadata {r.topic}-{r.partition} +{self._delta} {state}>"


def failed_future(topic: str, partition: int, error: BaseException, timestamp: int = -1) -> FutureRecordMetadata:
    r = _BatchResult(topic, partition)
    r.complete(-1, -1, error)
    return FutureRecordMetadata(r, 0, timestamp)


class FutureRecordsMetadata:
    """The future of one `send_many` call, with the `concurrent.futures.Future` API.

    Done when every batch holding a record of the call is done. `result()` returns the records'
    RecordMetadata in the order they were given (built on the first call, then kept), or raises the
    error of the first failed record in that order; `exception()` returns that error. Callbacks get
    this future as their one argument and run once, on the producer's sender thread (or at once, in
    the caller's thread, if the call is already done).

    It holds one (batch result, first offset delta, record count) segment per batch the call's
    records went into, in the order they were appended, and `order`, the input position of each
    appended record when that order differs (keyed records grouped per partition); nothing per record.
    """

    __slots__ = ("_topic", "_segments", "_order", "_timestamp", "_count", "_metadata")

    def __init__(
        self, topic: str, segments: list[tuple[_BatchResult, int, int]], order: list[int] | None,
        timestamp: int, count: int,
    ) -> None:
        self._topic = topic
        self._segments = segments
        self._order = order
        self._timestamp = timestamp
        self._count = count
        self._metadata: list[RecordMetadata] | None = None

    def __len__(self) -> int:
        """How many records the call sent."""
        return self._count

    def done(self) -> bool:
        return all(r.done for r, _, _ in self._segments)

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return not self.done()

    def cancel(self) -> bool:
        """Records cannot be taken back once sent: always False."""
        return False

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else _monotonic() + timeout
        for r, _, _ in self._segments:
            if r.done:
                continue
            remaining = None if deadline is None else max(0.0, deadline - _monotonic())
            if not r.wait(remaining):
                raise FutureTimeoutError(f"{self._count} record(s) not delivered within {timeout} s")

    def _first_error(self) -> BaseException | None:
        """The error of the failed record that came first in the input (segments all done)."""
        order = self._order
        best: tuple[int, BaseException] | None = None
        at = 0
        for r, _, n in self._segments:
            if r.error is not None:
                # within a segment the input order is kept: its first record comes first
                pos = at if order is None else order[at]
                if best is None or pos < best[0]:
                    best = (pos, r.error)
                if order is None:
                    break
            at += n
        return None if best is None else best[1]

    def result(self, timeout: float | None = None) -> list[RecordMetadata]:
        """Every record's RecordMetadata, in input order; raises the first failed record's error."""
        if self._metadata is not None:
            return self._metadata
        self._wait(timeout)
        error = self._first_error()
        if error is not None:
            raise error
        topic = self._topic
        timestamp = self._timestamp
        out: list[RecordMetadata] = []
        for r, delta, n in self._segments:
            ts = r.log_append_time_ms if r.log_append_time_ms >= 0 else timestamp
            if r.base_offset >= 0:
                base = r.base_offset + delta
                out.extend([RecordMetadata(topic, r.partition, o, ts) for o in range(base, base + n)])
            else:
                out.extend([RecordMetadata(topic, r.partition, -1, ts)] * n)
        order = self._order
        if order is not None:
            placed: list[RecordMetadata] = [None] * len(out)  # type: ignore[list-item]
            for pos, md in zip(order, out, strict=True):
                placed[pos] = md
            out = placed
        self._metadata = out
        return out

    get = result  # kafka-python spelling

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._first_error()

    def add_done_callback(self, fn: Callable[[FutureRecordsMetadata], object]) -> None:
        results = [r for r, _, _ in self._segments]
        pending = [len(results)]

        def one_done(_: object) -> None:
            with _RESULT_LOCK:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                _run_callback(fn, self)

        if not results:
            _run_callback(fn, self)
            return
        for r in results:
            if not r.add_callback(one_done, self):
                one_done(None)

    def __repr__(self) -> str:
        done = sum(1 for r, _, _ in self._segments if r.done)
        return f"<FutureRecordsMetadata {self._topic} {self._count} record(s), {done}/{len(self._segments)} batches done>"


def failed_records_future(topic: str, partition: int, error: BaseException, count: int,
                          timestamp: int = -1) -> FutureRecordsMetadata:
    r = _BatchResult(topic, partition)
    r.complete(-1, -1, error)
    return FutureRecordsMetadata(topic, [(r, 0, count)], None, timestamp, count)


# ---------------------------------------------------------------------------------------------
# Accumulator


class _Batch:
    __slots__ = ("acc", "builder", "result", "created", "deadline", "retry_at", "attempts",
                 "charged", "payload", "record_count", "last_error", "solo")

    def __init__(self, acc: _PartitionAccumulator, builder: BatchBuilder, now: float, deadline: float) -> None:
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

    def size_bytes(self) -> int:
        if self.payload is not None:
            return len(self.payload)
        assert self.builder is not None
        return self.builder.size_bytes


class _PartitionAccumulator:
    __slots__ = ("topic", "partition", "open", "queue", "in_flight")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.open: _Batch | None = None
        self.queue: deque[_Batch] = deque()
        self.in_flight: _Batch | None = None

    def idle(self) -> bool:
        return self.open is None and not self.queue and self.in_flight is None


class _TopicState:
    """Per topic: partition count, accumulators, the sticky partition and a key -> partition memo.

    The memo spares send() the jump hash (~0.7 us in Python) for keys seen before; it holds at
    most KEY_CACHE_ENTRIES keys and is replaced (not cleared) when the partition count changes, so
    a send() racing with `grow` can only write into the old one.
    """

    __slots__ = ("name", "partitions", "accs", "sticky", "key_cache")

    def __init__(self, name: str, partitions: int) -> None:
        self.name = name
        self.accs = [_PartitionAccumulator(name, p) for p in range(partitions)]
        self.partitions = partitions
        self.sticky = random.randrange(partitions)
        self.key_cache: dict[bytes, int] = {}

    def grow(self, partitions: int) -> None:
        for p in range(len(self.accs), partitions):
            self.accs.append(_PartitionAccumulator(self.name, p))
        self.partitions = partitions  # after accs grew: send() reads it without the lock
        self.key_cache = {}  # after partitions changed: send() reads the cache first

    def partition_for(self, key: bytes) -> int:
        cache = self.key_cache
        p = cache.get(key)
        if p is None:
            p = partition_for_key(key, self.partitions)
            if len(cache) >= KEY_CACHE_ENTRIES:
                cache.clear()
            cache[key] = p
        return p


class _InFlight(NamedTuple):
    address: str
    batches: list[_Batch]
    future: Any  # grpc.Future


def _to_bytes(data: object, what: str) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be bytes or str, not {type(data).__name__}")


def _normalize_headers(headers: object) -> tuple[list[tuple[str, bytes | None]], int]:
    items = headers.items() if isinstance(headers, dict) else headers
    out: list[tuple[str, bytes | None]] = []
    size = 5
    for hk, hv in items:  # type: ignore[attr-defined]
        if not isinstance(hk, str):
            raise TypeError(f"header keys must be str, not {type(hk).__name__}")
        if hv is not None and hv.__class__ is not bytes:
            hv = _to_bytes(hv, "header value")
        out.append((hk, hv))
        size += HEADER_OVERHEAD_BYTES + len(hk.encode()) + (len(hv) if hv is not None else 0)
    return out, size


def parse_acks(acks: int | str) -> int:
    if acks in ("all", -1, "-1"):
        return -1
    if acks in (1, "1"):
        return 1
    if acks in (0, "0"):
        return 0
    raise ValueError(f"acks must be 'all', -1, 1 or 0, not {acks!r}")


def retry_backoff_s(attempts: int, retry_backoff_ms: int) -> float:
    """Exponential backoff: retry_backoff_ms * 2**(attempts-1), at most RETRY_BACKOFF_MAX_MS (or the base)."""
    cap = max(retry_backoff_ms, RETRY_BACKOFF_MAX_MS)
    return min(cap, retry_backoff_ms * (1 << min(max(attempts - 1, 0), 20))) / 1000


# ---------------------------------------------------------------------------------------------
# Producer


class Producer:
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
    ) -> None:
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
        self._linger_s = linger_ms / 1000
        self._batch_size_bytes = batch_size_bytes
        self._max_request_bytes = max_request_bytes
        self._max_record_bytes = min(max_request_bytes - REQUEST_OVERHEAD_BYTES - HEADER_SIZE, buffer_memory_bytes)
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._request_timeout_ms = request_timeout_ms
        self._rpc_timeout_s = request_timeout_ms / 1000 + 1.0
        self._retries = retries
        self._retry_backoff_ms = retry_backoff_ms
        self._buffer_memory_bytes = buffer_memory_bytes
        self._max_block_s = max_block_ms / 1000
        self._compression = COMPRESSION_GZIP if compression == "gzip" else COMPRESSION_NONE
        self._max_in_flight = max_in_flight_requests
        self._metadata_max_age_s = metadata_max_age_ms / 1000

        self._metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, retry_backoff_ms,
                                                           transport)
        self._streams = self._metadata.client_streams()  # ours, even on a shared cache; the sender's only

        self._lock = threading.Lock()
        self._sender_cond = threading.Condition(self._lock)  # wakes the sender thread
        self._space_cond = threading.Condition(self._lock)  # wakes send() blocked on buffer memory
        self._topics: dict[str, _TopicState] = {}
        self._pending: dict[_PartitionAccumulator, None] = {}  # accs with open, queued or in-flight batches
        self._incomplete: dict[_Batch, None] = {}
        self._completions: list[_InFlight] = []
        self._in_flight_per_broker: dict[str, int] = {}
        self._buffered_bytes = 0
        self._buffer_waiters = 0
        self._flushing = 0
        self._sender_waiting = False
        self._sender_wake_at: float | None = None  # when the waiting sender wakes on its own (None: never)
        # linger_ms=0: the thread that queued a batch ships it itself when no other thread is shipping
        # (see _ship_inline); _ship_lock is held by whoever drains and sends, so requests to a broker
        # leave in drain order. Lock order: _ship_lock, then _lock.
        self._ship_inline_enabled = linger_ms == 0
        self._ship_lock = threading.Lock()
        self._closed = False  # no more send()
        self._stopping = False  # the sender fails what is left and exits
        self._refresh_topics: set[str] = set()
        self._metadata_retry_at = 0.0
        self._thread = threading.Thread(target=self._run, name="logbroker-producer-sender", daemon=True)
        self._thread.start()

    # -- send ------------------------------------------------------------------------------

    def send(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        headers: Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
    ) -> FutureRecordMetadata:
        """Queue one record; the future resolves to its RecordMetadata once the broker has it.

        Blocks only while the topic's metadata is unknown or buffer_memory_bytes is full, each at
        most max_block_ms (then KafkaTimeoutError). A record too large to ever send gets a future
        failed with MessageTooLargeError.
        """
        if value is not None and value.__class__ is not bytes:
            value = _to_bytes(value, "value")
        if key is not None and key.__class__ is not bytes:
            key = _to_bytes(key, "key")
        if timestamp_ms is None:
            timestamp_ms = _time_ns() // 1_000_000
        ts = self._topics.get(topic)
        if ts is None:
            ts = self._topic_state(topic)
        size = RECORD_OVERHEAD_BYTES
        if value is not None:
            size += len(value)
        if key is not None:
            size += len(key)
        hdrs = None
        if headers:
            hdrs, hsize = _normalize_headers(headers)
            size += hsize
        if size > self._max_record_bytes:
            return failed_future(topic, -1 if partition is None else partition, MessageTooLargeError(
                f"record of ~{size} bytes exceeds what the producer can send "
                f"(max_request_bytes {self._max_request_bytes}, buffer_memory_bytes {self._buffer_memory_bytes})"
            ), timestamp_ms)
        if partition is None:
            if key is not None:
                partition = ts.partition_for(key)
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
    ) -> FutureRecordsMetadata:
        """Queue many records at once: what `send` does for each, at a fraction of its cost per record.

        Record i is (keys[i], values[i]) (`keys` None: every key null), each carrying `headers`
        and stamped `timestamp_ms` (default: now), both shared by the call. Records go where `send`
        would put them: to `partition` if given, else keyed ones by the key's consistent hash and
        null-key ones to the sticky partition; they join the same per-partition batches as `send`'s
        (a `send` and a `send_many` from one thread keep their order within a partition), filling
        one batch after another. Returns ONE future (FutureRecordsMetadata) for the whole call.

        Everything is checked before any record is queued: a value or key neither bytes, str nor
        None, or `keys` of another length, raises TypeError / ValueError; an unknown topic or
        partition raises as in `send`; a record too large to ever send gives an already failed future
        (MessageTooLargeError). In each case nothing of the call is queued.

        Blocks as `send` does while the topic's metadata is unknown or buffer_memory_bytes is full
        (a call larger than the free buffer waits for room batch by batch). If max_block_ms passes
        while it waits, KafkaTimeoutError is raised: the records queued before stay queued (their
        batches are delivered; `flush()` waits for them), the rest are not.
        """
        fut = self._queue_many(topic, values, keys, partition, headers, timestamp_ms)
        if self._ship_inline_enabled:
            self._ship_inline()
        return fut

    def _queue_many(
        self, topic: str, values: Sequence[bytes | str | None], keys: Sequence[bytes | str | None] | None,
        partition: int | None, headers: Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None] | None,
        timestamp_ms: int | None,
    ) -> FutureRecordsMetadata:
        """send_many() up to queueing its records (its checks, then _append_records)."""
        if values.__class__ is not list and values.__class__ is not tuple:
            if isinstance(values, str | bytes | bytearray | memoryview):
                raise TypeError(f"send_many() takes a sequence of values, not one {type(values).__name__}")
            values = list(values)
        n = len(values)
        if set(map(type, values)) == {bytes}:  # the fast path: C loops only
            vals: Sequence[bytes | None] = values  # type: ignore[assignment]
            lens = list(map(len, vals))  # type: ignore[arg-type]
        else:
            vals = [v if v is None or v.__class__ is bytes else _to_bytes(v, "value") for v in values]
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
                ks = [k if k is None or k.__class__ is bytes else _to_bytes(k, "key") for k in keys]
                klens = [0 if k is None else len(k) for k in ks]
            lens = list(map(operator.add, lens, klens))
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
            hdrs, hsize = _normalize_headers(headers)
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
            self._append_records(ts, partition, ks, vals, lens, timestamp_ms, hdrs, per_record, segments)
            return FutureRecordsMetadata(topic, segments, None, timestamp_ms, n)
        # Keyed: each partition's records in input order; null keys go sticky (partition -1 here).
        memo: dict[bytes | None, int] = ts.key_cache  # type: ignore[assignment]  # None is never in it
        parts: list[int] = list(map(memo.get, ks, itertools.repeat(-2)))  # -2: not in the memo
        if -2 in parts:
            for i, p in enumerate(parts):
                if p == -2:
                    k = ks[i]
                    parts[i] = -1 if k is None else ts.partition_for(k)
        first = parts[0]
        if parts.count(first) == n:
            self._append_records(ts, None if first < 0 else first, ks, vals, lens, timestamp_ms, hdrs,
                                 per_record, segments)
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
            self._append_records(
                ts, None if p < 0 else p, [ks[i] for i in idx], [vals[i] for i in idx], [lens[i] for i in idx],
                timestamp_ms, hdrs, per_record, segments,
            )
            order += idx
        return FutureRecordsMetadata(topic, segments, order, timestamp_ms, n)

    def _append_records(
        self, ts: _TopicState, partition: int | None, keys: Sequence[bytes | None] | None,
        values: Sequence[bytes | None], lens: list[int], timestamp_ms: int, hdrs: list[tuple[str, bytes | None]] | None,
        per_record: int, segments: list[tuple[_BatchResult, int, int]],
    ) -> None:
        """Append checked records to `partition`'s batches (None: the sticky partition's), one batch
        per step, each step under _lock; appends (batch result, first delta, count) to `segments`.

        A record's buffer charge is `send`'s upper bound, per_record + lens[i] (its key and value
        bytes). A step takes at most what the free buffer memory surely holds (all of the rest, or
        as many records as the largest fits), and waits for room first when not even that fits.
        """
        n = len(values)
        largest = per_record + max(lens)
        memory = self._buffer_memory_bytes
        total = per_record * n + sum(lens)  # the charge of the records not yet appended
        # No batch holds more records than this (one is >= 7 bytes beyond its key and value): a step
        # slices no more of a long call than that.
        step_max = (self._batch_size_bytes - HEADER_SIZE) // (7 + min(lens)) + 1
        i = 0
        lock = self._lock
        while i < n:
            with lock:
                if self._closed:
                    raise LogbrokerError(f"send_many() after close() ({i} of {n} records queued)")
                free = memory - self._buffered_bytes
                if free < total and free < largest:
                    try:
                        self._wait_for_buffer(largest)
                    except KafkaTimeoutError as e:
                        raise KafkaTimeoutError(f"{e}: {i} of {n} records queued") from None
                    free = memory - self._buffered_bytes
                stop = min(n, i + step_max) if free >= total else min(n, i + step_max, i + max(1, free // largest))
                if i or stop < n:
                    k_part = None if keys is None else keys[i:stop]
                    v_part = values[i:stop]
                else:
                    k_part, v_part = keys, values
                if partition is None:
                    acc = ts.accs[ts.sticky]
                    b = acc.open
                    added = 0 if b is None else b.builder.append_many(  # type: ignore[union-attr]
                        timestamp_ms, k_part, v_part, hdrs)
                    if added == 0:  # the sticky batch filled up or shipped: as send() does
                        acc = ts.accs[self._next_sticky(ts)]
                        b = acc.open
                        if b is not None:
                            added = b.builder.append_many(timestamp_ms, k_part, v_part, hdrs)  # type: ignore[union-attr]
                else:
                    acc = ts.accs[partition]
                    b = acc.open
                    added = 0 if b is None else b.builder.append_many(  # type: ignore[union-attr]
                        timestamp_ms, k_part, v_part, hdrs)
                if added == 0:
                    b = self._new_batch(acc, timestamp_ms)
                    added = b.builder.append_many(timestamp_ms, k_part, v_part, hdrs)  # type: ignore[union-attr]
                assert b is not None
                j = i + added
                charge = total if j == n else per_record * added + sum(lens[i:j])
                b.charged += charge
                self._buffered_bytes += charge
                total -= charge
                segments.append((b.result, b.builder.record_count - added, added))  # type: ignore[union-attr]
                i = j

    def _topic_state(self, topic: str) -> _TopicState:
        """Wait for the topic's metadata: up to max_block_ms while no broker answers, and up to
        UNKNOWN_TOPIC_WAIT_MS (within max_block_ms) while brokers answer that the topic does not
        exist (brokers do not auto-create topics; a new one may still be reaching them)."""
        if not isinstance(topic, str) or not topic:
            raise TypeError("topic must be a non-empty str")
        start = _monotonic()
        deadline = start + self._max_block_s
        unknown_deadline = start + min(self._max_block_s, UNKNOWN_TOPIC_WAIT_MS / 1000)
        backoff = self._retry_backoff_ms / 1000
        while True:
            try:
                n = self._metadata.partitions_for(topic)
                break
            except UnknownTopicOrPartitionError:
                remaining = unknown_deadline - _monotonic()
                if remaining <= 0 or self._closed:
                    raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist") from None
            except BrokerUnavailableError as e:
                remaining = deadline - _monotonic()
                if remaining <= 0 or self._closed:
                    raise KafkaTimeoutError(f"no metadata for topic {topic!r}: {e}") from e
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, 1.0)
        with self._lock:
            ts = self._topics.get(topic)
            if ts is None:
                ts = _TopicState(topic, n)
                self._topics[topic] = ts
            return ts

    def _check_partition(self, ts: _TopicState, partition: int) -> None:
        self._metadata.refresh([ts.name])
        n = self._metadata.cached_partitions(ts.name)
        if n is not None and n > ts.partitions:
            with self._lock:
                ts.grow(n)
        if not 0 <= partition < ts.partitions:
            raise UnknownTopicOrPartitionError(
                f"partition {partition} of topic {ts.name!r} does not exist (it has {ts.partitions})"
            )

    def _next_sticky(self, ts: _TopicState) -> int:
        """A new sticky partition for null-key records, preferring partitions with a leader."""
        n = ts.partitions
        if n == 1:
            return 0
        cur = ts.sticky
        p = cur
        for _ in range(4):
            p = random.randrange(n - 1)
            if p >= cur:
                p += 1
            try:
                if self._metadata.leader(ts.name, p) is not None:
                    break
            except UnknownTopicOrPartitionError:
                break
        ts.sticky = p
        return p

    def _new_batch(self, acc: _PartitionAccumulator, timestamp_ms: int) -> _Batch:
        """Seal acc's open batch (if any) and open a new one. Called with _lock held."""
        old = acc.open
        if old is not None:
            old.record_count = old.builder.record_count  # type: ignore[union-attr]
            acc.queue.append(old)
        now = _monotonic()
        builder = BatchBuilder(timestamp_ms, self._compression, self._batch_size_bytes)
        b = _Batch(acc, builder, now, now + self._delivery_timeout_s)
        acc.open = b
        self._incomplete[b] = None
        self._pending[acc] = None
        if self._sender_waiting and not self._ship_inline_enabled:  # inline: _ship_inline() tells it if needed
            self._sender_cond.notify()
        return b

    def _wait_for_buffer(self, size: int) -> None:
        """Block (with _lock held) until `size` bytes fit in buffer_memory_bytes, or max_block_ms."""
        deadline = _monotonic() + self._max_block_s
        self._buffer_waiters += 1
        try:
            self._sender_cond.notify()  # an exhausted buffer makes every batch ready
            while self._buffered_bytes + size > self._buffer_memory_bytes and self._buffered_bytes > 0:
                if self._closed:
                    raise LogbrokerError("send() after close()")
                remaining = deadline - _monotonic()
                if remaining <= 0:
                    raise KafkaTimeoutError(
                        f"buffer_memory_bytes ({self._buffer_memory_bytes}) full for {self._max_block_s * 1000:.0f} ms"
                    )
                self._space_cond.wait(remaining)
        finally:
            self._buffer_waiters -= 1

    # -- flush / close -----------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> None:
        """Send everything queued now and wait until each of those records is done (delivered or failed).

        Raises KafkaTimeoutError if `timeout` seconds pass first.
        """
        if threading.current_thread() is self._thread:
            raise LogbrokerError("flush() from a producer callback would deadlock")
        deadline = None if timeout is None else _monotonic() + timeout
        with self._lock:
            results = [b.result for b in self._incomplete]
            self._flushing += 1
            self._sender_cond.notify()
        try:
            for r in results:
                remaining = None if deadline is None else max(0.0, deadline - _monotonic())
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
        on_sender = threading.current_thread() is self._thread
        deadline = None if timeout is None else _monotonic() + timeout
        with self._lock:
            already = self._closed
            self._closed = True
            self._space_cond.notify_all()
        if not already and not on_sender and (timeout is None or timeout > 0):
            with contextlib.suppress(KafkaTimeoutError):
                self.flush(timeout)
        with self._lock:
            self._stopping = True
            self._sender_cond.notify()
        if on_sender:
            return
        remaining = None if deadline is None else max(0.0, deadline - _monotonic())
        self._thread.join(remaining)
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

    # -- sender thread -----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while self._run_once():
                pass
        except BaseException as e:  # a bug: fail everything rather than hang every future
            log.exception("producer sender thread crashed")
            self._fail_all(UnknownServerError(f"producer sender thread crashed: {e!r}"))
            raise
        finally:
            self._metadata.release_streams(self._streams)
        self._fail_all(KafkaTimeoutError("producer closed before the record was delivered"))

    def _run_once(self) -> bool:
        """One round: handle responses, refresh metadata, expire and ship batches, or sleep."""
        with self._lock:
            completions = self._completions
            self._completions = []
        for call in completions:
            self._handle_response(call)
        now = _monotonic()
        self._maybe_refresh_metadata(now)
        self._ship_lock.acquire()
        shipping = True
        try:
            with self._lock:
                if self._stopping:
                    return False
                requests, expired, wake_at = self._drain(now)
                if not requests and not expired and not self._completions:
                    self._ship_lock.release()  # a send() may ship while we sleep
                    shipping = False
                    self._sender_waiting = True
                    self._sender_wake_at = wake_at
                    try:
                        self._sender_cond.wait(None if wake_at is None else max(0.0, wake_at - now))
                    finally:
                        self._sender_waiting = False
                    return True
            done = self._ship(requests, expired, now)
        finally:
            if shipping:
                self._ship_lock.release()
        self._finish_shipped(done)
        return True

    def _ship_inline(self) -> None:
        """linger_ms=0: ship what is ready from the calling thread, sparing the hand-off to the
        sender thread (measured ~0.07 ms of a produce-to-consume latency). Only when no other thread
        is shipping (or this is a connection's reader thread running a callback, which must never
        block on a write): that one, or the sender woken here, then takes our batch. The sender is also
        woken when what is left needs it at a time it does not know (a metadata refresh, a backoff).
        """
        if on_reader_thread() or not self._ship_lock.acquire(blocking=False):
            with self._lock:  # a send() from a completion callback, or another thread is shipping
                if self._sender_waiting:
                    self._sender_cond.notify()
            return
        try:
            now = _monotonic()
            with self._lock:
                if self._stopping:
                    return
                requests, expired, wake_at = self._drain(now)
                if (self._sender_waiting and wake_at is not None
                        and (self._sender_wake_at is None or wake_at < self._sender_wake_at)):
                    self._sender_cond.notify()
            done = self._ship(requests, expired, now)
        finally:
            self._ship_lock.release()
        self._finish_shipped(done)

    def _ship(self, requests: list[tuple[str, list[_Batch]]], expired: list[_Batch],
              now: float) -> list[tuple[_Batch, BaseException | None]]:
        """Send the requests (with _ship_lock held, not _lock). Returns the batches that are done
        already, expired ones with their error and acks=0 ones with None: the caller finishes them
        (user callbacks run then) after letting go of _ship_lock, so a callback that calls flush()
        does not wait on a lock its own thread holds."""
        done: list[tuple[_Batch, BaseException | None]] = []
        for b in expired:
            cause = b.last_error
            err = KafkaTimeoutError(
                f"expiring {b.record_count or '?'} record(s) for {b.acc.topic}-{b.acc.partition}: "
                f"{(now - b.created) * 1000:.0f} ms since the batch was created"
                + (f" (last error: {cause})" if cause is not None else "")
            )
            err.__cause__ = cause
            done.append((b, err))
        for address, batches in requests:
            if self._send_request(address, batches):  # acks=0: done once written
                done += [(b, None) for b in batches]
        return done

    def _finish_shipped(self, done: list[tuple[_Batch, BaseException | None]]) -> None:
        for b, err in done:
            if err is None:
                b.result.complete(-1, -1, None)  # acks=0
            else:
                self._finish(b, -1, -1, err)

    def _drain(self, now: float) -> tuple[list[tuple[str, list[_Batch]]], list[_Batch], float | None]:
        """Pick the batches to ship now, grouped per leader (with _lock held).

        Returns (requests, expired batches, when to wake up next).
        """
        all_ready = self._flushing > 0 or self._buffer_waiters > 0 or self._closed
        wake_at: float | None = None
        by_leader: dict[str, list[_Batch]] = {}
        request_bytes: dict[str, int] = {}
        expired: list[_Batch] = []
        idle: list[_PartitionAccumulator] = []
        metadata = self._metadata
        for acc in self._pending:
            if acc.in_flight is not None:
                continue
            queue = acc.queue
            while queue and queue[0].deadline <= now:
                expired.append(queue.popleft())
            head = queue[0] if queue else acc.open
            if head is None:
                idle.append(acc)
                continue
            if head is acc.open:
                if head.deadline <= now:
                    acc.open = None
                    head.record_count = head.builder.record_count  # type: ignore[union-attr]
                    expired.append(head)
                    idle.append(acc)
                    continue
                ready_at = head.created + self._linger_s
                if not all_ready and ready_at > now:
                    wake_at = ready_at if wake_at is None else min(wake_at, ready_at)
                    continue
            elif head.retry_at > now:
                wake_at = head.retry_at if wake_at is None else min(wake_at, head.retry_at)
                continue
            try:
                leader = metadata.leader(acc.topic, acc.partition)
            except UnknownTopicOrPartitionError:
                leader = None
            if leader is None:
                self._refresh_topics.add(acc.topic)
                retry = max(now, self._metadata_retry_at)
                wake_at = retry if wake_at is None else min(wake_at, retry)
                continue
            if self._in_flight_per_broker.get(leader, 0) >= self._max_in_flight:
                continue  # a response will wake us
            size = head.size_bytes()
            used = request_bytes.get(leader, REQUEST_OVERHEAD_BYTES)
            if used + size > self._max_request_bytes and leader in by_leader:
                wake_at = now if wake_at is None else min(wake_at, now)
                continue  # the next request to this leader takes it
            group = by_leader.setdefault(leader, [])
            if head is acc.open:
                head.record_count = head.builder.record_count  # type: ignore[union-attr]
                acc.open = None
                group.append(head)
            else:
                # A backlog of sealed batches of this partition rides in the same request, back to
                # back in one `records` field: a partition then moves up to max_request_bytes per
                # round trip, not one batch.
                queue.popleft()
                group.append(head)
                while not head.solo and queue and queue[0].retry_at <= now and not queue[0].solo:
                    nxt = queue[0].size_bytes()
                    if used + size + nxt > self._max_request_bytes:
                        break
                    group.append(queue.popleft())
                    size += nxt
                if (not head.solo and not queue and acc.open is not None
                        and (all_ready or acc.open.created + self._linger_s <= now)):
                    nxt = acc.open.size_bytes()
                    if used + size + nxt <= self._max_request_bytes:
                        last = acc.open
                        last.record_count = last.builder.record_count  # type: ignore[union-attr]
                        acc.open = None
                        group.append(last)
                        size += nxt
            acc.in_flight = head
            request_bytes[leader] = used + size
        for acc in idle:
            if acc.idle():
                del self._pending[acc]
        for leader in by_leader:
            self._in_flight_per_broker[leader] = self._in_flight_per_broker.get(leader, 0) + 1
        if self._refresh_topics and wake_at is None:
            wake_at = max(now, self._metadata_retry_at)
        age_due = max(self._metadata.last_refresh_monotonic + self._metadata_max_age_s, self._metadata_retry_at)
        if self._topics:
            wake_at = age_due if wake_at is None else min(wake_at, age_due)
        if expired:
            for b in expired:
                self._incomplete.pop(b, None)
                self._release(b)
        return list(by_leader.items()), expired, wake_at

    def _send_request(self, address: str, batches: list[_Batch]) -> bool:
        """One Produce for `batches` (consecutive batches of one partition share one `records`).
        True with acks=0: the batches are done once written (the caller completes them)."""
        per_partition: dict[_PartitionAccumulator, list[bytes]] = {}
        for b in batches:
            if b.payload is None:
                b.payload = b.builder.build()  # type: ignore[union-attr]
                b.builder = None  # the encoded payload is all a retry needs
            per_partition.setdefault(b.acc, []).append(b.payload)
        parts = [
            pb.ProducePartition(
                topic=acc.topic, partition=acc.partition,
                records=payloads[0] if len(payloads) == 1 else b"".join(payloads),
            )
            for acc, payloads in per_partition.items()
        ]
        request = pb.ProduceRequest(acks=self._acks, timeout_ms=self._request_timeout_ms, partitions=parts)
        wire_ok = sum(len(pp.records) for pp in parts) < WIRE_REQUEST_BYTES_MAX
        try:
            future = self._metadata.produce_call(address, request, self._rpc_timeout_s, self._streams, wire_ok)
        except Exception as e:  # a closed channel, a serialization bug
            future = _FailedCall(e)
        call = _InFlight(address, batches, future)
        future.add_done_callback(lambda _f, call=call: self._on_response(call))
        return self._acks == 0

    def _on_response(self, call: _InFlight) -> None:
        """gRPC thread: hand the finished call to the sender thread."""
        with self._lock:
            self._completions.append(call)
            if self._sender_waiting:
                self._sender_cond.notify()

    def _handle_response(self, call: _InFlight) -> None:
        now = _monotonic()
        outcomes: list[tuple[_Batch, int, int, BaseException | None]] = []
        try:
            response = call.future.result()
            call_error: BaseException | None = None
        except grpc.RpcError as e:
            call_error = rpc_error(e)
        except Exception as e:
            call_error = e if isinstance(e, LogbrokerError) else UnknownServerError(repr(e))
        results: dict[tuple[str, int], pb.ProducePartitionResult] = {}
        if call_error is None:
            for r in response.results:
                results[(r.topic, r.partition)] = r
        with self._lock:
            self._in_flight_per_broker[call.address] -= 1
            next_offset: dict[_PartitionAccumulator, int] = {}  # batches after the first of a partition
            retried: list[_Batch] = []
            per_acc: dict[_PartitionAccumulator, int] = {}
            for b in call.batches:
                per_acc[b.acc] = per_acc.get(b.acc, 0) + 1
            for b in call.batches:
                acc = b.acc
                acc.in_flight = None
                if self._acks == 0:
                    outcomes.append((b, -1, -1, None))
                    continue
                err: BaseException | None = call_error
                if err is None:
                    r = results.get((acc.topic, acc.partition))
                    if r is None:
                        err = UnknownServerError(f"no result for {acc.topic}-{acc.partition} in the response")
                    elif r.error_code == pb.NONE:
                        base = next_offset.get(acc, r.base_offset)
                        next_offset[acc] = base + b.record_count
                        outcomes.append((b, base, r.log_append_time_ms, None))
                        continue
                    else:
                        err = error_for(r.error_code, r.error_message)
                if needs_metadata(err):
                    self._refresh_topics.add(acc.topic)
                shared = len(call.batches) if call_error is not None else per_acc[acc]
                if shared > 1 and not b.solo and not is_retriable(err) and not self._stopping and b.deadline > now:
                    # One rejection for many batches (one too large, a request over the broker's
                    # limit): send each alone, so only the culprit fails.
                    b.solo = True
                    retried.append(b)
                elif self._should_retry(b, err, now):
                    b.attempts += 1
                    b.last_error = err
                    b.retry_at = now + retry_backoff_s(b.attempts, self._retry_backoff_ms)
                    retried.append(b)
                    log.debug("retrying %s-%s (attempt %d): %s", acc.topic, acc.partition, b.attempts, err)
                else:
                    outcomes.append((b, -1, -1, err))
            for b in reversed(retried):  # back to the queue fronts, in their original order
                b.acc.queue.appendleft(b)
            for b, *_ in outcomes:
                self._incomplete.pop(b, None)
                self._release(b)
            if self._sender_waiting:
                self._sender_cond.notify()
        for b, base_offset, append_time, error in outcomes:
            if self._acks != 0:
                b.result.complete(base_offset, append_time, error)

    def _should_retry(self, b: _Batch, err: BaseException, now: float) -> bool:
        return (
            is_retriable(err)
            and not self._stopping
            and b.attempts < self._retries
            and now + retry_backoff_s(b.attempts + 1, self._retry_backoff_ms) < b.deadline
        )

    def _finish(self, b: _Batch, base_offset: int, append_time: int, error: BaseException | None) -> None:
        """Complete an already-released batch (without _lock held)."""
        b.result.complete(base_offset, append_time, error)

    def _release(self, b: _Batch) -> None:
        """Give the batch's buffer memory back (with _lock held)."""
        self._buffered_bytes -= b.charged
        b.charged = 0
        b.payload = None
        b.builder = None
        if self._buffer_waiters:
            self._space_cond.notify_all()

    def _maybe_refresh_metadata(self, now: float) -> None:
        with self._lock:
            stale = self._topics and now >= self._metadata.last_refresh_monotonic + self._metadata_max_age_s
            if (not self._refresh_topics and not stale) or now < self._metadata_retry_at:
                return
            topics = set(self._topics) if stale else set()
            topics |= self._refresh_topics
            self._refresh_topics = set()
            self._metadata_retry_at = now + self._retry_backoff_ms / 1000
        try:
            self._metadata.refresh(sorted(topics), retry=False)  # this loop backs off itself
        except LogbrokerError as e:
            _throttled.warning("metadata", "metadata refresh failed: %s", e)
            with self._lock:
                self._refresh_topics |= topics
            return
        with self._lock:
            for name in topics:
                ts = self._topics.get(name)
                n = self._metadata.cached_partitions(name)
                if ts is not None and n is not None and n > ts.partitions:
                    ts.grow(n)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            batches = list(self._incomplete)
            self._incomplete.clear()
            for b in batches:
                self._release(b)
            for acc in self._pending:
                acc.open = None
                acc.queue.clear()
                acc.in_flight = None
            self._pending.clear()
            self._closed = True
            self._space_cond.notify_all()
        for b in batches:
            b.result.complete(-1, -1, error)


class _FailedCall:
    """Stands in for a gRPC future when the call could not even start."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def result(self, timeout: float | None = None) -> Any:
        raise self._error

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        fn(self)


__all__ = [
    "FutureRecordMetadata", "FutureRecordsMetadata", "FutureTimeoutError", "Producer", "RecordMetadata",
    "failed_future", "failed_records_future", "is_retriable", "needs_metadata", "rpc_error",
]
