"""Request-reply: the Reply call (Broker service and record transport API_REPLY) and its
inter-broker twin ForwardReply (Replica service). Routing and bounds: server/reply_registry.py.

Reply: a reply is refused (REPLY_TOO_LARGE, UNKNOWN_REPLY_TO) before it leaves this broker when it
is too large or its reply_to is not an address; one addressed here is pushed onto its stream; one
addressed to another broker is forwarded there (`ReplyForwarder`; UNKNOWN_REPLY_TO when no such
broker is live, BROKER_NOT_AVAILABLE when the call fails). Nothing is written to disk.

ReplyBatch (record transport API_REPLY_BATCH): up to `REPLY_BATCH_MAX` replies in one call, each
handled exactly as one Reply, answered with one ReplyResponse per reply in order (the forwarded
ones forwarded concurrently). A responder sends the replies of one poll so: one frame, one task and
one answer instead of one each per reply, and the replies pushed onto a reply stream in one write,
at once (`ReplySink.flush`: not in the next loop iteration, as single Replies are).
More replies than the bound: INVALID_ARGUMENT for the call, nothing delivered.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from logbroker.server.reply_registry import (
    ReplyRegistry,
    ReplySink,
    check_parsed,
    check_reply,
    parse_reply_to,
)
from logbroker.server.request_checks import ServingState, check_count, check_ready
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb

REPLY_BATCH_MAX = 10_000  # replies in one ReplyBatch


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

    async def reply_batch(self, context: RequestContext, req: pb.ReplyBatchRequest) -> pb.ReplyBatchResponse:
        check_ready(self._state)
        check_count(len(req.replies), "replies", REPLY_BATCH_MAX)
        resp = pb.ReplyBatchResponse()
        results = resp.results
        forwards: list[tuple[int, int, pb.ReplyRequest]] = []  # (index, broker_id, reply)
        here = self.registry.broker_id
        deliver = self.registry.deliver
        touched: set[ReplySink] = set()
        for i, reply in enumerate(req.replies):
            parsed = parse_reply_to(reply.reply_to)
            refused = check_parsed(reply, parsed)
            if refused is not None:
                results.append(refused)
                continue
            assert parsed is not None
            broker_id = parsed[0]
            if broker_id == here or self._forwarder is None:
                results.append(deliver(reply, parsed, touched))
            else:
                results.add()
                forwards.append((i, broker_id, reply))
        for sink in touched:  # the batch's replies leave now, one write per stream (no wait for the loop)
            sink.flush()
        if forwards:
            forwarder = self._forwarder
            assert forwarder is not None
            answers = await asyncio.gather(*(forwarder.forward_reply(b, r) for _, b, r in forwards))
            for (i, _, _), answer in zip(forwards, answers, strict=True):
                results[i].CopyFrom(answer)
        return resp

    def forward_reply(self, req: pb.ReplyRequest) -> pb.ReplyResponse:
        """A reply another broker forwarded: delivered here or refused, never forwarded again."""
        refused = check_reply(req)
        return refused if refused is not None else self.registry.deliver(req)
