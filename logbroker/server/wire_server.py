"""The broker's record-transport listener (frame layout in logbroker/wire.py), on its event loop.

Per connection, as `rpc.stream_method` does per gRPC stream: a reader task parses frames and starts
each request's handler as a task at once (asyncio runs tasks in creation order, so the synchronous
part of a produce, its appends, runs in request order); at most `pipeline_max` run at once, after
which the connection is not read until the oldest is answered (TCP flow control then holds the
client back). A writer task answers them in request order. A handler's `RequestRejected` becomes
that request's status frame; an unexpected exception an INTERNAL one (logged).

Bounds: `connections_max` open connections (more are closed at once); a frame of at most
`max_request_bytes` of body, read only once its size is known to be in bounds; `pipeline_max`
requests per connection (a produce body up to max_request_bytes, a fetch response up to the
broker's max_response_bytes); responses wait for the socket to drain (a client that stops reading
holds only its own connection's responses). Connections have TCP keepalive, so a client that
vanished without a reset is noticed by the kernel.

`close()` stops reading every connection: each answers the requests it has read, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
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


class _Refused:
    """A request answered with a status without running a handler; `last` closes the connection."""

    __slots__ = ("frame", "last")

    def __init__(self, corr: int, code: grpc.StatusCode, message: str, last: bool = False) -> None:
        self.frame = wire.error_frame(corr, code, message)
        self.last = last


_Item = tuple[int, "asyncio.Future[Message | bytes]"] | _Refused | None


class WireServer:
    def __init__(self, handlers: dict[int, tuple[type[Message], Handler]], max_request_bytes: int,
                 connections_max: int = CONNECTIONS_MAX, pipeline_max: int = PIPELINE_MAX) -> None:
        self._handlers = handlers
        self._size_max = wire.SIZE_MIN + max_request_bytes
        self._connections_max = connections_max
        self._pipeline_max = pipeline_max
        self._server: asyncio.Server | None = None
        self._readers: set[asyncio.Task[None]] = set()
        self._connections: set[asyncio.Task[None]] = set()
        self.closed = False
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def close(self) -> None:
        """Stop accepting and reading; connections answer what they have read, then close."""
        self.closed = True
        if self._server is not None:
            self._server.close()
        for reader in list(self._readers):
            reader.cancel()

    async def stop(self, grace_s: float) -> None:
        """close(), then wait up to `grace_s` for the connections to finish; cancel the rest."""
        self.close()
        pending = list(self._connections)
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def __len__(self) -> int:
        return len(self._connections)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closed or len(self._connections) >= self._connections_max:
            if not self.closed:
                log.warning("record transport: %d connections open, refusing %s", len(self._connections),
                            writer.get_extra_info("peername"))
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, OSError):
            pass  # the client went away; its handlers' effects stand, as on a broken gRPC call
        except asyncio.CancelledError:
            pass  # stop() after its grace period
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        space = asyncio.Semaphore(self._pipeline_max)
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        read_task = asyncio.ensure_future(self._read(reader, space, queue))
        self._readers.add(read_task)
        read_task.add_done_callback(self._readers.discard)
        if self.closed:
            read_task.cancel()
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, _Refused):
                    writer.write(item.frame)
                    await writer.drain()
                    if item.last:
                        return
                    continue
                corr, future = item
                try:
                    response = await future
                except rpc.RequestRejected as exc:
                    frame = wire.error_frame(corr, exc.status, exc.message)
                    writer.write(frame)
                else:
                    body = response if isinstance(response, bytes) else response.SerializeToString()
                    writer.write(wire.response_header(corr, wire.STATUS_OK, len(body)))
                    writer.write(body)
                space.release()
                await writer.drain()
        finally:
            read_task.cancel()
            while not queue.empty():
                left = queue.get_nowait()
                if isinstance(left, tuple):
                    left[1].cancel()

    async def _read(self, reader: asyncio.StreamReader, space: asyncio.Semaphore,
                    queue: asyncio.Queue[_Item]) -> None:
        """Parse frames into `queue`; always ends it (None, or a last _Refused)."""
        end: _Item = None
        try:
            while True:
                try:
                    head = await reader.readexactly(4)
                except asyncio.IncompleteReadError:
                    return  # the client closed its side between frames
                size = int.from_bytes(head, "big")
                if size < wire.SIZE_MIN or size > self._size_max:
                    corr = 0
                    with contextlib.suppress(asyncio.IncompleteReadError):
                        corr = int.from_bytes((await reader.readexactly(5))[1:], "big")
                    if size < wire.SIZE_MIN:
                        end = _Refused(corr, grpc.StatusCode.INVALID_ARGUMENT,
                                       f"frame size {size} is below the {wire.SIZE_MIN}-byte header", last=True)
                    else:
                        end = _Refused(corr, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       f"request of {size - wire.SIZE_MIN} bytes is over the broker's limit of "
                                       f"{self._size_max - wire.SIZE_MIN} (max_request_bytes)", last=True)
                    return
                frame = await reader.readexactly(size)
                api = frame[0]
                corr = int.from_bytes(frame[1:5], "big")
                entry = self._handlers.get(api)
                if entry is None:
                    queue.put_nowait(_Refused(corr, grpc.StatusCode.UNIMPLEMENTED, f"unknown api {api}"))
                    continue
                request_cls, fn = entry
                try:
                    request = rpc.parse(request_cls, memoryview(frame)[wire.SIZE_MIN:])
                except rpc.RequestRejected as exc:
                    queue.put_nowait(_Refused(corr, exc.status, exc.message))
                    continue
                await space.acquire()
                queue.put_nowait((corr, asyncio.ensure_future(_run(fn, request))))
        except asyncio.IncompleteReadError:
            end = _Refused(0, grpc.StatusCode.INVALID_ARGUMENT, "connection closed inside a frame", last=True)
        except (ConnectionError, OSError):
            pass
        finally:  # cancelled (close()) or done: end after the responses to what was read
            queue.put_nowait(end)


async def _run(fn: Handler, request: Message) -> Message | bytes:
    try:
        return await fn(request, None)
    except rpc.RequestRejected:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("record transport: handler failed")
        raise rpc.RequestRejected(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}") from None
