"""Consistent hashing, shared by client and server.

- key -> partition: jump consistent hash (Lamping & Veach, 2014) of the unsigned 64-bit mmh3 hash of
  the key. Growing N -> N+1 partitions moves only ~1/(N+1) of the keys, all into the new partition.
- (topic, partition) -> replicas: rendezvous (highest-random-weight) hashing over brokers, so a broker
  joining or leaving moves the fewest replicas; racks are spread before a rack gets a second replica.
"""

from __future__ import annotations

from collections.abc import Sequence

import mmh3

_MASK64 = 0xFFFFFFFFFFFFFFFF
_JUMP_MULTIPLIER = 2862933555777941757


def key_hash64(key: bytes) -> int:
    return mmh3.hash64(key, signed=False)[0]


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in [0, buckets) for a 64-bit key."""
    if buckets <= 0:
        raise ValueError("buckets must be positive")
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MULTIPLIER + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def partition_for_key(key: bytes, partitions: int) -> int:
    return jump_hash(key_hash64(key), partitions)


def assign_replicas(
    topic: str, partition: int, brokers: Sequence[int], replication_factor: int,
    racks: dict[int, str] | None = None,
) -> list[int]:
    """Replicas of one partition by rendezvous hashing of (topic, partition, broker), rack-aware.

    Brokers are ranked by weight; the first pass takes at most one broker per rack, later passes fill
    up from the remaining ranking. The first replica is the preferred leader.
    """
    if replication_factor > len(brokers):
        raise ValueError(f"replication factor {replication_factor} > {len(brokers)} brokers")
    ranked = sorted(
        brokers, key=lambda b: mmh3.hash64(f"{topic}\x00{partition}\x00{b}".encode(), signed=False)[0],
        reverse=True,
    )
    if not racks:
        return list(ranked[:replication_factor])
    chosen: list[int] = []
    seen_racks: set[str] = set()
    for b in ranked:
        rack = racks.get(b, "")
        if rack not in seen_racks:
            chosen.append(b)
            seen_racks.add(rack)
        if len(chosen) == replication_factor:
            return chosen
    for b in ranked:
        if b not in chosen:
            chosen.append(b)
            if len(chosen) == replication_factor:
                break
    return chosen


def balance_leaders(assignment: dict[int, list[int]], existing: dict[int, list[int]] | None = None) -> dict[int, list[int]]:
    """Reorder each replica list so preferred leaders (the first replica) spread evenly over brokers.

    Rendezvous hashing picks *which* brokers hold a partition (minimal movement); this only picks
    which of them leads, greedily giving each partition to the member with the fewest leaderships
    so far (counting `existing` partitions of the topic). Replica sets are unchanged.
    """
    led: dict[int, int] = {}
    for replicas in (existing or {}).values():
        if replicas:
            led[replicas[0]] = led.get(replicas[0], 0) + 1
    out: dict[int, list[int]] = {}
    for p in sorted(assignment):
        replicas = assignment[p]
        if not replicas:
            out[p] = replicas
            continue
        leader = min(replicas, key=lambda b: (led.get(b, 0), replicas.index(b)))
        led[leader] = led.get(leader, 0) + 1
        out[p] = [leader] + [b for b in replicas if b != leader]
    return out
