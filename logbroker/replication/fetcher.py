"""Follower replication: one fetcher task per leader broker pulls every partition this broker follows
from that leader, over one grpc.aio channel.

Per partition, a fetch state::

    TRUNCATING --OffsetForLeaderEpoch rounds done--> FETCHING --error: diverged--> TRUNCATING
        |                                               |
        +------------ FENCED_LEADER_EPOCH --------------+--> FENCED (paused until the next LeaderAndIsr
                                                                     re-adds the partition)

- Truncation (KIP-101/279): ask the leader for the end offset of our latest epoch E; it answers
  (E', end) with E' the largest epoch <= E it has. Truncate to min(end, our own end offset for E').
  If E' < E and that cut something, ask again with our (now lower) latest epoch. Done when E' == E or
  nothing was cut. A log without epochs (empty) has nothing to compare: it fetches at once.
- Fetching: long-poll `Broker/Fetch` with replica_id = our id and replica_epoch = our broker epoch
  (the leader adds us to an ISR only under our current registration: KIP-841), each partition at
  its log end offset and the leader epoch we follow. Records are appended as they are
  (`Log.append_as_follower`), then the high watermark = min(leader's, our log end offset), and our
  log start offset follows the leader's (its retention is mirrored: segments below it are deleted).
  Both calls carry the cluster secret (`call_metadata`): the leader serves a replica fetch and
  OffsetForLeaderEpoch to brokers only.
- Errors: OFFSET_OUT_OF_RANGE below the leader's log start offset -> restart our log there; above
  its log end offset -> truncate again. FENCED_LEADER_EPOCH (we are behind) -> FENCED.
  NOT_LEADER_OR_FOLLOWER / UNKNOWN_LEADER_EPOCH (the leader has not applied its LeaderAndIsr yet)
  and anything else -> retry that partition after a backoff. A failed call (leader unreachable)
  backs off the whole fetcher.
- Replication throttle (a reassignment's, replication/replica_throttle.py): a partition this broker
  is being added to with a rate (`ReplicaFetcherManager.set_throttle`, from its LeaderAndIsr) asks
  for about one burst per fetch and, after each response that leaves it still behind the leader's
  high watermark, pays the bytes to its token bucket and waits (`delayed_until_ms`) until the debt is
  paid. A response that brings it up to the high watermark costs nothing: a caught-up (in-sync)
  replica is never slowed, so acks=all producers never wait for the throttle.
- Backoff (both kinds) is the one retry policy (logbroker/retry.py), from `fetcher_retry_policy`:
  waits `backoff_initial_ms`, doubling up to `backoff_max_ms`, each shortened by up to 20 % (every
  follower of a failed leader retries at once: jitter spreads them out). No attempt bound: a follower
  fetches for as long as it follows; the controller's next LeaderAndIsr or StopReplica ends it.

A response is applied only if the partition still has the same fetch state (not removed or re-added
meanwhile), still follows the same leader in the same epoch, and its log still ends where the
request said. Everything runs on the broker's event loop; log writes happen between awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from logbroker.clock import SYSTEM_CLOCK, Clock
from logbroker.cluster.cluster_secret import CallMetadata
from logbroker.errors import BrokerError, StorageError
from logbroker.replication.partition import Partition
from logbroker.replication.replica_throttle import ReplicaThrottle
from logbroker.retry import RetryPolicy
from logbroker.storage.log import UNDEFINED_EPOCH
from logbroker.tls import RotationCheck, TlsConfig, aio_channel
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg

log = logging.getLogger(__name__)

Key = tuple[str, int]


@dataclass(frozen=True)
class FetcherConfig:
    max_wait_ms: int = 500
    min_bytes: int = 1
    max_bytes: int = 16 << 20  # per Fetch response
    partition_max_bytes: int = 4 << 20  # at least one batch is always returned
    max_receive_bytes: int = 80 << 20  # channel bound: above any broker's max_response_bytes
    rpc_timeout_s: float = 10.0  # beyond max_wait_ms
    backoff_initial_ms: int = 50
    backoff_max_ms: int = 1000
    truncation_rounds_max: int = 16  # OffsetForLeaderEpoch rounds per truncation attempt
    tls: TlsConfig | None = None  # the broker's own certificate, to leaders that speak TLS


class FetchPhase(enum.Enum):
    TRUNCATING = "truncating"
    FETCHING = "fetching"
    FENCED = "fenced"


@dataclass(eq=False)
class PartitionFetchState:
    partition: Partition
    leader_epoch: int
    phase: FetchPhase = FetchPhase.TRUNCATING
    delayed_until_ms: int = 0  # monotonic
    failures: int = 0
    last_error: str = ""
    throttle: ReplicaThrottle | None = None  # a reassignment's replication throttle, while adding
    throttled_bytes: int = 0  # bytes paid to the throttle (a counter)

    @property
    def key(self) -> Key:
        return self.partition.key


@dataclass
class _Sent:
    state: PartitionFetchState
    offset: int
    asked_epoch: int = UNDEFINED_EPOCH


FETCHER_RETRY_JITTER = 0.2


def fetcher_retry_policy(config: FetcherConfig) -> RetryPolicy:
    """The backoff of a partition (or of the whole fetcher) after failures: `backoff_initial_ms`,
    doubling up to `backoff_max_ms`, jittered; unbounded in attempts (see the module doc)."""
    return RetryPolicy(initial_ms=min(config.backoff_initial_ms, config.backoff_max_ms),
                       max_ms=config.backoff_max_ms, multiplier=2.0, jitter=FETCHER_RETRY_JITTER, retries=None)


@dataclass(eq=False)
class LeaderFetcher:
    """Replicates the partitions this broker follows from one leader (`leader_id` at `address`)."""

    broker_id: int
    leader_id: int
    address: str
    config: FetcherConfig
    clock: Clock = SYSTEM_CLOCK
    broker_epoch: Callable[[], int] = lambda: -1  # this broker's epoch, sent with every fetch
    call_metadata: CallMetadata = field(default=(), repr=False)  # the cluster secret
    states: dict[Key, PartitionFetchState] = field(default_factory=dict)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    rng: random.Random = field(default_factory=random.Random, repr=False)  # the backoff's jitter
    _task: asyncio.Task[None] | None = None
    _rpc_failures: int = 0
    _stopped: bool = False
    _retry: RetryPolicy = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._retry = fetcher_retry_policy(self.config)

    def _backoff_ms(self, failures: int) -> int:
        wait_ms = self._retry.delay_ms(failures, self.rng)
        assert wait_ms is not None  # the policy has no attempt bound
        return wait_ms

    # -- control (event loop) -------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"fetcher-{self.broker_id}-from-{self.leader_id}")

    def add(self, partition: Partition) -> PartitionFetchState:
        state = PartitionFetchState(partition, partition.leader_epoch)
        self.states[partition.key] = state
        self._changed.set()
        return state

    def wake(self) -> None:
        """Re-plan now (a partition's delay was cut short)."""
        self._changed.set()

    def remove(self, key: Key) -> None:
        if self.states.pop(key, None) is not None:
            self._changed.set()

    async def stop(self) -> None:
        """End the task. Besides cancelling it, tell it to stop: a grpc.aio call that completes just as
        it is cancelled returns its response and the cancellation is lost; the loop then sees the flag
        (an idle fetcher with no partitions would otherwise wait forever, and so would this)."""
        task, self._task = self._task, None
        self._stopped = True
        self._changed.set()
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- the task -------------------------------------------------------------------------------

    def _open_channel(self) -> grpc.aio.Channel:
        return aio_channel(self.address, [("grpc.max_receive_message_length", self.config.max_receive_bytes)],
                           self.config.tls)

    async def _run(self) -> None:
        channel = self._open_channel()
        rotation = RotationCheck(self.config.tls)
        try:
            broker_stub, replica_stub = pbg.BrokerStub(channel), pbg.ReplicaStub(channel)
            while not self._stopped:
                if rotation.rotated():  # TLS files changed: a new channel presents the new certificate
                    await channel.close()
                    channel = self._open_channel()
                    broker_stub, replica_stub = pbg.BrokerStub(channel), pbg.ReplicaStub(channel)
                now = self.clock.monotonic_ms()
                ready = [s for s in self.states.values() if s.delayed_until_ms <= now]
                truncating = [s for s in ready if s.phase is FetchPhase.TRUNCATING]
                fetching = [s for s in ready if s.phase is FetchPhase.FETCHING]
                try:
                    if truncating:
                        await self._truncate(replica_stub, truncating)
                    elif fetching:
                        await self._fetch(broker_stub, fetching)
                    else:
                        await self._idle(now)
                        continue
                    self._rpc_failures = 0
                except grpc.aio.AioRpcError as e:
                    self._rpc_failures += 1
                    delay_ms = self._backoff_ms(self._rpc_failures)
                    log.log(logging.INFO if self._rpc_failures == 1 else logging.DEBUG,
                            "fetcher from broker %d at %s: %s (%s); retrying in %d ms", self.leader_id,
                            self.address, e.code().name, e.details(), delay_ms)
                    await self._pause(delay_ms)
                except Exception:  # a bug: keep replicating the other partitions, slowly
                    self._rpc_failures += 1
                    log.exception("fetcher from broker %d at %s failed", self.leader_id, self.address)
                    await self._pause(self._backoff_ms(self._rpc_failures))
        finally:
            await channel.close()

    async def _idle(self, now: int) -> None:
        """Wait for a partition to be added or for the earliest delayed one to be due."""
        self._changed.clear()
        pending = [s.delayed_until_ms for s in self.states.values() if s.phase is not FetchPhase.FENCED]
        timeout_s = max(0.0, (min(pending) - now) / 1000) if pending else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def _pause(self, delay_ms: int) -> None:
        """Back off the whole fetcher (an added partition does not cut it short)."""
        await asyncio.sleep(delay_ms / 1000)

    def _current(self, sent: _Sent) -> bool:
        s = sent.state
        return (self.states.get(s.key) is s and s.partition.is_follower_of(self.leader_id, s.leader_epoch)
                and s.partition.log.log_end_offset == sent.offset)

    def _delay(self, s: PartitionFetchState, why: str) -> None:
        s.failures += 1
        s.last_error = why
        s.delayed_until_ms = self.clock.monotonic_ms() + self._backoff_ms(s.failures)
        log.log(logging.INFO if s.failures == 1 else logging.DEBUG,
                "replica %d of %s-%d from broker %d: %s; retrying", self.broker_id, s.key[0], s.key[1],
                self.leader_id, why)

    def _fence(self, s: PartitionFetchState, why: str) -> None:
        s.phase = FetchPhase.FENCED
        s.last_error = why
        log.info("replica %d of %s-%d stops fetching from broker %d until the next LeaderAndIsr: %s",
                 self.broker_id, s.key[0], s.key[1], self.leader_id, why)

    def _on_partition_error(self, s: PartitionFetchState, code: int, message: str) -> None:
        if code == pb.FENCED_LEADER_EPOCH:
            self._fence(s, message or "FENCED_LEADER_EPOCH")
        else:
            self._delay(s, f"{pb.ErrorCode.Name(code) if code in pb.ErrorCode.values() else code}: {message}")

    # -- truncation -----------------------------------------------------------------------------

    async def _truncate(self, stub: pbg.ReplicaStub, states: list[PartitionFetchState]) -> None:
        todo = list(states)
        for _round in range(self.config.truncation_rounds_max):
            asked: dict[Key, _Sent] = {}
            for s in todo:
                epoch = s.partition.log.latest_epoch
                if epoch == UNDEFINED_EPOCH:  # an empty log: nothing to compare
                    s.phase = FetchPhase.FETCHING
                    continue
                asked[s.key] = _Sent(s, s.partition.log.log_end_offset, epoch)
            if not asked:
                return
            req = pb.OffsetForLeaderEpochRequest(replica_id=self.broker_id)
            for key, sent in asked.items():
                req.partitions.add(topic=key[0], partition=key[1], current_leader_epoch=sent.state.leader_epoch,
                                   leader_epoch=sent.asked_epoch)
            resp = await stub.OffsetForLeaderEpoch(req, timeout=self.config.rpc_timeout_s,
                                                  metadata=self.call_metadata)
            todo = []
            for r in resp.results:
                sent_or_none = asked.pop((r.topic, r.partition), None)
                if sent_or_none is None or not self._current(sent_or_none):
                    continue
                if self._apply_epoch_end(sent_or_none, r):
                    todo.append(sent_or_none.state)
            for sent in asked.values():  # no answer for it
                if self._current(sent):
                    self._delay(sent.state, "no OffsetForLeaderEpoch result")
            if not todo:
                return

    def _apply_epoch_end(self, sent: _Sent, r: pb.EpochEndOffset) -> bool:
        """Apply one OffsetForLeaderEpoch answer; True if another round is needed."""
        s = sent.state
        if r.error_code != pb.NONE:
            self._on_partition_error(s, r.error_code, r.error_message)
            return False
        part = s.partition
        leo = part.log.log_end_offset
        if r.leader_epoch < 0 or r.end_offset < 0:
            log.warning("replica %d of %s-%d: leader %d knows no epoch <= %d; fetching without truncation",
                        self.broker_id, s.key[0], s.key[1], self.leader_id, sent.asked_epoch)
            s.phase = FetchPhase.FETCHING
            return False
        own_end = part.log.end_offset_for_epoch(r.leader_epoch)[1]
        target = min(r.end_offset, own_end if own_end >= 0 else leo)
        try:
            if target < leo:
                log.info("replica %d of %s-%d truncates from %d to %d (leader %d: epoch %d ends at %d)",
                         self.broker_id, s.key[0], s.key[1], leo, target, self.leader_id, r.leader_epoch,
                         r.end_offset)
                part.truncate_as_follower(target)
        except StorageError as e:
            self._fence(s, f"truncation failed: {e}")
            return False
        if r.leader_epoch == sent.asked_epoch or target >= leo:
            s.phase = FetchPhase.FETCHING
            s.failures = 0
            return False
        return True

    # -- fetching -------------------------------------------------------------------------------

    async def _fetch(self, stub: pbg.BrokerStub, states: list[PartitionFetchState]) -> None:
        cfg = self.config
        req = pb.FetchRequest(replica_id=self.broker_id, replica_epoch=self.broker_epoch(),
                              max_wait_ms=cfg.max_wait_ms, min_bytes=cfg.min_bytes, max_bytes=cfg.max_bytes)
        sent: dict[Key, _Sent] = {}
        for s in states:
            offset = s.partition.log.log_end_offset
            sent[s.key] = _Sent(s, offset)
            max_bytes = cfg.partition_max_bytes if s.throttle is None else min(cfg.partition_max_bytes,
                                                                                 s.throttle.fetch_bytes())
            req.partitions.add(topic=s.key[0], partition=s.key[1], fetch_offset=offset,
                               partition_max_bytes=max_bytes, current_leader_epoch=s.leader_epoch)
        resp = await stub.Fetch(req, timeout=cfg.max_wait_ms / 1000 + cfg.rpc_timeout_s, metadata=self.call_metadata)
        for r in resp.results:
            one = sent.pop((r.topic, r.partition), None)
            if one is not None and self._current(one):
                self._apply_fetched(one, r)

    def _apply_fetched(self, sent: _Sent, r: pb.FetchPartitionResult) -> None:
        s = sent.state
        part = s.partition
        if r.error_code == pb.OFFSET_OUT_OF_RANGE:
            if 0 <= sent.offset < r.log_start_offset:
                log.info("replica %d of %s-%d is behind the leader's log start offset %d: restarting its log there",
                         self.broker_id, s.key[0], s.key[1], r.log_start_offset)
                try:
                    part.restart_as_follower_at(r.log_start_offset)
                except StorageError as e:
                    self._fence(s, f"restart at {r.log_start_offset} failed: {e}")
            else:
                s.phase = FetchPhase.TRUNCATING
                self._delay(s, f"fetch offset {sent.offset} out of the leader's range: {r.error_message}")
            return
        if r.error_code != pb.NONE:
            self._on_partition_error(s, r.error_code, r.error_message)
            return
        try:
            part.append_as_follower(r.records, r.high_watermark, r.log_start_offset)
        except StorageError as e:
            self._fence(s, f"append failed: {e}")
            return
        except BrokerError as e:  # diverged (first offset) or corrupt: find the common point again
            s.phase = FetchPhase.TRUNCATING
            self._delay(s, f"cannot append what the leader sent: {e}")
            return
        s.failures = 0
        if s.throttle is not None and part.log.log_end_offset < r.high_watermark:  # behind: pay for it
            now = self.clock.monotonic_ms()
            s.throttle.consume(len(r.records), now)
            s.throttled_bytes += len(r.records)
            s.delayed_until_ms = max(s.delayed_until_ms, s.throttle.ready_at_ms(now))


class ReplicaFetcherManager:
    """The fetchers of one broker, keyed by (leader id, address). Event-loop only."""

    def __init__(self, broker_id: int, config: FetcherConfig | None = None, clock: Clock = SYSTEM_CLOCK,
                 call_metadata: CallMetadata = ()) -> None:
        self.broker_id = broker_id
        self.call_metadata = call_metadata
        self.config = config or FetcherConfig()
        self.clock = clock
        self.broker_epoch = -1  # set by the replica manager from the LeaderAndIsr it accepts
        self._fetchers: dict[tuple[int, str], LeaderFetcher] = {}
        self._by_partition: dict[Key, LeaderFetcher] = {}
        self._throttles: dict[Key, int] = {}  # bytes/s of the partitions being added by a reassignment
        self._retired_throttled_bytes = 0  # throttled_bytes of fetch states no longer live
        self._stopping: set[asyncio.Task[None]] = set()

    def add_partition(self, partition: Partition, leader_id: int, address: str) -> PartitionFetchState:
        """Start (or restart, truncating first) fetching `partition` from `leader_id` at `address`."""
        current = self._by_partition.get(partition.key)
        if current is not None and (current.leader_id, current.address) != (leader_id, address):
            self.remove_partitions([partition.key])
        fetcher = self._fetchers.get((leader_id, address))
        if fetcher is None:
            fetcher = LeaderFetcher(self.broker_id, leader_id, address, self.config, self.clock,
                                    broker_epoch=lambda: self.broker_epoch,
                                    call_metadata=self.call_metadata)
            self._fetchers[(leader_id, address)] = fetcher
        replaced = fetcher.states.get(partition.key)
        if replaced is not None:
            self._retired_throttled_bytes += replaced.throttled_bytes
        state = fetcher.add(partition)
        rate = self._throttles.get(partition.key, 0)
        if rate > 0:
            state.throttle = ReplicaThrottle(rate, self.clock.monotonic_ms())
        self._by_partition[partition.key] = fetcher
        fetcher.start()
        return state

    def remove_partitions(self, keys: list[Key]) -> None:
        """Stop fetching these partitions; a fetcher left with none is stopped in the background."""
        for key in keys:
            fetcher = self._by_partition.pop(key, None)
            if fetcher is None:
                continue
            gone = fetcher.states.get(key)
            if gone is not None:
                self._retired_throttled_bytes += gone.throttled_bytes
            fetcher.remove(key)
            if not fetcher.states:
                self._fetchers.pop((fetcher.leader_id, fetcher.address), None)
                task = asyncio.create_task(fetcher.stop())
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)

    def set_throttle(self, key: Key, bytes_per_sec: int) -> None:
        """The replication throttle of `key` (a reassignment adding this replica), 0: none. Applies to
        its current fetch state at once and to any later one."""
        if bytes_per_sec > 0:
            self._throttles[key] = bytes_per_sec
        else:
            self._throttles.pop(key, None)
        fetcher = self._by_partition.get(key)
        state = None if fetcher is None else fetcher.states.get(key)
        if fetcher is None or state is None:
            return
        if bytes_per_sec <= 0:
            if state.throttle is not None and state.failures == 0:  # its throttle's wait ends now
                state.delayed_until_ms = 0
                fetcher.wake()
            state.throttle = None
        elif state.throttle is None or state.throttle.bytes_per_sec != bytes_per_sec:
            state.throttle = ReplicaThrottle(bytes_per_sec, self.clock.monotonic_ms())

    def throttled_partitions(self) -> int:
        """Partitions this broker fetches under a reassignment's replication throttle now."""
        return len(self._throttles)

    def throttled_bytes_total(self) -> int:
        """Bytes fetched while throttled (behind the leader, paid to a throttle), since the start: a counter."""
        live = sum(s.throttled_bytes for f in self._fetchers.values() for s in f.states.values())
        return self._retired_throttled_bytes + live

    def throttle_of(self, key: Key) -> int:
        """The replication throttle of `key` in bytes/s; 0: none."""
        return self._throttles.get(key, 0)

    def fetch_state(self, key: Key) -> PartitionFetchState | None:
        fetcher = self._by_partition.get(key)
        return None if fetcher is None else fetcher.states.get(key)

    def source_of(self, key: Key) -> tuple[int, str] | None:
        fetcher = self._by_partition.get(key)
        return None if fetcher is None else (fetcher.leader_id, fetcher.address)

    @property
    def fetcher_count(self) -> int:
        return len(self._fetchers)

    async def shutdown(self) -> None:
        fetchers = list(self._fetchers.values())
        self._fetchers.clear()
        self._by_partition.clear()
        for fetcher in fetchers:
            await fetcher.stop()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
