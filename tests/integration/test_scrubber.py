"""The background scrubber and the per-replica read, on real broker processes with a flipped bit on disk."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Producer
from logbroker.cli import main
from logbroker.replication.scrubber import walk_segment
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.cluster import Cluster
from tests.conftest import wait_for

TINY = {"segment_bytes": 16384, "index_interval_bytes": 256, "min_insync_replicas": 1}
SCRUB_FAST = ["--scrub-interval-ms", "300", "--scrub-bytes-per-sec", "0"]


def produce(address: str, topic: str, n: int, acks: int = 1) -> None:
    with Producer(address, acks=acks, linger_ms=0) as producer:
        for i in range(n):
            producer.send(topic, b"record-%04d-" % i + b"x" * 400, partition=0).result(timeout=30)


def flip_bit_in_closed_segment(pdir: Path, which: int = 1, batch: int = 3) -> tuple[str, int, int]:
    """Flip one bit inside a record of the `batch`-th batch of the `which`-th segment (never the
    last, active one). Returns (segment name, the batch's base offset, its position)."""
    segments = sorted(pdir.glob("*.log"))
    assert len(segments) > which + 1, segments
    seg = segments[which]
    data = seg.read_bytes()
    checks = list(walk_segment(lambda p, n: data[p : p + n], len(data), int(seg.stem)))
    assert all(c.ok for c in checks) and len(checks) > batch
    victim = checks[batch]
    where = victim.position + victim.size_bytes - 10
    with open(seg, "r+b") as f:
        f.seek(where)
        f.write(bytes([data[where] ^ 0x04]))
    return seg.name, victim.offset, victim.position


def test_standalone_scrubber_reports_a_flipped_bit(broker_factory, tmp_path):
    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("s", partitions=1, config=TINY)
    produce(broker.address, "s", 100)
    assert broker.stop() == 0
    segment, offset, position = flip_bit_in_closed_segment(broker.data_dir / "s-0")
    broker2 = broker_factory(data_dir=broker.data_dir, port=broker.port, extra_args=SCRUB_FAST)
    expected = f"offsets {offset}-{offset} at byte {position} (CRC-32C mismatch)"
    wait_for(lambda: expected in broker2.log_text(), 30, "the scrubber's report")
    line = next(ln for ln in broker2.log_text().splitlines() if expected in ln)
    assert "ERROR" in line and "s-0" in line and segment in line, line
    # the corrupt batch is not served: a read of that offset fails, the ones before it do not
    with grpc.insecure_channel(broker2.address) as ch:
        stub = pbg.BrokerStub(ch)
        for fetch_offset, code in ((offset, pb.CORRUPT_MESSAGE), (0, pb.NONE)):
            resp = stub.Fetch(pb.FetchRequest(max_wait_ms=0, max_bytes=1 << 20, partitions=[
                pb.FetchPartition(topic="s", partition=0, fetch_offset=fetch_offset,
                                  partition_max_bytes=1 << 20)]), timeout=10)
            assert resp.results[0].error_code == code, resp.results[0].error_message


def read_replica(address: str, topic: str, partition: int) -> tuple[pb.ReadReplicaResponse, bytes]:
    """Every byte of one broker's copy, by ReadReplica calls from its log start to its log end."""
    out = bytearray()
    with grpc.insecure_channel(address) as ch:
        stub = pbg.AdminStub(ch)
        first = stub.ReadReplica(pb.ReadReplicaRequest(topic=topic, partition=partition, offset=-1), timeout=10)
        assert first.error_code == pb.NONE, first.error_message
        resp, offset = first, first.log_start_offset
        while offset < first.log_end_offset:
            resp = stub.ReadReplica(pb.ReadReplicaRequest(topic=topic, partition=partition, offset=offset,
                                                          max_bytes=4096), timeout=10)
            assert resp.error_code == pb.NONE, resp.error_message
            data = bytes(resp.records)
            checks = list(walk_segment(lambda p, n, data=data: data[p : p + n], len(data), offset))
            assert checks and all(c.ok for c in checks)
            out += data
            offset = checks[-1].last_offset + 1
    return first, bytes(out)


@pytest.fixture
def pair(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 2, session_timeout_ms=3000,
                extra_args=["--replica-lag-time-max-ms", "3000", *SCRUB_FAST])
    try:
        yield c.start()
    finally:
        c.stop()


def in_sync(c: Cluster, topic: str, replicas: int) -> bool:
    try:
        return len(c.partition_states(topic)[0].isr) == replicas
    except (grpc.RpcError, KeyError):
        return False


@pytest.mark.slow
def test_follower_with_a_flipped_bit_refetches_and_rejoins_the_isr(pair: Cluster, capsys):
    c = pair
    with Admin(c.bootstrap) as admin:
        admin.create_topic("r", partitions=1, replication_factor=2, config=TINY)
    wait_for(lambda: in_sync(c, "r", 2), 30, "both replicas in the ISR")
    leader = c.leader_of("r", 0)
    follower = 1 - leader
    produce(c.brokers[leader].address, "r", 100, acks=-1)
    end = c.high_watermark("r", 0)
    wait_for(lambda: c.replica_batches(follower, "r", 0) == c.replica_batches(leader, "r", 0), 30,
             "the follower caught up")

    c.brokers[follower].stop()
    _segment, offset, _position = flip_bit_in_closed_segment(c.brokers[follower].data_dir / "r-0")
    assert c.replica_batches(follower, "r", 0) != c.replica_batches(leader, "r", 0)
    c.brokers[follower].start(60)

    report = f"scrub: replica {follower} of r-0 has corrupt batches"
    wait_for(lambda: report in c.brokers[follower].log_text(), 30, "the follower's scrubber report")
    assert f"truncating to offset {offset}" in c.brokers[follower].log_text()
    wait_for(lambda: c.replica_batches(follower, "r", 0) == c.replica_batches(leader, "r", 0), 30,
             "the follower's copy byte-identical to the leader's again")
    wait_for(lambda: in_sync(c, "r", 2), 30, "the follower back in the ISR")
    assert c.leader_of("r", 0) == leader and c.high_watermark("r", 0) == end

    # the per-replica read: the follower's copy through its broker equals the leader's
    lead_resp, lead_bytes = read_replica(c.brokers[leader].address, "r", 0)
    foll_resp, foll_bytes = read_replica(c.brokers[follower].address, "r", 0)
    assert (lead_resp.role, foll_resp.role) == ("leader", "follower")
    assert foll_resp.broker_id == follower and foll_resp.log_end_offset == lead_resp.log_end_offset == end
    assert foll_bytes == lead_bytes and len(lead_bytes) > 16384
    capsys.readouterr()
    assert main(["dump-log", "--broker", c.brokers[follower].address, "r", "0", "--format", "json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert rows[0]["replica"]["role"] == "follower" and rows[1]["base_offset"] == 0
    assert all(r["crc"] == "ok" for r in rows[1:])
