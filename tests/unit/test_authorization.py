"""Which operations each API needs (server/authorization.py), and the hook's refusals: every API has
a rule, flags in a request add checks rather than skip them, and a refusal names no resource."""

from __future__ import annotations

import pytest

from logbroker.security.acl import (
    CLUSTER_NAME,
    AclBinding,
    Authorizer,
    Operation,
    PatternType,
    Permission,
    ResourceType,
)
from logbroker.server.apis.broker_apis import REQUEST_TYPES
from logbroker.server.authorization import RULES, AuthorizingHook, checks, host_of, principal_of
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.v1 import logbroker_pb2 as pb

TOPIC, GROUP, CLUSTER = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.CLUSTER


def allow(principal, op, rtype, name, pattern=PatternType.LITERAL):
    return AclBinding(principal, "*", op, Permission.ALLOW, rtype, name, pattern)


def test_every_api_has_a_rule():
    assert set(REQUEST_TYPES) <= set(RULES), sorted(set(REQUEST_TYPES) - set(RULES))


def test_an_api_without_a_rule_is_refused():
    hook = AuthorizingHook(Authorizer([], super_users=[]))
    with pytest.raises(RequestRejected) as e:
        hook.on_request("SomethingNew", RequestContext(), pb.MetadataRequest())
    assert e.value.status is RequestStatus.PERMISSION_DENIED and "no authorization rule" in e.value.message


def test_a_replica_id_in_a_fetch_adds_cluster_action():
    plain = pb.FetchRequest(partitions=[pb.FetchPartition(topic="t")], replica_id=-1)
    follower = pb.FetchRequest(partitions=[pb.FetchPartition(topic="t")], replica_id=2)
    assert checks("Fetch", plain) == [[(Operation.READ, TOPIC, "t")]]
    assert [(Operation.CLUSTER_ACTION, CLUSTER, CLUSTER_NAME)] in (checks("Fetch", follower) or [])


def test_share_fetch_with_settings_needs_alter_on_the_group():
    req = pb.ShareFetchRequest(group="g", topics=["t"])
    assert [(Operation.ALTER, GROUP, "g")] not in (checks("ShareFetch", req) or [])
    req.settings.lock_ms = 1000
    assert [(Operation.ALTER, GROUP, "g")] in (checks("ShareFetch", req) or [])


def test_share_fetch_checks_the_topics_it_acknowledges_too():
    req = pb.ShareFetchRequest(group="g", topics=["mine"], acknowledgements=[pb.ShareAcknowledgement(topic="theirs")])
    assert [(Operation.READ, TOPIC, "theirs")] in (checks("ShareFetch", req) or [])


def test_hot_partitions_show_keys_so_need_read_on_each_topic_or_alter_on_the_cluster():
    describe = [(Operation.DESCRIBE, CLUSTER, CLUSTER_NAME)]
    named = checks("DescribeHotPartitions", pb.DescribeHotPartitionsRequest(topics=["b", "a"]))
    assert named == [describe, [(Operation.READ, TOPIC, "a")], [(Operation.READ, TOPIC, "b")]]
    every = checks("DescribeHotPartitions", pb.DescribeHotPartitionsRequest())
    assert every == [describe, [(Operation.ALTER, CLUSTER, CLUSTER_NAME)]]


def test_hook_allows_what_the_acls_grant_and_denies_the_rest_without_naming_it():
    acls = [allow("User:a", Operation.WRITE, TOPIC, "a.", PatternType.PREFIXED)]
    hook = AuthorizingHook(Authorizer(acls))
    ctx_a, ctx_b = RequestContext(principal="a", peer="ipv4:127.0.0.1:5000"), RequestContext(principal="b")
    produce = pb.ProduceRequest(partitions=[pb.ProducePartition(topic="a.orders", records=b"secret-bytes")])
    hook.on_request("Produce", ctx_a, produce)
    with pytest.raises(RequestRejected) as e:
        hook.on_request("Produce", ctx_b, produce)
    assert e.value.status is RequestStatus.PERMISSION_DENIED
    assert "a.orders" not in e.value.message and "secret" not in e.value.message
    assert "User:b" in e.value.message and "Write" in e.value.message
    assert hook.denied_total == 1


def test_create_topics_accepts_create_on_the_cluster_instead():
    hook = AuthorizingHook(Authorizer([allow("User:ops", Operation.CREATE, CLUSTER, CLUSTER_NAME)]))
    hook.on_request("CreateTopics", RequestContext(principal="ops"), pb.CreateTopicsRequest(topics=[pb.NewTopic(name="x")]))


@pytest.mark.parametrize("peer, host", [
    ("ipv4:127.0.0.1:5000", "127.0.0.1"), ("ipv6:[::1]:5000", "::1"), ("10.1.2.3:99", "10.1.2.3"), ("", ""),
])
def test_host_of(peer, host):
    assert host_of(peer) == host


def test_principal_of():
    assert principal_of(RequestContext()) == "User:ANONYMOUS"
    assert principal_of(RequestContext(principal="User:x")) == "User:x"


def test_a_call_with_the_cluster_secret_is_a_brokers_and_is_not_checked():
    secret = b"s" * 32
    hook = AuthorizingHook(Authorizer([]), cluster_secret=secret)
    follower = pb.FetchRequest(partitions=[pb.FetchPartition(topic="t")], replica_id=2)
    hook.on_request("Fetch", RequestContext(presented_cluster_secret=secret), follower)
    for presented in (None, b"x" * 32):
        with pytest.raises(RequestRejected):
            hook.on_request("Fetch", RequestContext(presented_cluster_secret=presented), follower)
    with pytest.raises(RequestRejected):  # a standalone broker has no secret: nothing passes unchecked
        AuthorizingHook(Authorizer([])).on_request("Fetch", RequestContext(presented_cluster_secret=b""), follower)



def test_on_a_tls_broker_the_secret_skips_the_checks_only_with_a_brokers_certificate():
    secret = b"s" * 32
    hook = AuthorizingHook(Authorizer([]), cluster_secret=secret)
    hook.is_broker = lambda context: context.principal == "User:broker"
    follower = pb.FetchRequest(partitions=[pb.FetchPartition(topic="t")], replica_id=2)
    hook.on_request("Fetch", RequestContext(principal="User:broker", presented_cluster_secret=secret), follower)
    with pytest.raises(RequestRejected):  # a client that stole the secret is checked as itself
        hook.on_request("Fetch", RequestContext(principal="User:alice", presented_cluster_secret=secret), follower)

def test_a_priority_level_log_is_checked_as_its_topic():
    req = pb.ProduceRequest(partitions=[pb.ProducePartition(topic="__priority.3.orders"),
                                        pb.ProducePartition(topic="orders")])
    assert checks("Produce", req) == [[(Operation.WRITE, TOPIC, "orders")]]
