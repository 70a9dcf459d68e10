"""One partition replica hosted by this broker: its log and its role (leader, follower, or none).

Roles and transitions (the replica manager drives them from LeaderAndIsr / StopReplica, or, for a
standalone broker, makes the broker leader of everything with ISR = [itself])::

    NONE (new, or stopped) --become_leader(state)----> LEADER    epoch start = LEO in the epoch history;
                                                                 a LeaderState (partition_state.py)
    NONE/LEADER/FOLLOWER --become_follower(state)--> FOLLOWER   the fetcher truncates by leader epoch,
                                                                 then appends as follower
    LEADER/FOLLOWER ------stop()---------------------> NONE      nothing is served

    LEADER --become_leader(same epoch, newer zk version)--> LEADER   membership update only

The leader serves produce (`append_as_leader`), consumer reads (`read_for_consumer`: up to the high
watermark) and follower reads (`read_for_follower`: up to the log end offset, recording the
follower's progress). Every request naming a leader epoch is fenced against this replica's:
older -> FENCED_LEADER_EPOCH, newer -> UNKNOWN_LEADER_EPOCH, -1 -> not checked.

A follower's log is written only by the fetcher (`truncate_as_follower`, `append_as_follower`),
its high watermark is min(leader's high watermark, own log end offset). It serves nothing.

Single-threaded: owned by the broker's event loop. No I/O here other than the log's.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from logbroker.cluster.metadata import PartitionStateData
from logbroker.errors import (
    FencedLeaderEpochError,
    NotEnoughReplicasError,
    NotLeaderOrFollowerError,
    UnknownLeaderEpochError,
)
from logbroker.replication.partition_state import AckStatus, LeaderState
from logbroker.storage.log import AppendResult, Log

DEFAULT_REPLICA_LAG_TIME_MAX_MS = 10_000


class Role(enum.Enum):
    NONE = "none"
    LEADER = "leader"
    FOLLOWER = "follower"


class FollowerFetchOutcome(NamedTuple):
    high_watermark_moved: bool
    proposed_isr: list[int] | None  # an ISR expansion to write, if the follower now qualifies


class Partition:
    """See the module doc."""

    def __init__(
        self,
        topic: str,
        index: int,
        log: Log,
        broker_id: int,
        *,
        min_insync_replicas: int = 1,
        replica_lag_time_max_ms: int = DEFAULT_REPLICA_LAG_TIME_MAX_MS,
    ) -> None:
        self.topic = topic
        self.index = index
        self.log = log
        self.broker_id = broker_id
        self.min_insync_replicas = min_insync_replicas
        self.replica_lag_time_max_ms = replica_lag_time_max_ms
        self.role = Role.NONE
        self.leader = -1
        self.leader_epoch = -1
        self.zk_version = -1
        self.controller_epoch = -1
        self.replicas: list[int] = []
        self.isr: list[int] = []
        self.leader_state: LeaderState | None = None

    def __repr__(self) -> str:
        return (f"Partition({self.topic}-{self.index}, {self.role.value}, leader={self.leader}, "
                f"epoch={self.leader_epoch}, isr={self.isr}, hw={self.high_watermark}, "
                f"leo={self.log.log_end_offset})")

    @property
    def key(self) -> tuple[str, int]:
        return (self.topic, self.index)

    @property
    def high_watermark(self) -> int:
        return self.log.high_watermark

    @property
    def is_leader(self) -> bool:
        return self.role is Role.LEADER

    def is_follower_of(self, leader: int, leader_epoch: int) -> bool:
        return self.role is Role.FOLLOWER and self.leader == leader and self.leader_epoch == leader_epoch

    # -- transitions ----------------------------------------------------------------------------

    def become_leader(self, state: PartitionStateData, replicas: list[int], now_ms: int) -> bool:
        """Lead in `state.leader_epoch` with ISR `state.isr`. Returns True when this starts a new
        leadership (the epoch starts at the log end offset; followers start unknown), False when
        it only updates the current one (same epoch: replicas and ISR from the controller)."""
        if state.leader != self.broker_id:
            raise ValueError(f"state names broker {state.leader} as leader, this is broker {self.broker_id}")
        isr = list(dict.fromkeys([*state.isr, self.broker_id]))  # the controller's order
        current = self.leader_state
        if self.role is Role.LEADER and current is not None and state.leader_epoch == self.leader_epoch:
            current.update_membership(replicas, isr, state.zk_version, now_ms)
            new_leadership = False
        else:
            self.log.assign_epoch_start(state.leader_epoch, self.log.log_end_offset)
            self.leader_state = LeaderState(
                broker_id=self.broker_id, leader_epoch=state.leader_epoch, replicas=replicas, isr=isr,
                zk_version=state.zk_version, log_end_offset=self.log.log_end_offset,
                high_watermark=self.log.high_watermark, replica_lag_time_max_ms=self.replica_lag_time_max_ms,
                now_ms=now_ms,
            )
            new_leadership = True
        self.role = Role.LEADER
        self.leader = self.broker_id
        self.leader_epoch = state.leader_epoch
        self.controller_epoch = state.controller_epoch
        self.replicas = list(replicas)
        self.sync_leader_state()
        return new_leadership

    def become_follower(self, state: PartitionStateData, replicas: list[int]) -> bool:
        """Follow `state.leader` (-1: no leader for now) in `state.leader_epoch`. Returns True when
        the leader or the epoch changed (the fetcher must start over, truncating first)."""
        changed = (self.role is not Role.FOLLOWER or self.leader != state.leader
                   or self.leader_epoch != state.leader_epoch)
        self.role = Role.FOLLOWER
        self.leader_state = None
        self.leader = state.leader
        self.leader_epoch = state.leader_epoch
        self.zk_version = state.zk_version
        self.controller_epoch = state.controller_epoch
        self.replicas = list(replicas)
        self.isr = list(state.isr)
        return changed

    def stop(self, forget_state: bool = False) -> None:
        """Serve nothing until the next LeaderAndIsr (StopReplica, or the log is going away).
        `forget_state`: also forget the applied leader epoch and znode version, so that the next
        LeaderAndIsr is applied even if it carries the same state."""
        self.role = Role.NONE
        self.leader_state = None
        if forget_state:
            self.leader = self.leader_epoch = self.zk_version = -1

    def sync_leader_state(self) -> None:
        """Copy the leader state's ISR, version and high watermark to the partition and its log."""
        ls = self.leader_state
        if ls is None:
            return
        self.isr = list(ls.isr)
        self.zk_version = ls.zk_version
        if ls.high_watermark != self.log.high_watermark:
            self.log.high_watermark = ls.high_watermark

    # -- checks ---------------------------------------------------------------------------------

    def check_leader_epoch(self, current_leader_epoch: int) -> None:
        """Fence a request made at `current_leader_epoch` (-1: unchecked)."""
        if current_leader_epoch < 0:
            return
        if current_leader_epoch < self.leader_epoch:
            raise FencedLeaderEpochError(
                f"{self.topic}-{self.index}: leader epoch {current_leader_epoch} is older than {self.leader_epoch}"
            )
        if current_leader_epoch > self.leader_epoch:
            raise UnknownLeaderEpochError(
                f"{self.topic}-{self.index}: leader epoch {current_leader_epoch} is newer than {self.leader_epoch}"
            )

    def leader_state_or_raise(self, current_leader_epoch: int = -1) -> LeaderState:
        self.check_leader_epoch(current_leader_epoch)
        ls = self.leader_state
        if self.role is not Role.LEADER or ls is None:
            raise NotLeaderOrFollowerError(
                f"broker {self.broker_id} is not the leader of {self.topic}-{self.index} (leader: {self.leader})"
            )
        return ls

    # -- leader ---------------------------------------------------------------------------------

    def append_as_leader(self, records: bytes | bytearray | memoryview, acks: int = 1) -> AppendResult:
        """Append a produce payload in the current leader epoch. acks=-1 refuses with
        NOT_ENOUGH_REPLICAS, appending nothing, while the ISR is below min_insync_replicas."""
        ls = self.leader_state_or_raise()
        if acks == -1 and not ls.has_enough_replicas(self.min_insync_replicas):
            raise NotEnoughReplicasError(
                f"{self.topic}-{self.index}: ISR {ls.isr} is smaller than min_insync_replicas {self.min_insync_replicas}"
            )
        result = self.log.append(records, self.leader_epoch)
        if ls.leader_appended(self.log.log_end_offset):
            self.sync_leader_state()
        return result

    def ack_status(self, required_offset: int, leader_epoch: int) -> AckStatus:
        """Where an acks=all produce appended in `leader_epoch`, ending before `required_offset`,
        stands. NOT_LEADER_OR_FOLLOWER if the leadership it was appended in is over."""
        ls = self.leader_state
        if self.role is not Role.LEADER or ls is None or self.leader_epoch != leader_epoch:
            raise NotLeaderOrFollowerError(
                f"leadership of {self.topic}-{self.index} in epoch {leader_epoch} ended before the records were replicated"
            )
        return ls.ack_status(required_offset, self.min_insync_replicas)

    def read_for_consumer(self, offset: int, max_bytes: int, current_leader_epoch: int = -1) -> memoryview:
        """Whole batches from `offset`, never past the high watermark; valid until the log changes."""
        self.leader_state_or_raise(current_leader_epoch)
        return self.log.read(offset, max_bytes, self.log.high_watermark)

    def read(self, offset: int, max_bytes: int) -> memoryview:
        """A consumer read (kept for callers of the standalone API)."""
        return self.read_for_consumer(offset, max_bytes)

    def read_for_follower(
        self, replica_id: int, offset: int, max_bytes: int, current_leader_epoch: int, now_ms: int, *,
        fetch_broker_epoch: int = -1, registered_broker_epoch: int | None = None,
    ) -> tuple[memoryview, FollowerFetchOutcome]:
        """Whole batches from `offset` up to the log end offset for follower `replica_id`, whose
        log ends at `offset`: records its progress (the high watermark may move) and whether it
        now qualifies for the ISR (only if `fetch_broker_epoch`, the epoch its fetch carried, is
        `registered_broker_epoch`, its current one in the metadata: KIP-841)."""
        ls = self.leader_state_or_raise(current_leader_epoch)
        if ls.follower(replica_id) is None:
            raise NotLeaderOrFollowerError(
                f"broker {replica_id} is not a replica of {self.topic}-{self.index} (replicas {ls.replicas})"
            )
        view = self.log.read(offset, max_bytes, self.log.log_end_offset)  # OffsetOutOfRange outside the log
        moved = ls.follower_fetched(replica_id, offset, self.log.log_end_offset, now_ms)
        if moved:
            self.sync_leader_state()
        proposed = ls.maybe_expand_isr(replica_id, fetch_broker_epoch=fetch_broker_epoch,
                                       registered_broker_epoch=registered_broker_epoch)
        return view, FollowerFetchOutcome(moved, proposed)

    def epoch_end_offset(self, current_leader_epoch: int, leader_epoch: int) -> tuple[int, int]:
        """OffsetForLeaderEpoch as the leader: (largest epoch <= `leader_epoch`, its end offset)."""
        self.leader_state_or_raise(current_leader_epoch)
        return self.log.end_offset_for_epoch(leader_epoch)

    # -- follower -------------------------------------------------------------------------------

    def append_as_follower(self, records: bytes | bytearray | memoryview, leader_high_watermark: int,
                           leader_log_start_offset: int = -1) -> AppendResult | None:
        """Append what the leader sent (nothing if empty), then take its high watermark, capped at
        our log end offset, and its log start offset (as Kafka's follower, `maybeIncrementLog-
        StartOffset`): retention on the leader is mirrored here, whole segments below it deleted."""
        result = self.log.append_as_follower(records) if len(records) else None
        self.update_follower_high_watermark(leader_high_watermark)
        if leader_log_start_offset > self.log.log_start_offset:
            self.log.advance_log_start_offset(leader_log_start_offset)
        return result

    def update_follower_high_watermark(self, leader_high_watermark: int) -> None:
        hw = max(0, min(leader_high_watermark, self.log.log_end_offset))
        if hw != self.log.high_watermark:
            self.log.high_watermark = hw

    def truncate_as_follower(self, offset: int) -> None:
        self.log.truncate_to(offset)

    def restart_as_follower_at(self, offset: int) -> None:
        """Empty the log and restart it at the leader's log start offset (we fell behind it)."""
        self.log.truncate_fully_and_start_at(offset)
