"""A standalone broker that dies abruptly in the middle of a clean (os._exit at each step of the
swap, via the test-only LOGBROKER_TEST_CLEANER_CRASH_AT hook: no close, no flush, as a kill -9)
restarts with a consistent log: it serves, every key reads back at its latest acknowledged value,
offsets strictly increase, recovery leaves no `.cleaned`/`.swap` file, and a later clean still
shrinks the partition (storage/segment_cleaner.py "Files and the swap", log_loader.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from logbroker.client.admin import Admin
from logbroker.client.consumer import Consumer
from logbroker.client.producer import Producer
from logbroker.storage.segment_cleaner import CRASH_ENV, CRASH_EXIT_CODE, STEPS
from logbroker.testing import BrokerProcess
from tests.conftest import free_port, wait_for

TOPIC = "prices"
UPDATES = 10_000
KEYS = 100
CLEANER_OFF = ["--log-cleaner-interval-ms", "0"]
CLEANER_ON = ["--log-cleaner-interval-ms", "200"]


def produce(address: str) -> dict[bytes, bytes]:
    """UPDATES acks=all updates over KEYS keys into a compacted topic of small segments; the
    latest acknowledged value of every key."""
    with Admin(address) as admin:
        admin.create_topic(TOPIC, config={"cleanup_policy": "compact", "segment_bytes": str(1 << 14),
                                          "min_cleanable_dirty_ratio": "0.01"})
    latest: dict[bytes, bytes] = {}
    with Producer(address, acks="all", linger_ms=5, batch_size_bytes=2048) as producer:
        futures = []
        for i in range(UPDATES):
            key, value = b"key-%03d" % (i % KEYS), b"value-%06d" % i
            futures.append((key, value, producer.send(TOPIC, value, key=key)))
            if i % 200 == 199:  # bounded produce requests, so segments roll at segment_bytes
                producer.flush()
        producer.flush()
    for key, value, future in futures:
        future.result(timeout=10)  # acknowledged (raises otherwise)
        latest[key] = value
    return latest


def consume_all(address: str) -> tuple[list[int], dict[bytes, bytes]]:
    got: dict[bytes, bytes] = {}
    offsets: list[int] = []
    with Consumer(address, topics=None, auto_offset_reset="earliest") as consumer:
        consumer.assign([(TOPIC, 0)])
        idle = 0
        while idle < 5 and (not offsets or offsets[-1] < UPDATES - 1):
            batch = consumer.poll(timeout_ms=300)
            idle = 0 if batch else idle + 1
            for m in batch:
                offsets.append(m.offset)
                got[m.key] = m.value
    return offsets, got


def check_consistent(address: str, latest: dict[bytes, bytes]) -> int:
    """The log reads back whole; returns how many records it holds."""
    offsets, got = consume_all(address)
    assert offsets == sorted(set(offsets))  # strictly increasing across the gaps
    assert offsets[-1] == UPDATES - 1
    assert got == latest
    return len(offsets)


def leftovers(data_dir: Path) -> list[Path]:
    return sorted([*data_dir.rglob("*.log.cleaned"), *data_dir.rglob("*.log.swap")])


def size_bytes(address: str) -> int:
    with Admin(address) as admin:
        return admin.describe_topics([TOPIC])[0].partitions[0].size_bytes


@pytest.mark.parametrize("step", STEPS)
def test_broker_dying_mid_clean_restarts_consistent(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path, step: str,
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    first = broker_factory(data_dir=data_dir, port=port, extra_args=CLEANER_OFF)
    latest = produce(first.address)
    assert check_consistent(first.address, latest) == UPDATES  # nothing cleaned yet
    first.stop()

    crashing = broker_factory(data_dir=data_dir, port=port, extra_args=CLEANER_ON, env={CRASH_ENV: step},
                              start=False)
    crashing.start(wait_serving=False)
    wait_for(lambda: not crashing.running(), 60, f"the broker to die at {step} of its first clean")
    assert crashing.stop() == CRASH_EXIT_CODE, crashing.log_text()[-3000:]
    left = [p.name for p in leftovers(data_dir)]
    if step == "before_swap":
        assert any(n.endswith(".cleaned") for n in left), left
    elif step == "between_renames":
        assert any(n.endswith(".swap") for n in left), left

    # recovery alone (no cleaner): serves the same records, no temporary file left
    recovered = broker_factory(data_dir=data_dir, port=port, extra_args=CLEANER_OFF)
    assert leftovers(data_dir) == []
    held = check_consistent(recovered.address, latest)
    if step == "before_swap":
        assert held == UPDATES  # nothing was swapped in
    else:
        assert held < UPDATES  # the first segment is the cleaned one
    before = size_bytes(recovered.address)
    recovered.stop()

    # a later clean works: the partition shrinks to about one record per key, still consistent
    cleaning = broker_factory(data_dir=data_dir, port=port, extra_args=CLEANER_ON)
    wait_for(lambda: size_bytes(cleaning.address) < min(before, 64 << 10), 60,
             "the cleaner to shrink the recovered partition")
    assert check_consistent(cleaning.address, latest) < UPDATES // 4
    cleaning.stop()
    assert leftovers(data_dir) == []
