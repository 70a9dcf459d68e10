"""The broker's record-transport listener (frame layout in logbroker/wire.py), on its event loop.

One `asyncio.BufferedProtocol` per connection, no stream reader or writer task: the kernel's bytes
land in the connection's buffer, `buffer_updated` cuts them into frames and starts each request's
handler as a task at once (asyncio runs tasks in creation order, so the synchronous part of a
produce, its appends, runs in request order), and each task's done-callback writes every answer
that is ready, in request order. A produce costs three loop iterations from its bytes arriving to
its response leaving (stream reader, reader task, writer task and a queue cost two more each way);
the broker's event loop is on every record's path, so iterations are latency.

TLS (`start(ssl_context=...)`): the socket is accepted plaintext, admitted (below), and only then
upgraded with `loop.start_tls` (`_TlsGate`, `WireServer._handshake`), so a TLS handshake in
progress counts against every admission limit; a refused handshake (no, untrusted or expired client
certificate with client auth required) or one not done within TLS_HANDSHAKE_TIMEOUT_S closes the
connection and gives its place back, and never reaches a handler.

Admission, before a byte of a connection is read or a TLS handshake started (server/connection_gate.py):
at most `connections_max` connections (1024) admitted at once, `connections_per_ip_max` (100,
`--max-connections-per-ip`) from one client address, and `connection_creation_rate_per_sec` (200,
`--max-connection-creation-rate-per-sec`, token bucket, 0: off) new ones per second. A refused one
is closed at once (abort: a reset), counted in `refused_total` by reason, and logged with at most
one WARNING per `REFUSED_WARNING_INTERVAL_S` (10 s) per reason, saying how many it stands for.

What an unauthenticated connection can make the broker allocate (before its TLS handshake is done,
or on a plaintext listener before its first frame): nothing before admission beyond the kernel's
socket; once admitted and handshaking, asyncio's TLS protocol (a 256 KiB read buffer of its own,
OpenSSL's state) and the `_Connection` object without its read buffer; the 256 KiB read buffer is
allocated when the first application bytes arrive. A first frame is then bounded as every frame
(below: its size checked from its header alone, a big one's buffer growing only with the bytes that
arrive). So `connections_max` x (about 0.5 MiB + a frame in progress) in all, and per address
`connections_per_ip_max` x that.

Each connection is one caller: its handlers get the connection's `RequestContext` (listener
"record", the peer address, no cluster secret: the record transport carries none; the principal
`User:<CN>` of a verified client certificate, else ANONYMOUS; with SASL on (`sasl=`), a connection
without a certificate must first authenticate with API_SASL_AUTHENTICATE frames, then its principal is
`User:<name>`: server/sasl.py, which also says what an unauthenticated connection may allocate). A handler's
`RequestRejected` becomes that request's status frame (its status number is the frame's status
byte); an unexpected exception an INTERNAL one (logged).

Bounds, each on one connection unless said otherwise:

- Connections admitted at once, per address and per second: see Admission above.
- Idle connections: one with nothing pending and no byte read for `idle_s` (`CONNECTIONS_MAX_IDLE_S`,
  600 s, Kafka's connections.max.idle.ms) is closed by a sweep every min(60, idle_s / 10) s.
- `pipeline_max` (8) requests in progress or answered-but-unwritten; further whole frames wait in the
  read buffer, not started.
- Broker-wide, across connections and gRPC: `admission` (server/admission.py) counts each request from
  its start to its handler's end; a frame that would pass its bounds is answered RESOURCE_EXHAUSTED
  with a retry-after hint (logbroker/wire.py) and the connection goes on. A frame too big for the
  read buffer is counted from its header, before its own buffer exists; refused there, its bytes are
  read through a SKIP_BUFFER_BYTES scratch buffer and dropped, so many clients sending big frames at
  once cost the broker the bound, not the sum of their frames.
- Read buffer: `READ_BUFFER_BYTES` (256 KiB), allocated with the first bytes read. It is read into while it
  has room (so an EOF or a reset is noticed even with the pipeline full); when full, the connection
  is not read and TCP flow control holds the client back.
- Frames: at most `max_request_bytes` of body; a bigger size is refused from its header alone. A frame
  too large for the read buffer gets its own buffer, which grows with the bytes that actually arrive
  (starting at min(size, `BIG_FRAME_START_BYTES` = 1 MiB), doubling up to size, the bytes so far
  copied over): a header announcing 32 MiB costs 1 MiB until the bytes come; a frame's buffer is
  at most max(1 MiB, twice the bytes received) (a 32 MiB produce is copied about twice on the way in).
- Answers: while the transport's write buffer is over its high-water mark (the client does not read),
  no frame is started and the connection is not read; answers of requests already started still go to
  the write buffer, so it holds at most the high-water mark plus `pipeline_max` answers.
  `resume_writing` starts frames again.

End of input: on EOF (the client half-closes only once it has given up on its requests, and may send
them elsewhere) or on a lost connection, no further frame is started. Requests already started run to
their end and are answered if the socket is still writable (on a lost connection they are cancelled,
their effects so far standing, as on a broken gRPC call); whole frames not started are dropped, and
when bytes were left over, an INVALID_ARGUMENT frame with correlation id 0 says none of them ran;
then the connection closes. TCP keepalive notices a client that vanished without a reset.

Reply streams (request-reply; layout in logbroker/wire.py, routing in server/reply_registry.py): an
API_REPLY_STREAM frame registers the connection with the `ReplyRegistry` as a push sink; from then on
no further frame of it is started, it is never idle-closed, and each reply for its token is queued
for it, unless its write buffer and queue hold more than `PUSH_BUFFER_BYTES_MAX` (the client does not
read: the reply is dropped and counted); the replies queued in one loop iteration are written at the
start of the next in one write (one send() and one wake-up of the requester for a burst of replies,
not one per reply: measured ~25 % more request-reply throughput). Its token is unregistered when
the connection ends.

`close()` stops reading every connection: each answers the requests it has started, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.message import Message

from logbroker import wire
from logbroker.client_id import client_id_problem
from logbroker.log_throttle import LogThrottle
from logbroker.security.scram import ServerExchange
from logbroker.server import rpc
from logbroker.server.admission import Admission
from logbroker.server.connection_gate import ConnectionGate
from logbroker.server.reply_registry import ReplyRegistry
from logbroker.server.request_context import (
    ANONYMOUS,
    LISTENER_RECORD,
    RequestContext,
    RequestRejected,
    RequestStatus,
)
from logbroker.server.sasl import SASL_FRAME_MAX_BYTES, SASL_READ_BUFFER_BYTES, SaslServer
from logbroker.tls import peercert_common_name, principal_from_common_name
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

Handler = Callable[[Any, RequestContext], Awaitable[Message | bytes]]
CONNECTIONS_MAX = 1024
CONNECTIONS_MAX_IDLE_S = 600.0  # Kafka's connections.max.idle.ms
IDLE_SWEEP_MAX_S = 60.0
REFUSED_WARNING_INTERVAL_S = 10.0
CONNECTIONS_PER_IP_MAX = 100
CONNECTION_CREATION_RATE_PER_SEC = 200
PIPELINE_MAX = 8
READ_BUFFER_BYTES = 256 << 10  # frames up to this are cut from the read buffer; bigger get their own
BIG_FRAME_START_BYTES = 1 << 20  # a big frame's own buffer starts at this and doubles as bytes come
SKIP_BUFFER_BYTES = 64 << 10  # the bytes of a frame refused from its header are read into this and dropped
COALESCE_BYTES_MAX = 256 << 10  # a response body below this is copied behind its header, sent at once
# TLS: a big body is handed to the TLS transport in pieces of this size, each encrypted and sent before
# the next is encrypted, so the client receives and decrypts the first while the broker encrypts the
# rest (whole, a 4 MiB fetch waited ~5 ms for its last byte's encryption before its first left)
TLS_WRITE_PIECE_BYTES = 256 << 10
PUSH_BUFFER_BYTES_MAX = 4 << 20  # a reply stream's unsent bytes; replies beyond are dropped (counted)
TLS_HANDSHAKE_TIMEOUT_S = 10.0  # a client that does not finish its TLS handshake is dropped after this


class WireServer:
    def __init__(self, handlers: dict[int, tuple[type[Message], Handler]], max_request_bytes: int,
                 connections_max: int = CONNECTIONS_MAX, pipeline_max: int = PIPELINE_MAX,
                 idle_s: float = CONNECTIONS_MAX_IDLE_S, reply_registry: ReplyRegistry | None = None,
                 sasl: SaslServer | None = None,
                 connections_per_ip_max: int = CONNECTIONS_PER_IP_MAX,
                 connection_creation_rate_per_sec: int = CONNECTION_CREATION_RATE_PER_SEC,
                 monotonic: Callable[[], float] = time.monotonic, admission: Admission | None = None) -> None:
        self.handlers = handlers
        self.admission = admission  # bounds on requests in flight, shared with gRPC (server/admission.py)
        self.sasl = sasl
        self.reply_registry = reply_registry
        self.size_max = wire.SIZE_MIN + max_request_bytes
        self.connections_max = connections_max
        self.pipeline_max = pipeline_max
        self.idle_s = idle_s
        self.connections: set[_Connection] = set()
        self.closed = False
        self.port = 0
        self.gate = ConnectionGate(connections_max, connections_per_ip_max, connection_creation_rate_per_sec,
                                   monotonic)
        self.refusals = LogThrottle(REFUSED_WARNING_INTERVAL_S, monotonic=monotonic)  # per refusal reason
        self._handshakes: set[asyncio.Task[None]] = set()  # TLS handshakes in progress (admitted)
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        """Listen; with `ssl_context` every connection speaks TLS (admitted first, then its handshake
        within TLS_HANDSHAKE_TIMEOUT_S); the context may be reloaded in place."""
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.BaseProtocol] = (
            (lambda: _Connection(self)) if ssl_context is None else (lambda: _TlsGate(self, ssl_context)))
        self._server = await loop.create_server(factory, host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = loop.create_task(self._sweep_idle())
        return self.port

    def close(self) -> None:
        """Stop accepting and reading; connections answer what they have started, then close."""
        self.closed = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._handshakes):
            task.cancel()
        for conn in list(self.connections):
            conn.finish()

    async def stop(self, grace_s: float) -> None:
        """close(), then wait up to `grace_s` for the connections to finish; abort the rest."""
        self.close()
        if self._sweeper is not None:
            await asyncio.wait([self._sweeper])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.connections and loop.time() < deadline:
            await asyncio.wait([c.ended for c in self.connections], timeout=deadline - loop.time())
        for conn in list(self.connections):
            conn.abort()

    def __len__(self) -> int:
        return len(self.connections)

    @property
    def refused_total(self) -> dict[str, int]:
        """Connections refused at admission, by reason (connection_gate.REFUSED_*)."""
        return self.gate.refused

    def admit(self, peername: object) -> str | None:
        """The peer's host if a new connection is admitted (then `gate.release(host)` once when it
        ends), else None: the caller closes it at once (refusals counted and WARNed, rate-limited)."""
        if self.closed:
            return None
        host = str(peername[0]) if isinstance(peername, tuple) and peername else str(peername)
        reason = self.gate.admit(host)
        if reason is None:
            return host
        count = self.refusals.event(reason)
        if count:
            log.warning("record transport: %s reached (%d connections admitted, %d from %s), refused %d since the "
                        "last warning, the latest from %s", reason, self.gate.admitted, self.gate.open_from(host),
                        host, count, _peer(peername))
        return None

    def start_handshake(self, transport: asyncio.Transport, host: str, ssl_context: ssl.SSLContext) -> None:
        task = asyncio.get_running_loop().create_task(self._handshake(transport, host, ssl_context))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport, host: str, ssl_context: ssl.SSLContext) -> None:
        """The TLS handshake of an admitted connection; its place is given back if it fails."""
        conn = _Connection(self, host)
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport, conn, ssl_context, server_side=True, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S)
        except BaseException as exc:
            conn.release()
            transport.abort()
            if not isinstance(exc, Exception):
                raise
            log.debug("record transport: TLS handshake with %s failed: %s", host, exc)
            return
        if tls is None:  # (typed Optional; start_tls returns the transport or raises)
            conn.release()
            transport.abort()
            return
        conn.connection_made(tls)

    async def _sweep_idle(self) -> None:
        """Close connections with nothing pending that read no byte for idle_s."""
        loop = asyncio.get_running_loop()
        interval_s = min(IDLE_SWEEP_MAX_S, self.idle_s / 10)
        while True:
            await asyncio.sleep(interval_s)
            cutoff = loop.time() - self.idle_s
            for conn in list(self.connections):
                if conn.idle_since(cutoff):
                    conn.finish()


class _TlsGate(asyncio.Protocol):
    """A TLS listener's first protocol: admits the accepted socket, then hands it to its handshake."""

    def __init__(self, server: WireServer, ssl_context: ssl.SSLContext) -> None:
        self._server = server
        self._ssl_context = ssl_context

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        host = self._server.admit(transport.get_extra_info("peername"))
        if host is None:
            transport.abort()
            return
        transport.pause_reading()  # the ClientHello waits in the kernel for start_tls
        self._server.start_handshake(transport, host, self._ssl_context)


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: WireServer, host: str | None = None) -> None:
        """`host`: already admitted (a TLS connection, admitted before its handshake)."""
        self._server = server
        self._host = host  # admitted from this host; None: not (yet) admitted, or released
        self._early_overflow = False  # bytes came before connection_made and did not fit: aborted then
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._tls = False  # the transport is asyncio's TLS transport (set in connection_made)
        # SASL (server/sasl.py): until authenticated, only SASL frames and a small read buffer
        self._authenticated = server.sasl is None
        self._sasl_exchange: ServerExchange | None = None
        self._sasl_busy = False
        # allocated with the first bytes: READ_BUFFER_BYTES, or SASL_READ_BUFFER_BYTES before a login
        self._buf = bytearray()
        self._view = memoryview(self._buf)
        self._len = 0  # bytes of _buf holding data not yet cut into frames
        self._big: bytearray | None = None  # a frame bigger than _buf, filled in place, grown as it comes
        self._big_have = 0
        self._big_size = 0  # the frame's size; len(_big) grows up to it
        self._big_admitted = 0  # bytes of the big frame counted by the admission from its header
        # a big frame the admission refused from its header: its bytes are read and dropped, then answered
        self._skip_left = 0
        self._skip_refusal: tuple[int, RequestRejected] | None = None
        # Requests in order: (corr, running task) or (corr, finished response frame).
        self._pending: deque[tuple[int, asyncio.Task[Message | bytes] | bytes]] = deque()
        self._finishing = False  # start no more frames, read no more; close once every started one is answered
        self._read_paused = False
        self._write_paused = False
        self._last_read = self._loop.time()
        self._context = RequestContext(listener=LISTENER_RECORD)
        self._push_token: str | None = None  # a reply stream's token (then no frame is started)
        self._push_corr = 0
        self._pushed: list[bytes] = []  # reply frames pushed in this loop iteration, written by _flush_pushed
        self._pushed_bytes = 0
        self.ended: asyncio.Future[None] = self._loop.create_future()

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._tls = transport.get_extra_info("sslcontext") is not None
        server = self._server
        if self._host is None:
            self._host = server.admit(transport.get_extra_info("peername"))
        if self._host is None or server.closed or self._early_overflow:
            transport.abort()  # (connection_lost releases an admitted one)
            return
        server.connections.add(self)
        self._identify(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if self._len:  # (TLS: application bytes may come with the handshake's end, before this call)
            self._pump()

    def release(self) -> None:
        """Give the connection's admission back (once)."""
        if self._host is not None:
            self._server.gate.release(self._host)
            self._host = None

    def _identify(self, transport: asyncio.Transport) -> None:
        """The connection's context: User:<CN> of a verified client certificate (then no SASL needed)."""
        principal = principal_from_common_name(peercert_common_name(transport.get_extra_info("peercert")))
        self._context = RequestContext(principal=principal or ANONYMOUS, peer=_peer(transport.get_extra_info("peername")),
                                       listener=LISTENER_RECORD)
        if principal:
            self._authenticate(principal)

    def _authenticate(self, principal: str) -> None:
        """The connection is `principal` from now on: every api, the normal read buffer."""
        self._authenticated = True
        self._context = replace(self._context, principal=principal)
        if self._buf and len(self._buf) < READ_BUFFER_BYTES:  # (not allocated yet: get_buffer sizes it)
            grown = bytearray(READ_BUFFER_BYTES)
            grown[: self._len] = self._buf[: self._len]
            self._buf, self._view = grown, memoryview(grown)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finishing = True  # before the cancels below: their callbacks must start nothing
        self._drop_input()
        self.release()
        self._server.connections.discard(self)
        if self._push_token is not None and self._server.reply_registry is not None:
            self._server.reply_registry.close(self._push_token)
        for _, item in self._pending:
            if isinstance(item, asyncio.Task):
                item.cancel()  # its effects so far stand, as on a broken gRPC call
        self._pending.clear()
        if not self.ended.done():
            self.ended.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._skip_left:  # never past the refused frame's end: what follows is the next frame
            return memoryview(bytearray(min(self._skip_left, SKIP_BUFFER_BYTES)))
        big = self._big
        if big is not None:
            if self._big_have == len(big):  # full so far: grow toward the frame's size
                grown = bytearray(min(self._big_size, 2 * len(big)))
                grown[: self._big_have] = big
                self._big = big = grown
            return memoryview(big)[self._big_have :]
        if not self._buf:
            self._buf = bytearray(READ_BUFFER_BYTES if self._authenticated else SASL_READ_BUFFER_BYTES)
            self._view = memoryview(self._buf)
        if self._finishing or self._len >= len(self._buf):  # not read then (paused): discard, defensively
            self._early_overflow = self._transport is None
            return memoryview(bytearray(4096))
        return self._view[self._len :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._finishing:
            return
        self._last_read = self._loop.time()
        if self._skip_left:
            self._skip_left -= nbytes
            if self._skip_left or self._skip_refusal is None:
                return
            (corr, exc), self._skip_refusal = self._skip_refusal, None
            self._pending.append((corr, _rejected_frame(corr, exc)))
        elif self._big is not None:
            self._big_have += nbytes
            if self._big_have == self._big_size:
                frame, self._big = self._big, None
                admitted, self._big_admitted = self._big_admitted, 0
                self._dispatch(frame, admitted)
            else:
                return
        else:
            self._len += nbytes
        self._pump()

    def eof_received(self) -> bool:
        """The client gave up on its requests: start no further frame (those already started are
        answered), say so if bytes were left over, then close. Over TLS the transport closes itself
        (a TLS stream has no half-close; asyncio warns when asked to keep it open)."""
        self._end_of_input()
        return not self._tls  # plaintext: keep our side open until finish() closes it

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    # -- frames in -----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Cut frames while the pipeline has room and write the answers that are ready, again while
        answering made room for frames already read; then pause or resume reading to match."""
        while True:
            cut = self._cut_frames()
            self._write_ready()
            if not cut or not self._may_start():
                break
        self._update_reading()

    def _may_start(self) -> bool:
        """Whether a frame may be started now: not finishing (nor after EOF or loss), the transport
        open and draining, the pipeline with room."""
        transport = self._transport
        return (not self._finishing and not self._write_paused and self._push_token is None and not self._sasl_busy
                and transport is not None
                and not transport.is_closing() and len(self._pending) < self._server.pipeline_max)

    def _end_of_input(self) -> None:
        if self._finishing:
            return
        if self._len or self._big is not None:
            if self._big is not None or not self._whole_frame_buffered():
                message = "connection closed inside a frame; it was not run"
            else:
                message = "connection closed with requests not started; none of them was run"
            self._pending.append((0, wire.error_frame(0, grpc.StatusCode.INVALID_ARGUMENT, message)))
        self._drop_input()
        self.finish()

    def _drop_input(self) -> None:
        self._len = 0
        self._big = None
        self._big_have = self._big_size = 0
        self._release_big()
        self._skip_left, self._skip_refusal = 0, None

    def _release_big(self) -> None:
        if self._big_admitted and self._server.admission is not None:
            self._server.admission.release(self._big_admitted)
        self._big_admitted = 0

    def _whole_frame_buffered(self) -> bool:
        """Whether the buffer starts with a whole frame."""
        if self._len < 4:
            return False
        size = int.from_bytes(self._buf[:4], "big")
        return self._len >= 4 + size

    def _cut_frames(self) -> int:
        """Start the requests of the whole frames in the buffer, while a frame may start; how many."""
        buf, pos, end = self._buf, 0, self._len
        cut = 0
        size_max = self._server.size_max if self._authenticated else wire.SIZE_MIN + SASL_FRAME_MAX_BYTES
        while end - pos >= 4 and self._may_start():
            size = int.from_bytes(buf[pos : pos + 4], "big")
            if size < wire.SIZE_MIN or size > size_max:
                corr = int.from_bytes(buf[pos + 5 : pos + 9], "big") if end - pos >= 9 else 0
                if size < wire.SIZE_MIN:
                    message = f"frame size {size} is below the {wire.SIZE_MIN}-byte header"
                    code = grpc.StatusCode.INVALID_ARGUMENT
                else:
                    message = (f"request of {size - wire.SIZE_MIN} bytes is over the broker's limit of "
                               f"{size_max - wire.SIZE_MIN} " + ("(max_request_bytes)" if self._authenticated
                                                                 else "before authentication"))
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                self._pending.append((corr, wire.error_frame(corr, code, message)))
                self._drop_input()
                self.finish()
                return cut
            if end - pos < 4 + size:
                if 4 + size > len(buf) and end - pos >= wire.HEADER_BYTES:  # too big for the buffer
                    self._start_big(buf, pos, end, size)
                    pos = end
                break
            frame = bytes(buf[pos + 4 : pos + 4 + size])
            pos += 4 + size
            self._dispatch(frame)
            cut += 1
        if pos:
            kept = end - pos
            if kept:
                buf[:kept] = buf[pos:end]
            self._len = kept
        return cut

    def _start_big(self, buf: bytearray, pos: int, end: int, size: int) -> None:
        """A frame too big for the read buffer, its header at `pos`: admitted from its header (then its
        own buffer, growing as bytes come) or refused (then its bytes are read and dropped)."""
        have = end - pos - 4
        admission = self._server.admission
        if admission is not None and self._authenticated and buf[pos + 4] in self._server.handlers:
            try:
                admission.admit(size)
            except RequestRejected as exc:
                self._skip_left = size - have
                self._skip_refusal = (int.from_bytes(buf[pos + 5 : pos + 9], "big"), exc)
                return
            self._big_admitted = size
        big = bytearray(max(have, min(size, BIG_FRAME_START_BYTES)))
        big[:have] = buf[pos + 4 : end]
        self._big, self._big_have, self._big_size = big, have, size

    def _dispatch(self, frame: bytes | bytearray, admitted: int = 0) -> None:
        """Start one whole frame; `admitted`: its bytes, counted by the admission from its header."""
        api = frame[0]
        corr = int.from_bytes(frame[1:5], "big")
        if admitted and (api not in self._server.handlers or not self._authenticated):
            self._server.admission.release(admitted)  # type: ignore[union-attr]
            admitted = 0
        if api == wire.API_SASL_AUTHENTICATE:
            self._sasl_frame(corr, frame)
            return
        if not self._authenticated:
            assert self._server.sasl is not None
            exc = self._server.sasl.unauthenticated()
            self._pending.append((corr, _rejected_frame(corr, exc)))
            return
        if api == wire.API_REPLY_STREAM:
            self._open_reply_stream(corr)
            return
        if api == wire.API_CLIENT_ID:
            self._pending.append((corr, self._client_id_frame(corr, frame)))
            return
        entry = self._server.handlers.get(api)
        if entry is None:
            self._pending.append((corr, wire.error_frame(corr, grpc.StatusCode.UNIMPLEMENTED, f"unknown api {api}")))
            return
        request_cls, fn = entry
        admission = self._server.admission
        try:
            if admission is not None and not admitted:
                admission.admit(len(frame))
            try:
                request = rpc.parse(request_cls, memoryview(frame)[wire.SIZE_MIN :])
            except RequestRejected:
                if admission is not None:
                    admission.release(len(frame))
                raise
        except RequestRejected as exc:
            self._pending.append((corr, _rejected_frame(corr, exc)))
            return
        task = self._loop.create_task(_run(fn, request, self._context))
        self._pending.append((corr, task))
        if admission is not None:
            task.add_done_callback(admission.releaser(len(frame)))
        task.add_done_callback(self._on_done)

    def _client_id_frame(self, corr: int, frame: bytes | bytearray) -> bytes:
        """Take the connection's client id (logbroker/client_id.py); the answer frame (empty, or
        INVALID_ARGUMENT: the connection goes on with the id it had)."""
        raw = bytes(frame[wire.SIZE_MIN :])
        client_id = raw.decode("ascii", "replace")
        problem = client_id_problem(client_id)
        if problem is not None:
            return wire.error_frame(corr, grpc.StatusCode.INVALID_ARGUMENT, problem)
        self._context = replace(self._context, client_id=client_id)
        return wire.response_header(corr, wire.STATUS_OK, 0)

    def _sasl_frame(self, corr: int, frame: bytes | bytearray) -> None:
        """Start one SASL step (no other frame starts until it is answered)."""
        try:
            if self._server.sasl is None:
                raise RequestRejected(RequestStatus.UNIMPLEMENTED, "SASL is not enabled on this broker")
            if self._authenticated:
                raise RequestRejected(RequestStatus.INVALID_ARGUMENT, "this connection is already authenticated")
            request = rpc.parse(pb.SaslAuthenticateRequest, memoryview(frame)[wire.SIZE_MIN :])
        except RequestRejected as exc:
            self._pending.append((corr, _rejected_frame(corr, exc)))
            return
        sasl = self._server.sasl
        assert sasl is not None
        self._sasl_busy = True
        task = self._loop.create_task(self._sasl_step(sasl, request))
        self._pending.append((corr, task))
        task.add_done_callback(self._on_done)

    async def _sasl_step(self, sasl: SaslServer, request: pb.SaslAuthenticateRequest) -> Message:
        """client-first -> server-first, client-final -> server-final; a refusal closes the connection."""
        first = self._sasl_exchange is None
        try:
            if self._sasl_exchange is None:
                try:
                    self._sasl_exchange = sasl.new_exchange(request.mechanism)
                except RequestRejected as exc:
                    await sasl.refuse(None, exc.message, self._context)
            exchange = self._sasl_exchange
            assert exchange is not None
            tls = self._transport is not None and self._transport.get_extra_info("sslcontext") is not None
            answer = await sasl.step(exchange, request, first, tls, self._context)
            if not first:
                self._authenticate(f"User:{exchange.user}")
            return pb.SaslAuthenticateResponse(auth_bytes=answer)
        except RequestRejected:
            self._sasl_exchange = None
            self.finish()
            raise
        finally:
            self._sasl_busy = False

    def _open_reply_stream(self, corr: int) -> None:
        """Make this connection a reply stream: register it, answer with its reply address."""
        registry = self._server.reply_registry
        token = registry.open(self) if registry is not None else None
        if registry is None or token is None:
            code = grpc.StatusCode.UNIMPLEMENTED if registry is None else grpc.StatusCode.RESOURCE_EXHAUSTED
            why = "no reply streams on this broker" if registry is None else f"{registry.streams_max} reply streams open"
            self._pending.append((corr, wire.error_frame(corr, code, why)))
            return
        self._push_token, self._push_corr = token, corr
        body = pb.ReplyRequest(reply_to=registry.address(token)).SerializeToString()
        self._pending.append((corr, wire.response_header(corr, wire.STATUS_OK, len(body)) + body))

    def push(self, body: bytes) -> bool:
        """A reply onto this reply stream (ReplySink); False if closed or the client does not read.
        The replies pushed in one loop iteration go out in one write (`_flush_pushed`, next iteration)."""
        transport = self._transport
        if (self._finishing or transport is None or transport.is_closing()
                or transport.get_write_buffer_size() + self._pushed_bytes > PUSH_BUFFER_BYTES_MAX):
            return False
        frame = wire.response_header(self._push_corr, wire.STATUS_OK, len(body)) + body
        if not self._pushed:
            self._loop.call_soon(self._flush_pushed)
        self._pushed.append(frame)
        self._pushed_bytes += len(frame)
        return True

    def flush(self) -> None:
        """Write the queued pushes now (ReplySink: a ReplyBatch's replies, all delivered)."""
        self._flush_pushed()

    def _flush_pushed(self) -> None:
        frames, self._pushed, self._pushed_bytes = self._pushed, [], 0
        transport = self._transport
        if frames and not self._finishing and transport is not None and not transport.is_closing():
            transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    # -- answers out ---------------------------------------------------------------------------

    def _on_done(self, _task: asyncio.Task[Message | bytes]) -> None:
        self._pump()

    def _write_ready(self) -> None:
        """Write every answer at the head of the line that is ready, in request order."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        pending = self._pending
        small: list[bytes] = []
        while pending:
            corr, item = pending[0]
            if isinstance(item, bytes):
                small.append(item)
            elif not item.done():
                break
            elif item.cancelled():
                small.append(wire.error_frame(corr, grpc.StatusCode.CANCELLED, "the broker is stopping"))
            else:
                exc = item.exception()
                if exc is not None:
                    assert isinstance(exc, RequestRejected)  # _run turns the rest into INTERNAL
                    small.append(_rejected_frame(corr, exc))
                else:
                    response = item.result()
                    body = response if isinstance(response, bytes) else response.SerializeToString()
                    head = wire.response_header(corr, wire.STATUS_OK, len(body))
                    if len(body) < COALESCE_BYTES_MAX:
                        small.append(head + body)
                    else:  # no copy of a big fetch response; one more send() is nothing beside it
                        if small:
                            transport.write(b"".join(small))
                            small = []
                        transport.write(head)
                        self._write_big(transport, body)
            pending.popleft()
        if small:
            transport.write(small[0] if len(small) == 1 else b"".join(small))
        if self._finishing and not pending:
            transport.close()

    def _write_big(self, transport: asyncio.Transport, body: bytes) -> None:
        if not self._tls or len(body) <= TLS_WRITE_PIECE_BYTES:
            transport.write(body)
            return
        view = memoryview(body)
        for at in range(0, len(body), TLS_WRITE_PIECE_BYTES):
            transport.write(view[at : at + TLS_WRITE_PIECE_BYTES])

    # -- flow ----------------------------------------------------------------------------------

    def idle_since(self, cutoff: float) -> bool:
        """Nothing pending and no byte read since loop time `cutoff`."""
        return not self._pending and self._push_token is None and self._last_read < cutoff

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None and not self._transport.is_closing():
            self._read_paused = True
            self._transport.pause_reading()

    def _update_reading(self) -> None:
        """Read while the read buffer (or the big frame) has room, answers drain and the connection
        is not finishing. A full pipeline does not stop reading, so an EOF or a reset behind it is
        seen; requests refused at once take pipeline room too, until written, and a client sending
        garbage and never reading is held by the write buffer's high-water mark."""
        if self._finishing or self._write_paused or (self._big is None and self._len >= len(self._buf) > 0):
            self._pause_reading()
        elif self._read_paused and self._transport is not None and not self._transport.is_closing():
            self._read_paused = False
            self._transport.resume_reading()

    def finish(self) -> None:
        """Start no more frames, read no more; close once the requests started are answered."""
        if self._finishing:
            return
        self._finishing = True
        self._pause_reading()
        self._write_ready()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _peer(peername: object) -> str:
    """host:port of a peer address tuple ("" if unknown)."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        return f"{peername[0]}:{peername[1]}"
    return ""


def _rejected_frame(corr: int, exc: RequestRejected) -> bytes:
    return wire.error_frame(corr, rpc.grpc_status(exc.status), exc.message)


async def _run(fn: Handler, request: Message, context: RequestContext) -> Message | bytes:
    try:
        return await fn(request, context)
    except (RequestRejected, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("record transport: handler failed")
        raise RequestRejected(RequestStatus.INTERNAL, f"{type(exc).__name__}: {exc}") from None
