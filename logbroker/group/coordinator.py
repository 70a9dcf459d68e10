"""The group coordinator: the shell around `membership.Group` and `offsets.OffsetsState` on a broker.

The coordinator of group G is the leader of partition `partition_for_key(G, n)` of the internal
topic `__consumer_offsets` (n partitions, replicated like any topic, created on the first
FindCoordinator). Every broker runs a coordinator; it serves the groups of the partitions it leads
("shards"), so coordination fails over with partition leadership::

    replica manager says: we lead __consumer_offsets-p at epoch e
        -> shard p LOADING: replay the partition's log (offsets.OffsetsState) -> ACTIVE
    leadership lost / epoch changed
        -> shard dropped (a new epoch loads again); its calls answer NOT_COORDINATOR

    calls for a group whose shard is absent    -> NOT_COORDINATOR (client: FindCoordinator again)
                                  LOADING      -> COORDINATOR_LOAD_IN_PROGRESS (retry)

Membership (heartbeats, assignment, fencing) is `membership.Group` in memory, and a snapshot record
in the log: a heartbeat that changed who owns what (or the group epoch) is answered only once the
group's snapshot is replicated, and a new coordinator restores the groups from their last snapshots,
so members keep their partitions and epochs across a failover. A group whose snapshot is above
MEMBERSHIP_MAX_BYTES is kept in memory only (a tombstone replaces its older snapshot; after a
failover its members rejoin). Heartbeat intervals are short while a group reconciles
(`reconciling_heartbeat_interval_ms`) so partitions move quickly.

Offset commits: the member fence (`Group.commit_error`), then per partition: the partition
exists, 0 <= offset <= its high watermark (asked of its leader when not known locally; the high
watermark only grows, so a cached value that already covers the offset is enough), metadata
bounded. Accepted offsets become one RecordBatch appended to the shard's partition with acks=all;
memory changes only once the batch is replicated, and only forwards in log order (two commits
completing out of order cannot move a committed offset back).

Offsets of a group that has had no members for `offsets_retention_ms` are deleted (tombstones),
as Kafka's offsets.retention.minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from logbroker.clock import Clock
from logbroker.cluster.cluster_view import ClusterView, partition_ids
from logbroker.cluster.hashing import partition_for_key
from logbroker.cluster.metadata import validate_group_id
from logbroker.errors import (
    BrokerError,
    CoordinatorLoadInProgressError,
    CoordinatorNotAvailableError,
    GroupIdNotFoundError,
    InconsistentGroupProtocolError,
    InvalidRequestError,
    NonEmptyGroupError,
    NotCoordinatorError,
    NotEnoughReplicasError,
    NotLeaderOrFollowerError,
    OffsetOutOfRangeError,
    TopicAlreadyExistsError,
    UnknownMemberIdError,
    UnknownServerError,
    error_for,
)
from logbroker.group.assignor import ASSIGNORS, TopicPartition
from logbroker.group.coordinator_config import CoordinatorConfig
from logbroker.group.membership import LEAVE_EPOCH, Group, GroupState
from logbroker.group.offsets import (
    METADATA_MAX_CHARS,
    OFFSETS_TOPIC,
    CommittedOffset,
    OffsetsState,
    commit_batch,
    membership_batch,
    tombstone_batch,
)
from logbroker.replication.partition_state import AckStatus
from logbroker.storage.compaction import is_compacted
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.replication.partition import Partition
    from logbroker.replication.replica_manager import LeaderAppend
    from logbroker.storage.log import AppendResult

log = logging.getLogger(__name__)

LOAD_CHUNK_BYTES = 1 << 20
EXPIRE_TICK_S = 0.05
HW_LOOKUP_TIMEOUT_S = 5.0
COMMIT_BATCH_MAX_BYTES = 768 << 10  # one commit is one batch, below __consumer_offsets' max_message_bytes
OWNED_PARTITIONS_MAX = 100_000  # per heartbeat, checked before anything is built from the request

__all__ = ["CoordinatorConfig", "GroupCoordinator", "OffsetsLog", "OffsetsTopicCreator", "PeerBrokers",
           "offsets_topic_config"]


def offsets_topic_config(cfg: CoordinatorConfig) -> dict[str, str]:
    """The topic config __consumer_offsets is created with. Compacted: every record is keyed by
    (group, topic, partition) or by group (offsets.py), and deletions are tombstones, so keeping
    the latest record per key keeps exactly the state a replay rebuilds, and the log stays
    proportional to the live groups and partitions. A topic created before this (no
    cleanup_policy) keeps growing until its config is changed; the coordinator logs a warning."""
    return {
        "segment_bytes": str(cfg.offsets_topic_segment_bytes),
        "retention_ms": "-1",  # offsets leave by tombstones and expiry, never by age
        "retention_bytes": "-1",
        "cleanup_policy": "compact",
    }


class OffsetsLog(Protocol):
    """What the coordinator needs of the replica manager: its __consumer_offsets replicas, a word
    when roles change, and the leader's replicated append (the replica manager implements it)."""

    @property
    def partitions(self) -> Mapping[tuple[str, int], Partition]: ...

    @property
    def role_listeners(self) -> list[Callable[[], None]]: ...

    def append_records(self, topic: str, partition: int, records: bytes, acks: int) -> LeaderAppend: ...

    async def wait_for_acks(self, topic: str, partition: int, append: LeaderAppend, timeout_ms: int) -> None: ...


class OffsetsTopicCreator(Protocol):
    """Creates __consumer_offsets on the first FindCoordinator (the broker implements it)."""

    async def create_topic(self, name: str, partitions: int, replication_factor: int, config: dict[str, str],
                           validate_only: bool = False, *, internal: bool = False) -> None: ...


class PeerBrokers(Protocol):
    """Stubs to other brokers' Broker service, to ask a partition's leader its high watermark
    (server/broker_channels.py implements it; None standalone)."""

    def broker_stub(self, address: str) -> Any: ...


@dataclass
class _GroupEntry:
    membership: Group | None = None
    offsets: dict[TopicPartition, CommittedOffset] = field(default_factory=dict)
    empty_since_ms: int = 0  # wall clock: when the group last had no members (offset expiry)
    # membership persistence: changes made (version) and written to the log (persisted); one
    # write in flight at a time carries the latest snapshot, so bursts of changes coalesce
    version: int = 0
    persisted: int = 0
    writing: asyncio.Task[None] | None = None

    @property
    def has_members(self) -> bool:
        return self.membership is not None and self.membership.state is not GroupState.EMPTY

    @property
    def state_name(self) -> str:
        return self.membership.state.value if self.membership is not None else GroupState.EMPTY.value


@dataclass
class _Shard:
    partition: int
    leader_epoch: int
    loaded: bool = False
    groups: dict[str, _GroupEntry] = field(default_factory=dict)
    task: asyncio.Task[None] | None = None
    share_groups: dict[str, Any] = field(default_factory=dict)  # share_coordinator.py's ShareGroups


class GroupCoordinator:
    """See the module doc. All state is owned by the broker's event loop."""

    def __init__(self, broker_id: int, cluster: ClusterView, topics: OffsetsTopicCreator, replicas: OffsetsLog,
                 peers: PeerBrokers | None, config: CoordinatorConfig, clock: Clock) -> None:
        self.broker_id = broker_id
        self._cluster = cluster
        self._topics = topics
        self._replicas = replicas
        self._peers = peers
        self.config = config
        self.clock = clock
        self._shards: dict[int, _Shard] = {}
        self._hw_cache: dict[TopicPartition, int] = {}
        self._create_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._reconcile_scheduled = False
        # share_coordinator.ShareCoordinator.restore: rebuilds a loaded shard's share groups
        self.share_restore: Callable[[_Shard, OffsetsState], None] | None = None

    @property
    def cluster(self) -> ClusterView:
        return self._cluster

    def loaded_shards(self) -> list[_Shard]:
        return [s for s in self._shards.values() if s.loaded]

    def shard_for(self, group: str) -> _Shard:
        """The loaded shard of `group`; raises NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS or
        INVALID_GROUP_ID."""
        return self._shard_for(group)

    def has_consumer_group(self, shard: _Shard, group: str) -> bool:
        entry = shard.groups.get(group)
        return entry is not None and (entry.membership is not None or bool(entry.offsets))

    async def append_replicated(self, shard: _Shard, group: str, batch: bytes) -> AppendResult:
        return await self._append_replicated(shard, group, batch)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> None:
        """On the broker's loop, after log recovery: follow our __consumer_offsets leaderships."""
        self._loop = asyncio.get_running_loop()
        self._replicas.role_listeners.append(self.on_roles_changed)
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="group-expiry"))
        self._tasks.append(asyncio.create_task(self._retention_loop(), name="offsets-retention"))
        self._reconcile_shards()

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self._replicas.role_listeners.remove(self.on_roles_changed)
        tasks = self._tasks + [s.task for s in self._shards.values() if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._shards.clear()

    def on_roles_changed(self) -> None:
        """Replica-manager hook (any thread): partition roles changed; re-check our shards soon."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._reconcile_scheduled:
            return
        self._reconcile_scheduled = True
        loop.call_soon_threadsafe(self._reconcile_shards)

    def _reconcile_shards(self) -> None:
        self._reconcile_scheduled = False
        led: dict[int, Partition] = {
            p: part for (topic, p), part in self._replicas.partitions.items()
            if topic == OFFSETS_TOPIC and part.is_leader
        }
        for p, shard in list(self._shards.items()):
            part = led.get(p)
            if part is None or part.leader_epoch != shard.leader_epoch:
                log.info("coordinator: no longer leads %s-%d (epoch %d): %d groups unloaded", OFFSETS_TOPIC, p,
                         shard.leader_epoch, len(shard.groups))
                if shard.task is not None:
                    shard.task.cancel()
                del self._shards[p]
        for p, part in led.items():
            if p not in self._shards:
                shard = self._shards[p] = _Shard(p, part.leader_epoch)
                shard.task = asyncio.create_task(self._load(shard, part), name=f"load-{OFFSETS_TOPIC}-{p}")

    async def _load(self, shard: _Shard, part: Partition) -> None:
        started = time.monotonic()
        plog = part.log
        if not is_compacted(plog.config.cleanup_policy):
            log.warning("%s-%d has cleanup_policy=%s (created before offsets were compacted): it grows with "
                        "every commit; recreate it or set its cleanup_policy to compact", OFFSETS_TOPIC,
                        shard.partition, plog.config.cleanup_policy)
        state = OffsetsState(next_offset=plog.log_start_offset)
        try:
            while state.next_offset < plog.log_end_offset:
                view = plog.read(state.next_offset, LOAD_CHUNK_BYTES, max_offset=plog.log_end_offset)
                try:
                    data = bytes(view)
                finally:
                    view.release()
                if not data or state.apply_chunk(data, OFFSETS_TOPIC, shard.partition) == 0:
                    break
                await asyncio.sleep(0)  # let other calls run between chunks
                if self._shards.get(shard.partition) is not shard:
                    return
        except Exception:
            log.exception("coordinator: loading %s-%d failed; dropping the shard", OFFSETS_TOPIC, shard.partition)
            if self._shards.get(shard.partition) is shard:
                del self._shards[shard.partition]
            return
        if self._shards.get(shard.partition) is not shard:
            return
        for group, offsets in state.groups.items():
            last = max((c.commit_timestamp_ms for c in offsets.values()), default=0)
            shard.groups[group] = _GroupEntry(None, offsets, last)
        restored = 0
        for group, snapshot in state.memberships.items():
            try:
                factory = ASSIGNORS[str(snapshot["assignor"])]
                membership = Group.restore(group, snapshot, factory(), self.clock,
                                           members_max=self.config.group_members_max)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("group %s: unreadable membership snapshot (%s); its members will rejoin", group, e)
                continue
            if membership.state is GroupState.EMPTY:
                continue
            shard.groups.setdefault(group, _GroupEntry(empty_since_ms=self.clock.now_ms())).membership = membership
            restored += 1
        if self.share_restore is not None:
            try:
                self.share_restore(shard, state)
            except Exception:
                log.exception("coordinator: restoring the share groups of %s-%d failed", OFFSETS_TOPIC,
                              shard.partition)
        shard.loaded = True
        shard.task = None
        log.info("coordinator: leads %s-%d in epoch %d: %d groups (%d with members) loaded from %d records "
                 "(%d offsets) in %.3f s%s", OFFSETS_TOPIC, shard.partition, shard.leader_epoch, len(shard.groups),
                 restored, state.records_read, state.next_offset - plog.log_start_offset, time.monotonic() - started,
                 f" ({state.skipped_records} unreadable records skipped)" if state.skipped_records else "")

    # -- routing -----------------------------------------------------------------------------------

    def _offsets_partition_count(self) -> int:
        return len(partition_ids(self._cluster, OFFSETS_TOPIC))

    def _shard_for(self, group: str) -> _Shard:
        validate_group_id(group)
        n = self._offsets_partition_count()
        if n == 0:
            raise NotCoordinatorError(f"{OFFSETS_TOPIC} does not exist yet: call FindCoordinator first")
        p = partition_for_key(group.encode(), n)
        shard = self._shards.get(p)
        if shard is None:
            raise NotCoordinatorError(
                f"broker {self.broker_id} is not the coordinator of group {group} ({OFFSETS_TOPIC}-{p})")
        if not shard.loaded:
            raise CoordinatorLoadInProgressError(f"loading the groups of {OFFSETS_TOPIC}-{p}")
        return shard

    async def find_coordinator(self, group: str) -> pb.BrokerInfo:
        validate_group_id(group)
        states = self._cluster.topic_partitions(OFFSETS_TOPIC)
        if not states:
            await self._create_offsets_topic()
            states = self._cluster.topic_partitions(OFFSETS_TOPIC)
            if not states:
                raise CoordinatorNotAvailableError(f"{OFFSETS_TOPIC} is being created")
        p = partition_for_key(group.encode(), len(states))
        leader = states[p].leader
        brokers, _, _ = self._cluster.cluster_brokers()
        for b in brokers:
            if b.broker_id == leader:
                return b
        raise CoordinatorNotAvailableError(f"{OFFSETS_TOPIC}-{p} has no live leader (leader {leader})")

    async def _create_offsets_topic(self) -> None:
        cfg = self.config
        async with self._create_lock:
            if self._cluster.topic_partitions(OFFSETS_TOPIC):
                return
            live = len(self._cluster.cluster_brokers()[0])
            rf = max(1, min(cfg.offsets_topic_replication_factor, live))
            try:
                await self._topics.create_topic(OFFSETS_TOPIC, cfg.offsets_topic_partitions, rf,
                                               offsets_topic_config(cfg),
                                               internal=True)
                log.info("created %s: %d partitions, replication factor %d", OFFSETS_TOPIC,
                         cfg.offsets_topic_partitions, rf)
            except TopicAlreadyExistsError:
                pass

    # -- membership --------------------------------------------------------------------------------

    def _topic_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self._cluster.topic_names():
            if t.startswith("__"):
                continue  # internal topics are never assigned to consumers (nor matched by a regex)
            states = self._cluster.topic_partitions(t)
            if states:
                out[t] = len(states)
        return out

    def _new_group(self, group: str, req: pb.ConsumerGroupHeartbeatRequest) -> Group:
        cfg = self.config
        assignor_name = req.assignor or cfg.default_assignor
        factory = ASSIGNORS.get(assignor_name)
        if factory is None:
            raise InvalidRequestError(f"unknown assignor {assignor_name!r}: use one of {sorted(ASSIGNORS)}")
        session_ms = req.session_timeout_ms or cfg.session_timeout_ms
        if not cfg.session_timeout_ms_min <= session_ms <= cfg.session_timeout_ms_max:
            raise InvalidRequestError(
                f"session timeout {session_ms} ms is outside [{cfg.session_timeout_ms_min}, "
                f"{cfg.session_timeout_ms_max}]")
        rebalance_ms = req.rebalance_timeout_ms or cfg.rebalance_timeout_ms
        if not 1 <= rebalance_ms <= cfg.session_timeout_ms_max:
            raise InvalidRequestError(f"rebalance timeout {rebalance_ms} ms is outside [1, {cfg.session_timeout_ms_max}]")
        return Group(group, factory(), self.clock, session_ms, rebalance_ms, members_max=cfg.group_members_max)

    async def heartbeat(self, req: pb.ConsumerGroupHeartbeatRequest) -> pb.ConsumerGroupHeartbeatResponse:
        """Apply the heartbeat; if it changed who owns what (or the group epoch), answer only once the
        group's new snapshot is replicated in __consumer_offsets."""
        resp = pb.ConsumerGroupHeartbeatResponse(member_id=req.member_id, member_epoch=req.member_epoch,
                                                 heartbeat_interval_ms=self.config.heartbeat_interval_ms)
        try:
            shard = self._shard_for(req.group)
            if req.group in shard.share_groups:
                raise InconsistentGroupProtocolError(f"{req.group} is a share group, not a consumer group")
            entry = shard.groups.get(req.group)
            if entry is None or entry.membership is None:
                if req.member_epoch != 0:
                    raise UnknownMemberIdError(
                        f"member {req.member_id!r} is not in group {req.group} (its coordinator may have moved): "
                        "rejoin with epoch 0")
                membership = self._new_group(req.group, req)
                if entry is None:
                    entry = shard.groups[req.group] = _GroupEntry()
                entry.membership = membership
            owned_count = sum(len(t.partitions) for t in req.owned_partitions.topics)
            if owned_count > OWNED_PARTITIONS_MAX:
                raise InvalidRequestError(f"{owned_count} owned partitions; the limit is {OWNED_PARTITIONS_MAX}")
            group = entry.membership
            before = group.ownership_fingerprint(req.member_id)
            result = group.heartbeat(
                req.member_id, req.member_epoch,
                subscribed_topics=list(req.subscribed_topics.topics) if req.HasField("subscribed_topics") else None,
                subscribed_regex=req.subscribed_regex if req.HasField("subscribed_regex") else None,
                owned_partitions=_from_assignment(req.owned_partitions) if req.HasField("owned_partitions") else None,
                topic_partition_counts=self._topic_counts(),
            )
            changed = group.ownership_fingerprint(result.member_id) != before
            if group.state is GroupState.EMPTY:
                self._became_empty(shard, req.group, entry)
                if not changed and entry.persisted >= entry.version and not entry.offsets \
                        and shard.groups.get(req.group) is entry:
                    del shard.groups[req.group]  # a refused first join: nothing to keep, nothing to write
            if changed or entry.persisted < entry.version:  # (also: another heartbeat's change still being written)
                await self._persist(shard, req.group, entry, changed)
                # the write awaited: the member may have been evicted meanwhile (its partitions freed)
                if result.error is None and result.member_epoch != LEAVE_EPOCH \
                        and not (entry.membership is group and group.has_member(result.member_id)):
                    raise UnknownMemberIdError(f"member {result.member_id} left group {req.group} meanwhile: rejoin")
            if result.error is not None:
                raise result.error
            resp.member_id = result.member_id
            resp.member_epoch = result.member_epoch
            resp.session_timeout_ms = group.session_timeout_ms
            _fill_assignment(resp.assignment, result.assignment)
            if group.state is not GroupState.STABLE and group.state is not GroupState.EMPTY:
                resp.heartbeat_interval_ms = min(self.config.reconciling_heartbeat_interval_ms,
                                                 self.config.heartbeat_interval_ms)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        return resp

    async def _persist(self, shard: _Shard, group: str, entry: _GroupEntry, changed: bool = True) -> None:
        """Return once the group's membership as of now (a snapshot, or a tombstone when it has no
        members) is replicated; `changed`: this caller changed it. Raises NOT_COORDINATOR,
        COORDINATOR_NOT_AVAILABLE or a timeout."""
        if changed:
            entry.version += 1
        wanted = entry.version
        while entry.persisted < wanted:
            if entry.writing is None:
                entry.writing = asyncio.create_task(self._write_membership(shard, group, entry))
            await asyncio.shield(entry.writing)

    async def _write_membership(self, shard: _Shard, group: str, entry: _GroupEntry) -> None:
        try:
            version = entry.version
            snapshot = entry.membership.snapshot() if entry.membership is not None else None
            try:
                batch = membership_batch(group, snapshot, self.clock.now_ms())
            except ValueError as e:
                # a huge group: tombstone any older snapshot, so a new coordinator starts the group
                # afresh (its members rejoin) rather than from a stale picture of who owns what
                log.warning("group %s: membership kept in memory only: %s", group, e)
                batch = membership_batch(group, None, self.clock.now_ms())
            await self._append_replicated(shard, group, batch)
            entry.persisted = max(entry.persisted, version)
        finally:
            entry.writing = None
            if (entry.persisted >= entry.version and entry.membership is None and not entry.offsets
                    and shard.groups.get(group) is entry):
                del shard.groups[group]  # nothing left of the group, and nothing of it still being written

    async def _append_replicated(self, shard: _Shard, group: str, batch: bytes) -> AppendResult:
        """Append under this shard's leadership only (a reload at a newer leader epoch is another shard)."""
        return await self.append_now(shard, group, batch)

    def append_now(self, shard: _Shard, group: str, batch: bytes) -> Awaitable[AppendResult]:
        """Append `batch` to the shard's log now (synchronously: appends made one after another land
        in that order) and return the wait for its replication to the ISR: a future done already
        when the append is replicated as it lands (the ISR is the leader alone), so its waiter
        loses no loop iterations to it. Raises NotCoordinatorError at once when the shard is no
        longer ours."""
        rm = self._replicas
        part = rm.partitions.get((OFFSETS_TOPIC, shard.partition))
        if self._shards.get(shard.partition) is not shard or part is None or part.leader_epoch != shard.leader_epoch:
            raise NotCoordinatorError(f"no longer the coordinator of group {group}")
        try:
            append = rm.append_records(OFFSETS_TOPIC, shard.partition, batch, acks=-1)
        except NotLeaderOrFollowerError as e:
            raise NotCoordinatorError(f"no longer the coordinator of group {group}: {e.message}") from None
        except NotEnoughReplicasError as e:
            raise CoordinatorNotAvailableError(f"{OFFSETS_TOPIC}-{shard.partition}: {e.message}") from None
        if part.ack_status(append.result.last_offset + 1, append.leader_epoch) is AckStatus.DONE:
            done: asyncio.Future[AppendResult] = asyncio.get_running_loop().create_future()
            done.set_result(append.result)
            return done
        return self._replicated(shard, group, append)

    async def _replicated(self, shard: _Shard, group: str, append: LeaderAppend) -> AppendResult:
        rm = self._replicas
        try:
            await rm.wait_for_acks(OFFSETS_TOPIC, shard.partition, append, self.config.commit_timeout_ms)
        except NotLeaderOrFollowerError as e:
            raise NotCoordinatorError(f"no longer the coordinator of group {group}: {e.message}") from None
        except NotEnoughReplicasError as e:
            raise CoordinatorNotAvailableError(f"{OFFSETS_TOPIC}-{shard.partition}: {e.message}") from None
        # Replicated to the ISR: durable even if our leadership ended meanwhile (the next leader has
        # it and its coordinator replays it), so the caller may report success either way.
        return append.result

    def _became_empty(self, shard: _Shard, group: str, entry: _GroupEntry) -> None:
        """The last member left or was evicted: the caller persists (a tombstone), and the entry goes
        once that write is done if the group has no offsets either."""
        entry.membership = None
        entry.empty_since_ms = self.clock.now_ms()

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_TICK_S)
            now = self.clock.monotonic_ms()
            for shard in list(self._shards.values()):
                for group, entry in list(shard.groups.items()):
                    try:
                        self._expire_group(shard, group, entry, now)
                    except Exception:  # one broken group must not stop evictions in every other
                        log.exception("group %s: expiry check failed", group)

    def _expire_group(self, shard: _Shard, group: str, entry: _GroupEntry, now_ms: int) -> None:
        g = entry.membership
        if g is None:
            return
        deadline = g.next_deadline_ms()
        if deadline is None or deadline > now_ms:
            return
        gone = g.expire(now_ms)
        if not gone:
            return
        log.info("group %s: evicted %s (session or rebalance timeout); group epoch %d", group, ", ".join(gone),
                 g.group_epoch)
        if g.state is GroupState.EMPTY:
            self._became_empty(shard, group, entry)
        entry.version += 1  # changed now: a heartbeat arriving before the write waits for it
        self._spawn(self._persist_quietly(shard, group, entry), f"persist-{group}")

    async def _persist_quietly(self, shard: _Shard, group: str, entry: _GroupEntry) -> None:
        try:
            await self._persist(shard, group, entry, changed=False)
        except Exception as exc:  # the next change (or a new coordinator) writes it again
            log.warning("group %s: persisting membership after an eviction failed: %s", group, exc)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # -- offsets -----------------------------------------------------------------------------------

    async def commit(self, req: pb.OffsetCommitRequest) -> pb.OffsetCommitResponse:
        resp = pb.OffsetCommitResponse()
        results = [resp.results.add(topic=cp.topic, partition=cp.partition) for cp in req.partitions]
        try:
            shard = self._shard_for(req.group)
            self._check_member(shard, req.group, req.member_id, req.member_epoch)
            accepted: dict[TopicPartition, tuple[int, str]] = {}
            to_check: dict[TopicPartition, int] = {}
            for cp, r in zip(req.partitions, results, strict=True):
                try:
                    self._cluster.check_partition(cp.topic, cp.partition)
                    if cp.offset < 0:
                        raise OffsetOutOfRangeError(f"cannot commit negative offset {cp.offset}")
                    if len(cp.metadata) > METADATA_MAX_CHARS:
                        raise InvalidRequestError(f"offset metadata is limited to {METADATA_MAX_CHARS} characters")
                    to_check[(cp.topic, cp.partition)] = max(cp.offset, to_check.get((cp.topic, cp.partition), 0))
                except BrokerError as e:
                    _set_error(r, e)
            hw_errors = await self._check_high_watermarks(to_check)
            for cp, r in zip(req.partitions, results, strict=True):
                tp = (cp.topic, cp.partition)
                if r.error_code != pb.NONE or tp not in to_check:
                    continue
                err = hw_errors.get(tp)
                if err is not None:
                    _set_error(r, err)
                else:
                    accepted[tp] = (cp.offset, cp.metadata)
            if accepted:
                # the high-watermark lookups awaited: check the fence again, with no await before the append
                if self._shards.get(shard.partition) is not shard:
                    raise NotCoordinatorError(f"no longer the coordinator of group {req.group}")
                self._check_member(shard, req.group, req.member_id, req.member_epoch)
                await self._append(shard, req.group, accepted)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
            for r in results:
                if r.error_code == pb.NONE:
                    _set_error(r, e)
        return resp

    def _check_member(self, shard: _Shard, group: str, member_id: str, member_epoch: int) -> None:
        entry = shard.groups.get(group)
        membership = entry.membership if entry is not None else None
        if member_id:
            if membership is None:
                raise UnknownMemberIdError(f"member {member_id!r} is not in group {group}")
            err = membership.commit_error(member_id, member_epoch)
        else:
            err = membership.commit_error("", -1) if membership is not None else None
        if err is not None:
            raise err

    async def _append(self, shard: _Shard, group: str, offsets: dict[TopicPartition, tuple[int, str]]) -> None:
        now = self.clock.now_ms()
        batch = commit_batch(group, offsets, now)
        if len(batch) > COMMIT_BATCH_MAX_BYTES:
            raise InvalidRequestError(
                f"a commit of {len(offsets)} partitions is {len(batch)} bytes, above {COMMIT_BATCH_MAX_BYTES}: "
                "commit fewer partitions (or less metadata) per request")
        result = await self._append_replicated(shard, group, batch)
        if self._shards.get(shard.partition) is not shard:
            return  # replicated; the next coordinator reads it from the log
        entry = shard.groups.get(group)
        if entry is None:
            entry = shard.groups[group] = _GroupEntry(empty_since_ms=now)
        for i, (tp, (offset, metadata)) in enumerate(offsets.items()):
            log_offset = result.base_offset + i
            current = entry.offsets.get(tp)
            if current is None or current.log_offset < log_offset:
                entry.offsets[tp] = CommittedOffset(offset, metadata, now, log_offset)

    async def _check_high_watermarks(self, wanted: dict[TopicPartition, int]) -> dict[TopicPartition, BrokerError]:
        """OFFSET_OUT_OF_RANGE for every partition whose offset is past its high watermark (or the
        error that kept us from learning it)."""
        errors: dict[TopicPartition, BrokerError] = {}
        remote: dict[int, list[TopicPartition]] = {}
        rm = self._replicas
        for tp, offset in wanted.items():
            if offset <= self._hw_cache.get(tp, -1):
                continue
            part = rm.partitions.get(tp)
            if part is not None and part.is_leader:
                self._hw_cache[tp] = part.high_watermark
                continue
            states = self._cluster.topic_partitions(tp[0]) or {}
            st = states.get(tp[1])
            leader = st.leader if st is not None else -1
            remote.setdefault(leader, []).append(tp)
        if remote:
            await asyncio.gather(*(self._ask_high_watermarks(leader, tps, errors) for leader, tps in remote.items()))
        for tp, offset in wanted.items():
            if tp in errors:
                continue
            hw = self._hw_cache.get(tp, -1)
            if offset > hw:
                errors[tp] = OffsetOutOfRangeError(
                    f"offset {offset} is past the high watermark {hw} of {tp[0]}-{tp[1]}")
        return errors

    async def _ask_high_watermarks(self, leader: int, tps: list[TopicPartition],
                                   errors: dict[TopicPartition, BrokerError],
                                   answers: dict[TopicPartition, int] | None = None) -> None:
        brokers, _, _ = self._cluster.cluster_brokers()
        address = next((f"{b.host}:{b.port}" for b in brokers if b.broker_id == leader), None)
        peers = self._peers
        if address is None or peers is None:
            for tp in tps:
                errors[tp] = CoordinatorNotAvailableError(f"{tp[0]}-{tp[1]} has no live leader to check the offset")
            return
        req = pb.ListOffsetsRequest(partitions=[pb.ListOffsetsPartition(topic=t, partition=p, timestamp=-1)
                                                for t, p in tps])
        try:
            resp = await peers.broker_stub(address).ListOffsets(req, timeout=HW_LOOKUP_TIMEOUT_S)
        except Exception as exc:  # an unreachable leader: the client retries the commit
            for tp in tps:
                errors[tp] = CoordinatorNotAvailableError(f"cannot reach the leader of {tp[0]}-{tp[1]}: {exc}")
            return
        for r in resp.results:
            tp = (r.topic, r.partition)
            if r.error_code != pb.NONE:
                errors[tp] = error_for(r.error_code, r.error_message)
            else:
                self._hw_cache[tp] = max(self._hw_cache.get(tp, -1), r.offset)
                if answers is not None:
                    answers[tp] = r.offset

    def fetch(self, req: pb.OffsetFetchRequest) -> pb.OffsetFetchResponse:
        resp = pb.OffsetFetchResponse()
        try:
            shard = self._shard_for(req.group)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
            return resp
        entry = shard.groups.get(req.group)
        committed = entry.offsets if entry is not None else {}
        wanted = [(tp.topic, tp.partition) for tp in req.partitions] or sorted(committed)
        for topic, partition in wanted:
            c = committed.get((topic, partition))
            resp.results.add(topic=topic, partition=partition, offset=c.offset if c else -1,
                             metadata=c.metadata if c else "")
        return resp

    async def _retention_loop(self) -> None:
        interval_s = self.config.offsets_retention_check_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.expire_offsets()
            except Exception:
                log.exception("offsets retention check failed")

    async def expire_offsets(self) -> int:
        """Delete the offsets of groups without members for offsets_retention_ms; returns how many groups."""
        now = self.clock.now_ms()
        expired = 0
        for shard in list(self._shards.values()):
            if not shard.loaded:
                continue
            for group, entry in list(shard.groups.items()):
                if entry.has_members or now - entry.empty_since_ms < self.config.offsets_retention_ms:
                    continue
                doomed = list(entry.offsets)
                await self._delete_offsets(shard, group, doomed)
                for tp in doomed:
                    entry.offsets.pop(tp, None)
                if entry.membership is None and not entry.offsets and entry.writing is None:
                    shard.groups.pop(group, None)
                expired += 1
                log.info("group %s: offsets expired (no members for %d ms)", group, self.config.offsets_retention_ms)
        return expired

    async def _delete_offsets(self, shard: _Shard, group: str, offsets: Iterable[TopicPartition]) -> None:
        tps = list(offsets)
        if not tps:
            return
        await self._append_replicated(shard, group, tombstone_batch(group, tps, self.clock.now_ms()))

    def forget_topics(self, topics: Iterable[str]) -> None:
        """These topics were deleted: delete every group's committed offsets of them (in the
        background; a topic created again under the same name starts without stale offsets)."""
        doomed = set(topics)
        if not doomed:
            return
        for tp in [tp for tp in self._hw_cache if tp[0] in doomed]:
            del self._hw_cache[tp]
        work = [
            (shard, group, [tp for tp in entry.offsets if tp[0] in doomed])
            for shard in self._shards.values() if shard.loaded
            for group, entry in shard.groups.items()
        ]
        work = [w for w in work if w[2]]
        if work:
            task = asyncio.create_task(self._forget(work), name="forget-deleted-topics")
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _forget(self, work: list[tuple[_Shard, str, list[TopicPartition]]]) -> None:
        for shard, group, tps in work:
            try:
                await self._delete_offsets(shard, group, tps)
            except Exception as exc:
                log.warning("group %s: deleting offsets of deleted topics failed: %s", group, exc)
                continue
            entry = shard.groups.get(group)
            if entry is not None and self._shards.get(shard.partition) is shard:
                for tp in tps:
                    entry.offsets.pop(tp, None)
                if not entry.offsets and entry.membership is None:
                    shard.groups.pop(group, None)

    # -- metrics (server/cluster_metrics.py) ----------------------------------------------------

    def consumer_groups(self) -> list[tuple[str, int, dict[TopicPartition, int]]]:
        """(group, members, committed offsets) of every consumer group of the loaded shards: the
        groups this broker coordinates, so each group is reported by one broker only."""
        out = []
        for shard in self.loaded_shards():
            for group, entry in sorted(shard.groups.items()):
                members = len(entry.membership.describe().members) if entry.membership is not None else 0
                out.append((group, members, {tp: c.offset for tp, c in entry.offsets.items()}))
        return out

    async def high_watermarks(self, tps: Iterable[TopicPartition], timeout_s: float) -> dict[TopicPartition, int]:
        """Each partition's high watermark (what `ListOffsets -1` answers): the local leader
        replica's, else asked of its leader within `timeout_s`; a partition whose leader does not
        answer in time is left out."""
        out: dict[TopicPartition, int] = {}
        remote: dict[int, list[TopicPartition]] = {}
        for tp in tps:
            part = self._replicas.partitions.get(tp)
            if part is not None and part.is_leader:
                out[tp] = part.high_watermark
                continue
            st = (self._cluster.topic_partitions(tp[0]) or {}).get(tp[1])
            remote.setdefault(st.leader if st is not None else -1, []).append(tp)
        errors: dict[TopicPartition, BrokerError] = {}
        asked: dict[TopicPartition, int] = {}  # fresh answers only (never the commit check's cache)
        if remote:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(
                    *(self._ask_high_watermarks(leader, leader_tps, errors, asked)
                      for leader, leader_tps in remote.items())), timeout_s)
        out.update(asked)
        return out

    # -- admin -------------------------------------------------------------------------------------

    def list_groups(self) -> pb.ListGroupsResponse:
        resp = pb.ListGroupsResponse()
        for shard in self._shards.values():
            for group, entry in sorted(shard.groups.items()):
                members = len(entry.membership.describe().members) if entry.membership is not None else 0
                resp.groups.add(group=group, state=entry.state_name, members=members)
        return resp

    def describe(self, group: str) -> pb.DescribeGroupResponse:
        resp = pb.DescribeGroupResponse(group=group, coordinator_id=self.broker_id)
        try:
            shard = self._shard_for(group)
            entry = shard.groups.get(group)
            if entry is None:
                raise GroupIdNotFoundError(f"group {group} has no members and no committed offsets")
            resp.state = entry.state_name
            if entry.membership is not None:
                d = entry.membership.describe()
                resp.group_epoch = d.group_epoch
                resp.assignor = d.assignor
                for m in d.members:
                    md = resp.members.add(member_id=m.member_id, member_epoch=m.member_epoch, state=m.state.value,
                                          subscribed_topics=m.subscribed_topics, subscribed_regex=m.subscribed_regex)
                    _fill_assignment(md.assigned, m.assigned)
                    _fill_assignment(md.revoking, m.revoking)
                    _fill_assignment(md.target, m.target)
            for (topic, partition), c in sorted(entry.offsets.items()):
                resp.offsets.add(topic=topic, partition=partition, offset=c.offset, metadata=c.metadata,
                                 commit_timestamp_ms=c.commit_timestamp_ms)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        return resp

    async def delete(self, group: str) -> pb.DeleteGroupResponse:
        resp = pb.DeleteGroupResponse()
        try:
            shard = self._shard_for(group)
            entry = shard.groups.get(group)
            if entry is None:
                raise GroupIdNotFoundError(f"group {group} does not exist")
            if entry.has_members:
                raise NonEmptyGroupError(f"group {group} has members: stop them first")
            doomed = list(entry.offsets)
            await self._delete_offsets(shard, group, doomed)
            for tp in doomed:
                entry.offsets.pop(tp, None)
            if entry.membership is None and not entry.offsets and entry.writing is None \
                    and shard.groups.get(group) is entry:
                shard.groups.pop(group, None)
            log.info("group %s deleted", group)
        except BrokerError as e:
            resp.error_code = e.code  # type: ignore[assignment]
            resp.error_message = e.message
        except Exception as exc:
            log.exception("deleting group %s", group)
            resp.error_code = UnknownServerError.code
            resp.error_message = str(exc)
        return resp


def _from_assignment(a: pb.Assignment) -> set[TopicPartition]:
    return {(t.topic, p) for t in a.topics for p in t.partitions}


def _fill_assignment(out: pb.Assignment, tps: Iterable[TopicPartition]) -> None:
    by_topic: dict[str, list[int]] = {}
    for topic, p in sorted(tps):
        by_topic.setdefault(topic, []).append(p)
    for topic, ps in by_topic.items():
        out.topics.add(topic=topic, partitions=ps)


def _set_error(r: pb.PartitionError, e: BrokerError) -> None:
    r.error_code = e.code  # type: ignore[assignment]
    r.error_message = e.message
