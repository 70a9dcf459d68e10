"""The cluster controller: one elected broker decides partition leadership for the whole cluster.

Two layers, as everywhere in logbroker:

- `ControllerState`, the pure decision core. It holds the controller's view (live brokers with their
  epochs, topics and assignments, partition states with their znode versions, deletions and
  reassignments in flight) and turns events into a list of actions. No I/O, no asyncio, no clock.
- `Controller`, the I/O shell. It wins the election in ZooKeeper, turns ZooKeeper watches into events
  on a single-threaded queue, reads what each event needs, feeds the core, and executes its actions:
  ZooKeeper writes (every one guarded by the controller epoch's znode version) and RPCs to brokers
  (one ordered sender per broker, bounded retries with backoff; a dead broker's requests are dropped).
  Every wait after a failure comes from the one retry policy (logbroker/retry.py), see
  `controller_retries`.

Leadership rules (no unclean election, ever; leader epochs never go backwards):

    new partition      leader = first live replica in assignment order, ISR = live replicas,
                       leader_epoch 0. No live replica: no state yet (created once one is live).
    leader lost        (dead, shutting down, or no longer a replica) new leader = first replica in
                       assignment order that is live, not shutting down and in the ISR; ISR = old ISR
                       minus dead/shutting-down/removed brokers; leader_epoch + 1. Nobody eligible:
                       a shutting-down ISR member that is still alive leads (it stays "remaining" in
                       its controlled shutdown); if the leader itself is that broker it simply keeps
                       leading; else leader = -1 with the ISR unchanged, leader_epoch + 1.
    follower lost      ISR minus it, leader_epoch unchanged (the znode version changes); LeaderAndIsr
                       to the replicas so acks=all stops waiting for it.
    broker back        LeaderAndIsr for every partition it replicates; an offline partition (leader
                       -1) whose ISR holds it gets it as leader (leader_epoch + 1). A broker that
                       re-registered under a new epoch between two looks ("bounced") is treated as
                       dead then alive: leadership moves off it, and it is dropped from ISRs.
    offline replica    broker B reports (ReportOfflineReplicas, or KAFKA_STORAGE_ERROR for a partition
                       in its LeaderAndIsr response, as Kafka) that its copy of P is bad (corrupt batch,
                       vanished log): B is marked offline for P, may not lead P and leaves P's ISR; if B
                       leads P, the first other ISR member that is live and not shutting down leads
                       (leader_epoch + 1); nobody: leader = -1 with the ISR unchanged (never unclean;
                       never led by a replica that lost data). The mark goes when B's registration goes
                       (dead, or re-registered: it reports again if still bad), when B reports P
                       recovered (an operator's `topics recover-empty`), or when P's leader adds B back
                       to the ISR (an ISR change in which B was out and is in: it re-fetched and caught up).
    preferred leader   replicas[0] live, not shutting down, in the ISR and not leader: it becomes
                       leader (leader_epoch + 1). On ISR change notifications and periodically.
    leader rebalance   (off by default; `on_leader_rebalance_check`) the balancer's leadership moves:
                       replicas reordered so another in-sync replica is first, then elected as above.
    controlled         broker B: every partition B leads moves to another ISR member (epoch + 1); B
    shutdown           leaves every ISR; B gets StopReplica(delete=false) for partitions it only
                       follows; the reply lists the partitions B still leads.
    deletion           StopReplica(delete=true) to the live replicas, /topics/<t> deleted
                       recursively, then the marker; UpdateMetadata names the topic as deleted.
    reassignment       to target T: (1) replicas = T + old (distinct), adding = T - old, removing =
                       old - T, leader_epoch + 1 so every replica learns the new set; (2) once every
                       member of T is live and in the ISR: replicas = T, leader from T if the old one
                       is out (else same leader), leader_epoch + 1, StopReplica(delete=true) to the
                       removed replicas, request deleted. A reordering of the same replicas
                       completes at once; its new first replica leads from the next preferred check.

Partition-state writes are conditional on the znode version; a conflict (the leader changed its ISR
meanwhile) re-reads those partitions and decides again, at most `STATE_WRITE_ATTEMPTS_MAX` times.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import json
import logging
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from logbroker.cluster.balancer import BrokerInfo, PartitionLoad
from logbroker.cluster.balancer import Options as BalanceOptions
from logbroker.cluster.balancer import plan as balance
from logbroker.cluster.lineage import splits_to_json
from logbroker.cluster.metadata import BrokerRegistration, PartitionStateData, TopicSpec
from logbroker.cluster.zk_store import ControllerFencedError, ZkStore
from logbroker.errors import (
    BrokerError,
    BrokerNotAvailableError,
    NotControllerError,
    RequestTimedOutError,
    StaleBrokerEpochError,
)
from logbroker.retry import RetryPolicy
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

TP = tuple[str, int]
STATE_WRITE_ATTEMPTS_MAX = 5
DELETED_TOPICS_REMEMBERED = 1000

# ======================================================================================= actions


@dataclass(frozen=True)
class WriteStates:
    """Create / conditionally update partition state znodes (updates carry the expected zk_version).
    The shell reports the outcome with `ControllerState.on_states_written(results, attempt)`."""

    creates: dict[TP, PartitionStateData]
    updates: dict[TP, PartitionStateData]
    attempt: int = 0


@dataclass(frozen=True)
class ReloadStates:
    """Re-read these state znodes (after a version conflict) and call `on_states_reloaded`."""

    partitions: frozenset[TP]
    attempt: int


@dataclass(frozen=True)
class WriteAssignment:
    """Set one partition's replicas in /topics/<topic> (with the reassignment's adding/removing)."""

    topic: str
    partition: int
    replicas: tuple[int, ...]
    adding: tuple[int, ...] = ()
    removing: tuple[int, ...] = ()


@dataclass(frozen=True)
class SendLeaderAndIsr:
    """LeaderAndIsr to one broker for these partitions, built from the view when it is sent."""

    broker_id: int
    partitions: frozenset[TP]


@dataclass(frozen=True)
class SendUpdateMetadata:
    """UpdateMetadata (the whole view) to every live broker."""


@dataclass(frozen=True)
class SendStopReplica:
    broker_id: int
    partitions: frozenset[TP]
    delete: bool


@dataclass(frozen=True)
class DeleteTopic:
    """Delete /topics/<name> recursively and its marker; then call `on_topic_deleted(name)`."""

    name: str


@dataclass(frozen=True)
class FinishReassignment:
    """Delete the reassignment request znode."""

    topic: str
    partition: int


Action = (WriteStates | ReloadStates | WriteAssignment | SendLeaderAndIsr | SendUpdateMetadata
          | SendStopReplica | DeleteTopic | FinishReassignment)

# ======================================================================================= wire helpers


def broker_info_pb(reg: BrokerRegistration) -> pb.BrokerInfo:
    return pb.BrokerInfo(broker_id=reg.broker_id, host=reg.host, port=reg.port, rack=reg.rack,
                         data_port=reg.data_port, broker_epoch=reg.epoch)


def partition_state_pb(topic: str, partition: int, state: PartitionStateData | None, replicas: Iterable[int],
                       adding: Iterable[int] = (), removing: Iterable[int] = ()) -> pb.PartitionState:
    """The wire form of a partition's state; `state` None (not created yet) is leader -1, epoch -1."""
    if state is None:
        return pb.PartitionState(topic=topic, partition=partition, controller_epoch=-1, leader=-1,
                                 leader_epoch=-1, replicas=list(replicas), zk_version=-1)
    return pb.PartitionState(
        topic=topic, partition=partition, controller_epoch=state.controller_epoch, leader=state.leader,
        leader_epoch=state.leader_epoch, isr=list(state.isr), replicas=list(replicas),
        zk_version=state.zk_version, adding_replicas=list(adding), removing_replicas=list(removing),
    )


def _distinct(xs: Iterable[int]) -> list[int]:
    return list(dict.fromkeys(xs))


def _min_isr(config: dict[str, str]) -> int:
    try:
        return int(config.get("min_insync_replicas", "1"))
    except ValueError:
        return 1


def _fmt(tp: TP) -> str:
    return f"{tp[0]}-{tp[1]}"


# ======================================================================================= pure core


class ControllerState:
    """The controller's view and decisions. Every `on_*` method takes an event (with the data the
    shell read for it) and returns actions; the shell executes them in order.

    Within one returned list, state writes come as (at most) one `WriteStates`, after any
    `WriteAssignment`, so each partition's expected zk_version is the one in the view.
    """

    def __init__(self, controller_id: int, controller_epoch: int) -> None:
        self.controller_id = controller_id
        self.controller_epoch = controller_epoch
        self.live: dict[int, BrokerRegistration] = {}
        self.shutting_down: set[int] = set()
        self.topics: dict[str, TopicSpec] = {}
        self.states: dict[TP, PartitionStateData] = {}
        self.deleting: set[str] = set()
        self.reassign_targets: dict[TP, tuple[int, ...]] = {}
        self.reassign_throttles: dict[TP, int] = {}  # bytes/s for the replicas added (> 0), per request
        self.recently_deleted: deque[str] = deque(maxlen=DELETED_TOPICS_REMEMBERED)
        self._reassign_started: set[TP] = set()
        self._force_bump: set[TP] = set()  # next write must bump the leader epoch (reassignment)
        self._shutdown_stopped: dict[int, set[TP]] = {}  # StopReplica(delete=false) already sent
        self.offline_replicas: dict[TP, set[int]] = {}  # brokers whose copy of the partition is bad

    # ---------------------------------------------------------------- queries

    def replicas(self, tp: TP) -> list[int]:
        spec = self.topics.get(tp[0])
        return [] if spec is None else list(spec.assignment.get(tp[1], []))

    def all_partitions(self) -> Iterator[TP]:
        for name in sorted(self.topics):
            for p in sorted(self.topics[name].assignment):
                yield (name, p)

    def partitions_of_broker(self, broker_id: int) -> set[TP]:
        return {tp for tp in self.all_partitions() if broker_id in self.replicas(tp)}

    def partitions_led_by(self, broker_id: int) -> list[TP]:
        return sorted(tp for tp, st in self.states.items() if st.leader == broker_id)

    def _alive(self, b: int, dead: frozenset[int] = frozenset()) -> bool:
        return b in self.live and b not in dead

    def _usable(self, b: int, dead: frozenset[int] = frozenset()) -> bool:
        return self._alive(b, dead) and b not in self.shutting_down

    # ---------------------------------------------------------------- the leadership rule

    def decide(self, tp: TP, current: PartitionStateData | None, preferred: bool = False,
               dead: frozenset[int] = frozenset()) -> PartitionStateData | None:
        """The state `tp` should have given the view (brokers in `dead` counted as gone), or None when
        `current` is right as it is (or no state can be created yet)."""
        replicas = self.replicas(tp)
        bad = self.offline_replicas.get(tp, set())
        if current is None:
            live_replicas = [b for b in replicas if self._usable(b, dead) and b not in bad]
            if not live_replicas:
                return None
            return PartitionStateData(live_replicas[0], 0, live_replicas, self.controller_epoch, -1)
        leader, isr = current.leader, current.isr
        new_leader = leader
        if leader == -1 or not self._usable(leader, dead) or leader not in replicas or leader in bad:
            eligible = [b for b in replicas if self._usable(b, dead) and b in isr and b not in bad]
            if eligible:
                new_leader = eligible[0]
            elif leader != -1 and self._alive(leader, dead) and leader in replicas and leader not in bad:
                new_leader = leader  # shutting down, nobody else in the ISR: it keeps leading
            else:
                last_resort = [b for b in replicas if self._alive(b, dead) and b in isr and b not in bad]
                new_leader = last_resort[0] if last_resort else -1
        elif (preferred and tp not in self.reassign_targets and replicas and replicas[0] != leader
              and self._usable(replicas[0], dead) and replicas[0] in isr and replicas[0] not in bad):
            new_leader = replicas[0]
        if new_leader == -1:
            new_isr = list(isr)  # no unclean election: the ISR is who may lead again
        else:
            new_isr = [b for b in isr if b in replicas and self._alive(b, dead) and b not in bad
                       and (b == new_leader or b not in self.shutting_down)]
        bump = new_leader != leader or tp in self._force_bump
        epoch = current.leader_epoch + (1 if bump else 0)
        if new_leader == leader and epoch == current.leader_epoch and new_isr == isr:
            return None
        return PartitionStateData(new_leader, epoch, new_isr, self.controller_epoch, current.zk_version)

    def _plan_writes(self, tps: Iterable[TP], preferred: bool = False, bounced: frozenset[int] = frozenset(),
                     attempt: int = 0) -> list[Action]:
        creates: dict[TP, PartitionStateData] = {}
        updates: dict[TP, PartitionStateData] = {}
        for tp in sorted(set(tps)):
            if tp[0] not in self.topics or tp[0] in self.deleting or tp[1] not in self.topics[tp[0]].assignment:
                continue
            current = self.states.get(tp)
            proposed = current
            if bounced:  # dead first, then alive again
                proposed = self.decide(tp, proposed, preferred, bounced) or proposed
            proposed = self.decide(tp, proposed, preferred) or proposed
            if proposed is None or proposed is current:
                continue
            if current is None:
                creates[tp] = proposed
            else:
                assert proposed.leader_epoch >= current.leader_epoch, "leader epochs never go backwards"
                proposed.zk_version = current.zk_version
                updates[tp] = proposed
        return [WriteStates(creates, updates, attempt)] if creates or updates else []

    def _leader_and_isr_to_replicas(self, tps: Iterable[TP]) -> list[Action]:
        per_broker: dict[int, set[TP]] = {}
        for tp in tps:
            for b in self.replicas(tp):
                if b in self.live:
                    per_broker.setdefault(b, set()).add(tp)
        return [SendLeaderAndIsr(b, frozenset(per_broker[b])) for b in sorted(per_broker)]

    def _shutdown_stops(self) -> list[Action]:
        """StopReplica(delete=false) to shutting-down brokers for partitions they no longer lead."""
        out: list[Action] = []
        for b in sorted(self.shutting_down):
            done = self._shutdown_stopped.setdefault(b, set())
            follower = {tp for tp in self.partitions_of_broker(b)
                        if tp in self.states and self.states[tp].leader != b and tp not in done}
            if follower:
                done |= follower
                out.append(SendStopReplica(b, frozenset(follower), delete=False))
        return out

    # ---------------------------------------------------------------- events

    def on_startup(self, brokers: dict[int, BrokerRegistration], topics: dict[str, TopicSpec],
                   states: dict[TP, PartitionStateData], deleting: Iterable[str] = (),
                   reassignments: dict[TP, list[int]] | None = None,
                   shutting_down: Iterable[int] = ()) -> list[Action]:
        """Just elected (or re-synced): take the whole view, repair, tell every live broker everything."""
        self.live = dict(brokers)
        self.topics = dict(topics)
        self.states = {tp: st for tp, st in states.items() if tp[0] in self.topics}
        self.shutting_down = {b for b in shutting_down if b in self.live}
        for b in sorted(self.live):
            self._mark_lost_logs(b)
        log.info("controller %d (epoch %d) starting with brokers %s, %d topics, %d partition states",
                 self.controller_id, self.controller_epoch, sorted(self.live), len(self.topics), len(self.states))
        pre = self.on_delete_requests(deleting)
        assigns, reconcile, post = self._reassignment_requests(reassignments or {})
        actions: list[Action] = [*assigns, *self._plan_writes(set(self.all_partitions()) | reconcile)]
        for b in sorted(self.live):
            mine = self.partitions_of_broker(b)
            if mine:
                actions.append(SendLeaderAndIsr(b, frozenset(mine)))
        return [*pre, *actions, *post, *self._shutdown_stops(), SendUpdateMetadata()]

    def on_broker_change(self, live: dict[int, BrokerRegistration]) -> list[Action]:
        old = self.live
        bounced = frozenset(b for b in live if b in old and old[b].epoch != live[b].epoch)
        dead = set(old) - set(live)
        born = (set(live) - set(old)) | bounced
        self.live = dict(live)
        for b in dead | bounced:
            self.shutting_down.discard(b)
            self._shutdown_stopped.pop(b, None)
            self._forget_offline_broker(b)
        for b in sorted(born):
            self._mark_lost_logs(b)
        if not dead and not born:
            return []
        log.info("brokers changed: live %s, gone %s, new %s, re-registered %s",
                 sorted(live), sorted(dead), sorted(born - bounced), sorted(bounced))
        assigns, reconcile, post = self._advance_reassignments()
        actions: list[Action] = [*assigns, *self._plan_writes(self.all_partitions(), bounced=bounced)]
        for b in sorted(born):
            mine = self.partitions_of_broker(b)
            if mine:
                actions.append(SendLeaderAndIsr(b, frozenset(mine)))
        return [*actions, *post, SendUpdateMetadata()]

    def on_topics_changed(self, topics: dict[str, TopicSpec], states: dict[TP, PartitionStateData] | None = None,
                          removed: Iterable[str] = ()) -> list[Action]:
        """New or changed topics (with the state znodes read for them) and topics gone from /topics."""
        for name in removed:
            self._forget_topic(name)
        touched: set[TP] = set()
        for name, spec in topics.items():
            old = self.topics.get(name)
            if old is None:
                log.info("new topic %s: %s", name, spec.assignment)
                if name in self.recently_deleted:
                    self.recently_deleted.remove(name)
            elif old.assignment != spec.assignment:
                log.info("topic %s assignment now %s", name, spec.assignment)
            self.topics[name] = spec
            for p in spec.assignment:
                if old is None or old.assignment.get(p) != spec.assignment[p] or (name, p) not in self.states:
                    touched.add((name, p))
        for tp, st in (states or {}).items():
            if tp[0] in self.topics:
                self.states[tp] = st
        actions = self._plan_writes(touched)
        return [*actions, SendUpdateMetadata()] if topics or removed else actions

    def on_isr_change(self, states: dict[TP, PartitionStateData | None]) -> list[Action]:
        """Fresh state znodes of partitions whose leader changed the ISR."""
        for tp, st in states.items():
            if tp[0] not in self.topics:
                continue
            if st is None:
                self.states.pop(tp, None)
            else:
                self._readmitted(tp, self.states.get(tp), st)
                self.states[tp] = st
        assigns, reconcile, post = self._advance_reassignments()
        writes = self._plan_writes(set(states) | reconcile, preferred=True)
        return [*assigns, *writes, *post, SendUpdateMetadata()]

    def on_preferred_check(self) -> list[Action]:
        return self._plan_writes(self.all_partitions(), preferred=True)

    def on_leader_rebalance_check(self, max_moves: int) -> list[Action]:
        """Automatic leader balancing (`serve --auto-leader-rebalance`): the balancer's leadership
        moves (logbroker/cluster/balancer.py, by leader count: the controller knows no rates) for the
        partitions not being reassigned or deleted, each written as its replicas reordered (another
        in-sync replica first), then the preferred leaders elected."""
        brokers = [BrokerInfo(b, reg.rack, b not in self.shutting_down) for b, reg in sorted(self.live.items())]
        partitions = []
        for tp in self.all_partitions():
            st = self.states.get(tp)
            if st is None or tp in self.reassign_targets or tp[0] in self.deleting:
                continue
            bad = self.offline_replicas.get(tp, set())
            partitions.append(PartitionLoad(tp[0], tp[1], tuple(self.replicas(tp)), st.leader,
                                            tuple(b for b in st.isr if b not in bad),
                                            _min_isr(self.topics[tp[0]].config)))
        moves = balance(brokers, partitions, BalanceOptions(max_moves=max_moves)).moves
        if not moves:
            return []
        assigns: list[Action] = []
        for m in moves:
            log.info("leader rebalance of %s: replicas %s -> %s (leader %d -> %d)", _fmt((m.topic, m.partition)),
                     list(m.replicas_before), list(m.replicas_after), m.leader_before, m.leader_after)
            self.topics[m.topic].assignment[m.partition] = list(m.replicas_after)
            assigns.append(WriteAssignment(m.topic, m.partition, m.replicas_after))
        moved = {(m.topic, m.partition) for m in moves}
        return [*assigns, *self._plan_writes(moved, preferred=True), SendUpdateMetadata()]

    def on_controlled_shutdown(self, broker_id: int, broker_epoch: int) -> list[Action]:
        """Broker `broker_id` is shutting down. After the actions, `partitions_led_by(broker_id)` is the
        answer (partitions it still leads: nobody else in their ISR)."""
        reg = self.live.get(broker_id)
        if reg is None:
            raise BrokerNotAvailableError(f"broker {broker_id} is not registered")
        if broker_epoch != reg.epoch:  # no value skips the check
            raise StaleBrokerEpochError(f"broker {broker_id} epoch {broker_epoch} is not the current {reg.epoch}")
        if broker_id not in self.shutting_down:
            log.info("controlled shutdown of broker %d (epoch %d)", broker_id, reg.epoch)
        self.shutting_down.add(broker_id)
        writes = self._plan_writes(self.partitions_of_broker(broker_id))
        return [*writes, *self._shutdown_stops(), SendUpdateMetadata()]

    def on_offline_replicas(self, broker_id: int, broker_epoch: int, offline: dict[TP, str],
                            recovered: Iterable[TP] = ()) -> list[Action]:
        """Broker `broker_id` reports its copies of `offline` bad (reason per partition) and those of
        `recovered` healthy again. Fenced like a controlled shutdown; partitions it does not
        replicate are ignored."""
        reg = self.live.get(broker_id)
        if reg is None:
            raise BrokerNotAvailableError(f"broker {broker_id} is not registered")
        if broker_epoch != reg.epoch:  # no value skips the check
            raise StaleBrokerEpochError(f"broker {broker_id} epoch {broker_epoch} is not the current {reg.epoch}")
        touched: set[TP] = set()
        for tp in sorted(set(recovered)):
            marks = self.offline_replicas.get(tp)
            if marks is not None and broker_id in marks:
                log.warning("broker %d reports its replica of %s recovered: it may lead again", broker_id, _fmt(tp))
                self._unmark(tp, broker_id)
                touched.add(tp)
        for tp, reason in sorted(offline.items()):
            if broker_id not in self.replicas(tp) or tp[0] in self.deleting:
                continue
            marks = self.offline_replicas.setdefault(tp, set())
            if broker_id not in marks:
                log.warning("broker %d reports its replica of %s offline (%s): it leaves the ISR and may not lead",
                            broker_id, _fmt(tp), reason)
                marks.add(broker_id)
            touched.add(tp)
        if not touched:
            return []
        return self._plan_writes(touched)

    def _mark_lost_logs(self, broker_id: int) -> None:
        """A registration names logs the broker created that vanished: offline there (same topic id,
        or an id unknown on either side) before it can be elected."""
        for topic, partition, topic_id in self.live[broker_id].lost_replicas:
            spec = self.topics.get(topic)
            if (spec is None or broker_id not in spec.assignment.get(partition, ())
                    or (topic_id and spec.topic_id and topic_id != spec.topic_id)):
                continue
            marks = self.offline_replicas.setdefault((topic, partition), set())
            if broker_id not in marks:
                log.warning("broker %d registered without the log of %s-%d: offline there, it may not lead it",
                            broker_id, topic, partition)
                marks.add(broker_id)

    def _readmitted(self, tp: TP, old: PartitionStateData | None, new: PartitionStateData) -> None:
        """A leader added an offline-marked broker back to the ISR (it was out in our view): its copy
        has caught up, so the mark goes."""
        for b in sorted(self.offline_replicas.get(tp, set())):
            if (b in new.isr and new.leader not in (-1, b) and old is not None and b not in old.isr):
                log.info("broker %d is back in the ISR of %s: no longer offline there", b, _fmt(tp))
                self._unmark(tp, b)

    def _unmark(self, tp: TP, broker_id: int) -> None:
        marks = self.offline_replicas.get(tp)
        if marks is not None:
            marks.discard(broker_id)
            if not marks:
                del self.offline_replicas[tp]

    def _forget_offline_broker(self, broker_id: int) -> None:
        for tp in [tp for tp, marks in self.offline_replicas.items() if broker_id in marks]:
            self._unmark(tp, broker_id)

    def on_delete_requests(self, names: Iterable[str]) -> list[Action]:
        actions: list[Action] = []
        for name in sorted(set(names) - self.deleting):
            self.deleting.add(name)
            spec = self.topics.get(name)
            log.info("deleting topic %s", name)
            if spec is not None:
                per_broker: dict[int, set[TP]] = {}
                for p, replicas in spec.assignment.items():
                    for b in replicas:
                        if b in self.live:
                            per_broker.setdefault(b, set()).add((name, p))
                actions += [SendStopReplica(b, frozenset(tps), delete=True) for b, tps in sorted(per_broker.items())]
            for tp in [tp for tp in self.reassign_targets if tp[0] == name]:
                self._drop_reassignment(tp)
                actions.append(FinishReassignment(*tp))
            actions.append(DeleteTopic(name))
        return actions

    def on_topic_deleted(self, name: str) -> list[Action]:
        self._forget_topic(name)
        self.deleting.discard(name)
        if name not in self.recently_deleted:
            self.recently_deleted.append(name)
        log.info("topic %s deleted", name)
        return [SendUpdateMetadata()]

    def on_reassignments(self, targets: dict[TP, list[int]], throttles: dict[TP, int] | None = None) -> list[Action]:
        """New or withdrawn reassignment requests (with the replication throttles of those that have
        one: sent in every PartitionState while they are in flight). One that finishes at once (its
        target already in the ISR: a reordering of the same replicas, the balancer's leadership move)
        gets its new preferred leader at the next periodic preferred check (electing it here made a
        preferred replica whose log had vanished lead again: test_offline_replicas)."""
        self.reassign_throttles = {tp: r for tp, r in (throttles or {}).items() if tp in targets and r > 0}
        assigns, reconcile, post = self._reassignment_requests(targets)
        return [*assigns, *self._plan_writes(reconcile), *post]

    def on_states_written(self, results: dict[TP, PartitionStateData | None], attempt: int = 0) -> list[Action]:
        """The outcome of a WriteStates: new states (with versions) or None per conflicting partition."""
        changed: list[TP] = []
        conflicts: list[TP] = []
        for tp, new in sorted(results.items()):
            if new is None:
                conflicts.append(tp)
                continue
            old = self.states.get(tp)
            self.states[tp] = new
            self._force_bump.discard(tp)
            changed.append(tp)
            if old is None:
                log.info("partition %s online: leader %d, leader epoch %d, isr %s (controller epoch %d)",
                         _fmt(tp), new.leader, new.leader_epoch, new.isr, self.controller_epoch)
            elif old.leader != new.leader or old.leader_epoch != new.leader_epoch:
                log.info("partition %s: leader %d -> %d, leader epoch %d -> %d, isr %s -> %s (controller epoch %d)",
                         _fmt(tp), old.leader, new.leader, old.leader_epoch, new.leader_epoch, old.isr, new.isr,
                         self.controller_epoch)
            else:
                log.info("partition %s: isr %s -> %s (leader %d, leader epoch %d)", _fmt(tp), old.isr, new.isr,
                         new.leader, new.leader_epoch)
        actions: list[Action] = [*self._leader_and_isr_to_replicas(changed), *self._shutdown_stops()]
        if changed:
            actions.append(SendUpdateMetadata())
        if conflicts:
            if attempt + 1 < STATE_WRITE_ATTEMPTS_MAX:
                log.info("state version conflict on %s; re-reading", [_fmt(tp) for tp in conflicts])
                actions.append(ReloadStates(frozenset(conflicts), attempt + 1))
            else:
                log.error("giving up on %s after %d conflicting writes", [_fmt(tp) for tp in conflicts], attempt + 1)
        return actions

    def on_states_reloaded(self, states: dict[TP, PartitionStateData | None], attempt: int) -> list[Action]:
        for tp, st in states.items():
            if tp[0] not in self.topics:
                continue
            if st is None:
                self.states.pop(tp, None)
            else:
                self.states[tp] = st
        return self._plan_writes(states, attempt=attempt)

    # ---------------------------------------------------------------- reassignment

    def _drop_reassignment(self, tp: TP) -> None:
        self.reassign_targets.pop(tp, None)
        self.reassign_throttles.pop(tp, None)
        self._reassign_started.discard(tp)

    def _forget_topic(self, name: str) -> None:
        self.topics.pop(name, None)
        for tp in [tp for tp in self.states if tp[0] == name]:
            del self.states[tp]
        for tp in [tp for tp in self.reassign_targets if tp[0] == name]:
            self._drop_reassignment(tp)
        self._force_bump = {tp for tp in self._force_bump if tp[0] != name}
        for tp in [tp for tp in self.offline_replicas if tp[0] == name]:
            del self.offline_replicas[tp]
        for done in self._shutdown_stopped.values():
            done -= {tp for tp in done if tp[0] == name}

    def _reassignment_requests(self, targets: dict[TP, list[int]]) -> tuple[list[Action], set[TP], list[Action]]:
        finished: list[Action] = []
        for tp in [tp for tp in self.reassign_targets if tp not in targets]:
            log.info("reassignment of %s withdrawn", _fmt(tp))
            self._drop_reassignment(tp)
        for tp, target in sorted(targets.items()):
            t = tuple(target)
            if self.reassign_targets.get(tp) == t:
                continue
            spec = self.topics.get(tp[0])
            if (not t or len(set(t)) != len(t) or any(b < 0 for b in t) or spec is None
                    or tp[1] not in spec.assignment or tp[0] in self.deleting):
                log.warning("dropping invalid reassignment of %s to %s", _fmt(tp), list(t))
                self._drop_reassignment(tp)
                finished.append(FinishReassignment(*tp))
                continue
            log.info("reassignment of %s from %s to %s requested", _fmt(tp), spec.assignment[tp[1]], list(t))
            self.reassign_targets[tp] = t
            self._reassign_started.discard(tp)
        assigns, reconcile, post = self._advance_reassignments()
        return assigns, reconcile, [*post, *finished]

    def _advance_reassignments(self) -> tuple[list[Action], set[TP], list[Action]]:
        """Move every reassignment as far as it can go: (assignment writes, partitions whose state must
        be rewritten, actions after the state writes)."""
        assigns: list[Action] = []
        reconcile: set[TP] = set()
        post: list[Action] = []
        for tp, target in sorted(self.reassign_targets.items()):
            spec = self.topics.get(tp[0])
            if spec is None or tp[0] in self.deleting or tp[1] not in spec.assignment:
                self._drop_reassignment(tp)
                post.append(FinishReassignment(*tp))
                continue
            current = spec.assignment[tp[1]]
            st = self.states.get(tp)
            caught_up = st is not None and all(b in st.isr and self._alive(b) for b in target)
            if tp not in self._reassign_started and not caught_up:
                union = _distinct([*target, *current])
                adding = spec.adding_replicas.get(tp[1]) or [b for b in target if b not in current]
                removing = [b for b in union if b not in target]
                log.info("reassignment of %s: replicas %s -> %s (adding %s, removing %s)",
                         _fmt(tp), current, union, adding, removing)
                spec.assignment[tp[1]] = union
                self._set_in_flight(spec, tp[1], adding, removing)
                assigns.append(WriteAssignment(tp[0], tp[1], tuple(union), tuple(adding), tuple(removing)))
                self._force_bump.add(tp)
                reconcile.add(tp)
                self._reassign_started.add(tp)
            elif caught_up:
                removed = [b for b in current if b not in target]
                log.info("reassignment of %s complete: replicas %s -> %s", _fmt(tp), current, list(target))
                spec.assignment[tp[1]] = list(target)
                self._set_in_flight(spec, tp[1], [], [])
                if list(current) != list(target):
                    assigns.append(WriteAssignment(tp[0], tp[1], tuple(target)))
                    self._force_bump.add(tp)
                    reconcile.add(tp)
                post += [SendStopReplica(b, frozenset({tp}), delete=True) for b in removed if b in self.live]
                post.append(FinishReassignment(*tp))
                self._drop_reassignment(tp)
        return assigns, reconcile, post

    @staticmethod
    def _set_in_flight(spec: TopicSpec, partition: int, adding: list[int], removing: list[int]) -> None:
        for field_map, value in ((spec.adding_replicas, adding), (spec.removing_replicas, removing)):
            if value:
                field_map[partition] = list(value)
            else:
                field_map.pop(partition, None)

    # ---------------------------------------------------------------- requests, built when sent

    def partition_state_pb(self, tp: TP) -> pb.PartitionState:
        spec = self.topics.get(tp[0])
        adding = spec.adding_replicas.get(tp[1], []) if spec else []
        removing = spec.removing_replicas.get(tp[1], []) if spec else []
        ps = partition_state_pb(tp[0], tp[1], self.states.get(tp), self.replicas(tp), adding, removing)
        if adding and tp in self.reassign_targets:
            ps.adding_throttle_bytes_per_sec = self.reassign_throttles.get(tp, 0)
        return ps

    def leader_and_isr_request(self, broker_id: int, tps: Iterable[TP]) -> pb.LeaderAndIsrRequest | None:
        """LeaderAndIsr for the partitions of `tps` the broker (still) replicates and that have a state;
        a shutting-down broker only hears about partitions it leads. None when nothing is left."""
        reg = self.live.get(broker_id)
        if reg is None:
            return None
        parts: list[pb.PartitionState] = []
        for tp in sorted(set(tps)):
            st = self.states.get(tp)
            if (st is None or tp[0] in self.deleting or broker_id not in self.replicas(tp)
                    or (broker_id in self.shutting_down and st.leader != broker_id)):
                continue
            parts.append(self.partition_state_pb(tp))
        if not parts:
            return None
        configs = {p.topic: json.dumps(self.topics[p.topic].config, sort_keys=True) for p in parts}
        return pb.LeaderAndIsrRequest(
            controller_id=self.controller_id, controller_epoch=self.controller_epoch, broker_epoch=reg.epoch,
            partitions=parts, live_brokers=[broker_info_pb(r) for _, r in sorted(self.live.items())],
            topic_configs_json=configs,
            topic_ids={t: self.topics[t].topic_id for t in configs if self.topics[t].topic_id},
        )

    def update_metadata_request(self) -> pb.UpdateMetadataRequest:
        """Every live broker and every partition of every topic not being deleted."""
        parts = [self.partition_state_pb(tp) for tp in self.all_partitions() if tp[0] not in self.deleting]
        return pb.UpdateMetadataRequest(
            controller_id=self.controller_id, controller_epoch=self.controller_epoch,
            brokers=[broker_info_pb(r) for _, r in sorted(self.live.items())], partitions=parts,
            deleted_topics=sorted({*self.recently_deleted, *self.deleting}),
            topic_splits_json={name: json.dumps(splits_to_json(spec.splits)) for name, spec in self.topics.items()
                               if spec.splits and name not in self.deleting
                               and spec.config.get("key_order_on_growth", "true") == "true"},
        )

    def stop_replica_request(self, broker_id: int, tps: Iterable[TP], delete: bool) -> pb.StopReplicaRequest | None:
        reg = self.live.get(broker_id)
        parts = sorted(set(tps))
        if reg is None or not parts:
            return None
        return pb.StopReplicaRequest(
            controller_id=self.controller_id, controller_epoch=self.controller_epoch, broker_epoch=reg.epoch,
            delete_partitions=delete, partitions=[pb.TopicPartition(topic=t, partition=p) for t, p in parts],
        )


# ======================================================================================= I/O shell


class ControllerRpc(Protocol):
    """Controller -> broker calls (gRPC `Replica` service in the broker). Raise on transport failure;
    the controller retries with backoff while the broker stays registered under the same epoch."""

    async def leader_and_isr(self, broker: BrokerRegistration,
                             req: pb.LeaderAndIsrRequest) -> pb.LeaderAndIsrResponse: ...

    async def update_metadata(self, broker: BrokerRegistration,
                              req: pb.UpdateMetadataRequest) -> pb.UpdateMetadataResponse: ...

    async def stop_replica(self, broker: BrokerRegistration,
                           req: pb.StopReplicaRequest) -> pb.StopReplicaResponse: ...


class _Event(enum.IntEnum):
    """Controller events, in the order a backlog is worked through (each coalesces: one pending
    instance at most, so the queue is bounded by construction)."""

    RESYNC = 0  # elected, or reconnected after SUSPENDED (kazoo dropped every watch): read everything
    CONTROLLER_CHANGE = 1
    BROKER_CHANGE = 2
    TOPIC_CHANGE = 3
    PARTITION_CHANGE = 4  # data of /topics/<t> for the topics in _Term.changed_topics
    TOPIC_DELETION = 5
    ISR_CHANGE = 6
    REASSIGNMENT = 7
    CONTROLLED_SHUTDOWN = 8
    OFFLINE_REPLICAS = 9  # brokers' reports in _Term.offline_reports (ReportOfflineReplicas, LeaderAndIsr answers)
    PREFERRED_CHECK = 10


_SUBSUMED_BY_RESYNC = {_Event.BROKER_CHANGE, _Event.TOPIC_CHANGE, _Event.PARTITION_CHANGE, _Event.TOPIC_DELETION,
                       _Event.ISR_CHANGE, _Event.REASSIGNMENT, _Event.CONTROLLER_CHANGE}
_SHUTDOWN_REQUESTS_MAX = 256
_OFFLINE_REPORTS_MAX = 256
_ISR_NOTIFICATIONS_PER_ROUND_MAX = 1000
CONTROLLER_RETRY_JITTER = 0.2
ELECTION_RETRY_INITIAL_MS = 200
EVENT_RETRY_INITIAL_MS = 100
SEND_RETRY_INITIAL_MS = 100


@dataclass(frozen=True)
class ControllerRetries:
    """The controller's waits after failures, each a capped, jittered exponential curve:

        election  trying to win (or read) /controller failed: 200 ms doubling to the cap; no attempt
                  bound: a broker keeps trying while it runs (stop() ends it, and cuts a wait short)
        event     handling an event failed (everything is re-read next): 100 ms doubling to the cap;
                  no attempt bound within a term (the term ends on resign, fencing or stop())
        send      a request to one broker failed: 100 ms doubling to the cap; after `rpc_attempts_max`
                  attempts in a row that broker's pending requests are dropped (its next
                  registration, or the next event, sends again)

    Jitter (20 %) because after a ZooKeeper blip every sender and every broker's election retries
    at once."""

    election: RetryPolicy
    event: RetryPolicy
    send: RetryPolicy


def controller_retries(rpc_attempts_max: int, rpc_backoff_max_ms: int) -> ControllerRetries:
    """The controller's curves, capped at `rpc_backoff_max_ms` (an initial wait above it is the cap)."""
    if rpc_attempts_max < 1:
        raise ValueError(f"rpc_attempts_max must be >= 1, got {rpc_attempts_max}")

    def curve(initial_ms: int, retries: int | None) -> RetryPolicy:
        return RetryPolicy(initial_ms=min(initial_ms, rpc_backoff_max_ms), max_ms=rpc_backoff_max_ms,
                           multiplier=2.0, jitter=CONTROLLER_RETRY_JITTER, retries=retries)

    return ControllerRetries(election=curve(ELECTION_RETRY_INITIAL_MS, None),
                             event=curve(EVENT_RETRY_INITIAL_MS, None),
                             send=curve(SEND_RETRY_INITIAL_MS, rpc_attempts_max - 1))


class _Resign(Exception):
    pass


@dataclass
class _Channel:
    """Pending requests to one broker incarnation; requests are built from the view when sent."""

    reg: BrokerRegistration
    stop_delete: set[TP] = field(default_factory=set)
    stop_keep: set[TP] = field(default_factory=set)
    leader_and_isr: set[TP] = field(default_factory=set)
    update_metadata: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    def pending(self) -> bool:
        return bool(self.stop_delete or self.stop_keep or self.leader_and_isr or self.update_metadata)

    def clear(self) -> None:
        self.stop_delete.clear()
        self.stop_keep.clear()
        self.leader_and_isr.clear()
        self.update_metadata = False


_OfflineReport = tuple[int, int, dict[TP, str], list[TP], "asyncio.Future[None] | None"]


@dataclass
class _Term:
    """One period as the active controller."""

    epoch: int
    epoch_version: int
    core: ControllerState
    dirty: set[_Event] = field(default_factory=set)
    changed_topics: set[str] = field(default_factory=set)
    shutdowns: deque[tuple[int, int, asyncio.Future[list[TP]]]] = field(default_factory=deque)
    # (broker id, broker epoch, offline partitions with reasons, recovered partitions, waiter or None)
    offline_reports: deque[_OfflineReport] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    channels: dict[int, _Channel] = field(default_factory=dict)
    resign: bool = False
    failures: int = 0

    def mark(self, ev: _Event) -> None:
        self.dirty.add(ev)
        self.wake.set()

    def pop_next(self) -> _Event | None:
        if _Event.RESYNC in self.dirty:
            self.dirty -= _SUBSUMED_BY_RESYNC | {_Event.RESYNC}
            self.changed_topics.clear()
            return _Event.RESYNC
        if not self.dirty:
            return None
        ev = min(self.dirty)
        self.dirty.discard(ev)
        return ev


_T = TypeVar("_T")


class Controller:
    """The I/O shell around `ControllerState`; one per broker, on the broker's event loop.

    `run()` loops: try to win the election; if another broker holds /controller, wait (watch,
    bounded) until it goes and retry; when won, work the event queue until resigning (session LOST,
    /controller no longer ours, a fenced write, `stop()`). SUSPENDED pauses the queue and the senders;
    CONNECTED after it re-reads everything (kazoo drops watches when the connection drops).
    """

    def __init__(self, broker_id: int, store: ZkStore, rpc: ControllerRpc,
                 loop: asyncio.AbstractEventLoop | None = None, *, preferred_check_interval_s: float = 10.0,
                 rpc_timeout_s: float = 10.0, rpc_attempts_max: int = 30, rpc_backoff_max_s: float = 2.0,
                 election_recheck_s: float = 5.0, shutdown_timeout_s: float = 30.0,
                 executor: Executor | None = None, rng: random.Random | None = None,
                 leader_rebalance_max_moves: int = 0) -> None:
        self.broker_id = broker_id
        self._store = store
        self._rpc = rpc
        self._loop = loop
        self._preferred_check_interval_s = preferred_check_interval_s
        self._leader_rebalance_max_moves = leader_rebalance_max_moves  # per preferred check; 0: off
        self._rpc_timeout_s = rpc_timeout_s
        self._retries = controller_retries(rpc_attempts_max, round(rpc_backoff_max_s * 1000))
        self._rng = rng or random.Random()  # the retries' jitter
        self._election_recheck_s = election_recheck_s
        self._shutdown_timeout_s = shutdown_timeout_s
        self._executor = executor  # for blocking ZooKeeper calls; None: the loop's default executor
        self._term: _Term | None = None
        self._stopping = False
        self._connected: asyncio.Event | None = None
        self._election_wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._run_task: asyncio.Task[Any] | None = None

    # ---------------------------------------------------------------- public

    @property
    def is_active(self) -> bool:
        return self._term is not None and not self._term.resign

    @property
    def controller_epoch(self) -> int:
        """The epoch of the current term, -1 when not the controller."""
        return self._term.epoch if self._term is not None else -1

    @property
    def state(self) -> ControllerState | None:
        """The active view (read-only use), None when not the controller."""
        return self._term.core if self._term is not None else None

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._run_task = asyncio.current_task()
        self._connected = asyncio.Event()
        self._election_wake = asyncio.Event()
        self._done = asyncio.Event()
        if self._store.connected:
            self._connected.set()
        listener = self._on_zk_state_threadsafe
        self._store.add_state_listener(listener)
        failures = 0
        try:
            while not self._stopping:
                if not self._connected.is_set():
                    await self._wait(self._connected, self._election_recheck_s)
                    continue
                try:
                    self._election_wake.clear()
                    won = await self._zk(self._store.try_elect_controller, self.broker_id)
                    if won is None:
                        holder = await self._zk(self._store.controller_id, self._watch_controller)
                        failures = 0
                        if holder is not None:
                            await self._wait(self._election_wake, self._election_recheck_s)
                        continue
                except Exception as e:
                    failures += 1
                    log.warning("controller election attempt failed: %r", e)
                    await self._sleep(self._retry_wait_s(self._retries.election, failures))
                    continue
                failures = 0
                await self._serve_term(*won)
        finally:
            self._store.remove_state_listener(listener)
            self._done.set()

    async def stop(self, timeout_s: float = 15.0) -> None:
        """Resign (deleting /controller if ours, for a fast hand-over) and end `run()`."""
        self._stopping = True
        if self._term is not None:
            self._term.wake.set()
        for ev in (self._election_wake, self._connected):
            if ev is not None:
                ev.set()
        if self._done is not None and self._run_task is not None and self._run_task is not asyncio.current_task():
            try:
                await asyncio.wait_for(self._done.wait(), timeout_s)
            except TimeoutError:
                log.warning("controller did not stop within %.1fs; cancelling it", timeout_s)
                self._run_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._run_task

    async def controlled_shutdown(self, broker_id: int, broker_epoch: int) -> list[TP]:
        """Move leadership off `broker_id`; returns the partitions it still leads. NotControllerError
        if this broker is not the active controller (or stops being it meanwhile)."""
        term = self._term
        if term is None or term.resign or self._stopping or self._loop is None:
            raise NotControllerError(f"broker {self.broker_id} is not the controller")
        if len(term.shutdowns) >= _SHUTDOWN_REQUESTS_MAX:
            raise RequestTimedOutError("too many controlled shutdowns pending")
        fut: asyncio.Future[list[TP]] = self._loop.create_future()
        term.shutdowns.append((broker_id, broker_epoch, fut))
        term.mark(_Event.CONTROLLED_SHUTDOWN)
        try:
            return await asyncio.wait_for(fut, self._shutdown_timeout_s)
        except TimeoutError:
            raise RequestTimedOutError(f"controlled shutdown of broker {broker_id} timed out") from None

    async def report_offline_replicas(self, broker_id: int, broker_epoch: int, offline: dict[TP, str],
                                      recovered: list[TP]) -> None:
        """A broker's copies of `offline` are bad, of `recovered` healthy again (see the module doc).
        Returns once the controller has acted on it; NotControllerError if not the controller."""
        term = self._term
        if term is None or term.resign or self._stopping or self._loop is None:
            raise NotControllerError(f"broker {self.broker_id} is not the controller")
        if len(term.offline_reports) >= _OFFLINE_REPORTS_MAX:
            raise RequestTimedOutError("too many offline-replica reports pending")
        fut: asyncio.Future[None] = self._loop.create_future()
        term.offline_reports.append((broker_id, broker_epoch, dict(offline), list(recovered), fut))
        term.mark(_Event.OFFLINE_REPLICAS)
        try:
            await asyncio.wait_for(fut, self._shutdown_timeout_s)
        except TimeoutError:
            raise RequestTimedOutError(f"offline-replica report of broker {broker_id} timed out") from None

    # ---------------------------------------------------------------- kazoo threads -> loop

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing
            loop.call_soon_threadsafe(fn, *args)

    def _on_zk_state_threadsafe(self, state: str) -> None:
        self._call_soon(self._on_zk_state, state)

    def _on_zk_state(self, state: str) -> None:
        assert self._connected is not None and self._election_wake is not None
        term = self._term
        if state == "CONNECTED":
            self._connected.set()
            self._election_wake.set()
            if term is not None:
                term.mark(_Event.RESYNC)  # kazoo dropped our watches while SUSPENDED
                for ch in term.channels.values():
                    ch.wake.set()
        elif state == "SUSPENDED":
            log.warning("ZooKeeper connection suspended: controller %d pauses", self.broker_id)
            self._connected.clear()
        elif state == "LOST":
            self._connected.clear()
            if term is not None:
                log.warning("ZooKeeper session lost: controller %d resigns (epoch %d)", self.broker_id, term.epoch)
                term.resign = True
                term.wake.set()

    def _signal(self, ev: _Event, event: Any, topic: str | None = None) -> None:
        """On the loop: a watch fired."""
        if self._election_wake is not None and ev is _Event.CONTROLLER_CHANGE:
            self._election_wake.set()
        term = self._term
        if term is None:
            return
        if getattr(event, "type", None) == "NONE":  # connection dropped: every watch is gone
            term.mark(_Event.RESYNC)
            return
        if topic is not None:
            term.changed_topics.add(topic)
        term.mark(ev)

    def _watch_controller(self, event: Any) -> None:
        self._call_soon(self._signal, _Event.CONTROLLER_CHANGE, event)

    def _watch_brokers(self, event: Any) -> None:
        self._call_soon(self._signal, _Event.BROKER_CHANGE, event)

    def _watch_topics(self, event: Any) -> None:
        self._call_soon(self._signal, _Event.TOPIC_CHANGE, event)

    def _watch_topic_data(self, event: Any) -> None:
        path = getattr(event, "path", None) or ""
        topic = path.rsplit("/", 1)[-1] if path.startswith("/topics/") else None
        ev = _Event.TOPIC_CHANGE if getattr(event, "type", None) == "DELETED" else _Event.PARTITION_CHANGE
        self._call_soon(self._signal, ev, event, topic)

    def _watch_deletions(self, event: Any) -> None:
        self._call_soon(self._signal, _Event.TOPIC_DELETION, event)

    def _watch_isr(self, event: Any) -> None:
        self._call_soon(self._signal, _Event.ISR_CHANGE, event)

    def _watch_reassign(self, event: Any) -> None:
        self._call_soon(self._signal, _Event.REASSIGNMENT, event)

    # ---------------------------------------------------------------- helpers

    async def _wait(self, ev: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), timeout_s)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, cut short by stop()."""
        ev = self._election_wake
        if ev is None:
            await asyncio.sleep(seconds)
            return
        ev.clear()
        await self._wait(ev, seconds)

    def _retry_wait_s(self, policy: RetryPolicy, failures: int) -> float:
        """The wait after `failures` failures under an unbounded `policy`."""
        wait_ms = policy.delay_ms(failures, self._rng)
        assert wait_ms is not None  # no attempt bound
        return wait_ms / 1000

    async def _zk(self, fn: Callable[..., _T], *args: Any) -> _T:
        """A blocking ZooKeeper call, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    # ---------------------------------------------------------------- a term as controller

    async def _serve_term(self, epoch: int, epoch_version: int) -> None:
        term = _Term(epoch, epoch_version, ControllerState(self.broker_id, epoch))
        term.mark(_Event.RESYNC)
        self._term = term
        log.info("broker %d is the controller, epoch %d", self.broker_id, epoch)
        timer = asyncio.create_task(self._preferred_timer(term), name="controller-preferred-check")
        fenced = False
        try:
            while not self._stopping and not term.resign:
                assert self._connected is not None
                if not self._connected.is_set():
                    await self._wait(self._connected, 1.0)
                    continue
                ev = term.pop_next()
                if ev is None:
                    term.wake.clear()
                    if not term.dirty and not term.resign and not self._stopping:
                        await term.wake.wait()
                    continue
                try:
                    await self._handle(term, ev)
                    term.failures = 0
                except ControllerFencedError as e:
                    log.warning("controller %d fenced (epoch %d): %s", self.broker_id, epoch, e)
                    fenced = True
                    break
                except _Resign:
                    break
                except Exception as e:
                    term.failures += 1
                    log.warning("controller event %s failed (%r); re-reading everything", ev.name, e,
                                exc_info=term.failures == 1)
                    term.mark(_Event.RESYNC)
                    if term.shutdowns:
                        term.mark(_Event.CONTROLLED_SHUTDOWN)
                    if term.offline_reports:
                        term.mark(_Event.OFFLINE_REPLICAS)
                    await asyncio.sleep(self._retry_wait_s(self._retries.event, term.failures))
        finally:
            term.resign = True
            self._term = None
            timer.cancel()
            for ch in term.channels.values():
                if ch.task is not None:
                    ch.task.cancel()
            tasks = [t for t in (timer, *(ch.task for ch in term.channels.values())) if t is not None]
            await asyncio.gather(*tasks, return_exceptions=True)
            for _, _, fut in term.shutdowns:
                if not fut.done():
                    fut.set_exception(NotControllerError(f"broker {self.broker_id} resigned as controller"))
            for *_, waiter in term.offline_reports:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(NotControllerError(f"broker {self.broker_id} resigned as controller"))
            if (self._stopping or fenced) and self._store.connected:  # a fenced holder lets go too
                try:
                    await asyncio.wait_for(self._zk(self._store.resign_controller, self.broker_id), 5.0)
                except Exception as e:
                    log.warning("could not delete /controller: %r", e)
            log.info("broker %d is no longer the controller (epoch %d)", self.broker_id, epoch)

    async def _preferred_timer(self, term: _Term) -> None:
        while not term.resign:
            await asyncio.sleep(self._preferred_check_interval_s)
            term.mark(_Event.PREFERRED_CHECK)

    async def _handle(self, term: _Term, ev: _Event) -> None:
        store = self._store
        core = term.core
        if ev is _Event.RESYNC:
            await self._resync(term)
        elif ev is _Event.CONTROLLER_CHANGE:
            holder = await self._zk(store.controller_id, self._watch_controller)
            if holder != self.broker_id:
                log.warning("/controller is now %s: controller %d resigns", holder, self.broker_id)
                raise _Resign()
        elif ev is _Event.BROKER_CHANGE:
            live = await self._zk(store.live_brokers, self._watch_brokers)
            actions = core.on_broker_change(live)
            self._sync_channels(term)
            await self._execute(term, actions)
        elif ev is _Event.TOPIC_CHANGE:
            present = set(await self._zk(store.topic_names, self._watch_topics))
            removed = set(core.topics) - present - core.deleting
            new = sorted(present - set(core.topics))
            specs, states = await self._zk(self._read_topics, new)
            if specs or removed:
                await self._execute(term, core.on_topics_changed(specs, states, removed))
        elif ev is _Event.PARTITION_CHANGE:
            topics = sorted(term.changed_topics)
            term.changed_topics.clear()
            specs, states = await self._zk(self._read_topics, topics)
            gone = [t for t in topics if t not in specs and t in core.topics and t not in core.deleting]
            await self._execute(term, core.on_topics_changed(specs, states, gone))
        elif ev is _Event.TOPIC_DELETION:
            marked = await self._zk(store.topics_to_delete, self._watch_deletions)
            await self._execute(term, core.on_delete_requests(marked))
        elif ev is _Event.ISR_CHANGE:
            notes = await self._zk(store.isr_change_notifications, self._watch_isr)
            if len(notes) > _ISR_NOTIFICATIONS_PER_ROUND_MAX:
                notes = notes[:_ISR_NOTIFICATIONS_PER_ROUND_MAX]
                term.mark(_Event.ISR_CHANGE)
            tps = sorted({tp for _, tps in notes for tp in tps if tp[0] in core.topics})
            fresh = await self._zk(store.get_partition_states_of, tps)
            await self._execute(term, core.on_isr_change(fresh))
            await self._zk(store.delete_isr_change_notifications, [n for n, _ in notes])
        elif ev is _Event.REASSIGNMENT:
            targets, throttles = await self._zk(store.reassignments_with_throttles, self._watch_reassign)
            await self._execute(term, core.on_reassignments(targets, throttles))
        elif ev is _Event.CONTROLLED_SHUTDOWN:
            while term.shutdowns:
                broker_id, broker_epoch, fut = term.shutdowns.popleft()
                if fut.done():
                    continue
                try:
                    actions = core.on_controlled_shutdown(broker_id, broker_epoch)
                except BrokerError as e:
                    fut.set_exception(e)
                    continue
                try:
                    await self._execute(term, actions)
                except (ControllerFencedError, _Resign):
                    raise
                except Exception as e:
                    fut.set_exception(RequestTimedOutError(f"controlled shutdown of broker {broker_id}: {e!r}"))
                    raise
                if not fut.done():
                    remaining = core.partitions_led_by(broker_id)
                    log.info("controlled shutdown of broker %d: %d partitions remain led by it",
                             broker_id, len(remaining))
                    fut.set_result(remaining)
        elif ev is _Event.OFFLINE_REPLICAS:
            await self._handle_offline_reports(term)
        elif ev is _Event.PREFERRED_CHECK:
            await self._execute(term, core.on_preferred_check())
            if self._leader_rebalance_max_moves > 0:
                await self._execute(term, core.on_leader_rebalance_check(self._leader_rebalance_max_moves))

    async def _handle_offline_reports(self, term: _Term) -> None:
        while term.offline_reports:
            broker_id, broker_epoch, offline, recovered, fut = term.offline_reports.popleft()
            if fut is not None and fut.done():
                continue
            try:
                actions = term.core.on_offline_replicas(broker_id, broker_epoch, offline, recovered)
            except BrokerError as e:
                if fut is not None:
                    fut.set_exception(e)
                else:
                    log.info("offline replicas of broker %d dropped: %s", broker_id, e)
                continue
            try:
                await self._execute(term, actions)
            except Exception as e:
                if fut is not None and not fut.done():
                    fut.set_exception(RequestTimedOutError(f"offline replicas of broker {broker_id}: {e!r}"))
                raise
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _read_topics(self, names: list[str]) -> tuple[dict[str, TopicSpec], dict[TP, PartitionStateData]]:
        """(On a worker thread.) Topics with a data watch each, and their state znodes."""
        specs = self._store.get_topics(names, self._watch_topic_data)
        states: dict[TP, PartitionStateData] = {}
        for name in specs:
            for p, st in self._store.get_partition_states(name).items():
                states[(name, p)] = st
        return specs, states

    def _read_everything(self) -> tuple[Any, ...]:
        """(On a worker thread.) The whole cluster, with every watch the controller needs."""
        store = self._store
        holder = store.controller_id(self._watch_controller)
        live = store.live_brokers(self._watch_brokers)
        names = store.topic_names(self._watch_topics)
        specs, states = self._read_topics(names)
        deleting = store.topics_to_delete(self._watch_deletions)
        reassignments = store.reassignments_with_throttles(self._watch_reassign)  # (targets, throttles)
        notes = store.isr_change_notifications(self._watch_isr)
        return holder, live, specs, states, deleting, reassignments, notes

    async def _resync(self, term: _Term) -> None:
        holder, live, specs, states, deleting, reassignments, notes = await self._zk(self._read_everything)
        if holder != self.broker_id:
            log.warning("/controller is %s, not us: controller %d resigns", holder, self.broker_id)
            raise _Resign()
        old = term.core
        core = ControllerState(self.broker_id, term.epoch)
        keep_shutting = {b for b in old.shutting_down if b in live and old.live.get(b) == live[b]}
        for tp, marks in old.offline_replicas.items():  # a broker's word stands while it stays registered
            kept = {b for b in marks if b in live and old.live.get(b) == live[b]}
            if kept:
                core.offline_replicas[tp] = kept
        targets, throttles = reassignments
        core.reassign_throttles = {tp: r for tp, r in throttles.items() if tp in targets}
        actions = core.on_startup(live, specs, states, deleting, targets, keep_shutting)
        term.core = core
        self._sync_channels(term)
        await self._execute(term, actions)
        await self._zk(self._store.delete_isr_change_notifications, [n for n, _ in notes])

    # ---------------------------------------------------------------- executing actions

    async def _execute(self, term: _Term, actions: list[Action]) -> None:
        queue: deque[Action] = deque(actions)
        store = self._store
        try:
            while queue:
                if term.resign:  # session lost mid-event: stop acting now
                    raise _Resign()
                a = queue.popleft()
                core = term.core
                if isinstance(a, WriteStates):
                    results = await self._zk(store.controller_write, term.epoch_version, a.creates, a.updates)
                    queue.extend(core.on_states_written(results, a.attempt))
                elif isinstance(a, ReloadStates):
                    fresh = await self._zk(store.get_partition_states_of, sorted(a.partitions))
                    queue.extend(core.on_states_reloaded(fresh, a.attempt))
                elif isinstance(a, WriteAssignment):
                    ok = await self._zk(store.controller_update_assignment, term.epoch_version, a.topic,
                                        a.partition, list(a.replicas), list(a.adding), list(a.removing))
                    if not ok:
                        log.warning("could not set replicas of %s-%d: partition gone", a.topic, a.partition)
                elif isinstance(a, DeleteTopic):
                    await self._zk(store.delete_topic_completely, term.epoch_version, a.name)
                    queue.extend(core.on_topic_deleted(a.name))
                elif isinstance(a, FinishReassignment):
                    await self._zk(store.finish_reassignment, term.epoch_version, a.topic, a.partition)
                elif isinstance(a, SendLeaderAndIsr):
                    ch = term.channels.get(a.broker_id)
                    if ch is not None:
                        ch.leader_and_isr |= a.partitions
                elif isinstance(a, SendStopReplica):
                    ch = term.channels.get(a.broker_id)
                    if ch is not None:
                        (ch.stop_delete if a.delete else ch.stop_keep).update(a.partitions)
                elif isinstance(a, SendUpdateMetadata):
                    for ch in term.channels.values():
                        ch.update_metadata = True
        finally:
            for ch in term.channels.values():  # flush: the senders build requests from the view now
                if ch.pending():
                    ch.wake.set()

    def _sync_channels(self, term: _Term) -> None:
        """One sender per live broker incarnation; a gone (or re-registered) broker's requests drop."""
        live = term.core.live
        for b in list(term.channels):
            ch = term.channels[b]
            if b not in live or live[b].epoch != ch.reg.epoch:
                if ch.task is not None:
                    ch.task.cancel()
                del term.channels[b]
        for b, reg in live.items():
            if b not in term.channels:
                ch = _Channel(reg)
                ch.task = asyncio.create_task(self._sender(term, ch), name=f"controller-sender-{b}")
                term.channels[b] = ch

    async def _sender(self, term: _Term, ch: _Channel) -> None:
        backoff = self._retries.send.start(rng=self._rng)
        while not term.resign:
            await ch.wake.wait()
            ch.wake.clear()
            while ch.pending() and not term.resign:
                assert self._connected is not None
                if not self._connected.is_set():
                    await self._connected.wait()
                    continue
                ok = await self._send_next(term, ch)
                if ok:
                    backoff.succeeded()
                    continue
                wait_ms = backoff.failed()
                if wait_ms is None:
                    log.error("dropping requests to broker %d after %d failed attempts", ch.reg.broker_id,
                              backoff.failures)
                    ch.clear()
                    backoff.succeeded()
                    break
                await asyncio.sleep(wait_ms / 1000)

    async def _send_next(self, term: _Term, ch: _Channel) -> bool:
        """Send the next pending request (stops, then LeaderAndIsr, then UpdateMetadata). False when
        it should be retried (the pending work is put back)."""
        core = term.core
        reg = ch.reg
        if ch.stop_delete or ch.stop_keep:
            delete = bool(ch.stop_delete)
            tps = ch.stop_delete if delete else ch.stop_keep
            taken = set(tps)
            tps.clear()
            req_s = core.stop_replica_request(reg.broker_id, taken, delete)
            if req_s is None:
                return True
            ok = await self._call("StopReplica", reg, self._rpc.stop_replica(reg, req_s))
            if not ok:
                (ch.stop_delete if delete else ch.stop_keep).update(taken)
            return ok
        if ch.leader_and_isr:
            taken = set(ch.leader_and_isr)
            ch.leader_and_isr.clear()
            req_l = core.leader_and_isr_request(reg.broker_id, taken)
            if req_l is None:
                return True
            answers: list[pb.LeaderAndIsrResponse] = []
            ok = await self._call("LeaderAndIsr", reg, self._answer_into(self._rpc.leader_and_isr(reg, req_l), answers))
            if not ok:
                ch.leader_and_isr |= taken
            elif answers:
                self._note_storage_errors(term, reg, answers[0])
            return ok
        ch.update_metadata = False
        ok = await self._call("UpdateMetadata", reg, self._rpc.update_metadata(reg, core.update_metadata_request()))
        if not ok:
            ch.update_metadata = True
        return ok

    @staticmethod
    async def _answer_into(call: Any, answers: list[Any]) -> Any:
        resp = await call
        answers.append(resp)
        return resp

    def _note_storage_errors(self, term: _Term, reg: BrokerRegistration, resp: pb.LeaderAndIsrResponse) -> None:
        """KAFKA_STORAGE_ERROR for a partition in a LeaderAndIsr answer: that replica is offline on
        the broker (as Kafka learns offline replicas): an event, as if the broker had reported it."""
        if resp.error_code != pb.NONE:
            return
        offline = {(r.topic, r.partition): r.error_message for r in resp.results
                   if r.error_code == pb.KAFKA_STORAGE_ERROR}
        if offline and len(term.offline_reports) < _OFFLINE_REPORTS_MAX:
            term.offline_reports.append((reg.broker_id, reg.epoch, offline, [], None))
            term.mark(_Event.OFFLINE_REPLICAS)

    async def _call(self, what: str, reg: BrokerRegistration, call: Any) -> bool:
        """True when done (success, or an answer that retrying cannot fix)."""
        try:
            resp = await asyncio.wait_for(call, self._rpc_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.info("%s to broker %d failed: %r; will retry", what, reg.broker_id, e)
            return False
        code = resp.error_code
        if code == pb.NONE:
            for r in getattr(resp, "results", ()):
                if r.error_code != pb.NONE:  # e.g. a state the leader has already moved past
                    log.info("%s to broker %d: %s-%d: %s %s", what, reg.broker_id, r.topic, r.partition,
                                pb.ErrorCode.Name(r.error_code), r.error_message)
            return True
        if code == pb.STALE_BROKER_EPOCH:
            log.info("%s to broker %d: stale broker epoch %d (it re-registered); dropped", what, reg.broker_id,
                     reg.epoch)
            return True
        if code == pb.STALE_CONTROLLER_EPOCH:
            log.warning("%s to broker %d: our controller epoch is stale; checking /controller", what, reg.broker_id)
            term = self._term
            if term is not None:
                term.mark(_Event.CONTROLLER_CHANGE)
            return True
        log.info("%s to broker %d: %s %s; will retry", what, reg.broker_id, pb.ErrorCode.Name(code),
                 resp.error_message)
        return False
