"""The gRPC edge: raw-bytes method handlers.

Handlers receive the request bytes undecoded, so a malformed request gets a clear
INVALID_ARGUMENT status naming the message type (instead of grpc's generic deserialization error),
and a handler may build its response bytes itself. Everything else about a call's result is data:
per-partition `ErrorCode`s inside an OK response.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from logbroker import wire
from logbroker.client_id import CLIENT_ID_METADATA, client_id_problem
from logbroker.cluster.cluster_secret import presented_secret
from logbroker.server.admission import Admission
from logbroker.server.request_checks import require_cluster_peer
from logbroker.server.request_context import (
    ANONYMOUS,
    LISTENER_GRPC,
    RequestContext,
    RequestRejected,
    RequestStatus,
)
from logbroker.tls import principal_from_common_name

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message | bytes]]

__all__ = ["RequestRejected", "grpc_status", "request_context", "require_peer"]
_GRPC_STATUS: dict[RequestStatus, grpc.StatusCode] = {s: grpc.StatusCode[s.name] for s in RequestStatus}


def grpc_status(status: RequestStatus) -> grpc.StatusCode:
    """The gRPC status a refused call ends with."""
    return _GRPC_STATUS[status]


def request_context(context: grpc.aio.ServicerContext | None) -> RequestContext:
    """The request layer's view of a gRPC caller (server/request_context.py); a malformed `client-id`
    metadata value (logbroker/client_id.py) refuses the call (INVALID_ARGUMENT)."""
    if context is None:
        return RequestContext()
    metadata = context.invocation_metadata()
    client_id = ""
    for key, value in metadata or ():
        if key == CLIENT_ID_METADATA:
            client_id = value if isinstance(value, str) else value.decode("utf-8", "replace")
            problem = client_id_problem(client_id)
            if problem is not None:
                raise RequestRejected(RequestStatus.INVALID_ARGUMENT, problem)
    return RequestContext(_principal(context), client_id, context.peer() or "", LISTENER_GRPC, presented_secret(metadata))


def _principal(context: grpc.aio.ServicerContext) -> str:
    """User:<CN> of the connection's verified client certificate (mTLS), else ANONYMOUS."""
    try:
        auth = context.auth_context()
    except Exception:  # not every servicer context (tests' fakes) has one
        return ANONYMOUS
    names = auth.get("x509_common_name") if isinstance(auth, dict) else None
    return (principal_from_common_name(names[0]) if names else None) or ANONYMOUS


def require_peer(secret: bytes, cluster_mode: bool, context: grpc.aio.ServicerContext | None, what: str) -> None:
    """Refuse the call unless its caller proved it is a broker of this cluster (the cluster secret
    in its metadata; logbroker/cluster/cluster_secret.py). `context` None: no metadata, so no proof."""
    presented = presented_secret(context.invocation_metadata() if context is not None else None)
    require_cluster_peer(secret, cluster_mode, presented, what, (context.peer() or "") if context is not None else "")


def parse(cls: type[M], raw: bytes | memoryview) -> M:
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError) as exc:  # ValueError: invalid UTF-8 in a string field
        raise RequestRejected(
            RequestStatus.INVALID_ARGUMENT, f"malformed {cls.DESCRIPTOR.name}: {exc}"
        ) from None


async def abort(context: grpc.aio.ServicerContext, exc: RequestRejected) -> None:
    """End the call with the refusal's status; an overload refusal carries its retry-after hint as
    trailing metadata too (logbroker/wire.py)."""
    if exc.retry_after_ms is not None:
        await context.abort(grpc_status(exc.status), exc.message,
                            trailing_metadata=((wire.RETRY_AFTER_METADATA, str(exc.retry_after_ms)),))
    await context.abort(grpc_status(exc.status), exc.message)


def method(request_cls: type[M], fn: Callable[[M, grpc.aio.ServicerContext], Awaitable[Message | bytes]],
           guard: Callable[[grpc.aio.ServicerContext], None] | None = None,
           admission: Admission | None = None) -> Any:
    """A unary handler; `guard` (raising RequestRejected) runs before the request is even parsed,
    then `admission` (server/admission.py) counts the request in flight until it is answered."""

    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        admitted = 0
        try:
            if guard is not None:
                guard(context)
            if admission is not None:
                admission.admit(len(raw))
                admitted = 1
            request = parse(request_cls, raw)
            response = await fn(request, context)
        except RequestRejected as exc:
            await abort(context, exc)
            raise AssertionError("unreachable") from None
        finally:
            if admitted and admission is not None:
                admission.release(len(raw))
        if isinstance(response, bytes):
            return response
        return response.SerializeToString()

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None, response_serializer=None)


# Requests of one stream handled at once; the stream is not read further until the oldest is answered
# (HTTP/2 flow control then holds the client back). They bound a stream's memory: a produce request
# may be 32 MiB, an encoded fetch response 64 MiB. A producer has max_in_flight_requests (default 5)
# produce requests per broker in flight, a consumer one fetch per stream (fetch lane).
PRODUCE_STREAM_PIPELINE_MAX = 8
FETCH_STREAM_PIPELINE_MAX = 2


class OpenStreams:
    """The stream handlers a server runs, so a stopping broker can end them (they never end on their own).

    `close()` stops every handler reading: each answers the requests it has read and ends with OK
    (its client sees the end and reopens elsewhere); streams opened later end at once.
    """

    def __init__(self) -> None:
        self.closed = False
        self._readers: set[asyncio.Future[None]] = set()

    def add(self, reader: asyncio.Future[None]) -> bool:
        if self.closed:
            return False
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        return True

    def close(self) -> None:
        self.closed = True
        for reader in list(self._readers):
            reader.cancel()

    def __len__(self) -> int:
        return len(self._readers)


def stream_method(request_cls: type[M], fn: Callable[[M, grpc.aio.ServicerContext], Awaitable[Message | bytes]],
                  pipeline_max: int, open_streams: OpenStreams | None = None,
                  admission: Admission | None = None) -> Any:
    """A bidirectional stream answering each request as `method(request_cls, fn)` would, in request order.

    Each request becomes a task as soon as it is read (asyncio starts tasks in creation order, so
    the synchronous part of `fn`, e.g. a produce's appends, runs in request order); up to
    `pipeline_max` run at once. Their responses are written in request order. A malformed request
    or a `RequestRejected` ends the stream with its status after the responses before it; the
    tasks after it are cancelled. `admission` counts each request in flight until its task ends; a
    request it refuses (overload) ends the stream with RESOURCE_EXHAUSTED and the hint, after the
    responses before it (the client retries what it had sent after it). `open_streams.close()` ends the stream after the responses to the
    requests read so far.
    """

    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        space = asyncio.Semaphore(pipeline_max)
        queue: asyncio.Queue[asyncio.Future[Message | bytes] | RequestRejected | None] = asyncio.Queue()

        async def read() -> None:
            # Always ends the queue (a status or the None sentinel), whatever ends the reading: the
            # writer below waits on the queue only.
            end: RequestRejected | None = None
            try:
                async for raw in requests:
                    await space.acquire()
                    if admission is None:
                        queue.put_nowait(asyncio.ensure_future(fn(parse(request_cls, raw), context)))
                        continue
                    admission.admit(len(raw))
                    try:
                        task = asyncio.ensure_future(fn(parse(request_cls, raw), context))
                    except BaseException:
                        admission.release(len(raw))
                        raise
                    task.add_done_callback(admission.releaser(len(raw)))
                    queue.put_nowait(task)
            except RequestRejected as exc:
                end = exc
            except Exception as exc:  # reading the stream failed: answered as a broken connection
                end = RequestRejected(RequestStatus.UNAVAILABLE, f"reading the stream failed: {exc!r}")
            finally:  # None: the client closed its side (or the reader was cancelled): end after the last response
                queue.put_nowait(end)

        reader = asyncio.ensure_future(read())
        if open_streams is not None and not open_streams.add(reader):
            reader.cancel()  # the server is stopping: end at once (cancelled, read() ends the queue)
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, RequestRejected):
                    await abort(context, item)
                    return
                try:
                    response = await item
                except RequestRejected as exc:
                    await abort(context, exc)
                await context.write(response if isinstance(response, bytes) else response.SerializeToString())
                space.release()
        finally:
            reader.cancel()
            while not queue.empty():
                left = queue.get_nowait()
                if isinstance(left, asyncio.Future):
                    left.cancel()

    return grpc.stream_stream_rpc_method_handler(handle, request_deserializer=None, response_serializer=None)


def service(name: str, methods: dict[str, Any]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(name, methods)
