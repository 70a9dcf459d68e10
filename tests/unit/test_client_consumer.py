"""Consumer: positions, seeks, resets, offsets of a standalone group — against in-memory fakes."""

from __future__ import annotations

import threading
import time
from collections import deque

import grpc
import pytest

from logbroker import wire
from logbroker.client.circuit import Circuits, State
from logbroker.client.consumer import Consumer, parse_reset
from logbroker.client.producer import Producer
from logbroker.errors import InvalidGroupIdError, LogbrokerError, OffsetOutOfRangeError
from logbroker.storage.record_batch import Message
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.fake_coordinator import FakeCoordinator
from tests.unit.test_client_fakes import FakeMetadata, FakeRpcError

pytestmark = pytest.mark.timeout(30)


def fill(md: FakeMetadata, topic: str, counts: dict[int, int], batch_size_bytes: int = 2_000) -> None:
    """counts[p] records per partition p, values b"p-i", in batches of ~batch_size_bytes."""
    with Producer(md, linger_ms=60_000, batch_size_bytes=batch_size_bytes) as p:  # flush() ships
        for part, n in counts.items():
            for i in range(n):
                p.send(topic, b"%d-%d" % (part, i), partition=part)
        p.flush(10)


def consume(c: Consumer, n: int, timeout_s: float = 10) -> list[Message]:
    out: list[Message] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(c.poll(timeout_ms=100))
    return out


@pytest.fixture
def md() -> FakeMetadata:
    md = FakeMetadata({"t": 1, "four": 4})
    md.coordinator = FakeCoordinator(md)  # type: ignore[attr-defined]
    return md


def test_parse_reset():
    assert parse_reset("earliest") == -2
    assert parse_reset("latest") == -1
    assert parse_reset("none") is None
    with pytest.raises(ValueError):
        parse_reset("middle")


def test_subscribe_reads_every_partition_in_order(md):
    fill(md, "four", {0: 300, 1: 200, 2: 0, 3: 50})
    with Consumer(md, ["four"]) as c:
        assert c.assignment() == {("four", p) for p in range(4)}
        msgs = consume(c, 550)
        assert len(msgs) == 550
        for part, n in ((0, 300), (1, 200), (3, 50)):
            mine = [m for m in msgs if m.partition == part]
            assert [m.offset for m in mine] == list(range(n))
            assert [m.value for m in mine] == [b"%d-%d" % (part, i) for i in range(n)]
        assert c.position("four", 0) == 300 and c.position("four", 2) == 0
        assert c.poll(timeout_ms=50) == []


def test_messages_are_record_batch_messages(md):
    with Producer(md) as p:
        p.send("t", b"v", key=b"k", headers=[("h", b"1")], timestamp_ms=42).result(5)
    with Consumer(md, ["t"]) as c:
        (m,) = consume(c, 1)
    assert m == Message("t", 0, 0, b"k", b"v", (("h", b"1"),), 42)


def test_max_records_bounds_each_poll(md):
    fill(md, "t", {0: 100}, batch_size_bytes=100_000)
    with Consumer(md, ["t"], max_poll_records=30) as c:
        sizes = []
        got = 0
        while got < 100:
            batch = c.poll(timeout_ms=1000)
            sizes.append(len(batch))
            got += len(batch)
        assert max(sizes) <= 30
        assert c.poll(timeout_ms=10, max_records=5) == []
        c.seek("t", 0, 0)
        assert len(c.poll(timeout_ms=1000, max_records=5)) == 5


def test_seek_into_the_middle_of_a_batch_skips_earlier_records(md):
    fill(md, "t", {0: 100}, batch_size_bytes=100_000)  # one batch
    assert len(md.broker.logs[("t", 0)]) == 1
    with Consumer(md) as c:
        c.assign([("t", 0)])
        c.seek("t", 0, 37)
        msgs = consume(c, 63)
        assert [m.offset for m in msgs] == list(range(37, 100))


def test_seek_drops_buffered_records(md):
    fill(md, "t", {0: 500})
    with Consumer(md, max_poll_records=10) as c:
        c.assign([("t", 0)])
        first = c.poll(timeout_ms=1000)
        assert [m.offset for m in first] == list(range(10))
        c.seek("t", 0, 400)
        assert c.position("t", 0) == 400
        nxt = c.poll(timeout_ms=1000)
        assert nxt[0].offset == 400
        c.seek("t", 0, 5)
        assert c.poll(timeout_ms=1000)[0].offset == 5


def test_seek_to_beginning_and_end(md):
    fill(md, "four", {0: 10, 1: 20})
    with Consumer(md) as c:
        c.assign([("four", 0), ("four", 1)])
        c.seek_to_end()
        assert (c.position("four", 0), c.position("four", 1)) == (10, 20)
        assert c.poll(timeout_ms=50) == []
        c.seek_to_beginning("four", 1)
        msgs = consume(c, 20)
        assert {m.partition for m in msgs} == {1}
        c.seek_to_beginning("four")
        assert len(consume(c, 30)) == 30


def test_latest_reset_reads_only_new_records(md):
    fill(md, "t", {0: 10})
    with Consumer(md, ["t"], auto_offset_reset="latest") as c:
        assert c.position("t", 0) == 10
        fill(md, "t", {0: 3})
        assert [m.offset for m in consume(c, 3)] == [10, 11, 12]


def test_out_of_range_resets_per_auto_offset_reset(md):
    fill(md, "t", {0: 50})
    md.broker.log_start[("t", 0)] = 20
    with Consumer(md) as c:
        c.assign([("t", 0)])
        c.seek("t", 0, 5)  # below the log start: retention deleted it
        msgs = consume(c, 30)
        assert msgs[0].offset == 20 and msgs[-1].offset == 49


def test_out_of_range_raises_with_reset_none(md):
    fill(md, "t", {0: 5})
    with Consumer(md, auto_offset_reset="none") as c:
        c.assign([("t", 0)])
        c.seek("t", 0, 99)
        with pytest.raises(OffsetOutOfRangeError):
            for _ in range(50):
                c.poll(timeout_ms=20)


def test_no_committed_offset_with_reset_none_raises(md):
    with Consumer(md, group="g", auto_offset_reset="none") as c:
        c.assign([("t", 0)])
        with pytest.raises(OffsetOutOfRangeError):
            c.poll(timeout_ms=10)


def test_retriable_fetch_error_is_retried(md):
    fill(md, "t", {0: 5})
    md.broker.errors[("t", 0)] = deque([pb.NOT_LEADER_OR_FOLLOWER, pb.UNKNOWN_TOPIC_OR_PARTITION])
    before = len(md.refreshes)
    with Consumer(md, ["t"], retry_backoff_ms=10) as c:
        assert [m.offset for m in consume(c, 5)] == list(range(5))
    assert len(md.refreshes) > before + 1


def test_an_overloaded_broker_is_fetched_from_again_after_its_retry_after_and_its_circuit_opens(md):
    fill(md, "t", {0: 5})
    md.circuits = Circuits(failures_max=2, cool_down_ms=200)
    md.broker.call_errors.extend(
        [FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, wire.with_retry_after("busy", 150))] * 2)
    fetches_before = len(md.broker.requests)
    refreshes_before = len(md.refreshes)
    with Consumer(md, auto_offset_reset="earliest", retry_backoff_ms=1) as c:
        c.assign([("t", 0)])
        t0 = time.monotonic()
        assert [m.offset for m in consume(c, 5)] == list(range(5))
        assert time.monotonic() - t0 >= 0.3  # 150 ms after the first refusal, 200 ms of open circuit after the second
    assert len(md.broker.requests) - fetches_before == 3  # two refused, then the probe
    assert md.circuits.state("broker0:9092") is State.CLOSED
    assert len(md.refreshes) == refreshes_before  # overload says nothing about leaders


def test_non_retriable_fetch_error_is_raised(md):
    fill(md, "t", {0: 5})
    md.broker.errors[("t", 0)] = deque([pb.CORRUPT_MESSAGE])
    with Consumer(md, ["t"], retry_backoff_ms=10) as c:
        with pytest.raises(LogbrokerError):
            for _ in range(20):
                c.poll(timeout_ms=50)
        assert len(consume(c, 5)) == 5  # and then it goes on


def test_fetches_go_to_each_partitions_leader():
    md = FakeMetadata({"t": 2}, leaders={("t", 0): 0, ("t", 1): 1}, brokers=2)
    with Producer(md) as p:
        p.send("t", b"a", partition=0).result(5)
        p.send("t", b"b", partition=1).result(5)
    with Consumer(md, ["t"]) as c:
        msgs = consume(c, 2)
    assert sorted((m.partition, m.value) for m in msgs) == [(0, b"a"), (1, b"b")]
    for i, part in ((0, 0), (1, 1)):
        fetches = [r for r in md.fakes[f"broker{i}:9092"].requests if isinstance(r, pb.FetchRequest)]
        assert fetches and all({fp.partition for fp in r.partitions} == {part} for r in fetches)


def test_subscription_picks_up_new_partitions(md):
    with Consumer(md, ["t"], metadata_max_age_ms=50) as c:
        assert c.assignment() == {("t", 0)}
        md.topic_partitions["t"] = 3
        fill(md, "t", {2: 4})
        msgs = consume(c, 4)
        assert c.assignment() == {("t", 0), ("t", 1), ("t", 2)}
        assert [m.partition for m in msgs] == [2] * 4


def test_subscription_to_a_topic_created_later(md):
    with Consumer(md, ["later"]) as c:
        assert c.assignment() == set()
        assert c.poll(timeout_ms=50) == []
        md.topic_partitions["later"] = 1
        fill(md, "later", {0: 2})
        assert len(consume(c, 2, timeout_s=5)) == 2


def test_commit_without_group_raises(md):
    with Consumer(md, ["t"]) as c:
        with pytest.raises(InvalidGroupIdError, match="group"):
            c.commit()
        with pytest.raises(InvalidGroupIdError):
            c.committed("t", 0)


def test_group_commits_and_resumes_from_committed(md):
    fill(md, "t", {0: 100})
    with Consumer(md, ["t"], group="g", enable_auto_commit=False, max_poll_records=40) as c:
        assert c.committed("t", 0) is None
        consume(c, 40)
        c.commit()
        assert c.committed("t", 0) == 40
        c.commit({("t", 0): 60})
        assert c.committed("t", 0) == 60
    with Consumer(md, ["t"], group="g") as c:
        assert consume(c, 1)[0].offset == 60
    with Consumer(md, ["t"], group="other") as c:
        assert consume(c, 1)[0].offset == 0


def test_auto_commit_on_close_and_on_interval(md):
    fill(md, "t", {0: 30})
    c = Consumer(md, ["t"], group="auto", auto_commit_interval_ms=50)
    consume(c, 30)
    time.sleep(0.06)
    c.poll(timeout_ms=10)
    assert md.coordinator.committed["auto"][("t", 0)] == 30
    fill(md, "t", {0: 5})
    consume(c, 5)
    c.close()
    assert md.coordinator.committed["auto"][("t", 0)] == 35


def test_poll_timeout_and_close_from_another_thread(md):
    c = Consumer(md, ["t"])
    t0 = time.monotonic()
    assert c.poll(timeout_ms=100) == []
    assert 0.09 <= time.monotonic() - t0 < 2
    got = []

    def iterate() -> None:
        got.extend(iter(c))

    th = threading.Thread(target=iterate)
    th.start()
    fill(md, "t", {0: 3})
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    c.close(timeout=5)
    th.join(5)
    assert not th.is_alive()
    assert [m.offset for m in got] == [0, 1, 2]
    with pytest.raises(LogbrokerError):
        c.poll(timeout_ms=0)
    c.close()


def test_position_of_unassigned_partition_raises(md):
    with Consumer(md) as c:
        c.assign([("t", 0)])
        with pytest.raises(LogbrokerError):
            c.position("four", 0)
        with pytest.raises(ValueError):
            c.seek("t", 0, -1)


def test_reassign_keeps_positions_of_kept_partitions(md):
    fill(md, "four", {0: 10, 1: 10})
    with Consumer(md) as c:
        c.assign([("four", 0)])
        c.seek("four", 0, 7)
        c.assign([("four", 0), ("four", 1)])
        assert c.position("four", 0) == 7
        assert c.position("four", 1) == 0
        msgs = consume(c, 13)
        assert sorted((m.partition, m.offset) for m in msgs)[:3] == [(0, 7), (0, 8), (0, 9)]
        c.unsubscribe()
        assert c.assignment() == set()


def test_poll_without_assignment_raises(md):
    with Consumer(md) as c:
        with pytest.raises(LogbrokerError, match="subscribe"):
            c.poll(timeout_ms=0)
        c.assign([("t", 0)])
        assert c.poll(timeout_ms=0) == []
