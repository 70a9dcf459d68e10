"""Adding partitions keeps per-key order on a cluster (cluster/lineage.py, server/split_point.py): three
brokers and real ZooKeeper, a keyed producer producing all along, a group consumer (or a share
group's QueueConsumer) reading all along, the topic grown from 6 to 8 partitions half-way. The split
is recorded pending, completed once every old partition's leader refuses moved keys and has given
its log end offset; every key's consumed order equals its acknowledged order, and only the keys
whose hash moved change partition (the same run and checks as the standalone test_reshard.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from logbroker.client.admin import Admin
from logbroker.client.consumer import Consumer
from logbroker.client.producer import Producer
from logbroker.client.queue import QueueConsumer
from logbroker.cluster.hashing import partition_for_key
from logbroker.cluster.lineage import SPLIT_PENDING
from logbroker.errors import PartitionCountChangedError, RequestTimedOutError
from tests.cluster import Cluster
from tests.conftest import wait_for
from tests.integration.test_reshard import _check, _run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture
def cluster(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=4000,
                extra_args=["--offsets-topic-partitions", "4"])
    try:
        yield c.start()
    finally:
        c.stop()


def _complete_lineage(bootstrap: str) -> dict[int, dict[int, int]]:
    """The lineage `topics describe` shows once every broker has the complete split."""
    with Admin(bootstrap) as admin:
        return {p.partition: p.parents for p in admin.describe_topic("rs").partitions}


def _assert_split_recorded(cluster: Cluster) -> None:
    for b in cluster.brokers.values():  # every broker's metadata: parents with their split offsets
        wait_for(lambda b=b: all(o >= 0 for o in _complete_lineage(b.address)[6].values()), 30,
                 f"the complete split on {b.address}")
    lineage = _complete_lineage(cluster.bootstrap)
    assert set(lineage[6]) == set(range(6)) and lineage[6] == lineage[7]


def test_a_group_keeps_every_keys_order_across_added_partitions_on_a_cluster(cluster: Cluster) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("rs", partitions=6, replication_factor=2)
    with Consumer(cluster.bootstrap, ["rs"], "reshard", auto_offset_reset="earliest",
                  auto_commit_interval_ms=200) as c:  # small batches: several in flight behind a refused one
        _check(*_run(cluster.bootstrap, c, ack=False, producer_options={"batch_size_bytes": 256}))
    _assert_split_recorded(cluster)


def test_a_share_group_keeps_every_keys_order_across_added_partitions_on_a_cluster(cluster: Cluster) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("rs", partitions=6, replication_factor=2)
    with QueueConsumer(cluster.bootstrap, "reshard-q", ["rs"], auto_offset_reset="earliest", ordering="key") as q:
        _check(*_run(cluster.bootstrap, q, ack=True))
    _assert_split_recorded(cluster)


def test_every_leader_of_a_grown_topic_refuses_a_moved_key_unless_the_topic_opts_out(cluster: Cluster) -> None:
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("on", partitions=2, replication_factor=2)
        admin.create_topic("off", partitions=2, replication_factor=2, config={"key_order_on_growth": "false"})
        admin.create_partitions("on", 3)
        admin.create_partitions("off", 3)
        assert all(not p.parents for p in admin.describe_topic("off").partitions)
        wait_for(lambda: all(o >= 0 for o in admin.describe_topic("on").partitions[2].parents.values()), 30,
                 "the complete split of topic on")
    key = next(f"k{i}".encode() for i in range(1000) if partition_for_key(f"k{i}".encode(), 3) == 2)
    with Producer(cluster.bootstrap, enable_idempotence=False) as producer:
        with pytest.raises(PartitionCountChangedError):
            producer.send("on", b"v", key=key, partition=0).result(30)
        assert producer.send("on", b"v", key=key).result(30).partition == 2
        assert producer.send("off", b"v", key=key, partition=0).result(30).partition == 0


def test_a_split_stays_pending_while_an_old_leader_is_stopped_and_growing_again_finishes_it(
        zookeeper, zk_chroot, tmp_path) -> None:
    # a session long enough that the stopped leader keeps its partitions: nobody else can fence them
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=60_000, extra_args=["--offsets-topic-partitions", "1"])
    try:
        c.start()
        controller = c.describe_cluster().controller_id
        via = c.brokers[controller].address  # the Admin talks to the controller only
        with Admin(via) as admin:
            admin.create_topic("p", partitions=3, replication_factor=1)
            wait_for(lambda: all(s.leader >= 0 for s in c.partition_states("p", controller).values()), 30,
                     "leaders of p")
        states = c.partition_states("p", controller)
        victim = next(s.leader for s in states.values() if s.leader != controller)
        with Producer(c.bootstrap) as producer:
            for i in range(60):
                producer.send("p", b"v", key=f"k{i}".encode())
            producer.flush(30)
        c.sigstop(victim)
        with Admin(via) as admin:
            with pytest.raises(RequestTimedOutError):
                admin.create_partitions("p", 4)  # the stopped leader never says it refuses moved keys
            assert admin.describe_topic("p").partitions[3].parents == dict.fromkeys(range(3), SPLIT_PENDING)
            c.sigcont(victim)
            admin.create_partitions("p", 4)  # the same count again: finishes the split
            wait_for(lambda: all(o >= 0 for o in admin.describe_topic("p").partitions[3].parents.values()), 30,
                     "the complete split")
            parents = admin.describe_topic("p").partitions[3].parents
        ends = {p: c.partition_states("p", s.leader)[p].log_end_offset for p, s in states.items()}
        assert parents == {p: ends[p] for p in range(3)} and sum(ends.values()) == 60
    finally:
        c.stop()  # continues a stopped broker first
