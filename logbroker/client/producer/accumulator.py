"""The record accumulator (Kafka's `RecordAccumulator`): per-partition batches that `send()` and
`send_many()` fill, the buffer memory they are charged against, and `drain()`, which picks the
batches ready to ship per leader.

    send() ──> PartitionBatches.open (a BatchBuilder) ──sealed──> .queue ──> drain(now) ──> Sender

A batch is ready when it is full or sealed, when linger_ms has passed since it was opened, or at once
while flush() or close() wait or buffer memory is exhausted; it waits while its partition has a
request in flight (muted; an idempotent producer's partition: BATCHES_KEPT batches, or a retry
waits for the batches before it: batch.py), its leader is unknown, its leader has max_in_flight_requests out or
throttles us (over quota: client/throttle.py), or it backs off after a failure. `drain` also expires batches older than delivery_timeout_ms.
A partition whose batch was refused because its topic grew waits to be re-routed, and a grown topic's
new partitions wait for the batches opened before the growth (`reroute`; reroute.py).

Everything here happens under `_lock`, which the Sender and the Producer share (one lock, as the
hot path takes it once per send()). Time comes from the injected clock (seconds, monotonic).
`Producer` extends this class, so send() appends with no call in between (a method call per record
costs about a quarter of send()).
"""

from __future__ import annotations

import random
import threading
from collections import deque
from collections.abc import Sequence

from logbroker.client.metadata_cache import MetadataCache
from logbroker.client.producer.batch import (
    PLACED_BY_ANY,
    RECORD_OVERHEAD_BYTES,
    PartitionBatches,
    ProducerBatch,
    TopicState,
    normalize_headers,
)
from logbroker.client.producer.future import _BatchResult
from logbroker.client.producer.idempotence import ProducerIdentity
from logbroker.client.producer.reroute import FAILED, REROUTES_MAX, is_pinned, runs, split_queue, target
from logbroker.client.throttle import BrokerThrottle
from logbroker.clock import Clock, monotonic_s
from logbroker.errors import (
    KafkaTimeoutError,
    LogbrokerError,
    PartitionCountChangedError,
    UnknownTopicOrPartitionError,
)
from logbroker.storage.record_batch import (
    HEADER_SIZE,
    BatchBuilder,
    CopiedRecord,
    Message,
    decode_batch,
    iter_batches,
)

# Room kept in a request for its protobuf framing (per partition: topic, partition, tags).
REQUEST_OVERHEAD_BYTES = 1024

Requests = list[tuple[str, list[ProducerBatch]]]
Forwards = list[tuple[_BatchResult, list[tuple[_BatchResult, int]]]]  # (re-routed batch, where each record went)


class RecordAccumulator:
    """Batches per partition, the buffer memory they hold, and which of them are ready."""

    def __init__(
        self, metadata: MetadataCache, *, linger_ms: int, batch_size_bytes: int, max_request_bytes: int,
        delivery_timeout_ms: int, buffer_memory_bytes: int, max_block_ms: int, compression: int,
        max_in_flight_requests: int, metadata_max_age_ms: int, clock: Clock | None = None,
    ) -> None:
        self._metadata = metadata
        self._monotonic = monotonic_s(clock)
        self._linger_s = linger_ms / 1000
        self._batch_size_bytes = batch_size_bytes
        self._max_request_bytes = max_request_bytes
        self._delivery_timeout_s = delivery_timeout_ms / 1000
        self._buffer_memory_bytes = buffer_memory_bytes
        self._max_block_s = max_block_ms / 1000
        self._compression = compression
        self._max_in_flight = max_in_flight_requests
        self._metadata_max_age_s = metadata_max_age_ms / 1000
        self._lock = threading.Lock()
        self._sender_cond = threading.Condition(self._lock)  # wakes the sender thread
        self._space_cond = threading.Condition(self._lock)  # wakes send() blocked on buffer memory
        self._topics: dict[str, TopicState] = {}
        self._pending: dict[PartitionBatches, None] = {}  # partitions with open, queued or in-flight batches
        self._incomplete: dict[ProducerBatch, None] = {}
        self._rerouting: dict[PartitionBatches, None] = {}  # partitions with batches to re-route (reroute.py)
        self._in_flight_per_broker: dict[str, int] = {}
        self.throttle = BrokerThrottle()  # brokers that said we are over quota (client/throttle.py)
        self._buffered_bytes = 0
        self._buffer_waiters = 0
        self._flushing = 0
        self._sender_waiting = False
        self._sender_wake_at: float | None = None  # when the waiting sender wakes on its own (None: never)
        # linger_ms=0: the thread that queued a batch ships it itself (Sender.ship_inline); it tells
        # the sender when it must.
        self._ship_inline_enabled = linger_ms == 0
        self._closed = False  # no more send()
        self._refresh_topics: set[str] = set()
        self._metadata_retry_at = 0.0
        # batches of one partition in one request; an idempotent producer sends at most as many as the
        # brokers remember per producer (producer_state.BATCHES_KEPT), so a whole resent request is
        # recognised as duplicates batch by batch
        self.partition_batches_per_request_max = 1 << 30
        # 0: one request per partition in flight (muted); n > 0 (an idempotent producer): up to n
        # batches of a partition in flight, in as many requests (batch.py)
        self.partition_in_flight_batches_max = 0
        self.identity: ProducerIdentity | None = None  # an idempotent producer's (Producer sets it)

    def append_records(
        self, ts: TopicState, partition: int | None, keys: Sequence[bytes | None] | None,
        values: Sequence[bytes | None], lens: list[int], timestamp_ms: int, hdrs: list[tuple[str, bytes | None]] | None,
        per_record: int, segments: list[tuple[_BatchResult, int, int]], pinned: bool = False, placed: int = 0,
    ) -> None:
        """Append checked records to `partition`'s batches (None: the sticky partition's), one batch
        per step, each step under _lock; appends (batch result, first delta, count) to `segments`.

        A record's buffer charge is `send`'s upper bound, per_record + lens[i] (its key and value
        bytes). A step takes at most what the free buffer memory surely holds (all of the rest, or
        as many records as the largest fits), and waits for room first when not even that fits.
        `pinned`: `partition` is the user's choice (never re-routed: reroute.py). `placed`: the
        partition count the keys were placed by (not pinned; ProducerBatch.placed_by).
        """
        # no key: nothing for a broker to check
        placed = PLACED_BY_ANY if keys is None else 0 if pinned else placed
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
                if pinned:
                    b.pin(b.builder.record_count - added, added)  # type: ignore[union-attr]
                if placed < b.placed_by:
                    b.placed_by = placed
                i = j

    def append_copies(
        self, ts: TopicState, partition: int, records: Sequence[CopiedRecord],
        segments: list[tuple[_BatchResult, int, int]],
    ) -> None:
        """Append records (timestamp_ms, key, value, headers) to `partition`'s batches in order, one
        batch per step, each step under _lock; appends (batch result, first delta, count) to
        `segments` (send_records(), the copy path).

        A step's charge is what its records add to the batch (the builder's size before and after:
        nothing computed per record). A step starts once a whole batch's worth (batch_size_bytes)
        is free, so buffer_memory_bytes is exceeded by at most one record larger than a batch.
        """
        n = len(records)
        room = min(self._batch_size_bytes, self._buffer_memory_bytes)
        i = 0
        lock = self._lock
        while i < n:
            with lock:
                if self._closed:
                    raise LogbrokerError(f"send_records() after close() ({i} of {n} records queued)")
                if self._buffered_bytes + room > self._buffer_memory_bytes:
                    try:
                        self._wait_for_buffer(room)
                    except KafkaTimeoutError as e:
                        raise KafkaTimeoutError(f"{e}: {i} of {n} records queued") from None
                acc = ts.accs[partition]
                b = acc.open
                before = 0 if b is None else b.builder.size_bytes  # type: ignore[union-attr]
                added = 0 if b is None else b.builder.append_copies(records, i, n)  # type: ignore[union-attr]
                if added == 0:
                    b = self._new_batch(acc, records[i][0])
                    before = b.builder.size_bytes  # type: ignore[union-attr]
                    added = b.builder.append_copies(records, i, n)  # type: ignore[union-attr]
                assert b is not None
                charge = b.builder.size_bytes - before  # type: ignore[union-attr]
                b.charged += charge
                self._buffered_bytes += charge
                b.pin(b.builder.record_count - added, added)  # type: ignore[union-attr]  # never re-routed
                b.placed_by = 0  # the caller's partitions: a grown topic's broker checks the keys
                segments.append((b.result, b.builder.record_count - added, added))  # type: ignore[union-attr]
                i += added

    def _next_sticky(self, ts: TopicState) -> int:
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

    def _new_batch(self, acc: PartitionBatches, timestamp_ms: int) -> ProducerBatch:
        """Seal acc's open batch (if any) and open a new one. Called with _lock held."""
        old = acc.open
        if old is not None:
            old.record_count = old.builder.record_count  # type: ignore[union-attr]
            acc.queue.append(old)
        now = self._monotonic()
        builder = BatchBuilder(timestamp_ms, self._compression, self._batch_size_bytes)
        b = ProducerBatch(acc, builder, now, now + self._delivery_timeout_s)
        acc.open = b
        self._incomplete[b] = None
        self._pending[acc] = None
        if self._sender_waiting and not self._ship_inline_enabled:  # inline: _ship_inline() tells it if needed
            self._sender_cond.notify()
        return b

    def _wait_for_buffer(self, size: int) -> None:
        """Block (with _lock held) until `size` bytes fit in buffer_memory_bytes, or max_block_ms."""
        deadline = self._monotonic() + self._max_block_s
        self._buffer_waiters += 1
        try:
            self._sender_cond.notify()  # an exhausted buffer makes every batch ready
            while self._buffered_bytes + size > self._buffer_memory_bytes and self._buffered_bytes > 0:
                if self._closed:
                    raise LogbrokerError("send() after close()")
                remaining = deadline - self._monotonic()
                if remaining <= 0:
                    raise KafkaTimeoutError(
                        f"buffer_memory_bytes ({self._buffer_memory_bytes}) full for {self._max_block_s * 1000:.0f} ms"
                    )
                self._space_cond.wait(remaining)
        finally:
            self._buffer_waiters -= 1

    # -- flush / close -----------------------------------------------------------------------
    def drain(self, now: float) -> tuple[Requests, list[ProducerBatch], float | None]:
        """Pick the batches to ship now, grouped per leader (with _lock held).

        Returns (requests, expired batches, when to wake up next).
        """
        all_ready = self._flushing > 0 or self._buffer_waiters > 0 or self._closed
        wake_at: float | None = None
        by_leader: dict[str, list[ProducerBatch]] = {}
        request_bytes: dict[str, int] = {}
        expired: list[ProducerBatch] = []
        idle: list[PartitionBatches] = []
        lingering: list[PartitionBatches] = []  # an open batch still within linger_ms
        for acc in self._pending:
            if acc.in_flight and self._muted(acc):
                continue
            if acc.reroute is not None or ((t := acc.ts) is not None and t.old_batches and acc.partition >= t.held_from):
                continue  # waits to be re-routed, or for the batches opened before its topic grew (reroute.py)
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
                    lingering.append(acc)
                    continue
            elif head.retry_at > now:
                wake_at = head.retry_at if wake_at is None else min(wake_at, head.retry_at)
                continue
            elif head.sequenced and acc.in_flight:
                continue  # a retry goes once the batches before it are answered (their response wakes us)
            leader, retry_at = self._leader_to_ship_to(acc, now, by_leader)
            if leader is None:
                if retry_at is not None:
                    wake_at = retry_at if wake_at is None else min(wake_at, retry_at)
                continue
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
                acc.in_flight += 1
            else:
                size = self._take_backlog(acc, group, used, size, now, all_ready)
            request_bytes[leader] = used + size
        if by_leader and lingering:
            self._ride_along(lingering, by_leader, request_bytes)
        for acc in idle:
            if acc.idle():
                del self._pending[acc]
        for leader in by_leader:
            self._in_flight_per_broker[leader] = self._in_flight_per_broker.get(leader, 0) + 1
        if self._rerouting:
            due = self._reroute_due(now)
            wake_at = due if wake_at is None else min(wake_at, due)
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

    def _leader_to_ship_to(self, acc: PartitionBatches, now: float,
                           by_leader: dict[str, list[ProducerBatch]]) -> tuple[str | None, float | None]:
        """Where `acc`'s ready batch goes now (leader, None), or (None, when to look again; None: a
        response will wake us): not without a known leader, nor to a broker with max_in_flight
        requests out, nor to one that throttles us (client/throttle.py), nor to one whose circuit is
        open (client/circuit.py; its first request after the cool-down is the probe)."""
        try:
            leader = self._metadata.leader(acc.topic, acc.partition)
        except UnknownTopicOrPartitionError:
            leader = None
        if leader is None:
            self._refresh_topics.add(acc.topic)
            return None, max(now, self._metadata_retry_at)
        if self._in_flight_per_broker.get(leader, 0) >= self._max_in_flight:
            return None, None
        if (throttled := self.throttle.blocked_until(leader, now)) is not None:
            return None, throttled  # over quota at this broker (client/throttle.py): nothing to it until then
        circuits = self._metadata.circuits
        if leader not in by_leader and not circuits.allow(leader):
            blocked_ms = circuits.blocked_ms(leader)  # 0: the probe's response will wake us
            return None, (now + blocked_ms / 1000 if blocked_ms else None)
        return leader, None

    def _ride_along(self, lingering: list[PartitionBatches], by_leader: dict[str, list[ProducerBatch]],
                    request_bytes: dict[str, int]) -> None:
        """Open batches still within linger_ms join a request already going to their leader (as
        Kafka's drain takes every partition of a ready node): one request instead of two, and no
        later wake-up for them. Bounded by max_request_bytes like the rest of the request."""
        for acc in lingering:
            head = acc.open
            if head is None or (acc.in_flight and self._muted(acc)):
                continue
            if acc.reroute is not None or (acc.ts is not None and acc.ts.held(acc.partition)):
                continue
            try:
                leader = self._metadata.leader(acc.topic, acc.partition)
            except UnknownTopicOrPartitionError:
                continue
            group = by_leader.get(leader) if leader is not None else None
            if group is None:
                continue
            size = head.size_bytes()
            used = request_bytes[leader]  # type: ignore[index]
            if used + size > self._max_request_bytes:
                continue
            head.record_count = head.builder.record_count  # type: ignore[union-attr]
            acc.open = None
            group.append(head)
            acc.in_flight += 1
            request_bytes[leader] = used + size  # type: ignore[index]

    def _muted(self, acc: PartitionBatches) -> bool:
        """Whether `acc`, with batches in flight, takes no more now (batch.py)."""
        limit = self.partition_in_flight_batches_max
        if limit == 0 or acc.in_flight >= limit:
            return True
        identity = self.identity
        return identity is None or acc.confirmed_producer_id != identity.producer_id

    def _take_backlog(self, acc: PartitionBatches, group: list[ProducerBatch], used: int, size: int,
                      now: float, all_ready: bool) -> int:
        """Move the queue head and the sealed batches behind it (and a ready open one) into `group`;
        the request bytes of the partition's batches taken. A backlog of sealed batches of this
        partition rides in the same request, back to back in one `records` field: a partition then
        moves up to max_request_bytes per round trip, not one batch."""
        queue = acc.queue
        head = queue.popleft()
        group.append(head)
        room = self.partition_batches_per_request_max
        if self.partition_in_flight_batches_max:
            room = min(room, self.partition_in_flight_batches_max - acc.in_flight)
        room -= 1
        first = len(group)
        while not head.solo and queue and queue[0].retry_at <= now and not queue[0].solo and room > 0:
            nxt = queue[0].size_bytes()
            if used + size + nxt > self._max_request_bytes:
                break
            group.append(queue.popleft())
            size += nxt
            room -= 1
        if (not head.solo and not queue and acc.open is not None and room > 0
                and (all_ready or acc.open.created + self._linger_s <= now)):
            nxt = acc.open.size_bytes()
            if used + size + nxt <= self._max_request_bytes:
                last = acc.open
                last.record_count = last.builder.record_count  # type: ignore[union-attr]
                acc.open = None
                group.append(last)
                size += nxt
        acc.in_flight += len(group) - first + 1
        return size

    def _release(self, b: ProducerBatch) -> None:
        """Give the batch's buffer memory back (with _lock held)."""
        self._buffered_bytes -= b.charged
        b.charged = 0
        if b.acc.ts is not None:
            b.acc.ts.retired(b)
        if b.sequenced:
            b.acc.sent.pop(b, None)
        b.payload = None
        b.builder = None
        if self._buffer_waiters:
            self._space_cond.notify_all()

    def abort_all(self, error: BaseException) -> None:
        with self._lock:
            batches = list(self._incomplete)
            self._incomplete.clear()
            for b in batches:
                self._release(b)
            for acc in self._pending:
                acc.open = None
                acc.queue.clear()
                acc.in_flight = 0
                acc.sent.clear()
                acc.reroute = None
            self._pending.clear()
            self._rerouting.clear()
            self._closed = True
            self._space_cond.notify_all()
        for b in batches:
            b.result.complete(-1, -1, error)

    # -- re-routing (reroute.py) -------------------------------------------------------------
    def _reroute_due(self, now: float) -> float:
        """When the sender must look at the partitions waiting to be re-routed: the metadata refresh
        that may show the growth (their responses wake it while batches are in flight), at the latest
        the first refused batch's expiry."""
        due: float | None = None
        for acc in self._rerouting:
            at = min((b.deadline for b in acc.reroute or ()), default=now)
            if not acc.in_flight:
                at = min(at, max(now, self._metadata_retry_at))
            due = at if due is None else min(due, at)
        return now if due is None else due

    def reroute_ready(self, acc: PartitionBatches, now: float) -> bool:
        """Whether `acc`'s refused batches can be re-routed now (with _lock held): nothing of it in
        flight, and the new partition count known (the producer's metadata grew the topic since the
        first of them was opened, or its count explains a refusal: reroute.explained; until then the
        sender refreshes it), or the first one's deadline has passed (its records then fail)."""
        refused = acc.reroute
        if not refused or acc.in_flight or acc.ts is None:
            return False
        if (acc.reroute_known or min(b.generation for b in refused) < acc.ts.generation
                or min(b.deadline for b in refused) <= now):
            return True
        self._refresh_topics.add(acc.topic)  # a broker may learn the new count after the leader did
        return False

    def reroute(self, acc: PartitionBatches, now: float) -> Forwards:
        """Re-route `acc`'s refused batches and everything queued after them (reroute.py), with _lock
        held. Returns the forwards to make (future.forward) once the lock is let go."""
        ts = acc.ts
        assert ts is not None and acc.reroute is not None
        kept, moving = split_queue(acc.reroute, list(acc.queue))
        acc.reroute = None
        acc.reroute_known = False
        del self._rerouting[acc]
        acc.queue = deque(kept)
        if acc.open is not None:
            acc.open.record_count = acc.open.builder.record_count  # type: ignore[union-attr]
            moving.append(acc.open)
            acc.open = None
        self._take_back_sequences(acc, moving)
        records: list[tuple[Message, ProducerBatch]] = []
        targets: list[int] = []
        for b in moving:
            expired = b.deadline <= now
            exhausted = b.reroutes >= REROUTES_MAX and isinstance(b.last_error, PartitionCountChangedError)
            for m in records_of(b):
                records.append((m, b))
                targets.append(target(m.key, is_pinned(b.pinned, m.offset), expired or exhausted,
                                      acc.partition, ts.partitions))
        routes: dict[ProducerBatch, list[tuple[_BatchResult, int]]] = {b: [] for b in moving}
        for t, start, end in runs(targets):
            if t == FAILED:
                for _m, b in records[start:end]:
                    routes[b].append((_failed_result(b, acc.partition, ts.partitions, now), 0))
            else:
                self._append_rerouted(ts.accs[t], t != acc.partition, records[start:end], routes)
        for b in moving:
            self._incomplete.pop(b, None)
            self._release(b)
        return [(b.result, r) for b, r in routes.items()]

    def _append_rerouted(self, acc: PartitionBatches, front: bool, records: list[tuple[Message, ProducerBatch]],
                         routes: dict[ProducerBatch, list[tuple[_BatchResult, int]]]) -> None:
        """Append re-routed records, in order, to fresh batches of `acc`: at the back of its queue,
        or (`front`: a new partition, which holds everything sent after the growth) ahead of all but
        the batches re-routed to it before."""
        fresh: list[ProducerBatch] = []
        cur: ProducerBatch | None = None
        ts_count = acc.ts.partitions if acc.ts is not None else 0
        for m, src in records:
            hdrs = list(m.headers) or None
            size = RECORD_OVERHEAD_BYTES + len(m.key or b"") + len(m.value or b"")
            if hdrs:
                size += normalize_headers(hdrs)[1]
            delta = -1 if cur is None else cur.builder.try_append(  # type: ignore[union-attr]
                m.timestamp, m.key, m.value, hdrs, size, self._batch_size_bytes)
            if delta < 0:
                builder = BatchBuilder(m.timestamp, self._compression, self._batch_size_bytes)
                cur = ProducerBatch(acc, builder, src.created, src.deadline)
                fresh.append(cur)
                self._incomplete[cur] = None
                delta = builder.append(m.timestamp, m.key, m.value, hdrs)
            assert cur is not None
            cur.deadline = min(cur.deadline, src.deadline)
            cur.reroutes = max(cur.reroutes, src.reroutes + 1)
            if is_pinned(src.pinned, m.offset):
                cur.pin(delta, 1)
                if m.key is not None:
                    cur.placed_by = 0
            elif m.key is not None and ts_count < cur.placed_by:  # placed by the count it was re-routed by
                cur.placed_by = ts_count
            cur.charged += size
            self._buffered_bytes += size
            routes[src].append((cur.result, delta))
        for b in fresh:
            b.record_count = b.builder.record_count  # type: ignore[union-attr]
        if front:
            at = 0
            while at < len(acc.queue) and acc.queue[at].reroutes:
                at += 1
            for i, b in enumerate(fresh):
                acc.queue.insert(at + i, b)
        else:
            acc.queue.extend(fresh)
        self._pending[acc] = None

    def _take_back_sequences(self, acc: PartitionBatches, moving: list[ProducerBatch]) -> None:
        """The sequences of the re-routed batches were never appended: the partition's next batch
        takes the first of them again, when they are contiguous under the current producer id
        (idempotence.py `take_back`); otherwise the producer starts over under a new id."""
        sequenced = [(b.producer_id, b.base_sequence, b.record_count) for b in moving if b.sequenced]
        if sequenced and self.identity is not None:
            self.identity.take_back(acc.topic, acc.partition, sequenced)


def records_of(b: ProducerBatch) -> list[Message]:
    """The records of a batch (decoded from its payload, or built first if it was never sent); each
    Message's offset is the record's delta within the batch."""
    payload = b.payload
    if payload is None:
        assert b.builder is not None
        payload = b.builder.build()
    return [m for h, pos in iter_batches(payload) for m in decode_batch(payload, pos, h, b.acc.topic, b.acc.partition)]


def _failed_result(b: ProducerBatch, partition: int, partitions: int, now: float) -> _BatchResult:
    """A done result with the error of a record of `b` that is not re-routed (reroute.target)."""
    r = _BatchResult(b.acc.topic, partition)
    err: BaseException
    if b.deadline <= now:
        err = KafkaTimeoutError(f"expiring a record of {b.acc.topic}-{partition} while re-routing it: "
                                f"{(now - b.created) * 1000:.0f} ms since its batch was created")
        err.__cause__ = b.last_error
    elif isinstance(b.last_error, PartitionCountChangedError):
        err = b.last_error
    else:
        err = PartitionCountChangedError(
            f"{b.acc.topic}-{partition}: a record sent to this partition explicitly has a key that hashes to "
            f"another of the {partitions} partitions the topic has now")
    r.complete(-1, -1, err)
    return r
