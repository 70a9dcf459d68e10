"""ReplyRegistry and the reply checks (server/reply_registry.py), ReplyBatch (server/apis/replies.py): no socket."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from logbroker.server.apis.replies import REPLY_BATCH_MAX, ReplyApis
from logbroker.server.reply_registry import (
    REPLY_BYTES_MAX,
    ReplyRegistry,
    check_reply,
    parse_reply_to,
)
from logbroker.server.request_context import RequestContext, RequestRejected, RequestStatus
from logbroker.v1 import logbroker_pb2 as pb


class Sink:
    def __init__(self, reads: bool = True) -> None:
        self.reads = reads
        self.queued: list[bytes] = []  # pushed, not flushed (a wire connection writes them next iteration)
        self.bodies: list[bytes] = []

    def push(self, body: bytes) -> bool:
        if self.reads:
            self.queued.append(body)
        return self.reads

    def flush(self) -> None:
        self.bodies += self.queued
        self.queued = []


def test_parse_reply_to():
    token = "0123456789abcdef" * 2
    assert parse_reply_to(f"7:{token}") == (7, token)
    for bad in ("", "7", f"x:{token}", "7:abc", f"7:{'z' * 32}", f"-1:{token}", f"7:{token}" + "0" * 64):
        assert parse_reply_to(bad) is None, bad


def test_replies_reach_only_their_stream_and_close_unregisters():
    reg = ReplyRegistry(3)
    a, b = Sink(), Sink()
    ta, tb = reg.open(a), reg.open(b)
    assert ta and tb and ta != tb and reg.address(ta) == f"3:{ta}"
    req = pb.ReplyRequest(reply_to=reg.address(ta), correlation_id="c1", value=b"v")
    assert reg.deliver(req).error_code == pb.NONE
    assert [pb.ReplyRequest.FromString(x).correlation_id for x in a.queued] == ["c1"] and b.queued == []
    reg.close(ta)
    assert reg.deliver(req).error_code == pb.UNKNOWN_REPLY_TO
    assert (reg.delivered, reg.unknown, len(reg)) == (1, 1, 1)
    other = pb.ReplyRequest(reply_to=f"4:{tb}", correlation_id="c2")
    assert reg.deliver(other).error_code == pb.UNKNOWN_REPLY_TO  # names another broker


def test_a_stream_that_does_not_read_drops_and_counts():
    reg = ReplyRegistry(0)
    token = reg.open(Sink(reads=False))
    assert token is not None
    assert reg.deliver(pb.ReplyRequest(reply_to=reg.address(token), correlation_id="c")).error_code == pb.NONE
    assert (reg.delivered, reg.dropped) == (0, 1)


def test_streams_max_and_size_bound():
    reg = ReplyRegistry(0, streams_max=1)
    assert reg.open(Sink()) is not None and reg.open(Sink()) is None
    addr = "0:" + "ab" * 16
    assert check_reply(pb.ReplyRequest(reply_to=addr, value=b"x" * REPLY_BYTES_MAX)) is None
    too_big = pb.ReplyRequest(reply_to=addr, value=b"x" * REPLY_BYTES_MAX)
    too_big.headers.add(key="h", value=b"")
    refused = check_reply(too_big)
    assert refused is not None and refused.error_code == pb.REPLY_TOO_LARGE
    bad_addr = check_reply(pb.ReplyRequest(reply_to="nope"))
    assert bad_addr is not None and bad_addr.error_code == pb.UNKNOWN_REPLY_TO


class Forwarder:
    def __init__(self) -> None:
        self.sent: list[tuple[int, str]] = []

    async def forward_reply(self, broker_id: int, req: pb.ReplyRequest) -> pb.ReplyResponse:
        self.sent.append((broker_id, req.correlation_id))
        return pb.ReplyResponse(error_code=pb.BROKER_NOT_AVAILABLE, error_message=f"to {broker_id}")


def test_a_reply_batch_is_each_reply_handled_as_one_reply_answered_in_order():
    reg = ReplyRegistry(3)
    sink = Sink()
    here = reg.address(reg.open(sink) or "")
    forwarder = Forwarder()
    apis = ReplyApis(SimpleNamespace(ready=True), reg, forwarder)
    batch = pb.ReplyBatchRequest(replies=[
        pb.ReplyRequest(reply_to=here, correlation_id="a", value=b"1"),
        pb.ReplyRequest(reply_to=f"5:{'ab' * 16}", correlation_id="b"),  # another broker's: forwarded
        pb.ReplyRequest(reply_to="nonsense", correlation_id="c"),
        pb.ReplyRequest(reply_to=here, correlation_id="d", value=b"x" * (REPLY_BYTES_MAX + 1)),
        pb.ReplyRequest(reply_to=f"3:{'cd' * 16}", correlation_id="e"),  # no such stream here
        pb.ReplyRequest(reply_to=here, correlation_id="f", value=b"2"),
    ])
    resp = asyncio.run(apis.reply_batch(RequestContext(), batch))
    assert [r.error_code for r in resp.results] == [pb.NONE, pb.BROKER_NOT_AVAILABLE, pb.UNKNOWN_REPLY_TO,
                                                    pb.REPLY_TOO_LARGE, pb.UNKNOWN_REPLY_TO, pb.NONE]
    assert resp.results[1].error_message == "to 5" and forwarder.sent == [(5, "b")]
    assert [pb.ReplyRequest.FromString(b).correlation_id for b in sink.bodies] == ["a", "f"]  # flushed: one write
    assert sink.queued == []


def test_a_reply_batch_over_the_bound_is_refused_whole():
    reg = ReplyRegistry(0)
    sink = Sink()
    here = reg.address(reg.open(sink) or "")
    apis = ReplyApis(SimpleNamespace(ready=True), reg, None)
    batch = pb.ReplyBatchRequest(replies=[pb.ReplyRequest(reply_to=here, correlation_id=str(i))
                                          for i in range(REPLY_BATCH_MAX + 1)])
    with pytest.raises(RequestRejected) as e:
        asyncio.run(apis.reply_batch(RequestContext(), batch))
    assert e.value.status == RequestStatus.INVALID_ARGUMENT and sink.bodies == []
    with pytest.raises(RequestRejected) as e:
        asyncio.run(ReplyApis(SimpleNamespace(ready=False), reg, None).reply_batch(RequestContext(), batch))
    assert e.value.status == RequestStatus.UNAVAILABLE
