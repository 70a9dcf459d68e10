"""ZkStore and the Controller shell against a real ZooKeeper (one per session, a chroot per test).

The Controller runs in-process here with a fake ControllerRpc that records what it is told to send:
a component test of election, watches and fencing; no broker processes.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from logbroker.cluster.controller import Controller
from logbroker.cluster.lineage import Split
from logbroker.cluster.metadata import BrokerRegistration, PartitionStateData, TopicSpec
from logbroker.cluster.zk_store import (
    BrokerRegistrationError,
    ControllerFencedError,
    ZkStore,
    ZooKeeperUnavailableError,
)
from logbroker.errors import (
    InvalidRequestError,
    ReassignmentInProgressError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from logbroker.v1 import logbroker_pb2 as pb

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def make_store(zookeeper, zk_chroot) -> Iterator[Callable[[], ZkStore]]:
    stores: list[ZkStore] = []

    def make() -> ZkStore:
        s = ZkStore(zookeeper.address, chroot=zk_chroot, session_timeout_ms=4000)
        s.start()
        stores.append(s)
        return s

    yield make
    for s in stores:
        s.close()


def reg(b: int) -> BrokerRegistration:
    return BrokerRegistration(b, "127.0.0.1", 9000 + b, f"rack{b % 2}")


# ====================================================================================== ZkStore


def test_start_creates_layout_and_cluster_id_is_shared(make_store):
    a, b = make_store(), make_store()
    assert a.cluster_id and a.cluster_id == b.cluster_id
    assert a.controller_epoch() == (0, 0)
    assert a.topic_names() == [] and a.live_brokers() == {} and a.controller_id() is None


def test_registration_epoch_is_czxid_and_changes_across_sessions(make_store):
    a, observer = make_store(), make_store()
    e1 = a.register_broker(reg(1))
    assert a.register_broker(reg(1)) == e1  # our own node (a retried create): same epoch
    live = observer.live_brokers()
    assert live[1].epoch == e1 and live[1].address == "127.0.0.1:9001" and live[1].rack == "rack1"
    fired = threading.Event()
    observer.live_brokers(watch=lambda _e: fired.set())
    a.close()  # the session ends: the ephemeral node goes at once
    assert fired.wait(10)
    assert 1 not in observer.live_brokers()
    e2 = make_store().register_broker(reg(1))
    assert e2 > e1


def test_registration_waits_for_a_previous_sessions_node(make_store):
    old, new = make_store(), make_store()
    old.register_broker(reg(4))
    with pytest.raises(BrokerRegistrationError):
        new.register_broker(reg(4), wait_s=0.2)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(new.register_broker(reg(4), wait_s=20)))
    t.start()
    old.close()
    t.join(30)
    assert result and new.live_brokers()[4].epoch == result[0]


def test_controller_election_is_exclusive_and_bumps_the_epoch(make_store):
    a, b = make_store(), make_store()
    won = a.try_elect_controller(1)
    assert won == (1, 1)
    assert b.try_elect_controller(2) is None
    assert a.try_elect_controller(1) == (1, 1)  # ours already (a lost reply, retried)
    gone = threading.Event()
    assert b.controller_id(watch=lambda _e: gone.set()) == 1
    a.close()
    assert gone.wait(10)
    assert b.controller_id() is None
    assert b.try_elect_controller(2) == (2, 2)
    assert b.controller_epoch() == (2, 2)
    b.resign_controller(2)
    assert b.controller_id() is None


def test_zombie_controller_writes_are_fenced(make_store):
    old, new, admin = make_store(), make_store(), make_store()
    admin.create_topic(TopicSpec("t", {0: [1, 2]}, {}))
    _, old_version = old.try_elect_controller(1)
    created = old.controller_write(old_version, {("t", 0): PartitionStateData(1, 0, [1, 2], 1)}, {})
    assert created[("t", 0)] is not None and created[("t", 0)].zk_version == 0
    old.resign_controller(1)  # (as if its session had expired while it was paused)
    _, new_version = new.try_elect_controller(2)
    assert new_version == old_version + 1
    stale = PartitionStateData(2, 1, [2], 1, zk_version=0)
    with pytest.raises(ControllerFencedError):
        old.controller_write(old_version, {}, {("t", 0): stale})
    with pytest.raises(ControllerFencedError):
        old.controller_write(old_version, {("t", 1): PartitionStateData(1, 0, [1], 1)}, {})
    with pytest.raises(ControllerFencedError):
        old.controller_update_assignment(old_version, "t", 0, [2], [], [])
    admin.delete_topic("t")
    with pytest.raises(ControllerFencedError):
        old.delete_topic_completely(old_version, "t")
    with pytest.raises(ControllerFencedError):
        old.finish_reassignment(old_version, "t", 0)
    assert admin.get_partition_state("t", 0) == PartitionStateData(1, 0, [1, 2], 1, 0)
    assert admin.get_topic("t").assignment == {0: [1, 2]}
    # the new controller's writes go through
    written = new.controller_write(new_version, {}, {("t", 0): PartitionStateData(2, 1, [2], 2, zk_version=0)})
    assert written[("t", 0)].zk_version == 1
    new.delete_topic_completely(new_version, "t")
    assert admin.get_topic("t") is None and admin.topics_to_delete() == []


def test_partition_state_writes_are_conditional_on_the_znode_version(make_store):
    s = make_store()
    s.create_topic(TopicSpec("t", {0: [1, 2], 1: [2, 1]}, {}))
    _, v = s.try_elect_controller(1)
    out = s.controller_write(v, {("t", 0): PartitionStateData(1, 0, [1, 2], 1),
                                 ("t", 1): PartitionStateData(2, 0, [2, 1], 1)}, {})
    assert {tp: st.zk_version for tp, st in out.items()} == {("t", 0): 0, ("t", 1): 0}
    again = s.controller_write(v, {("t", 0): PartitionStateData(2, 0, [2], 1)}, {})
    assert again == {("t", 0): None}  # exists already
    stale = s.controller_write(v, {}, {("t", 0): PartitionStateData(2, 1, [2], 1, zk_version=5)})
    assert stale == {("t", 0): None}
    ok = s.controller_write(v, {}, {("t", 0): PartitionStateData(2, 1, [2], 1, zk_version=0),
                                    ("t", 1): PartitionStateData(2, 0, [2], 1, zk_version=0)})
    assert ok[("t", 0)].zk_version == 1 and ok[("t", 1)].zk_version == 1
    assert s.get_partition_states("t") == {0: PartitionStateData(2, 1, [2], 1, 1),
                                           1: PartitionStateData(2, 0, [2], 1, 1)}
    assert s.get_partition_states_of([("t", 0), ("t", 7), ("nope", 0)])[("t", 7)] is None
    gone = s.controller_write(v, {("nope", 0): PartitionStateData(1, 0, [1], 1)}, {})
    assert gone == {("nope", 0): None}  # never resurrects a deleted topic's tree


def test_leader_isr_write_creates_a_notification(make_store):
    s, leader = make_store(), make_store()
    s.create_topic(TopicSpec("t", {0: [1, 2]}, {}))
    _, v = s.try_elect_controller(1)
    st = s.controller_write(v, {("t", 0): PartitionStateData(1, 0, [1, 2], 1)}, {})[("t", 0)]
    fired = threading.Event()
    assert s.isr_change_notifications(watch=lambda _e: fired.set()) == []
    shrunk = leader.write_isr_as_leader("t", 0, PartitionStateData(1, 0, [1], 1, st.zk_version))
    assert shrunk is not None and shrunk.zk_version == st.zk_version + 1 and shrunk.isr == [1]
    assert fired.wait(10)
    notes = s.isr_change_notifications()
    assert [tps for _, tps in notes] == [[("t", 0)]] and notes[0][0].startswith("isr_change_")
    # a stale version (the controller wrote meanwhile) is refused, and nothing is announced
    assert leader.write_isr_as_leader("t", 0, PartitionStateData(1, 0, [1, 2], 1, st.zk_version)) is None
    assert len(s.isr_change_notifications()) == 1
    s.delete_isr_change_notifications([n for n, _ in notes])
    assert s.isr_change_notifications() == []
    assert s.get_partition_state("t", 0) == PartitionStateData(1, 0, [1], 1, st.zk_version + 1)


def test_topics_deletion_markers_assignment_reassignment_and_offsets(make_store):
    s = make_store()
    spec = TopicSpec("orders.v1-x", {0: [1, 2], 1: [2, 1]}, {"retention_ms": "1000"})
    s.create_topic(spec)
    assert spec.topic_id
    with pytest.raises(TopicAlreadyExistsError):
        s.create_topic(TopicSpec("orders.v1-x", {0: [1]}, {}))
    got = s.get_topic("orders.v1-x")
    assert got == spec and s.list_topics() == {"orders.v1-x": spec}
    s.set_assignment("orders.v1-x", {0: [1, 2], 1: [2, 1], 2: [1, 2]})
    assert s.get_topic("orders.v1-x").partition_count == 3
    # reassignment requests
    s.request_reassignment("orders.v1-x", 1, [3, 1])
    with pytest.raises(ReassignmentInProgressError):
        s.request_reassignment("orders.v1-x", 1, [3])
    with pytest.raises(UnknownTopicOrPartitionError):
        s.request_reassignment("orders.v1-x", 9, [3])
    assert s.reassignments() == {("orders.v1-x", 1): [3, 1]}
    assert s.reassignments_with_throttles() == ({("orders.v1-x", 1): [3, 1]}, {})
    s.request_reassignment("orders.v1-x", 2, [3, 2], throttle_bytes_per_sec=200_000)
    assert s.reassignments_with_throttles()[1] == {("orders.v1-x", 2): 200_000}
    _, v = s.try_elect_controller(1)
    s.finish_reassignment(v, "orders.v1-x", 2)
    assert s.controller_update_assignment(v, "orders.v1-x", 1, [3, 1, 2], [3], [2])
    t = s.get_topic("orders.v1-x")
    assert t.assignment[1] == [3, 1, 2] and t.adding_replicas == {1: [3]} and t.removing_replicas == {1: [2]}
    assert t.config == {"retention_ms": "1000"}
    s.finish_reassignment(v, "orders.v1-x", 1)
    assert s.reassignments() == {}
    # deletion: a marker, then the controller removes everything
    s.delete_topic("orders.v1-x")
    assert s.topics_to_delete() == ["orders.v1-x"]
    with pytest.raises(TopicAlreadyExistsError):
        s.create_topic(TopicSpec("orders.v1-x", {0: [1]}, {}))
    with pytest.raises(UnknownTopicOrPartitionError):
        s.delete_topic("nope")
    s.delete_topic_completely(v, "orders.v1-x")
    assert s.get_topic("orders.v1-x") is None and s.topics_to_delete() == []
    s.create_topic(TopicSpec("orders.v1-x", {0: [1]}, {}))  # the name is free again


# ====================================================================================== Controller


class FakeRpc:
    """Records every controller -> broker request; answers NONE."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, object]] = []

    async def leader_and_isr(self, broker: BrokerRegistration, req: pb.LeaderAndIsrRequest) -> pb.LeaderAndIsrResponse:
        self.calls.append(("LeaderAndIsr", broker.broker_id, req))
        return pb.LeaderAndIsrResponse()

    async def update_metadata(self, broker: BrokerRegistration,
                              req: pb.UpdateMetadataRequest) -> pb.UpdateMetadataResponse:
        self.calls.append(("UpdateMetadata", broker.broker_id, req))
        return pb.UpdateMetadataResponse()

    async def stop_replica(self, broker: BrokerRegistration, req: pb.StopReplicaRequest) -> pb.StopReplicaResponse:
        self.calls.append(("StopReplica", broker.broker_id, req))
        return pb.StopReplicaResponse()

    def of(self, kind: str, broker_id: int) -> list:
        return [req for k, b, req in self.calls if k == kind and b == broker_id]


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def test_controller_end_to_end_with_failover(make_store):
    s1, s2, s3, admin = make_store(), make_store(), make_store(), make_store()
    epochs = {b: s.register_broker(reg(b)) for b, s in ((1, s1), (2, s2), (3, s3))}
    rpc = FakeRpc()

    def states() -> dict[int, PartitionStateData]:
        return admin.get_partition_states("t")

    async def main() -> None:
        c1, c2 = Controller(1, s1, rpc), Controller(2, s2, rpc)
        t1 = asyncio.create_task(c1.run())
        await until(lambda: c1.is_active, "broker 1 to become controller")
        t2 = asyncio.create_task(c2.run())
        try:
            assert c1.controller_epoch == 1 and not c2.is_active
            # a new topic gets leaders, and every replica hears of it
            admin.create_topic(TopicSpec("t", {0: [1, 2, 3], 1: [2, 3, 1], 2: [3, 1, 2]}, {"min_insync_replicas": "2"}))
            await until(lambda: len(states()) == 3, "partition states for the new topic")
            assert {p: (s.leader, s.leader_epoch, s.isr) for p, s in states().items()} == {
                0: (1, 0, [1, 2, 3]), 1: (2, 0, [2, 3, 1]), 2: (3, 0, [3, 1, 2])}

            def told(b: int, topic: str) -> bool:
                return any(p.topic == topic for req in rpc.of("LeaderAndIsr", b) for p in req.partitions)

            await until(lambda: all(told(b, "t") for b in (1, 2, 3)), "LeaderAndIsr to every replica")
            lai = next(r for r in rpc.of("LeaderAndIsr", 2) if any(p.topic == "t" for p in r.partitions))
            assert lai.controller_id == 1 and lai.controller_epoch == 1 and lai.broker_epoch == epochs[2]
            await until(lambda: any(any(p.topic == "t" for p in r.partitions) for r in rpc.of("UpdateMetadata", 3)),
                        "UpdateMetadata with the topic")
            # broker 3's session ends: its leadership moves (epoch + 1), it leaves every ISR
            s3.close()
            await until(lambda: all(3 not in s.isr for s in states().values()), "broker 3 out of every ISR")
            assert {p: (s.leader, s.leader_epoch, s.isr) for p, s in states().items()} == {
                0: (1, 0, [1, 2]), 1: (2, 0, [2, 1]), 2: (1, 1, [1, 2])}
            # the controller's session ends: broker 2 takes over with a higher epoch
            s1.close()
            await until(lambda: c2.is_active, "broker 2 to take over")
            assert c2.controller_epoch == 2
            await until(lambda: all(s.leader == 2 for s in states().values()), "broker 2 leading everything")
            assert {p: (s.leader_epoch, s.isr, s.controller_epoch) for p, s in states().items()} == {
                0: (1, [2], 2), 1: (0, [2], 2), 2: (2, [2], 2)}
            assert not c1.is_active
            # controlled shutdown of the last broker: nobody else is in sync, so it keeps everything
            remaining = await c2.controlled_shutdown(2, epochs[2])
            assert remaining == [("t", 0), ("t", 1), ("t", 2)]
            # deletion goes through the controller
            admin.delete_topic("t")
            await until(lambda: admin.get_topic("t") is None and not admin.topics_to_delete(), "topic deleted")
            # the per-broker sender delivers the StopReplica after the deletion's ZooKeeper writes
            await until(lambda: any(r.delete_partitions for r in rpc.of("StopReplica", 2)),
                        "StopReplica with delete to broker 2")
        finally:
            await c2.stop()
            await c1.stop()
            for t in (t1, t2):
                await asyncio.wait_for(t, 10)
        assert admin.controller_id() is None  # c2 resigned on stop

    asyncio.run(main())


def test_controller_elects_when_a_broker_registers_later_and_reassigns(make_store):
    s1, admin = make_store(), make_store()
    s1.register_broker(reg(1))
    rpc = FakeRpc()

    async def main() -> None:
        c = Controller(1, s1, rpc)
        task = asyncio.create_task(c.run())
        try:
            await until(lambda: c.is_active, "election")
            admin.create_topic(TopicSpec("r", {0: [1], 1: [2]}, {}))
            await until(lambda: 0 in admin.get_partition_states("r"), "partition 0 online")
            assert 1 not in admin.get_partition_states("r")  # its only replica is not registered yet
            s2 = make_store()
            s2.register_broker(reg(2))
            await until(lambda: 1 in admin.get_partition_states("r"), "partition 1 online once 2 registers")
            assert admin.get_partition_state("r", 1).leader == 2
            # move r-0 from broker 1 to broker 2; the "leader" reports 2 in sync
            admin.request_reassignment("r", 0, [2])
            await until(lambda: admin.get_topic("r").assignment[0] == [2, 1], "replicas extended")
            # the state write (leader epoch bump) follows the assignment write
            await until(lambda: (admin.get_partition_state("r", 0).leader,
                                 admin.get_partition_state("r", 0).leader_epoch) == (1, 1), "leader epoch 1")

            def report_in_sync() -> bool:  # conditional on the version read: retried if the controller wrote since
                st = admin.get_partition_state("r", 0)
                return admin.write_isr_as_leader("r", 0, PartitionStateData(
                    1, 1, [1, 2], st.controller_epoch, st.zk_version)) is not None or 2 in st.isr

            await until(report_in_sync, "the leader's ISR write naming broker 2")
            await until(lambda: admin.get_topic("r").assignment[0] == [2], "reassignment complete")
            await until(lambda: not admin.reassignments(), "request removed")
            st = admin.get_partition_state("r", 0)
            assert (st.leader, st.leader_epoch, st.isr) == (2, 2, [2])
            await until(lambda: any(r.delete_partitions and r.partitions[0].topic == "r"
                                    for r in rpc.of("StopReplica", 1)), "old replica deleted")
        finally:
            await c.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_controller_rereads_everything_after_a_connection_drop(make_store):
    """kazoo drops every watch when the connection drops (SUSPENDED); once CONNECTED again (same
    session) the controller must re-read and re-watch, and keep its term."""
    import socket

    s1, admin = make_store(), make_store()
    s1.register_broker(reg(1))
    rpc = FakeRpc()
    seen: list[str] = []
    s1.add_state_listener(seen.append)

    async def main() -> None:
        c = Controller(1, s1, rpc)
        task = asyncio.create_task(c.run())
        try:
            await until(lambda: c.is_active, "election")
            admin.create_topic(TopicSpec("a", {0: [1]}, {}))
            await until(lambda: 0 in admin.get_partition_states("a"), "topic a online")
            s1._client._connection._socket.shutdown(socket.SHUT_RDWR)  # the TCP connection breaks
            await until(lambda: seen[-2:] == ["SUSPENDED", "CONNECTED"], "suspend and reconnect")
            admin.create_topic(TopicSpec("b", {0: [1, 2]}, {}))
            await until(lambda: 0 in admin.get_partition_states("b"), "topic b online (topics re-watched)")
            s2 = make_store()
            s2.register_broker(reg(2))
            await until(lambda: c.state is not None and 2 in c.state.live, "broker 2 seen (brokers re-watched)")
            assert c.is_active and c.controller_epoch == 1
        finally:
            await c.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_set_assignment_only_adds_partitions(make_store):
    s = make_store()
    s.create_topic(TopicSpec("t", {0: [1, 2]}, {}))
    _, v = s.try_elect_controller(1)
    s.controller_update_assignment(v, "t", 0, [3, 1, 2], [3], [2])  # a reassignment in flight
    s.set_assignment("t", {0: [1, 2], 1: [2, 1]})  # a CreatePartitions built on a stale read
    t = s.get_topic("t")
    assert t.assignment == {0: [3, 1, 2], 1: [2, 1]} and t.adding_replicas == {0: [3]}
    _, version = s.get_topic_versioned("t")
    with pytest.raises(InvalidRequestError):
        s.set_assignment("t", {2: [1]}, expected_version=version - 1)
    s.set_assignment("t", {2: [1]}, expected_version=version)
    assert s.get_topic("t").partition_count == 3


def test_a_split_is_written_pending_with_the_new_partitions_then_completed(make_store):
    s = make_store()
    s.create_topic(TopicSpec("t", {0: [1], 1: [1]}, {}))
    _, version = s.get_topic_versioned("t")
    s.set_assignment("t", {2: [1]}, version, Split(2, 3, ()))
    t = s.get_topic("t")
    assert t.partition_count == 3 and t.splits == [Split(2, 3, ())]
    s.complete_split("t", 3, [7, 9])
    assert s.get_topic("t").splits == [Split(2, 3, (7, 9))]
    with pytest.raises(UnknownTopicOrPartitionError):
        s.complete_split("gone", 3, [1, 1])


def test_unreachable_zookeeper_is_a_clear_bounded_error():
    from tests.conftest import free_port

    s = ZkStore(f"127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    try:
        with pytest.raises(ZooKeeperUnavailableError, match="could not connect"):
            s.start()
    finally:
        s.close()


class FlakyRpc(FakeRpc):
    """Broker 2 is unreachable for its first `failures` calls; broker 3 answers STALE_BROKER_EPOCH."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts: dict[int, int] = {}

    async def leader_and_isr(self, broker: BrokerRegistration, req: pb.LeaderAndIsrRequest) -> pb.LeaderAndIsrResponse:
        self.attempts[broker.broker_id] = self.attempts.get(broker.broker_id, 0) + 1
        if broker.broker_id == 2 and self.failures > 0:
            self.failures -= 1
            raise ConnectionError("broker 2 unreachable")
        if broker.broker_id == 3:
            return pb.LeaderAndIsrResponse(error_code=pb.STALE_BROKER_EPOCH)
        return await super().leader_and_isr(broker, req)


def test_controller_retries_rpcs_with_backoff_and_drops_stale_broker_epochs(make_store):
    stores = {b: make_store() for b in (1, 2, 3)}
    admin = make_store()
    for b, s in stores.items():
        s.register_broker(reg(b))
    rpc = FlakyRpc(failures=3)

    async def main() -> None:
        c = Controller(1, stores[1], rpc, rpc_backoff_max_s=0.05)
        task = asyncio.create_task(c.run())
        try:
            await until(lambda: c.is_active, "election")
            admin.create_topic(TopicSpec("t", {0: [1, 2, 3]}, {}))
            await until(lambda: rpc.of("LeaderAndIsr", 2), "LeaderAndIsr delivered to broker 2 after retries")
            assert rpc.attempts[2] >= 4
            await until(lambda: rpc.attempts.get(3, 0) >= 1, "LeaderAndIsr tried on broker 3")
            attempts_3 = rpc.attempts[3]
            await until(lambda: rpc.of("UpdateMetadata", 3), "UpdateMetadata to broker 3")
            assert rpc.attempts[3] == attempts_3  # a stale broker epoch is not retried
        finally:
            await c.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())


def test_fenced_controller_write_never_lands(make_store):
    s1, admin = make_store(), make_store()
    s1.register_broker(reg(1))
    rpc = FakeRpc()

    async def main() -> None:
        c = Controller(1, s1, rpc)
        task = asyncio.create_task(c.run())
        try:
            await until(lambda: c.is_active, "election")
            assert c.controller_epoch == 1
            # another controller's election moved /controller_epoch on (simulated: its version changes)
            admin._client.set("/controller_epoch", b"7")
            admin.create_topic(TopicSpec("z", {0: [1]}, {}))
            await until(lambda: 0 in admin.get_partition_states("z"), "partition z-0 online")
            # the write under the old epoch version was refused; only a re-elected term wrote it
            assert admin.get_partition_state("z", 0).controller_epoch >= 7
            assert c.controller_epoch >= 7
        finally:
            await c.stop()
            await asyncio.wait_for(task, 10)

    asyncio.run(main())
