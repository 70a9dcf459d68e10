"""Whether stopping one broker now would leave a partition short of in-sync replicas.

A rolling restart (a Kubernetes StatefulSet update, a node drain) stops brokers one after another. The
previous broker may be back and SERVING before its replicas have caught up; stopping the next one
then can shrink a partition's ISR below `min_insync_replicas` (acks=all fails) or to nobody (the
partition goes offline). The rule (the idea behind the Strimzi operator's check before it rolls a
Kafka pod):

    stopping broker B is safe for partition P  <=>  B not in ISR(P)  or  |ISR(P)| >= needed(P)
    needed(P) = min(|replicas(P)|, max(2, min_insync_replicas(P) + 1))

so after B leaves, the ISR still has min_insync_replicas members and someone to lead. The cap at
|replicas| means a partition that can never meet the rule (replication factor 1, or min ISR equal to
the replication factor) does not block forever: stopping B costs availability that no wait can buy.
`logbroker wait-safe-to-stop` (a pod's preStop hook) polls this until it holds or a deadline passes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class PartitionReplicas:
    topic: str
    partition: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]
    min_insync_replicas: int = 1


def isr_needed(replication_factor: int, min_insync_replicas: int) -> int:
    """How many in-sync replicas a partition needs before one of them may stop."""
    return min(replication_factor, max(2, min_insync_replicas + 1))


def blocking_partitions(broker_id: int, partitions: Iterable[PartitionReplicas]) -> list[PartitionReplicas]:
    """The partitions whose ISR would fall short if `broker_id` stopped now."""
    return [
        p for p in partitions
        if broker_id in p.isr and len(p.isr) < isr_needed(len(p.replicas), p.min_insync_replicas)
    ]
