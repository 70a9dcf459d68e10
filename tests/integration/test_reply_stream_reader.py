"""The requester's reply stream reader (client/reply_stream.py) against a scripted broker socket on
127.0.0.1: a burst of replies is cut from one read and handed over in one call, in order; a frame
bigger than the read buffer grows it; a frame out of bounds ends the stream with a reason."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from logbroker import wire
from logbroker.client import reply_stream
from logbroker.client.reply_stream import ReplyStream
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)


def frame(body: bytes, status: int = wire.STATUS_OK) -> bytes:
    return wire.response_header(0, status, len(body)) + body


def reply(corr: str, value: bytes = b"v") -> bytes:
    return pb.ReplyRequest(reply_to="0:" + "ab" * 16, correlation_id=corr, value=value).SerializeToString()


@pytest.fixture
def broker_socket() -> Iterator[tuple[tuple[str, int], list[socket.socket]]]:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        conn, _ = listener.accept()
        conn.recv(wire.HEADER_BYTES)  # the API_REPLY_STREAM request
        accepted.append(conn)

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield listener.getsockname()[:2], accepted
    listener.close()
    for c in accepted:
        c.close()


def test_a_burst_of_replies_comes_in_one_call_in_order_and_a_big_frame_grows_the_buffer(broker_socket):
    target, accepted = broker_socket
    calls: list[list[str]] = []
    closed: list[str] = []
    def handshake() -> None:
        wait_for(lambda: bool(accepted), 10, "the reply stream's connection")
        accepted[0].sendall(frame(pb.ReplyRequest(reply_to="0:" + "cd" * 16).SerializeToString()))

    thread = threading.Thread(target=handshake)
    thread.start()
    stream = ReplyStream(target, lambda rs: calls.append([r.correlation_id for r in rs]),
                         lambda s, why: closed.append(why), 5.0)
    thread.join()
    assert stream.reply_to == "0:" + "cd" * 16
    big = reply("big", b"x" * (reply_stream.READ_BUFFER_BYTES + 1000))
    accepted[0].sendall(frame(reply("a")) + frame(reply("b")) + frame(reply("c")))
    wait_for(lambda: sum(len(c) for c in calls) == 3, 10, "three replies")
    accepted[0].sendall(frame(big) + frame(reply("d")))
    wait_for(lambda: sum(len(c) for c in calls) == 5, 10, "five replies")
    assert [corr for c in calls for corr in c] == ["a", "b", "c", "big", "d"]
    assert calls[0] == ["a", "b", "c"]  # one read, one call
    accepted[0].sendall(wire.RESPONSE_HEADER.pack(wire.SIZE_MIN + reply_stream.FRAME_BYTES_MAX + 1, 0, 0))
    wait_for(lambda: bool(closed), 10, "the stream's end")
    assert "frame of size" in closed[0] and stream.closed
    stream.close()
