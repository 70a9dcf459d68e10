"""`logbroker worker --queue` (worker/queue_runtime.py) against an in-memory share consumer (no sockets):
ack on success, release before the last attempt, reject with the exception text on it, never more
messages taken than free slots, fatal handler failures stop the worker."""

from __future__ import annotations

import threading
import time

import pytest

from logbroker.client.queue.acks import ACCEPT, REJECT, RELEASE, Ack
from logbroker.client.queue.message import QueueMessage
from logbroker.worker import HandlerFailedError
from logbroker.worker.queue_runtime import QueueWorker
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)


class FakeShareConsumer:
    """Hands out `values` (offset = index) once; a released one comes back with delivery_count + 1."""

    def __init__(self, values: list[bytes], max_attempts: int = 5) -> None:
        self.available = [(i, 1) for i in range(len(values))]
        self.values = values
        self.max_attempts = max_attempts
        self.max_poll_records = 1
        self.held = 0
        self.settled: list[tuple[int, int, Ack]] = []  # (offset, delivery_count, ack)
        self.lock = threading.Lock()
        self.max_held = 0
        self.closed = False

    def settle(self, message: QueueMessage, ack: Ack) -> None:
        with self.lock:
            message.settled = True
            self.held -= 1
            self.settled.append((message.offset, message.delivery_count, ack))
            if ack.type == RELEASE and message.delivery_count < self.max_attempts:
                self.available.append((message.offset, message.delivery_count + 1))

    def poll(self, timeout_ms: int = 1000) -> list[QueueMessage]:
        with self.lock:
            take, self.available = self.available[:self.max_poll_records], self.available[self.max_poll_records:]
            self.held += len(take)
            self.max_held = max(self.max_held, self.held)
        if not take:
            time.sleep(0.01)
        return [QueueMessage(self, 0, "t", 0, off, None, self.values[off], (), 0, n) for off, n in take]

    def close(self, timeout_ms: int | None = None) -> None:
        self.closed = True


def _run(worker: QueueWorker) -> threading.Thread:
    t = threading.Thread(target=worker.run, daemon=True)
    t.start()
    return t


def test_success_acks_failure_releases_then_rejects_on_the_last_attempt():
    consumer = FakeShareConsumer([b"ok-0", b"bad", b"ok-2", b"ok-3"], max_attempts=3)

    def handle(m):
        if m.value == b"bad":
            raise ValueError("cannot do " + m.value.decode())

    worker = QueueWorker(handle, group="g", topics=["t"], workers=2, max_delivery_attempts=3,
                         consumer_factory=lambda: consumer)
    t = _run(worker)
    wait_for(lambda: len(consumer.settled) == 6, 10, "every message settled")
    worker.stop()
    t.join(10)
    assert not t.is_alive() and consumer.closed
    acks = sorted((off, n, a.type) for off, n, a in consumer.settled)
    assert acks == [(0, 1, ACCEPT), (1, 1, RELEASE), (1, 2, RELEASE), (1, 3, REJECT), (2, 1, ACCEPT), (3, 1, ACCEPT)]
    (reject,) = [a for _, _, a in consumer.settled if a.type == REJECT]
    assert reject.reason == "ValueError: cannot do bad"
    assert all(a.delay_ms == 0 for _, _, a in consumer.settled)  # the group's backoff applies
    s = worker.stats
    assert (s.processed, s.released, s.rejected) == (3, 2, 1)
    assert consumer.max_held <= 2


def test_never_takes_more_messages_than_free_slots():
    consumer = FakeShareConsumer([b"%d" % i for i in range(40)])
    gate = threading.Semaphore(0)
    worker = QueueWorker(lambda m: gate.acquire(timeout=10), group="g", topics=["t"], workers=3,
                         consumer_factory=lambda: consumer)
    t = _run(worker)
    for _ in range(40):
        gate.release()
    wait_for(lambda: len(consumer.settled) == 40, 20, "all acked")
    worker.stop()
    t.join(10)
    assert consumer.max_held <= 3
    assert sorted(off for off, _, _ in consumer.settled) == list(range(40))


def test_a_handler_raising_systemexit_stops_the_worker_and_releases_its_message():
    consumer = FakeShareConsumer([b"x"])

    def handle(m):
        raise SystemExit("bye")

    worker = QueueWorker(handle, group="g", topics=["t"], workers=1, consumer_factory=lambda: consumer)
    with pytest.raises(HandlerFailedError, match="bye"):
        worker.run()
    assert [(off, a.type) for off, _, a in consumer.settled] == [(0, RELEASE)]
    assert consumer.closed


def test_bad_arguments():
    with pytest.raises(ValueError, match="topic"):
        QueueWorker(print, group="g", topics=[])
    with pytest.raises(ValueError, match="max_delivery_attempts"):
        QueueWorker(print, group="g", topics=["t"], max_delivery_attempts=0)
