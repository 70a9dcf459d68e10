"""Requester: where it opens its reply stream, against the in-memory fakes (the reply stream itself,
a socket, is replaced by a stand-in that fails or opens as the test says; tests/integration/
test_request_reply.py runs the real one)."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from logbroker.client import requester as requester_module
from logbroker.client.circuit import Circuits, State
from logbroker.client.requester import Requester
from logbroker.clock import ManualClock
from logbroker.errors import BrokerUnavailableError
from tests.unit.test_client_fakes import FakeMetadata

pytestmark = pytest.mark.timeout(30)


class _Streams:
    """Stands in for ReplyStream: the hosts in `down` refuse (as a stopped broker's data port does)."""

    def __init__(self) -> None:
        self.down: set[str] = set()
        self.opened: list[str] = []

    def __call__(self, target: tuple[str, int], on_replies: Any, on_closed: Any, timeout_s: float) -> Any:
        self.opened.append(target[0])
        if target[0] in self.down:
            raise BrokerUnavailableError(f"cannot open a reply stream to {target[0]}:{target[1]}: refused")
        return _Stream(target)


class _Stream:
    def __init__(self, target: tuple[str, int]) -> None:
        self.where = f"{target[0]}:{target[1]}"
        self.reply_to = f"0:{target[0]}"
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def streams(monkeypatch: pytest.MonkeyPatch) -> _Streams:
    fake = _Streams()
    monkeypatch.setattr(requester_module, "ReplyStream", fake)
    return fake


def test_a_broker_refusing_reply_streams_gets_its_circuit_opened_and_no_attempt_until_the_probe(streams, caplog):
    caplog.set_level(logging.INFO, logger="logbroker.client.circuit")
    md = FakeMetadata({"rpc": 1})
    md._data_addresses["broker0:9092"] = ("broker0", 9093)
    clock = ManualClock()
    md.circuits = Circuits(failures_max=2, cool_down_ms=5_000, clock=clock)
    streams.down.add("broker0")
    with Requester(md, timeout_ms=60_000) as req:
        for _ in range(4):
            with pytest.raises(BrokerUnavailableError):
                req.request_async("rpc", b"x")
        assert streams.opened == ["broker0"] * 2  # then nothing during the cool-down
        assert md.circuits.state("broker0:9092") is State.OPEN
        with pytest.raises(BrokerUnavailableError, match="circuit to broker0:9092 open"):
            req.request_async("rpc", b"x")
        streams.down.clear()
        clock.advance(5_000)
        req.request_async("rpc", b"x")  # the probe opens the stream
        assert streams.opened == ["broker0"] * 3 and md.circuits.state("broker0:9092") is State.CLOSED
    lines = [r.getMessage() for r in caplog.records if r.name == "logbroker.client.circuit"]
    assert len(lines) == 2 and "broker0:9092 opened" in lines[0] and "refused" in lines[0] and "closed" in lines[1]


def test_a_reply_stream_goes_to_another_broker_while_one_circuit_is_open(streams):
    md = FakeMetadata({"rpc": 1}, leaders={("rpc", 0): 1}, brokers=2)  # (the requests' producer: to broker1)
    md._data_addresses.update({"broker0:9092": ("broker0", 9093), "broker1:9092": ("broker1", 9093)})
    md.circuits = Circuits(failures_max=1, cool_down_ms=60_000)
    md.circuits.failed("broker0:9092", "down")
    with Requester(md, timeout_ms=60_000) as req:
        for _ in range(10):
            req._stream = None  # (as after its stream closed) the next request opens a new one
            req.request_async("rpc", b"x")
    assert streams.opened == ["broker1"] * 10
