"""The queue (share group) client without a broker: pending acknowledgements, reading a
ShareFetchPartition, and QueueConsumer's calls against a scripted in-memory coordinator."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import grpc
import pytest

from logbroker import wire
from logbroker.client.circuit import Circuits, State
from logbroker.client.coordinator import CoordinatorClient
from logbroker.client.queue.acks import (
    ACCEPT,
    GAP,
    REJECT,
    RELEASE,
    RENEW,
    Ack,
    AckBufferFullError,
    PendingAcks,
    ShareAck,
    outcomes,
    to_proto,
)
from logbroker.client.queue.message import MessageAlreadySettledError
from logbroker.client.queue.queue_consumer import QueueConsumer, share_settings
from logbroker.client.queue.share_fetch import read_partition
from logbroker.clock import ManualClock
from logbroker.errors import InvalidGroupIdError, InvalidRecordStateError, PermissionDeniedError
from logbroker.storage import record_batch as rb
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_client_fakes import FakeMetadata, FakeRpcError

# -- acks.py -------------------------------------------------------------------------------------


def test_pending_acks_coalesce_runs_of_one_kind():
    acks = PendingAcks()
    for o in (5, 6, 9, 8):
        acks.add("t", 0, o, Ack(ACCEPT))
    acks.add("t", 0, 7, Ack(RELEASE))
    acks.add("t", 0, 10, Ack(RELEASE, 500))
    acks.add("t", 0, 11, Ack(REJECT, 0, "bad"))
    acks.add("t", 0, 12, Ack(REJECT, 0, "bad"))
    acks.add("t", 1, 0, Ack(ACCEPT))
    runs = acks.take()
    assert [(r.partition, r.first_offset, r.last_offset, r.ack) for r in runs] == [
        (0, 5, 6, Ack(ACCEPT)), (0, 7, 7, Ack(RELEASE)), (0, 8, 9, Ack(ACCEPT)), (0, 10, 10, Ack(RELEASE, 500)),
        (0, 11, 12, Ack(REJECT, 0, "bad")), (1, 0, 0, Ack(ACCEPT)),
    ]
    assert len(acks) == 0 and acks.take() == []
    proto = to_proto(runs)
    assert [(a.topic, a.partition, len(a.ranges)) for a in proto] == [("t", 0, 5), ("t", 1, 1)]
    assert proto[0].ranges[4].reason == "bad" and proto[0].ranges[3].delay_ms == 500


def test_pending_acks_are_bounded_and_refuse_a_second_settle_and_bad_input():
    acks = PendingAcks(max_offsets=2)
    acks.add("t", 0, 1, Ack(ACCEPT))
    with pytest.raises(ValueError, match="already settled"):
        acks.add("t", 0, 1, Ack(REJECT))
    acks.add("t", 0, 2, Ack(ACCEPT))
    assert acks.full
    with pytest.raises(AckBufferFullError):
        acks.add("t", 0, 3, Ack(ACCEPT))
    for bad in (Ack(9), Ack(RELEASE, -1), Ack(REJECT, 0, "x" * 1025)):
        with pytest.raises(ValueError):
            PendingAcks().add("t", 0, 0, bad)
    with pytest.raises(ValueError):
        PendingAcks().add("t", 0, -1, Ack(ACCEPT))


def test_put_back_keeps_an_offset_settled_again_meanwhile():
    acks = PendingAcks()
    acks.add("t", 0, 1, Ack(ACCEPT))
    acks.add("t", 0, 2, Ack(ACCEPT))
    runs = acks.take()
    acks.add("t", 0, 2, Ack(REJECT))  # cannot happen for one message, but the newer one wins
    acks.put_back(runs)
    assert [(r.first_offset, r.last_offset, r.ack.type) for r in acks.take()] == [(1, 1, ACCEPT), (2, 2, REJECT)]


def test_outcomes_map_range_results_to_offsets():
    runs = [ShareAck("t", 0, 1, 2, Ack(ACCEPT)), ShareAck("t", 0, 3, 3, Ack(RELEASE)), ShareAck("t", 1, 0, 0, Ack(GAP))]
    results = [pb.ShareAckResult(topic="t", partition=0, first_offset=1, last_offset=2),
               pb.ShareAckResult(topic="t", partition=0, first_offset=3, last_offset=3,
                                 error_code=pb.INVALID_RECORD_STATE, error_message="not held")]
    out = outcomes(runs, results)
    assert out[("t", 0, 1)] is None and out[("t", 0, 2)] is None
    assert isinstance(out[("t", 0, 3)], InvalidRecordStateError)
    assert out[("t", 1, 0)] is not None  # no result: not accepted


# -- share_fetch.py ------------------------------------------------------------------------------


def _batch(base: int, offsets: list[int]) -> bytes:
    """A RecordBatch v2 at `base` holding records at exactly `offsets` (missing ones: compacted away)."""
    body = bytearray()
    for o in offsets:
        key, value = f"k{o}".encode(), f"v{o}".encode()
        rec = (b"\x00" + rb.encode_varint(o) + rb.encode_varint(o - base) + rb.encode_varint(len(key)) + key
               + rb.encode_varint(len(value)) + value + rb.encode_varint(1) + rb.encode_varint(1) + b"h"
               + rb.encode_varint(1) + b"1")
        body += rb.encode_varint(len(rec)) + rec
    last_delta = max(offsets) - base
    header = bytearray(rb.HEADER.pack(base, rb.HEADER_SIZE - rb.LOG_OVERHEAD + len(body), 0, rb.MAGIC, 0, 0,
                                      last_delta, 0, max(offsets), -1, -1, -1, len(offsets)))
    out = header + body
    out[17:21] = rb.crc32c(memoryview(out)[rb.CRC_START:]).to_bytes(4, "big")
    return bytes(out)


def _part(records: bytes, *acquired: tuple[int, int, int]) -> pb.ShareFetchPartition:
    return pb.ShareFetchPartition(topic="t", partition=0, records=records,
                                  acquired=[pb.AcquiredRange(first_offset=f, last_offset=last, delivery_count=c)
                                            for f, last, c in acquired])


def test_read_partition_keeps_acquired_offsets_with_their_delivery_counts():
    data = _batch(0, [0, 1, 2, 3]) + _batch(4, [4, 5, 6])
    read = read_partition(_part(data, (1, 2, 1), (5, 6, 3)))
    assert [(a.record.offset, a.record.value, a.delivery_count) for a in read.acquired] == [
        (1, b"v1", 1), (2, b"v2", 1), (5, b"v5", 3), (6, b"v6", 3)]
    assert read.acks == [] and read.error is None
    assert read.acquired[0].record.headers == (("h", b"1"),)


def test_read_partition_gaps_offsets_without_a_record_and_releases_a_cut_short_tail():
    data = _batch(0, [0, 3]) + _batch(5, [5, 7])  # 1, 2, 4 (between batches) and 6 compacted away
    cut = _batch(8, [8, 9])[:-3]  # a partial batch at the end: offsets 8.. unknown
    read = read_partition(_part(data + cut, (0, 9, 2)))
    assert [a.record.offset for a in read.acquired] == [0, 3, 5, 7]
    assert [(r.first_offset, r.last_offset, r.ack.type) for r in read.acks] == [
        (1, 2, GAP), (4, 4, GAP), (6, 6, GAP), (8, 9, RELEASE)]


def test_read_partition_empty_records_gap_everything_and_a_corrupt_batch_is_released():
    assert [(r.first_offset, r.last_offset, r.ack.type) for r in read_partition(_part(b"", (3, 4, 1))).acks] == [
        (3, 4, GAP)]
    bad = bytearray(_batch(0, [0, 1]))
    bad[-1] ^= 0xFF
    read = read_partition(_part(bytes(bad) + _batch(2, [2]), (0, 2, 1)))
    assert [a.record.offset for a in read.acquired] == [2]
    assert [(r.first_offset, r.last_offset, r.ack.type) for r in read.acks] == [(0, 1, RELEASE)]
    assert read.error is not None


# -- queue_consumer.py ---------------------------------------------------------------------------


class FakeShareCoordinator:
    """Answers FindCoordinator (itself), ShareFetch and ShareAcknowledge from scripts; records requests."""

    def __init__(self, broker: Any = None) -> None:
        self.broker = broker
        self.admin_calls: list[tuple[str, Any]] = []
        self.admin_answers: dict[str, Any] = {}
        self.fetches: list[pb.ShareFetchRequest] = []
        self.acks: list[pb.ShareAcknowledgeRequest] = []
        self.fetch_script: deque[pb.ShareFetchResponse | BaseException] = deque()
        self.ack_script: deque[pb.ShareAcknowledgeResponse | BaseException] = deque()
        self.epoch = 0

    def FindCoordinator(self, request: Any, timeout: float | None = None) -> pb.FindCoordinatorResponse:
        return pb.FindCoordinatorResponse(broker_id=0, host="broker0", port=9092)

    def ShareFetch(self, request: pb.ShareFetchRequest, timeout: float | None = None) -> pb.ShareFetchResponse:
        self.fetches.append(request)
        if self.fetch_script:
            answer = self.fetch_script.popleft()
            if isinstance(answer, BaseException):  # a whole-call failure (FakeRpcError)
                raise answer
            return answer
        self.epoch += 1
        return pb.ShareFetchResponse(member_epoch=self.epoch, lock_ms=30_000,
                                     ack_results=_accept_all(request.acknowledgements))

    def __getattr__(self, name: str) -> Any:
        if name in ("AlterShareGroup", "DescribeShareGroup", "PurgeShareGroup", "ListShareGroups"):
            def answer(request: Any, timeout: float | None = None) -> Any:
                self.admin_calls.append((name, request))
                return self.admin_answers[name]
            return answer
        return getattr(self.__dict__["broker"], name)  # Produce, ... : the FakeBroker

    def ShareAcknowledge(self, request: pb.ShareAcknowledgeRequest,
                         timeout: float | None = None) -> pb.ShareAcknowledgeResponse:
        self.acks.append(request)
        if self.ack_script:
            answer = self.ack_script.popleft()
            if isinstance(answer, BaseException):
                raise answer
            return answer
        return pb.ShareAcknowledgeResponse(results=_accept_all(request.acknowledgements))


def _accept_all(acks: Any) -> list[pb.ShareAckResult]:
    return [pb.ShareAckResult(topic=a.topic, partition=a.partition, first_offset=r.first_offset,
                              last_offset=r.last_offset) for a in acks for r in a.ranges]


class ShareMetadata(FakeMetadata):
    """FakeMetadata whose broker (and admin) stub is a FakeShareCoordinator in front of the FakeBroker."""

    def __init__(self, topics: dict[str, int] | None = None) -> None:
        super().__init__(topics or {"t": 2})
        self.coordinator = FakeShareCoordinator(self.broker)

    def broker_stub(self, address: str) -> Any:
        return self.coordinator

    def admin_stub(self, address: str) -> Any:
        return self.coordinator


def _records(epoch: int, *acquired: tuple[int, int, int], data: bytes | None = None) -> pb.ShareFetchResponse:
    first = min(a[0] for a in acquired)
    last = max(a[1] for a in acquired)
    data = data if data is not None else _batch(first, list(range(first, last + 1)))
    return pb.ShareFetchResponse(member_epoch=epoch, lock_ms=30_000, partitions=[_part(data, *acquired)])


@pytest.fixture
def md() -> ShareMetadata:
    return ShareMetadata()


def test_first_poll_joins_with_epoch_0_topics_and_settings_then_uses_the_answered_epoch(md):
    c = QueueConsumer(md, "g", ["t"], lock_ms=5000, max_delivery_attempts=3, dead_letter_topic="",
                      auto_offset_reset="earliest", max_poll_records=7)
    md.coordinator.fetch_script.append(_records(4, (0, 1, 1)))
    msgs = c.poll(100)
    assert [(m.offset, m.value, m.delivery_count) for m in msgs] == [(0, b"v0", 1), (1, b"v1", 1)]
    join = md.coordinator.fetches[0]
    assert (join.member_epoch, list(join.topics), join.max_records, join.max_wait_ms) == (0, ["t"], 7, 100)
    assert len(join.member_id) == 32
    assert join.settings.lock_ms == 5000 and join.settings.max_delivery_attempts == 3
    assert join.settings.HasField("dead_letter_topic") and join.settings.dead_letter_topic == ""
    assert join.settings.auto_offset_reset == "earliest" and not join.settings.HasField("retry_backoff_ms")
    msgs[0].ack()
    msgs[1].reject("poison")
    c.poll(0)
    second = md.coordinator.fetches[1]
    assert second.member_epoch == 4 and not second.topics and not second.HasField("settings")
    assert second.member_id == join.member_id
    assert [(r.first_offset, r.last_offset, r.type, r.reason) for r in second.acknowledgements[0].ranges] == [
        (0, 0, ACCEPT, ""), (1, 1, REJECT, "poison")]


def test_a_message_settles_once(md):
    c = QueueConsumer(md, "g", ["t"])
    md.coordinator.fetch_script.append(_records(1, (0, 0, 2)))
    (m,) = c.poll(0)
    m.release(delay_ms=250)
    for settle in (m.ack, m.release, lambda: m.reject("x")):
        with pytest.raises(MessageAlreadySettledError):
            settle()
    assert c.commit_acks() == {("t", 0, 0): None}
    assert md.coordinator.acks[0].acknowledgements[0].ranges[0].delay_ms == 250


def test_gap_acks_ride_on_the_next_fetch(md):
    c = QueueConsumer(md, "g", ["t"])
    md.coordinator.fetch_script.append(_records(1, (0, 3, 1), data=_batch(0, [0, 3])))
    assert [m.offset for m in c.poll(0)] == [0, 3]
    c.poll(0)
    assert [(r.first_offset, r.last_offset, r.type) for r in md.coordinator.fetches[1].acknowledgements[0].ranges] == [
        (1, 2, GAP)]


def test_fenced_member_rejoins_with_epoch_0_and_drops_what_it_held(md):
    c = QueueConsumer(md, "g", ["t"])
    md.coordinator.fetch_script.append(_records(3, (0, 1, 1)))
    held = c.poll(0)
    held[0].ack()
    md.coordinator.fetch_script.append(pb.ShareFetchResponse(error_code=pb.FENCED_MEMBER_EPOCH))
    assert c.poll(0) == []
    assert c.member_epoch == 0
    held[1].ack()  # handed out before the fence: accepted locally, never sent
    c.poll(0)
    rejoin = md.coordinator.fetches[-1]
    assert rejoin.member_epoch == 0 and list(rejoin.topics) == ["t"] and not rejoin.acknowledgements


def test_commit_acks_reports_what_the_broker_refused(md):
    c = QueueConsumer(md, "g", ["t"])
    md.coordinator.fetch_script.append(_records(1, (0, 1, 1)))
    a, b = c.poll(0)
    a.ack()
    b.ack()
    md.coordinator.ack_script.append(pb.ShareAcknowledgeResponse(results=[
        pb.ShareAckResult(topic="t", partition=0, first_offset=0, last_offset=1, error_code=pb.INVALID_RECORD_STATE)]))
    out = c.commit_acks()
    assert set(out) == {("t", 0, 0), ("t", 0, 1)}
    assert all(isinstance(e, InvalidRecordStateError) for e in out.values())
    assert c.commit_acks() == {}


def test_extend_lock_sends_renew_at_once(md):
    c = QueueConsumer(md, "g", ["t"])
    md.coordinator.fetch_script.append(_records(1, (0, 0, 1)))
    (m,) = c.poll(0)
    assert c.extend_lock(m, 60_000) is True
    r = md.coordinator.acks[0].acknowledgements[0].ranges[0]
    assert (r.first_offset, r.type, r.delay_ms) == (0, RENEW, 60_000)
    md.coordinator.ack_script.append(pb.ShareAcknowledgeResponse(results=[pb.ShareAckResult(
        topic="t", partition=0, first_offset=0, last_offset=0, error_code=pb.INVALID_RECORD_STATE)]))
    assert c.extend_lock(m, 1000) is False
    m.ack()
    assert c.extend_lock(m, 1000) is False  # settled: nothing sent
    assert len(md.coordinator.acks) == 2


def test_not_coordinator_is_retried_and_other_errors_raise_keeping_the_acks(md):
    c = QueueConsumer(md, "g", ["t"], client_retry_backoff_ms=1)
    md.coordinator.fetch_script.extend([pb.ShareFetchResponse(error_code=pb.NOT_COORDINATOR),
                                        pb.ShareFetchResponse(error_code=pb.COORDINATOR_LOAD_IN_PROGRESS),
                                        _records(1, (0, 0, 1))])
    (m,) = c.poll(2000)
    assert len(md.coordinator.fetches) == 3
    m.ack()
    md.coordinator.fetch_script.append(pb.ShareFetchResponse(error_code=pb.INVALID_GROUP_ID))
    with pytest.raises(InvalidGroupIdError):
        c.poll(0)
    c.poll(0)
    assert [r.first_offset for r in md.coordinator.fetches[-1].acknowledgements[0].ranges] == [0]


def test_a_coordinator_that_keeps_failing_gets_its_circuit_opened_and_nothing_until_the_probe(md, caplog):
    caplog.set_level(logging.INFO, logger="logbroker.client.circuit")
    clock = ManualClock()
    md.circuits = Circuits(failures_max=2, cool_down_ms=5_000, clock=clock)
    c = QueueConsumer(md, "g", ["t"], client_retry_backoff_ms=1)
    busy = FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, wire.with_retry_after("busy", 1))
    md.coordinator.fetch_script.extend([busy, busy, _records(1, (0, 0, 1))])
    started = time.monotonic()
    assert c.poll(300) == []  # two refusals open the circuit: the rest of the timeout is waited out
    assert time.monotonic() - started >= 0.25
    assert len(md.coordinator.fetches) == 2 and md.circuits.state("broker0:9092") is State.OPEN
    assert c.poll(0) == [] and c.commit_acks() == {}
    assert len(md.coordinator.fetches) == 2  # nothing during the cool-down
    clock.advance(5_000)
    (m,) = c.poll(1000)  # the probe, answered
    assert len(md.coordinator.fetches) == 3 and md.circuits.state("broker0:9092") is State.CLOSED
    m.ack()
    md.coordinator.ack_script.append(FakeRpcError(grpc.StatusCode.PERMISSION_DENIED, "no"))
    md.circuits.failed("broker0:9092", "x")
    with pytest.raises(PermissionDeniedError):
        c.commit_acks()  # a final refusal is an answer (the broker is up): the count starts again
    md.circuits.failed("broker0:9092", "x")
    assert md.circuits.state("broker0:9092") is State.CLOSED
    lines = [r.getMessage() for r in caplog.records if r.name == "logbroker.client.circuit"]
    assert len(lines) == 2 and "broker0:9092 opened after 2 consecutive failures" in lines[0] and "busy" in lines[0]
    assert "closed" in lines[1]


def test_find_coordinator_moves_past_an_overloaded_broker_and_opens_its_circuit(md, monkeypatch):
    md.fakes["broker1:9092"] = md.broker
    md.refresh()
    monkeypatch.setattr("logbroker.client.metadata_cache.random.shuffle", lambda brokers: brokers.reverse())
    asked: list[str] = []

    class Busy:
        def FindCoordinator(self, request: Any, timeout: float | None = None) -> Any:
            asked.append("broker1")
            raise FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, wire.with_retry_after("busy", 1))

    monkeypatch.setattr(md, "broker_stub", lambda address: Busy() if address == "broker1:9092" else md.coordinator)
    md.circuits = Circuits(failures_max=1, cool_down_ms=60_000)
    coordinator = CoordinatorClient(md, "g", 1.0, 0.001)
    for _ in range(3):
        assert coordinator.address(time.monotonic() + 1) == "broker0:9092"
        coordinator.invalidate()
    assert asked == ["broker1"]  # asked first once (the shuffle), then last: its circuit is open
    assert md.circuits.state("broker1:9092") is State.OPEN


def test_close_commits_then_leaves_with_epoch_minus_1(md):
    c = QueueConsumer(md, "g", ["t"])
    md.coordinator.fetch_script.append(_records(2, (0, 0, 1)))
    (m,) = c.poll(0)
    m.ack()
    c.close()
    assert [r.first_offset for r in md.coordinator.acks[0].acknowledgements[0].ranges] == [0]
    assert md.coordinator.fetches[-1].member_epoch == -1
    with pytest.raises(Exception, match="closed"):
        c.poll(0)


def test_settling_from_many_threads(md):
    c = QueueConsumer(md, "g", ["t"])
    md.coordinator.fetch_script.append(_records(1, (0, 199, 1)))
    msgs = c.poll(0)
    threads = [threading.Thread(target=lambda part=msgs[i::4]: [m.ack() for m in part]) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = c.commit_acks()
    assert len(out) == 200 and all(e is None for e in out.values())
    assert len(md.coordinator.acks[0].acknowledgements[0].ranges) == 1


def test_bad_settings_raise():
    with pytest.raises(ValueError):
        share_settings(lock_ms=0)
    with pytest.raises(ValueError):
        share_settings(retry_backoff_ms=500, retry_backoff_max_ms=100)
    with pytest.raises(ValueError):
        share_settings(auto_offset_reset="middle")
    with pytest.raises(ValueError):
        share_settings(ordering="fifo")
    assert share_settings(ordering="key").ordering == "key" and not share_settings().HasField("ordering")
    with pytest.raises(TypeError):
        share_settings(max_delivery_attempts=True)


def test_importable_from_the_package():
    from logbroker import QueueConsumer as Exported
    from logbroker import QueueMessage  # noqa: F401

    assert Exported is QueueConsumer


# -- Admin: share groups and redrive -----------------------------------------------------------------


def test_admin_share_group_calls(md):
    from logbroker.client.admin import Admin
    from logbroker.errors import GroupIdNotFoundError

    c = md.coordinator
    c.admin_answers["AlterShareGroup"] = pb.AlterShareGroupResponse()
    c.admin_answers["PurgeShareGroup"] = pb.PurgeShareGroupResponse(purged=42)
    c.admin_answers["ListShareGroups"] = pb.ListShareGroupsResponse(groups=[pb.GroupListing(group="q", members=2)])
    c.admin_answers["DescribeShareGroup"] = pb.DescribeShareGroupResponse(
        group="q", coordinator_id=0, settings=pb.ShareGroupSettings(lock_ms=5000, dead_letter_topic=""),
        members=[pb.ShareMemberDescription(member_id="m", member_epoch=3, topics=["t"], acquired=4)],
        partitions=[pb.SharePartitionDescription(topic="t", partition=1, start_offset=10, in_flight=5, delayed=1)])
    admin = Admin(md)
    admin.alter_share_group("q", lock_ms=5000, max_delivery_attempts=3)
    name, req = c.admin_calls[-1]
    assert name == "AlterShareGroup" and req.settings.lock_ms == 5000 and not req.settings.HasField("retry_backoff_ms")
    with pytest.raises(TypeError):
        admin.alter_share_group("q", lock_millis=1)
    with pytest.raises(ValueError):
        admin.alter_share_group("q", lock_ms=0)
    assert admin.purge_share_group("q", topics=["t"]) == 42
    assert list(c.admin_calls[-1][1].topics) == ["t"]
    assert [(g.group, g.members) for g in admin.list_share_groups()] == [("q", 2)]
    d = admin.describe_share_group("q")
    assert d["settings"] == {"lock_ms": 5000, "dead_letter_topic": ""}
    assert d["members"] == [{"member_id": "m", "member_epoch": 3, "topics": ["t"], "acquired": 4}]
    assert d["partitions"][0]["start_offset"] == 10 and d["partitions"][0]["delayed"] == 1
    c.admin_answers["DescribeShareGroup"] = pb.DescribeShareGroupResponse(error_code=pb.GROUP_ID_NOT_FOUND)
    with pytest.raises(GroupIdNotFoundError):
        admin.describe_share_group("nope")


def _dead_letters() -> bytes:
    from logbroker.group import share_headers as sh

    dlq = [(sh.DLQ_TOPIC, b"t"), (sh.DLQ_PARTITION, b"0"), (sh.DLQ_REASON, b"rejected"), ("app", b"x")]
    return rb.encode_batch([(1, b"k0", b"v0", dlq), (1, b"k1", b"v1", [("app", b"y")]), (1, None, b"v2", dlq)])


def test_redrive_copies_dead_letters_back_and_acks_only_after_the_copy():
    from logbroker.client.admin import Admin

    md = ShareMetadata({"t": 1, "t.dlq": 1})
    c = md.coordinator
    c.fetch_script.append(pb.ShareFetchResponse(member_epoch=1, partitions=[pb.ShareFetchPartition(
        topic="t.dlq", partition=0, records=_dead_letters(), acquired=[pb.AcquiredRange(
            first_offset=0, last_offset=2, delivery_count=1)])]))
    assert Admin(md).redrive("t.dlq", timeout_s=10) == 2
    join = c.fetches[0]
    assert join.settings.auto_offset_reset == "earliest" and list(join.topics) == ["t.dlq"] and join.group == "redrive"
    from tests.unit.test_client_producer import records_of

    copies = records_of(md, "t", 0)
    assert [(m.key, m.value, m.headers) for m in copies] == [(b"k0", b"v0", (("app", b"x"),)),
                                                             (None, b"v2", (("app", b"x"),))]
    acked = {(r.first_offset, r.last_offset, r.type) for req in c.acks for a in req.acknowledgements for r in a.ranges}
    acked |= {(r.first_offset, r.last_offset, r.type) for req in c.fetches for a in req.acknowledgements
              for r in a.ranges}
    assert acked == {(0, 2, ACCEPT)}  # the copies, and the one without a source topic (left in place)


def test_redrive_releases_a_dead_letter_whose_copy_failed():
    from logbroker.client.admin import Admin

    md = ShareMetadata({"t": 1, "t.dlq": 1})
    c = md.coordinator
    md.broker.errors[("t", 0)] = deque([pb.INVALID_REQUIRED_ACKS])
    c.fetch_script.append(pb.ShareFetchResponse(member_epoch=1, partitions=[pb.ShareFetchPartition(
        topic="t.dlq", partition=0, records=rb.encode_batch([(1, b"k", b"v", [("logbroker.dlq.topic", b"t")])]),
        acquired=[pb.AcquiredRange(first_offset=0, last_offset=0, delivery_count=1)])]))
    assert Admin(md).redrive("t.dlq", timeout_s=10) == 0
    ranges = [r for req in c.acks + c.fetches for a in req.acknowledgements for r in a.ranges]
    assert [(r.first_offset, r.type) for r in ranges] == [(0, RELEASE)]


def test_cli_queues_commands_parse_and_call_the_admin(monkeypatch, capsys):
    from logbroker import cli_queues
    from logbroker.cli import build_parser

    calls: list[tuple[str, Any]] = []

    class FakeAdmin:
        def __enter__(self) -> FakeAdmin:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def alter_share_group(self, group: str, **settings: Any) -> None:
            calls.append(("alter", (group, settings)))

        def purge_share_group(self, group: str, topics: Any) -> int:
            calls.append(("purge", (group, topics)))
            return 3

    monkeypatch.setattr(cli_queues, "_admin", lambda args: FakeAdmin())
    parser = build_parser()
    args = parser.parse_args(["queues", "configure", "jobs", "--lock-ms", "60000", "--max-delivery-attempts", "4",
                              "--dead-letter-topic", "", "--dead-letter-expired", "true"])
    assert args.func(args) == 0
    assert calls[-1] == ("alter", ("jobs", {"lock_ms": 60000, "max_delivery_attempts": 4, "dead_letter_topic": "",
                                            "dead_letter_expired": True}))
    args = parser.parse_args(["queues", "configure", "jobs", "--ordering", "key"])
    assert args.func(args) == 0 and calls[-1] == ("alter", ("jobs", {"ordering": "key"}))
    with pytest.raises(SystemExit):
        parser.parse_args(["queues", "configure", "jobs", "--ordering", "fifo"])
    args = parser.parse_args(["queues", "purge", "jobs", "--topic", "a"])
    assert args.func(args) == 0 and calls[-1] == ("purge", ("jobs", ["a"]))
    assert "3 record(s) purged" in capsys.readouterr().out


def test_cli_configure_refuses_a_bad_setting_in_one_line(capsys) -> None:
    from logbroker import cli

    assert cli.main(["queues", "configure", "jobs", "--lock-ms", "0", "--bootstrap", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "logbroker: error: INVALID_CONFIG: lock_ms must be > 0, got 0"
