"""Broker.ProduceStream / Broker.FetchStream against a real broker, raw and through the clients."""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.storage.record_batch import BatchBuilder, decode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(180)


def batch(*values: bytes) -> bytes:
    b = BatchBuilder(int(time.time() * 1000))
    for v in values:
        b.append(int(time.time() * 1000), None, v, None)
    return b.build()


def produce_req(topic: str, partition: int, *values: bytes) -> pb.ProduceRequest:
    return pb.ProduceRequest(acks=1, timeout_ms=5000, partitions=[
        pb.ProducePartition(topic=topic, partition=partition, records=batch(*values))])


def fetch_req(topic: str, partition: int, offset: int, max_wait_ms: int = 0) -> pb.FetchRequest:
    return pb.FetchRequest(max_wait_ms=max_wait_ms, min_bytes=1, max_bytes=1 << 20, replica_id=-1, partitions=[
        pb.FetchPartition(topic=topic, partition=partition, fetch_offset=offset, partition_max_bytes=1 << 20,
                          current_leader_epoch=-1)])


def high_watermark(address: str, topic: str, partition: int = 0) -> int:
    with grpc.insecure_channel(address) as ch:
        resp = pbg.BrokerStub(ch).ListOffsets(pb.ListOffsetsRequest(partitions=[
            pb.ListOffsetsPartition(topic=topic, partition=partition, timestamp=-1)]), timeout=10)
    assert resp.results[0].error_code == pb.NONE, resp
    return resp.results[0].offset


def values_of(records: bytes, min_offset: int = 0) -> list[bytes | None]:
    data = bytes(records)
    return [m.value for h, pos in iter_batches(data) for m in decode_batch(data, pos, h, "t", 0, min_offset)]


def test_produce_stream_answers_pipelined_requests_in_order_with_per_message_errors(broker):
    with Admin(broker.address) as admin:
        admin.create_topic("s", partitions=2)
    requests = [produce_req("s", i % 2, b"v%d" % i) for i in range(40)]
    requests[7] = produce_req("nope", 0, b"x")  # unknown topic: an error in its own response only
    requests[9].acks = 5  # invalid acks: likewise
    with grpc.insecure_channel(broker.address) as ch:
        responses = list(pbg.BrokerStub(ch).ProduceStream(iter(requests), timeout=30))
    assert len(responses) == len(requests)
    next_offset = {0: 0, 1: 0}
    for i, (req, resp) in enumerate(zip(requests, responses, strict=True)):
        (r,) = resp.results
        assert (r.topic, r.partition) == (req.partitions[0].topic, req.partitions[0].partition), i
        if i == 7:
            assert r.error_code == pb.UNKNOWN_TOPIC_OR_PARTITION and "nope" in r.error_message
        elif i == 9:
            assert r.error_code == pb.INVALID_REQUIRED_ACKS and r.base_offset == -1
        else:
            assert r.error_code == pb.NONE, r
            assert r.base_offset == next_offset[r.partition], (i, r)  # appended in request order
            next_offset[r.partition] += 1
    assert high_watermark(broker.address, "s", 0) == next_offset[0]
    assert high_watermark(broker.address, "s", 1) == next_offset[1]


def test_fetch_stream_answers_in_order_and_long_polls_like_fetch(broker):
    with Admin(broker.address) as admin:
        admin.create_topic("f", partitions=1)
    with grpc.insecure_channel(broker.address) as ch:
        stub = pbg.BrokerStub(ch)
        for i in range(5):
            stub.Produce(produce_req("f", 0, b"r%d" % i), timeout=10)
        requests = [fetch_req("f", 0, i) for i in range(5)]
        requests.insert(2, fetch_req("f", 3, 0))  # no such partition
        requests.insert(4, fetch_req("f", 0, 99))  # out of range
        responses = list(stub.FetchStream(iter(requests), timeout=30))
        assert len(responses) == len(requests)
        got = []
        for req, resp in zip(requests, responses, strict=True):
            (r,) = resp.results
            assert r.partition == req.partitions[0].partition
            if req.partitions[0].partition == 3:
                assert r.error_code == pb.UNKNOWN_TOPIC_OR_PARTITION
            elif req.partitions[0].fetch_offset == 99:
                assert r.error_code == pb.OFFSET_OUT_OF_RANGE and r.high_watermark == 5
            else:
                assert r.error_code == pb.NONE and r.high_watermark == 5
                got.append(values_of(r.records, req.partitions[0].fetch_offset))
        assert got == [[b"r%d" % j for j in range(i, 5)] for i in range(5)]

        # A long-poll on the stream is answered by an append, as the unary Fetch is.
        outbox: queue.SimpleQueue[pb.FetchRequest | None] = queue.SimpleQueue()

        def requests_iter() -> Iterator[pb.FetchRequest]:
            while (item := outbox.get()) is not None:
                yield item

        call = stub.FetchStream(requests_iter(), timeout=30)
        outbox.put(fetch_req("f", 0, 5, max_wait_ms=20_000))
        t0 = time.monotonic()
        threading.Timer(0.3, lambda: stub.Produce(produce_req("f", 0, b"late"), timeout=10)).start()
        resp = next(call)
        assert 0.25 < time.monotonic() - t0 < 10
        assert values_of(resp.results[0].records) == [b"late"]
        outbox.put(None)
        assert list(call) == []  # the client closed its side: the stream ends OK


def test_malformed_stream_message_ends_the_stream_after_earlier_responses_and_writes_nothing(broker):
    with Admin(broker.address) as admin:
        admin.create_topic("m", partitions=1)
    with grpc.insecure_channel(broker.address) as ch:
        call = ch.stream_stream("/logbroker.v1.Broker/ProduceStream")
        good = produce_req("m", 0, b"ok").SerializeToString()
        garbage = b"\x1a\xff\xff\xff\xff\x0f"  # field 3, a length far past the end
        responses = call(iter([good, garbage, good]), timeout=30)
        first = pb.ProduceResponse.FromString(next(responses))
        assert first.results[0].error_code == pb.NONE
        with pytest.raises(grpc.RpcError) as info:
            next(responses)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed ProduceRequest" in info.value.details()
        # a request the unary call refuses whole (negative max_bytes) ends a fetch stream likewise
        bad = fetch_req("m", 0, 0)
        bad.max_bytes = -1
        with pytest.raises(grpc.RpcError) as info:
            list(pbg.BrokerStub(ch).FetchStream(iter([fetch_req("m", 0, 0), bad]), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert high_watermark(broker.address, "m") == 1  # only the one good request before the garbage


def test_oversized_stream_message_is_refused_and_changes_nothing(broker_factory):
    broker = broker_factory(extra_args=["--max-request-bytes", str(256 << 10)])
    with Admin(broker.address) as admin:
        admin.create_topic("big", partitions=1)
    with grpc.insecure_channel(broker.address, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        stub = pbg.BrokerStub(ch)
        huge = produce_req("big", 0, b"x" * (1 << 20))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ProduceStream(iter([produce_req("big", 0, b"small"), huge]), timeout=30))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # the limit is per message: many messages just under it pass on one stream
        under = [produce_req("big", 0, b"y" * (200 << 10)) for _ in range(5)]
        assert all(r.results[0].error_code == pb.NONE
                   for r in stub.ProduceStream(iter(under), timeout=30))
    assert high_watermark(broker.address, "big") == 6  # "small" plus the five, not the huge one


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_clients_use_streams_and_survive_a_kill_9_mid_stream(broker_factory, transport: str):
    from logbroker.client.streams import _Stream
    from logbroker.client.wire_connection import WireConnection

    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("k", partitions=1)
    producer = Producer(broker.address, acks=1, linger_ms=0, delivery_timeout_ms=30_000, request_timeout_ms=2000,
                        retry_backoff_ms=50, transport=transport)
    consumer = Consumer(broker.address, topics=None, auto_offset_reset="earliest", fetch_max_wait_ms=500,
                        transport=transport)
    consumer.assign([("k", 0)])
    acked: list[int] = []
    failed: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()
    received: list[bytes] = []

    def on_done(i: int):
        def cb(fut):
            with lock:
                if fut.exception() is None:
                    acked.append(i)
                else:
                    failed.append(fut.exception())
        return cb

    send_errors: list[BaseException] = []

    def produce_loop() -> None:
        i = 0
        while not stop.is_set():
            try:
                producer.send("k", b"%09d" % i).add_done_callback(on_done(i))
            except Exception as e:  # buffer full while the broker is down: that record was not sent
                send_errors.append(e)
                continue
            i += 1
            if i % 50 == 0:
                time.sleep(0.001)

    t = threading.Thread(target=produce_loop, daemon=True)
    t.start()
    try:
        def consumed(n: int) -> bool:
            received.extend(m.value for m in consumer.poll(timeout_ms=100))
            return len(received) >= n

        wait_for(lambda: consumed(2000), 60, "records through the streams")
        kinds = {key[0].rsplit("/", 1)[1] for key in producer._streams._streams}
        kinds |= {key[0].rsplit("/", 1)[1] for key in consumer._streams._streams}
        assert kinds == {"ProduceStream", "FetchStream"}
        kind = WireConnection if transport == "tcp" else _Stream
        opened = [*producer._streams._streams.values(), *consumer._streams._streams.values()]
        assert all(type(s) is kind for s in opened), opened
        broker.kill(signal.SIGKILL)
        at_kill = len(acked)
        broker2 = broker_factory(data_dir=broker.data_dir, port=broker.port)
        wait_for(lambda: len(acked) >= at_kill + 2000, 60,
                 f"acknowledgements after the restart ({len(acked)} - {at_kill}, {failed[:2]}, {send_errors[:2]})")
        stop.set()
        t.join(10)
        producer.flush(30)
        wait_for(lambda: consumed(len(acked)) and set(acked) <= {int(v) for v in received}, 60,
                 "every acknowledged record consumed")
    finally:
        stop.set()
        producer.close(10)
        consumer.close()
    assert not failed, failed[:3]
    sequence = [int(v) for v in received]
    firsts: list[int] = []
    seen: set[int] = set()
    for n in sequence:
        if n not in seen:
            seen.add(n)
            firsts.append(n)
    assert firsts == sorted(firsts), "records out of send order"
    assert set(acked) <= seen
    assert high_watermark(broker2.address, "k") == len(sequence)


def test_a_broker_with_an_idle_client_stream_stops_well_within_its_grace_period(broker):
    """Streams never end on their own: a stopping broker ends them rather than wait shutdown_grace_s (5 s)."""
    with Admin(broker.address) as admin:
        admin.create_topic("idle", partitions=1)
    requests: queue.SimpleQueue[pb.FetchRequest | None] = queue.SimpleQueue()

    def request_iter() -> Iterator[pb.FetchRequest]:
        while (r := requests.get()) is not None:
            yield r

    with grpc.insecure_channel(broker.address) as ch:
        responses = pbg.BrokerStub(ch).FetchStream(request_iter())
        try:
            requests.put(fetch_req("idle", 0, 0))
            assert next(responses).results[0].error_code == pb.NONE  # open, answered, now idle
            t0 = time.monotonic()
            assert broker.stop(timeout_s=20) == 0
            stop_s = time.monotonic() - t0
            with pytest.raises((StopIteration, grpc.RpcError)):
                next(responses)  # the broker ended the stream
        finally:
            requests.put(None)
            responses.cancel()
    assert stop_s < 2.5, f"stop took {stop_s:.1f} s"


def test_consumers_sharing_a_metadata_cache_do_not_wait_behind_each_others_long_polls(broker):
    from logbroker.client.metadata_cache import MetadataCache

    with Admin(broker.address) as admin:
        admin.create_topic("quiet", partitions=1)
        admin.create_topic("busy", partitions=1)
    with Producer(broker.address) as producer:
        producer.send("busy", b"here").get(timeout=10)
    with MetadataCache(broker.address) as cache:
        tailing = Consumer(cache, fetch_max_wait_ms=6000, enable_auto_commit=False)
        reading = Consumer(cache, fetch_max_wait_ms=6000, enable_auto_commit=False)
        try:
            tailing.assign([("quiet", 0)])
            reading.assign([("busy", 0)])
            polled = threading.Thread(target=tailing.poll, args=(8.0,), daemon=True)
            polled.start()
            wait_for(lambda: bool(tailing._in_flight), 10, "the tailing consumer's long poll in flight")
            t0 = time.monotonic()
            got: list[bytes | None] = []
            while not got and time.monotonic() - t0 < 10:
                got += [r.value for r in reading.poll(1.0)]
            assert got == [b"here"]
            assert time.monotonic() - t0 < 3  # not after the other consumer's 6 s long poll
        finally:
            reading.close()
            tailing.close()
            polled.join(10)
