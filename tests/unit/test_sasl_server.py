"""server/sasl.py without sockets: the gRPC exchange and its session token bound to the peer, the
bounds, the plaintext refusal, the failed-login counter; and --sasl-mechanisms' config checks."""

from __future__ import annotations

import asyncio

import pytest

from logbroker.config import ConfigError, _sasl_mechanisms
from logbroker.security.scram import ClientExchange, Mechanism, ScramCredential, make_credential
from logbroker.server import sasl as sasl_mod
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.server.sasl import SaslServer
from logbroker.tls import ServerTls
from logbroker.v1 import logbroker_pb2 as pb

PASSWORD = "pw-unit-1"


class _Store:
    def __init__(self) -> None:
        self.creds = {"alice": {Mechanism.SCRAM_SHA_256: make_credential(Mechanism.SCRAM_SHA_256, PASSWORD)}}

    def get_credentials(self, user: str) -> dict[Mechanism, ScramCredential]:
        return self.creds.get(user, {})


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _server(clock: _Clock | None = None) -> SaslServer:
    store = _Store()
    return SaslServer(("SCRAM-SHA-256",), lambda: store, clock or _Clock(), failure_delay_s=0.0)  # type: ignore[arg-type, return-value]


def _login(server: SaslServer, peer: str, password: str = PASSWORD, tls: bool = True) -> pb.SaslAuthenticateResponse:
    ctx = RequestContext(peer=peer)
    ex = ClientExchange(Mechanism.SCRAM_SHA_256, "alice", password)

    async def run() -> pb.SaslAuthenticateResponse:
        first = await server.grpc_first(pb.SaslAuthenticateRequest(mechanism="SCRAM-SHA-256", auth_bytes=ex.first()),
                                        ctx, tls)
        final = ex.final(first.auth_bytes)
        return await server.grpc_final(pb.SaslAuthenticateRequest(mechanism="SCRAM-SHA-256", auth_bytes=final), ctx, tls)

    resp = asyncio.run(run())
    ex.verify(resp.auth_bytes)
    return resp


def test_a_session_token_gives_its_principal_only_on_its_own_connection() -> None:
    clock = _Clock()
    server = _server(clock)
    token = _login(server, "ipv4:127.0.0.1:5000").session_token
    assert server.gate(RequestContext(peer="ipv4:127.0.0.1:5000"), token).principal == "User:alice"
    for peer, tok in (("ipv4:127.0.0.1:5001", token), ("ipv4:127.0.0.1:5000", "made-up"), ("ipv4:127.0.0.1:5000", None)):
        with pytest.raises(RequestRejected) as err:
            server.gate(RequestContext(peer=peer), tok)
        assert err.value.status == RequestStatus.UNAUTHENTICATED and token not in err.value.message
    # a certificate's principal needs no session
    assert server.gate(RequestContext(principal="User:admin", peer="x"), None).principal == "User:admin"
    # expired, then swept
    clock.now += sasl_mod.SESSION_LIFETIME_S + 1
    with pytest.raises(RequestRejected):
        server.gate(RequestContext(peer="ipv4:127.0.0.1:5000"), token)
    _login(server, "ipv4:127.0.0.1:5002")  # sweeps
    assert server.sessions == 1


def test_refusals_are_counted_and_scram_over_plaintext_is_refused() -> None:
    server = _server()
    with pytest.raises(RequestRejected, match="authentication failed"):
        _login(server, "p1", password="wrong")
    with pytest.raises(RequestRejected, match="only over TLS"):
        _login(server, "p2", tls=False)
    with pytest.raises(RequestRejected, match="no SASL exchange in progress"):  # a final without a first
        asyncio.run(server.grpc_final(pb.SaslAuthenticateRequest(mechanism="SCRAM-SHA-256"), RequestContext(peer="p3"),
                                      True))
    assert server.failed_logins == 3


def test_exchanges_in_progress_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sasl_mod, "EXCHANGES_MAX", 3)
    server = _server()
    ex = ClientExchange(Mechanism.SCRAM_SHA_256, "alice", PASSWORD)
    req = pb.SaslAuthenticateRequest(mechanism="SCRAM-SHA-256", auth_bytes=ex.first())
    for i in range(3):
        asyncio.run(server.grpc_first(req, RequestContext(peer=f"p{i}"), True))
    with pytest.raises(RequestRejected) as err:
        asyncio.run(server.grpc_first(req, RequestContext(peer="p9"), True))
    assert err.value.status == RequestStatus.RESOURCE_EXHAUSTED


def test_sasl_mechanisms_need_tls_and_known_names() -> None:
    tls = ServerTls.__new__(ServerTls)  # only its presence matters here
    assert _sasl_mechanisms("scram-sha-256, SCRAM-SHA-512", tls) == ("SCRAM-SHA-256", "SCRAM-SHA-512")
    assert _sasl_mechanisms("", None) == ()
    with pytest.raises(ConfigError, match="needs --tls-cert"):
        _sasl_mechanisms("SCRAM-SHA-256", None)
    with pytest.raises(ConfigError, match="unknown mechanism"):
        _sasl_mechanisms("PLAIN", tls)
