"""Tombstones in a real standalone broker (compaction.py's rule, on real segment files): after a
clean, a consumer reading from the beginning sees a deleted key's tombstone (not its old value);
once delete_retention_ms has passed since the tombstone's segment was last written, a later clean
removes the tombstone too, and the key is gone."""

from __future__ import annotations

import time

from logbroker.client.admin import Admin
from logbroker.client.consumer import Consumer
from logbroker.client.producer import Producer
from tests.conftest import wait_for

DELETE_RETENTION_MS = 4000  # long enough for the first clean to come before it (cleaner every 200 ms)
FILLER_KEYS = 50


def _filler(producer: Producer, start: int, count: int) -> None:
    """Records of other keys, enough to roll segments (so the tombstone's segment closes and new
    dirty segments make the log cleanable again)."""
    for i in range(start, start + count):
        producer.send("accounts", b"f" * 200, key=b"filler-%02d" % (i % FILLER_KEYS))
        if i % 50 == 49:
            producer.flush()
    producer.flush()


def _read_all(address: str) -> list[tuple[int, bytes | None, bytes | None]]:
    out: list[tuple[int, bytes | None, bytes | None]] = []
    with Consumer(address, topics=None, auto_offset_reset="earliest") as consumer:
        consumer.assign([("accounts", 0)])
        idle = 0
        while idle < 3:
            batch = consumer.poll(timeout_ms=300)
            idle = 0 if batch else idle + 1
            out += [(m.offset, m.key, m.value) for m in batch]
    return out


def _victim(records: list[tuple[int, bytes | None, bytes | None]]) -> list[bytes | None]:
    return [value for _, key, value in records if key == b"victim"]


def test_tombstone_kept_for_delete_retention_then_removed(broker_factory) -> None:
    broker = broker_factory(extra_args=["--log-cleaner-interval-ms", "200"])
    with Admin(broker.address) as admin, Producer(broker.address, acks=1, linger_ms=5) as producer:
        admin.create_topic("accounts", config={
            "cleanup_policy": "compact", "segment_bytes": str(1 << 14), "min_cleanable_dirty_ratio": "0.01",
            "delete_retention_ms": str(DELETE_RETENTION_MS)})
        producer.send("accounts", b"balance-100", key=b"victim")
        producer.flush()
        producer.send("accounts", None, key=b"victim")  # the tombstone
        producer.flush()
        written_s = time.monotonic()
        _filler(producer, 0, 300)  # about 70 KB: the tombstone's segment is closed

        # the first clean drops the old value and keeps the tombstone (its segment is younger
        # than delete_retention_ms)
        seen: list[list[bytes | None]] = []
        wait_for(lambda: seen.append(_victim(_read_all(broker.address))) or seen[-1] != [b"balance-100", None],
                 30, "a clean of the tombstone's segment")
        assert seen[-1] == [None], seen[-1]

        # later cleans (driven by more dirty segments) remove the tombstone once its segment is
        # older than delete_retention_ms; never before
        sent = [300]

        def tombstone_gone() -> bool:
            _filler(producer, sent[0], 150)
            sent[0] += 150
            victim = _victim(_read_all(broker.address))
            if victim != [None]:
                assert victim == [] and time.monotonic() - written_s >= DELETE_RETENTION_MS / 1000, victim
            return victim == []

        wait_for(tombstone_gone, 60, "a clean after delete_retention_ms to remove the tombstone", interval_s=0.5)
        records = _read_all(broker.address)
        offsets = [o for o, _, _ in records]
        assert offsets == sorted(set(offsets))
        assert {k for _, k, _ in records} == {b"filler-%02d" % i for i in range(FILLER_KEYS)}
