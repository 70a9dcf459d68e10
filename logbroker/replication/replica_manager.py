"""Every partition replica of one broker: their roles, the produce and fetch data path, ISR upkeep.

The replica manager owns the `Partition` objects (and through the `LogManager` their logs), the two
purgatories (fetches parked for data or a high-watermark move; acks=all produces parked until the
high watermark passes them), the follower fetchers, and the ISR writes.

Roles come from the controller (`leader_and_isr`, `stop_replica`: the `Replica` service calls them)
or, standalone, from `make_local_leader` (the broker leads everything, ISR = [itself], an
`InMemoryIsrStore`). Requests are fenced:

- controller_epoch below the highest seen -> STALE_CONTROLLER_EPOCH (whole request);
- this broker does not know its epoch (current epoch <= 0: it is registering again after a lost
  session, ZooKeeper may already hold the registration the controller saw, the broker has not heard
  back yet), whatever the request carries, or the request's broker_epoch is newer than this
  broker's current one -> BROKER_NOT_AVAILABLE, retriable: the controller retries with backoff
  (bounded) and the request applies once the epoch is known;
- any other broker_epoch but this broker's current one (older, 0 or negative: no value skips the
  check, -1 never matches an unknown epoch) -> STALE_BROKER_EPOCH (whole request; the controller
  drops it: the broker re-registered, a newer request follows);
- per partition, a state whose leader epoch is older than the one applied, or equal with an
  older znode version -> STALE_CONTROLLER_EPOCH for that partition; an identical one is a no-op.

Bad copies (issue 13, as Kafka's offline replicas). A replica this broker must not lead is named
to the controller through `offline_reporter` (a cluster: ReportOfflineReplicas; standalone: None),
which takes it out of the ISR and elects another ISR member (or none):

- a vanished log (log_identity.LostLogError) named LEADER, or in a leaderless state, by a
  LeaderAndIsr is never created empty: that partition answers KAFKA_STORAGE_ERROR (the controller
  reads it as an offline report) and stays in `offline_partitions`; named FOLLOWER of a live
  leader, it is created empty and fetched again (it joins the ISR only once caught up);
- a corrupt batch found by the scrubber: a follower truncates to it and re-fetches at once
  (`refetch_from`) and is reported, so it leaves the ISR now rather than lagging in it for up to
  replica_lag_time_max_ms; a leader with another ISR member is reported (`leader_copy_corrupt`) and
  remembers the offset: the LeaderAndIsr that makes it a follower of a live leader truncates it
  there and re-fetches. A leader alone in its ISR only flags the log (no healthy copy to move to).
  A copy truncated that way may be below the high watermark while the controller still has it in
  the ISR (the report is asynchronous): until it may lead again (`_CatchUp`) a LeaderAndIsr naming
  it leader is answered KAFKA_STORAGE_ERROR for that partition (the controller reads it as an
  offline report and elects another ISR member). It may lead again once its log end offset is back
  at the one it had before the truncation (which was >= the high watermark whenever it was in the
  ISR: so it holds every acknowledged record again), or once a state from the controller shows it
  out of the ISR and a newer one shows it back in (the leader re-added it: caught up).
- `topics recover-empty` in a cluster (`recover_empty_replica`) recreates a vanished log empty and
  reports it recovered: the controller may then make it leader (the operator accepted the loss).

ISR changes are proposed by the pure `LeaderState` (expand on a follower fetch, shrink on the
periodic check every replica_lag_time_max_ms / 2) and written through an `IsrStore` (ZooKeeper in a
cluster): a conditional write on the znode version the leader knows. Only a successful write
changes the ISR the leader uses; a refused one leaves it, and the next LeaderAndIsr brings the truth.
An expansion needs the follower's fetch to carry its current broker epoch (`replica_epoch`), the
one the controller's latest LeaderAndIsr / UpdateMetadata gives for it (`live_broker_epochs`,
KIP-841): a broker whose session is gone, or an earlier incarnation's fetches, never re-enter.
At most one write per partition is in flight; proposals of a partition are at least
`ISR_PROPOSAL_INTERVAL_MS` apart (a bound on ZooKeeper writes whatever happens); after a failure
the partition waits `ISR_RETRY_BACKOFF_MS` before proposing again.

Event-loop only, except `IsrStore.write_isr`, which runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from logbroker.clock import SYSTEM_CLOCK, Clock
from logbroker.cluster.cluster_secret import call_metadata
from logbroker.cluster.metadata import PartitionStateData
from logbroker.errors import (
    BrokerError,
    BrokerNotAvailableError,
    InvalidConfigError,
    InvalidRequestError,
    InvalidRequiredAcksError,
    NotEnoughReplicasAfterAppendError,
    NotLeaderOrFollowerError,
    RequestTimedOutError,
    StaleBrokerEpochError,
    StaleControllerEpochError,
    StorageError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
)
from logbroker.replication.fetcher import FetcherConfig, FetchPhase, ReplicaFetcherManager
from logbroker.replication.partition import DEFAULT_REPLICA_LAG_TIME_MAX_MS, Partition, Role
from logbroker.replication.partition_state import AckStatus, LeaderState
from logbroker.replication.purgatory import Purgatory
from logbroker.storage.log import AppendResult, LogConfig
from logbroker.storage.log_identity import LostLogError
from logbroker.storage.log_manager import LogManager
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

Key = tuple[str, int]

ISR_RETRY_BACKOFF_MS = 1000
ISR_PROPOSAL_INTERVAL_MS = 100  # per partition: at most 10 ISR writes a second
PRODUCE_TIMEOUT_MS_DEFAULT = 30_000  # acks=all wait when a request gives none (timeout_ms <= 0)
PRODUCE_TIMEOUT_MS_MAX = 300_000
ISR_CHECK_INTERVAL_MS_MIN = 10


class IsrStore(Protocol):
    """Where a leader writes the ISR it wants (ZooKeeper in a cluster).

    `write_isr` is BLOCKING: the replica manager calls it in a worker thread
    (`asyncio.to_thread`), never on the event loop. It replaces the partition state with `state`
    (same leader and leader epoch, new ISR) only if the stored znode version is still
    `state.zk_version`, and returns the state as stored, with its new `zk_version`; None if the
    write was refused (version conflict, leader epoch moved on: a LeaderAndIsr will follow). It may
    raise on a connection problem: that counts as refused.
    """

    def write_isr(self, topic: str, partition: int, state: PartitionStateData) -> PartitionStateData | None: ...


class CallableIsrStore:
    """An `IsrStore` over a blocking function with `write_isr`'s signature, e.g.
    `CallableIsrStore(zk_store.write_isr_as_leader)`."""

    def __init__(self, write: Callable[[str, int, PartitionStateData], PartitionStateData | None]) -> None:
        self._write = write

    def write_isr(self, topic: str, partition: int, state: PartitionStateData) -> PartitionStateData | None:
        return self._write(topic, partition, state)


class InMemoryIsrStore:
    """The `IsrStore` of a standalone broker (and of tests): versioned states in a dict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._states: dict[Key, PartitionStateData] = {}
        self.writes = 0

    def set_state(self, topic: str, partition: int, state: PartitionStateData) -> None:
        with self._lock:
            self._states[(topic, partition)] = state

    def get_state(self, topic: str, partition: int) -> PartitionStateData | None:
        with self._lock:
            return self._states.get((topic, partition))

    def write_isr(self, topic: str, partition: int, state: PartitionStateData) -> PartitionStateData | None:
        with self._lock:
            self.writes += 1
            current = self._states.get((topic, partition))
            if current is not None and (
                current.zk_version != state.zk_version or current.leader != state.leader
                or current.leader_epoch != state.leader_epoch
            ):
                return None
            stored = PartitionStateData(state.leader, state.leader_epoch, list(state.isr), state.controller_epoch,
                                        state.zk_version + 1)
            self._states[(topic, partition)] = stored
            return stored


@dataclass
class _CatchUp:
    """A replica truncated below what it had (a corrupt batch) that must not lead until it holds
    every acknowledged record again (module doc). `seen`: the newest (leader epoch, znode version)
    of the partition's state seen since; `left_isr`: a state since the truncation left it out."""

    target_offset: int  # the log end offset before the truncation
    seen: tuple[int, int]
    left_isr: bool = False


class LeaderAppend(NamedTuple):
    """A produce appended by the leader, and what an acks=all wait needs to know about it."""

    result: AppendResult
    leader_epoch: int
    log_start_offset: int


class FetchRead(NamedTuple):
    """One partition's part of a Fetch: the records (a zero-copy view, valid until the log next
    changes; release a non-empty one when done, never an empty one: it may be shared) and the
    offsets to report."""

    records: memoryview
    high_watermark: int
    log_start_offset: int
    log_end_offset: int


class ReplicaManager:
    """See the module doc."""

    def __init__(
        self,
        broker_id: int,
        log_manager: LogManager,
        isr_store: IsrStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        *,
        replica_lag_time_max_ms: int = DEFAULT_REPLICA_LAG_TIME_MAX_MS,
        fetcher_config: FetcherConfig | None = None,
        produce_timeout_ms_max: int = PRODUCE_TIMEOUT_MS_MAX,
        cluster_secret: bytes = b"",
    ) -> None:
        if replica_lag_time_max_ms <= 0:
            raise ValueError("replica_lag_time_max_ms must be positive")
        self.broker_id = broker_id
        self.log_manager = log_manager
        self.isr_store: IsrStore = isr_store if isr_store is not None else InMemoryIsrStore()
        self.clock = clock
        self.replica_lag_time_max_ms = replica_lag_time_max_ms
        self.produce_timeout_ms_max = produce_timeout_ms_max
        self.partitions: dict[Key, Partition] = {}
        # Standalone: partitions whose log vanished (log_identity.LostLogError), refused with
        # KAFKA_STORAGE_ERROR until an operator accepts the loss (`recover_empty`). Reason by key.
        self.offline_partitions: dict[Key, str] = {}
        # Cluster: names replicas to the controller (offline ones with a reason, recovered ones).
        self.offline_reporter: Callable[[dict[Key, str], list[Key]], None] | None = None
        # Leaders that reported a corrupt batch: where to truncate once a LeaderAndIsr makes them followers.
        self._refetch_when_following: dict[Key, int] = {}
        # Replicas truncated below what they had: no leading until caught up again (module doc).
        self._catching_up: dict[Key, _CatchUp] = {}
        self.fetch_purgatory = Purgatory()
        self.produce_purgatory = Purgatory()
        self.fetchers = ReplicaFetcherManager(broker_id, fetcher_config, clock, call_metadata(cluster_secret))
        self.controller_epoch = -1
        self.broker_addresses: dict[int, str] = {}
        # broker id -> broker epoch of every live broker, from the controller's latest word
        self.live_broker_epochs: dict[int, int] = {}
        self._isr_writes: dict[Key, asyncio.Task[None]] = {}
        self._isr_retry_at_ms: dict[Key, int] = {}
        # ISR changes this broker made as leader and saw committed (`logbroker_isr_{shrinks,expands}_total`)
        self.isr_shrinks_total = 0
        self.isr_expands_total = 0
        self._isr_task: asyncio.Task[None] | None = None
        self._stopping = False
        # called (no arguments, possibly off the loop) after partition roles may have changed:
        # the group coordinator follows its __consumer_offsets leaderships this way
        self.role_listeners: list[Callable[[], None]] = []

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the periodic ISR-shrink check (call on the running event loop)."""
        if self._isr_task is None:
            self._isr_task = asyncio.create_task(self._isr_check_loop(), name=f"isr-check-{self.broker_id}")

    async def shutdown(self) -> None:
        """Stop the fetchers and the ISR check, and answer every parked produce and fetch (the
        produces with NOT_LEADER_OR_FOLLOWER). Logs stay open: the LogManager closes them."""
        self._stopping = True
        task, self._isr_task = self._isr_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.fetchers.shutdown()
        writes = list(self._isr_writes.values())
        for w in writes:
            w.cancel()
        if writes:
            await asyncio.gather(*writes, return_exceptions=True)
        self.produce_purgatory.notify_all()
        self.fetch_purgatory.notify_all()

    @property
    def stopping(self) -> bool:
        return self._stopping

    # -- lookup ---------------------------------------------------------------------------------

    def get_partition(self, topic: str, partition: int) -> Partition:
        p = self.partitions.get((topic, partition))
        if p is None:
            self.check_online(topic, partition)
            raise UnknownTopicOrPartitionError(f"broker {self.broker_id} hosts no replica of {topic}-{partition}")
        return p

    def check_online(self, topic: str, partition: int) -> None:
        """KAFKA_STORAGE_ERROR if the partition is offline on this broker."""
        reason = self.offline_partitions.get((topic, partition))
        if reason is not None:
            raise StorageError(f"{topic}-{partition} is offline on broker {self.broker_id}: {reason}")

    def leader_partition(self, topic: str, partition: int) -> Partition:
        p = self.get_partition(topic, partition)
        if not p.is_leader:
            raise NotLeaderOrFollowerError(
                f"broker {self.broker_id} is not the leader of {topic}-{partition} (leader: {p.leader})"
            )
        return p

    def _roles_changed(self) -> None:
        for listener in list(self.role_listeners):
            try:
                listener()
            except Exception:
                log.exception("role listener failed")

    def notify(self, key: Key) -> None:
        """Wake what waits on `key`: parked fetches and acks=all produces re-check."""
        self.fetch_purgatory.notify(key)
        self.produce_purgatory.notify(key)

    # -- standalone -----------------------------------------------------------------------------

    def make_local_leader(self, topic: str, partition: int, topic_config: dict[str, str] | None = None,
                          topic_id: str = "") -> Partition:
        """Standalone: open (or create) the log and lead it with ISR = [this broker], in the log's
        latest leader epoch (0 for a new log). A log this broker created that has vanished raises
        LostLogError (see `mark_offline`, `recover_empty`)."""
        config = topic_config or {}
        part = self.partitions.get((topic, partition)) or self._create_partition(topic, partition, config, topic_id)
        epoch = max(0, part.log.latest_epoch)
        state = PartitionStateData(self.broker_id, epoch, [self.broker_id], 0, 0)
        part.become_leader(state, [self.broker_id], self.clock.monotonic_ms())
        if isinstance(self.isr_store, InMemoryIsrStore):
            self.isr_store.set_state(topic, partition, state)
        self._roles_changed()
        return part

    def mark_offline(self, topic: str, partition: int, reason: str) -> None:
        """Standalone: serve nothing of this partition (KAFKA_STORAGE_ERROR) until `recover_empty`."""
        log.error("broker %d: %s-%d is offline: %s. Produce and fetch fail with KAFKA_STORAGE_ERROR until an "
                  "operator accepts the loss: logbroker topics recover-empty %s %d", self.broker_id, topic, partition,
                  reason, topic, partition)
        self.offline_partitions[(topic, partition)] = reason
        self.notify((topic, partition))

    def recover_empty(self, topic: str, partition: int, topic_config: dict[str, str], topic_id: str) -> Partition:
        """Standalone: an operator accepts the loss of an offline partition: create its log empty
        and lead it. InvalidRequestError if it is not offline."""
        key = (topic, partition)
        if key not in self.offline_partitions:
            raise InvalidRequestError(f"{topic}-{partition} is not offline on broker {self.broker_id}: nothing to recover")
        self.log_manager.create_log(topic, partition, LogConfig.from_topic_config(
            topic_config, self.log_manager.default_config), topic_id, accept_loss=True)
        del self.offline_partitions[key]
        log.warning("broker %d: %s-%d recreated empty (an operator accepted the loss of its data)", self.broker_id,
                    topic, partition)
        return self.make_local_leader(topic, partition, topic_config, topic_id)

    def remove_partition(self, topic: str, partition: int, delete: bool) -> bool:
        """Stop the replica (no fetcher, no role) and, if `delete`, forget it and delete its log.
        Parked requests on it are woken. Returns whether there was one."""
        key = (topic, partition)
        self.fetchers.remove_partitions([key])
        part = self.partitions.get(key)
        if part is not None:
            part.stop()
        self._refetch_when_following.pop(key, None)
        if delete:
            self._catching_up.pop(key, None)
            self.offline_partitions.pop(key, None)
            self.partitions.pop(key, None)
            self.log_manager.delete_log(topic, partition)
        self.notify(key)
        self._roles_changed()
        return part is not None

    def remove_deleted_topics(self, topics: Iterable[str]) -> int:
        """Delete every replica and every log on disk of these topics, which the controller says are
        deleted (UpdateMetadata `deleted_topics`). It catches what a StopReplica(delete) missed: a
        broker that was down while its topic was deleted loaded that log again on restart. Returns
        how many logs were deleted (a failure is logged and retried with the next UpdateMetadata)."""
        doomed = set(topics)
        if not doomed:
            return 0
        deleted = 0
        for topic, partition in sorted({k for k in (*self.partitions, *self.log_manager.logs()) if k[0] in doomed}):
            log.info("broker %d deletes its replica of %s-%d: the topic was deleted", self.broker_id, topic,
                     partition)
            try:
                self.remove_partition(topic, partition, delete=True)
                deleted += 1
            except Exception as exc:
                log.error("deleting %s-%d failed: %s", topic, partition, exc)
        return deleted

    def remove_stray_replicas(self, partitions: Iterable[pb.PartitionState]) -> int:
        """Delete the local replicas and logs that the controller's whole view (UpdateMetadata
        `partitions`: every partition of every live topic) shows to be strays: a reassignment moved
        the partition away while this broker was down, or the StopReplica(delete) of our former
        replica was lost (Kafka's stray partitions). Only authoritative metadata counts: a log of a
        topic or partition the view does not list is left alone (its metadata may just not be here
        yet; deleted topics go through `remove_deleted_topics`). See `_stray` for when a listed one
        is a stray. The log registry keeps a deleted stray (it counts as lost, not as never created):
        should the deletion have been wrong, a LeaderAndIsr naming this broker leader of it is
        refused (KAFKA_STORAGE_ERROR), never led empty. Returns how many were deleted (a failure is
        logged and retried with the next UpdateMetadata)."""
        listed = {(ps.topic, ps.partition): ps for ps in partitions}
        deleted = 0
        for topic, partition in sorted({*self.partitions, *self.log_manager.logs()}):
            key = (topic, partition)
            ps = listed.get(key)
            if ps is None or not self._stray(ps, self.partitions.get(key)):
                continue
            log.warning("broker %d deletes its stray replica of %s-%d: the controller's metadata names replicas %s, "
                        "leader %d, ISR %s in leader epoch %d", self.broker_id, topic, partition, list(ps.replicas),
                        ps.leader, list(ps.isr), ps.leader_epoch)
            registered = self.log_manager.registry.get(key)
            try:
                self.remove_partition(topic, partition, delete=True)
                deleted += 1
            except Exception as exc:
                log.error("deleting stray %s-%d failed: %s", topic, partition, exc)
            if registered is not None:
                self.log_manager.registry.record(key, registered)
        return deleted

    def _stray(self, ps: pb.PartitionState, part: Partition | None) -> bool:
        """Whether our replica of `ps`'s partition is a stray, given the controller's view `ps`. The
        view may run ahead of ZooKeeper (a reassignment's new assignment is in it before it is
        written; the write may fail) or behind what a LeaderAndIsr told us, so never while the view
        still counts on our copy (we are a replica, the leader or in the ISR); and a replica that
        has a state from a LeaderAndIsr (leading, following, or stopped) only once the view's state
        is newer than that state and names another leader: then the controller has moved on
        without us. A replica with no state (a log loaded from disk, never named by a LeaderAndIsr
        since, or whose roles were dropped) is a stray as soon as the view leaves it out."""
        me = self.broker_id
        if me in ps.replicas or ps.leader == me or me in ps.isr:
            return False
        if part is None or part.leader_epoch < 0:
            return True
        return ps.leader >= 0 and ps.leader_epoch > part.leader_epoch

    def drop_all_roles(self) -> None:
        """Lead nothing and follow nothing until the controller says otherwise (the ZooKeeper
        session was lost: the broker re-registers with a new epoch). Applied states are forgotten,
        so the controller's next LeaderAndIsr applies even if it repeats them."""
        self.fetchers.remove_partitions(list(self.partitions))
        for key, part in self.partitions.items():
            part.stop(forget_state=True)
            self.notify(key)
        self._roles_changed()

    # -- produce --------------------------------------------------------------------------------

    def append_records(self, topic: str, partition: int, records: bytes, acks: int) -> LeaderAppend:
        """The leader's append of a produce payload (any acks). NOT_LEADER_OR_FOLLOWER on a
        non-leader; acks=-1 with the ISR below min_insync_replicas: NOT_ENOUGH_REPLICAS."""
        if acks not in (-1, 0, 1):
            raise InvalidRequiredAcksError(f"acks must be -1 (all), 0 or 1, got {acks}")
        part = self.leader_partition(topic, partition)
        result = part.append_as_leader(records, acks)
        self.notify((topic, partition))  # data for followers; the HW may have moved (ISR = [leader])
        return LeaderAppend(result, part.leader_epoch, part.log.log_start_offset)

    async def wait_for_acks(self, topic: str, partition: int, append: LeaderAppend, timeout_ms: int) -> None:
        """Wait (acks=all) until the high watermark passes `append`. Raises
        NotEnoughReplicasAfterAppendError (the ISR fell below min_insync_replicas),
        NotLeaderOrFollowerError (the leadership ended), RequestTimedOutError."""
        key = (topic, partition)
        required = append.result.last_offset + 1
        timeout_ms = timeout_ms if timeout_ms > 0 else PRODUCE_TIMEOUT_MS_DEFAULT
        timeout_ms = min(timeout_ms, self.produce_timeout_ms_max)
        outcome: list[AckStatus | BrokerError] = []
        part = self.partitions.get(key)

        def ready() -> bool:
            current = self.partitions.get(key)
            if self._stopping or current is None or current is not part:
                outcome.append(NotLeaderOrFollowerError(f"{topic}-{partition} is no longer led by broker {self.broker_id}"))
                return True
            try:
                status = current.ack_status(required, append.leader_epoch)
            except BrokerError as e:
                outcome.append(e)
                return True
            if status is AckStatus.WAITING:
                return False
            outcome.append(status)
            return True

        if not await self.produce_purgatory.wait_until([key], ready, timeout_ms / 1000):
            raise RequestTimedOutError(
                f"{topic}-{partition}: offset {append.result.last_offset} not replicated to the ISR within {timeout_ms} ms"
            )
        result = outcome[-1]
        if isinstance(result, BrokerError):
            raise result
        if result is AckStatus.NOT_ENOUGH_REPLICAS_AFTER_APPEND:
            current = self.partitions[key]
            raise NotEnoughReplicasAfterAppendError(
                f"{topic}-{partition}: the ISR {current.isr} fell below min_insync_replicas "
                f"{current.min_insync_replicas} before offset {append.result.last_offset} was replicated"
            )

    async def produce(self, topic: str, partition: int, records: bytes, acks: int, timeout_ms: int) -> AppendResult:
        """Append as leader and, for acks=all, wait until the high watermark passes the records."""
        append = self.append_records(topic, partition, records, acks)
        if acks == -1:
            await self.wait_for_acks(topic, partition, append, timeout_ms)
        return append.result

    # -- fetch ----------------------------------------------------------------------------------

    def is_follower_fetch(self, replica_id: int) -> bool:
        """A Fetch from another broker's follower (replica_id >= 0 and not this broker; consumers
        leave the optional replica_id unset or send -1)."""
        return replica_id >= 0 and replica_id != self.broker_id

    def read(
        self, topic: str, partition: int, fetch_offset: int, max_bytes: int, *, replica_id: int = -1,
        current_leader_epoch: int = -1, replica_epoch: int = -1,
    ) -> FetchRead:
        """One partition of a Fetch, from the leader: consumers up to the high watermark; followers
        up to the log end offset, recording their progress (which may move the high watermark and
        start an ISR expansion, if `replica_epoch` is the follower's current broker epoch). Raises
        the partition's error."""
        part = self.get_partition(topic, partition)
        if self.is_follower_fetch(replica_id):
            view, outcome = part.read_for_follower(
                replica_id, fetch_offset, max_bytes, current_leader_epoch, self.clock.monotonic_ms(),
                fetch_broker_epoch=replica_epoch, registered_broker_epoch=self.live_broker_epochs.get(replica_id))
            if outcome.high_watermark_moved:
                self.notify((topic, partition))
            if outcome.proposed_isr is not None:
                self._propose_isr(part, outcome.proposed_isr)
        else:
            view = part.read_for_consumer(fetch_offset, max_bytes, current_leader_epoch)
        plog = part.log
        return FetchRead(view, part.high_watermark, plog.log_start_offset, plog.log_end_offset)

    # -- controller requests --------------------------------------------------------------------

    def _check_request(self, controller_epoch: int, broker_epoch: int, current_broker_epoch: int) -> BrokerError | None:
        if controller_epoch < self.controller_epoch:
            return StaleControllerEpochError(
                f"controller epoch {controller_epoch} is older than {self.controller_epoch}, the latest seen"
            )
        if current_broker_epoch <= 0 or broker_epoch > current_broker_epoch:
            return BrokerNotAvailableError(
                f"request for broker epoch {broker_epoch}; broker {self.broker_id} is still registering "
                f"(epoch {current_broker_epoch}): retry"
            )
        if broker_epoch <= 0 or broker_epoch != current_broker_epoch:
            return StaleBrokerEpochError(
                f"request for broker epoch {broker_epoch}; broker {self.broker_id} is at epoch {current_broker_epoch}"
            )
        self.controller_epoch = controller_epoch
        self.fetchers.broker_epoch = current_broker_epoch  # our fetches carry it (KIP-841)
        return None

    def update_broker_addresses(self, brokers: Iterable[pb.BrokerInfo]) -> None:
        """Learn the live brokers (LeaderAndIsr live_brokers, UpdateMetadata brokers: each the whole
        live set) with their addresses and epochs. A follower whose leader's address changed, or
        that had no address to fetch from, starts fetching."""
        brokers = list(brokers)
        self.live_broker_epochs = {b.broker_id: b.broker_epoch for b in brokers}
        changed = set()
        for b in brokers:
            address = f"{b.host}:{b.port}"
            if self.broker_addresses.get(b.broker_id) != address:
                self.broker_addresses[b.broker_id] = address
                changed.add(b.broker_id)
        if not changed:
            return
        for part in list(self.partitions.values()):
            if part.role is Role.FOLLOWER and part.leader in changed and (
                self.fetchers.fetch_state(part.key) is None
                or self.fetchers.source_of(part.key) != (part.leader, self.broker_addresses[part.leader])
            ):
                self._ensure_fetching(part, restart=False)

    async def leader_and_isr(self, req: pb.LeaderAndIsrRequest, current_broker_epoch: int) -> pb.LeaderAndIsrResponse:
        """Apply the controller's word on each partition: become leader or follower (creating the
        replica and its log, with the topic's config from `topic_configs_json`, if new), then
        (re)start the fetchers of partitions whose leader or epoch changed."""
        resp = pb.LeaderAndIsrResponse()
        err = self._check_request(req.controller_epoch, req.broker_epoch, current_broker_epoch)
        if err is not None:
            resp.error_code = err.code  # type: ignore[assignment]
            resp.error_message = err.message
            return resp
        self.update_broker_addresses(req.live_brokers)
        now = self.clock.monotonic_ms()
        followers: list[tuple[Partition, bool]] = []  # (replica, whether its leader or epoch changed)
        for ps in req.partitions:
            r = resp.results.add(topic=ps.topic, partition=ps.partition)
            key = (ps.topic, ps.partition)
            try:
                if self.broker_id not in ps.replicas:
                    raise UnknownTopicOrPartitionError(
                        f"broker {self.broker_id} is not a replica of {ps.topic}-{ps.partition} ({list(ps.replicas)})"
                    )
                part = self.partitions.get(key)
                if part is not None and part.leader_epoch >= 0:
                    same = ps.leader_epoch == part.leader_epoch and ps.zk_version == part.zk_version
                    if same and part.role is not Role.NONE:
                        if part.role is Role.FOLLOWER:  # the state it has: only check its fetcher
                            followers.append((part, False))
                        continue
                    if ps.leader_epoch < part.leader_epoch or (
                        ps.leader_epoch == part.leader_epoch and ps.zk_version < part.zk_version
                    ):
                        raise StaleControllerEpochError(
                            f"{ps.topic}-{ps.partition}: state at leader epoch {ps.leader_epoch} (znode version "
                            f"{ps.zk_version}) is older than the applied one ({part.leader_epoch}, {part.zk_version})"
                        )
                if part is None:
                    part = self._create_replica(ps, _topic_config(req, ps.topic), req.topic_ids.get(ps.topic, ""))
                state = PartitionStateData(ps.leader, ps.leader_epoch, list(ps.isr), ps.controller_epoch,
                                           ps.zk_version)
                replicas = list(ps.replicas)
                self._observe_state(ps)
                if ps.leader == self.broker_id:
                    self._check_may_lead(part, ps)
                    self.fetchers.remove_partitions([key])
                    if part.become_leader(state, replicas, now):
                        log.info("broker %d leads %s-%d in epoch %d from offset %d, ISR %s", self.broker_id,
                                 ps.topic, ps.partition, ps.leader_epoch, part.log.log_end_offset, part.isr)
                else:
                    self.fetchers.set_throttle(key, ps.adding_throttle_bytes_per_sec
                                               if self.broker_id in ps.adding_replicas else 0)
                    changed = part.become_follower(state, replicas)
                    changed = self._drop_reported_corruption(part) or changed
                    followers.append((part, changed))
                    if changed:
                        log.info("broker %d follows broker %d for %s-%d in epoch %d", self.broker_id, ps.leader,
                                 ps.topic, ps.partition, ps.leader_epoch)
            except Exception as exc:
                e = _as_error(exc, f"LeaderAndIsr of {ps.topic}-{ps.partition}")
                r.error_code = e.code
                r.error_message = e.message
            finally:
                self.notify(key)
        for part, changed in followers:
            self._ensure_fetching(part, restart=changed)
        self._roles_changed()
        return resp

    def _create_replica(self, ps: pb.PartitionState, topic_config: dict[str, str], topic_id: str) -> Partition:
        """The replica a LeaderAndIsr names. A vanished log is created empty only to follow a live
        leader; named leader (or leaderless) it stays offline: KAFKA_STORAGE_ERROR, so the controller
        elects another ISR member instead of a replica that lost acknowledged data."""
        key = (ps.topic, ps.partition)
        follows = 0 <= ps.leader != self.broker_id
        try:
            part = self._create_partition(ps.topic, ps.partition, topic_config, topic_id, refetch_lost=follows)
        except LostLogError as e:
            if key not in self.offline_partitions:
                log.error("broker %d: %s; named %s of %s-%d in leader epoch %d, it refuses (KAFKA_STORAGE_ERROR) so "
                          "the controller elects another in-sync replica; it re-fetches once it follows one. "
                          "If none exists, only an operator can accept the loss: logbroker topics recover-empty "
                          "%s %d", self.broker_id, e, "leader" if ps.leader == self.broker_id else "replica (no leader)",
                          ps.topic, ps.partition, ps.leader_epoch, ps.topic, ps.partition)
            self.offline_partitions[key] = str(e)
            raise
        self.offline_partitions.pop(key, None)
        return part

    def _drop_reported_corruption(self, part: Partition) -> bool:
        """A former leader that reported a corrupt batch now follows a live leader: truncate to the
        bad batch, so the fetcher re-fetches it from there. True if it did."""
        offset = self._refetch_when_following.get(part.key)
        if offset is None or part.leader < 0:
            return False
        del self._refetch_when_following[part.key]
        log.warning("broker %d: %s-%d follows broker %d now: truncating its copy to the corrupt batch at offset %d "
                    "and re-fetching from there", self.broker_id, part.topic, part.index, part.leader, offset)
        self._hold_leadership(part, left_isr=self.broker_id not in part.isr)  # part.isr: the state just applied
        part.truncate_as_follower(offset)
        part.log.corrupt_reason = None
        return True

    def _hold_leadership(self, part: Partition, *, left_isr: bool) -> None:
        """`part` is about to be truncated below its log end offset: it may not lead until it has it
        back (or the leader re-adds it to the ISR). `left_isr`: the applied state has it out."""
        known = self._catching_up.get(part.key)
        target = part.log.log_end_offset if known is None else max(known.target_offset, part.log.log_end_offset)
        self._catching_up[part.key] = _CatchUp(target, (part.leader_epoch, part.zk_version), left_isr)

    def _observe_state(self, ps: pb.PartitionState) -> None:
        """A state of the partition from the controller (LeaderAndIsr, UpdateMetadata): a replica
        holding back from leading that was out of the ISR in a newer state and is in it in a still
        newer one was re-added by its leader (caught up): it may lead again."""
        key = (ps.topic, ps.partition)
        mark = self._catching_up.get(key)
        version = (ps.leader_epoch, ps.zk_version)
        if mark is None or version <= mark.seen:
            return
        mark.seen = version
        if self.broker_id not in ps.isr:
            mark.left_isr = True
        elif mark.left_isr:
            del self._catching_up[key]
            log.info("broker %d is back in the ISR of %s-%d (leader epoch %d): it may lead it again", self.broker_id,
                     ps.topic, ps.partition, ps.leader_epoch)

    def observe_partition_states(self, partitions: Iterable[pb.PartitionState]) -> None:
        """The controller's view of every partition (UpdateMetadata): see `_observe_state`."""
        if self._catching_up:
            for ps in partitions:
                self._observe_state(ps)

    def _check_may_lead(self, part: Partition, ps: pb.PartitionState) -> None:
        """StorageError (KAFKA_STORAGE_ERROR: the controller elects another ISR member) while `part`
        has not got back what it had before a truncation (module doc)."""
        mark = self._catching_up.get(part.key)
        if mark is None:
            return
        if part.log.log_end_offset >= mark.target_offset:
            del self._catching_up[part.key]
            return
        log.warning("broker %d refuses to lead %s-%d in leader epoch %d: its copy was truncated to a corrupt batch "
                    "and is at offset %d of %d again", self.broker_id, ps.topic, ps.partition, ps.leader_epoch,
                    part.log.log_end_offset, mark.target_offset)
        raise StorageError(f"{ps.topic}-{ps.partition} on broker {self.broker_id}: truncated to a corrupt batch, "
                           f"re-fetched up to offset {part.log.log_end_offset} of {mark.target_offset}: it may not "
                           f"lead until caught up")

    def report_offline(self, offline: dict[Key, str], recovered: Iterable[Key] = ()) -> bool:
        """Name replicas to the controller (cluster); False when there is none to tell (standalone)."""
        if self.offline_reporter is None:
            return False
        self.offline_reporter(dict(offline), list(recovered))
        return True

    def leader_copy_corrupt(self, part: Partition, offset: int, reason: str) -> bool:
        """The leader's copy has a corrupt batch at `offset` (the scrubber). With another ISR member
        and a controller to tell: report it (leadership moves away) and truncate there once following.
        False when nothing moves (standalone, not leader, alone in the ISR): the caller flags the log."""
        if part.role is not Role.LEADER or not any(b != self.broker_id for b in part.isr):
            return False
        if not self.report_offline({part.key: reason}):
            return False
        known = self._refetch_when_following.get(part.key)
        self._refetch_when_following[part.key] = offset if known is None else min(known, offset)
        return True

    def recover_empty_replica(self, topic: str, partition: int, topic_config: dict[str, str],
                              topic_id: str) -> None:
        """Cluster: an operator accepts the loss of a replica whose log vanished (offline here): it is
        created empty and reported recovered; the controller may then make it leader (when no other
        in-sync replica exists: the partition was leaderless). InvalidRequestError if not offline."""
        key = (topic, partition)
        if key not in self.offline_partitions:
            raise InvalidRequestError(f"{topic}-{partition} is not offline on broker {self.broker_id}: nothing to recover")
        self.log_manager.create_log(topic, partition, LogConfig.from_topic_config(
            topic_config, self.log_manager.default_config), topic_id, accept_loss=True)
        del self.offline_partitions[key]
        log.warning("broker %d: %s-%d recreated empty (an operator accepted the loss of its data); reported to the "
                    "controller as recovered", self.broker_id, topic, partition)
        self.report_offline({}, [key])

    def _ensure_fetching(self, part: Partition, restart: bool) -> None:
        """Fetch `part` from its leader: (re)start when asked, or when no fetcher has it, it was
        fenced, or the leader's address changed. Never once shutting down."""
        if self._stopping:
            return
        if part.leader < 0:
            self.fetchers.remove_partitions([part.key])  # no leader for now: nothing to fetch from
            return
        address = self.broker_addresses.get(part.leader)
        if address is None:
            log.error("broker %d cannot follow %s-%d: no address for its leader, broker %d", self.broker_id,
                      part.topic, part.index, part.leader)
            return
        state = self.fetchers.fetch_state(part.key)
        if (restart or state is None or state.phase is FetchPhase.FENCED
                or self.fetchers.source_of(part.key) != (part.leader, address)):
            self.fetchers.add_partition(part, part.leader, address)

    def refetch_from(self, part: Partition, offset: int) -> None:
        """A follower found its copy bad from `offset` on (the scrubber): drop it from there and
        fetch it again from the leader (truncating by leader epoch first, as after any restart).
        Its fetch offset is then behind the leader's log end offset, so it is no longer caught up."""
        if part.role is not Role.FOLLOWER:
            raise ValueError(f"{part.topic}-{part.index} is not a follower here")
        self._hold_leadership(part, left_isr=False)  # its ISR may have changed since its LeaderAndIsr
        part.truncate_as_follower(offset)
        self.notify(part.key)
        self._ensure_fetching(part, restart=True)

    async def stop_replica(self, req: pb.StopReplicaRequest, current_broker_epoch: int) -> pb.StopReplicaResponse:
        """Stop replicating the partitions (and delete their logs if `delete_partitions`)."""
        resp = pb.StopReplicaResponse()
        err = self._check_request(req.controller_epoch, req.broker_epoch, current_broker_epoch)
        if err is not None:
            resp.error_code = err.code  # type: ignore[assignment]
            resp.error_message = err.message
            return resp
        for tp in req.partitions:
            r = resp.results.add(topic=tp.topic, partition=tp.partition)
            try:
                self.remove_partition(tp.topic, tp.partition, req.delete_partitions)
            except Exception as exc:
                e = _as_error(exc, f"StopReplica of {tp.topic}-{tp.partition}")
                r.error_code = e.code
                r.error_message = e.message
        return resp

    def offset_for_leader_epoch(self, req: pb.OffsetForLeaderEpochRequest) -> pb.OffsetForLeaderEpochResponse:
        """As the leader: for each partition, the largest epoch <= the one asked and its end offset."""
        resp = pb.OffsetForLeaderEpochResponse()
        for p in req.partitions:
            r = resp.results.add(topic=p.topic, partition=p.partition, leader_epoch=-1, end_offset=-1)
            try:
                part = self.get_partition(p.topic, p.partition)
                r.leader_epoch, r.end_offset = part.epoch_end_offset(p.current_leader_epoch, p.leader_epoch)
            except Exception as exc:
                e = _as_error(exc, "OffsetForLeaderEpoch")
                r.error_code = e.code
                r.error_message = e.message
        return resp

    def _create_partition(self, topic: str, partition: int, topic_config: dict[str, str], topic_id: str = "",
                          *, refetch_lost: bool = False) -> Partition:
        """A replica over the partition's log (see LogManager.create_log for topic ids). A vanished
        log raises LostLogError, or with `refetch_lost` (cluster) is created empty: a follower then
        fetches everything from its leader, and joins the ISR only once caught up."""
        log_config = LogConfig.from_topic_config(topic_config, self.log_manager.default_config)
        existing = self.log_manager.get_log(topic, partition)
        try:
            plog = self.log_manager.create_log(topic, partition, log_config, topic_id)
        except LostLogError as e:
            if not refetch_lost:
                raise
            log.error("broker %d: %s; creating it empty, to be fetched again from the leader", self.broker_id, e)
            plog = self.log_manager.create_log(topic, partition, log_config, topic_id, accept_loss=True)
        if existing is not None and topic_config:
            plog.update_config(log_config)
        try:
            min_isr = max(1, int(topic_config.get("min_insync_replicas", "1")))
        except ValueError:
            raise InvalidConfigError(f"min_insync_replicas must be an integer, got "
                                     f"{topic_config.get('min_insync_replicas')!r}") from None
        part = Partition(topic, partition, plog, self.broker_id, min_insync_replicas=min_isr,
                         replica_lag_time_max_ms=self.replica_lag_time_max_ms)
        self.partitions[(topic, partition)] = part
        return part

    # -- ISR upkeep -----------------------------------------------------------------------------

    async def _isr_check_loop(self) -> None:
        interval_s = max(ISR_CHECK_INTERVAL_MS_MIN, self.replica_lag_time_max_ms // 2) / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                self.check_isr_shrink()
            except Exception:
                log.exception("ISR check failed")

    def check_isr_shrink(self) -> int:
        """Propose shrinking the ISR of every led partition with out-of-sync followers. Returns
        how many writes were started."""
        now = self.clock.monotonic_ms()
        started = 0
        for part in list(self.partitions.values()):
            ls = part.leader_state
            if part.role is not Role.LEADER or ls is None:
                continue
            proposed = ls.maybe_shrink_isr(now)
            if proposed is not None and self._propose_isr(part, proposed):
                started += 1
        return started

    def _propose_isr(self, part: Partition, proposed: list[int]) -> bool:
        key = part.key
        ls = part.leader_state
        if ls is None or self._stopping or key in self._isr_writes:
            return False
        now = self.clock.monotonic_ms()
        if self._isr_retry_at_ms.get(key, 0) > now:
            return False
        self._isr_retry_at_ms[key] = now + ISR_PROPOSAL_INTERVAL_MS
        ls.isr_change_started(proposed)
        state = PartitionStateData(self.broker_id, part.leader_epoch, list(proposed), part.controller_epoch,
                                   part.zk_version)
        log.info("broker %d proposes ISR %s for %s-%d (was %s)", self.broker_id, proposed, part.topic, part.index,
                 ls.isr)
        task = asyncio.create_task(self._write_isr(part, ls, state), name=f"isr-write-{part.topic}-{part.index}")
        self._isr_writes[key] = task

        def done(_task: asyncio.Task[None]) -> None:
            self._isr_writes.pop(key, None)

        task.add_done_callback(done)
        return True

    async def _write_isr(self, part: Partition, ls: LeaderState, state: PartitionStateData) -> None:
        stored: PartitionStateData | None
        try:
            stored = await asyncio.to_thread(self.isr_store.write_isr, part.topic, part.index, state)
        except Exception as e:
            log.warning("ISR write for %s-%d failed: %s", part.topic, part.index, e)
            stored = None
        if part.leader_state is not ls or self.partitions.get(part.key) is not part:
            return  # the leadership it was for is over
        if stored is None or stored.leader != self.broker_id or stored.leader_epoch != ls.leader_epoch:
            if ls.isr_change_failed():
                part.sync_leader_state()
                self.notify(part.key)
            self._isr_retry_at_ms[part.key] = self.clock.monotonic_ms() + ISR_RETRY_BACKOFF_MS
            log.info("ISR write for %s-%d refused (version %d); waiting for the controller's state",
                     part.topic, part.index, state.zk_version)
            return
        before = set(ls.isr)
        ls.isr_change_committed(stored.isr, stored.zk_version)
        after = set(ls.isr)
        self.isr_shrinks_total += bool(before - after)
        self.isr_expands_total += bool(after - before)
        part.sync_leader_state()
        log.info("ISR of %s-%d is now %s (znode version %d)", part.topic, part.index, part.isr, part.zk_version)
        self.notify(part.key)


def _topic_config(req: pb.LeaderAndIsrRequest, topic: str) -> dict[str, str]:
    raw = req.topic_configs_json.get(topic)
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError as e:
        raise InvalidConfigError(f"config of topic {topic!r} is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise InvalidConfigError(f"config of topic {topic!r} is not a JSON object")
    return {str(k): str(v) for k, v in parsed.items()}


def _as_error(exc: Exception, what: str) -> BrokerError:
    if isinstance(exc, BrokerError):
        return exc
    log.exception("unexpected error in %s", what)
    return UnknownServerError(f"{type(exc).__name__}: {exc}")
