"""The sender (Kafka's `Sender`): one thread that takes the accumulator's ready batches, ships one
Produce per leader, and handles the responses: completes the batches' futures, puts retriable
failures back at their queue fronts after a backoff (the retry policy, logbroker/client/backoff.py;
an overloaded broker's retry-after hint on top), asks for metadata when leaders moved, and tells
the broker's circuit (client/circuit.py) how each call went: batches for a broker whose circuit is
open stay queued (accumulator.drain) until its cool-down ends, then one request probes it. With `linger_ms=0` the calling thread ships its own batch
(`ship_inline`) when no other thread is shipping.

    accumulator.drain(now) ──> one ProduceRequest per leader ──> transport (record transport or
    gRPC stream) ──> response on a reader thread ──> completions ──> sender thread ──> futures

Requests under WIRE_REQUEST_BYTES_MAX go on the record transport (logbroker/wire.py) where the
broker has one, bigger ones on a gRPC stream. Lock order: _ship_lock, then the accumulator's _lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc

from logbroker.client.backoff import client_retry_policy
from logbroker.client.call_errors import is_retriable, needs_metadata, overload_wait_ms, rpc_error
from logbroker.client.metadata_cache import LogThrottle, MetadataCache
from logbroker.client.producer.accumulator import RecordAccumulator, records_of
from logbroker.client.producer.batch import PartitionBatches, ProducerBatch
from logbroker.client.producer.future import forward
from logbroker.client.producer.idempotence import ProducerIdentity
from logbroker.client.producer.reroute import REROUTES_MAX, explained
from logbroker.client.streams import BrokerStreams
from logbroker.client.transport import on_reader_thread
from logbroker.errors import (
    KafkaTimeoutError,
    LogbrokerError,
    OutOfOrderSequenceNumberError,
    PartitionCountChangedError,
    UnknownServerError,
    error_for,
)
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)
_throttled = LogThrottle(log)

# Produce requests with fewer record bytes than this take the record transport (when the broker has
# one); bigger ones a gRPC stream (streams.BrokerStreams.send says why). The consumer draws its line
# for fetches at the same size (consumer/fetcher.py: STREAM_FETCH_RESPONSE_BYTES_MAX).
WIRE_REQUEST_BYTES_MAX = 64 << 10


class _InFlight(NamedTuple):
    address: str
    batches: list[ProducerBatch]
    future: Any  # grpc.Future
    sent_at: float  # monotonic s, for the broker's throttle time (client/throttle.py)
    pinned: bool = False  # counted in Sender._transport_in_flight


class Sender:
    """Ships what the accumulator has ready and handles the answers (see the module doc)."""

    def __init__(self, acc: RecordAccumulator, metadata: MetadataCache, streams: BrokerStreams, *, acks: int,
                 request_timeout_ms: int, retries: int, retry_backoff_ms: int,
                 identity: ProducerIdentity | None = None) -> None:
        self._acc = acc
        self._identity = identity  # None: not idempotent (producerId -1 in every batch)
        self._metadata = metadata
        self._streams = streams  # ours, even on a shared metadata cache
        self._acks = acks
        self._request_timeout_ms = request_timeout_ms
        self._rpc_timeout_s = request_timeout_ms / 1000 + 1.0
        self._retry_backoff_ms = retry_backoff_ms
        self._retry_policy = client_retry_policy(retry_backoff_ms, retries)
        self._completions: list[_InFlight] = []
        self._orders = itertools.count(1)  # sequenced batches' `order`
        # An idempotent producer's requests to one broker all take one transport while any is in
        # flight (address -> (wire_ok, requests)): one stream keeps them in order on the way, so the
        # broker sees each partition's sequences in order.
        self._transport_in_flight: dict[str, tuple[bool, int]] = {}
        # Held by whoever drains and sends, so requests to a broker leave in drain order.
        self._ship_lock = threading.Lock()
        self._stopping = False  # the sender fails what is left and exits
        self.thread = threading.Thread(target=self._run, name="logbroker-producer-sender", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Make the thread fail what is left and exit (with the accumulator's _lock held)."""
        self._stopping = True
        self._acc._sender_cond.notify()

    def _run(self) -> None:
        try:
            while self._run_once():
                pass
        except BaseException as e:  # a bug: fail everything rather than hang every future
            log.exception("producer sender thread crashed")
            self._acc.abort_all(UnknownServerError(f"producer sender thread crashed: {e!r}"))
            raise
        finally:
            self._metadata.release_streams(self._streams)
        self._acc.abort_all(KafkaTimeoutError("producer closed before the record was delivered"))

    def _run_once(self) -> bool:
        """One round: handle responses, refresh metadata, expire and ship batches, or sleep."""
        with self._acc._lock:
            completions = self._completions
            self._completions = []
        for call in completions:
            self._handle_response(call)
        now = self._acc._monotonic()
        self._maybe_refresh_metadata(now)
        self._reroute(now)
        self._ship_lock.acquire()
        shipping = True
        try:
            with self._acc._lock:
                if self._stopping:
                    return False
                requests, expired, wake_at = self._acc.drain(now)
                if not requests and not expired and not self._completions:
                    self._ship_lock.release()  # a send() may ship while we sleep
                    shipping = False
                    self._acc._sender_waiting = True
                    self._acc._sender_wake_at = wake_at
                    try:
                        self._acc._sender_cond.wait(None if wake_at is None else max(0.0, wake_at - now))
                    finally:
                        self._acc._sender_waiting = False
                    return True
            done = self._ship(requests, expired, now)
        finally:
            if shipping:
                self._ship_lock.release()
        self._finish_shipped(done)
        return True

    def ship_inline(self) -> None:
        """linger_ms=0: ship what is ready from the calling thread, sparing the hand-off to the
        sender thread (measured ~0.07 ms of a produce-to-consume latency). Only when no other thread
        is shipping (or this is a connection's reader thread running a callback, which must never
        block on a write): that one, or the sender woken here, then takes our batch. The sender is also
        woken when what is left needs it at a time it does not know (a metadata refresh, a backoff).
        """
        if on_reader_thread() or not self._ship_lock.acquire(blocking=False):
            with self._acc._lock:  # a send() from a completion callback, or another thread is shipping
                if self._acc._sender_waiting:
                    self._acc._sender_cond.notify()
            return
        try:
            now = self._acc._monotonic()
            with self._acc._lock:
                if self._stopping:
                    return
                requests, expired, wake_at = self._acc.drain(now)
                if (self._acc._sender_waiting and wake_at is not None
                        and (self._acc._sender_wake_at is None or wake_at < self._acc._sender_wake_at)):
                    self._acc._sender_cond.notify()
            done = self._ship(requests, expired, now)
        finally:
            self._ship_lock.release()
        self._finish_shipped(done)

    def _ship(self, requests: list[tuple[str, list[ProducerBatch]]], expired: list[ProducerBatch],
              now: float) -> list[tuple[ProducerBatch, BaseException | None]]:
        """Send the requests (with _ship_lock held, not _lock). Returns the batches that are done
        already, expired ones with their error and acks=0 ones with None: the caller finishes them
        (user callbacks run then) after letting go of _ship_lock, so a callback that calls flush()
        does not wait on a lock its own thread holds."""
        done: list[tuple[ProducerBatch, BaseException | None]] = []
        for b in expired:
            if b.sequenced and self._identity is not None:
                self._identity.reset()  # it may or may not be in the log: the next sequence is unknown
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

    def _finish_shipped(self, done: list[tuple[ProducerBatch, BaseException | None]]) -> None:
        for b, err in done:
            if err is None:
                b.result.complete(-1, -1, None)  # acks=0
            else:
                self._finish(b, -1, -1, err)

    def _send_request(self, address: str, batches: list[ProducerBatch]) -> bool:
        """One Produce for `batches` (consecutive batches of one partition share one `records`).
        True with acks=0: the batches are done once written (the caller completes them)."""
        try:
            per_partition = self._encode(batches)
        except Exception as e:  # no producer id yet (retried), fenced (final), a bug
            future: Any = _FailedCall(e)
            call = _InFlight(address, batches, future, self._acc._monotonic())
            future.add_done_callback(lambda _f, call=call: self._on_response(call))
            return False
        placed: dict[PartitionBatches, int] = {}  # the fewest partitions any keyed record was placed by
        for b in batches:
            placed[b.acc] = min(placed.get(b.acc, b.placed_by), b.placed_by)
        parts = [
            pb.ProducePartition(
                topic=acc.topic, partition=acc.partition,
                records=payloads[0] if len(payloads) == 1 else b"".join(payloads),
                keys_placed_by_partitions=placed[acc],
            )
            for acc, payloads in per_partition.items()
        ]
        request = pb.ProduceRequest(acks=self._acks, timeout_ms=self._request_timeout_ms, partitions=parts)
        wire_ok = sum(len(pp.records) for pp in parts) < WIRE_REQUEST_BYTES_MAX
        pinned = self._acc.partition_in_flight_batches_max > 0
        if pinned:
            wire_ok = self._pin_transport(address, wire_ok)
        try:
            future = self._metadata.produce_call(address, request, self._rpc_timeout_s, self._streams, wire_ok)
        except Exception as e:  # a closed channel, a serialization bug
            future = _FailedCall(e)
        call = _InFlight(address, batches, future, self._acc._monotonic(), pinned)
        future.add_done_callback(lambda _f, call=call: self._on_response(call))
        return self._acks == 0

    def _pin_transport(self, address: str, wire_ok: bool) -> bool:
        """The transport of a request to `address`: the one its requests in flight took, if any."""
        with self._acc._lock:
            pinned, count = self._transport_in_flight.get(address, (wire_ok, 0))
            self._transport_in_flight[address] = (pinned, count + 1)
        return pinned

    def _unpin_transport(self, address: str) -> None:
        """A request to `address` answered (with _lock held)."""
        if (entry := self._transport_in_flight.get(address)) is not None:
            if entry[1] <= 1:
                del self._transport_in_flight[address]
            else:
                self._transport_in_flight[address] = (entry[0], entry[1] - 1)

    def _encode(self, batches: list[ProducerBatch]) -> dict[PartitionBatches, list[bytes]]:
        """Each batch's payload, encoded once (an idempotent producer numbers it then: a retry
        resends the same bytes, sequence included), grouped by partition."""
        per_partition: dict[PartitionBatches, list[bytes]] = {}
        identity = self._identity
        for b in batches:
            if b.payload is None:
                builder = b.builder
                assert builder is not None
                if identity is None:
                    b.payload = builder.build()
                else:
                    pid, epoch, seq = identity.sequenced(b.acc.topic, b.acc.partition, builder.record_count)
                    b.payload = builder.build(pid, epoch, seq)
                    b.base_sequence = seq
                    if identity.unsupported:  # plain batches: one request per partition keeps their order
                        self._acc.partition_in_flight_batches_max = 0
                    else:
                        b.sequenced = True
                        b.order = next(self._orders)
                        b.producer_id = identity.producer_id
                        with self._acc._lock:
                            b.acc.sent[b] = None
                b.builder = None  # the encoded payload is all a retry needs
            per_partition.setdefault(b.acc, []).append(b.payload)
        return per_partition

    def _on_response(self, call: _InFlight) -> None:
        """gRPC thread: hand the finished call to the sender thread."""
        with self._acc._lock:
            self._completions.append(call)
            if self._acc._sender_waiting:
                self._acc._sender_cond.notify()

    def _handle_response(self, call: _InFlight) -> None:
        now = self._acc._monotonic()
        outcomes: list[tuple[ProducerBatch, int, int, BaseException | None]] = []
        try:
            response = call.future.result()
            call_error: BaseException | None = None
        except grpc.RpcError as e:
            call_error = rpc_error(e)
        except Exception as e:
            call_error = e if isinstance(e, LogbrokerError) else UnknownServerError(repr(e))
        if call_error is not None and is_retriable(call_error):  # the broker's health (client/circuit.py)
            self._metadata.circuits.failed(call.address, call_error)
        else:  # answered (a final refusal too: the broker is up)
            self._metadata.circuits.succeeded(call.address)
        results: dict[tuple[str, int], pb.ProducePartitionResult] = {}
        if call_error is None:
            for r in response.results:
                results[(r.topic, r.partition)] = r
        with self._acc._lock:
            self._acc._in_flight_per_broker[call.address] -= 1
            if call.pinned:
                self._unpin_transport(call.address)
            if call_error is None and response.throttle_time_ms > 0:
                self._acc.throttle.on_response(call.address, call.sent_at, response.throttle_time_ms)
            next_offset: dict[PartitionBatches, int] = {}  # batches after the first of a partition
            retried: list[ProducerBatch] = []
            per_acc: dict[PartitionBatches, int] = {}
            for b in call.batches:
                per_acc[b.acc] = per_acc.get(b.acc, 0) + 1
            for b in call.batches:
                acc = b.acc
                acc.in_flight -= 1
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
                        if b.sequenced:
                            acc.confirmed_producer_id = b.producer_id
                        outcomes.append((b, base, r.log_append_time_ms, None))
                        continue
                    else:
                        err = error_for(r.error_code, r.error_message)
                if self._to_reroute(b, err, now):
                    continue
                if needs_metadata(err):
                    self._acc._refresh_topics.add(acc.topic)
                shared = len(call.batches) if call_error is not None else per_acc[acc]
                retriable = is_retriable(err) or _behind_a_retry(b, err)
                if shared > 1 and not b.solo and not retriable and not self._stopping and b.deadline > now:
                    # One rejection for many batches (one too large, a request over the broker's
                    # limit): send each alone, so only the culprit fails.
                    b.solo = True
                    retried.append(b)
                elif (wait_s := self._retry_wait_s(b, err, retriable, now)) is not None:
                    b.attempts += 1
                    b.last_error = err
                    b.retry_at = now + wait_s
                    retried.append(b)
                    log.debug("retrying %s-%s (attempt %d): %s", acc.topic, acc.partition, b.attempts, err)
                else:
                    outcomes.append((b, -1, -1, err))
                    if b.sequenced and self._identity is not None:
                        self._identity.batch_failed(err)
            for b in reversed(retried):  # back to the queue fronts, in their original order
                b.acc.requeue(b)
            for b, *_ in outcomes:
                self._acc._incomplete.pop(b, None)
                self._acc._release(b)
            if self._acc._sender_waiting:
                self._acc._sender_cond.notify()
        for b, base_offset, append_time, error in outcomes:
            if self._acks != 0:
                b.result.complete(base_offset, append_time, error)

    def _to_reroute(self, b: ProducerBatch, err: BaseException, now: float) -> bool:
        """Whether refused batch `b` waits to be re-routed (reroute.py; with _lock held): refused
        because its topic grew, or refused otherwise (out of sequence, a retriable error) behind such
        a batch of its partition. Batches before the first such one retry as usual."""
        acc = b.acc
        if self._stopping or acc.ts is None or self._acks == 0:
            return False
        if not isinstance(err, PartitionCountChangedError):
            if acc.reroute is None or not (is_retriable(err) or isinstance(err, OutOfOrderSequenceNumberError)):
                return False
            first = min((x.order for x in acc.reroute if x.sequenced), default=None)
            if b.sequenced and first is not None and b.order < first:
                return False
        b.last_error = err
        if isinstance(err, PartitionCountChangedError) and not acc.reroute_known:
            # re-routed before and refused again: its records fail, with no need to wait for the count
            acc.reroute_known = b.reroutes >= REROUTES_MAX or explained(
                (m.key for m in records_of(b)), acc.partition, acc.ts.partitions)
        if acc.reroute is None:
            acc.reroute = []
            self._acc._rerouting[acc] = None
        acc.reroute.append(b)
        self._acc._refresh_topics.add(acc.topic)
        log.debug("%s-%s: batch refused (%s), its records will be re-routed", acc.topic, acc.partition, err)
        return True

    def _reroute(self, now: float) -> None:
        """Re-route the refused batches whose partition is ready (accumulator.reroute)."""
        with self._acc._lock:
            if not self._acc._rerouting:
                return
            forwards = []
            for acc in [a for a in self._acc._rerouting if self._acc.reroute_ready(a, now)]:
                forwards += self._acc.reroute(acc, now)
        for old, routes in forwards:
            forward(old, routes)

    def _retry_wait_s(self, b: ProducerBatch, err: BaseException, retriable: bool, now: float) -> float | None:
        """How long `b` backs off before its next try; None: it fails now (a final error, the
        producer stopping, `retries` used up, or the wait would end past its delivery deadline)."""
        if not retriable or self._stopping:
            return None
        wait_ms = self._retry_policy.delay_ms(b.attempts + 1)
        if wait_ms is None:
            return None
        wait_ms = overload_wait_ms(wait_ms, err)  # an overloaded broker's retry-after comes on top
        if now + wait_ms / 1000 >= b.deadline:
            return None
        return wait_ms / 1000

    def _finish(self, b: ProducerBatch, base_offset: int, append_time: int, error: BaseException | None) -> None:
        """Complete an already-released batch (without _lock held)."""
        b.result.complete(base_offset, append_time, error)

    def _maybe_refresh_metadata(self, now: float) -> None:
        with self._acc._lock:
            stale = self._acc._topics and now >= self._metadata.last_refresh_monotonic + self._acc._metadata_max_age_s
            if (not self._acc._refresh_topics and not stale) or now < self._acc._metadata_retry_at:
                return
            topics = set(self._acc._topics) if stale else set()
            topics |= self._acc._refresh_topics
            self._acc._refresh_topics = set()
            self._acc._metadata_retry_at = now + self._retry_backoff_ms / 1000
        try:
            self._metadata.refresh(sorted(topics), retry=False)  # this loop backs off itself
        except LogbrokerError as e:
            _throttled.warning("metadata", "metadata refresh failed: %s", e)
            with self._acc._lock:
                self._acc._refresh_topics |= topics
            return
        with self._acc._lock:
            for name in topics:
                ts = self._acc._topics.get(name)
                n = self._metadata.cached_partitions(name)
                if ts is not None and n is not None and n > ts.partitions:
                    ts.grow(n)


def _behind_a_retry(b: ProducerBatch, err: BaseException) -> bool:
    """An out-of-sequence refusal of a batch sent while a batch before it was still unanswered: that
    one failed (or has not arrived yet), so this one goes again after it (batch.py)."""
    if not isinstance(err, OutOfOrderSequenceNumberError) or not b.sequenced:
        return False
    return next(iter(b.acc.sent), b) is not b


class _FailedCall:
    """Stands in for a gRPC future when the call could not even start."""

    def __init__(self, error: BaseException) -> None:
        self._error = error

    def result(self, timeout: float | None = None) -> Any:
        raise self._error

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        fn(self)
