"""ReplyRegistry and the reply checks (server/reply_registry.py): pure, no socket."""

from __future__ import annotations

from logbroker.server.reply_registry import (
    REPLY_BYTES_MAX,
    ReplyRegistry,
    check_reply,
    parse_reply_to,
)
from logbroker.v1 import logbroker_pb2 as pb


class Sink:
    def __init__(self, reads: bool = True) -> None:
        self.reads = reads
        self.bodies: list[bytes] = []

    def push(self, body: bytes) -> bool:
        if self.reads:
            self.bodies.append(body)
        return self.reads


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
    assert [pb.ReplyRequest.FromString(x).correlation_id for x in a.bodies] == ["c1"] and b.bodies == []
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
