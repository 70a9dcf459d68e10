"""Partition lineage (cluster/lineage.py), the broker's check of a grown topic's keys, and the
consumer's gate (client/consumer/lineage_gate.py): pure, no sockets."""

from __future__ import annotations

import pytest

from logbroker.client.consumer.lineage_gate import LineageGate
from logbroker.client.consumer.subscription import SubscriptionState, TopicPartition
from logbroker.cluster.hashing import partition_for_key
from logbroker.cluster.lineage import (
    Split,
    child_ready,
    misplaced_keys,
    moved_keys,
    parents_of,
    splits_from_json,
    splits_to_json,
    waiting_on,
)
from logbroker.cluster.metadata import normalize_topic_config
from logbroker.errors import InvalidConfigError, PartitionCountChangedError
from logbroker.retry import RetryPolicy
from logbroker.server.apis.produce_fetch import check_keys_placed
from logbroker.storage.record_batch import encode_batch

KEYS = [f"user-{i}".encode() for i in range(20_000)]


@pytest.mark.parametrize("before,after", [(6, 8), (6, 12), (8, 12), (6, 7)])
def test_growing_moves_about_the_ideal_fraction_of_keys_only_into_new_partitions(before: int, after: int) -> None:
    moved = moved_keys(KEYS, before, after)
    ideal = len(KEYS) * (after - before) / after  # a key stays with probability before/after
    assert ideal / 1.5 <= moved <= ideal * 1.5, (moved, ideal)
    for k in KEYS[:2000]:
        old, new = partition_for_key(k, before), partition_for_key(k, after)
        assert new == old or new >= before  # a moved key only goes to a new partition


def test_parents_of_a_child_are_every_old_partition_with_its_split_offset() -> None:
    splits = [Split(6, 8, (10, 11, 12, 13, 14, 15)), Split(8, 12, (20, 21, 22, 23, 24, 25, 3, 4))]
    assert parents_of(splits, 0) == {}
    assert parents_of(splits, 5) == {}
    assert parents_of(splits, 6) == {0: 10, 1: 11, 2: 12, 3: 13, 4: 14, 5: 15}
    assert parents_of(splits, 7) == parents_of(splits, 6)
    assert parents_of(splits, 9) == {0: 20, 1: 21, 2: 22, 3: 23, 4: 24, 5: 25, 6: 3, 7: 4}
    assert splits_from_json(splits_to_json(splits)) == splits
    assert splits_from_json(None) == []


@pytest.mark.parametrize("args", [(6, 6, (0,) * 6), (0, 2, ()), (6, 8, (0,) * 5), (2, 3, (1, -1))])
def test_a_split_must_grow_and_name_one_offset_per_old_partition(args: tuple[int, int, tuple[int, ...]]) -> None:
    with pytest.raises(ValueError):
        Split(*args)


def test_a_child_is_ready_only_when_every_parent_reached_its_split_offset() -> None:
    parents = {0: 5, 1: 0, 2: 7}
    assert not child_ready(parents, {})
    assert not child_ready(parents, {0: 5, 1: 0, 2: 6})
    assert waiting_on(parents, {0: 5, 1: 0, 2: 6}) == {2: 7}
    assert child_ready(parents, {0: 5, 1: 0, 2: 7})
    assert child_ready(parents, {0: 9, 1: 3, 2: 100})
    assert child_ready({}, {})


def test_misplaced_keys_counts_keys_hashing_elsewhere_and_never_null_keys() -> None:
    keys = KEYS[:200]
    home = [k for k in keys if partition_for_key(k, 8) == 3]
    away = [k for k in keys if partition_for_key(k, 8) != 3]
    assert misplaced_keys([*home, None], 3, 8) == 0
    assert misplaced_keys([*home, *away[:4]], 3, 8) == 4


def _batch(keys: list[bytes | None]) -> bytes:
    return encode_batch([(1000, k, b"v", None) for k in keys])


def test_the_broker_refuses_a_grown_topics_batch_holding_a_moved_key() -> None:
    moved = next(k for k in KEYS if partition_for_key(k, 6) == 2 and partition_for_key(k, 8) != 2)
    stayed = next(k for k in KEYS if partition_for_key(k, 6) == 2 and partition_for_key(k, 8) == 2)
    check_keys_placed("t", 2, _batch([stayed, None]), 8)
    check_keys_placed("t", 2, _batch([moved]), 0)  # a topic that never grew: not decoded, not checked
    with pytest.raises(PartitionCountChangedError) as err:
        check_keys_placed("t", 2, _batch([stayed, moved]), 8)
    assert err.value.refresh_metadata and not err.value.retriable


# -- the consumer's gate ------------------------------------------------------------------------

POLICY = RetryPolicy(initial_ms=100, max_ms=1000, jitter=0.0)


class Committed:
    """The group's committed offsets, as OffsetFetch would answer; counts the calls."""

    def __init__(self) -> None:
        self.offsets: dict[TopicPartition, int] = {}
        self.calls: list[list[TopicPartition]] = []

    def __call__(self, partitions: list[TopicPartition], deadline: float) -> dict[TopicPartition, int]:
        self.calls.append(partitions)
        return {tp: self.offsets[tp] for tp in partitions if tp in self.offsets}


LINEAGE = {("t", 2): {0: 10, 1: 4}}


def _parents(topic: str, partition: int) -> dict[int, int]:
    return dict(LINEAGE.get((topic, partition), {}))


def test_a_child_is_held_until_the_parents_this_consumer_holds_pass_their_split_offsets() -> None:
    subs = SubscriptionState()
    subs.assign([("t", 0), ("t", 1), ("t", 2)])
    for st in subs.assigned.values():
        st.seek(0)
    gate = LineageGate(subs, _parents, Committed(), POLICY, 1.0)
    gate.update(0.0)
    assert gate.waiting() == [("t", 2)] and not subs.assigned[("t", 0)].held
    subs.assigned[("t", 0)].seek(10)
    gate.update(0.1)
    assert gate.waiting() == [("t", 2)]  # partition 1 is at 0 of 4
    subs.assigned[("t", 1)].seek(4)
    gate.update(0.2)
    assert gate.waiting() == []
    subs.assigned[("t", 0)].seek(0)  # once open, a child stays open
    gate.update(0.3)
    assert gate.waiting() == []


def test_a_parent_held_elsewhere_in_the_group_is_waited_for_through_its_committed_offset() -> None:
    subs = SubscriptionState()
    subs.assign([("t", 0), ("t", 2)])  # partition 1 belongs to another member
    for st in subs.assigned.values():
        st.seek(10)
    committed = Committed()
    gate = LineageGate(subs, _parents, committed, POLICY, 1.0)
    gate.update(0.0)
    assert gate.waiting() == [("t", 2)] and committed.calls == [[("t", 1)]]
    committed.offsets[("t", 1)] = 4
    gate.update(0.05)  # backing off: not asked again yet
    assert gate.waiting() == [("t", 2)] and len(committed.calls) == 1
    gate.update(0.2)
    assert gate.waiting() == [] and len(committed.calls) == 2


def test_without_a_group_only_the_consumers_own_parents_hold_a_child() -> None:
    subs = SubscriptionState()
    subs.assign([("t", 0), ("t", 2)])
    subs.assigned[("t", 0)].seek(3)
    subs.assigned[("t", 2)].seek(0)
    gate = LineageGate(subs, _parents, None, POLICY, 1.0)
    gate.update(0.0)
    assert gate.waiting() == [("t", 2)]
    subs.assigned[("t", 0)].seek(10)
    gate.update(0.1)
    assert gate.waiting() == []


def test_partitions_without_parents_are_never_held() -> None:
    subs = SubscriptionState()
    subs.assign([("t", 0), ("u", 2)])
    gate = LineageGate(subs, _parents, Committed(), POLICY, 1.0)
    gate.update(0.0)
    assert gate.waiting() == []


def test_key_order_on_growth_is_a_topic_config_true_or_false() -> None:
    assert normalize_topic_config({})["key_order_on_growth"] == "true"
    assert normalize_topic_config({"key.order.on.growth": "false"})["key_order_on_growth"] == "false"
    with pytest.raises(InvalidConfigError):
        normalize_topic_config({"key_order_on_growth": "maybe"})
