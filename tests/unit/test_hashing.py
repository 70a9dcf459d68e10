from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.cluster.hashing import assign_replicas, balance_leaders, jump_hash, partition_for_key


def test_partition_in_range_and_stable():
    for n in (1, 2, 7, 100):
        for i in range(500):
            p = partition_for_key(b"key-%d" % i, n)
            assert 0 <= p < n
            assert p == partition_for_key(b"key-%d" % i, n)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 60))
def test_growing_moves_only_into_new_partition(n):
    keys = [b"k%d" % i for i in range(3000)]
    before = {k: partition_for_key(k, n) for k in keys}
    after = {k: partition_for_key(k, n + 1) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == n for k in moved)
    # roughly 1/(n+1) of the keys move
    assert len(moved) <= 3000 * (1.0 / (n + 1)) * 1.5 + 60


def test_jump_hash_distribution():
    counts = [0] * 6
    for i in range(60_000):
        counts[jump_hash(i * 0x9E3779B97F4A7C15 & (2**64 - 1), 6)] += 1
    assert min(counts) > 9000


def test_rendezvous_minimal_movement_and_racks():
    brokers = [1, 2, 3, 4, 5]
    before = {p: assign_replicas("t", p, brokers, 3) for p in range(200)}
    after = {p: assign_replicas("t", p, brokers + [6], 3) for p in range(200)}
    for p in range(200):
        assert len(set(after[p])) == 3
        # replicas that left were displaced by the new broker only
        assert set(before[p]) - set(after[p]) <= set(before[p])
        assert set(after[p]) - set(before[p]) <= {6}
    racks = {1: "a", 2: "a", 3: "b", 4: "b", 5: "c"}
    for p in range(100):
        chosen = assign_replicas("t", p, brokers, 3, racks)
        assert len({racks[b] for b in chosen}) == 3


def test_balance_leaders_spreads_preferred_leaders_and_keeps_replica_sets():
    brokers = [0, 1, 2]
    raw = {p: assign_replicas("bench", p, brokers, 3) for p in range(6)}
    balanced = balance_leaders(raw)
    assert {p: set(r) for p, r in balanced.items()} == {p: set(r) for p, r in raw.items()}
    leaders = [r[0] for r in balanced.values()]
    assert sorted(leaders.count(b) for b in brokers) == [2, 2, 2]
    # growing the topic keeps counting the existing leaders
    more = balance_leaders({p: assign_replicas("bench", p, brokers, 3) for p in range(6, 9)}, balanced)
    leaders += [r[0] for r in more.values()]
    assert sorted(leaders.count(b) for b in brokers) == [3, 3, 3]
