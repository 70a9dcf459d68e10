"""Compaction on a replicated partition (real ZooKeeper, 2 brokers): leader and follower each run
their own LogCleaner over their own copy; once both cleaned, the follower's compacted copy holds
the same records as the leader's (record-wise, from the segment files) and, after the leader
stops, serves the latest value of every key to a consumer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from logbroker.client.admin import Admin
from logbroker.client.producer import Producer
from logbroker.storage import record_batch as rb
from tests.cluster import Cluster
from tests.conftest import wait_for
from tests.integration.test_log_cleaner_crash import TOPIC, UPDATES, consume_all

KEYS = 100
Record = tuple[int, bytes | None, bytes | None]


@pytest.fixture
def cluster2(zookeeper, zk_chroot: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 2, extra_args=[
        "--log-cleaner-interval-ms", "200", "--replica-lag-time-max-ms", "3000"])
    try:
        yield c.start()
    finally:
        c.stop()


def replica_records(cluster: Cluster, i: int) -> list[Record]:
    out: list[Record] = []
    for batch in cluster.replica_batches(i, TOPIC, 0):
        h = rb.parse_header(batch, 0)
        out += [(m.offset, m.key, m.value) for m in rb.decode_batch(batch, 0, h, TOPIC, 0)]
    return out



def test_follower_compacted_copy_serves_the_same_records(cluster2: Cluster) -> None:
    with Admin(cluster2.bootstrap) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=2, config={
            "cleanup_policy": "compact", "segment_bytes": str(1 << 14), "min_cleanable_dirty_ratio": "0.01",
            "min_insync_replicas": "2"})
    latest: dict[bytes, bytes] = {}
    with Producer(cluster2.bootstrap, acks="all", linger_ms=5, batch_size_bytes=2048) as producer:
        for i in range(UPDATES):
            key, value = b"key-%03d" % (i % KEYS), b"value-%06d" % i
            latest[key] = value
            producer.send(TOPIC, value, key=key)
            if i % 200 == 199:
                producer.flush()
        producer.flush()

    def cleaned(i: int) -> bool:
        recs = replica_records(cluster2, i)
        return bool(recs) and recs[-1][0] == UPDATES - 1 and len(recs) < UPDATES // 4

    wait_for(lambda: cleaned(0) and cleaned(1), 60, "both replicas to be compacted")
    # both cleaners stop once only the active segment is dirty: the copies converge
    wait_for(lambda: replica_records(cluster2, 0) == replica_records(cluster2, 1), 30,
             "the follower's compacted copy to hold the leader's records")
    for i in (0, 1):
        recs = replica_records(cluster2, i)
        offsets = [o for o, _, _ in recs]
        assert offsets == sorted(set(offsets))
        assert {k: v for _, k, v in recs} == latest

    leader = cluster2.leader_of(TOPIC, 0)
    follower = 1 - leader
    offsets, got = consume_all(cluster2.brokers[leader].address)
    assert got == latest and offsets == sorted(set(offsets)) and offsets[-1] == UPDATES - 1
    cluster2.brokers[leader].stop()
    wait_for(lambda: cluster2.leader_of(TOPIC, 0) == follower, 30, "the follower to take the leadership")
    offsets, got = consume_all(cluster2.brokers[follower].address)
    assert got == latest and offsets == sorted(set(offsets)) and offsets[-1] == UPDATES - 1
