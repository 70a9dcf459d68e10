"""The client id (logbroker/client_id.py) on a real broker: it reaches the broker's RequestContext over
gRPC (the `client-id` metadata) and over the record transport (the API_CLIENT_ID frame), as the
audit log shows; a malformed one is refused by the broker on both listeners and by the clients
before they connect. It is never an identity: the denied caller is still User:ANONYMOUS."""

from __future__ import annotations

import socket

import grpc
import pytest

from logbroker import Admin, Producer, wire
from logbroker.client.metadata_cache import MetadataCache
from logbroker.cluster.local_store import LocalMetadataStore
from logbroker.errors import PermissionDeniedError
from logbroker.security.acl import CLUSTER_NAME, AclBinding, Operation, Permission, ResourceType
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import wait_for
from tests.integration.test_acls import _audit_events
from tests.integration.test_wire_transport import data_port, frame, produce_frame, read_response

pytestmark = pytest.mark.timeout(120)

ANON = "User:ANONYMOUS"




def _acl(op: Operation, rtype: ResourceType, name: str) -> AclBinding:
    return AclBinding(ANON, "*", op, Permission.ALLOW, rtype, name)


def test_the_broker_sees_the_client_id_over_grpc_and_the_record_transport(broker_factory):
    b = broker_factory(extra_args=["--authorizer", "acl"])
    meta = LocalMetadataStore(b.data_dir)
    meta.security().add_acls([_acl(Operation.CREATE, ResourceType.CLUSTER, CLUSTER_NAME),
                              _acl(Operation.DESCRIBE, ResourceType.CLUSTER, CLUSTER_NAME),
                              _acl(Operation.DESCRIBE, ResourceType.TOPIC, "orders")])
    meta.close()
    with Admin(b.bootstrap, request_timeout_ms=5000, client_id="ops-console.1") as admin:
        wait_for(lambda: _created(admin), 15, "the broker to apply the bootstrap ACLs")
    # Describe but no Write: the producer finds the topic (gRPC) and its Produce, sent over the
    # record transport, is denied and audited with the connection's client id
    with pytest.raises(PermissionDeniedError), Producer(b.bootstrap, client_id="billing-7", request_timeout_ms=5000,
                                                        delivery_timeout_ms=10_000) as p:
        p.send("orders", b"v").get(timeout=15)
    events = _audit_events(b)
    created = next(e for e in events if e["api"] == "CreateTopics" and e.get("outcome") == "ok")
    assert created["client_id"] == "ops-console.1" and created["principal"] == ANON
    denied = next(e for e in events if e["api"] == "Produce")
    assert (denied["audit"], denied["client_id"], denied["principal"]) == ("denied", "billing-7", ANON)
    assert not denied["peer"].startswith("ipv4:")  # the record transport's peer (gRPC's says "ipv4:")


def _created(admin: Admin) -> bool:
    try:
        admin.create_topic("orders", partitions=1)
        return True
    except PermissionDeniedError:
        return False


def test_a_malformed_client_id_is_refused_by_the_broker_and_the_clients(broker):
    with grpc.insecure_channel(broker.address) as ch, pytest.raises(grpc.RpcError) as e:
        pbg.BrokerStub(ch).Metadata(pb.MetadataRequest(), metadata=[("client-id", "has space")], timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "client id" in (e.value.details() or "")
    with grpc.insecure_channel(broker.address) as ch:  # a good one, and none at all, are fine
        pbg.BrokerStub(ch).Metadata(pb.MetadataRequest(), metadata=[("client-id", "ok-1")], timeout=10)
        pbg.BrokerStub(ch).Metadata(pb.MetadataRequest(), timeout=10)

    with Admin(broker.bootstrap) as admin:
        admin.create_topic("t", partitions=1)
    with socket.create_connection(("127.0.0.1", data_port(broker)), timeout=10) as sock:
        sock.settimeout(20)
        sock.sendall(frame(wire.API_CLIENT_ID, 1, b"x" * 129) + frame(wire.API_CLIENT_ID, 2, b"good.id")
                     + produce_frame(3, "t", b"v"))
        corr, status, body = read_response(sock)
        assert (corr, wire.status_code(status)) == (1, grpc.StatusCode.INVALID_ARGUMENT)
        assert "client id" in body.decode() and len(body) < 300
        assert read_response(sock)[:2] == (2, wire.STATUS_OK)
        corr, status, body = read_response(sock)  # the connection went on
        assert (corr, status) == (3, wire.STATUS_OK)
        assert pb.ProduceResponse.FromString(body).results[0].error_code == pb.NONE

    for bad in ("", "a/b", "x" * 129, "naïve"):
        with pytest.raises(ValueError, match="client id"):
            Producer(broker.bootstrap, client_id=bad)
    with MetadataCache(broker.bootstrap, client_id="shared") as cache, pytest.raises(ValueError, match="differs"):
        Producer(cache, client_id="another")
