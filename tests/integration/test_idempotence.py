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
