"""The idempotent producer (client/producer/idempotence.py) against in-memory fakes that deduplicate
as a real leader does (tests/unit/test_client_fakes.py, over storage/producer_state.py)."""

from __future__ import annotations

from collections import deque

import pytest

from logbroker.client.producer import Producer
from logbroker.errors import InvalidProducerEpochError, OutOfOrderSequenceNumberError
from logbroker.storage import record_batch as rb
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_client_fakes import FakeMetadata
from tests.unit.test_client_producer import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def md() -> FakeMetadata:
    return FakeMetadata({"t": 1, "four": 4})


def headers(md: FakeMetadata, topic: str, partition: int) -> list[rb.BatchHeader]:
    return [rb.parse_header(data) for _, data in md.broker.logs.get((topic, partition), [])]


def test_batches_carry_one_producer_id_and_per_partition_sequences(md):
    with Producer(md, linger_ms=0, batch_size_bytes=200) as p:
        for i in range(12):
            p.send("four", b"%02d" % i + b"x" * 60, partition=i % 2).result(5)
    assert md.broker.producer_ids == 1  # asked once, lazily
    for part in (0, 1):
        hs = headers(md, "four", part)
        assert {h.producer_id for h in hs} == {1001} and {h.producer_epoch for h in hs} == {0}
        expected, seqs = 0, []
        for h in hs:
            seqs.append(h.base_sequence)
            assert h.base_sequence == expected
            expected += h.record_count
        assert seqs[0] == 0


def test_a_retry_whose_first_try_landed_is_answered_as_a_duplicate(md):
    md.broker.lose_answers = 1  # appended, then the answer is lost
    with Producer(md, retry_backoff_ms=10) as p:
        futures = [p.send("t", b"%d" % i) for i in range(5)]
        assert [f.result(5).offset for f in futures] == list(range(5))
        assert p.send("t", b"next").result(5).offset == 5
    values = [m.value for _, data in md.broker.logs[("t", 0)] for h, pos in rb.iter_batches(data)
              for m in rb.decode_batch(data, pos, h, "t", 0)]
    assert values == [b"0", b"1", b"2", b"3", b"4", b"next"]  # written once


def test_without_idempotence_the_retry_writes_twice(md):
    md.broker.lose_answers = 1
    with Producer(md, retry_backoff_ms=10, enable_idempotence=False) as p:
        p.send("t", b"once").result(5)
    assert [h.producer_id for h in headers(md, "t", 0)] == [-1, -1]  # the duplicate this feature removes


def test_idempotence_follows_acks_unless_asked():
    md = FakeMetadata({"t": 1})
    with Producer(md, acks=1) as p:
        p.send("t", b"v").result(5)
    assert headers(md, "t", 0)[0].producer_id == -1
    with pytest.raises(ValueError, match="acks='all'"):
        Producer(md, acks=1, enable_idempotence=True)
    with pytest.raises(ValueError, match="producer_name"):
        Producer(md, enable_idempotence=False, producer_name="x")


def test_a_final_failure_takes_a_new_producer_id(md):
    md.broker.errors[("t", 0)] = deque([pb.OUT_OF_ORDER_SEQUENCE_NUMBER])
    with Producer(md, retry_backoff_ms=10) as p:
        with pytest.raises(OutOfOrderSequenceNumberError):
            p.send("t", b"lost").result(5)
        assert p.send("t", b"after").result(5).offset == 0
    (h,) = headers(md, "t", 0)
    assert (h.producer_id, h.base_sequence) == (1002, 0)  # a fresh id, from sequence 0


def test_a_fenced_producer_fails_every_later_batch(md):
    md.broker.errors[("t", 0)] = deque([pb.INVALID_PRODUCER_EPOCH])
    with Producer(md, retry_backoff_ms=10, producer_name="orders") as p:
        with pytest.raises(InvalidProducerEpochError):
            p.send("t", b"zombie").result(5)
        with pytest.raises(InvalidProducerEpochError):
            p.send("t", b"still a zombie").result(5)
    assert md.broker.producer_ids == 1 and not md.broker.logs


def test_a_backlog_goes_out_at_most_five_batches_per_request_so_a_resent_request_is_all_duplicates(md):
    import time

    md.broker.hold = True
    with Producer(md, linger_ms=0, batch_size_bytes=200, retry_backoff_ms=10) as p:
        futures = [p.send("t", b"%03d" % i + b"x" * 60) for i in range(40)]  # ~2 records per batch
        time.sleep(0.1)
        md.broker.lose_answers = 1  # the first backlog request lands, its answer is lost
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
        assert [f.result(5).offset for f in futures] == list(range(40))
    for req in md.broker.requests:
        if isinstance(req, pb.ProduceRequest):
            for part in req.partitions:
                assert len(list(rb.iter_batches(part.records))) <= 5
    values = [m.value[:3] for _, data in md.broker.logs[("t", 0)] for h, pos in rb.iter_batches(data)
              for m in rb.decode_batch(data, pos, h, "t", 0)]
    assert values == [b"%03d" % i for i in range(40)]  # every record once


def _partition(p: Producer, topic: str, partition: int):
    return p._topics[topic].accs[partition]


def _values(md: FakeMetadata, topic: str, partition: int) -> list[bytes]:
    return [m.value[:3] for _, data in md.broker.logs[(topic, partition)] for h, pos in rb.iter_batches(data)
            for m in rb.decode_batch(data, pos, h, topic, partition)]


def test_a_partition_sends_one_batch_at_a_time_until_its_first_is_acknowledged(md):
    md.broker.hold = True
    with Producer(md, linger_ms=0, batch_size_bytes=200) as p:
        futures = [p.send("t", b"%03d" % i + b"x" * 60) for i in range(20)]  # ~2 records per batch
        wait_until(lambda: len(md.broker.held) == 1)
        with p._lock:  # the sender would take nothing more now: the first batch is unanswered
            requests, _, _ = p.drain(p._monotonic())
            assert requests == []
            assert _partition(p, "t", 0).in_flight == 1
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
        assert [f.result(5).offset for f in futures] == list(range(20))
    assert _values(md, "t", 0) == [b"%03d" % i for i in range(20)]


def test_then_up_to_five_batches_of_a_partition_are_in_flight_one_per_request(md):
    with Producer(md, linger_ms=0, batch_size_bytes=200) as p:
        assert p.send("t", b"first").result(5).offset == 0
        md.broker.hold = True
        futures = [p.send("t", b"%03d" % i + b"x" * 60) for i in range(40)]
        wait_until(lambda: len(md.broker.held) == 5)
        with p._lock:
            assert p.drain(p._monotonic())[0] == []  # five: the most the brokers remember per producer
            assert _partition(p, "t", 0).in_flight == 5
        md.broker.hold = False
        md.broker.release()
        p.flush(5)
        assert [f.result(5).offset for f in futures] == list(range(1, 41))
    for req in md.broker.requests:
        if isinstance(req, pb.ProduceRequest):
            assert all(len(list(rb.iter_batches(part.records))) == 1 for part in req.partitions)
    assert _values(md, "t", 0) == [b"fir"] + [b"%03d" % i for i in range(40)]


def test_a_failed_batch_goes_again_before_the_batches_behind_it_which_were_refused_out_of_sequence(md):
    with Producer(md, linger_ms=0, batch_size_bytes=200, retry_backoff_ms=10) as p:
        assert p.send("t", b"first").result(5).offset == 0
        md.broker.hold = True
        futures = [p.send("t", b"%03d" % i + b"x" * 60) for i in range(40)]
        wait_until(lambda: len(md.broker.held) == 5)
        md.broker.errors[("t", 0)] = deque([pb.NOT_LEADER_OR_FOLLOWER])  # the first of the five: retriable
        md.broker.hold = False
        md.broker.release()  # the four behind it: OUT_OF_ORDER_SEQUENCE_NUMBER (a gap)
        p.flush(5)
        assert [f.result(5).offset for f in futures] == list(range(1, 41))
        assert p.identity is not None and p.identity.producer_id == 1001  # no reset: nothing failed for good
    assert _values(md, "t", 0) == [b"fir"] + [b"%03d" % i for i in range(40)]  # every record once, in order


def test_an_out_of_sequence_refusal_with_nothing_unanswered_before_it_is_final(md):
    with Producer(md, linger_ms=0, batch_size_bytes=200, retry_backoff_ms=10) as p:
        assert p.send("t", b"first").result(5).offset == 0
        state = md.broker.producers[("t", 0)]
        state.record(1001, 0, 5, 1, 1, 1, 0)  # the broker holds sequence 5: the producer's next (1) is a gap
        f = p.send("t", b"gap")
        with pytest.raises(OutOfOrderSequenceNumberError):
            f.result(5)
