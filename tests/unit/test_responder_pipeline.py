"""Responder.run() pipelining (client/responder.py): the next poll goes out once a poll's replies
are sent, before their answers; each request is acknowledged only once its reply is answered."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any

from logbroker.client.requester import CORRELATION_ID_HEADER, REPLY_TO_HEADER
from logbroker.client.responder import Responder
from logbroker.v1 import logbroker_pb2 as pb
from tests.unit.test_queue_client import ShareMetadata


class FakeRequest:
    topic, partition = "t", 0

    def __init__(self, offset: int) -> None:
        self.offset = offset
        self.settled: str | None = None

    def header(self, name: str) -> bytes | None:
        return {REPLY_TO_HEADER: b"0:token", CORRELATION_ID_HEADER: b"c%d" % self.offset}.get(name)

    def ack(self) -> None:
        self.settled = "ack"

    def release(self) -> None:
        self.settled = "release"

    def reject(self, reason: str = "") -> None:
        self.settled = "reject"


class FakeSender:
    batches = False  # one Reply per request (the batches' own test: test_responder_batches.py)

    def __init__(self) -> None:
        self.sent: list[tuple[pb.ReplyRequest, Future[Any]]] = []

    def send_async(self, req: pb.ReplyRequest) -> Future[Any]:
        fut: Future[Any] = Future()
        self.sent.append((req, fut))
        return fut

    def close(self) -> None:
        pass


class ScriptedConsumer:
    """Poll 1 hands out two requests; poll 2 records what was settled by then, answers the replies
    and stops the responder."""

    def __init__(self, responder: Responder, sender: FakeSender) -> None:
        self.responder, self.sender = responder, sender
        self.requests = [FakeRequest(0), FakeRequest(1)]
        self.settled_at_second_poll: list[str | None] | None = None
        self.polls = 0

    def poll(self, timeout_ms: int) -> list[FakeRequest]:
        self.polls += 1
        if self.polls == 1:
            return list(self.requests)
        self.settled_at_second_poll = [r.settled for r in self.requests]
        for _, fut in self.sender.sent:  # the broker's answers come now (on another thread)
            threading.Thread(target=fut.set_result, args=(pb.ReplyResponse(),)).start()
        self.responder._stop.set()
        return []

    def close(self) -> None:
        pass


def test_run_polls_again_before_the_replies_are_answered_and_acks_once_they_are() -> None:
    md = ShareMetadata()
    r = Responder(md, "t", "g", lambda m: b"re-" + str(m.offset).encode())
    sender = FakeSender()
    r._sender = sender  # type: ignore[assignment]
    fake = ScriptedConsumer(r, sender)
    r._consumer = fake  # type: ignore[assignment]
    timer = threading.Timer(5.0, lambda: [f.set_result(pb.ReplyResponse()) for _, f in sender.sent if not f.done()])
    timer.start()  # a Responder that waits for the answers before polling again gets them here, late
    try:
        r.run()
    finally:
        timer.cancel()
    assert [q.value for q, _ in sender.sent] == [b"re-0", b"re-1"]
    assert fake.settled_at_second_poll == [None, None]  # polled again with both replies unanswered
    assert [q.settled for q in fake.requests] == ["ack", "ack"]  # run() waited for the answers, then acked
    assert (r.handled, r.failed) == (2, 0)
