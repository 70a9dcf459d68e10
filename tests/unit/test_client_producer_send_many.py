"""Producer.send_many and its FutureRecordsMetadata — against in-memory fakes (see
tests/integration/test_producer_send_many.py for the same against a real broker)."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from logbroker.client.producer import (
    FutureRecordsMetadata,
    FutureTimeoutError,
    Producer,
    RecordMetadata,
    _BatchResult,
    failed_records_future,
)
from logbroker.cluster.hashing import partition_for_key
from logbroker.errors import (
    CorruptMessageError,
    KafkaTimeoutError,
    LogbrokerError,
    MessageTooLargeError,
    UnknownTopicOrPartitionError,
)
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_client_fakes import FakeMetadata
from tests.unit.test_client_producer import produce_requests, records_of, wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def md() -> FakeMetadata:
    return FakeMetadata({"t": 1, "four": 4})


def batches_of(md: FakeMetadata, topic: str, partition: int) -> list[bytes]:
    return [data for _, data in md.broker.logs.get((topic, partition), [])]


# -- the future ---------------------------------------------------------------------------------


def test_future_gives_metadata_in_input_order_across_batches():
    r1, r2 = _BatchResult("t", 2), _BatchResult("t", 0)
    # input records 0..4: records 1 and 3 went to r1 (deltas 7, 8), records 0, 2, 4 to r2 (0..2)
    f = FutureRecordsMetadata("t", [(r1, 7, 2), (r2, 0, 3)], [1, 3, 0, 2, 4], 99, 5)
    assert len(f) == 5 and not f.done() and f.running() and not f.cancel() and not f.cancelled()
    r1.complete(100, -1, None)
    assert not f.done()
    with pytest.raises(FutureTimeoutError):
        f.result(timeout=0.02)
    r2.complete(10, 5555, None)
    assert f.done()
    assert f.result(0) == [
        RecordMetadata("t", 0, 10, 5555), RecordMetadata("t", 2, 107, 99), RecordMetadata("t", 0, 11, 5555),
        RecordMetadata("t", 2, 108, 99), RecordMetadata("t", 0, 12, 5555),
    ]
    assert f.result() is f.result()  # built once
    assert f.exception() is None


def test_future_raises_the_error_of_the_first_failed_record_in_input_order():
    ok, bad_late, bad_early = _BatchResult("t", 0), _BatchResult("t", 1), _BatchResult("t", 2)
    # appended: partition 0 (inputs 2, 5), partition 1 (inputs 3), partition 2 (inputs 1, 4)
    f = FutureRecordsMetadata("t", [(ok, 0, 2), (bad_late, 0, 1), (bad_early, 0, 2)], [2, 5, 3, 1, 4], 1, 5)
    ok.complete(0, -1, None)
    bad_late.complete(-1, -1, CorruptMessageError("late"))
    assert not f.done()  # done only when every batch is
    bad_early.complete(-1, -1, MessageTooLargeError("early"))
    with pytest.raises(MessageTooLargeError):
        f.result()
    assert isinstance(f.exception(), MessageTooLargeError)
    # unkeyed (no order): the segments are in input order
    a, b = _BatchResult("t", 0), _BatchResult("t", 0)
    g = FutureRecordsMetadata("t", [(a, 0, 3), (b, 0, 3)], None, 1, 6)
    b.complete(-1, -1, CorruptMessageError("second"))
    a.complete(-1, -1, MessageTooLargeError("first"))
    assert isinstance(g.exception(), MessageTooLargeError)


def test_future_callback_runs_once_when_the_last_batch_completes():
    r1, r2 = _BatchResult("t", 0), _BatchResult("t", 0)
    f = FutureRecordsMetadata("t", [(r1, 0, 1), (r2, 0, 1)], None, 1, 2)
    calls: list[tuple[FutureRecordsMetadata, str]] = []
    f.add_done_callback(lambda fut: calls.append((fut, threading.current_thread().name)))
    r1.complete(0, -1, None)
    assert calls == []
    th = threading.Thread(target=r2.complete, args=(1, -1, None), name="completer")
    th.start()
    th.join()
    assert calls == [(f, "completer")]
    f.add_done_callback(lambda fut: calls.append((fut, "late")))  # already done: at once
    assert calls[-1] == (f, "late") and len(calls) == 2


def test_empty_and_failed_futures():
    empty = FutureRecordsMetadata("t", [], None, 1, 0)
    assert empty.done() and empty.result() == [] and len(empty) == 0
    seen = []
    empty.add_done_callback(seen.append)
    assert seen == [empty]
    failed = failed_records_future("t", -1, MessageTooLargeError("big"), 3)
    assert failed.done() and len(failed) == 3 and isinstance(failed.exception(), MessageTooLargeError)


# -- send_many --------------------------------------------------------------------------------


def test_order_within_a_partition_across_send_and_send_many(md):
    with Producer(md, linger_ms=1000) as p:
        a = p.send("t", b"a")
        many = p.send_many("t", [b"m%d" % i for i in range(50)])
        b = p.send("t", b"b")
        more = p.send_many("t", (b"n%d" % i for i in range(5)))  # any iterable
        assert not many.done()  # lingering
        p.flush(5)
        assert a.result(0).offset == 0 and b.result(0).offset == 51
        assert [m.offset for m in many.result(0)] == list(range(1, 51))
        assert [m.offset for m in more.result(0)] == list(range(52, 57))
    assert [m.value for m in records_of(md, "t", 0)] == (
        [b"a"] + [b"m%d" % i for i in range(50)] + [b"b"] + [b"n%d" % i for i in range(5)])


def test_keyed_records_land_where_send_puts_them(md):
    keys = [b"key-%d" % (i % 37) for i in range(300)]
    with Producer(md) as p:
        by_send = {k: p.send("four", b"s", key=k).result(5).partition for k in set(keys)}
        fut = p.send_many("four", [b"v%d" % i for i in range(300)], keys)
        metas = fut.result(5)
    assert [m.partition for m in metas] == [by_send[k] for k in keys]
    assert [m.partition for m in metas] == [partition_for_key(k, 4) for k in keys]
    assert len({m.partition for m in metas}) == 4
    for part in range(4):  # per partition: the call's records in input order, at their offsets
        stored = {m.offset: (m.key, m.value) for m in records_of(md, "four", part)}
        mine = [(i, m) for i, m in enumerate(metas) if m.partition == part]
        assert [m.offset for _, m in mine] == sorted(m.offset for _, m in mine)
        assert all(stored[m.offset] == (keys[i], b"v%d" % i) for i, m in mine)


def test_null_keys_in_a_keyed_call_go_to_the_sticky_partition(md):
    keys = [None if i % 2 else b"k%d" % i for i in range(40)]
    with Producer(md, linger_ms=10_000) as p:
        fut = p.send_many("four", [b"v%d" % i for i in range(40)], keys)
        p.flush(5)
        metas = fut.result()
    null_parts = {m.partition for m, k in zip(metas, keys, strict=True) if k is None}
    assert len(null_parts) == 1
    assert all(m.partition == partition_for_key(k, 4) for m, k in zip(metas, keys, strict=True) if k is not None)


def test_unkeyed_records_stick_and_switch_partition_as_send_does(md):
    with Producer(md, linger_ms=10_000, batch_size_bytes=2_000) as p:
        fut = p.send_many("four", [b"x" * 100] * 200)
        p.flush(5)
        parts = [m.partition for m in fut.result()]
    runs = [parts[0]]
    for a in parts[1:]:
        if a != runs[-1]:
            runs.append(a)
    assert len(runs) > 5  # batches filled one after another, consecutive ones on other partitions
    for part in set(parts):
        assert all(len(d) <= 2_000 for d in batches_of(md, "four", part))


def test_a_call_larger_than_a_batch_is_split_and_arrives_once_in_order(md):
    values = [b"%05d" % i + b"x" * 95 for i in range(1_000)]
    with Producer(md, linger_ms=10_000, batch_size_bytes=5_000) as p:
        p.send("t", b"first")
        fut = p.send_many("t", values)
        p.flush(5)
        assert [m.offset for m in fut.result()] == list(range(1, 1_001))
    batches = batches_of(md, "t", 0)
    assert len(batches) > 20 and all(len(d) <= 5_000 for d in batches)
    assert [m.value for m in records_of(md, "t", 0)] == [b"first", *values]


def test_split_also_in_the_python_builder(md):
    # gzip batches are built in Python: the same split, and the limit is on the uncompressed size
    values = [b"%05d" % i + b"y" * 95 for i in range(500)]
    with Producer(md, linger_ms=10_000, batch_size_bytes=5_000, compression="gzip") as p:
        fut = p.send_many("t", values)
        p.flush(5)
        assert [m.offset for m in fut.result()] == list(range(500))
    assert len(batches_of(md, "t", 0)) >= 10
    assert [m.value for m in records_of(md, "t", 0)] == values


def test_str_none_headers_partition_and_timestamp(md):
    with Producer(md) as p:
        metas = p.send_many(
            "four", ["héllo", None, bytearray(b"ba"), memoryview(b"mv")], ["k", None, b"k2", bytearray(b"k3")],
            partition=2, headers={"h": "x", "n": None}, timestamp_ms=1234,
        ).result(5)
    assert [(m.partition, m.offset, m.timestamp) for m in metas] == [(2, i, 1234) for i in range(4)]
    msgs = records_of(md, "four", 2)
    assert [(m.key, m.value, m.timestamp) for m in msgs] == [
        (b"k", "héllo".encode(), 1234), (None, None, 1234), (b"k2", b"ba", 1234), (b"k3", b"mv", 1234)]
    assert all(m.headers == (("h", b"x"), ("n", None)) for m in msgs)


def test_an_invalid_record_rejects_the_whole_call(md):
    with Producer(md, batch_size_bytes=1 << 16, max_request_bytes=1 << 17, linger_ms=0) as p:
        with pytest.raises(TypeError):
            p.send_many("t", [b"ok"] * 10 + [5])  # type: ignore[list-item]
        with pytest.raises(TypeError):
            p.send_many("t", [b"ok"] * 10, [b"k"] * 9 + [1.5])  # type: ignore[list-item]
        with pytest.raises(ValueError):
            p.send_many("t", [b"ok"] * 10, [b"k"] * 9)
        with pytest.raises(TypeError):
            p.send_many("t", b"one value, not a list")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            p.send_many("t", ["a", "b"], "ab")
        with pytest.raises(TypeError):
            p.send_many("t", [b"ok"], headers=[(1, b"x")])  # type: ignore[list-item]
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send_many("four", [b"ok"], partition=4)
        big = p.send_many("t", [b"ok"] * 10 + [b"z" * (1 << 17)] + [b"ok"])
        assert big.done() and len(big) == 12
        with pytest.raises(MessageTooLargeError):
            big.result()
        assert p.metrics["buffered_bytes"] == 0 and p.metrics["incomplete_batches"] == 0
        p.flush(5)
        assert md.broker.logs.get(("t", 0)) is None and produce_requests(md) == []
        assert [m.offset for m in p.send_many("t", [b"after"] * 3).result(5)] == [0, 1, 2]
        assert p.send_many("t", []).result(0) == []


def test_a_broker_error_fails_the_future(md):
    md.broker.errors[("t", 0)] = deque([pb.CORRUPT_MESSAGE])
    with Producer(md) as p:
        fut = p.send_many("t", [b"v"] * 10)
        with pytest.raises(CorruptMessageError):
            fut.result(5)
        assert isinstance(fut.exception(), CorruptMessageError)
        assert [m.offset for m in p.send_many("t", [b"w"] * 2).result(5)] == [0, 1]


def test_flush_waits_for_send_many_records(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0)
    try:
        fut = p.send_many("t", [b"v"] * 100)
        wait_until(lambda: len(md.broker.held) == 1)
        done = threading.Event()
        th = threading.Thread(target=lambda: (p.flush(5), done.set()))
        th.start()
        assert not done.wait(0.1) and not fut.done()
        md.broker.hold = False
        md.broker.release()
        th.join(5)
        assert done.is_set() and fut.done()
        assert [m.offset for m in fut.result(0)] == list(range(100))
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(5)


def test_acks_zero_gives_offset_minus_one(md):
    with Producer(md, acks=0) as p:
        metas = p.send_many("t", [b"a", b"b"], timestamp_ms=5).result(5)
    assert metas == [RecordMetadata("t", 0, -1, 5)] * 2


def test_a_call_larger_than_the_buffer_waits_for_room_batch_by_batch(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, batch_size_bytes=4_096, buffer_memory_bytes=8_192, max_block_ms=5_000)
    buffered_while_blocked: list[int] = []

    def release_when_blocked() -> None:
        deadline = time.monotonic() + 5
        while p._buffer_waiters == 0 and time.monotonic() < deadline:  # send_many waits for room
            time.sleep(0.005)
        buffered_while_blocked.append(p.metrics["buffered_bytes"] if p._buffer_waiters else -1)
        md.broker.hold = False
        md.broker.release()

    th = threading.Thread(target=release_when_blocked)
    th.start()
    try:
        values = [b"%04d" % i + b"x" * 96 for i in range(300)]  # ~40 KB of records, 8 KB of buffer
        fut = p.send_many("t", values)
        p.flush(5)
        assert [m.offset for m in fut.result(0)] == list(range(300))
        assert p.metrics["buffered_bytes"] == 0
    finally:
        th.join()
        p.close(5)
    assert 0 < buffered_while_blocked[0] <= 8_192
    assert [m.value for m in records_of(md, "t", 0)] == values


def test_a_full_buffer_times_out_and_says_what_was_queued(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, batch_size_bytes=4_096, buffer_memory_bytes=8_192, max_block_ms=200)
    try:
        t0 = time.monotonic()
        with pytest.raises(KafkaTimeoutError, match=r"of 300 records queued"):
            p.send_many("t", [b"x" * 100] * 300)
        assert 0.15 < time.monotonic() - t0 < 3
        assert 0 < p.metrics["buffered_bytes"] <= 8_192
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
        assert p.send_many("t", [b"after"]).result(5)[0].offset > 0  # what was queued went out
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(5)


def test_send_many_after_close_raises(md):
    p = Producer(md)
    p.close(5)
    with pytest.raises(LogbrokerError):
        p.send_many("t", [b"v"])


def test_send_many_from_many_threads_keeps_each_threads_order(md):
    with Producer(md, linger_ms=1, batch_size_bytes=4_096) as p:
        futures: list[list[FutureRecordsMetadata]] = [[] for _ in range(4)]

        def worker(n: int) -> None:
            for j in range(20):
                futures[n].append(p.send_many("four", [b"%d-%d-%d" % (n, j, i) for i in range(50)],
                                              [b"%d" % n] * 50))

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        p.flush(10)
    for n in range(4):
        part = partition_for_key(b"%d" % n, 4)
        values = [m.value for m in records_of(md, "four", part) if m.key == b"%d" % n]
        assert values == [b"%d-%d-%d" % (n, j, i) for j in range(20) for i in range(50)]
        offsets = [m.offset for f in futures[n] for m in f.result()]
        assert offsets == sorted(offsets) and len(set(offsets)) == 1_000

