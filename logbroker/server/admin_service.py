"""`logbroker.v1.Admin`: topic management, each result carrying its own ErrorCode."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from logbroker.cluster.metadata import validate_topic_name
from logbroker.errors import (
    BrokerError,
    InvalidConfigError,
    InvalidFetchSizeError,
    InvalidReplicationFactorError,
    UnknownServerError,
    UnknownTopicOrPartitionError,
)
from logbroker.server import rpc
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

log = logging.getLogger(__name__)

TOPICS_PER_REQUEST_MAX = 1000
CONFIG_ENTRIES_MAX = 100
READ_REPLICA_BYTES_DEFAULT = 1 << 20
READ_REPLICA_BYTES_MAX = 16 << 20


def _fill_error(result: pb.TopicResult | pb.TopicDescription, exc: Exception) -> None:
    if not isinstance(exc, BrokerError):
        log.exception("unexpected admin error")
        exc = UnknownServerError(f"{type(exc).__name__}: {exc}")
    result.error_code = exc.code  # type: ignore[assignment]
    result.error_message = exc.message


def _check(broker: Broker, n: int) -> None:
    if not broker.ready:
        raise rpc.RequestRejected(grpc.StatusCode.UNAVAILABLE, "broker is recovering its logs, not serving yet")
    if n > TOPICS_PER_REQUEST_MAX:
        raise rpc.RequestRejected(grpc.StatusCode.INVALID_ARGUMENT, f"at most {TOPICS_PER_REQUEST_MAX} topics per request")


class AdminService:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    async def create_topics(self, req: pb.CreateTopicsRequest, context: grpc.aio.ServicerContext) -> pb.CreateTopicsResponse:
        _check(self.broker, len(req.topics))
        resp = pb.CreateTopicsResponse()
        for t in req.topics:
            r = resp.results.add(name=t.name)
            try:
                if len(t.config) > CONFIG_ENTRIES_MAX:
                    raise InvalidConfigError(f"at most {CONFIG_ENTRIES_MAX} config entries")
                await self.broker.create_topic(t.name, t.partitions, t.replication_factor, dict(t.config), req.validate_only)
            except Exception as exc:
                _fill_error(r, exc)
        return resp

    async def delete_topics(self, req: pb.DeleteTopicsRequest, context: grpc.aio.ServicerContext) -> pb.DeleteTopicsResponse:
        _check(self.broker, len(req.names))
        resp = pb.DeleteTopicsResponse()
        for name in req.names:
            r = resp.results.add(name=name)
            try:
                await self.broker.delete_topic(name)
            except Exception as exc:
                _fill_error(r, exc)
        return resp

    async def create_partitions(
        self, req: pb.CreatePartitionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePartitionsResponse:
        _check(self.broker, 1)
        resp = pb.CreatePartitionsResponse()
        resp.result.name = req.name
        try:
            await self.broker.create_partitions(req.name, req.total)
        except Exception as exc:
            _fill_error(resp.result, exc)
        return resp

    async def describe_topics(
        self, req: pb.DescribeTopicsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeTopicsResponse:
        broker = self.broker
        _check(broker, len(req.names))
        resp = pb.DescribeTopicsResponse()
        for name in list(req.names) or broker.topic_names():
            d = resp.topics.add(name=name)
            try:
                validate_topic_name(name)
                states = broker.topic_partitions(name)
                if states is None:
                    raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
                d.config.update(await broker.topic_config(name))
                d.topic_id = await broker.topic_id(name)
                for p, st in sorted(states.items()):
                    pd = d.partitions.add(
                        partition=p, leader=st.leader, leader_epoch=st.leader_epoch, replicas=st.replicas,
                        isr=st.isr, log_start_offset=-1, log_end_offset=-1, high_watermark=-1, size_bytes=-1,
                    )
                    part = broker.partitions.get((name, p))
                    if (name, p) in broker.replica_manager.offline_partitions:
                        pd.offline_replicas.append(broker.config.broker_id)
                    if part is not None:  # offsets as this broker's replica has them
                        plog = part.log
                        pd.log_start_offset = plog.log_start_offset
                        pd.log_end_offset = plog.log_end_offset
                        pd.high_watermark = part.high_watermark
                        pd.size_bytes = plog.size_bytes
            except Exception as exc:
                _fill_error(d, exc)
        return resp

    async def describe_cluster(
        self, req: pb.DescribeClusterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeClusterResponse:
        broker = self.broker
        _check(broker, 0)
        brokers, controller_id, controller_epoch = broker.cluster_brokers()
        return pb.DescribeClusterResponse(cluster_id=broker.store.cluster_id, controller_id=controller_id,
                                          controller_epoch=controller_epoch, brokers=brokers)

    async def reassign_partition(
        self, req: pb.ReassignPartitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReassignPartitionResponse:
        _check(self.broker, 1)
        try:
            if self.broker.cluster is not None:
                await self.broker.cluster.reassign(req.topic, req.partition, list(req.replicas))
                return pb.ReassignPartitionResponse()
            self.broker.partition(req.topic, req.partition)
            if list(req.replicas) != [self.broker.config.broker_id]:
                raise InvalidReplicationFactorError("a standalone broker can only place replicas on itself")
            return pb.ReassignPartitionResponse()
        except Exception as exc:
            if not isinstance(exc, BrokerError):
                raise
            return pb.ReassignPartitionResponse(error_code=exc.code, error_message=exc.message)  # type: ignore[arg-type]


    async def recover_empty_partition(
        self, req: pb.RecoverEmptyPartitionRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecoverEmptyPartitionResponse:
        _check(self.broker, 1)
        try:
            validate_topic_name(req.topic)
            await self.broker.recover_empty_partition(req.topic, req.partition)
            return pb.RecoverEmptyPartitionResponse()
        except Exception as exc:
            if not isinstance(exc, BrokerError):
                raise
            return pb.RecoverEmptyPartitionResponse(error_code=exc.code,  # type: ignore[arg-type]
                                                    error_message=exc.message)

    # -- groups (each answered by this broker's coordinator for the groups it coordinates) ----------

    async def list_groups(self, req: pb.ListGroupsRequest, context: grpc.aio.ServicerContext) -> pb.ListGroupsResponse:
        _check(self.broker, 0)
        return self.broker.coordinator.list_groups()

    async def describe_group(self, req: pb.DescribeGroupRequest,
                             context: grpc.aio.ServicerContext) -> pb.DescribeGroupResponse:
        _check(self.broker, 0)
        return self.broker.coordinator.describe(req.group)

    async def delete_group(self, req: pb.DeleteGroupRequest, context: grpc.aio.ServicerContext) -> pb.DeleteGroupResponse:
        _check(self.broker, 0)
        return await self.broker.coordinator.delete(req.group)

    async def read_replica(self, req: pb.ReadReplicaRequest,
                           context: grpc.aio.ServicerContext) -> pb.ReadReplicaResponse:
        """This broker's own copy of a partition, leader or follower (see the proto)."""
        _check(self.broker, 1)
        resp = pb.ReadReplicaResponse(broker_id=self.broker.config.broker_id)
        try:
            if req.max_bytes < 0:
                raise InvalidFetchSizeError(f"max_bytes {req.max_bytes} is negative")
            max_bytes = min(req.max_bytes or READ_REPLICA_BYTES_DEFAULT, READ_REPLICA_BYTES_MAX)
            part = self.broker.replica_manager.get_partition(req.topic, req.partition)
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
            if not isinstance(exc, BrokerError):
                log.exception("unexpected error reading a replica")
                exc = UnknownServerError(f"{type(exc).__name__}: {exc}")
            resp.error_code = exc.code  # type: ignore[assignment]
            resp.error_message = exc.message
        return resp


def handler(broker: Broker) -> grpc.GenericRpcHandler:
    svc = AdminService(broker)
    return rpc.service(
        "logbroker.v1.Admin",
        {
            "CreateTopics": rpc.method(pb.CreateTopicsRequest, svc.create_topics),
            "DeleteTopics": rpc.method(pb.DeleteTopicsRequest, svc.delete_topics),
            "CreatePartitions": rpc.method(pb.CreatePartitionsRequest, svc.create_partitions),
            "DescribeTopics": rpc.method(pb.DescribeTopicsRequest, svc.describe_topics),
            "DescribeCluster": rpc.method(pb.DescribeClusterRequest, svc.describe_cluster),
            "ReassignPartition": rpc.method(pb.ReassignPartitionRequest, svc.reassign_partition),
            "ListGroups": rpc.method(pb.ListGroupsRequest, svc.list_groups),
            "DescribeGroup": rpc.method(pb.DescribeGroupRequest, svc.describe_group),
            "DeleteGroup": rpc.method(pb.DeleteGroupRequest, svc.delete_group),
            "ReadReplica": rpc.method(pb.ReadReplicaRequest, svc.read_replica),
            "RecoverEmptyPartition": rpc.method(pb.RecoverEmptyPartitionRequest, svc.recover_empty_partition),
        },
    )
