"""Heavy keys: a bounded heavy-hitters sketch (space-saving, Metwally et al. 2005) with decay (pure).

One `HeavyKeys` per partition (server/partition_heat.py keeps them on the leader) counts the keys
of the records the broker samples. It holds at most `capacity` counters; a key not held replaces
the smallest counter and inherits its count as its error bound, so any key whose true weight is
above total/capacity is held, and each held count over-estimates by at most its `error`.

Decay: every weight fades by half each `half_life_s`, lazily (all counters and the total are scaled
when time has moved since the last scaling), so heat that stopped shows less and less and a new hot
key takes over. Time is an argument (seconds, monotonic), never read here.

Bounds: `capacity` counters (KEYS_MAX at most), each key cut to `key_bytes_max` bytes (KEY_BYTES_MAX
at most; a cut key is counted under its prefix, with `truncated` set), so the memory of a sketch is
at most capacity * (key_bytes_max + a few dozen bytes). Records without a key add to the total
only: a key's share is of all sampled records.
"""

from __future__ import annotations

from dataclasses import dataclass

CAPACITY_DEFAULT = 32
KEYS_MAX = 1024
KEY_BYTES_DEFAULT = 128
KEY_BYTES_MAX = 4096
HALF_LIFE_DEFAULT_S = 60.0
_PRUNE_BELOW = 1e-9  # a counter decayed under this weight is dropped


@dataclass(frozen=True)
class KeyEstimate:
    key: bytes
    count: float  # decayed weight, an over-estimate by at most `error`
    error: float
    share: float  # count / total sampled (decayed) weight: the estimated share of records
    truncated: bool  # the key was longer than key_bytes_max; `key` is its prefix


class HeavyKeys:
    def __init__(self, capacity: int = CAPACITY_DEFAULT, key_bytes_max: int = KEY_BYTES_DEFAULT,
                 half_life_s: float = HALF_LIFE_DEFAULT_S, now_s: float = 0.0) -> None:
        if not 1 <= capacity <= KEYS_MAX:
            raise ValueError(f"capacity must be in [1, {KEYS_MAX}], got {capacity}")
        if not 1 <= key_bytes_max <= KEY_BYTES_MAX:
            raise ValueError(f"key_bytes_max must be in [1, {KEY_BYTES_MAX}], got {key_bytes_max}")
        if half_life_s <= 0:
            raise ValueError(f"half_life_s must be positive, got {half_life_s}")
        self.capacity = capacity
        self.key_bytes_max = key_bytes_max
        self.half_life_s = half_life_s
        self._counts: dict[bytes, list[float]] = {}  # key -> [count, error]
        self._truncated: set[bytes] = set()
        self._total = 0.0
        self._at_s = now_s

    @property
    def total(self) -> float:
        return self._total

    def __len__(self) -> int:
        return len(self._counts)

    def _decay(self, now_s: float) -> None:
        elapsed = now_s - self._at_s
        if elapsed <= 0:
            return
        self._at_s = now_s
        factor = 0.5 ** (elapsed / self.half_life_s)
        self._total *= factor
        gone = []
        for key, row in self._counts.items():
            row[0] *= factor
            row[1] *= factor
            if row[0] < _PRUNE_BELOW:
                gone.append(key)
        for key in gone:
            del self._counts[key]
            self._truncated.discard(key)

    def add(self, keys: list[bytes | None], now_s: float, weight: float = 1.0) -> None:
        """Count one sampled batch's keys (None: a record without a key), each with `weight`."""
        self._decay(now_s)
        counts = self._counts
        for key in keys:
            self._total += weight
            if key is None:
                continue
            if len(key) > self.key_bytes_max:
                key = key[: self.key_bytes_max]
                self._truncated.add(key)
            row = counts.get(key)
            if row is not None:
                row[0] += weight
            elif len(counts) < self.capacity:
                counts[key] = [weight, 0.0]
            else:
                victim = min(counts, key=lambda k: counts[k][0])
                floor = counts.pop(victim)[0]
                self._truncated.discard(victim)
                counts[key] = [floor + weight, floor]

    def top(self, n: int, now_s: float) -> list[KeyEstimate]:
        """The `n` heaviest keys, heaviest first (ties by key)."""
        self._decay(now_s)
        total = self._total
        rows = sorted(self._counts.items(), key=lambda kv: (-kv[1][0], kv[0]))[: max(0, n)]
        return [KeyEstimate(key, row[0], row[1], row[0] / total if total > 0 else 0.0, key in self._truncated)
                for key, row in rows]
