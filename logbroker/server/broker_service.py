"""`logbroker.v1.Broker` over gRPC, and the record transport's APIs: thin adapters over the
request layer (server/apis/): decode, build the caller's context, call, encode.

ProduceStream and FetchStream run the same calls per stream message (rpc.stream_method): responses
in request order, a refused request ends the stream with the unary call's status. So does the
record transport (logbroker/wire.py, server/wire_server.py), where a refused request gets its
status and the connection goes on.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
from google.protobuf.message import Message

from logbroker import wire
from logbroker.server import rpc
from logbroker.server.admission import Admission
from logbroker.server.apis.broker_apis import FETCH, PRODUCE, REQUEST_TYPES, BrokerApis
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.server.sasl import SESSION_METADATA, SaslServer
from logbroker.server.wire_server import Handler
from logbroker.v1 import logbroker_pb2 as pb

BROKER_METHODS = ("Produce", "Fetch", "ListOffsets", "Metadata", "OffsetCommit", "OffsetFetch", "FindCoordinator",
                  "ConsumerGroupHeartbeat", "ShareFetch", "ShareAcknowledge", "Reply", "ReplyBatch",
                  "InitProducerId")


def caller(context: grpc.aio.ServicerContext, sasl: SaslServer | None) -> RequestContext:
    """The call's RequestContext; with SASL on, its principal from the certificate or the call's session
    token on its own connection (server/sasl.py), else RequestRejected(UNAUTHENTICATED)."""
    ctx = rpc.request_context(context)
    if sasl is None:
        return ctx
    token = None
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA:
            token = value if isinstance(value, str) else value.decode("ascii", "replace")
    return sasl.gate(ctx, token)


def grpc_method(apis: BrokerApis, api: str, sasl: SaslServer | None = None) -> Any:
    """A unary gRPC method calling `api` of the request layer."""

    def call(request: Message, context: grpc.aio.ServicerContext) -> Awaitable[Message | bytes]:
        return apis.handle(api, caller(context, sasl), request)  # no coroutine frame of its own

    return rpc.method(REQUEST_TYPES[api], call, admission=_admission(apis))


def _admission(apis: BrokerApis | None) -> Admission | None:
    """The request layer's bounds on in-flight requests (None: none; tests build handlers without apis)."""
    return apis.admission if apis is not None else None


def _is_tls(context: grpc.aio.ServicerContext) -> bool:
    try:
        auth = context.auth_context()
    except Exception:
        return False
    kinds: Any = auth.get("transport_security_type") if isinstance(auth, dict) else None
    return bool(kinds) and kinds[0] in (b"ssl", "ssl")


class BrokerService:
    """Produce and Fetch for the streams (one context per call, as the unary methods), and SASL."""

    def __init__(self, apis: BrokerApis, sasl: SaslServer | None = None) -> None:
        self.apis = apis
        self.sasl = sasl

    async def produce(self, req: pb.ProduceRequest, context: grpc.aio.ServicerContext) -> Message | bytes:
        return await self.apis.handle(PRODUCE, caller(context, self.sasl), req)

    async def fetch(self, req: pb.FetchRequest, context: grpc.aio.ServicerContext) -> Message | bytes:
        return await self.apis.handle(FETCH, caller(context, self.sasl), req)

    async def reply(self, req: pb.ReplyRequest, context: grpc.aio.ServicerContext) -> Message | bytes:
        return await self.apis.handle("Reply", caller(context, self.sasl), req)

    def _sasl_on(self) -> SaslServer:
        if self.sasl is None:
            raise RequestRejected(RequestStatus.UNIMPLEMENTED, "SASL is not enabled on this broker (--sasl-mechanisms)")
        return self.sasl

    async def sasl_first(self, req: pb.SaslAuthenticateRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._sasl_on().grpc_first(req, rpc.request_context(context), _is_tls(context))

    async def sasl_final(self, req: pb.SaslAuthenticateRequest, context: grpc.aio.ServicerContext) -> Message:
        return await self._sasl_on().grpc_final(req, rpc.request_context(context), _is_tls(context))


def wire_handlers(apis: BrokerApis) -> dict[int, tuple[type[Message], Handler]]:
    """The record transport's APIs (logbroker/wire.py): Produce, Fetch, Reply, ShareFetch,
    ShareAcknowledge and ReplyBatch of the request layer."""

    def produce(req: pb.ProduceRequest, context: RequestContext) -> Awaitable[Message | bytes]:
        return apis.handle(PRODUCE, context, req)  # no coroutine frame of its own: the hot path

    def fetch(req: pb.FetchRequest, context: RequestContext) -> Awaitable[Message | bytes]:
        return apis.handle(FETCH, context, req)

    def reply(req: pb.ReplyRequest, context: RequestContext) -> Awaitable[Message | bytes]:
        return apis.handle("Reply", context, req)

    def reply_batch(req: pb.ReplyBatchRequest, context: RequestContext) -> Awaitable[Message | bytes]:
        return apis.handle("ReplyBatch", context, req)

    def share_fetch(req: pb.ShareFetchRequest, context: RequestContext) -> Awaitable[Message | bytes]:
        return apis.handle("ShareFetch", context, req)

    def share_acknowledge(req: pb.ShareAcknowledgeRequest, context: RequestContext) -> Awaitable[Message | bytes]:
        return apis.handle("ShareAcknowledge", context, req)

    return {wire.API_PRODUCE: (pb.ProduceRequest, produce), wire.API_FETCH: (pb.FetchRequest, fetch),
            wire.API_REPLY: (pb.ReplyRequest, reply), wire.API_SHARE_FETCH: (pb.ShareFetchRequest, share_fetch),
            wire.API_SHARE_ACKNOWLEDGE: (pb.ShareAcknowledgeRequest, share_acknowledge),
            wire.API_REPLY_BATCH: (pb.ReplyBatchRequest, reply_batch)}


def handler(apis: BrokerApis, open_streams: rpc.OpenStreams | None = None,
            sasl: SaslServer | None = None) -> grpc.GenericRpcHandler:
    svc = BrokerService(apis, sasl)
    methods = {name: grpc_method(apis, name, sasl) for name in BROKER_METHODS}
    methods["SaslAuthenticateFirst"] = rpc.method(pb.SaslAuthenticateRequest, svc.sasl_first)
    methods["SaslAuthenticateFinal"] = rpc.method(pb.SaslAuthenticateRequest, svc.sasl_final)
    methods["ProduceStream"] = rpc.stream_method(pb.ProduceRequest, svc.produce, rpc.PRODUCE_STREAM_PIPELINE_MAX,
                                                 open_streams, _admission(apis))
    methods["FetchStream"] = rpc.stream_method(pb.FetchRequest, svc.fetch, rpc.FETCH_STREAM_PIPELINE_MAX, open_streams,
                                               _admission(apis))
    methods["ReplyStream"] = rpc.stream_method(pb.ReplyRequest, svc.reply, rpc.PRODUCE_STREAM_PIPELINE_MAX,
                                               open_streams, _admission(apis))
    return rpc.service("logbroker.v1.Broker", methods)
