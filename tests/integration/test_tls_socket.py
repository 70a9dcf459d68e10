"""The client's TlsSocket (logbroker/client/tls_socket.py) against a plain TLS server thread on
loopback: the read-ahead thread hands over exactly the bytes sent, across its bounded buffer, in
order, then 0 at the server's close_notify; its fileno() is readable exactly while decrypted bytes
wait; a tampered record is an error, never bytes; a close_notify ends a direct read too (it used to
spin: Python answers a read after close_notify with 0, not an error)."""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import trustme

from logbroker.client.tls_socket import READ_AHEAD_BYTES, TlsSocket

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@contextmanager
def tls_pair(ca: trustme.CA, serve: Callable[[ssl.SSLSocket], None]) -> Iterator[TlsSocket]:
    """A TlsSocket connected to a server thread that runs `serve` on its side, then closes it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    failures: list[BaseException] = []

    def run() -> None:
        try:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                serve(tls)
        except BaseException as e:  # reported by the test, not lost in the thread
            failures.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    raw = socket.create_connection(listener.getsockname(), timeout=10)
    sock = TlsSocket(raw, client_ctx, "127.0.0.1")
    try:
        sock.handshake()
        raw.settimeout(None)
        yield sock
    finally:
        sock.close()
        thread.join(10)
        listener.close()
    assert not failures, failures


def close_notify(tls: ssl.SSLSocket) -> None:
    """Send close_notify; the client answers by closing, not with its own close_notify."""
    try:
        tls.unwrap()
    except (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError):
        pass


def read_all(sock: TlsSocket, chunk_bytes: int) -> bytes:
    out = bytearray()
    view = memoryview(bytearray(chunk_bytes))
    while n := sock.recv_into(view):
        out += view[:n]
    return bytes(out)


def test_read_ahead_hands_over_every_byte_in_order_then_the_end(ca: trustme.CA) -> None:
    payload = os.urandom(3 * READ_AHEAD_BYTES + 12345)  # more than the bounded buffer holds

    def serve(tls: ssl.SSLSocket) -> None:
        for at in range(0, len(payload), 1 << 20):
            tls.sendall(payload[at : at + (1 << 20)])
        close_notify(tls)

    with tls_pair(ca, serve) as sock:
        sock.start_reading()
        assert read_all(sock, 100_000) == payload
        assert sock.recv_into(memoryview(bytearray(10))) == 0  # the end stays the end


def test_fileno_is_readable_only_while_decrypted_bytes_wait(ca: trustme.CA) -> None:
    go_on = threading.Event()

    def serve(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"x" * 1000)
        assert go_on.wait(10)
        close_notify(tls)

    with tls_pair(ca, serve) as sock:
        sock.start_reading()
        assert select.select([sock.fileno()], [], [], 10)[0]  # the 1000 bytes arrived
        assert sock.buffered()
        assert sock.recv_into(memoryview(bytearray(4096))) == 1000
        assert not sock.buffered()
        assert not select.select([sock.fileno()], [], [], 0.05)[0]  # drained: quiet until more comes
        go_on.set()
        assert select.select([sock.fileno()], [], [], 10)[0]  # the end is readable too
        assert sock.recv_into(memoryview(bytearray(10))) == 0


@pytest.mark.parametrize("read_ahead", [True, False], ids=["read-ahead", "direct"])
def test_close_notify_ends_the_stream(ca: trustme.CA, read_ahead: bool) -> None:
    def serve(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"last words")
        close_notify(tls)

    with tls_pair(ca, serve) as sock:
        if read_ahead:
            sock.start_reading()
        assert read_all(sock, 4) == b"last words"


def test_a_tampered_record_is_an_error_not_bytes(ca: trustme.CA) -> None:
    def serve(tls: ssl.SSLSocket) -> None:
        tls.sendall(b"a" * 100)  # a good record first
        raw = socket.socket(fileno=os.dup(tls.fileno()))
        with raw:  # then a record whose ciphertext was changed in flight
            raw.sendall(bytes([23, 3, 3, 0, 40]) + os.urandom(40))

    with tls_pair(ca, serve) as sock:
        sock.start_reading()
        view = memoryview(bytearray(4096))
        got = 0
        with pytest.raises(ssl.SSLError):
            while True:
                n = sock.recv_into(view[got:])
                assert n, "a tampered stream must fail, not end quietly"
                assert bytes(view[: got + n]) == b"a" * (got + n)
                got += n
        assert got == 100
