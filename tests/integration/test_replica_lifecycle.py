"""Replica lifecycle on a real cluster (real ZooKeeper, real broker processes, real faults):

- a broker paused past its ZooKeeper session rejoins every ISR, and the ISR does not flap while it
  comes back (only a registered broker at its current epoch joins an ISR: KIP-841);
- a follower's log start offset follows its leader's (retention there is mirrored);
- a replica moved off a stopped broker by a reassignment is deleted when that broker returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from kazoo.client import KazooClient

from logbroker import Admin, Producer
from logbroker.v1 import logbroker_pb2 as pb
from tests.cluster import Cluster
from tests.conftest import wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

SESSION_TIMEOUT_MS = 2000


@contextmanager
def running(c: Cluster) -> Iterator[Cluster]:
    try:
        yield c.start()
    finally:
        c.stop()


@contextmanager
def zk_client(zookeeper, chroot: str) -> Iterator[KazooClient]:
    client = KazooClient(hosts=zookeeper.address + chroot, timeout=10)
    client.start(timeout=10)
    try:
        yield client
    finally:
        client.stop()
        client.close()


def state_versions(zk: KazooClient, topic: str, partitions: int) -> list[int]:
    """The znode version of each partition's state: one per leader/ISR change."""
    return [zk.get(f"/topics/{topic}/partitions/{p}/state")[1].version for p in range(partitions)]


def states(c: Cluster, topic: str, via: int | None = None) -> dict[int, pb.PartitionDescription]:
    try:
        return c.partition_states(topic, via)
    except (grpc.RpcError, AssertionError, IndexError):
        return {}


def full_isr(c: Cluster, topic: str, partitions: int, size: int, via: int | None = None) -> bool:
    st = states(c, topic, via)
    return len(st) == partitions and all(s.leader >= 0 and len(s.isr) == size for s in st.values())


def registered(c: Cluster, via: int) -> set[int]:
    try:
        return {b.broker_id for b in c.describe_cluster(via).brokers}
    except grpc.RpcError:
        return set()


def segment_bases(data_dir: Path, topic: str, partition: int) -> list[int]:
    return sorted(int(p.stem) for p in (data_dir / f"{topic}-{partition}").glob("*.log"))


def test_broker_paused_past_its_session_rejoins_every_isr_without_flapping(zookeeper, zk_chroot, tmp_path):
    topic = "paused"
    partitions = 3
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=SESSION_TIMEOUT_MS,
                extra_args=["--replica-lag-time-max-ms", "3000"])
    with running(c), zk_client(zookeeper, zk_chroot) as zk:
        with Admin(c.bootstrap) as admin:
            admin.create_topic(topic, partitions=partitions, replication_factor=3)
        wait_for(lambda: full_isr(c, topic, partitions, 3), 60, "every partition led with a full ISR")
        with Producer(c.bootstrap, acks="all") as producer:
            for i in range(300):
                producer.send(topic, b"v-%d" % i, partition=i % partitions)
            producer.flush(30)
        paused = c.leader_of(topic, 0)
        other = next(b for b in c.brokers if b != paused)
        before = state_versions(zk, topic, partitions)
        c.sigstop(paused)
        try:  # paused until its session is gone and the controller has moved on without it
            wait_for(lambda: paused not in registered(c, other), 30, "the paused broker's session to expire")
            wait_for(lambda: all(paused not in s.isr and s.leader not in (-1, paused)
                                 for s in states(c, topic, other).values()), 30, "leadership and ISRs without it")
        finally:
            c.sigcont(paused)
        # Back: it must end up in the ISR of every partition (its LeaderAndIsr is never lost) ...
        wait_for(lambda: paused in registered(c, other), 30, "the broker registered again")
        wait_for(lambda: full_isr(c, topic, partitions, 3, other), 60, "the resumed broker in every ISR")
        after = state_versions(zk, topic, partitions)
        # ... and each partition's state changed a handful of times (out, leader change, back in,
        # maybe the preferred leader again), not once per stale fetch.
        changes = [a - b for a, b in zip(after, before, strict=True)]
        assert all(n <= 5 for n in changes), f"ISR flapped: state changes per partition {changes}"


def test_follower_log_start_follows_the_leaders_retention(zookeeper, zk_chroot, tmp_path):
    """Broker 0 runs retention often, brokers 1 and 2 never: a follower on 1 or 2 of a partition
    broker 0 leads can only lose its old segments by following the leader's log start offset."""
    topic = "retained"
    partitions = 6
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=6000)
    for i, b in c.brokers.items():
        b.extra_args += ["--retention-check-interval-ms", "200" if i == 0 else "3600000"]
    with running(c):
        with Admin(c.bootstrap) as admin:
            admin.create_topic(topic, partitions=partitions, replication_factor=2,
                               config={"segment_bytes": str(1 << 14), "retention_bytes": str(1 << 15)})
        wait_for(lambda: full_isr(c, topic, partitions, 2), 60, "every partition led with a full ISR")
        led = [p for p, s in states(c, topic).items() if s.leader == 0]
        assert led, "broker 0 leads no partition"
        p = led[0]
        follower = next(b for b in states(c, topic)[p].replicas if b != 0)
        with Producer(c.bootstrap, acks="all") as producer:  # one append per flush: many 16 KiB segments
            for _ in range(40):
                for _ in range(10):
                    producer.send(topic, b"x" * 1000, partition=p)
                producer.flush(30)
        follower_dir = c.brokers[follower].data_dir

        def leader_log_start() -> int:
            ch, _, broker = c._stub(0)
            try:
                resp = broker.ListOffsets(pb.ListOffsetsRequest(partitions=[
                    pb.ListOffsetsPartition(topic=topic, partition=p, timestamp=-2)]), timeout=5)
                return resp.results[0].offset
            finally:
                ch.close()

        wait_for(lambda: leader_log_start() > 0, 30, "retention on the leader")
        with Producer(c.bootstrap, acks="all") as producer:  # one more fetch carries the new log start
            producer.send(topic, b"last", partition=p)
            producer.flush(30)
        lso = leader_log_start()
        wait_for(lambda: segment_bases(follower_dir, topic, p)[0] > 0, 30, "the follower deleting old segments")
        bases = segment_bases(follower_dir, topic, p)
        assert bases[0] <= lso, (bases, lso)
        assert "log start offset now" in c.brokers[follower].log_text()


def test_replica_moved_off_a_stopped_broker_is_deleted_when_it_returns(zookeeper, zk_chroot, tmp_path):
    topic = "moved"
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=SESSION_TIMEOUT_MS)
    with running(c):
        with Admin(c.bootstrap) as admin:
            admin.create_topic(topic, partitions=1, replication_factor=2)
        wait_for(lambda: full_isr(c, topic, 1, 2), 60, "the partition led with a full ISR")
        with Producer(c.bootstrap, acks="all") as producer:
            for i in range(100):
                producer.send(topic, b"v-%d" % i, partition=0)
            producer.flush(30)
        st = states(c, topic)[0]
        victim = next(b for b in st.replicas if b != st.leader)
        spare = next(b for b in c.brokers if b not in st.replicas)
        other = st.leader
        victim_dir = c.brokers[victim].data_dir / f"{topic}-0"
        assert victim_dir.is_dir()
        c.brokers[victim].stop()
        wait_for(lambda: victim not in registered(c, other), 30, "the stopped broker gone")
        with Admin(c.brokers[other].address) as admin:
            admin.reassign_partition(topic, 0, [other, spare])
        wait_for(lambda: sorted(states(c, topic, other).get(0, pb.PartitionDescription()).replicas)
                 == sorted([other, spare]) and full_isr(c, topic, 1, 2, other), 60, "the reassignment done")
        c.brokers[victim].start(60)
        wait_for(lambda: not victim_dir.exists(), 30, "the stray replica deleted")
        assert f"deletes its stray replica of {topic}-0" in c.brokers[victim].log_text()
