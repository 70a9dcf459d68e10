"""LeaderState: follower progress, high watermark, ISR expand/shrink decisions, acks=all status."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.clock import ManualClock
from logbroker.replication.partition_state import UNKNOWN_OFFSET, AckStatus, LeaderState

LAG_MS = 10_000
REGISTERED = {"fetch_broker_epoch": 7, "registered_broker_epoch": 7}  # a live, current follower


def leader(isr=(0, 1, 2), replicas=(0, 1, 2), leo=10, hw=5, clock: ManualClock | None = None) -> LeaderState:
    clock = clock or ManualClock()
    return LeaderState(broker_id=0, leader_epoch=3, replicas=list(replicas), isr=list(isr), zk_version=7,
                       log_end_offset=leo, high_watermark=hw, replica_lag_time_max_ms=LAG_MS,
                       now_ms=clock.monotonic_ms())


def test_hw_waits_for_every_isr_member_and_takes_the_minimum():
    s = leader()
    assert s.high_watermark == 5
    assert not s.follower_fetched(1, 10, 10, 0)  # follower 2's LEO is still unknown
    assert s.follower(2).log_end_offset == UNKNOWN_OFFSET
    assert s.follower_fetched(2, 8, 10, 0)
    assert s.high_watermark == 8
    assert s.follower_fetched(2, 10, 10, 0)
    assert s.high_watermark == 10
    assert not s.leader_appended(15)
    assert not s.follower_fetched(1, 15, 15, 1)
    assert s.high_watermark == 10  # follower 2 is at 10
    assert s.follower_fetched(2, 12, 15, 1) and s.high_watermark == 12


def test_hw_never_goes_back():
    s = leader(hw=9)
    s.follower_fetched(1, 6, 10, 0)
    s.follower_fetched(2, 7, 10, 0)
    assert s.high_watermark == 9  # the min LEO (6) is below the HW the leader already had


def test_single_replica_hw_follows_the_leader():
    s = leader(isr=(0,), replicas=(0,), leo=3, hw=0)
    assert s.high_watermark == 3
    assert s.leader_appended(9) and s.high_watermark == 9


def test_caught_up_time_follows_kafkas_rule():
    clock = ManualClock()
    s = leader(clock=clock)
    f = s.follower(1)
    assert f.last_caught_up_ms == 0  # ISR members start caught up
    clock.advance(100)
    s.follower_fetched(1, 10, 10, clock.monotonic_ms())  # at the leader's LEO: caught up now
    assert f.last_caught_up_ms == 100
    clock.advance(100)
    s.leader_appended(20)
    s.follower_fetched(1, 10, 20, clock.monotonic_ms())  # behind, but at the LEO of its previous fetch
    assert f.last_caught_up_ms == 100  # ...so caught up as of that fetch (t=100)
    clock.advance(100)
    s.follower_fetched(1, 15, 20, clock.monotonic_ms())  # below the LEO at its previous fetch (20)
    assert f.last_caught_up_ms == 100
    clock.advance(100)
    s.follower_fetched(1, 20, 25, clock.monotonic_ms())  # reached the LEO of its previous fetch
    assert f.last_caught_up_ms == 300


def test_shrink_removes_followers_that_lag_too_long():
    clock = ManualClock()
    s = leader(clock=clock)
    s.follower_fetched(1, 10, 10, 0)
    s.follower_fetched(2, 10, 10, 0)
    s.leader_appended(12)
    clock.advance(LAG_MS)
    assert s.maybe_shrink_isr(clock.monotonic_ms()) is None  # exactly at the limit
    s.follower_fetched(1, 12, 12, clock.monotonic_ms())
    clock.advance(1)
    assert s.maybe_shrink_isr(clock.monotonic_ms()) == [0, 1]
    s.isr_change_started([0, 1])
    assert s.isr_change_in_flight
    assert s.maybe_shrink_isr(clock.monotonic_ms()) is None  # one change at a time
    assert s.has_enough_replicas(3)  # not committed yet: the old ISR still counts
    assert s.isr_change_committed([0, 1], 8)
    assert s.isr == [0, 1] and s.zk_version == 8
    assert s.high_watermark == 12  # follower 2 no longer holds it back
    assert not s.has_enough_replicas(3)


def test_idle_follower_at_the_leaders_leo_stays_in_sync():
    clock = ManualClock()
    s = leader(clock=clock)
    s.follower_fetched(1, 10, 10, 0)
    s.follower_fetched(2, 10, 10, 0)
    clock.advance(10 * LAG_MS)
    assert s.maybe_shrink_isr(clock.monotonic_ms()) is None


def test_follower_that_never_fetches_is_shrunk():
    clock = ManualClock()
    s = leader(clock=clock)
    s.follower_fetched(1, 10, 10, 0)
    clock.advance(LAG_MS + 1)
    assert s.maybe_shrink_isr(clock.monotonic_ms()) == [0, 1]


def test_expand_needs_hw_and_epoch_start():
    s = leader(isr=(0, 1), leo=10, hw=10)
    s.follower_fetched(1, 10, 10, 0)
    assert s.epoch_start_offset == 10
    assert s.maybe_expand_isr(2, **REGISTERED) is None  # unknown LEO
    s.follower_fetched(2, 9, 10, 0)
    assert s.maybe_expand_isr(2, **REGISTERED) is None  # below the HW
    s.follower_fetched(2, 10, 10, 0)
    assert s.maybe_expand_isr(2, **REGISTERED) == [0, 1, 2]
    assert s.maybe_expand_isr(1, **REGISTERED) is None  # already in
    s.isr_change_started([0, 1, 2])
    # While the expansion is in flight the joining follower already holds the HW back.
    s.leader_appended(20)
    s.follower_fetched(1, 20, 20, 1)
    assert s.high_watermark == 10
    assert s.isr_change_failed()  # without follower 2 the HW moves at once
    assert s.isr == [0, 1] and s.high_watermark == 20
    s.follower_fetched(2, 20, 20, 3)
    assert s.maybe_expand_isr(2, **REGISTERED) == [0, 1, 2]


def test_expand_waits_for_the_epoch_start_offset():
    s = leader(isr=(0, 1), leo=10, hw=4)
    s.follower_fetched(1, 4, 10, 0)
    s.follower_fetched(2, 6, 10, 0)
    assert s.high_watermark == 4
    assert s.maybe_expand_isr(2, **REGISTERED) is None  # >= HW but below the epoch start (10)
    s.follower_fetched(2, 10, 10, 0)
    assert s.maybe_expand_isr(2, **REGISTERED) == [0, 1, 2]


def test_commit_of_an_older_version_is_ignored():
    s = leader()
    s.isr_change_started([0, 1])
    s.update_membership([0, 1, 2], [0, 1], 9, 0)  # the controller's newer state arrived first
    assert not s.isr_change_committed([0, 1], 8)
    assert s.zk_version == 9 and not s.isr_change_in_flight


def test_membership_update_keeps_progress_and_adds_new_followers():
    s = leader(isr=(0, 1), replicas=(0, 1))
    s.follower_fetched(1, 10, 10, 0)
    s.update_membership([0, 1, 3], [0, 1], 8, 50)
    assert s.follower(1).log_end_offset == 10
    assert s.follower(3).log_end_offset == UNKNOWN_OFFSET and s.follower(3).last_caught_up_ms == -1
    s.update_membership([0, 3], [0], 9, 60)
    assert s.follower(1) is None


def test_ack_status():
    s = leader(isr=(0, 1), replicas=(0, 1), leo=10, hw=5)
    assert s.ack_status(8, 2) is AckStatus.WAITING
    s.follower_fetched(1, 8, 10, 0)
    assert s.ack_status(8, 2) is AckStatus.DONE
    assert s.ack_status(9, 2) is AckStatus.WAITING
    s.isr_change_started([0])
    s.isr_change_committed([0], 8)
    assert s.ack_status(9, 2) is AckStatus.NOT_ENOUGH_REPLICAS_AFTER_APPEND
    assert s.ack_status(9, 1) is AckStatus.DONE  # the HW followed the leader once alone


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        leader(isr=(1, 2))
    with pytest.raises(ValueError):
        leader(hw=11)
    s = leader()
    with pytest.raises(ValueError):
        s.follower_fetched(7, 1, 10, 0)  # not a replica
    with pytest.raises(ValueError):
        s.follower_fetched(1, 11, 10, 0)  # past the leader's LEO
    with pytest.raises(ValueError):
        s.isr_change_started([1, 2])  # the leader cannot leave
    with pytest.raises(ValueError):
        s.leader_appended(9)


# Events: append n records; follower f fetches at some offset in [its LEO, leader LEO]; time passes;
# shrink proposal (committed or failed); expand proposal (committed or failed).
EVENT = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 5)),
    st.tuples(st.just("fetch"), st.integers(1, 3), st.integers(0, 6)),
    st.tuples(st.just("tick"), st.integers(1, 2 * LAG_MS)),
    st.tuples(st.just("shrink"), st.booleans()),
    st.tuples(st.just("expand"), st.integers(1, 3), st.booleans()),
)


@settings(max_examples=300, deadline=None)
@given(events=st.lists(EVENT, max_size=80), start_hw=st.integers(0, 5))
def test_hw_is_monotonic_and_bounded_by_the_isr(events, start_hw):
    clock = ManualClock()
    s = LeaderState(broker_id=0, leader_epoch=1, replicas=[0, 1, 2, 3], isr=[0, 1, 2], zk_version=0,
                    log_end_offset=5, high_watermark=start_hw, replica_lag_time_max_ms=LAG_MS, now_ms=0)
    leos = {1: -1, 2: -1, 3: -1}
    version = 0
    for event in events:
        before = s.high_watermark
        kind = event[0]
        if kind == "append":
            s.leader_appended(s.log_end_offset + event[1])
        elif kind == "fetch":
            f, ahead = event[1], event[2]
            offset = min(s.log_end_offset, max(leos[f], 0) + ahead)
            s.follower_fetched(f, offset, s.log_end_offset, clock.monotonic_ms())
            leos[f] = offset
        elif kind == "tick":
            clock.advance(event[1])
        elif kind == "shrink":
            proposed = s.maybe_shrink_isr(clock.monotonic_ms())
            if proposed is not None:
                assert 0 in proposed and set(proposed) < set(s.isr)
                s.isr_change_started(proposed)
                if event[1]:
                    version += 1
                    s.isr_change_committed(proposed, version)
                else:
                    s.isr_change_failed()
        else:
            proposed = s.maybe_expand_isr(event[1], **REGISTERED)
            if proposed is not None:
                assert leos[event[1]] >= s.high_watermark
                s.isr_change_started(proposed)
                if event[2]:
                    version += 1
                    s.isr_change_committed(proposed, version)
                else:
                    s.isr_change_failed()
        assert s.high_watermark >= before, "the high watermark went back"
        assert s.high_watermark <= s.log_end_offset
        if s.high_watermark > before:  # it moved: every ISR member has it
            assert all(leos[b] >= s.high_watermark for b in s.maximal_isr if b != 0), (s.isr, leos)
        assert 0 in s.isr


def test_expand_only_a_registered_broker_at_its_current_epoch():
    """KIP-841: fetches of a fenced broker (not in the metadata) or of an earlier incarnation (an
    older broker epoch), or without an epoch, never put it in the ISR, however caught up."""
    s = leader(isr=(0, 1), leo=10, hw=10)
    s.follower_fetched(1, 10, 10, 0)
    s.follower_fetched(2, 10, 10, 0)
    assert s.maybe_expand_isr(2, fetch_broker_epoch=7, registered_broker_epoch=None) is None  # not registered
    assert s.maybe_expand_isr(2, fetch_broker_epoch=5, registered_broker_epoch=7) is None  # stale incarnation
    assert s.maybe_expand_isr(2, fetch_broker_epoch=9, registered_broker_epoch=7) is None  # metadata not there yet
    assert s.maybe_expand_isr(2, fetch_broker_epoch=0, registered_broker_epoch=0) is None  # no epoch: no skip
    assert s.maybe_expand_isr(2, fetch_broker_epoch=-1, registered_broker_epoch=-1) is None
    assert s.maybe_expand_isr(2, fetch_broker_epoch=7, registered_broker_epoch=7) == [0, 1, 2]
