"""The active-clients window (server/active_clients.py) with a manual clock."""

from __future__ import annotations

import pytest

from logbroker.clock import ManualClock
from logbroker.server.active_clients import CONSUMERS, PRODUCERS, ActiveClients, client_key


def test_counts_distinct_clients_per_topic_and_kind() -> None:
    ac = ActiveClients(ManualClock())
    for client in ("a", "b", "a"):
        ac.seen(PRODUCERS, "orders", client)
    ac.seen(PRODUCERS, "audit", "a")
    ac.seen(CONSUMERS, "orders", "c")
    assert ac.counts(PRODUCERS) == {"orders": 2, "audit": 1}
    assert ac.counts(CONSUMERS) == {"orders": 1}


def test_clients_leave_the_window_after_a_minute_of_silence() -> None:
    clock = ManualClock()
    ac = ActiveClients(clock, window_ms=60_000)
    ac.seen(PRODUCERS, "t", "old")
    clock.advance(30_000)
    ac.seen(PRODUCERS, "t", "young")
    clock.advance(30_000)  # "old" was seen exactly a window ago: out
    assert ac.counts(PRODUCERS) == {"t": 1}
    ac.seen(PRODUCERS, "t", "young")  # seen again: its time moves on
    clock.advance(59_999)
    assert ac.counts(PRODUCERS) == {"t": 1}
    clock.advance(1)
    assert ac.counts(PRODUCERS) == {}  # the topic is forgotten once empty


def test_seeing_a_client_again_keeps_it_young() -> None:
    clock = ManualClock()
    ac = ActiveClients(clock, window_ms=1_000)
    ac.seen(CONSUMERS, "t", "a")
    ac.seen(CONSUMERS, "t", "b")
    clock.advance(600)
    ac.seen(CONSUMERS, "t", "a")
    clock.advance(600)
    assert ac.counts(CONSUMERS) == {"t": 1}


def test_bounds_on_topics_and_clients() -> None:
    ac = ActiveClients(ManualClock(), max_topics=2, max_clients_per_topic=3)
    for i in range(10):
        ac.seen(PRODUCERS, "t", f"c{i}")
    assert ac.counts(PRODUCERS) == {"t": 3}  # saturates at the bound
    ac.seen(PRODUCERS, "u", "x")
    ac.seen(PRODUCERS, "t", "c9")  # t is now the most recent topic
    ac.seen(PRODUCERS, "v", "x")  # evicts u, the topic seen least recently
    assert ac.counts(PRODUCERS) == {"t": 3, "v": 1}


def test_client_key_falls_back_to_the_principal() -> None:
    assert client_key("app-1", "User:alice") == "app-1"
    assert client_key("", "User:alice") == "principal:User:alice"


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ActiveClients(ManualClock(), window_ms=0)
