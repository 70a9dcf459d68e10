"""`logbroker.v1.Admin` over gRPC: a thin adapter over the request layer (server/apis/admin.py,
groups.py, metadata.py): decode, build the caller's context, call, encode."""

from __future__ import annotations

import grpc

from logbroker.server import rpc
from logbroker.server.apis.broker_apis import BrokerApis
from logbroker.server.broker_service import grpc_method
from logbroker.server.sasl import SaslServer

ADMIN_METHODS = ("CreateTopics", "DeleteTopics", "CreatePartitions", "DescribeTopics", "DescribeCluster",
                 "ReassignPartition", "ListGroups", "DescribeGroup", "DeleteGroup", "ReadReplica",
                 "RecoverEmptyPartition", "AlterShareGroup", "ListShareGroups", "DescribeShareGroup",
                 "PurgeShareGroup", "CreateAcls", "DeleteAcls", "DescribeAcls", "AlterUserScramCredentials",
                 "DescribeUserScramCredentials", "AlterClientQuotas", "DescribeClientQuotas",
                 "DescribeHotPartitions")


def handler(apis: BrokerApis, sasl: SaslServer | None = None) -> grpc.GenericRpcHandler:
    """`sasl`: calls need a client certificate or a SASL session (server/sasl.py)."""
    return rpc.service("logbroker.v1.Admin", {name: grpc_method(apis, name, sasl) for name in ADMIN_METHODS})
