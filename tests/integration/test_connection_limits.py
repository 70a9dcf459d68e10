"""Issue 18 item 5: the record transport bounds connections before anything of them is read
(server/connection_gate.py, server/wire_server.py): more than --max-connections-per-ip from one
address are closed at once, a burst over --max-connection-creation-rate-per-sec is refused, the
broker keeps serving other addresses; on a TLS listener a handshake in progress holds a place (it
is admitted before the handshake) and gives it back when it fails or times out."""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import trustme

from logbroker import wire
from logbroker.server import wire_server
from logbroker.server.connection_gate import REFUSED_PER_IP, REFUSED_RATE
from logbroker.server.wire_server import WireServer
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import BrokerProcess, free_port, wait_for
from tests.integration.test_wire_transport import create_topic, data_port, produce_frame, read_response

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sockets() -> Iterator[Callable[[int, str], socket.socket]]:
    opened: list[socket.socket] = []

    def open_from(port: int, source: str = "127.0.0.1") -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        opened.append(s)
        s.settimeout(10)
        s.bind((source, 0))  # any 127.x.y.z is this host: another client address on loopback
        s.connect(("127.0.0.1", port))
        return s

    yield open_from
    for s in opened:
        s.close()


def served(sock: socket.socket, corr: int, topic: str) -> bool:
    """True if a produce on `sock` is answered OK; False if the broker closed the connection."""
    try:
        sock.sendall(produce_frame(corr, topic, b"v%d" % corr))
        got = read_response(sock)
    except (ConnectionError, EOFError, OSError):
        return False
    assert got[:2] == (corr, wire.STATUS_OK), got
    return True


def test_connections_over_the_per_address_limit_are_closed_and_others_are_served(broker_factory, sockets) -> None:
    metrics_port = free_port()
    broker: BrokerProcess = broker_factory(extra_args=["--max-connections-per-ip", "5",
                                                       "--max-connection-creation-rate-per-sec", "0",
                                                       "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    create_topic(broker, "per-ip")
    port = data_port(broker)
    kept = [sockets(port, "127.0.0.1") for _ in range(5)]
    assert all(served(s, i, "per-ip") for i, s in enumerate(kept))
    extra = [sockets(port, "127.0.0.1") for _ in range(3)]
    assert not any(served(s, 100 + i, "per-ip") for i, s in enumerate(extra)), "a 6th connection was served"
    other = sockets(port, "127.0.0.2")  # another address is not held back by this one's limit
    assert served(other, 200, "per-ip")
    assert all(served(s, 300 + i, "per-ip") for i, s in enumerate(kept)), "the admitted ones were disturbed"
    kept.pop().close()  # a place is given back when a connection ends
    wait_for(lambda: served(sockets(port, "127.0.0.1"), 400, "per-ip"), 10, "a new connection in the freed place")
    assert "max_connections_per_ip reached" in broker.log_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    # the three extra ones, and any the wait above opened before the freed place was given back
    refused = re.search(r'^logbroker_connections_refused_total\{reason="max_connections_per_ip"\} (\S+)$', text, re.M)
    assert refused is not None and float(refused.group(1)) >= 3, text
    assert "Traceback" not in broker.log_text()


def test_a_burst_over_the_creation_rate_is_refused_and_the_broker_keeps_serving(broker_factory, sockets) -> None:
    broker: BrokerProcess = broker_factory(extra_args=["--max-connection-creation-rate-per-sec", "20",
                                                       "--max-connections-per-ip", "1000"])
    create_topic(broker, "rate")
    port = data_port(broker)
    burst = [sockets(port, "127.0.0.1") for _ in range(80)]
    results = [served(s, i, "rate") for i, s in enumerate(burst)]
    admitted = sum(results)
    # a bucket of 20 plus what refills while the burst is opened (it takes well under a second)
    assert 20 <= admitted < 60, admitted
    for s in burst:
        s.close()
    wait_for(lambda: served(sockets(port, "127.0.0.3"), 999, "rate"), 10, "served again once tokens refill")
    assert "max_connection_creation_rate_per_sec reached" in broker.log_text()
    assert "Traceback" not in broker.log_text()


def _tls_contexts(tmp_path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


def test_tls_handshakes_in_progress_count_against_the_limits(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(wire_server, "TLS_HANDSHAKE_TIMEOUT_S", 1.0)
    server_ctx, client_ctx = _tls_contexts(tmp_path)

    async def handle(_req: pb.FetchRequest, _ctx: object) -> pb.FetchResponse:
        return pb.FetchResponse()

    async def main() -> None:
        server = WireServer({wire.API_FETCH: (pb.FetchRequest, handle)}, 1 << 20, connections_per_ip_max=2,
                            connection_creation_rate_per_sec=0)
        port = await server.start("127.0.0.1", 0, server_ctx)
        loop = asyncio.get_running_loop()
        try:
            # two clients that connect and never start their handshake: they hold both places
            silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
            await _until(lambda: server.gate.admitted == 2)
            with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=client_ctx), 10)
                w.write(wire.request_header(wire.API_FETCH, 1, 0))
                await asyncio.wait_for(r.readexactly(wire.HEADER_BYTES), 10)
            assert server.refused_total.get(REFUSED_PER_IP) == 1 and REFUSED_RATE not in server.refused_total
            # their handshakes time out: the places are given back, and a real client gets in
            await _until(lambda: server.gate.admitted == 0, 10)
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=client_ctx), 10)
            w.write(wire.request_header(wire.API_FETCH, 7, 0))
            _size, corr, status = wire.RESPONSE_HEADER.unpack(await asyncio.wait_for(r.readexactly(9), 10))
            assert (corr, status) == (7, wire.STATUS_OK) and len(server) == 1
            w.close()
            for _r, sw in silent:
                sw.close()
            await _until(lambda: server.gate.admitted == 0, 10)
            assert loop.is_running()
        finally:
            await server.stop(1)

    asyncio.run(main())


async def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """wait_for on the test's own event loop (the server runs on it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_grpc_refuses_a_call_whose_metadata_is_over_the_bound(broker: BrokerProcess) -> None:
    import grpc

    from logbroker.v1 import logbroker_pb2_grpc as pbg

    with grpc.insecure_channel(broker.address) as ch:
        stub = pbg.BrokerStub(ch)
        stub.Metadata(pb.MetadataRequest(), timeout=10, metadata=(("x-pad", "a" * 4000),))
        with pytest.raises(grpc.RpcError) as refused:
            stub.Metadata(pb.MetadataRequest(), timeout=10, metadata=(("x-pad", "a" * (64 << 10)),))
        assert refused.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL,
                                        grpc.StatusCode.UNAVAILABLE), refused.value
        stub.Metadata(pb.MetadataRequest(), timeout=10)  # and the broker goes on serving
