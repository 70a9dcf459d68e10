"""Producer: light futures, partitioning, batching, retries and bounds — against in-memory fakes."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque

import grpc
import pytest

from logbroker import wire
from logbroker.client.call_errors import needs_metadata
from logbroker.client.circuit import Circuits, State
from logbroker.client.producer import (
    FutureRecordMetadata,
    FutureTimeoutError,
    Producer,
    RecordMetadata,
    _BatchResult,
    failed_future,
    retry_backoff_s,
    rpc_error,
)
from logbroker.cluster.hashing import partition_for_key
from logbroker.errors import (
    BrokerOverloadedError,
    BrokerUnavailableError,
    CorruptMessageError,
    KafkaTimeoutError,
    LogbrokerError,
    MessageTooLargeError,
    NotLeaderOrFollowerError,
    RecordListTooLargeError,
    RequestTimedOutError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
)
from logbroker.storage import record_batch as rb
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_client_fakes import FakeMetadata, FakeRpcError

pytestmark = pytest.mark.timeout(30)


def records_of(md: FakeMetadata, topic: str, partition: int) -> list[rb.Message]:
    out = []
    for _, data in md.broker.logs.get((topic, partition), []):
        for h, pos in rb.iter_batches(data):
            out.extend(rb.decode_batch(data, pos, h, topic, partition))
    return out


def produce_requests(md: FakeMetadata, broker: str = "broker0:9092") -> list[pb.ProduceRequest]:
    return [r for r in md.fakes[broker].requests if isinstance(r, pb.ProduceRequest)]


def wait_until(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture
def md() -> FakeMetadata:
    return FakeMetadata({"t": 1, "four": 4})


# -- light futures ----------------------------------------------------------------------------


def test_future_resolves_to_record_metadata():
    r = _BatchResult("t", 3)
    f1 = FutureRecordMetadata(r, 0, 1000)
    f2 = FutureRecordMetadata(r, 1, 1001)
    assert not f1.done() and f1.running() and not f1.cancel() and not f1.cancelled()
    r.complete(40, -1, None)
    assert f1.done() and f2.done()
    assert f1.result() == RecordMetadata("t", 3, 40, 1000)
    assert f2.result(timeout=0) == RecordMetadata("t", 3, 41, 1001)
    assert f2.exception() is None


def test_future_log_append_time_replaces_timestamp():
    r = _BatchResult("t", 0)
    r.complete(7, 5555, None)
    assert FutureRecordMetadata(r, 2, 1).result() == RecordMetadata("t", 0, 9, 5555)


def test_future_error_is_raised_and_returned():
    r = _BatchResult("t", 0)
    f = FutureRecordMetadata(r, 0, 1)
    r.complete(-1, -1, CorruptMessageError("bad"))
    with pytest.raises(CorruptMessageError):
        f.result()
    assert isinstance(f.exception(), CorruptMessageError)


def test_future_timeout_is_both_kafka_and_builtin_timeout():
    f = FutureRecordMetadata(_BatchResult("t", 0), 0, 1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        f.result(timeout=0.05)
    with pytest.raises(KafkaTimeoutError):
        f.exception(timeout=0.01)
    assert 0.05 <= time.monotonic() - t0 < 2
    assert issubclass(FutureTimeoutError, TimeoutError)


def test_future_result_wakes_a_waiting_thread():
    r = _BatchResult("t", 0)
    f = FutureRecordMetadata(r, 5, 1)
    got = []
    th = threading.Thread(target=lambda: got.append(f.result(timeout=5)))
    th.start()
    time.sleep(0.05)
    r.complete(100, -1, None)
    th.join(5)
    assert got == [RecordMetadata("t", 0, 105, 1)]


def test_callbacks_run_once_on_the_completing_thread_and_at_once_when_done():
    r = _BatchResult("t", 0)
    f1 = FutureRecordMetadata(r, 0, 1)
    f2 = FutureRecordMetadata(r, 1, 1)
    calls = []
    f1.add_done_callback(lambda f: calls.append(("a", f, threading.current_thread().name)))
    f2.add_done_callback(lambda f: calls.append(("b", f, threading.current_thread().name)))
    assert calls == []
    th = threading.Thread(target=r.complete, args=(0, -1, None), name="completer")
    th.start()
    th.join()
    assert calls == [("a", f1, "completer"), ("b", f2, "completer")]
    r.complete(5, -1, None)  # a second completion changes nothing
    assert f2.result().offset == 1 and len(calls) == 2
    f1.add_done_callback(lambda f: calls.append(("late", f, threading.current_thread().name)))
    assert calls[-1] == ("late", f1, threading.current_thread().name)


def test_a_failing_callback_does_not_stop_the_others():
    r = _BatchResult("t", 0)
    f = FutureRecordMetadata(r, 0, 1)
    seen = []
    f.add_done_callback(lambda _: 1 / 0)
    f.add_done_callback(lambda fut: seen.append(fut.result().offset))
    r.complete(3, -1, None)
    assert seen == [3]


def test_failed_future():
    f = failed_future("t", 1, MessageTooLargeError("big"))
    assert f.done()
    assert isinstance(f.exception(), MessageTooLargeError)


# -- pure helpers -----------------------------------------------------------------------------


def test_retry_backoff_is_exponential_and_capped():
    assert retry_backoff_s(1, 100) == 0.1
    assert retry_backoff_s(2, 100) == 0.2
    assert retry_backoff_s(3, 100) == 0.4
    assert retry_backoff_s(30, 100) == 1.0
    assert retry_backoff_s(30, 5000) == 5.0  # a base above the cap is kept


def test_rpc_errors_map_to_retriable_or_fatal():
    assert isinstance(rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE)), BrokerUnavailableError)
    assert rpc_error(FakeRpcError(grpc.StatusCode.UNAVAILABLE)).retriable
    # a broker stopping with the call in flight: retried elsewhere, not a failed record
    assert isinstance(rpc_error(FakeRpcError(grpc.StatusCode.CANCELLED)), BrokerUnavailableError)
    err = rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED))
    assert isinstance(err, RequestTimedOutError) and err.retriable
    assert isinstance(rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)), RecordListTooLargeError)
    err = rpc_error(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "nope"))
    assert isinstance(err, UnknownServerError) and not err.retriable


def test_an_overload_refusal_is_retriable_with_its_hint_and_a_too_large_one_is_final():
    err = rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, wire.with_retry_after("busy", 250)))
    assert isinstance(err, BrokerOverloadedError) and err.retriable and err.retry_after_ms == 250
    assert not needs_metadata(err)  # the leaders did not move
    err = rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "Concurrent RPC limit exceeded!"))
    assert isinstance(err, BrokerOverloadedError)  # gRPC's own maximum_concurrent_rpcs
    err = rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "request of 99 bytes is over the limit"))
    assert isinstance(err, RecordListTooLargeError) and not err.retriable


def test_an_overloaded_broker_is_retried_no_earlier_than_its_retry_after(md):
    md.broker.call_errors.append(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, wire.with_retry_after("busy", 300)))
    with Producer(md, retry_backoff_ms=1, linger_ms=0) as p:
        t0 = time.monotonic()
        assert p.send("t", b"v").result(5).offset == 0
        assert time.monotonic() - t0 >= 0.3
    assert len(produce_requests(md)) == 2


def test_a_broker_that_keeps_refusing_gets_its_circuit_opened_then_probed_and_closed(md, caplog):
    caplog.set_level(logging.INFO, logger="logbroker.client.circuit")
    md.circuits = Circuits(failures_max=3, cool_down_ms=300)
    refusal = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, wire.with_retry_after("busy", 0))
    md.broker.call_errors.extend([refusal] * 3)
    with Producer(md, retry_backoff_ms=1, linger_ms=0) as p:
        t0 = time.monotonic()
        assert p.send("t", b"v").result(5).offset == 0
        assert time.monotonic() - t0 >= 0.3  # nothing went to the broker during the cool-down
    assert len(produce_requests(md)) == 4  # three refused, then the probe
    lines = [r.getMessage() for r in caplog.records if r.name == "logbroker.client.circuit"]
    assert len(lines) == 2 and "opened after 3 consecutive failures" in lines[0] and "closed" in lines[1]


def test_a_probe_answered_with_a_final_refusal_closes_the_circuit(md):
    md.circuits = Circuits(failures_max=1, cool_down_ms=100)
    md.broker.call_errors.extend([
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, wire.with_retry_after("busy", 0)),
        FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad request")])  # the probe's answer
    with Producer(md, retry_backoff_ms=1, linger_ms=0) as p:
        with pytest.raises(UnknownServerError):
            p.send("t", b"v").result(5)
        assert md.circuits.state("broker0:9092") is State.CLOSED  # the broker answered: not stuck half-open
        assert p.send("t", b"w").result(5).offset == 0


def test_config_validation(md):
    with pytest.raises(ValueError):
        Producer(md, acks=2)
    with pytest.raises(ValueError):
        Producer(md, compression="snappy")
    with pytest.raises(ValueError):
        Producer(md, batch_size_bytes=8 << 20, max_request_bytes=8 << 20)
    with pytest.raises(ValueError):
        Producer(md, delivery_timeout_ms=1000, request_timeout_ms=30_000)


# -- producing --------------------------------------------------------------------------------


def test_send_and_flush_deliver_in_order(md):
    with Producer(md, linger_ms=1000) as p:
        futures = [p.send("t", b"v%d" % i, key=None, partition=0) for i in range(100)]
        assert not futures[0].done()  # lingering
        p.flush(timeout=5)
        assert [f.result(0).offset for f in futures] == list(range(100))
    assert [m.value for m in records_of(md, "t", 0)] == [b"v%d" % i for i in range(100)]


def test_str_values_keys_and_headers_are_encoded(md):
    with Producer(md) as p:
        meta = p.send("t", "héllo", key="k", headers=[("h", "x"), ("n", None)], timestamp_ms=1234).result(5)
        p.send("t", None, key=b"tombstone").result(5)
        p.send("t", bytearray(b"ba"), headers={"d": b"1"}).result(5)
    assert meta == RecordMetadata("t", 0, 0, 1234)
    msgs = records_of(md, "t", 0)
    assert (msgs[0].key, msgs[0].value, msgs[0].headers, msgs[0].timestamp) == (
        b"k", "héllo".encode(), (("h", b"x"), ("n", None)), 1234)
    assert msgs[1].value is None and msgs[1].key == b"tombstone"
    assert msgs[2].value == b"ba" and msgs[2].headers == (("d", b"1"),)


def test_bad_types_raise(md):
    with Producer(md) as p:
        with pytest.raises(TypeError):
            p.send("t", 5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            p.send("t", b"v", headers=[(1, b"x")])  # type: ignore[list-item]


def test_keyed_records_use_partition_for_key(md):
    with Producer(md) as p:
        metas = [p.send("four", b"v", key=b"key-%d" % i) for i in range(200)]
        p.flush(5)
    for i, f in enumerate(metas):
        assert f.result().partition == partition_for_key(b"key-%d" % i, 4)
    assert len({f.result().partition for f in metas}) == 4


def test_null_keys_stick_to_one_partition_per_batch(md):
    with Producer(md, linger_ms=10_000, batch_size_bytes=10_000) as p:
        first = [p.send("four", b"x" * 100) for _ in range(50)]  # ~50 * 110 bytes: still one batch
        p.flush(5)
        parts = {f.result().partition for f in first}
        assert len(parts) == 1
        # the batch shipped: the next null-key record goes to another partition
        f = p.send("four", b"x")
        p.flush(5)
        nxt = f.result().partition
        assert nxt not in parts


def test_null_keys_switch_partition_when_a_batch_fills(md):
    with Producer(md, linger_ms=10_000, batch_size_bytes=2_000) as p:
        futures = [p.send("four", b"x" * 100) for _ in range(200)]
        p.flush(5)
    parts = [f.result().partition for f in futures]
    runs = [parts[0]]
    for a in parts[1:]:
        if a != runs[-1]:
            runs.append(a)
    assert len(runs) > 5  # many batches, and consecutive batches on different partitions
    sizes: dict[int, int] = {}
    for p_ in parts:
        sizes[p_] = sizes.get(p_, 0) + 1
    assert all(n < 200 for n in sizes.values())


def test_explicit_partition_out_of_range_raises(md):
    with Producer(md) as p, pytest.raises(UnknownTopicOrPartitionError):
        p.send("four", b"v", partition=4)


def test_explicit_partition_added_later_is_found(md):
    with Producer(md) as p:
        p.send("four", b"v", partition=0).result(5)
        md.topic_partitions["four"] = 6
        assert p.send("four", b"v", partition=5).result(5).partition == 5


def test_unknown_topic_raises_after_max_block(md):
    with Producer(md, max_block_ms=200, retry_backoff_ms=20) as p:
        t0 = time.monotonic()
        with pytest.raises(UnknownTopicOrPartitionError):
            p.send("nope", b"v")
        assert 0.15 < time.monotonic() - t0 < 3


def test_topic_created_while_send_waits(md):
    def create() -> None:
        time.sleep(0.2)
        md.topic_partitions["new"] = 2

    th = threading.Thread(target=create)
    th.start()
    with Producer(md, retry_backoff_ms=20) as p:
        assert p.send("new", b"v", partition=1).result(5).offset == 0
    th.join()


def test_batches_are_cut_at_batch_size(md):
    with Producer(md, linger_ms=10_000, batch_size_bytes=5_000) as p:
        for _ in range(300):
            p.send("t", b"x" * 100, partition=0)
        p.flush(5)
    batches = md.broker.logs[("t", 0)]
    assert len(batches) > 5
    assert all(len(data) <= 5_000 for _, data in batches)
    assert sum(rb.parse_header(d).record_count for _, d in batches) == 300


def test_a_record_above_batch_size_gets_its_own_batch(md):
    with Producer(md, batch_size_bytes=1_000) as p:
        f = p.send("t", b"y" * 5_000)
        assert f.result(5).offset == 0
    assert len(md.broker.logs[("t", 0)]) == 1


def test_linger_ships_without_flush(md):
    with Producer(md, linger_ms=30) as p:
        t0 = time.monotonic()
        f = p.send("t", b"v")
        assert f.result(timeout=5).offset == 0
        assert 0.02 <= time.monotonic() - t0 < 2


def test_record_too_large_fails_its_future_at_once(md):
    with Producer(md, batch_size_bytes=1 << 16, max_request_bytes=1 << 17) as p:
        f = p.send("t", b"z" * (1 << 17))
        assert f.done()
        with pytest.raises(MessageTooLargeError):
            f.result()
        assert p.send("t", b"ok").result(5).offset == 0


def test_one_batch_per_partition_in_flight_and_the_backlog_follows_in_one_request(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, batch_size_bytes=1_000, enable_idempotence=False)  # idempotent: pipelined
    try:
        first = p.send("four", b"first", partition=1)
        wait_until(lambda: len(md.broker.held) == 1)
        futures = [p.send("four", b"%03d" % i + b"x" * 100, partition=1) for i in range(30)]
        time.sleep(0.2)
        assert len(produce_requests(md)) == 1  # partition 1 is muted while its batch is in flight
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
        assert first.result().offset == 0
        assert [f.result().offset for f in futures] == list(range(1, 31))
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(2)
    assert [m.value[:3] for m in records_of(md, "four", 1)[1:]] == [b"%03d" % i for i in range(30)]
    reqs = produce_requests(md)
    assert len(reqs) == 2
    # the backlog went out together: several batches back to back in one `records` field
    assert len(rb.validate_batches(reqs[1].partitions[0].records, 1 << 20)) > 1
    assert all(len(d) <= 1_000 for _, d in md.broker.logs[("four", 1)])


def test_backlog_is_cut_at_max_request_bytes(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, batch_size_bytes=1_000, max_request_bytes=4_096)
    try:
        p.send("t", b"first")
        wait_until(lambda: len(md.broker.held) == 1)
        futures = [p.send("t", b"x" * 100) for _ in range(100)]
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
        assert [f.result().offset for f in futures] == list(range(1, 101))
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(2)
    for r in produce_requests(md):
        assert r.ByteSize() <= 4_096


def test_retried_backlog_keeps_its_order(md):
    md.broker.hold = True
    md.broker.errors[("t", 0)] = deque([pb.NOT_LEADER_OR_FOLLOWER])
    p = Producer(md, linger_ms=0, batch_size_bytes=1_000, retry_backoff_ms=10)
    try:
        futures = [p.send("t", b"%03d" % i + b"x" * 100) for i in range(60)]
        time.sleep(0.2)
        md.broker.hold = False
        md.broker.release()  # the first batch fails, then everything goes in order
        p.flush(5)
        assert [f.result().offset for f in futures] == list(range(60))
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(2)
    assert [m.value[:3] for m in records_of(md, "t", 0)] == [b"%03d" % i for i in range(60)]


def test_ready_batches_of_one_leader_share_a_request(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=100)
    try:
        for part in (0, 2, 3):
            p.send("four", b"v", partition=part)
        wait_until(lambda: len(produce_requests(md)) >= 1)
        time.sleep(0.05)
        reqs = produce_requests(md)
        assert len(reqs) == 1
        assert sorted(pp.partition for pp in reqs[0].partitions) == [0, 2, 3]
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(2)


def test_max_in_flight_requests_per_broker(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, max_in_flight_requests=2)
    try:
        for i in range(2):
            p.send("four", b"v", partition=i)
            wait_until(lambda i=i: len(md.broker.held) == i + 1)  # one request each
        p.send("four", b"v", partition=2)
        p.send("four", b"v", partition=3)
        time.sleep(0.1)
        assert len(md.broker.held) == 2  # at the limit: partitions 2 and 3 wait
        md.broker.release()
        wait_until(lambda: len(md.broker.held) == 1)
        # the two waiting partitions share one leader: one request carries both
        assert len(md.broker.held) == 1
        assert len(md.broker.held[0][1].partitions) == 2
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(2)


def test_requests_go_to_each_partitions_leader():
    md = FakeMetadata({"t": 2}, leaders={("t", 0): 0, ("t", 1): 1}, brokers=2)
    with Producer(md) as p:
        assert p.send("t", b"a", partition=0).result(5).offset == 0
        assert p.send("t", b"b", partition=1).result(5).offset == 0
    assert [pp.partition for r in produce_requests(md, "broker0:9092") for pp in r.partitions] == [0]
    assert [pp.partition for r in produce_requests(md, "broker1:9092") for pp in r.partitions] == [1]


def test_retriable_error_refreshes_metadata_and_retries_in_order(md):
    md.broker.errors[("t", 0)] = deque([pb.NOT_LEADER_OR_FOLLOWER, pb.LEADER_NOT_AVAILABLE])
    before = len(md.refreshes)
    with Producer(md, retry_backoff_ms=10) as p:
        futures = [p.send("t", b"%d" % i) for i in range(10)]
        assert [f.result(5).offset for f in futures] == list(range(10))
    assert len(md.refreshes) > before
    assert [m.value for m in records_of(md, "t", 0)] == [b"%d" % i for i in range(10)]


def test_leader_moves_to_another_broker():
    md = FakeMetadata({"t": 1}, brokers=2)
    md.broker.errors[("t", 0)] = deque([pb.NOT_LEADER_OR_FOLLOWER] * 1000)  # until the move
    with Producer(md, retry_backoff_ms=10) as p:
        f = p.send("t", b"v")
        time.sleep(0.05)
        md.leaders[("t", 0)] = 1
        assert f.result(5).offset == 0
    assert md.fakes["broker1:9092"].logs[("t", 0)]


def test_grpc_unavailable_is_retried(md):
    md.broker.call_errors.extend([FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down")] * 2)
    with Producer(md, retry_backoff_ms=10) as p:
        assert p.send("t", b"v").result(5).offset == 0


def test_non_retriable_error_fails_the_batch(md):
    md.broker.errors[("t", 0)] = deque([pb.CORRUPT_MESSAGE])
    with Producer(md) as p:
        f = p.send("t", b"v")
        with pytest.raises(CorruptMessageError):
            f.result(5)
        assert p.send("t", b"w").result(5).offset == 0  # the next batch is fine


def test_non_retriable_grpc_status_fails_the_batch(md):
    md.broker.call_errors.append(FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad request"))
    with Producer(md) as p, pytest.raises(UnknownServerError):
        p.send("t", b"v").result(5)


def test_retries_stop_at_the_delivery_timeout(md):
    md.broker.errors[("t", 0)] = deque([pb.NOT_ENOUGH_REPLICAS] * 10_000)
    with Producer(md, retry_backoff_ms=10, delivery_timeout_ms=400, request_timeout_ms=300, linger_ms=0) as p:
        t0 = time.monotonic()
        f = p.send("t", b"v")
        with pytest.raises(LogbrokerError) as info:
            f.result(5)
        assert 0.2 < time.monotonic() - t0 < 2
    assert info.value.__class__.__name__ in ("NotEnoughReplicasError", "KafkaTimeoutError")


def test_retries_are_bounded_by_count(md):
    md.broker.errors[("t", 0)] = deque([pb.NOT_LEADER_OR_FOLLOWER] * 100)
    with Producer(md, retries=2, retry_backoff_ms=1) as p, pytest.raises(NotLeaderOrFollowerError):
        p.send("t", b"v").result(5)
    assert len(produce_requests(md)) == 3


def test_batch_without_leader_expires(md):
    md.leaders[("t", 0)] = -1
    md.refresh()
    with Producer(md, delivery_timeout_ms=300, request_timeout_ms=200, linger_ms=0, retry_backoff_ms=20) as p:
        f = p.send("t", b"v")
        with pytest.raises(KafkaTimeoutError):
            f.result(5)


def test_acks_zero_completes_with_offset_minus_one(md):
    with Producer(md, acks=0) as p:
        meta = p.send("t", b"v", timestamp_ms=5).result(5)
    assert meta == RecordMetadata("t", 0, -1, 5)
    assert produce_requests(md)[0].acks == 0


def test_acks_all_is_minus_one_on_the_wire(md):
    with Producer(md, acks="all") as p:
        p.send("t", b"v").result(5)
    assert produce_requests(md)[0].acks == -1


def test_gzip_batches(md):
    # Values compress well, but not below 7 bytes a record: validate_batches rejects that as hostile.
    values = [os.urandom(8).hex().encode() * 10 for _ in range(100)]
    with Producer(md, compression="gzip") as p:
        for v in values:
            p.send("t", v)
        p.flush(5)
    _, data = md.broker.logs[("t", 0)][0]
    assert rb.parse_header(data).compression == rb.COMPRESSION_GZIP
    assert len(data) < 100 * 160 / 3
    assert [m.value for m in records_of(md, "t", 0)] == values


def test_full_buffer_blocks_send_then_times_out(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, batch_size_bytes=4_096, buffer_memory_bytes=8_192, max_block_ms=200)
    try:
        t0 = time.monotonic()
        with pytest.raises(KafkaTimeoutError):
            for _ in range(1_000):
                p.send("t", b"x" * 100)
        assert 0.15 < time.monotonic() - t0 < 3
        assert p.metrics["buffered_bytes"] <= 8_192
        md.broker.hold = False
        md.broker.release()
        p.send("t", b"after").result(5)  # memory came back
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(5)


def test_full_buffer_unblocks_when_batches_complete(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, batch_size_bytes=4_096, buffer_memory_bytes=8_192, max_block_ms=5_000)
    sent = []

    def release_later() -> None:
        time.sleep(0.2)
        md.broker.hold = False
        md.broker.release()

    th = threading.Thread(target=release_later)
    th.start()
    try:
        for _i in range(300):
            sent.append(p.send("t", b"x" * 100))
        p.flush(5)
        assert [f.result().offset for f in sent] == list(range(300))
    finally:
        th.join()
        p.close(5)


def test_callbacks_run_on_the_sender_thread(md):
    seen = []
    done = threading.Event()
    with Producer(md) as p:
        f = p.send("t", b"v")
        f.add_done_callback(lambda fut: (seen.append((fut.result().offset, threading.current_thread().name)),
                                         done.set()))
        assert done.wait(5)
    assert seen == [(0, "logbroker-producer-sender")]


def test_send_from_a_callback_does_not_deadlock(md):
    with Producer(md) as p:
        inner = []
        done = threading.Event()

        def cb(_fut):
            inner.append(p.send("t", b"from-callback"))
            done.set()

        p.send("t", b"v").add_done_callback(cb)
        assert done.wait(5)
        assert inner[0].result(5).offset == 1


def test_flush_timeout_raises(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0)
    try:
        p.send("t", b"v")
        with pytest.raises(KafkaTimeoutError):
            p.flush(timeout=0.1)
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(5)


def test_close_does_not_hang_past_its_timeout_and_fails_what_is_left(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0)
    f = p.send("t", b"v")
    t0 = time.monotonic()
    p.close(timeout=0.3)
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(KafkaTimeoutError):
        f.result(2)
    with pytest.raises(LogbrokerError):
        p.send("t", b"late")
    p.close()  # twice is fine


def test_close_delivers_lingering_records(md):
    p = Producer(md, linger_ms=60_000)
    f = p.send("t", b"v")
    p.close(5)
    assert f.result(0).offset == 0


def test_send_from_many_threads(md):
    with Producer(md, linger_ms=1) as p:
        results: list[FutureRecordMetadata] = []
        lock = threading.Lock()

        def worker(n: int) -> None:
            mine = [p.send("four", b"%d-%d" % (n, i), key=b"%d" % n) for i in range(500)]
            with lock:
                results.extend(mine)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        p.flush(10)
    assert len({(f.result().partition, f.result().offset) for f in results}) == 2000
    # per key (one partition each), offsets follow send order
    for n in range(4):
        part = partition_for_key(b"%d" % n, 4)
        values = [m.value for m in records_of(md, "four", part) if m.key == b"%d" % n]
        assert values == [b"%d-%d" % (n, i) for i in range(500)]


def test_a_rejected_backlog_is_split_so_only_the_culprit_fails(md):
    md.broker.hold = True
    p = Producer(md, linger_ms=0, batch_size_bytes=1_000, enable_idempotence=False)  # one request per partition
    try:
        first = p.send("t", b"first")  # goes out alone and is held
        wait_until(lambda: len(md.broker.held) == 1)
        backlog = [p.send("t", b"g" * 100) for _ in range(20)]  # several batches, waiting
        md.broker.release()  # "first" is stored; the backlog goes out in one request, held
        wait_until(lambda: len(md.broker.held) == 1)
        assert len(rb.validate_batches(md.broker.held[0][1].partitions[0].records, 1 << 20)) > 1
        # the backlog is rejected as a whole, then its first batch alone again: only that one fails
        md.broker.errors[("t", 0)] = deque([pb.MESSAGE_TOO_LARGE, pb.MESSAGE_TOO_LARGE])
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
    finally:
        md.broker.hold = False
        md.broker.release()
        p.close(2)
    assert first.result().offset == 0
    failed = [f for f in backlog if f.exception() is not None]
    assert failed and all(isinstance(f.exception(), MessageTooLargeError) for f in failed)
    assert failed == backlog[: len(failed)] and len(failed) < 10
    assert [f.result().offset for f in backlog[len(failed):]] == list(range(1, 21 - len(failed)))
