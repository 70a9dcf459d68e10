"""`logbroker.v1.Broker`: thin handlers over the broker's replica manager.

Each handler validates the whole request (bounds), then works partition by partition, turning any
`BrokerError` into that partition's ErrorCode. Nothing here decodes a record.

Produce appends on the leader (NOT_LEADER_OR_FOLLOWER elsewhere); acks=all then waits for all its
partitions at once in the replica manager's produce purgatory. Fetch reads consumers up to the high
watermark and followers (replica_id >= 0, not this broker) up to the log end offset, recording
their progress. A Fetch with a replica_id >= 0 is an inter-broker call: it must carry the cluster
secret (`rpc.require_peer`), so the record transport, which carries none, serves consumers only. It long-polls in the fetch purgatory, which appends and high-watermark moves wake.

ProduceStream and FetchStream run the same two handlers per stream message (rpc.stream_method):
responses in request order, a refused request ends the stream with the unary call's status. So does
the record transport (logbroker/wire.py, server/wire_server.py), where a refused request gets its
status and the connection goes on; `context` is None there (neither handler uses it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import Message

from logbroker import wire
from logbroker.cluster.metadata import validate_topic_name
from logbroker.errors import (
    BrokerError,
    InvalidFetchSizeError,
    InvalidRequestError,
    InvalidRequiredAcksError,
    InvalidTopicError,
    OffsetOutOfRangeError,
    UnknownServerError,
)
from logbroker.group.offsets import OFFSETS_TOPIC
from logbroker.replication.replica_manager import LeaderAppend
from logbroker.server import rpc
from logbroker.server.wire_server import Handler
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger(__name__)

PARTITIONS_PER_REQUEST_MAX = 10_000
ProducePartitionKey = tuple[str, int]


def _as_error(exc: Exception, what: str) -> BrokerError:
    if isinstance(exc, BrokerError):
        return exc
    log.exception("unexpected error in %s", what)
    return UnknownServerError(f"{type(exc).__name__}: {exc}")


def _check_ready(broker: Broker) -> None:
    if not broker.ready:
        raise rpc.RequestRejected(grpc.StatusCode.UNAVAILABLE, "broker is recovering its logs, not serving yet")


def _check_count(n: int, what: str) -> None:
    if n > PARTITIONS_PER_REQUEST_MAX:
        raise rpc.RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"{n} {what} in one request; the limit is {PARTITIONS_PER_REQUEST_MAX}"
        )


class BrokerService:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def produce(self, req: pb.ProduceRequest, context: grpc.aio.ServicerContext | None) -> pb.ProduceResponse:
        """Append every partition first, then (acks=all) wait for all of them at once."""
        broker = self.broker
        _check_ready(broker)
        _check_count(len(req.partitions), "partitions")
        rm = broker.replica_manager
        resp = pb.ProduceResponse()
        acks_ok = req.acks in (-1, 0, 1)
        waits: list[tuple[pb.ProducePartitionResult, ProducePartitionKey, LeaderAppend]] = []
        for pp in req.partitions:
            r = resp.results.add(topic=pp.topic, partition=pp.partition, base_offset=-1, log_append_time_ms=-1)
            try:
                if not acks_ok:
                    raise InvalidRequiredAcksError(f"acks must be -1 (all), 0 or 1, got {req.acks}")
                if pp.topic == OFFSETS_TOPIC:
                    raise InvalidTopicError(f"{OFFSETS_TOPIC} is internal: only the group coordinator writes it")
                broker.partition(pp.topic, pp.partition)  # unknown topic or partition, with a clear message
                appended = rm.append_records(pp.topic, pp.partition, pp.records, req.acks)
                result = appended.result
                r.base_offset = result.base_offset
                r.log_start_offset = appended.log_start_offset
                if result.log_append_time_ms >= 0:
                    r.log_append_time_ms = result.log_append_time_ms
                if req.acks == -1:
                    waits.append((r, (pp.topic, pp.partition), appended))
            except Exception as exc:
                err = _as_error(exc, "produce")
                r.error_code = err.code
                r.error_message = err.message
        if waits:
            outcomes = await asyncio.gather(
                *(rm.wait_for_acks(key[0], key[1], appended, req.timeout_ms) for _, key, appended in waits),
                return_exceptions=True,
            )
            for (r, _key, _appended), outcome in zip(waits, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    if not isinstance(outcome, Exception):
                        raise outcome
                    err = _as_error(outcome, "produce")
                    r.error_code = err.code  # type: ignore[assignment]
                    r.error_message = err.message
                    r.base_offset = -1
                    r.log_append_time_ms = -1
        return resp

    def _read_all(self, req: pb.FetchRequest, max_bytes: int) -> tuple[list[tuple[pb.FetchPartitionResult, memoryview | None]], int, bool]:
        """One pass over the requested partitions.

        Returns ([(result without records, zero-copy view of the records)], bytes gathered, whether
        any partition has an error). The views stay valid until the next await: the caller encodes
        and releases them first (see `_encode_fetch_response`).
        """
        out: list[tuple[pb.FetchPartitionResult, memoryview | None]] = []
        total = 0
        errored = False
        broker = self.broker
        rm = broker.replica_manager
        for fp in req.partitions:
            r = pb.FetchPartitionResult(topic=fp.topic, partition=fp.partition, high_watermark=-1,
                                        log_start_offset=-1, log_end_offset=-1)
            view = None
            try:
                if fp.partition_max_bytes < 0:
                    raise InvalidFetchSizeError(f"partition_max_bytes {fp.partition_max_bytes} is negative")
                part = broker.partition(fp.topic, fp.partition)
                plog = part.log
                r.high_watermark = part.high_watermark
                r.log_start_offset = plog.log_start_offset
                r.log_end_offset = plog.log_end_offset
                if fp.fetch_offset < 0:
                    raise OffsetOutOfRangeError(
                        f"fetch offset {fp.fetch_offset} is negative; valid offsets are "
                        f"[{plog.log_start_offset}, {part.high_watermark}]"
                    )
                budget = max_bytes - total
                limit = min(fp.partition_max_bytes or max_bytes, max(budget, 1))
                # Always read: it checks leadership and epoch, and records a follower's progress.
                fetched = rm.read(fp.topic, fp.partition, fp.fetch_offset, limit, replica_id=req.replica_id if req.HasField("replica_id") else -1,
                                  current_leader_epoch=fp.current_leader_epoch, replica_epoch=req.replica_epoch)
                r.high_watermark = fetched.high_watermark
                r.log_start_offset = fetched.log_start_offset
                r.log_end_offset = fetched.log_end_offset
                if len(fetched.records) and (budget > 0 or total == 0):
                    view = fetched.records
                    total += len(view)
                elif len(fetched.records):
                    fetched.records.release()  # over the response budget: left for the next fetch
                # (an empty view may be shared: never release it)
            except Exception as exc:
                err = _as_error(exc, "fetch")
                r.error_code = err.code  # type: ignore[assignment]
                r.error_message = err.message
                errored = True
            out.append((r, view))
        return out, total, errored

    async def fetch(self, req: pb.FetchRequest, context: grpc.aio.ServicerContext | None) -> bytes:
        broker = self.broker
        if req.HasField("replica_id") and req.replica_id >= 0:  # a follower's fetch: brokers only
            rpc.require_peer(broker.config.cluster_secret, broker.config.cluster_mode, context,
                             f"Fetch as replica {req.replica_id}")
        _check_ready(broker)
        _check_count(len(req.partitions), "partitions")
        cfg = broker.config
        if req.max_bytes < 0 or req.min_bytes < 0 or req.max_wait_ms < 0:
            raise rpc.RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, "max_bytes, min_bytes and max_wait_ms must not be negative")
        max_bytes = min(req.max_bytes or cfg.max_response_bytes, cfg.max_response_bytes - 4096)
        min_bytes = max(req.min_bytes, 1)
        wait_ms = min(req.max_wait_ms, cfg.fetch_max_wait_ms_cap)
        deadline = time.monotonic() + wait_ms / 1000
        keys = [(fp.topic, fp.partition) for fp in req.partitions]
        while True:
            results, total, errored = self._read_all(req, max_bytes)
            remaining_s = deadline - time.monotonic()
            if total >= min_bytes or errored or remaining_s <= 0 or not broker.ready:
                return _encode_fetch_response(results)
            _release(results)
            if not await broker.replica_manager.fetch_purgatory.wait(keys, remaining_s):
                return _encode_fetch_response(self._read_all(req, max_bytes)[0])

    async def list_offsets(self, req: pb.ListOffsetsRequest, context: grpc.aio.ServicerContext) -> pb.ListOffsetsResponse:
        broker = self.broker
        _check_ready(broker)
        _check_count(len(req.partitions), "partitions")
        resp = pb.ListOffsetsResponse()
        for lp in req.partitions:
            r = resp.results.add(topic=lp.topic, partition=lp.partition, offset=-1, timestamp=-1, leader_epoch=-1)
            try:
                broker.partition(lp.topic, lp.partition)  # unknown topic or partition, with a clear message
                part = broker.replica_manager.leader_partition(lp.topic, lp.partition)
                r.leader_epoch = part.leader_epoch
                if lp.timestamp == -1:
                    r.offset = part.high_watermark
                elif lp.timestamp == -2:
                    r.offset = part.log.log_start_offset
                elif lp.timestamp >= 0:
                    found = part.log.offset_for_timestamp(lp.timestamp)
                    if found is not None and found[0] < part.high_watermark:
                        r.offset, r.timestamp = found
                else:
                    raise InvalidRequestError(f"timestamp {lp.timestamp}: use -1 (latest), -2 (earliest) or a time in ms")
            except Exception as exc:
                err = _as_error(exc, "list_offsets")
                r.error_code = err.code
                r.error_message = err.message
        return resp

    async def metadata(self, req: pb.MetadataRequest, context: grpc.aio.ServicerContext) -> pb.MetadataResponse:
        broker = self.broker
        _check_ready(broker)
        broker.check_metadata_ready()
        _check_count(len(req.topics), "topics")
        brokers, controller_id, _ = broker.cluster_brokers()
        resp = pb.MetadataResponse(cluster_id=broker.store.cluster_id, controller_id=controller_id, brokers=brokers)
        for name in list(req.topics) or broker.topic_names():
            t = resp.topics.add(name=name)
            try:
                validate_topic_name(name)
                states = broker.topic_partitions(name)
                if states is None:
                    t.error_code = pb.UNKNOWN_TOPIC_OR_PARTITION
                    t.error_message = f"unknown topic {name!r}"
                    continue
                for p, st in sorted(states.items()):
                    t.partitions.add(partition=p, leader=st.leader, leader_epoch=st.leader_epoch,
                                     replicas=st.replicas, isr=st.isr,
                                     error_code=pb.NONE if st.leader >= 0 else pb.LEADER_NOT_AVAILABLE)
            except BrokerError as err:
                t.error_code = err.code
                t.error_message = err.message
        return resp

    async def offset_commit(self, req: pb.OffsetCommitRequest, context: grpc.aio.ServicerContext) -> pb.OffsetCommitResponse:
        _check_ready(self.broker)
        _check_count(len(req.partitions), "partitions")
        return await self.broker.coordinator.commit(req)

    async def offset_fetch(self, req: pb.OffsetFetchRequest, context: grpc.aio.ServicerContext) -> pb.OffsetFetchResponse:
        _check_ready(self.broker)
        _check_count(len(req.partitions), "partitions")
        return self.broker.coordinator.fetch(req)

    async def find_coordinator(self, req: pb.FindCoordinatorRequest,
                               context: grpc.aio.ServicerContext) -> pb.FindCoordinatorResponse:
        _check_ready(self.broker)
        resp = pb.FindCoordinatorResponse(broker_id=-1)
        try:
            b = await self.broker.coordinator.find_coordinator(req.group)
            resp.broker_id, resp.host, resp.port = b.broker_id, b.host, b.port
        except Exception as exc:
            err = _as_error(exc, "find_coordinator")
            resp.error_code = err.code  # type: ignore[assignment]
            resp.error_message = err.message
        return resp

    async def consumer_group_heartbeat(self, req: pb.ConsumerGroupHeartbeatRequest,
                                       context: grpc.aio.ServicerContext) -> pb.ConsumerGroupHeartbeatResponse:
        _check_ready(self.broker)
        return await self.broker.coordinator.heartbeat(req)


# FetchResponse is encoded by hand around the record bytes so they are copied once, straight from
# the mmap into the response: `results` (field 1) is a length-delimited FetchPartitionResult whose
# `records` (field 8, bytes) we append after the small fields protobuf serializes for us.
_RESULTS_TAG = b"\x0a"  # field 1, wire type 2
_RECORDS_TAG = b"\x42"  # field 8, wire type 2


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _release(results: list[tuple[pb.FetchPartitionResult, memoryview | None]]) -> None:
    for _, view in results:
        if view is not None:
            view.release()


def _encode_fetch_response(results: list[tuple[pb.FetchPartitionResult, memoryview | None]]) -> bytes:
    parts: list[bytes | memoryview] = []
    for r, view in results:
        head = r.SerializeToString()
        if view is not None and len(view):
            rec_prefix = _RECORDS_TAG + _uvarint(len(view))
            inner_len = len(head) + len(rec_prefix) + len(view)
            parts += (_RESULTS_TAG, _uvarint(inner_len), head, rec_prefix, view)
        else:
            parts += (_RESULTS_TAG, _uvarint(len(head)), head)
    try:
        return b"".join(parts)
    finally:
        _release(results)


def wire_handlers(broker: Broker) -> dict[int, tuple[type[Message], Handler]]:
    """The record transport's APIs (logbroker/wire.py): the same handlers as Produce and Fetch."""
    svc = BrokerService(broker)
    return {wire.API_PRODUCE: (pb.ProduceRequest, svc.produce), wire.API_FETCH: (pb.FetchRequest, svc.fetch)}


def handler(broker: Broker) -> grpc.GenericRpcHandler:
    svc = BrokerService(broker)
    return rpc.service(
        "logbroker.v1.Broker",
        {
            "Produce": rpc.method(pb.ProduceRequest, svc.produce),
            "Fetch": rpc.method(pb.FetchRequest, svc.fetch),
            "ProduceStream": rpc.stream_method(pb.ProduceRequest, svc.produce, rpc.PRODUCE_STREAM_PIPELINE_MAX,
                                               broker.open_streams),
            "FetchStream": rpc.stream_method(pb.FetchRequest, svc.fetch, rpc.FETCH_STREAM_PIPELINE_MAX,
                                             broker.open_streams),
            "ListOffsets": rpc.method(pb.ListOffsetsRequest, svc.list_offsets),
            "Metadata": rpc.method(pb.MetadataRequest, svc.metadata),
            "OffsetCommit": rpc.method(pb.OffsetCommitRequest, svc.offset_commit),
            "OffsetFetch": rpc.method(pb.OffsetFetchRequest, svc.offset_fetch),
            "FindCoordinator": rpc.method(pb.FindCoordinatorRequest, svc.find_coordinator),
            "ConsumerGroupHeartbeat": rpc.method(pb.ConsumerGroupHeartbeatRequest, svc.consumer_group_heartbeat),
        },
    )
