"""Bad replicas in a real cluster (ZooKeeper + 2 brokers): a replica that must not lead is reported,
the controller moves leadership to another in-sync replica (or leaves the partition leaderless), and
the bad copy re-fetches and rejoins the ISR. No acknowledged record is lost.

- The LEADER's copy gets a flipped bit in a closed segment (on disk, under the running broker): its
  scrubber reports it, the other replica leads, the old leader truncates to the bad batch, re-fetches,
  and is back in the ISR with a byte-identical copy.
- Both replicas die; the leader's partition directory vanishes; it comes back first, the ISR member
  the controller would elect: its registration names the lost log (and a LeaderAndIsr for it is
  answered KAFKA_STORAGE_ERROR), so it is not elected; the partition waits leaderless for the other
  ISR member, which then leads, and the broker re-fetches. An RF=1 partition that lost its log stays
  offline until `logbroker topics recover-empty`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from logbroker import Admin
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.cluster import Cluster
from tests.conftest import wait_for
from tests.integration.test_scrubber import (
    SCRUB_FAST,
    TINY,
    flip_bit_in_closed_segment,
    produce,
    read_replica,
)
from tests.integration.test_topic_identity import consume, isr

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture
def pair(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 2, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "3000", *SCRUB_FAST])
    try:
        yield c.start()
    finally:
        c.stop()


def values(n: int) -> list[bytes]:
    return [b"record-%04d-" % i + b"x" * 400 for i in range(n)]


def test_leader_with_a_flipped_bit_hands_over_refetches_and_rejoins(pair: Cluster):
    c = pair
    with Admin(c.bootstrap) as admin:
        admin.create_topic("r", partitions=1, replication_factor=2, config=TINY)
    wait_for(lambda: isr(c, "r") == [0, 1], 30, "both replicas in the ISR")
    leader = c.leader_of("r", 0)
    other = 1 - leader
    produce(c.brokers[leader].address, "r", 100, acks=-1)
    end = c.high_watermark("r", 0)
    assert end == 100
    wait_for(lambda: c.replica_batches(other, "r", 0) == c.replica_batches(leader, "r", 0), 30, "in sync")

    # silent corruption under the running leader (its page cache: what its mmap and scrubber see)
    _segment, offset, _position = flip_bit_in_closed_segment(c.brokers[leader].data_dir / "r-0")
    report = f"scrub: r-0 (leader on broker {leader}) has corrupt batches"
    wait_for(lambda: report in c.brokers[leader].log_text(), 30, "the leader's scrubber report")
    moved = f"follows broker {other} now: truncating its copy to the corrupt batch at offset {offset}"
    wait_for(lambda: moved in c.brokers[leader].log_text(), 30, "the old leader to follow and truncate")
    # every acknowledged record is readable while the old leader re-fetches: the healthy replica leads
    assert consume(c.bootstrap, "r", 100) == values(100)
    wait_for(lambda: c.replica_batches(leader, "r", 0) == c.replica_batches(other, "r", 0), 30,
             "the old leader's copy byte-identical again")
    wait_for(lambda: isr(c, "r") == [0, 1], 30, "the old leader back in the ISR")
    assert c.high_watermark("r", 0) == end
    assert consume(c.bootstrap, "r", 100) == values(100)
    a_resp, a_bytes = read_replica(c.brokers[leader].address, "r", 0)
    b_resp, b_bytes = read_replica(c.brokers[other].address, "r", 0)
    assert a_bytes == b_bytes and a_resp.log_end_offset == b_resp.log_end_offset == end


def cli(address: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": address}
    return subprocess.run([sys.executable, "-m", "logbroker", *args], capture_output=True, env=env, timeout=60)


def produce_one(address: str, topic: str, partition: int) -> int:
    from logbroker.storage.record_batch import encode_batch

    with grpc.insecure_channel(address) as ch:
        req = pb.ProduceRequest(acks=1, timeout_ms=5000, partitions=[
            pb.ProducePartition(topic=topic, partition=partition, records=encode_batch([(1, None, b"v", None)]))])
        return pbg.BrokerStub(ch).Produce(req, timeout=10).results[0].error_code


@pytest.fixture
def trio(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    """Broker 0 (started first: the controller) with a long ZooKeeper session, so it can be paused
    while the sessions of brokers 1 and 2 expire and then see both gone in one look."""
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "3000"])
    args = c.brokers[0].extra_args
    args[args.index("--zk-session-timeout-ms") + 1] = "12000"
    try:
        yield c.start()
    finally:
        c.stop()


def registered(zookeeper, chroot: str) -> set[int]:
    from logbroker.cluster.zk_store import ZkStore

    store = ZkStore(zookeeper.address, chroot, session_timeout_ms=4000)
    store.start()
    try:
        return set(store.live_brokers())
    finally:
        store.close()


def place(c: Cluster, topic: str, replicas: list[int]) -> None:
    with Admin(c.bootstrap) as admin:
        admin.reassign_partition(topic, 0, replicas)
    wait_for(lambda: list(c.partition_states(topic)[0].replicas) == replicas
             and isr(c, topic) == sorted(replicas), 60, f"{topic}-0 on {replicas}, all in sync")


def test_leader_whose_log_vanished_never_leads_it_empty(trio: Cluster, zookeeper, zk_chroot):
    c = trio
    wait_for(lambda: c.describe_cluster().controller_id == 0, 30, "broker 0 to be the controller")
    with Admin(c.bootstrap) as admin:
        admin.create_topic("v", partitions=1, replication_factor=2, config=TINY)
        admin.create_topic("solo", partitions=1, replication_factor=1)
    place(c, "v", [1, 2])
    leader = c.leader_of("v", 0)
    other = 3 - leader
    place(c, "solo", [leader])
    produce(c.brokers[leader].address, "v", 60, acks=-1)
    wait_for(lambda: c.replica_batches(other, "v", 0) == c.replica_batches(leader, "v", 0), 30, "in sync")
    assert produce_one(c.brokers[leader].address, "solo", 0) == pb.NONE

    # both replicas die and the controller sees them gone at once: v-0 leaderless, ISR [1, 2] kept
    c.sigstop(0)
    try:
        c.kill9(1)
        c.kill9(2)
        wait_for(lambda: registered(zookeeper, zk_chroot) == {0}, 30, "the sessions of 1 and 2 to expire")
    finally:
        c.sigcont(0)
    wait_for(lambda: c.leader_of("v", 0) == -1, 30, "v-0 leaderless")
    assert isr(c, "v") == [1, 2]
    # the leader's directories vanish; it comes back first and is the ISR member the controller names
    shutil.rmtree(c.brokers[leader].data_dir / "v-0")
    shutil.rmtree(c.brokers[leader].data_dir / "solo-0")
    c.brokers[leader].start(60)
    refused = "it refuses (KAFKA_STORAGE_ERROR)"
    wait_for(lambda: c.brokers[leader].log_text().count(refused) >= 2, 30, "the named leader to refuse")
    wait_for(lambda: c.leader_of("v", 0) == -1, 30, "v-0 leaderless again: never led empty")
    assert not (c.brokers[leader].data_dir / "v-0").exists()

    c.brokers[other].start(60)
    wait_for(lambda: c.leader_of("v", 0) == other, 30, "the healthy ISR member to lead")
    wait_for(lambda: isr(c, "v") == [1, 2], 60, "the re-fetched replica back in the ISR")
    assert consume(c.bootstrap, "v", 60) == values(60)
    assert c.replica_batches(leader, "v", 0) == c.replica_batches(other, "v", 0)

    # RF=1: nobody else can lead; offline until an operator accepts the loss
    assert c.leader_of("solo", 0) == -1
    assert produce_one(c.brokers[leader].address, "solo", 0) == pb.KAFKA_STORAGE_ERROR
    done = cli(c.brokers[leader].address, "topics", "recover-empty", "solo", "0")
    assert done.returncode == 0, done.stderr.decode()
    wait_for(lambda: c.leader_of("solo", 0) == leader, 30, "the recovered replica to lead")
    wait_for(lambda: produce_one(c.brokers[leader].address, "solo", 0) == pb.NONE, 30, "produce to work")
