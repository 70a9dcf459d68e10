"""The gRPC edge: raw-bytes method handlers.

Handlers receive the request bytes undecoded, so a malformed request gets a clear
INVALID_ARGUMENT status naming the message type (instead of grpc's generic deserialization error),
and a handler may build its response bytes itself. Everything else about a call's result is data:
per-partition `ErrorCode`s inside an OK response.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Message | bytes]]


class RequestRejected(Exception):
    """Abort the whole call with a gRPC status (for requests that cannot be answered per partition)."""

    def __init__(self, status: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse(cls: type[M], raw: bytes) -> M:
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError) as exc:  # ValueError: invalid UTF-8 in a string field
        raise RequestRejected(
            grpc.StatusCode.INVALID_ARGUMENT, f"malformed {cls.DESCRIPTOR.name}: {exc}"
        ) from None


def method(request_cls: type[M], fn: Callable[[M, grpc.aio.ServicerContext], Awaitable[Message | bytes]]) -> Any:
    async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            request = parse(request_cls, raw)
            response = await fn(request, context)
        except RequestRejected as exc:
            await context.abort(exc.status, exc.message)
            raise AssertionError("unreachable") from None
        if isinstance(response, bytes):
            return response
        return response.SerializeToString()

    return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=None, response_serializer=None)


def service(name: str, methods: dict[str, Any]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(name, methods)
