"""Client channels against a real broker: one Produce in flight at a time must not cost a thread per RPC."""

from __future__ import annotations

import threading

import pytest

import logbroker

pytestmark = pytest.mark.timeout(60)


def test_sequential_produces_start_no_thread_per_rpc(broker, monkeypatch):
    with logbroker.Admin(broker.address) as admin:
        admin.create_topic("spin", partitions=1)
    started: list[str] = []
    start = threading.Thread.start

    def counting_start(self: threading.Thread) -> None:
        started.append(self.name)
        start(self)

    with logbroker.Producer(broker.address, acks=1, linger_ms=0) as producer:
        producer.send("spin", b"warm-up").result(10)
        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for i in range(50):
            assert producer.send("spin", b"%d" % i).result(10).offset == i + 1
        monkeypatch.undo()
    # gRPC's channel spin thread stays up (the idle Health/Watch call): without it, one per RPC
    assert len(started) <= 2, started
