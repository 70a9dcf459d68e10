"""Each partition's bytes in and out per second, from two samples of its leader's counters (pure).

The balancer (cluster/balancer.py) weighs a partition by what its leader carries. The leader counts
that itself (server/partition_heat.py): `bytes_in_total`, the bytes of every Produce it appended, and
`bytes_out_total`, the bytes every consumer's Fetch read (replication fetches count for neither);
each live broker answers DescribeHotPartitions for the partitions it leads. `cluster rebalance`
(cli_rebalance.py) takes that answer twice, `elapsed_s` apart, and `rates` turns the two into
per-second figures:

- the partition has a row in both samples from the same leader, and neither counter went down:
  (second - first) / elapsed_s, in and out ("counters");
- otherwise (the leader changed between the samples, so the two counters are different brokers';
  the partition is missing from a sample: no traffic on that broker yet, its broker did not answer,
  or it is past the answer's bound; a counter went down: the broker restarted or forgot the
  partition): bytes in from the growth of the partition's size between the two DescribeTopics
  reads when both sizes are known (>= 0; a broker answers -1 for a partition it holds no replica
  of), bytes out 0 ("size"); when no size is known either, 0 and 0 ("none").

A size that shrank (retention, a truncation) counts as 0 growth. Time does not enter here: the
caller measures `elapsed_s`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TopicPartition = tuple[str, int]


@dataclass(frozen=True)
class LeaderCounters:
    """One partition's row of a DescribeHotPartitions sample."""

    leader: int  # the broker that answered (led the partition when asked)
    bytes_in_total: int
    bytes_out_total: int


@dataclass(frozen=True)
class PartitionRate:
    bytes_in_per_sec: float
    bytes_out_per_sec: float
    source: str  # "counters" | "size" | "none" (see the module doc)


def _size_rate(before: int | None, after: int | None, elapsed_s: float) -> PartitionRate:
    if before is None or after is None or before < 0 or after < 0:
        return PartitionRate(0.0, 0.0, "none")
    return PartitionRate(max(0, after - before) / elapsed_s, 0.0, "size")


def rates(partitions: Iterable[TopicPartition], first: Mapping[TopicPartition, LeaderCounters],
          second: Mapping[TopicPartition, LeaderCounters], sizes_first: Mapping[TopicPartition, int],
          sizes_second: Mapping[TopicPartition, int], elapsed_s: float) -> dict[TopicPartition, PartitionRate]:
    """Per partition of `partitions`: its rates over the `elapsed_s` (> 0) between the samples."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s must be > 0, got {elapsed_s}")
    out: dict[TopicPartition, PartitionRate] = {}
    for tp in partitions:
        a, b = first.get(tp), second.get(tp)
        if (a is not None and b is not None and a.leader == b.leader
                and b.bytes_in_total >= a.bytes_in_total and b.bytes_out_total >= a.bytes_out_total):
            out[tp] = PartitionRate((b.bytes_in_total - a.bytes_in_total) / elapsed_s,
                                    (b.bytes_out_total - a.bytes_out_total) / elapsed_s, "counters")
        else:
            out[tp] = _size_rate(sizes_first.get(tp), sizes_second.get(tp), elapsed_s)
    return out
