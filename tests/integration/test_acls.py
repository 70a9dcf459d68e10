"""`serve --authorizer acl` on a real broker: calls are refused until an ACL allows them, a prefixed
ACL grants a family of topics, a deny beats an allow, Metadata lists only describable topics, ACLs
written to the store are applied without a restart, and a refusal names no resource.

Until TLS or SCRAM authenticate a connection every caller is User:ANONYMOUS, so these tests grant
and refuse that principal; the first ACLs (the right to manage ACLs) are written straight into the
broker's metadata store, as an operator bootstraps Kafka's ACLs in ZooKeeper.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.cluster.local_store import LocalMetadataStore
from logbroker.errors import PermissionDeniedError, TopicAuthorizationFailedError
from logbroker.security.acl import CLUSTER_NAME, AclBinding, Operation, PatternType, Permission, ResourceType
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(120)

ANON = "User:ANONYMOUS"


def _acl(op: Operation, rtype: ResourceType, name: str, permission: Permission = Permission.ALLOW,
         pattern: PatternType = PatternType.LITERAL) -> AclBinding:
    return AclBinding(ANON, "*", op, permission, rtype, name, pattern)


@pytest.fixture
def secured(broker_factory, tmp_path):
    b = broker_factory(extra_args=["--authorizer", "acl"])
    meta = LocalMetadataStore(b.data_dir)  # LMDB: a second process may write the same environment
    meta.security().add_acls([_acl(Operation.ALTER, ResourceType.CLUSTER, CLUSTER_NAME),
                              _acl(Operation.DESCRIBE, ResourceType.CLUSTER, CLUSTER_NAME),
                              _acl(Operation.CREATE, ResourceType.CLUSTER, CLUSTER_NAME)])
    meta.close()
    admin = Admin(b.bootstrap, request_timeout_ms=5000)
    wait_for(lambda: _may_list_acls(admin), 15, "the broker to apply the bootstrap ACLs")
    yield b, admin
    admin.close()


def _may_list_acls(admin: Admin) -> bool:
    try:
        admin.describe_acls()
        return True
    except PermissionDeniedError:
        return False


def _produce(b, topic: str) -> None:
    with Producer(b.bootstrap, request_timeout_ms=5000, delivery_timeout_ms=10_000) as p:
        p.send(topic, b"v", key=b"k").get(timeout=15)


def _consume(b, topic: str) -> list[bytes]:
    with Consumer(b.bootstrap, request_timeout_ms=5000) as c:
        c.assign([(topic, 0)])
        c.seek_to_beginning()
        return [m.value for m in c.poll(timeout_ms=3000)]


def test_acls_decide_produce_fetch_and_metadata(secured):
    b, admin = secured
    admin.create_topic("a.orders")
    admin.create_topic("b.secret")
    with pytest.raises(TopicAuthorizationFailedError):
        _produce(b, "a.orders")  # the producer may not even look the topic up
    assert admin.list_topics() == []  # nothing describable yet
    assert admin.describe_topics() == []  # "every topic" lists only what the caller may describe
    admin.create_acls([_acl(Operation.DESCRIBE, ResourceType.TOPIC, "a.orders")])
    with pytest.raises(PermissionDeniedError) as e:
        _produce(b, "a.orders")
    assert "a.orders" not in str(e.value) and "Write" in str(e.value)

    admin.create_acls([_acl(Operation.WRITE, ResourceType.TOPIC, "a.", pattern=PatternType.PREFIXED)])
    _produce(b, "a.orders")
    assert admin.list_topics() == ["a.orders"]  # Write implies Describe; b.secret stays hidden
    assert [t.name for t in admin.describe_topics()] == ["a.orders"]
    with pytest.raises(PermissionDeniedError):
        _consume(b, "a.orders")

    admin.create_acls([_acl(Operation.READ, ResourceType.TOPIC, "a.orders")])
    assert _consume(b, "a.orders") == [b"v"]
    admin.create_acls([_acl(Operation.READ, ResourceType.TOPIC, "a.", Permission.DENY, PatternType.PREFIXED)])
    with pytest.raises(PermissionDeniedError):
        _consume(b, "a.orders")  # the deny beats the literal allow
    removed = admin.delete_acls(permission="Deny")
    assert [x.name for x in removed] == ["a."]
    assert _consume(b, "a.orders") == [b"v"]

    events = _audit_events(b)
    assert {"audit": "denied", "api": "Produce", "principal": ANON, "operation": "Write", "resource_type": "Topic",
            "resource": "a.orders"}.items() <= next(e for e in events if e.get("api") == "Produce").items()
    created = [e for e in events if e["api"] == "CreateTopics"]
    assert [(e["resources"], e["outcome"]) for e in created] == [(["Topic:a.orders"], "ok"), (["Topic:b.secret"], "ok")]
    assert any(e["api"] == "DeleteAcls" and e["audit"] == "change" for e in events)


def _audit_events(b) -> list[dict]:
    """The JSON objects of the broker's audit log lines (logger logbroker.audit)."""
    out = []
    for line in b.log_path.read_text().splitlines():
        start = line.find('{"audit"')
        if "logbroker.audit" in line and start >= 0:
            out.append(json.loads(line[start:]))
    return out


def test_a_malformed_acl_is_refused_and_nothing_stored(secured):
    b, admin = secured
    before = admin.describe_acls()
    out = subprocess.run([sys.executable, "-m", "logbroker", "acls", "add", "--bootstrap", b.bootstrap,
                          "--allow-principal", "alice", "--operation", "Write", "--topic", "t"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "User:NAME" in out.stderr, out.stderr
    assert admin.describe_acls() == before


def test_cli_adds_lists_and_removes(secured):
    b, _ = secured

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "logbroker", *args, "--bootstrap", b.bootstrap],
                              capture_output=True, text=True, timeout=60, cwd=REPO)

    out = cli("acls", "add", "--allow-principal", "User:alice", "--operation", "Read", "--operation", "Write",
              "--topic", "orders")
    assert out.returncode == 0 and "2 ACL(s) added" in out.stdout, out.stderr
    listed = cli("acls", "list", "--principal", "User:alice")
    assert "Allow User:alice from * to Read Topic:literal:orders" in listed.stdout
    assert cli("acls", "remove", "--principal", "User:alice", "--operation", "Read").returncode == 0
    assert "to Read" not in cli("acls", "list", "--principal", "User:alice").stdout


def test_users_are_stored_hashed_and_listed_without_secrets(secured):
    b, admin = secured
    admin.upsert_user("alice", "correct horse", "SCRAM-SHA-512")
    out = subprocess.run([sys.executable, "-m", "logbroker", "users", "add", "bob", "--password-stdin",
                          "--bootstrap", b.bootstrap], input="hunter2\n", capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert admin.list_users() == {"alice": ["SCRAM-SHA-512"], "bob": ["SCRAM-SHA-256"]}
    assert admin.delete_user("bob") and not admin.delete_user("bob")
    log_text = b.log_path.read_text()
    assert "hunter2" not in log_text and "correct horse" not in log_text


@pytest.mark.slow
def test_a_cluster_with_acls_replicates_and_every_broker_applies_a_change(zookeeper, zk_chroot, tmp_path):
    """Brokers call each other's APIs with the cluster secret (follower fetches, coordinator reads),
    which the authorizer lets through; a client's call is checked on whichever broker it reaches,
    and an ACL added through one broker is applied by the other within seconds."""
    from logbroker.cluster.security_store import ZkSecurityStore
    from logbroker.cluster.zk_store import ZkStore
    from tests.cluster import Cluster

    zk = ZkStore(zookeeper.address, chroot=zk_chroot, session_timeout_ms=4000)
    zk.start()
    try:
        ZkSecurityStore(zk).add_acls([_acl(op, ResourceType.CLUSTER, CLUSTER_NAME)
                                      for op in (Operation.DESCRIBE, Operation.CREATE, Operation.ALTER)])
    finally:
        zk.close()
    c = Cluster(zookeeper, zk_chroot, tmp_path, 2, extra_args=["--authorizer", "acl"]).start()
    try:
        with Admin(c.bootstrap, request_timeout_ms=5000) as admin:
            admin.create_topic("orders", partitions=2, replication_factor=2)
            admin.create_acls([_acl(Operation.WRITE, ResourceType.TOPIC, "orders")])

            def produce() -> bool:
                with Producer(c.bootstrap, acks="all", request_timeout_ms=5000) as p:
                    futures = [p.send("orders", b"v%d" % i, key=b"k%d" % i) for i in range(20)]
                    for f in futures:  # both partitions: both brokers lead one, each checks the Write
                        f.get(timeout=30)
                return True

            wait_for(lambda: _quietly(produce), 30, "both brokers to apply the Write ACL")
            # acks=all: the followers fetched every acknowledged batch (earlier tries may have landed on
            # the broker that had the ACL already, so there can be more than 20)
            total = sum(c.high_watermark("orders", p) for p in (0, 1))
            assert total >= 20
            with pytest.raises(PermissionDeniedError), Consumer(c.bootstrap, group="g", request_timeout_ms=5000) as cons:
                cons.subscribe(["orders"])
                cons.poll(timeout_ms=3000)  # the group's heartbeat is refused: poll raises it
            admin.create_acls([_acl(Operation.READ, ResourceType.TOPIC, "orders"),
                               _acl(Operation.READ, ResourceType.GROUP, "g")])

            def read_all() -> bool:
                with Consumer(c.bootstrap, group="g", request_timeout_ms=5000, auto_offset_reset="earliest") as cons:
                    cons.subscribe(["orders"])
                    got = []
                    for _ in range(10):
                        got += cons.poll(timeout_ms=1000)
                        if len(got) >= total:
                            return True
                    return False

            wait_for(lambda: _quietly(read_all), 30, "a group reading on both brokers")
    finally:
        c.stop()


def _quietly(fn) -> bool:
    try:
        return bool(fn())
    except (PermissionDeniedError, TopicAuthorizationFailedError):
        return False  # the other broker has not loaded the new ACLs yet
