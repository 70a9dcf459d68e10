"""Share groups (queues) on a real standalone broker, through the raw ShareFetch / ShareAcknowledge
calls: the broker's side of issue 16 (the client is tested in test_queue_consumer.py)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from logbroker.client.admin import Admin
from logbroker.client.producer import Producer
from logbroker.group import share_headers as H
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pb_grpc
from tests.conftest import BrokerProcess, wait_for

ACCEPT, RELEASE, REJECT, RENEW = 1, 2, 3, 4


class Stubs:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.broker = pb_grpc.BrokerStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.channel)

    def fetch(self, member: str, epoch: int, topics: tuple[str, ...] = ("q",), acks: list[pb.ShareAcknowledgement] | None = None,
              max_records: int = 1000, max_wait_ms: int = 200, group: str = "g", **settings: object) -> pb.ShareFetchResponse:
        return self.broker.ShareFetch(pb.ShareFetchRequest(
            group=group, member_id=member, member_epoch=epoch, topics=list(topics), max_records=max_records,
            max_wait_ms=max_wait_ms, acknowledgements=acks or [], settings=pb.ShareGroupSettings(**settings)), timeout=10)

    def ack(self, member: str, epoch: int, acks: list[pb.ShareAcknowledgement], group: str = "g") -> pb.ShareAcknowledgeResponse:
        return self.broker.ShareAcknowledge(pb.ShareAcknowledgeRequest(
            group=group, member_id=member, member_epoch=epoch, acknowledgements=acks), timeout=10)

    def describe(self, group: str = "g") -> pb.DescribeShareGroupResponse:
        return self.admin.DescribeShareGroup(pb.DescribeShareGroupRequest(group=group), timeout=10)


def ranges(resp: pb.ShareFetchResponse) -> dict[tuple[str, int], list[tuple[int, int, int]]]:
    return {(p.topic, p.partition): [(a.first_offset, a.last_offset, a.delivery_count) for a in p.acquired]
            for p in resp.partitions}


def offsets(resp: pb.ShareFetchResponse) -> set[tuple[int, int]]:
    return {(p.partition, o) for p in resp.partitions for a in p.acquired for o in range(a.first_offset, a.last_offset + 1)}


def settle(resp: pb.ShareFetchResponse, ack_type: int = ACCEPT, **extra: object) -> list[pb.ShareAcknowledgement]:
    return [pb.ShareAcknowledgement(topic=p.topic, partition=p.partition, ranges=[
        pb.AcknowledgeRange(first_offset=a.first_offset, last_offset=a.last_offset, type=ack_type, **extra)
        for a in p.acquired]) for p in resp.partitions]


def one(partition: int, first: int, last: int, ack_type: int = ACCEPT, topic: str = "q",
        **extra: object) -> list[pb.ShareAcknowledgement]:
    return [pb.ShareAcknowledgement(topic=topic, partition=partition, ranges=[
        pb.AcknowledgeRange(first_offset=first, last_offset=last, type=ack_type, **extra)])]


def state(stubs: Stubs) -> pb.DescribeShareGroupResponse:
    d = stubs.describe()
    for p in d.partitions:
        p.oldest_unsettled_age_ms = 0  # moves with the clock
    return d


@pytest.fixture
def queue(broker: BrokerProcess) -> Iterator[Stubs]:
    with Admin(broker.address) as admin:
        admin.create_topic("q", partitions=2)
    with Producer(broker.address, acks=-1) as producer:
        for i in range(200):
            producer.send("q", b"value-%d" % i, key=b"k%d" % i)
        producer.flush()
    stubs = Stubs(broker.address)
    stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
    yield stubs
    stubs.channel.close()


def test_members_share_records_and_each_is_acknowledged_once(queue: Stubs) -> None:
    members = {f"m{i}": 0 for i in range(4)}
    seen: list[tuple[int, int]] = []
    pending: dict[str, list[pb.ShareAcknowledgement]] = {m: [] for m in members}
    for _ in range(50):
        for m in members:
            resp = queue.fetch(m, members[m], acks=pending[m], max_records=20, max_wait_ms=0,
                               auto_offset_reset="earliest")
            assert resp.error_code == pb.NONE, resp.error_message
            assert all(r.error_code == pb.NONE for r in resp.ack_results)
            members[m] = resp.member_epoch
            seen += sorted(offsets(resp))
            pending[m] = settle(resp)
        if len(seen) >= 200:
            break
    for m in members:
        assert queue.ack(m, members[m], pending[m]).error_code == pb.NONE
    assert len(seen) == 200 and len(set(seen)) == 200
    d = queue.describe()
    assert sum(p.acknowledged for p in d.partitions) == 200
    assert all(p.in_flight == 0 and p.start_offset == p.log_end_offset for p in d.partitions)


def test_bad_settles_get_clear_errors_and_change_nothing(queue: Stubs) -> None:
    first = queue.fetch("a", 0, max_records=10, auto_offset_reset="earliest")
    queue.fetch("b", 0, max_records=1, max_wait_ms=0)  # b joins
    (tp, runs), = ranges(first).items()
    lo, hi, _ = runs[0]
    before = state(queue)
    cases = [
        ("b", 1, one(tp[1], lo, lo), pb.INVALID_RECORD_STATE),            # held by another member
        ("a", 1, one(tp[1], hi + 1, hi + 1), pb.INVALID_RECORD_STATE),    # in the window, never handed to a
        ("a", 1, one(tp[1], 10**9, 10**9), pb.OFFSET_OUT_OF_RANGE),       # outside the window
        ("a", 1, one(tp[1], lo, lo, RELEASE, delay_ms=-5), pb.INVALID_REQUEST),  # negative delay
        ("a", 1, one(tp[1], lo, lo, 42), pb.INVALID_REQUEST),             # unknown type
    ]
    for member, epoch, acks, code in cases:
        resp = queue.ack(member, epoch, acks)
        assert resp.error_code == pb.NONE
        assert [r.error_code for r in resp.results] == [code], (member, acks, resp)
        assert resp.results[0].error_message
    assert queue.ack("nobody", 1, one(tp[1], lo, lo)).error_code == pb.UNKNOWN_MEMBER_ID
    assert queue.ack("a", 7, one(tp[1], lo, lo)).error_code == pb.FENCED_MEMBER_EPOCH
    assert state(queue) == before
    assert queue.ack("a", 1, one(tp[1], lo, lo)).results[0].error_code == pb.NONE
    assert queue.ack("a", 1, one(tp[1], lo, lo)).results[0].error_code == pb.INVALID_RECORD_STATE  # a second ack


@pytest.mark.parametrize("settings", [{"lock_ms": 0}, {"lock_ms": 10**9}, {"max_delivery_attempts": 0},
                                      {"auto_offset_reset": "middle"}, {"dead_letter_topic": "../x"}])
def test_bad_group_settings_are_refused_and_create_nothing(queue: Stubs, settings: dict[str, object]) -> None:
    resp = queue.fetch("a", 0, group="bad", **settings)
    assert resp.error_code == pb.INVALID_CONFIG and resp.error_message
    assert queue.describe("bad").error_code == pb.GROUP_ID_NOT_FOUND


def test_bad_subscriptions_and_member_ids_are_refused(queue: Stubs) -> None:
    assert queue.fetch("a", 0, topics=("../etc",)).error_code == pb.INVALID_TOPIC
    assert queue.fetch("a", 0, topics=("x" * 300,)).error_code == pb.INVALID_TOPIC
    assert queue.fetch("m" * 65, 0).error_code == pb.UNKNOWN_MEMBER_ID
    assert queue.fetch("a", 0, group="").error_code == pb.INVALID_GROUP_ID
    assert queue.describe().error_code == pb.GROUP_ID_NOT_FOUND  # nothing was created


def test_a_share_group_and_a_consumer_group_do_not_share_a_name(queue: Stubs) -> None:
    assert queue.fetch("a", 0).error_code == pb.NONE
    hb = queue.broker.ConsumerGroupHeartbeat(pb.ConsumerGroupHeartbeatRequest(
        group="g", member_id="", member_epoch=0, subscribed_topics=pb.Subscription(topics=["q"])), timeout=10)
    assert hb.error_code == pb.INCONSISTENT_GROUP_PROTOCOL


def test_failing_record_is_delivered_max_attempts_times_then_dead_lettered(queue: Stubs, broker: BrokerProcess) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic("poison")
    with Producer(broker.address, acks=-1) as producer:
        producer.send("poison", b"{not json", key=b"order-1").result(10)
    settings = {"auto_offset_reset": "earliest", "max_delivery_attempts": 3, "retry_backoff_ms": 50,
                "retry_backoff_max_ms": 100}
    resp = queue.fetch("a", 0, topics=("poison",), group="p", **settings)
    (tp, [(off, _, count)]), = ranges(resp).items()
    counts = [count]
    acks = one(0, off, off, RELEASE, topic="poison")
    for _ in range(3):
        resp = queue.fetch("a", 1, topics=("poison",), group="p", acks=acks, max_wait_ms=2000)
        assert resp.ack_results[0].error_code == pb.NONE
        acks = []
        got = ranges(resp).get(tp, [])
        if not got:  # the record is gone: dead-lettered after its third failure
            break
        counts.append(got[0][2])
        acks = one(0, off, off, RELEASE, topic="poison")
    assert counts == [1, 2, 3]
    with Admin(broker.address) as admin:
        wait_for(lambda: "poison.dlq" in admin.list_topics(), 10, "the dead-letter topic")
    from logbroker.client.consumer import Consumer
    with Consumer(broker.address, topics=["poison.dlq"], auto_offset_reset="earliest") as consumer:
        got_msgs: list = []
        wait_for(lambda: got_msgs.extend(consumer.poll(200)) or got_msgs, 10, "the dead letter")
    m = got_msgs[0]
    headers = dict(m.headers)
    assert m.key is not None and m.value is not None
    assert (m.key, m.value) == (b"order-1", b"{not json")
    assert headers[H.DLQ_TOPIC] == b"poison" and headers[H.DLQ_PARTITION] == b"0"
    assert headers[H.DLQ_OFFSET] == str(off).encode() and headers[H.DLQ_DELIVERY_COUNT] == b"3"
    assert headers[H.DLQ_REASON] == H.REASON_MAX_ATTEMPTS.encode()


def test_full_window_stops_delivery_until_records_settle(queue: Stubs) -> None:
    resp = queue.fetch("a", 0, max_records=1000, auto_offset_reset="earliest", max_in_flight_records=10)
    assert {tp: sum(b - a + 1 for a, b, _ in r) for tp, r in ranges(resp).items()} == {("q", 0): 10, ("q", 1): 10}
    assert not queue.fetch("a", 1, max_wait_ms=100).partitions  # both windows full of unsettled records
    resp2 = queue.fetch("a", 1, acks=one(0, *ranges(resp)[("q", 0)][0][:2]), max_wait_ms=1000)
    assert set(ranges(resp2)) == {("q", 0)} and sum(b - a + 1 for a, b, _ in ranges(resp2)[("q", 0)]) == 10


def test_acknowledgements_and_delivery_counts_survive_kill_9(queue: Stubs, broker: BrokerProcess) -> None:
    resp = queue.fetch("a", 0, max_records=1000, auto_offset_reset="earliest")
    acquired = offsets(resp)
    acked = {o for o in acquired if o[1] % 2 == 0}
    acks = [pb.ShareAcknowledgement(topic="q", partition=p, ranges=[
        pb.AcknowledgeRange(first_offset=o, last_offset=o, type=ACCEPT) for (pp, o) in sorted(acked) if pp == p])
        for p in (0, 1)]
    assert all(r.error_code == pb.NONE for r in queue.ack("a", 1, acks).results)
    broker.kill()
    broker.start()
    queue.channel.close()
    stubs = Stubs(broker.address)
    stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
    again = stubs.fetch("b", 0, max_records=1000, max_wait_ms=1000)
    assert again.error_code == pb.NONE, again.error_message
    assert offsets(again) == acquired - acked  # accepted acks never come back
    assert {c for rs in ranges(again).values() for _, _, c in rs} == {2}  # counts continue
    stubs.channel.close()


def test_delay_and_ttl_follow_the_brokers_injected_clock(broker_factory, tmp_path) -> None:
    """A record delayed 2 s is not handed out before the broker's clock reaches its time; records
    past their TTL (per record, or the topic's message_ttl_ms) are never handed out, and counted."""
    clock_file = tmp_path / "clock-offset-ms"
    clock_file.write_text("0")
    broker = broker_factory(env={"LOGBROKER_TEST_CLOCK_OFFSET_FILE": str(clock_file)})
    with Admin(broker.address) as admin:
        admin.create_topic("q", partitions=1)
        admin.create_topic("short", partitions=1, config={"message_ttl_ms": "60000"})
    stubs = Stubs(broker.address)
    try:
        stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
        with Producer(broker.address, acks=-1) as producer:
            producer.send("q", b"later", delay_ms=2_000).result(10)
            producer.send("q", b"dies", ttl_ms=1_000).result(10)
            producer.send("q", b"now").result(10)
            producer.send("short", b"topic-ttl").result(10)
        first = stubs.fetch("a", 0, topics=("q", "short"), auto_offset_reset="earliest", max_wait_ms=300)
        # "dies" (offset 1) is still alive; "later" (offset 0) is not due
        assert ranges(first) == {("q", 0): [(1, 2, 1)], ("short", 0): [(0, 0, 1)]}
        assert stubs.ack("a", 1, settle(first, RELEASE, delay_ms=1)).error_code == pb.NONE
        clock_file.write_text("1500")  # 1.5 s later: "dies" expired; "later" still not due
        second = stubs.fetch("a", 1, topics=("q", "short"), max_wait_ms=300)
        assert ranges(second) == {("q", 0): [(2, 2, 2)], ("short", 0): [(0, 0, 2)]}
        stubs.ack("a", 1, settle(second, RELEASE, delay_ms=1))
        clock_file.write_text("2500")  # "later" is due
        third = stubs.fetch("a", 1, topics=("q", "short"), max_wait_ms=300)
        assert ranges(third)[("q", 0)] == [(0, 0, 1), (2, 2, 3)]
        stubs.ack("a", 1, settle(third, RELEASE, delay_ms=1))
        clock_file.write_text("70000")  # the topic's 60 s TTL passed too
        fourth = stubs.fetch("a", 1, topics=("q", "short"), max_wait_ms=300)
        assert ("short", 0) not in ranges(fourth)
        d = {(p.topic, p.partition): p for p in stubs.describe().partitions}
        assert d[("q", 0)].expired == 1 and d[("short", 0)].expired == 1
    finally:
        stubs.channel.close()


def _rss_anon_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        lines = f.readlines()
    for line in lines:
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/PID/status")


@pytest.mark.slow
def test_broker_memory_stays_bounded_with_a_million_unsettled_records(broker_factory) -> None:
    """1,000,000 records offered to a share group that settles none: each partition's window stops
    at max_in_flight_records, so the broker's anonymous memory hardly moves."""
    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("flood", partitions=2)
    with Producer(broker.address, acks=1) as producer:
        value = b"x" * 100
        for i in range(1_000_000):
            producer.send("flood", value, key=b"%d" % (i % 1000))
        producer.flush(120)
    stubs = Stubs(broker.address)
    try:
        stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
        assert broker.proc is not None
        before = _rss_anon_bytes(broker.proc.pid)
        held = 0
        for i in range(20):
            resp = stubs.fetch(f"m{i % 4}", 0 if i < 4 else 1, topics=("flood",), max_records=10_000,
                               max_wait_ms=0, auto_offset_reset="earliest")
            assert resp.error_code == pb.NONE, resp.error_message
            held += len(offsets(resp))
        assert held == 2 * 2_000  # two full windows, nothing more while nothing settles
        d = stubs.describe()
        assert [p.in_flight for p in d.partitions] == [2_000, 2_000]
        after = _rss_anon_bytes(broker.proc.pid)
        assert after - before < 64 << 20, (before, after)
    finally:
        stubs.channel.close()


def test_delayed_backlog_does_not_hold_back_later_records_and_survives_kill_9(broker_factory, tmp_path) -> None:
    """30 records delayed an hour, a window of 10: the records after them are delivered at once;
    after a kill -9 and the hour passing (the broker's injected clock), the delayed ones are."""
    clock_file = tmp_path / "clock-offset-ms"
    clock_file.write_text("0")
    broker = broker_factory(env={"LOGBROKER_TEST_CLOCK_OFFSET_FILE": str(clock_file)})
    with Admin(broker.address) as admin:
        admin.create_topic("q", partitions=1)
    with Producer(broker.address, acks=-1) as producer:
        for i in range(30):
            producer.send("q", b"later-%d" % i, delay_ms=3_600_000)
        for i in range(5):
            producer.send("q", b"now-%d" % i)
        producer.flush(10)
    stubs = Stubs(broker.address)
    try:
        stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
        first = stubs.fetch("a", 0, auto_offset_reset="earliest", max_in_flight_records=10, max_wait_ms=300)
        assert ranges(first) == {("q", 0): [(30, 34, 1)]}
        assert all(r.error_code == pb.NONE for r in stubs.ack("a", 1, settle(first)).results)
        assert stubs.describe().partitions[0].delayed == 30
    finally:
        stubs.channel.close()
    broker.kill()
    clock_file.write_text(str(3_600_000 + 60_000))
    broker.start()
    stubs = Stubs(broker.address)
    try:
        stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
        got: set[tuple[int, int]] = set()
        epoch = 0
        for _ in range(10):
            resp = stubs.fetch("b", epoch, max_wait_ms=300)
            assert resp.error_code == pb.NONE, resp.error_message
            epoch = resp.member_epoch
            got |= offsets(resp)
            stubs.ack("b", epoch, settle(resp))
            if len(got) >= 30:
                break
        assert got == {(0, o) for o in range(30)}
        d = stubs.describe().partitions[0]
        assert (d.in_flight, d.start_offset) == (0, 35)
    finally:
        stubs.channel.close()
