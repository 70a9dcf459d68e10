"""Re-routing a batch refused because its topic grew (client/producer/reroute.py): the pure planning
and ordering, the futures that follow their records, and a Producer over the in-memory fake broker
(tests/unit/test_client_fakes.py, which refuses misplaced keys as a grown topic's leader does)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

from logbroker.client.producer import Producer
from logbroker.client.producer.batch import PLACED_BY_ANY, PartitionBatches, ProducerBatch, TopicState
from logbroker.client.producer.future import (
    FutureRecordMetadata,
    FutureRecordsMetadata,
    _BatchResult,
    forward,
)
from logbroker.client.producer.idempotence import ProducerIdentity
from logbroker.client.producer.reroute import FAILED, explained, is_pinned, runs, split_queue, target
from logbroker.cluster.hashing import partition_for_key
from logbroker.errors import PartitionCountChangedError
from logbroker.retry import RetryPolicy
from logbroker.storage import record_batch as rb
from logbroker.storage.record_batch import BatchBuilder
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_client_fakes import FakeMetadata

pytestmark = pytest.mark.timeout(60)

KEYS = [f"k{i}".encode() for i in range(2000)]
MOVED = [k for k in KEYS if partition_for_key(k, 2) == 0 and partition_for_key(k, 3) == 2]  # 0 -> 2
STAYED = [k for k in KEYS if partition_for_key(k, 2) == 0 and partition_for_key(k, 3) == 0]


@dataclass
class FakeBatch:
    name: str
    sequenced: bool
    order: int = 0


# -- the pure parts ----------------------------------------------------------------------------

def test_the_refused_batches_and_everything_after_them_move_in_their_original_order():
    before = FakeBatch("retry-of-an-earlier-batch", True, 1)
    b2, b3, b4 = FakeBatch("b2", True, 2), FakeBatch("b3", True, 3), FakeBatch("b4", True, 4)
    unsent = FakeBatch("unsent", False)
    # b2 refused (PARTITION_COUNT_CHANGED), b4 refused behind it, b3 came back first and was requeued
    kept, moving = split_queue([b2, b4], [before, b3, unsent])
    assert kept == [before]  # stays ahead: it goes first, as it is
    assert moving == [b2, b3, b4, unsent]


def test_a_plain_producers_refused_batches_move_with_the_queue_behind_them():
    r1, r2, q1, q2 = (FakeBatch(n, False) for n in ("r1", "r2", "q1", "q2"))
    assert split_queue([r1, r2], [q1, q2]) == ([], [r1, r2, q1, q2])


def test_each_record_goes_where_its_key_hashes_now_unless_the_user_chose_its_partition():
    moved, stayed = MOVED[0], STAYED[0]
    assert target(moved, False, False, 0, 3) == 2
    assert target(stayed, False, False, 0, 3) == 0
    assert target(None, False, False, 0, 3) == 0  # no key: back where it was
    assert target(moved, True, False, 0, 3) == FAILED  # the user's partition, its key moved: it fails
    assert target(stayed, True, False, 0, 3) == 0
    assert target(None, True, False, 0, 3) == 0
    assert target(stayed, False, True, 0, 3) == FAILED  # re-routed before and refused again


def test_runs_group_consecutive_records_of_one_target_in_order():
    assert runs([]) == []
    assert runs([2, 2, 0, 2, FAILED, FAILED]) == [(2, 0, 2), (0, 2, 3), (2, 3, 4), (FAILED, 4, 6)]


def test_a_refusal_is_explained_when_the_known_count_puts_a_key_elsewhere():
    assert explained([STAYED[0], MOVED[0]], 0, 3)
    assert not explained([STAYED[0], None], 0, 3)
    assert not explained([MOVED[0]], 0, 2)  # the producer still has the old count: it refreshes


def test_pinned_ranges():
    assert not is_pinned(None, 0)
    assert is_pinned([(2, 3)], 4) and not is_pinned([(2, 3)], 5) and not is_pinned([(2, 3)], 1)


def test_a_topics_new_partitions_wait_for_the_batches_opened_before_it_grew():
    ts = TopicState("t", 2)
    old = ProducerBatch(ts.accs[0], BatchBuilder(0), 0.0, 10.0)
    ts.accs[0].open = old
    ts.grow(3)
    assert ts.held(2) and not ts.held(1)
    new = ProducerBatch(ts.accs[2], BatchBuilder(0), 0.0, 10.0)
    ts.retired(new)
    assert ts.held(2)
    ts.retired(old)
    assert not ts.held(2)


def test_a_partition_takes_back_the_sequences_of_its_refused_batches():
    ident = ProducerIdentity(lambda req, t: pb.InitProducerIdResponse(producer_id=7, producer_epoch=0), "",
                             RetryPolicy(), 1.0)
    ident.sequenced("t", 0, 5)  # 0..4, accepted
    assert ident.sequenced("t", 0, 3) == (7, 0, 5)  # refused
    assert ident.sequenced("t", 0, 2) == (7, 0, 8)  # refused out of sequence behind it
    assert ident.take_back("t", 0, [(7, 5, 3), (7, 8, 2)])
    assert ident.sequenced("t", 0, 1) == (7, 0, 5)
    assert not ident.take_back("t", 0, [(7, 5, 3)])  # not its last sequences: a new id
    assert ident.producer_id == -1


# -- futures follow their records --------------------------------------------------------------

def test_a_moved_records_future_resolves_where_it_landed_once_every_record_of_its_batch_has():
    old, to2, to0 = _BatchResult("t", 0), _BatchResult("t", 2), _BatchResult("t", 0)
    f0, f1 = FutureRecordMetadata(old, 0, 5), FutureRecordMetadata(old, 1, 5)
    many = FutureRecordsMetadata("t", [(old, 0, 2)], None, 5, 2)
    called: list[object] = []
    f1.add_done_callback(called.append)
    forward(old, [(to2, 3), (to0, 0)])
    to2.complete(100, -1, None)
    assert not f0.done() and not called  # its batch's other record is not done yet
    to0.complete(40, -1, None)
    assert f0.result(0) == ("t", 2, 103, 5) and f1.result(0) == ("t", 0, 40, 5)
    assert called == [f1]
    assert [(m.partition, m.offset) for m in many.result(0)] == [(2, 103), (0, 40)]


def test_a_record_that_failed_while_moving_fails_its_future_only():
    old, ok, bad = _BatchResult("t", 0), _BatchResult("t", 2), _BatchResult("t", 0)
    bad.complete(-1, -1, PartitionCountChangedError("pinned"))
    many = FutureRecordsMetadata("t", [(old, 0, 2)], [1, 0], 5, 2)
    forward(old, [(ok, 0), (bad, 0)])
    ok.complete(7, -1, None)
    assert FutureRecordMetadata(old, 0, 5).result(0).offset == 7
    assert isinstance(FutureRecordMetadata(old, 1, 5).exception(0), PartitionCountChangedError)
    assert isinstance(many.exception(0), PartitionCountChangedError)


# -- a producer over the fake broker -----------------------------------------------------------

def _pump(md: FakeMetadata, futures: list, timeout_s: float = 20.0) -> None:
    """Answer the held requests (in the order they came) until every future is done."""
    deadline = time.monotonic() + timeout_s
    while not all(f.done() for f in futures):
        assert time.monotonic() < deadline, "futures not done"
        md.broker.release()
        time.sleep(0.002)


def _log(md: FakeMetadata, topic: str) -> dict[tuple[int, int], rb.Message]:
    """(partition, offset) -> record, for every partition of the fake broker's logs."""
    out = {}
    for (t, p), batches in md.broker.logs.items():
        if t == topic:
            for _, data in batches:
                for h, pos in rb.iter_batches(data):
                    for m in rb.decode_batch(data, pos, h, t, p):
                        out[(p, m.offset)] = m
    return out


@pytest.mark.parametrize("idempotent", [True, False], ids=["idempotent", "plain"])
def test_batches_refused_for_moved_keys_are_re_routed_in_per_key_order(idempotent: bool):
    md = FakeMetadata({"g": 2})
    keys = MOVED[:3] + STAYED[:3] + [k for k in KEYS if partition_for_key(k, 2) == 1][:3]
    sent: list[tuple[bytes, bytes, object]] = []
    with Producer(md, linger_ms=0, batch_size_bytes=200, enable_idempotence=idempotent, retry_backoff_ms=5) as p:
        for k in keys:  # acknowledged before the growth: the partitions know the producer id
            sent.append((k, b"-1", p.send("g", b"-1", key=k)))
        p.flush(10)
        md.broker.hold = True
        for i in range(12):  # many small batches per partition, held: in flight, then queued
            for k in keys:
                sent.append((k, b"%d" % i, p.send("g", b"%d" % i, key=k)))
        md.topic_partitions["g"] = 3
        md.broker.grown["g"] = 3
        for i in range(12, 16):  # sent while the first answers come
            if i == 13:
                md.broker.release()
            for k in keys:
                sent.append((k, b"%d" % i, p.send("g", b"%d" % i, key=k)))
        _pump(md, [f for _, _, f in sent])
    log = _log(md, "g")
    for k, value, fut in sent:  # every future names where its record is
        meta = fut.result(0)  # type: ignore[attr-defined]
        assert meta.partition == partition_for_key(k, 3 if value not in (b"-1",) else 2)
        assert (log[(meta.partition, meta.offset)].key, log[(meta.partition, meta.offset)].value) == (k, value)
    assert len(log) == len(sent)  # nothing twice
    for k in keys:  # per key: the old partition's records, then the new one's, in the order sent
        got = [m.value for (p, o), m in sorted(log.items(), key=lambda e: (e[0][0] != partition_for_key(k, 2), e[0]))
               if m.key == k]
        assert got == [b"-1"] + [b"%d" % i for i in range(16)], k


def test_a_record_sent_to_a_partition_the_user_chose_fails_when_its_key_moved():
    md = FakeMetadata({"g": 2})
    with Producer(md, linger_ms=0, enable_idempotence=False) as p:
        md.broker.hold = True
        pinned = p.send("g", b"pinned", key=MOVED[0], partition=0)
        keyed = p.send("g", b"keyed", key=MOVED[1])
        stays = p.send("g", b"stays", key=STAYED[0], partition=0)
        many = p.send_many("g", [b"a", b"b"], [MOVED[2], STAYED[1]])
        md.topic_partitions["g"] = 3
        md.broker.grown["g"] = 3
        _pump(md, [pinned, keyed, stays, many])
    assert isinstance(pinned.exception(0), PartitionCountChangedError)
    assert keyed.result(0).partition == 2 and stays.result(0).partition == 0
    assert [m.partition for m in many.result(0)] == [2, 0]


def test_a_record_refused_again_after_its_re_route_fails():
    md = FakeMetadata({"g": 2})
    with Producer(md, linger_ms=0, enable_idempotence=False) as p:
        md.broker.hold = True
        fut = p.send("g", b"v", key=MOVED[0])
        md.topic_partitions["g"] = 3
        md.broker.grown["g"] = 3
        md.broker.release()
        # re-routed to partition 2, which the broker (it grew again) refuses too
        md.broker.grown["g"] = 1000 if partition_for_key(MOVED[0], 1000) != 2 else 1001
        _pump(md, [fut])
    assert isinstance(fut.exception(0), PartitionCountChangedError)


def test_a_partition_batches_idle_only_without_batches_to_re_route():
    acc = PartitionBatches("t", 0)
    assert acc.idle()
    acc.reroute = []
    assert not acc.idle()


def test_records_sent_after_the_producer_learnt_of_the_growth_wait_for_the_refused_ones_before_them():
    md = FakeMetadata({"g": 2})
    key = MOVED[0]
    with Producer(md, linger_ms=0, enable_idempotence=False) as p:
        md.broker.hold = True
        before = [p.send("g", b"%d" % i, key=key) for i in range(3)]  # to partition 0, held
        md.topic_partitions["g"] = 3
        md.broker.grown["g"] = 3
        md.refresh(["g"])  # its metadata shows the growth before the refusal comes (a periodic refresh)
        with p._lock:
            p._topics["g"].grow(3)
        after = [p.send("g", b"%d" % i, key=key) for i in range(3, 6)]  # straight to partition 2: held
        assert {f._result.partition for f in after} == {2}
        assert all(r.partitions[0].partition == 0 for _, r in md.broker.held)
        _pump(md, before + after)
    assert [f.result(0).partition for f in before + after] == [2] * 6
    log = _log(md, "g")
    assert [m.value for (part, _), m in sorted(log.items()) if m.key == key] == [b"%d" % i for i in range(6)]


def test_each_batch_declares_the_partition_count_its_keys_were_placed_by():
    """keys_placed_by_partitions: the count hashed over for keyed records (send, send_many); 0 for a
    keyed record whose partition the user chose (and for send_records' copies); the largest value
    when no record has a key. A grown topic's broker decodes keys only below its count."""
    md = FakeMetadata({"d": 4})
    with Producer(md, linger_ms=0, enable_idempotence=False) as p:
        for call in (lambda: p.send("d", b"v", key=b"k1"), lambda: p.send_many("d", [b"a", b"b"], [b"k2", b"k3"]),
                     lambda: p.send("d", b"v", key=b"k4", partition=1), lambda: p.send("d", b"v"),
                     lambda: p.send_records("d", 2, [(1, b"k5", b"v", [])])):
            call().result(10)  # one at a time: each in batches of its own
    declared = {(pp.partition, pp.keys_placed_by_partitions) for r in md.broker.requests
                if isinstance(r, pb.ProduceRequest) for pp in r.partitions}
    placed = {(partition_for_key(k, 4), 4) for k in (b"k1", b"k2", b"k3")}
    assert placed <= declared
    assert (1, 0) in declared and (2, 0) in declared
    assert any(n == PLACED_BY_ANY for _, n in declared)  # the null-key record's batch
    assert all(n in (0, 4, PLACED_BY_ANY) for _, n in declared)
