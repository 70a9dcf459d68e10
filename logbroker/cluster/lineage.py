"""Partition lineage: where a grown topic split, and when a child partition may be read (pure).

Keys go to partitions by jump consistent hash (hashing.py). Growing a topic from N to M partitions
moves a key only into one of the new partitions N..M-1, and a key of any old partition may move; so
every new ("child") partition has every old partition as a parent. The moment of the change is
recorded as a `Split`: the old count, the new count, and each old partition's log end offset when
the count changed (its "split offset"). Records of a moved key below a parent's split offset were
written before the change; records at or after it are never of a moved key, because the broker
refuses a batch holding a key that hashes elsewhere under the current count
(`misplaced_keys`, checked in the produce path of a grown topic).

So per-key order holds if a reader delivers nothing of a child before every parent has been read up
to its split offset (`child_ready`). Growing again (8 -> 12) adds a split whose parents include the
children of the first one; those are gated themselves, so the rule composes.

Design choices (issue 21, "reshard in order"):

- The split point is the old partitions' log end offsets read by the standalone broker in the same
  event-loop step that grows the topic (no await between: server/broker.py `_create_partitions_one`),
  stored with the new assignment in one LMDB transaction; from that step on the produce path checks a
  grown topic's keys (`server/apis/produce_fetch.check_keys_placed`), in the same step as the append.
- A refused batch (PARTITION_COUNT_CHANGED) is re-routed by the producer itself
  (client/producer/reroute.py): it mutes the partition, lets its batches in flight be answered,
  learns the new count, and sends the refused batch's records and everything of the partition
  after them again, in order, each to its key's partition under the new count (a moved key's go to
  the front of its new partition, which holds what was sent after the producer learnt of the
  growth until the batches opened before it are done). Futures resolve where the records landed.
  A record sent with an explicit partition whose key moved fails (the user chose the partition), as
  does a record refused again after a re-route, or past its delivery_timeout_ms.
- A producer declares per batch the partition count it placed the keys by
  (`keys_placed_by_partitions`: client/producer/batch.py `placed_by`; 0 for a key whose partition
  the user chose). A batch declaring the current count is taken without decoding anything: the hot
  path stays free of per-record work once producers know the new count. Only batches declaring an
  older count, or none (other clients), have their keys decoded and checked.
- The check decodes batch keys only for topics that grew, and `key_order_on_growth=false` turns it
  off (explicitly partitioned keyed records are then accepted anywhere, as in Kafka).
- Readers gate only the children: a group consumer by its own positions and the group's committed
  offsets (client/consumer/lineage_gate.py), a share group by its parents' settled start offsets
  (group/share_coordinator.py `_held`).

In a cluster (ZooKeeper) the leaders of the old partitions are on other brokers and learn the new
count asynchronously (the controller's UpdateMetadata carries the splits), so the split is written
*pending* first (`end_offsets` empty) with the new assignment; the broker that grows the topic then
asks each old partition's leader for its log end offset once that leader refuses moved keys
(ListOffsets `split_partitions`) and writes the split complete (server/cluster_member.py).
While a split is pending its children's parents have the offset `SPLIT_PENDING` and readers hold
the children (`child_ready`). A group member that owns a parent and never commits it (auto-commit
off, no commit() call) holds another member's child until it does.

Stored in the topic's metadata as JSON (`splits_to_json`)::

    [{"from": 6, "to": 8, "end_offsets": [o0, o1, o2, o3, o4, o5]}, ...]   oldest first
    [{"from": 6, "to": 8, "end_offsets": []}]                                a pending split (cluster)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from logbroker.cluster.hashing import partition_for_key

SPLIT_PENDING = -1  # a parent's split offset while its split is pending: not known yet, the child is held
SPLITS_MAX = 1000  # splits kept per topic (each grows it; PARTITIONS_MAX bounds the count anyway)


@dataclass(frozen=True)
class Split:
    """A topic grew from `from_partitions` to `to_partitions`; `end_offsets[p]`: partition p's log end
    offset at that moment (its split offset), for every p < from_partitions; empty while the split
    is pending (a cluster has not read them yet)."""

    from_partitions: int
    to_partitions: int
    end_offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        if not 0 < self.from_partitions < self.to_partitions:
            raise ValueError(f"a split grows the count: {self.from_partitions} -> {self.to_partitions}")
        if self.end_offsets and (len(self.end_offsets) != self.from_partitions or any(o < 0 for o in self.end_offsets)):
            raise ValueError(f"a split needs one offset >= 0 per old partition, got {self.end_offsets}")

    @property
    def pending(self) -> bool:
        return not self.end_offsets


def parents_of(splits: Sequence[Split], partition: int) -> dict[int, int]:
    """The parents of `partition` and their split offsets (empty: an original partition;
    SPLIT_PENDING for each while its split is pending)."""
    for s in splits:
        if s.from_partitions <= partition < s.to_partitions:
            return {p: SPLIT_PENDING if s.pending else s.end_offsets[p] for p in range(s.from_partitions)}
    return {}


def complete_split(splits: Sequence[Split], to_partitions: int, end_offsets: Sequence[int]) -> list[Split]:
    """`splits` with the pending split to `to_partitions` given its offsets (unchanged if there is
    no such pending split)."""
    return [Split(s.from_partitions, s.to_partitions, tuple(end_offsets))
            if s.pending and s.to_partitions == to_partitions else s for s in splits]


def child_ready(parents: Mapping[int, int], consumed: Mapping[int, int]) -> bool:
    """May a reader deliver a child's records? Yes when every parent has been consumed (its next
    offset to read, or its committed offset) up to its split offset; a parent with no known
    position, or whose split offset is not known yet (SPLIT_PENDING), holds the child back."""
    return all(offset >= 0 and consumed.get(p, -1) >= offset for p, offset in parents.items())


def waiting_on(parents: Mapping[int, int], consumed: Mapping[int, int]) -> dict[int, int]:
    """The parents still holding a child back, with the offsets they must reach."""
    return {p: o for p, o in parents.items() if o < 0 or consumed.get(p, -1) < o}


def misplaced_keys(keys: Iterable[bytes | None], partition: int, partitions: int) -> int:
    """How many of `keys` do not hash to `partition` under `partitions` (null keys never do)."""
    return sum(1 for k in keys if k is not None and partition_for_key(k, partitions) != partition)


def moved_keys(keys: Iterable[bytes], before: int, after: int) -> int:
    """How many keys change partition when a topic grows from `before` to `after` partitions."""
    return sum(1 for k in keys if partition_for_key(k, before) != partition_for_key(k, after))


def splits_to_json(splits: Sequence[Split]) -> list[dict[str, Any]]:
    return [{"from": s.from_partitions, "to": s.to_partitions, "end_offsets": list(s.end_offsets)} for s in splits]


def splits_from_json(raw: object) -> list[Split]:
    if not isinstance(raw, list):
        return []
    return [Split(int(d["from"]), int(d["to"]), tuple(int(o) for o in d["end_offsets"])) for d in raw]
