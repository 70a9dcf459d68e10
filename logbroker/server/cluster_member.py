"""A broker's membership of a ZooKeeper-coordinated cluster.

Owns the ZooKeeper session, the broker's registration (and so its broker epoch), the controller
that runs inside every broker (active on one), the channels to other brokers, and the admin
operations that in cluster mode go through ZooKeeper.

Session states (kazoo, delivered on its thread and handed to the loop)::

    CONNECTED --SUSPENDED--> the controller pauses itself; replicas keep their roles
    SUSPENDED --CONNECTED--> nothing lost (same session)
    any       --LOST-------> every partition role is dropped at once (no produce is accepted as
                             leader any more), the controller resigns by itself
    LOST      --CONNECTED--> a new session: register again (a new broker epoch); the controller
                             sends LeaderAndIsr for our partitions and we rejoin as follower/leader

Blocking kazoo calls run on a small dedicated thread pool, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from logbroker.clock import SYSTEM_CLOCK
from logbroker.cluster.controller import Controller
from logbroker.cluster.hashing import assign_replicas, balance_leaders
from logbroker.cluster.lineage import Split
from logbroker.cluster.metadata import (
    PARTITIONS_MAX,
    BrokerRegistration,
    TopicSpec,
    normalize_topic_config,
    validate_topic_name,
)
from logbroker.cluster.metadata_image import MetadataImage
from logbroker.cluster.priority_levels import parse_level_topic
from logbroker.cluster.zk_store import ZkStore
from logbroker.config import BrokerConfig
from logbroker.errors import (
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from logbroker.retry import RetryPolicy
from logbroker.server.broker_channels import BrokerChannels
from logbroker.server.split_point import read_split_offsets
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")

TOPIC_READY_WAIT_S = 15.0
CONTROLLED_SHUTDOWN_STALLS_MAX = 3
OFFLINE_REPORT_ATTEMPTS_MAX = 60  # then the next scrub pass / LeaderAndIsr answer reports again
AUTO_LEADER_REBALANCE_MOVES = 10  # partitions the controller may move per preferred check (--auto-leader-rebalance)
# waits on the one retry policy (logbroker/retry.py); jitter: a ZooKeeper or controller blip sends
# every broker back at once
REREGISTER_RETRY = RetryPolicy(initial_ms=100, max_ms=1_000, jitter=0.2, retries=59)  # 60 tries over 51-57 s
OFFLINE_REPORT_RETRY = RetryPolicy(initial_ms=100, max_ms=1_000, jitter=0.2, retries=OFFLINE_REPORT_ATTEMPTS_MAX - 1)
CONTROLLED_SHUTDOWN_RETRY = RetryPolicy(initial_ms=500, max_ms=500, jitter=0.2)  # bounded by the shutdown deadline
TP = tuple[str, int]


class ListenerPorts(Protocol):
    """The ports this broker's listeners bound (0: none), registered in ZooKeeper (the broker)."""

    @property
    def bound_port(self) -> int: ...

    @property
    def bound_data_port(self) -> int: ...


class LostLogs(Protocol):
    """Logs this broker created whose directory vanished, named in its registration so the
    controller never elects it for them (the log manager)."""

    def lost_logs(self) -> list[tuple[str, int, str]]: ...


class ClusterMember:
    """`on_session_lost` (on the loop): drop every partition role at once, so nothing is accepted
    as leader without a session; `image`: the controller's metadata as received (a topic counts as
    created once its partitions are led there)."""

    def __init__(self, config: BrokerConfig, image: MetadataImage, ports: ListenerPorts,
                 on_session_lost: Callable[[], None], lost_logs: LostLogs) -> None:
        self.config = cfg = config
        self._image = image
        self._ports = ports
        self._lost_logs = lost_logs
        self._on_session_lost = on_session_lost
        hosts, chroot = cfg.zk_hosts_and_chroot
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"zk-{cfg.broker_id}")
        self.store = ZkStore(hosts, chroot, session_timeout_ms=cfg.zk_session_timeout_ms)
        self.channels = BrokerChannels(cfg.cluster_secret, cfg.tls.as_client() if cfg.tls is not None else None)
        self.controller: Controller | None = None
        self.broker_epoch = -1
        self._controller_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session_lost = False
        # the ZooKeeper session as kazoo last reported it (`logbroker_zookeeper_session_state`):
        # NONE before start, then CONNECTED, SUSPENDED, LOST
        self.zk_session_state = "NONE"
        self._reregister: asyncio.Task[None] | None = None
        # replicas to name to the controller (ReplicaManager.offline_reporter), sent by one task
        self._offline_pending: dict[TP, str] = {}
        self._recovered_pending: set[TP] = set()
        self._report_task: asyncio.Task[None] | None = None

    async def _zk(self, fn: Any, *args: Any) -> Any:
        assert self._loop is not None
        return await self._loop.run_in_executor(self._executor, fn, *args)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._zk(self.store.start)
        self.zk_session_state = "CONNECTED"
        self.store.add_state_listener(self._on_state_threadsafe)
        await self._register()
        self.controller = Controller(self.config.broker_id, self.store, self.channels, self._loop,
                                     executor=self._executor,
                                     leader_rebalance_max_moves=(AUTO_LEADER_REBALANCE_MOVES
                                                                 if self.config.auto_leader_rebalance else 0))
        self._controller_task = asyncio.create_task(self.controller.run(), name="controller")

    def _registration(self) -> BrokerRegistration:
        cfg = self.config
        host, port = cfg.advertised
        lost = tuple(self._lost_logs.lost_logs())
        if lost:
            log.error("broker %d registers with %d replicas whose log vanished (it will not lead them): %s",
                      cfg.broker_id, len(lost), ", ".join(f"{t}-{p}" for t, p, _ in lost[:20]))
        return BrokerRegistration(cfg.broker_id, host, port or self._ports.bound_port, cfg.rack,
                                  data_port=self._ports.bound_data_port, lost_replicas=lost)

    async def _register(self) -> None:
        self.broker_epoch = await self._zk(self.store.register_broker, self._registration())
        log.info("broker %d registered in ZooKeeper with broker epoch %d", self.config.broker_id,
                 self.broker_epoch)

    def _on_state_threadsafe(self, state: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_state, state)

    def _on_state(self, state: str) -> None:
        self.zk_session_state = state
        if state == "LOST":
            log.warning("ZooKeeper session lost: dropping every partition role until re-registered")
            self._session_lost = True
            self.broker_epoch = -1
            self._on_session_lost()
        elif state == "CONNECTED" and self._session_lost:
            self._session_lost = False
            if self._reregister is None or self._reregister.done():
                self._reregister = asyncio.create_task(self._register_again())

    async def _register_again(self) -> None:
        backoff = REREGISTER_RETRY.start()
        while True:
            try:
                await self._register()
                return
            except Exception as exc:  # the session may flap again; keep trying, bounded
                log.warning("re-registration attempt %d failed: %s", backoff.failures + 1, exc)
                if (wait_ms := backoff.failed()) is None:
                    break
                await asyncio.sleep(wait_ms / 1000)
        log.error("giving up re-registering broker %d", self.config.broker_id)

    async def controlled_shutdown(self) -> None:
        """Ask the controller to move leadership away until nothing remains or the timeout passes."""
        deadline = time.monotonic() + self.config.controlled_shutdown_timeout_ms / 1000
        backoff = CONTROLLED_SHUTDOWN_RETRY.start(
            SYSTEM_CLOCK.monotonic_ms() + self.config.controlled_shutdown_timeout_ms)
        me = self.config.broker_id
        previous: list[tuple[str, int]] | None = None
        stalled = 0
        while time.monotonic() < deadline and self.broker_epoch >= 0 and stalled < CONTROLLED_SHUTDOWN_STALLS_MAX:
            try:
                controller_id = await self._zk(self.store.controller_id)
                if controller_id is None:
                    raise RequestTimedOutError("no controller")
                if controller_id == me and self.controller is not None and self.controller.is_active:
                    remaining = await self.controller.controlled_shutdown(me, self.broker_epoch)
                else:
                    brokers = await self._zk(self.store.live_brokers)
                    target = brokers.get(controller_id)
                    if target is None:
                        raise RequestTimedOutError(f"controller {controller_id} is not registered")
                    resp = await self.channels.stub(target.address).ControlledShutdown(
                        pb.ControlledShutdownRequest(broker_id=me, broker_epoch=self.broker_epoch), timeout=10,
                        metadata=self.channels.call_metadata)
                    if resp.error_code != pb.NONE:
                        raise RequestTimedOutError(f"{pb.ErrorCode.Name(resp.error_code)}: {resp.error_message}")
                    remaining = [(tp.topic, tp.partition) for tp in resp.remaining_partitions]
                if not remaining:
                    log.info("controlled shutdown: leadership moved away")
                    return
                log.info("controlled shutdown: %d partitions still led here", len(remaining))
                # no other in-sync replica can take them: a few tries, then stop anyway (as Kafka)
                stalled = stalled + 1 if remaining == previous else 0
                previous = remaining
            except Exception as exc:
                log.info("controlled shutdown attempt failed: %s", exc)
            if (wait_ms := backoff.failed()) is None:
                break
            await asyncio.sleep(wait_ms / 1000)
        log.warning("controlled shutdown did not finish; stopping anyway")

    def report_offline_replicas(self, offline: dict[TP, str], recovered: list[TP]) -> None:
        """(On the loop.) Tell the controller these replicas here are bad / healthy again; sent in
        the background, retried (bounded), the latest word per partition winning."""
        for tp, reason in offline.items():
            self._recovered_pending.discard(tp)
            self._offline_pending[tp] = reason
        for tp in recovered:
            self._offline_pending.pop(tp, None)
            self._recovered_pending.add(tp)
        if self._report_task is None or self._report_task.done():
            self._report_task = asyncio.create_task(self._send_offline_reports(), name="offline-replica-reports")

    async def _send_offline_reports(self) -> None:
        backoff = OFFLINE_REPORT_RETRY.start()
        while self._offline_pending or self._recovered_pending:
            offline, recovered = dict(self._offline_pending), sorted(self._recovered_pending)
            self._offline_pending.clear()
            self._recovered_pending.clear()
            try:
                await self._report_once(offline, recovered)
                log.info("reported to the controller: offline %s, recovered %s",
                         [f"{t}-{p}" for t, p in sorted(offline)], [f"{t}-{p}" for t, p in recovered])
                backoff.succeeded()
                continue
            except Exception as exc:
                log.warning("reporting offline replicas to the controller failed (attempt %d): %s",
                            backoff.failures + 1, exc)
            for tp, reason in offline.items():  # put back what no newer word replaced
                if tp not in self._recovered_pending:
                    self._offline_pending.setdefault(tp, reason)
            for tp in recovered:
                if tp not in self._offline_pending:
                    self._recovered_pending.add(tp)
            if (wait_ms := backoff.failed()) is None:
                log.error("giving up reporting offline replicas %s after %d attempts", sorted(self._offline_pending),
                          backoff.failures)
                self._offline_pending.clear()
                self._recovered_pending.clear()
                return
            await asyncio.sleep(wait_ms / 1000)

    async def _report_once(self, offline: dict[TP, str], recovered: list[TP]) -> None:
        me = self.config.broker_id
        if self.broker_epoch < 0:
            raise RequestTimedOutError("not registered")
        if recovered:  # the registration no longer names them lost (a new controller reads it)
            await self._zk(self.store.register_broker, self._registration())
        controller_id = await self._zk(self.store.controller_id)
        if controller_id is None:
            raise RequestTimedOutError("no controller")
        if controller_id == me and self.controller is not None and self.controller.is_active:
            await self.controller.report_offline_replicas(me, self.broker_epoch, offline, recovered)
            return
        brokers = await self._zk(self.store.live_brokers)
        target = brokers.get(controller_id)
        if target is None:
            raise RequestTimedOutError(f"controller {controller_id} is not registered")
        req = pb.ReportOfflineReplicasRequest(
            broker_id=me, broker_epoch=self.broker_epoch,
            offline=[pb.OfflineReplica(topic=t, partition=p, reason=r) for (t, p), r in sorted(offline.items())],
            recovered=[pb.TopicPartition(topic=t, partition=p) for t, p in recovered])
        resp = await self.channels.stub(target.address).ReportOfflineReplicas(
            req, timeout=10, metadata=self.channels.call_metadata)
        if resp.error_code != pb.NONE:
            raise RequestTimedOutError(f"{pb.ErrorCode.Name(resp.error_code)}: {resp.error_message}")

    async def stop_controller(self) -> None:
        if self.controller is not None:
            await self.controller.stop()
        if self._controller_task is not None:
            self._controller_task.cancel()
            await asyncio.gather(self._controller_task, return_exceptions=True)

    async def close(self) -> None:
        if self._reregister is not None:
            self._reregister.cancel()
        if self._report_task is not None:
            self._report_task.cancel()
        self.store.remove_state_listener(self._on_state_threadsafe)
        await self._zk(self.store.close)
        await self.channels.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- admin through ZooKeeper ------------------------------------------------------------------

    async def create_topic(self, name: str, partitions: int, replication_factor: int, config: dict[str, str],
                           validate_only: bool) -> None:
        validate_topic_name(name)
        if not 1 <= partitions <= PARTITIONS_MAX:
            raise InvalidPartitionsError(f"partitions must be in [1, {PARTITIONS_MAX}], got {partitions}")
        full_config = normalize_topic_config({**self.config.default_topic_config, **config})
        brokers: dict[int, BrokerRegistration] = await self._zk(self.store.live_brokers)
        rf = replication_factor or self.config.default_replication_factor
        if not 1 <= rf <= len(brokers):
            raise InvalidReplicationFactorError(
                f"replication factor {rf} needs {rf} live brokers; {len(brokers)} are registered"
            )
        if rf < int(full_config["min_insync_replicas"]):
            log.warning("topic %s: replication factor %d below min_insync_replicas %s", name, rf,
                        full_config["min_insync_replicas"])
        racks = {b.broker_id: b.rack for b in brokers.values() if b.rack}
        # a priority level's log is placed as its topic (same replicas, same preferred leader, while the
        # brokers stay the same), so the share coordinator usually reads every level locally
        placed_as = parse_level_topic(name)[0]
        assignment = balance_leaders(
            {p: assign_replicas(placed_as, p, sorted(brokers), rf, racks or None) for p in range(partitions)}
        )
        if validate_only:
            if await self._zk(self.store.get_topic, name) is not None:
                raise TopicAlreadyExistsError(f"topic {name!r} already exists")
            return
        await self._zk(self.store.create_topic, TopicSpec(name, assignment, full_config))
        log.info("created topic %s: %d partitions, replication factor %d", name, partitions, rf)
        await self._wait_until(lambda: self._led(name, partitions), f"leaders for every partition of {name}")

    def _led(self, name: str, partitions: int) -> bool:
        states = self._image.partitions.get(name, {})
        return len(states) >= partitions and all(s.leader >= 0 for s in states.values())

    async def _wait_until(self, predicate: Any, what: str) -> None:
        deadline = time.monotonic() + TOPIC_READY_WAIT_S
        while not predicate():
            if time.monotonic() > deadline:
                log.warning("timed out waiting for %s (the controller will finish it)", what)
                return
            await asyncio.sleep(0.05)

    async def delete_topic(self, name: str) -> None:
        validate_topic_name(name)
        if await self._zk(self.store.get_topic, name) is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        await self._zk(self.store.delete_topic, name)
        await self._wait_until(lambda: name not in self._image.partitions, f"deletion of {name}")

    async def create_partitions(self, name: str, total: int) -> None:
        validate_topic_name(name)
        spec, version = await self._topic_versioned(name)
        last = spec.splits[-1] if spec.splits else None
        if last is not None and last.pending:  # an earlier growth timed out recording its split: finish it first
            await self._complete_split(name, last.from_partitions, last.to_partitions)
            if total == spec.partition_count:
                return
            spec, version = await self._topic_versioned(name)
        current = spec.partition_count
        if total <= current:
            raise InvalidPartitionsError(f"topic {name!r} has {current} partitions; the new total must be larger")
        if total > PARTITIONS_MAX:
            raise InvalidPartitionsError(f"at most {PARTITIONS_MAX} partitions")
        brokers: dict[int, BrokerRegistration] = await self._zk(self.store.live_brokers)
        rf = len(next(iter(spec.assignment.values())))
        if rf > len(brokers):
            raise InvalidReplicationFactorError(f"replication factor {rf} needs {rf} live brokers; {len(brokers)} are up")
        racks = {b.broker_id: b.rack for b in brokers.values() if b.rack}
        added = {p: assign_replicas(name, p, sorted(brokers), rf, racks or None) for p in range(current, total)}
        assignment = {**spec.assignment, **balance_leaders(added, spec.assignment)}
        # per-key order (cluster/lineage.py): the split is written pending with the assignment, and
        # completed once every old partition's leader has fenced and given its split offset
        ordered = spec.config.get("key_order_on_growth", "true") == "true"
        split = Split(current, total, ()) if ordered else None
        await self._zk(self.store.set_assignment, name, assignment, version, split)
        await self._wait_until(lambda: self._led(name, total), f"leaders for the new partitions of {name}")
        if split is not None:
            await self._complete_split(name, current, total)

    async def _topic_versioned(self, name: str) -> tuple[TopicSpec, int]:
        found = await self._zk(self.store.get_topic_versioned, name)
        if found is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        return found

    async def _complete_split(self, name: str, current: int, total: int) -> None:
        offsets = await read_split_offsets(self._image, self.channels, name, current, total, TOPIC_READY_WAIT_S)
        if offsets is None:
            raise RequestTimedOutError(
                f"topic {name!r} has {total} partitions but its split point is not recorded yet (readers hold the "
                f"new partitions): grow it to {total} again to finish")
        await self._zk(self.store.complete_split, name, total, offsets)
        await self._wait_until(lambda: all(not s.pending for s in self._image.splits.get(name, [])),
                               f"the complete split of {name} in this broker's metadata")
        log.info("topic %s grew from %d to %d partitions (split at offsets %s)", name, current, total, offsets)

    async def reassign(self, topic: str, partition: int, replicas: list[int], throttle_bytes_per_sec: int = 0) -> None:
        validate_topic_name(topic)
        spec = await self._zk(self.store.get_topic, topic)
        if spec is None or partition not in spec.assignment:
            raise UnknownTopicOrPartitionError(f"unknown partition {topic}-{partition}")
        brokers = await self._zk(self.store.live_brokers)
        if not replicas or len(set(replicas)) != len(replicas) or any(b not in brokers for b in replicas):
            raise InvalidReplicationFactorError(f"replicas {replicas} must be distinct live brokers {sorted(brokers)}")
        await self._zk(self.store.request_reassignment, topic, partition, replicas, throttle_bytes_per_sec)
