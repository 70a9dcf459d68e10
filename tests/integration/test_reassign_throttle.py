"""A reassignment's replication throttle on real processes (ZooKeeper, 3 brokers): a replica move of
about 1 MB throttled to 200 kB/s takes at least half of size/rate (a lower bound by construction:
the copy cannot go faster than the rate plus one burst), completes, and an acks=all producer on the
partition is acknowledged throughout (the in-sync replicas are never throttled)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Producer
from logbroker.errors import InvalidRequestError
from tests.cluster import Cluster
from tests.conftest import free_port, wait_for
from tests.integration.test_cluster_metrics import scrape, value

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

TOPIC = "throttled"
RATE_BYTES_PER_SEC = 200_000
RECORD = b"r" * 1000


@pytest.fixture
def cluster3(zookeeper, zk_chroot, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "3000"])
    c.metrics_ports = {}  # type: ignore[attr-defined]
    for i, b in c.brokers.items():
        c.metrics_ports[i] = free_port()  # type: ignore[attr-defined]
        b.extra_args += ["--metrics-listen", f"127.0.0.1:{c.metrics_ports[i]}"]  # type: ignore[attr-defined]
    try:
        yield c.start()
    finally:
        c.stop()


def _metric(c: Cluster, broker: int, name: str) -> float:
    return value(scrape(c.metrics_ports[broker]), name) or 0.0  # type: ignore[attr-defined]


def _state(c: Cluster):  # type: ignore[no-untyped-def]
    try:
        return c.partition_states(TOPIC).get(0)
    except (grpc.RpcError, AssertionError, IndexError):
        return None


class SlowProducer:
    """acks=all, one small record every 20 ms (about 5 kB/s: far below the throttle), each
    acknowledgement's time kept."""

    def __init__(self, c: Cluster) -> None:
        self.c = c
        self.stop_event = threading.Event()
        self.futures: list = []
        self.acked_at: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with Producer(self.c.bootstrap, acks="all", linger_ms=0, request_timeout_ms=10_000,
                      delivery_timeout_ms=60_000) as producer:
            i = 0
            while not self.stop_event.is_set():
                f = producer.send(TOPIC, b"s-%08d" % i + b"x" * 90, partition=0)
                f.add_done_callback(lambda fut: self.acked_at.append(time.monotonic())
                                    if fut.exception() is None else None)
                self.futures.append(f)
                i += 1
                self.stop_event.wait(0.02)  # the pace, not a synchronisation
            producer.flush(60)

    def start(self) -> SlowProducer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(90)


def test_a_throttled_replica_move_copies_no_faster_than_the_rate_and_producers_stay_acknowledged(cluster3):
    """Also: a negative throttle is refused (INVALID_REQUEST) before anything is requested."""
    c = cluster3
    with Admin(c.bootstrap) as admin, Producer(c.bootstrap, acks="all", linger_ms=5,
                                                      batch_size_bytes=16_384) as loader:  # ~60 batches
        admin.create_topic(TOPIC, partitions=1, replication_factor=2, config={"min_insync_replicas": "1"})
        wait_for(lambda: (s := _state(c)) is not None and s.leader >= 0 and len(s.isr) == 2, 60, "in sync")
        for i in range(1000):
            loader.send(TOPIC, RECORD + b"%06d" % i, partition=0)
        loader.flush(60)
        (desc,) = admin.describe_topics([TOPIC])
        size_bytes = desc.partitions[0].size_bytes
        assert size_bytes >= 1_000_000
        before = _state(c)
        assert before is not None
        leader = before.leader
        newcomer = next(b for b in range(3) if b not in before.replicas)
        target = [leader, newcomer]
        with pytest.raises(InvalidRequestError):  # bad input: refused, nothing requested
            admin.reassign_partition(TOPIC, 0, target, throttle_bytes_per_sec=-1)

        traffic = SlowProducer(c).start()
        try:
            wait_for(lambda: len(traffic.acked_at) >= 20, 30, "the producer acknowledged")
            started = time.monotonic()
            admin.reassign_partition(TOPIC, 0, target, throttle_bytes_per_sec=RATE_BYTES_PER_SEC)
            # the newcomer shows its throttle while it copies (>= 2.5 s by construction, below)
            wait_for(lambda: _metric(c, newcomer, "logbroker_replication_throttled_partitions") == 1, 30,
                     "the newcomer's throttle in its metrics")
            wait_for(lambda: (s := _state(c)) is not None and list(s.replicas) == target
                     and sorted(s.isr) == sorted(target), 90, "the move complete")
            took_s = time.monotonic() - started
            acked_during = sum(1 for t in traffic.acked_at if started <= t <= started + took_s)
            sent_at_move = len(traffic.futures)
            wait_for(lambda: len(traffic.futures) >= sent_at_move + 20, 30, "the producer goes on after the move")
        finally:
            traffic.stop()
    throttled = _metric(c, newcomer, "logbroker_replication_throttled_bytes_total")
    assert size_bytes / 2 <= throttled <= size_bytes * 1.5, (throttled, size_bytes)
    wait_for(lambda: _metric(c, newcomer, "logbroker_replication_throttled_partitions") == 0, 30,
             "the throttle gone with the reassignment")
    # a lower bound by construction: 1 MB cannot cross at 200 kB/s (plus one 20 kB burst) in 2.5 s
    assert took_s >= size_bytes / RATE_BYTES_PER_SEC / 2, (took_s, size_bytes)
    failures = [f for f in traffic.futures if f.exception(timeout=60) is not None]
    assert traffic.futures and not failures, f"{len(failures)} of {len(traffic.futures)} sends failed: {failures[:1]}"
    assert acked_during >= 10, (acked_during, took_s)  # acknowledged while the copy ran, not only after it

