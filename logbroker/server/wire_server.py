"""The broker's record-transport listener (frame layout in logbroker/wire.py), on its event loop.

One `asyncio.BufferedProtocol` per connection, no stream reader or writer task: the kernel's bytes
land in the connection's buffer, `buffer_updated` cuts them into frames and starts each request's
handler as a task at once (asyncio runs tasks in creation order, so the synchronous part of a
produce, its appends, runs in request order), and each task's done-callback writes every answer
that is ready, in request order. A produce costs three loop iterations from its bytes arriving to
its response leaving (stream reader, reader task, writer task and a queue cost two more each way);
the broker's event loop is on every record's path, so iterations are latency.

A handler's `RequestRejected` becomes that request's status frame; an unexpected exception an
INTERNAL one (logged). A frame too large for the buffer is read into its own bytearray of exactly its
size, so a 32 MiB produce is copied once.

Bounds: `connections_max` open connections (more are closed at once); a frame of at most
`max_request_bytes` of body, its buffer allocated only once its size is known to be in bounds; at most
`pipeline_max` requests of a connection in progress or unanswered, after which it is not read (TCP
flow control then holds the client back), nor while the transport's write buffer is over its high-water
mark (a client that stops reading holds only its own connection's responses). TCP keepalive notices
a client that vanished without a reset.

`close()` stops reading every connection: each answers the requests it has read, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import Message

from logbroker import wire
from logbroker.server import rpc

log = logging.getLogger(__name__)

Handler = Callable[[Any, Any], Awaitable[Message | bytes]]
CONNECTIONS_MAX = 1024
PIPELINE_MAX = 8
READ_BUFFER_BYTES = 256 << 10  # frames up to this are cut from the shared buffer; bigger get their own
COALESCE_BYTES_MAX = 256 << 10  # a response body below this is copied behind its header, sent at once


class WireServer:
    def __init__(self, handlers: dict[int, tuple[type[Message], Handler]], max_request_bytes: int,
                 connections_max: int = CONNECTIONS_MAX, pipeline_max: int = PIPELINE_MAX) -> None:
        self.handlers = handlers
        self.size_max = wire.SIZE_MIN + max_request_bytes
        self.connections_max = connections_max
        self.pipeline_max = pipeline_max
        self.connections: set[_Connection] = set()
        self.closed = False
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def close(self) -> None:
        """Stop accepting and reading; connections answer what they have read, then close."""
        self.closed = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.finish()

    async def stop(self, grace_s: float) -> None:
        """close(), then wait up to `grace_s` for the connections to finish; abort the rest."""
        self.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.connections and loop.time() < deadline:
            await asyncio.wait([c.ended for c in self.connections], timeout=deadline - loop.time())
        for conn in list(self.connections):
            conn.abort()

    def __len__(self) -> int:
        return len(self.connections)


class _Connection(asyncio.BufferedProtocol):
    def __init__(self, server: WireServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._len = 0  # bytes of _buf holding data not yet cut into frames
        self._big: bytearray | None = None  # a frame bigger than _buf, filled in place
        self._big_have = 0
        # Requests in order: (corr, running task) or (corr, finished response frame).
        self._pending: deque[tuple[int, asyncio.Task[Message | bytes] | bytes]] = deque()
        self._finishing = False  # read no more; close once every pending request is answered
        self._eof = False  # the client closed its side: finish once the whole frames read are started
        self._read_paused = False
        self._write_paused = False
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        server = self._server
        if server.closed or len(server.connections) >= server.connections_max:
            if not server.closed:
                log.warning("record transport: %d connections open, refusing %s", len(server.connections),
                            transport.get_extra_info("peername"))
            transport.abort()
            return
        server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        for _, item in self._pending:
            if isinstance(item, asyncio.Task):
                item.cancel()  # its effects so far stand, as on a broken gRPC call
        self._pending.clear()
        if not self.ended.done():
            self.ended.set_result(None)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._big is not None:
            return memoryview(self._big)[self._big_have :]
        if self._len >= len(self._buf):  # only while finishing (frames are cut as they come): discard
            return memoryview(bytearray(4096))
        return self._view[self._len :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._finishing:
            return
        if self._big is not None:
            self._big_have += nbytes
            if self._big_have == len(self._big):
                frame, self._big = self._big, None
                self._dispatch(frame)
                self._pump()
            return
        self._len += nbytes
        self._pump()

    def eof_received(self) -> bool:
        """The client sent its last request: answer every whole frame read, then close (saying so
        when its last frame was cut off; nothing of that frame is run)."""
        self._eof = True
        self._pump()
        return True  # keep our side open until finish() closes it

    def pause_writing(self) -> None:
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # -- frames in -----------------------------------------------------------------------------

    def _pump(self) -> None:
        """Cut frames while the pipeline has room and write the answers that are ready, again while
        answering made room for frames already read; then pause or resume reading to match."""
        while True:
            cut = self._cut_frames()
            self._write_ready()
            if not cut or self._finishing or len(self._pending) >= self._server.pipeline_max or self._len < 4:
                break
        if self._eof and not self._finishing and not self._whole_frame_buffered():
            if self._len or self._big is not None:
                self._pending.append((0, wire.error_frame(0, grpc.StatusCode.INVALID_ARGUMENT,
                                                          "connection closed inside a frame")))
            self.finish()
        self._update_reading()

    def _whole_frame_buffered(self) -> bool:
        """Whether the buffer starts with something _cut_frames would take (a whole frame, or a size
        it refuses)."""
        if self._big is not None or self._len < 4:
            return False
        size = int.from_bytes(self._buf[:4], "big")
        return size < wire.SIZE_MIN or size > self._server.size_max or self._len >= 4 + size

    def _cut_frames(self) -> int:
        """Start the requests of the whole frames in the buffer, while the pipeline has room; how many."""
        buf, pos, end = self._buf, 0, self._len
        cut = 0
        pipeline_max = self._server.pipeline_max
        while not self._finishing and len(self._pending) < pipeline_max and end - pos >= 4:
            size = int.from_bytes(buf[pos : pos + 4], "big")
            if size < wire.SIZE_MIN or size > self._server.size_max:
                corr = int.from_bytes(buf[pos + 5 : pos + 9], "big") if end - pos >= 9 else 0
                if size < wire.SIZE_MIN:
                    message = f"frame size {size} is below the {wire.SIZE_MIN}-byte header"
                    code = grpc.StatusCode.INVALID_ARGUMENT
                else:
                    message = (f"request of {size - wire.SIZE_MIN} bytes is over the broker's limit of "
                               f"{self._server.size_max - wire.SIZE_MIN} (max_request_bytes)")
                    code = grpc.StatusCode.RESOURCE_EXHAUSTED
                self._pending.append((corr, wire.error_frame(corr, code, message)))
                self.finish()
                break
            if end - pos < 4 + size:
                if 4 + size > len(buf):  # too big for the buffer: its own, what has come first
                    big = bytearray(size)
                    have = end - pos - 4
                    big[:have] = buf[pos + 4 : end]
                    self._big, self._big_have = big, have
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

    def _dispatch(self, frame: bytes | bytearray) -> None:
        api = frame[0]
        corr = int.from_bytes(frame[1:5], "big")
        entry = self._server.handlers.get(api)
        if entry is None:
            self._pending.append((corr, wire.error_frame(corr, grpc.StatusCode.UNIMPLEMENTED, f"unknown api {api}")))
            return
        request_cls, fn = entry
        try:
            request = rpc.parse(request_cls, memoryview(frame)[wire.SIZE_MIN :])
        except rpc.RequestRejected as exc:
            self._pending.append((corr, wire.error_frame(corr, exc.status, exc.message)))
            return
        task = asyncio.get_running_loop().create_task(_run(fn, request))
        self._pending.append((corr, task))
        task.add_done_callback(self._on_done)

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
                    assert isinstance(exc, rpc.RequestRejected)  # _run turns the rest into INTERNAL
                    small.append(wire.error_frame(corr, exc.status, exc.message))
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
                        transport.write(body)
            pending.popleft()
        if small:
            transport.write(small[0] if len(small) == 1 else b"".join(small))
        if self._finishing and not pending:
            transport.close()

    # -- flow ----------------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        if not self._read_paused and self._transport is not None and not self._transport.is_closing():
            self._read_paused = True
            self._transport.pause_reading()

    def _update_reading(self) -> None:
        """Read only while the pipeline has room, answers drain and the connection is not finishing
        (requests refused at once take pipeline room too, until written: a client sending garbage
        and never reading is held by the write buffer's high-water mark)."""
        if self._finishing or self._write_paused or len(self._pending) >= self._server.pipeline_max:
            self._pause_reading()
        elif self._read_paused and self._transport is not None and not self._transport.is_closing():
            self._read_paused = False
            self._transport.resume_reading()

    def finish(self) -> None:
        """Read no more; close once the requests read so far are answered."""
        if self._finishing:
            return
        self._finishing = True
        self._pause_reading()
        self._write_ready()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


async def _run(fn: Handler, request: Message) -> Message | bytes:
    try:
        return await fn(request, None)
    except (rpc.RequestRejected, asyncio.CancelledError):
        raise
    except Exception as exc:
        log.exception("record transport: handler failed")
        raise rpc.RequestRejected(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}") from None
