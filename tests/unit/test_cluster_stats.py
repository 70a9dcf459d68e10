"""`cluster stats`'s computation (logbroker/client/cluster_stats.py): health counts, brokers, top
partitions, rates from two snapshots, the text screen. Pure: no sockets."""

from __future__ import annotations

import json

from logbroker.client.admin import PartitionInfo, TopicDescription
from logbroker.client.cluster_stats import Snapshot, health, render_text, stats, top_partitions

CLUSTER = {"cluster_id": "c1", "controller_id": 2, "controller_epoch": 3,
           "brokers": [{"broker_id": 1, "host": "10.0.0.1", "port": 9092, "rack": "a"},
                       {"broker_id": 2, "host": "10.0.0.2", "port": 9092, "rack": "b"}]}


def _p(partition: int, leader: int = 1, replicas: tuple[int, ...] = (1, 2), isr: tuple[int, ...] = (1, 2),
       end: int = 0, size: int = 0, start: int = 0) -> PartitionInfo:
    return PartitionInfo(partition=partition, leader=leader, replicas=list(replicas), isr=list(isr), leader_epoch=0,
                         log_start_offset=start, log_end_offset=end, high_watermark=end, size_bytes=size)


def _topic(name: str, *parts: PartitionInfo, min_isr: int | None = None) -> TopicDescription:
    config = {} if min_isr is None else {"min_insync_replicas": str(min_isr)}
    return TopicDescription(name=name, config=config, partitions=list(parts))


def test_health_counts_offline_under_replicated_and_under_min_isr() -> None:
    topics = [
        _topic("ok", _p(0), _p(1), min_isr=2),
        _topic("shrunk", _p(0, isr=(1,)), _p(1, leader=2, isr=(2,)), min_isr=2),
        _topic("dead", _p(0, leader=-1, isr=()), _p(1, leader=3, replicas=(3, 1), isr=(3, 1))),
    ]
    h = health(topics, alive={1, 2})
    assert (h.partitions, h.offline, h.under_replicated, h.under_min_isr) == (6, 2, 3, 3)
    # no config: min ISR 1; an ISR of one is then enough
    assert health([_topic("t", _p(0, isr=(1,)))], {1, 2}).under_min_isr == 0


def test_brokers_alive_controller_and_a_replica_on_an_unregistered_broker() -> None:
    s = stats(Snapshot(0.0, CLUSTER, [_topic("t", _p(0, replicas=(1, 2, 3), isr=(1, 2)))]))
    assert [(b["broker_id"], b["alive"], b["controller"]) for b in s["brokers"]] == [
        (1, True, False), (2, True, True), (3, False, False)]
    assert s["controller_id"] == 2 and s["topic_count"] == 1
    assert s["health"] == {"partitions": 1, "offline": 0, "under_replicated": 1, "under_min_isr": 0}


def test_top_partitions_by_bytes_with_ties_by_name() -> None:
    topics = [_topic("b", _p(0, size=5), _p(1, size=50)), _topic("a", _p(0, size=50), _p(1, size=1))]
    assert [(n, p.partition) for n, p in top_partitions(topics, 3)] == [("a", 0), ("b", 1), ("b", 0)]
    assert top_partitions(topics, 0) == []
    assert len(top_partitions(topics, 100)) == 4


def test_without_a_previous_snapshot_there_are_no_rates() -> None:
    s = stats(Snapshot(10.0, CLUSTER, [_topic("t", _p(0, end=100, size=1000, start=40), _p(1, end=5, size=10))]))
    [t] = s["topics"]
    assert (t["partitions"], t["size_bytes"], t["end_offset"], t["records"]) == (2, 1010, 105, 65)
    assert t["records_per_sec"] is None and t["bytes_per_sec"] is None and s["elapsed_s"] is None
    assert s["top_partitions"][0]["records_per_sec"] is None


def test_rates_are_the_difference_of_two_snapshots_over_the_elapsed_time() -> None:
    before = Snapshot(10.0, CLUSTER, [_topic("t", _p(0, end=100, size=1000), _p(1, end=50, size=500))])
    after = Snapshot(12.0, CLUSTER, [_topic("t", _p(0, end=300, size=3000), _p(1, end=50, size=400),
                                            _p(2, end=999, size=9999)),  # new partition: no rate yet
                                     _topic("new", _p(0, end=10, size=10))])
    s = stats(after, before)
    assert s["elapsed_s"] == 2.0
    t = next(t for t in s["topics"] if t["name"] == "t")
    assert t["records_per_sec"] == 100.0  # (300 - 100 + 0) / 2
    assert t["bytes_per_sec"] == 1000.0  # (2000 + shrink counted 0) / 2
    new = next(t for t in s["topics"] if t["name"] == "new")
    assert new["records_per_sec"] == 0.0  # present now only: nothing to compare
    tops = {(p["topic"], p["partition"]): p["records_per_sec"] for p in s["top_partitions"]}
    assert tops[("t", 0)] == 100.0 and tops[("t", 1)] == 0.0 and tops[("t", 2)] is None


def test_an_offset_going_back_counts_zero() -> None:
    before = Snapshot(0.0, CLUSTER, [_topic("t", _p(0, end=100))])
    after = Snapshot(1.0, CLUSTER, [_topic("t", _p(0, end=3))])  # recreated
    assert stats(after, before)["topics"][0]["records_per_sec"] == 0.0


def test_the_screen_as_text_and_as_json() -> None:
    before = Snapshot(0.0, CLUSTER, [_topic("orders", _p(0, end=10, size=100))])
    after = Snapshot(1.0, CLUSTER, [_topic("orders", _p(0, end=30, size=300))])
    s = stats(after, before)
    text = render_text(s)
    assert "Controller: 2" in text and "Brokers: 2/2 alive" in text and "under-replicated 0" in text
    assert "alive controller" in text and "orders" in text and "orders-0" in text and "20.0" in text
    assert json.loads(json.dumps(s)) == s
