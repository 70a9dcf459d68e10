"""Topic administration: create, delete, grow, describe, reassign, recover, read a replica.

Each result carries its own ErrorCode. What a topic change does (standalone: here; cluster: through
ZooKeeper and the controller) is the broker's business (`TopicAdmin`); this module validates and
routes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from logbroker.cluster.cluster_view import ClusterView, partition_parents
from logbroker.cluster.metadata import validate_topic_name
from logbroker.errors import (
    BrokerError,
    InvalidConfigError,
    InvalidFetchSizeError,
    UnknownTopicOrPartitionError,
)
from logbroker.server.apis.metadata import TopicVisibility
from logbroker.server.request_checks import ServingState, as_error, check_ready
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.replication.partition import Partition

log = logging.getLogger(__name__)

TOPICS_PER_REQUEST_MAX = 1000
CONFIG_ENTRIES_MAX = 100
READ_REPLICA_BYTES_DEFAULT = 1 << 20
READ_REPLICA_BYTES_MAX = 16 << 20


class TopicAdmin(Protocol):
    """Topic changes and the stored topic facts (the broker implements it)."""

    async def create_topic(self, name: str, partitions: int, replication_factor: int, config: dict[str, str],
                           validate_only: bool = False, *, internal: bool = False) -> None: ...

    async def delete_topic(self, name: str) -> None: ...

    async def create_partitions(self, name: str, total: int) -> None: ...

    async def reassign_partition(self, topic: str, partition: int, replicas: list[int],
                                 throttle_bytes_per_sec: int = 0) -> None: ...

    async def recover_empty_partition(self, topic: str, partition: int) -> None: ...

    async def topic_config(self, topic: str) -> dict[str, str]: ...

    async def topic_id(self, topic: str) -> str: ...


class HostedReplicas(Protocol):
    """This broker's replicas, as describe and ReadReplica see them (the replica manager)."""

    @property
    def broker_id(self) -> int: ...

    @property
    def partitions(self) -> Mapping[tuple[str, int], Partition]: ...

    @property
    def offline_partitions(self) -> Mapping[tuple[str, int], str]: ...

    def get_partition(self, topic: str, partition: int) -> Partition: ...


def _fill_error(result: pb.TopicResult | pb.TopicDescription, exc: Exception) -> None:
    err = as_error(exc, "admin")
    result.error_code = err.code  # type: ignore[assignment]
    result.error_message = err.message


class AdminApis:
    def __init__(self, state: ServingState, admin: TopicAdmin, catalog: ClusterView, replicas: HostedReplicas,
                 visible: TopicVisibility | None = None) -> None:
        """`visible` (with an authorizer): DescribeTopics naming no topic (every topic) leaves out the
        ones the caller may not describe, as Metadata does (a named one is checked by the authorizer)."""
        self._state = state
        self._admin = admin
        self._catalog = catalog
        self._replicas = replicas
        self._visible = visible

    def _check(self, n: int) -> None:
        check_ready(self._state)
        if n > TOPICS_PER_REQUEST_MAX:
            raise RequestRejected(RequestStatus.INVALID_ARGUMENT, f"at most {TOPICS_PER_REQUEST_MAX} topics per request")

    async def create_topics(self, context: RequestContext, req: pb.CreateTopicsRequest) -> pb.CreateTopicsResponse:
        self._check(len(req.topics))
        resp = pb.CreateTopicsResponse()
        for t in req.topics:
            r = resp.results.add(name=t.name)
            try:
                if len(t.config) > CONFIG_ENTRIES_MAX:
                    raise InvalidConfigError(f"at most {CONFIG_ENTRIES_MAX} config entries")
                await self._admin.create_topic(t.name, t.partitions, t.replication_factor, dict(t.config),
                                               req.validate_only)
            except Exception as exc:
                _fill_error(r, exc)
        return resp

    async def delete_topics(self, context: RequestContext, req: pb.DeleteTopicsRequest) -> pb.DeleteTopicsResponse:
        self._check(len(req.names))
        resp = pb.DeleteTopicsResponse()
        for name in req.names:
            r = resp.results.add(name=name)
            try:
                await self._admin.delete_topic(name)
            except Exception as exc:
                _fill_error(r, exc)
        return resp

    async def create_partitions(self, context: RequestContext,
                                req: pb.CreatePartitionsRequest) -> pb.CreatePartitionsResponse:
        self._check(1)
        resp = pb.CreatePartitionsResponse()
        resp.result.name = req.name
        try:
            await self._admin.create_partitions(req.name, req.total)
        except Exception as exc:
            _fill_error(resp.result, exc)
        return resp

    async def describe_topics(self, context: RequestContext, req: pb.DescribeTopicsRequest) -> pb.DescribeTopicsResponse:
        self._check(len(req.names))
        resp = pb.DescribeTopicsResponse()
        visible = self._visible
        for name in list(req.names) or [n for n in self._catalog.topic_names()
                                        if visible is None or visible(context, n)]:
            d = resp.topics.add(name=name)
            try:
                validate_topic_name(name)
                states = self._catalog.topic_partitions(name)
                if states is None:
                    raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
                d.config.update(await self._admin.topic_config(name))
                d.topic_id = await self._admin.topic_id(name)
                for p, st in sorted(states.items()):
                    self._describe_partition(d, name, p, st)
            except Exception as exc:
                _fill_error(d, exc)
        return resp

    def _describe_partition(self, d: pb.TopicDescription, name: str, p: int, st: pb.PartitionState) -> None:
        pd = d.partitions.add(
            partition=p, leader=st.leader, leader_epoch=st.leader_epoch, replicas=st.replicas,
            isr=st.isr, log_start_offset=-1, log_end_offset=-1, high_watermark=-1, size_bytes=-1,
        )
        for parent, offset in sorted(partition_parents(self._catalog, name, p).items()):
            pd.parents.add(partition=parent, split_offset=offset)
        replicas = self._replicas
        if (name, p) in replicas.offline_partitions:
            pd.offline_replicas.append(replicas.broker_id)
        part = replicas.partitions.get((name, p))
        if part is not None:  # offsets as this broker's replica has them
            plog = part.log
            pd.log_start_offset = plog.log_start_offset
            pd.log_end_offset = plog.log_end_offset
            pd.high_watermark = part.high_watermark
            pd.size_bytes = plog.size_bytes

    async def reassign_partition(self, context: RequestContext,
                                 req: pb.ReassignPartitionRequest) -> pb.ReassignPartitionResponse:
        self._check(1)
        try:
            await self._admin.reassign_partition(req.topic, req.partition, list(req.replicas),
                                                 req.replication_throttle_bytes_per_sec)
            return pb.ReassignPartitionResponse()
        except BrokerError as exc:
            return pb.ReassignPartitionResponse(error_code=exc.code, error_message=exc.message)  # type: ignore[arg-type]

    async def recover_empty_partition(self, context: RequestContext,
                                      req: pb.RecoverEmptyPartitionRequest) -> pb.RecoverEmptyPartitionResponse:
        self._check(1)
        try:
            validate_topic_name(req.topic)
            await self._admin.recover_empty_partition(req.topic, req.partition)
            return pb.RecoverEmptyPartitionResponse()
        except BrokerError as exc:
            return pb.RecoverEmptyPartitionResponse(error_code=exc.code,  # type: ignore[arg-type]
                                                    error_message=exc.message)

    async def read_replica(self, context: RequestContext, req: pb.ReadReplicaRequest) -> pb.ReadReplicaResponse:
        """This broker's own copy of a partition, leader or follower (see the proto)."""
        self._check(1)
        resp = pb.ReadReplicaResponse(broker_id=self._replicas.broker_id)
        try:
            if req.max_bytes < 0:
                raise InvalidFetchSizeError(f"max_bytes {req.max_bytes} is negative")
            max_bytes = min(req.max_bytes or READ_REPLICA_BYTES_DEFAULT, READ_REPLICA_BYTES_MAX)
            part = self._replicas.get_partition(req.topic, req.partition)
            plog = part.log
            resp.role, resp.leader_epoch = part.role.value, part.leader_epoch
            resp.log_start_offset, resp.log_end_offset = plog.log_start_offset, plog.log_end_offset
            resp.high_watermark = plog.high_watermark
            offset = plog.log_start_offset if req.offset == -1 else req.offset
            view = plog.read(offset, max_bytes, plog.log_end_offset)
            try:
                resp.records = bytes(view)  # copied before anything else can touch the log
            finally:
                if view.nbytes:
                    view.release()
        except Exception as exc:
            err = as_error(exc, "read_replica")
            resp.error_code = err.code  # type: ignore[assignment]
            resp.error_message = err.message
        return resp
