"""Log compaction in a real standalone broker: the LogCleaner (storage/log_cleaner.py) shrinks a
cleanup_policy=compact topic to about one record per key, and a consumer reading from the
beginning gets the latest value of every key, across the gaps compaction leaves."""

from __future__ import annotations

from logbroker.client.admin import Admin
from logbroker.client.consumer import Consumer
from logbroker.client.producer import Producer
from tests.conftest import wait_for

UPDATES = 20_000
KEYS = 100


def test_compacted_topic_shrinks_and_keeps_latest_value_per_key(broker_factory) -> None:
    broker = broker_factory(extra_args=["--log-cleaner-interval-ms", "200"])
    with Admin(broker.address) as admin:
        admin.create_topic("prices", config={"cleanup_policy": "compact", "segment_bytes": str(1 << 14),
                                             "min_cleanable_dirty_ratio": "0.01"})
        latest: dict[bytes, bytes] = {}
        with Producer(broker.address, acks=1, linger_ms=5, batch_size_bytes=2048) as producer:
            for i in range(UPDATES):
                key, value = b"key-%03d" % (i % KEYS), b"value-%06d" % i
                latest[key] = value
                producer.send("prices", value, key=key)
                if i % 200 == 199:  # bounded produce requests, so segments roll at segment_bytes
                    producer.flush()
            producer.flush()

        def size() -> int:
            return admin.describe_topics(["prices"])[0].partitions[0].size_bytes

        # 20,000 records of 20+ bytes were written (> 400 KB; the cleaner may already be at work);
        # cleaned: about one record per key in batches, plus the active segment (< segment_bytes)
        wait_for(lambda: size() < 64 << 10, 60, "the cleaner to shrink the compacted partition")

    got: dict[bytes, bytes] = {}
    offsets: list[int] = []
    with Consumer(broker.address, topics=None, auto_offset_reset="earliest") as consumer:
        consumer.assign([("prices", 0)])
        idle = 0
        while idle < 5 and len(offsets) < UPDATES:
            batch = consumer.poll(timeout_ms=300)
            idle = 0 if batch else idle + 1
            for m in batch:
                offsets.append(m.offset)
                got[m.key] = m.value
    assert offsets == sorted(set(offsets))  # strictly increasing across the gaps
    assert offsets[-1] == UPDATES - 1
    assert len(offsets) < UPDATES // 4  # the cleaned part holds about one record per key
    assert got == latest
