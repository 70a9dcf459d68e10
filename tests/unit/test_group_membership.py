"""Group membership (KIP-848 style), driven by simulated members and a manual clock: no sockets."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.clock import ManualClock
from logbroker.errors import InvalidGroupIdError, InvalidRequestError, InvalidTopicError, UnknownMemberIdError
from logbroker.group.assignor import (
    Assignor,
    RangeAssignor,
    RoundRobinAssignor,
    StickyAssignor,
    TopicPartition,
)
from logbroker.group.membership import (
    FencedMemberEpochError,
    Group,
    GroupMaxSizeReachedError,
    GroupState,
    HeartbeatResult,
    InvalidRegularExpressionError,
    MemberState,
    StaleMemberEpochError,
)

SESSION_MS = 10_000
REBALANCE_MS = 30_000


def make_group(assignor: Assignor | None = None, clock: ManualClock | None = None, **kw) -> Group:
    ids = (f"m{i}" for i in itertools.count(1))
    return Group("g", assignor or StickyAssignor(), clock or ManualClock(), SESSION_MS, REBALANCE_MS,
                 new_member_id=lambda: next(ids), **kw)


def tps(topic: str, *ps: int) -> set[TopicPartition]:
    return {(topic, p) for p in ps}


class Member:
    """A client: takes new partitions at once, gives revoked ones up only when it has finished with them
    (offsets committed), and reports what it owns on every heartbeat unless told to send a light one."""

    def __init__(self, group: Group, topics: list[str] | None = None, regex: str | None = None,
                 member_id: str = "") -> None:
        self.group = group
        self.topics, self.regex = topics, regex
        self.member_id, self.epoch = member_id, 0  # "": the coordinator picks the id
        self.owned: set[TopicPartition] = set()
        self.revoking: set[TopicPartition] = set()  # still owned, being given up
        self.send_subscription = True

    def finish_revoke(self) -> None:
        self.owned -= self.revoking
        self.revoking = set()

    def beat(self, counts: dict[str, int] | None = None, lose_response: bool = False, light: bool = False,
             finish_revoke: bool = True) -> HeartbeatResult:
        if finish_revoke:
            self.finish_revoke()
        sub = self.send_subscription or self.epoch == 0
        r = self.group.heartbeat(
            self.member_id, self.epoch,
            subscribed_topics=self.topics if sub else None, subscribed_regex=self.regex if sub else None,
            owned_partitions=None if light else set(self.owned), topic_partition_counts=counts)
        if lose_response:
            return r
        if r.error is not None:
            assert isinstance(r.error, (FencedMemberEpochError, UnknownMemberIdError)), r.error
            self.owned, self.revoking, self.epoch = set(), set(), 0  # drop everything, rejoin on the next beat
        else:
            self.member_id, self.epoch = r.member_id, r.member_epoch
            self.revoking = self.owned - r.assignment
            self.owned = set(r.assignment) | self.revoking
            self.send_subscription = False
        return r

    def leave(self) -> HeartbeatResult:
        r = self.group.heartbeat(self.member_id, -1)
        self.owned, self.revoking, self.epoch = set(), set(), 0
        return r

    def resubscribe(self, topics: list[str] | None = None, regex: str | None = None) -> None:
        self.topics, self.regex, self.send_subscription = topics, regex, True


def check_invariants(group: Group, members: list[Member]) -> None:
    """Nobody shares a partition: neither in the coordinator's records nor in what live clients own."""
    d = group.describe()
    owner: dict[TopicPartition, str] = {}
    for m in d.members:
        assert not set(m.assigned) & set(m.revoking)
        for tp in m.assigned + m.revoking:
            assert tp not in owner, f"{tp} owned by {owner[tp]} and {m.member_id}"
            owner[tp] = m.member_id
    records = {m.member_id: set(m.assigned) | set(m.revoking) for m in d.members}
    for c in members:
        if c.member_id in records:
            assert c.owned <= records[c.member_id], f"{c.member_id} owns {c.owned - records[c.member_id]} unrecorded"
        else:
            assert not group.commit_allowed(c.member_id, c.epoch)  # an evicted zombie cannot commit


def settle(group: Group, members: list[Member], counts: dict[str, int] | None = None, rounds: int = 6) -> None:
    for _ in range(rounds):
        errors = 0
        for c in members:
            errors += c.beat(counts).error is not None
            check_invariants(group, members)
        if not errors and group.state is (GroupState.STABLE if members else GroupState.EMPTY):
            return
    raise AssertionError(f"group did not settle: {group.describe()}")


def owned_by(group: Group) -> dict[str, set[TopicPartition]]:
    return {m.member_id: set(m.assigned) for m in group.describe().members}


# -- joining ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("assignor", [StickyAssignor(), RangeAssignor(), RoundRobinAssignor()], ids=lambda a: a.name)
def test_one_then_three_members_share_twelve_partitions(assignor: Assignor):
    g = make_group(assignor)
    counts = {"t": 12}
    a, b, c = (Member(g, ["t"]) for _ in range(3))
    assert g.state is GroupState.EMPTY
    r = a.beat(counts)
    assert (r.member_id, r.member_epoch, r.assignment) == ("m1", 1, frozenset(tps("t", *range(12))))
    assert g.state is GroupState.STABLE
    for joiner in (b, c):
        joiner.beat()
        check_invariants(g, [a, b, c])
    assert b.owned == c.owned == set()  # a has not released anything yet
    assert g.state is GroupState.RECONCILING and g.group_epoch == 3
    settle(g, [a, b, c])
    assert [len(x.owned) for x in (a, b, c)] == [4, 4, 4]
    assert a.owned | b.owned | c.owned == tps("t", *range(12))
    assert {x.epoch for x in (a, b, c)} == {3}


def test_a_partition_moves_only_after_its_old_owner_reports_it_released():
    g = make_group()
    a, b = Member(g, ["t"]), Member(g, ["t"])
    a.beat({"t": 4})
    b.beat()
    assert g.describe().members[1].state is MemberState.UNRELEASED_PARTITIONS and b.owned == set()
    r = g.heartbeat(a.member_id, a.epoch)  # a light heartbeat (owned unchanged) learns what to revoke
    assert len(r.assignment) == 2 and r.member_epoch == 1
    desc_a = g.describe().members[0]
    assert desc_a.state is MemberState.UNREVOKED_PARTITIONS and len(desc_a.revoking) == 2
    assert g.heartbeat(a.member_id, a.epoch).assignment == r.assignment  # still owns them: nothing moves
    assert b.beat().assignment == frozenset()
    a.owned = set(r.assignment)  # the client revokes (commits, stops fetching) ...
    assert a.beat().member_epoch == 2  # ... and says so: a catches up with the group epoch
    assert b.beat().assignment == frozenset(desc_a.revoking)
    assert g.state is GroupState.STABLE


def test_unaffected_members_keep_their_partitions_and_move_to_the_new_epoch():
    g = make_group()
    a, b, c = (Member(g, ["t"]) for _ in range(3))
    a.beat({"t": 12})
    settle(g, [a, b, c])
    before_a = set(a.owned)
    c.beat({"t": 12, "other": 3})  # metadata for a topic nobody subscribes to: no epoch bump
    assert g.group_epoch == 3
    d = Member(g, ["u"])  # joins on another topic: the target of a, b, c does not change
    d.beat({"t": 12, "u": 2})
    assert g.group_epoch == 4
    r = a.beat()
    assert r.member_epoch == 4 and set(r.assignment) == before_a
    assert g.describe().members[0].state is MemberState.STABLE


# -- leaving and eviction -----------------------------------------------------------------------------


def test_a_leaving_member_frees_its_partitions_at_once():
    g = make_group()
    a, b, c = (Member(g, ["t"]) for _ in range(3))
    a.beat({"t": 12})
    settle(g, [a, b, c])
    freed, kept_a, kept_b = set(c.owned), set(a.owned), set(b.owned)
    r = c.leave()
    assert r.error is None and r.member_epoch == -1 and r.assignment == frozenset()
    assert c.member_id not in owned_by(g)
    settle(g, [a, b])
    assert kept_a <= a.owned and kept_b <= b.owned and (a.owned | b.owned) == kept_a | kept_b | freed
    assert len(a.owned) == len(b.owned) == 6
    assert isinstance(g.heartbeat(c.member_id, -1).error, UnknownMemberIdError)
    b.leave()
    a.leave()
    assert g.state is GroupState.EMPTY and g.describe().members == ()


def test_session_timeout_evicts_a_silent_member():
    clock = ManualClock()
    g = make_group(clock=clock)
    a, b, c = (Member(g, ["t"]) for _ in range(3))
    a.beat({"t": 12})
    settle(g, [a, b, c])
    assert g.next_deadline_ms() == clock.monotonic_ms() + SESSION_MS
    epoch = g.group_epoch
    for _ in range(3):  # a and b keep beating, c is frozen
        clock.advance(SESSION_MS // 4)
        assert g.expire() == []
        a.beat()
        b.beat()
    clock.advance(SESSION_MS // 4 - 1)
    assert g.expire() == []
    clock.advance(1)
    assert g.expire() == [c.member_id]
    assert g.group_epoch == epoch + 1 and c.member_id not in owned_by(g)
    assert not g.commit_allowed(c.member_id, c.epoch)  # the zombie's commit is rejected
    settle(g, [a, b])
    assert len(a.owned) == len(b.owned) == 6
    r = c.beat()  # it wakes up: unknown, drops its partitions, rejoins as a new member
    assert isinstance(r.error, UnknownMemberIdError) and c.owned == set()
    c.beat()
    settle(g, [a, b, c])
    assert [len(x.owned) for x in (a, b, c)] == [4, 4, 4]


def test_a_member_that_does_not_revoke_in_time_is_evicted():
    clock = ManualClock()
    g = make_group(clock=clock)
    a, b = Member(g, ["t"]), Member(g, ["t"])
    a.beat({"t": 4})
    b.beat()
    stuck = set(a.owned)
    a.beat()  # told to give up two partitions, but the client keeps them (a stuck rebalance listener)
    for _ in range(REBALANCE_MS // 5_000):
        clock.advance(5_000)
        a.owned = stuck
        g.heartbeat(a.member_id, a.epoch, owned_partitions=stuck)
        b.beat()
        assert b.owned == set()
    assert g.expire() == [a.member_id]
    b.beat()
    assert b.owned == tps("t", 0, 1, 2, 3)


# -- fencing ------------------------------------------------------------------------------------------


def test_stale_and_future_epochs_are_fenced_and_commits_too():
    g = make_group()
    a, b = Member(g, ["t"]), Member(g, ["t"])
    a.beat({"t": 4})
    b.beat()
    settle(g, [a, b])
    assert a.epoch == 2
    assert g.commit_allowed(a.member_id, 2)
    stale = g.commit_error(a.member_id, 1)
    assert isinstance(stale, StaleMemberEpochError) and "epoch 2" in stale.message
    assert isinstance(g.commit_error("nobody", 2), UnknownMemberIdError)
    assert isinstance(g.commit_error("", -1), UnknownMemberIdError)  # members exist: no anonymous commits
    r = g.heartbeat(a.member_id, 3, owned_partitions=a.owned)
    assert isinstance(r.error, FencedMemberEpochError) and r.assignment == frozenset()
    assert isinstance(g.heartbeat("nobody", 2).error, UnknownMemberIdError)
    c = Member(g, ["t"])
    c.beat()
    settle(g, [a, b, c])  # epoch 3 now; a's previous epoch is 2, so epoch 1 is a zombie's
    r = g.heartbeat(a.member_id, 1, owned_partitions=set())
    assert isinstance(r.error, FencedMemberEpochError) and "rejoin" in str(r.error)
    assert owned_by(g)[a.member_id] == a.owned  # the fenced heartbeat changed nothing
    # A fenced member rejoins with epoch 0 under its id, having dropped its partitions.
    a.owned, a.epoch = set(), 0
    r = a.beat()
    assert r.error is None and r.member_id == "m1" and r.member_epoch == 3
    settle(g, [a, b, c])


def test_previous_epoch_is_accepted_when_the_response_was_lost():
    g = make_group()
    a, b = Member(g, ["t"]), Member(g, ["t"])
    a.beat({"t": 4})
    b.beat()
    a.beat()  # revoke two
    r = a.beat(lose_response=True)  # released; the reply moving a to epoch 2 is lost
    assert r.member_epoch == 2 and a.epoch == 1
    assert a.beat().error is None and a.epoch == 2  # epoch 1 is a's previous epoch and it owns a subset
    # ... but not with partitions outside its assignment:
    settle(g, [a, b])
    c = Member(g, ["t"])
    c.beat()
    settle(g, [a, b, c])
    r = g.heartbeat(a.member_id, 2, owned_partitions=b.owned)
    assert isinstance(r.error, FencedMemberEpochError)


def test_fenced_heartbeats_do_not_extend_the_session():
    clock = ManualClock()
    g = make_group(clock=clock)
    a = Member(g, ["t"])
    a.beat({"t": 2})
    clock.advance(SESSION_MS - 1)
    assert g.heartbeat(a.member_id, 7, owned_partitions=a.owned).error is not None
    clock.advance(1)
    assert g.expire() == [a.member_id]
    assert g.commit_allowed("", -1)  # an empty group takes commits from outside any membership


# -- subscriptions and metadata -----------------------------------------------------------------------


def test_subscription_change_moves_only_what_it_must():
    g = make_group()
    a, b = Member(g, ["t"]), Member(g, ["t"])
    counts = {"t": 6, "u": 3}
    a.beat(counts)
    b.beat()
    settle(g, [a, b])
    a_before = set(a.owned)
    epoch = g.group_epoch
    b.resubscribe(["u"])
    r = b.beat()
    assert g.group_epoch == epoch + 1
    assert r.assignment == frozenset() and g.describe().members[1].state is MemberState.UNREVOKED_PARTITIONS
    settle(g, [a, b])
    assert a.owned == tps("t", *range(6)) and a_before <= a.owned and b.owned == tps("u", 0, 1, 2)
    assert g.describe().members[1].subscribed_topics == ("u",)


def test_partitions_added_to_a_topic_are_assigned_and_nobody_loses_any():
    g = make_group()
    a, b, c = (Member(g, ["t"]) for _ in range(3))
    a.beat({"t": 12})
    settle(g, [a, b, c])
    before = {x.member_id: set(x.owned) for x in (a, b, c)}
    epoch = g.group_epoch
    settle(g, [a, b, c], counts={"t": 15})
    assert g.group_epoch == epoch + 1
    assert all(before[x.member_id] <= x.owned and len(x.owned) == 5 for x in (a, b, c))
    assert not g.update_metadata({"t": 15})  # the same metadata again: no bump
    # The topic is deleted: its partitions are revoked and the group settles with nothing.
    settle(g, [a, b, c], counts={})
    assert a.owned == b.owned == c.owned == set()


def test_regex_subscription_picks_up_topics_created_later():
    g = make_group()
    a = Member(g, regex=r"orders-.*")
    b = Member(g, ["payments"])
    r = a.beat({"orders-eu": 2, "xorders-1": 4, "payments": 1})
    assert r.assignment == frozenset(tps("orders-eu", 0, 1))  # fullmatch: xorders-1 is not a match
    b.beat()
    epoch = g.group_epoch
    r = b.beat({"orders-eu": 2, "xorders-1": 4, "payments": 1, "orders-us": 3})  # any member's heartbeat
    assert g.group_epoch == epoch + 1 and r.assignment == frozenset(tps("payments", 0))
    assert a.beat().assignment == frozenset(tps("orders-eu", 0, 1) | tps("orders-us", 0, 1, 2))
    # Switching the regex off ("") leaves the member with no topics.
    a.resubscribe(regex="")
    settle(g, [a, b])
    assert a.owned == set() and g.describe().members[0].subscribed_regex == ""


def test_names_and_regex_together():
    g = make_group()
    a = Member(g, ["plain"], regex=r"re-\d+")
    r = a.beat({"plain": 1, "re-1": 1, "re-x": 1})
    assert r.assignment == frozenset({("plain", 0), ("re-1", 0)})


# -- bounds and bad input -----------------------------------------------------------------------------


def test_bad_input_is_rejected_and_changes_nothing():
    g = make_group(members_max=2)
    a, b = Member(g, ["t"]), Member(g, ["t"])
    a.beat({"t": 4})
    b.beat()
    before = g.describe()
    cases = [
        (dict(member_id="", member_epoch=0, subscribed_topics=["t"]), GroupMaxSizeReachedError),
        (dict(member_id="", member_epoch=0), InvalidRequestError),  # no subscription
        (dict(member_id="", member_epoch=3), InvalidRequestError),
        (dict(member_id=a.member_id, member_epoch=-2), InvalidRequestError),
        (dict(member_id="x" * 256, member_epoch=0, subscribed_topics=["t"]), InvalidRequestError),
        (dict(member_id=a.member_id, member_epoch=a.epoch, subscribed_regex="(unclosed"),
         InvalidRegularExpressionError),
        (dict(member_id=a.member_id, member_epoch=a.epoch, subscribed_regex="a" * 1001),
         InvalidRegularExpressionError),
        (dict(member_id=a.member_id, member_epoch=a.epoch, subscribed_topics=["bad/name"]), InvalidTopicError),
        (dict(member_id=a.member_id, member_epoch=a.epoch, subscribed_topics=[f"t{i}" for i in range(10_001)]),
         InvalidRequestError),
        (dict(member_id=a.member_id, member_epoch=a.epoch + 5, topic_partition_counts={"t": 8}),
         FencedMemberEpochError),
    ]
    for kwargs, error in cases:
        r = g.heartbeat(**kwargs)  # type: ignore[arg-type]
        assert isinstance(r.error, error), (kwargs, r.error)
        assert g.describe() == before
    with pytest.raises(InvalidGroupIdError):
        make_group_named("a/b")
    with pytest.raises(InvalidGroupIdError):
        make_group_named("")


def make_group_named(group_id: str) -> Group:
    return Group(group_id, StickyAssignor(), ManualClock())


def test_a_full_group_fills_to_its_bound():
    g = Group("big", StickyAssignor(), ManualClock())
    counts = {"t": 2000}
    results = [g.heartbeat(f"c{i:04}", 0, subscribed_topics=["t"], topic_partition_counts=counts) for i in range(1000)]
    assert all(r.error is None for r in results)
    assert isinstance(g.heartbeat("one-more", 0, subscribed_topics=["t"]).error, GroupMaxSizeReachedError)
    assert g.heartbeat("c0000", 0, subscribed_topics=["t"]).error is None  # a rejoin is not a new member


def test_describe_shows_members_targets_and_states():
    g = make_group()
    a, b = Member(g, ["t"]), Member(g, ["t"])
    a.beat({"t": 2})
    b.beat()
    d = g.describe()
    assert (d.group_id, d.state, d.group_epoch, d.assignment_epoch, d.assignor) == (
        "g", GroupState.RECONCILING, 2, 2, "sticky")
    ma, mb = d.members
    assert (ma.member_id, ma.member_epoch, ma.state, ma.assigned, ma.subscribed_topics) == (
        "m1", 1, MemberState.STABLE, (("t", 0), ("t", 1)), ("t",))
    assert (mb.member_id, mb.member_epoch, mb.state, mb.assigned) == (
        "m2", 2, MemberState.UNRELEASED_PARTITIONS, ())
    assert len(ma.target) == len(mb.target) == 1 and ma.session_deadline_ms > 0


# -- randomized interleavings -------------------------------------------------------------------------

OPS = ["beat"] * 4 + ["light"] * 2 + ["revoke"] * 3 + ["lost", "leave", "advance", "subscribe", "grow", "new_topic"]


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 2)), min_size=10, max_size=80),
       assignor=st.sampled_from([StickyAssignor(), RangeAssignor(), RoundRobinAssignor()]))
def test_no_partition_is_ever_owned_twice_in_any_interleaving(steps, assignor):
    clock = ManualClock()
    g = Group("g", assignor, clock, SESSION_MS, REBALANCE_MS)
    counts = {"t": 12}
    clients = [Member(g, ["t"], member_id=f"c{i}") for i in range(3)]  # client-chosen ids (KIP-1082)
    active: set[int] = set()
    for op, i in steps:
        c = clients[i]
        if op == "beat" and i not in active:  # join
            active.add(i)
            c.beat(dict(counts))
        elif op in ("beat", "lost", "light") and i in active:
            c.beat(dict(counts), lose_response=(op == "lost"), light=(op == "light"), finish_revoke=False)
        elif op == "revoke":
            c.finish_revoke()
        elif op == "leave" and i in active:
            active.discard(i)
            c.leave()
        elif op == "advance":
            clock.advance(SESSION_MS // 4 * (i + 1))
            for evicted in g.expire():
                assert not g.commit_allowed(evicted, 1)
        elif op == "subscribe" and i in active:
            c.resubscribe(["t", "u"] if c.topics == ["t"] else ["t"], regex=r"new-\d" if i % 2 else None)
        elif op == "grow":
            counts["t"] += i + 1
        elif op == "new_topic":
            counts[f"new-{i}"] = i + 1
            counts["u"] = 2
        check_invariants(g, clients)
    # With everyone beating and no time passing the group settles, and every partition has an owner.
    live = [clients[i] for i in sorted(active)]
    settle(g, live, counts=dict(counts), rounds=8)
    d = g.describe()
    assert {m.member_id for m in d.members} == {c.member_id for c in live}
    for c in live:
        assert c.owned == set(next(m.target for m in d.members if m.member_id == c.member_id))
        assert g.commit_allowed(c.member_id, c.epoch)
    subscribed = {t for m in d.members for t in m.subscribed_topics}
    subscribed |= {t for m in d.members if m.subscribed_regex for t in counts if t.startswith("new-")}
    expected = {(t, p) for t in subscribed for p in range(counts.get(t, 0))}
    assert set().union(*(c.owned for c in live)) == expected


# -- persistence: snapshot / restore (what a new coordinator loads after a failover) -------------------


def test_snapshot_restore_mid_rebalance_keeps_owners_and_epochs() -> None:
    import json

    clock = ManualClock()
    g = make_group(clock=clock)
    counts = {"t": 6}
    a, b = Member(g, ["t"]), Member(g, ["t"])
    settle(g, [a, b], counts)
    c = Member(g, ["t"])
    c.beat(counts)
    a.beat(counts, finish_revoke=False)  # a is told to give something up and has not yet
    assert a.revoking
    fingerprint = g.ownership_fingerprint(a.member_id)
    snap = json.loads(json.dumps(g.snapshot()))
    clock.advance(SESSION_MS - 1)  # a fresh session starts at the restore, whatever the old deadlines
    r = Group.restore("g", snap, StickyAssignor(), clock)
    assert r.ownership_fingerprint(a.member_id) == fingerprint
    before, after = g.describe(), r.describe()
    assert (after.group_epoch, after.assignment_epoch, after.state) == (before.group_epoch, before.assignment_epoch,
                                                                        before.state)
    assert [(m.member_id, m.member_epoch, m.assigned, m.revoking, m.target) for m in after.members] == \
        [(m.member_id, m.member_epoch, m.assigned, m.revoking, m.target) for m in before.members]
    for m in (a, b, c):
        m.group = r
    check_invariants(r, [a, b, c])
    assert r.expire(clock.monotonic_ms() + SESSION_MS - 1) == []
    settle(r, [a, b, c], counts)
    assert sorted(len(p) for p in owned_by(r).values()) == [2, 2, 2]


def test_restore_refuses_a_snapshot_that_gives_a_partition_twice() -> None:
    g = make_group()
    a, b = Member(g, ["t"]), Member(g, ["t"])
    settle(g, [a, b], {"t": 2})
    snap = g.snapshot()
    members = snap["members"]
    assert isinstance(members, list)
    members[1]["assigned"] = members[0]["assigned"]
    with pytest.raises(ValueError):
        Group.restore("g", snap, StickyAssignor(), ManualClock())


def test_regex_subscriptions_run_in_linear_time_and_reject_what_re2_cannot_do() -> None:
    import time

    g = make_group()
    counts = {"a" * 200: 1, "orders-1": 2}
    started = time.monotonic()
    m = Member(g, regex="(.|..|...)*#")  # catastrophic backtracking for a backtracking engine
    assert m.beat(counts).error is None
    m2 = Member(g, regex="(a|aa)*b")
    assert m2.beat(counts).error is None
    assert time.monotonic() - started < 1.0
    r = g.heartbeat("", 0, subscribed_regex=r"(o)\1", topic_partition_counts=counts)
    assert isinstance(r.error, InvalidRegularExpressionError)
