"""`BrokerApis`: every client call of the broker, protocol-neutral, behind one hook.

Request and response types are the logbroker.v1 protobuf messages: they are the project's internal
schema (per-partition ErrorCode results included), not a gRPC detail; the gRPC servicers pass them
through, the record transport frames them, and a Kafka listener will translate Kafka's messages
into them. Each call takes the caller's `RequestContext` and the request, returns the response
(Fetch: already serialized, so its records are copied once), and refuses a whole call with
`RequestRejected` (server/request_context.py), which each listener maps to its own status.

Every call passes through `handle(api, context, request)`, and there through `RequestHook.
on_request`: the one place where authorization and request metrics go; the request log
(server/request_log.py) then sets the caller's log fields around the call and logs it when slow;
client quotas (server/apis/throttling.py) measure the call and delay its answer when over quota. Calls by
concept: produce_fetch.py (Produce, Fetch, ListOffsets), metadata.py (Metadata, DescribeCluster),
groups.py (offsets, coordinator, heartbeats, group admin), producer_ids.py (InitProducerId), queues.py (share groups), replies.py
(request-reply), admin.py (topics, replicas), heat.py (hot partitions and keys), security.py (ACLs, SCRAM users, client quotas).

The inter-broker surface (server/replica_service.py) is not here: only brokers may call it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from google.protobuf.message import Message

from logbroker.server import audit
from logbroker.server.admission import Admission
from logbroker.server.apis.admin import AdminApis
from logbroker.server.apis.groups import GroupApis
from logbroker.server.apis.heat import HeatApis
from logbroker.server.apis.metadata import MetadataApis
from logbroker.server.apis.produce_fetch import ProduceFetchApis
from logbroker.server.apis.producer_ids import ProducerIdApis
from logbroker.server.apis.queues import QueueApis
from logbroker.server.apis.replies import ReplyApis
from logbroker.server.apis.security import SecurityApis
from logbroker.server.apis.throttling import ClientQuotas
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.server.request_log import RequestLog
from logbroker.server.request_metrics import RequestMetrics
from logbroker.v1 import logbroker_pb2 as pb

Response: TypeAlias = Message | bytes
Api = Callable[[RequestContext, Any], Awaitable[Response]]

# The APIs by name (the gRPC method names of logbroker.v1.Broker and logbroker.v1.Admin), with
# their request message type.
PRODUCE = "Produce"
FETCH = "Fetch"
REQUEST_TYPES: dict[str, type[Message]] = {
    PRODUCE: pb.ProduceRequest,
    FETCH: pb.FetchRequest,
    "ListOffsets": pb.ListOffsetsRequest,
    "Metadata": pb.MetadataRequest,
    "OffsetCommit": pb.OffsetCommitRequest,
    "OffsetFetch": pb.OffsetFetchRequest,
    "FindCoordinator": pb.FindCoordinatorRequest,
    "ConsumerGroupHeartbeat": pb.ConsumerGroupHeartbeatRequest,
    "CreateTopics": pb.CreateTopicsRequest,
    "DeleteTopics": pb.DeleteTopicsRequest,
    "CreatePartitions": pb.CreatePartitionsRequest,
    "DescribeTopics": pb.DescribeTopicsRequest,
    "DescribeCluster": pb.DescribeClusterRequest,
    "ReassignPartition": pb.ReassignPartitionRequest,
    "ListGroups": pb.ListGroupsRequest,
    "DescribeGroup": pb.DescribeGroupRequest,
    "DeleteGroup": pb.DeleteGroupRequest,
    "ReadReplica": pb.ReadReplicaRequest,
    "RecoverEmptyPartition": pb.RecoverEmptyPartitionRequest,
    "ShareFetch": pb.ShareFetchRequest,
    "ShareAcknowledge": pb.ShareAcknowledgeRequest,
    "AlterShareGroup": pb.AlterShareGroupRequest,
    "ListShareGroups": pb.ListShareGroupsRequest,
    "DescribeShareGroup": pb.DescribeShareGroupRequest,
    "PurgeShareGroup": pb.PurgeShareGroupRequest,
    "CreateAcls": pb.CreateAclsRequest,
    "DeleteAcls": pb.DeleteAclsRequest,
    "DescribeAcls": pb.DescribeAclsRequest,
    "AlterUserScramCredentials": pb.AlterUserScramCredentialsRequest,
    "DescribeUserScramCredentials": pb.DescribeUserScramCredentialsRequest,
    "Reply": pb.ReplyRequest,
    "ReplyBatch": pb.ReplyBatchRequest,
    "InitProducerId": pb.InitProducerIdRequest,
    "AlterClientQuotas": pb.AlterClientQuotasRequest,
    "DescribeClientQuotas": pb.DescribeClientQuotasRequest,
    "DescribeHotPartitions": pb.DescribeHotPartitionsRequest,
}


class RequestHook:
    """Called once per request, before the API runs, on the broker's event loop.

    A no-op here; the authorizer's hook (server/authorization.py) raises
    RequestRejected(PERMISSION_DENIED). Request metrics (server/request_metrics.py) are counted
    around it by `BrokerApis.handle`, once, for every listener; client quotas run around the call
    (`BrokerApis.quotas`). Must not block.
    """

    def on_request(self, api: str, context: RequestContext, request: Message) -> None:
        return None


class BrokerApis:
    def __init__(self, data: ProduceFetchApis, metadata: MetadataApis | None = None, groups: GroupApis | None = None,
                 admin: AdminApis | None = None, hook: RequestHook | None = None,
                 queues: QueueApis | None = None, replies: ReplyApis | None = None,
                 security: SecurityApis | None = None, producer_ids: ProducerIdApis | None = None,
                 quotas: ClientQuotas | None = None, admission: Admission | None = None,
                 request_log: RequestLog | None = None, metrics: RequestMetrics | None = None,
                 heat: HeatApis | None = None) -> None:
        """`metadata`, `groups`, `admin`, `queues` None: those calls are UNIMPLEMENTED (a data-path-only broker
        in tests). `quotas`: client quotas enforced on every call (server/apis/throttling.py).
        `admission`: the bounds on in-flight requests the listeners apply before parsing a request
        (server/admission.py; they know its size), None: no bounds. `request_log`: the log fields of
        each call and its slow-request line (server/request_log.py), None: neither. `metrics`: every
        call counted, timed and its errors counted (server/request_metrics.py; Produce and Fetch
        report their partitions through ProduceFetchApis, which the caller gives the same object).
        `heat`: DescribeHotPartitions (server/apis/heat.py), None: UNIMPLEMENTED."""
        self.request_log = request_log
        self.metrics = metrics
        self.hook = hook if hook is not None else RequestHook()
        self.quotas = quotas
        self.admission = admission
        ops: dict[str, Api] = {PRODUCE: data.produce, FETCH: data.fetch, "ListOffsets": data.list_offsets}
        if metadata is not None:
            ops.update(Metadata=metadata.metadata, DescribeCluster=metadata.describe_cluster)
        if groups is not None:
            ops.update(OffsetCommit=groups.offset_commit, OffsetFetch=groups.offset_fetch,
                       FindCoordinator=groups.find_coordinator, ConsumerGroupHeartbeat=groups.consumer_group_heartbeat,
                       ListGroups=groups.list_groups, DescribeGroup=groups.describe_group,
                       DeleteGroup=groups.delete_group)
        if admin is not None:
            ops.update(CreateTopics=admin.create_topics, DeleteTopics=admin.delete_topics,
                       CreatePartitions=admin.create_partitions, DescribeTopics=admin.describe_topics,
                       ReassignPartition=admin.reassign_partition, ReadReplica=admin.read_replica,
                       RecoverEmptyPartition=admin.recover_empty_partition)
        if queues is not None:
            ops.update(ShareFetch=queues.share_fetch, ShareAcknowledge=queues.share_acknowledge,
                       AlterShareGroup=queues.alter_share_group, ListShareGroups=queues.list_share_groups,
                       DescribeShareGroup=queues.describe_share_group, PurgeShareGroup=queues.purge_share_group)
        if security is not None:
            ops.update(CreateAcls=security.create_acls, DeleteAcls=security.delete_acls,
                       DescribeAcls=security.describe_acls,
                       AlterUserScramCredentials=security.alter_user_scram_credentials,
                       DescribeUserScramCredentials=security.describe_user_scram_credentials,
                       AlterClientQuotas=security.alter_client_quotas,
                       DescribeClientQuotas=security.describe_client_quotas)
        if replies is not None:
            ops.update(Reply=replies.reply, ReplyBatch=replies.reply_batch)
        if producer_ids is not None:
            ops.update(InitProducerId=producer_ids.init_producer_id)
        if heat is not None:
            ops.update(DescribeHotPartitions=heat.describe_hot_partitions)
        self.replies = replies
        self._ops = ops

    def handle(self, api: str, context: RequestContext, request: Message) -> Awaitable[Response]:
        """Run one call: the hook, then the API (an awaitable of its response). Raises
        RequestRejected (UNIMPLEMENTED for an API this broker does not serve)."""
        op = self._ops.get(api)
        if op is None:
            raise RequestRejected(RequestStatus.UNIMPLEMENTED, f"unknown api {api}")
        metrics = self.metrics
        if metrics is None:
            self.hook.on_request(api, context, request)
            call = op(context, request)
        else:
            metrics.started(api)
            try:
                self.hook.on_request(api, context, request)
                pending = op(context, request)
            except Exception as exc:
                metrics.rejected(api, exc)
                raise
            call = metrics.timed(api, pending)
        if self.request_log is not None:
            call = self.request_log.run(api, context, request, call)
        if self.quotas is not None and self.quotas.applies(api, context, request):
            call = self.quotas.run(api, context, request, call)
        if api in audit.AUDITED:
            principal = context.principal if context.principal.startswith("User:") else f"User:{context.principal}"
            return audit.audited(api, context, request, call, principal)
        return call
