"""GroupMember: the client's membership state machine, driven with a manual clock (no sockets)."""

from __future__ import annotations

import random

import pytest

from logbroker.client.group_member import (
    RETRY_BACKOFF_MAX_MS,
    GroupMember,
    HeartbeatResponse,
    MemberState,
    Reconciliation,
)
from logbroker.clock import ManualClock
from logbroker.errors import (
    CoordinatorLoadInProgressError,
    FencedMemberEpochError,
    GroupMaxSizeReachedError,
    InvalidRegularExpressionError,
    NotCoordinatorError,
    UnknownMemberIdError,
)

A0, A1, A2, B0 = ("a", 0), ("a", 1), ("a", 2), ("b", 0)


class Harness:
    def __init__(self, **kw: int | str) -> None:
        self.clock = ManualClock()
        self.m = GroupMember("g", "me", retry_backoff_ms=100, **kw)  # type: ignore[arg-type]

    @property
    def now(self) -> int:
        return self.clock.monotonic_ms()

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    def hb(self):
        return self.m.next_heartbeat(self.now)

    def answer(self, epoch: int, assignment=(), interval_ms: int = 500, error=None) -> None:
        self.m.on_response(HeartbeatResponse(error, "me", epoch, interval_ms, frozenset(assignment)), self.now)

    def apply(self) -> Reconciliation | None:
        """What the consumer's poll thread does: revoke, then take."""
        rec = self.m.reconciliation()
        if rec is None:
            return None
        if rec.revoke:
            self.m.revoked(rec.revoke, self.now)
        self.m.assigned(rec.assign, self.now)
        return rec

    def joined(self, assignment=(A0, A1), epoch: int = 1) -> None:
        self.m.subscribe(["a"], "", self.now)
        assert self.hb() is not None
        self.answer(epoch, assignment)
        self.apply()
        if not assignment:
            self.advance(500)
        req = self.hb()  # the prompt heartbeat reporting what it now owns
        assert req is not None and req.owned == tuple(sorted(assignment))
        self.answer(epoch, assignment)
        assert self.m.state is MemberState.STABLE


def test_join_sends_subscription_then_applies_the_assignment():
    h = Harness(assignor="range", session_timeout_ms=6000, rebalance_timeout_ms=9000)
    assert h.hb() is None and h.m.wakeup_ms() is None  # not subscribed
    h.m.subscribe(["b", "a", "a"], "x.*", h.now)
    req = h.hb()
    assert req is not None
    assert (req.member_id, req.member_epoch, req.subscribed_topics, req.subscribed_regex) == ("me", 0, ("a", "b"), "x.*")
    assert (req.assignor, req.session_timeout_ms, req.rebalance_timeout_ms, req.owned) == ("range", 6000, 9000, ())
    assert h.hb() is None  # one in flight at a time
    assert h.m.commit_identity() is None
    h.answer(3, [A0, A1])
    assert h.m.state is MemberState.RECONCILING and h.m.member_epoch == 3
    assert h.m.reconciliation() == Reconciliation(frozenset(), frozenset({A0, A1}), lost=False, joined=True)
    assert h.m.assigned({A0, A1, A2}, h.now) == {A0, A1}  # only what is assigned
    assert h.m.owned == {A0, A1} and h.m.state is MemberState.STABLE
    assert h.m.reconciliation() is None
    assert h.m.commit_identity() == ("me", 3)
    req = h.hb()  # at once: reports what it took
    assert req is not None and req.member_epoch == 3 and req.owned == (A0, A1) and req.subscribed_topics is None


def test_join_with_nothing_assigned_still_announces_once():
    h = Harness()
    h.m.subscribe(["a"], "", h.now)
    h.hb()
    h.answer(1, [])
    assert h.m.state is MemberState.RECONCILING
    assert h.m.reconciliation() == Reconciliation(frozenset(), frozenset(), lost=False, joined=True)
    assert h.m.assigned((), h.now) == frozenset()
    assert h.m.state is MemberState.STABLE and h.m.reconciliation() is None


def test_heartbeats_follow_the_interval_from_the_response():
    h = Harness()
    h.joined()
    assert h.hb() is None
    assert h.m.wakeup_ms() == h.now + 500
    h.advance(499)
    assert h.hb() is None
    h.advance(1)
    req = h.hb()
    assert req is not None and req.owned == (A0, A1)
    h.answer(1, [A0, A1], interval_ms=100)
    h.advance(100)
    assert h.hb() is not None


def test_revocation_is_reported_at_once():
    h = Harness()
    h.joined([A0, A1, A2])
    h.advance(500)
    h.hb()
    h.answer(2, [A0])  # give up a1, a2
    assert h.m.reconciliation() == Reconciliation(frozenset({A1, A2}), frozenset(), lost=False, joined=False)
    assert h.m.commit_identity() == ("me", 2)
    assert h.hb() is None  # not before the poll thread gave them up
    h.advance(10)
    h.m.revoked({A1, A2}, h.now)
    req = h.hb()
    assert req is not None and req.owned == (A0,) and req.member_epoch == 2
    assert h.m.state is MemberState.STABLE


def test_revocation_while_a_heartbeat_is_in_flight_goes_out_right_after_it():
    h = Harness()
    h.joined([A0, A1])
    h.advance(500)
    h.hb()
    h.answer(2, [A0])
    h.advance(500)
    assert h.hb() is not None  # in flight, carrying (a0, a1)
    h.m.revoked({A1}, h.now)
    assert h.hb() is None
    h.answer(2, [A0])
    req = h.hb()  # not after another interval
    assert req is not None and req.owned == (A0,)


def test_assignment_changed_twice_between_polls_applies_only_the_latest():
    h = Harness()
    h.joined([A0])
    h.advance(500)
    h.hb()
    h.answer(2, [A0, A1, A2])
    h.advance(500)
    h.hb()
    h.answer(3, [A0, A2])
    rec = h.m.reconciliation()
    assert rec is not None and rec.assign == {A2} and rec.revoke == frozenset()
    assert h.m.assigned({A1, A2}, h.now) == {A2}  # a1 was taken back meanwhile


@pytest.mark.parametrize("error", [UnknownMemberIdError("evicted"), FencedMemberEpochError("zombie")])
def test_fenced_member_drops_everything_as_lost_then_rejoins_with_its_id(error):
    h = Harness()
    h.joined([A0, A1])
    h.advance(500)
    h.hb()
    h.answer(0, error=error)
    assert h.m.state is MemberState.FENCED and h.m.member_epoch == 0
    assert h.m.commit_identity() is None
    assert h.hb() is None and h.m.wakeup_ms() is None  # nothing until the partitions are dropped
    assert h.m.reconciliation() == Reconciliation(frozenset({A0, A1}), frozenset(), lost=True, joined=False)
    h.m.revoked({A0}, h.now)
    assert h.m.state is MemberState.FENCED
    h.m.revoked({A1}, h.now)
    assert h.m.state is MemberState.JOINING
    req = h.hb()
    assert req is not None and (req.member_id, req.member_epoch, req.subscribed_topics) == ("me", 0, ("a",))
    h.answer(5, [A1])
    rec = h.apply()
    assert rec is not None and rec.joined and rec.assign == {A1}


def test_fenced_with_nothing_owned_rejoins_at_once():
    h = Harness()
    h.joined([])
    h.advance(500)
    h.hb()
    h.answer(0, error=UnknownMemberIdError("coordinator moved"))
    assert h.m.state is MemberState.JOINING
    req = h.hb()
    assert req is not None and req.member_epoch == 0


def test_a_refused_join_is_retried_with_backoff():
    h = Harness()
    h.m.subscribe(["a"], "", h.now)
    h.hb()
    h.answer(0, error=UnknownMemberIdError("odd coordinator"))
    assert h.m.state is MemberState.JOINING and h.hb() is None
    h.advance(100)
    req = h.hb()
    assert req is not None and req.member_epoch == 0


def test_fence_while_on_assign_runs_reports_the_taken_partitions_lost():
    h = Harness()
    h.m.subscribe(["a"], "", h.now)
    h.hb()
    h.answer(1, [A0])
    rec = h.m.reconciliation()
    assert rec is not None
    assert h.m.assigned(rec.assign, h.now) == {A0}  # taken, on_assign about to run
    h.hb()
    h.answer(0, error=UnknownMemberIdError("gone"))
    assert h.m.reconciliation() == Reconciliation(frozenset({A0}), frozenset(), lost=True, joined=False)
    assert h.m.assigned({A0}, h.now) == frozenset()  # nothing can be taken while fenced


def test_retriable_errors_back_off_exponentially_up_to_a_bound():
    h = Harness()
    h.joined()
    h.advance(500)
    delays = []
    for i in range(8):
        assert h.hb() is not None
        if i % 2:
            h.m.on_failure(NotCoordinatorError("moved"), h.now)
        else:
            h.answer(0, error=CoordinatorLoadInProgressError("loading"))
        due = h.m.wakeup_ms()
        assert due is not None
        delays.append(due - h.now)
        h.advance(due - h.now)
    assert delays == [100, 200, 400, 800, RETRY_BACKOFF_MAX_MS, RETRY_BACKOFF_MAX_MS, RETRY_BACKOFF_MAX_MS,
                      RETRY_BACKOFF_MAX_MS]
    assert h.m.state is MemberState.STABLE and h.m.owned == {A0, A1}  # retriable: keeps everything
    h.hb()
    h.answer(1, [A0, A1])
    assert h.m.wakeup_ms() == h.now + 500  # reset


def test_session_lapse_without_answers_fences_the_member():
    h = Harness(session_timeout_ms=3000)
    h.joined()
    for _ in range(10):
        h.advance(500)
        req = h.hb()
        if req is None:
            break
        h.m.on_failure(NotCoordinatorError("down"), h.now)
        h.advance(h.m.wakeup_ms() - h.now)
    assert h.m.state is MemberState.FENCED
    rec = h.m.reconciliation()
    assert rec is not None and rec.lost and rec.revoke == {A0, A1}


def test_non_retriable_error_is_fatal_until_subscribed_again():
    h = Harness()
    h.m.subscribe([], "(", h.now)
    h.hb()
    h.answer(0, error=InvalidRegularExpressionError("bad regex"))
    assert h.m.state is MemberState.FATAL and isinstance(h.m.error, InvalidRegularExpressionError)
    assert h.hb() is None and h.m.wakeup_ms() is None
    h.m.subscribe([], "a.*", h.now)
    assert h.m.state is MemberState.JOINING and h.m.error is None
    req = h.hb()
    assert req is not None and req.subscribed_regex == "a.*"
    h.answer(0, error=GroupMaxSizeReachedError("full"))
    assert h.m.state is MemberState.FATAL


def test_subscription_change_goes_out_promptly_once():
    h = Harness()
    h.joined()
    h.m.subscribe(["a", "b"], "", h.now)
    req = h.hb()
    assert req is not None and req.subscribed_topics == ("a", "b") and req.subscribed_regex == ""
    h.answer(2, [A0, A1, B0])
    h.apply()
    req = h.hb()
    assert req is not None and req.subscribed_topics is None and req.owned == (A0, A1, B0)
    h.m.subscribe(["b", "a"], "", h.now)  # unchanged
    h.answer(2, [A0, A1, B0])
    assert h.hb() is None


def test_subscription_change_during_a_heartbeat_in_flight_is_sent_after_it():
    h = Harness()
    h.joined()
    h.advance(500)
    h.hb()
    h.m.subscribe(["b"], "", h.now)
    h.answer(1, [A0, A1])
    req = h.hb()
    assert req is not None and req.subscribed_topics == ("b",)


def test_leave_sends_epoch_minus_one_then_is_unsubscribed():
    h = Harness()
    h.joined()
    h.m.leave(h.now)
    assert h.m.owned == frozenset() and h.m.state is MemberState.LEAVING
    assert h.m.commit_identity() == ("me", 1)  # may still commit until the leave is answered
    req = h.hb()
    assert req is not None and (req.member_id, req.member_epoch, req.owned) == ("me", -1, None)
    h.answer(-1)
    assert h.m.state is MemberState.UNSUBSCRIBED and h.hb() is None


def test_leave_waits_for_the_heartbeat_in_flight():
    h = Harness()
    h.joined()
    h.advance(500)
    assert h.hb() is not None
    h.m.leave(h.now)
    assert h.hb() is None
    h.answer(2, [A0])
    req = h.hb()
    assert req is not None and req.member_epoch == -1


def test_leave_after_a_join_in_flight_or_failed_is_sent():
    h = Harness()
    h.m.subscribe(["a"], "", h.now)
    h.hb()
    h.m.on_failure(NotCoordinatorError("timed out"), h.now)  # the join may have reached it
    h.m.leave(h.now)
    assert h.m.state is MemberState.LEAVING
    req = h.hb()
    assert req is not None and req.member_epoch == -1


def test_leave_before_any_heartbeat_is_immediate():
    h = Harness()
    h.m.subscribe(["a"], "", h.now)
    h.m.leave(h.now)
    assert h.m.state is MemberState.UNSUBSCRIBED and h.hb() is None


def test_leave_retries_retriable_errors_until_abandoned():
    h = Harness()
    h.joined()
    h.m.leave(h.now)
    h.hb()
    h.answer(0, error=NotCoordinatorError("moved"))
    assert h.m.state is MemberState.LEAVING
    h.advance(100)
    assert h.hb() is not None
    h.m.on_failure(NotCoordinatorError("down"), h.now)
    h.m.abandon()
    assert h.m.state is MemberState.UNSUBSCRIBED
    h.answer(0)  # a late answer changes nothing
    assert h.m.state is MemberState.UNSUBSCRIBED


def test_leave_answered_unknown_member_is_done():
    h = Harness()
    h.joined()
    h.m.leave(h.now)
    h.hb()
    h.answer(0, error=UnknownMemberIdError("already evicted"))
    assert h.m.state is MemberState.UNSUBSCRIBED


def test_leave_from_fenced_still_tells_the_coordinator():
    h = Harness()
    h.joined()
    h.advance(500)
    h.hb()
    h.answer(0, error=FencedMemberEpochError("zombie"))
    h.m.leave(h.now)
    req = h.hb()
    assert req is not None and req.member_epoch == -1


def test_subscribe_while_leaving_rejoins_after_the_leave():
    h = Harness()
    h.joined()
    h.m.leave(h.now)
    h.m.subscribe(["b"], "", h.now)
    req = h.hb()
    assert req is not None and req.member_epoch == -1
    h.answer(-1)
    assert h.m.state is MemberState.JOINING
    req = h.hb()
    assert req is not None and req.member_epoch == 0 and req.subscribed_topics == ("b",)


def test_rejected_arguments():
    with pytest.raises(ValueError):
        GroupMember("", "me")
    with pytest.raises(ValueError):
        GroupMember("g", "")
    with pytest.raises(ValueError, match="assignor"):
        GroupMember("g", "me", assignor="best")
    with pytest.raises(ValueError):
        GroupMember("g", "me", session_timeout_ms=-1)
    with pytest.raises(ValueError):
        GroupMember("g", "me").subscribe([], "", 0)


def test_the_groups_session_timeout_wins_and_a_hanging_heartbeat_does_not_delay_the_fence():
    h = Harness()  # no session timeout configured: the group's, from the coordinator, applies
    h.m.subscribe(["a"], "", h.now)
    assert h.hb() is not None
    h.advance(200)  # the coordinator's clock started when it got the request, before this answer
    h.m.on_response(HeartbeatResponse(None, "me", 1, 500, frozenset({A0}), session_timeout_ms=2000), h.now)
    h.apply()
    h.advance(500)
    assert h.hb() is not None  # in flight, and never answered
    h.advance(1299)  # 1999 ms after the answered heartbeat was sent
    assert h.hb() is None and h.m.state is not MemberState.FENCED
    h.advance(1)
    assert h.hb() is None and h.m.state is MemberState.FENCED
    rec = h.m.reconciliation()
    assert rec is not None and rec.lost and rec.revoke == {A0}
    h.answer(1, (A0,))  # the late answer to the hanging heartbeat changes nothing
    assert h.m.state is MemberState.FENCED


class _Fixed(random.Random):
    """A random source that always draws `u`."""

    def __init__(self, u: float) -> None:
        super().__init__(0)
        self.u = u

    def random(self) -> float:
        return self.u


def test_failure_backoff_doubles_to_a_cap_and_jitter_only_shortens_it():
    def waits(u: float) -> list[int]:
        m = GroupMember("g", "me", retry_backoff_ms=100, rng=_Fixed(u))
        clock = ManualClock()
        m.subscribe(["a"], "", clock.monotonic_ms())
        out = []
        for _ in range(6):
            assert m.next_heartbeat(clock.monotonic_ms()) is not None
            m.on_failure(NotCoordinatorError("moved"), clock.monotonic_ms())
            due = m.wakeup_ms()
            assert due is not None
            out.append(due - clock.monotonic_ms())
            clock.advance(due - clock.monotonic_ms())
        return out

    assert waits(0.0) == [100, 200, 400, 800, 1000, 1000]
    assert waits(0.999) == [80, 160, 320, 640, 800, 800]  # jitter 0.2: down to 80 % of the wait
