"""Consumer-group membership: a pure state machine in the style of Kafka's KIP-848 (no I/O, no asyncio).

The coordinator's shell feeds a `Group` heartbeats and timer ticks and sends back what it returns; the
group keeps who is a member, what each subscribes to, the *target* assignment the assignor computed, and
what each member may own right now. Times come from the injected clock (`monotonic_ms`).

Epochs::

    group epoch        bumped on every change of the assignor's input: a member joins, leaves or is
                       evicted; a member's resolved subscription changes; the partition count of a
                       subscribed topic changes (a topic created or deleted, partitions added), which
                       is also how a regex subscription picks up a topic created later
    assignment epoch   the group epoch the target assignment was computed at. The assignor runs inside
                       the event that bumped the group epoch, so the two are always equal here (KIP-848's
                       ASSIGNING state, waiting for the assignor, does not exist)
    member epoch       the assignment epoch a member has caught up with; 0 = joining, -1 = leaving.
                       Members whose target did not change move to the new epoch on their next heartbeat
                       and keep every partition

No partition is ever owned by two members: the coordinator records an owner for every partition that
some member may own or has been told to give up (`assigned` + `revoking`), and gives a partition to
its new owner only after the old owner's heartbeat shows it no longer owns it (revoke-then-assign).

Group states (`Group.state`)::

    EMPTY        no members
    RECONCILING  some member is behind the assignment epoch, or is UNREVOKED / UNRELEASED
    STABLE       every member is STABLE at the assignment epoch

    EMPTY -> RECONCILING/STABLE   first join (a lone member gets everything in its join heartbeat)
    STABLE -> RECONCILING         epoch bump (join, leave, eviction, subscription or metadata change)
    RECONCILING -> STABLE         the last member catches up
    any -> EMPTY                  the last member leaves or is evicted

Member states (`MemberState`), evaluated on each of the member's heartbeats ("reconcile")::

    STABLE                 owns its whole target as of its member epoch
    UNREVOKED_PARTITIONS   told to give up `revoking` (its target no longer has them); keeps its epoch and
                           gets nothing new until a heartbeat's owned partitions exclude every one of
                           them; evicted if that takes longer than rebalance_timeout_ms
    UNRELEASED_PARTITIONS  at the assignment epoch with the free part of its target; the rest is still
                           owned (or being revoked) by others and comes on a later heartbeat once released

    reconcile:  revoking not empty                   -> UNREVOKED (wait)
                at the assignment epoch and STABLE   -> STABLE (nothing to do)
                assigned - target not empty          -> UNREVOKED: assigned &= target, revoking = the rest
                otherwise take every free partition of target, member epoch = assignment epoch
                                                     -> STABLE, or UNRELEASED if some are still owned

Heartbeat (`Group.heartbeat`), by member epoch::

    0   join: "" gets a generated id; an unknown id is taken as the client's own (KIP-1082); a known id
        rejoins having dropped everything it owned (after being fenced). A new member must carry a
        subscription.
    -1  leave: the member's partitions become free at once; group epoch bumped
    >0  must name a known member (else UNKNOWN_MEMBER_ID, e.g. after eviction). An epoch above the
        member's, or below it unless it is the previous epoch with owned partitions within the current
        assignment (the response that moved it on was lost), is fenced: the member must drop its
        partitions and rejoin with epoch 0. Fenced heartbeats do not extend the session.

`None` in a heartbeat means "unchanged": subscribed_topics, subscribed_regex ("" clears the regex),
owned_partitions, topic_partition_counts (the shell may pass its metadata image on every heartbeat; it is
compared, not copied, when equal).

`expire(now_ms)` evicts members silent for session_timeout_ms and members stuck in UNREVOKED past
rebalance_timeout_ms; their partitions become free. `commit_error` / `commit_allowed` fence offset
commits: only a current member at its current epoch may commit (or anyone, with no member id, while the
group is EMPTY: manual assignment).

Regex subscriptions use RE2 (google-re2: linear time, so a hostile pattern cannot stall the
coordinator's event loop; RE2 syntax, as Kafka's KIP-848 uses RE2/J) `fullmatch` over topic names, resolved against topic_partition_counts and
re-resolved whenever it changes. Bounds: members_max (<= MEMBERS_MAX) members, REGEX_MAX_CHARS,
SUBSCRIBED_TOPICS_MAX names (each a valid topic name), MEMBER_ID_MAX_CHARS.

Errors come back as data in `HeartbeatResult.error`; a heartbeat that fails changes nothing.

Persistence: `snapshot()` is the whole group as JSON-able data (members with their epochs,
subscriptions and owned partitions, the target assignment, the assignor's input) and
`Group.restore(snapshot, ...)` rebuilds it, with every member's session starting afresh at the
restore. The coordinator writes a snapshot whenever `ownership_fingerprint(member)` or the group epoch
changes, before it answers, so a new coordinator never gives out a partition that a member of the
old one may still own.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import re2

from logbroker.clock import Clock
from logbroker.cluster.metadata import validate_group_id, validate_topic_name
from logbroker.errors import (
    BrokerError,
    FencedMemberEpochError,
    GroupMaxSizeReachedError,
    InvalidRegularExpressionError,
    InvalidRequestError,
    StaleMemberEpochError,
    UnknownMemberIdError,
)
from logbroker.group.assignor import Assignor, MemberSubscription, TopicPartition

JOIN_EPOCH = 0
LEAVE_EPOCH = -1
MEMBERS_MAX = 1000
REGEX_MAX_CHARS = 1000
SUBSCRIBED_TOPICS_MAX = 10_000
MEMBER_ID_MAX_CHARS = 255
_REGEX_CACHE_MAX = 2 * MEMBERS_MAX
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is the client's error, returned as data; not a log line


class GroupState(enum.Enum):
    EMPTY = "empty"
    RECONCILING = "reconciling"
    STABLE = "stable"


class MemberState(enum.Enum):
    STABLE = "stable"
    UNREVOKED_PARTITIONS = "unrevoked_partitions"
    UNRELEASED_PARTITIONS = "unreleased_partitions"


@dataclass(frozen=True)
class HeartbeatResult:
    member_id: str
    member_epoch: int
    assignment: frozenset[TopicPartition]  # what the member may own now; it must drop anything else
    error: BrokerError | None = None  # when set, assignment is empty and means nothing


@dataclass(frozen=True)
class MemberDescription:
    member_id: str
    member_epoch: int
    state: MemberState
    subscribed_topics: tuple[str, ...]
    subscribed_regex: str
    assigned: tuple[TopicPartition, ...]  # may own now
    revoking: tuple[TopicPartition, ...]  # told to give up, not yet confirmed: still its own
    target: tuple[TopicPartition, ...]
    session_deadline_ms: int


@dataclass(frozen=True)
class GroupDescription:
    group_id: str
    state: GroupState
    group_epoch: int
    assignment_epoch: int
    assignor: str
    members: tuple[MemberDescription, ...]


@dataclass
class _Member:
    member_id: str
    last_heartbeat_ms: int
    epoch: int = JOIN_EPOCH
    previous_epoch: int = LEAVE_EPOCH
    state: MemberState = MemberState.STABLE
    topics: frozenset[str] = frozenset()
    regex: str = ""
    resolved: frozenset[str] = frozenset()  # topics | regex matches among existing topics
    assigned: set[TopicPartition] = field(default_factory=set)
    revoking: set[TopicPartition] = field(default_factory=set)
    revoke_deadline_ms: int | None = None


class Group:
    """One consumer group's membership and assignment. See the module doc."""

    def __init__(
        self,
        group_id: str,
        assignor: Assignor,
        clock: Clock,
        session_timeout_ms: int = 45_000,
        rebalance_timeout_ms: int = 300_000,
        *,
        members_max: int = MEMBERS_MAX,
        new_member_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> None:
        validate_group_id(group_id)
        assert session_timeout_ms > 0 and rebalance_timeout_ms > 0 and 0 < members_max <= MEMBERS_MAX
        self.group_id = group_id
        self.assignor = assignor
        self.session_timeout_ms = session_timeout_ms
        self.rebalance_timeout_ms = rebalance_timeout_ms
        self.members_max = members_max
        self._clock = clock
        self._new_member_id = new_member_id
        self._members: dict[str, _Member] = {}
        self._owner: dict[TopicPartition, str] = {}  # over every member's assigned + revoking
        self._target: dict[str, frozenset[TopicPartition]] = {}
        self._group_epoch = 0
        self._assignment_epoch = 0
        self._topic_counts: dict[str, int] = {}
        self._partitions: dict[str, int] = {}  # the assignor's last `partitions` input
        self._regex_matches: dict[str, frozenset[str]] = {}

    # -- queries ------------------------------------------------------------------------------------

    @property
    def group_epoch(self) -> int:
        return self._group_epoch

    @property
    def state(self) -> GroupState:
        if not self._members:
            return GroupState.EMPTY
        if all(m.epoch == self._assignment_epoch and m.state is MemberState.STABLE for m in self._members.values()):
            return GroupState.STABLE
        return GroupState.RECONCILING

    def describe(self) -> GroupDescription:
        members = tuple(
            MemberDescription(
                member_id=m.member_id, member_epoch=m.epoch, state=m.state,
                subscribed_topics=tuple(sorted(m.topics)), subscribed_regex=m.regex,
                assigned=tuple(sorted(m.assigned)), revoking=tuple(sorted(m.revoking)),
                target=tuple(sorted(self._target.get(m.member_id, ()))),
                session_deadline_ms=m.last_heartbeat_ms + self.session_timeout_ms,
            )
            for _, m in sorted(self._members.items())
        )
        return GroupDescription(self.group_id, self.state, self._group_epoch, self._assignment_epoch,
                                self.assignor.name, members)

    def commit_error(self, member_id: str, member_epoch: int) -> BrokerError | None:
        """Why an offset commit from (member_id, member_epoch) must be rejected, or None (zombie fence)."""
        if not member_id and member_epoch < 0:
            if self._members:
                return UnknownMemberIdError(f"group {self.group_id} has members: commit as one of them")
            return None
        m = self._members.get(member_id)
        if m is None:
            return UnknownMemberIdError(f"member {member_id!r} is not in group {self.group_id}")
        if member_epoch != m.epoch:
            return StaleMemberEpochError(f"member {member_id} is at epoch {m.epoch}, the commit has {member_epoch}")
        return None

    def commit_allowed(self, member_id: str, member_epoch: int) -> bool:
        return self.commit_error(member_id, member_epoch) is None

    def next_deadline_ms(self) -> int | None:
        """When `expire` next has something to do (monotonic ms), for the shell's timer."""
        deadlines = [m.last_heartbeat_ms + self.session_timeout_ms for m in self._members.values()]
        deadlines += [m.revoke_deadline_ms for m in self._members.values() if m.revoke_deadline_ms is not None]
        return min(deadlines, default=None)

    def has_member(self, member_id: str) -> bool:
        return member_id in self._members

    def ownership_fingerprint(self, member_id: str) -> tuple[object, ...]:
        """What a snapshot must capture about one member (plus the group epoch): compare before and
        after a heartbeat to know whether the group must be persisted before answering it."""
        m = self._members.get(member_id)
        if m is None:
            return (self._group_epoch, len(self._members))
        return (self._group_epoch, len(self._members), m.epoch, m.previous_epoch, frozenset(m.assigned),
                frozenset(m.revoking), m.topics, m.regex)

    # -- persistence ----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, object]:
        return {
            "group_epoch": self._group_epoch,
            "assignment_epoch": self._assignment_epoch,
            "assignor": self.assignor.name,
            "session_timeout_ms": self.session_timeout_ms,
            "rebalance_timeout_ms": self.rebalance_timeout_ms,
            "topic_counts": dict(self._topic_counts),
            "partitions": dict(self._partitions),
            "members": [
                {
                    "id": m.member_id, "epoch": m.epoch, "previous_epoch": m.previous_epoch, "state": m.state.value,
                    "topics": sorted(m.topics), "regex": m.regex, "resolved": sorted(m.resolved),
                    "assigned": sorted(m.assigned), "revoking": sorted(m.revoking),
                    "target": sorted(self._target.get(m.member_id, ())),
                }
                for _, m in sorted(self._members.items())
            ],
        }

    @classmethod
    def restore(
        cls,
        group_id: str,
        snapshot: Mapping[str, object],
        assignor: Assignor,
        clock: Clock,
        *,
        members_max: int = MEMBERS_MAX,
        new_member_id: Callable[[], str] = lambda: uuid.uuid4().hex,
    ) -> Group:
        """The group a `snapshot()` describes; every member's session and pending revocation start now.
        Raises ValueError (or KeyError/TypeError) if the snapshot is malformed or inconsistent."""
        g = cls(group_id, assignor, clock, int(snapshot["session_timeout_ms"]),  # type: ignore[call-overload]
                int(snapshot["rebalance_timeout_ms"]),  # type: ignore[call-overload]
                members_max=members_max, new_member_id=new_member_id)
        now = clock.monotonic_ms()
        g._group_epoch = int(snapshot["group_epoch"])  # type: ignore[call-overload]
        g._assignment_epoch = int(snapshot["assignment_epoch"])  # type: ignore[call-overload]
        g._topic_counts = {str(t): int(n) for t, n in dict(snapshot["topic_counts"]).items()}  # type: ignore[call-overload]
        g._partitions = {str(t): int(n) for t, n in dict(snapshot["partitions"]).items()}  # type: ignore[call-overload]
        members = snapshot["members"]
        if not isinstance(members, list) or len(members) > members_max:
            raise ValueError("snapshot members must be a list within members_max")
        for d in members:
            m = _Member(str(d["id"]), now, int(d["epoch"]), int(d["previous_epoch"]), MemberState(d["state"]),
                        frozenset(str(t) for t in d["topics"]), str(d["regex"]),
                        frozenset(str(t) for t in d["resolved"]),
                        {(str(t), int(p)) for t, p in d["assigned"]}, {(str(t), int(p)) for t, p in d["revoking"]})
            if m.revoking:
                m.revoke_deadline_ms = now + g.rebalance_timeout_ms
            for tp in m.assigned | m.revoking:
                if tp in g._owner:
                    raise ValueError(f"snapshot gives {tp} to {g._owner[tp]} and {m.member_id}")
                g._owner[tp] = m.member_id
            g._members[m.member_id] = m
            g._target[m.member_id] = frozenset((str(t), int(p)) for t, p in d["target"])
        return g

    # -- events -------------------------------------------------------------------------------------

    def heartbeat(
        self,
        member_id: str,
        member_epoch: int,
        *,
        subscribed_topics: Collection[str] | None = None,
        subscribed_regex: str | None = None,
        owned_partitions: Collection[TopicPartition] | None = None,
        topic_partition_counts: Mapping[str, int] | None = None,
    ) -> HeartbeatResult:
        try:
            return self._heartbeat(member_id, member_epoch, subscribed_topics, subscribed_regex,
                                   owned_partitions, topic_partition_counts)
        except BrokerError as e:
            return HeartbeatResult(member_id, member_epoch, frozenset(), e)

    def update_metadata(self, topic_partition_counts: Mapping[str, int]) -> bool:
        """New topic -> partition count map; True when it changed the assignor's input (epoch bumped)."""
        if topic_partition_counts == self._topic_counts:
            return False
        self._topic_counts = dict(topic_partition_counts)
        self._regex_matches.clear()
        changed = False
        for m in self._members.values():
            resolved = self._resolve(m.topics, m.regex)
            if resolved != m.resolved:
                m.resolved, changed = resolved, True
        if changed or self._partition_input() != self._partitions:
            self._compute_target()
            return True
        return False

    def expire(self, now_ms: int | None = None) -> list[str]:
        """Evict members past their session or revocation deadline; returns their ids."""
        now = self._clock.monotonic_ms() if now_ms is None else now_ms
        gone = sorted(
            m.member_id for m in self._members.values()
            if now >= m.last_heartbeat_ms + self.session_timeout_ms
            or (m.revoke_deadline_ms is not None and now >= m.revoke_deadline_ms)
        )
        for member_id in gone:
            self._remove(self._members[member_id])
        if gone:
            self._compute_target()
        return gone

    # -- internals ----------------------------------------------------------------------------------

    def _heartbeat(
        self,
        member_id: str,
        member_epoch: int,
        subscribed_topics: Collection[str] | None,
        subscribed_regex: str | None,
        owned_partitions: Collection[TopicPartition] | None,
        topic_partition_counts: Mapping[str, int] | None,
    ) -> HeartbeatResult:
        # Validate everything before changing anything.
        if member_epoch < LEAVE_EPOCH:
            raise InvalidRequestError(f"member epoch {member_epoch} is not valid")
        if len(member_id) > MEMBER_ID_MAX_CHARS:
            raise InvalidRequestError(f"member id is longer than {MEMBER_ID_MAX_CHARS} characters")
        if not member_id and member_epoch != JOIN_EPOCH:
            raise InvalidRequestError("a member id is required unless joining (member epoch 0)")
        topics = _checked_topics(subscribed_topics)
        _check_regex(subscribed_regex)
        owned = None if owned_partitions is None else frozenset(owned_partitions)

        m = self._members.get(member_id)
        if member_epoch == LEAVE_EPOCH:
            if m is None:
                raise UnknownMemberIdError(f"member {member_id!r} is not in group {self.group_id}")
            if topic_partition_counts is not None:
                self.update_metadata(topic_partition_counts)
            self._remove(m)
            self._compute_target()
            return HeartbeatResult(member_id, LEAVE_EPOCH, frozenset())
        if member_epoch == JOIN_EPOCH:
            if m is None:
                if topics is None and subscribed_regex is None:
                    raise InvalidRequestError("a joining member must send its subscription")
                if len(self._members) >= self.members_max:
                    raise GroupMaxSizeReachedError(f"group {self.group_id} has {self.members_max} members")
        elif m is None:
            raise UnknownMemberIdError(f"member {member_id!r} is not in group {self.group_id}")
        else:
            self._check_epoch(m, member_epoch, owned)

        if topic_partition_counts is not None:
            self.update_metadata(topic_partition_counts)
        now = self._clock.monotonic_ms()
        dirty = False
        if m is None:  # joining (the checks above let nothing else through)
            while not member_id or member_id in self._members:
                member_id = self._new_member_id()
            m = self._members[member_id] = _Member(member_id, now)
            dirty = True
        elif member_epoch == JOIN_EPOCH:  # rejoining: the member dropped everything it owned
            self._release_all(m)
            m.epoch, m.previous_epoch, m.state, m.revoke_deadline_ms = JOIN_EPOCH, LEAVE_EPOCH, MemberState.STABLE, None
        if member_epoch == JOIN_EPOCH:
            owned = frozenset()
        m.last_heartbeat_ms = now
        if topics is not None or subscribed_regex is not None:
            if topics is not None:
                m.topics = topics
            if subscribed_regex is not None:
                m.regex = subscribed_regex
            resolved = self._resolve(m.topics, m.regex)
            if resolved != m.resolved:
                m.resolved, dirty = resolved, True
        if dirty:
            self._compute_target()
        if owned is not None:
            for tp in m.revoking - owned:
                m.revoking.discard(tp)
                del self._owner[tp]
        self._reconcile(m, now)
        return HeartbeatResult(m.member_id, m.epoch, frozenset(m.assigned))

    def _check_epoch(self, m: _Member, member_epoch: int, owned: frozenset[TopicPartition] | None) -> None:
        if member_epoch > m.epoch:
            raise FencedMemberEpochError(
                f"member {m.member_id} sent epoch {member_epoch}, above its epoch {m.epoch}: rejoin with epoch 0")
        if member_epoch < m.epoch and (member_epoch != m.previous_epoch or owned is None or not owned <= m.assigned):
            raise FencedMemberEpochError(
                f"member {m.member_id} sent stale epoch {member_epoch}, its epoch is {m.epoch}: rejoin with epoch 0")

    def _reconcile(self, m: _Member, now_ms: int) -> None:
        if m.revoking:
            m.state = MemberState.UNREVOKED_PARTITIONS
            return
        if m.epoch == self._assignment_epoch and m.state is MemberState.STABLE:
            return
        target = self._target.get(m.member_id, frozenset())
        revoke = m.assigned - target
        if revoke:
            m.assigned -= revoke
            m.revoking = revoke  # still owned by m until its heartbeat says otherwise
            m.state = MemberState.UNREVOKED_PARTITIONS
            if m.revoke_deadline_ms is None:
                m.revoke_deadline_ms = now_ms + self.rebalance_timeout_ms
            return
        for tp in sorted(target - m.assigned):
            if tp not in self._owner:
                self._owner[tp] = m.member_id
                m.assigned.add(tp)
        if m.epoch != self._assignment_epoch:
            m.previous_epoch, m.epoch = m.epoch, self._assignment_epoch
        m.state = MemberState.STABLE if m.assigned == target else MemberState.UNRELEASED_PARTITIONS
        m.revoke_deadline_ms = None

    def _release_all(self, m: _Member) -> None:
        for tp in m.assigned | m.revoking:
            owner = self._owner.pop(tp)
            assert owner == m.member_id, f"{tp} of {m.member_id} was recorded for {owner}"
        m.assigned.clear()
        m.revoking.clear()

    def _remove(self, m: _Member) -> None:
        self._release_all(m)
        del self._members[m.member_id]
        self._target.pop(m.member_id, None)

    def _resolve(self, topics: frozenset[str], regex: str) -> frozenset[str]:
        if not regex:
            return topics
        matches = self._regex_matches.get(regex)
        if matches is None:
            if len(self._regex_matches) >= _REGEX_CACHE_MAX:
                self._regex_matches.clear()
            pattern = _compile(regex)
            matches = self._regex_matches[regex] = frozenset(t for t in self._topic_counts if pattern.fullmatch(t))
        return topics | matches

    def _partition_input(self) -> dict[str, int]:
        subscribed = set().union(*(m.resolved for m in self._members.values()))
        return {t: n for t in sorted(subscribed) if (n := self._topic_counts.get(t, 0)) > 0}

    def _compute_target(self) -> None:
        self._group_epoch += 1
        self._partitions = self._partition_input()
        subs = {mid: MemberSubscription(m.resolved) for mid, m in self._members.items()}
        current = {mid: set(self._target.get(mid, ())) for mid in self._members}
        target = self.assignor.assign(subs, self._partitions, current)
        seen: set[TopicPartition] = set()
        for mid, tps in target.items():
            assert mid in self._members, f"assignor {self.assignor.name} invented member {mid}"
            for tp in tps:
                assert tp[0] in subs[mid].topics and 0 <= tp[1] < self._partitions.get(tp[0], 0), \
                    f"assignor {self.assignor.name} gave {mid} {tp}"
                assert tp not in seen, f"assignor {self.assignor.name} gave {tp} twice"
                seen.add(tp)
        self._target = {mid: frozenset(target.get(mid, ())) for mid in self._members}
        self._assignment_epoch = self._group_epoch


def _checked_topics(topics: Collection[str] | None) -> frozenset[str] | None:
    if topics is None:
        return None
    if len(topics) > SUBSCRIBED_TOPICS_MAX:
        raise InvalidRequestError(f"{len(topics)} subscribed topics, the limit is {SUBSCRIBED_TOPICS_MAX}")
    for t in topics:
        validate_topic_name(t)
    return frozenset(topics)


def _check_regex(regex: str | None) -> None:
    if not regex:
        return
    if len(regex) > REGEX_MAX_CHARS:
        raise InvalidRegularExpressionError(f"regex is {len(regex)} characters, the limit is {REGEX_MAX_CHARS}")
    _compile(regex)


def _compile(regex: str) -> re2._Regexp:
    try:
        return re2.compile(regex, _RE2_OPTIONS)
    except re2.error as e:
        detail = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
        raise InvalidRegularExpressionError(f"regex {regex!r}: {detail} (RE2 syntax)") from None
