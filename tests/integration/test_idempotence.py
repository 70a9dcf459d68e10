"""Idempotent producing on a real broker: batches resent by hand over gRPC with producer id, epoch
and sequence in their headers (as a retrying producer would), before and after a restart."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

from logbroker import Admin
from logbroker.storage.record_batch import BatchBuilder, decode_batch, iter_batches
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(180)

PID = 4242


def pbatch(epoch: int, seq: int, *values: bytes, pid: int = PID) -> bytes:
    now = int(time.time() * 1000)
    b = BatchBuilder(now)
    for v in values:
        b.append(now, None, v, None)
    return b.build(pid, epoch, seq)


def produce(address: str, records: bytes, acks: int = -1) -> pb.ProducePartitionResult:
    req = pb.ProduceRequest(acks=acks, timeout_ms=5000, partitions=[
        pb.ProducePartition(topic="t", partition=0, records=records)])
    with grpc.insecure_channel(address) as ch:
        (r,) = pbg.BrokerStub(ch).Produce(req, timeout=10).results
    return r


def values(address: str) -> list[bytes | None]:
    req = pb.FetchRequest(max_wait_ms=0, min_bytes=1, max_bytes=1 << 20, replica_id=-1, partitions=[
        pb.FetchPartition(topic="t", partition=0, fetch_offset=0, partition_max_bytes=1 << 20,
                          current_leader_epoch=-1)])
    with grpc.insecure_channel(address) as ch:
        (r,) = pbg.BrokerStub(ch).Fetch(req, timeout=10).results
    assert r.error_code == pb.NONE, r
    data = bytes(r.records)
    return [m.value for h, pos in iter_batches(data) for m in decode_batch(data, pos, h, "t", 0)]


def test_resent_batch_is_answered_with_its_offsets_gaps_and_fenced_epochs_are_refused(broker):
    with Admin(broker.address) as admin:
        admin.create_topic("t", partitions=1)
    first = produce(broker.address, pbatch(0, 0, b"a", b"b"))
    second = produce(broker.address, pbatch(0, 2, b"c"))
    assert (first.error_code, first.base_offset, first.duplicate) == (pb.NONE, 0, False)
    assert (second.base_offset, second.duplicate) == (2, False)

    again = produce(broker.address, pbatch(0, 0, b"a", b"b"))
    assert (again.error_code, again.base_offset, again.duplicate) == (pb.NONE, 0, True)

    gap = produce(broker.address, pbatch(0, 5, b"x"))
    assert gap.error_code == pb.OUT_OF_ORDER_SEQUENCE_NUMBER and "expected 3" in gap.error_message

    produce(broker.address, pbatch(1, 0, b"d"))  # a new epoch of the same producer id, from 0
    fenced = produce(broker.address, pbatch(0, 3, b"y"))
    assert fenced.error_code == pb.INVALID_PRODUCER_EPOCH, fenced

    assert values(broker.address) == [b"a", b"b", b"c", b"d"]  # nothing written twice, nothing refused written


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_resent_batch_is_still_a_duplicate_after_a_restart(broker, how):
    with Admin(broker.address) as admin:
        admin.create_topic("t", partitions=1)
    for seq in range(0, 10, 2):
        r = produce(broker.address, pbatch(3, seq, b"v%d" % seq, b"w%d" % seq))
        assert r.error_code == pb.NONE, r
    if how == "stop":
        broker.stop()
    else:
        broker.kill(signal.SIGKILL)
    broker.restart()
    again = produce(broker.address, pbatch(3, 8, b"v8", b"w8"))
    assert (again.error_code, again.base_offset, again.duplicate) == (pb.NONE, 8, True), again
    gap = produce(broker.address, pbatch(3, 12, b"x"))
    assert gap.error_code == pb.OUT_OF_ORDER_SEQUENCE_NUMBER, gap
    assert produce(broker.address, pbatch(3, 10, b"next")).base_offset == 10
    assert len(values(broker.address)) == 11


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_resent_batch_is_still_a_duplicate_after_rolls_and_a_restart(broker, how):
    """The producer goes idle while other writers roll the log: its state is in the snapshots
    written at the rolls (`<offset>.producers` beside the segments) and survives the restart."""
    with Admin(broker.address) as admin:
        admin.create_topic("t", partitions=1, config={"segment_bytes": "16384"})
    first = produce(broker.address, pbatch(3, 0, b"a", b"b"))
    assert (first.error_code, first.base_offset) == (pb.NONE, 0), first
    for i in range(8):
        r = produce(broker.address, pbatch(-1, -1, b"%d" % i + b"x" * 6000, pid=-1))
        assert r.error_code == pb.NONE, r
    snapshots = sorted(broker.data_dir.rglob("*.producers"))
    assert snapshots, "no producer snapshot after the rolls"
    assert len(list(snapshots[0].parent.glob("*.log"))) >= 3
    if how == "stop":
        broker.stop()
    else:
        broker.kill(signal.SIGKILL)
    broker.restart()
    again = produce(broker.address, pbatch(3, 0, b"a", b"b"))
    assert (again.error_code, again.base_offset, again.duplicate) == (pb.NONE, 0, True), again
    after = produce(broker.address, pbatch(3, 2, b"c"))
    assert (after.error_code, after.base_offset, after.duplicate) == (pb.NONE, 10, False), after  # nothing written twice


def init_producer_id(address: str, name: str = "") -> tuple[int, int]:
    with grpc.insecure_channel(address) as ch:
        r = pbg.BrokerStub(ch).InitProducerId(pb.InitProducerIdRequest(producer_name=name), timeout=10)
    assert r.error_code == pb.NONE, r
    return r.producer_id, r.producer_epoch


def test_init_producer_id_gives_unique_ids_and_a_named_producer_fences_its_zombie(broker):
    with Admin(broker.address) as admin:
        admin.create_topic("t", partitions=1)
    anonymous = {init_producer_id(broker.address) for _ in range(5)}
    assert len({pid for pid, _ in anonymous}) == 5 and {e for _, e in anonymous} == {0}
    pid, epoch = init_producer_id(broker.address, "orders")
    assert pid not in {p for p, _ in anonymous} and epoch == 0
    assert produce(broker.address, pbatch(epoch, 0, b"zombie", pid=pid)).error_code == pb.NONE
    assert init_producer_id(broker.address, "orders") == (pid, 1)  # the restarted producer
    assert produce(broker.address, pbatch(1, 0, b"new", pid=pid)).error_code == pb.NONE
    zombie = produce(broker.address, pbatch(0, 1, b"late", pid=pid))
    assert zombie.error_code == pb.INVALID_PRODUCER_EPOCH, zombie
    with grpc.insecure_channel(broker.address) as ch:
        bad = pbg.BrokerStub(ch).InitProducerId(pb.InitProducerIdRequest(producer_name="x" * 300), timeout=10)
    assert bad.error_code == pb.INVALID_REQUEST

    broker.restart()  # ids come from a new block, the name keeps its id
    after = init_producer_id(broker.address)
    assert after[0] not in {p for p, _ in anonymous} | {pid}
    assert init_producer_id(broker.address, "orders") == (pid, 2)


def test_producer_ids_are_unique_across_a_cluster(zookeeper, zk_chroot, tmp_path):
    from tests.cluster import Cluster

    c = Cluster(zookeeper, zk_chroot, tmp_path, 2).start()
    try:
        addresses = [b.address for b in c.brokers.values()]
        ids = [init_producer_id(a) for a in addresses for _ in range(3)]
        assert len({pid for pid, _ in ids}) == 6
        named = [init_producer_id(a, "billing") for a in addresses]
        assert named[1] == (named[0][0], named[0][1] + 1)
    finally:
        c.stop()


def test_the_producer_is_idempotent_by_default_and_a_named_one_fences_its_zombie(broker):
    from logbroker import Producer
    from logbroker.errors import InvalidProducerEpochError

    with Admin(broker.address) as admin:
        admin.create_topic("t", partitions=1)
    zombie = Producer(broker.address, producer_name="billing", linger_ms=0)
    try:
        assert zombie.send("t", b"z0").result(10).offset == 0
        with Producer(broker.address, producer_name="billing", linger_ms=0) as fresh:
            assert fresh.send("t", b"f0").result(10).offset == 1
        with pytest.raises(InvalidProducerEpochError):
            zombie.send("t", b"z1").result(10)
    finally:
        zombie.close(5)
    with Producer(broker.address) as plain:
        plain.send("t", b"p0").result(10)
    data = fetch_all(broker.address)
    headers = [h for h, _ in iter_batches(data)]
    assert [h.producer_epoch for h in headers] == [0, 1, 0]
    assert headers[0].producer_id == headers[1].producer_id != headers[2].producer_id >= 0
    with Producer(broker.address, enable_idempotence=False) as off:
        off.send("t", b"off").result(10)
    assert [h.producer_id for h, _ in iter_batches(fetch_all(broker.address))][-1] == -1


def fetch_all(address: str) -> bytes:
    req = pb.FetchRequest(max_wait_ms=0, min_bytes=1, max_bytes=1 << 20, replica_id=-1, partitions=[
        pb.FetchPartition(topic="t", partition=0, fetch_offset=0, partition_max_bytes=1 << 20,
                          current_leader_epoch=-1)])
    with grpc.insecure_channel(address) as ch:
        (r,) = pbg.BrokerStub(ch).Fetch(req, timeout=10).results
    return bytes(r.records)


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.parametrize("idempotent", [True, False])
def test_leader_kill_loop_with_forced_retries_writes_every_record_exactly_once(zookeeper, zk_chroot, tmp_path,
                                                                              idempotent):
    """The kill -9 leader loop of test_cluster.py with short request timeouts, so requests in flight
    to a killed leader are retried at the new one (some of them after their first try landed):
    with the idempotent producer every acknowledged value is in the log exactly once; without it the
    same run writes duplicates (tens of thousands in one run here), so the test does detect them."""
    import random
    import threading

    from logbroker import Producer
    from tests.cluster import Cluster
    from tests.conftest import wait_for
    from tests.integration.test_cluster import consume_everything, settled

    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "3000"]).start()
    try:
        topic = "orders"
        with Admin(c.bootstrap) as admin:
            admin.create_topic(topic, partitions=3, replication_factor=3, config={"min_insync_replicas": "2"})
        wait_for(lambda: settled(c, topic, 3), 60, "all partitions led with full ISR")
        acked: set[bytes] = set()
        failed: list[BaseException] = []
        lock = threading.Lock()
        stop = threading.Event()

        def produce() -> None:
            with Producer(c.bootstrap, enable_idempotence=idempotent, linger_ms=2, delivery_timeout_ms=90_000, request_timeout_ms=800,
                          retry_backoff_ms=50) as producer:
                i = 0
                while not stop.is_set():
                    value = b"v-%08d" % i

                    def done(fut, value=value):
                        with lock:
                            if fut.exception() is None:
                                acked.add(value)
                            else:
                                failed.append(fut.exception())

                    producer.send(topic, value, key=b"k%d" % (i % 30)).add_done_callback(done)
                    i += 1
                    if i % 100 == 0:
                        time.sleep(0.01)
                producer.flush(120)

        t = threading.Thread(target=produce, daemon=True)
        t.start()
        rng = random.Random(11)
        for round_ in range(4):
            p = rng.randrange(3)
            wait_for(lambda p=p: c.leader_of(topic, p) >= 0, 30, f"round {round_}: partition {p} has a leader")
            leader = c.leader_of(topic, p)
            before = len(acked)
            c.kill9(leader)
            wait_for(lambda p=p, leader=leader: c.leader_of(topic, p) not in (-1, leader), 30,
                     f"round {round_}: a new leader for partition {p}")
            c.restart(leader)
            wait_for(lambda before=before: len(acked) > before + 100, 60, f"round {round_}: progress")
        stop.set()
        t.join(150)
        assert not t.is_alive()
        wait_for(lambda: settled(c, topic, 3), 90, "cluster settled with full ISRs")
        total = sum(c.high_watermark(topic, p) for p in range(3))
        got = consume_everything(c.bootstrap, topic, 3, total)
        values = [m.value for msgs in got.values() for m in msgs]
        duplicates = len(values) - len(set(values))
        if idempotent:
            assert duplicates == 0, f"{duplicates} duplicated records of {len(values)}"
        else:
            assert duplicates > 0, "no duplicates without idempotence: the kill loop forced no retry"
        assert not (acked - set(values)), f"{len(acked - set(values))} acknowledged records lost"
        assert not failed, f"{len(failed)} sends failed, e.g. {failed[:2]}"
    finally:
        c.stop()


def test_resent_batch_is_a_duplicate_at_the_new_leader_after_a_failover(zookeeper, zk_chroot, tmp_path):
    """The followers rebuild the producer state from the batches they replicate: after the leader is
    killed, the batch resent to the new leader is answered with its original offsets."""
    from tests.cluster import Cluster
    from tests.conftest import wait_for
    from tests.integration.test_cluster import settled

    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000).start()
    try:
        with Admin(c.bootstrap) as admin:
            admin.create_topic("t", partitions=1, replication_factor=3, config={"min_insync_replicas": "2"})
        wait_for(lambda: settled(c, "t", 1), 60, "partition led with full ISR")
        leader = c.leader_of("t", 0)
        address = c.brokers[leader].address
        for seq in range(0, 6, 2):
            r = produce(address, pbatch(0, seq, b"a%d" % seq, b"b%d" % seq))  # acks=all: on every ISR replica
            assert r.error_code == pb.NONE, r
        c.kill9(leader)
        wait_for(lambda: c.leader_of("t", 0) not in (-1, leader), 30, "a new leader")
        new = c.brokers[c.leader_of("t", 0)].address
        again = produce(new, pbatch(0, 2, b"a2", b"b2"))
        assert (again.error_code, again.base_offset, again.duplicate) == (pb.NONE, 2, True), again
        gap = produce(new, pbatch(0, 9, b"x"))
        assert gap.error_code == pb.OUT_OF_ORDER_SEQUENCE_NUMBER, gap
        assert produce(new, pbatch(0, 6, b"next")).base_offset == 6
    finally:
        c.stop()
