"""Per-key FIFO (share group ordering="key") on a real standalone broker: four QueueConsumers in threads,
100 keys, a handler with random small delays and random releases; per key, records complete (ack) in
offset order, and every consumer gets work. Bad `ordering` values are refused."""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import pytest

from logbroker import Admin, Producer, QueueConsumer
from logbroker.errors import InvalidConfigError
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(150)

KEYS = 100
PER_KEY = 10


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=["--offsets-topic-partitions", "2"])


def _produce(bootstrap: str, topic: str) -> None:
    with Producer(bootstrap, acks="all") as p:
        futures = [p.send(topic, b"v%d" % i, key=b"k%d" % (i % KEYS)) for i in range(KEYS * PER_KEY)]
        p.flush(30)
        for f in futures:
            f.result(30)


def _run(bootstrap: str, group: str, ordering: str, completed: list[tuple[bytes, int, int, int]]) -> None:
    """Four members in threads until every record completed: (key, partition, offset, member) per ack."""
    total = KEYS * PER_KEY
    consumers = [QueueConsumer(bootstrap, group, ["orders"], auto_offset_reset="earliest", ordering=ordering,
                               retry_backoff_ms=5, retry_backoff_max_ms=20, max_delivery_attempts=50,
                               max_poll_records=20) for _ in range(4)]
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def member(i: int) -> None:
        rnd = random.Random(i)
        try:
            while not stop.is_set():
                for m in consumers[i].poll(200):
                    time.sleep(rnd.random() * 0.003)  # the "work" (random length; not synchronisation)
                    if rnd.random() < 0.15:
                        m.release()
                        continue
                    assert m.key is not None
                    with lock:
                        completed.append((m.key, m.partition, m.offset, i))
                    m.ack()  # rides on the next poll
            consumers[i].commit_acks()
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(4)]
    try:
        for c in consumers:
            c.poll(100)  # join before the records exist
        for t in threads:
            t.start()
        _produce(bootstrap, "orders")
        wait_for(lambda: len(completed) >= total or bool(errors), 90, "every record completed")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for c in consumers:
            c.close()
    assert not errors, errors


def test_key_ordering_completes_each_keys_records_in_offset_order_on_four_consumers(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("orders", partitions=2)
    completed: list[tuple[bytes, int, int, int]] = []
    _run(bootstrap, "fifo", "key", completed)
    by_key: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for key, partition, offset, _ in completed:
        by_key[key].append((partition, offset))
    assert len(by_key) == KEYS
    for key, done in by_key.items():
        assert len(done) == PER_KEY and done == sorted(set(done)), (key, done)  # once each, in offset order
    per_member = [sum(1 for c in completed if c[3] == i) for i in range(4)]
    assert all(per_member), per_member  # all four got work
    with Admin(bootstrap) as admin:
        assert admin.describe_share_group("fifo")["settings"]["ordering"] == "key"


def test_an_unknown_ordering_is_refused(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("orders", partitions=1)
        c = QueueConsumer(bootstrap, "plain", ["orders"])
        try:
            c.poll(100)  # creates the group
        finally:
            c.close()
        with pytest.raises(ValueError):
            admin.alter_share_group("plain", ordering="fifo")  # the client's own check
        req = pb.AlterShareGroupRequest(group="plain", settings=pb.ShareGroupSettings(ordering="fifo"))
        with pytest.raises(InvalidConfigError, match="ordering"):
            admin._share_call("plain", "AlterShareGroup", req)  # the broker's check
        assert admin.describe_share_group("plain")["settings"]["ordering"] == "none"
        admin.alter_share_group("plain", ordering="key")
        assert admin.describe_share_group("plain")["settings"]["ordering"] == "key"


def _poll_until(c: QueueConsumer, want: int, timeout_s: float) -> list:
    got: list = []
    wait_for(lambda: len(got.__iadd__(c.poll(200))) >= want, timeout_s, f"{want} record(s) handed out")
    return got


def test_key_order_survives_a_kill_9_of_the_coordinator(standalone):
    """The window's key hashes are in the snapshot: after a restart, a key's held record is handed out
    again before (and never beside) that key's later records."""
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("k", partitions=1)
    with Producer(bootstrap, acks="all") as p:
        for key in (b"a", b"a", b"b"):
            p.send("k", b"v", key=key, partition=0).result(30)
    first = QueueConsumer(bootstrap, "restored", ["k"], auto_offset_reset="earliest", ordering="key")
    try:
        assert sorted(m.offset for m in _poll_until(first, 2, 30)) == [0, 2]
        standalone.kill()
        standalone.start()
    finally:
        first.close(timeout_ms=1000)
    second = QueueConsumer(bootstrap, "restored", ["k"])
    try:
        got = _poll_until(second, 2, 60)
        assert sorted((m.offset, m.delivery_count) for m in got) == [(0, 2), (2, 2)]
        assert second.poll(300) == []  # offset 1 waits behind offset 0 of its key
        next(m for m in got if m.offset == 0).ack()
        assert [m.offset for m in _poll_until(second, 1, 30)] == [1]
    finally:
        second.close()
