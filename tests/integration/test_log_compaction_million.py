"""Issue 15's compaction figure in a real standalone broker: a compacted topic written with
1,000,000 updates over 1,000 keys (about 100-byte values, each carrying its key's sequence number)
shrinks after cleaning to about one record per key plus the active segment, and a consumer
reading from the beginning gets exactly the latest value of every key."""

from __future__ import annotations

import time

import pytest

from logbroker.client.admin import Admin
from logbroker.client.consumer import Consumer
from logbroker.client.producer import Producer
from tests.conftest import wait_for

UPDATES = 1_000_000
KEYS = 1_000
BATCH = 10_000  # records per send_many call
SEGMENT_BYTES = 8 << 20
PAD = b"x" * 80


def value_of(key: int, seq: int) -> bytes:
    return b"k%04d-s%06d-" % (key, seq) + PAD  # 94 bytes


@pytest.mark.slow
def test_million_updates_over_thousand_keys_compact_to_latest_values(broker_factory) -> None:
    broker = broker_factory(extra_args=["--log-cleaner-interval-ms", "200"])
    keys = [b"key-%04d" % k for k in range(KEYS)]
    started = time.monotonic()
    with Admin(broker.address) as admin:
        admin.create_topic("changelog", config={"cleanup_policy": "compact", "segment_bytes": str(SEGMENT_BYTES),
                                                "min_cleanable_dirty_ratio": "0.1"})
        with Producer(broker.address, acks=1, linger_ms=5, batch_size_bytes=1 << 20) as producer:
            futures = []
            for start in range(0, UPDATES, BATCH):  # update i is key i % KEYS's (i // KEYS)-th
                values = [value_of(i % KEYS, i // KEYS) for i in range(start, start + BATCH)]
                futures.append(producer.send_many("changelog", values, keys * (BATCH // KEYS), partition=0))
            producer.flush(60)
            for f in futures:
                assert f.exception(60) is None
        produced = time.monotonic()

        def size() -> int:
            return admin.describe_topics(["changelog"])[0].partitions[0].size_bytes

        written = UPDATES * 100
        # cleaned: 1,000 records (about 120 KB) plus the active segment (< SEGMENT_BYTES)
        wait_for(lambda: size() < SEGMENT_BYTES + (1 << 20), 60, "the cleaner to shrink the compacted topic")
        cleaned = time.monotonic()
        assert size() < written // 10

    latest = {keys[k]: value_of(k, UPDATES // KEYS - 1) for k in range(KEYS)}
    got: dict[bytes, bytes] = {}
    count = 0
    last_offset = -1
    with Consumer(broker.address, topics=None, auto_offset_reset="earliest", max_poll_records=10_000) as consumer:
        consumer.assign([("changelog", 0)])
        while last_offset < UPDATES - 1:
            batch = consumer.poll(timeout_ms=1000)
            assert batch, f"no record after offset {last_offset}"
            for m in batch:
                assert m.offset > last_offset
                last_offset = m.offset
                got[m.key] = m.value
                count += 1
    consumed = time.monotonic()
    print(f"produce {produced - started:.1f} s, clean {cleaned - produced:.1f} s, "
          f"consume {consumed - cleaned:.1f} s of {count} records")
    assert got == latest
    assert last_offset == UPDATES - 1
    # about one record per key in the cleaned segments, plus what the active segment holds
    assert count < KEYS + SEGMENT_BYTES // 100
