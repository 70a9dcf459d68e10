"""A broker's view of the cluster, as the controller last told it (UpdateMetadata).

Answers Metadata, DescribeTopics and DescribeCluster in cluster mode. Pure: the Replica service feeds
it requests, the handlers read it. Requests from a controller epoch older than the newest seen are
refused (zombie controller).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from logbroker.cluster.lineage import SPLIT_PENDING, Split, parents_of, splits_from_json
from logbroker.errors import StaleControllerEpochError
from logbroker.v1 import logbroker_pb2 as pb


@dataclass
class MetadataImage:
    controller_id: int = -1
    controller_epoch: int = -1
    brokers: dict[int, pb.BrokerInfo] = field(default_factory=dict)
    # topic -> partition -> state
    partitions: dict[str, dict[int, pb.PartitionState]] = field(default_factory=dict)
    # whether a controller's UpdateMetadata (the whole cluster) has arrived: before it, the image holds
    # at most the partitions a LeaderAndIsr named, and "no such topic" would be a lie
    received_update: bool = False
    # topic -> where it grew (cluster/lineage.py), for topics that keep key order on growth
    splits: dict[str, list[Split]] = field(default_factory=dict)
    # topic -> its partition count in the last UpdateMetadata (which carries its splits with it)
    full_counts: dict[str, int] = field(default_factory=dict)

    def check_controller_epoch(self, controller_id: int, controller_epoch: int) -> None:
        if controller_epoch < self.controller_epoch:
            raise StaleControllerEpochError(
                f"controller {controller_id} epoch {controller_epoch} is older than epoch {self.controller_epoch}"
            )
        if controller_epoch > self.controller_epoch:
            self.controller_epoch = controller_epoch
            self.controller_id = controller_id

    def apply(self, req: pb.UpdateMetadataRequest) -> None:
        """Replace the view with the controller's (it always sends everything)."""
        self.check_controller_epoch(req.controller_id, req.controller_epoch)
        self.controller_id = req.controller_id
        self.brokers = {b.broker_id: b for b in req.brokers}
        partitions: dict[str, dict[int, pb.PartitionState]] = {}
        for st in req.partitions:
            partitions.setdefault(st.topic, {})[st.partition] = st
        self.partitions = partitions
        self.splits = {t: splits_from_json(json.loads(raw)) for t, raw in req.topic_splits_json.items()}
        self.full_counts = {t: len(ps) for t, ps in partitions.items()}
        self.received_update = True

    def apply_partition_states(self, states: list[pb.PartitionState]) -> None:
        """Newer partition states learned from a LeaderAndIsr (they never move an epoch backwards)."""
        for st in states:
            current = self.partitions.get(st.topic, {}).get(st.partition)
            if current is None or (st.leader_epoch, st.zk_version) >= (current.leader_epoch, current.zk_version):
                self.partitions.setdefault(st.topic, {})[st.partition] = st

    def partition_parents(self, topic: str, partition: int) -> dict[int, int]:
        """A partition's parents and split offsets (cluster/lineage.py). A partition of a known topic
        that only a LeaderAndIsr has named so far (its topic grew; the UpdateMetadata with the split
        has not arrived) has unknown lineage: every partition known before as a pending parent, so
        that readers hold it."""
        known = self.full_counts.get(topic)
        if known is not None and partition >= known:
            return dict.fromkeys(range(known), SPLIT_PENDING)
        return parents_of(self.splits.get(topic, []), partition)

    def topic_names(self) -> list[str]:
        return sorted(self.partitions)

    def broker_address(self, broker_id: int) -> str | None:
        b = self.brokers.get(broker_id)
        return None if b is None else f"{b.host}:{b.port}"
