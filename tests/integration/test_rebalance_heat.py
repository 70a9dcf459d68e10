"""`cluster rebalance --dry-run` measures every leader's bytes in and out from the leaders' own
counters: ZooKeeper, 3 brokers, a topic of replication factor 1 (so the broker answering
DescribeTopics holds no replica of, and knows no size for, the partitions the others lead), a
producer writing to every partition with a different weight per leading broker, and a consumer
tailing every partition. The plan's `before` must show, for every broker, leader bytes in/s roughly
proportional to what was sent to the partitions it leads, and bytes out/s above 0."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.errors import LogbrokerError
from tests.cluster import Cluster
from tests.conftest import wait_for
from tests.integration.test_rebalance import _all, _states, cli

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

TOPIC = "rf1"
PARTITIONS = 6
RECORD = b"x" * 300
# records per round sent to a partition led by broker b: (b + 1) * ROUND_RECORDS
ROUND_RECORDS = 10


@pytest.fixture
def cluster3(zookeeper, zk_chroot, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000)
    try:
        yield c.start()
    finally:
        c.stop()


class WeightedTraffic:
    """A producer sending each round (b + 1) * ROUND_RECORDS records of one size to every partition
    led by broker b (acknowledged before the next round), and a consumer tailing every partition;
    both until stop()."""

    def __init__(self, c: Cluster, leaders: dict[int, int]) -> None:
        self.c = c
        self.leaders = leaders
        self.stop_event = threading.Event()
        self.acked_rounds = 0
        self.consumed = 0
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._produce, daemon=True),
                        threading.Thread(target=self._consume, daemon=True)]

    def _produce(self) -> None:
        try:
            with Producer(self.c.bootstrap, acks=1, linger_ms=2, request_timeout_ms=10_000,
                          delivery_timeout_ms=60_000) as producer:
                while not self.stop_event.is_set():
                    futures = [producer.send(TOPIC, RECORD, partition=p)
                               for p, b in sorted(self.leaders.items()) for _ in range((b + 1) * ROUND_RECORDS)]
                    producer.flush(60)  # paces the loop
                    for f in futures:
                        f.result(timeout=60)
                    self.acked_rounds += 1
        except BaseException as exc:  # reported by the test
            self.errors.append(exc)

    def _consume(self) -> None:
        try:
            with Consumer(self.c.bootstrap, auto_offset_reset="earliest", fetch_max_wait_ms=100) as consumer:
                consumer.assign([(TOPIC, p) for p in range(PARTITIONS)])
                while not self.stop_event.is_set():
                    self.consumed += len(consumer.poll(timeout_ms=200))
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> WeightedTraffic:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(90)


def _every_leader_counted(admin: Admin, leaders: dict[int, int]) -> bool:
    """Every partition has a row, in and out, from its leader (the heat counters exist)."""
    try:
        rows = admin.describe_hot_partitions([TOPIC], top=PARTITIONS, keys=1)
    except LogbrokerError:
        return False
    seen = {r.partition for r in rows if leaders.get(r.partition) == r.leader
            and r.bytes_in_total > 0 and r.bytes_out_total > 0}
    return seen == set(leaders)


def test_dry_run_measures_bytes_in_and_out_on_every_leader_with_replication_factor_1(cluster3):
    c = cluster3
    with Admin(c.bootstrap) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=1)
        wait_for(lambda: _all(c, lambda s: s.leader >= 0, TOPIC, PARTITIONS), 60, "every partition led")
        states = _states(c, TOPIC, PARTITIONS)
        assert states is not None
        leaders = {p: s.leader for p, s in states.items()}  # type: ignore[attr-defined]
        # with replication factor 1, the broker answering DescribeTopics knows no size for the others'
        assert any(p.size_bytes < 0 for p in admin.describe_topics([TOPIC])[0].partitions)
        led = {b for b in leaders.values()}
        assert len(led) >= 2, leaders  # the brokers' partitions differ, so the plan's figures must too
        traffic = WeightedTraffic(c, leaders).start()
        try:
            wait_for(lambda: traffic.errors or (traffic.acked_rounds >= 3 and _every_leader_counted(admin, leaders)),
                     60, "every leader counting bytes in and out")
            assert not traffic.errors, traffic.errors
            dry = cli(c.bootstrap, "cluster", "rebalance", "--format", "json", "--sample-seconds", "2")
        finally:
            traffic.stop()
    assert not traffic.errors, traffic.errors
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert not plan["executed"]
    before = {b["broker_id"]: b for b in plan["before"]}
    # what was sent per broker, per round: (b + 1) * ROUND_RECORDS records to each partition it leads
    sent = {b: sum((b + 1) * ROUND_RECORDS for led_by in leaders.values() if led_by == b) for b in range(3)}
    measured_in = {b: before[b]["leader_bytes_in_per_sec"] for b in range(3)}
    assert all(measured_in[b] > 0 and before[b]["leader_bytes_out_per_sec"] > 0 for b in led), before
    assert all(measured_in[b] == 0 for b in range(3) if b not in led), before
    total_sent, total_in = sum(sent.values()), sum(measured_in.values())
    for b in led:  # each broker's share of the bytes in, against its share of what was sent
        ratio = (measured_in[b] / total_in) / (sent[b] / total_sent)
        assert 0.5 <= ratio <= 2.0, (b, measured_in, sent)
    assert plan["measured_from"] == {"sources": {"counters": PARTITIONS}}, plan["measured_from"]
