"""`__consumer_offsets` is compacted (a real standalone broker): thousands of commits of one
partition leave the offsets partition under a size bound once the LogCleaner ran, and the
coordinator's replay over the compacted log after a restart still finds the latest commit. And a
compacted topic refuses keyless records with INVALID_RECORD, as Kafka, and batches whose codec
the broker cannot read (snappy, lz4, zstd) with UNSUPPORTED_COMPRESSION_TYPE."""

from __future__ import annotations

import time

import pytest

from logbroker.client.admin import Admin
from logbroker.client.producer import Producer
from logbroker.errors import InvalidRecordError
from logbroker.group.offsets import OFFSETS_TOPIC
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import wait_for

COMMITS = 3_000
SEGMENT_BYTES = 1 << 14


def _commit(admin: Admin, group: str, offset: int) -> None:
    """A raw OffsetCommit (as `Admin.reset_offsets` sends it), without its offset lookups."""
    request = pb.OffsetCommitRequest(group=group, member_id="", member_epoch=-1, partitions=[
        pb.OffsetCommitPartition(topic="events", partition=0, offset=offset)])
    resp = admin._coordinator(group).call("broker", "OffsetCommit", request, time.monotonic() + 10)
    assert resp.error_code == pb.NONE and all(r.error_code == pb.NONE for r in resp.results), resp


def test_offsets_topic_stays_small_and_replays_the_latest_commit(broker_factory) -> None:
    broker = broker_factory(extra_args=["--log-cleaner-interval-ms", "200", "--offsets-topic-partitions", "1",
                                        "--offsets-topic-segment-bytes", str(SEGMENT_BYTES)])
    with Admin(broker.address) as admin:
        admin.create_topic("events")
        with Producer(broker.address, acks=1) as producer:
            for _ in range(COMMITS):
                producer.send("events", b"x", key=b"k")
            producer.flush()
        for offset in range(1, COMMITS + 1):
            _commit(admin, "app", offset)
        assert admin.describe_group("app").offsets == {("events", 0): COMMITS}

        def size() -> int:
            return admin.describe_topics([OFFSETS_TOPIC])[0].partitions[0].size_bytes

        # 3,000 commit records are > 200 KB; compacted: one record per key plus the active segment
        wait_for(lambda: size() < 3 * SEGMENT_BYTES, 60, "the cleaner to compact __consumer_offsets")

    broker.restart()
    with Admin(broker.address) as admin:
        wait_for(lambda: admin.describe_group("app").offsets == {("events", 0): COMMITS}, 30,
                 "the coordinator to replay the compacted offsets log")


def test_compacted_topic_refuses_keyless_records(broker_factory) -> None:
    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("table", config={"cleanup_policy": "compact"})
        admin.create_topic("plain")
    with Producer(broker.address, acks=1, retries=0) as producer:
        assert producer.send("table", b"v", key=b"k").result(10).offset == 0
        with pytest.raises(InvalidRecordError, match="no key"):
            producer.send("table", b"v").result(10)
        assert producer.send("plain", b"v").result(10).offset == 0
        assert producer.send("table", b"v2", key=b"k").result(10).offset == 1  # nothing of the refusal was written


def test_compacted_topic_refuses_codecs_the_broker_cannot_read(broker_factory) -> None:
    import struct

    import grpc

    from logbroker.storage.record_batch import CRC_START, crc32c, encode_batch
    from logbroker.v1 import logbroker_pb2_grpc

    def produce(admin: Admin, topic: str, records: bytes) -> int:
        request = pb.ProduceRequest(acks=1, timeout_ms=10_000, partitions=[
            pb.ProducePartition(topic=topic, partition=0, records=records)])
        with grpc.insecure_channel(broker.address) as channel:
            resp = logbroker_pb2_grpc.BrokerStub(channel).Produce(request, timeout=10)
        return resp.results[0].error_code

    lz4 = bytearray(encode_batch([(1000, b"k", b"v", None)]))  # relabelled lz4 (codec 3), CRC recomputed
    struct.pack_into(">h", lz4, 21, struct.unpack_from(">h", lz4, 21)[0] | 3)
    struct.pack_into(">I", lz4, 17, crc32c(memoryview(lz4)[CRC_START:]))
    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("table", config={"cleanup_policy": "compact"})
        admin.create_topic("plain")
        assert produce(admin, "table", bytes(lz4)) == pb.UNSUPPORTED_COMPRESSION_TYPE
        assert produce(admin, "plain", bytes(lz4)) == pb.NONE  # not read, not compacted: stored as is
        assert produce(admin, "table", encode_batch([(1000, b"k", b"v", None)])) == pb.NONE
        assert admin.describe_topics(["table"])[0].partitions[0].size_bytes > 0
