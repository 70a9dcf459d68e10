"""Admin: requests, result mapping and errors — against an in-memory Admin service."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from logbroker.client.admin import Admin, PartitionInfo, TopicDescription
from logbroker.client.circuit import Circuits, State
from logbroker.clock import ManualClock
from logbroker.errors import (
    InvalidPartitionsError,
    InvalidTopicError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from tests.unit.test_client_fakes import FakeMetadata, FakeRpcError


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


class _DownController(FakeMetadata):
    """Two brokers; the controller (broker0) is unreachable; every admin call's address is recorded."""

    def __init__(self) -> None:
        super().__init__({"__internal": 1}, brokers=2)
        self.admin_calls: list[str] = []

    def admin_stub(self, address: str) -> Any:
        self.admin_calls.append(address)
        if address == "broker0:9092":
            return _Unreachable()
        return super().admin_stub(address)


class _Unreachable:
    def __getattr__(self, name: str) -> Any:
        def call(request: Any, timeout: float | None = None) -> Any:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        return call


def test_a_controller_that_keeps_failing_gets_its_circuit_opened_and_calls_go_elsewhere(caplog):
    caplog.set_level(logging.WARNING, logger="logbroker.client.circuit")
    md = _DownController()
    clock = ManualClock()
    md.circuits = Circuits(failures_max=2, cool_down_ms=5_000, clock=clock)
    admin = Admin(md)
    for _ in range(4):
        assert [t.name for t in admin.describe_topics()] == ["__internal"]
    assert md.admin_calls == ["broker0:9092", "broker1:9092"] * 2 + ["broker1:9092"] * 2  # then not to broker0
    assert md.circuits.state("broker0:9092") is State.OPEN
    assert len([r for r in caplog.records if r.name == "logbroker.client.circuit"]) == 1
    clock.advance(5_000)
    md.admin_calls.clear()
    admin.describe_topics()
    assert md.admin_calls == ["broker0:9092", "broker1:9092"]  # the probe, failed: open again
    assert md.circuits.state("broker0:9092") is State.OPEN


def test_a_final_refusal_is_an_answer_for_the_circuit(admin):
    circuits = admin._metadata.circuits = Circuits(failures_max=2)
    circuits.failed("broker0:9092", "x")
    with pytest.raises(TopicAlreadyExistsError):
        admin.create_topic("__internal")  # answered: the broker is up, the count starts again
    circuits.failed("broker0:9092", "x")
    assert circuits.state("broker0:9092") is State.CLOSED
