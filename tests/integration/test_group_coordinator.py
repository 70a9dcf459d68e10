"""The group coordinator over its wire contract, on real broker processes (no client library):
commit validation and fencing, offsets rebuilt from __consumer_offsets after kill -9, session
expiry, and coordinator failover in a real three-broker cluster."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from logbroker.storage import record_batch as rb
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.cluster import Cluster
from tests.conftest import BrokerProcess, wait_for
from tests.group_rpc import GroupRpc

pytestmark = pytest.mark.timeout(300)

def _create_and_fill(address: str, topic: str, partitions: int, records: int, rf: int = 0,
                     leader_address: str = "") -> None:
    ch = grpc.insecure_channel(address)
    admin, broker = pbg.AdminStub(ch), pbg.BrokerStub(grpc.insecure_channel(leader_address or address))
    r = admin.CreateTopics(pb.CreateTopicsRequest(topics=[pb.NewTopic(name=topic, partitions=partitions,
                                                                        replication_factor=rf)]), timeout=30)
    assert r.results[0].error_code in (pb.NONE, pb.TOPIC_ALREADY_EXISTS), r
    if records:
        batch = rb.encode_batch([(0, None, b"v%d" % i, None) for i in range(records)])
        resp = broker.Produce(pb.ProduceRequest(acks=-1, timeout_ms=10_000, partitions=[
            pb.ProducePartition(topic=topic, partition=0, records=batch)]), timeout=30)
        assert resp.results[0].error_code == pb.NONE, resp


@pytest.fixture
def standalone(broker_factory) -> BrokerProcess:
    return broker_factory(extra_args=["--offsets-topic-partitions", "4"])


def test_commit_validation_and_fencing_leave_offsets_unchanged(standalone: BrokerProcess) -> None:
    _create_and_fill(standalone.address, "t", 2, 10)
    g = GroupRpc([standalone.address], "billing")
    join = g.heartbeat(member_id="", member_epoch=0, subscribed_topics=pb.Subscription(topics=["t"]))
    assert join.error_code == pb.NONE and join.member_epoch > 0, join
    member, epoch = join.member_id, join.member_epoch
    assert {(t.topic, p) for t in join.assignment.topics for p in t.partitions} == {("t", 0), ("t", 1)}

    ok = g.commit({("t", 0): 5}, member, epoch)
    assert ok.error_code == pb.NONE and ok.results[0].error_code == pb.NONE, ok
    assert g.committed() == {("t", 0): 5}

    def rejected(offsets: dict[tuple[str, int], int], code: int, member_id: str = member, member_epoch: int = epoch,
                 ) -> None:
        r = g.commit(offsets, member_id, member_epoch)
        codes = {r.error_code} | {x.error_code for x in r.results}
        assert code in codes, r
        assert g.committed() == {("t", 0): 5}

    rejected({("t", 0): -1}, pb.OFFSET_OUT_OF_RANGE)
    rejected({("t", 0): 11}, pb.OFFSET_OUT_OF_RANGE)       # past the log end (high watermark 10)
    rejected({("t", 7): 0}, pb.UNKNOWN_TOPIC_OR_PARTITION)
    rejected({("nope", 0): 0}, pb.UNKNOWN_TOPIC_OR_PARTITION)
    rejected({("t", 0): 6}, pb.UNKNOWN_MEMBER_ID, member_id="somebody-else")
    rejected({("t", 0): 6}, pb.STALE_MEMBER_EPOCH, member_epoch=epoch - 1)
    rejected({("t", 0): 6}, pb.UNKNOWN_MEMBER_ID, member_id="", member_epoch=0)  # the group has members
    bad = pbg.BrokerStub(grpc.insecure_channel(standalone.address)).OffsetCommit(
        pb.OffsetCommitRequest(group="a/b", partitions=[pb.OffsetCommitPartition(topic="t", partition=0, offset=1)]))
    assert bad.error_code == pb.INVALID_GROUP_ID
    assert g.commit({("t", 0): 10}, member, epoch).error_code == pb.NONE  # the high watermark itself is fine
    assert g.committed() == {("t", 0): 10}


def test_internal_topic_is_off_limits(standalone: BrokerProcess) -> None:
    g = GroupRpc([standalone.address], "g")
    g.find()
    ch = grpc.insecure_channel(standalone.address)
    r = pbg.BrokerStub(ch).Produce(pb.ProduceRequest(acks=1, partitions=[pb.ProducePartition(
        topic="__consumer_offsets", partition=0, records=rb.encode_batch([(0, b"k", b"v", None)]))]))
    assert r.results[0].error_code == pb.INVALID_TOPIC
    d = pbg.AdminStub(ch).DeleteTopics(pb.DeleteTopicsRequest(names=["__consumer_offsets"]))
    assert d.results[0].error_code == pb.INVALID_TOPIC


def test_offsets_survive_kill9_and_deleted_topics_lose_theirs(broker_factory, tmp_path) -> None:
    b = broker_factory(extra_args=["--offsets-topic-partitions", "4"])
    _create_and_fill(b.address, "t", 1, 20)
    _create_and_fill(b.address, "u", 1, 20)
    g = GroupRpc([b.address], "billing")
    for offset in range(1, 21):
        assert g.commit({("t", 0): offset, ("u", 0): offset}).error_code == pb.NONE
    b.kill()
    b.start()
    g.address = ""
    assert g.committed() == {("t", 0): 20, ("u", 0): 20}
    admin = pbg.AdminStub(grpc.insecure_channel(b.address))
    assert admin.DeleteTopics(pb.DeleteTopicsRequest(names=["u"])).results[0].error_code == pb.NONE
    wait_for(lambda: g.committed() == {("t", 0): 20}, 10, "offsets of the deleted topic dropped")
    b.kill()
    b.start()
    g.address = ""
    assert g.committed() == {("t", 0): 20}


def test_silent_member_is_evicted_and_then_fenced(standalone: BrokerProcess) -> None:
    _create_and_fill(standalone.address, "t", 2, 3)
    g = GroupRpc([standalone.address], "g")
    join = g.heartbeat(member_id="", member_epoch=0, subscribed_topics=pb.Subscription(topics=["t"]),
                       session_timeout_ms=1000)
    assert join.error_code == pb.NONE
    admin = pbg.AdminStub(grpc.insecure_channel(standalone.address))

    def evicted() -> bool:
        d = admin.DescribeGroup(pb.DescribeGroupRequest(group="g"))
        return d.error_code == pb.GROUP_ID_NOT_FOUND or (d.error_code == pb.NONE and not d.members)

    wait_for(evicted, 10, "the silent member evicted")
    late = g.heartbeat(member_id=join.member_id, member_epoch=join.member_epoch)
    assert late.error_code == pb.UNKNOWN_MEMBER_ID
    r = g.commit({("t", 0): 1}, join.member_id, join.member_epoch)
    assert r.error_code == pb.UNKNOWN_MEMBER_ID
    # without members, the group can be deleted, and then it is gone
    assert g.commit({("t", 0): 2}).error_code == pb.NONE
    assert admin.DeleteGroup(pb.DeleteGroupRequest(group="g")).error_code == pb.NONE
    assert g.committed() == {}
    assert admin.DescribeGroup(pb.DescribeGroupRequest(group="g")).error_code == pb.GROUP_ID_NOT_FOUND


# ------------------------------------------------------------------------------------------ cluster


@pytest.fixture
def cluster(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "3000", "--offsets-topic-partitions", "4"])
    try:
        yield c.start()
    finally:
        c.stop()


def test_coordinator_killed_twice_during_commits_never_loses_a_commit(cluster: Cluster) -> None:
    first = next(iter(cluster.brokers.values())).address
    _create_and_fill(first, "t", 1, 0, rf=3)
    _create_and_fill(first, "t", 1, 1000, rf=3, leader_address=cluster.brokers[cluster.leader_of("t", 0)].address)
    g = GroupRpc([b.address for b in cluster.brokers.values()], "billing")
    g.find()
    acked: list[int] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def committer() -> None:
        offset = 0
        try:
            while not stop.is_set() and offset < 1000:
                offset += 1
                r = g.commit({("t", 0): offset}, member_id="", member_epoch=0)
                if r.error_code == pb.NONE and r.results[0].error_code == pb.NONE:
                    acked.append(offset)
        except BaseException as e:  # surfaced by the test thread
            errors.append(e)

    thread = threading.Thread(target=committer, daemon=True)
    thread.start()
    try:
        seen = 0
        for _round in range(2):
            flowing_from = len(acked)
            wait_for(lambda n=flowing_from: len(acked) >= n + 20, 60, "commits flowing")
            address = g.address or g.find()
            victim = next(i for i, b in cluster.brokers.items() if b.address == address)
            cluster.kill9(victim)
            acked_before = acked[-1]
            wait_for(lambda a=acked_before: bool(acked) and acked[-1] > a + 20, 90,
                     "commits acknowledged by a new coordinator")
            committed = GroupRpc(g.bootstrap, g.group).committed()[("t", 0)]
            assert committed >= acked_before, "an acknowledged commit was lost"
            assert committed >= seen, "the committed offset went backwards"
            seen = committed
            cluster.restart(victim)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert acked == sorted(acked)
    final = GroupRpc(g.bootstrap, g.group).committed()[("t", 0)]
    assert final == acked[-1]


def test_members_keep_their_partitions_and_epochs_across_a_coordinator_kill9(cluster: Cluster) -> None:
    first = next(iter(cluster.brokers.values())).address
    _create_and_fill(first, "jobs", 6, 0, rf=3)
    g = GroupRpc([b.address for b in cluster.brokers.values()], "crew")
    a = g.heartbeat(member_id="", member_epoch=0, subscribed_topics=pb.Subscription(topics=["jobs"]))
    b = g.heartbeat(member_id="", member_epoch=0, subscribed_topics=pb.Subscription(topics=["jobs"]))
    owned = {a.member_id: a.assignment, b.member_id: b.assignment}
    epochs = {a.member_id: a.member_epoch, b.member_id: b.member_epoch}

    def settled() -> bool:
        for member in list(owned):
            r = g.heartbeat(member_id=member, member_epoch=epochs[member], owned_partitions=owned[member])
            assert r.error_code == pb.NONE, r
            owned[member], epochs[member] = r.assignment, r.member_epoch
        return sorted(sum(len(t.partitions) for t in x.topics) for x in owned.values()) == [3, 3]

    wait_for(settled, 30, "the group settled 3/3")
    before = {m: sorted((t.topic, p) for t in x.topics for p in t.partitions) for m, x in owned.items()}
    victim = next(i for i, br in cluster.brokers.items() if br.address == g.address)
    cluster.kill9(victim)
    g.address = ""
    for member in owned:  # the new coordinator knows them: same epoch, same partitions, no rejoin
        r = g.heartbeat(member_id=member, member_epoch=epochs[member], owned_partitions=owned[member])
        assert r.error_code == pb.NONE, r
        assert r.member_epoch == epochs[member]
        assert sorted((t.topic, p) for t in r.assignment.topics for p in t.partitions) == before[member]


def test_hostile_heartbeats_are_refused_cheaply(standalone: BrokerProcess) -> None:
    _create_and_fill(standalone.address, "a" * 60, 1, 0)
    g = GroupRpc([standalone.address], "g")
    join = g.heartbeat(member_id="", member_epoch=0, subscribed_regex="(.|..|...)*#")  # ReDoS for backtracking
    assert join.error_code == pb.NONE
    huge = pb.Assignment(topics=[pb.TopicPartitions(topic="t", partitions=range(100_001))])
    r = g.heartbeat(member_id=join.member_id, member_epoch=join.member_epoch, owned_partitions=huge)
    assert r.error_code == pb.INVALID_REQUEST and "owned partitions" in r.error_message
    bad = g.heartbeat(member_id="", member_epoch=0, subscribed_regex=r"(a)\1")
    assert bad.error_code == pb.INVALID_REGULAR_EXPRESSION
    assert g.heartbeat(member_id=join.member_id, member_epoch=join.member_epoch).error_code == pb.NONE
    ghost = GroupRpc([standalone.address], "ghost")  # a refused first join leaves no group behind
    assert ghost.heartbeat(member_id="", member_epoch=0, subscribed_regex="(").error_code == \
        pb.INVALID_REGULAR_EXPRESSION
    d = pbg.AdminStub(grpc.insecure_channel(standalone.address)).DescribeGroup(pb.DescribeGroupRequest(group="ghost"))
    assert d.error_code == pb.GROUP_ID_NOT_FOUND


def test_leaving_is_answered_as_done(standalone: BrokerProcess) -> None:
    _create_and_fill(standalone.address, "t", 2, 0)
    g = GroupRpc([standalone.address], "g")
    a = g.heartbeat(member_id="", member_epoch=0, subscribed_topics=pb.Subscription(topics=["t"]))
    b = g.heartbeat(member_id="", member_epoch=0, subscribed_topics=pb.Subscription(topics=["t"]))
    for m in (a, b):  # the first of two leaves, then the last one (the group empties)
        r = g.heartbeat(member_id=m.member_id, member_epoch=-1)
        assert (r.error_code, r.member_epoch) == (pb.NONE, -1), r
