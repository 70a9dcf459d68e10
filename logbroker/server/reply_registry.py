"""Request-reply routing on a broker: the reply streams open on it, and where a reply goes.

A requester (client/requester.py) opens one long-lived reply stream to one broker (the record
transport's API_REPLY_STREAM, layout in logbroker/wire.py) and is given a random token; its reply
address, the `reply_to` header of every request it sends, is

    "<broker_id>:<token>"    broker_id: decimal; token: 32 hex digits (128 random bits)

A responder sends its reply (a ReplyRequest naming that address) to any broker; that broker forwards
it over the inter-broker Replica service (ForwardReply) when the broker named is another, and the
broker named pushes it, in memory, onto the stream. Nothing is written to disk, nothing is polled:
an idle requester costs its broker one socket and one dict entry, so thousands of them cost nothing
while quiet, and a reply reaches only the connection that registered the token.

Bounds: `streams_max` streams open on one broker (a further one is refused); a reply of more than
`REPLY_BYTES_MAX` (key + value + headers) is refused with REPLY_TOO_LARGE before anything is sent; a
stream whose client does not read (its socket's write buffer over the sink's bound) drops the reply
and counts it (`dropped`). A reply for a token not open here (the requester has gone, or never was)
or naming a malformed address or an unknown broker is UNKNOWN_REPLY_TO.

`ReplyRegistry` is the state (tokens -> sinks) and the decisions; the sinks (the wire server's
connections) do the writing.
"""

from __future__ import annotations

import re
import secrets
from typing import Protocol

from logbroker.v1 import logbroker_pb2 as pb

REPLY_BYTES_MAX = 1 << 20  # key + value + headers of one reply
STREAMS_MAX = 100_000  # reply streams open on one broker
TOKEN_HEX_DIGITS = 32
REPLY_TO_CHARS_MAX = 64


class ReplySink(Protocol):
    def push(self, body: bytes) -> bool:
        """Send one pushed frame's body; False when the stream is closed or its client does not read."""
        ...

    def flush(self) -> None:
        """Write what `push` queued now (a sink may hold pushes to write several at once)."""
        ...


_REPLY_TO = re.compile(rf"([0-9]+):([0-9a-fA-F]{{{TOKEN_HEX_DIGITS}}})")


def parse_reply_to(reply_to: str) -> tuple[int, str] | None:
    """(broker_id, token) of a reply address, or None when it is not one."""
    if len(reply_to) > REPLY_TO_CHARS_MAX:
        return None
    m = _REPLY_TO.fullmatch(reply_to)
    return None if m is None else (int(m[1]), m[2])


def reply_bytes(req: pb.ReplyRequest) -> int:
    """The bytes of a reply counted against REPLY_BYTES_MAX: key, value, header names and values."""
    size = len(req.key) + len(req.value)
    if req.headers:
        size += sum(len(h.key) + len(h.value) for h in req.headers)
    return size


def check_reply(req: pb.ReplyRequest, bytes_max: int = REPLY_BYTES_MAX) -> pb.ReplyResponse | None:
    """The refusal of a reply that can go nowhere (malformed reply_to, too large); None if it may go."""
    return check_parsed(req, parse_reply_to(req.reply_to), bytes_max)


def check_parsed(req: pb.ReplyRequest, parsed: tuple[int, str] | None,
                 bytes_max: int = REPLY_BYTES_MAX) -> pb.ReplyResponse | None:
    """`check_reply` of a reply whose reply_to was parsed already (`parse_reply_to`)."""
    size = reply_bytes(req)
    if size > bytes_max:
        return pb.ReplyResponse(error_code=pb.REPLY_TOO_LARGE,
                                error_message=f"reply of {size} bytes is over the limit of {bytes_max}")
    if parsed is None:
        return unknown_reply_to(req.reply_to, "is not a reply address (<broker_id>:<token>)")
    return None


def unknown_reply_to(reply_to: str, why: str) -> pb.ReplyResponse:
    return pb.ReplyResponse(error_code=pb.UNKNOWN_REPLY_TO, error_message=f"reply_to {reply_to[:80]!r} {why}")


class ReplyRegistry:
    """The reply streams open on broker `broker_id`: token -> sink."""

    def __init__(self, broker_id: int, streams_max: int = STREAMS_MAX) -> None:
        self.broker_id = broker_id
        self.streams_max = streams_max
        self._sinks: dict[str, ReplySink] = {}
        self.delivered = 0  # replies pushed onto a stream
        self.dropped = 0  # replies for an open stream whose client did not read
        self.unknown = 0  # replies for a token not open here

    def __len__(self) -> int:
        return len(self._sinks)

    def open(self, sink: ReplySink) -> str | None:
        """Register a stream; its token, or None when streams_max are open."""
        if len(self._sinks) >= self.streams_max:
            return None
        token = secrets.token_hex(TOKEN_HEX_DIGITS // 2)
        self._sinks[token] = sink
        return token

    def address(self, token: str) -> str:
        return f"{self.broker_id}:{token}"

    def close(self, token: str) -> None:
        self._sinks.pop(token, None)

    def deliver(self, req: pb.ReplyRequest, parsed: tuple[int, str] | None = None,
                touched: set[ReplySink] | None = None) -> pb.ReplyResponse:
        """Push a reply addressed to this broker onto its stream (checked by check_reply first;
        `parsed`: its reply_to parsed already; `touched`: collects the sinks pushed to, for the
        caller to `flush` once it has delivered a batch)."""
        if parsed is None:
            parsed = parse_reply_to(req.reply_to)
        if parsed is None or parsed[0] != self.broker_id:
            return unknown_reply_to(req.reply_to, f"does not name broker {self.broker_id}")
        sink = self._sinks.get(parsed[1])
        if sink is None:
            self.unknown += 1
            return unknown_reply_to(req.reply_to, f"names no reply stream open on broker {self.broker_id}")
        if sink.push(req.SerializeToString()):
            self.delivered += 1
            if touched is not None:
                touched.add(sink)
        else:
            self.dropped += 1  # the client does not read: its reply is lost, as a timed-out one would be
        return pb.ReplyResponse()
