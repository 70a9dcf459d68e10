"""Producer.send_many against a real standalone broker: order, routing, splitting, rejection,
broker errors, flush() and metadata, each read back with a Consumer."""

from __future__ import annotations

import itertools
import time

import pytest

from logbroker import Admin, Consumer, Message, Producer
from logbroker.cluster.hashing import partition_for_key
from logbroker.errors import MessageTooLargeError, UnknownTopicOrPartitionError

pytestmark = pytest.mark.timeout(120)


def read_all(address: str, topic: str, partitions: int, expected: int, timeout_s: float = 30.0) -> dict[int, list[Message]]:
    """Every record of the topic, per partition in offset order: reads until `expected` records came,
    then checks the log ends hold no more (each record stored once)."""
    out: dict[int, list[Message]] = {p: [] for p in range(partitions)}
    deadline = time.monotonic() + timeout_s
    with Consumer(address, topics=None, auto_offset_reset="earliest") as c:
        c.assign([(topic, p) for p in range(partitions)])
        got = 0
        while got < expected:
            assert time.monotonic() < deadline, f"read {got} of {expected} records"
            for m in c.poll(timeout_ms=500):
                out[m.partition].append(m)
                got += 1
        assert got == expected
    with Consumer(address, topics=None, auto_offset_reset="latest") as c:
        c.assign([(topic, p) for p in range(partitions)])
        ends = {p: c.position(topic, p) for p in range(partitions)}
    assert ends == {p: len(msgs) for p, msgs in out.items()}
    for msgs in out.values():
        assert [m.offset for m in msgs] == list(range(len(msgs)))
    return out


@pytest.fixture
def admin(broker):
    """An Admin client of the `broker` fixture's broker (also used by test_producer_inline)."""
    with Admin(broker.address) as a:
        yield a


def test_order_within_a_partition_across_send_and_send_many(broker, admin):
    admin.create_topic("mixed", partitions=1)
    with Producer(broker.address, acks=1, linger_ms=20) as p:
        expected: list[bytes] = []
        futures = []
        for round_ in range(5):
            v = b"single-%d" % round_
            futures.append(("one", p.send("mixed", v)))
            expected.append(v)
            vs = [b"many-%d-%d" % (round_, i) for i in range(round_ * 40 + 1)]
            futures.append(("many", p.send_many("mixed", vs)))
            expected += vs
        p.flush(30)
    offsets: list[int] = []
    for kind, f in futures:
        offsets += [f.result(0).offset] if kind == "one" else [m.offset for m in f.result(0)]
    assert offsets == list(range(len(expected)))
    assert [m.value for m in read_all(broker.address, "mixed", 1, len(expected))[0]] == expected


def test_keyed_records_land_where_send_puts_them_and_metadata_is_in_input_order(broker, admin):
    admin.create_topic("keyed", partitions=4)
    keys = [b"user-%d" % (i * 7 % 23) for i in range(400)]
    values = [b"value-%d" % i for i in range(400)]
    with Producer(broker.address, acks=1) as p:
        by_send = {k: p.send("keyed", b"probe", key=k).result(30).partition for k in sorted(set(keys))}
        metas = p.send_many("keyed", values, keys).result(30)
    assert [m.partition for m in metas] == [by_send[k] for k in keys]
    assert [m.partition for m in metas] == [partition_for_key(k, 4) for k in keys]
    assert len({m.partition for m in metas}) == 4
    stored = read_all(broker.address, "keyed", 4, 400 + len(by_send))
    for i, m in enumerate(metas):  # metadata i points at record i
        rec = stored[m.partition][m.offset]
        assert (rec.key, rec.value) == (keys[i], values[i])


def test_a_call_larger_than_a_batch_splits_and_arrives_once_in_order(broker, admin):
    admin.create_topic("split", partitions=1)
    values = [b"%06d" % i + b"x" * 94 for i in range(20_000)]  # ~2.2 MB, batches of 64 KiB
    with Producer(broker.address, acks=1, linger_ms=50, batch_size_bytes=64 << 10) as p:
        p.send("split", b"before")
        fut = p.send_many("split", values)
        p.send("split", b"after")
        metas = fut.result(60)
    assert [m.offset for m in metas] == list(range(1, 20_001))
    assert len({m.offset for m in metas}) == 20_000
    stored = read_all(broker.address, "split", 1, 20_002)[0]
    assert [m.value for m in stored] == [b"before", *values, b"after"]


def test_an_invalid_record_rejects_the_whole_call_with_nothing_sent(broker, admin):
    admin.create_topic("invalid", partitions=2)
    with Producer(broker.address, acks=1, batch_size_bytes=1 << 16, max_request_bytes=1 << 17) as p:
        with pytest.raises(TypeError):
            p.send_many("invalid", [b"good"] * 100 + [None, 42])  # type: ignore[list-item]
        with pytest.raises(ValueError):
            p.send_many("invalid", [b"good"] * 3, [b"k"] * 2)
        too_large = p.send_many("invalid", [b"good"] * 100 + [b"z" * (1 << 17)])
        with pytest.raises(MessageTooLargeError):
            too_large.result(0)
        assert p.metrics["buffered_bytes"] == 0
        ok = p.send_many("invalid", [b"ok-%d" % i for i in range(10)], partition=1).result(30)
    assert [(m.partition, m.offset) for m in ok] == [(1, i) for i in range(10)]
    stored = read_all(broker.address, "invalid", 2, 10)
    assert stored[0] == [] and [m.value for m in stored[1]] == [b"ok-%d" % i for i in range(10)]


def test_a_broker_error_fails_the_future(broker, admin):
    # the broker refuses batches above the topic's max_message_bytes (not retriable)
    admin.create_topic("small", partitions=1, config={"max_message_bytes": "2000"})
    with Producer(broker.address, acks=1, batch_size_bytes=64 << 10) as p:
        fut = p.send_many("small", [b"x" * 100] * 100)  # one ~11 KB batch
        with pytest.raises(MessageTooLargeError):
            fut.result(30)
        assert isinstance(fut.exception(), MessageTooLargeError)
        ok = p.send_many("small", [b"y" * 100] * 5).result(30)  # ~0.6 KB: accepted
    assert [m.offset for m in ok] == list(range(5))


def test_flush_waits_for_send_many_records(broker, admin):
    admin.create_topic("flushed", partitions=3)
    with Producer(broker.address, acks=1, linger_ms=60_000) as p:  # only flush() ships them
        futures = [p.send_many("flushed", [b"r-%d-%d" % (j, i) for i in range(500)]) for j in range(4)]
        assert not any(f.done() for f in futures)
        p.flush(30)
        assert all(f.done() for f in futures)
        metas = [m for f in futures for m in f.result(0)]
    assert len({(m.partition, m.offset) for m in metas}) == 2_000
    stored = read_all(broker.address, "flushed", 3, 2_000)
    assert sorted(m.value for msgs in stored.values() for m in msgs) == sorted(
        b"r-%d-%d" % (j, i) for j in range(4) for i in range(500))


def test_send_records_copies_each_records_timestamp_and_headers_into_one_partition(broker, admin):
    """Producer.send_records (the mirror's path): records keep their own timestamps and headers, go
    to the given partition in order whatever their keys, over several batches (batch_size_bytes
    small), and runs() gives their offsets without a RecordMetadata per record."""
    admin.create_topic("copies", partitions=3)
    records = [(1_700_000_000_000 + (i * 7919) % 1000, b"k%d" % i, b"v%d" % i + b"x" * 200,
                [("n", b"%d" % i), ("empty", None)] if i % 2 else []) for i in range(500)]
    with Producer(broker.address, acks="all", batch_size_bytes=4096, linger_ms=5) as p:
        first = p.send_records("copies", 1, records[:10])
        rest = p.send_records("copies", 1, records[10:])
        empty = p.send_records("copies", 1, [])
        p.flush(timeout=30)
        assert first.runs(timeout=30) == [(1, 0, 10)]
        runs = rest.runs(timeout=30)
        assert len(runs) > 1 and all(part == 1 for part, _, _ in runs)
        assert sum(n for _, _, n in runs) == 490 and runs[0][1] == 10
        assert [o for _, o, _ in runs] == list(itertools.accumulate([10] + [n for _, _, n in runs[:-1]]))
        assert empty.runs(timeout=1) == [] and len(empty) == 0
        with pytest.raises(TypeError):
            p.send_records("copies", 1, [(1, "not bytes", b"v", [])])  # type: ignore[list-item]
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send_records("copies", 3, records[:1])
    got = read_all(broker.address, "copies", 3, 500)
    assert not got[0] and not got[2]
    assert [(m.timestamp, m.key, m.value, list(m.headers)) for m in got[1]] == records
