"""SASL (SCRAM-SHA-256/512) on the broker: who a connection is, proven with a password, over TLS only.

With `--sasl-mechanisms`, a connection without a verified client certificate (whose principal is
User:<CN>, logbroker/tls.py) must authenticate with SCRAM before any other call; until it has, every
other call is refused with UNAUTHENTICATED naming the mechanisms. The principal is then
"User:<name>" of the proven user, never a request field or header. The exchange itself is
security/scram.py's `ServerExchange` (nonce, channel-binding and constant-time proof checks; an
unknown user is indistinguishable from a wrong password); credentials come from
`Broker.security_store()` (cluster/security_store.py), read off the loop.

Record transport (logbroker/wire.py, server/wire_server.py): the connection state holds the
exchange. Two API_SASL_AUTHENTICATE frames (body SaslAuthenticateRequest): client-first ->
server-first, client-final -> server-final; on success the connection's RequestContext gets the
principal. Before that only SASL frames are accepted, each at most `SASL_FRAME_MAX_BYTES`, and the
connection's read buffer is `SASL_READ_BUFFER_BYTES` (it grows to the normal one on success): an
unauthenticated connection allocates little.

gRPC: a Python servicer sees no connection state, only `context.peer()` ("ipv4:1.2.3.4:5678": the
TCP connection, since a client port names one connection at a time). So:

- Broker.SaslAuthenticateFirst runs the client-first step; the exchange is kept under the caller's
  peer (at most `EXCHANGES_MAX` per broker, each dropped after `EXCHANGE_TIMEOUT_S`; a new first
  from the same peer replaces it).
- Broker.SaslAuthenticateFinal, from the same peer, runs the client-final step and on success
  answers a random session token (`secrets.token_urlsafe(32)`) bound to (that peer, the principal),
  valid `SESSION_LIFETIME_S`. At most `SESSIONS_MAX` sessions per broker; expired ones are swept.
- Later calls present the token as metadata `SESSION_METADATA`; a call gets the session's
  principal only when it comes from the session's peer. A token copied to another connection (or a
  reconnected channel) is UNAUTHENTICATED, and the client authenticates again.

A refused exchange (a wrong password, an unknown user, a malformed, replayed or altered message, a
mechanism not enabled, SCRAM on a plaintext connection) is answered UNAUTHENTICATED after
`FAILED_LOGIN_DELAY_S` (an asyncio sleep: the loop goes on), counted in `failed_logins`
(`logbroker_sasl_failed_logins_total`, server/metrics.py) and audited (server/audit.py) with the
user name and the peer; messages never carry a password, a proof or a token.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from logbroker.cluster.security_store import SecurityStore
from logbroker.security.scram import Mechanism, ScramCredential, ScramError, ServerExchange
from logbroker.server import audit
from logbroker.server.request_context import ANONYMOUS, RequestContext, RequestRejected, RequestStatus
from logbroker.v1 import logbroker_pb2 as pb

SESSION_METADATA = "logbroker-sasl-session"
FAILED_LOGIN_DELAY_S = 1.0
SASL_FRAME_MAX_BYTES = 4096
SASL_READ_BUFFER_BYTES = 8192
EXCHANGES_MAX = 256
EXCHANGE_TIMEOUT_S = 10.0
SESSIONS_MAX = 10_000
SESSION_LIFETIME_S = 3600.0
SWEEP_INTERVAL_S = 1.0


@dataclass(frozen=True)
class _Session:
    peer: str
    principal: str
    expires: float


class SaslServer:
    """The broker's SCRAM authenticator, for both listeners (one per broker, on its event loop)."""

    def __init__(self, mechanisms: tuple[str, ...], store: Callable[[], SecurityStore],
                 clock: Callable[[], float] = time.monotonic, failure_delay_s: float = FAILED_LOGIN_DELAY_S) -> None:
        self.mechanisms = tuple(Mechanism.parse(m) for m in mechanisms)
        self._store = store
        self._clock = clock
        self.failure_delay_s = failure_delay_s
        self._fake_key = secrets.token_bytes(32)  # unknown users' made-up credentials
        self.failed_logins = 0
        self._exchanges: dict[str, tuple[ServerExchange, float]] = {}  # gRPC peer -> exchange, deadline
        self._sessions: dict[str, _Session] = {}  # token -> session
        self._swept = 0.0

    @property
    def names(self) -> str:
        return ", ".join(m.value for m in self.mechanisms)

    def unauthenticated(self) -> RequestRejected:
        return RequestRejected(RequestStatus.UNAUTHENTICATED,
                               f"this broker requires authentication: a client certificate or SASL ({self.names}) "
                               "before any other call")

    # -- one exchange, either listener --------------------------------------------------------

    def new_exchange(self, mechanism: str) -> ServerExchange:
        try:
            mech = Mechanism.parse(mechanism)
        except ScramError:
            mech = None
        if mech is None or mech not in self.mechanisms:
            raise RequestRejected(RequestStatus.UNAUTHENTICATED,
                                  f"SASL mechanism {mechanism[:40]!r} not enabled: {self.names}")
        store = self._store

        def lookup(user: str) -> ScramCredential | None:
            return store().get_credentials(user).get(mech)

        return ServerExchange(mech, lookup, self._fake_key)

    async def step(self, exchange: ServerExchange, request: pb.SaslAuthenticateRequest, first: bool,
                   tls: bool, context: RequestContext) -> bytes:
        """Run one step (the store read off the loop); a refusal after the delay, counted and audited."""
        try:
            if not tls:
                raise ScramError("SCRAM is allowed only over TLS: this connection is plaintext")
            if request.mechanism.upper() != exchange.mech.value:
                raise ScramError(f"mechanism {request.mechanism[:40]!r} is not this exchange's {exchange.mech.value}")
            if first:
                return await asyncio.to_thread(exchange.first, request.auth_bytes)
            return exchange.final(request.auth_bytes)
        except ScramError as exc:
            await self.refuse(exchange.user, str(exc), context)
            raise AssertionError("unreachable") from None

    async def refuse(self, user: str | None, why: str, context: RequestContext) -> None:
        """Count, audit, wait, then raise UNAUTHENTICATED."""
        self.failed_logins += 1
        audit.emit({"audit": "denied", "api": "SaslAuthenticate", "principal": f"User:{user}" if user else ANONYMOUS,
                    "peer": context.peer, "operation": "Authenticate", "reason": why})
        await asyncio.sleep(self.failure_delay_s)
        raise RequestRejected(RequestStatus.UNAUTHENTICATED, f"SASL authentication failed: {why}")

    # -- gRPC: exchanges by peer, sessions by token --------------------------------------------

    def _sweep(self) -> None:
        now = self._clock()
        if now - self._swept < SWEEP_INTERVAL_S:
            return
        self._swept = now
        for peer in [p for p, (_, deadline) in self._exchanges.items() if deadline <= now]:
            del self._exchanges[peer]
        for token in [t for t, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[token]

    async def grpc_first(self, request: pb.SaslAuthenticateRequest, context: RequestContext,
                         tls: bool) -> pb.SaslAuthenticateResponse:
        self._sweep()
        self._exchanges.pop(context.peer, None)
        if len(self._exchanges) >= EXCHANGES_MAX:
            raise RequestRejected(RequestStatus.RESOURCE_EXHAUSTED,
                                  f"{EXCHANGES_MAX} SASL exchanges in progress on this broker: retry")
        exchange = self.new_exchange(request.mechanism)
        self._exchanges[context.peer] = (exchange, self._clock() + EXCHANGE_TIMEOUT_S)
        try:
            server_first = await self.step(exchange, request, True, tls, context)
        except RequestRejected:
            self._exchanges.pop(context.peer, None)
            raise
        return pb.SaslAuthenticateResponse(auth_bytes=server_first)

    async def grpc_final(self, request: pb.SaslAuthenticateRequest, context: RequestContext,
                         tls: bool) -> pb.SaslAuthenticateResponse:
        self._sweep()
        entry = self._exchanges.pop(context.peer, None)
        if entry is None or entry[1] <= self._clock():
            await self.refuse(None, "no SASL exchange in progress on this connection (SaslAuthenticateFirst first)",
                              context)
        assert entry is not None
        exchange = entry[0]
        server_final = await self.step(exchange, request, False, tls, context)
        if len(self._sessions) >= SESSIONS_MAX:
            raise RequestRejected(RequestStatus.RESOURCE_EXHAUSTED, f"{SESSIONS_MAX} SASL sessions on this broker")
        token = secrets.token_urlsafe(32)
        self._sessions[token] = _Session(context.peer, f"User:{exchange.user}", self._clock() + SESSION_LIFETIME_S)
        return pb.SaslAuthenticateResponse(auth_bytes=server_final, session_token=token,
                                           session_lifetime_ms=int(SESSION_LIFETIME_S * 1000))

    def gate(self, ctx: RequestContext, token: str | None) -> RequestContext:
        """The call's context with its principal: the certificate's, else the session's of `token` when
        the call comes from the session's own connection; else UNAUTHENTICATED."""
        if ctx.principal != ANONYMOUS:
            return ctx
        session = self._sessions.get(token) if token else None
        if session is None or session.peer != ctx.peer or session.expires <= self._clock():
            raise self.unauthenticated()
        return replace(ctx, principal=session.principal)

    @property
    def sessions(self) -> int:
        return len(self._sessions)
