"""The cluster, consumer and business figures of `/metrics` (server/cluster_metrics.py) agree with
the truth: the lag metric with `logbroker groups describe`, active producers and consumers with
the clients that talked, under-replicated partitions with a broker killed and back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from logbroker import Admin, Producer, QueueConsumer
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pb_grpc
from tests.cluster import Cluster
from tests.conftest import free_port, wait_for

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    for got, v in samples.get(name, []):
        if got == labels:
            return v
    return None


def groups_describe(address: str, group: str) -> dict:
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": address}
    done = subprocess.run([sys.executable, "-m", "logbroker", "groups", "describe", group, "--format", "json"],
                          capture_output=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


def test_lag_metric_equals_groups_describe_and_active_clients_are_counted(broker_factory):
    metrics_port = free_port()
    broker = broker_factory(extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with Admin(broker.address) as admin:
        admin.create_topic("orders", partitions=3)
        for client_id, n in (("shop-a", 10), ("shop-b", 7)):
            with Producer(broker.address, acks=-1, client_id=client_id) as producer:
                for i in range(n):
                    for p in range(3):
                        producer.send("orders", value=b"v%d" % i, partition=p)
                producer.flush()
        admin.reset_offsets("billing", "orders", "offset", 4, partitions=[0])
        admin.reset_offsets("billing", "orders", "offset", 17, partitions=[1])  # all read: lag 0
    with grpc.insecure_channel(broker.address) as ch:  # a consumer, by its client id
        resp = pb_grpc.BrokerStub(ch).Fetch(pb.FetchRequest(max_wait_ms=0, partitions=[
            pb.FetchPartition(topic="orders", partition=2, fetch_offset=0)]), timeout=10,
            metadata=(("client-id", "reader-1"),))
        assert resp.results[0].error_code == pb.NONE

    described = groups_describe(broker.address, "billing")
    want = {(r["topic"], r["partition"]): r["lag"] for r in described["partitions"] if r["lag"] is not None}
    assert want == {("orders", 0): 13, ("orders", 1): 0}
    samples = scrape(metrics_port)
    got = {(labels["topic"], int(labels["partition"])): v
           for labels, v in samples.get("logbroker_consumer_group_lag", []) if labels["group"] == "billing"}
    assert got == want  # partition 2: nothing committed, no lag, as describe shows
    assert value(samples, "logbroker_consumer_group_members", group="billing") == 0
    assert value(samples, "logbroker_topic_active_producers", topic="orders") == 2
    assert value(samples, "logbroker_topic_active_consumers", topic="orders") == 1
    assert value(samples, "logbroker_active_controller") == 1
    assert value(samples, "logbroker_zookeeper_session_state", state="standalone") == 1
    assert value(samples, "logbroker_leader_partitions") == value(samples, "logbroker_replica_partitions") >= 3
    assert value(samples, "logbroker_isr_shrinks_total") == 0
    assert value(samples, "logbroker_cluster_metrics_up") == 1

    with Producer(broker.address, acks=-1) as producer:  # the lag follows the log
        for _ in range(5):
            producer.send("orders", value=b"more", partition=0)
        producer.flush()
    assert value(scrape(metrics_port), "logbroker_consumer_group_lag", group="billing", topic="orders",
                 partition="0") == 18
    # Debian's prometheus package (README's test command installs it): names, units and types as
    # Prometheus wants them
    assert shutil.which("promtool"), "promtool not found: apt-get install prometheus"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        checked = subprocess.run(["promtool", "check", "metrics"], input=r.read(), capture_output=True, timeout=30)
    assert checked.returncode == 0 and not checked.stdout.strip(), checked.stdout + checked.stderr


def test_share_group_metrics_agree_with_queues_describe(broker_factory):
    metrics_port = free_port()
    broker = broker_factory(extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with Admin(broker.address) as admin:
        admin.create_topic("jobs", partitions=1)
        with Producer(broker.address, acks=-1) as producer:
            for i in range(10):
                producer.send("jobs", value=b"job-%d" % i, partition=0)
            producer.flush()
        with QueueConsumer(broker.address, group="workers", topics=["jobs"], auto_offset_reset="earliest",
                           client_id="worker-1") as q:
            held = []
            wait_for(lambda: held.extend(q.poll(timeout_ms=500)) or len(held) >= 4, 30, "records handed out")
            held[0].ack()
            held[1].ack()
            held[2].reject("poison")
            q.commit_acks()
            d = admin.describe_share_group("workers")
            samples = scrape(metrics_port)
            [part] = d["partitions"]
            assert value(samples, "logbroker_share_group_in_flight", group="workers", topic="jobs",
                         partition="0") == part["in_flight"] == 7
            assert value(samples, "logbroker_share_group_acknowledged_total", group="workers") == 2
            assert value(samples, "logbroker_share_group_dead_letters_total", group="workers") == 1
            assert value(samples, "logbroker_share_group_redeliveries_total", group="workers") == 0
            assert value(samples, "logbroker_share_group_oldest_unsettled_age_seconds", group="workers") > 0
            assert value(samples, "logbroker_topic_active_consumers", topic="jobs") == 1


@pytest.fixture
def metrics_cluster(zookeeper, zk_chroot, tmp_path) -> Iterator[tuple[Cluster, dict[int, int]]]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=4000,
                extra_args=["--replica-lag-time-max-ms", "3000"])
    ports = {}
    for i, b in c.brokers.items():
        ports[i] = free_port()
        b.extra_args += ["--metrics-listen", f"127.0.0.1:{ports[i]}"]
    try:
        yield c.start(), ports
    finally:
        c.stop()


def _lag_agrees_across_brokers(cluster: Cluster, ports: dict[int, int]) -> None:
    """The group's coordinator alone reports its lag, asking the other leaders for their high watermarks."""
    with Producer(cluster.bootstrap, acks=-1) as producer:
        for p in range(6):
            for i in range(p + 3):
                producer.send("events", value=b"e%d" % i, partition=p)
        producer.flush()
    with Admin(cluster.bootstrap) as admin:
        admin.reset_offsets("audit", "events", "offset", 2)  # clamped to each partition's end
    described = groups_describe(cluster.bootstrap, "audit")
    want = {("events", r["partition"]): r["lag"] for r in described["partitions"]}
    assert want == {("events", p): p + 1 for p in range(6)}
    reporters = []
    got = {}
    for i, port in ports.items():
        rows = [(labels, v) for labels, v in scrape(port).get("logbroker_consumer_group_lag", [])
                if labels["group"] == "audit"]
        if rows:
            reporters.append(i)
        got.update({(labels["topic"], int(labels["partition"])): v for labels, v in rows})
    assert reporters == [described["coordinator_id"]] and got == want


def _total(ports: dict[int, int], alive: list[int], name: str) -> float:
    return sum(value(scrape(ports[i]), name) or 0 for i in alive)


@pytest.mark.slow
def test_killing_a_broker_shows_under_replicated_partitions_until_it_rejoins(metrics_cluster):
    cluster, ports = metrics_cluster
    with Admin(cluster.bootstrap) as admin:
        admin.create_topic("events", partitions=6, replication_factor=3)
    everyone = sorted(cluster.brokers)
    wait_for(lambda: _total(ports, everyone, "logbroker_leader_partitions") >= 6, 30, "every partition led")
    wait_for(lambda: _total(ports, everyone, "logbroker_active_controller") == 1, 30, "one active controller")
    assert _total(ports, everyone, "logbroker_under_replicated_partitions") == 0
    for i in everyone:
        assert value(scrape(ports[i]), "logbroker_zookeeper_session_state", state="connected") == 1
    _lag_agrees_across_brokers(cluster, ports)

    victim = 2
    cluster.kill9(victim)
    alive = [i for i in everyone if i != victim]
    # the session timeout (4 s) ends its registration, the controller shrinks the ISRs
    wait_for(lambda: _total(ports, alive, "logbroker_under_replicated_partitions") > 0,
             cluster.session_timeout_ms / 1000 + 20, "under-replicated partitions reported by the survivors")
    wait_for(lambda: _total(ports, alive, "logbroker_active_controller") == 1, 30, "a controller among the survivors")

    cluster.restart(victim)
    wait_for(lambda: _total(ports, everyone, "logbroker_under_replicated_partitions") == 0, 60,
             "no under-replicated partitions once it rejoined")
    assert _total(ports, everyone, "logbroker_isr_expands_total") > 0  # the leaders took it back in
