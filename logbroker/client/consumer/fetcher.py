"""The fetcher (Kafka's `Fetcher`): Fetch requests to partition leaders, and their records, decoded lazily.

Pipeline, per leader broker: a `Fetch` in flight (covering every assigned partition that broker
leads and that is fetchable; while tailing on the record transport, read by poll() itself, or on
the broker's FetchStream without one; after a big response a unary call instead of that stream:
see STREAM_FETCH_RESPONSE_BYTES_MAX; the record transport keeps big responses) while `poll()` decodes the previous response; a
second one (over other partitions, on a second stream) may go out while the first long-polls on
caught-up partitions. A response's
next fetch offsets come from its batch headers alone (`iter_batches`), so the next request goes
out before a single record of the previous one is decoded::

    Fetch.future ──> response ──> Chunk per partition (raw bytes + batch headers) ──> deque
         ^                          │ fetch_offset = last batch's next offset
         └── sent at once ──────────┘
    poll() ──> decode the head chunk's next batch (decode_batch, min_offset = chunk start)
           ──> (a batch whose first record has headers: open its sealed values, client/encryption.py)
           ──> hand out up to max_records Messages, position = last offset + 1

A partition is fetchable when its position is known, it has no fetch in flight, is not backing
off after an error, and holds at most one undecoded chunk (double buffering: one chunk decoding,
one in flight or waiting). Total undecoded bytes are also capped at 2 x fetch_max_bytes.

The hot path is poll()'s: `Chunk.take` hands out whole decoded batches (the list itself, no copy);
the consumer reads `chunks` and `in_flight` directly (no call per poll for them).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import grpc

from logbroker.client.backoff import client_retry_policy
from logbroker.client.call_errors import overload_wait_ms, rpc_error
from logbroker.client.consumer.metadata import ConsumerMetadata
from logbroker.client.consumer.subscription import PartitionState, SubscriptionState, TopicPartition
from logbroker.client.encryption import Opener
from logbroker.client.metadata_cache import LogThrottle
from logbroker.client.streams import FETCH_STREAM, BrokerStreams
from logbroker.client.throttle import BrokerThrottle
from logbroker.errors import BrokerOverloadedError, LogbrokerError, OffsetOutOfRangeError, error_for
from logbroker.storage.record_batch import BatchHeader, Message, decode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

# Fetches in flight to one broker, over disjoint partitions. A second one lets a partition that just
# became fetchable go out while the first long-polls on caught-up partitions for fetch_max_wait_ms.
FETCHES_IN_FLIGHT_PER_BROKER = 2
# Fetches go on the record transport (logbroker/wire.py), or the broker's FetchStream without one
# (a message instead of a call: ~0.2 ms less per round trip), while responses are small, i.e. the
# consumer is tailing. After a response of at least this many
# bytes the next fetch is a unary call: the sync stream's requests are written by gRPC's own
# thread, which waits for the GIL while poll() decodes the big response (up to the 5 ms switch
# interval; measured before the C decoder: max-100b consume 1.30 M rec/s on streams vs 1.46 M
# unary), whereas a unary call is started by the polling thread itself. On the record transport
# the polling thread writes its own request, and big responses stay there: it reads them with one
# copy, where a unary gRPC call's response passes gRPC's buffers first (measured: 1 GB of 100 kB
# records consumed at 894-1,520 MB/s on the record transport, 577-641 MB/s unary, 3 runs each).
STREAM_FETCH_RESPONSE_BYTES_MAX = 64 << 10
# Responses below this (record bytes) mean the consumer is tailing: see Fetcher.collect_and_send.
TAIL_RESPONSE_BYTES_MAX = 64 << 10


class Chunk:
    """One partition's records from one fetch response, decoded one batch at a time."""

    __slots__ = ("state", "epoch", "data", "batches", "next_batch", "messages", "next_message",
                 "start_offset", "next_offset", "size", "opener")

    def __init__(self, state: PartitionState, data: bytes, batches: list[tuple[BatchHeader, int]],
                 start_offset: int, opener: Opener | None = None) -> None:
        self.state = state
        self.opener = opener
        self.epoch = state.epoch
        self.data = data
        self.batches = batches
        self.next_batch = 0
        self.messages: list[Message] = []
        self.next_message = 0
        self.start_offset = start_offset
        h = batches[-1][0]
        self.next_offset = h.base_offset + h.last_offset_delta + 1
        self.size = len(data)

    def take(self, n: int) -> list[Message]:
        """Up to n decoded messages (fewer at the end of a batch; [] when exhausted)."""
        while self.next_message >= len(self.messages):
            if self.next_batch >= len(self.batches):
                return []
            h, pos = self.batches[self.next_batch]
            self.next_batch += 1
            st = self.state
            self.messages = decode_batch(self.data, pos, h, st.topic, st.partition, self.start_offset)
            if self.messages and self.messages[0][5] and self.opener is not None:
                # a batch whose first record has headers may hold sealed values (client/encryption.py)
                self.messages = self.opener.messages(self.messages)
            self.next_message = 0
        i = self.next_message
        if i == 0 and n >= len(self.messages):
            out = self.messages  # the whole batch: hand the list over, keep no reference to it
            self.messages = []
            self.next_message = 0
            return out
        out = self.messages[i : i + n]
        self.next_message = i + len(out)
        return out

    def exhausted(self) -> bool:
        return self.next_message >= len(self.messages) and self.next_batch >= len(self.batches)


class FetchCall(NamedTuple):
    address: str
    future: Any  # grpc.Future
    parts: dict[TopicPartition, tuple[PartitionState, int, int]]  # -> (state, epoch, fetch_offset)
    lane: int  # which of the broker's fetch streams carries it
    sent_at: float  # monotonic s, for the broker's throttle time (client/throttle.py)


@dataclass(frozen=True)
class FetchConfig:
    max_bytes: int
    max_wait_ms: int
    min_bytes: int
    partition_max_bytes: int
    timeout_s: float  # a fetch's deadline: max_wait_ms + request_timeout_ms
    retry_backoff_s: float
    reset: int | None  # auto_offset_reset (EARLIEST, LATEST, None: raise)
    auto_offset_reset: str  # as given, for logs
    filter: str = ""  # a server-side CEL filter (FetchRequest.filter); "": every record
    opener: Opener | None = None  # opens sealed values (client/encryption.py)


class Fetcher:
    """Sends fetches for the fetchable partitions and turns responses into `chunks`.

    `wake` is called when a fetch completes (it wakes a waiting poll()); `closed` stops sending.
    Errors that poll() must raise wait in `pending_error`.
    """

    def __init__(self, config: FetchConfig, subscription: SubscriptionState, metadata: ConsumerMetadata,
                 streams: BrokerStreams, wake: Callable[[Any], None], throttle: LogThrottle) -> None:
        self._config = config
        self._policy = client_retry_policy(round(config.retry_backoff_s * 1000))
        self._subs = subscription
        self._md = metadata
        self._streams = streams
        self._wake = wake
        self._log = throttle
        self.chunks: deque[Chunk] = deque()
        self.buffered_bytes = 0
        self.in_flight: list[FetchCall] = []
        self._last_fetch_bytes: dict[str, int] = {}  # per broker: record bytes in its last response
        self._in_flight_per_broker: dict[str, int] = {}
        self.throttle = BrokerThrottle()  # brokers that said we are over quota
        self._rotation = 0
        self.pending_error: BaseException | None = None
        self.closed = False

    def collect_and_send(self, now: float, defer_after_small: bool = False) -> bool:
        """Take in the finished fetches, then send the next ones.

        With `defer_after_small`, when every response taken in was small (a consumer tailing the
        log), send nothing and return True: the caller hands out the records first and sends later,
        so building and writing the next request is not on those records' way to the user. After a
        big response the next fetch goes out at once, to overlap the broker's work with the decode.
        """
        handled_bytes = -1
        if self.in_flight:
            for call in [c for c in self.in_flight if c.future.done()]:
                self.in_flight.remove(call)
                self._in_flight_per_broker[call.address] -= 1
                self._handle_fetch(call, now)
                handled_bytes = max(handled_bytes, 0) + self._last_fetch_bytes.get(call.address, 0)
        if defer_after_small and 0 <= handled_bytes < TAIL_RESPONSE_BYTES_MAX:
            return True
        if self.closed or self.buffered_bytes > 2 * self._config.max_bytes:
            return False
        by_leader: dict[str, list[PartitionState]] = {}
        for st in self._subs.assigned.values():
            if (
                st.in_flight
                or st.position is None
                or st.held
                or st.buffered > 1
                or st.retry_at > now
                or st.leader is None
                or self._in_flight_per_broker.get(st.leader, 0) >= FETCHES_IN_FLIGHT_PER_BROKER
            ):
                if st.leader is None and st.position is not None:
                    self._md.stale = True
                continue
            by_leader.setdefault(st.leader, []).append(st)
        circuits = self._md.cache.circuits
        for address, states in by_leader.items():
            if not circuits.allow(address):  # open (client/circuit.py): wait for the probe's time
                wait_s = max(circuits.blocked_ms(address), self._policy.initial_ms) / 1000
                for st in states:
                    st.retry_at = now + wait_s
                continue
            self._send_fetch(address, states, now)
        return False

    def _request(self, states: list[PartitionState]) -> tuple[pb.FetchRequest, dict[TopicPartition, Any]]:
        cfg = self._config
        parts: dict[TopicPartition, tuple[PartitionState, int, int]] = {}
        request = pb.FetchRequest(max_wait_ms=cfg.max_wait_ms, min_bytes=cfg.min_bytes, max_bytes=cfg.max_bytes,
                                  replica_id=-1, filter=cfg.filter)
        for st in states:
            request.partitions.add(
                topic=st.topic, partition=st.partition, fetch_offset=st.fetch_offset,
                partition_max_bytes=cfg.partition_max_bytes, current_leader_epoch=-1,
            )
            parts[(st.topic, st.partition)] = (st, st.epoch, st.fetch_offset)
            st.in_flight = True
        return request, parts

    def _send_fetch(self, address: str, states: list[PartitionState], now: float) -> None:
        if len(states) > 1:  # rotate, so the broker's max_bytes cut-off does not starve the last ones
            k = self._rotation % len(states)
            self._rotation += 1
            states = states[k:] + states[:k]
        request, parts = self._request(states)
        timeout_s = self._config.timeout_s
        try:
            busy = {c.lane for c in self.in_flight if c.address == address}
            lane = next(i for i in range(FETCHES_IN_FLIGHT_PER_BROKER) if i not in busy)
            if (self._last_fetch_bytes.get(address, 0) >= STREAM_FETCH_RESPONSE_BYTES_MAX
                    and not self._streams.on_wire(FETCH_STREAM, address, lane)):
                future = self._md.cache.broker_stub(address).Fetch.future(request, timeout=timeout_s)
            else:
                future = self._md.cache.fetch_call(address, request, timeout_s, lane, self._streams)
        except Exception as e:
            for st in states:
                st.in_flight = False
                self._back_off(st, now)
            self._md.stale = True
            self._md.cache.circuits.failed(address, e)  # (gives a probe back: it never went)
            self._log.warning(f"fetch {address}", "Fetch to %s could not start: %s", address, e)
            return
        self.in_flight.append(FetchCall(address, future, parts, lane, now))
        self._in_flight_per_broker[address] = self._in_flight_per_broker.get(address, 0) + 1
        future.add_done_callback(self._wake)

    def _back_off(self, st: PartitionState, now: float, err: BaseException | None = None) -> None:
        """A fetch of `st` failed: it waits along the retry policy (retry_backoff_ms doubling to the
        cap, jittered; an overloaded broker's retry-after on top) before its next fetch; a fetch that
        answers resets the curve."""
        st.failures += 1
        wait_ms = self._policy.delay_ms(st.failures)
        wait_ms = overload_wait_ms(wait_ms if wait_ms is not None else self._policy.max_ms, err)
        st.retry_at = now + wait_ms / 1000

    def _handle_fetch(self, call: FetchCall, now: float) -> None:
        for st, _, _ in call.parts.values():
            st.in_flight = False
        try:
            response = call.future.result()
        except grpc.RpcError as e:
            err = rpc_error(e)
            if e.code() == grpc.StatusCode.CANCELLED and self.closed:
                return
            self._log.warning(f"fetch {call.address}", "Fetch from %s failed: %s", call.address, err)
            for st, _, _ in call.parts.values():
                self._back_off(st, now, err)
            if not isinstance(err, BrokerOverloadedError):  # leaders may have moved; overload says not
                self._md.stale = True
            if not getattr(err, "retriable", False):
                self.pending_error = err
                self._md.cache.circuits.succeeded(call.address)  # answered: the broker is up
            else:  # the broker's health (client/circuit.py)
                self._md.cache.circuits.failed(call.address, err)
            return
        self._md.cache.circuits.succeeded(call.address)
        self._last_fetch_bytes[call.address] = 0
        assigned = self._subs.assigned
        if response.throttle_time_ms > 0:
            self._throttled(call, response.throttle_time_ms)
        for r in response.results:
            entry = call.parts.get((r.topic, r.partition))
            if entry is None:
                continue
            st, epoch, fetch_offset = entry
            if epoch != st.epoch or assigned.get((st.topic, st.partition)) is not st:
                continue  # sought or unassigned meanwhile
            code = r.error_code
            if code == pb.NONE:
                self._take_records(call.address, st, fetch_offset, r, now)
            elif code == pb.OFFSET_OUT_OF_RANGE:
                self._handle_out_of_range(st, fetch_offset, r, now)
            else:
                err = error_for(code, r.error_message)
                self._back_off(st, now)
                if err.refresh_metadata:
                    self._md.stale = True
                if not err.retriable:
                    self.pending_error = err
                else:
                    log.debug("Fetch %s-%s: %s", st.topic, st.partition, err)

    def _throttled(self, call: FetchCall, throttle_time_ms: int) -> None:
        """Over quota at this broker: none of its partitions is fetched before the throttle ends."""
        until = self.throttle.on_response(call.address, call.sent_at, throttle_time_ms)
        if until is None:
            return
        for st in self._subs.assigned.values():
            if st.leader == call.address and st.retry_at < until:
                st.retry_at = until

    def _take_records(self, address: str, st: PartitionState, fetch_offset: int, r: pb.FetchPartitionResult,
                      now: float) -> None:
        """A partition's records from a response: one chunk, queued for poll()."""
        st.failures = 0
        st.high_watermark = r.high_watermark
        st.log_start_offset = r.log_start_offset
        st.log_end_offset = r.log_end_offset
        data = r.records  # one copy out of the message; never copied again
        self._last_fetch_bytes[address] += len(data)
        if not data:
            return
        try:
            batches = list(iter_batches(data))
        except LogbrokerError as e:
            self.pending_error = e
            self._back_off(st, now)
            return
        if not batches:
            return
        chunk = Chunk(st, data, batches, fetch_offset, self._config.opener)
        if chunk.next_offset <= fetch_offset:
            return  # only records below the fetch offset: nothing new
        self.chunks.append(chunk)
        self.buffered_bytes += chunk.size
        st.buffered += 1
        st.fetch_offset = chunk.next_offset

    def _handle_out_of_range(self, st: PartitionState, fetch_offset: int, r: pb.FetchPartitionResult,
                             now: float) -> None:
        cfg = self._config
        if cfg.reset is None:
            self.pending_error = OffsetOutOfRangeError(
                f"{st.topic}-{st.partition}: offset {fetch_offset} is out of range "
                f"[{r.log_start_offset}, {r.high_watermark}] and auto_offset_reset is 'none'"
            )
            self._back_off(st, now)
            return
        log.info("%s-%s: offset %d out of range, resetting to %s", st.topic, st.partition, fetch_offset,
                 cfg.auto_offset_reset)
        st.reset(cfg.reset)
        self._subs.need_positions = True

    def drain(self, limit: int) -> list[Message]:
        """Up to `limit` records from the buffered chunks, moving positions past what is handed out."""
        out: list[Message] = []
        chunks = self.chunks
        while chunks and len(out) < limit:
            chunk = chunks[0]
            st = chunk.state
            if chunk.epoch != st.epoch:
                chunks.popleft()
                self.buffered_bytes -= chunk.size
                continue
            try:
                msgs = chunk.take(limit - len(out))
            except LogbrokerError:
                # A corrupt batch: drop what follows it, so the next fetch starts at it again.
                chunks.popleft()
                self.buffered_bytes -= chunk.size
                st.buffered -= 1
                st.seek(st.position if st.position is not None else chunk.start_offset)
                raise
            if msgs:
                st.position = msgs[-1].offset + 1
                if out:
                    out.extend(msgs)
                else:
                    out = msgs
                    if len(out) >= limit:
                        break
                continue
            # exhausted: the position moves past control batches and compacted gaps too
            chunks.popleft()
            self.buffered_bytes -= chunk.size
            st.buffered -= 1
            if st.position is None or st.position < chunk.next_offset:
                st.position = chunk.next_offset
        return out

    def inline_connections(self) -> list[Any]:
        """The record-transport connections of fetches still in flight (poll() reads them itself)."""
        return [c.future.connection for c in self.in_flight
                if getattr(c.future, "connection", None) is not None and not c.future.done()]

    def any_done(self) -> bool:
        return any(c.future.done() for c in self.in_flight)

    def close(self) -> None:
        """Cancel the fetches in flight and drop the buffered records."""
        self.closed = True
        for call in self.in_flight:
            call.future.cancel()
        self.in_flight.clear()
        self.chunks.clear()
        self.buffered_bytes = 0
