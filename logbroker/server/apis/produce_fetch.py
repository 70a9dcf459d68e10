"""Produce, Fetch and ListOffsets: the data path of the request layer, over the replica manager.

Each validates the whole request (bounds: `RequestRejected`), then works partition by partition,
turning any `BrokerError` into that partition's ErrorCode. Nothing here decodes a record.

Produce appends on the leader (the replica manager checks acks and leadership, looking the
partition up once); acks=all then waits for all its partitions at once in the produce purgatory.
Fetch reads consumers up to the high watermark and followers (replica_id >= 0, not this broker) up
to the log end offset, recording their progress; the offsets reported are the ones the read
returns. A Fetch with a replica_id >= 0 is an inter-broker call: the caller must have presented
the cluster secret (the record transport carries none, so it serves consumers only). It long-polls
in the fetch purgatory, which appends and high-watermark moves wake.

A Fetch with a `filter` (a consumer's CEL expression, logbroker/group/record_filter.py) reads at
most `filtered_fetch_max_bytes(filter)` (fetch_filter.py), copies the records out of the mmap
and re-encodes each partition's
batches with only the matching records (fetch_filter.py), on one thread of its own (cel-python's
compiled runner keeps per-evaluation state in a module global: one thread evaluates every filter,
and compiles them too); the compiled filters are kept in an LRU of `FILTER_CACHE_SIZE` expressions,
so a subscription compiles once. A bad expression fails every partition with INVALID_FILTER and
the parser's message. A fetch without a filter never takes this path (zero-copy as before).

Only on a miss (this broker hosts no replica) is the cluster metadata asked why
(`PartitionLookup`): UNKNOWN_TOPIC_OR_PARTITION, KAFKA_STORAGE_ERROR or NOT_LEADER_OR_FOLLOWER
naming the leader.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from logbroker.cluster.lineage import misplaced_keys
from logbroker.config import BrokerConfig
from logbroker.errors import (
    BrokerError,
    InvalidFetchSizeError,
    InvalidRequestError,
    InvalidTopicError,
    OffsetNotAvailableError,
    OffsetOutOfRangeError,
    PartitionCountChangedError,
    UnknownTopicOrPartitionError,
)
from logbroker.group.offsets import OFFSETS_TOPIC
from logbroker.server.active_clients import CONSUMERS, PRODUCERS, ActiveClients, seen_by
from logbroker.server.admission import overloaded
from logbroker.server.apis.fetch_encoding import FetchParts, encode_fetch_response, release
from logbroker.server.apis.fetch_filter import filter_records, filtered_fetch_max_bytes
from logbroker.server.request_checks import (
    ServingState,
    as_error,
    check_count,
    check_ready,
    require_cluster_peer,
)
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.storage.record_batch import decode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.group.record_filter import RecordFilter
    from logbroker.replication.partition import Partition
    from logbroker.replication.purgatory import Purgatory
    from logbroker.replication.replica_manager import FetchRead, LeaderAppend
    from logbroker.server.broker_principals import BrokerPrincipals
    from logbroker.server.partition_heat import HeatTracker
    from logbroker.server.request_metrics import RequestMetrics

ProducePartitionKey = tuple[str, int]
FETCH_RESPONSE_OVERHEAD_BYTES = 4096  # room for the results' small fields within max_response_bytes
FILTER_CACHE_SIZE = 256  # compiled filters kept (LRU), by expression


class PartitionLookup(Protocol):
    """The local replica of a partition, or the precise error when there is none (the broker)."""

    def partition(self, topic: str, index: int) -> Partition: ...


class LeaderReplicas(Protocol):
    """What the data path needs of the replica manager (which implements it)."""

    @property
    def partitions(self) -> Mapping[tuple[str, int], Partition]: ...

    @property
    def fetch_purgatory(self) -> Purgatory: ...

    def leader_partition(self, topic: str, partition: int) -> Partition: ...

    def append_records(self, topic: str, partition: int, records: bytes, acks: int) -> LeaderAppend: ...

    async def wait_for_acks(self, topic: str, partition: int, append: LeaderAppend, timeout_ms: int) -> None: ...

    def read(self, topic: str, partition: int, fetch_offset: int, max_bytes: int, *, replica_id: int = -1,
             current_leader_epoch: int = -1, replica_epoch: int = -1) -> FetchRead: ...


class ProduceFetchApis:
    def __init__(self, config: BrokerConfig, state: ServingState, replicas: LeaderReplicas,
                 lookup: PartitionLookup, broker_principals: BrokerPrincipals | None = None,
                 active_clients: ActiveClients | None = None, metrics: RequestMetrics | None = None,
                 heat: HeatTracker | None = None,
                 grown_partition_count: Callable[[str], int] | None = None) -> None:
        """`broker_principals`: on a TLS broker, who may fetch as a replica besides the cluster secret.
        `grown_partition_count`: a topic's partition count if it has grown (0 if not): a grown topic's
        batches are refused when a key in them hashes to another partition (cluster/lineage.py).
        `active_clients`: told each client's topics (server/active_clients.py), for /metrics.
        `metrics`: told each partition's outcome (bytes and records in and out per topic, errors).
        `heat`: told each led partition's appends and consumer reads (server/partition_heat.py)."""
        self._config = config
        self._heat = heat
        self._active_clients = active_clients
        self._metrics = metrics
        self._broker_principals = broker_principals
        self._state = state
        self._replicas = replicas
        self._lookup = lookup
        self._filters: OrderedDict[str, RecordFilter | BrokerError] = OrderedDict()
        self._filter_thread: ThreadPoolExecutor | None = None
        self._grown_partition_count = grown_partition_count

    def _explain(self, exc: BrokerError, topic: str, partition: int) -> BrokerError:
        """A miss in the replica manager, told precisely (the error path only)."""
        if not isinstance(exc, UnknownTopicOrPartitionError):
            return exc
        try:
            self._lookup.partition(topic, partition)
        except BrokerError as precise:
            return precise
        return exc

    # -- produce ---------------------------------------------------------------------------------

    async def produce(self, context: RequestContext, req: pb.ProduceRequest) -> pb.ProduceResponse:
        """Append every partition first, then (acks=all) wait for all of them at once."""
        check_ready(self._state)
        check_count(len(req.partitions), "partitions")
        if self._active_clients is not None:
            seen_by(self._active_clients, PRODUCERS, context, {pp.topic for pp in req.partitions})
        rm = self._replicas
        resp = pb.ProduceResponse()
        acks = req.acks
        waits: list[tuple[pb.ProducePartitionResult, ProducePartitionKey, LeaderAppend]] = []
        for pp in req.partitions:
            r = resp.results.add(topic=pp.topic, partition=pp.partition, base_offset=-1, log_append_time_ms=-1)
            try:
                if pp.topic == OFFSETS_TOPIC:
                    raise InvalidTopicError(f"{OFFSETS_TOPIC} is internal: only the group coordinator writes it")
                if self._grown_partition_count is not None:
                    grown = self._grown_partition_count(pp.topic)
                    if grown > pp.keys_placed_by_partitions:  # placed by an older count, or not declared
                        check_keys_placed(pp.topic, pp.partition, pp.records, grown)
                try:
                    appended = rm.append_records(pp.topic, pp.partition, pp.records, acks)
                except UnknownTopicOrPartitionError as miss:
                    raise self._explain(miss, pp.topic, pp.partition) from None
                result = appended.result
                r.base_offset = result.base_offset
                r.log_start_offset = appended.log_start_offset
                if result.duplicate:
                    r.duplicate = True
                if result.log_append_time_ms >= 0:
                    r.log_append_time_ms = result.log_append_time_ms
                if not result.duplicate:
                    self._count_append(pp, result.record_count)
                if acks == -1:
                    waits.append((r, (pp.topic, pp.partition), appended))
            except Exception as exc:
                err = as_error(exc, "produce")
                r.error_code = err.code
                r.error_message = err.message
                if self._metrics is not None:
                    self._metrics.produce_failed(err.code)
        if waits:
            await self._wait_for_acks(waits, req.timeout_ms)
        return resp

    def _count_append(self, pp: pb.ProducePartition, record_count: int) -> None:
        if self._metrics is not None:
            self._metrics.produced(pp.topic, len(pp.records), record_count)
        if self._heat is not None:
            self._heat.produced(pp.topic, pp.partition, pp.records, record_count)

    async def _wait_for_acks(self, waits: list[tuple[pb.ProducePartitionResult, ProducePartitionKey, LeaderAppend]],
                             timeout_ms: int) -> None:
        rm = self._replicas
        outcomes = await asyncio.gather(
            *(rm.wait_for_acks(key[0], key[1], appended, timeout_ms) for _, key, appended in waits),
            return_exceptions=True,
        )
        for (r, _key, _appended), outcome in zip(waits, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                err = as_error(outcome, "produce")
                r.error_code = err.code  # type: ignore[assignment]
                r.error_message = err.message
                if self._metrics is not None:
                    self._metrics.produce_failed(err.code)
                r.base_offset = -1
                r.log_append_time_ms = -1

    # -- fetch -----------------------------------------------------------------------------------

    def _negative_offset(self, fp: pb.FetchPartition) -> BrokerError:
        part = self._lookup.partition(fp.topic, fp.partition)  # unknown topic or partition first
        return OffsetOutOfRangeError(
            f"fetch offset {fp.fetch_offset} is negative; valid offsets are "
            f"[{part.log.log_start_offset}, {part.high_watermark}]"
        )

    def _fill_offsets(self, r: pb.FetchPartitionResult) -> None:
        """A failed partition's offsets, as this broker's replica has them (the error path only)."""
        part = self._replicas.partitions.get((r.topic, r.partition))
        if part is not None:
            r.high_watermark = part.high_watermark
            r.log_start_offset = part.log.log_start_offset
            r.log_end_offset = part.log.log_end_offset

    def _read_all(self, req: pb.FetchRequest, max_bytes: int, replica_id: int) -> tuple[FetchParts, int, bool]:
        """One pass over the requested partitions.

        Returns ([(result without records, zero-copy view of the records)], bytes gathered, whether
        any partition has an error). The views stay valid until the next await: the caller encodes
        and releases them first (fetch_encoding.py).
        """
        out: FetchParts = []
        total = 0
        errored = False
        rm = self._replicas
        for fp in req.partitions:
            r = pb.FetchPartitionResult(topic=fp.topic, partition=fp.partition, high_watermark=-1,
                                        log_start_offset=-1, log_end_offset=-1)
            view = None
            try:
                if fp.partition_max_bytes < 0:
                    raise InvalidFetchSizeError(f"partition_max_bytes {fp.partition_max_bytes} is negative")
                if fp.fetch_offset < 0:
                    raise self._negative_offset(fp)
                budget = max_bytes - total
                limit = min(fp.partition_max_bytes or max_bytes, max(budget, 1))
                # Always read: it checks leadership and epoch, and records a follower's progress.
                try:
                    fetched = rm.read(fp.topic, fp.partition, fp.fetch_offset, limit, replica_id=replica_id,
                                      current_leader_epoch=fp.current_leader_epoch, replica_epoch=req.replica_epoch)
                except UnknownTopicOrPartitionError as miss:
                    raise self._explain(miss, fp.topic, fp.partition) from None
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
                err = as_error(exc, "fetch")
                r.error_code = err.code  # type: ignore[assignment]
                r.error_message = err.message
                self._fill_offsets(r)
                errored = True
            out.append((r, view))
        return out, total, errored

    def _filter_executor(self) -> ThreadPoolExecutor:
        if self._filter_thread is None:
            self._filter_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fetch-filter")
        return self._filter_thread

    def _compile_cached(self, expression: str) -> RecordFilter | BrokerError:
        """On the filter thread: the compiled filter (or why not), from the LRU or compiled now."""
        found = self._filters.get(expression)
        if found is None:
            # imported here: cel-python takes ~0.5 s to import, paid only by a broker that filters
            from logbroker.group.record_filter import compile_filter

            try:
                found = compile_filter(expression)
            except BrokerError as exc:
                found = exc
            self._filters[expression] = found
            if len(self._filters) > FILTER_CACHE_SIZE:
                self._filters.popitem(last=False)
        else:
            self._filters.move_to_end(expression)
        return found

    def _account(self, results: FetchParts, replica_id: int) -> FetchParts:
        """Tell the metrics each partition's outcome: records out to consumers (not followers), errors."""
        metrics, heat = self._metrics, self._heat
        if metrics is not None or heat is not None:
            for r, view in results:
                if r.error_code:
                    if metrics is not None:
                        metrics.fetch_failed(r.error_code)
                elif view is not None and replica_id < 0:
                    if metrics is not None:
                        metrics.fetched(r.topic, view)
                    if heat is not None:
                        heat.fetched(r.topic, r.partition, view)
        return results

    def _refuse_filter(self, req: pb.FetchRequest, err: BrokerError) -> bytes:
        results: FetchParts = []
        for fp in req.partitions:
            r = pb.FetchPartitionResult(topic=fp.topic, partition=fp.partition, high_watermark=-1,
                                        log_start_offset=-1, log_end_offset=-1)
            r.error_code = err.code  # type: ignore[assignment]
            r.error_message = err.message
            results.append((r, None))
        return encode_fetch_response(self._account(results, -1))

    async def _filtered_response(self, results: FetchParts, record_filter: RecordFilter) -> bytes:
        """Copy the views out (they die at the next await), filter on the filter thread, encode."""
        copies = [(r, bytes(view) if view is not None else None) for r, view in results]
        release(results)

        def run() -> FetchParts:
            return [(r, memoryview(filter_records(data, record_filter, r.topic, r.partition)) if data else None)
                    for r, data in copies]

        filtered = await asyncio.get_running_loop().run_in_executor(self._filter_executor(), run)
        return encode_fetch_response(self._account(filtered, -1))

    async def fetch(self, context: RequestContext, req: pb.FetchRequest) -> bytes:
        """The serialized FetchResponse (records copied once, from the mmap into it)."""
        cfg = self._config
        replica_id = req.replica_id if req.HasField("replica_id") else -1
        if replica_id >= 0:  # a follower's fetch: brokers only
            require_cluster_peer(cfg.cluster_secret, cfg.cluster_mode, context.presented_cluster_secret,
                                 f"Fetch as replica {replica_id}", context.peer)
            if self._broker_principals is not None:
                self._broker_principals.require(context, f"Fetch as replica {replica_id}")
        check_ready(self._state)
        check_count(len(req.partitions), "partitions")
        if replica_id < 0 and self._active_clients is not None:
            seen_by(self._active_clients, CONSUMERS, context, {fp.topic for fp in req.partitions})
        if req.max_bytes < 0 or req.min_bytes < 0 or req.max_wait_ms < 0:
            raise RequestRejected(RequestStatus.INVALID_ARGUMENT,
                                  "max_bytes, min_bytes and max_wait_ms must not be negative")
        max_bytes = min(req.max_bytes or cfg.max_response_bytes, cfg.max_response_bytes - FETCH_RESPONSE_OVERHEAD_BYTES)
        record_filter: RecordFilter | None = None
        if req.filter:  # the only cost an unfiltered fetch pays
            compiled = await asyncio.get_running_loop().run_in_executor(
                self._filter_executor(), self._compile_cached, req.filter)
            if isinstance(compiled, BrokerError):
                return self._refuse_filter(req, compiled)
            record_filter = compiled
            max_bytes = min(max_bytes, filtered_fetch_max_bytes(record_filter))
        min_bytes = max(req.min_bytes, 1)
        wait_ms = min(req.max_wait_ms, cfg.fetch_max_wait_ms_cap)
        deadline = time.monotonic() + wait_ms / 1000
        keys = [(fp.topic, fp.partition) for fp in req.partitions]
        while True:
            results, total, errored = self._read_all(req, max_bytes, replica_id)
            remaining_s = deadline - time.monotonic()
            if total >= min_bytes or errored or remaining_s <= 0 or not self._state.ready:
                break
            release(results)
            if self._replicas.fetch_purgatory.full and replica_id < 0:  # overload: no parking, no busy polls
                raise overloaded(f"broker overloaded: {self._replicas.fetch_purgatory.waiting} fetches waiting",
                                 cfg.overload_retry_after_ms)
            if not await self._replicas.fetch_purgatory.wait(keys, remaining_s):
                results = self._read_all(req, max_bytes, replica_id)[0]
                break
        if record_filter is not None:
            return await self._filtered_response(results, record_filter)
        return encode_fetch_response(self._account(results, replica_id))

    # -- list offsets ----------------------------------------------------------------------------

    async def list_offsets(self, context: RequestContext, req: pb.ListOffsetsRequest) -> pb.ListOffsetsResponse:
        check_ready(self._state)
        check_count(len(req.partitions), "partitions")
        resp = pb.ListOffsetsResponse()
        for lp in req.partitions:
            r = resp.results.add(topic=lp.topic, partition=lp.partition, offset=-1, timestamp=-1, leader_epoch=-1)
            try:
                try:
                    part = self._replicas.leader_partition(lp.topic, lp.partition)
                except UnknownTopicOrPartitionError as miss:
                    raise self._explain(miss, lp.topic, lp.partition) from None
                r.leader_epoch = part.leader_epoch
                if lp.split_partitions > 0:
                    grown = 0 if self._grown_partition_count is None else self._grown_partition_count(lp.topic)
                    r.offset = split_offset(lp.topic, lp.split_partitions, grown, part.log.log_end_offset)
                elif lp.timestamp == -1:
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
                err = as_error(exc, "list_offsets")
                r.error_code = err.code
                r.error_message = err.message
        return resp



def split_offset(topic: str, partitions: int, checked_partitions: int, log_end_offset: int) -> int:
    """A leader's split offset for a topic grown to `partitions` (cluster/lineage.py,
    server/split_point.py): its log end offset, once its produce path checks keys against that count
    (`checked_partitions`, read in the same loop step), so no moved key lands at or after it;
    OFFSET_NOT_AVAILABLE (retriable) before."""
    if checked_partitions < partitions:
        raise OffsetNotAvailableError(
            f"{topic}: this leader does not check keys against {partitions} partitions yet ({checked_partitions})")
    return log_end_offset


def check_keys_placed(topic: str, partition: int, records: bytes, partitions: int) -> None:
    """PARTITION_COUNT_CHANGED when a batch for a grown topic (`partitions` > 0) holds a key that
    hashes to another partition: a producer still partitioning by the old count, whose records of a
    moved key must not land in the old partition after its split offset (cluster/lineage.py). Decodes
    the batches only for topics that grew; an undecodable payload is left to the append's checks."""
    if partitions <= 0:
        return
    try:
        keys = [m.key for h, pos in iter_batches(records) for m in decode_batch(records, pos, h, topic, partition)]
    except BrokerError:
        return
    misplaced = misplaced_keys(keys, partition, partitions)
    if misplaced:
        raise PartitionCountChangedError(
            f"{topic}-{partition}: {misplaced} record(s) have keys that hash to another partition of the "
            f"{partitions} the topic has now; refresh metadata and send them again")
