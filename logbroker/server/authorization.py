"""Authorization of client calls: which operations on which resources each API performs (`checks`,
pure), and the request hook that asks the ACL authorizer (security/acl.py) before any API runs.

Every API of `broker_apis.REQUEST_TYPES` has a rule here (a unit test holds that); an API without
one is refused, so a new API is never open by accident. A rule reads only the request's own names,
and checks every operation the call performs, whatever its flags say (CVE-2018-17196 class): a
Fetch naming a replica id needs ClusterAction on top of Read; a ShareFetch carrying group
settings needs Alter on the group on top of Read. The log of a topic's priority level
(cluster/priority_levels.py) is checked as that topic. Each check is a list of alternatives, any of
which suffices (CreateTopics: Create on the topic, or on the cluster, as Kafka).

| API | needs |
|---|---|
| Produce | Write Topic (each topic) |
| Fetch | Read Topic; with a replica id: ClusterAction Cluster |
| ListOffsets, DescribeTopics | Describe Topic |
| Metadata | nothing here: the answer lists only the topics the caller may Describe |
| Reply, ReplyBatch | nothing: the reply_to token is the capability |
| OffsetCommit, ShareAcknowledge | Read Group, Read Topic |
| OffsetFetch | Describe Group, Describe Topic |
| FindCoordinator, DescribeGroup, DescribeShareGroup | Describe Group |
| ConsumerGroupHeartbeat | Read Group, Describe Topic (subscribed names) |
| ShareFetch | Read Group, Read Topic; with settings: Alter Group |
| AlterShareGroup | Alter Group |
| DeleteGroup, PurgeShareGroup | Delete Group |
| CreateTopics | Create Topic or Create Cluster |
| DeleteTopics | Delete Topic |
| CreatePartitions | Alter Topic |
| DescribeCluster, ListGroups, ListShareGroups | Describe Cluster |
| ReassignPartition, RecoverEmptyPartition | Alter Cluster |
| CreateAcls, DeleteAcls, AlterUserScramCredentials, AlterClientQuotas | Alter Cluster |
| DescribeAcls, DescribeUserScramCredentials, DescribeClientQuotas | Describe Cluster |
| ReadReplica | Read Topic, Describe Cluster |
| DescribeHotPartitions | Describe Cluster, and Read Topic on each named topic; naming none (every topic): Alter Cluster too (its answer shows record keys) |

A call that presents the cluster secret (logbroker/cluster/cluster_secret.py) comes from another
broker of the cluster and is not checked: brokers read each other's partitions for share groups and
fetch as followers through these same APIs. On a TLS broker only with a broker's certificate on top
(`is_broker`, server/broker_principals.py): a stolen secret alone skips no ACL.

A refusal is `RequestRejected(PERMISSION_DENIED)` for the whole call, naming the principal, the
operation and the resource type, never the resource's name nor anything of its data.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from typing import Any

from google.protobuf.message import Message

from logbroker.cluster.priority_levels import parse_level_topic
from logbroker.security.acl import CLUSTER_NAME, Authorizer, Operation, ResourceType
from logbroker.server import audit
from logbroker.server.apis.broker_apis import RequestHook
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus

Check = list[tuple[Operation, ResourceType, str]]  # alternatives: any one suffices

R, W, D = Operation.READ, Operation.WRITE, Operation.DESCRIBE
TOPIC, GROUP, CLUSTER = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.CLUSTER


def _topics(op: Operation, names: Iterable[str]) -> list[Check]:
    # a priority level's log (__priority.<k>.<topic>) is its topic's: the topic's ACLs cover it
    return [[(op, TOPIC, n)] for n in sorted({parse_level_topic(n)[0] for n in names})]


def _group(op: Operation, r: Any) -> list[Check]:
    return [[(op, GROUP, r.group)]]


def _cluster(op: Operation) -> list[Check]:
    return [[(op, CLUSTER, CLUSTER_NAME)]]


def _fetch(r: Any) -> list[Check]:
    out = _topics(R, (p.topic for p in r.partitions))
    return out + (_cluster(Operation.CLUSTER_ACTION) if r.replica_id >= 0 else [])


def _share_fetch(r: Any) -> list[Check]:
    topics = [*r.topics, *(a.topic for a in r.acknowledgements)]
    alter = _group(Operation.ALTER, r) if r.HasField("settings") else []
    return _group(R, r) + alter + _topics(R, topics)


RULES: dict[str, Callable[[Any], list[Check]]] = {
    "Produce": lambda r: _topics(W, (p.topic for p in r.partitions)),
    "Fetch": _fetch,
    "ListOffsets": lambda r: _topics(D, (p.topic for p in r.partitions)),
    "Metadata": lambda r: [],
    "OffsetCommit": lambda r: _group(R, r) + _topics(R, (p.topic for p in r.partitions)),
    "OffsetFetch": lambda r: _group(D, r) + _topics(D, (p.topic for p in r.partitions)),
    "FindCoordinator": lambda r: _group(D, r),
    "ConsumerGroupHeartbeat": lambda r: _group(R, r) + _topics(D, r.subscribed_topics.topics),
    "CreateTopics": lambda r: [[(Operation.CREATE, TOPIC, t.name), (Operation.CREATE, CLUSTER, CLUSTER_NAME)]
                               for t in r.topics],
    "DeleteTopics": lambda r: _topics(Operation.DELETE, r.names),
    "CreatePartitions": lambda r: _topics(Operation.ALTER, [r.name]),
    "DescribeTopics": lambda r: _topics(D, r.names),
    "DescribeCluster": lambda r: _cluster(D),
    "ReassignPartition": lambda r: _cluster(Operation.ALTER),
    "ListGroups": lambda r: _cluster(D),
    "DescribeGroup": lambda r: _group(D, r),
    "DeleteGroup": lambda r: _group(Operation.DELETE, r),
    "ReadReplica": lambda r: _topics(R, [r.topic]) + _cluster(D),
    "RecoverEmptyPartition": lambda r: _cluster(Operation.ALTER),
    "ShareFetch": _share_fetch,
    "ShareAcknowledge": lambda r: _group(R, r) + _topics(R, (a.topic for a in r.acknowledgements)),
    "AlterShareGroup": lambda r: _group(Operation.ALTER, r),
    "ListShareGroups": lambda r: _cluster(D),
    "DescribeShareGroup": lambda r: _group(D, r),
    "PurgeShareGroup": lambda r: _group(Operation.DELETE, r),
    # a reply needs no grant: its reply_to token (random, held by the requester) is the capability, and
    # it reaches only that requester's connection
    "Reply": lambda r: [],
    "ReplyBatch": lambda r: [],
    # an anonymous idempotent producer needs no grant of its own (as Kafka since 3.0: its produces are
    # checked); a named one writes its TransactionalId
    "InitProducerId": lambda r: [[(W, ResourceType.TRANSACTIONAL_ID, r.producer_name)]] if r.producer_name else [],
    "CreateAcls": lambda r: _cluster(Operation.ALTER),
    "DeleteAcls": lambda r: _cluster(Operation.ALTER),
    "DescribeAcls": lambda r: _cluster(D),
    "AlterUserScramCredentials": lambda r: _cluster(Operation.ALTER),
    "DescribeUserScramCredentials": lambda r: _cluster(D),
    "AlterClientQuotas": lambda r: _cluster(Operation.ALTER),
    "DescribeClientQuotas": lambda r: _cluster(D),
    "DescribeHotPartitions": lambda r: _cluster(D) + (_topics(R, r.topics) if r.topics else _cluster(Operation.ALTER)),
}


def checks(api: str, request: Message) -> list[Check] | None:
    """The checks of one call; None for an API without a rule (refused)."""
    rule = RULES.get(api)
    return None if rule is None else rule(request)


def principal_of(context: RequestContext) -> str:
    """`User:NAME` for the connection's principal (ANONYMOUS on an unauthenticated connection)."""
    p = context.principal
    return p if p.startswith("User:") else f"User:{p}"


def host_of(peer: str) -> str:
    """The IP address of a listener's peer string: gRPC's "ipv4:1.2.3.4:5" / "ipv6:[::1]:5", or
    the record transport's "1.2.3.4:5"."""
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            peer = peer[len(prefix):]
    if peer.startswith("["):
        return peer[1:peer.find("]")] if "]" in peer else peer
    return peer.rpartition(":")[0] if peer.count(":") == 1 else peer


class AuthorizingHook(RequestHook):
    """The request hook of a broker run with `--authorizer acl`. `authorizer` is replaced as a whole
    when the ACLs change (`update`); a call sees one snapshot."""

    def __init__(self, authorizer: Authorizer, cluster_secret: bytes = b"") -> None:
        """`cluster_secret`: a call presenting it comes from another broker of this cluster (the
        coordinator's reads of a remote partition, a follower's fetch) and is not checked."""
        self.authorizer = authorizer
        self.denied_total = 0
        self._cluster_secret = cluster_secret
        # on a TLS broker (server/broker_principals.py): the secret passes only with a broker's certificate
        self.is_broker: Callable[[RequestContext], bool] | None = None

    def update(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer

    def allowed(self, context: RequestContext, op: Operation, rtype: ResourceType, name: str) -> bool:
        if rtype is TOPIC:
            name = parse_level_topic(name)[0]
        return self.authorizer.authorize(principal_of(context), host_of(context.peer), op, rtype, name)

    def _from_a_broker(self, context: RequestContext) -> bool:
        presented = context.presented_cluster_secret
        if not self._cluster_secret or presented is None or not hmac.compare_digest(presented, self._cluster_secret):
            return False
        return self.is_broker is None or self.is_broker(context)

    def on_request(self, api: str, context: RequestContext, request: Message) -> None:
        if self._from_a_broker(context):
            return
        wanted = checks(api, request)
        principal = principal_of(context)
        if wanted is None:
            self.denied_total += 1
            audit.denied(api, principal, context, "", "", "")
            raise RequestRejected(RequestStatus.PERMISSION_DENIED, f"no authorization rule for API {api}")
        host = host_of(context.peer)
        for alternatives in wanted:
            if not any(self.authorizer.authorize(principal, host, op, rt, name) for op, rt, name in alternatives):
                op, rt, name = alternatives[0]
                self.denied_total += 1
                audit.denied(api, principal, context, op.value, rt.value, name)
                raise RequestRejected(RequestStatus.PERMISSION_DENIED,
                                      f"{principal} is not authorized to {op.value} a {rt.value} of this request")
