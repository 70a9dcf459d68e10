"""server/broker_principals.py: who passes the broker-only check of a TLS broker (no socket)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from logbroker.log_throttle import LogThrottle
from logbroker.server.broker_principals import BrokerPrincipals, broker_principals
from logbroker.server.request_context import ANONYMOUS, RequestContext, RequestRejected, RequestStatus
from logbroker.tls import ServerTls, certificate_common_name


def ctx(principal: str) -> RequestContext:
    return RequestContext(principal=principal, peer="ipv4:10.0.0.9:5000")


def test_listed_principals_pass_others_are_refused() -> None:
    check = BrokerPrincipals(frozenset({"User:broker-0", "User:broker-1"}), refusals=LogThrottle(10.0))
    check.require(ctx("User:broker-1"), "LeaderAndIsr")
    with pytest.raises(RequestRejected) as denied:
        check.require(ctx("User:alice"), "LeaderAndIsr")
    assert denied.value.status is RequestStatus.PERMISSION_DENIED and "not a broker principal" in denied.value.message
    with pytest.raises(RequestRejected) as anon:
        check.require(ctx(ANONYMOUS), "StopReplica")
    assert anon.value.status is RequestStatus.UNAUTHENTICATED


def test_with_the_acl_authorizer_cluster_action_grants_it_but_never_to_anonymous() -> None:
    granted = {"User:ops-broker", ANONYMOUS}
    check = BrokerPrincipals(frozenset(), lambda c: c.principal in granted, refusals=LogThrottle(10.0))
    assert check.is_broker(ctx("User:ops-broker"))
    assert not check.is_broker(ctx("User:alice"))
    assert not check.is_broker(ctx(ANONYMOUS))


def test_default_is_the_cn_of_the_brokers_own_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", common_name="broker-7")
    cert, key, ca_file = tmp_path / "b.pem", tmp_path / "b.key", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(c.bytes() for c in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    ca.cert_pem.write_to_path(str(ca_file))
    assert certificate_common_name(str(cert)) == "broker-7"
    tls = ServerTls(str(cert), str(key), str(ca_file), "required")
    check = broker_principals(tls, (), None)
    assert check is not None and check.principals == frozenset({"User:broker-7"})
    configured = broker_principals(tls, ("User:a", "User:b"), None)
    assert configured is not None and configured.principals == frozenset({"User:a", "User:b"})
    assert broker_principals(None, ("User:a",), None) is None  # plaintext: the cluster secret alone
