"""The leader's view of one partition's replication: a pure state machine (no I/O, no clock reads).

The leader of a partition keeps, for each follower, how far its log reaches (its log end offset,
LEO: the fetch offset of its latest Fetch) and when it was last caught up; from those it derives the
high watermark (HW) and proposes changes to the in-sync replica set (ISR). The shell
(`partition.Partition`, `replica_manager.ReplicaManager`) feeds it events with the time and the
leader's LEO, performs the I/O its decisions call for (the conditional ISR write), and reports back.

State::

    replicas            the assignment (the leader included)
    isr                 the committed ISR: what the partition-state znode says (leader included)
    pending_isr         a proposed ISR being written (None when no write is in flight); at most one
    leader_epoch        this leadership's epoch; epoch_start_offset = the leader's LEO when it began
    high_watermark      never goes backwards while this state lives
    followers[id]       log_end_offset (-1 until its first fetch in this epoch), last_caught_up_ms,
                        last_fetch_ms, last_fetch_leader_leo

Rules:

- Caught up (Kafka's rule): a follower fetching at >= the leader's LEO is caught up now; fetching at
  >= the LEO the leader had at the follower's previous fetch means caught up as of that previous
  fetch. ISR members start as caught up when the leadership starts, others as never.
- HW = min LEO over the ISR, the leader's own LEO included; a member whose LEO is unknown holds it
  where it is. While an expansion is in flight the joining follower counts too (the "maximal ISR"
  of KIP-497), so a HW never passes a replica that may already be in the ISR in ZooKeeper. The HW
  only moves forward.
- Expand: a follower outside the ISR whose LEO >= HW and >= epoch_start_offset is proposed in,
  only if it is a registered broker fetching under its current broker epoch (KIP-841): the epoch
  its fetch carries equals the epoch the controller's metadata gives for it (> 0). A fenced
  broker (its ZooKeeper session gone) or an earlier incarnation still fetching never joins, so
  the controller never has to take it out again (no ISR flapping).
- Shrink: an ISR follower that is not at the leader's LEO and has not been caught up for
  `replica_lag_time_max_ms` is proposed out.
- A proposal counts only once written: `isr_change_committed` (the ZooKeeper write succeeded) or
  `isr_change_failed`. While one is in flight no other is proposed.

Transitions and their outcomes:

    leader_appended(leo)                       -> HW moved?
    follower_fetched(id, offset, leo, now)     -> HW moved?            (offset <= leo: checked by the shell)
    maybe_expand_isr(id, fetch_broker_epoch=, registered_broker_epoch=) -> proposed ISR or None
    maybe_shrink_isr(now)                      -> proposed ISR or None
    isr_change_started(isr) / isr_change_committed(isr, version) / isr_change_failed()
    update_membership(replicas, isr, version, now)  (same leader epoch: the controller changed the ISR)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

UNKNOWN_OFFSET = -1


def broker_epoch_current(fetch_broker_epoch: int, registered_broker_epoch: int | None) -> bool:
    """Whether a fetch made under `fetch_broker_epoch` comes from the registered incarnation of
    its broker (KIP-841). Epochs are czxids (> 0): no value skips the check."""
    return registered_broker_epoch is not None and registered_broker_epoch > 0 \
        and fetch_broker_epoch == registered_broker_epoch


class AckStatus(enum.Enum):
    """Where an acks=all produce stands."""

    WAITING = "waiting"
    DONE = "done"
    NOT_ENOUGH_REPLICAS_AFTER_APPEND = "not_enough_replicas_after_append"


@dataclass
class FollowerState:
    broker_id: int
    log_end_offset: int = UNKNOWN_OFFSET
    last_caught_up_ms: int = -1  # -1: never (in this leadership)
    last_fetch_ms: int = -1
    last_fetch_leader_leo: int = UNKNOWN_OFFSET

    def update(self, fetch_offset: int, leader_leo: int, now_ms: int) -> None:
        """A fetch at `fetch_offset` while the leader's LEO is `leader_leo` (Kafka's rule)."""
        if fetch_offset >= leader_leo:
            self.last_caught_up_ms = max(self.last_caught_up_ms, now_ms)
        elif self.last_fetch_leader_leo != UNKNOWN_OFFSET and fetch_offset >= self.last_fetch_leader_leo:
            self.last_caught_up_ms = max(self.last_caught_up_ms, self.last_fetch_ms)
        self.log_end_offset = fetch_offset
        self.last_fetch_leader_leo = leader_leo
        self.last_fetch_ms = now_ms


class LeaderState:
    """See the module doc. All times are monotonic milliseconds given by the caller."""

    def __init__(
        self,
        *,
        broker_id: int,
        leader_epoch: int,
        replicas: list[int],
        isr: list[int],
        zk_version: int,
        log_end_offset: int,
        high_watermark: int,
        replica_lag_time_max_ms: int,
        now_ms: int,
    ) -> None:
        if broker_id not in isr:
            raise ValueError(f"leader {broker_id} must be in the ISR {isr}")
        if not 0 <= high_watermark <= log_end_offset:
            raise ValueError(f"high watermark {high_watermark} outside [0, log end offset {log_end_offset}]")
        if replica_lag_time_max_ms <= 0:
            raise ValueError("replica_lag_time_max_ms must be positive")
        self.broker_id = broker_id
        self.leader_epoch = leader_epoch
        self.replicas = list(dict.fromkeys([*replicas, broker_id]))
        self.isr = list(dict.fromkeys(isr))
        self.zk_version = zk_version
        self.log_end_offset = log_end_offset
        self.high_watermark = high_watermark
        self.epoch_start_offset = log_end_offset
        self.replica_lag_time_max_ms = replica_lag_time_max_ms
        self.pending_isr: list[int] | None = None
        self.followers: dict[int, FollowerState] = {}
        self._sync_followers(now_ms)
        self._advance_hw()

    # -- views ----------------------------------------------------------------------------------

    @property
    def maximal_isr(self) -> list[int]:
        """The committed ISR plus any replica a pending expansion adds (used for the HW)."""
        if self.pending_isr is None:
            return self.isr
        return list(dict.fromkeys([*self.isr, *self.pending_isr]))

    @property
    def isr_change_in_flight(self) -> bool:
        return self.pending_isr is not None

    def follower(self, broker_id: int) -> FollowerState | None:
        return self.followers.get(broker_id)

    def has_enough_replicas(self, min_insync_replicas: int) -> bool:
        """Whether an acks=all produce may be appended (the committed ISR is large enough)."""
        return len(self.isr) >= min_insync_replicas

    def ack_status(self, required_offset: int, min_insync_replicas: int) -> AckStatus:
        """An acks=all produce whose last offset is `required_offset - 1`: DONE once the HW has
        passed it, NOT_ENOUGH_REPLICAS_AFTER_APPEND if the ISR is (or was when the HW passed it)
        below `min_insync_replicas`, WAITING otherwise."""
        if len(self.isr) < min_insync_replicas:
            return AckStatus.NOT_ENOUGH_REPLICAS_AFTER_APPEND
        if self.high_watermark >= required_offset:
            return AckStatus.DONE
        return AckStatus.WAITING

    # -- events ---------------------------------------------------------------------------------

    def leader_appended(self, log_end_offset: int) -> bool:
        """The leader's log grew to `log_end_offset`. Returns whether the HW moved."""
        if log_end_offset < self.log_end_offset:
            raise ValueError(f"leader log end offset went back from {self.log_end_offset} to {log_end_offset}")
        self.log_end_offset = log_end_offset
        return self._advance_hw()

    def follower_fetched(self, broker_id: int, fetch_offset: int, leader_log_end_offset: int, now_ms: int) -> bool:
        """Follower `broker_id` fetched at `fetch_offset` (its LEO). Returns whether the HW moved.
        ValueError for a broker that is not a follower replica or an offset past the leader's LEO
        (the shell answers those with an error instead)."""
        state = self.followers.get(broker_id)
        if state is None:
            raise ValueError(f"broker {broker_id} is not a follower of this partition (replicas {self.replicas})")
        if not 0 <= fetch_offset <= leader_log_end_offset:
            raise ValueError(f"fetch offset {fetch_offset} outside [0, leader log end offset {leader_log_end_offset}]")
        if leader_log_end_offset < self.log_end_offset:
            raise ValueError("leader log end offset went back")
        self.log_end_offset = leader_log_end_offset
        state.update(fetch_offset, leader_log_end_offset, now_ms)
        return self._advance_hw()

    def maybe_expand_isr(self, broker_id: int, *, fetch_broker_epoch: int,
                         registered_broker_epoch: int | None) -> list[int] | None:
        """The ISR with `broker_id` added, if it qualifies and no ISR change is in flight.
        `fetch_broker_epoch`: the broker epoch its fetch carried; `registered_broker_epoch`: its
        epoch in the leader's metadata (None: not a live broker there). They must match (> 0)."""
        if self.pending_isr is not None or broker_id in self.isr:
            return None
        if not broker_epoch_current(fetch_broker_epoch, registered_broker_epoch):
            return None
        state = self.followers.get(broker_id)
        if state is None or state.log_end_offset == UNKNOWN_OFFSET:
            return None
        if state.log_end_offset >= self.high_watermark and state.log_end_offset >= self.epoch_start_offset:
            return [*self.isr, broker_id]
        return None

    def maybe_shrink_isr(self, now_ms: int) -> list[int] | None:
        """The ISR without the followers that are out of sync, if any and no change is in flight."""
        if self.pending_isr is not None:
            return None
        lagging = [b for b in self.isr if b != self.broker_id and self._out_of_sync(b, now_ms)]
        if not lagging:
            return None
        return [b for b in self.isr if b not in lagging]

    def _out_of_sync(self, broker_id: int, now_ms: int) -> bool:
        state = self.followers.get(broker_id)
        if state is None:
            return True
        if state.log_end_offset == self.log_end_offset:
            return False
        return state.last_caught_up_ms < 0 or now_ms - state.last_caught_up_ms > self.replica_lag_time_max_ms

    def isr_change_started(self, proposed: list[int]) -> None:
        if self.pending_isr is not None:
            raise ValueError("an ISR change is already in flight")
        if self.broker_id not in proposed:
            raise ValueError(f"the leader {self.broker_id} cannot leave the ISR")
        self.pending_isr = list(proposed)

    def isr_change_committed(self, isr: list[int], zk_version: int) -> bool:
        """The write succeeded: `isr` at `zk_version` is the ISR now (ignored if the state already
        knows a newer version). Returns whether the HW moved."""
        self.pending_isr = None
        if zk_version <= self.zk_version:
            return False
        self.isr = [b for b in dict.fromkeys(isr) if b in self.replicas or b == self.broker_id]
        if self.broker_id not in self.isr:
            self.isr.insert(0, self.broker_id)
        self.zk_version = zk_version
        return self._advance_hw()

    def isr_change_failed(self) -> bool:
        """The write was refused: the committed ISR stays. Returns whether the HW moved (a
        refused expansion no longer holds it back)."""
        self.pending_isr = None
        return self._advance_hw()

    def update_membership(self, replicas: list[int], isr: list[int], zk_version: int, now_ms: int) -> bool:
        """The controller changed this leadership's replicas or ISR (same leader epoch, newer
        znode version). Returns whether the HW moved. Followers kept keep their progress."""
        if self.broker_id not in isr:
            raise ValueError(f"leader {self.broker_id} must be in the ISR {isr}")
        self.replicas = list(dict.fromkeys([*replicas, self.broker_id]))
        self.isr = list(dict.fromkeys(isr))
        self.zk_version = zk_version
        self._sync_followers(now_ms)
        return self._advance_hw()

    # -- internals ------------------------------------------------------------------------------

    def _sync_followers(self, now_ms: int) -> None:
        followers = {}
        for b in dict.fromkeys([*self.replicas, *self.isr]):
            if b == self.broker_id:
                continue
            state = self.followers.get(b)
            if state is None:
                state = FollowerState(b, last_caught_up_ms=now_ms if b in self.isr else -1)
            followers[b] = state
        self.followers = followers

    def _advance_hw(self) -> bool:
        candidate = self.log_end_offset
        for b in self.maximal_isr:
            if b == self.broker_id:
                continue
            state = self.followers.get(b)
            if state is None or state.log_end_offset == UNKNOWN_OFFSET:
                return False
            candidate = min(candidate, state.log_end_offset)
        if candidate > self.high_watermark:
            self.high_watermark = candidate
            return True
        return False
