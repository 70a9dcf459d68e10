"""`logbroker.v1.Replica`: the controller's requests to brokers and brokers' requests to each other.

Thin: fencing by controller epoch and broker epoch happens in the replica manager and the metadata
image; this module only routes calls and turns errors into codes. Every call first proves its caller
is a broker of this cluster (the cluster secret, `rpc.require_peer`; with TLS also a broker's
certificate, server/broker_principals.py), before anything in it is read,
so no epoch is adopted from a plain client; a standalone broker refuses them all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from logbroker.errors import BrokerError, NotControllerError, UnknownServerError
from logbroker.server import rpc
from logbroker.server.request_context import RequestStatus
from logbroker.v1 import logbroker_pb2 as pb

if TYPE_CHECKING:
    from logbroker.cluster.controller import Controller
    from logbroker.cluster.metadata_image import MetadataImage
    from logbroker.config import BrokerConfig
    from logbroker.replication.replica_manager import ReplicaManager
    from logbroker.server.broker_principals import BrokerPrincipals


class TopicForgetter(Protocol):
    def forget_topics(self, topics: Iterable[str]) -> None: ...


class InterBrokerHost(Protocol):
    """What the inter-broker calls act on (the broker implements it)."""

    @property
    def config(self) -> BrokerConfig: ...

    @property
    def ready(self) -> bool: ...

    @property
    def metadata_image(self) -> MetadataImage: ...

    @property
    def replica_manager(self) -> ReplicaManager: ...

    @property
    def coordinator(self) -> TopicForgetter: ...

    @property
    def broker_epoch(self) -> int: ...

    @property
    def controller(self) -> Controller | None: ...

    def on_metadata_updated(self) -> None: ...

    def forward_reply(self, req: pb.ReplyRequest) -> pb.ReplyResponse: ...

log = logging.getLogger(__name__)

OFFLINE_REPLICAS_PER_REPORT_MAX = 10_000  # partitions named in one ReportOfflineReplicas (the rest ignored)


def _error(exc: Exception, what: str) -> BrokerError:
    if isinstance(exc, BrokerError):
        return exc
    log.exception("unexpected error in %s", what)
    return UnknownServerError(f"{type(exc).__name__}: {exc}")


class ReplicaService:
    def __init__(self, broker: InterBrokerHost, principals: BrokerPrincipals | None = None) -> None:
        """`principals`: on a TLS broker, the principals that are brokers (server/broker_principals.py)."""
        self.broker = broker
        self.principals = principals

    def require_broker(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """The caller is a broker of this cluster (the secret, and with TLS a broker's certificate),
        else UNAUTHENTICATED / PERMISSION_DENIED."""
        cfg = self.broker.config
        rpc.require_peer(cfg.cluster_secret, cfg.cluster_mode, context, what)
        if self.principals is not None:
            self.principals.require(rpc.request_context(context), what)

    def _check(self, context: grpc.aio.ServicerContext, what: str) -> None:
        """Checked again by each method (the guard in `handler` runs first): a broker, and serving."""
        self.require_broker(context, what)
        if not self.broker.ready:
            raise rpc.RequestRejected(RequestStatus.UNAVAILABLE, "broker is not serving yet")

    async def leader_and_isr(self, req: pb.LeaderAndIsrRequest, context: grpc.aio.ServicerContext) -> pb.LeaderAndIsrResponse:
        self._check(context, "LeaderAndIsr")
        broker = self.broker
        try:
            broker.metadata_image.check_controller_epoch(req.controller_id, req.controller_epoch)
            broker.replica_manager.update_broker_addresses(req.live_brokers)
            resp = await broker.replica_manager.leader_and_isr(req, broker.broker_epoch)
            if resp.error_code == pb.NONE:
                broker.metadata_image.apply_partition_states(list(req.partitions))
            return resp
        except Exception as exc:
            err = _error(exc, "LeaderAndIsr")
            return pb.LeaderAndIsrResponse(error_code=err.code, error_message=err.message)  # type: ignore[arg-type]

    async def update_metadata(self, req: pb.UpdateMetadataRequest, context: grpc.aio.ServicerContext) -> pb.UpdateMetadataResponse:
        self._check(context, "UpdateMetadata")
        broker = self.broker
        try:
            broker.metadata_image.apply(req)
            broker.replica_manager.update_broker_addresses(req.brokers)
            broker.replica_manager.remove_deleted_topics(req.deleted_topics)
            broker.replica_manager.observe_partition_states(req.partitions)
            broker.replica_manager.remove_stray_replicas(req.partitions)
            broker.coordinator.forget_topics(req.deleted_topics)
            broker.on_metadata_updated()
            return pb.UpdateMetadataResponse()
        except Exception as exc:
            err = _error(exc, "UpdateMetadata")
            return pb.UpdateMetadataResponse(error_code=err.code, error_message=err.message)  # type: ignore[arg-type]

    async def stop_replica(self, req: pb.StopReplicaRequest, context: grpc.aio.ServicerContext) -> pb.StopReplicaResponse:
        self._check(context, "StopReplica")
        broker = self.broker
        try:
            broker.metadata_image.check_controller_epoch(req.controller_id, req.controller_epoch)
            return await broker.replica_manager.stop_replica(req, broker.broker_epoch)
        except Exception as exc:
            err = _error(exc, "StopReplica")
            return pb.StopReplicaResponse(error_code=err.code, error_message=err.message)  # type: ignore[arg-type]

    async def offset_for_leader_epoch(
        self, req: pb.OffsetForLeaderEpochRequest, context: grpc.aio.ServicerContext
    ) -> pb.OffsetForLeaderEpochResponse:
        self._check(context, "OffsetForLeaderEpoch")
        return self.broker.replica_manager.offset_for_leader_epoch(req)

    async def controlled_shutdown(
        self, req: pb.ControlledShutdownRequest, context: grpc.aio.ServicerContext
    ) -> pb.ControlledShutdownResponse:
        self._check(context, "ControlledShutdown")
        controller = self.broker.controller
        try:
            if controller is None or not controller.is_active:
                raise NotControllerError(f"broker {self.broker.config.broker_id} is not the controller")
            remaining = await controller.controlled_shutdown(req.broker_id, req.broker_epoch)
            resp = pb.ControlledShutdownResponse()
            for topic, partition in remaining:
                resp.remaining_partitions.add(topic=topic, partition=partition)
            return resp
        except Exception as exc:
            err = _error(exc, "ControlledShutdown")
            return pb.ControlledShutdownResponse(error_code=err.code, error_message=err.message)  # type: ignore[arg-type]

    async def report_offline_replicas(
        self, req: pb.ReportOfflineReplicasRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReportOfflineReplicasResponse:
        self._check(context, "ReportOfflineReplicas")
        controller = self.broker.controller
        try:
            if controller is None or not controller.is_active:
                raise NotControllerError(f"broker {self.broker.config.broker_id} is not the controller")
            offline = {(r.topic, r.partition): r.reason for r in req.offline[:OFFLINE_REPLICAS_PER_REPORT_MAX]}
            recovered = [(tp.topic, tp.partition) for tp in req.recovered[:OFFLINE_REPLICAS_PER_REPORT_MAX]]
            await controller.report_offline_replicas(req.broker_id, req.broker_epoch, offline, recovered)
            return pb.ReportOfflineReplicasResponse()
        except Exception as exc:
            err = _error(exc, "ReportOfflineReplicas")
            return pb.ReportOfflineReplicasResponse(error_code=err.code, error_message=err.message)  # type: ignore[arg-type]

    async def forward_reply(self, req: pb.ReplyRequest, context: grpc.aio.ServicerContext) -> pb.ReplyResponse:
        self._check(context, "ForwardReply")
        return self.broker.forward_reply(req)


def handler(broker: InterBrokerHost, principals: BrokerPrincipals | None = None) -> grpc.GenericRpcHandler:
    svc = ReplicaService(broker, principals)

    def method(name: str, request_cls: Any, fn: Any) -> Any:
        # the caller proves it is a broker before its request is even parsed
        return rpc.method(request_cls, fn, guard=lambda context: svc.require_broker(context, name))

    return rpc.service(
        "logbroker.v1.Replica",
        {
            "LeaderAndIsr": method("LeaderAndIsr", pb.LeaderAndIsrRequest, svc.leader_and_isr),
            "UpdateMetadata": method("UpdateMetadata", pb.UpdateMetadataRequest, svc.update_metadata),
            "StopReplica": method("StopReplica", pb.StopReplicaRequest, svc.stop_replica),
            "OffsetForLeaderEpoch": method("OffsetForLeaderEpoch", pb.OffsetForLeaderEpochRequest,
                                           svc.offset_for_leader_epoch),
            "ControlledShutdown": method("ControlledShutdown", pb.ControlledShutdownRequest, svc.controlled_shutdown),
            "ReportOfflineReplicas": method("ReportOfflineReplicas", pb.ReportOfflineReplicasRequest,
                                            svc.report_offline_replicas),
            "ForwardReply": method("ForwardReply", pb.ReplyRequest, svc.forward_reply),
        },
    )
