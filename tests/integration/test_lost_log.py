"""A partition directory that vanishes under a stopped standalone broker: the partition comes back
offline (KAFKA_STORAGE_ERROR on produce and fetch, shown by `topics describe` and the metrics), never
silently empty, until an operator runs `logbroker topics recover-empty`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request

import grpc
import pytest

from logbroker import Admin, Producer
from logbroker.storage.record_batch import encode_batch
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pb_grpc
from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.timeout(180)


def cli(address: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": address}
    return subprocess.run([sys.executable, "-m", "logbroker", *args], capture_output=True, env=env, timeout=60)


def produce_raw(address: str, topic: str, partition: int) -> pb.ProducePartitionResult:
    with grpc.insecure_channel(address) as ch:
        req = pb.ProduceRequest(acks=1, timeout_ms=5000, partitions=[
            pb.ProducePartition(topic=topic, partition=partition, records=encode_batch([(1, None, b"v", None)]))])
        return pb_grpc.BrokerStub(ch).Produce(req, timeout=10).results[0]


def fetch_raw(address: str, topic: str, partition: int) -> pb.FetchPartitionResult:
    with grpc.insecure_channel(address) as ch:
        req = pb.FetchRequest(max_wait_ms=0, max_bytes=1 << 20, partitions=[
            pb.FetchPartition(topic=topic, partition=partition, fetch_offset=0, current_leader_epoch=-1)])
        return pb_grpc.BrokerStub(ch).Fetch(req, timeout=10).results[0]


def offline_gauge(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return next(float(line.split()[1]) for line in text.splitlines()
                if line.startswith("logbroker_offline_partitions "))


def test_vanished_partition_is_offline_until_recover_empty(broker_factory, tmp_path):
    data = tmp_path / "data"
    metrics_port = free_port()
    broker = broker_factory(data, extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with Admin(broker.address) as admin:
        admin.create_topic("orders", partitions=2)
        topic_id = admin.describe_topic("orders").topic_id
    assert len(topic_id) == 32
    metadata = data / "orders-0" / "partition.metadata"  # written behind, within ~100 ms (log_identity.py)
    wait_for(lambda: metadata.exists() and metadata.read_text() == f"version: 0\ntopic_id: {topic_id}\n", 10,
             "orders-0/partition.metadata naming the topic id")
    with Producer(broker.address, acks=-1) as producer:
        for i in range(1000):
            producer.send("orders", value=b"v%d" % i, partition=0)
            producer.send("orders", value=b"w%d" % i, partition=1)
        producer.flush()
    broker.stop()
    shutil.rmtree(data / "orders-0")
    port = broker.port
    broker = broker_factory(data, port=port, extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"])

    assert "orders-0 is offline" in broker.log_text() and "ERROR" in broker.log_text()
    assert not (data / "orders-0").exists()
    assert produce_raw(broker.address, "orders", 0).error_code == pb.KAFKA_STORAGE_ERROR
    assert fetch_raw(broker.address, "orders", 0).error_code == pb.KAFKA_STORAGE_ERROR
    assert produce_raw(broker.address, "orders", 1).error_code == pb.NONE  # the other partition serves on
    fetched = fetch_raw(broker.address, "orders", 1)
    assert fetched.error_code == pb.NONE and fetched.high_watermark == 1001
    assert offline_gauge(metrics_port) == 1

    described = json.loads(cli(broker.address, "topics", "describe", "orders", "--format", "json").stdout)
    assert described["topic_id"] == topic_id
    assert [p["offline_replicas"] for p in described["partitions"]] == [[0], []]
    text = cli(broker.address, "topics", "describe", "orders").stdout.decode()
    assert "OFFLINE on 0" in text and topic_id in text

    not_offline = cli(broker.address, "topics", "recover-empty", "orders", "1")
    assert not_offline.returncode != 0 and b"not offline" in not_offline.stderr
    recovered = cli(broker.address, "topics", "recover-empty", "orders", "0")
    assert recovered.returncode == 0, recovered.stderr.decode()
    assert produce_raw(broker.address, "orders", 0).error_code == pb.NONE
    assert fetch_raw(broker.address, "orders", 0).high_watermark == 1  # empty, then the one new record
    assert offline_gauge(metrics_port) == 0
    with Admin(broker.address) as admin:
        part = admin.describe_topic("orders").partitions[0]
        assert part.offline_replicas == [] and part.log_end_offset == 1

    # it stays recovered across a restart
    broker.stop()
    broker = broker_factory(data, port=port)
    assert fetch_raw(broker.address, "orders", 0).high_watermark == 1


def test_brand_new_and_recreated_topics_start_empty_without_complaint(broker):
    with Admin(broker.address) as admin:
        admin.create_topic("fresh", partitions=1)
        first_id = admin.describe_topic("fresh").topic_id
        assert produce_raw(broker.address, "fresh", 0).error_code == pb.NONE
        admin.delete_topic("fresh")
        admin.create_topic("fresh", partitions=1)
        again = admin.describe_topic("fresh")
    assert again.topic_id != first_id and again.partitions[0].log_end_offset == 0
    assert again.partitions[0].offline_replicas == []
    assert "offline" not in broker.log_text()
