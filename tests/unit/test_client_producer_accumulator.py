"""The record accumulator on a manual clock: linger, delivery timeout, backoff decide readiness;
and the mapping of the producer's retry settings onto the retry policy."""

from __future__ import annotations

import random

from logbroker.client.backoff import client_retry_policy, retry_backoff_s
from logbroker.client.circuit import Circuits
from logbroker.client.producer.accumulator import RecordAccumulator
from logbroker.client.producer.batch import RECORD_OVERHEAD_BYTES, ProducerBatch, TopicState
from logbroker.client.producer.future import _BatchResult
from logbroker.clock import ManualClock
from logbroker.storage.record_batch import COMPRESSION_NONE


class FakeMetadata:
    last_refresh_monotonic = 0.0

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.leaders: dict[tuple[str, int], str | None] = {}
        self.circuits = Circuits(failures_max=2, cool_down_ms=1_000, clock=clock or ManualClock())

    def leader(self, topic: str, partition: int) -> str | None:
        return self.leaders.get((topic, partition), "b1:9092")


def accumulator(clock: ManualClock, metadata: FakeMetadata | None = None, linger_ms: int = 50,
                delivery_timeout_ms: int = 10_000) -> tuple[RecordAccumulator, TopicState]:
    acc = RecordAccumulator(
        metadata or FakeMetadata(), linger_ms=linger_ms, batch_size_bytes=16 << 10, max_request_bytes=1 << 20,
        delivery_timeout_ms=delivery_timeout_ms, buffer_memory_bytes=1 << 20, max_block_ms=1000,
        compression=COMPRESSION_NONE, max_in_flight_requests=5, metadata_max_age_ms=300_000, clock=clock,  # type: ignore[arg-type]
    )
    ts = TopicState("t", 2)
    acc._topics["t"] = ts
    return acc, ts


def append(acc: RecordAccumulator, ts: TopicState, partition: int, n: int = 1) -> list[tuple[_BatchResult, int, int]]:
    segments: list[tuple[_BatchResult, int, int]] = []
    values = [b"v%d" % i for i in range(n)]
    acc.append_records(ts, partition, None, values, [len(v) for v in values], 1_000, None,
                       RECORD_OVERHEAD_BYTES, segments)
    return segments


def drain(acc: RecordAccumulator, clock: ManualClock) -> tuple[list[tuple[str, list[ProducerBatch]]],
                                                               list[ProducerBatch], float | None]:
    with acc._lock:
        return acc.drain(clock.monotonic_ms() / 1000)


def test_a_batch_is_ready_once_linger_passes_on_the_injected_clock():
    clock = ManualClock()
    acc, ts = accumulator(clock, linger_ms=50)
    append(acc, ts, 0, 3)
    requests, expired, wake_at = drain(acc, clock)
    assert requests == [] and expired == []
    assert wake_at == 0.05
    clock.advance(49)
    assert drain(acc, clock)[0] == []
    clock.advance(1)
    requests, expired, _ = drain(acc, clock)
    assert expired == []
    assert [(leader, [b.record_count for b in batches]) for leader, batches in requests] == [("b1:9092", [3])]
    assert drain(acc, clock)[0] == []  # the partition is muted while its batch is in flight


def test_a_broker_with_an_open_circuit_gets_no_batches_until_its_cool_down_then_one_probe_request():
    clock = ManualClock()
    md = FakeMetadata(clock)
    acc, ts = accumulator(clock, md, linger_ms=0)
    md.circuits.failed("b1:9092")
    md.circuits.failed("b1:9092")  # open for 1 s
    append(acc, ts, 0, 2)
    requests, _, wake_at = drain(acc, clock)
    assert requests == [] and wake_at == 1.0  # woken when the probe may go
    clock.advance(1_000)
    requests, _, _ = drain(acc, clock)
    assert [(leader, [b.record_count for b in batches]) for leader, batches in requests] == [("b1:9092", [2])]
    append(acc, ts, 1)
    assert drain(acc, clock)[0] == []  # nothing more to that broker until the probe is answered
    md.circuits.succeeded("b1:9092")
    assert [(leader, [b.record_count for b in batches]) for leader, batches in drain(acc, clock)[0]] == [
        ("b1:9092", [1])]


def test_flush_makes_a_lingering_batch_ready_at_once():
    clock = ManualClock()
    acc, ts = accumulator(clock, linger_ms=10_000)
    append(acc, ts, 1)
    assert drain(acc, clock)[0] == []
    acc._flushing += 1
    assert len(drain(acc, clock)[0]) == 1


def test_a_batch_past_its_delivery_timeout_expires():
    clock = ManualClock()
    metadata = FakeMetadata()
    metadata.leaders[("t", 0)] = None  # no leader: it cannot ship
    acc, ts = accumulator(clock, metadata, linger_ms=0, delivery_timeout_ms=2_000)
    (result, _, _), = append(acc, ts, 0, 2)
    requests, expired, _ = drain(acc, clock)
    assert requests == [] and expired == [] and "t" in acc._refresh_topics
    clock.advance(2_000)
    requests, expired, _ = drain(acc, clock)
    assert requests == [] and [b.record_count for b in expired] == [2]
    assert acc._buffered_bytes == 0  # expiring releases the batch's buffer memory


def test_a_backing_off_batch_waits_for_its_retry_time():
    clock = ManualClock()
    acc, ts = accumulator(clock, linger_ms=0)
    append(acc, ts, 0)
    (_, [batch]), = drain(acc, clock)[0]
    with acc._lock:  # what the sender does with a retriable failure
        batch.acc.in_flight = None
        batch.retry_at = clock.monotonic_ms() / 1000 + 0.2
        batch.acc.queue.appendleft(batch)
    requests, _, wake_at = drain(acc, clock)
    assert requests == [] and wake_at == 0.2
    clock.advance(200)
    assert drain(acc, clock)[0] == [("b1:9092", [batch])]


def test_retry_settings_map_onto_the_policy():
    policy = client_retry_policy(100, retries=5)
    assert (policy.initial_ms, policy.max_ms, policy.multiplier, policy.jitter, policy.retries) == (100, 1000, 2.0, 0.2, 5)
    assert client_retry_policy(5000).max_ms == 5000  # a base above the 1 s cap is kept as the cap
    assert client_retry_policy(100, retries=2**31 - 1).retries is None  # the producer default: deadline-bound
    rng = random.Random(1)
    waits = [policy.delay_ms(n, rng) for n in range(1, 7)]
    bases = [100, 200, 400, 800, 1000]
    assert all(w is not None and 0.8 * b <= w <= b for w, b in zip(waits, bases, strict=False))
    assert waits[-1] is None  # retries=5: a sixth retry is not made
    assert retry_backoff_s(1, 100) == 0.1 and retry_backoff_s(4, 100) == 0.8 and retry_backoff_s(30, 100) == 1.0
