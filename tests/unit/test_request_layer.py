"""The request layer (logbroker/server/apis/) driven directly, without sockets: produce, fetch and
list offsets on a standalone ReplicaManager, their per-partition error codes, and how a refused
call maps to each listener's status (gRPC and the record transport's status byte)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from logbroker import wire
from logbroker.clock import ManualClock
from logbroker.config import BrokerConfig
from logbroker.errors import UnknownTopicOrPartitionError
from logbroker.group.offsets import OFFSETS_TOPIC
from logbroker.replication.partition import Partition
from logbroker.replication.replica_manager import InMemoryIsrStore, ReplicaManager
from logbroker.server import request_checks, rpc, wire_server
from logbroker.server.apis.broker_apis import FETCH, PRODUCE, BrokerApis, RequestHook
from logbroker.server.apis.produce_fetch import ProduceFetchApis
from logbroker.server.metrics import BrokerCollector
from logbroker.server.request_context import (
    LISTENER_RECORD,
    RequestContext,
    RequestRejected,
    RequestStatus,
)
from logbroker.storage.log import LogConfig
from logbroker.storage.log_manager import LogManager
from logbroker.storage.record_batch import encode_batch
from logbroker.v1 import logbroker_pb2 as pb

CTX = RequestContext()


class State:
    ready = True


class Lookup:
    """The broker's precise answer for a partition it does not host; counts the calls."""

    def __init__(self, rm: ReplicaManager) -> None:
        self.rm = rm
        self.calls = 0

    def partition(self, topic: str, index: int) -> Partition:
        self.calls += 1
        part = self.rm.partitions.get((topic, index))
        if part is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {topic!r}")
        return part


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.log_manager = LogManager(tmp / "b0", LogConfig(segment_bytes=1 << 16, index_map_bytes=4 << 20))
        self.rm = ReplicaManager(0, self.log_manager, InMemoryIsrStore(), ManualClock())
        self.rm.make_local_leader("t", 0)
        self.state = State()
        self.lookup = Lookup(self.rm)
        self.data = ProduceFetchApis(BrokerConfig(data_dir=tmp / "b0"), self.state, self.rm, self.lookup)
        self.apis = BrokerApis(self.data)


@pytest.fixture
def setup(tmp_path: Path):
    s = Setup(tmp_path)
    yield s
    s.log_manager.close_all()


def batch(n: int = 2) -> bytes:
    return encode_batch([(1000 + i, None, b"v%d" % i, None) for i in range(n)])


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def produce(s: Setup, *parts: tuple[str, int], acks: int = 1) -> pb.ProduceResponse:
    req = pb.ProduceRequest(acks=acks, partitions=[pb.ProducePartition(topic=t, partition=p, records=batch())
                                                   for t, p in parts])
    return run(s.apis.handle(PRODUCE, CTX, req))


def fetch(s: Setup, offset: int, context: RequestContext = CTX, **kw: Any) -> pb.FetchResponse:
    req = pb.FetchRequest(partitions=[pb.FetchPartition(topic="t", partition=0, fetch_offset=offset,
                                                        partition_max_bytes=1 << 20)], **kw)
    return pb.FetchResponse.FromString(run(s.apis.handle(FETCH, context, req)))


def test_produce_answers_per_partition_and_looks_up_only_on_a_miss(setup: Setup):
    resp = produce(setup, ("t", 0), ("nope", 0), (OFFSETS_TOPIC, 0), ("t", 0))
    codes = [r.error_code for r in resp.results]
    assert codes == [pb.NONE, pb.UNKNOWN_TOPIC_OR_PARTITION, pb.INVALID_TOPIC, pb.NONE]
    assert [r.base_offset for r in resp.results] == [0, -1, -1, 2]
    assert resp.results[1].error_message == "unknown topic 'nope'"  # the broker's precise word
    assert setup.lookup.calls == 1  # the hosted partitions were looked up once, by the replica manager


def test_produce_with_bad_acks_fails_every_partition(setup: Setup):
    resp = produce(setup, ("t", 0), ("t", 0), acks=2)
    assert [r.error_code for r in resp.results] == [pb.INVALID_REQUIRED_ACKS] * 2
    assert setup.rm.partitions[("t", 0)].log.log_end_offset == 0


def test_fetch_reports_the_offsets_of_its_read(setup: Setup):
    produce(setup, ("t", 0))
    r = fetch(setup, 0).results[0]
    assert (r.error_code, r.high_watermark, r.log_start_offset, r.log_end_offset) == (pb.NONE, 2, 0, 2)
    assert len(r.records) > 0
    assert setup.lookup.calls == 0


def test_a_negative_fetch_offset_is_out_of_range_with_the_offsets(setup: Setup):
    produce(setup, ("t", 0))
    r = fetch(setup, -1).results[0]
    assert r.error_code == pb.OFFSET_OUT_OF_RANGE
    assert "valid offsets are [0, 2]" in r.error_message
    assert (r.high_watermark, r.log_start_offset, r.log_end_offset) == (2, 0, 2)


def test_list_offsets(setup: Setup):
    produce(setup, ("t", 0))
    req = pb.ListOffsetsRequest(partitions=[pb.ListOffsetsPartition(topic="t", partition=0, timestamp=-1),
                                            pb.ListOffsetsPartition(topic="x", partition=0, timestamp=-1)])
    resp = run(setup.apis.handle("ListOffsets", CTX, req))
    assert [(r.error_code, r.offset) for r in resp.results] == [(pb.NONE, 2), (pb.UNKNOWN_TOPIC_OR_PARTITION, -1)]


def test_whole_call_refusals(setup: Setup):
    with pytest.raises(RequestRejected) as info:
        fetch(setup, 0, replica_id=1)  # an inter-broker fetch without the cluster secret
    assert info.value.status is RequestStatus.PERMISSION_DENIED  # standalone: no inter-broker calls at all
    with pytest.raises(RequestRejected) as info:
        fetch(setup, 0, max_wait_ms=-1)
    assert info.value.status is RequestStatus.INVALID_ARGUMENT
    setup.state.ready = False
    with pytest.raises(RequestRejected) as info:
        produce(setup, ("t", 0))
    assert info.value.status is RequestStatus.UNAVAILABLE
    with pytest.raises(RequestRejected) as info:
        setup.apis.handle("Metadata", CTX, pb.MetadataRequest())  # not wired in this data-path-only layer
    assert info.value.status is RequestStatus.UNIMPLEMENTED


def test_every_request_passes_the_hook_once(setup: Setup):
    seen: list[tuple[str, str]] = []

    class Refuse(RequestHook):
        def on_request(self, api: str, context: RequestContext, request: Any) -> None:
            seen.append((api, context.listener))
            if api == FETCH:
                raise RequestRejected(RequestStatus.PERMISSION_DENIED, "no fetching")

    setup.apis.hook = Refuse()
    produce(setup, ("t", 0))
    with pytest.raises(RequestRejected):
        fetch(setup, 0, context=RequestContext(listener=LISTENER_RECORD))
    assert seen == [(PRODUCE, "grpc"), (FETCH, LISTENER_RECORD)]


@pytest.mark.parametrize("status", list(RequestStatus))
def test_a_refusal_maps_to_the_same_status_on_both_listeners(status: RequestStatus):
    code = rpc.grpc_status(status)
    assert isinstance(code, grpc.StatusCode) and code.name == status.name
    frame = wire_server._rejected_frame(7, RequestRejected(status, "why"))
    size, corr, number = wire.RESPONSE_HEADER.unpack_from(frame)
    assert (corr, number, frame[wire.HEADER_BYTES:]) == (7, status.value, b"why")
    assert wire.status_code(number) is code  # what a record-transport client raises


def test_refused_inter_broker_calls_are_counted_and_their_warnings_rate_limited(setup: Setup, caplog, monkeypatch):
    now = [1_000.0]
    refusals = request_checks.INTERBROKER_REFUSALS
    monkeypatch.setattr(refusals, "monotonic", lambda: now[0])
    before = refusals.total
    with caplog.at_level(logging.WARNING, logger=request_checks.__name__):
        for i in range(1_000):  # a client looping, reconnecting each time: 100 s in all
            with pytest.raises(RequestRejected):
                fetch(setup, 0, context=RequestContext(peer=f"ipv4:10.0.0.9:{40_000 + i}"), replica_id=1)
            now[0] += 0.1
    lines = [r.getMessage() for r in caplog.records if "refused Fetch as replica 1" in r.getMessage()]
    assert 2 <= len(lines) <= 11, lines  # one per 10 s, not 1,000
    assert "from ipv4:10.0.0.9:40000" in lines[0] and "since the last such warning: 1;" in lines[0]
    assert "since the last such warning: 100;" in lines[1]
    assert refusals.total - before == 1_000  # every one counted
    loop = asyncio.new_event_loop()
    loop.close()  # no broker loop to answer: only the process-level figures
    config = BrokerConfig(data_dir=Path("unused"))
    exposed = {m.name: m for m in BrokerCollector(SimpleNamespace(config=config), loop).collect()}  # type: ignore[arg-type]
    assert exposed["logbroker_interbroker_refusals"].samples[0].value == refusals.total


def test_a_long_poll_that_finds_the_fetch_purgatory_full_is_refused_with_a_retry_after(setup: Setup):
    from logbroker import wire
    from logbroker.replication.purgatory import Purgatory

    setup.rm.fetch_purgatory = Purgatory(watchers_max=0)  # full
    with pytest.raises(RequestRejected) as refused:
        fetch(setup, 0, max_wait_ms=5000, min_bytes=1)
    assert refused.value.status == RequestStatus.RESOURCE_EXHAUSTED
    assert refused.value.retry_after_ms == 100  # the default --overload-retry-after-ms
    assert wire.retry_after_ms(refused.value.message) == refused.value.retry_after_ms
    produce(setup, ("t", 0))
    assert fetch(setup, 0, max_wait_ms=5000, min_bytes=1).results[0].records  # data to answer with: no wait
