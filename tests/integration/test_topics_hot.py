"""`logbroker topics hot` against a real standalone broker (issue 21, "see the heat"): a producer
sending 80 % of its records with one key to a 6-partition topic; the command names that key and the
partition the client's partitioner sends it to (cluster/hashing.py), and /metrics counts per
partition (server/partition_heat.py, server/metrics.py)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.cluster.hashing import partition_for_key
from logbroker.v1 import logbroker_pb2 as pb
from tests.cluster import Cluster
from tests.conftest import REPO, free_port, wait_for
from tests.integration.test_metrics_endpoint import sample, scrape

pytestmark = pytest.mark.timeout(120)

HOT_KEY = b"celebrity"
PARTITIONS = 6
RECORDS = 3000


def _produce_skewed(bootstrap: str, topic: str, replication_factor: int = 1) -> None:
    rng = random.Random(21)
    with Admin(bootstrap, request_timeout_ms=5000) as admin:
        admin.create_topic(topic, partitions=PARTITIONS, replication_factor=replication_factor)
    with Producer(bootstrap, request_timeout_ms=5000) as p:
        for i in range(RECORDS):
            key = HOT_KEY if i % 5 != 0 else f"user-{rng.randrange(10_000)}".encode()  # 80 % one key
            p.send(topic, b"v" * 50, key=key)
        p.flush(timeout=30)


def _hot(bootstrap: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "logbroker", "topics", "hot", "--bootstrap", bootstrap,
                           "--format", "json", *args], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_topics_hot_names_the_key_with_80_percent_of_the_records_and_its_partition(broker) -> None:
    _produce_skewed(broker.bootstrap, "orders")
    hot_partition = partition_for_key(HOT_KEY, PARTITIONS)
    out = _hot(broker.bootstrap, "orders", "--top", "3", "--keys", "2")
    first = out["partitions"][0]
    assert (first["topic"], first["partition"]) == ("orders", hot_partition)
    top_key = first["keys"][0]
    assert top_key["key"] == HOT_KEY.decode() and top_key["key_hex"] == HOT_KEY.hex()
    # its partition also holds its share of the other keys (~1/6 of the 20 %): 0.8 / (0.8 + 0.2/6) = 0.96
    assert 0.85 <= top_key["share"] <= 1.0
    assert first["records_in_total"] >= RECORDS * 0.8 and first["bytes_in_per_sec"] > 0
    assert len(out["partitions"]) == 3 and all(len(p["keys"]) <= 2 for p in out["partitions"])
    assert all(p["keys"] and p["keys"][0]["key"].startswith("user-") for p in out["partitions"][1:])
    text = subprocess.run([sys.executable, "-m", "logbroker", "topics", "hot", "--bootstrap", broker.bootstrap],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert text.returncode == 0, text.stderr
    line = text.stdout.splitlines()[1]
    assert line.split()[:2] == ["orders", str(hot_partition)] and "celebrity" in line
    with Admin(broker.bootstrap, request_timeout_ms=5000) as admin:
        [row] = admin.describe_hot_partitions(["orders"], top=1, keys=1)
        assert (row.partition, row.keys[0].key) == (hot_partition, HOT_KEY)
        assert admin.describe_hot_partitions(["nothing-here"]) == []


def test_metrics_count_records_in_and_out_per_partition(broker_factory) -> None:
    port = free_port()
    broker = broker_factory(extra_args=["--metrics-listen", f"127.0.0.1:{port}"])
    _produce_skewed(broker.bootstrap, "orders")
    hot_partition = partition_for_key(HOT_KEY, PARTITIONS)
    labels = f'partition="{hot_partition}",topic="orders"'  # (exposed sorted by name)
    text = scrape(port)
    hot_in = sample(text, "logbroker_partition_records_in_total", labels)
    assert hot_in >= RECORDS * 0.8
    assert sum(sample(text, "logbroker_partition_records_in_total", f'partition="{p}",topic="orders"')
               for p in range(PARTITIONS)) == RECORDS
    got = 0
    with Consumer(broker.bootstrap, topics=["orders"], auto_offset_reset="earliest") as c:

        def read_all() -> bool:
            nonlocal got
            got += len(c.poll(timeout_ms=200))
            return got >= RECORDS
        wait_for(read_all, 30, "every record consumed")
    wait_for(lambda: sample(scrape(port), "logbroker_partition_records_out_total", labels) >= hot_in, 10,
             "the hot partition's records counted out")
    out = _hot(broker.bootstrap)
    assert out["partitions"][0]["records_out_total"] >= hot_in


def test_with_sampling_off_rates_are_counted_but_no_key_is_read(broker_factory) -> None:
    broker = broker_factory(extra_args=["--heat-sample-bytes-per-sec", "0"])
    _produce_skewed(broker.bootstrap, "orders")
    out = _hot(broker.bootstrap, "orders", "--top", "6")
    assert sum(p["records_in_total"] for p in out["partitions"]) == RECORDS
    assert all(p["keys"] == [] and p["sampled_batches"] == 0 for p in out["partitions"])


@pytest.fixture
def cluster(zookeeper, zk_chroot, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.mark.slow
def test_in_a_cluster_each_leader_reports_its_partitions_and_the_command_merges_them(cluster) -> None:
    _produce_skewed(cluster.bootstrap, "orders", replication_factor=2)
    hot_partition = partition_for_key(HOT_KEY, PARTITIONS)
    leaders = {p: s.leader for p, s in cluster.partition_states("orders").items()}
    for i in cluster.brokers:  # a broker answers for the partitions it leads, followers stay silent
        ch, admin, _ = cluster._stub(i)
        try:
            resp = admin.DescribeHotPartitions(pb.DescribeHotPartitionsRequest(topics=["orders"]), timeout=10)
        finally:
            ch.close()
        assert resp.broker_id == i
        assert {p.partition for p in resp.partitions} == {p for p, leader in leaders.items() if leader == i}
    out = _hot(cluster.bootstrap, "orders")
    assert [(p["partition"], p["leader"]) for p in out["partitions"]][0] == (hot_partition, leaders[hot_partition])
    assert sorted(p["partition"] for p in out["partitions"]) == list(range(PARTITIONS))
    assert out["partitions"][0]["keys"][0]["key"] == HOT_KEY.decode()
