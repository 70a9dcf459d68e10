"""`cluster rebalance`'s I/O around the planner (logbroker/cli_rebalance.py), against a fake Admin."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from logbroker.cli_rebalance import HEAT_TOP_MAX, _pages, execute, gather, measure, render_text, sample
from logbroker.client.admin import PartitionInfo, TopicDescription
from logbroker.client.hot_partitions import HotPartition
from logbroker.cluster.balancer import Options, plan
from logbroker.errors import BrokerUnavailableError, ReassignmentInProgressError


def _p(partition: int, leader: int, replicas: list[int], size: int = 0) -> PartitionInfo:
    return PartitionInfo(partition, leader, replicas, list(replicas), 0, 0, 10, 10, size)


class FakeAdmin:
    """Leaders all on broker 0; a reassignment lands at once (first replica leads), unless refused."""

    def __init__(self, refuse: set[int] | None = None, lands: bool = True) -> None:
        self.parts = {p: _p(p, 0, [0, 1, 2], 100 * p) for p in range(6)}
        self.parts[6] = _p(6, 0, [0, 3], 0)  # broker 3 is not registered
        self.refuse = refuse or set()
        self.lands = lands
        self.reassigned: list[tuple[int, list[int]]] = []
        self.throttles: list[int] = []
        self.heat_asked: list[tuple[list[str], int, int]] = []

    def describe_hot_partitions(self, topics: Sequence[str] = (), top: int = 10, keys: int = 5) -> list[HotPartition]:
        self.heat_asked.append((list(topics), top, keys))
        return []  # no traffic seen by any leader

    def describe_topics(self, names: Sequence[str] | None = None) -> list[TopicDescription]:
        return [TopicDescription("t", {"min_insync_replicas": "2"}, [self.parts[p] for p in sorted(self.parts)]),
                TopicDescription("__consumer_offsets", {}, [_p(0, 0, [0])])]

    def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"broker_id": b, "host": "h", "port": 1, "rack": f"r{b}"} for b in range(3)]}

    def reassign_partition(self, name: str, partition: int, replicas: Sequence[int],
                           throttle_bytes_per_sec: int = 0) -> None:
        self.throttles.append(throttle_bytes_per_sec)
        if partition in self.refuse:
            raise ReassignmentInProgressError("busy")
        self.reassigned.append((partition, list(replicas)))
        if self.lands:
            self.parts[partition] = _p(partition, replicas[0], list(replicas))


def test_gather_reads_brokers_racks_min_isr_and_leaves_internal_topics_out() -> None:
    brokers, partitions = gather(FakeAdmin(), 0.0, include_internal=False)
    assert [(b.broker_id, b.rack, b.alive) for b in brokers] == [(0, "r0", True), (1, "r1", True),
                                                                 (2, "r2", True), (3, "", False)]
    assert {p.topic for p in partitions} == {"t"}
    assert all(p.min_insync_replicas == 2 and p.bytes_in_per_sec == 0.0 for p in partitions)
    assert [p.size_bytes for p in partitions][:3] == [0, 100, 200]


def test_execute_reassigns_each_move_and_waits_until_it_landed() -> None:
    admin = FakeAdmin()
    the_plan = plan(*gather(admin, 0.0, False), Options())
    assert {b.broker_id: b.leaders for b in the_plan.after} == {0: 3, 1: 2, 2: 2}
    result = execute(admin, the_plan, timeout_s=5)
    assert result == {"done": len(the_plan.moves), "failed": []}
    assert [(p, r) for p, r in admin.reassigned] == [(m.partition, list(m.replicas_after)) for m in the_plan.moves]
    assert admin.throttles == [0] * len(the_plan.moves)  # unthrottled unless asked
    text = render_text({**the_plan.as_dict(), "result": result})
    assert text.startswith(f"plan: {len(the_plan.moves)} moves ({len(the_plan.moves)} leadership, 0 replica)")
    assert "spread (max deviation / mean): leaders 2.00 -> 0.29" in text


def test_execute_sends_the_replication_throttle_with_every_move() -> None:
    admin = FakeAdmin()
    the_plan = plan(*gather(admin, 0.0, False), Options())
    execute(admin, the_plan, timeout_s=5, throttle_bytes_per_sec=200_000)
    assert the_plan.moves and admin.throttles == [200_000] * len(the_plan.moves)


def test_execute_reports_refused_and_unlanded_moves() -> None:
    admin = FakeAdmin(refuse={0, 1, 2, 3, 4, 5}, lands=False)
    the_plan = plan(*gather(admin, 0.0, False), Options())
    result = execute(admin, the_plan, timeout_s=0.01)
    assert result["done"] == 0 and len(result["failed"]) == len(the_plan.moves)
    assert all("busy" in f for f in result["failed"])
    admin = FakeAdmin(lands=False)
    result = execute(admin, the_plan, timeout_s=0.01)
    assert result["done"] == 0 and all("not at replicas" in f for f in result["failed"])


class GrowingAdmin(FakeAdmin):
    """Every partition grows by 1000 bytes between two reads of the topics (a steady, even producer),
    and its leader counts 1000 bytes in and 500 out between two reads of its counters."""

    def __init__(self) -> None:
        super().__init__()
        self.heat_reads = 0

    def describe_topics(self, names: Sequence[str] | None = None) -> list[TopicDescription]:
        for p, info in list(self.parts.items()):
            self.parts[p] = _p(p, info.leader, list(info.replicas), info.size_bytes + 1000)
        return super().describe_topics(names)

    def describe_hot_partitions(self, topics: Sequence[str] = (), top: int = 10, keys: int = 5) -> list[HotPartition]:
        super().describe_hot_partitions(topics, top, keys)
        self.heat_reads += 1
        n = self.heat_reads
        return [HotPartition("t", p, info.leader, 0.0, 0.0, 0.0, 0.0, bytes_in_total=1000 * n,
                             bytes_out_total=500 * n) for p, info in sorted(self.parts.items()) if "t" in topics]


def test_measure_after_execute_reports_the_leaders_and_bytes_in_as_they_are_now() -> None:
    admin = GrowingAdmin()
    the_plan = plan(*gather(admin, 0.0, False), Options())
    assert measure(admin, 0.0, False)["brokers"][0]["leaders"] == 7  # before: every leader on broker 0
    assert execute(admin, the_plan, timeout_s=5)["failed"] == []
    measured = measure(admin, 0.01, False)
    assert measured["sample_seconds"] == 0.01
    by_broker = {b["broker_id"]: b for b in measured["brokers"]}
    assert {b: m["leaders"] for b, m in by_broker.items()} == {0: 3, 1: 2, 2: 2}
    rates = [by_broker[b]["leader_bytes_in_per_sec"] for b in range(3)]
    assert all(r > 0 for r in rates)
    assert rates[1] == pytest.approx(rates[2]) and rates[0] == pytest.approx(1.5 * rates[1])  # 3 : 2 : 2
    outs = [by_broker[b]["leader_bytes_out_per_sec"] for b in range(3)]
    assert outs == pytest.approx([r / 2 for r in rates])  # the leaders' bytes out counters
    assert measured["measured_from"] == {"sources": {"counters": 7}}
    assert measured["spread"]["leaders"] == pytest.approx(2 / 7)
    assert measured["spread"]["leader_bytes_in_per_sec"] == pytest.approx(2 / 7)
    text = render_text({**the_plan.as_dict(), "measured_after": measured})
    assert "measured after the moves (over 0.01 s):" in text and "measured spread: leaders 0.29" in text
    assert "not measured (gone)" in render_text({**the_plan.as_dict(), "measured_after": {"error": "gone"}})


class SizeBlindAdmin(GrowingAdmin):
    """DescribeTopics answered by broker 0, which reports size -1 for the partitions it holds no
    replica of (replication factor 1: partition p on broker p % 3), while every leader counts its own."""

    def __init__(self) -> None:
        super().__init__()
        self.parts = {p: _p(p, p % 3, [p % 3], 0) for p in range(6)}

    def describe_topics(self, names: Sequence[str] | None = None) -> list[TopicDescription]:
        return [TopicDescription(t.name, t.config, [p if 0 in p.replicas else _p(p.partition, p.leader, p.replicas, -1)
                                                    for p in t.partitions]) for t in super().describe_topics(names)]


def test_sample_measures_every_leader_from_its_own_counters_where_sizes_are_unknown() -> None:
    admin = SizeBlindAdmin()
    s = sample(admin, 0.01, include_internal=False)
    rates = {p.partition: (p.bytes_in_per_sec, p.bytes_out_per_sec) for p in s.partitions}
    assert all(i > 0 and o == pytest.approx(i / 2) for i, o in rates.values()), rates
    assert s.sources == {"counters": 6} and s.heat_error == ""
    assert admin.heat_asked == [(["t"], 6, 1)] * 2  # every partition fits in the answer; one key, the least
    before = {b.broker_id: b for b in plan(s.brokers, s.partitions, Options(max_moves=0)).before}
    assert all(before[b].leader_bytes_in_per_sec > 0 and before[b].leader_bytes_out_per_sec > 0 for b in range(3))
    text = render_text({**plan(s.brokers, s.partitions).as_dict(), "measured_from": s.as_dict()})
    assert "leader bytes out/s" in text and "rates measured: 6 from counters" in text


class HeatlessAdmin(GrowingAdmin):
    def describe_hot_partitions(self, topics: Sequence[str] = (), top: int = 10, keys: int = 5) -> list[HotPartition]:
        raise BrokerUnavailableError("no broker answered DescribeHotPartitions")


def test_sample_falls_back_to_size_growth_when_no_leader_answers() -> None:
    s = sample(HeatlessAdmin(), 0.01, include_internal=False)
    assert all(p.bytes_in_per_sec > 0 and p.bytes_out_per_sec == 0 for p in s.partitions)
    assert s.sources == {"size": 7} and "no broker answered" in s.heat_error
    assert "leaders' counters not read: BrokerUnavailableError" in render_text(
        {**plan(s.brokers, s.partitions).as_dict(), "measured_from": s.as_dict()})


def test_pages_keep_every_answer_within_the_servers_bounds() -> None:
    def topic(name: str, n: int) -> TopicDescription:
        return TopicDescription(name, {}, [_p(p, 0, [0]) for p in range(n)])

    topics = [topic("a", 600), topic("b", 400), topic("c", 1), topic("big", 2500), topic("d", 3)]
    assert _pages(topics) == [(["a", "b"], 1000), (["c"], 1), (["big"], HEAT_TOP_MAX), (["d"], 3)]
    many = [topic(f"t{i}", 0) for i in range(1500)]  # more names than one request takes
    assert [(len(names), top) for names, top in _pages(many)] == [(1000, 1), (500, 1)]
    assert _pages([]) == []
