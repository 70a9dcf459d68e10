"""The controller's decision core, driven event by event against a simulated ZooKeeper (no I/O)."""

from __future__ import annotations

import copy
import json
from collections import deque

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logbroker.cluster.controller import (
    STATE_WRITE_ATTEMPTS_MAX,
    Action,
    ControllerState,
    DeleteTopic,
    FinishReassignment,
    ReloadStates,
    SendLeaderAndIsr,
    SendStopReplica,
    SendUpdateMetadata,
    WriteAssignment,
    WriteStates,
)
from logbroker.cluster.metadata import BrokerRegistration, PartitionStateData, TopicSpec
from logbroker.errors import BrokerNotAvailableError, StaleBrokerEpochError
from logbroker.v1 import logbroker_pb2 as pb

TP = tuple[str, int]


def reg(b: int, epoch: int) -> BrokerRegistration:
    return BrokerRegistration(b, "127.0.0.1", 9000 + b, "", epoch)


class Sim:
    """ZooKeeper's partition states and topics, as far as the core's actions touch them.

    Checks, on every write, the invariants that must hold whatever the controller does: leader epochs
    never go backwards, a new leader was in the previous ISR (no unclean election), a leader is in its
    ISR, the controller never grows an ISR.
    """

    def __init__(self, core: ControllerState) -> None:
        self.core = core
        self.zk: dict[TP, PartitionStateData] = {}
        self.topics: dict[str, TopicSpec] = {}
        self.sent: list[Action] = []
        self.finished: list[TP] = []
        self.deleted: list[str] = []
        self.assignments: list[WriteAssignment] = []
        self.conflict_next: set[TP] = set()  # the next update of these conflicts (a leader wrote first)
        self.epoch_seq = 100

    # -- events from the outside world

    def add_topic(self, name: str, assignment: dict[int, list[int]], config: dict[str, str] | None = None) -> None:
        spec = TopicSpec(name, {p: list(r) for p, r in assignment.items()}, config or {"min_insync_replicas": "1"})
        self.topics[name] = spec
        self.run(self.core.on_topics_changed({name: copy.deepcopy(spec)}, {}))

    def brokers(self, *ids: int, bounce: tuple[int, ...] = ()) -> None:
        live = {}
        for b in ids:
            old = self.core.live.get(b)
            if old is None or b in bounce:
                self.epoch_seq += 1
                live[b] = reg(b, self.epoch_seq)
            else:
                live[b] = old
        self.run(self.core.on_broker_change(live))

    def leader_sets_isr(self, tp: TP, isr: list[int]) -> None:
        """The leader's own ISR write (conditional on its version) + a notification."""
        cur = self.zk[tp]
        assert cur.leader != -1 and cur.leader in isr
        new = PartitionStateData(cur.leader, cur.leader_epoch, list(isr), cur.controller_epoch, cur.zk_version + 1)
        self.zk[tp] = new
        self.run(self.core.on_isr_change({tp: copy.deepcopy(new)}))

    # -- executing the core's actions

    def run(self, actions: list[Action]) -> None:
        queue = deque(actions)
        rounds = 0
        while queue:
            rounds += 1
            assert rounds < 10_000
            a = queue.popleft()
            if isinstance(a, WriteStates):
                queue.extend(self.core.on_states_written(self._write(a), a.attempt))
            elif isinstance(a, ReloadStates):
                fresh = {tp: copy.deepcopy(self.zk.get(tp)) for tp in a.partitions}
                queue.extend(self.core.on_states_reloaded(fresh, a.attempt))
            elif isinstance(a, WriteAssignment):
                self.assignments.append(a)
                self.topics[a.topic].assignment[a.partition] = list(a.replicas)
            elif isinstance(a, DeleteTopic):
                self.deleted.append(a.name)
                self.topics.pop(a.name, None)
                for tp in [tp for tp in self.zk if tp[0] == a.name]:
                    del self.zk[tp]
                queue.extend(self.core.on_topic_deleted(a.name))
            elif isinstance(a, FinishReassignment):
                self.finished.append((a.topic, a.partition))
            else:
                self.sent.append(a)

    def _write(self, a: WriteStates) -> dict[TP, PartitionStateData | None]:
        out: dict[TP, PartitionStateData | None] = {}
        for tp, new in a.creates.items():
            if tp in self.zk:
                out[tp] = None
                continue
            assert new.leader in new.isr and new.leader_epoch == 0
            assert set(new.isr) <= set(self.topics[tp[0]].assignment[tp[1]])
            self.zk[tp] = PartitionStateData(new.leader, 0, list(new.isr), new.controller_epoch, 0)
            out[tp] = copy.deepcopy(self.zk[tp])
        for tp, new in a.updates.items():
            cur = self.zk.get(tp)
            if tp in self.conflict_next and cur is not None:
                self.conflict_next.discard(tp)
                cur.zk_version += 1  # a concurrent leader write
            if cur is None or cur.zk_version != new.zk_version:
                out[tp] = None
                continue
            assert new.leader_epoch >= cur.leader_epoch, "leader epoch went backwards"
            if new.leader != cur.leader:
                assert new.leader_epoch > cur.leader_epoch, "leader changed without an epoch bump"
                assert new.leader == -1 or new.leader in cur.isr, f"unclean election of {new.leader} (isr {cur.isr})"
            assert set(new.isr) <= set(cur.isr), "the controller grew an ISR"
            assert new.leader == -1 or new.leader in new.isr
            if new.leader != -1:
                assert new.leader in self.core.live, "elected a dead broker"
            self.zk[tp] = PartitionStateData(new.leader, new.leader_epoch, list(new.isr), new.controller_epoch,
                                             cur.zk_version + 1)
            out[tp] = copy.deepcopy(self.zk[tp])
        return out

    # -- looking at what was sent

    def take_sent(self) -> list[Action]:
        sent, self.sent = self.sent, []
        return sent

    def lai(self, sent: list[Action]) -> dict[int, set[TP]]:
        out: dict[int, set[TP]] = {}
        for a in sent:
            if isinstance(a, SendLeaderAndIsr):
                out.setdefault(a.broker_id, set()).update(a.partitions)
        return out

    def stops(self, sent: list[Action]) -> list[SendStopReplica]:
        return [a for a in sent if isinstance(a, SendStopReplica)]


def cluster(*brokers: int, epoch: int = 5) -> Sim:
    core = ControllerState(controller_id=brokers[0] if brokers else 1, controller_epoch=epoch)
    sim = Sim(core)
    sim.run(core.on_startup({b: reg(b, 10 + b) for b in brokers}, {}, {}))
    sim.take_sent()
    return sim


def state(sim: Sim, tp: TP) -> tuple[int, int, list[int]]:
    s = sim.zk[tp]
    assert sim.core.states[tp].zk_version == s.zk_version  # the view follows ZooKeeper
    return s.leader, s.leader_epoch, s.isr


# ====================================================================================== scenarios


def test_new_topic_elects_first_live_replica_with_all_live_replicas_in_isr():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [2, 1, 3], 1: [3, 2, 1]})
    assert state(sim, ("t", 0)) == (2, 0, [2, 1, 3])
    assert state(sim, ("t", 1)) == (3, 0, [3, 2, 1])
    sent = sim.take_sent()
    assert sim.lai(sent) == {b: {("t", 0), ("t", 1)} for b in (1, 2, 3)}
    assert any(isinstance(a, SendUpdateMetadata) for a in sent)
    assert sim.core.states[("t", 0)].controller_epoch == 5


def test_new_partition_with_a_dead_first_replica_and_none_alive():
    sim = cluster(1, 2)
    sim.add_topic("t", {0: [3, 2, 1], 1: [3, 4]})
    assert state(sim, ("t", 0)) == (2, 0, [2, 1])
    assert ("t", 1) not in sim.zk  # nobody alive: no state yet
    sim.brokers(1, 2, 4)
    assert state(sim, ("t", 1)) == (4, 0, [4])


def test_leader_loss_elects_next_isr_member_with_epoch_bump():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.take_sent()
    sim.brokers(2, 3)  # 1 dies
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])
    sent = sim.take_sent()
    assert sim.lai(sent) == {2: {("t", 0)}, 3: {("t", 0)}}
    req = sim.core.leader_and_isr_request(3, {("t", 0)})
    assert req is not None and req.controller_epoch == 5 and req.broker_epoch == 13
    p = req.partitions[0]
    assert (p.leader, p.leader_epoch, list(p.isr), list(p.replicas)) == (2, 1, [2, 3], [1, 2, 3])
    assert json.loads(req.topic_configs_json["t"]) == {"min_insync_replicas": "1"}


def test_leader_loss_skips_live_replicas_outside_the_isr():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.leader_sets_isr(("t", 0), [1, 3])  # 2 fell behind
    sim.brokers(2, 3)
    assert state(sim, ("t", 0)) == (3, 1, [3])


def test_whole_isr_lost_means_offline_never_unclean_and_recovers_when_an_isr_member_returns():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.leader_sets_isr(("t", 0), [1])  # only the leader is in sync
    sim.brokers(2, 3)  # the leader dies: 2 and 3 are alive but out of sync
    assert state(sim, ("t", 0)) == (-1, 1, [1])  # ISR unchanged: who may lead again
    sim.brokers(3)
    assert state(sim, ("t", 0)) == (-1, 1, [1])  # nothing to do, no epoch churn
    sim.take_sent()
    sim.brokers(1, 2, 3)  # 1 comes back with a new epoch
    assert state(sim, ("t", 0)) == (1, 2, [1])
    sent = sim.take_sent()
    assert ("t", 0) in sim.lai(sent)[1]
    assert sim.core.leader_and_isr_request(1, {("t", 0)}).broker_epoch == sim.core.live[1].epoch


def test_follower_loss_shrinks_isr_without_epoch_bump_and_tells_the_leader():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    v0 = sim.zk[("t", 0)].zk_version
    sim.take_sent()
    sim.brokers(1, 2)  # follower 3 dies
    assert state(sim, ("t", 0)) == (1, 0, [1, 2])
    assert sim.zk[("t", 0)].zk_version == v0 + 1
    assert 1 in sim.lai(sim.take_sent())


def test_broker_return_gets_leader_and_isr_for_all_its_partitions_and_stays_follower():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3], 1: [2, 3, 1]})
    sim.brokers(2, 3)
    sim.take_sent()
    sim.brokers(1, 2, 3)
    sent = sim.take_sent()
    assert sim.lai(sent)[1] == {("t", 0), ("t", 1)}
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])  # not in the ISR yet: no preferred move


def test_preferred_leader_moves_back_once_in_isr():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.brokers(2, 3)
    sim.brokers(1, 2, 3)
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])
    sim.leader_sets_isr(("t", 0), [2, 3, 1])  # 1 caught up: the notification triggers the check
    assert state(sim, ("t", 0)) == (1, 2, [2, 3, 1])
    sim.run(sim.core.on_preferred_check())
    assert state(sim, ("t", 0)) == (1, 2, [2, 3, 1])  # stable


def test_periodic_preferred_check():
    sim = cluster(1, 2)
    sim.add_topic("t", {0: [1, 2]})
    sim.brokers(2)
    sim.brokers(1, 2)
    sim.zk[("t", 0)].isr = [2, 1]  # an ISR change whose notification was lost
    sim.zk[("t", 0)].zk_version += 1
    sim.run(sim.core.on_states_reloaded({("t", 0): copy.deepcopy(sim.zk[("t", 0)])}, 0))
    sim.run(sim.core.on_preferred_check())
    assert state(sim, ("t", 0)) == (1, 2, [2, 1])


def test_controlled_shutdown_moves_leadership_and_stops_followers():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3], 1: [2, 1, 3], 2: [1]})
    sim.take_sent()
    sim.run(sim.core.on_controlled_shutdown(1, sim.core.live[1].epoch))
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])
    assert state(sim, ("t", 1)) == (2, 0, [2, 3])
    assert state(sim, ("t", 2)) == (1, 0, [1])  # nobody else can lead it
    assert sim.core.partitions_led_by(1) == [("t", 2)]
    sent = sim.take_sent()
    stopped = set().union(*(a.partitions for a in sim.stops(sent) if a.broker_id == 1 and not a.delete))
    assert stopped == {("t", 0), ("t", 1)}
    assert not any(a.delete for a in sim.stops(sent))
    # the shutting-down broker hears no more LeaderAndIsr for partitions it only follows
    assert sim.core.leader_and_isr_request(1, {("t", 0), ("t", 1)}) is None
    assert sim.core.leader_and_isr_request(1, {("t", 2)}) is not None
    # the leader re-adds it (it caught up before stopping): the controller removes it again, once
    sim.leader_sets_isr(("t", 0), [2, 3, 1])
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])
    # a second request is idempotent; the broker then goes
    sim.run(sim.core.on_controlled_shutdown(1, sim.core.live[1].epoch))
    assert sim.core.partitions_led_by(1) == [("t", 2)]
    sim.brokers(2, 3)
    assert state(sim, ("t", 2)) == (-1, 1, [1])
    assert 1 not in sim.core.shutting_down


def test_controlled_shutdown_rejects_stale_and_unknown_brokers():
    sim = cluster(1, 2)
    with pytest.raises(StaleBrokerEpochError):
        sim.core.on_controlled_shutdown(1, 999)
    for skip in (0, -1):  # no epoch value skips the check (0 once did: anyone could shut a broker down)
        with pytest.raises(StaleBrokerEpochError):
            sim.core.on_controlled_shutdown(1, skip)
    assert 1 not in sim.core.shutting_down
    with pytest.raises(BrokerNotAvailableError):
        sim.core.on_controlled_shutdown(7, 1)


def test_shutting_down_broker_leads_only_as_a_last_resort():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [3, 1, 2]})
    sim.leader_sets_isr(("t", 0), [3, 1])
    sim.run(sim.core.on_controlled_shutdown(1, sim.core.live[1].epoch))
    assert state(sim, ("t", 0)) == (3, 0, [3])
    sim.zk[("t", 0)].isr = [3, 1]  # the leader had re-added 1 just before dying
    sim.zk[("t", 0)].zk_version += 1
    sim.run(sim.core.on_states_reloaded({("t", 0): copy.deepcopy(sim.zk[("t", 0)])}, 0))
    assert state(sim, ("t", 0)) == (3, 0, [3])
    sim.zk[("t", 0)].isr = [3, 1]
    sim.zk[("t", 0)].zk_version += 1
    sim.core.states[("t", 0)] = copy.deepcopy(sim.zk[("t", 0)])
    sim.brokers(1, 2)  # leader 3 dies; 1 is alive (shutting down) and in the ISR: better than offline
    assert state(sim, ("t", 0)) == (1, 1, [1])


def test_bounced_broker_loses_leadership_then_rejoins():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3], 1: [1]})
    sim.brokers(1, 2, 3, bounce=(1,))  # re-registered before we saw it go
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])
    assert state(sim, ("t", 1)) == (1, 2, [1])  # sole ISR member: offline, then back, two bumps
    assert sim.lai(sim.take_sent())[1] >= {("t", 0), ("t", 1)}


def test_version_conflict_rereads_and_decides_again():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.conflict_next.add(("t", 0))
    sim.brokers(2, 3)
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])


def test_endless_conflicts_give_up_after_bounded_attempts():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    writes = 0
    actions = sim.core.on_broker_change({2: sim.core.live[2], 3: sim.core.live[3]})
    queue = deque(actions)
    while queue:
        a = queue.popleft()
        if isinstance(a, WriteStates):
            writes += 1
            queue.extend(sim.core.on_states_written({tp: None for tp in a.updates}, a.attempt))
        elif isinstance(a, ReloadStates):
            queue.extend(sim.core.on_states_reloaded({tp: copy.deepcopy(sim.zk[tp]) for tp in a.partitions},
                                                     a.attempt))
    assert writes == STATE_WRITE_ATTEMPTS_MAX


def test_isr_change_with_newer_leader_epoch_from_zookeeper_is_taken():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    # ZooKeeper has moved on (e.g. written by a newer controller); the view follows, never goes back
    sim.zk[("t", 0)] = PartitionStateData(2, 7, [2, 3], 9, sim.zk[("t", 0)].zk_version + 3)
    sim.run(sim.core.on_isr_change({("t", 0): copy.deepcopy(sim.zk[("t", 0)])}))
    assert sim.core.states[("t", 0)].leader_epoch >= 7


def test_deletion_stops_replicas_and_forgets_the_topic():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2], 1: [2, 3]})
    sim.add_topic("u", {0: [1]})
    sim.take_sent()
    sim.brokers(1, 2)
    sim.take_sent()
    sim.run(sim.core.on_delete_requests(["t"]))
    sent = sim.take_sent()
    stops = {a.broker_id: a.partitions for a in sim.stops(sent)}
    assert stops == {1: {("t", 0)}, 2: {("t", 0), ("t", 1)}}
    assert all(a.delete for a in sim.stops(sent))
    assert sim.deleted == ["t"] and "t" not in sim.core.topics and not any(tp[0] == "t" for tp in sim.core.states)
    um = sim.core.update_metadata_request()
    assert list(um.deleted_topics) == ["t"] and {p.topic for p in um.partitions} == {"u"}
    sim.run(sim.core.on_delete_requests(["t"]))  # marker seen again while being removed: idempotent
    sim.add_topic("t", {0: [2]})  # re-created
    assert "t" not in sim.core.update_metadata_request().deleted_topics


def test_reassignment_adds_waits_for_isr_then_switches():
    sim = cluster(1, 2, 3, 4)
    sim.add_topic("t", {0: [1, 2]})
    sim.take_sent()
    sim.run(sim.core.on_reassignments({("t", 0): [3, 4]}))
    # phase 1: union, adding/removing, leader epoch bump so every replica learns the new set
    assert sim.assignments[-1] == WriteAssignment("t", 0, (3, 4, 1, 2), (3, 4), (1, 2))
    assert state(sim, ("t", 0)) == (1, 1, [1, 2])
    assert sim.lai(sim.take_sent()) == {b: {("t", 0)} for b in (1, 2, 3, 4)}
    p = sim.core.partition_state_pb(("t", 0))
    assert list(p.replicas) == [3, 4, 1, 2] and list(p.adding_replicas) == [3, 4]
    assert list(p.removing_replicas) == [1, 2]
    sim.run(sim.core.on_preferred_check())
    assert state(sim, ("t", 0)) == (1, 1, [1, 2])  # no preferred moves mid-reassignment
    sim.leader_sets_isr(("t", 0), [1, 2, 3])
    assert sim.finished == []  # 4 not caught up yet
    sim.leader_sets_isr(("t", 0), [1, 2, 3, 4])
    # phase 2: target only, leader from the target, old replicas stopped and deleted, request gone
    assert sim.assignments[-1] == WriteAssignment("t", 0, (3, 4), (), ())
    assert state(sim, ("t", 0)) == (3, 2, [3, 4])
    sent = sim.take_sent()
    assert {(a.broker_id, a.delete) for a in sim.stops(sent)} == {(1, True), (2, True)}
    assert sim.finished == [("t", 0)]
    assert sim.core.replicas(("t", 0)) == [3, 4] and not sim.core.reassign_targets
    assert sim.core.leader_and_isr_request(1, {("t", 0)}) is None


def test_a_reassignment_throttle_goes_to_the_adding_replicas_until_it_completes():
    sim = cluster(1, 2, 3, 4)
    sim.add_topic("t", {0: [1, 2], 1: [1, 2]})
    sim.take_sent()
    sim.run(sim.core.on_reassignments({("t", 0): [3, 2], ("t", 1): [4, 2]}, {("t", 0): 200_000, ("u", 0): 5}))
    assert sim.core.reassign_throttles == {("t", 0): 200_000}  # only requests that exist
    req = sim.core.leader_and_isr_request(3, {("t", 0)})
    assert req is not None
    (ps,) = req.partitions
    assert list(ps.adding_replicas) == [3] and ps.adding_throttle_bytes_per_sec == 200_000
    assert sim.core.partition_state_pb(("t", 1)).adding_throttle_bytes_per_sec == 0  # none asked
    sim.leader_sets_isr(("t", 0), [1, 2, 3])
    assert sim.finished == [("t", 0)]
    done = sim.core.partition_state_pb(("t", 0))
    assert not done.adding_replicas and done.adding_throttle_bytes_per_sec == 0
    assert ("t", 0) not in sim.core.reassign_throttles


def test_reassignment_within_the_isr_completes_at_once():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.run(sim.core.on_reassignments({("t", 0): [2, 3]}))
    assert state(sim, ("t", 0)) == (2, 1, [2, 3])
    assert sim.finished == [("t", 0)]
    assert [a.broker_id for a in sim.stops(sim.take_sent())] == [1]


def test_reassignment_to_the_same_set_reordered_finishes_at_once_and_the_preferred_check_moves_leadership():
    """The balancer's leadership move: nothing to copy; the new first replica leads from the next
    preferred check (controller.on_reassignments says why not at once)."""
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    assert state(sim, ("t", 0)) == (1, 0, [1, 2, 3])
    sim.take_sent()
    sim.run(sim.core.on_reassignments({("t", 0): [2, 1, 3]}))
    assert sim.assignments[-1] == WriteAssignment("t", 0, (2, 1, 3), (), ())
    assert sim.finished == [("t", 0)]
    assert sim.stops(sim.take_sent()) == []  # no replica goes
    assert state(sim, ("t", 0))[0] == 1
    sim.run(sim.core.on_preferred_check())
    assert state(sim, ("t", 0)) == (2, 2, [1, 2, 3])  # epoch: the finished reassignment, then the election


def test_leader_rebalance_check_spreads_piled_leaders_by_reordering_replicas():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {p: [1, 2, 3] for p in range(6)})
    sim.add_topic("u", {0: [1, 2]})
    sim.leader_sets_isr(("u", 0), [1])  # 2 is out of sync: u-0 cannot move
    assert {tp: state(sim, tp)[0] for tp in sim.zk} == {**{("t", p): 1 for p in range(6)}, ("u", 0): 1}
    sim.take_sent()
    sim.run(sim.core.on_leader_rebalance_check(max_moves=10))
    leaders = {tp: state(sim, tp)[0] for tp in sim.zk}
    assert leaders[("u", 0)] == 1
    counts = {b: sum(1 for v in leaders.values() if v == b) for b in (1, 2, 3)}
    assert counts == {1: 3, 2: 2, 3: 2}
    for tp, leader in leaders.items():
        assert sim.core.replicas(tp)[0] == leader  # the preferred leader leads
        assert sorted(sim.core.replicas(tp)) == sorted([1, 2, 3] if tp[0] == "t" else [1, 2])
    moved = [a for a in sim.assignments if a.replicas[0] != 1]
    assert len(moved) == 4
    assert sim.core.on_leader_rebalance_check(max_moves=10) == []  # balanced: nothing more
    assert sim.core.on_preferred_check() == []


def test_invalid_reassignments_are_dropped():
    sim = cluster(1, 2)
    sim.add_topic("t", {0: [1]})
    sim.run(sim.core.on_reassignments({("t", 0): [], ("t", 9): [1], ("x", 0): [1], ("t", 1): [1, 1]}))
    assert sorted(sim.finished) == [("t", 0), ("t", 1), ("t", 9), ("x", 0)]
    assert not sim.assignments


def test_reassignment_resumes_on_a_new_controller():
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1]})
    sim.run(sim.core.on_reassignments({("t", 0): [2]}))
    spec = copy.deepcopy(sim.topics["t"])
    spec.adding_replicas = {0: [2]}
    spec.removing_replicas = {0: [1]}
    new = ControllerState(controller_id=2, controller_epoch=6)
    sim2 = Sim(new)
    sim2.zk, sim2.topics = sim.zk, {"t": spec}
    sim2.run(new.on_startup(dict(sim.core.live), {"t": spec}, copy.deepcopy(sim.zk), (), {("t", 0): [2]}))
    assert state(sim2, ("t", 0)) == (1, 2, [1])  # epoch bumped again so the replicas hear of the set
    assert sim2.zk[("t", 0)].controller_epoch == 6
    sim2.leader_sets_isr(("t", 0), [1, 2])
    assert state(sim2, ("t", 0)) == (2, 3, [2])
    assert sim2.finished == [("t", 0)]


def test_startup_repairs_and_tells_everyone():
    core = ControllerState(controller_id=1, controller_epoch=3)
    sim = Sim(core)
    sim.topics = {"t": TopicSpec("t", {0: [1, 2], 1: [2, 3], 2: [3, 2]}, {})}
    sim.zk = {("t", 0): PartitionStateData(-1, 4, [1], 2, 7),   # offline, its ISR member is back
              ("t", 1): PartitionStateData(3, 2, [3, 2], 2, 1)}  # leader 3 is gone
    live = {1: reg(1, 50), 2: reg(2, 51)}
    sim.run(core.on_startup(live, copy.deepcopy(sim.topics), copy.deepcopy(sim.zk)))
    assert state(sim, ("t", 0)) == (1, 5, [1])
    assert state(sim, ("t", 1)) == (2, 3, [2])
    assert state(sim, ("t", 2)) == (2, 0, [2])  # no state yet: created
    sent = sim.take_sent()
    assert sim.lai(sent) == {1: {("t", 0)}, 2: {("t", 0), ("t", 1), ("t", 2)}}
    um = core.update_metadata_request()
    assert um.controller_epoch == 3 and [b.broker_id for b in um.brokers] == [1, 2]
    assert len(um.partitions) == 3


def test_update_metadata_lists_partitions_without_state_as_leaderless():
    sim = cluster(1)
    sim.add_topic("t", {0: [1], 1: [2]})
    parts = {p.partition: p for p in sim.core.update_metadata_request().partitions}
    assert (parts[0].leader, parts[1].leader, parts[1].leader_epoch) == (1, -1, -1)
    assert list(parts[1].replicas) == [2]


def test_stop_replica_request_carries_epochs():
    sim = cluster(1, 2)
    req = sim.core.stop_replica_request(2, {("t", 1), ("t", 0)}, delete=True)
    assert req is not None and req.broker_epoch == 12 and req.controller_epoch == 5 and req.delete_partitions
    assert [(p.topic, p.partition) for p in req.partitions] == [("t", 0), ("t", 1)]
    assert sim.core.stop_replica_request(9, {("t", 0)}, delete=False) is None
    assert isinstance(req, pb.StopReplicaRequest)


def test_partition_added_to_topic_gets_a_state():
    sim = cluster(1, 2)
    sim.add_topic("t", {0: [1, 2]})
    spec = copy.deepcopy(sim.topics["t"])
    spec.assignment[1] = [2, 1]
    sim.topics["t"] = spec
    sim.run(sim.core.on_topics_changed({"t": copy.deepcopy(spec)}, copy.deepcopy(sim.zk)))
    assert state(sim, ("t", 1)) == (2, 0, [2, 1])
    assert state(sim, ("t", 0)) == (1, 0, [1, 2])


# ====================================================================================== property


BROKERS = (1, 2, 3, 4)

event = st.one_of(
    st.tuples(st.just("down"), st.sampled_from(BROKERS)),
    st.tuples(st.just("up"), st.sampled_from(BROKERS)),
    st.tuples(st.just("bounce"), st.sampled_from(BROKERS)),
    st.tuples(st.just("shutdown"), st.sampled_from(BROKERS)),
    st.tuples(st.just("catch_up"), st.integers(0, 5)),
    st.tuples(st.just("lag"), st.integers(0, 5), st.sampled_from(BROKERS)),
    st.tuples(st.just("conflict"), st.integers(0, 5)),
    st.tuples(st.just("preferred"), st.just(0)),
    st.tuples(st.just("reassign"), st.integers(0, 5), st.permutations(BROKERS), st.integers(1, 3)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    assignments=st.lists(st.permutations(BROKERS).map(lambda p: p[:3]), min_size=1, max_size=6),
    events=st.lists(event, max_size=40),
)
def test_random_broker_churn_never_elects_outside_the_isr_nor_moves_epochs_back(assignments, events):
    """Sim._write asserts on every write: no unclean election, epochs monotonic, leader in ISR, the
    controller never grows an ISR, no dead leader."""
    sim = cluster(*BROKERS)
    sim.add_topic("t", {p: list(r) for p, r in enumerate(assignments)})
    parts = [("t", p) for p in range(len(assignments))]
    alive = set(BROKERS)
    for ev in events:
        kind = ev[0]
        if kind == "down":
            alive.discard(ev[1])
            sim.brokers(*sorted(alive))
        elif kind == "up":
            alive.add(ev[1])
            sim.brokers(*sorted(alive))
        elif kind == "bounce" and ev[1] in alive:
            sim.brokers(*sorted(alive), bounce=(ev[1],))
        elif kind == "shutdown" and ev[1] in alive:
            sim.run(sim.core.on_controlled_shutdown(ev[1], sim.core.live[ev[1]].epoch))
        elif kind in ("catch_up", "lag", "conflict", "reassign"):
            tp = parts[ev[1] % len(parts)]
            cur = sim.zk.get(tp)
            if kind == "conflict":
                sim.conflict_next.add(tp)
            elif kind == "reassign":
                sim.run(sim.core.on_reassignments({**{t: list(v) for t, v in sim.core.reassign_targets.items()},
                                                   tp: list(ev[2][:ev[3]])}))
            elif cur is None or cur.leader == -1 or cur.leader not in alive:
                continue
            elif kind == "catch_up":  # the leader adds its live, fetching followers
                fetching = [b for b in sim.core.replicas(tp) if b in alive and b not in sim.core.shutting_down]
                isr = cur.isr + [b for b in fetching if b not in cur.isr]
                if isr != cur.isr:
                    sim.leader_sets_isr(tp, isr)
            elif kind == "lag" and ev[2] in cur.isr and ev[2] != cur.leader:
                sim.leader_sets_isr(tp, [b for b in cur.isr if b != ev[2]])
        elif kind == "preferred":
            sim.run(sim.core.on_preferred_check())
        for tp, s in sim.zk.items():
            assert s.leader == -1 or s.leader in s.isr
            assert sim.core.states[tp].zk_version == s.zk_version
    # once every broker is back, every partition has a leader (or, if all its replicas are shutting
    # down, no state yet)
    sim.brokers(*BROKERS)
    for tp in parts:
        cur = sim.zk.get(tp)
        if cur is None:
            assert all(b in sim.core.shutting_down for b in sim.core.replicas(tp))
        else:
            assert cur.leader != -1, (tp, cur)


def test_controller_retries_a_leader_and_isr_refused_by_a_broker_still_registering():
    """The shell's sender to one broker: BROKER_NOT_AVAILABLE (the broker has not recorded the
    epoch the controller already saw in ZooKeeper) is retried with backoff until applied, while
    STALE_BROKER_EPOCH (an earlier incarnation's request) is dropped. No sockets, no ZooKeeper."""
    import asyncio

    from logbroker.cluster.controller import Controller, _Channel, _Term

    class Rpc:
        def __init__(self, answers: list[int]) -> None:
            self.answers = answers
            self.calls: list[pb.LeaderAndIsrRequest] = []

        async def leader_and_isr(self, broker, req):
            self.calls.append(req)
            code = self.answers.pop(0) if self.answers else pb.NONE
            return pb.LeaderAndIsrResponse(error_code=code)

    async def send(answers: list[int]) -> tuple[Rpc, _Channel]:
        core = ControllerState(0, 3)
        core.on_startup({1: reg(1, 42)}, {"t": TopicSpec("t", {0: [1]})}, {("t", 0): PartitionStateData(1, 0, [1], 3, 0)})
        rpc = Rpc(answers)
        controller = Controller(0, None, rpc, rpc_backoff_max_s=0.01, rpc_attempts_max=10)  # type: ignore[arg-type]
        controller._connected = asyncio.Event()
        controller._connected.set()
        term = _Term(3, 0, core)
        ch = _Channel(core.live[1])
        ch.leader_and_isr.add(("t", 0))
        ch.wake.set()
        task = asyncio.create_task(controller._sender(term, ch))
        for _ in range(500):
            if not ch.pending() and not rpc.answers:
                break
            await asyncio.sleep(0.01)
        term.resign = True
        ch.wake.set()
        await asyncio.wait_for(task, 5)
        return rpc, ch

    rpc, ch = asyncio.run(send([pb.BROKER_NOT_AVAILABLE] * 3))
    assert len(rpc.calls) == 4 and all(c.broker_epoch == 42 for c in rpc.calls) and not ch.pending()
    rpc, ch = asyncio.run(send([pb.STALE_BROKER_EPOCH]))
    assert len(rpc.calls) == 1 and not ch.pending()


def test_controller_retry_curves_are_capped_jittered_and_the_sends_bounded():
    """The controller's three curves on the one retry policy: election from 200 ms, event and send
    from 100 ms, all doubling to rpc_backoff_max; jitter only shortens; sends give up after
    rpc_attempts_max attempts, election and event retries do not (their loops end with the run/term)."""
    import random

    from logbroker.cluster.controller import CONTROLLER_RETRY_JITTER, controller_retries

    r = controller_retries(rpc_attempts_max=30, rpc_backoff_max_ms=2000)
    assert [r.election.base_ms(n) for n in range(1, 7)] == [200, 400, 800, 1600, 2000, 2000]
    assert [r.event.base_ms(n) for n in range(1, 7)] == [100, 200, 400, 800, 1600, 2000]
    assert [r.send.base_ms(n) for n in range(1, 7)] == [100, 200, 400, 800, 1600, 2000]
    rng = random.Random(14)
    for policy in (r.election, r.event, r.send):
        for failures in (1, 3, 6, 29):
            base = policy.base_ms(failures)
            waits = [policy.delay_ms(failures, rng) for _ in range(100)]
            assert all(w is not None and base * (1 - CONTROLLER_RETRY_JITTER) <= w <= base <= 2000 for w in waits)
    assert r.election.delay_ms(10**6, rng) is not None and r.event.delay_ms(10**6, rng) is not None
    backoff = r.send.start(rng=rng)
    assert all(backoff.failed() is not None for _ in range(29)) and backoff.failed() is None  # 30 attempts
    tiny = controller_retries(rpc_attempts_max=1, rpc_backoff_max_ms=10)  # the test knobs: initial waits capped
    assert tiny.election.base_ms(1) == tiny.send.base_ms(1) == 10 and tiny.send.delay_ms(1) is None
    with pytest.raises(ValueError):
        controller_retries(rpc_attempts_max=0, rpc_backoff_max_ms=10)


def test_controller_sender_drops_a_brokers_requests_after_rpc_attempts_max_failures():
    """A broker that keeps failing gets exactly rpc_attempts_max tries, then its pending requests go
    (the sender does not retry forever); a request queued after the drop gets a fresh budget. No sockets."""
    import asyncio
    import random

    from logbroker.cluster.controller import Controller, _Channel, _Term

    class Rpc:
        def __init__(self) -> None:
            self.calls = 0

        async def leader_and_isr(self, broker, req):
            self.calls += 1
            raise ConnectionError("unreachable")

    async def main() -> tuple[Rpc, _Channel, list[int]]:
        core = ControllerState(0, 3)
        core.on_startup({1: reg(1, 42)}, {"t": TopicSpec("t", {0: [1]})}, {("t", 0): PartitionStateData(1, 0, [1], 3, 0)})
        rpc = Rpc()
        controller = Controller(0, None, rpc, rpc_backoff_max_s=0.001, rpc_attempts_max=4,  # type: ignore[arg-type]
                                rng=random.Random(1))
        controller._connected = asyncio.Event()
        controller._connected.set()
        term = _Term(3, 0, core)
        ch = _Channel(core.live[1])
        drops: list[int] = []
        clear = ch.clear

        def dropped() -> None:  # the sender gave up: queue one more request once, then end the term
            clear()
            drops.append(rpc.calls)
            if len(drops) == 1:
                ch.leader_and_isr.add(("t", 0))
                ch.wake.set()
            else:
                term.resign = True

        ch.clear = dropped  # type: ignore[method-assign]
        ch.leader_and_isr.add(("t", 0))
        ch.wake.set()
        await asyncio.wait_for(controller._sender(term, ch), 10)
        return rpc, ch, drops

    rpc, ch, drops = asyncio.run(main())
    assert drops == [4, 8] and rpc.calls == 8 and not ch.pending()


def test_isr_expansion_naming_an_unregistered_broker_is_undone_once():
    """Leaders write ISR changes themselves; an expansion naming a broker that is not registered
    (KIP-841: a leader with stale metadata) is taken out by the controller in one write, and the
    leader hears of it (LeaderAndIsr) so it stops counting on that broker."""
    sim = cluster(1, 2, 3)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.brokers(1, 2)  # broker 3's session is gone
    assert state(sim, ("t", 0))[2] == [1, 2]
    sim.take_sent()
    version = sim.zk[("t", 0)].zk_version
    sim.leader_sets_isr(("t", 0), [1, 2, 3])
    assert state(sim, ("t", 0))[2] == [1, 2] and sim.zk[("t", 0)].zk_version == version + 2
    assert 1 in sim.lai(sim.take_sent())


# ====================================================================================== offline replicas


def report(sim: Sim, broker: int, tps: dict[TP, str], recovered: tuple[TP, ...] = ()) -> None:
    sim.run(sim.core.on_offline_replicas(broker, sim.core.live[broker].epoch, tps, recovered))


def test_offline_leader_hands_leadership_to_another_isr_member_and_leaves_the_isr():
    """A leader that reports its copy bad (scrubber, vanished log) stops leading at once: the next ISR
    member leads (epoch + 1), the reporter leaves the ISR and hears a LeaderAndIsr that makes it a
    follower; it may not lead again (preferred check, broker churn) until its leader re-admits it."""
    sim = cluster(1, 2, 3)
    tp = ("t", 0)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.take_sent()
    report(sim, 1, {tp: "corrupt batch at offset 40"})
    assert state(sim, tp) == (2, 1, [2, 3])
    assert sim.lai(sim.take_sent()) == {1: {tp}, 2: {tp}, 3: {tp}}
    sim.run(sim.core.on_preferred_check())
    sim.brokers(1, 2)  # 3 dies: 1 is live, preferred, but offline for t-0
    assert state(sim, tp) == (2, 1, [2])
    sim.leader_sets_isr(tp, [2, 1])  # it re-fetched and caught up: the leader re-admits it
    assert 1 not in sim.core.offline_replicas.get(tp, set())
    assert state(sim, tp) == (1, 2, [2, 1])  # and the preferred leader leads again


def test_offline_follower_leaves_the_isr_without_a_leader_epoch_bump():
    sim = cluster(1, 2, 3)
    tp = ("t", 0)
    sim.add_topic("t", {0: [1, 2, 3]})
    sim.conflict_next.add(tp)  # the leader writes the ISR at the same moment: decided again
    report(sim, 2, {tp: "corrupt batch at offset 7"})
    assert state(sim, tp) == (1, 0, [1, 3])
    sim.leader_sets_isr(tp, [1, 3, 2])
    assert state(sim, tp) == (1, 0, [1, 3, 2]) and sim.core.offline_replicas == {}


def test_offline_sole_isr_member_leaves_the_partition_leaderless_until_recovered():
    """No other ISR member: no leader at all (never unclean, never the replica that lost data), the
    ISR unchanged; the mark survives churn of other brokers and goes when the broker reports the
    replica recovered (topics recover-empty) or re-registers (it reports again if still bad)."""
    sim = cluster(1, 2)
    tp = ("t", 0)
    sim.add_topic("t", {0: [1, 2]})
    sim.leader_sets_isr(tp, [1])
    report(sim, 1, {tp: "log vanished"})
    assert state(sim, tp) == (-1, 1, [1])
    sim.brokers(1, 2, bounce=(2,))
    sim.run(sim.core.on_preferred_check())
    assert state(sim, tp) == (-1, 1, [1])
    report(sim, 1, {}, recovered=(tp,))
    assert state(sim, tp) == (1, 2, [1])
    report(sim, 1, {tp: "log vanished"})
    assert state(sim, tp) == (-1, 3, [1])
    sim.brokers(1, 2, bounce=(1,))  # a new incarnation: its word is gone with its registration
    assert state(sim, tp) == (1, 4, [1])


def test_offline_report_is_fenced_by_broker_epoch_and_ignores_foreign_partitions():
    sim = cluster(1, 2, 3)
    tp = ("t", 0)
    sim.add_topic("t", {0: [1, 2]})
    for epoch in (0, -1, 999):
        with pytest.raises(StaleBrokerEpochError):
            sim.core.on_offline_replicas(1, epoch, {tp: "x"})
    with pytest.raises(BrokerNotAvailableError):
        sim.core.on_offline_replicas(7, 1, {tp: "x"})
    report(sim, 3, {tp: "not a replica"}, recovered=(tp,))
    report(sim, 1, {("gone", 0): "no such topic"})
    assert state(sim, tp) == (1, 0, [1, 2]) and sim.core.offline_replicas == {}


def test_a_leader_and_isr_answered_with_kafka_storage_error_is_an_offline_report():
    """As Kafka learns offline replicas: a partition answered KAFKA_STORAGE_ERROR in a LeaderAndIsr
    response is queued as that broker's report (at the epoch the request was for)."""
    import asyncio

    from logbroker.cluster.controller import Controller, _Channel, _Event, _Term

    class Rpc:
        async def leader_and_isr(self, broker, req):
            resp = pb.LeaderAndIsrResponse()
            resp.results.add(topic="t", partition=0, error_code=pb.KAFKA_STORAGE_ERROR, error_message="vanished")
            resp.results.add(topic="t", partition=1)
            return resp

    async def send() -> _Term:
        core = ControllerState(0, 3)
        core.on_startup({1: reg(1, 42)}, {"t": TopicSpec("t", {0: [1], 1: [1]})},
                        {("t", p): PartitionStateData(1, 0, [1], 3, 0) for p in (0, 1)})
        controller = Controller(0, None, Rpc())  # type: ignore[arg-type]
        term = _Term(3, 0, core)
        ch = _Channel(core.live[1])
        ch.leader_and_isr.update({("t", 0), ("t", 1)})
        assert await controller._send_next(term, ch)
        return term

    term = asyncio.run(send())
    assert list(term.offline_reports) == [(1, 42, {("t", 0): "vanished"}, [], None)]
    assert _Event.OFFLINE_REPLICAS in term.dirty


def test_a_broker_registering_without_a_log_is_offline_there_before_any_election():
    """A registration names the logs the broker created that vanished (as KRaft's offline log dirs):
    the controller never elects it for them, not even for a moment, while another ISR member may
    return; a log of an older topic id (the topic was re-created) does not count."""
    sim = cluster(1, 2, 3)
    tp = ("t", 0)
    sim.add_topic("t", {0: [1, 2]})
    sim.core.topics["t"].topic_id = "a" * 32
    sim.brokers(3)  # 1 and 2 die together: leaderless, the ISR kept
    assert state(sim, tp) == (-1, 1, [1, 2])
    sim.epoch_seq += 1
    back = BrokerRegistration(1, "127.0.0.1", 9001, "", sim.epoch_seq, lost_replicas=(("t", 0, "a" * 32),))
    sim.run(sim.core.on_broker_change({3: sim.core.live[3], 1: back}))
    assert state(sim, tp) == (-1, 1, [1, 2])  # 1 is in the ISR but lost its log: still no leader
    sim.brokers(1, 2, 3)
    assert state(sim, tp) == (2, 2, [2])
    # an older incarnation's log, or a registration round trip
    stale = BrokerRegistration(1, "h", 1, "", 5, lost_replicas=(("t", 0, "b" * 32),))
    assert BrokerRegistration.from_json(1, stale.to_json(), 5) == stale
    sim.run(sim.core.on_broker_change({2: sim.core.live[2], 3: sim.core.live[3], 1: stale}))
    assert 1 not in sim.core.offline_replicas.get(tp, set())
