"""Bad input against a real broker process: each gets a specific error, and nothing changes on disk."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import grpc
import pytest

from logbroker.storage import record_batch as rb
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg

pytestmark = pytest.mark.timeout(120)


def tree_digest(root: Path) -> dict[str, str]:
    """Path -> sha256 of every partition log file under the data dir (indexes excluded: LMDB pages move)."""
    out = {}
    for p in sorted(root.rglob("*.log")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def env(broker):
    channel = grpc.insecure_channel(broker.address, options=[("grpc.max_send_message_length", 256 << 20)])
    stub = pbg.BrokerStub(channel)
    admin = pbg.AdminStub(channel)
    resp = admin.CreateTopics(pb.CreateTopicsRequest(topics=[pb.NewTopic(
        name="t", partitions=2, replication_factor=1, config={"max_message_bytes": "10000", "segment_bytes": "65536"})]))
    assert resp.results[0].error_code == pb.NONE, resp
    ok = stub.Produce(pb.ProduceRequest(acks=1, partitions=[pb.ProducePartition(
        topic="t", partition=0, records=rb.encode_batch([(1000, b"k", b"v", None)]))]))
    assert ok.results[0].error_code == pb.NONE and ok.results[0].base_offset == 0
    yield broker, stub, admin
    channel.close()


def end_offsets(admin) -> list[int]:
    d = admin.DescribeTopics(pb.DescribeTopicsRequest(names=["t"])).topics[0]
    return [p.log_end_offset for p in d.partitions]


def produce_one(stub, records: bytes, topic: str = "t", partition: int = 0):
    resp = stub.Produce(pb.ProduceRequest(acks=1, partitions=[pb.ProducePartition(
        topic=topic, partition=partition, records=records)]))
    return resp.results[0]


def assert_unchanged(broker, admin, before_offsets, before_files):
    assert end_offsets(admin) == before_offsets
    assert tree_digest(broker.data_dir) == before_files


def test_record_larger_than_max_message_bytes(env):
    broker, stub, admin = env
    before = end_offsets(admin), tree_digest(broker.data_dir)
    r = produce_one(stub, rb.encode_batch([(1, None, b"x" * 20_000, None)]))
    assert r.error_code == pb.MESSAGE_TOO_LARGE
    assert "max_message_bytes" in r.error_message
    assert_unchanged(broker, admin, *before)


def test_request_above_grpc_receive_cap(env):
    broker, stub, admin = env
    before = end_offsets(admin), tree_digest(broker.data_dir)
    with pytest.raises(grpc.RpcError) as info:
        produce_one(stub, b"\x00" * (33 << 20))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_unchanged(broker, admin, *before)


def test_random_bytes_as_request(env):
    broker, stub, admin = env
    before = end_offsets(admin), tree_digest(broker.data_dir)
    channel = grpc.insecure_channel(broker.address)
    raw = channel.unary_unary("/logbroker.v1.Broker/Produce", request_serializer=None, response_deserializer=None)
    codes = set()
    for seed in range(20):
        garbage = bytes([0x0A, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]) + os.urandom(200 + seed)
        try:
            raw(garbage, timeout=10)
            codes.add("OK")
        except grpc.RpcError as exc:
            codes.add(exc.code().name)
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed ProduceRequest" in exc.details()
    assert "INVALID_ARGUMENT" in codes
    channel.close()
    assert_unchanged(broker, admin, *before)


def test_wrong_crc_and_hostile_lengths(env):
    broker, stub, admin = env
    before = end_offsets(admin), tree_digest(broker.data_dir)
    good = bytearray(rb.encode_batch([(1, b"a", b"hello", None), (2, b"b", b"world", None)]))
    bad_crc = bytearray(good)
    bad_crc[-1] ^= 0x55
    r = produce_one(stub, bytes(bad_crc))
    assert r.error_code == pb.CORRUPT_MESSAGE and "CRC" in r.error_message
    for length in (2**31 - 1, 5, -1):
        hostile = bytearray(good)
        struct.pack_into(">i", hostile, 8, length)
        r = produce_one(stub, bytes(hostile))
        assert r.error_code == pb.CORRUPT_MESSAGE, (length, r)
    hostile = bytearray(good)
    struct.pack_into(">i", hostile, 57, 2**31 - 1)  # recordCount
    struct.pack_into(">I", hostile, 17, rb.crc32c(memoryview(hostile)[21:]))
    r = produce_one(stub, bytes(hostile))
    assert r.error_code == pb.CORRUPT_MESSAGE
    r = produce_one(stub, bytes(good) + b"\x01\x02\x03")  # trailing partial batch
    assert r.error_code == pb.CORRUPT_MESSAGE
    magic = bytearray(good)
    magic[16] = 1
    r = produce_one(stub, bytes(magic))
    assert r.error_code == pb.UNSUPPORTED_FOR_MESSAGE_FORMAT
    assert_unchanged(broker, admin, *before)


def test_unknown_topic_or_partition(env):
    broker, stub, admin = env
    before = end_offsets(admin), tree_digest(broker.data_dir)
    batch = rb.encode_batch([(1, None, b"v", None)])
    assert produce_one(stub, batch, topic="nope").error_code == pb.UNKNOWN_TOPIC_OR_PARTITION
    r = produce_one(stub, batch, partition=2)
    assert r.error_code == pb.UNKNOWN_TOPIC_OR_PARTITION and "no partition 2" in r.error_message
    assert produce_one(stub, batch, partition=-1).error_code == pb.UNKNOWN_TOPIC_OR_PARTITION
    f = stub.Fetch(pb.FetchRequest(max_wait_ms=0, partitions=[pb.FetchPartition(topic="nope", partition=0)]))
    assert f.results[0].error_code == pb.UNKNOWN_TOPIC_OR_PARTITION
    assert_unchanged(broker, admin, *before)


def test_negative_and_past_the_end_fetch_offsets(env):
    broker, stub, admin = env
    for offset in (-1, -(2**62), 2, 10**12):
        f = stub.Fetch(pb.FetchRequest(max_wait_ms=0, partitions=[
            pb.FetchPartition(topic="t", partition=0, fetch_offset=offset, partition_max_bytes=1 << 20)]))
        r = f.results[0]
        assert r.error_code == pb.OFFSET_OUT_OF_RANGE, (offset, r)
        assert r.high_watermark == 1 and not r.records
    # at the end: empty, no error (long-poll bounded by max_wait_ms)
    f = stub.Fetch(pb.FetchRequest(max_wait_ms=50, partitions=[
        pb.FetchPartition(topic="t", partition=0, fetch_offset=1, partition_max_bytes=1 << 20)]))
    assert f.results[0].error_code == pb.NONE and f.results[0].records == b""
    with pytest.raises(grpc.RpcError) as info:
        stub.Fetch(pb.FetchRequest(max_bytes=-1, partitions=[pb.FetchPartition(topic="t", partition=0)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../../etc", "x" * 300, "nul\x00name", "", "sp ace"])
def test_path_like_and_invalid_topic_names(env, name):
    broker, stub, admin = env
    before = end_offsets(admin), tree_digest(broker.data_dir)
    dirs_before = sorted(p.name for p in broker.data_dir.iterdir())
    r = admin.CreateTopics(pb.CreateTopicsRequest(topics=[pb.NewTopic(name=name, partitions=1)])).results[0]
    assert r.error_code == pb.INVALID_TOPIC, r
    assert produce_one(stub, rb.encode_batch([(1, None, b"v", None)]), topic=name).error_code in (
        pb.UNKNOWN_TOPIC_OR_PARTITION, pb.INVALID_TOPIC)
    m = stub.Metadata(pb.MetadataRequest(topics=[name])).topics[0]
    assert m.error_code == pb.INVALID_TOPIC
    assert sorted(p.name for p in broker.data_dir.iterdir()) == dirs_before
    assert_unchanged(broker, admin, *before)


def test_bad_admin_requests(env):
    broker, stub, admin = env
    bad = [
        pb.NewTopic(name="zero", partitions=0),
        pb.NewTopic(name="huge", partitions=10**6),
        pb.NewTopic(name="rf", partitions=1, replication_factor=3),
        pb.NewTopic(name="cfg", partitions=1, config={"retention_ms": "soon"}),
        pb.NewTopic(name="t", partitions=1),
    ]
    codes = [r.error_code for r in admin.CreateTopics(pb.CreateTopicsRequest(topics=bad)).results]
    assert codes == [pb.INVALID_PARTITIONS, pb.INVALID_PARTITIONS, pb.INVALID_REPLICATION_FACTOR,
                     pb.INVALID_CONFIG, pb.TOPIC_ALREADY_EXISTS]
    assert sorted(t.name for t in stub.Metadata(pb.MetadataRequest()).topics) == ["t"]
    r = admin.CreatePartitions(pb.CreatePartitionsRequest(name="t", total=1)).result
    assert r.error_code == pb.INVALID_PARTITIONS
    bad_acks = stub.Produce(pb.ProduceRequest(acks=5, partitions=[pb.ProducePartition(
        topic="t", partition=0, records=rb.encode_batch([(1, None, b"v", None)]))])).results[0]
    assert bad_acks.error_code == pb.INVALID_REQUIRED_ACKS


@pytest.mark.parametrize("group", ["", "a/b", "..", "g" * 300])
def test_invalid_group_ids_commit_nothing(env, group):
    broker, stub, admin = env
    resp = stub.OffsetCommit(pb.OffsetCommitRequest(group=group, partitions=[
        pb.OffsetCommitPartition(topic="t", partition=0, offset=1)]))
    assert resp.results[0].error_code == pb.INVALID_GROUP_ID
    fetched = stub.OffsetFetch(pb.OffsetFetchRequest(group=group))
    assert fetched.error_code == pb.INVALID_GROUP_ID and not fetched.results
