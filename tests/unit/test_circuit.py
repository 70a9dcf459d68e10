"""client/circuit.py: the per-broker circuit breaker, on a manual clock."""

from __future__ import annotations

import logging

import pytest

from logbroker.client.circuit import Circuit, Circuits, State
from logbroker.clock import ManualClock


def test_consecutive_failures_open_the_circuit_and_a_success_between_resets_the_count():
    c = Circuit(failures_max=3, cool_down_ms=1000)
    assert not c.failed(0) and not c.failed(1)
    assert not c.succeeded()  # closed already: not a "closed" transition
    assert not c.failed(2) and not c.failed(3)
    assert c.failed(4)  # the third in a row
    assert c.state is State.OPEN and not c.allow(5) and c.blocked_ms(5) == 999


def test_after_the_cool_down_exactly_one_probe_goes_and_its_outcome_decides():
    c = Circuit(failures_max=1, cool_down_ms=1000)
    assert c.failed(0)
    assert not c.allow(999)
    assert c.allow(1000) and c.state is State.HALF_OPEN  # the probe
    assert not c.allow(1000) and not c.allow(5000)  # nothing else while it is out
    assert c.blocked_ms(5000) == 0
    assert c.failed(5000)  # the probe failed: open again, a new cool-down
    assert c.state is State.OPEN and not c.allow(5999) and c.allow(6000)
    assert c.succeeded()  # the probe answered: closed
    assert c.state is State.CLOSED and c.allow(6000) and c.allow(6000)


def test_failures_of_calls_sent_before_the_circuit_opened_do_not_extend_it():
    c = Circuit(failures_max=1, cool_down_ms=1000)
    c.failed(0)
    assert not c.failed(500)  # an older call failing late: still open from 0
    assert c.allow(1000)


def test_circuits_per_address_log_one_line_on_opening_and_one_on_closing(caplog: pytest.LogCaptureFixture):
    clock = ManualClock()
    circuits = Circuits(failures_max=2, cool_down_ms=100, clock=clock)
    caplog.set_level(logging.INFO, logger="logbroker.client.circuit")
    circuits.failed("a:1", "overloaded")
    circuits.failed("b:1")
    assert circuits.allow("a:1")
    circuits.failed("a:1", "overloaded")
    assert circuits.state("a:1") is State.OPEN and circuits.state("b:1") is State.CLOSED
    assert not circuits.allow("a:1") and circuits.allow("b:1")
    assert circuits.blocked_ms("a:1") == 100
    clock.advance(100)
    assert circuits.allow("a:1") and not circuits.allow("a:1")
    circuits.succeeded("a:1")
    assert circuits.state("a:1") is State.CLOSED and circuits.allow("a:1")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "circuit to broker a:1 opened after 2 consecutive failures" in lines[0] and "overloaded" in lines[0]
    assert "circuit to broker a:1 closed" in lines[1]


def test_a_circuit_that_keeps_reopening_warns_at_most_once_a_minute(caplog: pytest.LogCaptureFixture):
    clock = ManualClock()
    circuits = Circuits(failures_max=1, cool_down_ms=10, clock=clock)
    caplog.set_level(logging.WARNING, logger="logbroker.client.circuit")
    for _ in range(20):
        circuits.failed("a:1")
        clock.advance(10)
        assert circuits.allow("a:1")  # the probe, which fails again
    assert len(caplog.records) == 1
    clock.advance(60_000)
    circuits.failed("a:1")
    assert len(caplog.records) == 2 and "opened 20 time(s)" in caplog.records[1].getMessage()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        Circuits(failures_max=0)
