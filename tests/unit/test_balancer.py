"""The balancer's plan (logbroker/cluster/balancer.py): even leaders, kept rack spread and min ISR."""

from __future__ import annotations

import itertools

import pytest

from logbroker.cluster.balancer import BrokerInfo, Options, PartitionLoad, plan, spread

BROKERS = [BrokerInfo(0, "a"), BrokerInfo(1, "b"), BrokerInfo(2, "c")]


def _piled(n: int = 6, rate: float = 1000.0, min_isr: int = 2) -> list[PartitionLoad]:
    """`n` partitions RF 3, every preferred leader (and leader) on broker 0."""
    return [PartitionLoad("t", p, (0, 1 + p % 2, 2 - p % 2), 0, (0, 1, 2), min_isr, rate, rate / 2, 100)
            for p in range(n)]


def _leaders_after(partitions: list[PartitionLoad], moves: list) -> dict[tuple[str, int], int]:
    out = {(p.topic, p.partition): p.leader for p in partitions}
    for m in moves:
        out[(m.topic, m.partition)] = m.leader_after
    return out


def test_piled_leaders_spread_within_20_percent() -> None:
    parts = _piled()
    result = plan(BROKERS, parts)
    counts = {b.broker_id: b.leaders for b in result.after}
    assert counts == {0: 2, 1: 2, 2: 2}
    assert result.spread()["leaders"]["before"] == pytest.approx(2.0)
    assert result.spread()["leaders"]["after"] <= 0.2
    assert result.spread()["leader_bytes_in_per_sec"]["after"] <= 0.2
    for m in result.moves:
        assert m.kind == "leader"
        assert sorted(m.replicas_after) == sorted(m.replicas_before)  # same set, reordered
        assert m.replicas_after[0] == m.leader_after != m.leader_before


def test_uneven_rates_move_the_heavy_leaderships_apart() -> None:
    parts = [PartitionLoad("t", p, (0, 1, 2), 0, (0, 1, 2), 1, rate, 0.0)
             for p, rate in enumerate([9000.0, 9000.0, 9000.0, 10.0, 10.0, 10.0])]
    result = plan(BROKERS, parts)
    after = {b.broker_id: b for b in result.after}
    assert sorted(round(b.leader_bytes_in_per_sec) for b in after.values()) == [9010, 9010, 9010]
    assert result.spread()["leaders"]["after"] <= 0.2


def test_new_leader_is_live_and_in_sync() -> None:
    brokers = [BrokerInfo(0), BrokerInfo(1), BrokerInfo(2, alive=False)]
    parts = [PartitionLoad("t", p, (0, 1, 2), 0, (0, 2), 1) for p in range(4)]  # 1 out of sync, 2 dead
    result = plan(brokers, parts)
    assert result.moves == ()
    parts = [PartitionLoad("t", p, (0, 1, 2), 0, (0, 1, 2), 1) for p in range(4)]
    result = plan(brokers, parts)
    assert {m.leader_after for m in result.moves} == {1}
    assert {b.broker_id: b.leaders for b in result.after} == {0: 2, 1: 2}


def test_under_min_isr_and_leaderless_partitions_are_left_alone() -> None:
    parts = [PartitionLoad("t", 0, (0, 1, 2), 0, (0,), 2),  # ISR below min ISR
             PartitionLoad("t", 1, (0, 1, 2), -1, (0, 1, 2), 1),  # offline
             PartitionLoad("t", 2, (0, 1, 2), 0, (0, 1, 2), 1)]
    result = plan(BROKERS, parts)
    assert {(m.topic, m.partition) for m in result.moves} <= {("t", 2)}
    assert len(result.skipped) == 2


def test_deterministic_and_order_independent() -> None:
    parts = _piled(12)
    first = plan(BROKERS, parts, Options(move_replicas=True))
    assert plan(BROKERS, list(reversed(parts)), Options(move_replicas=True)) == first
    assert plan(BROKERS, parts, Options(move_replicas=True)) == first


def test_max_moves_bounds_the_plan() -> None:
    assert len(plan(BROKERS, _piled(30), Options(max_moves=3)).moves) == 3
    assert plan(BROKERS, _piled(30), Options(max_moves=0)).moves == ()
    with pytest.raises(ValueError):
        plan(BROKERS, _piled(), Options(max_moves=-1))


def _racks_ok(replicas: tuple[int, ...], racks: dict[int, str]) -> int:
    return len({racks[b] for b in replicas})


def test_replica_moves_keep_rack_spread_and_min_isr() -> None:
    brokers = [BrokerInfo(b, rack) for b, rack in enumerate("aabbcc")]  # 0,1 in a; 2,3 in b; 4,5 in c
    racks = {b.broker_id: b.rack for b in brokers}
    # every partition on brokers 0, 2, 4 (one per rack); 1, 3, 5 hold nothing
    parts = [PartitionLoad("t", p, (0, 2, 4), 0, (0, 2, 4), 2, 100.0, 0.0, 1000) for p in range(6)]
    result = plan(brokers, parts, Options(max_moves=40, move_replicas=True))
    replica_moves = [m for m in result.moves if m.kind == "replicas"]
    assert replica_moves
    for m in replica_moves:
        assert _racks_ok(m.replicas_after, racks) == 3
        assert len(m.replicas_after) == 3 >= 2  # RF kept, so the ISR after (= target) holds min ISR
        assert len(set(m.replicas_after) - set(m.replicas_before)) == 1
    assert result.spread()["replicas"]["after"] < result.spread()["replicas"]["before"]
    assert {b.broker_id: b.replicas for b in result.after}[1] > 0


def test_replica_moves_never_reduce_racks_or_need_an_out_of_sync_replica() -> None:
    brokers = [BrokerInfo(0, "a"), BrokerInfo(1, "b"), BrokerInfo(2, "a"), BrokerInfo(3, "b")]
    racks = {b.broker_id: b.rack for b in brokers}
    parts = [PartitionLoad("t", p, (0, 1), 0, (0, 1), 1, 0.0, 0.0, 10) for p in range(4)]
    parts.append(PartitionLoad("t", 9, (0, 1), 0, (0,), 1, 0.0, 0.0, 10))  # 1 is out of sync
    result = plan(brokers, parts, Options(move_replicas=True))
    assert any(m.kind == "replicas" for m in result.moves)
    for m in result.moves:
        assert _racks_ok(m.replicas_after, racks) == 2
        if m.partition == 9:  # only the lagging replica may go: the target must be in sync to finish
            assert m.kind == "replicas" and 0 in m.replicas_after and 1 not in m.replicas_after


def test_a_chain_of_moves_when_no_single_move_evens_the_leaders() -> None:
    """2 leads two, 3 leads none, and no partition 2 leads has a replica on 3: 2 -> 0 -> 3."""
    brokers = [BrokerInfo(b) for b in range(4)]
    parts = [PartitionLoad("t", 0, (2, 0), 2, (2, 0)), PartitionLoad("t", 1, (2, 1), 2, (2, 1)),
             PartitionLoad("t", 2, (0, 3), 0, (0, 3)), PartitionLoad("t", 3, (1, 3), 1, (1, 3))]
    result = plan(brokers, parts)
    assert {b.broker_id: b.leaders for b in result.after} == {0: 1, 1: 1, 2: 1, 3: 1}
    assert [(m.partition, m.leader_before, m.leader_after) for m in result.moves] == [(0, 2, 0), (2, 0, 3)]
    assert plan(brokers, parts, Options(max_moves=1)).moves == ()  # the chain does not fit: nothing


@pytest.mark.parametrize("sizes", [(0, 0, 0, 0), (100, 100, 100, 100), (900, 10, 500, 70), (1, 2, 3, 4),
                                   *[tuple((seed * 7919 + p * 104729) % 1000 for p in range(4)) for seed in range(40)]])
def test_replica_moves_also_spread_leadership_one_move_per_partition(sizes: tuple[int, ...]) -> None:
    """RF 2 on brokers 0 and 1 of 4: replicas spread 2 per broker and leaders 1 per broker, whichever
    replica the replica moves picked (a replica move's target is reordered, not moved twice)."""
    brokers = [BrokerInfo(b) for b in range(4)]
    parts = [PartitionLoad("t", p, (p % 2, 1 - p % 2), p % 2, (0, 1), 2, 0.0, 0.0, sizes[p]) for p in range(4)]
    result = plan(brokers, parts, Options(move_replicas=True))
    assert {b.broker_id: b.replicas for b in result.after} == {0: 2, 1: 2, 2: 2, 3: 2}
    assert {b.broker_id: b.leaders for b in result.after} == {0: 1, 1: 1, 2: 1, 3: 1}
    assert len({(m.topic, m.partition) for m in result.moves}) == len(result.moves)
    for m in result.moves:
        assert m.leader_after == m.replicas_after[0]
        assert m.leader_before == parts[m.partition].leader and m.replicas_before == parts[m.partition].replicas


@pytest.mark.parametrize("n,seed", list(itertools.product([3, 6, 9, 20], [0, 1, 2])))
def test_moves_never_pick_a_dead_or_lagging_leader(n: int, seed: int) -> None:
    parts = []
    for p in range(n):
        replicas = tuple(sorted(range(3), key=lambda b: (b * 7 + p * 3 + seed) % 5))
        isr = tuple(b for b in replicas if (b + p + seed) % 4 != 0) or replicas[:1]
        parts.append(PartitionLoad("t", p, replicas, isr[0], isr, 1, float(p), 0.0))
    result = plan(BROKERS, parts)
    by_tp = {(p.topic, p.partition): p for p in parts}
    for m in result.moves:
        assert m.leader_after in by_tp[(m.topic, m.partition)].isr
        assert m.leader_after == m.replicas_after[0]


def test_spread() -> None:
    assert spread([]) == 0.0
    assert spread([0, 0]) == 0.0
    assert spread([6, 0, 0]) == pytest.approx(2.0)
    assert spread([2, 2, 2]) == 0.0
