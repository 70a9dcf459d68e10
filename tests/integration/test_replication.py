"""Replication between real grpc.aio servers in one process: each node is a ReplicaManager with its
own LogManager (tmp dir) behind the Broker service (Produce/Fetch) and the Replica service's
OffsetForLeaderEpoch. No controller and no ZooKeeper: the tests play controller, sending
LeaderAndIsr by hand and keeping the partition state in a shared InMemoryIsrStore (ZooKeeper's
stand-in: the leaders write their ISR changes there)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from logbroker.cluster.cluster_secret import call_metadata
from logbroker.cluster.metadata import PartitionStateData
from logbroker.config import BrokerConfig
from logbroker.replication.fetcher import FetcherConfig
from logbroker.replication.partition import Partition, Role
from logbroker.replication.replica_manager import InMemoryIsrStore, ReplicaManager
from logbroker.server import broker_service, rpc
from logbroker.server.apis.broker_apis import BrokerApis
from logbroker.server.apis.produce_fetch import ProduceFetchApis
from logbroker.storage.log import Log, LogConfig
from logbroker.storage.log_manager import LogManager
from logbroker.storage.record_batch import encode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(120)

TOPIC = "t"
KEY = (TOPIC, 0)
CLUSTER_SECRET = b"replication-test-secret"
FAST_FETCHER = FetcherConfig(max_wait_ms=200, backoff_initial_ms=10, backoff_max_ms=100, rpc_timeout_s=5)


def batch(tag: str, n: int = 3, size: int = 40) -> bytes:
    return encode_batch([(1000 + i, b"k", (f"{tag}-{i}-".encode() * size)[:size], None) for i in range(n)])


class Node:
    """One broker's data path: what the request layer's data path needs of a Broker, plus a Replica handler."""

    def __init__(self, broker_id: int, tmp: Path, store: InMemoryIsrStore, lag_ms: int) -> None:
        self.broker_id = broker_id
        # a cluster member (never connects to the ZooKeeper named): followers' fetches carry the secret
        self.config = BrokerConfig(data_dir=tmp / f"broker-{broker_id}", broker_id=broker_id,
                                   zookeeper="127.0.0.1:1", cluster_secret=CLUSTER_SECRET)
        self.ready = True
        self.open_streams = rpc.OpenStreams()
        self.log_manager = LogManager(self.config.data_dir, LogConfig(index_map_bytes=4 << 20))
        self.replica_manager = ReplicaManager(broker_id, self.log_manager, store, replica_lag_time_max_ms=lag_ms,
                                              fetcher_config=FAST_FETCHER, cluster_secret=CLUSTER_SECRET)
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.channel: grpc.aio.Channel | None = None

    @property
    def rm(self) -> ReplicaManager:
        return self.replica_manager

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def partition(self, topic: str, index: int) -> Partition:
        return self.replica_manager.get_partition(topic, index)

    def log(self) -> Log:
        return self.partition(*KEY).log

    async def start(self) -> Node:
        rm = self.replica_manager

        async def offset_for_leader_epoch(req: pb.OffsetForLeaderEpochRequest, context: Any) -> Any:
            return rm.offset_for_leader_epoch(req)

        replica = rpc.service("logbroker.v1.Replica", {
            "OffsetForLeaderEpoch": rpc.method(pb.OffsetForLeaderEpochRequest, offset_for_leader_epoch),
        })
        server = grpc.aio.server()
        apis = BrokerApis(ProduceFetchApis(self.config, self, rm, self))  # type: ignore[arg-type]
        server.add_generic_rpc_handlers((broker_service.handler(apis, self.open_streams), replica))
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.server = server
        self.channel = grpc.aio.insecure_channel(self.address)
        rm.start()
        return self

    async def stop(self) -> None:
        await self.replica_manager.shutdown()
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(0)
        self.log_manager.close_all()

    @property
    def stub(self) -> pbg.BrokerStub:
        assert self.channel is not None
        return pbg.BrokerStub(self.channel)

    async def produce(self, records: bytes, acks: int = 1, timeout_ms: int = 10_000) -> pb.ProducePartitionResult:
        resp = await self.stub.Produce(pb.ProduceRequest(acks=acks, timeout_ms=timeout_ms, partitions=[
            pb.ProducePartition(topic=TOPIC, partition=0, records=records)]), timeout=30)
        return resp.results[0]

    async def fetch(self, offset: int, replica_id: int = -1, leader_epoch: int = -1, max_wait_ms: int = 0,
                    ) -> pb.FetchPartitionResult:
        resp = await self.stub.Fetch(pb.FetchRequest(max_wait_ms=max_wait_ms, min_bytes=1, replica_id=replica_id,
                                                     partitions=[pb.FetchPartition(
                                                         topic=TOPIC, partition=0, fetch_offset=offset,
                                                         current_leader_epoch=leader_epoch)]), timeout=30,
                                     metadata=call_metadata(CLUSTER_SECRET) if replica_id >= 0 else None)
        return resp.results[0]

    def pause_fetching(self) -> None:
        """This follower stops fetching (as if it hung)."""
        self.replica_manager.fetchers.remove_partitions([KEY])

    def resume_fetching(self, leader: Node) -> None:
        self.replica_manager.fetchers.add_partition(self.partition(*KEY), leader.broker_id, leader.address)


def broker_epoch(broker_id: int) -> int:
    """The registration epoch (czxid) each node has in these tests."""
    return 1000 + broker_id


class Cluster:
    """The nodes and a controller played by hand."""

    def __init__(self, tmp: Path, n: int, lag_ms: int = 10_000) -> None:
        self.store = InMemoryIsrStore()
        self.nodes = [Node(i, tmp, self.store, lag_ms) for i in range(n)]
        self.controller_epoch = 1

    async def start(self) -> Cluster:
        for node in self.nodes:
            await node.start()
        return self

    async def stop(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(Exception):
                await node.stop()

    def state(self) -> PartitionStateData:
        st = self.store.get_state(*KEY)
        assert st is not None
        return st

    async def elect(self, leader: int, leader_epoch: int, isr: list[int], replicas: list[int] | None = None,
                    to: list[int] | None = None, config: dict[str, str] | None = None, resend: bool = False) -> None:
        """Write the partition state (next znode version) and send LeaderAndIsr to `to` (default:
        every replica). `resend`: send the stored state as it is, writing nothing."""
        replicas = replicas if replicas is not None else [n.broker_id for n in self.nodes]
        current = self.store.get_state(*KEY)
        if resend:
            assert current is not None
            leader, leader_epoch, isr, version = current.leader, current.leader_epoch, current.isr, current.zk_version
        else:
            version = current.zk_version + 1 if current is not None else 0
            self.store.set_state(TOPIC, 0, PartitionStateData(leader, leader_epoch, isr, self.controller_epoch,
                                                              version))
        req = pb.LeaderAndIsrRequest(controller_id=99, controller_epoch=self.controller_epoch, partitions=[
            pb.PartitionState(topic=TOPIC, partition=0, controller_epoch=self.controller_epoch, leader=leader,
                              leader_epoch=leader_epoch, isr=isr, replicas=replicas, zk_version=version)])
        for node in self.nodes:  # broker epochs as a controller knows them (a follower joins an ISR only at its own)
            req.live_brokers.add(broker_id=node.broker_id, host="127.0.0.1", port=node.port,
                                 broker_epoch=broker_epoch(node.broker_id))
        req.topic_configs_json[TOPIC] = json.dumps({"segment_bytes": str(16 << 10), **(config or {})})
        for b in to if to is not None else replicas:
            req.broker_epoch = broker_epoch(b)
            resp = await self.nodes[b].rm.leader_and_isr(req, broker_epoch(b))
            assert resp.error_code == pb.NONE and all(r.error_code == pb.NONE for r in resp.results), resp


def run(test: Callable[[Cluster], Awaitable[None]], tmp: Path, n: int, lag_ms: int = 10_000) -> None:
    async def main() -> None:
        cluster = await Cluster(tmp, n, lag_ms).start()
        try:
            await asyncio.wait_for(test(cluster), 90)
        finally:
            await cluster.stop()
    asyncio.run(main())


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    """Wait for a condition, with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def log_bytes(log: Log) -> bytes:
    out = bytearray()
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        view = log.read(offset, 1 << 20, log.log_end_offset)
        for h, _pos in iter_batches(view):
            offset = h.next_offset
        out += view
        view.release()
    return bytes(out)


def in_sync(*nodes: Node) -> bool:
    logs = [n.log() for n in nodes]
    return len({lg.log_end_offset for lg in logs}) == 1


# ---------------------------------------------------------------------------------------------


def test_followers_catch_up_byte_identical(tmp_path):
    async def scenario(c: Cluster) -> None:
        leader, f1, f2 = c.nodes
        await c.elect(0, 1, [0, 1, 2])
        for i in range(60):  # 16 KiB segments: the followers roll too
            r = await leader.produce(batch(f"r{i}", n=5, size=100), acks=1)
            assert r.error_code == pb.NONE, r
        await until(lambda: in_sync(leader, f1, f2), "followers at the leader's log end offset")
        await until(lambda: leader.partition(*KEY).high_watermark == leader.log().log_end_offset, "the HW")
        expected = log_bytes(leader.log())
        for f in (f1, f2):
            assert log_bytes(f.log()) == expected
            assert f.log().epochs == leader.log().epochs == [(1, 0)]
            assert f.log().segment_count > 1
            assert f.partition(*KEY).role is Role.FOLLOWER
        await until(lambda: all(f.partition(*KEY).high_watermark == 300 for f in (f1, f2)), "followers' HW")
        assert c.state().isr == [0, 1, 2] and leader.partition(*KEY).isr == [0, 1, 2]

    run(scenario, tmp_path, 3)


def test_acks_all_answers_once_the_hw_passes_the_batch(tmp_path):
    async def scenario(c: Cluster) -> None:
        leader, f1, f2 = c.nodes
        await c.elect(0, 1, [0, 1, 2], config={"min_insync_replicas": "2"})
        r = await leader.produce(batch("a"), acks=-1)
        assert r.error_code == pb.NONE and r.base_offset == 0
        await until(lambda: in_sync(leader, f1, f2), "replicas in sync")
        f2.pause_fetching()
        produce = asyncio.create_task(leader.produce(batch("b"), acks=-1, timeout_ms=30_000))
        await until(lambda: leader.log().log_end_offset == 6 and f1.log().log_end_offset == 6, "f1 has it")
        part = leader.partition(*KEY)
        assert part.high_watermark == 3 and not produce.done()  # f2 is in the ISR and does not have it
        f2.resume_fetching(leader)
        r = await produce
        assert r.error_code == pb.NONE and r.base_offset == 3
        assert f2.log().log_end_offset >= 6 and part.high_watermark >= 6
        # A follower that does not come back within the produce's timeout: REQUEST_TIMED_OUT.
        f2.pause_fetching()
        r = await leader.produce(batch("c"), acks=-1, timeout_ms=300)
        assert r.error_code == pb.REQUEST_TIMED_OUT, r
        assert r.base_offset == -1

    run(scenario, tmp_path, 3)


def test_not_enough_replicas(tmp_path):
    async def scenario(c: Cluster) -> None:
        leader, follower = c.nodes
        # ISR = [leader] only; the follower is not told yet.
        await c.elect(0, 1, [0], replicas=[0, 1], to=[0], config={"min_insync_replicas": "2"})
        r = await leader.produce(batch("x"), acks=-1)
        assert r.error_code == pb.NOT_ENOUGH_REPLICAS, r
        assert leader.log().log_end_offset == 0  # nothing appended
        r = await leader.produce(batch("y"), acks=1)
        assert r.error_code == pb.NONE
        # The follower joins, catches up and is added to the ISR by the leader: acks=all works.
        await c.elect(0, 1, [0], replicas=[0, 1], to=[1], config={"min_insync_replicas": "2"}, resend=True)
        await until(lambda: leader.partition(*KEY).isr == [0, 1], "the ISR expansion")
        assert c.state().isr == [0, 1]
        r = await leader.produce(batch("z"), acks=-1)
        assert r.error_code == pb.NONE and r.base_offset == 3

    run(scenario, tmp_path, 2)


def test_isr_shrinks_when_a_follower_stops_and_expands_when_it_returns(tmp_path):
    async def scenario(c: Cluster) -> None:
        leader, follower = c.nodes
        await c.elect(0, 1, [0, 1], config={"min_insync_replicas": "2"})
        assert (await leader.produce(batch("a"), acks=-1)).error_code == pb.NONE
        follower.pause_fetching()
        parked = asyncio.create_task(leader.produce(batch("b"), acks=-1, timeout_ms=30_000))
        await until(lambda: c.state().isr == [0], "the ISR shrink in the store", timeout_s=10)
        assert leader.partition(*KEY).isr == [0]
        r = await parked
        assert r.error_code == pb.NOT_ENOUGH_REPLICAS_AFTER_APPEND, r
        assert leader.partition(*KEY).high_watermark == 6  # the leader alone holds it now
        r = await leader.produce(batch("c"), acks=-1)
        assert r.error_code == pb.NOT_ENOUGH_REPLICAS
        follower.resume_fetching(leader)
        await until(lambda: c.state().isr == [0, 1], "the ISR expansion in the store", timeout_s=10)
        await until(lambda: leader.partition(*KEY).isr == [0, 1], "the leader's ISR")
        assert follower.log().log_end_offset == 6
        r = await leader.produce(batch("d"), acks=-1)
        assert r.error_code == pb.NONE and r.base_offset == 6

    run(scenario, tmp_path, 2, lag_ms=300)


def test_divergent_tail_is_truncated_by_leader_epoch(tmp_path):
    async def scenario(c: Cluster) -> None:
        old, new = c.nodes
        await c.elect(0, 1, [0, 1])
        for i in range(3):
            assert (await old.produce(batch(f"committed{i}"), acks=-1)).error_code == pb.NONE
        await until(lambda: in_sync(old, new), "replicas in sync")
        new.pause_fetching()
        for i in range(3):  # an uncommitted tail on the old leader only
            assert (await old.produce(batch(f"lost{i}", n=2), acks=1)).error_code == pb.NONE
        assert old.log().log_end_offset == 15 and new.log().log_end_offset == 9
        assert old.partition(*KEY).high_watermark == 9
        # The old leader is declared dead; the follower (in the ISR) is elected in epoch 2; it
        # writes its own records at the offsets the old leader used; the old leader comes back.
        await c.elect(1, 2, [1], to=[1])
        for i in range(2):
            assert (await new.produce(batch(f"new{i}", n=4), acks=1)).error_code == pb.NONE
        assert new.log().epochs == [(1, 0), (2, 9)]
        await c.elect(1, 2, [1], to=[0], resend=True)
        await until(lambda: old.log().log_end_offset == new.log().log_end_offset == 17
                    and log_bytes(old.log()) == log_bytes(new.log()), "the old leader to converge")
        assert old.log().epochs == [(1, 0), (2, 9)]
        await until(lambda: new.partition(*KEY).isr == [1, 0], "the old leader back in the ISR")
        r = await new.fetch(0, max_wait_ms=0)
        values = bytes(r.records)
        assert b"lost" not in values and b"new0" in values

    run(scenario, tmp_path, 2)


def test_consumers_never_read_past_the_hw_and_wake_when_it_moves(tmp_path):
    async def scenario(c: Cluster) -> None:
        leader, follower = c.nodes
        await c.elect(0, 1, [0, 1])
        assert (await leader.produce(batch("a"), acks=-1)).error_code == pb.NONE
        follower.pause_fetching()
        for i in range(3):
            assert (await leader.produce(batch(f"b{i}"), acks=1)).error_code == pb.NONE
        part = leader.partition(*KEY)
        assert part.log.log_end_offset == 12 and part.high_watermark == 3
        r = await leader.fetch(0)
        assert r.error_code == pb.NONE and r.high_watermark == 3 and r.log_end_offset == 12
        assert [h.last_offset for h, _ in iter_batches(r.records)] == [2]
        r = await leader.fetch(3)
        assert r.error_code == pb.NONE and r.records == b""
        # A consumer long-polls at the HW; only the HW moving (the follower catching up, no new
        # append) wakes it, well before its max wait.
        started = time.monotonic()
        poll = asyncio.create_task(leader.fetch(3, max_wait_ms=20_000))
        await until(lambda: leader.rm.fetch_purgatory.waiting == 1, "the consumer to park")
        follower.resume_fetching(leader)
        r = await poll
        assert time.monotonic() - started < 10
        assert r.error_code == pb.NONE and r.high_watermark == 12
        offsets = [h.last_offset for h, _ in iter_batches(r.records)]
        assert offsets and all(o < r.high_watermark for o in offsets)
        # Followers read past the HW; non-leaders refuse consumers and producers.
        follower.pause_fetching()
        assert (await leader.produce(batch("c"), acks=1)).error_code == pb.NONE
        f = await leader.fetch(12, replica_id=1, leader_epoch=1)
        assert f.error_code == pb.NONE and len(f.records) > 0 and f.high_watermark == 12
        assert (await follower.fetch(0)).error_code == pb.NOT_LEADER_OR_FOLLOWER
        assert (await follower.produce(batch("x"))).error_code == pb.NOT_LEADER_OR_FOLLOWER
        assert (await leader.fetch(0, replica_id=1, leader_epoch=0)).error_code == pb.FENCED_LEADER_EPOCH
        assert (await leader.fetch(0, replica_id=1, leader_epoch=2)).error_code == pb.UNKNOWN_LEADER_EPOCH
        assert (await leader.fetch(0, leader_epoch=0)).error_code == pb.FENCED_LEADER_EPOCH

    run(scenario, tmp_path, 2)


def test_follower_restarts_after_falling_behind_the_leaders_log_start(tmp_path):
    async def scenario(c: Cluster) -> None:
        leader, follower = c.nodes
        await c.elect(0, 1, [0], replicas=[0, 1], to=[0])
        for i in range(40):
            assert (await leader.produce(batch(f"r{i}", n=5, size=100), acks=1)).error_code == pb.NONE
        plog = leader.log()
        plog.update_config(LogConfig(segment_bytes=16 << 10, retention_bytes=20 << 10, index_map_bytes=4 << 20))
        assert plog.enforce_retention() > 0
        start = plog.log_start_offset
        assert start > 0
        await c.elect(0, 1, [0], replicas=[0, 1], to=[1], resend=True)
        await until(lambda: follower.log().log_end_offset == plog.log_end_offset, "the follower to catch up")
        assert follower.log().log_start_offset == start

    run(scenario, tmp_path, 2)


def test_truncation_walks_back_through_epochs_the_leader_never_saw(tmp_path):
    async def scenario(c: Cluster) -> None:
        a, b = c.nodes
        await c.elect(0, 1, [0, 1])
        assert (await a.produce(batch("common"), acks=-1)).error_code == pb.NONE
        await until(lambda: in_sync(a, b), "replicas in sync")
        # Epoch 2: b leads alone (a is not told) and writes; epoch 3: a leads alone and writes;
        # epoch 4: b leads again and writes. a then follows b: it has epoch 3, which b never saw.
        await c.elect(1, 2, [1], to=[1])
        for i in range(2):
            assert (await b.produce(batch(f"b2-{i}"), acks=1)).error_code == pb.NONE
        await c.elect(0, 3, [0], to=[0])
        for i in range(2):
            assert (await a.produce(batch(f"a3-{i}"), acks=1)).error_code == pb.NONE
        await c.elect(1, 4, [1], to=[1])
        assert (await b.produce(batch("b4"), acks=1)).error_code == pb.NONE
        assert a.log().epochs == [(1, 0), (3, 3)] and a.log().log_end_offset == 9
        assert b.log().epochs == [(1, 0), (2, 3), (4, 9)] and b.log().log_end_offset == 12
        await c.elect(1, 4, [1], to=[0], resend=True)
        await until(lambda: log_bytes(a.log()) == log_bytes(b.log()), "a to converge on b's log")
        assert a.log().epochs == b.log().epochs
        assert b"a3-" not in log_bytes(a.log())

    run(scenario, tmp_path, 2)


def test_restarted_leader_exposes_nothing_past_the_replicated_high_watermark(tmp_path):
    """A leader restarted with records its followers never got must not start from HW = LEO: its
    high watermark comes from its checkpoint, so consumers see only what was replicated."""
    async def scenario(c: Cluster) -> None:
        leader, follower = c.nodes
        await c.elect(0, 1, [0, 1])
        assert (await leader.produce(batch("a"), acks=-1)).error_code == pb.NONE
        follower.pause_fetching()
        for i in range(3):  # acknowledged by the leader alone (acks=1), never replicated
            assert (await leader.produce(batch(f"b{i}"), acks=1)).error_code == pb.NONE
        assert (leader.log().log_end_offset, leader.partition(*KEY).high_watermark) == (12, 3)
        await leader.stop()
        restarted = Node(0, tmp_path, c.store, 10_000)
        c.nodes[0] = restarted
        await restarted.start()
        await c.elect(0, 2, [0, 1], to=[0])  # leader again; the follower has not fetched yet
        part = restarted.partition(*KEY)
        assert (part.log.log_end_offset, part.high_watermark) == (12, 3)
        r = await restarted.fetch(0, max_wait_ms=0)
        assert r.error_code == pb.NONE and r.high_watermark == 3
        assert [h.last_offset for h, _ in iter_batches(r.records)] == [2]
        await c.elect(0, 2, [0, 1], to=[1], resend=True)  # the follower follows: then they are exposed
        await until(lambda: restarted.partition(*KEY).high_watermark == 12, "the HW to reach the LEO")

    run(scenario, tmp_path, 2)
