"""Partition heat on the leader: bytes and records in and out per partition, as rates and totals,
and each partition's heaviest keys, for `DescribeHotPartitions` (server/apis/admin.py, `logbroker
topics hot`) and `/metrics` (server/metrics.py: `logbroker_partition_*_total`).

Fed on the broker's event loop by the request layer (server/apis/produce_fetch.py): `produced` for
each partition a Produce appended (the leader), `fetched` for each partition a consumer's Fetch read
(follower fetches are not counted). Per call this is a few additions and one sampling decision per
appended batch (server/heat_sampling.py: a byte budget per second, per partition and per broker);
only a sampled batch's record keys are read (`record_batch.batch_keys`) and counted in the
partition's space-saving sketch (server/heavy_keys.py). Nothing else is decoded.

Rates are exponentially decayed (`RATE_TAU_S`): rate = decayed sum / (tau * (1 - e^(-age/tau))),
age = time since the partition was first seen (at least one second), so a steady rate reads true
from the start and a stopped one fades within a few tau. Time comes from an injected clock
(monotonic seconds). Bounds: at most `partitions_max` partitions (the least recently fed is
forgotten), each with one sketch (heavy_keys.py bounds its keys and key bytes).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from logbroker.server.heat_sampling import SampleBudget
from logbroker.server.heavy_keys import (
    CAPACITY_DEFAULT,
    HALF_LIFE_DEFAULT_S,
    KEY_BYTES_DEFAULT,
    HeavyKeys,
    KeyEstimate,
)
from logbroker.storage.record_batch import batch_keys, count_records, iter_batches

RATE_TAU_S = 10.0
PARTITIONS_MAX_DEFAULT = 10_000
_MIN_AGE_S = 1.0


class DecayedRate:
    """Events per second, exponentially decayed with time constant `tau_s` (pure: time as arguments)."""

    __slots__ = ("_at_s", "_first_s", "_sum", "tau_s")

    def __init__(self, now_s: float, tau_s: float = RATE_TAU_S) -> None:
        self.tau_s = tau_s
        self._sum = 0.0
        self._at_s = self._first_s = now_s

    def _decay(self, now_s: float) -> None:
        if now_s > self._at_s:
            self._sum *= math.exp(-(now_s - self._at_s) / self.tau_s)
            self._at_s = now_s

    def add(self, amount: float, now_s: float) -> None:
        self._decay(now_s)
        self._sum += amount

    def rate(self, now_s: float) -> float:
        self._decay(now_s)
        age = max(now_s - self._first_s, _MIN_AGE_S)
        return self._sum / (self.tau_s * -math.expm1(-age / self.tau_s))


class PartitionHeat:
    """One partition's traffic and keys."""

    def __init__(self, now_s: float, keys: HeavyKeys) -> None:
        self.bytes_in = DecayedRate(now_s)
        self.records_in = DecayedRate(now_s)
        self.bytes_out = DecayedRate(now_s)
        self.records_out = DecayedRate(now_s)
        self.totals = [0, 0, 0, 0]  # bytes in, records in, bytes out, records out
        self.keys = keys
        self.sampled_batches = 0


@dataclass(frozen=True)
class PartitionHeatSnapshot:
    topic: str
    partition: int
    bytes_in_per_sec: float
    records_in_per_sec: float
    bytes_out_per_sec: float
    records_out_per_sec: float
    totals: tuple[int, int, int, int]  # bytes in, records in, bytes out, records out (since first seen)
    sampled_batches: int
    sampled_records: float  # decayed weight of the sampled records (the keys' shares are of these)
    keys: list[KeyEstimate]


class HeatTracker:
    def __init__(self, clock: Callable[[], float] = time.monotonic, budget: SampleBudget | None = None,
                 keys_capacity: int = CAPACITY_DEFAULT, key_bytes_max: int = KEY_BYTES_DEFAULT,
                 half_life_s: float = HALF_LIFE_DEFAULT_S, partitions_max: int = PARTITIONS_MAX_DEFAULT) -> None:
        """`budget` None: the default sampling budget (heat_sampling.py)."""
        if partitions_max < 1:
            raise ValueError(f"partitions_max must be >= 1, got {partitions_max}")
        self._clock = clock
        self.budget = budget if budget is not None else SampleBudget(now_s=clock())
        self._keys_capacity = keys_capacity
        self._key_bytes_max = key_bytes_max
        self._half_life_s = half_life_s
        self._partitions_max = partitions_max
        self._heat: OrderedDict[tuple[str, int], PartitionHeat] = OrderedDict()

    def __len__(self) -> int:
        return len(self._heat)

    def _get(self, topic: str, partition: int, now_s: float) -> PartitionHeat:
        tp = (topic, partition)
        heat = self._heat.get(tp)
        if heat is None:
            keys = HeavyKeys(self._keys_capacity, self._key_bytes_max, self._half_life_s, now_s)
            heat = self._heat[tp] = PartitionHeat(now_s, keys)
            if len(self._heat) > self._partitions_max:
                self._heat.popitem(last=False)
        else:
            self._heat.move_to_end(tp)
        return heat

    def produced(self, topic: str, partition: int, records: bytes | memoryview, record_count: int) -> None:
        """One partition's successful append of `records` (whole, validated batches)."""
        now = self._clock()
        heat = self._get(topic, partition, now)
        nbytes = len(records)
        heat.bytes_in.add(nbytes, now)
        heat.records_in.add(record_count, now)
        heat.totals[0] += nbytes
        heat.totals[1] += record_count
        budget = self.budget
        if not budget.enabled:
            return
        for h, pos in iter_batches(records):
            if budget.should_sample(topic, partition, h.size_bytes, now):
                # one byte over the cut, so the sketch sees which keys were longer
                heat.keys.add(batch_keys(records, pos, self._key_bytes_max + 1), now)
                heat.sampled_batches += 1

    def fetched(self, topic: str, partition: int, records: bytes | memoryview) -> None:
        """One partition's records sent to a consumer (whole batches; counted from their headers)."""
        now = self._clock()
        heat = self._get(topic, partition, now)
        nbytes, count = len(records), count_records(records)
        heat.bytes_out.add(nbytes, now)
        heat.records_out.add(count, now)
        heat.totals[2] += nbytes
        heat.totals[3] += count

    def forget(self, topic: str, partition: int) -> None:
        self._heat.pop((topic, partition), None)
        self.budget.forget(topic, partition)

    def partitions(self) -> Iterable[tuple[str, int]]:
        return list(self._heat)

    def snapshot(self, top: int, keys: int, include: Callable[[str, int], bool] | None = None
                 ) -> list[PartitionHeatSnapshot]:
        """The `top` hottest partitions (by bytes in per second, then bytes out) that `include`
        accepts, each with its `keys` heaviest keys."""
        now = self._clock()
        rows = []
        for (topic, partition), heat in self._heat.items():
            if include is not None and not include(topic, partition):
                continue
            rows.append(((heat.bytes_in.rate(now), heat.bytes_out.rate(now)), topic, partition, heat))
        rows.sort(key=lambda r: (-r[0][0], -r[0][1], r[1], r[2]))
        out = []
        for (bytes_in, bytes_out), topic, partition, heat in rows[: max(0, top)]:
            t = heat.totals
            out.append(PartitionHeatSnapshot(
                topic, partition, bytes_in, heat.records_in.rate(now), bytes_out, heat.records_out.rate(now),
                (t[0], t[1], t[2], t[3]), heat.sampled_batches, heat.keys.total, heat.keys.top(keys, now)))
        return out

    def totals(self, top: int, include: Callable[[str, int], bool] | None = None
               ) -> list[tuple[str, int, tuple[int, int, int, int]]]:
        """(topic, partition, totals) of the `top` partitions that `include` accepts (/metrics: those
        led here; a partition led elsewhere now would show a frozen counter) by bytes in since first seen."""
        items = [kv for kv in self._heat.items() if include is None or include(*kv[0])]
        rows = sorted(items, key=lambda kv: (-kv[1].totals[0], kv[0]))[: max(0, top)]
        return [(tp[0], tp[1], (h.totals[0], h.totals[1], h.totals[2], h.totals[3])) for tp, h in rows]
