"""The Responder's reply batches (client/responder.py), with a fake consumer and sender: no socket.
The replies of one poll go in one ReplyBatch per broker named; a broker without ReplyBatch (an older
one: UNIMPLEMENTED) gets them again one Reply each, and the responder batches no more."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

import grpc

from logbroker.client.responder import Responder
from logbroker.client.transport import StreamError
from logbroker.v1 import logbroker_pb2 as pb


class Message:
    def __init__(self, offset: int, reply_to: str) -> None:
        self.topic, self.partition, self.offset, self.value = "q", 0, offset, b"v%d" % offset
        self._headers = {"reply_to": reply_to.encode(), "correlation_id": b"c%d" % offset}
        self.outcome = ""

    def header(self, name: str) -> bytes | None:
        return self._headers.get(name)

    def ack(self) -> None:
        self.outcome = "ack"

    def release(self) -> None:
        self.outcome = "release"

    def reject(self, reason: str = "") -> None:
        self.outcome = "reject"


class Sender:
    def __init__(self, has_batches: bool) -> None:
        self.has_batches = has_batches
        self.batches = True
        self.calls: list[list[str]] = []  # correlation ids per call

    def send_batch_async(self, replies: list[pb.ReplyRequest]) -> Future[Any]:
        self.calls.append([r.correlation_id for r in replies])
        fut: Future[Any] = Future()
        if self.has_batches:
            fut.set_result(pb.ReplyBatchResponse(results=[pb.ReplyResponse() for _ in replies]))
        else:
            fut.set_exception(StreamError(grpc.StatusCode.UNIMPLEMENTED, "unknown api 8"))
        return fut

    def send_async(self, reply: pb.ReplyRequest) -> Future[Any]:
        self.calls.append([reply.correlation_id])
        fut: Future[Any] = Future()
        fut.set_result(pb.ReplyResponse())
        return fut


class Consumer:
    def __init__(self, polls: list[list[Message]]) -> None:
        self.polls = polls

    def poll(self, timeout_ms: int) -> list[Message]:
        return self.polls.pop(0)


def responder(polls: list[list[Message]], sender: Sender) -> Responder:
    r = Responder.__new__(Responder)
    r._consumer, r._sender, r._handler = Consumer(polls), sender, lambda m: m.value  # type: ignore[assignment]
    r._inflight, r._inflight_cond, r.handled, r.failed, r.poll_timeout_ms = 0, threading.Condition(), 0, 0, 10
    return r


A, B = "0:" + "ab" * 16, "1:" + "cd" * 16


def test_the_replies_of_one_poll_go_in_one_batch_per_broker():
    polls = [[Message(0, A), Message(1, B), Message(2, A)], [Message(3, A)]]
    sender = Sender(has_batches=True)
    r = responder([list(p) for p in polls], sender)
    assert r.serve_once() == 3
    r._serve_pipelined()
    assert sender.calls == [["c0", "c2"], ["c1"], ["c3"]]
    assert r.handled == 4 and r._inflight == 0


def test_a_broker_without_reply_batch_gets_one_reply_each_from_then_on():
    first, second = [Message(0, A), Message(1, A)], [Message(2, A), Message(3, A)]
    sender = Sender(has_batches=False)
    r = responder([first, second], sender)
    assert r.serve_once() == 2 and sender.batches is False
    r._serve_pipelined()
    assert sender.calls == [["c0", "c1"], ["c0"], ["c1"], ["c2"], ["c3"]]
    assert [m.outcome for m in first + second] == ["ack"] * 4 and r.handled == 4 and r._inflight == 0
