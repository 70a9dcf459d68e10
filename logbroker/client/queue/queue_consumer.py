"""QueueConsumer: a member of a share group (queue semantics, KIP-932), the client side.

Every call goes to the group's coordinator (`CoordinatorClient`: FindCoordinator, found again on
NOT_COORDINATOR / COORDINATOR_NOT_AVAILABLE / an unreachable broker, COORDINATOR_LOAD_IN_PROGRESS
retried there, waits from logbroker/retry.py). ShareFetch and ShareAcknowledge go on the record
transport (logbroker/wire.py, API_SHARE_FETCH / API_SHARE_ACKNOWLEDGE) when the coordinator
advertises a data port and the metadata cache's transport is "tcp": one connection per API, read
by the polling thread itself (inline: no reader thread to hand the answer over); otherwise, or
when the data port cannot be reached, as unary gRPC calls. The member:

    member_id  a uuid4 hex chosen here, kept for the consumer's life
    epoch 0    the first ShareFetch joins (with the topics and the group settings, which the broker
               uses only when this call creates the group); then the epoch each answer gives
    fenced     UNKNOWN_MEMBER_ID / FENCED_MEMBER_EPOCH: rejoin with epoch 0, dropping the pending
               acknowledgements and every message held (a new generation: settling an old message
               is a no-op, the broker has made it available again)
    close()    ShareAcknowledge of what is pending, then ShareFetch with epoch -1 (leave)

`poll(timeout_ms)` sends the pending acknowledgements on the fetch (max_wait_ms = the timeout) and
returns the records acquired (`share_fetch.read_partition`); GAP / RELEASE acknowledgements for
acquired offsets without a record are queued for the next call. A retriable failure (the
coordinator killed or moving, not found again before the timeout) makes `poll` return no records,
keeping the acknowledgements pending, so a polling loop rides out a failover. Each call feeds the
coordinator's circuit (client/circuit.py, through `CoordinatorClient`): after repeated retriable
failures (unreachable, overloaded) it opens, and ShareFetch / ShareAcknowledge send nothing to that
broker until the probe's time (`poll` waits up to its timeout, then returns no records). Settling (`QueueMessage.ack` ...)
may happen on any thread: the pending acknowledgements sit behind one lock. `poll`, `commit_acks`,
`extend_lock` and `close` are meant for one thread at a time (the polling one), as in Kafka.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from logbroker.client.coordinator import CoordinatorClient
from logbroker.client.encryption import Opener, load_key_file
from logbroker.client.metadata_cache import LogThrottle, MetadataCache, metadata_for
from logbroker.client.queue.acks import (
    RENEW,
    Ack,
    AckOutcome,
    PendingAcks,
    ShareAck,
    failed_outcomes,
    outcomes,
    refused,
    to_proto,
)
from logbroker.client.queue.message import MessageAlreadySettledError, QueueMessage
from logbroker.client.queue.share_fetch import read_partition
from logbroker.client.sasl import SaslConfig
from logbroker.client.streams import SHARE_ACKNOWLEDGE_STREAM, SHARE_FETCH_STREAM, BrokerStreams
from logbroker.client_id import DEFAULT_CLIENT_ID
from logbroker.errors import BrokerError, LogbrokerError, error_for
from logbroker.tls import TlsConfig
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

_FENCED = (pb.UNKNOWN_MEMBER_ID, pb.FENCED_MEMBER_EPOCH)
OFFSET_RESETS = ("latest", "earliest")
ORDERINGS = ("none", "key")  # "key": per-key FIFO (the broker's share_settings.py)
MAX_POLL_RECORDS_MAX = 100_000
# The fetch waits at most this share of request_timeout_ms, so the call's own timeout never fires first.
_WAIT_SHARE = 0.5
_WIRE_METHODS = {"ShareFetch": (SHARE_FETCH_STREAM, pb.ShareFetchResponse),
                 "ShareAcknowledge": (SHARE_ACKNOWLEDGE_STREAM, pb.ShareAcknowledgeResponse)}
PUMP_WAIT_S = 1.0


def wait_inline(fut: Any) -> Any:
    """The response of a request on an inline record-transport connection: this thread reads it
    (`WireConnection.pump`; no reader thread to hand it over). A future on a gRPC stream (the data
    port was unreachable) is simply waited for. Raises grpc.RpcError as the unary call would."""
    conn = getattr(fut, "connection", None)  # a unary gRPC future (UNIMPLEMENTED fallback) has none
    while conn is not None and not fut.done() and not conn.closed:
        conn.pump(PUMP_WAIT_S)
    return fut.result()


def share_settings(
    lock_ms: int | None = None, max_delivery_attempts: int | None = None, retry_backoff_ms: int | None = None,
    retry_backoff_max_ms: int | None = None, dead_letter_topic: str | None = None,
    dead_letter_expired: bool | None = None, max_in_flight_records: int | None = None,
    auto_offset_reset: str | None = None, ordering: str | None = None, filter: str | None = None,  # noqa: A002
) -> pb.ShareGroupSettings:
    """ShareGroupSettings with the given fields set (None: unset, the broker keeps or defaults it).
    `dead_letter_topic=""` means no dead-letter topic (dead letters are dropped with a log line).
    `filter`: a CEL expression (logbroker/group/record_filter.py), "" for none; a bad one raises
    InvalidFilterError (INVALID_FILTER, the parser's message) here, before any call.
    ValueError for values no broker accepts (the broker checks its own maximums)."""
    out = pb.ShareGroupSettings()
    for name, value in (("lock_ms", lock_ms), ("max_delivery_attempts", max_delivery_attempts),
                        ("retry_backoff_ms", retry_backoff_ms), ("retry_backoff_max_ms", retry_backoff_max_ms),
                        ("max_in_flight_records", max_in_flight_records)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < (0 if name == "retry_backoff_ms" else 1):
            raise ValueError(f"{name} must be {'>= 0' if name == 'retry_backoff_ms' else '> 0'}, got {value}")
        setattr(out, name, value)
    if retry_backoff_ms is not None and retry_backoff_max_ms is not None and retry_backoff_max_ms < retry_backoff_ms:
        raise ValueError(f"retry_backoff_max_ms ({retry_backoff_max_ms}) must be >= retry_backoff_ms "
                         f"({retry_backoff_ms})")
    if dead_letter_topic is not None:
        out.dead_letter_topic = dead_letter_topic
    if dead_letter_expired is not None:
        out.dead_letter_expired = bool(dead_letter_expired)
    if auto_offset_reset is not None:
        if auto_offset_reset not in OFFSET_RESETS:
            raise ValueError(f"auto_offset_reset must be one of {', '.join(OFFSET_RESETS)}, not {auto_offset_reset!r}")
        out.auto_offset_reset = auto_offset_reset
    if ordering is not None:
        if ordering not in ORDERINGS:
            raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}, not {ordering!r}")
        out.ordering = ordering
    if filter is not None:
        if filter:
            from logbroker.group.record_filter import compile_filter  # cel-python: filtered groups only

            compile_filter(filter)
        out.filter = filter
    return out


class QueueConsumer:
    """A member of share group `group` reading `topics`: each record it is handed is its own until
    settled (ack / release / reject) or until the group's lock_ms passes."""

    def __init__(
        self,
        bootstrap: str | Sequence[str] | MetadataCache,
        group: str,
        topics: Sequence[str],
        *,
        lock_ms: int | None = None,
        max_delivery_attempts: int | None = None,
        retry_backoff_ms: int | None = None,
        retry_backoff_max_ms: int | None = None,
        dead_letter_topic: str | None = None,
        dead_letter_expired: bool | None = None,
        max_in_flight_records: int | None = None,
        auto_offset_reset: str = "latest",
        ordering: str | None = None,
        filter: str | None = None,  # noqa: A002 - the issue's name for it, as Consumer(filter=)
        max_poll_records: int = 500,
        client_id: str | None = None,
        encryption_key_file: str | os.PathLike[str] | None = None,
        request_timeout_ms: int = 30_000,
        client_retry_backoff_ms: int = 100,
        tls: TlsConfig | bool | None = None,
        sasl: SaslConfig | None = None,
    ) -> None:
        """The group settings (lock_ms ... ordering) apply only if this consumer creates the
        group; `Admin.alter_share_group` changes an existing one. `dead_letter_topic=None` keeps the
        broker's default ("{topic}.dlq"), "" asks for none.

        `filter`: a CEL expression over each record's key, headers and timestamp
        (logbroker/group/record_filter.py), evaluated by the broker. It is the group's (its members
        share one window): this consumer sets it if it creates the group, and is refused
        (InvalidFilterError) when the group has another one; records it does not match are settled
        for the group without being delivered. None: this consumer takes the group's filter, if any.
        A bad expression raises InvalidFilterError here, with the parser's message.

        `client_id`: the name brokers log for this client (logbroker/client_id.py; None:
        "logbroker-python"; ValueError when malformed). `encryption_key_file`: open sealed values
        (client/encryption.py); a message whose value cannot be opened has a DecryptionError as its
        value (settle it as any poison message: reject() dead-letters it)."""
        opener = Opener(load_key_file(encryption_key_file) if encryption_key_file is not None else None)
        if not group:
            raise ValueError("group must be a non-empty string")
        if isinstance(topics, str) or not topics:
            raise ValueError("topics must be a non-empty list of topic names")
        if not 1 <= max_poll_records <= MAX_POLL_RECORDS_MAX:
            raise ValueError(f"max_poll_records must be within 1..{MAX_POLL_RECORDS_MAX}, got {max_poll_records}")
        if request_timeout_ms < 1:
            raise ValueError(f"request_timeout_ms must be > 0, got {request_timeout_ms}")
        self._settings = share_settings(lock_ms, max_delivery_attempts, retry_backoff_ms, retry_backoff_max_ms,
                                        dead_letter_topic, dead_letter_expired, max_in_flight_records,
                                        auto_offset_reset, ordering, filter)
        self.group = group
        self._opener = opener
        self.topics = list(dict.fromkeys(topics))
        self.member_id = uuid.uuid4().hex
        self.member_epoch = 0
        self.lock_ms = 0  # as the last ShareFetch answered
        self.max_poll_records = max_poll_records
        self._request_timeout_ms = request_timeout_ms
        self._metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, client_retry_backoff_ms,
                                                                tls=tls, sasl=sasl, client_id=client_id)
        self.client_id: str = getattr(self._metadata, "client_id", DEFAULT_CLIENT_ID)
        self._coordinator = CoordinatorClient(self._metadata, group, request_timeout_ms / 1000,
                                              client_retry_backoff_ms / 1000)
        self._lock = threading.Lock()
        self._acks = PendingAcks()
        self._generation = 0
        self._closed = False
        self._log = LogThrottle(log)
        self._streams: BrokerStreams | None = None  # record-transport connections, read by the polling thread
        self._data_ports_known = False

    # -- settling (any thread) -------------------------------------------------------------------

    def settle(self, message: QueueMessage, ack: Ack) -> None:
        """Queue `message`'s acknowledgement (QueueMessage.ack/release/reject call this)."""
        with self._lock:
            if message.settled:
                raise MessageAlreadySettledError(
                    f"{message.topic}-{message.partition}@{message.offset} is already settled")
            if message.generation != self._generation:
                message.settled = True  # no longer ours: the broker has made it available again
                return
            acks = self._acks
            full = len(acks) >= acks.max_offsets
            if not full:
                acks.add(message.log_topic, message.partition, message.offset, ack)
                message.settled = True
        if full:  # send what is pending first, then queue this one
            self.commit_acks()
            self.settle(message, ack)

    # -- the polling thread ----------------------------------------------------------------------

    def poll(self, timeout_ms: int = 1000) -> list[QueueMessage]:
        """Records acquired within `timeout_ms` (possibly none); sends the pending acknowledgements."""
        self._check_open()
        timeout_ms = max(int(timeout_ms), 0)
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            runs = self._take_acks()
            request = self._fetch_request(runs, min(timeout_ms, int(self._request_timeout_ms * _WAIT_SHARE)))
            try:
                resp = self._call("ShareFetch", request, deadline)
            except LogbrokerError as e:
                self._put_back(runs)
                return self._transient(e)
            except BaseException:
                self._put_back(runs)
                raise
            if resp.error_code in _FENCED:
                self._fenced(error_for(resp.error_code, resp.error_message))
                if time.monotonic() < deadline:
                    continue  # rejoin at once
                return []
            if resp.error_code != pb.NONE:
                self._put_back(runs)
                return self._transient(error_for(resp.error_code, resp.error_message or f"share group {self.group}"))
            self._log_ack_failures(resp.ack_results)
            return self._take_records(resp)

    def _transient(self, err: LogbrokerError) -> list[QueueMessage]:
        """A retriable failure (the coordinator moving or down) is no error for `poll`: nothing this
        time, the acknowledgements stay pending, the next poll tries again. Others are raised."""
        if not getattr(err, "retriable", False):
            raise err
        self._log.warning(f"retry {self.group}", "share group %s: %s (trying again on the next poll)", self.group, err)
        return []

    def _fetch_request(self, runs: list[ShareAck], max_wait_ms: int) -> pb.ShareFetchRequest:
        request = pb.ShareFetchRequest(group=self.group, member_id=self.member_id, member_epoch=self.member_epoch,
                                       max_records=self.max_poll_records, max_wait_ms=max_wait_ms,
                                       acknowledgements=to_proto(runs))
        if self.member_epoch == 0:
            request.topics.extend(self.topics)
            request.settings.CopyFrom(self._settings)
        return request

    def _take_records(self, resp: pb.ShareFetchResponse) -> list[QueueMessage]:
        self.member_epoch = resp.member_epoch
        self.lock_ms = resp.lock_ms
        out: list[QueueMessage] = []
        generation = self._generation
        for part in resp.partitions:
            if part.error_code != pb.NONE:
                err = error_for(part.error_code, part.error_message)
                self._log.warning(f"sf {part.topic}-{part.partition}", "ShareFetch %s-%s: %s",
                                  part.topic, part.partition, err)
                continue
            read = read_partition(part)
            if read.error is not None:
                self._log.warning(f"decode {part.topic}-{part.partition}", "%s-%s: records released: %s",
                                  part.topic, part.partition, read.error)
            with self._lock:
                for run in read.acks:
                    self._acks.add_run(run)
            for a in read.acquired:
                r = a.record
                m = QueueMessage(self, generation, r.topic, r.partition, r.offset, r.key, r.value,
                                 r.headers, r.timestamp, a.delivery_count)
                if m.headers:  # a sealed value is opened for the user's topic (client/encryption.py)
                    opened = self._opener.record(m.topic, m.partition, m.offset, m.value, m.headers)
                    if opened is not None:
                        m.value, m.headers = opened  # type: ignore[assignment]  # DecryptionError: documented
                out.append(m)
        return out

    def commit_acks(self) -> AckOutcome:
        """Send every pending acknowledgement now (ShareAcknowledge, answered once durable); returns
        per (topic, partition, offset) None when the broker accepted it, else the error."""
        self._check_open()
        runs = self._take_acks()
        if not runs:
            return {}
        resp = self._acknowledge(runs)
        if resp.error_code != pb.NONE:
            err = error_for(resp.error_code, resp.error_message or f"share group {self.group}")
            if resp.error_code in _FENCED:
                self._fenced(err)
            return failed_outcomes(runs, err)
        return outcomes(runs, resp.results)

    def extend_lock(self, message: QueueMessage, ms: int) -> bool:
        """Hold `message` `ms` more from now (RENEW, sent at once); whether the broker accepted it."""
        self._check_open()
        if ms < 1:
            raise ValueError(f"ms must be > 0, got {ms}")
        with self._lock:
            if message.settled or message.generation != self._generation:
                return False
        run = ShareAck(message.log_topic, message.partition, message.offset, message.offset, Ack(RENEW, int(ms)))
        resp = self._acknowledge([run])
        if resp.error_code != pb.NONE:
            if resp.error_code in _FENCED:
                self._fenced(error_for(resp.error_code, resp.error_message))
            return False
        return outcomes([run], resp.results)[(message.log_topic, message.partition, message.offset)] is None

    def _acknowledge(self, runs: list[ShareAck]) -> Any:
        request = pb.ShareAcknowledgeRequest(group=self.group, member_id=self.member_id,
                                             member_epoch=self.member_epoch, acknowledgements=to_proto(runs))
        try:
            return self._call("ShareAcknowledge", request, time.monotonic() + self._request_timeout_ms / 1000)
        except BaseException:
            self._put_back([r for r in runs if r.ack.type != RENEW])
            raise

    def close(self, timeout_ms: int | None = None) -> None:
        """Commit the pending acknowledgements and leave the group (its records go back at once)."""
        if self._closed:
            return
        try:
            failed = {k: e for k, e in self.commit_acks().items() if e is not None}
            if failed:
                log.warning("share group %s: %d acknowledgement(s) refused on close, e.g. %s", self.group,
                            len(failed), next(iter(failed.items())))
            if self.member_epoch > 0:
                self._leave(timeout_ms)
        except LogbrokerError as e:
            log.warning("share group %s: close: %s", self.group, e)
        finally:
            self._closed = True
            if self._streams is not None:
                self._metadata.release_streams(self._streams)
            if self._owns_metadata:
                self._metadata.close()

    def _leave(self, timeout_ms: int | None) -> None:
        request = pb.ShareFetchRequest(group=self.group, member_id=self.member_id, member_epoch=-1)
        wait_s = (self._request_timeout_ms if timeout_ms is None else timeout_ms) / 1000
        resp = self._call("ShareFetch", request, time.monotonic() + wait_s)
        if resp.error_code not in (pb.NONE, *_FENCED):
            log.warning("share group %s: leave: %s", self.group, error_for(resp.error_code, resp.error_message))
        with self._lock:
            self._generation += 1
        self.member_epoch = 0

    # -- calls -----------------------------------------------------------------------------------

    def _call(self, method: str, request: Any, deadline: float) -> Any:
        """ShareFetch / ShareAcknowledge at the coordinator, on the record transport when its broker
        advertises a data port (and the metadata cache's transport is "tcp"), else a unary gRPC call."""
        send = None
        if getattr(self._metadata, "transport", "grpc") == "tcp":  # test doubles may lack it
            if not self._data_ports_known:  # the brokers' data ports: a share consumer had no reason to ask
                self._data_ports_known = True
                try:
                    self._metadata.refresh([])
                except LogbrokerError as e:
                    log.debug("share group %s: metadata refresh failed: %s", self.group, e)
            send = self._send_wire
        return self._coordinator.call("broker", method, request, deadline, send)

    def _send_wire(self, address: str, request: Any, timeout_s: float) -> Any:
        method = type(request).__name__.removesuffix("Request")
        if self._metadata.data_address(address) is None:
            return getattr(self._metadata.broker_stub(address), method)(request, timeout=timeout_s)
        if self._streams is None:
            self._streams = self._metadata.client_streams(inline=True)
        path, response_cls = _WIRE_METHODS[method]
        return wait_inline(self._streams.send(path, response_cls, address, request, timeout_s))

    # -- state -----------------------------------------------------------------------------------

    def _take_acks(self) -> list[ShareAck]:
        with self._lock:
            return self._acks.take()

    def _put_back(self, runs: list[ShareAck]) -> None:
        if runs:
            with self._lock:
                self._acks.put_back(runs)

    def _fenced(self, err: BrokerError) -> None:
        """Out of the group: rejoin with epoch 0; what was held and pending is no longer ours."""
        self._log.warning(f"fenced {self.group}", "share group %s: %s (rejoining)", self.group, err)
        with self._lock:
            self._acks.take()
            self._generation += 1
        self.member_epoch = 0

    def _log_ack_failures(self, results: Iterable[pb.ShareAckResult]) -> None:
        failed = refused(results)
        if failed:
            r = failed[0]
            self._log.warning(f"acks {self.group}", "share group %s: %d acknowledgement range(s) refused, e.g. "
                              "%s-%d %d..%d: %s", self.group, len(failed), r.topic, r.partition, r.first_offset,
                              r.last_offset, error_for(r.error_code, r.error_message))

    def _check_open(self) -> None:
        if self._closed:
            raise LogbrokerError("the QueueConsumer is closed")

    def __enter__(self) -> QueueConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
