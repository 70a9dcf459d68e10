"""The consumer's parts on their own: subscription state, the auto-commit timer, and the consumer's
timers and retries on an injected clock (in-memory fakes, no sockets)."""

from __future__ import annotations

import time

import pytest

from logbroker.client.consumer import Consumer
from logbroker.client.consumer.commits import AutoCommitTimer
from logbroker.client.consumer.subscription import PartitionState, SubscriptionState
from logbroker.clock import ManualClock
from logbroker.errors import LeaderNotAvailableError, LogbrokerError
from tests.unit.fake_coordinator import FakeCoordinator
from tests.unit.test_client_consumer import fill
from tests.unit.test_client_fakes import FakeMetadata

pytestmark = pytest.mark.timeout(30)


def test_assign_keeps_kept_partitions_and_starts_new_ones_without_a_position():
    subs = SubscriptionState()
    subs.assign([("t", 0), ("t", 1)])
    assert subs.need_positions
    kept = subs.assigned[("t", 0)]
    kept.seek(7)
    gone = subs.assigned[("t", 1)]
    epoch = gone.epoch
    assert subs.revoked_by([("t", 0), ("u", 0)]) == [gone]
    subs.need_positions = False
    subs.assign([("t", 0), ("u", 0)])
    assert subs.assigned[("t", 0)] is kept and kept.position == 7
    assert subs.assigned[("u", 0)].position is None and subs.need_positions
    assert gone.epoch == epoch + 1  # its buffered and in-flight records are dropped
    assert [st.partition for st in subs.missing_positions(now=0.0)] == [0]
    assert subs.missing_positions(now=0.0)[0].topic == "u"


def test_seek_and_reset_move_the_epoch():
    st = PartitionState("t", 0)
    st.buffered = 2
    st.seek(5)
    assert (st.position, st.fetch_offset, st.epoch, st.buffered, st.reset_to) == (5, 5, 1, 0, None)
    st.reset(-2)
    assert (st.position, st.epoch, st.buffered, st.reset_to) == (None, 2, 0, -2)


def test_select_state_and_uncommitted():
    subs = SubscriptionState()
    subs.assign([("t", 0), ("t", 1), ("u", 0)])
    assert [(s.topic, s.partition) for s in subs.select("t", None)] == [("t", 0), ("t", 1)]
    assert len(subs.select(None, None)) == 3
    with pytest.raises(LogbrokerError, match="not assigned"):
        subs.state("v", 0)
    subs.assigned[("t", 0)].seek(4)
    subs.assigned[("t", 1)].seek(9)
    subs.assigned[("t", 1)].committed = 9
    assert subs.positions() == {("t", 0): 4, ("t", 1): 9}
    assert subs.uncommitted(subs.assigned.values()) == {("t", 0): 4}


def test_subscription_without_a_group_may_gain_topics():
    subs = SubscriptionState()
    assert not subs.may_gain_topics() and not subs.subscribed() and subs.subscription() is None
    subs.subscribe(["t", "u"], None)
    subs.assign([("t", 0)])
    assert subs.may_gain_topics()  # u has no partitions yet
    subs.assign([("t", 0), ("u", 0)])
    assert not subs.may_gain_topics()
    subs.group_managed = True
    subs.assign([])
    assert not subs.may_gain_topics()  # the coordinator assigns


def test_auto_commit_timer_runs_every_interval_from_the_last_commit():
    timer = AutoCommitTimer(True, interval_s=5.0, now=100.0)
    assert not timer.due(104.999)
    assert timer.due(105.5)
    assert not timer.due(110.0)  # 5 s after 105.5, not after 105
    assert timer.due(110.5)
    assert not AutoCommitTimer(False, 5.0, 0.0).due(1e9)


def _drain(c: Consumer, n: int) -> int:
    got = 0
    for _ in range(200):
        got += len(c.poll(timeout_ms=0))
        if got >= n:
            break
    return got


def test_auto_commit_interval_on_the_injected_clock():
    md = FakeMetadata({"t": 1})
    coordinator = FakeCoordinator(md)
    fill(md, "t", {0: 30})
    clock = ManualClock()
    c = Consumer(md, group="g", clock=clock, auto_commit_interval_ms=5_000, max_poll_records=10)
    try:
        c.assign([("t", 0)])
        assert _drain(c, 30) == 30
        clock.advance(4_999)
        c.poll(timeout_ms=0)
        assert coordinator.commits == []  # the interval has not passed on the consumer's clock
        clock.advance(1)
        c.poll(timeout_ms=0)
        assert coordinator.committed["g"][("t", 0)] == 30
        assert len(coordinator.commits) == 1
        fill(md, "t", {0: 5})
        assert _drain(c, 5) == 5
        clock.advance(4_999)
        c.poll(timeout_ms=0)
        assert len(coordinator.commits) == 1
        clock.advance(1)
        c.poll(timeout_ms=0)
        assert coordinator.committed["g"][("t", 0)] == 35 and len(coordinator.commits) == 2
    finally:
        c.close()


def test_poll_with_no_wait_returns_at_once_on_a_manual_clock():
    md = FakeMetadata({"t": 1})
    clock = ManualClock()
    with Consumer(md, ["t"], clock=clock) as c:
        start = time.monotonic()
        assert c.poll(timeout_ms=0) == []
        assert time.monotonic() - start < 5


def test_list_offsets_retries_on_the_policy_until_the_request_timeout():
    md = FakeMetadata({"t": 1}, leaders={("t", 0): -1})
    with Consumer(md, request_timeout_ms=400, retry_backoff_ms=50) as c:
        c.assign([("t", 0)])
        before = len(md.refreshes)
        start = time.monotonic()
        with pytest.raises(LeaderNotAvailableError):
            c.seek_to_beginning()
        elapsed = time.monotonic() - start
    # waits of ~50, 100, 200 ms (jitter only shortens), cut at the deadline: a few tries, not one per 50 ms
    assert 0.2 <= elapsed < 3
    assert 2 <= len(md.refreshes) - before <= 6


def test_a_partition_whose_fetches_fail_backs_off_along_the_retry_policy_and_recovers():
    """Fetch errors of one partition wait retry_backoff_ms, doubling to the cap (jitter only
    shortens), instead of a fixed retry_backoff_ms; a fetch that answers starts the curve again."""
    from logbroker.client.backoff import client_retry_policy
    from logbroker.client.consumer.fetcher import Fetcher
    from logbroker.client.consumer.subscription import PartitionState

    fetcher = object.__new__(Fetcher)
    fetcher._policy = client_retry_policy(100, jitter=0.0)
    st = PartitionState("t", 0)
    waits = []
    for _ in range(6):
        fetcher._back_off(st, 50.0)
        waits.append(round((st.retry_at - 50.0) * 1000))
    assert waits == [100, 200, 400, 800, 1000, 1000]
    st.failures = 0  # what a fetch that answers does (Fetcher._take_records)
    fetcher._back_off(st, 50.0)
    assert round((st.retry_at - 50.0) * 1000) == 100
