"""server/connection_gate.py: the record transport's admission of new connections (no socket)."""

from __future__ import annotations

import pytest

from logbroker.clock import ManualClock
from logbroker.server.connection_gate import (
    REFUSED_CONNECTIONS_MAX,
    REFUSED_PER_IP,
    REFUSED_RATE,
    ConnectionGate,
)


def gate(per_ip: int = 3, rate: int = 0, most: int = 10) -> tuple[ConnectionGate, ManualClock]:
    clock = ManualClock()
    return ConnectionGate(most, per_ip, rate, lambda: clock.monotonic_ms() / 1000), clock


def test_per_address_limit_and_release() -> None:
    g, _ = gate(per_ip=2)
    assert g.admit("10.0.0.1") is None and g.admit("10.0.0.1") is None
    assert g.admit("10.0.0.1") == REFUSED_PER_IP
    assert g.admit("10.0.0.2") is None  # another address is not held back
    g.release("10.0.0.1")
    assert g.admit("10.0.0.1") is None
    assert g.refused == {REFUSED_PER_IP: 1} and g.admitted == 3
    for host in ("10.0.0.1", "10.0.0.1", "10.0.0.2"):
        g.release(host)
    assert g.admitted == 0 and g.open_from("10.0.0.1") == 0
    with pytest.raises(AssertionError):
        g.release("10.0.0.1")


def test_connections_max_counts_every_address() -> None:
    g, _ = gate(per_ip=100, most=3)
    assert [g.admit(f"10.0.0.{i}") for i in range(4)] == [None, None, None, REFUSED_CONNECTIONS_MAX]


def test_creation_rate_is_a_token_bucket_of_one_seconds_burst() -> None:
    g, clock = gate(per_ip=1000, rate=5, most=1000)
    assert [g.admit("h") for _ in range(6)] == [None] * 5 + [REFUSED_RATE]
    clock.advance(200)  # one token back
    assert g.admit("h") is None and g.admit("h") == REFUSED_RATE
    clock.advance(10_000)  # never more than one second's worth
    assert [g.admit("h") for _ in range(6)] == [None] * 5 + [REFUSED_RATE]
    assert g.refused == {REFUSED_RATE: 3}


def test_refused_connections_take_no_token_and_rate_zero_is_off() -> None:
    g, _ = gate(per_ip=1, rate=2, most=100)
    assert g.admit("a") is None
    assert [g.admit("a") for _ in range(5)] == [REFUSED_PER_IP] * 5
    assert g.admit("b") is None  # the per-address refusals cost no token
    off, _ = gate(per_ip=1000, rate=0, most=1000)
    assert all(off.admit("h") is None for _ in range(500))
