"""Consumer as a group member, against the in-memory coordinator (the broker's own membership code)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from logbroker.client.consumer import Consumer
from logbroker.errors import (
    InvalidGroupIdError,
    InvalidRegularExpressionError,
    LogbrokerError,
    OffsetOutOfRangeError,
    StaleMemberEpochError,
    UnknownMemberIdError,
    UnknownTopicOrPartitionError,
)
from logbroker.storage.record_batch import Message
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.fake_coordinator import FakeCoordinator
from tests.unit.test_client_consumer import fill
from tests.unit.test_client_fakes import FakeMetadata

pytestmark = pytest.mark.timeout(60)

FOUR = {("four", p) for p in range(4)}


@pytest.fixture
def md() -> FakeMetadata:
    return FakeMetadata({"t": 1, "four": 4})


@pytest.fixture
def coord(md: FakeMetadata) -> FakeCoordinator:
    return FakeCoordinator(md)


def poll_until(consumers: list[Consumer], done: Callable[[], bool], timeout_s: float = 10,
               sink: list[Message] | None = None) -> None:
    """Poll every consumer in turn (one thread, as a test of several members must) until done()."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, "timed out"
        for c in consumers:
            got = c.poll(timeout_ms=10)
            if sink is not None:
                sink.extend(got)


class Events:
    """Callback recorder: ("assign"|"revoke"|"lost", consumer name, partitions)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, frozenset]] = []

    def callbacks(self, name: str) -> dict:
        return {
            "on_assign": lambda tps: self.log.append(("assign", name, frozenset(tps))),
            "on_revoke": lambda tps: self.log.append(("revoke", name, frozenset(tps))),
        }


def test_member_joins_gets_everything_and_consumes(md, coord):
    fill(md, "four", {p: 10 for p in range(4)})
    ev = Events()
    with Consumer(md, ["four"], group="g", **ev.callbacks("a")) as c:
        assert c.member_id
        got: list[Message] = []
        poll_until([c], lambda: len(got) >= 40, sink=got)
        assert c.assignment() == FOUR and c.member_epoch > 0
        assert coord.members("g") == {c.member_id: FOUR}
        assert ev.log == [("assign", "a", frozenset(FOUR))]
        assert sorted((m.partition, m.offset) for m in got) == [(p, o) for p in range(4) for o in range(10)]
        c.commit()
        assert coord.commits[-1].member_id == c.member_id and coord.commits[-1].member_epoch == c.member_epoch
        assert all(c.committed("four", p) == 10 for p in range(4))
        member_id = c.member_id
    assert coord.members("g") == {}  # close left the group
    assert coord.heartbeats[-1].member_id == member_id and coord.heartbeats[-1].member_epoch == -1


def test_second_member_splits_the_partitions_revoke_before_assign(md, coord):
    fill(md, "four", {p: 50 for p in range(4)})
    ev = Events()
    a = Consumer(md, ["four"], group="g", max_poll_records=7, **ev.callbacks("a"))
    b: Consumer | None = None
    try:
        got_a: list[Message] = []
        poll_until([a], lambda: len(got_a) >= 30, sink=got_a)  # a alone, some of it read
        b = Consumer(md, ["four"], group="g", max_poll_records=7, **ev.callbacks("b"))
        got_b: list[Message] = []
        deadline = time.monotonic() + 10
        while len(got_a) + len(got_b) < 200:
            assert time.monotonic() < deadline, "timed out"
            got_a.extend(a.poll(timeout_ms=10))
            got_b.extend(b.poll(timeout_ms=10))
        poll_until([a, b], lambda: len(a.assignment()) == 2 and len(b.assignment()) == 2)
        assert a.assignment() | b.assignment() == FOUR
        # a gave two partitions up (revoke) before b took them (assign)
        revoked = [e for e in ev.log if e[:2] == ("revoke", "a")]
        assert len(revoked) == 1 and revoked[0][2] == frozenset(b.assignment())
        assigned_b = [i for i, e in enumerate(ev.log) if e[:2] == ("assign", "b") and e[2]]
        assert assigned_b and ev.log.index(revoked[0]) < assigned_b[0]
        # every record exactly once: a committed on revoke, b started from there
        keys = sorted((m.partition, m.offset) for m in got_a + got_b)
        assert keys == [(p, o) for p in range(4) for o in range(50)]
        assert {("four", m.partition) for m in got_b} <= b.assignment()
    finally:
        a.close()
        if b is not None:
            b.close()


def test_no_record_of_a_revoked_partition_after_on_revoke(md, coord):
    fill(md, "four", {p: 400 for p in range(4)})
    revoked_at: dict[tuple[str, int], int] = {}
    returned: list[tuple[int, tuple[str, int]]] = []
    seq = [0]

    def on_revoke(tps: set) -> None:
        for tp in tps:
            revoked_at[tp] = seq[0]

    a = Consumer(md, ["four"], group="g", max_poll_records=3, on_revoke=on_revoke)
    b: Consumer | None = None
    try:
        poll_until([a], lambda: len(a.assignment()) == 4)
        a.poll(timeout_ms=100)  # buffers fill up
        b = Consumer(md, ["four"], group="g")
        deadline = time.monotonic() + 10
        while not (len(a.assignment()) == 2 and len(b.assignment()) == 2):
            assert time.monotonic() < deadline
            for m in a.poll(timeout_ms=5):
                seq[0] += 1
                returned.append((seq[0], (m.topic, m.partition)))
            b.poll(timeout_ms=5)
        for _ in range(20):
            for m in a.poll(timeout_ms=5):
                seq[0] += 1
                returned.append((seq[0], (m.topic, m.partition)))
        assert revoked_at
        for s, tp in returned:
            assert tp not in revoked_at or s <= revoked_at[tp], f"{tp} returned after on_revoke"
    finally:
        a.close()
        if b is not None:
            b.close()


def test_close_leaves_promptly_and_the_other_member_takes_over(md, coord):
    fill(md, "four", {p: 5 for p in range(4)})
    a = Consumer(md, ["four"], group="g")
    b = Consumer(md, ["four"], group="g")
    try:
        poll_until([a, b], lambda: len(a.assignment()) == 2 and len(b.assignment()) == 2)
        t0 = time.monotonic()
        a.close()
        assert time.monotonic() - t0 < 2
        assert set(coord.members("g")) == {b.member_id}
        poll_until([b], lambda: b.assignment() == FOUR, timeout_s=5)
    finally:
        a.close()
        b.close()


def test_fenced_member_loses_its_partitions_and_rejoins_with_its_id(md, coord):
    fill(md, "four", {p: 3 for p in range(4)})
    ev = Events()
    lost: list[set] = []
    c = Consumer(md, ["four"], group="g", on_lost=lost.append, **ev.callbacks("a"))
    try:
        poll_until([c], lambda: c.assignment() == FOUR)
        member_id = c.member_id
        c.commit({("four", 0): 2})
        coord.evict("g", member_id)
        got: list[Message] = []
        poll_until([c], lambda: bool(lost) and any(m.partition == 0 for m in got), sink=got)
        assert lost == [set(FOUR)]
        assert not [e for e in ev.log if e[0] == "revoke"]  # lost, not revoked: nothing committed on it
        assert c.member_id == member_id and coord.members("g") == {member_id: FOUR}
        assert [e[0] for e in ev.log] == ["assign", "assign"]
        assert min(m.offset for m in got if m.partition == 0) == 2  # resumed from the committed offset
    finally:
        c.close()


def test_commit_with_a_stale_epoch_is_retried_until_the_timeout(md, coord):
    fill(md, "four", {p: 3 for p in range(4)})
    c = Consumer(md, ["four"], group="g", enable_auto_commit=False, request_timeout_ms=500, retry_backoff_ms=20)
    try:
        poll_until([c], lambda: c.assignment() == FOUR)
        coord.commit_errors.append(pb.STALE_MEMBER_EPOCH)
        c.commit({("four", 1): 3})
        assert coord.committed["g"][("four", 1)] == 3
        coord.commit_errors.extend([pb.STALE_MEMBER_EPOCH] * 1000)
        t0 = time.monotonic()
        with pytest.raises(StaleMemberEpochError):
            c.commit({("four", 1): 1})
        assert time.monotonic() - t0 < 2
        assert coord.committed["g"][("four", 1)] == 3
    finally:
        coord.commit_errors.clear()
        c.close()


def test_commit_errors_per_partition_and_for_outsiders(md, coord):
    fill(md, "four", {p: 3 for p in range(4)})
    with Consumer(md, ["four"], group="g", enable_auto_commit=False, request_timeout_ms=500) as c:
        poll_until([c], lambda: c.assignment() == FOUR)
        with pytest.raises(OffsetOutOfRangeError):
            c.commit({("four", 0): 99})
        with pytest.raises(UnknownTopicOrPartitionError):
            c.commit({("four", 9): 0})
        with Consumer(md, group="g") as manual:
            manual.assign([("four", 0)])
            with pytest.raises(UnknownMemberIdError):  # the group has members: outsiders may not commit
                manual.commit({("four", 0): 1})
    with Consumer(md, group="g") as manual:  # now empty: a manual consumer may
        manual.assign([("four", 0)])
        manual.commit({("four", 0): 1})
        assert coord.commits[-1].member_id == "" and coord.commits[-1].member_epoch == -1
        assert manual.committed("four", 0) == 1


def test_async_commits_call_back_in_order_inside_poll(md, coord):
    fill(md, "four", {p: 3 for p in range(4)})
    results: list[tuple[dict, BaseException | None]] = []
    with Consumer(md, ["four"], group="g", enable_auto_commit=False) as c:
        poll_until([c], lambda: c.assignment() == FOUR)
        for off in (1, 2, 3):
            c.commit({("four", 0): off}, asynchronous=True, callback=lambda o, e: results.append((o, e)))
        c.commit({("four", 0): 99}, asynchronous=True, callback=lambda o, e: results.append((o, e)))
        poll_until([c], lambda: len(results) == 4)
        assert [r[0][("four", 0)] for r in results] == [1, 2, 3, 99]
        assert [r[1] is None for r in results] == [True, True, True, False]
        assert isinstance(results[3][1], OffsetOutOfRangeError)
        assert c.committed("four", 0) == 3


def test_pattern_subscription_picks_up_a_topic_created_later(md, coord):
    ev = Events()
    with Consumer(md, group="g", pattern=r"orders\..*", **ev.callbacks("a")) as c:
        poll_until([c], lambda: bool(ev.log))
        assert c.assignment() == set() and ev.log == [("assign", "a", frozenset())]
        md.topic_partitions["orders.eu"] = 2
        md.topic_partitions["other"] = 1
        fill(md, "orders.eu", {1: 2})
        got: list[Message] = []
        poll_until([c], lambda: len(got) == 2, sink=got)
        assert c.assignment() == {("orders.eu", 0), ("orders.eu", 1)}
        assert coord.heartbeats[0].subscribed_regex == r"orders\..*"


def test_slow_handler_keeps_its_membership(md):
    coord = FakeCoordinator(md, session_timeout_ms=300, heartbeat_interval_ms=20)
    with Consumer(md, ["four"], group="g") as c:
        poll_until([c], lambda: c.assignment() == FOUR)
        epoch = c.member_epoch
        time.sleep(1.0)  # the handler is busy: no poll() for over three session timeouts
        assert coord.members("g") == {c.member_id: FOUR}
        assert c.poll(timeout_ms=10) is not None and c.member_epoch == epoch


def test_callback_error_is_raised_from_poll_after_the_change_is_applied(md, coord):
    def boom(tps: set) -> None:
        raise RuntimeError("handler bug")

    with Consumer(md, ["four"], group="g", on_assign=boom) as c:
        with pytest.raises(RuntimeError, match="handler bug"):
            poll_until([c], lambda: False, timeout_s=5)
        assert c.assignment() == FOUR


def test_fatal_error_is_raised_by_poll(md, coord):
    coord.heartbeat_errors.append(pb.INVALID_REGULAR_EXPRESSION)
    with Consumer(md, group="g", pattern="x") as c:
        for _ in range(2):
            with pytest.raises(InvalidRegularExpressionError):
                poll_until([c], lambda: False, timeout_s=5)
        assert c.group_state == "fatal"


def test_coordinator_moves_and_load_in_progress_are_retried(md, coord):
    coord.find_errors.extend([pb.COORDINATOR_NOT_AVAILABLE, pb.COORDINATOR_NOT_AVAILABLE])
    coord.heartbeat_errors.extend([pb.COORDINATOR_LOAD_IN_PROGRESS, pb.NOT_COORDINATOR])
    with Consumer(md, ["four"], group="g", retry_backoff_ms=5) as c:
        poll_until([c], lambda: c.assignment() == FOUR)
        coord.commit_errors.append(pb.NOT_COORDINATOR)
        c.commit({("four", 0): 0})
        assert coord.committed["g"][("four", 0)] == 0


def test_unsubscribe_leaves_and_assign_takes_over(md, coord):
    ev = Events()
    c = Consumer(md, ["four"], group="g", **ev.callbacks("a"))
    try:
        poll_until([c], lambda: c.assignment() == FOUR)
        c.unsubscribe()
        assert c.assignment() == set() and ev.log[-1] == ("revoke", "a", frozenset(FOUR))
        poll_until([], lambda: coord.members("g") == {}, timeout_s=5)
        c.assign([("t", 0)])
        assert c.member_id == "" and c.member_epoch == -1
        c.subscribe(["t"])
        poll_until([c], lambda: c.assignment() == {("t", 0)})
        assert c.member_epoch > 0
    finally:
        c.close()


def test_close_from_another_thread_while_polling(md, coord):
    c = Consumer(md, ["four"], group="g")
    poll_until([c], lambda: c.assignment() == FOUR)
    out: list = []
    th = threading.Thread(target=lambda: out.extend(iter(c)))
    th.start()
    c.close(timeout=5)
    th.join(5)
    assert not th.is_alive()
    assert coord.members("g") == {}
    with pytest.raises(LogbrokerError):
        c.poll(timeout_ms=0)


def test_close_from_a_callback_inside_poll(md, coord):
    consumers: list[Consumer] = []
    c = Consumer(md, ["four"], group="g", on_assign=lambda tps: consumers[0].close(timeout=5))
    consumers.append(c)
    t0 = time.monotonic()
    assert c.poll(timeout_ms=5000) == []  # returns as soon as the callback closed the consumer
    assert time.monotonic() - t0 < 4
    assert coord.members("g") == {}
    with pytest.raises(LogbrokerError):
        c.poll(timeout_ms=0)


def test_invalid_group_id_found_by_the_coordinator_lookup_is_raised(md, coord):
    coord.find_errors.append(pb.INVALID_GROUP_ID)
    with Consumer(md, ["four"], group="bad/group") as c, pytest.raises(InvalidGroupIdError):
        poll_until([c], lambda: False, timeout_s=5)
