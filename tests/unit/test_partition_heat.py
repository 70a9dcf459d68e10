"""Partition heat on the leader (server/partition_heat.py), its API (server/apis/heat.py), the key walk
(record_batch.batch_keys) and the client's merge (client/hot_partitions.py): pure, a manual clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from logbroker.client.hot_partitions import HotKey, HotPartition, key_text, merge, render_text
from logbroker.server.apis.heat import HeatApis
from logbroker.server.heat_sampling import SampleBudget
from logbroker.server.partition_heat import DecayedRate, HeatTracker
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.storage.record_batch import (
    COMPRESSION_GZIP,
    batch_keys,
    encode_batch,
)
from logbroker.v1 import logbroker_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _batch(keys: list[bytes | None], compression: int = 0) -> bytes:
    return encode_batch([(1_700_000_000_000, k, b"v" * 20, None) for k in keys], compression)


def test_batch_keys_reads_each_record_key_plain_and_gzip() -> None:
    keys: list[bytes | None] = [b"a", None, b"x" * 300, b""]
    assert batch_keys(_batch(keys), 0, 1000) == keys
    assert batch_keys(_batch(keys, COMPRESSION_GZIP), 0, 1000) == keys
    assert batch_keys(_batch(keys), 0, 10) == [b"a", None, b"x" * 10, b""]
    two = _batch([b"k1"]) + _batch([b"k2", b"k3"])
    assert batch_keys(two, len(_batch([b"k1"])), 64) == [b"k2", b"k3"]


def test_batch_keys_gives_up_quietly_on_what_it_cannot_read() -> None:
    batch = bytearray(_batch([b"a", b"b"]))
    snappy = bytearray(batch)
    snappy[22] |= 2  # attributes (low byte): codec 2
    assert batch_keys(snappy, 0, 64) == []
    assert batch_keys(batch[:-5], 0, 64) == []  # cut short


def test_a_steady_rate_reads_true_from_the_start_and_fades_when_it_stops() -> None:
    rate = DecayedRate(0.0, tau_s=10.0)
    for i in range(1, 301):  # 100 a second, in tenths of a second
        rate.add(10, i / 10)
        if i in (20, 100, 300):
            assert rate.rate(i / 10) == pytest.approx(100, rel=0.1)
    assert rate.rate(30.0 + 60) < 1


def test_the_tracker_finds_the_hot_key_and_counts_in_and_out() -> None:
    clock = Clock()
    heat = HeatTracker(clock, SampleBudget(now_s=clock()))
    for second in range(5):
        for _ in range(10):
            heat.produced("t", 3, _batch([b"hot"] * 8 + [b"k%d" % second, None]), 10)
            heat.produced("t", 1, _batch([b"cold"]), 1)
        heat.fetched("t", 3, _batch([b"hot"] * 10))
        clock.now += 1
    top = heat.snapshot(10, 3)
    assert [(s.topic, s.partition) for s in top] == [("t", 3), ("t", 1)]
    hot = top[0]
    assert hot.keys[0].key == b"hot" and hot.keys[0].share == pytest.approx(0.8)
    assert hot.totals[1] == 500 and hot.totals[3] == 50
    assert hot.records_in_per_sec == pytest.approx(100, rel=0.25)
    assert hot.sampled_batches == 50
    assert heat.snapshot(10, 3, include=lambda t, p: p == 1)[0].partition == 1
    assert heat.totals(1) == [("t", 3, top[0].totals)]
    assert [tp for *tp, _ in heat.totals(5, include=lambda t, p: p == 1)] == [["t", 1]]  # led here only
    heat.forget("t", 3)
    assert len(heat) == 1


def test_the_tracker_samples_within_its_budget_and_bounds_its_partitions() -> None:
    clock = Clock()
    heat = HeatTracker(clock, SampleBudget(partition_bytes_per_sec=1, broker_bytes_per_sec=1, now_s=clock()),
                       partitions_max=2)
    for _ in range(100):
        heat.produced("t", 0, _batch([b"a"]), 1)
    assert heat.snapshot(1, 1)[0].sampled_batches == 1  # the first, then the budget is spent
    for p in range(5):
        heat.produced("t", p, _batch([b"a"]), 1)
    assert len(heat) == 2
    off = HeatTracker(clock, SampleBudget(partition_bytes_per_sec=0, now_s=clock()))
    off.produced("t", 0, _batch([b"a"]), 1)
    assert off.snapshot(1, 1)[0].keys == [] and off.snapshot(1, 1)[0].totals[1] == 1


def _call(apis: HeatApis, **req: object) -> pb.DescribeHotPartitionsResponse:
    return asyncio.run(apis.describe_hot_partitions(RequestContext(), pb.DescribeHotPartitionsRequest(**req)))


def test_the_api_answers_for_led_partitions_only_within_bounds() -> None:
    clock = Clock()
    heat = HeatTracker(clock, SampleBudget(now_s=clock()))
    for p in range(3):
        heat.produced("t", p, _batch([b"key-%d" % p] * (p + 1)), p + 1)
    heat.produced("other", 0, _batch([b"\x00\xff"]), 1)
    replicas = SimpleNamespace(broker_id=7, partitions={("t", 0): SimpleNamespace(is_leader=True),
                                                       ("t", 1): SimpleNamespace(is_leader=False),
                                                       ("t", 2): SimpleNamespace(is_leader=True),
                                                       ("other", 0): SimpleNamespace(is_leader=True)})
    apis = HeatApis(SimpleNamespace(ready=True), heat, replicas)  # type: ignore[arg-type]
    resp = _call(apis, topics=["t"])
    assert resp.broker_id == 7
    assert [(p.topic, p.partition) for p in resp.partitions] == [("t", 2), ("t", 0)]  # hottest first; 1 not led
    assert resp.partitions[0].keys[0].key == b"key-2" and resp.partitions[0].keys[0].share == 1.0
    assert resp.partitions[0].records_in_total == 3
    assert len(_call(apis).partitions) == 3
    assert len(_call(apis, top=1).partitions) == 1
    for bad in ({"top": -1}, {"top": 1001}, {"keys": 101}, {"topics": ["x"] * 1001}):
        with pytest.raises(RequestRejected) as refused:
            _call(apis, **bad)
        assert refused.value.status == RequestStatus.INVALID_ARGUMENT
    with pytest.raises(RequestRejected) as refused:
        _call(HeatApis(SimpleNamespace(ready=False), heat, replicas))  # type: ignore[arg-type]
    assert refused.value.status == RequestStatus.UNAVAILABLE


def test_the_client_merges_brokers_answers_hottest_first_and_shows_keys() -> None:
    a = HotPartition("t", 0, 1, 10.0, 1.0, 0.0, 0.0, keys=[HotKey(b"hot", 0.8, 0.0)])
    stale = HotPartition("t", 0, 2, 1.0, 0.1, 0.0, 0.0)  # mid-failover: the old leader's figures
    b = HotPartition("t", 1, 2, 50.0, 5.0, 0.0, 0.0, keys=[HotKey(b"\x00\x01", 0.5, 0.1, True)])
    assert merge([a, stale, b], 10) == [b, a]
    assert merge([a, b], 1) == [b]
    assert key_text(b"user-1") == "user-1" and key_text(b"\x00\x01") == "0x0001" and key_text(b"\xff") == "0xff"
    text = render_text([b, a])
    assert "hot 80%" in text and "0x0001… 50%" in text
    assert "no partition traffic" in render_text([])
