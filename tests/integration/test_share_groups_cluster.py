"""Share groups on a 3-broker cluster (real ZooKeeper) across a kill -9.

A topic of 2 partitions, replication factor 3, min ISR 2. A QueueConsumer acquires every record,
acknowledges some (commit_acks: accepted), releases a few (delivery count 1, available again) and
holds the rest; then a broker is killed with -9:

- the leader of a data partition (one the group's coordinator does not lead, when there is one, so
  the coordinator reads it remotely and must follow the leader to its new home), or
- the group's coordinator (the leader of its `__consumer_offsets` partition): the share state is
  rebuilt by the new coordinator from the snapshots, and the client must rejoin by itself.

After the failover: accepted acknowledgements stay settled (those records never come back), delivery
counts continue (a released record comes with delivery count 2; a record held by a member the new
coordinator does not know comes with 2 as well), and every other record is acknowledged exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Producer, QueueConsumer
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.cluster import Cluster
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

TOPIC = "jobs"
GROUP = "workers"
PER_PARTITION = 20
Key = tuple[int, int]  # (partition, offset)


@pytest.fixture
def cluster3(zookeeper, zk_chroot: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=4000, extra_args=[
        "--offsets-topic-partitions", "2", "--replica-lag-time-max-ms", "3000"])
    try:
        yield c.start()
    finally:
        c.stop()


def coordinator_of(cluster: Cluster, group: str) -> int:
    for b in cluster.brokers.values():
        if b.proc is None or b.proc.poll() is not None:
            continue
        with grpc.insecure_channel(b.address) as ch:
            try:
                resp = pbg.BrokerStub(ch).FindCoordinator(pb.FindCoordinatorRequest(group=group), timeout=5)
            except grpc.RpcError:
                continue
            if resp.error_code == pb.NONE:
                return resp.broker_id
    return -1


def _produce(cluster: Cluster) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(TOPIC, partitions=2, replication_factor=3, config={"min_insync_replicas": "2"})
    wait_for(lambda: all(cluster.leader_of(TOPIC, p) >= 0 for p in (0, 1)), 30, "leaders of both partitions")
    with Producer(cluster.bootstrap, acks="all") as producer:
        futures = [producer.send(TOPIC, b"job-%d-%d" % (p, i), partition=p)
                   for p in (0, 1) for i in range(PER_PARTITION)]
        producer.flush(30)
        for f in futures:
            f.result(10)


def _acquire_all(c: QueueConsumer, want: int, timeout_s: float = 60.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(c.poll(500))
    return got


def _accepted(outcome: dict) -> set[Key]:
    return {(p, o) for (_, p, o), err in outcome.items() if err is None}


def _run(cluster: Cluster, victim_of: str) -> None:
    _produce(cluster)
    total = 2 * PER_PARTITION
    everything = {(p, o) for p in (0, 1) for o in range(PER_PARTITION)}
    with QueueConsumer(cluster.bootstrap, GROUP, [TOPIC], auto_offset_reset="earliest", lock_ms=60_000,
                       request_timeout_ms=10_000) as c:
        first = _acquire_all(c, total)
        assert {(m.partition, m.offset) for m in first} == everything
        assert {m.delivery_count for m in first} == {1}
        # per partition: offsets 0..9 acknowledged, 10..12 released, 13..19 held
        for m in first:
            if m.offset < 10:
                m.ack()
        acked_before = _accepted(c.commit_acks())
        assert acked_before == {(p, o) for p in (0, 1) for o in range(10)}
        released = {(m.partition, m.offset) for m in first if 10 <= m.offset < 13}
        for m in first:
            if 10 <= m.offset < 13:
                m.release()
        assert _accepted(c.commit_acks()) == released
        held = [m for m in first if m.offset >= 13]

        coordinator = coordinator_of(cluster, GROUP)
        assert coordinator >= 0
        if victim_of == "coordinator":
            victim = coordinator
        else:
            leaders = {p: cluster.leader_of(TOPIC, p) for p in (0, 1)}
            remote = [p for p, lead in leaders.items() if lead != coordinator]
            assert remote, f"the coordinator {coordinator} leads both partitions: {leaders}"
            victim = leaders[remote[0]]
        cluster.kill9(victim)

        # the records still held: acknowledged now if the coordinator kept them, else they come again
        held_acked = _accepted(commit_all(c, held)) if victim != coordinator else set()
        assert victim == coordinator or held_acked == {(m.partition, m.offset) for m in held}

        wanted = everything - acked_before - held_acked
        acked_after: list[Key] = []
        counts: dict[Key, int] = {}
        deadline = time.monotonic() + 45  # well inside lock_ms: nothing may wait for a lock to run out
        while set(acked_after) != wanted and time.monotonic() < deadline:
            for m in c.poll(500):
                key = (m.partition, m.offset)
                assert key not in acked_before and key not in held_acked, f"{key} came back after its ack"
                counts[key] = m.delivery_count
                m.ack()
            acked_after += sorted(_accepted(c.commit_acks()))
        assert sorted(acked_after) == sorted(wanted), "every record acknowledged exactly once after the failover"
        for key in released:
            assert counts[key] == 2, f"released {key} delivered with count {counts[key]}"
        if victim == coordinator:
            for m in held:
                assert counts[(m.partition, m.offset)] == 2
        assert c.poll(500) == []


def commit_all(c: QueueConsumer, messages: list) -> dict:
    for m in messages:
        m.ack()
    return c.commit_acks()


@pytest.mark.parametrize("victim_of", ["data-leader", "coordinator"])
def test_share_state_survives_kill_9_in_a_cluster(cluster3: Cluster, victim_of: str) -> None:
    _run(cluster3, victim_of)
