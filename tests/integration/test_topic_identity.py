"""Topic ids and vanished logs in a real cluster (ZooKeeper + 2 brokers).

- A topic deleted while broker 1 was down and created again under the same name: broker 1's old
  log has the old topic id, so it is deleted when broker 1 becomes a replica of the new topic; it
  fetches the new records from the leader and, once it leads, serves only those.
- A follower whose partition directory vanished re-creates it, fetches everything from the leader,
  and is back in the ISR only once caught up.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import grpc
import pytest

from logbroker import Admin, Consumer, Producer
from tests.cluster import Cluster
from tests.conftest import wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]


@pytest.fixture
def cluster2(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 2, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "3000"])
    try:
        yield c.start()
    finally:
        c.stop()


def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    with Producer(bootstrap, acks=-1, request_timeout_ms=5000, delivery_timeout_ms=30_000) as p:
        futures = [p.send(topic, v, partition=0) for v in values]
        p.flush()
        for f in futures:
            f.result(timeout=30)


def consume(bootstrap: str, topic: str, expected: int) -> list[bytes]:
    out: list[bytes] = []
    with Consumer(bootstrap, topics=None, auto_offset_reset="earliest") as c:
        c.assign([(topic, 0)])
        idle = 0
        while idle < 5 and len(out) < expected + 1:
            got = c.poll(timeout_ms=300)
            idle = 0 if got else idle + 1
            out.extend(m.value for m in got)
    return out


def isr(c: Cluster, topic: str) -> list[int]:
    try:
        return sorted(c.partition_states(topic)[0].isr)
    except (grpc.RpcError, KeyError, AssertionError, IndexError):
        return []


def test_recreated_topic_never_serves_the_old_log(cluster2: Cluster):
    c = cluster2
    with Admin(c.bootstrap) as admin:
        admin.create_topic("t", partitions=1, replication_factor=2)
        old_id = admin.describe_topic("t").topic_id
    produce(c.bootstrap, "t", [b"old-%d" % i for i in range(30)])
    wait_for(lambda: isr(c, "t") == [0, 1], 30, "both replicas in sync")
    wait_for(lambda: len(c.replica_batches(1, "t", 0)) > 0, 30, "broker 1 has the old records")
    c.brokers[1].stop()
    with Admin(c.brokers[0].address) as admin:
        admin.delete_topic("t")
        wait_for(lambda: "t" not in admin.list_topics(), 30, "the deletion to finish")
        admin.create_topic("t", partitions=1, replication_factor=1)  # only broker 0 is up
        new_id = admin.describe_topic("t").topic_id
    assert new_id and new_id != old_id
    assert (c.brokers[1].data_dir / "t-0").exists()  # broker 1 still has the old incarnation's log
    produce(c.brokers[0].address, "t", [b"new-%d" % i for i in range(40)])

    c.brokers[1].start()
    with Admin(c.bootstrap) as admin:
        admin.reassign_partition("t", 0, [0, 1])
    wait_for(lambda: isr(c, "t") == [0, 1], 60, "broker 1 back in the ISR of the new topic")
    # the old incarnation's log went, either as a stray replica (the controller's first metadata
    # names the new topic without broker 1) or, had it been named, by its topic id
    text = c.brokers[1].log_text()
    assert "belongs to topic id " + old_id in text or "deletes its stray replica of t-0" in text
    c.brokers[0].stop()  # broker 1 leads now
    wait_for(lambda: c.leader_of("t", 0) == 1, 30, "broker 1 to lead")
    got = consume(c.brokers[1].address, "t", 40)
    assert got == [b"new-%d" % i for i in range(40)]


def test_follower_with_a_vanished_directory_refetches_and_rejoins_the_isr_when_caught_up(cluster2: Cluster):
    c = cluster2
    with Admin(c.bootstrap) as admin:
        admin.create_topic("f", partitions=1, replication_factor=2)
    leader = c.leader_of("f", 0)
    follower = 1 - leader
    produce(c.bootstrap, "f", [b"v-%d" % i for i in range(200)])
    wait_for(lambda: isr(c, "f") == [0, 1], 30, "both replicas in sync")
    c.brokers[follower].stop()
    wait_for(lambda: isr(c, "f") == [leader], 30, "the stopped follower out of the ISR")
    shutil.rmtree(c.brokers[follower].data_dir / "f-0")
    c.brokers[follower].start()
    wait_for(lambda: isr(c, "f") == [0, 1], 60, "the follower back in the ISR")
    # it joined the ISR holding every record: its copy is the leader's
    assert c.replica_batches(follower, "f", 0) == c.replica_batches(leader, "f", 0)
    assert "f-0 is missing" in c.brokers[follower].log_text()
    assert "fetched again from the leader" in c.brokers[follower].log_text()
