"""Partition assignors: who in a group should own which partition (pure functions, no I/O).

The coordinator (`membership.Group`) calls `assign` whenever the group epoch moves, with every member's
resolved subscription (topic names; regular expressions are already expanded), the partition count of
every subscribed topic, and each member's previous *target* assignment. The result is the new target
assignment; the coordinator then moves partitions revoke-then-assign. Every implementation:

- gives each partition of a topic somebody subscribes to to exactly one member subscribed to it;
- ignores topics nobody subscribes to and subscribed topics missing from `partitions` (not created yet);
- returns an entry (maybe empty) for every member, and is deterministic: same inputs, same output.

Range (Kafka `RangeAssignor`): per topic, the sorted subscribers get consecutive ranges; with `n`
partitions and `k` subscribers the first `n % k` get one extra. Balanced per topic, but across topics
the first members collect every extra (2 topics of 3 over 2 members: 4 and 2).

Round-robin (Kafka `RoundRobinAssignor`): all (topic, partition) pairs sorted, dealt out by a circular
iterator over the sorted members that skips members not subscribed to the topic. Balanced within one
partition when all subscriptions are identical; with different subscriptions it may not be.

Sticky (Kafka `StickyAssignor` / the KIP-848 uniform assignor): keeps each member's current partitions
where still valid, and moves the fewest needed to reach balance, where balanced means no partition could
move from its owner to another member subscribed to its topic that owns two or more fewer partitions.
So members with identical subscriptions end within one partition of each other. When every member has
the same subscription it moves exactly the minimum: the `P % N` members with the most kept partitions get
the ceiling quota, and only partitions above a member's quota, or freed, change hands.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

TopicPartition = tuple[str, int]


@dataclass(frozen=True)
class MemberSubscription:
    """What one member subscribes to, as topic names (a regex is resolved by the coordinator first)."""

    topics: frozenset[str]


class Assignor(Protocol):
    name: str

    def assign(
        self,
        members: Mapping[str, MemberSubscription],
        partitions: Mapping[str, int],
        current: Mapping[str, set[TopicPartition]],
    ) -> dict[str, set[TopicPartition]]:
        """The target assignment: member id -> partitions (see the module doc for the contract)."""
        ...


def _subscribers(members: Mapping[str, MemberSubscription], partitions: Mapping[str, int]) -> dict[str, list[str]]:
    """topic -> sorted member ids subscribed to it, for existing topics somebody subscribes to."""
    out: dict[str, list[str]] = {}
    for member_id in sorted(members):
        for topic in members[member_id].topics:
            if partitions.get(topic, 0) > 0:
                out.setdefault(topic, []).append(member_id)
    return out


class RangeAssignor:
    name = "range"

    def assign(
        self,
        members: Mapping[str, MemberSubscription],
        partitions: Mapping[str, int],
        current: Mapping[str, set[TopicPartition]],
    ) -> dict[str, set[TopicPartition]]:
        out: dict[str, set[TopicPartition]] = {m: set() for m in members}
        for topic, subs in _subscribers(members, partitions).items():
            count, k = partitions[topic], len(subs)
            base, extra = divmod(count, k)
            start = 0
            for i, member_id in enumerate(subs):
                n = base + (1 if i < extra else 0)
                out[member_id].update((topic, p) for p in range(start, start + n))
                start += n
        return out


class RoundRobinAssignor:
    name = "roundrobin"

    def assign(
        self,
        members: Mapping[str, MemberSubscription],
        partitions: Mapping[str, int],
        current: Mapping[str, set[TopicPartition]],
    ) -> dict[str, set[TopicPartition]]:
        out: dict[str, set[TopicPartition]] = {m: set() for m in members}
        order = sorted(members)
        if not order:
            return out
        i = 0
        for topic in sorted(_subscribers(members, partitions)):
            for p in range(partitions[topic]):
                while topic not in members[order[i]].topics:  # somebody is subscribed: this ends
                    i = (i + 1) % len(order)
                out[order[i]].add((topic, p))
                i = (i + 1) % len(order)
        return out


class StickyAssignor:
    name = "sticky"

    def assign(
        self,
        members: Mapping[str, MemberSubscription],
        partitions: Mapping[str, int],
        current: Mapping[str, set[TopicPartition]],
    ) -> dict[str, set[TopicPartition]]:
        subscribers = _subscribers(members, partitions)
        order = sorted(members)
        # What each member may keep: existing partitions of topics it still subscribes to, each once.
        kept: dict[str, list[TopicPartition]] = {m: [] for m in order}
        taken: set[TopicPartition] = set()
        for m in order:
            topics = members[m].topics
            for tp in sorted(current.get(m, ())):
                topic, p = tp
                if topic in topics and topic in subscribers and 0 <= p < partitions[topic] and tp not in taken:
                    kept[m].append(tp)
                    taken.add(tp)
        all_tps = [(t, p) for t in sorted(subscribers) for p in range(partitions[t])]
        if len({members[m].topics.intersection(subscribers) for m in order}) <= 1:
            return _sticky_uniform(order, all_tps, kept)
        return _sticky_general(members, order, subscribers, all_tps, kept, taken)


def _sticky_uniform(
    order: list[str], all_tps: list[TopicPartition], kept: dict[str, list[TopicPartition]]
) -> dict[str, set[TopicPartition]]:
    """Every member subscribes to the same (existing) topics: quotas, then fill. Exactly minimal moves."""
    out: dict[str, set[TopicPartition]] = {m: set() for m in order}
    if not order:
        return out
    base, extra = divmod(len(all_tps), len(order))
    by_kept = sorted(order, key=lambda m: (-len(kept[m]), m))
    quota = {m: base + (1 if i < extra else 0) for i, m in enumerate(by_kept)}
    for m in order:
        out[m].update(kept[m][: quota[m]])
    owned = {tp for tps in out.values() for tp in tps}
    free = iter(tp for tp in all_tps if tp not in owned)
    for m in order:
        while len(out[m]) < quota[m]:
            out[m].add(next(free))
    assert next(free, None) is None, "uniform sticky: every partition has an owner"
    return out


def _sticky_general(
    members: Mapping[str, MemberSubscription],
    order: list[str],
    subscribers: dict[str, list[str]],
    all_tps: list[TopicPartition],
    kept: dict[str, list[TopicPartition]],
    taken: set[TopicPartition],
) -> dict[str, set[TopicPartition]]:
    """Different subscriptions: keep, give free partitions to the least loaded, then move while unbalanced."""
    out: dict[str, set[TopicPartition]] = {m: set(kept[m]) for m in order}
    # Free partitions, the most constrained topics first, each to its least-loaded eligible member.
    free = sorted((tp for tp in all_tps if tp not in taken), key=lambda tp: (len(subscribers[tp[0]]), tp))
    for tp in free:
        target = min(subscribers[tp[0]], key=lambda m: (len(out[m]), m))
        out[target].add(tp)
    # Balance: move a partition from a member to an eligible one with at least two fewer. Every move
    # lowers the sum of squared loads, so this ends; it moves nothing when already balanced.
    while True:
        move = _unbalanced_move(members, order, subscribers, out)
        if move is None:
            return out
        tp, src, dst = move
        out[src].remove(tp)
        out[dst].add(tp)


def _unbalanced_move(
    members: Mapping[str, MemberSubscription],
    order: list[str],
    subscribers: dict[str, list[str]],
    out: dict[str, set[TopicPartition]],
) -> tuple[TopicPartition, str, str] | None:
    for src in sorted(order, key=lambda m: (-len(out[m]), m)):
        best: tuple[int, str, TopicPartition] | None = None
        for topic in sorted({t for t, _ in out[src]}):
            dst = min(subscribers[topic], key=lambda m: (len(out[m]), m))
            if len(out[src]) - len(out[dst]) >= 2 and (best is None or (len(out[dst]), dst) < best[:2]):
                best = (len(out[dst]), dst, max(tp for tp in out[src] if tp[0] == topic))
        if best is not None:
            return best[2], src, best[1]
    return None


ASSIGNORS: dict[str, Callable[[], Assignor]] = {
    RangeAssignor.name: RangeAssignor,
    RoundRobinAssignor.name: RoundRobinAssignor,
    StickyAssignor.name: StickyAssignor,
}
