"""ReplicaManager without sockets: LeaderAndIsr fencing, produce with acks, follower reads driven by
hand (as the Fetch handler would call them), ISR shrink/expand through an in-memory ISR store."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from logbroker.clock import ManualClock
from logbroker.cluster.metadata import PartitionStateData
from logbroker.errors import (
    FencedLeaderEpochError,
    InvalidRequestError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    NotLeaderOrFollowerError,
    OffsetOutOfRangeError,
    RequestTimedOutError,
    StorageError,
    UnknownLeaderEpochError,
    UnknownTopicOrPartitionError,
)
from logbroker.replication.partition import Role
from logbroker.replication.replica_manager import (
    ISR_PROPOSAL_INTERVAL_MS,
    FetchRead,
    InMemoryIsrStore,
    ReplicaManager,
)
from logbroker.storage.log import LogConfig
from logbroker.storage.log_identity import LostLogError
from logbroker.storage.log_manager import LogManager
from logbroker.storage.record_batch import encode_batch
from logbroker.v1 import logbroker_pb2 as pb

LAG_MS = 1000
EPOCHS = {0: 100, 1: 101, 2: 102}  # broker epochs of the live brokers, as the controller sends them
ME = EPOCHS[0]  # this broker's (broker 0's) current epoch: what the controller's requests carry
SMALL = LogConfig(segment_bytes=1 << 16, index_map_bytes=4 << 20)


def batch(n: int = 1) -> bytes:
    return encode_batch([(1000 + i, None, b"value-%d" % i, None) for i in range(n)])


def release(fetched: FetchRead) -> None:
    """Release a read's view (an empty view may be shared: never release it)."""
    if len(fetched.records):
        fetched.records.release()


def run(coro_fn: Callable[[], Awaitable[Any]], timeout_s: float = 30) -> Any:
    async def main() -> Any:
        return await asyncio.wait_for(coro_fn(), timeout_s)
    return asyncio.run(main())


async def until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class Setup:
    def __init__(self, tmp: Path, broker_id: int = 0) -> None:
        self.clock = ManualClock()
        self.store = InMemoryIsrStore()
        self.log_manager = LogManager(tmp / f"b{broker_id}", SMALL)
        self.rm = ReplicaManager(broker_id, self.log_manager, self.store, self.clock, replica_lag_time_max_ms=LAG_MS)

    def close(self) -> None:
        self.log_manager.close_all()


@pytest.fixture
def setup(tmp_path: Path):
    s = Setup(tmp_path)
    yield s
    s.close()


def live(epochs: dict[int, int] | None = None) -> list[pb.BrokerInfo]:
    return [pb.BrokerInfo(broker_id=b, host="127.0.0.1", port=9000 + b, broker_epoch=e)
            for b, e in sorted((EPOCHS if epochs is None else epochs).items())]


def lai(*states: pb.PartitionState, controller_epoch: int = 1, broker_epoch: int = ME,
        configs: dict[str, dict[str, str]] | None = None,
        live_epochs: dict[int, int] | None = None) -> pb.LeaderAndIsrRequest:
    req = pb.LeaderAndIsrRequest(controller_id=9, controller_epoch=controller_epoch, broker_epoch=broker_epoch,
                                 partitions=list(states), live_brokers=[] if live_epochs is None else live(live_epochs))
    for topic, config in (configs or {}).items():
        req.topic_configs_json[topic] = json.dumps(config)
    return req


def state(leader: int = 0, epoch: int = 1, isr=(0, 1), replicas=(0, 1), version: int = 0, topic: str = "t",
          partition: int = 0) -> pb.PartitionState:
    return pb.PartitionState(topic=topic, partition=partition, controller_epoch=1, leader=leader, leader_epoch=epoch,
                             isr=list(isr), replicas=list(replicas), zk_version=version)


async def lead(s: Setup, min_isr: int = 2, live_epochs: dict[int, int] = EPOCHS, **kw: Any) -> None:
    st = state(**kw)
    s.store.set_state(st.topic, st.partition, PartitionStateData(st.leader, st.leader_epoch, list(st.isr), 1,
                                                                 st.zk_version))
    resp = await s.rm.leader_and_isr(lai(st, configs={st.topic: {"min_insync_replicas": str(min_isr)}},
                                         live_epochs=live_epochs), ME)
    assert [r.error_code for r in resp.results] == [pb.NONE], resp


def test_standalone_leader(setup):
    async def main():
        rm = setup.rm
        part = rm.make_local_leader("t", 0, {"min_insync_replicas": "1"})
        assert part.is_leader and part.isr == [0] and part.leader_epoch == 0
        result = await rm.produce("t", 0, batch(3), -1, 1000)
        assert (result.base_offset, result.last_offset) == (0, 2)
        assert part.high_watermark == 3
        got = rm.read("t", 0, 0, 1 << 20)
        assert got.high_watermark == 3 and got.records.nbytes > 0
        release(got)
        part2 = rm.make_local_leader("t", 1, {"min_insync_replicas": "2"})
        with pytest.raises(NotEnoughReplicasError):
            await rm.produce("t", 1, batch(), -1, 1000)
        assert part2.log.log_end_offset == 0
        await rm.produce("t", 1, batch(), 1, 1000)
        assert rm.remove_partition("t", 1, delete=True)
        with pytest.raises(UnknownTopicOrPartitionError):
            rm.get_partition("t", 1)
    run(main)


def test_leader_and_isr_fencing(setup):
    async def main():
        rm = setup.rm
        resp = await rm.leader_and_isr(lai(state(), controller_epoch=5), ME)
        assert resp.error_code == pb.NONE and rm.controller_epoch == 5
        stale = await rm.leader_and_isr(lai(state(epoch=2), controller_epoch=4), ME)
        assert stale.error_code == pb.STALE_CONTROLLER_EPOCH
        wrong_epoch = await rm.leader_and_isr(lai(state(epoch=2), controller_epoch=5, broker_epoch=77), 78)
        assert wrong_epoch.error_code == pb.STALE_BROKER_EPOCH
        assert rm.get_partition("t", 0).leader_epoch == 1
        # no broker epoch skips the check: 0 (once "unset, accept") and -1 are as stale as any other
        for skip in (0, -1):
            unset = await rm.leader_and_isr(lai(state(epoch=2), controller_epoch=5, broker_epoch=skip), 78)
            assert unset.error_code == pb.STALE_BROKER_EPOCH, skip
            deleted = await rm.stop_replica(pb.StopReplicaRequest(controller_epoch=5, broker_epoch=skip,
                                                                  delete_partitions=True, partitions=[
                                                                      pb.TopicPartition(topic="t", partition=0)]), 78)
            assert deleted.error_code == pb.STALE_BROKER_EPOCH, skip
        assert rm.get_partition("t", 0).leader_epoch == 1
        older = await rm.leader_and_isr(lai(state(epoch=0, version=5), controller_epoch=5), ME)
        assert older.results[0].error_code == pb.STALE_CONTROLLER_EPOCH
        same = await rm.leader_and_isr(lai(state(epoch=1, version=0), controller_epoch=5), ME)
        assert same.results[0].error_code == pb.NONE  # the state it has: a no-op
        not_mine = await rm.leader_and_isr(lai(state(replicas=(1, 2), isr=(1, 2), leader=1, topic="u"),
                                               controller_epoch=5), ME)
        assert not_mine.results[0].error_code == pb.UNKNOWN_TOPIC_OR_PARTITION
        newer_version = await rm.leader_and_isr(lai(state(epoch=1, isr=(0,), version=1), controller_epoch=5), ME)
        assert newer_version.results[0].error_code == pb.NONE
        assert rm.get_partition("t", 0).isr == [0]
        await rm.shutdown()
    run(main)


def test_topic_config_from_the_request(setup):
    async def main():
        rm = setup.rm
        config = {"min_insync_replicas": "2", "segment_bytes": str(1 << 15), "max_message_bytes": "5000"}
        resp = await rm.leader_and_isr(lai(state(), configs={"t": config}), ME)
        assert resp.results[0].error_code == pb.NONE
        part = rm.get_partition("t", 0)
        assert part.min_insync_replicas == 2
        assert part.log.config.segment_bytes == 1 << 15 and part.log.config.max_message_bytes == 5000
        bad = await rm.leader_and_isr(lai(state(topic="v"), configs={"v": "nope"}), ME)  # type: ignore[dict-item]
        assert bad.results[0].error_code == pb.INVALID_CONFIG
    run(main)


def test_becoming_leader_starts_the_epoch_and_answers_offset_for_leader_epoch(setup):
    async def main():
        rm = setup.rm
        await lead(setup, min_isr=1, epoch=0, isr=(0,))
        await rm.produce("t", 0, batch(4), 1, 1000)
        await rm.leader_and_isr(lai(state(epoch=3, isr=(0,), version=1)), ME)
        part = rm.get_partition("t", 0)
        assert part.log.epochs == [(0, 0), (3, 4)]
        req = pb.OffsetForLeaderEpochRequest(replica_id=1, partitions=[
            pb.OffsetForLeaderEpochPartition(topic="t", partition=0, current_leader_epoch=3, leader_epoch=0),
            pb.OffsetForLeaderEpochPartition(topic="t", partition=0, current_leader_epoch=3, leader_epoch=2),
            pb.OffsetForLeaderEpochPartition(topic="t", partition=0, current_leader_epoch=3, leader_epoch=3),
            pb.OffsetForLeaderEpochPartition(topic="t", partition=0, current_leader_epoch=2, leader_epoch=3),
            pb.OffsetForLeaderEpochPartition(topic="t", partition=0, current_leader_epoch=4, leader_epoch=3),
            pb.OffsetForLeaderEpochPartition(topic="x", partition=0, current_leader_epoch=-1, leader_epoch=3),
        ])
        got = [(r.error_code, r.leader_epoch, r.end_offset) for r in rm.offset_for_leader_epoch(req).results]
        assert got == [
            (pb.NONE, 0, 4), (pb.NONE, 0, 4), (pb.NONE, 3, 4),
            (pb.FENCED_LEADER_EPOCH, -1, -1), (pb.UNKNOWN_LEADER_EPOCH, -1, -1),
            (pb.UNKNOWN_TOPIC_OR_PARTITION, -1, -1),
        ]
    run(main)


def test_acks_all_waits_for_the_follower(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        part = rm.get_partition("t", 0)
        # Follower 1 fetches at 0 (its LEO): the HW (0) is held by it.
        release(rm.read("t", 0, 0, 1 << 20, replica_id=1, current_leader_epoch=1))
        produce = asyncio.create_task(rm.produce("t", 0, batch(2), -1, 10_000))
        await until(lambda: part.log.log_end_offset == 2, 5, "the append")
        assert not produce.done() and part.high_watermark == 0
        fetched = rm.read("t", 0, 0, 1 << 20, replica_id=1, current_leader_epoch=1)
        assert fetched.records.nbytes > 0 and fetched.high_watermark == 0  # followers read past the HW
        release(fetched)
        consumer = rm.read("t", 0, 0, 1 << 20)
        assert consumer.records.nbytes == 0  # consumers never read past it
        rm.read("t", 0, 2, 1 << 20, replica_id=1, current_leader_epoch=1)  # the follower reached 2
        assert part.high_watermark == 2
        result = await produce
        assert result.last_offset == 1
    run(main)


def test_acks_all_times_out_and_fails_after_shrink(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        part = rm.get_partition("t", 0)
        with pytest.raises(RequestTimedOutError):
            await rm.produce("t", 0, batch(), -1, 50)
        parked = asyncio.create_task(rm.produce("t", 0, batch(), -1, 10_000))
        await until(lambda: part.log.log_end_offset == 2, 5, "the append")
        setup.clock.advance(LAG_MS + 1)
        assert rm.check_isr_shrink() == 1
        with pytest.raises(NotEnoughReplicasAfterAppendError):
            await parked
        assert part.isr == [0] and setup.store.get_state("t", 0).isr == [0]
        assert (rm.isr_shrinks_total, rm.isr_expands_total) == (1, 0)  # logbroker_isr_shrinks_total
        assert part.high_watermark == 2  # the leader alone holds it now
        with pytest.raises(NotEnoughReplicasError):
            await rm.produce("t", 0, batch(), -1, 1000)
        # The follower comes back and catches up: expanded again.
        setup.clock.advance(ISR_PROPOSAL_INTERVAL_MS)
        release(rm.read("t", 0, 0, 1 << 20, replica_id=1, current_leader_epoch=1, replica_epoch=EPOCHS[1]))
        assert part.isr == [0]
        rm.read("t", 0, 2, 1 << 20, replica_id=1, current_leader_epoch=1, replica_epoch=EPOCHS[1])
        await until(lambda: part.isr == [0, 1], 5, "the ISR expansion")
        assert setup.store.get_state("t", 0).isr == [0, 1] and part.zk_version == 2
        assert (rm.isr_shrinks_total, rm.isr_expands_total) == (1, 1)
        await rm.produce("t", 0, batch(), 1, 1000)
    run(main)


def test_refused_isr_write_keeps_the_isr(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        part = rm.get_partition("t", 0)
        # The controller changed the znode meanwhile: the leader's version is stale.
        setup.store.set_state("t", 0, PartitionStateData(0, 1, [0, 1], 1, 5))
        setup.clock.advance(LAG_MS + 1)
        writes = setup.store.writes
        assert rm.check_isr_shrink() == 1
        await until(lambda: setup.store.writes > writes and not part.leader_state.isr_change_in_flight, 5,
                    "the refused write")
        assert part.isr == [0, 1]
        assert rm.isr_shrinks_total == 0  # only committed changes count
        assert rm.check_isr_shrink() == 0  # backing off before trying again
    run(main)


def test_leadership_change_fails_parked_produce_and_fences_reads(setup):
    async def main():
        rm = setup.rm
        await lead(setup, live_epochs={0: 100})
        parked = asyncio.create_task(rm.produce("t", 0, batch(), -1, 10_000))
        await until(lambda: rm.get_partition("t", 0).log.log_end_offset == 1, 5, "the append")
        resp = await rm.leader_and_isr(lai(state(leader=1, epoch=2, version=1)), ME)
        assert resp.results[0].error_code == pb.NONE
        with pytest.raises(NotLeaderOrFollowerError):
            await parked
        part = rm.get_partition("t", 0)
        assert part.role is Role.FOLLOWER and rm.fetchers.fetch_state(("t", 0)) is None  # no address for 1
        with pytest.raises(NotLeaderOrFollowerError):
            await rm.produce("t", 0, batch(), 1, 1000)
        with pytest.raises(NotLeaderOrFollowerError):
            rm.read("t", 0, 0, 100)
        with pytest.raises(FencedLeaderEpochError):
            rm.read("t", 0, 0, 100, replica_id=2, current_leader_epoch=1)
        with pytest.raises(UnknownLeaderEpochError):
            rm.read("t", 0, 0, 100, current_leader_epoch=3)
        await rm.shutdown()
    run(main)


def test_a_replica_being_added_with_a_throttle_is_throttled_until_its_reassignment_ends(setup):
    async def main():
        rm = setup.rm
        adding = state(leader=1, epoch=1, isr=(1, 2), replicas=(1, 2, 0), version=0)
        adding.adding_replicas[:] = [0]
        adding.adding_throttle_bytes_per_sec = 200_000
        other = state(leader=1, epoch=1, isr=(1, 2), replicas=(1, 2, 0), version=0, partition=1)
        other.adding_replicas[:] = [2]  # another broker is the one being added: not us
        other.adding_throttle_bytes_per_sec = 200_000
        resp = await rm.leader_and_isr(lai(adding, other), ME)
        assert [r.error_code for r in resp.results] == [pb.NONE, pb.NONE]
        assert rm.fetchers.throttle_of(("t", 0)) == 200_000 and rm.fetchers.throttle_of(("t", 1)) == 0
        done = state(leader=1, epoch=2, isr=(1, 0), replicas=(1, 0), version=1)  # complete: nothing added
        await rm.leader_and_isr(lai(done), ME)
        assert rm.fetchers.throttle_of(("t", 0)) == 0
        await rm.shutdown()
    run(main)


def test_follower_reads_are_checked(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        with pytest.raises(NotLeaderOrFollowerError):
            rm.read("t", 0, 0, 100, replica_id=7, current_leader_epoch=1)  # not a replica
        with pytest.raises(OffsetOutOfRangeError):
            rm.read("t", 0, 5, 100, replica_id=1, current_leader_epoch=1)  # past the leader's LEO
        with pytest.raises(FencedLeaderEpochError):
            rm.read("t", 0, 0, 100, replica_id=1, current_leader_epoch=0)
        # replica_id equal to our own id reads as a consumer (proto3's default 0 on broker 0).
        release(rm.read("t", 0, 0, 100, replica_id=0))
    run(main)


def test_stop_replica(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        resp = await rm.stop_replica(pb.StopReplicaRequest(controller_epoch=1, broker_epoch=ME, partitions=[
            pb.TopicPartition(topic="t", partition=0)]), ME)
        assert resp.error_code == pb.NONE and rm.get_partition("t", 0).role is Role.NONE
        stale = await rm.stop_replica(pb.StopReplicaRequest(controller_epoch=0, broker_epoch=ME), ME)
        assert stale.error_code == pb.STALE_CONTROLLER_EPOCH
        await rm.stop_replica(pb.StopReplicaRequest(controller_epoch=1, broker_epoch=ME, delete_partitions=True,
                                                    partitions=[pb.TopicPartition(topic="t", partition=0)]), ME)
        assert "t-0" not in [p.name for p in setup.log_manager.data_dir.iterdir()]
        with pytest.raises(UnknownTopicOrPartitionError):
            rm.get_partition("t", 0)
    run(main)


def test_deleted_topics_lose_their_replicas_and_stray_logs(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        setup.log_manager.create_log("gone", 0)  # loaded at start, no replica: missed its StopReplica
        setup.log_manager.create_log("keep", 0)
        assert rm.remove_deleted_topics([]) == 0
        assert rm.remove_deleted_topics(["gone", "t", "never"]) == 2
        names = {p.name for p in setup.log_manager.data_dir.iterdir()}
        assert "keep-0" in names and not names & {"gone-0", "t-0"}
        with pytest.raises(UnknownTopicOrPartitionError):
            rm.get_partition("t", 0)
    run(main)


def test_drop_all_roles_forgets_the_applied_states(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        rm.drop_all_roles()
        part = rm.get_partition("t", 0)
        assert part.role is Role.NONE and part.leader_epoch == -1
        with pytest.raises(NotLeaderOrFollowerError):
            await rm.produce("t", 0, batch(), 1, 1000)
        resp = await rm.leader_and_isr(lai(state()), ME)  # the same state again: applied
        assert resp.results[0].error_code == pb.NONE and part.is_leader and part.leader_epoch == 1
    run(main)


def test_stopped_replica_takes_the_same_state_again(setup):
    async def main():
        rm = setup.rm
        await lead(setup)
        rm.remove_partition("t", 0, delete=False)  # e.g. the ZooKeeper session was lost
        part = rm.get_partition("t", 0)
        assert part.role is Role.NONE
        resp = await rm.leader_and_isr(lai(state()), ME)  # the controller re-sends what it had
        assert resp.results[0].error_code == pb.NONE and part.is_leader
        older = await rm.leader_and_isr(lai(state(epoch=0, version=3)), ME)
        assert older.results[0].error_code == pb.STALE_CONTROLLER_EPOCH
    run(main)


OLD_ID = "a" * 32
NEW_ID = "b" * 32


@pytest.mark.parametrize(("written_id", "end_offset"), [(OLD_ID, 0), (NEW_ID, 5)], ids=["other-id", "same-id"])
def test_leader_and_isr_keeps_a_log_only_of_the_same_topic_id(tmp_path: Path, written_id: str, end_offset: int):
    """A broker that was down while its topic was deleted and created again holds the old log:
    the controller's topic id does not match it, so it is deleted, and the follower starts empty;
    a log of the same id is kept."""
    async def main():
        s = Setup(tmp_path)
        s.rm.make_local_leader("t", 0, {}, written_id)
        await s.rm.produce("t", 0, batch(5), 1, 1000)
        s.close()
        s = Setup(tmp_path)
        assert s.log_manager.load_all()[("t", 0)].log_end_offset == 5
        req = lai(state(leader=1, isr=(1,)))
        req.topic_ids["t"] = NEW_ID
        assert (await s.rm.leader_and_isr(req, ME)).results[0].error_code == pb.NONE
        assert s.rm.get_partition("t", 0).log.log_end_offset == end_offset
        await s.rm.shutdown()
        s.close()
    run(main)


def test_vanished_log_offline_standalone_refetched_in_a_cluster(tmp_path: Path):
    async def main():
        s = Setup(tmp_path)
        s.rm.make_local_leader("t", 0, {}, NEW_ID)
        s.rm.make_local_leader("t", 1, {}, NEW_ID)
        await s.rm.produce("t", 0, batch(5), 1, 1000)
        await s.rm.produce("t", 1, batch(5), 1, 1000)
        s.close()
        shutil.rmtree(tmp_path / "b0" / "t-0")
        shutil.rmtree(tmp_path / "b0" / "t-1")
        s = Setup(tmp_path)
        s.log_manager.load_all()
        # standalone: refused, then offline until the loss is accepted
        with pytest.raises(LostLogError):
            s.rm.make_local_leader("t", 0, {}, NEW_ID)
        s.rm.mark_offline("t", 0, "gone")
        with pytest.raises(StorageError, match="offline"):
            s.rm.get_partition("t", 0)
        with pytest.raises(InvalidRequestError):
            s.rm.recover_empty("t", 1, {}, NEW_ID)  # not offline
        part = s.rm.recover_empty("t", 0, {}, NEW_ID)
        assert part.is_leader and part.log.log_end_offset == 0 and not s.rm.offline_partitions
        # cluster: the follower creates it empty and fetches it from the leader
        req = lai(state(leader=1, isr=(1,), partition=1))
        req.topic_ids["t"] = NEW_ID
        assert (await s.rm.leader_and_isr(req, ME)).results[0].error_code == pb.NONE
        assert s.rm.get_partition("t", 1).log.log_end_offset == 0
        await s.rm.shutdown()
        s.close()
    run(main)


def test_leader_and_isr_for_a_broker_still_registering_is_retriable(setup):
    """The controller saw our new registration before we did (a lost session, re-registering): the
    request is refused as retriable BROKER_NOT_AVAILABLE, never as STALE_BROKER_EPOCH (which the
    controller drops for good), and applies once the broker knows its epoch."""
    async def main():
        rm = setup.rm
        for current in (-1, 100):  # registering after a lost session / the old epoch still recorded
            resp = await rm.leader_and_isr(lai(state(), broker_epoch=105), current)
            assert resp.error_code == pb.BROKER_NOT_AVAILABLE, resp
            assert not rm.partitions
        resp = await rm.leader_and_isr(lai(state(), broker_epoch=105), 105)
        assert resp.error_code == pb.NONE and rm.get_partition("t", 0).is_leader
        assert rm.fetchers.broker_epoch == 105  # what our follower fetches carry from now on
        older = await rm.leader_and_isr(lai(state(), broker_epoch=100), 105)
        assert older.error_code == pb.STALE_BROKER_EPOCH  # an earlier incarnation's request
        stop = await rm.stop_replica(pb.StopReplicaRequest(controller_epoch=1, broker_epoch=106), 105)
        assert stop.error_code == pb.BROKER_NOT_AVAILABLE
    run(main)


def test_a_broker_that_does_not_know_its_epoch_applies_nothing(setup):
    """After a lost session the broker's epoch is -1 until it has registered again: every request,
    one carrying -1 (or 0) as well, is refused as retriable BROKER_NOT_AVAILABLE (-1 never matches
    an unknown epoch); once the epoch is known, a request for epoch <= 0 is STALE_BROKER_EPOCH."""
    async def main():
        rm = setup.rm
        for sent in (-1, 0, ME):
            resp = await rm.leader_and_isr(lai(state(), broker_epoch=sent), -1)
            assert resp.error_code == pb.BROKER_NOT_AVAILABLE, (sent, resp)
            stop = await rm.stop_replica(pb.StopReplicaRequest(controller_epoch=1, broker_epoch=sent), -1)
            assert stop.error_code == pb.BROKER_NOT_AVAILABLE, (sent, stop)
        assert not rm.partitions and rm.fetchers.broker_epoch == -1
        for sent in (-1, 0):
            resp = await rm.leader_and_isr(lai(state(), broker_epoch=sent), ME)
            assert resp.error_code == pb.STALE_BROKER_EPOCH, (sent, resp)
        assert not rm.partitions
        resp = await rm.leader_and_isr(lai(state(), broker_epoch=ME), ME)
        assert resp.error_code == pb.NONE and rm.get_partition("t", 0).is_leader
        await rm.shutdown()
    run(main)


def test_only_a_registered_follower_at_its_current_epoch_joins_the_isr(setup):
    """KIP-841: a caught-up follower whose fetches carry an old broker epoch, no epoch, or that is
    not a live broker in the controller's metadata (fenced: its session is gone) is never proposed
    for the ISR, so the controller never has to take it out again (no flapping)."""
    async def main():
        rm = setup.rm
        await lead(setup, min_isr=1, isr=(0,))
        part = rm.get_partition("t", 0)
        await rm.produce("t", 0, batch(2), 1, 1000)
        writes = setup.store.writes
        for epoch in (-1, 0, EPOCHS[1] - 1, EPOCHS[1] + 1):
            rm.read("t", 0, 2, 1 << 20, replica_id=1, current_leader_epoch=1, replica_epoch=epoch)
            setup.clock.advance(ISR_PROPOSAL_INTERVAL_MS)
        rm.update_broker_addresses(live({0: 100, 2: 102}))  # broker 1 fenced: not registered
        rm.read("t", 0, 2, 1 << 20, replica_id=1, current_leader_epoch=1, replica_epoch=EPOCHS[1])
        await asyncio.sleep(0.05)
        assert setup.store.writes == writes and part.isr == [0]
        rm.update_broker_addresses(live({0: 100, 1: 101, 2: 102}))  # registered again (UpdateMetadata)
        rm.read("t", 0, 2, 1 << 20, replica_id=1, current_leader_epoch=1, replica_epoch=EPOCHS[1])
        await until(lambda: part.isr == [0, 1], 5, "the ISR expansion")
        assert setup.store.writes == writes + 1
    run(main)


def test_isr_proposals_of_a_partition_are_rate_bounded(setup):
    """However often the ISR would change (a controller undoing each expansion), a partition
    proposes at most once per ISR_PROPOSAL_INTERVAL_MS."""
    async def main():
        rm = setup.rm
        await lead(setup, min_isr=1, isr=(0,))
        part = rm.get_partition("t", 0)
        writes = setup.store.writes
        for _ in range(20):
            rm.read("t", 0, 0, 1 << 20, replica_id=1, current_leader_epoch=1, replica_epoch=EPOCHS[1])
            await until(lambda: not part.leader_state.isr_change_in_flight, 5, "the ISR write")
            if part.isr == [0, 1]:  # the controller takes it out again at once (same leader epoch)
                st = setup.store.get_state("t", 0)
                setup.store.set_state("t", 0, PartitionStateData(0, 1, [0], 1, st.zk_version + 1))
                await rm.leader_and_isr(lai(state(isr=(0,), version=st.zk_version + 1), live_epochs=EPOCHS), ME)
                assert part.isr == [0]
            setup.clock.advance(ISR_PROPOSAL_INTERVAL_MS // 10)
        # 20 fetches over 2 intervals of the manual clock: at most 2 (+1 at the start) proposals
        assert 1 <= setup.store.writes - writes <= 3
    run(main)


def test_stray_replicas_are_deleted_only_on_authoritative_metadata(setup):
    """A replica moved off this broker while it was down (no StopReplica reached it) is deleted
    once the controller's full view lists the partition without it; logs of partitions the view
    does not list, or that still name this broker, stay."""
    async def main():
        rm = setup.rm
        await lead(setup)
        setup.log_manager.create_log("moved", 0)   # reassigned to brokers 1, 2 while we were down
        setup.log_manager.create_log("moved", 1)   # still ours
        setup.log_manager.create_log("unknown", 0)  # metadata not here yet: left alone
        view = [state(), state(topic="moved", replicas=(1, 2), isr=(1, 2), leader=1),
                state(topic="moved", partition=1, replicas=(2, 0), isr=(2, 0), leader=2)]
        assert rm.remove_stray_replicas(view) == 1
        names = {p.name for p in setup.log_manager.data_dir.iterdir()}
        assert {"t-0", "moved-1", "unknown-0"} <= names and "moved-0" not in names
        assert rm.get_partition("t", 0).is_leader
        assert rm.remove_stray_replicas(view) == 0
        # our own led replica, reassigned away (its StopReplica lost): deleted once the view's state
        # names another leader in a newer leader epoch than ours (1) and leaves us out of the ISR
        assert rm.remove_stray_replicas([state(replicas=(1, 2), isr=(1, 2), leader=1, epoch=1)]) == 0
        assert rm.remove_stray_replicas([state(replicas=(1, 2), isr=(1, 2), leader=1, epoch=2)]) == 1
        with pytest.raises(UnknownTopicOrPartitionError):
            rm.get_partition("t", 0)
    run(main)


def test_a_replica_the_view_still_counts_on_is_never_a_stray(setup):
    """The controller's view may list an assignment without us before it is in ZooKeeper (a
    reassignment's last step) while we lead: an UpdateMetadata naming us leader or ISR member, or
    with a state older than the one we applied, deletes nothing."""
    async def main():
        rm = setup.rm
        await lead(setup, min_isr=1, isr=(0, 1))
        await rm.produce("t", 0, batch(3), 1, 1000)
        part = rm.get_partition("t", 0)
        for leader, isr, epoch in ((0, (0, 1, 2), 1),   # reassignment to [1, 2] not yet written: we lead
                                   (0, (1, 2), 2),      # we lead (whatever the ISR)
                                   (1, (0, 1, 2), 2),   # we are in the ISR
                                   (1, (1, 2), 1),      # another leader, but not newer than our epoch
                                   (-1, (1, 2), 5)):    # no leader named
            assert rm.remove_stray_replicas([state(replicas=(1, 2), leader=leader, isr=isr, epoch=epoch)]) == 0
            assert rm.get_partition("t", 0) is part and part.is_leader and part.log.log_end_offset == 3
        # a follower: kept while its applied state is at least as new as the view's
        rm.broker_addresses.clear()  # no fetcher: nothing to connect to
        await rm.leader_and_isr(lai(state(leader=1, epoch=4, isr=(1,), replicas=(0, 1))), ME)
        assert rm.remove_stray_replicas([state(replicas=(1, 2), leader=1, isr=(1, 2), epoch=3)]) == 0
        assert rm.remove_stray_replicas([state(replicas=(1, 2), leader=1, isr=(1, 2), epoch=4)]) == 0
        assert rm.get_partition("t", 0).log.log_end_offset == 3
        await rm.shutdown()
    run(main)


def test_a_deleted_stray_counts_as_lost_not_as_never_created(tmp_path: Path):
    """Should a stray deletion have been wrong, the controller naming this broker leader of the
    partition again gets KAFKA_STORAGE_ERROR (it elects another in-sync replica), never an empty
    leader; named follower, the replica is created empty and fetched."""
    async def main():
        s = Setup(tmp_path)
        s.log_manager.create_log("t", 0, topic_id=NEW_ID)
        assert s.rm.remove_stray_replicas([state(replicas=(1, 2), leader=1, isr=(1, 2), epoch=2)]) == 1
        assert not (tmp_path / "b0" / "t-0").exists()
        req = lai(state(leader=0, epoch=3, isr=(0, 1), replicas=(0, 1)))
        req.topic_ids["t"] = NEW_ID
        assert (await s.rm.leader_and_isr(req, ME)).results[0].error_code == pb.KAFKA_STORAGE_ERROR
        assert not (tmp_path / "b0" / "t-0").exists()
        req = lai(state(leader=1, epoch=4, isr=(1,), replicas=(0, 1)))
        req.topic_ids["t"] = NEW_ID
        assert (await s.rm.leader_and_isr(req, ME)).results[0].error_code == pb.NONE
        assert s.rm.get_partition("t", 0).role is Role.FOLLOWER
        await s.rm.shutdown()
        s.close()
    run(main)


def test_vanished_log_named_leader_is_refused_and_stays_offline_until_it_follows(tmp_path: Path):
    """A LeaderAndIsr naming this broker leader (or leaderless) of a partition whose log vanished is
    answered KAFKA_STORAGE_ERROR (the controller elects another in-sync replica), never led empty;
    named follower of a live leader, it is created empty and re-fetched."""
    async def main():
        s = Setup(tmp_path)
        s.rm.make_local_leader("t", 0, {}, NEW_ID)
        await s.rm.produce("t", 0, batch(5), 1, 1000)
        s.close()
        shutil.rmtree(tmp_path / "b0" / "t-0")
        s = Setup(tmp_path)
        s.log_manager.load_all()
        for leader, epoch in ((0, 2), (-1, 3)):
            req = lai(state(leader=leader, epoch=epoch, isr=(0, 1)))
            req.topic_ids["t"] = NEW_ID
            r = (await s.rm.leader_and_isr(req, ME)).results[0]
            assert r.error_code == pb.KAFKA_STORAGE_ERROR and "missing" in r.error_message, r
            assert not (tmp_path / "b0" / "t-0").exists() and ("t", 0) in s.rm.offline_partitions
            with pytest.raises(StorageError, match="offline"):
                s.rm.get_partition("t", 0)
        req = lai(state(leader=1, epoch=4, isr=(1,)))
        req.topic_ids["t"] = NEW_ID
        assert (await s.rm.leader_and_isr(req, ME)).results[0].error_code == pb.NONE
        part = s.rm.get_partition("t", 0)
        assert part.role is Role.FOLLOWER and part.log.log_end_offset == 0 and not s.rm.offline_partitions
        await s.rm.shutdown()
        s.close()
    run(main)


def test_recover_empty_in_a_cluster_creates_the_log_and_reports_it_recovered(tmp_path: Path):
    async def main():
        s = Setup(tmp_path)
        s.rm.make_local_leader("t", 0, {}, NEW_ID)
        s.close()
        shutil.rmtree(tmp_path / "b0" / "t-0")
        s = Setup(tmp_path)
        s.log_manager.load_all()
        reports: list[tuple[dict, list]] = []
        s.rm.offline_reporter = lambda offline, recovered: reports.append((offline, recovered))
        with pytest.raises(InvalidRequestError):
            s.rm.recover_empty_replica("t", 0, {}, NEW_ID)  # not offline (yet)
        req = lai(state(leader=0, epoch=2, isr=(0,)))
        req.topic_ids["t"] = NEW_ID
        assert (await s.rm.leader_and_isr(req, ME)).results[0].error_code == pb.KAFKA_STORAGE_ERROR
        s.rm.recover_empty_replica("t", 0, {}, NEW_ID)
        assert reports == [({}, [("t", 0)])] and not s.rm.offline_partitions
        req = lai(state(leader=0, epoch=3, isr=(0,)))  # the controller elects it now
        req.topic_ids["t"] = NEW_ID
        assert (await s.rm.leader_and_isr(req, ME)).results[0].error_code == pb.NONE
        part = s.rm.get_partition("t", 0)
        assert part.is_leader and part.log.log_end_offset == 0
        await s.rm.shutdown()
        s.close()
    run(main)


def test_corrupt_leader_reports_and_truncates_to_the_bad_batch_once_it_follows(setup):
    """A leader whose scrubber found a corrupt batch reports it (only with a controller to tell and
    another ISR member to lead); the LeaderAndIsr that makes it a follower of a live leader truncates
    its copy to the bad batch (then the fetcher re-fetches from there)."""
    async def main():
        rm = setup.rm
        await lead(setup, min_isr=1, isr=(0, 1))
        for _ in range(10):
            await rm.produce("t", 0, batch(1), 1, 1000)
        part = rm.get_partition("t", 0)
        assert not rm.leader_copy_corrupt(part, 4, "bad")  # standalone: nobody to tell
        reports: list[tuple[dict, list]] = []
        rm.offline_reporter = lambda offline, recovered: reports.append((offline, recovered))
        assert rm.leader_copy_corrupt(part, 4, "corrupt batch at offset 4")
        assert reports == [({("t", 0): "corrupt batch at offset 4"}, [])]
        part.log.corrupt_reason = "flagged"
        assert part.log.log_end_offset == 10  # nothing changes while it leads
        resp = await rm.leader_and_isr(lai(state(leader=-1, epoch=2, isr=(0, 1))), ME)
        assert resp.results[0].error_code == pb.NONE and part.log.log_end_offset == 10  # no leader: keep it
        resp = await rm.leader_and_isr(lai(state(leader=1, epoch=3, isr=(1,))), ME)
        assert resp.results[0].error_code == pb.NONE
        assert part.role is Role.FOLLOWER and part.log.log_end_offset == 4 and part.log.corrupt_reason is None
        resp = await rm.leader_and_isr(lai(state(leader=1, epoch=4, isr=(1,))), ME)
        assert part.log.log_end_offset == 4  # once
        await rm.shutdown()
    run(main)


def test_corrupt_leader_alone_in_its_isr_is_not_reported(setup):
    async def main():
        rm = setup.rm
        await lead(setup, min_isr=1, isr=(0,))
        reports: list[tuple[dict, list]] = []
        rm.offline_reporter = lambda offline, recovered: reports.append((offline, recovered))
        assert not rm.leader_copy_corrupt(rm.get_partition("t", 0), 0, "bad") and reports == []
        await rm.shutdown()
    run(main)


async def follower_with_records(s: Setup, n: int) -> Any:
    """Broker 0 follows broker 1 (leader epoch 2, ISR [1, 0]) with `n` one-record batches; no fetcher
    (no leader address: nothing to connect to). Returns the replica."""
    rm = s.rm
    await lead(s, min_isr=1, isr=(0, 1))
    for _ in range(n):
        await rm.produce("t", 0, batch(1), 1, 1000)
    rm.broker_addresses.clear()
    resp = await rm.leader_and_isr(lai(state(leader=1, epoch=2, isr=(1, 0), version=1)), ME)
    assert resp.results[0].error_code == pb.NONE
    return rm.get_partition("t", 0)


def test_a_follower_truncated_to_a_corrupt_batch_may_not_lead_until_caught_up(setup):
    """The scrubber's follower path truncates below the high watermark before the controller has
    taken the replica out of the ISR: a LeaderAndIsr naming it leader meanwhile is answered
    KAFKA_STORAGE_ERROR (the controller elects someone else), until it holds again what it had."""
    async def main():
        rm = setup.rm
        part = await follower_with_records(setup, 10)
        lost = []  # what the leader sends back: batches 4..9 as they were
        for offset in range(4, 10):
            view = part.log.read(offset, 1, max_offset=10)  # at least one batch: exactly one here
            lost.append(bytes(view))
            view.release()
        rm.refetch_from(part, 4)
        assert part.log.log_end_offset == 4
        resp = await rm.leader_and_isr(lai(state(leader=0, epoch=3, isr=(1, 0), version=2)), ME)
        r = resp.results[0]
        assert r.error_code == pb.KAFKA_STORAGE_ERROR and "may not lead" in r.error_message, r
        assert part.role is Role.FOLLOWER and part.leader == 1 and part.log.log_end_offset == 4
        part.append_as_follower(b"".join(lost[:3]), 10)  # part of the way back: still refused
        assert part.log.log_end_offset == 7
        resp = await rm.leader_and_isr(lai(state(leader=0, epoch=4, isr=(1, 0), version=3)), ME)
        assert resp.results[0].error_code == pb.KAFKA_STORAGE_ERROR
        part.append_as_follower(b"".join(lost[3:]), 10)  # all of it again
        resp = await rm.leader_and_isr(lai(state(leader=0, epoch=5, isr=(1, 0), version=4)), ME)
        assert resp.results[0].error_code == pb.NONE and part.is_leader and part.log.log_end_offset == 10
        await rm.shutdown()
    run(main)


def test_a_truncated_follower_may_lead_again_once_its_leader_re_adds_it_to_the_isr(setup):
    async def main():
        rm = setup.rm
        part = await follower_with_records(setup, 10)
        rm.refetch_from(part, 4)
        rm.observe_partition_states([state(leader=1, epoch=2, isr=(1, 0), version=1)])  # nothing new
        rm.observe_partition_states([state(leader=1, epoch=2, isr=(1, 0), version=2)])  # still in: not re-added
        resp = await rm.leader_and_isr(lai(state(leader=0, epoch=3, isr=(1, 0), version=3)), ME)
        assert resp.results[0].error_code == pb.KAFKA_STORAGE_ERROR
        rm.observe_partition_states([state(leader=1, epoch=4, isr=(1,), version=4)])  # the controller took it out
        rm.observe_partition_states([state(leader=1, epoch=2, isr=(1, 0), version=3)])  # older: ignored
        rm.observe_partition_states([state(leader=1, epoch=4, isr=(1, 0), version=5)])  # the leader re-added it
        resp = await rm.leader_and_isr(lai(state(leader=0, epoch=6, isr=(1, 0), version=6)), ME)
        assert resp.results[0].error_code == pb.NONE and part.is_leader
        await rm.shutdown()
    run(main)


def test_a_corrupt_leader_that_follows_while_still_in_the_isr_may_not_lead_until_caught_up(setup):
    async def main():
        rm = setup.rm
        await lead(setup, min_isr=1, isr=(0, 1))
        for _ in range(10):
            await rm.produce("t", 0, batch(1), 1, 1000)
        part = rm.get_partition("t", 0)
        rm.offline_reporter = lambda offline, recovered: None
        assert rm.leader_copy_corrupt(part, 4, "corrupt batch at offset 4")
        rm.broker_addresses.clear()
        # made a follower for another reason (preferred leader) before the report was handled: still in the ISR
        resp = await rm.leader_and_isr(lai(state(leader=1, epoch=2, isr=(1, 0), version=1)), ME)
        assert resp.results[0].error_code == pb.NONE and part.log.log_end_offset == 4
        resp = await rm.leader_and_isr(lai(state(leader=0, epoch=3, isr=(1, 0), version=2)), ME)
        assert resp.results[0].error_code == pb.KAFKA_STORAGE_ERROR and part.role is Role.FOLLOWER
        await rm.shutdown()
    run(main)
