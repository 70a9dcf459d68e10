"""Admin's consumer-group calls against the in-memory coordinator (no sockets)."""

from __future__ import annotations

import time

import pytest

from logbroker.client.admin import Admin, PartitionLag
from logbroker.client.circuit import Circuits
from logbroker.client.consumer import Consumer
from logbroker.errors import (
    BrokerUnavailableError,
    GroupIdNotFoundError,
    NonEmptyGroupError,
    UnknownTopicOrPartitionError,
)
from tests.unit.fake_coordinator import FakeCoordinator
from tests.unit.test_client_consumer import fill
from tests.unit.test_client_fakes import FakeMetadata

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def md() -> FakeMetadata:
    md = FakeMetadata({"t": 3})
    md.coordinator = FakeCoordinator(md)  # type: ignore[attr-defined]
    fill(md, "t", {0: 10, 1: 20, 2: 5})
    return md


def joined(md: FakeMetadata, group: str) -> Consumer:
    c = Consumer(md, ["t"], group=group, enable_auto_commit=False)
    deadline = time.monotonic() + 10
    while len(c.assignment()) < 3:
        assert time.monotonic() < deadline
        c.poll(timeout_ms=10)
    return c


def test_list_describe_lag_and_delete(md):
    admin = Admin(md)
    assert admin.list_groups() == []
    with pytest.raises(GroupIdNotFoundError):
        admin.describe_group("g")
    c = joined(md, "g")
    try:
        c.commit({("t", 0): 4, ("t", 1): 20})
        (listing,) = admin.list_groups()
        assert (listing.group, listing.members, listing.coordinator_id) == ("g", 1, 0)
        d = admin.describe_group("g")
        assert d.group == "g" and d.assignor == "sticky" and d.offsets == {("t", 0): 4, ("t", 1): 20}
        (m,) = d.members
        assert m.member_id == c.member_id and m.assigned == [("t", 0), ("t", 1), ("t", 2)]
        assert m.subscribed_topics == ["t"]
        assert admin.group_lag("g") == [
            PartitionLag("t", 0, 4, 10, 6, c.member_id),
            PartitionLag("t", 1, 20, 20, 0, c.member_id),
            PartitionLag("t", 2, None, 5, None, c.member_id),
        ]
        with pytest.raises(NonEmptyGroupError):
            admin.delete_group("g")
    finally:
        c.close()
    (listing,) = admin.list_groups()
    assert listing.members == 0
    assert [r.member_id for r in admin.group_lag("g")] == ["", ""]
    admin.delete_group("g")
    with pytest.raises(GroupIdNotFoundError):
        admin.delete_group("g")
    assert admin.list_groups() == []


def test_reset_offsets_modes(md):
    admin = Admin(md)
    md.broker.log_start[("t", 1)] = 3
    assert admin.reset_offsets("g", "t", "earliest") == {("t", 0): 0, ("t", 1): 3, ("t", 2): 0}
    assert md.coordinator.committed["g"] == {("t", 0): 0, ("t", 1): 3, ("t", 2): 0}
    assert md.coordinator.commits[-1].member_id == ""
    assert admin.reset_offsets("g", "t", "shift", 4) == {("t", 0): 4, ("t", 1): 7, ("t", 2): 4}
    assert admin.reset_offsets("g", "t", "shift", -100) == {("t", 0): 0, ("t", 1): 3, ("t", 2): 0}  # clamped
    assert admin.reset_offsets("g", "t", "offset", 7, partitions=[0, 1]) == {("t", 0): 7, ("t", 1): 7}
    assert admin.reset_offsets("g", "t", "latest", dry_run=True) == {("t", 0): 10, ("t", 1): 20, ("t", 2): 5}
    assert md.coordinator.committed["g"][("t", 0)] == 7  # a dry run commits nothing
    assert admin.reset_offsets("g", "t", "latest") == {("t", 0): 10, ("t", 1): 20, ("t", 2): 5}
    assert admin.reset_offsets("g", "t", "offset", 99, partitions=[2]) == {("t", 2): 5}
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.reset_offsets("g", "t", "earliest", partitions=[3])
    with pytest.raises(ValueError):
        admin.reset_offsets("g", "t", "middle")
    with pytest.raises(ValueError):
        admin.reset_offsets("g", "t", "offset")


def test_reset_offsets_refused_while_the_group_has_members(md):
    admin = Admin(md)
    c = joined(md, "g")
    try:
        with pytest.raises(NonEmptyGroupError):
            admin.reset_offsets("g", "t", "earliest")
        assert "g" not in md.coordinator.committed
    finally:
        c.close()
    admin.reset_offsets("g", "t", "earliest")
    c = joined(md, "g")  # the next member starts where the reset put the group
    try:
        assert c.committed("t", 1) == 0
    finally:
        c.close()


def test_reset_offsets_of_a_missing_group_only_when_allowed(md):
    admin = Admin(md)
    with pytest.raises(GroupIdNotFoundError):
        admin.reset_offsets("typo", "t", "earliest", allow_new_group=False)
    assert "typo" not in md.coordinator.committed
    admin.reset_offsets("typo", "t", "earliest")  # the API's default creates it, as Kafka's Admin does
    assert admin.reset_offsets("typo", "t", "latest", allow_new_group=False) == {("t", 0): 10, ("t", 1): 20,
                                                                                 ("t", 2): 5}


def test_lag_and_group_listing_send_nothing_to_a_broker_whose_circuit_is_open(md):
    admin = Admin(md)
    c = joined(md, "g")
    try:
        c.commit({("t", 0): 4})
        d = admin.describe_group("g")
    finally:
        c.close()
    md.circuits = Circuits(failures_max=1, cool_down_ms=60_000)
    md.circuits.failed("broker0:9092", "down")
    # no ListOffsets to the leader during the cool-down: log ends unknown (retried once, after a refresh)
    assert [(r.partition, r.log_end_offset) for r in admin.group_lag("g", d)] == [(0, None), (1, None), (2, None)]
    with pytest.raises(BrokerUnavailableError, match="circuit open"):
        admin.list_groups()  # the only broker
    md.circuits.succeeded("broker0:9092")
    assert [(r.partition, r.log_end_offset) for r in admin.group_lag("g", d)] == [(0, 10), (1, 20), (2, 5)]
