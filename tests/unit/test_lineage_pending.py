"""A cluster's pending split (cluster/lineage.py): recorded before the old partitions' leaders have
given their split offsets; readers hold the children until it is complete. Pure, no sockets."""

from __future__ import annotations

import json

import pytest

from logbroker.cli import _lineage
from logbroker.client.consumer.lineage_gate import LineageGate
from logbroker.client.consumer.subscription import SubscriptionState, TopicPartition
from logbroker.cluster.controller import ControllerState
from logbroker.cluster.lineage import (
    SPLIT_PENDING,
    Split,
    child_ready,
    complete_split,
    parents_of,
    splits_from_json,
    splits_to_json,
    waiting_on,
)
from logbroker.cluster.metadata import TopicSpec
from logbroker.cluster.metadata_image import MetadataImage
from logbroker.errors import OffsetNotAvailableError
from logbroker.retry import RetryPolicy
from logbroker.server.apis.produce_fetch import split_offset
from logbroker.v1 import logbroker_pb2 as pb

PENDING = Split(2, 3, ())


def test_a_pending_split_has_no_offsets_and_its_children_have_unknown_parents() -> None:
    assert PENDING.pending and not Split(2, 3, (5, 6)).pending
    assert parents_of([PENDING], 2) == {0: SPLIT_PENDING, 1: SPLIT_PENDING}
    assert parents_of([PENDING], 1) == {}
    with pytest.raises(ValueError):
        Split(2, 3, (5,))  # neither pending nor complete


def test_a_child_of_a_pending_split_is_never_ready_however_far_its_parents_were_read() -> None:
    parents = parents_of([PENDING], 2)
    far = {0: 10**9, 1: 10**9}
    assert not child_ready(parents, far)
    assert waiting_on(parents, far) == parents
    assert not child_ready({0: 5, 1: SPLIT_PENDING}, far)  # one unknown parent is enough


def test_completing_a_split_fills_only_the_pending_one_to_that_count() -> None:
    older = Split(1, 2, (7,))
    done = complete_split([older, PENDING], 3, [5, 6])
    assert done == [older, Split(2, 3, (5, 6))]
    assert parents_of(done, 2) == {0: 5, 1: 6}
    assert complete_split(done, 3, [9, 9]) == done  # nothing pending: unchanged
    assert complete_split([PENDING], 4, [1, 1]) == [PENDING]  # another growth's count: unchanged


def test_a_pending_split_survives_its_json_round_trip() -> None:
    raw = splits_to_json([Split(1, 2, (7,)), PENDING])
    assert raw[1] == {"from": 2, "to": 3, "end_offsets": []}
    assert splits_from_json(json.loads(json.dumps(raw))) == [Split(1, 2, (7,)), PENDING]


def test_a_leader_gives_its_split_offset_only_once_it_checks_keys_against_the_new_count() -> None:
    with pytest.raises(OffsetNotAvailableError):
        split_offset("t", 8, 0, 120)  # it has not heard of the growth
    with pytest.raises(OffsetNotAvailableError):
        split_offset("t", 12, 8, 120)  # an older growth only
    assert split_offset("t", 8, 8, 120) == 120
    assert split_offset("t", 8, 12, 130) == 130  # grown again since: still fenced for 8


def test_the_controller_sends_the_splits_of_key_ordered_topics_and_the_image_keeps_them() -> None:
    core = ControllerState(1, 3)
    core.topics["a"] = TopicSpec("a", {0: [1], 1: [1], 2: [1]}, {"key_order_on_growth": "true"}, splits=[PENDING])
    core.topics["b"] = TopicSpec("b", {0: [1], 1: [1], 2: [1]}, {"key_order_on_growth": "false"},
                                 splits=[Split(2, 3, (1, 1))])
    core.topics["c"] = TopicSpec("c", {0: [1]}, {})
    req = core.update_metadata_request()
    assert set(req.topic_splits_json) == {"a"}
    image = MetadataImage()
    image.apply(req)
    assert image.splits == {"a": [PENDING]}
    core.topics["a"].splits = complete_split(core.topics["a"].splits, 3, [4, 5])
    image.apply(core.update_metadata_request())
    assert image.splits == {"a": [Split(2, 3, (4, 5))]}
    image.apply(pb.UpdateMetadataRequest(controller_id=1, controller_epoch=3))
    assert image.splits == {}


class _NoCommits:
    def __call__(self, partitions: list[TopicPartition], deadline: float) -> dict[TopicPartition, int]:
        return {}


@pytest.mark.parametrize("group", [True, False])
def test_the_consumer_holds_a_child_of_a_pending_split_and_asks_for_metadata_again(group: bool) -> None:
    lineage: dict[tuple[str, int], dict[int, int]] = {("t", 2): {0: SPLIT_PENDING, 1: SPLIT_PENDING}}
    subs = SubscriptionState()
    subs.assign([("t", 0), ("t", 1), ("t", 2)])
    for st in subs.assigned.values():
        st.seek(50)
    gate = LineageGate(subs, lambda t, p: dict(lineage.get((t, p), {})), _NoCommits() if group else None,
                       RetryPolicy(initial_ms=100, max_ms=1000, jitter=0.0), 1.0)
    gate.update(0.0)
    assert gate.waiting() == [("t", 2)] and gate.lineage_unknown
    lineage[("t", 2)] = {0: 40, 1: 50}  # the metadata now has the complete split
    gate.update(0.1)
    assert gate.waiting() == [] and not gate.lineage_unknown


def test_topics_describe_shows_a_pending_split() -> None:
    assert _lineage({"0": 4, "1": 9}) == "0@4,1@9"
    assert _lineage({"0": SPLIT_PENDING, "1": SPLIT_PENDING}) == "0,1 (pending)"


def test_a_partition_only_a_leader_and_isr_named_has_unknown_lineage_until_the_update_metadata() -> None:
    core = ControllerState(1, 3)
    core.topics["a"] = TopicSpec("a", {0: [1], 1: [1]}, {})
    image = MetadataImage()
    image.apply(core.update_metadata_request())
    assert image.partition_parents("a", 1) == {}
    # the topic grew: the new partition's LeaderAndIsr arrives before the UpdateMetadata
    image.apply_partition_states([pb.PartitionState(topic="a", partition=2, leader=1, leader_epoch=0)])
    assert image.partition_parents("a", 2) == {0: SPLIT_PENDING, 1: SPLIT_PENDING}
    assert image.partition_parents("a", 1) == {}
    image.apply_partition_states([pb.PartitionState(topic="new", partition=0, leader=1, leader_epoch=0)])
    assert image.partition_parents("new", 0) == {}  # a new topic has no lineage
    core.topics["a"] = TopicSpec("a", {0: [1], 1: [1], 2: [1]}, {}, splits=[Split(2, 3, (3, 4))])
    image.apply(core.update_metadata_request())
    assert image.partition_parents("a", 2) == {0: 3, 1: 4}
