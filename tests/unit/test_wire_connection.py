"""logbroker/client/wire_connection.py through the real BrokerStreams, against a scripted peer: a
loopback listener whose side of the connection the test reads and writes itself (frames built
with logbroker/wire.py), so every framing case can be played exactly."""

from __future__ import annotations

import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from logbroker import wire
from logbroker.client import wire_connection as wc
from logbroker.client.producer import is_retriable, rpc_error
from logbroker.client.streams import FETCH_STREAM, PRODUCE_STREAM, BrokerStreams, StreamError, StreamFuture
from logbroker.client.wire_connection import WireConnection
from logbroker.v1 import logbroker_pb2 as pb

pytestmark = pytest.mark.timeout(60)

ADDRESS = "broker-0:9092"  # the gRPC address the clients know the broker by; never dialled here


class Peer:
    """The broker's side: a listener on 127.0.0.1; each accepted socket is driven by the test."""

    def __init__(self, rcvbuf_bytes: int | None = None) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf_bytes is not None:  # inherited by accepted sockets
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.address: tuple[str, int] = self.listener.getsockname()[:2]
        self.accepted: list[socket.socket] = []

    def accept(self, timeout_s: float = 10.0) -> socket.socket:
        self.listener.settimeout(timeout_s)
        sock, _ = self.listener.accept()
        sock.settimeout(timeout_s)
        self.accepted.append(sock)
        return sock

    def nothing_to_accept(self) -> bool:
        return not select.select([self.listener], [], [], 0)[0]

    def close(self) -> None:
        for sock in self.accepted:
            sock.close()
        self.listener.close()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        assert chunk, "the client closed the connection"
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_request(sock: socket.socket) -> tuple[int, int, bytes]:
    size, api, corr = wire.REQUEST_HEADER.unpack(recv_exact(sock, wire.HEADER_BYTES))
    return api, corr, recv_exact(sock, size - wire.SIZE_MIN)


def ok_frame(corr: int, body: bytes) -> bytes:
    return wire.response_header(corr, wire.STATUS_OK, len(body)) + body


def produce_response(partition: int, base: int) -> bytes:
    return pb.ProduceResponse(results=[pb.ProducePartitionResult(topic="t", partition=partition,
                                                                 base_offset=base)]).SerializeToString()


def fetch_response(partition: int, records_bytes: int) -> bytes:
    records = bytes(i % 251 for i in range(records_bytes))
    return pb.FetchResponse(results=[pb.FetchPartitionResult(topic="t", partition=partition,
                                                             records=records)]).SerializeToString()


def req(i: int, records: bytes = b"") -> pb.ProduceRequest:
    return pb.ProduceRequest(acks=1, partitions=[pb.ProducePartition(topic="t", partition=i, records=records)])


def fetch_req(i: int) -> pb.FetchRequest:
    return pb.FetchRequest(partitions=[pb.FetchPartition(topic="t", partition=i)])


def no_grpc(*_args: Any) -> Any:
    raise AssertionError("fell back to gRPC: the record transport was not used")


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    p.close()


@pytest.fixture
def make_streams(peer: Peer) -> Iterator[Callable[..., BrokerStreams]]:
    made: list[BrokerStreams] = []

    def make(inline: bool = False, target: Peer | None = None) -> BrokerStreams:
        address = (target or peer).address
        s = BrokerStreams(no_grpc, no_grpc, lambda _a: address, inline=inline)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def send(streams: BrokerStreams, i: int, timeout_s: float = 10.0, records: bytes = b"") -> StreamFuture:
    fut: StreamFuture = streams.send(PRODUCE_STREAM, pb.ProduceResponse, ADDRESS, req(i, records), timeout_s)
    return fut


def connection(streams: BrokerStreams, method: str = PRODUCE_STREAM) -> WireConnection:
    conn = streams._streams.get((method, ADDRESS, 0))
    assert isinstance(conn, WireConnection), conn
    return conn


def error_of(fut: StreamFuture, timeout_s: float = 10.0) -> StreamError:
    with pytest.raises(StreamError) as info:
        fut.result(timeout_s)
    return info.value


def wire_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("logbroker-wire-") and t.is_alive()]


# -- in-order responses ---------------------------------------------------------------------------


def test_requests_are_framed_in_order_and_responses_complete_their_futures_in_order(peer, make_streams):
    streams = make_streams()
    futs = [send(streams, i) for i in range(50)]
    sock = peer.accept()
    for i in range(50):
        api, corr, body = read_request(sock)
        assert (api, corr) == (wire.API_PRODUCE, i)  # the client numbers its requests from 0
        assert pb.ProduceRequest.FromString(body) == req(i)
        sock.sendall(ok_frame(corr, produce_response(i, 100 + i)))
    results = [f.result(10) for f in futs]
    assert [(r.results[0].partition, r.results[0].base_offset) for r in results] == [(i, 100 + i) for i in range(50)]
    # later requests go on the same connection
    fut = send(streams, 99)
    api, corr, _ = read_request(sock)
    assert corr == 50
    sock.sendall(ok_frame(corr, produce_response(99, 7)))
    assert fut.result(10).results[0].base_offset == 7
    assert peer.nothing_to_accept()  # one connection carried them all


def test_fetch_requests_use_the_fetch_api_number(peer, make_streams):
    streams = make_streams()
    fut = streams.send(FETCH_STREAM, pb.FetchResponse, ADDRESS, fetch_req(3), 10)
    sock = peer.accept()
    api, corr, body = read_request(sock)
    assert (api, corr) == (wire.API_FETCH, 0) and pb.FetchRequest.FromString(body) == fetch_req(3)
    sock.sendall(ok_frame(corr, fetch_response(3, 10)))
    assert fut.result(10).results[0].records == bytes(range(10))


def test_a_status_frame_fails_only_its_own_request_and_the_connection_goes_on(peer, make_streams):
    streams = make_streams()
    futs = [send(streams, i) for i in range(3)]
    sock = peer.accept()
    corrs = [read_request(sock)[1] for _ in range(3)]
    sock.sendall(ok_frame(corrs[0], produce_response(0, 0))
                 + wire.error_frame(corrs[1], grpc.StatusCode.RESOURCE_EXHAUSTED, "request 1 too large é")
                 + ok_frame(corrs[2], produce_response(2, 2)))
    assert futs[0].result(10).results[0].partition == 0
    err = error_of(futs[1])
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and err.details() == "request 1 too large é"
    assert not is_retriable(rpc_error(err))
    assert futs[2].result(10).results[0].partition == 2
    conn = connection(streams)
    assert not conn.closed
    fut = send(streams, 3)
    assert connection(streams) is conn
    sock.sendall(ok_frame(read_request(sock)[1], produce_response(3, 3)))
    assert fut.result(10).results[0].partition == 3
    # a status number gRPC does not have is UNKNOWN, still only for its request
    fut = send(streams, 4)
    sock.sendall(wire.response_header(read_request(sock)[1], 200, 2) + b"??")
    assert error_of(fut).code() == grpc.StatusCode.UNKNOWN
    assert not conn.closed and peer.nothing_to_accept()


def test_a_response_that_does_not_parse_fails_its_request_only(peer, make_streams):
    streams = make_streams()
    futs = [send(streams, i) for i in range(2)]
    sock = peer.accept()
    corrs = [read_request(sock)[1] for _ in range(2)]
    sock.sendall(ok_frame(corrs[0], b"\x0a\xff\xff\xff\xff\x0f") + ok_frame(corrs[1], produce_response(1, 1)))
    assert error_of(futs[0]).code() == grpc.StatusCode.INTERNAL
    assert futs[1].result(10).results[0].partition == 1


# -- a broken connection fails every pending request ----------------------------------------------


def test_a_correlation_id_that_is_not_the_oldest_pending_fails_everything_and_drops_the_connection(peer, make_streams):
    streams = make_streams()
    futs = [send(streams, i) for i in range(3)]
    sock = peer.accept()
    corrs = [read_request(sock)[1] for _ in range(3)]
    conn = connection(streams)
    sock.sendall(ok_frame(corrs[1], produce_response(1, 1)))  # answers the second first
    for f in futs:
        err = error_of(f)
        assert err.code() == grpc.StatusCode.INTERNAL and "correlation id" in err.details()
    assert conn.closed
    assert (PRODUCE_STREAM, ADDRESS, 0) not in streams._streams  # forgotten
    assert sock.recv(1) == b""  # the client closed its socket
    # the next request opens a new connection, numbered from 0 again
    fut = send(streams, 5)
    sock2 = peer.accept()
    assert read_request(sock2)[1] == 0
    assert connection(streams) is not conn
    sock2.sendall(ok_frame(0, produce_response(5, 5)))
    assert fut.result(10).results[0].partition == 5


def test_a_response_with_nothing_pending_fails_the_connection(peer, make_streams):
    streams = make_streams()
    fut = send(streams, 0)
    sock = peer.accept()
    corr = read_request(sock)[1]
    sock.sendall(ok_frame(corr, produce_response(0, 0)))
    assert fut.result(10).results[0].partition == 0
    conn = connection(streams)
    sock.sendall(ok_frame(corr + 1, produce_response(1, 1)))  # nothing asked
    assert sock.recv(1) == b""  # the client closed the connection
    assert conn.closed and (PRODUCE_STREAM, ADDRESS, 0) not in streams._streams


@pytest.mark.parametrize("size", [0, wire.SIZE_MIN - 1, wire.SIZE_MIN + wc.RESPONSE_BYTES_MAX + 1, 0xFFFFFFFF])
def test_a_response_frame_size_out_of_bounds_fails_every_pending_request(peer, make_streams, size: int):
    streams = make_streams()
    futs = [send(streams, i) for i in range(2)]
    sock = peer.accept()
    corrs = [read_request(sock)[1] for _ in range(2)]
    conn = connection(streams)
    sock.sendall(struct.pack(">IIB", size, corrs[0], 0) + b"\0" * 16)
    for f in futs:
        err = error_of(f)
        assert err.code() == grpc.StatusCode.INTERNAL and f"size {size}" in err.details()
    assert conn.closed and (PRODUCE_STREAM, ADDRESS, 0) not in streams._streams


@pytest.mark.parametrize("inline", [False, True])
def test_eof_fails_the_pending_requests_retriably(peer, make_streams, inline: bool):
    streams = make_streams(inline=inline)
    futs = [send(streams, i) for i in range(3)]
    sock = peer.accept()
    conn = connection(streams)
    corrs = [read_request(sock)[1] for _ in range(3)]
    sock.sendall(ok_frame(corrs[0], produce_response(0, 0)) + ok_frame(corrs[1], produce_response(1, 1))[:7])
    sock.shutdown(socket.SHUT_WR)  # EOF after one response and part of the next
    if inline:
        deadline = time.monotonic() + 10
        while not conn.closed and time.monotonic() < deadline:
            conn.pump(0.5)
    assert futs[0].result(10).results[0].partition == 0
    for f in futs[1:]:
        err = error_of(f)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        assert is_retriable(rpc_error(err))
    assert conn.closed and (PRODUCE_STREAM, ADDRESS, 0) not in streams._streams
    assert conn.fileno() == -1 or not inline


def test_a_connection_reset_fails_the_pending_requests_retriably(peer, make_streams):
    streams = make_streams()
    fut = send(streams, 0)
    sock = peer.accept()
    read_request(sock)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    err = error_of(fut)
    assert err.code() == grpc.StatusCode.UNAVAILABLE and is_retriable(rpc_error(err))


def test_an_unreachable_data_port_falls_back_to_grpc_streams_for_a_while(peer):
    port = peer.address[1]
    peer.close()  # nothing listens there any more
    channels: list[str] = []

    def channel_for(address: str) -> Any:
        channels.append(address)
        raise RuntimeError("no gRPC in this test")

    streams = BrokerStreams(channel_for, no_grpc, lambda _a: ("127.0.0.1", port))
    try:
        for _ in range(2):
            fut = send(streams, 0)
            assert error_of(fut).code() == grpc.StatusCode.UNAVAILABLE
        assert channels == [ADDRESS, ADDRESS]  # the first refused connect and the next send: gRPC
        assert ("127.0.0.1", port) in streams._wire_refused
    finally:
        streams.close()


# -- reading: sizes and splits --------------------------------------------------------------------


@pytest.mark.parametrize("inline", [False, True])
def test_a_response_bigger_than_the_read_buffer_split_across_many_small_writes(peer, make_streams, inline: bool):
    streams = make_streams(inline=inline)
    fut = streams.send(FETCH_STREAM, pb.FetchResponse, ADDRESS, fetch_req(0), 30)
    fut2 = streams.send(FETCH_STREAM, pb.FetchResponse, ADDRESS, fetch_req(1), 30)
    sock = peer.accept()
    corrs = [read_request(sock)[1] for _ in range(2)]
    body = fetch_response(0, 3 * wc.READ_BUFFER_BYTES + 123)
    assert len(body) > wc.READ_BUFFER_BYTES
    data = ok_frame(corrs[0], body) + ok_frame(corrs[1], fetch_response(1, 5))
    conn = connection(streams, FETCH_STREAM)

    def write() -> None:
        for i in range(wire.HEADER_BYTES):  # the header a byte at a time
            sock.sendall(data[i : i + 1])
        step = 4093
        for i in range(wire.HEADER_BYTES, len(data), step):
            sock.sendall(data[i : i + step])

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    if inline:
        deadline = time.monotonic() + 30
        while not fut2.done() and time.monotonic() < deadline:
            conn.pump(0.5)
    got = fut.result(30)
    assert got.SerializeToString() == body
    assert fut2.result(30).results[0].records == bytes(range(5))
    writer.join(10)
    assert not conn.closed


@pytest.mark.parametrize("inline", [False, True])
def test_several_responses_in_one_write_of_mixed_sizes(peer, make_streams, inline: bool):
    """Small ones parsed in place, one that runs past the read buffer's end after others (copied
    out with what was already read), empty bodies, and a partial header left at the buffer's end."""
    sizes = [0, 10, 100 << 10, 200 << 10, 5, 300 << 10, 1, (256 << 10) - 40, 3, 0]
    streams = make_streams(inline=inline)
    futs = [streams.send(FETCH_STREAM, pb.FetchResponse, ADDRESS, fetch_req(i), 30) for i in range(len(sizes))]
    sock = peer.accept()
    corrs = [read_request(sock)[1] for _ in sizes]
    bodies = [fetch_response(i, n) if n else b"" for i, n in enumerate(sizes)]
    conn = connection(streams, FETCH_STREAM)
    sock.sendall(b"".join(ok_frame(c, b) for c, b in zip(corrs, bodies, strict=True)))
    if inline:
        deadline = time.monotonic() + 30
        while not futs[-1].done() and time.monotonic() < deadline:
            conn.pump(0.5)
    for f, b in zip(futs, bodies, strict=True):
        assert f.result(30).SerializeToString() == b
    assert not conn.closed


# -- inline mode ------------------------------------------------------------------------------------


def test_inline_mode_has_no_reader_thread_and_pump_completes_in_the_callers_thread(peer, make_streams):
    before = set(wire_threads())
    streams = make_streams(inline=True)
    futs = [send(streams, i) for i in range(3)]
    conn = connection(streams)
    assert conn.inline and set(wire_threads()) == before  # no reader thread was started
    assert all(f.connection is conn for f in futs)  # the poller knows whom to pump
    sock = peer.accept()
    corrs = [read_request(sock)[1] for _ in range(3)]
    t0 = time.monotonic()
    conn.pump(0.05)  # nothing arrived: returns after its wait
    assert 0.04 <= time.monotonic() - t0 < 5 and not any(f.done() for f in futs)
    completed_in: list[str] = []
    futs[0].add_done_callback(lambda _f: completed_in.append(threading.current_thread().name))
    sock.sendall(b"".join(ok_frame(c, produce_response(i, i)) for i, c in enumerate(corrs[:2])))
    assert select.select([conn], [], [], 10)[0] == [conn]  # readable (fileno() serves select)
    assert not futs[0].done()  # nobody reads but pump()
    conn.pump(5)
    assert futs[0].done() and futs[1].done() and not futs[2].done()
    assert completed_in == [threading.current_thread().name]
    sock.sendall(ok_frame(corrs[2], produce_response(2, 2)))
    conn.pump(5)
    assert [f.result(0).results[0].partition for f in futs] == [0, 1, 2]


def test_inline_send_on_a_connection_the_peer_reset_fails_instead_of_hanging(peer, make_streams):
    """The write fails in send() (no reader noticed the reset): fail() must not deadlock on the
    write lock send() holds."""
    streams = make_streams(inline=True)
    first = send(streams, 0)
    sock = peer.accept()
    corr = read_request(sock)[1]
    sock.sendall(ok_frame(corr, produce_response(0, 0)))
    conn = connection(streams)
    conn.pump(5)
    assert first.result(0).results[0].partition == 0
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST, which nobody reads (inline, no pump())
    assert select.select([conn], [], [], 10)[0] == [conn]
    outcome: list[StreamFuture] = []
    sender = threading.Thread(target=lambda: outcome.append(send(streams, 1)), daemon=True)
    sender.start()
    sender.join(10)
    assert not sender.is_alive(), "send() hung on a reset connection"
    err = error_of(outcome[0])
    assert err.code() == grpc.StatusCode.UNAVAILABLE and is_retriable(rpc_error(err))
    assert conn.closed and conn.fileno() == -1


# -- deadlines: the watchdog ----------------------------------------------------------------------


@pytest.mark.parametrize("inline", [False, True])
def test_a_request_the_peer_never_answers_fails_with_deadline_exceeded_in_time(peer, make_streams, inline: bool):
    streams = make_streams(inline=inline)
    t0 = time.monotonic()
    hung = send(streams, 0, timeout_s=1.0)
    conn = connection(streams)
    behind = send(streams, 1, timeout_s=30)
    sock = peer.accept()
    read_request(sock)
    read_request(sock)  # read, never answered
    for f in (hung, behind):  # nobody pumps in inline mode either: the watchdog alone ends them
        err = error_of(f)
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert is_retriable(rpc_error(err))
    assert time.monotonic() - t0 < 5
    assert conn.closed and (PRODUCE_STREAM, ADDRESS, 0) not in streams._streams
    assert sock.recv(1) == b""  # the connection was shut down
    # a new connection for the next request
    again = send(streams, 2)
    sock2 = peer.accept()
    sock2.sendall(ok_frame(read_request(sock2)[1], produce_response(2, 2)))
    if inline:
        connection(streams).pump(10)
    assert again.result(10).results[0].partition == 2


@pytest.mark.parametrize("inline", [False, True])
def test_a_writer_blocked_on_a_peer_that_never_reads_is_woken_by_the_deadline(make_streams, inline: bool):
    slow = Peer(rcvbuf_bytes=64 << 10)
    try:
        streams = make_streams(inline=inline, target=slow)
        first = send(streams, 0, timeout_s=30)  # opens the connection
        sock = slow.accept()
        sock.sendall(ok_frame(read_request(sock)[1], produce_response(0, 0)))  # and never reads again
        if inline:
            connection(streams).pump(10)
        assert first.result(10).results[0].partition == 0
        outcome: list[StreamFuture] = []
        t0 = time.monotonic()
        writer = threading.Thread(target=lambda: outcome.append(send(streams, 1, 0.5, b"\0" * (32 << 20))),
                                  daemon=True)
        writer.start()
        writer.join(15)
        assert not writer.is_alive(), "the writer stayed blocked in sendall()"
        assert time.monotonic() - t0 < 10
        err = error_of(outcome[0])
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert (PRODUCE_STREAM, ADDRESS, 0) not in streams._streams
    finally:
        slow.close()


def test_a_request_over_the_client_limit_fails_without_being_written(peer, make_streams, monkeypatch):
    monkeypatch.setattr(wc, "REQUEST_BYTES_MAX", 1000)
    streams = make_streams()
    fut = send(streams, 0, records=b"x" * 2000)
    err = error_of(fut)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    ok = send(streams, 1)
    sock = peer.accept()
    api, corr, body = read_request(sock)  # the refused one never reached the socket
    assert pb.ProduceRequest.FromString(body) == req(1)
    sock.sendall(ok_frame(corr, produce_response(1, 1)))
    assert ok.result(10).results[0].partition == 1


# -- falling back to gRPC streams and back -----------------------------------------------------------


def test_a_fallback_grpc_stream_gives_way_to_the_record_transport_once_a_new_data_port_answers(peer):
    """A broker restarted on another data port (the default: one the OS picks): the refused old port
    does not keep its requests on gRPC; the idle fallback stream is replaced by a connection."""
    from tests.unit.test_client_streams import Server, _response

    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for n, raw in enumerate(requests):
            yield _response(pb.ProduceRequest.FromString(raw), 1000 + n).SerializeToString()

    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        old_port = s.getsockname()[1]  # closed again: connections to it are refused
    target = [("127.0.0.1", old_port)]
    streams = BrokerStreams(lambda _a: srv.channel, no_grpc, lambda _a: target[0])
    try:
        assert send(streams, 0).result(10).results[0].base_offset == 1000  # over gRPC
        fallback = streams._streams[(PRODUCE_STREAM, ADDRESS, 0)]
        assert not isinstance(fallback, WireConnection) and fallback.wire_fallback
        assert send(streams, 1).result(10).results[0].base_offset == 1001  # the old port stays refused
        assert streams._streams[(PRODUCE_STREAM, ADDRESS, 0)] is fallback
        target[0] = peer.address  # metadata now advertises the new port
        fut = send(streams, 2)
        sock = peer.accept()
        corr = read_request(sock)[1]
        sock.sendall(ok_frame(corr, produce_response(2, 7)))
        assert fut.result(10).results[0].base_offset == 7
        assert connection(streams) is not fallback and fallback.closed
    finally:
        streams.close()
        srv.close()


def test_a_grpc_stream_to_a_broker_without_a_data_port_is_not_a_fallback():
    from tests.unit.test_client_streams import Server, _response

    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for raw in requests:
            yield _response(pb.ProduceRequest.FromString(raw), 1).SerializeToString()

    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    streams = BrokerStreams(lambda _a: srv.channel, no_grpc, lambda _a: None)
    try:
        assert send(streams, 0).result(10).results[0].base_offset == 1
        s = streams._streams[(PRODUCE_STREAM, ADDRESS, 0)]
        assert not isinstance(s, WireConnection) and not s.wire_fallback
    finally:
        streams.close()
        srv.close()


def test_inline_pump_stalled_inside_a_frame_fails_at_the_request_deadline(peer, make_streams):
    """The broker stops half-way through an answer: the watchdog must not take the bytes already read
    for an unread answer and push the deadline on (that would hang the polling thread for good)."""
    streams = make_streams(inline=True)
    fut = streams.send(FETCH_STREAM, pb.FetchResponse, ADDRESS, fetch_req(0), 0.5)
    sock = peer.accept()
    _, corr, _ = read_request(sock)
    body = fetch_response(0, 1000)
    sock.sendall(wire.response_header(corr, wire.STATUS_OK, len(body)) + body[:10])  # then nothing
    conn = fut.connection
    assert isinstance(conn, WireConnection) and conn.inline
    t0 = time.monotonic()
    done = threading.Event()
    threading.Thread(target=lambda: (conn.pump(5.0), done.set()), daemon=True).start()
    assert done.wait(5), "pump() stayed stuck inside the frame past the request deadline"
    assert time.monotonic() - t0 < 3
    with pytest.raises(grpc.RpcError) as info:
        fut.result(timeout=1)
    assert info.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)


def test_readiness_works_above_descriptor_1023(peer, make_streams):
    """poll(2), not select(2): a process with many files open still reads its inline connections."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low to open 1100 descriptors")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(2048, hard) if hard != resource.RLIM_INFINITY else 2048, hard))
    spare = [socket.socket() for _ in range(1100)]
    try:
        streams = make_streams(inline=True)
        fut = streams.send(FETCH_STREAM, pb.FetchResponse, ADDRESS, fetch_req(0), 10)
        conn = fut.connection
        assert conn.fileno() > 1023
        sock = peer.accept()
        _, corr, _ = read_request(sock)
        sock.sendall(ok_frame(corr, fetch_response(0, 10)))
        from logbroker.client.waker import Waker

        waker = Waker()
        try:
            assert waker.wait(5, [conn]) == [conn]
        finally:
            waker.close()
        conn.pump(0)
        assert len(fut.result(timeout=1).results[0].records) == 10
    finally:
        for s in spare:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
