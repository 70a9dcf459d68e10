"""Admin: requests, result mapping and errors — against an in-memory Admin service."""

from __future__ import annotations

import pytest

from logbroker.client.admin import Admin, PartitionInfo, TopicDescription
from logbroker.errors import (
    InvalidPartitionsError,
    InvalidTopicError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from tests.unit.test_client_fakes import FakeMetadata


@pytest.fixture
def admin() -> Admin:
    return Admin(FakeMetadata({"__internal": 1}))


def test_create_list_describe_delete(admin):
    admin.create_topic("orders", partitions=3, config={"retention_ms": 1000, "compact": True})
    assert admin.list_topics() == ["orders"]
    assert admin.list_topics(include_internal=True) == ["__internal", "orders"]
    d = admin.describe_topic("orders")
    assert isinstance(d, TopicDescription)
    assert d.name == "orders" and d.config == {"retention_ms": "1000", "compact": "true"}
    assert [p.partition for p in d.partitions] == [0, 1, 2]  # sorted
    assert d.partitions[0] == PartitionInfo(0, 0, [0], [0], 0, 0, 0, 0, 0)
    admin.create_partitions("orders", 5)
    assert len(admin.describe_topic("orders").partitions) == 5
    assert [t.name for t in admin.describe_topics()] == ["__internal", "orders"]
    admin.delete_topic("orders")
    assert admin.list_topics() == []


def test_errors_raise_their_exceptions(admin):
    admin.create_topic("a")
    with pytest.raises(TopicAlreadyExistsError, match="a exists"):
        admin.create_topic("a")
    with pytest.raises(InvalidTopicError):
        admin.create_topic("bad/name")
    with pytest.raises(InvalidPartitionsError):
        admin.create_partitions("a", 1)
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.describe_topic("nope")
    with pytest.raises(UnknownTopicOrPartitionError):
        admin.delete_topic("nope")


def test_context_manager_closes():
    with Admin(FakeMetadata({})) as a:
        assert a.list_topics() == []
