"""The heavy-keys sketch (server/heavy_keys.py) and the sampling budget (server/heat_sampling.py), pure."""

from __future__ import annotations

import random

import pytest

from logbroker.server.heat_sampling import SampleBudget, TokenBucket
from logbroker.server.heavy_keys import HeavyKeys


def _stream(n: int, hot_share: float, seed: int = 7) -> list[bytes | None]:
    rng = random.Random(seed)
    return [b"celebrity" if rng.random() < hot_share else f"user-{rng.randrange(100_000)}".encode() for _ in range(n)]


def test_a_key_with_80_percent_of_the_records_is_found_with_a_share_near_0_8() -> None:
    sketch = HeavyKeys(capacity=32)
    keys = _stream(50_000, 0.8)
    for i in range(0, len(keys), 500):  # batches of 500
        sketch.add(keys[i:i + 500], now_s=0.0)
    top = sketch.top(3, now_s=0.0)
    assert top[0].key == b"celebrity"
    assert top[0].share == pytest.approx(0.8, abs=0.02)
    assert top[0].error == 0  # held from its first record: counted exactly
    assert all(k.share < 0.05 for k in top[1:])


def test_memory_is_bounded_whatever_the_number_of_distinct_keys() -> None:
    sketch = HeavyKeys(capacity=16, key_bytes_max=8)
    sketch.add([f"{i:08d}-and-a-long-tail".encode() for i in range(100_000)], now_s=0.0)
    assert len(sketch) == 16
    assert all(len(k.key) <= 8 and k.truncated for k in sketch.top(16, now_s=0.0))
    assert sketch.total == 100_000


def test_records_without_a_key_count_in_the_total_only() -> None:
    sketch = HeavyKeys()
    sketch.add([b"a", None, None, None], now_s=0.0)
    (only,) = sketch.top(5, now_s=0.0)
    assert (only.key, only.share, only.truncated) == (b"a", 0.25, False)


def test_old_heat_fades_and_a_new_hot_key_takes_over() -> None:
    sketch = HeavyKeys(capacity=8, half_life_s=10.0)
    sketch.add([b"old"] * 1000, now_s=0.0)
    assert sketch.top(1, now_s=10.0)[0].count == pytest.approx(500)  # one half-life
    assert sketch.total == pytest.approx(500)
    for t in range(11, 60):  # the traffic moves to another key, 100 records a second
        sketch.add([b"new"] * 100, now_s=float(t))
    top = sketch.top(2, now_s=60.0)
    assert top[0].key == b"new" and top[0].share > 0.9
    assert top[1].key == b"old" and top[1].share < 0.05


def test_sketch_bounds_are_checked() -> None:
    for bad in ({"capacity": 0}, {"capacity": 10_000}, {"key_bytes_max": 0}, {"half_life_s": 0.0}):
        with pytest.raises(ValueError):
            HeavyKeys(**bad)  # type: ignore[arg-type]


def test_a_quiet_partition_has_every_batch_sampled() -> None:
    budget = SampleBudget(partition_bytes_per_sec=10_000, broker_bytes_per_sec=100_000)
    assert all(budget.should_sample("t", 0, 1000, now_s=i * 0.5) for i in range(100))  # 2 KB/s < 10 KB/s


def test_a_busy_partition_is_sampled_within_its_byte_budget_per_second() -> None:
    budget = SampleBudget(partition_bytes_per_sec=64_000, broker_bytes_per_sec=1_000_000)
    sampled = 0
    for i in range(10_000):  # 10 s of 1000 batches of 1 KB a second: 1 MB/s
        if budget.should_sample("t", 0, 1000, now_s=i / 1000):
            sampled += 1000
    assert 64_000 * 10 <= sampled <= 64_000 * 11 + 1000  # the rate, plus one second's burst and one batch
    assert sampled < 10_000 * 1000 / 10  # far from everything


def test_the_broker_budget_is_shared_by_all_partitions() -> None:
    budget = SampleBudget(partition_bytes_per_sec=1_000_000, broker_bytes_per_sec=10_000)
    sampled = sum(budget.should_sample("t", i % 50, 1000, now_s=i / 1000) * 1000 for i in range(5000))
    assert sampled <= 10_000 * 6 + 1000  # 5 s at the broker's rate, plus its burst and one batch


def test_a_batch_larger_than_the_budget_is_still_sampled_now_and_then() -> None:
    budget = SampleBudget(partition_bytes_per_sec=1000, broker_bytes_per_sec=1000)
    decisions = [budget.should_sample("t", 0, 5000, now_s=float(i)) for i in range(20)]
    assert decisions.count(True) == 4  # one in five: the debt of 5000 bytes takes 5 s to pay


def test_rate_zero_switches_sampling_off_and_partitions_are_bounded() -> None:
    assert not SampleBudget(partition_bytes_per_sec=0).should_sample("t", 0, 1, now_s=0.0)
    budget = SampleBudget(partitions_max=3)
    for p in range(10):
        budget.should_sample("t", p, 1, now_s=0.0)
    assert len(budget) == 3
    with pytest.raises(ValueError):
        SampleBudget(partition_bytes_per_sec=-1)


def test_token_bucket_holds_at_most_one_second() -> None:
    bucket = TokenBucket(100.0, now_s=0.0)
    bucket.tokens = -50
    assert bucket.refill(now_s=0.5) == 0
    assert bucket.refill(now_s=100.0) == 100.0
