"""Assignors: every subscribed partition exactly once, balance, Kafka's examples, sticky moves the minimum."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.group.assignor import (
    ASSIGNORS,
    Assignor,
    MemberSubscription,
    RangeAssignor,
    RoundRobinAssignor,
    StickyAssignor,
    TopicPartition,
)

ALL = [RangeAssignor(), RoundRobinAssignor(), StickyAssignor()]
TOPICS = ["a", "b", "c", "missing"]  # "missing" is never created


def subs(**topics: str) -> dict[str, MemberSubscription]:
    return {m: MemberSubscription(frozenset(t.split(","))) for m, t in topics.items()}


def tps(topic: str, *ps: int) -> set[TopicPartition]:
    return {(topic, p) for p in ps}


# -- strategies ---------------------------------------------------------------------------------------

member_ids = st.lists(st.sampled_from([f"m{i}" for i in range(8)]), min_size=0, max_size=8, unique=True)
partition_counts = st.fixed_dictionaries({"a": st.integers(0, 13), "b": st.integers(0, 7), "c": st.integers(0, 3)})


@st.composite
def group_inputs(draw, uniform: bool = False):
    counts = draw(partition_counts)
    ids = draw(member_ids)
    if uniform:
        same = frozenset(draw(st.sets(st.sampled_from(TOPICS), min_size=1)))
        members = {m: MemberSubscription(same) for m in ids}
    else:
        members = {m: MemberSubscription(frozenset(draw(st.sets(st.sampled_from(TOPICS))))) for m in ids}
    # Current ownership may be stale: partitions that no longer exist, topics unsubscribed, duplicates.
    stale = st.tuples(st.sampled_from(TOPICS), st.integers(0, 14))
    current = {m: draw(st.sets(stale, max_size=10)) for m in ids}
    return members, counts, current


def expected_partitions(members, counts) -> set[TopicPartition]:
    subscribed = set().union(*(s.topics for s in members.values()))
    return {(t, p) for t in subscribed for p in range(counts.get(t, 0))}


def check_valid(members, counts, out) -> None:
    assert set(out) == set(members)
    owners = Counter(tp for assigned in out.values() for tp in assigned)
    assert all(n == 1 for n in owners.values()), "a partition was given twice"
    assert set(owners) == expected_partitions(members, counts)
    for m, assigned in out.items():
        assert all(t in members[m].topics for t, _ in assigned), f"{m} got a topic it does not subscribe to"


def moved(before: dict[str, set[TopicPartition]], after: dict[str, set[TopicPartition]]) -> int:
    """Partitions a surviving member owned before and some other member owns after."""
    return sum(len(before[m] - after[m]) for m in before if m in after)


def uniform_min_moves(kept: dict[str, int], members: int, total: int) -> int:
    """The fewest partitions that must change owner when every member subscribes to the same topics.

    The final loads are fixed: `total % members` members hold the ceiling, the rest the floor. The most
    that can stay put is had by giving the ceiling quotas to the members keeping the most.
    """
    base, extra = divmod(total, members)
    loads = sorted(kept.values(), reverse=True) + [0] * (members - len(kept))
    can_keep = sum(min(k, base + (1 if i < extra else 0)) for i, k in enumerate(loads))
    return sum(kept.values()) - can_keep


# -- every assignor -----------------------------------------------------------------------------------


@pytest.mark.parametrize("assignor", ALL, ids=lambda a: a.name)
@settings(max_examples=100, deadline=None)
@given(inputs=group_inputs())
def test_every_subscribed_partition_is_assigned_exactly_once_to_a_subscriber(assignor: Assignor, inputs):
    members, counts, current = inputs
    check_valid(members, counts, assignor.assign(members, counts, current))


@pytest.mark.parametrize("assignor", ALL, ids=lambda a: a.name)
@settings(max_examples=100, deadline=None)
@given(inputs=group_inputs())
def test_deterministic_whatever_the_input_order(assignor: Assignor, inputs):
    members, counts, current = inputs
    out = assignor.assign(members, counts, current)
    rev_members = dict(reversed(members.items()))
    rev_counts = dict(reversed(counts.items()))
    rev_current = {m: set(sorted(current[m], reverse=True)) for m in reversed(list(current))}
    assert assignor.assign(rev_members, rev_counts, rev_current) == out
    assert type(assignor)().assign(members, counts, current) == out


@pytest.mark.parametrize("assignor", [RoundRobinAssignor(), StickyAssignor()], ids=lambda a: a.name)
@settings(max_examples=100, deadline=None)
@given(inputs=group_inputs(uniform=True))
def test_identical_subscriptions_are_balanced_within_one(assignor: Assignor, inputs):
    members, counts, current = inputs
    loads = [len(v) for v in assignor.assign(members, counts, current).values()]
    assert not loads or max(loads) - min(loads) <= 1


@settings(max_examples=100, deadline=None)
@given(inputs=group_inputs())
def test_range_is_balanced_per_topic(inputs):
    members, counts, current = inputs
    out = RangeAssignor().assign(members, counts, current)
    for topic in TOPICS:
        loads = [sum(1 for t, _ in out[m] if t == topic) for m in members if topic in members[m].topics]
        assert not loads or max(loads) - min(loads) <= 1


def test_kafka_examples():
    members = subs(c0="t0,t1", c1="t0,t1")
    counts = {"t0": 3, "t1": 3}
    assert RangeAssignor().assign(members, counts, {}) == {
        "c0": tps("t0", 0, 1) | tps("t1", 0, 1), "c1": tps("t0", 2) | tps("t1", 2)}
    assert RoundRobinAssignor().assign(members, counts, {}) == {
        "c0": tps("t0", 0, 2) | tps("t1", 1), "c1": tps("t0", 1) | tps("t1", 0, 2)}


@pytest.mark.parametrize("assignor", ALL, ids=lambda a: a.name)
def test_members_only_get_topics_they_subscribe_to(assignor: Assignor):
    members = subs(m1="a", m2="a,b", m3="zzz")
    out = assignor.assign(members, {"a": 4, "b": 2, "c": 5}, {})
    assert out["m3"] == set()  # its topic does not exist yet
    assert {t for t, _ in out["m1"]} <= {"a"}
    assert tps("b", 0, 1) <= out["m2"]
    assert not any(t == "c" for v in out.values() for t, _ in v)  # nobody subscribes to c
    assert assignor.assign({}, {"a": 4}, {}) == {}


def test_registry_names():
    assert set(ASSIGNORS) == {"range", "roundrobin", "sticky"}
    assert all(ASSIGNORS[name]().name == name for name in ASSIGNORS)


# -- sticky -------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 9), total=st.integers(0, 40), joins=st.integers(0, 3), leaves=st.integers(0, 3))
def test_sticky_moves_the_minimum_when_members_join_and_leave(n, total, joins, leaves):
    sticky = StickyAssignor()
    counts = {"t": total}
    members = {f"m{i}": MemberSubscription(frozenset({"t"})) for i in range(n)}
    before = sticky.assign(members, counts, {})
    survivors = dict(list(members.items())[min(leaves, n - 1):])
    after_members = survivors | {f"new{i}": MemberSubscription(frozenset({"t"})) for i in range(joins)}
    after = sticky.assign(after_members, counts, before)
    check_valid(after_members, counts, after)
    kept = {m: len(before[m]) for m in survivors}
    assert moved(before, after) == uniform_min_moves(kept, len(after_members), total)
    if not joins:
        assert moved(before, after) == 0  # members leaving only free partitions up
    else:
        assert moved(before, after) >= (total // len(after_members)) * joins - sum(
            len(before[m]) for m in members if m not in survivors)  # joiners' floor quota, less what was freed


@settings(max_examples=100, deadline=None)
@given(inputs=group_inputs(uniform=True))
def test_sticky_uniform_moves_the_minimum_from_any_current_ownership(inputs):
    members, counts, current = inputs
    sticky = StickyAssignor()
    out = sticky.assign(members, counts, current)
    valid = expected_partitions(members, counts)
    kept: dict[str, set[TopicPartition]] = {}
    claimed: set[TopicPartition] = set()
    for m in sorted(current):  # the first claim of a partition counts, as in the assignor
        kept[m] = {tp for tp in current[m] if tp in valid and tp not in claimed}
        claimed |= kept[m]
    if members:
        assert moved(kept, out) == uniform_min_moves({m: len(v) for m, v in kept.items()}, len(members), len(valid))


@settings(max_examples=100, deadline=None)
@given(inputs=group_inputs())
def test_sticky_is_balanced_for_any_subscriptions_and_stable_once_balanced(inputs):
    members, counts, current = inputs
    sticky = StickyAssignor()
    out = sticky.assign(members, counts, current)
    # Balanced (Kafka's definition): no partition could go to another subscriber owning 2+ fewer ...
    for assigned in out.values():
        for topic, _ in assigned:
            for other in members:
                if topic in members[other].topics:
                    assert len(assigned) - len(out[other]) <= 1
    # ... so identical subscriptions end within one of each other.
    by_subs: dict[frozenset[str], list[int]] = {}
    for m, s in members.items():
        by_subs.setdefault(s.topics, []).append(len(out[m]))
    assert all(max(v) - min(v) <= 1 for v in by_subs.values())
    # Nothing changed: nothing moves.
    assert sticky.assign(members, counts, out) == out


def test_sticky_keeps_unaffected_members_on_subscription_change():
    sticky = StickyAssignor()
    members = subs(m1="a", m2="a", m3="a")
    before = sticky.assign(members, {"a": 6, "b": 3}, {})
    after = sticky.assign(subs(m1="a", m2="a", m3="b"), {"a": 6, "b": 3}, before)
    assert before["m1"] <= after["m1"] and before["m2"] <= after["m2"]
    assert after["m3"] == tps("b", 0, 1, 2)


def test_sticky_scales_to_a_full_group():
    sticky = StickyAssignor()
    members = {f"m{i:04}": MemberSubscription(frozenset({"a", "b"})) for i in range(1000)}
    counts = {"a": 5000, "b": 5000}
    t0 = time.perf_counter()
    out = sticky.assign(members, counts, {})
    members.pop("m0500")
    again = sticky.assign(members, counts, out)
    assert moved(out, again) == 0
    hetero = {f"m{i:03}": MemberSubscription(frozenset({"a", "b"} if i % 3 else {"a"})) for i in range(60)}
    check_valid(hetero, {"a": 300, "b": 300}, sticky.assign(hetero, {"a": 300, "b": 300}, {}))
    assert time.perf_counter() - t0 < 3
