"""The clients' side of SASL (SCRAM-SHA-256/512; the broker's side and the design: server/sasl.py).

`SaslConfig(username, password, mechanism)` is what Producer, Consumer, Admin, QueueConsumer and
Requester take as `sasl=`; it needs TLS (`tls=`): the password never goes to a plaintext broker.

- Record transport: `wire_handshake(sock, sasl)` right after each connect (and its TLS handshake):
  two API_SASL_AUTHENTICATE frames, the server's signature checked (a broker that does not hold the
  credential is not believed).
- gRPC: `SaslInterceptor` on each channel authenticates (Broker.SaslAuthenticateFirst/Final on the
  channel's own connection) before the channel's first call and again once the token nears its end or
  the channel reconnected (the token is bound to the TCP connection), and sends the session token as
  metadata `logbroker-sasl-session` with every call. An UNAUTHENTICATED answer drops the token, so
  the next call authenticates again.

The password is kept only in the SaslConfig (not in its repr) and never appears in an error.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc

from logbroker import wire
from logbroker.errors import UnauthenticatedError
from logbroker.security.scram import ClientExchange, Mechanism, ScramError
from logbroker.v1 import logbroker_pb2 as pb

SESSION_METADATA = "logbroker-sasl-session"  # as server/sasl.py
RENEW_MARGIN_S = 60.0  # authenticate again this long before the session ends
RESPONSE_MAX_BYTES = 4096


@dataclass(frozen=True)
class SaslConfig:
    username: str
    password: str = field(repr=False)
    mechanism: str = "SCRAM-SHA-256"

    def __post_init__(self) -> None:
        Mechanism.parse(self.mechanism)  # ScramError (a ValueError-like message) for an unknown one
        if not self.username or not self.password:
            raise ValueError("SASL needs a user name and a password")

    def exchange(self) -> ClientExchange:
        return ClientExchange(Mechanism.parse(self.mechanism), self.username, self.password)


class FrameSocket(Protocol):
    def sendall(self, data: bytes) -> None: ...

    def recv_into(self, view: memoryview) -> int: ...


def recv_exact(sock: FrameSocket, n: int, closed: Callable[[], Exception]) -> bytes:
    """`n` bytes from `sock` (blocking); `closed()` is raised when the broker closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise closed()
        got += k
    return bytes(buf)


def _recv_exact(sock: FrameSocket, n: int) -> bytes:
    return recv_exact(sock, n, lambda: UnauthenticatedError(
        "the broker closed the connection during SASL authentication"))


def _wire_step(sock: FrameSocket, corr: int, mechanism: str, auth: bytes) -> bytes:
    body = pb.SaslAuthenticateRequest(mechanism=mechanism, auth_bytes=auth).SerializeToString()
    sock.sendall(wire.request_header(wire.API_SASL_AUTHENTICATE, corr, len(body)) + body)
    size, _corr, status = struct.unpack(">IIB", _recv_exact(sock, wire.HEADER_BYTES))
    if size < wire.SIZE_MIN or size - wire.SIZE_MIN > RESPONSE_MAX_BYTES:
        raise UnauthenticatedError(f"malformed SASL answer from the broker (frame size {size})")
    payload = _recv_exact(sock, size - wire.SIZE_MIN)
    if status != wire.STATUS_OK:
        raise UnauthenticatedError(payload.decode("utf-8", "replace"))
    return pb.SaslAuthenticateResponse.FromString(payload).auth_bytes


def wire_handshake(sock: FrameSocket, sasl: SaslConfig) -> None:
    """Authenticate a fresh record-transport connection (blocking); UnauthenticatedError if refused."""
    exchange = sasl.exchange()
    try:
        server_first = _wire_step(sock, 1, sasl.mechanism, exchange.first())
        server_final = _wire_step(sock, 2, sasl.mechanism, exchange.final(server_first))
        exchange.verify(server_final)
    except ScramError as exc:
        raise UnauthenticatedError(f"SASL authentication: {exc}") from None


def grpc_authenticate(channel: grpc.Channel, sasl: SaslConfig, timeout_s: float) -> tuple[str, float]:
    """(session token, its lifetime in seconds) from the broker behind `channel`; raises
    UnauthenticatedError when refused, grpc.RpcError when unreachable."""
    exchange = sasl.exchange()
    first = channel.unary_unary("/logbroker.v1.Broker/SaslAuthenticateFirst",
                                request_serializer=pb.SaslAuthenticateRequest.SerializeToString,
                                response_deserializer=pb.SaslAuthenticateResponse.FromString)
    final = channel.unary_unary("/logbroker.v1.Broker/SaslAuthenticateFinal",
                                request_serializer=pb.SaslAuthenticateRequest.SerializeToString,
                                response_deserializer=pb.SaslAuthenticateResponse.FromString)
    try:
        r1 = first(pb.SaslAuthenticateRequest(mechanism=sasl.mechanism, auth_bytes=exchange.first()), timeout=timeout_s)
        r2 = final(pb.SaslAuthenticateRequest(mechanism=sasl.mechanism, auth_bytes=exchange.final(r1.auth_bytes)),
                   timeout=timeout_s)
        exchange.verify(r2.auth_bytes)
    except ScramError as exc:
        raise UnauthenticatedError(f"SASL authentication: {exc}") from None
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise UnauthenticatedError(str(exc.details())) from None
        raise
    return r2.session_token, r2.session_lifetime_ms / 1000


class CallDetails(grpc.ClientCallDetails):
    """A call's details with other metadata (grpc's interceptors need a ClientCallDetails)."""

    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class SaslInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                      grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the channel's session token to every call, authenticating first when it has none."""

    def __init__(self, channel: grpc.Channel, sasl: SaslConfig, timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._channel = channel
        self._sasl = sasl
        self._timeout_s = timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._renew_at = 0.0
        self._seen_ready = False
        channel.subscribe(self._on_state)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        if state == grpc.ChannelConnectivity.READY:
            self._seen_ready = True
        elif self._seen_ready:  # the connection the token is bound to is gone
            self._token = ""

    def close(self) -> None:
        self._channel.unsubscribe(self._on_state)

    def _token_now(self) -> str:
        with self._lock:
            if not self._token or self._clock() >= self._renew_at:
                token, lifetime_s = grpc_authenticate(self._channel, self._sasl, self._timeout_s)
                self._token = token
                self._renew_at = self._clock() + max(lifetime_s - RENEW_MARGIN_S, lifetime_s / 2)
            return self._token

    def _details(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != SESSION_METADATA]
        return CallDetails(details, [*metadata, (SESSION_METADATA, self._token_now())])

    def _watch(self, call: Any) -> Any:
        def done(c: Any) -> None:
            try:
                if c.code() == grpc.StatusCode.UNAUTHENTICATED:
                    self._token = ""
            except Exception:  # not a finished call
                pass
        if hasattr(call, "add_done_callback"):
            call.add_done_callback(done)
        return call

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._watch(continuation(self._details(client_call_details), request))

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return self._watch(continuation(self._details(client_call_details), request))

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return self._watch(continuation(self._details(client_call_details), request_iterator))

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return self._watch(continuation(self._details(client_call_details), request_iterator))
