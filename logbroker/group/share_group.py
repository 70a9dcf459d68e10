"""A share group (a queue) in its coordinator's memory: its settings, its members and the state of
each partition it reads (share_partition.py). Pure: time comes in as arguments.

Members (KIP-932 without an assignor: every member may be handed records of every partition of the
topics it subscribes to; parallelism is per record, not per partition)::

    ShareFetch epoch 0   -> join (a new member at epoch 1; a known one rejoins at epoch + 1 and
                            gives back what it held: it lost track of it)
    ShareFetch epoch e   -> e must be the member's epoch: UNKNOWN_MEMBER_ID for a member the group
                            does not know (never joined, left, or its session ran out), FENCED_MEMBER_EPOCH
                            for another epoch
    ShareFetch epoch -1  -> leave: what it holds is given back
    no call for session_timeout_ms -> evicted: likewise

Membership is not persisted (a new coordinator's members join again); the settings and partition
states are (share_coordinator.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from logbroker.errors import FencedMemberEpochError, GroupMaxSizeReachedError, UnknownMemberIdError
from logbroker.group.priority_drain import LevelDrain
from logbroker.group.share_partition import DeadLetter, SharePartition
from logbroker.group.share_settings import ShareSettings

TopicPartition = tuple[str, int]
MEMBER_ID_MAX_CHARS = 64


def check_member_id(member_id: str) -> None:
    if not 0 < len(member_id) <= MEMBER_ID_MAX_CHARS or not member_id.isprintable():
        raise UnknownMemberIdError(f"member id must be 1..{MEMBER_ID_MAX_CHARS} printable characters")


@dataclass
class ShareMember:
    member_id: str
    epoch: int
    topics: tuple[str, ...]
    last_seen_ms: int


@dataclass
class ShareGroup:
    name: str
    settings: ShareSettings
    session_timeout_ms: int = 45_000
    members_max: int = 1000
    members: dict[str, ShareMember] = field(default_factory=dict)
    partitions: dict[TopicPartition, SharePartition] = field(default_factory=dict)
    cursor: int = 0  # where the next fetch starts among the partitions (round robin)
    # per user topic with priority levels: the weighted drain's credits (group/priority_drain.py)
    drains: dict[str, LevelDrain] = field(default_factory=dict)

    def join(self, member_id: str, topics: list[str], now_ms: int) -> tuple[ShareMember, list[tuple[TopicPartition, DeadLetter]]]:
        check_member_id(member_id)
        old = self.members.get(member_id)
        dead = self.release_member(member_id, now_ms) if old is not None else []
        if old is None and len(self.members) >= self.members_max:
            raise GroupMaxSizeReachedError(f"share group {self.name} has {self.members_max} members already")
        member = ShareMember(member_id, (old.epoch if old else 0) + 1, tuple(sorted(set(topics))), now_ms)
        self.members[member_id] = member
        return member, dead

    def check(self, member_id: str, epoch: int, now_ms: int) -> ShareMember:
        member = self.members.get(member_id)
        if member is None:
            raise UnknownMemberIdError(
                f"member {member_id!r} is not in share group {self.name} (left, evicted, or the coordinator "
                "moved): join again with epoch 0")
        if epoch != member.epoch:
            raise FencedMemberEpochError(f"member {member_id} is at epoch {member.epoch}, not {epoch}: join again")
        member.last_seen_ms = now_ms
        return member

    def leave(self, member_id: str, now_ms: int) -> list[tuple[TopicPartition, DeadLetter]]:
        dead = self.release_member(member_id, now_ms)
        self.members.pop(member_id, None)
        return dead

    def release_member(self, member_id: str, now_ms: int) -> list[tuple[TopicPartition, DeadLetter]]:
        return [(tp, d) for tp, sp in self.partitions.items() for d in sp.release_member(member_id, now_ms)]

    def expire(self, now_ms: int, wall_ms: int) -> tuple[list[str], list[tuple[TopicPartition, DeadLetter]], set[TopicPartition]]:
        """Members silent for session_timeout_ms (`now_ms`, monotonic) leave; locks that ran out by
        `wall_ms` are given back. Returns (members gone, dead letters, partitions changed)."""
        gone = [m.member_id for m in self.members.values() if now_ms - m.last_seen_ms >= self.session_timeout_ms]
        dead: list[tuple[TopicPartition, DeadLetter]] = []
        changed: set[TopicPartition] = set()
        for member_id in gone:
            for tp, sp in self.partitions.items():
                if sp.held_by(member_id):
                    changed.add(tp)
            dead += self.leave(member_id, wall_ms)
        for tp, sp in self.partitions.items():
            if sp.next_lock_deadline_ms is not None and sp.next_lock_deadline_ms <= wall_ms:
                before = sp.counters.locks_lost
                dead += [(tp, d) for d in sp.expire(wall_ms)]
                if sp.counters.locks_lost != before:
                    changed.add(tp)
        return gone, dead, changed

    def subscribed_topics(self) -> set[str]:
        return {t for m in self.members.values() for t in m.topics}

    def alter(self, settings: ShareSettings) -> None:
        self.settings = settings
        for sp in self.partitions.values():
            sp.settings = settings
