"""The cluster's metadata store: ZooKeeper through kazoo. Every method blocks; call them off the event loop.

Layout under the chroot (default /logbroker):

    /cluster_id                                utf-8 cluster id (created once)
    /brokers/ids/<id>                          ephemeral BrokerRegistration JSON; broker epoch = czxid
    /controller                                ephemeral {"broker_id": id}
    /controller_epoch                          int as text; bumped in the SAME multi-op that creates
                                               /controller (set_data on its version + create)
    /topics/<topic>                            {"partitions": {"0": [r...]}, "config": {...},
                                                "topic_id": hex, "adding_replicas": {"0": [...]},
                                                "removing_replicas": {"0": [...]}}  (the last two only
                                               while a reassignment is in flight)
    /topics/<topic>/partitions/<p>/state       PartitionStateData JSON
    /admin/delete_topics/<topic>               deletion marker, handled by the controller
    /admin/reassign_partitions/<topic>-<p>     {"replicas": [...]} target, handled by the controller;
                                               with "throttle_bytes_per_sec": N (> 0) the replicas
                                               added fetch at most N bytes/s while behind
    /isr_change_notification/isr_change_<seq>  JSON list of [topic, p]: leader -> controller

Fencing. Every controller write is a multi-op whose first op is `check(/controller_epoch, version)`:
the version the controller got when it won the election. A newer controller has bumped that version, so
a zombie's writes fail as a whole (`ControllerFencedError`). Partition-state writes are also
conditional on the state znode's version (`PartitionStateData.zk_version`); a conflict is reported
per partition as `None`, never raised.

Watches are kazoo one-shot watches: `watch(event)` is called once, on kazoo's callback thread, with a
`kazoo.protocol.states.WatchedEvent`. When the connection is SUSPENDED kazoo fires every pending watch
with an event of type "NONE" (path None) and forgets them: the caller must re-read everything (and so
re-register its watches) once CONNECTED again. A watch callback must never block: hand the event to
the owner's loop (`loop.call_soon_threadsafe`) and return.

Bounds: every ZooKeeper round trip waits at most `op_timeout_s`; a connection problem (lost
connection, expired session, no answer in time) raises `ZooKeeperUnavailableError` (a retriable
REQUEST_TIMED_OUT) for the caller to retry. Multi-ops carry at most `_TXN_OPS_MAX` operations.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from kazoo.client import KazooClient, KazooState
from kazoo.exceptions import (
    BadVersionError,
    ConnectionDropped,
    ConnectionLoss,
    NodeExistsError,
    NoNodeError,
    NotEmptyError,
    OperationTimeoutError,
    RolledBackError,
    RuntimeInconsistency,
    SessionExpiredError,
    ZookeeperStoppedError,
)
from kazoo.handlers.threading import KazooTimeoutError

from logbroker.cluster.lineage import SPLITS_MAX, Split, complete_split, splits_from_json, splits_to_json
from logbroker.cluster.metadata import BrokerRegistration, PartitionStateData, TopicSpec
from logbroker.errors import (
    InvalidRequestError,
    LogbrokerError,
    ReassignmentInProgressError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)

log = logging.getLogger(__name__)

TP = tuple[str, int]
Watch = Callable[[Any], None]  # called once with kazoo's WatchedEvent, on kazoo's thread

CLUSTER_ID_PATH = "/cluster_id"
BROKER_IDS_PATH = "/brokers/ids"
CONTROLLER_PATH = "/controller"
CONTROLLER_EPOCH_PATH = "/controller_epoch"
TOPICS_PATH = "/topics"
DELETE_TOPICS_PATH = "/admin/delete_topics"
REASSIGN_PATH = "/admin/reassign_partitions"
ISR_CHANGE_PATH = "/isr_change_notification"
ISR_CHANGE_PREFIX = "isr_change_"

BASE_PATHS = (BROKER_IDS_PATH, TOPICS_PATH, DELETE_TOPICS_PATH, REASSIGN_PATH, ISR_CHANGE_PATH)

_TXN_OPS_MAX = 500
_CONFLICT_RETRIES_MAX = 5
# Errors a request can get that describe the data, not the connection: returned as values by _gather.
_NODE_ERRORS = (NoNodeError, NodeExistsError, BadVersionError, NotEmptyError, RolledBackError, RuntimeInconsistency)
# Errors that say nothing about the data, only that ZooKeeper could not be reached in time.
_UNAVAILABLE_ERRORS = (ConnectionLoss, ConnectionDropped, SessionExpiredError, ZookeeperStoppedError,
                       OperationTimeoutError, KazooTimeoutError)


class ZooKeeperUnavailableError(RequestTimedOutError):
    """ZooKeeper did not answer within the bound (connection lost, session expired, timeout).
    Retriable; on the wire it is REQUEST_TIMED_OUT."""


class ControllerFencedError(LogbrokerError):
    """A controller write was refused: /controller_epoch moved on, another controller was elected."""


class BrokerRegistrationError(LogbrokerError):
    """/brokers/ids/<id> stayed held by another session for longer than the registration wait."""


def topic_path(topic: str) -> str:
    return f"{TOPICS_PATH}/{topic}"


def partitions_path(topic: str) -> str:
    return f"{TOPICS_PATH}/{topic}/partitions"


def state_path(topic: str, partition: int) -> str:
    return f"{TOPICS_PATH}/{topic}/partitions/{partition}/state"


def reassign_node_name(topic: str, partition: int) -> str:
    return f"{topic}-{partition}"


def _spec_to_json(spec: TopicSpec) -> bytes:
    d: dict[str, Any] = {
        "partitions": {str(p): list(r) for p, r in sorted(spec.assignment.items())},
        "config": spec.config,
        "topic_id": spec.topic_id,
    }
    if spec.adding_replicas:
        d["adding_replicas"] = {str(p): list(r) for p, r in sorted(spec.adding_replicas.items())}
    if spec.removing_replicas:
        d["removing_replicas"] = {str(p): list(r) for p, r in sorted(spec.removing_replicas.items())}
    if spec.splits:
        d["splits"] = splits_to_json(spec.splits)
    return json.dumps(d).encode()


def _spec_from_json(name: str, raw: bytes) -> TopicSpec:
    d = json.loads(raw)

    def _ints(m: dict[str, list[Any]] | None) -> dict[int, list[int]]:
        return {int(p): [int(b) for b in r] for p, r in (m or {}).items()}

    return TopicSpec(
        name=name,
        assignment=_ints(d["partitions"]),
        config={str(k): str(v) for k, v in d.get("config", {}).items()},
        topic_id=str(d.get("topic_id", "")),
        adding_replicas=_ints(d.get("adding_replicas")),
        removing_replicas=_ints(d.get("removing_replicas")),
        splits=splits_from_json(d.get("splits")),
    )


class ZkStore:
    """MetadataStore over ZooKeeper, plus what cluster mode needs (registration, election, states).

    Thread-safe (kazoo is): the broker calls it from worker threads via `asyncio.to_thread`.
    """

    def __init__(self, hosts: str, chroot: str = "/logbroker", session_timeout_ms: int = 6000,
                 connect_timeout_s: float = 15.0, op_timeout_s: float = 10.0) -> None:
        if "/" in hosts:  # "host:port,host:port/chroot" (Kafka's zookeeper.connect) wins over `chroot`
            hosts, _, rest = hosts.partition("/")
            chroot = "/" + rest
        chroot = "/" + chroot.strip("/") if chroot.strip("/") else ""
        self.hosts = hosts
        self.chroot = chroot
        self.session_timeout_ms = session_timeout_ms
        self._connect_timeout_s = connect_timeout_s
        self._op_timeout_s = op_timeout_s
        self._client = KazooClient(
            hosts=hosts + chroot, timeout=session_timeout_ms / 1000.0,
            connection_retry={"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 1.0},
        )
        self._listeners: list[Callable[[str], None]] = []
        self._listeners_lock = threading.Lock()
        self._client.add_listener(self._on_kazoo_state)
        self._cluster_id = ""
        self._closed = False

    # ---------------------------------------------------------------- lifecycle and session

    def start(self) -> None:
        """Connect, create the chroot and base paths, read (or create) the cluster id."""
        try:
            if self.chroot:  # kazoo cannot create its own chroot: a short session without one does
                boot = KazooClient(hosts=self.hosts, timeout=self.session_timeout_ms / 1000.0)
                boot.start(timeout=self._connect_timeout_s)
                try:
                    boot.ensure_path_async(self.chroot).get(timeout=self._op_timeout_s)
                finally:
                    boot.stop()
                    boot.close()
            self._client.start(timeout=self._connect_timeout_s)
        except _UNAVAILABLE_ERRORS as e:
            raise ZooKeeperUnavailableError(
                f"could not connect to ZooKeeper at {self.hosts} within {self._connect_timeout_s}s: {e}"
            ) from e
        for path in BASE_PATHS:
            self._wait(self._client.ensure_path_async(path))
        try:
            self._wait(self._client.create_async(CONTROLLER_EPOCH_PATH, b"0"))
        except NodeExistsError:
            pass
        try:
            self._wait(self._client.create_async(CLUSTER_ID_PATH, uuid.uuid4().hex.encode()))
        except NodeExistsError:
            pass
        data, _ = self._wait(self._client.get_async(CLUSTER_ID_PATH))
        self._cluster_id = data.decode()
        log.info("connected to ZooKeeper %s%s, cluster %s, session 0x%x",
                 self.hosts, self.chroot, self._cluster_id, self.session_id)

    def close(self) -> None:
        """Close the session: every ephemeral node of ours (registration, /controller) goes at once."""
        if self._closed:
            return
        self._closed = True
        try:
            self._client.stop()
        finally:
            self._client.close()

    def add_state_listener(self, fn: Callable[[str], None]) -> None:
        """fn("CONNECTED" | "SUSPENDED" | "LOST"), called on kazoo's connection thread: never block."""
        with self._listeners_lock:
            self._listeners.append(fn)

    def remove_state_listener(self, fn: Callable[[str], None]) -> None:
        with self._listeners_lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _on_kazoo_state(self, state: Any) -> None:
        name = {KazooState.CONNECTED: "CONNECTED", KazooState.SUSPENDED: "SUSPENDED",
                KazooState.LOST: "LOST"}.get(state, str(state))
        with self._listeners_lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(name)
            except Exception:
                log.exception("ZooKeeper state listener failed")

    @property
    def connected(self) -> bool:
        return bool(self._client.connected)

    @property
    def session_id(self) -> int:
        cid = self._client.client_id
        return int(cid[0]) if cid else 0

    @property
    def cluster_id(self) -> str:
        return self._cluster_id

    # ---------------------------------------------------------------- bounded waits

    @property
    def kazoo(self) -> KazooClient:
        """The session, for stores of other concepts over it (cluster/security_store.py); bound every
        call through `wait`/`gather`."""
        return self._client

    def wait(self, async_result: Any) -> Any:
        return self._wait(async_result)

    def gather(self, results: list[Any]) -> list[Any]:
        return self._gather(results)

    def children(self, path: str, watch: Watch | None = None) -> list[str]:
        return self._children(path, watch)

    def commit(self, ops: Callable[[Any], None]) -> list[Any]:
        return self._commit(ops)

    def _wait(self, async_result: Any) -> Any:
        try:
            return async_result.get(timeout=self._op_timeout_s)
        except _UNAVAILABLE_ERRORS as e:
            raise ZooKeeperUnavailableError(f"ZooKeeper unavailable: {type(e).__name__} {e}") from e

    def _gather(self, results: list[Any]) -> list[Any]:
        """Wait for pipelined requests (one deadline for all); node errors come back as values."""
        deadline = time.monotonic() + self._op_timeout_s
        out: list[Any] = []
        for r in results:
            try:
                out.append(r.get(timeout=max(0.001, deadline - time.monotonic())))
            except _NODE_ERRORS as e:
                out.append(e)
            except _UNAVAILABLE_ERRORS as e:
                raise ZooKeeperUnavailableError(f"ZooKeeper unavailable: {type(e).__name__} {e}") from e
        return out

    def _children(self, path: str, watch: Watch | None = None) -> list[str]:
        try:
            return list(self._wait(self._client.get_children_async(path, watch=watch)))
        except NoNodeError:
            return []

    def _commit(self, ops: Callable[[Any], None]) -> list[Any]:
        txn = self._client.transaction()
        ops(txn)
        return list(self._wait(txn.commit_async()))

    @staticmethod
    def _fenced(results: list[Any]) -> bool:
        first = results[0] if results else None
        return isinstance(first, Exception) and not isinstance(first, RolledBackError)

    # ---------------------------------------------------------------- brokers

    def register_broker(self, reg: BrokerRegistration, wait_s: float | None = None) -> int:
        """Create the ephemeral /brokers/ids/<id>; returns the broker epoch (the node's czxid).

        If the node exists and belongs to this session (a retried create), it is ours: its czxid is
        returned. If another session holds it (our previous incarnation, not yet expired), wait for it
        to go, at most `wait_s` (default: twice the session timeout), then BrokerRegistrationError.
        """
        path = f"{BROKER_IDS_PATH}/{reg.broker_id}"
        wait_s = 2 * self.session_timeout_ms / 1000.0 + 1.0 if wait_s is None else wait_s
        deadline = time.monotonic() + wait_s
        gone = threading.Event()
        while True:
            try:
                _, stat = self._wait(self._client.create_async(path, reg.to_json(), ephemeral=True,
                                                               include_data=True))
                log.info("registered broker %d at %s (epoch %d)", reg.broker_id, reg.address, stat.czxid)
                return int(stat.czxid)
            except NodeExistsError:
                pass
            gone.clear()
            stat = self._wait(self._client.exists_async(path, watch=lambda _e: gone.set()))
            if stat is None:
                continue
            if stat.ephemeralOwner == self.session_id:
                self._wait(self._client.set_async(path, reg.to_json()))
                return int(stat.czxid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BrokerRegistrationError(
                    f"broker id {reg.broker_id} is registered by another session (0x{stat.ephemeralOwner:x})"
                )
            log.info("broker id %d still held by session 0x%x; waiting up to %.1fs for it to expire",
                     reg.broker_id, stat.ephemeralOwner, remaining)
            gone.wait(min(remaining, 1.0))

    def deregister_broker(self, broker_id: int) -> None:
        """Delete our own registration (only if this session owns it)."""
        path = f"{BROKER_IDS_PATH}/{broker_id}"
        stat = self._wait(self._client.exists_async(path))
        if stat is not None and stat.ephemeralOwner == self.session_id:
            try:
                self._wait(self._client.delete_async(path, version=stat.version))
            except (NoNodeError, BadVersionError):
                pass

    def live_brokers(self, watch: Watch | None = None) -> dict[int, BrokerRegistration]:
        """Every registered broker with its epoch; `watch` fires when the set of ids changes."""
        ids = sorted(int(c) for c in self._children(BROKER_IDS_PATH, watch) if c.isdigit())
        got = self._gather([self._client.get_async(f"{BROKER_IDS_PATH}/{b}") for b in ids])
        out: dict[int, BrokerRegistration] = {}
        for b, r in zip(ids, got, strict=True):
            if isinstance(r, Exception):
                continue
            data, stat = r
            out[b] = BrokerRegistration.from_json(b, data, epoch=int(stat.czxid))
        return out

    # ---------------------------------------------------------------- controller election

    def controller_epoch(self) -> tuple[int, int]:
        """(controller epoch, version of /controller_epoch)."""
        data, stat = self._wait(self._client.get_async(CONTROLLER_EPOCH_PATH))
        return int(data.decode() or 0), int(stat.version)

    def try_elect_controller(self, broker_id: int) -> tuple[int, int] | None:
        """One multi-op: bump /controller_epoch on the version read + create ephemeral /controller.

        Returns (controller epoch, epoch znode version) on winning, None when another broker is (or
        just became) controller.
        """
        epoch, version = self.controller_epoch()
        body = json.dumps({"broker_id": broker_id}).encode()

        def ops(t: Any) -> None:
            t.set_data(CONTROLLER_EPOCH_PATH, str(epoch + 1).encode(), version=version)
            t.create(CONTROLLER_PATH, body, ephemeral=True)

        res = self._commit(ops)
        if not isinstance(res[0], Exception) and not isinstance(res[1], Exception):
            log.info("broker %d elected controller, epoch %d", broker_id, epoch + 1)
            return epoch + 1, int(res[0].version)
        if isinstance(res[1], NodeExistsError):
            # A create retried after a lost reply would find our own node: the transaction did commit.
            stat = self._wait(self._client.exists_async(CONTROLLER_PATH))
            if stat is not None and stat.ephemeralOwner == self.session_id:
                return self.controller_epoch()
        return None

    def controller_id(self, watch: Watch | None = None) -> int | None:
        """The active controller's broker id; `watch` fires when /controller is created/deleted/changed."""
        stat = self._wait(self._client.exists_async(CONTROLLER_PATH, watch=watch))
        if stat is None:
            return None
        try:
            data, _ = self._wait(self._client.get_async(CONTROLLER_PATH))
        except NoNodeError:
            return None
        return int(json.loads(data)["broker_id"])

    def resign_controller(self, broker_id: int) -> None:
        """Delete /controller if this session holds it (a fast hand-over on a clean shutdown)."""
        stat = self._wait(self._client.exists_async(CONTROLLER_PATH))
        if stat is None or stat.ephemeralOwner != self.session_id:
            return
        try:
            self._wait(self._client.delete_async(CONTROLLER_PATH, version=stat.version))
            log.info("broker %d resigned as controller", broker_id)
        except (NoNodeError, BadVersionError):
            pass

    # ---------------------------------------------------------------- topics (MetadataStore)

    def topic_names(self, watch: Watch | None = None) -> list[str]:
        return sorted(self._children(TOPICS_PATH, watch))

    def get_topic(self, name: str, watch: Watch | None = None) -> TopicSpec | None:
        got = self.get_topic_versioned(name, watch)
        return None if got is None else got[0]

    def get_topic_versioned(self, name: str, watch: Watch | None = None) -> tuple[TopicSpec, int] | None:
        """The topic and its znode version; `watch` (data watch) fires when it changes or is deleted."""
        try:
            data, stat = self._wait(self._client.get_async(topic_path(name), watch=watch))
        except NoNodeError:
            return None
        return _spec_from_json(name, data), int(stat.version)

    def get_topics(self, names: Iterable[str], watch: Watch | None = None) -> dict[str, TopicSpec]:
        """Several topics in one pipelined round; missing ones are left out."""
        names = list(names)
        got = self._gather([self._client.get_async(topic_path(n), watch=watch) for n in names])
        return {n: _spec_from_json(n, r[0]) for n, r in zip(names, got, strict=True) if not isinstance(r, Exception)}

    def list_topics(self) -> dict[str, TopicSpec]:
        return self.get_topics(self.topic_names())

    def create_topic(self, spec: TopicSpec) -> None:
        """Create /topics/<name>; TopicAlreadyExistsError if it exists or is still being deleted."""
        if self._wait(self._client.exists_async(f"{DELETE_TOPICS_PATH}/{spec.name}")) is not None:
            raise TopicAlreadyExistsError(f"topic {spec.name!r} is marked for deletion")
        if not spec.topic_id:
            spec.topic_id = uuid.uuid4().hex
        try:
            self._wait(self._client.create_async(topic_path(spec.name), _spec_to_json(spec)))
        except NodeExistsError:
            raise TopicAlreadyExistsError(f"topic {spec.name!r} already exists") from None

    def delete_topic(self, name: str) -> None:
        """Mark the topic for deletion (/admin/delete_topics/<name>); the controller does the rest."""
        if self._wait(self._client.exists_async(topic_path(name))) is None:
            raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
        try:
            self._wait(self._client.create_async(f"{DELETE_TOPICS_PATH}/{name}", b""))
        except NodeExistsError:
            pass

    def set_assignment(self, name: str, assignment: dict[int, list[int]],
                       expected_version: int | None = None, split: Split | None = None) -> None:
        """CreatePartitions: add the partitions of `assignment` the topic does not have yet (and,
        when it grows with key order kept, its `split`, pending: cluster/lineage.py, in the same write).

        Existing partitions keep the replicas ZooKeeper has (the controller owns those: a reassignment
        may be changing them), so a caller's stale copy never reverts them. A conditional setData on
        the version read; with `expected_version` (from get_topic_versioned) a concurrent change raises
        InvalidRequestError, without it the read-modify-write retries a few times on conflict.
        """
        for _ in range(_CONFLICT_RETRIES_MAX):
            got = self.get_topic_versioned(name)
            if got is None:
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
            spec, version = got
            if expected_version is not None and version != expected_version:
                raise InvalidRequestError(f"topic {name!r} changed concurrently; retry")
            for p, replicas in assignment.items():
                spec.assignment.setdefault(int(p), [int(b) for b in replicas])
            if split is not None:
                spec.splits = [*spec.splits, split][-SPLITS_MAX:]
            try:
                self._wait(self._client.set_async(topic_path(name), _spec_to_json(spec), version=version))
                return
            except NoNodeError:
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist") from None
            except BadVersionError:
                if expected_version is not None:
                    raise InvalidRequestError(f"topic {name!r} changed concurrently; retry") from None
        raise InvalidRequestError(f"topic {name!r} keeps changing concurrently; retry")

    def complete_split(self, name: str, to_partitions: int, end_offsets: list[int]) -> None:
        """Give the topic's pending split to `to_partitions` its offsets (cluster/lineage.py); a
        read-modify-write conditional on the version read, retried on conflict."""
        for _ in range(_CONFLICT_RETRIES_MAX):
            got = self.get_topic_versioned(name)
            if got is None:
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist")
            spec, version = got
            spec.splits = complete_split(spec.splits, to_partitions, end_offsets)
            try:
                self._wait(self._client.set_async(topic_path(name), _spec_to_json(spec), version=version))
                return
            except NoNodeError:
                raise UnknownTopicOrPartitionError(f"topic {name!r} does not exist") from None
            except BadVersionError:
                continue
        raise InvalidRequestError(f"topic {name!r} keeps changing concurrently; retry")

    # ---------------------------------------------------------------- partition states

    def get_partition_states(self, topic: str) -> dict[int, PartitionStateData]:
        """Every state znode of the topic (partitions without one are left out), with zk_version."""
        parts = sorted(int(c) for c in self._children(partitions_path(topic)) if c.isdigit())
        got = self.get_partition_states_of([(topic, p) for p in parts])
        return {p: s for (_, p), s in got.items() if s is not None}

    def get_partition_states_of(self, tps: Iterable[TP]) -> dict[TP, PartitionStateData | None]:
        """Pipelined reads of the named state znodes; None where there is none."""
        tps = list(tps)
        got = self._gather([self._client.get_async(state_path(t, p)) for t, p in tps])
        out: dict[TP, PartitionStateData | None] = {}
        for tp, r in zip(tps, got, strict=True):
            out[tp] = None if isinstance(r, Exception) else PartitionStateData.from_json(r[0], int(r[1].version))
        return out

    def get_partition_state(self, topic: str, partition: int) -> PartitionStateData | None:
        return self.get_partition_states_of([(topic, partition)])[(topic, partition)]

    def controller_write(self, epoch_version: int, creates: dict[TP, PartitionStateData],
                         updates: dict[TP, PartitionStateData]) -> dict[TP, PartitionStateData | None]:
        """Create/update partition states, each in a multi-op guarded by check(/controller_epoch).

        Updates are conditional on `state.zk_version`; creates on the znode not existing. Returns the
        written states (with their new zk_version) or None per conflicting partition. Raises
        ControllerFencedError if /controller_epoch is no longer at `epoch_version`.
        """
        # parents of new state znodes: plain creates (never makepath: a deleted topic stays deleted)
        parents: list[str] = []
        for t, p in creates:
            parents += [partitions_path(t), f"{partitions_path(t)}/{p}"]
        for path in dict.fromkeys(parents):
            try:
                self._wait(self._client.create_async(path, b""))
            except (NodeExistsError, NoNodeError):
                pass
        ops: list[tuple[TP, PartitionStateData, bool]] = [(tp, st, True) for tp, st in creates.items()]
        ops += [(tp, st, False) for tp, st in updates.items() if tp not in creates]
        pending: list[Any] = []
        for tp, st, create in ops:
            txn = self._client.transaction()
            txn.check(CONTROLLER_EPOCH_PATH, epoch_version)
            if create:
                txn.create(state_path(*tp), st.to_json())
            else:
                txn.set_data(state_path(*tp), st.to_json(), version=st.zk_version)
            pending.append(txn.commit_async())
        out: dict[TP, PartitionStateData | None] = {}
        fenced = False
        for (tp, st, _), res in zip(ops, self._gather(pending), strict=True):
            out[tp] = None
            if isinstance(res, Exception):  # not a transaction result at all
                continue
            if self._fenced(res):
                fenced = True
            elif not isinstance(res[1], Exception):
                version = 0 if isinstance(res[1], str) else int(res[1].version)
                out[tp] = PartitionStateData(st.leader, st.leader_epoch, list(st.isr), st.controller_epoch, version)
        if fenced:
            raise ControllerFencedError(f"/controller_epoch is past version {epoch_version}")
        return out

    def write_isr_as_leader(self, topic: str, partition: int, state: PartitionStateData) -> PartitionStateData | None:
        """The leader's ISR change: setData conditional on state.zk_version + an ISR change notification,
        in one multi-op. Returns the state with its new zk_version, None on a version conflict (or if
        the partition is gone): re-read, and stop if the leader epoch moved on."""
        body = json.dumps([[topic, partition]]).encode()

        def ops(t: Any) -> None:
            t.set_data(state_path(topic, partition), state.to_json(), version=state.zk_version)
            t.create(f"{ISR_CHANGE_PATH}/{ISR_CHANGE_PREFIX}", body, sequence=True)

        res = self._commit(ops)
        if isinstance(res[0], Exception) or isinstance(res[1], Exception):
            return None
        return PartitionStateData(state.leader, state.leader_epoch, list(state.isr), state.controller_epoch,
                                  int(res[0].version))

    def isr_change_notifications(self, watch: Watch | None = None) -> list[tuple[str, list[TP]]]:
        """Pending notifications, oldest first: (node name, [(topic, partition)])."""
        names = sorted(self._children(ISR_CHANGE_PATH, watch))
        got = self._gather([self._client.get_async(f"{ISR_CHANGE_PATH}/{n}") for n in names])
        out: list[tuple[str, list[TP]]] = []
        for n, r in zip(names, got, strict=True):
            if isinstance(r, Exception):
                continue
            try:
                tps = [(str(t), int(p)) for t, p in json.loads(r[0])]
            except (ValueError, TypeError):
                log.warning("ignoring malformed ISR change notification %s", n)
                tps = []
            out.append((n, tps))
        return out

    def delete_isr_change_notifications(self, names: Iterable[str]) -> None:
        self._gather([self._client.delete_async(f"{ISR_CHANGE_PATH}/{n}") for n in names])

    # ---------------------------------------------------------------- deletion

    def topics_to_delete(self, watch: Watch | None = None) -> list[str]:
        return sorted(self._children(DELETE_TOPICS_PATH, watch))

    def delete_topic_completely(self, epoch_version: int, name: str) -> None:
        """Delete /topics/<name> recursively and then its deletion marker, every multi-op guarded by
        the controller epoch."""
        for _ in range(_CONFLICT_RETRIES_MAX):
            paths: list[str] = []
            for p in self._children(partitions_path(name)):
                pp = f"{partitions_path(name)}/{p}"
                paths += [f"{pp}/{c}" for c in self._children(pp)] + [pp]
            if self._wait(self._client.exists_async(partitions_path(name))) is not None:
                paths.append(partitions_path(name))
            if self._wait(self._client.exists_async(topic_path(name))) is not None:
                paths.append(topic_path(name))
            if self._wait(self._client.exists_async(f"{DELETE_TOPICS_PATH}/{name}")) is not None:
                paths.append(f"{DELETE_TOPICS_PATH}/{name}")
            ok = True
            for i in range(0, len(paths), _TXN_OPS_MAX):
                chunk = paths[i:i + _TXN_OPS_MAX]

                def ops(t: Any, chunk: list[str] = chunk) -> None:
                    t.check(CONTROLLER_EPOCH_PATH, epoch_version)
                    for path in chunk:
                        t.delete(path)

                res = self._commit(ops)
                if self._fenced(res):
                    raise ControllerFencedError(f"/controller_epoch is past version {epoch_version}")
                if any(isinstance(r, Exception) for r in res):
                    ok = False
                    break
            if ok:
                break
        else:
            raise InvalidRequestError(f"topic {name!r} kept changing while being deleted")
        log.info("deleted topic %s from ZooKeeper", name)

    # ---------------------------------------------------------------- reassignment

    def reassignments(self, watch: Watch | None = None) -> dict[TP, list[int]]:
        """Requested targets; a malformed request maps to [] (the controller drops it)."""
        return self.reassignments_with_throttles(watch)[0]

    def reassignments_with_throttles(self, watch: Watch | None = None) -> tuple[dict[TP, list[int]], dict[TP, int]]:
        """Requested targets (a malformed request maps to []: the controller drops it) and the
        replication throttles of those that have one (bytes/s, > 0)."""
        names = sorted(self._children(REASSIGN_PATH, watch))
        got = self._gather([self._client.get_async(f"{REASSIGN_PATH}/{n}") for n in names])
        out: dict[TP, list[int]] = {}
        throttles: dict[TP, int] = {}
        for n, r in zip(names, got, strict=True):
            topic, _, part = n.rpartition("-")
            if not topic or not part.isdigit() or isinstance(r, Exception):
                continue
            tp = (topic, int(part))
            try:
                doc = json.loads(r[0])
                replicas = [int(b) for b in doc["replicas"]]
                throttle = int(doc.get("throttle_bytes_per_sec", 0))
            except (ValueError, TypeError, KeyError, AttributeError):
                replicas, throttle = [], 0
            out[tp] = replicas
            if throttle > 0:
                throttles[tp] = throttle
        return out, throttles

    def request_reassignment(self, topic: str, partition: int, replicas: list[int],
                             throttle_bytes_per_sec: int = 0) -> None:
        """Create the reassignment request; the controller moves the partition and deletes it."""
        if not replicas or len(set(replicas)) != len(replicas) or any(b < 0 for b in replicas):
            raise InvalidRequestError(f"replicas {replicas} must be distinct broker ids, at least one")
        if throttle_bytes_per_sec < 0:
            raise InvalidRequestError(f"throttle_bytes_per_sec {throttle_bytes_per_sec} must be 0 or more")
        spec = self.get_topic(topic)
        if spec is None or partition not in spec.assignment:
            raise UnknownTopicOrPartitionError(f"{topic}-{partition} does not exist")
        doc: dict[str, Any] = {"replicas": replicas}
        if throttle_bytes_per_sec > 0:
            doc["throttle_bytes_per_sec"] = throttle_bytes_per_sec
        try:
            self._wait(self._client.create_async(f"{REASSIGN_PATH}/{reassign_node_name(topic, partition)}",
                                                 json.dumps(doc).encode()))
        except NodeExistsError:
            raise ReassignmentInProgressError(f"{topic}-{partition} is already being reassigned") from None

    def finish_reassignment(self, epoch_version: int, topic: str, partition: int) -> None:
        """Delete the reassignment request (guarded by the controller epoch)."""
        path = f"{REASSIGN_PATH}/{reassign_node_name(topic, partition)}"

        def ops(t: Any) -> None:
            t.check(CONTROLLER_EPOCH_PATH, epoch_version)
            t.delete(path)

        res = self._commit(ops)
        if self._fenced(res):
            raise ControllerFencedError(f"/controller_epoch is past version {epoch_version}")

    def controller_update_assignment(self, epoch_version: int, topic: str, partition: int, replicas: list[int],
                                     adding: list[int], removing: list[int]) -> bool:
        """Set one partition's replicas (and in-flight adding/removing) in /topics/<topic>: read-modify-
        write conditional on the topic znode's version, guarded by the controller epoch. False if the
        topic or partition is gone."""
        for _ in range(_CONFLICT_RETRIES_MAX):
            got = self.get_topic_versioned(topic)
            if got is None or partition not in got[0].assignment:
                return False
            spec, version = got
            spec.assignment[partition] = list(replicas)
            for field_map, value in ((spec.adding_replicas, adding), (spec.removing_replicas, removing)):
                if value:
                    field_map[partition] = list(value)
                else:
                    field_map.pop(partition, None)
            body = _spec_to_json(spec)

            def ops(t: Any, body: bytes = body, version: int = version) -> None:
                t.check(CONTROLLER_EPOCH_PATH, epoch_version)
                t.set_data(topic_path(topic), body, version=version)

            res = self._commit(ops)
            if self._fenced(res):
                raise ControllerFencedError(f"/controller_epoch is past version {epoch_version}")
            if not isinstance(res[1], Exception):
                return True
            if isinstance(res[1], NoNodeError):
                return False
        raise InvalidRequestError(f"topic {topic!r} keeps changing concurrently")


if TYPE_CHECKING:  # ZkStore is a MetadataStore (checked by mypy, no runtime import)
    from logbroker.cluster.local_store import MetadataStore

    def _is_metadata_store(store: ZkStore) -> MetadataStore:
        return store
