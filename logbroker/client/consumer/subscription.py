"""Subscription state (Kafka's `SubscriptionState`): what this consumer reads and where it stands.

What is subscribed (topics and/or a pattern, or a manual assignment), the assigned partitions and,
per partition (`PartitionState`)::

    position     next offset poll() returns (None: to be looked up: committed offset, else reset)
    fetch_offset next offset to fetch; ahead of position by what is buffered or in flight
    epoch        bumped by seek()/reset/unassignment: buffered chunks and in-flight results of
                 older epochs are dropped, so a seek never sees stale records
    leader       the leader's address (None: unknown, metadata is looked up again)
    in_flight    a fetch covering it is in flight; retry_at: backing off after an error until then
    buffered     undecoded chunks of the current epoch (the fetcher keeps at most two)
    reset_to     EARLIEST/LATEST: look the offset up instead of using the committed one
    committed    last offset this consumer committed (or found committed)

A partition is fetchable when its position is known, it has no fetch in flight, is not backing off
and holds at most one undecoded chunk. Pure state: no I/O, no clock (times are the caller's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from logbroker.errors import LogbrokerError

EARLIEST = -2
LATEST = -1
TopicPartition = tuple[str, int]


def parse_reset(auto_offset_reset: str) -> int | None:
    if auto_offset_reset in ("earliest", "smallest", "beginning"):
        return EARLIEST
    if auto_offset_reset in ("latest", "largest", "end"):
        return LATEST
    if auto_offset_reset == "none":
        return None
    raise ValueError(f"auto_offset_reset must be 'earliest', 'latest' or 'none', not {auto_offset_reset!r}")


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a regular expression: {e}") from None


class PartitionState:
    __slots__ = ("topic", "partition", "position", "fetch_offset", "epoch", "leader", "in_flight",
                 "retry_at", "buffered", "high_watermark", "log_start_offset", "log_end_offset",
                 "reset_to", "committed", "failures", "held", "gate_checked")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.position: int | None = None
        self.fetch_offset = -1
        self.epoch = 0
        self.leader: str | None = None
        self.in_flight = False
        self.retry_at = 0.0
        self.buffered = 0  # undecoded chunks of the current epoch
        self.high_watermark = -1
        self.log_start_offset = -1
        self.log_end_offset = -1
        self.reset_to: int | None = None  # EARLIEST/LATEST: look the offset up instead of the committed one
        self.committed = -1  # last offset this consumer committed (or found committed)
        self.failures = 0  # fetch errors in a row: how far along the retry policy retry_at is
        # lineage_gate.py: a child of a grown topic not fetched until its parents are consumed to
        # their split offsets (held), and whether the gate has looked at this partition yet
        self.held = False
        self.gate_checked = False

    def seek(self, offset: int) -> None:
        self.position = offset
        self.fetch_offset = offset
        self.epoch += 1
        self.buffered = 0
        self.reset_to = None

    def reset(self, strategy: int) -> None:
        """Forget the position (out of range): look it up again with `strategy` (EARLIEST/LATEST)."""
        self.epoch += 1
        self.buffered = 0
        self.position = None
        self.reset_to = strategy


class SubscriptionState:
    """The subscription (topics, pattern; `group_managed`: the group member's assignment) and the
    assigned partitions' states. `need_positions`: some assigned partition has no position yet."""

    def __init__(self) -> None:
        self.assigned: dict[TopicPartition, PartitionState] = {}
        self.topics: list[str] | None = None
        self.pattern: re.Pattern[str] | None = None
        self.group_managed = False
        self.need_positions = False

    def subscribed(self) -> bool:
        return self.topics is not None or self.pattern is not None

    def subscribe(self, topics: list[str] | None, pattern: re.Pattern[str] | None) -> None:
        self.topics, self.pattern = topics, pattern

    def subscription(self) -> list[str] | None:
        if self.topics is None and self.pattern is None:
            return None
        return list(self.topics or ())

    def state(self, topic: str, partition: int) -> PartitionState:
        st = self.assigned.get((topic, partition))
        if st is None:
            raise LogbrokerError(f"{topic}-{partition} is not assigned to this consumer")
        return st

    def select(self, topic: str | None, partition: int | None) -> list[PartitionState]:
        """Every assigned partition, a topic's, or one."""
        if topic is None:
            return list(self.assigned.values())
        if partition is None:
            return [st for (t, _), st in self.assigned.items() if t == topic]
        return [self.state(topic, partition)]

    def revoked_by(self, wanted: Iterable[TopicPartition]) -> list[PartitionState]:
        """The assigned partitions an assignment of `wanted` gives up."""
        keep = set(wanted)
        return [st for tp, st in self.assigned.items() if tp not in keep]

    def assign(self, wanted: list[TopicPartition]) -> None:
        """Assign exactly `wanted`: kept partitions keep their state, new ones start without a
        position, given-up ones move to a new epoch (their buffered and in-flight records are dropped)."""
        old = self.assigned
        new: dict[TopicPartition, PartitionState] = {}
        for tp in wanted:
            st = old.get(tp)
            if st is None:
                st = PartitionState(*tp)
                self.need_positions = True
            new[tp] = st
        for tp, st in old.items():
            if tp not in new:
                st.epoch += 1
        self.assigned = new

    def missing_positions(self, now: float) -> list[PartitionState]:
        """Partitions without a position whose lookup is not backing off at `now`."""
        return [st for st in self.assigned.values() if st.position is None and st.retry_at <= now]

    def update_need_positions(self) -> None:
        self.need_positions = any(st.position is None for st in self.assigned.values())

    def may_gain_topics(self) -> bool:
        """A subscription without a group that may gain topics (metadata is re-read every second)."""
        if self.group_managed or not self.subscribed():
            return False
        if self.pattern is not None:
            return True  # topics created later that match
        have = {t for t, _ in self.assigned}
        return any(t not in have for t in self.topics or ())

    def positions(self) -> dict[TopicPartition, int]:
        return {tp: st.position for tp, st in self.assigned.items() if st.position is not None}

    def uncommitted(self, states: Iterable[PartitionState]) -> dict[TopicPartition, int]:
        """Positions that moved since the last commit (what auto-commit sends)."""
        return {
            (st.topic, st.partition): st.position
            for st in states
            if st.position is not None and st.position != st.committed
        }
