"""Consumer lag: how far a group's committed offset is behind its partition's end.

One definition, shared by `logbroker groups describe` (client/admin.py's `Admin.group_lag`) and the
coordinator's `logbroker_consumer_group_lag` metric (server/cluster_metrics.py), so both always
agree: the lag of a partition is `max(end - committed, 0)`, where `committed` is the group's
committed offset (the next offset it will read) and `end` is the partition's *high watermark*
(ListOffsets with timestamp -1, what a consumer can read; not the leader's log end offset, which
may hold records not yet replicated). No committed offset, or no known end (no leader): no lag
(None), not 0. A committed offset past the end (the log was truncated or deleted below it)
counts as 0.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

TopicPartition = tuple[str, int]


def partition_lag(committed: int | None, end: int | None) -> int | None:
    """The lag of one partition (module doc); None when either side is unknown."""
    if committed is None or end is None or committed < 0 or end < 0:
        return None
    return max(end - committed, 0)


def group_lags(committed: Mapping[TopicPartition, int],
               ends: Mapping[TopicPartition, int]) -> Iterator[tuple[TopicPartition, int]]:
    """(partition, lag) for each committed partition whose end is known, in partition order."""
    for tp in sorted(committed):
        lag = partition_lag(committed[tp], ends.get(tp))
        if lag is not None:
            yield tp, lag


def wanted_partitions(groups: Iterable[Mapping[TopicPartition, int]]) -> set[TopicPartition]:
    """Every partition some group has committed: those whose end the lag needs."""
    out: set[TopicPartition] = set()
    for committed in groups:
        out.update(committed)
    return out
