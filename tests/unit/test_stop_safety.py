"""The rule `logbroker wait-safe-to-stop` (the brokers' preStop hook) waits for."""

from __future__ import annotations

import pytest

from logbroker.cluster.stop_safety import PartitionReplicas, blocking_partitions, isr_needed


@pytest.mark.parametrize("rf, min_isr, needed", [
    (1, 1, 1),  # nothing to wait for: a single replica can never be spared
    (2, 1, 2),  # the other replica must be in sync to take over
    (3, 1, 2),
    (3, 2, 3),  # after one stops, two in-sync replicas remain for acks=all
    (2, 2, 2),  # can never keep acks=all through a stop: do not wait forever
    (5, 2, 3),
])
def test_isr_needed(rf: int, min_isr: int, needed: int):
    assert isr_needed(rf, min_isr) == needed


def p(replicas: tuple[int, ...], isr: tuple[int, ...], min_isr: int = 1) -> PartitionReplicas:
    return PartitionReplicas("t", 0, replicas, isr, min_isr)


def test_blocking_partitions():
    full = p((0, 1, 2), (0, 1, 2), 2)
    short = p((0, 1, 2), (0, 1), 2)
    without_me = p((0, 1, 2), (1, 2), 2)  # broker 0 is not in the ISR: stopping it changes nothing
    single = p((0,), (0,))
    assert blocking_partitions(0, [full, short, without_me, single]) == [short]
    # broker 2 is out of `short`'s ISR (no effect) but in `without_me`'s, which would drop to one
    assert blocking_partitions(2, [full, short, without_me, single]) == [without_me]
    assert blocking_partitions(1, [p((0, 1), (1,))]) == [p((0, 1), (1,))]
