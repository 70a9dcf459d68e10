"""DescribeHotPartitions: this broker's hottest led partitions and their heaviest keys.

The figures are the broker's own (server/partition_heat.py): it answers only for the partitions it
leads now (a partition it led before keeps its numbers here until it leads it again or they are
forgotten); the client asks every broker and merges (`Admin.describe_hot_partitions`, `logbroker
topics hot`). Bounds: TOP_MAX partitions and KEYS_MAX keys per partition per answer, TOPICS_MAX
topic names per request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from logbroker.server.partition_heat import HeatTracker
from logbroker.server.request_checks import ServingState, check_ready
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.replication.partition import Partition

TOP_DEFAULT = 10
TOP_MAX = 1000
KEYS_DEFAULT = 5
KEYS_MAX = 100
TOPICS_MAX = 1000


class LedReplicas(Protocol):
    @property
    def broker_id(self) -> int: ...

    @property
    def partitions(self) -> Mapping[tuple[str, int], Partition]: ...


def _bounded(value: int, default: int, most: int, what: str) -> int:
    if value < 0 or value > most:
        raise RequestRejected(RequestStatus.INVALID_ARGUMENT, f"{what} must be in [0, {most}], got {value}")
    return value or default


class HeatApis:
    def __init__(self, state: ServingState, heat: HeatTracker, replicas: LedReplicas) -> None:
        self._state = state
        self._heat = heat
        self._replicas = replicas

    async def describe_hot_partitions(self, context: RequestContext,
                                      req: pb.DescribeHotPartitionsRequest) -> pb.DescribeHotPartitionsResponse:
        check_ready(self._state)
        if len(req.topics) > TOPICS_MAX:
            raise RequestRejected(RequestStatus.INVALID_ARGUMENT, f"at most {TOPICS_MAX} topics per request")
        top = _bounded(req.top, TOP_DEFAULT, TOP_MAX, "top")
        keys = _bounded(req.keys, KEYS_DEFAULT, KEYS_MAX, "keys")
        topics = set(req.topics)
        hosted = self._replicas.partitions

        def include(topic: str, partition: int) -> bool:
            if topics and topic not in topics:
                return False
            part = hosted.get((topic, partition))
            return part is not None and part.is_leader

        resp = pb.DescribeHotPartitionsResponse(broker_id=self._replicas.broker_id)
        for s in self._heat.snapshot(top, keys, include):
            hp = resp.partitions.add(
                topic=s.topic, partition=s.partition, bytes_in_per_sec=s.bytes_in_per_sec,
                records_in_per_sec=s.records_in_per_sec, bytes_out_per_sec=s.bytes_out_per_sec,
                records_out_per_sec=s.records_out_per_sec, bytes_in_total=s.totals[0], records_in_total=s.totals[1],
                bytes_out_total=s.totals[2], records_out_total=s.totals[3], sampled_batches=s.sampled_batches,
                sampled_records=s.sampled_records)
            total = s.sampled_records
            for k in s.keys:
                hp.keys.add(key=k.key, truncated=k.truncated, share=k.share,
                            error=k.error / total if total > 0 else 0.0)
        return resp
