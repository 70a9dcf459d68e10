"""ShareData.read_many (group/share_data.py): remote partitions batched into one Fetch per leader,
an error per partition (a dead leader fails only its partitions). No sockets: fake peers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from logbroker.errors import BrokerError, LeaderNotAvailableError
from logbroker.group.share_data import ReadResult, ShareData
from logbroker.v1 import logbroker_pb2 as pb

LEADERS = {("a", 0): 1, ("a", 1): 2, ("a", 2): 1, ("b", 0): 1, ("b", 1): 2}


class FakeCluster:
    def topic_partitions(self, topic: str) -> dict[int, Any]:
        return {p: SimpleNamespace(leader=lead) for (t, p), lead in LEADERS.items() if t == topic}

    def cluster_brokers(self) -> tuple[list[Any], int, int]:
        return [SimpleNamespace(broker_id=i, host="h", port=i) for i in (1, 2)], 1, 1


class FakeStub:
    def __init__(self, peers: FakePeers, address: str) -> None:
        self.peers, self.address = peers, address

    async def Fetch(self, req: pb.FetchRequest, timeout: float) -> pb.FetchResponse:  # noqa: N802 - gRPC's name
        self.peers.calls.append((self.address, sorted((p.topic, p.partition) for p in req.partitions)))
        if self.address in self.peers.dead:
            raise RuntimeError("connection refused")
        resp = pb.FetchResponse()
        for p in req.partitions:
            r = resp.results.add(topic=p.topic, partition=p.partition, high_watermark=p.fetch_offset + 1)
            if p.topic == "b":
                r.error_code = pb.NOT_LEADER_OR_FOLLOWER
        return resp


    async def ListOffsets(self, req: pb.ListOffsetsRequest, timeout: float) -> pb.ListOffsetsResponse:  # noqa: N802
        self.peers.calls.append((self.address, [("list", p.timestamp) for p in req.partitions]))
        # the log starts at 500 (retention): earliest 500, latest 900
        return pb.ListOffsetsResponse(results=[
            pb.ListOffsetsResult(topic=p.topic, partition=p.partition, offset=500 if p.timestamp == -2 else 900)
            for p in req.partitions])


class FakePeers:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []
        self.dead: set[str] = set()

    def broker_stub(self, address: str) -> FakeStub:
        return FakeStub(self, address)


def test_read_many_sends_one_fetch_per_leader_with_errors_per_partition() -> None:
    peers = FakePeers()
    data = ShareData(FakeCluster(), SimpleNamespace(partitions={}), peers, None)  # type: ignore[arg-type]
    offsets = {tp: 10 * i for i, tp in enumerate(LEADERS)}
    got = asyncio.run(data.read_many(offsets, 1024))
    assert sorted(peers.calls) == [("h:1", [("a", 0), ("a", 2), ("b", 0)]), ("h:2", [("a", 1), ("b", 1)])]
    for tp in (("a", 0), ("a", 1), ("a", 2)):
        r = got[tp]
        assert isinstance(r, ReadResult) and r.high_watermark == offsets[tp] + 1
    assert all(isinstance(got[tp], BrokerError) and got[tp].code == pb.NOT_LEADER_OR_FOLLOWER  # type: ignore[union-attr]
               for tp in (("b", 0), ("b", 1)))

    peers.calls.clear()
    peers.dead.add("h:1")
    got = asyncio.run(data.read_many(offsets, 1024))
    assert len(peers.calls) == 2
    assert all(isinstance(got[tp], LeaderNotAvailableError) for tp in (("a", 0), ("a", 2), ("b", 0)))
    assert isinstance(got[("a", 1)], ReadResult)


def test_bounds_of_a_remote_partition_come_from_list_offsets() -> None:
    """A remote partition whose log no longer starts at 0 still has bounds (a fetch at 0 would be
    OFFSET_OUT_OF_RANGE)."""
    peers = FakePeers()
    data = ShareData(FakeCluster(), SimpleNamespace(partitions={}), peers, None)  # type: ignore[arg-type]
    assert asyncio.run(data.bounds(("a", 1))) == (500, 900)
    assert peers.calls == [("h:2", [("list", -2), ("list", -1)])]


def test_data_arrival_wakes_on_an_append_to_a_watched_local_partition() -> None:
    from logbroker.replication.purgatory import Purgatory

    replicas = SimpleNamespace(partitions={}, fetch_purgatory=Purgatory())
    data = ShareData(FakeCluster(), replicas, None, None)  # type: ignore[arg-type]

    async def scenario() -> tuple[bool, bool, float]:
        loop = asyncio.get_running_loop()
        timed_out = await data.data_arrival([("a", 0)], 0.01)  # type: ignore[misc]
        waiting = asyncio.ensure_future(data.data_arrival([("a", 0), ("a", 2)], 30.0))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        started = loop.time()
        replicas.fetch_purgatory.notify(("a", 2))  # what an append to a-2 does
        woken = await waiting
        return timed_out, woken, loop.time() - started

    timed_out, woken, waited_s = asyncio.run(scenario())
    assert timed_out is False and woken is True and waited_s < 5
    assert ShareData(FakeCluster(), SimpleNamespace(partitions={}), None, None).data_arrival(  # type: ignore[arg-type]
        [("a", 0)], 1.0) is None  # no purgatory (test doubles): the coordinator keeps its tick


def test_data_watch_is_registered_before_it_returns_so_an_append_right_after_is_not_missed() -> None:
    """A waiting ShareFetch registers its watch and an append may follow in the same loop iteration
    (before any task of the fetch runs again): it must still be woken."""
    from logbroker.replication.purgatory import Purgatory

    replicas = SimpleNamespace(partitions={}, fetch_purgatory=Purgatory())
    data = ShareData(FakeCluster(), replicas, None, None)  # type: ignore[arg-type]

    async def scenario() -> tuple[bool, int, int, bool]:
        watched = data.data_watch([("a", 0), ("a", 2)])
        assert watched is not None
        fut, end = watched
        replicas.fetch_purgatory.notify(("a", 2))  # no await in between: the append comes at once
        notified = fut.done() and fut.result()
        during = replicas.fetch_purgatory.waiting
        end()
        other, end_other = data.data_watch([("a", 0)])  # type: ignore[misc]
        end_other()
        return notified, during, replicas.fetch_purgatory.waiting, other.cancelled()

    assert asyncio.run(scenario()) == (True, 1, 0, True)  # ended watches are unregistered (and cancelled)
    assert ShareData(FakeCluster(), SimpleNamespace(partitions={}), None, None).data_watch(  # type: ignore[arg-type]
        [("a", 0)]) is None


def test_local_bounds_are_known_without_a_call_for_led_partitions_only() -> None:
    """A waiting ShareFetch skips reading a local partition with nothing new past its window
    (share_coordinator._read_new): it needs the bounds of the partitions this broker leads, no call."""
    led = SimpleNamespace(is_leader=True, high_watermark=42, log=SimpleNamespace(log_start_offset=7))
    follower = SimpleNamespace(is_leader=False, high_watermark=40, log=SimpleNamespace(log_start_offset=7))
    peers = FakePeers()
    data = ShareData(FakeCluster(), SimpleNamespace(partitions={("a", 0): led, ("a", 1): follower}),  # type: ignore[arg-type]
                     peers, None)
    assert data.local_bounds(("a", 0)) == (7, 42)
    assert data.local_bounds(("a", 1)) is None and data.local_bounds(("a", 2)) is None  # read from the leader
    assert peers.calls == []


def test_arrival_watch_stays_armed_while_its_fetch_waits_and_ends_cleanly() -> None:
    """Every append to a watched partition calls on_arrival while the fetch waits (a fetch that
    was not the one woken by the first append hears the second), none once it stops waiting or
    the watch is ended, and no registration is left behind."""
    from logbroker.replication.purgatory import Purgatory

    replicas = SimpleNamespace(partitions={}, fetch_purgatory=Purgatory())
    data = ShareData(FakeCluster(), replicas, None, None)  # type: ignore[arg-type]
    purgatory = replicas.fetch_purgatory

    async def scenario() -> tuple[list[str], int, int, int]:
        arrivals: list[str] = []
        waiting = [True]
        end = data.arrival_watch([("a", 0), ("a", 2)], lambda: arrivals.append("x"), lambda: waiting[0])
        assert end is not None
        for key in (("a", 2), ("a", 0), ("a", 2)):  # three appends, one loop iteration apart
            purgatory.notify(key)
            await asyncio.sleep(0)
        armed = purgatory.waiting
        waiting[0] = False  # the fetch was woken and looks now: the next append is not its to hear
        purgatory.notify(("a", 0))
        await asyncio.sleep(0)
        after_wait = purgatory.waiting
        end()  # ending a spent watch changes nothing
        other = data.arrival_watch([("a", 0)], lambda: arrivals.append("y"), lambda: True)
        assert other is not None
        other()
        purgatory.notify(("a", 0))
        await asyncio.sleep(0)
        return arrivals, armed, after_wait, purgatory.waiting

    assert asyncio.run(scenario()) == (["x"] * 4, 1, 0, 0)
    assert ShareData(FakeCluster(), SimpleNamespace(partitions={}), None, None).arrival_watch(  # type: ignore[arg-type]
        [("a", 0)], lambda: None, lambda: True) is None


def test_arrival_watch_calls_on_arrival_within_the_append_not_a_loop_iteration_later() -> None:
    """The waiting ShareFetch is woken inside the append's notify, so it resumes in the next loop
    iteration (a done-callback of the purgatory's future would cost one iteration more)."""
    from logbroker.replication.purgatory import Purgatory

    replicas = SimpleNamespace(partitions={}, fetch_purgatory=Purgatory())
    data = ShareData(FakeCluster(), replicas, None, None)  # type: ignore[arg-type]

    async def scenario() -> tuple[list[str], int]:
        arrivals: list[str] = []
        end = data.arrival_watch([("a", 0)], lambda: arrivals.append("x"), lambda: True)
        assert end is not None
        replicas.fetch_purgatory.notify(("a", 0))
        heard = list(arrivals)  # no await since the append
        end()
        return heard, replicas.fetch_purgatory.waiting

    assert asyncio.run(scenario()) == (["x"], 0)
