"""The record transport (logbroker/wire.py) against real broker processes: raw frames on a socket,
then through the Producer and Consumer."""

from __future__ import annotations

import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from logbroker import Admin, Consumer, Producer, wire
from logbroker.client.streams import _Stream
from logbroker.client.wire_connection import WireConnection
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import BrokerProcess, free_port, wait_for
from tests.integration.test_streams import fetch_req, high_watermark, produce_req, values_of

pytestmark = pytest.mark.timeout(120)

GARBAGE = b"\x1a\xff\xff\xff\xff\x0f"  # field 3, a length far past the end


def metadata(address: str) -> pb.MetadataResponse:
    with grpc.insecure_channel(address) as ch:
        resp: pb.MetadataResponse = pbg.BrokerStub(ch).Metadata(pb.MetadataRequest(), timeout=10)
    return resp


def data_port(broker: BrokerProcess) -> int:
    (info,) = metadata(broker.address).brokers
    return int(info.data_port)


@pytest.fixture
def connect(broker: BrokerProcess) -> Iterator[Callable[[], socket.socket]]:
    opened: list[socket.socket] = []

    def make() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", data_port(broker)), timeout=10)
        sock.settimeout(20)  # every read in these tests is bounded
        opened.append(sock)
        return sock

    yield make
    for sock in opened:
        sock.close()


def frame(api: int, corr: int, body: bytes) -> bytes:
    return wire.request_header(api, corr, len(body)) + body


def produce_frame(corr: int, topic: str, *values: bytes) -> bytes:
    return frame(wire.API_PRODUCE, corr, produce_req(topic, 0, *values).SerializeToString())


def fetch_frame(corr: int, topic: str, offset: int) -> bytes:
    return frame(wire.API_FETCH, corr, fetch_req(topic, 0, offset).SerializeToString())


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed with {n} bytes still expected")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> tuple[int, int, bytes]:
    size, corr, status = wire.RESPONSE_HEADER.unpack(recv_exact(sock, wire.HEADER_BYTES))
    return corr, status, recv_exact(sock, size - wire.SIZE_MIN)


def closed_by_peer(sock: socket.socket) -> bool:
    """True once the broker closed the connection (EOF or reset), within the socket's timeout."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def create_topic(broker: BrokerProcess, name: str) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic(name, partitions=1)


# -- raw frames -------------------------------------------------------------------------------------


def test_raw_produce_then_fetch_round_trip(broker, connect):
    create_topic(broker, "rt")
    assert data_port(broker) > 0
    sock = connect()
    sock.sendall(produce_frame(7, "rt", b"a", b"b"))
    corr, status, body = read_response(sock)
    assert (corr, status) == (7, wire.STATUS_OK)
    (r,) = pb.ProduceResponse.FromString(body).results
    assert (r.topic, r.error_code, r.base_offset) == ("rt", pb.NONE, 0)
    sock.sendall(fetch_frame(0xFFFFFFFF, "rt", 0))
    corr, status, body = read_response(sock)
    assert (corr, status) == (0xFFFFFFFF, wire.STATUS_OK)
    (f,) = pb.FetchResponse.FromString(body).results
    assert f.error_code == pb.NONE and f.high_watermark == 2
    assert values_of(f.records) == [b"a", b"b"]
    assert high_watermark(broker.address, "rt") == 2  # what gRPC sees too


def test_pipelined_requests_in_one_write_are_answered_in_order_with_their_corr_ids(broker, connect):
    create_topic(broker, "pipe")
    sock = connect()
    corrs = [1000 + 37 * i for i in range(40)]  # any numbers: the broker echoes them
    frames = []
    for i, corr in enumerate(corrs):
        frames.append(fetch_frame(corr, "pipe", 0) if i % 5 == 4 else produce_frame(corr, "pipe", b"p%d" % i))
    sock.sendall(b"".join(frames))  # more than the broker's pipeline of 8
    next_offset = 0
    for i, corr in enumerate(corrs):
        got_corr, status, body = read_response(sock)
        assert (got_corr, status) == (corr, wire.STATUS_OK), i
        if i % 5 == 4:
            (f,) = pb.FetchResponse.FromString(body).results
            assert f.high_watermark == next_offset  # it saw exactly the produces before it
        else:
            (r,) = pb.ProduceResponse.FromString(body).results
            assert r.error_code == pb.NONE and r.base_offset == next_offset, (i, r)
            next_offset += 1
    assert high_watermark(broker.address, "pipe") == next_offset == 32


def test_after_eof_no_further_frame_starts_those_started_are_answered_in_order_then_closed(broker, connect):
    """A client half-closes only once it has given up on its requests (and may send them elsewhere):
    after the EOF the broker starts none of the frames it had not started. What comes back is an
    in-order prefix of the requests (each OK or its refusal), a notice that the rest did not run,
    then the close; and nothing ran that was not answered."""
    create_topic(broker, "pipe-eof")
    create_topic(broker, "pipe-eof-empty")
    sock = connect()
    # A long poll on an empty topic at the head holds the pipeline full while the EOF arrives.
    long_poll = frame(wire.API_FETCH, 500, fetch_req("pipe-eof-empty", 0, 0, max_wait_ms=500).SerializeToString())
    frames = [long_poll] + [frame(99, 500 + i, b"") if i == 5 else produce_frame(500 + i, "pipe-eof", b"e%d" % i)
                            for i in range(1, 30)]
    sock.sendall(b"".join(frames))
    sock.shutdown(socket.SHUT_WR)
    answered: list[int] = []
    produced = 0
    notice = None
    while True:
        try:
            corr, status, body = read_response(sock)
        except EOFError:
            break
        if corr == 0:  # the last frame: the requests not started did not run
            notice = (wire.status_code(status), body.decode())
            break
        i = len(answered)
        assert corr == 500 + i, answered  # in order, none skipped
        if i == 5:
            assert wire.status_code(status) == grpc.StatusCode.UNIMPLEMENTED
        else:
            assert status == wire.STATUS_OK, (i, body)
            produced += i > 0
        answered.append(corr)
    assert closed_by_peer(sock)
    # The long poll keeps the first 8 (the pipeline) unanswered for 500 ms: the EOF is read long
    # before the rest could start.
    assert len(answered) < 30, "frames read before the EOF but not started must not run"
    assert notice is not None and notice[0] == grpc.StatusCode.INVALID_ARGUMENT, notice
    assert "none of them was run" in notice[1]
    # The socket stays writable after the client's half-close, so every request that ran was answered.
    assert high_watermark(broker.address, "pipe-eof") == produced


def test_a_malformed_body_gets_invalid_argument_and_the_connection_goes_on(broker, connect):
    create_topic(broker, "mal")
    sock = connect()
    sock.sendall(frame(wire.API_PRODUCE, 5, GARBAGE) + produce_frame(6, "mal", b"ok")
                 + frame(wire.API_FETCH, 7, GARBAGE))
    corr, status, body = read_response(sock)
    assert (corr, wire.status_code(status)) == (5, grpc.StatusCode.INVALID_ARGUMENT)
    assert "malformed ProduceRequest" in body.decode()
    corr, status, body = read_response(sock)
    assert (corr, status) == (6, wire.STATUS_OK)
    assert pb.ProduceResponse.FromString(body).results[0].base_offset == 0
    corr, status, body = read_response(sock)
    assert (corr, wire.status_code(status)) == (7, grpc.StatusCode.INVALID_ARGUMENT)
    assert "malformed FetchRequest" in body.decode()
    sock.sendall(fetch_frame(8, "mal", 0))
    corr, status, body = read_response(sock)
    assert (corr, status) == (8, wire.STATUS_OK)
    assert values_of(pb.FetchResponse.FromString(body).results[0].records) == [b"ok"]
    assert high_watermark(broker.address, "mal") == 1


def test_an_unknown_api_gets_unimplemented_and_the_connection_goes_on(broker, connect):
    create_topic(broker, "api")
    sock = connect()
    sock.sendall(frame(200, 11, b"whatever") + frame(0, 12, b"") + fetch_frame(13, "api", 0))
    for corr in (11, 12):
        got, status, body = read_response(sock)
        assert (got, wire.status_code(status)) == (corr, grpc.StatusCode.UNIMPLEMENTED)
        assert "unknown api" in body.decode()
    got, status, _ = read_response(sock)
    assert (got, status) == (13, wire.STATUS_OK)


def test_a_frame_over_max_request_bytes_is_refused_the_connection_closed_and_nothing_written(broker_factory):
    broker = broker_factory(extra_args=["--max-request-bytes", str(256 << 10)])
    create_topic(broker, "big")
    port = data_port(broker)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(20)
        sock.sendall(produce_frame(1, "big", b"small"))
        assert read_response(sock)[:2] == (1, wire.STATUS_OK)
        huge = produce_frame(2, "big", b"x" * (1 << 20))
        # The broker stops reading after the header: the rest may never be taken (or be reset).
        writer = threading.Thread(target=lambda: _sendall_quietly(sock, huge), daemon=True)
        writer.start()
        corr, status, body = read_response(sock)
        assert (corr, wire.status_code(status)) == (2, grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert "max_request_bytes" in body.decode()
        assert closed_by_peer(sock)
        writer.join(20)
    assert high_watermark(broker.address, "big") == 1  # only "small"
    # the broker goes on serving other connections
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(20)
        sock.sendall(produce_frame(3, "big", b"after"))
        assert read_response(sock)[:2] == (3, wire.STATUS_OK)
    assert high_watermark(broker.address, "big") == 2


def _sendall_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_a_header_alone_over_the_limit_is_refused_before_any_body(broker, connect):
    sock = connect()
    sock.sendall(struct.pack(">IBI", 0xFFFFFFFF, wire.API_PRODUCE, 21))  # claims 4 GiB, sends none of it
    corr, status, _ = read_response(sock)
    assert (corr, wire.status_code(status)) == (21, grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert closed_by_peer(sock)


@pytest.mark.parametrize("size", [0, 4])
def test_a_frame_size_below_the_header_gets_invalid_argument_and_close(broker, connect, size: int):
    sock = connect()
    sock.sendall(struct.pack(">IBI", size, wire.API_FETCH, 31))
    corr, status, body = read_response(sock)
    assert (corr, wire.status_code(status)) == (31, grpc.StatusCode.INVALID_ARGUMENT)
    assert "below" in body.decode()
    assert closed_by_peer(sock)


def test_a_frame_cut_off_mid_body_writes_nothing_and_the_broker_serves_others(broker, connect):
    create_topic(broker, "cut")
    whole = produce_frame(41, "cut", b"never")
    cut = connect()
    other = connect()  # open before the cut-off one goes away
    cut.sendall(whole[: len(whole) - 5])
    cut.shutdown(socket.SHUT_WR)  # EOF inside the frame
    corr, status, _ = read_response(cut)  # the broker says so, then closes
    assert wire.status_code(status) == grpc.StatusCode.INVALID_ARGUMENT
    assert closed_by_peer(cut)
    other.sendall(produce_frame(42, "cut", b"fine"))
    assert read_response(other)[:2] == (42, wire.STATUS_OK)
    third = connect()
    third.sendall(fetch_frame(43, "cut", 0))
    corr, status, body = read_response(third)
    assert (corr, status) == (43, wire.STATUS_OK)
    assert values_of(pb.FetchResponse.FromString(body).results[0].records) == [b"fine"]
    # a connection dropped mid-frame with a reset does not disturb the broker either
    rst = connect()
    rst.sendall(whole[:12])
    rst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    rst.close()
    other.sendall(fetch_frame(44, "cut", 0))
    assert read_response(other)[:2] == (44, wire.STATUS_OK)
    assert high_watermark(broker.address, "cut") == 1


def test_sigterm_closes_idle_wire_connections_well_within_the_grace_period(broker, connect):
    """Connections never end on their own: a stopping broker closes them rather than wait
    shutdown_grace_s (5 s)."""
    create_topic(broker, "idle")
    idle = [connect() for _ in range(3)]
    for i, sock in enumerate(idle):
        sock.sendall(fetch_frame(i, "idle", 0))
        assert read_response(sock)[:2] == (i, wire.STATUS_OK)  # open, answered, now idle
    t0 = time.monotonic()
    assert broker.stop(timeout_s=20) == 0
    stop_s = time.monotonic() - t0
    for sock in idle:
        assert closed_by_peer(sock)
    assert stop_s < 2.5, f"stop took {stop_s:.1f} s"


def test_sigterm_answers_a_long_poll_in_flight_before_closing(broker, connect):
    create_topic(broker, "lp")
    sock = connect()
    long_poll = fetch_req("lp", 0, 0, max_wait_ms=20_000)
    sock.sendall(frame(wire.API_FETCH, 77, long_poll.SerializeToString()))
    # the long poll is parked (no answer yet); then the broker stops
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):
        sock.recv(1, socket.MSG_PEEK)
    sock.settimeout(20)
    t0 = time.monotonic()
    assert broker.stop(timeout_s=20) == 0
    corr, status, _ = read_response(sock)
    assert corr == 77  # answered (empty or with a status), not dropped
    assert closed_by_peer(sock)
    assert time.monotonic() - t0 < 5


# -- through the clients --------------------------------------------------------------------------


def _round_trip(address: str, topic: str, transport: str, n: int = 50) -> tuple[Producer, Consumer, list[bytes]]:
    producer = Producer(address, linger_ms=0, transport=transport)
    consumer = Consumer(address, auto_offset_reset="earliest", fetch_max_wait_ms=200, transport=transport)
    for i in range(n):
        producer.send(topic, b"%03d" % i)
    producer.flush(30)
    consumer.assign([(topic, 0)])
    got: list[bytes] = []

    def consumed() -> bool:
        got.extend(m.value for m in consumer.poll(timeout_ms=200))
        return len(got) >= n

    wait_for(consumed, 30, f"{n} records over {transport}")
    return producer, consumer, got


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_clients_use_the_transport_asked_for(broker, transport: str):
    create_topic(broker, "cl")
    producer, consumer, got = _round_trip(broker.address, "cl", transport)
    try:
        assert got == [b"%03d" % i for i in range(50)]
        produce_streams = list(producer._streams._streams.values())
        fetch_streams = list(consumer._streams._streams.values())
        assert produce_streams and fetch_streams
        kind = WireConnection if transport == "tcp" else _Stream
        assert all(type(s) is kind for s in produce_streams + fetch_streams), produce_streams + fetch_streams
        if transport == "tcp":
            assert not any(s.inline for s in produce_streams)  # a reader thread completes produces
            assert all(s.inline for s in fetch_streams)  # the consumer reads its fetches in poll()
    finally:
        producer.close(10)
        consumer.close()


def test_big_fetch_responses_stay_on_the_record_transport(broker):
    """After a big response the next fetch stays on the record transport (one copy in poll()), not
    a unary gRPC call: every fetch of 300 kB records is answered on the consumer's connection."""
    create_topic(broker, "big")
    value = bytes(range(256)) * 1200  # 307,200 bytes
    with Producer(broker.address, linger_ms=0, transport="tcp") as producer:
        for _ in range(24):
            producer.send("big", value)
        producer.flush(30)
    consumer = Consumer(broker.address, auto_offset_reset="earliest", fetch_max_wait_ms=200, transport="tcp",
                        max_partition_fetch_bytes=1 << 20)
    try:
        consumer.assign([("big", 0)])
        got: list[bytes] = []
        wait_for(lambda: got.extend(m.value for m in consumer.poll(timeout_ms=200)) or len(got) >= 24, 30,
                 "24 big records")
        assert got == [value] * 24
        (conn,) = consumer._streams._streams.values()
        assert isinstance(conn, WireConnection)
        assert conn.answers >= 6  # 24 records of 300 kB in fetches of at most 1 MiB each
    finally:
        consumer.close()


def test_a_broker_with_data_listen_off_advertises_no_port_and_clients_use_grpc_streams(broker_factory):
    broker = broker_factory(extra_args=["--data-listen", "off"])
    assert data_port(broker) == 0
    create_topic(broker, "off")
    producer, consumer, got = _round_trip(broker.address, "off", "tcp")
    try:
        assert got == [b"%03d" % i for i in range(50)]
        streams = list(producer._streams._streams.values()) + list(consumer._streams._streams.values())
        assert streams and all(type(s) is _Stream for s in streams), streams
    finally:
        producer.close(10)
        consumer.close()


def test_data_listen_host_port_is_honoured_and_advertised(broker_factory):
    port = free_port()
    broker = broker_factory(extra_args=["--data-listen", f"127.0.0.1:{port}"])
    assert metadata(broker.address).brokers[0].data_port == port
    create_topic(broker, "fixed")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(20)
        sock.sendall(produce_frame(1, "fixed", b"here"))
        assert read_response(sock)[:2] == (1, wire.STATUS_OK)
    producer, consumer, got = _round_trip(broker.address, "fixed", "tcp", 10)
    try:
        assert got[0] == b"here" and len(got) >= 10
        conns = list(producer._streams._streams.values())
        assert conns and all(isinstance(c, WireConnection) for c in conns)
        assert all(c._sock.getpeername()[1] == port for c in conns if not c.closed)
    finally:
        producer.close(10)
        consumer.close()


def test_a_stopped_broker_times_requests_out_and_loses_nothing_acknowledged(broker):
    create_topic(broker, "stop")
    producer = Producer(broker.address, acks=1, linger_ms=0, request_timeout_ms=300, delivery_timeout_ms=60_000,
                        retry_backoff_ms=50)
    acked: list[int] = []
    failed: list[BaseException] = []
    lock = threading.Lock()

    def on_done(i: int) -> Callable[..., None]:
        def cb(fut) -> None:
            with lock:
                if fut.exception() is None:
                    acked.append(i)
                else:
                    failed.append(fut.exception())
        return cb

    try:
        for i in range(20):
            producer.send("stop", b"%03d" % i).add_done_callback(on_done(i))
        producer.flush(30)
        assert sorted(acked) == list(range(20))
        (conn,) = producer._streams._streams.values()
        assert isinstance(conn, WireConnection)
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            for i in range(20, 40):
                producer.send("stop", b"%03d" % i).add_done_callback(on_done(i))
            # the request timeout passes with the broker stopped: the watchdog ends the connection
            wait_for(lambda: conn.closed, 15, "the watchdog to end the connection to the stopped broker")
            with lock:
                assert sorted(acked) == list(range(20))  # nothing acknowledged by a stopped broker
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        producer.flush(60)
        assert len(acked) + len(failed) == 40
    finally:
        producer.close(10)
    assert set(range(20)) <= set(acked)
    consumer = Consumer(broker.address, auto_offset_reset="earliest", fetch_max_wait_ms=200)
    try:
        consumer.assign([("stop", 0)])
        received: list[int] = []

        def consumed() -> bool:
            received.extend(int(m.value) for m in consumer.poll(timeout_ms=200))
            return set(acked) <= set(received)

        wait_for(consumed, 30, "every acknowledged record consumed")
    finally:
        consumer.close()
    firsts = list(dict.fromkeys(received))
    assert firsts == sorted(firsts), "records out of send order"


def test_clients_return_to_the_record_transport_after_a_restart_on_a_new_data_port(broker_factory):
    """kill -9, restart on the same gRPC port: the data port is a new one (the OS picks it). The
    clients go on over gRPC streams meanwhile, then move to the new port once metadata says so."""
    broker = broker_factory()
    old_port = data_port(broker)
    create_topic(broker, "back")
    producer = Producer(broker.address, linger_ms=0, request_timeout_ms=2000, delivery_timeout_ms=60_000,
                        retry_backoff_ms=50, metadata_max_age_ms=500)
    consumer = Consumer(broker.address, auto_offset_reset="earliest", fetch_max_wait_ms=100, metadata_max_age_ms=500)
    consumer.assign([("back", 0)])
    received: list[bytes] = []
    sent = [0]

    def step() -> None:
        producer.send("back", b"%05d" % sent[0])
        sent[0] += 1
        received.extend(m.value for m in consumer.poll(timeout_ms=50))

    def on_wire(port: int) -> bool:
        step()
        conns = [*producer._streams._streams.values(), *consumer._streams._streams.values()]
        return len(conns) == 2 and all(isinstance(c, WireConnection) and not c.closed
                                       and c._sock.getpeername()[1] == port for c in conns)

    try:
        wait_for(lambda: on_wire(old_port), 30, "both clients on the record transport")
        broker.kill(signal.SIGKILL)
        broker2 = broker_factory(data_dir=broker.data_dir, port=broker.port)
        new_port = data_port(broker2)
        assert new_port != old_port
        wait_for(lambda: on_wire(new_port), 30, "both clients back on the record transport, on its new port")
        producer.flush(30)
        acked_before = sent[0]
        wait_for(lambda: (step() or True) and len(set(received)) >= acked_before, 30, "the records consumed")
    finally:
        producer.close(10)
        consumer.close()
