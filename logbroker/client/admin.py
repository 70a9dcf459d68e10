"""The admin client: create, delete, list, describe topics and add partitions.

Requests go to the controller when the metadata names one, else to any known broker. Only a call
that never reached a broker (gRPC UNAVAILABLE) is retried on the next broker: creating a topic is
not idempotent, so a timed-out CreateTopics is reported, not repeated.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc

from logbroker.client.metadata_cache import MetadataCache, metadata_for
from logbroker.client.producer import rpc_error
from logbroker.errors import BrokerUnavailableError, error_for
from logbroker.v1 import logbroker_pb2 as pb

T = TypeVar("T")


@dataclass(frozen=True)
class PartitionInfo:
    partition: int
    leader: int
    replicas: list[int]
    isr: list[int]
    leader_epoch: int
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    size_bytes: int


@dataclass(frozen=True)
class TopicDescription:
    name: str
    config: dict[str, str]
    partitions: list[PartitionInfo] = field(default_factory=list)


class Admin:
    """Topic administration over the `logbroker.v1.Admin` service."""

    def __init__(
        self,
        bootstrap: str | Sequence[str] | MetadataCache,
        *,
        request_timeout_ms: int = 30_000,
        retry_backoff_ms: int = 100,
    ) -> None:
        self._timeout_s = request_timeout_ms / 1000
        self._metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, retry_backoff_ms)

    def _call(self, fn: Callable[[Any], T]) -> T:
        """fn(AdminStub) on the controller, then on other brokers while they are unreachable."""
        first = self._metadata.controller_address() or self._metadata.any_address()
        addresses = [first] + [a for a in self._metadata.candidate_addresses() if a != first]
        last: grpc.RpcError | None = None
        for address in addresses:
            try:
                return fn(self._metadata.admin_stub(address))
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise rpc_error(e) from None
                last = e
        raise BrokerUnavailableError(f"no broker answered (tried {addresses}): {last}")

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        replication_factor: int = 1,
        config: Mapping[str, object] | None = None,
    ) -> None:
        """Create a topic; raises TopicAlreadyExistsError, InvalidTopicError, InvalidConfigError, ..."""
        topic = pb.NewTopic(
            name=name,
            partitions=partitions,
            replication_factor=replication_factor,
            config={str(k): _config_value(v) for k, v in (config or {}).items()},
        )
        request = pb.CreateTopicsRequest(topics=[topic])
        resp = self._call(lambda stub: stub.CreateTopics(request, timeout=self._timeout_s))
        _raise_for(resp.results, name)

    def delete_topic(self, name: str) -> None:
        request = pb.DeleteTopicsRequest(names=[name])
        resp = self._call(lambda stub: stub.DeleteTopics(request, timeout=self._timeout_s))
        _raise_for(resp.results, name)

    def create_partitions(self, name: str, total: int) -> None:
        """Grow the topic to `total` partitions (raises InvalidPartitionsError if that is not more)."""
        request = pb.CreatePartitionsRequest(name=name, total=total)
        resp = self._call(lambda stub: stub.CreatePartitions(request, timeout=self._timeout_s))
        _raise_for([resp.result], name)

    def list_topics(self, include_internal: bool = False) -> list[str]:
        """Names of every topic, sorted; internal ones ("__" prefix) only if asked."""
        resp = self._metadata.refresh(None)
        names = [t.name for t in resp.topics if t.error_code == pb.NONE or t.partitions]
        return sorted(n for n in names if include_internal or not n.startswith("__"))

    def describe_topic(self, name: str) -> TopicDescription:
        request = pb.DescribeTopicsRequest(names=[name])
        resp = self._call(lambda stub: stub.DescribeTopics(request, timeout=self._timeout_s))
        for t in resp.topics:
            if t.name != name:
                continue
            if t.error_code != pb.NONE:
                raise error_for(t.error_code, t.error_message or name)
            return _description(t)
        raise error_for(pb.UNKNOWN_TOPIC_OR_PARTITION, f"topic {name!r} does not exist")

    def describe_topics(self, names: Sequence[str] | None = None) -> list[TopicDescription]:
        """Descriptions of `names` (None: every topic); raises on the first topic with an error."""
        request = pb.DescribeTopicsRequest(names=list(names or ()))
        resp = self._call(lambda stub: stub.DescribeTopics(request, timeout=self._timeout_s))
        out = []
        for t in resp.topics:
            if t.error_code != pb.NONE:
                raise error_for(t.error_code, t.error_message or t.name)
            out.append(_description(t))
        return out

    def describe_cluster(self) -> dict[str, Any]:
        """{"cluster_id", "controller_id", "controller_epoch", "brokers": [{broker_id, host, port, rack}]}."""
        resp = self._call(lambda stub: stub.DescribeCluster(pb.DescribeClusterRequest(), timeout=self._timeout_s))
        return {
            "cluster_id": resp.cluster_id,
            "controller_id": resp.controller_id,
            "controller_epoch": resp.controller_epoch,
            "brokers": [
                {"broker_id": b.broker_id, "host": b.host, "port": b.port, "rack": b.rack}
                for b in sorted(resp.brokers, key=lambda b: b.broker_id)
            ],
        }

    def reassign_partition(self, name: str, partition: int, replicas: Sequence[int]) -> None:
        """Start moving a partition to `replicas` (first = preferred leader); data is copied first."""
        request = pb.ReassignPartitionRequest(topic=name, partition=partition, replicas=list(replicas))
        resp = self._call(lambda stub: stub.ReassignPartition(request, timeout=self._timeout_s))
        if resp.error_code != pb.NONE:
            raise error_for(resp.error_code, resp.error_message)

    def close(self) -> None:
        if self._owns_metadata:
            self._metadata.close()

    def __enter__(self) -> Admin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _config_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _raise_for(results: Sequence[pb.TopicResult], name: str) -> None:
    for r in results:
        if r.error_code != pb.NONE:
            raise error_for(r.error_code, r.error_message or r.name or name)


def _description(t: pb.TopicDescription) -> TopicDescription:
    parts = [
        PartitionInfo(
            partition=p.partition,
            leader=p.leader,
            replicas=list(p.replicas),
            isr=list(p.isr),
            leader_epoch=p.leader_epoch,
            log_start_offset=p.log_start_offset,
            log_end_offset=p.log_end_offset,
            high_watermark=p.high_watermark,
            size_bytes=p.size_bytes,
        )
        for p in sorted(t.partitions, key=lambda p: p.partition)
    ]
    return TopicDescription(name=t.name, config=dict(t.config), partitions=parts)
