"""A live broker's /metrics (issue 20): valid exposition format (promtool), and figures that agree
with the truth: records produced and consumed, Produce calls, the data directory's free space."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.storage.record_batch import encode_batch
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pb_grpc
from tests.conftest import BrokerProcess, free_port

PROMTOOL = "/usr/bin/promtool"  # Debian's `prometheus` package


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    """The value of `name{labels}` (labels as exposed, e.g. 'topic="orders"'), 0 if absent."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture
def metered(broker_factory) -> tuple[BrokerProcess, int]:
    port = free_port()
    return broker_factory(extra_args=["--metrics-listen", f"127.0.0.1:{port}"]), port


def test_live_metrics_pass_promtool_and_count_records_in_and_out(metered, tmp_path: Path) -> None:
    promtool = shutil.which("promtool") or PROMTOOL
    assert os.access(promtool, os.X_OK), "promtool is missing: apt-get install prometheus"
    broker, port = metered
    with Admin(broker.address) as admin:
        admin.create_topic("orders", partitions=1)
    before = scrape(port)
    n = 2500
    with Producer(broker.address) as producer:
        for i in range(n):
            producer.send("orders", value=b"order-%d" % i, partition=0)
        producer.flush()
    produced = scrape(port)
    assert sample(produced, "logbroker_topic_records_in_total", 'topic="orders"') - \
        sample(before, "logbroker_topic_records_in_total", 'topic="orders"') == n
    assert sample(produced, "logbroker_topic_bytes_in_total", 'topic="orders"') > n * len(b"order-0")
    assert sample(produced, "logbroker_requests_total", 'api="Produce"') > \
        sample(before, "logbroker_requests_total", 'api="Produce"')
    assert sample(produced, "logbroker_request_duration_seconds_count", 'api="Produce"') >= 1

    got = 0
    with Consumer(broker.address, topics=["orders"]) as consumer:
        deadline = time.monotonic() + 30
        while got < n and time.monotonic() < deadline:
            got += len(consumer.poll(timeout_ms=500))
        assert got == n
        # the consumer's connection (the record transport) is open now
        assert sample(scrape(port), "logbroker_connections", 'listener="record_transport"') >= 1
    consumed = scrape(port)
    assert sample(consumed, "logbroker_topic_records_out_total", 'topic="orders"') - \
        sample(produced, "logbroker_topic_records_out_total", 'topic="orders"') == n
    assert sample(consumed, "logbroker_topic_bytes_out_total", 'topic="orders"') >= \
        sample(produced, "logbroker_topic_bytes_in_total", 'topic="orders"')
    assert sample(consumed, "logbroker_requests_total", 'api="Fetch"') >= 1
    assert 'logbroker_connections{listener="grpc"}' in consumed
    assert "logbroker_fetch_purgatory_size " in consumed and "logbroker_log_flush_duration_seconds_count" in consumed

    exposition = tmp_path / "metrics.txt"
    exposition.write_text(consumed)
    out = subprocess.run([promtool, "check", "metrics"], input=consumed, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr  # no lint warnings


def test_a_failed_produce_counts_an_error_of_its_code(metered) -> None:
    broker, port = metered
    with grpc.insecure_channel(broker.address) as ch:
        req = pb.ProduceRequest(acks=1, timeout_ms=5000, partitions=[
            pb.ProducePartition(topic="no-such-topic", partition=0, records=encode_batch([(1, None, b"v", None)]))])
        result = pb_grpc.BrokerStub(ch).Produce(req, timeout=10).results[0]
    assert result.error_code == pb.UNKNOWN_TOPIC_OR_PARTITION
    text = scrape(port)
    assert sample(text, "logbroker_request_errors_total", 'api="Produce",error="UNKNOWN_TOPIC_OR_PARTITION"') == 1
    assert sample(text, "logbroker_topic_records_in_total", 'topic="no-such-topic"') == 0


def test_disk_free_is_the_data_dirs_statvfs(metered) -> None:
    broker, port = metered

    def free() -> int:
        st = os.statvfs(broker.data_dir)
        return st.f_bavail * st.f_frsize

    low, text, high = free(), scrape(port), free()
    low, high = min(low, high), max(low, high)
    reported = sample(text, "logbroker_disk_free_bytes", f'dir="{broker.data_dir.resolve()}"')
    slack = 4 << 20  # other processes write meanwhile
    assert low - slack <= reported <= high + slack, (low, reported, high)
    st = os.statvfs(broker.data_dir)
    assert sample(text, "logbroker_disk_total_bytes", f'dir="{broker.data_dir.resolve()}"') == st.f_blocks * st.f_frsize


def test_metrics_listen_off_serves_nothing(broker_factory) -> None:
    port = free_port()
    # the environment asks for /metrics on `port`; the flag, which wins, says off
    broker = broker_factory(extra_args=["--metrics-listen", "off"], env={"LOGBROKER_METRICS_LISTEN": f"127.0.0.1:{port}"})
    assert broker.serving()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
