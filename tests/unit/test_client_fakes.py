"""In-memory stand-ins for the broker, used by the client unit tests (no sockets).

`FakeMetadata` is a MetadataCache whose Metadata answers come from a dict and whose broker stubs
are `FakeBroker`s: Produce appends the batches to per-partition lists and assigns offsets, Fetch
returns them, and a script of errors can be queued per (topic, partition).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from logbroker.client.metadata_cache import MetadataCache
from logbroker.client.streams import StreamError
from logbroker.cluster.lineage import misplaced_keys
from logbroker.storage import record_batch as rb
from logbroker.storage.producer_state import ProducerStateMap, Verdict
from logbroker.v1 import logbroker_pb2 as pb


class DoneFuture:
    """A finished grpc-future look-alike."""

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value = value
        self._error = error

    def result(self, timeout: float | None = None) -> Any:
        if self._error is not None:
            raise self._error
        return self._value

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        fn(self)


class PendingFuture(DoneFuture):
    """A grpc-future look-alike completed later by the test with `finish()`."""

    def __init__(self) -> None:
        super().__init__()
        self._done = False
        self._callbacks: list[Callable[[Any], object]] = []
        self._event = threading.Event()

    def done(self) -> bool:
        return self._done

    def result(self, timeout: float | None = None) -> Any:
        self._event.wait(timeout)
        return super().result()

    def add_done_callback(self, fn: Callable[[Any], object]) -> None:
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def finish(self, value: Any = None, error: BaseException | None = None) -> None:
        self._value, self._error, self._done = value, error, True
        self._event.set()
        for fn in self._callbacks:
            fn(self)


class FakeRpcError(StreamError):
    """A gRPC failure as a fake broker raises it (the clients' own StreamError, with details optional)."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(code, details)


class _Method:
    def __init__(self, fn: Callable[[Any], Any], broker: FakeBroker) -> None:
        self._fn = fn
        self._broker = broker

    def __call__(self, request: Any, timeout: float | None = None) -> Any:
        return self._fn(request)

    def future(self, request: Any, timeout: float | None = None) -> Any:
        self._broker.requests.append(request)
        if self._broker.hold:
            fut = PendingFuture()
            self._broker.held.append((fut, request))
            return fut
        if self._broker.call_errors:
            return DoneFuture(error=self._broker.call_errors.popleft())
        try:
            return DoneFuture(self._fn(request))
        except grpc.RpcError as e:
            return DoneFuture(error=e)


class FakeBroker:
    """Partition logs as lists of (base_offset, batch bytes); errors scripted per partition."""

    def __init__(self) -> None:
        self.logs: dict[tuple[str, int], list[tuple[int, bytes]]] = {}
        self.next_offset: dict[tuple[str, int], int] = {}
        self.errors: dict[tuple[str, int], deque[int]] = {}
        self.call_errors: deque[BaseException] = deque()
        self.requests: list[Any] = []
        self.hold = False  # keep Produce futures pending until release()
        self.held: list[tuple[PendingFuture, Any]] = []
        self.log_start: dict[tuple[str, int], int] = {}
        self.committed: dict[tuple[str, str, int], int] = {}
        self.Produce = _Method(self._produce, self)
        self.Fetch = _Method(self._fetch, self)
        self.ListOffsets = _Method(self._list_offsets, self)
        self.OffsetCommit = _Method(self._offset_commit, self)
        self.OffsetFetch = _Method(self._offset_fetch, self)
        self.InitProducerId = _Method(self._init_producer_id, self)
        self.producer_ids = 0
        self.producers: dict[tuple[str, int], ProducerStateMap] = {}  # dedup as a real leader does
        self.lose_answers = 0  # append the next N produces, then answer UNAVAILABLE (the answer was lost)
        self.grown: dict[str, int] = {}  # topic -> count: refuse misplaced keys as a grown topic's leader

    def _init_producer_id(self, request: pb.InitProducerIdRequest) -> pb.InitProducerIdResponse:
        self.producer_ids += 1
        return pb.InitProducerIdResponse(producer_id=1000 + self.producer_ids, producer_epoch=0)

    def release(self) -> None:
        held, self.held = self.held, []
        for fut, request in held:
            try:
                fut.finish(self._produce(request))
            except grpc.RpcError as e:
                fut.finish(error=e)

    def _produce(self, request: pb.ProduceRequest) -> pb.ProduceResponse:
        out = self._produce_answer(request)
        if self.lose_answers > 0:
            self.lose_answers -= 1
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "answer lost")
        return out

    def _duplicate(self, tp: tuple[str, int], records: bytes) -> pb.ProducePartitionResult | None:
        """The answer to a resent or out-of-sequence idempotent batch (its first batch checked), else None."""
        h = rb.parse_header(records)
        if h.producer_id < 0:
            return None
        state = self.producers.setdefault(tp, ProducerStateMap())
        check = state.check(h.producer_id, h.producer_epoch, h.base_sequence, h.record_count)
        if check.verdict is Verdict.OUT_OF_ORDER:
            return pb.ProducePartitionResult(topic=tp[0], partition=tp[1], base_offset=-1,
                                             error_code=pb.OUT_OF_ORDER_SEQUENCE_NUMBER, error_message=check.message)
        if check.verdict is Verdict.DUPLICATE:
            if h.size_bytes < len(records):  # several batches: as storage/log.py, resend them one by one
                return pb.ProducePartitionResult(topic=tp[0], partition=tp[1], base_offset=-1,
                                                 error_code=pb.DUPLICATE_SEQUENCE_NUMBER)
            return pb.ProducePartitionResult(topic=tp[0], partition=tp[1], base_offset=check.first_offset,
                                             duplicate=True, log_append_time_ms=-1)
        return None

    def _produce_answer(self, request: pb.ProduceRequest) -> pb.ProduceResponse:
        out = pb.ProduceResponse()
        for p in request.partitions:
            tp = (p.topic, p.partition)
            script = self.errors.get(tp)
            if script:
                out.results.add(topic=p.topic, partition=p.partition, error_code=script.popleft(), base_offset=-1)
                continue
            if self._misplaced(p):
                out.results.add(topic=p.topic, partition=p.partition, error_code=pb.PARTITION_COUNT_CHANGED,
                                base_offset=-1, error_message="a key hashes to another partition now")
                continue
            duplicate = self._duplicate(tp, p.records)
            if duplicate is not None:
                out.results.append(duplicate)
                continue
            base = self.next_offset.get(tp, 0)
            offset = base
            for info in rb.validate_batches(p.records, 1 << 30):
                batch = bytearray(p.records[info.position : info.position + info.size_bytes])
                rb.set_base_offset(batch, 0, offset)
                if info.producer_id >= 0:
                    self.producers.setdefault(tp, ProducerStateMap()).record(
                        info.producer_id, info.producer_epoch, info.base_sequence, info.record_count, offset,
                        offset + info.record_count - 1, 0)
                self.logs.setdefault(tp, []).append((offset, bytes(batch)))
                offset += info.record_count
            self.next_offset[tp] = offset
            out.results.add(topic=p.topic, partition=p.partition, base_offset=base, log_append_time_ms=-1)
        return out

    def _misplaced(self, p: pb.ProducePartition) -> bool:
        """As server/apis/produce_fetch.check_keys_placed, before any sequence check."""
        n = self.grown.get(p.topic)
        if n is None or p.keys_placed_by_partitions >= n:  # placed by the current count: trusted
            return False
        keys = [m.key for h, pos in rb.iter_batches(p.records)
                for m in rb.decode_batch(p.records, pos, h, p.topic, p.partition)]
        return misplaced_keys(keys, p.partition, n) > 0

    def _list_offsets(self, request: pb.ListOffsetsRequest) -> pb.ListOffsetsResponse:
        out = pb.ListOffsetsResponse()
        for p in request.partitions:
            tp = (p.topic, p.partition)
            offset = self.log_start.get(tp, 0) if p.timestamp == -2 else self.next_offset.get(tp, 0)
            out.results.add(topic=p.topic, partition=p.partition, offset=offset)
        return out

    def _offset_commit(self, request: pb.OffsetCommitRequest) -> pb.OffsetCommitResponse:
        out = pb.OffsetCommitResponse()
        for p in request.partitions:
            self.committed[(request.group, p.topic, p.partition)] = p.offset
            out.results.add(topic=p.topic, partition=p.partition)
        return out

    def _offset_fetch(self, request: pb.OffsetFetchRequest) -> pb.OffsetFetchResponse:
        out = pb.OffsetFetchResponse()
        for p in request.partitions:
            off = self.committed.get((request.group, p.topic, p.partition), -1)
            out.results.add(topic=p.topic, partition=p.partition, offset=off)
        return out

    def _fetch(self, request: pb.FetchRequest) -> pb.FetchResponse:
        out = pb.FetchResponse()
        for p in request.partitions:
            tp = (p.topic, p.partition)
            hw = self.next_offset.get(tp, 0)
            script = self.errors.get(tp)
            if script:
                out.results.add(topic=p.topic, partition=p.partition, error_code=script.popleft())
                continue
            if not self.log_start.get(tp, 0) <= p.fetch_offset <= hw:
                out.results.add(topic=p.topic, partition=p.partition, error_code=pb.OFFSET_OUT_OF_RANGE)
                continue
            chunks = []
            size = 0
            for _base, data in self.logs.get(tp, []):
                last = rb.parse_header(data).last_offset
                if last < p.fetch_offset:
                    continue
                if chunks and size + len(data) > p.partition_max_bytes:
                    break
                chunks.append(data)
                size += len(data)
            out.results.add(topic=p.topic, partition=p.partition, high_watermark=hw, log_end_offset=hw,
                            records=b"".join(chunks))
        if not any(r.records or r.error_code for r in out.results):
            time.sleep(min(request.max_wait_ms, 10) / 1000)  # a (short) long-poll
        return out


class FakeAdmin:
    """The Admin service over a FakeMetadata's topic table."""

    def __init__(self, metadata: FakeMetadata) -> None:
        self.md = metadata
        self.configs: dict[str, dict[str, str]] = {}

    def CreateTopics(self, request: pb.CreateTopicsRequest, timeout: float | None = None) -> Any:
        out = pb.CreateTopicsResponse()
        for t in request.topics:
            if t.name in self.md.topic_partitions:
                out.results.add(name=t.name, error_code=pb.TOPIC_ALREADY_EXISTS, error_message=f"{t.name} exists")
            elif not t.name or "/" in t.name:
                out.results.add(name=t.name, error_code=pb.INVALID_TOPIC, error_message="bad name")
            else:
                self.md.topic_partitions[t.name] = t.partitions
                self.configs[t.name] = dict(t.config)
                out.results.add(name=t.name)
        return out

    def DeleteTopics(self, request: pb.DeleteTopicsRequest, timeout: float | None = None) -> Any:
        out = pb.DeleteTopicsResponse()
        for n in request.names:
            if self.md.topic_partitions.pop(n, None) is None:
                out.results.add(name=n, error_code=pb.UNKNOWN_TOPIC_OR_PARTITION)
            else:
                out.results.add(name=n)
        return out

    def CreatePartitions(self, request: pb.CreatePartitionsRequest, timeout: float | None = None) -> Any:
        n = self.md.topic_partitions.get(request.name)
        if n is None:
            return pb.CreatePartitionsResponse(result=pb.TopicResult(
                name=request.name, error_code=pb.UNKNOWN_TOPIC_OR_PARTITION))
        if request.total <= n:
            return pb.CreatePartitionsResponse(result=pb.TopicResult(
                name=request.name, error_code=pb.INVALID_PARTITIONS, error_message="must grow"))
        self.md.topic_partitions[request.name] = request.total
        return pb.CreatePartitionsResponse(result=pb.TopicResult(name=request.name))

    def DescribeTopics(self, request: pb.DescribeTopicsRequest, timeout: float | None = None) -> Any:
        out = pb.DescribeTopicsResponse()
        for n in request.names or list(self.md.topic_partitions):
            parts = self.md.topic_partitions.get(n)
            if parts is None:
                out.topics.add(name=n, error_code=pb.UNKNOWN_TOPIC_OR_PARTITION, error_message=f"no topic {n}")
                continue
            d = out.topics.add(name=n, config=self.configs.get(n, {}))
            for p in reversed(range(parts)):
                hw = self.md.broker.next_offset.get((n, p), 0)
                d.partitions.add(partition=p, leader=0, replicas=[0], isr=[0], log_end_offset=hw,
                                 high_watermark=hw, size_bytes=10 * hw)
        return out


class FakeMetadata(MetadataCache):
    """A MetadataCache over fixed topics; every broker id maps to its own FakeBroker."""

    def __init__(self, topics: dict[str, int], leaders: dict[tuple[str, int], int] | None = None,
                 brokers: int = 1) -> None:
        super().__init__("fake:9092", retries=0, streams=False)  # the fakes answer unary calls
        self.topic_partitions = dict(topics)
        self.leaders = dict(leaders or {})
        self.fakes = {f"broker{i}:9092": FakeBroker() for i in range(brokers)}
        self.refreshes: list[list[str] | None] = []
        self.refresh()

    @property
    def broker(self) -> FakeBroker:
        return self.fakes["broker0:9092"]

    def response(self) -> pb.MetadataResponse:
        resp = pb.MetadataResponse(cluster_id="fake", controller_id=0)
        for i in range(len(self.fakes)):
            resp.brokers.add(broker_id=i, host=f"broker{i}", port=9092)
        for name, n in self.topic_partitions.items():
            t = resp.topics.add(name=name)
            for p in range(n):
                leader = self.leaders.get((name, p), 0)
                t.partitions.add(partition=p, leader=leader, leader_epoch=0, replicas=[max(leader, 0)])
        return resp

    def refresh(self, topics: Any = None, retry: bool = True) -> pb.MetadataResponse:
        wanted = None if topics is None else list(topics)
        self.refreshes.append(wanted)
        resp = self.response()
        self.apply(resp, wanted)
        return resp

    def broker_stub(self, address: str) -> Any:
        return self.fakes[address]

    def admin_stub(self, address: str) -> Any:
        if not hasattr(self, "_admin"):
            self._admin = FakeAdmin(self)
        return self._admin
