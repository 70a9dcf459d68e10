"""Priority levels on a 3-broker cluster (real ZooKeeper): the level topics are created with their
topic and placed as it is (same replicas per partition, so the share coordinator reads the levels
locally while leadership stays where it was placed), urgent records come first, and deleting the
topic deletes its levels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from logbroker import Admin, Producer, QueueConsumer
from logbroker.errors import UnknownTopicOrPartitionError
from tests.cluster import Cluster
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def cluster3(zookeeper, zk_chroot: str, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=4000,
                extra_args=["--offsets-topic-partitions", "2"])
    try:
        yield c.start()
    finally:
        c.stop()


def test_levels_on_a_cluster(cluster3: Cluster) -> None:
    bootstrap = cluster3.bootstrap
    with Admin(bootstrap) as admin:
        admin.create_topic("jobs", partitions=3, replication_factor=2, config={"priority_levels": "3"})
        wait_for(lambda: len(admin.describe_topic("__priority.2.jobs").partitions) == 3, 20, "level topic")
        placement = {p.partition: p.replicas for p in admin.describe_topic("jobs").partitions}
        for level in (1, 2):
            assert {p.partition: p.replicas for p in admin.describe_topic(f"__priority.{level}.jobs").partitions} \
                == placement
    with Producer(bootstrap) as p:
        for _ in range(5):
            p.send_many("jobs", [b"low"] * 2_000)
        p.send_many("jobs", [b"mid"] * 5, priority=1)
        p.send_many("jobs", [b"top"] * 5, priority=2)
        p.flush(30)
    with QueueConsumer(bootstrap, "g", ["jobs"], auto_offset_reset="earliest", max_poll_records=50) as c:
        got: list = []
        wait_for(lambda: got.extend(c.poll(1_000)) or len(got) >= 10, 60, "ten records")
        assert [m.value for m in got[:10]] == [b"top"] * 5 + [b"mid"] * 5
        for m in got:
            m.ack()
        assert all(e is None for e in c.commit_acks().values())
    with Admin(bootstrap) as admin:
        admin.delete_topic("jobs")

        def gone() -> bool:
            try:
                admin.describe_topic("__priority.1.jobs")
            except UnknownTopicOrPartitionError:
                return True
            return False
        wait_for(gone, 30, "level topics deleted")
