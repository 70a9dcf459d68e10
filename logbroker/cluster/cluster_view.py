"""`ClusterView`: the cluster's topics and brokers as one broker currently knows them.

A read-only interface (a `typing.Protocol`) for the code that routes by metadata without owning it:
the group coordinator and the request layer. The broker implements it (standalone: from its own
topics; cluster: from the controller's metadata image).
"""

from __future__ import annotations

from typing import Any, Protocol

from logbroker.v1 import logbroker_pb2 as pb


class ClusterView(Protocol):
    def topic_names(self) -> list[str]:
        """Every topic, sorted."""
        ...

    def topic_partitions(self, topic: str) -> dict[int, pb.PartitionState] | None:
        """Leader, epoch, replicas and ISR of every partition of `topic` (None: no such topic)."""
        ...

    def check_partition(self, topic: str, index: int) -> None:
        """Raise UNKNOWN_TOPIC_OR_PARTITION unless the cluster has this partition."""
        ...

    def cluster_brokers(self) -> tuple[list[pb.BrokerInfo], int, int]:
        """(live brokers, controller id, controller epoch)."""
        ...


def partition_ids(cluster: Any, topic: str) -> list[int]:
    """The partition numbers of `topic` ([] for none), without building its PartitionStates where
    the view offers `partition_ids` (the broker does: the share-group fetch path asks per call)."""
    fast = getattr(cluster, "partition_ids", None)
    if fast is not None:
        return list(fast(topic))
    return list(cluster.topic_partitions(topic) or {})


def partition_parents(cluster: Any, topic: str, partition: int) -> dict[int, int]:
    """A partition's parents and their split offsets where the view knows the topic's lineage (a
    standalone broker; cluster/lineage.py), else {}."""
    known = getattr(cluster, "partition_parents", None)
    return {} if known is None else dict(known(topic, partition))
