"""Producer with linger_ms=0 against a real standalone broker: the calling thread ships its own batch
(`Producer._ship_inline`), records from many threads all arrive in each thread's order, a send()
from a completion callback (a reader thread) does not ship there and does not deadlock, and big
requests stay on a gRPC stream while small ones take the record transport."""

from __future__ import annotations

import threading
import time

import pytest

from logbroker import Producer
from logbroker.client.streams import _Stream
from logbroker.client.wire_connection import WireConnection
from tests.integration.test_producer_send_many import admin as admin  # the fixture
from tests.integration.test_producer_send_many import read_all

pytestmark = pytest.mark.timeout(120)


def record_shipping_threads(p: Producer, into: list[str]) -> None:
    """Note the name of the thread behind every Produce request `p` sends."""
    original = p._sender._send_request

    def recording(address, batches):
        into.append(threading.current_thread().name)
        return original(address, batches)

    p._sender._send_request = recording  # type: ignore[method-assign]


def test_linger_zero_ships_from_the_calling_thread(broker, admin):
    admin.create_topic("inline", partitions=1)
    shipped_by: list[str] = []
    with Producer(broker.address, acks=1, linger_ms=0) as p:
        record_shipping_threads(p, shipped_by)
        for i in range(50):
            p.send("inline", b"v%d" % i).result(timeout=30)  # one at a time: nothing else is shipping
    assert shipped_by, "nothing was shipped"
    assert shipped_by.count(threading.current_thread().name) >= 45, shipped_by
    got = read_all(broker.address, "inline", 1, 50)
    assert [m.value for m in got[0]] == [b"v%d" % i for i in range(50)]


def test_linger_zero_from_many_threads_keeps_each_threads_order(broker, admin):
    admin.create_topic("threads", partitions=2)
    threads_n, per_thread = 6, 400
    errors: list[BaseException] = []
    with Producer(broker.address, acks=1, linger_ms=0) as p:
        def run(t: int) -> None:
            try:
                futures = [p.send("threads", b"%d:%d" % (t, i), key=b"k%d" % t) for i in range(per_thread)]
                futures.append(p.send_many("threads", [b"%d:%d" % (t, per_thread + i) for i in range(100)],
                                           [b"k%d" % t] * 100))
                for f in futures:
                    f.result(timeout=60)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(90)
        assert not any(w.is_alive() for w in workers)
    assert not errors, errors[:3]
    got = read_all(broker.address, "threads", 2, threads_n * (per_thread + 100))
    seen: dict[int, list[int]] = {}
    for msgs in got.values():
        for m in msgs:
            t, i = (int(x) for x in m.value.split(b":"))
            seen.setdefault(t, []).append(i)
    assert {t: sorted(v) for t, v in seen.items()} == {t: list(range(per_thread + 100)) for t in range(threads_n)}
    assert all(v == sorted(v) for v in seen.values()), "a thread's records out of order"


def test_send_from_a_completion_callback_does_not_ship_on_the_reader_thread(broker, admin):
    """A callback runs on the connection's reader thread; shipping there could block it in a write
    while the broker waits for it to read: the sender thread ships instead, and the chain completes."""
    admin.create_topic("chain", partitions=1)
    chain_n = 200
    done = threading.Event()
    shipped_on: list[str] = []
    failures: list[BaseException] = []
    with Producer(broker.address, acks=1, linger_ms=0) as p:
        record_shipping_threads(p, shipped_on)

        def next_one(i: int):
            def cb(fut) -> None:
                if fut.exception() is not None:
                    failures.append(fut.exception())
                    done.set()
                elif i + 1 == chain_n:
                    done.set()
                else:
                    p.send("chain", b"%d" % (i + 1)).add_done_callback(next_one(i + 1))
            return cb

        p.send("chain", b"0").add_done_callback(next_one(0))
        assert done.wait(60), "the callback chain stalled"
        p.flush(30)
    assert not failures, failures[:3]
    assert not any(name.startswith("logbroker-wire") for name in shipped_on), set(shipped_on)
    got = read_all(broker.address, "chain", 1, chain_n)
    assert [m.value for m in got[0]] == [b"%d" % i for i in range(chain_n)]


def test_small_requests_take_the_record_transport_and_big_ones_a_grpc_stream(broker, admin):
    admin.create_topic("sizes", partitions=1)
    with Producer(broker.address, acks=1, linger_ms=0) as p:
        p.send("sizes", b"small").result(timeout=30)
        kinds = {type(s) for s in p._streams._streams.values()}
        assert kinds == {WireConnection}, kinds
        p.send("sizes", b"x" * (200 << 10)).result(timeout=30)
        kinds = {type(s) for s in p._streams._streams.values()}
        assert kinds == {WireConnection, _Stream}, kinds
    deadline = time.monotonic() + 30
    got = read_all(broker.address, "sizes", 1, 2, timeout_s=max(deadline - time.monotonic(), 1))
    assert [len(m.value) for m in got[0]] == [5, 200 << 10]


def test_a_consumer_that_stops_polling_keeps_its_connection_and_its_answer(broker, admin):
    """The consumer reads its fetch connection inside poll(): an answer that arrives while the user
    is busy waits in the socket. Past the request timeout that is no failure (the broker did answer):
    the next poll() reads it on the same connection."""
    from logbroker import Consumer

    admin.create_topic("idle-poller", partitions=1)
    with Consumer(broker.address, topics=None, auto_offset_reset="earliest", request_timeout_ms=300,
                  fetch_max_wait_ms=100) as c, Producer(broker.address, acks=1, linger_ms=0) as p:
        c.assign([("idle-poller", 0)])
        assert c.poll(timeout_ms=300) == []  # a fetch is now parked on the broker
        conns = [s for s in c._streams._streams.values() if isinstance(s, WireConnection)]
        assert conns and all(s.inline for s in conns)
        p.send("idle-poller", b"hello").result(timeout=30)  # answers the parked fetch: unread
        wait_until = time.monotonic() + 1.5  # well past the 0.4 s fetch timeout; the watchdog looks
        while time.monotonic() < wait_until:
            time.sleep(0.05)  # the user is busy (this is the behaviour under test, not a synchronisation)
        assert all(not s.closed for s in conns), "an answered fetch was failed as timed out"
        got = []
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            got = c.poll(timeout_ms=200)
        assert [m.value for m in got] == [b"hello"]
        assert [s for s in c._streams._streams.values() if isinstance(s, WireConnection)] == conns


def test_poll_with_timeout_zero_reads_the_record_transport(broker, admin):
    """poll(timeout_ms=0) in a loop (an application with its own event loop) gets the records: the
    answer on an inline connection is read even when poll() may not wait."""
    from logbroker import Consumer

    admin.create_topic("poll-zero", partitions=1)
    with Producer(broker.address, acks=1, linger_ms=0) as p:
        p.send_many("poll-zero", [b"r%d" % i for i in range(10)]).result(timeout=30)
    with Consumer(broker.address, topics=None, auto_offset_reset="earliest") as c:
        c.assign([("poll-zero", 0)])
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 10 and time.monotonic() < deadline:
            got += [m.value for m in c.poll(timeout_ms=0)]
            time.sleep(0.001)  # the application's own work between polls
        assert got == [b"r%d" % i for i in range(10)]
        assert any(isinstance(s, WireConnection) for s in c._streams._streams.values())


def test_a_callback_may_flush_with_linger_zero_and_acks_zero(broker, admin):
    """acks=0 batches are done once written, on the thread that shipped them: their callbacks run
    after it lets go of the shipping lock, so flush() inside one does not wait on its own thread."""
    admin.create_topic("cb-flush", partitions=1)
    flushed = threading.Event()
    errors: list[BaseException] = []
    with Producer(broker.address, acks=0, linger_ms=0) as p:
        def cb(_fut) -> None:
            try:
                p.flush(10)
                flushed.set()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        p.send("cb-flush", b"x").add_done_callback(cb)
        assert flushed.wait(15) and not errors, errors
