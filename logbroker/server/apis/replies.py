"""Request-reply: the Reply call (Broker service and record transport API_REPLY) and its
inter-broker twin ForwardReply (Replica service). Routing and bounds: server/reply_registry.py.

Reply: a reply is refused (REPLY_TOO_LARGE, UNKNOWN_REPLY_TO) before it leaves this broker when it
is too large or its reply_to is not an address; one addressed here is pushed onto its stream; one
addressed to another broker is forwarded there (`ReplyForwarder`; UNKNOWN_REPLY_TO when no such
broker is live, BROKER_NOT_AVAILABLE when the call fails). Nothing is written to disk.
"""

from __future__ import annotations

from typing import Protocol

from logbroker.server.reply_registry import ReplyRegistry, check_reply, parse_reply_to
from logbroker.server.request_checks import ServingState, check_ready
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb


class ReplyForwarder(Protocol):
    async def forward_reply(self, broker_id: int, req: pb.ReplyRequest) -> pb.ReplyResponse:
        """Send `req` to broker `broker_id`'s ForwardReply (its answer, or UNKNOWN_REPLY_TO /
        BROKER_NOT_AVAILABLE)."""
        ...


class ReplyApis:
    def __init__(self, state: ServingState, registry: ReplyRegistry, forwarder: ReplyForwarder | None) -> None:
        self._state = state
        self.registry = registry
        self._forwarder = forwarder

    async def reply(self, context: RequestContext, req: pb.ReplyRequest) -> pb.ReplyResponse:
        check_ready(self._state)
        refused = check_reply(req)
        if refused is not None:
            return refused
        broker_id, _ = parse_reply_to(req.reply_to) or (self.registry.broker_id, "")
        if broker_id == self.registry.broker_id or self._forwarder is None:
            return self.registry.deliver(req)
        return await self._forwarder.forward_reply(broker_id, req)

    def forward_reply(self, req: pb.ReplyRequest) -> pb.ReplyResponse:
        """A reply another broker forwarded: delivered here or refused, never forwarded again."""
        refused = check_reply(req)
        return refused if refused is not None else self.registry.deliver(req)
