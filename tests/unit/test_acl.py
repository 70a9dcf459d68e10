"""The authorizer's decision (logbroker/security/acl.py): literal, wildcard and prefixed names, deny over
allow, implied Describe, super users, hosts, and malformed bindings refused."""

from __future__ import annotations

import pytest

from logbroker.security.acl import (
    CLUSTER_NAME,
    AclBinding,
    AclError,
    Authorizer,
    Operation,
    PatternType,
    Permission,
    ResourceType,
    parse_operation,
)

TOPIC, GROUP, CLUSTER = ResourceType.TOPIC, ResourceType.GROUP, ResourceType.CLUSTER
ALLOW, DENY = Permission.ALLOW, Permission.DENY
R, W, D = Operation.READ, Operation.WRITE, Operation.DESCRIBE


def acl(principal, op, name, permission=ALLOW, rtype=TOPIC, pattern=PatternType.LITERAL, host="*"):
    return AclBinding(principal, host, op, permission, rtype, name, pattern)


def test_no_acl_means_no():
    auth = Authorizer([])
    assert not auth.authorize("User:alice", "127.0.0.1", W, TOPIC, "orders")


def test_literal_allow_is_only_for_that_name_principal_and_operation():
    auth = Authorizer([acl("User:alice", W, "orders")])
    assert auth.authorize("User:alice", "10.0.0.1", W, TOPIC, "orders")
    assert not auth.authorize("User:alice", "10.0.0.1", R, TOPIC, "orders")
    assert not auth.authorize("User:alice", "10.0.0.1", W, TOPIC, "orders2")
    assert not auth.authorize("User:bob", "10.0.0.1", W, TOPIC, "orders")
    assert not auth.authorize("User:alice", "10.0.0.1", W, GROUP, "orders")


def test_prefixed_grants_a_family_of_names():
    auth = Authorizer([acl("User:alice", R, "payments.", pattern=PatternType.PREFIXED)])
    assert auth.authorize("User:alice", "h", R, TOPIC, "payments.eu")
    assert auth.authorize("User:alice", "h", R, TOPIC, "payments.")
    assert not auth.authorize("User:alice", "h", R, TOPIC, "payments")
    assert not auth.authorize("User:alice", "h", R, TOPIC, "x.payments.eu")


def test_wildcards_for_names_and_principals():
    auth = Authorizer([acl("User:*", R, "*")])
    assert auth.authorize("User:anyone", "h", R, TOPIC, "whatever")
    assert not auth.authorize("User:anyone", "h", W, TOPIC, "whatever")


def test_deny_beats_allow_from_any_pattern():
    auth = Authorizer([acl("User:alice", Operation.ALL, "*"),
                       acl("User:alice", W, "secret.", DENY, pattern=PatternType.PREFIXED)])
    assert auth.authorize("User:alice", "h", W, TOPIC, "orders")
    assert not auth.authorize("User:alice", "h", W, TOPIC, "secret.keys")
    assert auth.authorize("User:alice", "h", R, TOPIC, "secret.keys")


def test_deny_of_all_users_covers_a_named_allow():
    auth = Authorizer([acl("User:alice", R, "orders"), acl("User:*", R, "orders", DENY)])
    assert not auth.authorize("User:alice", "h", R, TOPIC, "orders")


def test_read_write_delete_alter_imply_describe_but_not_the_reverse():
    for op in (R, W, Operation.DELETE, Operation.ALTER):
        assert Authorizer([acl("User:a", op, "t")]).authorize("User:a", "h", D, TOPIC, "t")
    assert not Authorizer([acl("User:a", D, "t")]).authorize("User:a", "h", R, TOPIC, "t")
    assert not Authorizer([acl("User:a", Operation.CREATE, "t")]).authorize("User:a", "h", D, TOPIC, "t")


def test_host_must_match():
    auth = Authorizer([acl("User:a", R, "t", host="10.0.0.1")])
    assert auth.authorize("User:a", "10.0.0.1", R, TOPIC, "t")
    assert not auth.authorize("User:a", "10.0.0.2", R, TOPIC, "t")


def test_super_users_may_do_anything_even_when_denied():
    auth = Authorizer([acl("User:root", W, "*", DENY)], super_users=["User:root"])
    assert auth.authorize("User:root", "h", W, TOPIC, "t")
    assert auth.authorize("User:root", "h", Operation.CLUSTER_ACTION, CLUSTER, CLUSTER_NAME)


def test_cluster_action_needs_its_own_grant():
    auth = Authorizer([acl("User:broker", Operation.CLUSTER_ACTION, CLUSTER_NAME, rtype=CLUSTER)])
    assert auth.authorize("User:broker", "h", Operation.CLUSTER_ACTION, CLUSTER, CLUSTER_NAME)
    assert not auth.authorize("User:client", "h", Operation.CLUSTER_ACTION, CLUSTER, CLUSTER_NAME)


@pytest.mark.parametrize("kwargs, match", [
    ({"principal": "alice"}, "User:NAME"),
    ({"principal": "Group:x"}, "User:NAME"),
    ({"host": "example.com"}, "IP address"),
    ({"name": ""}, "resource name"),
    ({"name": "a" * 300}, "resource name"),
    ({"name": "*", "pattern": PatternType.PREFIXED}, "prefixed"),
    ({"rtype": CLUSTER, "name": "other"}, "Cluster resource"),
])
def test_malformed_bindings_are_refused(kwargs, match):
    args = {"principal": "User:a", "op": R, "name": "t", **kwargs}
    with pytest.raises(AclError, match=match):
        acl(args.pop("principal"), args.pop("op"), args.pop("name"), **args)


def test_json_round_trip_and_parsing():
    b = acl("User:a", W, "pay.", DENY, pattern=PatternType.PREFIXED, host="::1")
    assert AclBinding.from_json(b.to_json()) == b
    assert parse_operation("cluster-action") is Operation.CLUSTER_ACTION
    assert parse_operation("ClusterAction") is Operation.CLUSTER_ACTION
    with pytest.raises(AclError, match="unknown operation"):
        parse_operation("Own")
    with pytest.raises(AclError, match="no field"):
        AclBinding.from_json({"principal": "User:a"})
