"""MetadataCache: bootstrap parsing, merging Metadata responses, leader lookups (no sockets)."""

from __future__ import annotations

import grpc
import pytest

from logbroker.client.metadata_cache import MetadataCache, broker_address, parse_bootstrap
from logbroker.clock import ManualClock
from logbroker.errors import BrokerUnavailableError, LeaderNotAvailableError, UnknownTopicOrPartitionError
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_client_fakes import FakeMetadata, FakeRpcError


def test_parse_bootstrap():
    assert parse_bootstrap("a:1") == ["a:1"]
    assert parse_bootstrap(" a:1, b:2 ,a:1,") == ["a:1", "b:2"]
    assert parse_bootstrap(["[::1]:9092", "h:2"]) == ["[::1]:9092", "h:2"]
    for bad in ("", "host", "host:", ":99", "h:0", "h:70000", "h:x"):
        with pytest.raises(ValueError):
            parse_bootstrap(bad)


def test_broker_address_brackets_ipv6():
    assert broker_address("::1", 9092) == "[::1]:9092"
    assert broker_address("h", 1) == "h:1"


def _response(*topics: tuple[str, list[int]], brokers: dict[int, tuple[str, int]] | None = None) -> pb.MetadataResponse:
    resp = pb.MetadataResponse(cluster_id="c", controller_id=0)
    for bid, (host, port) in (brokers or {0: ("h0", 1), 1: ("h1", 2)}).items():
        resp.brokers.add(broker_id=bid, host=host, port=port)
    for name, leaders in topics:
        t = resp.topics.add(name=name)
        for p, leader in enumerate(leaders):
            t.partitions.add(partition=p, leader=leader, leader_epoch=3)
    return resp


def test_apply_maps_partitions_to_leaders():
    mc = MetadataCache("boot:1")
    mc.apply(_response(("a", [0, 1, -1])), None)
    assert mc.cached_partitions("a") == 3
    assert mc.leader("a", 0) == "h0:1"
    assert mc.leader("a", 1) == "h1:2"
    assert mc.leader("a", 2) is None
    assert mc.leader_epoch("a", 1) == 3
    assert mc.controller_address() == "h0:1"
    with pytest.raises(UnknownTopicOrPartitionError):
        mc.leader("a", 3)
    with pytest.raises(UnknownTopicOrPartitionError):
        mc.leader("b", 0)
    mc.close()


def test_apply_merges_asked_topics_and_drops_unknown_ones():
    mc = MetadataCache("boot:1")
    mc.apply(_response(("a", [0]), ("b", [0])), None)
    resp = _response(("a", [1, 1]))
    resp.topics.add(name="b", error_code=pb.UNKNOWN_TOPIC_OR_PARTITION)
    mc.apply(resp, ["a", "b"])
    assert mc.cached_partitions("a") == 2 and mc.leader("a", 0) == "h1:2"
    assert mc.cached_partitions("b") is None
    mc.apply(_response(("c", [0])), ["c", "missing"])
    assert sorted(mc.topics()) == ["a", "c"]
    mc.apply(_response(("c", [0])), None)  # all topics: the ones not in the answer are gone
    assert mc.topics() == ["c"]


def test_transient_topic_error_keeps_what_was_known():
    mc = MetadataCache("boot:1")
    mc.apply(_response(("a", [0])), None)
    resp = _response()
    resp.topics.add(name="a", error_code=pb.LEADER_NOT_AVAILABLE)
    mc.apply(resp, ["a"])
    assert mc.cached_partitions("a") == 1


def test_wildcard_advertised_host_becomes_the_answering_host():
    mc = MetadataCache("10.0.0.5:9092")
    mc.apply(_response(("a", [0]), brokers={0: ("0.0.0.0", 9092)}), None, answered_by="10.0.0.5:9092")
    assert mc.leader("a", 0) == "10.0.0.5:9092"


def test_partitions_for_refreshes_then_raises_for_unknown_topics():
    md = FakeMetadata({"a": 2})
    assert md.partitions_for("a") == 2
    n = len(md.refreshes)
    with pytest.raises(UnknownTopicOrPartitionError):
        md.partitions_for("nope")
    assert md.refreshes[n:] == [["nope"]]
    md.topic_partitions["nope"] = 5
    assert md.partitions_for("nope") == 5


def test_leader_address_refreshes_once_and_raises_without_leader():
    md = FakeMetadata({"a": 1}, leaders={("a", 0): -1})
    with pytest.raises(LeaderNotAvailableError):
        md.leader_address("a", 0)
    md.leaders[("a", 0)] = 0
    assert md.leader_address("a", 0) == "broker0:9092"


class _Stub:
    def __init__(self, outcomes: list[object]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    def Metadata(self, request, timeout=None):  # noqa: N802 - gRPC method name
        self.calls += 1
        out = self.outcomes.pop(0)
        if isinstance(out, BaseException):
            raise out
        return out


class _ScriptedCache(MetadataCache):
    def __init__(self, bootstrap: str, stubs: dict[str, _Stub]) -> None:
        super().__init__(bootstrap, retries=1, retry_backoff_ms=1)
        self.stubs = stubs

    def broker_stub(self, address: str):  # type: ignore[override]
        return self.stubs[address]


def test_refresh_tries_each_bootstrap_address_then_gives_up():
    down = FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")
    a = _Stub([down, down])
    b = _Stub([down, _response(("t", [0]), brokers={0: ("a", 1)})])
    mc = _ScriptedCache("a:1,b:2", {"a:1": a, "b:2": b})
    mc.refresh(["t"])
    assert a.calls == 2 and b.calls == 2 and mc.cached_partitions("t") == 1

    c = _Stub([down, down])
    mc2 = _ScriptedCache("c:3", {"c:3": c})
    with pytest.raises(BrokerUnavailableError):
        mc2.refresh(None)
    assert c.calls == 2  # retries=1: two rounds, bounded


def test_last_refresh_is_on_the_injected_clock():
    clock = ManualClock()
    clock.advance(12_345)
    mc = MetadataCache("boot:1", clock=clock)
    assert mc.last_refresh_monotonic == 0.0
    mc.apply(_response(("a", [0])), None)
    assert mc.last_refresh_monotonic == 12.345  # the client compares it with its own clock
    mc.close()
