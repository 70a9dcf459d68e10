"""SCRAM on real broker processes (issue 18, item 2): `--sasl-mechanisms` with TLS; a user created by
a super user (authenticated by its client certificate) logs in with its password over gRPC (Admin)
and the record transport (produce, consume), as User:<name> (checked with ACLs); a wrong password is
refused after the delay and counted; a replayed or altered client-final is refused (frames driven
by hand); SCRAM over plaintext is refused; a gRPC session token is useless on another connection;
no password appears in the broker's log."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.client.metadata_cache import MetadataCache
from logbroker.client.sasl import SESSION_METADATA, SaslConfig, _wire_step, grpc_authenticate
from logbroker.client.wire_connection import open_socket
from logbroker.cluster.local_store import LocalMetadataStore
from logbroker.errors import PermissionDeniedError, TopicAuthorizationFailedError, UnauthenticatedError
from logbroker.security.acl import AclBinding, Operation, PatternType, Permission, ResourceType
from logbroker.security.scram import ClientExchange, Mechanism, make_credential
from logbroker.tls import TlsConfig
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import BrokerProcess, free_port, wait_for
from tests.integration.test_tls import Pki, pki  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(180)

ALICE_PASSWORD = "alice-Pw-7f3a9c"
ADMIN_PASSWORD = "admin-Pw-0b8e21"
WRONG_PASSWORD = "mallory-Guess-51d2"


ADMIN = SaslConfig("admin", ADMIN_PASSWORD, "SCRAM-SHA-512")


class SaslBroker:
    def __init__(self, broker: BrokerProcess, ca_file: str, metrics_port: int) -> None:
        self.broker = broker
        self.ca_only = TlsConfig(ca_file)  # TLS, no client certificate: must log in
        self.metrics_port = metrics_port

    def failed_logins(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        line = next(ln for ln in text.splitlines() if ln.startswith("logbroker_sasl_failed_logins_total"))
        return float(line.split()[1])


@pytest.fixture
def sasl_broker(pki: Pki, tmp_path: Path) -> Iterator[SaslBroker]:  # noqa: F811
    metrics_port = free_port()
    b = BrokerProcess(tmp_path / "data", free_port(),
                      [*pki.broker_args("requested"), "--sasl-mechanisms", "SCRAM-SHA-256,SCRAM-SHA-512",
                       "--authorizer", "acl", "--super-users", "User:admin",
                       "--metrics-listen", f"127.0.0.1:{metrics_port}"],
                      tls=pki.client("admin"))
    try:
        b.start()
        # the super user's credential written via the store (LMDB: a second process may write it)
        meta = LocalMetadataStore(b.data_dir)
        meta.security().set_credential("admin", make_credential(Mechanism.SCRAM_SHA_512, ADMIN_PASSWORD))
        meta.close()
        with Admin(b.bootstrap, tls=TlsConfig(pki.ca_file), sasl=ADMIN) as admin:
            admin.create_topic("orders")
            admin.create_topic("secret")
            admin.upsert_user("alice", ALICE_PASSWORD, "SCRAM-SHA-256")
            admin.upsert_user("alice", ALICE_PASSWORD, "SCRAM-SHA-512")
            admin.create_acls([AclBinding("User:alice", "*", op, Permission.ALLOW, ResourceType.TOPIC, "orders",
                                          PatternType.LITERAL) for op in (Operation.WRITE, Operation.READ)])
        yield SaslBroker(b, pki.ca_file, metrics_port)
    finally:
        b.stop()
    log = b.log_text()
    for secret in (ALICE_PASSWORD, WRONG_PASSWORD, ADMIN_PASSWORD):
        assert secret not in log, "a password in the broker's log"


def test_a_good_password_works_over_grpc_and_the_record_transport_as_its_user(sasl_broker: SaslBroker) -> None:
    b, tls = sasl_broker.broker, sasl_broker.ca_only
    for mech in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        alice = SaslConfig("alice", ALICE_PASSWORD, mech)
        with Admin(b.bootstrap, tls=tls, sasl=alice) as admin:
            wait_for(lambda a=admin: a.list_topics() == ["orders"], 15, "alice to see only her topic")  # type: ignore[misc]
            with pytest.raises(PermissionDeniedError, match="User:alice"):
                admin.create_topic("mine")
    alice = SaslConfig("alice", ALICE_PASSWORD)
    with Producer(b.bootstrap, tls=tls, sasl=alice) as p:
        p.send("orders", b"from-alice").get(timeout=15)
        with pytest.raises(TopicAuthorizationFailedError):
            p.send("secret", b"x").get(timeout=15)
    with Consumer(b.bootstrap, tls=tls, sasl=alice) as c:
        c.assign([("orders", 0)])
        c.seek_to_beginning()
        assert [m.value for m in c.poll(timeout_ms=5000)] == [b"from-alice"]
    # without logging in: every call is UNAUTHENTICATED, naming SASL
    with pytest.raises(UnauthenticatedError, match="SCRAM-SHA-256"), \
            Admin(b.bootstrap, tls=tls, request_timeout_ms=3000) as anonymous:
        anonymous.list_topics()


def test_the_cli_logs_in_with_a_password_file(sasl_broker: SaslBroker, tmp_path: Path) -> None:
    b, tls = sasl_broker.broker, sasl_broker.ca_only

    def cli(password: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "password"
        path.write_text(password + "\n")
        return subprocess.run([sys.executable, "-m", "logbroker", "topics", "list", "--bootstrap", b.bootstrap,
                               "--tls-ca", tls.ca_file],
                              env={**os.environ, "LOGBROKER_SASL_USER": "alice",
                                   "LOGBROKER_SASL_PASSWORD_FILE": str(path)},
                              capture_output=True, text=True, timeout=60)

    wait_for(lambda: cli(ALICE_PASSWORD).stdout.split() == ["orders"], 15, "alice to list her topic")
    refused = cli(WRONG_PASSWORD)
    assert refused.returncode != 0 and "authentication failed" in refused.stderr
    assert WRONG_PASSWORD not in refused.stderr + refused.stdout


def test_a_wrong_password_is_refused_after_the_delay_and_counted(sasl_broker: SaslBroker) -> None:
    b, tls = sasl_broker.broker, sasl_broker.ca_only
    before = sasl_broker.failed_logins()
    started = time.monotonic()
    with pytest.raises(UnauthenticatedError, match="authentication failed"), \
            Admin(b.bootstrap, tls=tls, sasl=SaslConfig("alice", WRONG_PASSWORD), request_timeout_ms=5000) as admin:
        admin.list_topics()
    assert time.monotonic() - started >= 1.0
    port = _data_port(sasl_broker)
    for user in ("alice", "nobody"):  # an unknown user: the same answer
        started = time.monotonic()
        with pytest.raises(UnauthenticatedError, match="authentication failed") as err:
            open_socket(("127.0.0.1", port), 5.0, tls.ssl_context(), SaslConfig(user, WRONG_PASSWORD))
        assert time.monotonic() - started >= 1.0
        assert WRONG_PASSWORD not in str(err.value)
    with Producer(b.bootstrap, tls=tls, sasl=SaslConfig("alice", WRONG_PASSWORD), max_block_ms=10_000) as p, \
            pytest.raises(UnauthenticatedError):
        p.send("orders", b"x").get(timeout=15)
    wait_for(lambda: sasl_broker.failed_logins() >= before + 4, 10, "the failed logins to be counted")
    assert '"api":"SaslAuthenticate"' in b.log_text() and '"principal":"User:nobody"' in b.log_text()  # audited


def _data_port(sasl_broker: SaslBroker) -> int:
    with MetadataCache(sasl_broker.broker.bootstrap, tls=sasl_broker.ca_only, sasl=ADMIN) as cache:
        cache.refresh([])
        target = cache.data_address(sasl_broker.broker.address)
    assert target is not None
    return target[1]


def _raw_connection(sasl_broker: SaslBroker) -> object:
    port = _data_port(sasl_broker)
    return open_socket(("127.0.0.1", port), 5.0, sasl_broker.ca_only.ssl_context())


def test_a_replayed_or_altered_client_final_is_refused(sasl_broker: SaslBroker) -> None:
    mech = "SCRAM-SHA-256"
    # a good exchange, by hand; its client-final is kept
    sock = _raw_connection(sasl_broker)
    good = ClientExchange(Mechanism.SCRAM_SHA_256, "alice", ALICE_PASSWORD)
    server_first = _wire_step(sock, 1, mech, good.first())  # type: ignore[arg-type]
    recorded_final = good.final(server_first)
    good.verify(_wire_step(sock, 2, mech, recorded_final))  # type: ignore[arg-type]
    # replayed on another connection, after its own client-first: another nonce, refused
    sock2 = _raw_connection(sasl_broker)
    _wire_step(sock2, 1, mech, ClientExchange(Mechanism.SCRAM_SHA_256, "alice", "x").first())  # type: ignore[arg-type]
    with pytest.raises(UnauthenticatedError, match="nonce"):
        _wire_step(sock2, 2, mech, recorded_final)  # type: ignore[arg-type]
    # altered: one bit of the proof flipped
    sock3 = _raw_connection(sasl_broker)
    ex = ClientExchange(Mechanism.SCRAM_SHA_256, "alice", ALICE_PASSWORD)
    final = bytearray(ex.final(_wire_step(sock3, 1, mech, ex.first())))  # type: ignore[arg-type]
    final[-3] ^= 0x01
    with pytest.raises(UnauthenticatedError, match="authentication failed|base64"):
        _wire_step(sock3, 2, mech, bytes(final))  # type: ignore[arg-type]
    # before logging in: any other frame is UNAUTHENTICATED, and a big frame is refused from its header
    sock4 = _raw_connection(sasl_broker)
    from logbroker import wire
    body = pb.ProduceRequest().SerializeToString()
    sock4.sendall(wire.request_header(wire.API_PRODUCE, 7, len(body)) + body)  # type: ignore[attr-defined]
    status, message = _answer(sock4)
    assert status == grpc.StatusCode.UNAUTHENTICATED.value[0] and "requires authentication" in message
    sock5 = _raw_connection(sasl_broker)
    sock5.sendall(wire.request_header(wire.API_SASL_AUTHENTICATE, 9, 1 << 20))  # type: ignore[attr-defined]
    status, message = _answer(sock5)
    assert status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "before authentication" in message
    for s in (sock, sock2, sock3, sock4, sock5):
        s.close()  # type: ignore[attr-defined]


def _answer(sock: object) -> tuple[int, str]:
    import struct

    from logbroker.client.sasl import _recv_exact
    size, _corr, status = struct.unpack(">IIB", _recv_exact(sock, 9))  # type: ignore[arg-type]
    return status, _recv_exact(sock, size - 5).decode()  # type: ignore[arg-type]


def test_a_session_token_is_useless_on_another_connection(sasl_broker: SaslBroker) -> None:
    b, tls = sasl_broker.broker, sasl_broker.ca_only
    options = [("grpc.use_local_subchannel_pool", 1)]  # each channel its own TCP connection
    with grpc.secure_channel(b.address, tls.channel_credentials(), options=options) as ch1, \
            grpc.secure_channel(b.address, tls.channel_credentials(), options=options) as ch2:
        token, lifetime_s = grpc_authenticate(ch1, SaslConfig("alice", ALICE_PASSWORD), 10)
        assert lifetime_s > 0
        metadata_call = "/logbroker.v1.Broker/Metadata"
        call1 = ch1.unary_unary(metadata_call, request_serializer=pb.MetadataRequest.SerializeToString,
                                response_deserializer=pb.MetadataResponse.FromString)
        call2 = ch2.unary_unary(metadata_call, request_serializer=pb.MetadataRequest.SerializeToString,
                                response_deserializer=pb.MetadataResponse.FromString)
        call1(pb.MetadataRequest(), metadata=[(SESSION_METADATA, token)], timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            call2(pb.MetadataRequest(), metadata=[(SESSION_METADATA, token)], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert token not in str(err.value.details())
        with pytest.raises(grpc.RpcError) as err:  # a made-up token, on the right connection
            call1(pb.MetadataRequest(), metadata=[(SESSION_METADATA, "x" * 43)], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_scram_over_plaintext_is_refused(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "logbroker", "serve", "--data-dir", str(tmp_path / "d"),
                          "--listen", f"127.0.0.1:{free_port()}", "--sasl-mechanisms", "SCRAM-SHA-256",
                          "--metrics-listen", "off"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "--sasl-mechanisms needs --tls-cert" in out.stderr + out.stdout
    with pytest.raises(ValueError, match="needs tls"):
        Admin(f"127.0.0.1:{free_port()}", sasl=SaslConfig("alice", ALICE_PASSWORD))
