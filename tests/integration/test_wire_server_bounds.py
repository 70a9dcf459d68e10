"""The record-transport listener's bounds (logbroker/server/wire_server.py): memory against clients
that send without reading or announce frames they never send, no request started after a reset,
idle connections closed, connections over the limit refused with a rate-limited warning."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import time
from pathlib import Path

import pytest

from logbroker import wire
from logbroker.server import wire_server
from logbroker.server.connection_gate import REFUSED_CONNECTIONS_MAX
from logbroker.server.wire_server import WireServer
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import BrokerProcess, wait_for
from tests.integration.test_streams import batch, fetch_req, high_watermark, values_of
from tests.integration.test_wire_transport import (
    connect,  # noqa: F401  (fixture)
    create_topic,
    data_port,
    fetch_frame,
    frame,
    produce_frame,
    read_response,
)

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20
RSS_GROWTH_MAX_BYTES = 200 * MIB


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def broker_pid(broker: BrokerProcess) -> int:
    assert broker.proc is not None
    return broker.proc.pid


def max_rss_over(pid: int, window_s: float) -> int:
    """The largest RSS sampled over `window_s`: an observation window (memory that would grow keeps
    growing through it), not a wait for something to happen."""
    peak = rss_bytes(pid)
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        time.sleep(0.05)
        peak = max(peak, rss_bytes(pid))
    return peak


# -- 1. a client that sends and never reads ----------------------------------------------------------


def test_a_client_that_never_reads_holds_bounded_broker_memory_then_gets_every_answer(broker, connect):  # noqa: F811
    create_topic(broker, "nr")
    create_topic(broker, "nr-empty")
    sock = connect()
    sock.sendall(produce_frame(1, "nr", os.urandom(100_000)))
    assert read_response(sock)[:2] == (1, wire.STATUS_OK)
    pid = broker_pid(broker)
    before = rss_bytes(pid)
    # Long polls on an empty topic fill the pipeline first, so that every fetch frame behind them
    # is in the broker's read buffer by the time the pipeline has room.
    sock.sendall(b"".join(frame(wire.API_FETCH, i, fetch_req("nr-empty", 0, 0, max_wait_ms=500).SerializeToString())
                          for i in range(8)))
    n = 3000  # ~100 KB each: ~300 MB of answers, all their frames in one write (~150 KB of requests)
    sock.sendall(b"".join(fetch_frame(10 + i, "nr", 0) for i in range(n)))
    peak = max_rss_over(pid, 4.0)
    assert peak - before < RSS_GROWTH_MAX_BYTES, f"broker RSS grew {(peak - before) / MIB:.0f} MiB"
    for i in range(8):
        assert read_response(sock)[:2] == (i, wire.STATUS_OK)
    for i in range(n):
        corr, status, body = read_response(sock)
        assert (corr, status) == (10 + i, wire.STATUS_OK), i
        if i in (0, n - 1):
            (f,) = pb.FetchResponse.FromString(body).results
            assert f.error_code == pb.NONE and len(values_of(f.records)) == 1
    sock.sendall(fetch_frame(7, "nr", 1))  # the connection goes on
    assert read_response(sock)[:2] == (7, wire.STATUS_OK)


# -- 2. headers announcing big frames whose bytes never come -------------------------------------------


def test_headers_announcing_big_frames_cost_memory_only_as_their_bytes_come(broker, connect):  # noqa: F811
    create_topic(broker, "hdr")
    pid = broker_pid(broker)
    max_request_bytes = 32 << 20  # the broker's default
    probe = connect()
    probe.sendall(fetch_frame(1, "hdr", 0))
    assert read_response(probe)[:2] == (1, wire.STATUS_OK)
    before = rss_bytes(pid)
    n = 16  # before the fix each allocated its 32 MiB at once: +512 MiB
    socks = [connect() for _ in range(n)]
    for i, sock in enumerate(socks):
        sock.sendall(struct.pack(">IBI", wire.SIZE_MIN + max_request_bytes, wire.API_PRODUCE, i) + b"x" * 100)
    probe.sendall(fetch_frame(2, "hdr", 0))  # a round trip: the broker's loop has gone past those reads
    assert read_response(probe)[:2] == (2, wire.STATUS_OK)
    peak = max_rss_over(pid, 1.0)
    assert peak - before < RSS_GROWTH_MAX_BYTES, f"broker RSS grew {(peak - before) / MIB:.0f} MiB"
    # A real big produce (8 batches of 768 KiB, under the topic's 1 MiB max_message_bytes) still
    # works, its buffer growing as its bytes come, and is written once.
    values = [os.urandom(768 << 10) for _ in range(8)]
    body = pb.ProduceRequest(acks=1, timeout_ms=5000, partitions=[pb.ProducePartition(
        topic="hdr", partition=0, records=b"".join(batch(v) for v in values))]).SerializeToString()
    assert len(body) > 6 * MIB
    big = connect()
    big.sendall(frame(wire.API_PRODUCE, 3, body))
    corr, status, body = read_response(big)
    assert (corr, status) == (3, wire.STATUS_OK), body[:200]
    (r,) = pb.ProduceResponse.FromString(body).results
    assert (r.error_code, r.base_offset) == (pb.NONE, 0)
    assert high_watermark(broker.address, "hdr") == 8
    req = pb.FetchRequest(max_wait_ms=0, min_bytes=1, max_bytes=8 * MIB, replica_id=-1, partitions=[
        pb.FetchPartition(topic="hdr", partition=0, fetch_offset=0, partition_max_bytes=8 * MIB,
                          current_leader_epoch=-1)])
    big.sendall(frame(wire.API_FETCH, 4, req.SerializeToString()))
    corr, status, body = read_response(big)
    assert (corr, status) == (4, wire.STATUS_OK)
    assert values_of(pb.FetchResponse.FromString(body).results[0].records) == values


# -- 3. a reset with requests in the pipeline and frames buffered behind them ---------------------------


def _broker_socket_inode(local_port: int, peer_port: int) -> int:
    """The inode of the broker's socket for the connection 127.0.0.1:local_port <- peer_port."""
    want_local, want_peer = f"0100007F:{local_port:04X}", f"0100007F:{peer_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want_local and fields[2] == want_peer:
            return int(fields[9])
    raise AssertionError(f"no socket {want_local} <- {want_peer}")


def _holds_socket(pid: int, inode: int) -> bool:
    target = f"socket:[{inode}]"
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:
            continue
    return False


def test_a_reset_starts_none_of_the_frames_buffered_behind_a_full_pipeline(broker, connect):  # noqa: F811
    create_topic(broker, "rst")
    pid = broker_pid(broker)
    sock = connect()
    long_polls = [frame(wire.API_FETCH, i, fetch_req("rst", 0, 0, max_wait_ms=5000).SerializeToString())
                  for i in range(8)]
    produces = [produce_frame(100 + i, "rst", b"r%d" % i) for i in range(20)]
    sock.sendall(b"".join(long_polls + produces))
    inode = _broker_socket_inode(data_port(broker), sock.getsockname()[1])
    sock.settimeout(0.3)
    with pytest.raises(TimeoutError):  # the long polls are parked
        sock.recv(1, socket.MSG_PEEK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # reset
    wait_for(lambda: not _holds_socket(pid, inode), 15, "the broker to close the reset connection")
    deadline = time.monotonic() + 0.5  # settle: anything started would have appended by now
    while time.monotonic() < deadline:
        assert high_watermark(broker.address, "rst") == 0
        time.sleep(0.05)


# -- 4. idle connections and the connection limit (in process) -----------------------------------------


def test_idle_connections_are_closed_those_with_requests_pending_are_not():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        gate = asyncio.Event()

        async def parked(request: pb.FetchRequest, _ctx: object) -> pb.FetchResponse:
            await gate.wait()
            return pb.FetchResponse()

        server = WireServer({wire.API_FETCH: (pb.FetchRequest, parked)}, 1 << 20, idle_s=0.5)
        port = await server.start("127.0.0.1", 0)
        try:
            idle_r, _idle_w = await asyncio.open_connection("127.0.0.1", port)
            busy_r, busy_w = await asyncio.open_connection("127.0.0.1", port)
            busy_w.write(frame(wire.API_FETCH, 9, pb.FetchRequest().SerializeToString()))
            t0 = loop.time()
            assert await asyncio.wait_for(idle_r.read(1), 10) == b""  # closed by the broker
            assert loop.time() - t0 >= 0.4
            assert len(server) == 1
            # past several idle periods, the one with a request pending stays open
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(busy_r.read(1), 1.5)
            gate.set()
            size, corr, status = wire.RESPONSE_HEADER.unpack(await asyncio.wait_for(busy_r.readexactly(9), 10))
            assert (corr, status) == (9, wire.STATUS_OK)
            await busy_r.readexactly(size - wire.SIZE_MIN)
            assert await asyncio.wait_for(busy_r.read(1), 10) == b""  # answered, then idle: closed
            assert len(server) == 0
        finally:
            await server.stop(1)

    asyncio.run(main())


def test_connections_over_the_limit_are_refused_with_one_warning_per_interval(caplog):
    async def main() -> None:
        server = WireServer({}, 1 << 20, connections_max=2)
        port = await server.start("127.0.0.1", 0)
        try:
            kept = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            for _ in range(200):
                if len(server) == 2:
                    break
                await asyncio.sleep(0.01)
            assert len(server) == 2

            async def refused() -> None:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                try:
                    assert await asyncio.wait_for(r.read(1), 10) == b""
                except ConnectionResetError:
                    pass
                w.close()

            for _ in range(5):
                await refused()
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == wire_server.__name__]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert "refused 1 since" in warnings[0].getMessage()
            assert server.refusals.suppressed(REFUSED_CONNECTIONS_MAX) == 4  # counted, not logged
            later = time.monotonic() + wire_server.REFUSED_WARNING_INTERVAL_S
            server.refusals.monotonic = lambda: later  # the interval has passed
            await refused()
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == wire_server.__name__]
            assert len(warnings) == 2 and "refused 5 since" in warnings[1].getMessage()
            assert len(server) == 2  # the two within the limit are untouched
            for _r, w in kept:
                w.write(b"")
        finally:
            await server.stop(1)

    with caplog.at_level(logging.WARNING, logger=wire_server.__name__):
        asyncio.run(main())
