"""Client side of the record transport (frame layout in logbroker/wire.py): one TCP connection per
(broker, API, lane), used by `BrokerStreams` exactly as a gRPC stream is (streams.py).

    send(request) ─> sendall in the calling thread (under the write lock) ─> broker
    reader thread <─ responses, in request order ─> pending.popleft().complete(response) ─> callbacks

or, inline (the consumer's fetch connections), no reader thread: the thread waiting for the
response (the one in `Consumer.poll()`) selects on the socket and calls `pump()`, which reads and
completes in that thread, as Kafka's consumer does its network I/O inside poll(). That saves the
hand-off from a reader thread to the poller (measured: ~0.07 ms of a produce-to-poll latency).

The caller writes its own frame, so a produce or fetch costs no hand-off to another thread on the
way out. A status frame fails only its own request (the connection goes on); a broken connection
(EOF, reset, a frame out of bounds, a correlation id that is not the oldest pending one, the
watchdog's deadline) fails every pending request with a retriable status, and the next send opens a
new connection. Sockets are blocking without a timeout: the watchdog's `fail()` shuts the socket
down, which wakes a reader in recv() and a writer blocked in sendall() alike.

TLS (`tls_context`): a `TlsSocket` (tls_socket.py: memory BIOs under a lock, so the reader and the
writers never call OpenSSL at once), handshaken at open within the connect timeout, then waiting for
the broker's first records (TLS 1.3 session tickets, sent only once the broker has accepted the
client's certificate): a broker that refuses the client closes instead, and the open raises
`TlsRefusedError`, which the owner turns into UNAUTHENTICATED. Bytes the TLS layer holds are not
visible to poll(): `buffered()` says so. An inline connection's TlsSocket decrypts ahead in a thread
of its own (tls_socket.py), while poll() decodes the previous response.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError, Message

from logbroker import wire
from logbroker.client.sasl import FrameSocket, SaslConfig, recv_exact, wire_handshake
from logbroker.client.tls_socket import TlsSocket
from logbroker.client.transport import (
    STREAM_PENDING_MAX,
    ConnectionOwner,
    Key,
    StreamError,
    StreamFuture,
    fail_pending,
    mark_reader_thread,
)
from logbroker.errors import InvalidRequestError, UnauthenticatedError

log = logging.getLogger(__name__)

# Responses up to this size are read with the header in one recv() into the reusable buffer.
READ_BUFFER_BYTES = 256 << 10
RESPONSE_BYTES_MAX = 64 << 20  # the clients' gRPC receive limit (metadata_cache.MESSAGE_BYTES_MAX)
REQUEST_BYTES_MAX = 64 << 20
SMALL_WRITE_BYTES = 64 << 10  # header and body in one send() below this; two above (no 1 MiB copy)


def readable(fd: int, wait_s: float) -> bool:
    """Whether `fd` has bytes (or EOF) to read within `wait_s`: poll(), not select(), which refuses
    descriptors above 1023."""
    if fd < 0:
        raise OSError("the socket is closed")  # closed by another thread: ends the reading as a broken connection
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(wait_s * 1000 + 0.999))))


def open_socket(address: tuple[str, int], connect_timeout_s: float, tls_context: ssl.SSLContext | None,
                sasl: SaslConfig | None = None, read_ahead: bool = False,
                client_id: str = "") -> socket.socket | TlsSocket:
    """A connected socket (TLS: handshaken and accepted, tls_socket.py, with its read-ahead thread if
    asked; SASL: authenticated, client/sasl.py; `client_id`: announced, logbroker/client_id.py),
    blocking, no timeout, TCP_NODELAY. Raises TlsRefusedError when the broker refuses
    our TLS, UnauthenticatedError our login, OSError when unreachable."""
    raw = socket.create_connection(address, timeout=connect_timeout_s)
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if tls_context is None:
            if sasl is not None:
                raise UnauthenticatedError("SASL needs TLS: the password is never sent on a plaintext connection")
            if client_id:
                announce_client_id(raw, client_id)
            raw.settimeout(None)
            return raw
        sock = TlsSocket(raw, tls_context, address[0])
        sock.handshake()
        sock.confirm(connect_timeout_s)
        if sasl is not None:
            wire_handshake(sock, sasl)
        if client_id:
            announce_client_id(sock, client_id)
        raw.settimeout(None)
        if read_ahead:
            sock.start_reading()
        return sock
    except BaseException:
        raw.close()
        raise


def announce_client_id(sock: FrameSocket, client_id: str) -> None:
    """Send the connection's API_CLIENT_ID frame and read its answer (logbroker/wire.py). A broker
    without the api (UNIMPLEMENTED) is taken as it is; a refused id raises InvalidRequestError;
    the connection closing raises OSError (the caller's connect failed)."""
    body = client_id.encode("ascii")
    sock.sendall(wire.request_header(wire.API_CLIENT_ID, 0, len(body)) + body)
    header = _recv_exact(sock, wire.HEADER_BYTES)
    size, _corr, status = wire.RESPONSE_HEADER.unpack(header)
    if not wire.SIZE_MIN <= size <= wire.SIZE_MIN + 4096:
        raise OSError(f"malformed answer to the client id (frame size {size})")
    message = _recv_exact(sock, size - wire.SIZE_MIN).decode("utf-8", "replace")
    if status == wire.status_number(grpc.StatusCode.INVALID_ARGUMENT):
        raise InvalidRequestError(message)
    if status not in (wire.STATUS_OK, wire.status_number(grpc.StatusCode.UNIMPLEMENTED)):
        raise OSError(f"the broker refused the client id: {message}")


def _recv_exact(sock: FrameSocket, n: int) -> bytes:
    return recv_exact(sock, n, lambda: OSError("the broker closed the connection"))


class _Ended(Exception):
    """The connection cannot go on; `error` is what its pending requests get."""

    def __init__(self, error: StreamError) -> None:
        super().__init__(error.details())
        self.error = error


class WireConnection:
    """One connection; requests answered in order. A transport.Connection, as streams._Stream is."""

    def __init__(self, owner: ConnectionOwner, key: Key, address: tuple[str, int], api: int,
                 response_cls: type[Message], connect_timeout_s: float,
                 arm: Callable[[float], None], inline: bool = False,
                 tls_context: ssl.SSLContext | None = None, sasl: SaslConfig | None = None,
                 client_id: str = "") -> None:
        self._owner = owner
        self.key = key
        self._api = api
        self._response_cls = response_cls
        self._arm = arm
        self._lock = threading.Lock()  # pending, closed, next correlation id
        self._write_lock = threading.Lock()  # frame order on the socket == pending order
        self.pending: deque[tuple[int, StreamFuture]] = deque()
        self.closed = False
        self._corr = 0
        # TLS: the inline connections (a consumer's fetches, megabytes each) decrypt ahead in a thread
        # of their own while poll() decodes; a reader thread's connection needs none
        self._sock = open_socket(address, connect_timeout_s, tls_context, sasl, read_ahead=inline, client_id=client_id)
        self._where = f"{address[0]}:{address[1]}"
        self.target = address
        self.answers = 0  # responses read; a connection closed before its first is taken as refused
        self._buf = bytearray(READ_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # unparsed bytes are _buf[_start:_end]
        self.inline = inline
        self._read_lock = threading.Lock()  # inline: one pump() at a time
        if not inline:
            self._reader = threading.Thread(target=self._read, name=f"logbroker-wire-{key[1]}", daemon=True)
            self._reader.start()

    def send(self, request: Message, deadline: float) -> StreamFuture | None:
        """Write `request`; None when this connection is closed (the caller opens another)."""
        fut = StreamFuture(request, deadline)
        if self.inline:
            fut.connection = self
        body = request.SerializeToString()
        if len(body) > REQUEST_BYTES_MAX:
            fut.complete(None, StreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                           f"request of {len(body)} bytes is over {REQUEST_BYTES_MAX}"))
            return fut
        with self._write_lock:
            with self._lock:
                if self.closed:
                    return None
                if len(self.pending) >= STREAM_PENDING_MAX:
                    fut.complete(None, StreamError(grpc.StatusCode.UNAVAILABLE,
                                                   f"{STREAM_PENDING_MAX} requests pending on one connection"))
                    return fut
                corr = self._corr
                self._corr = (corr + 1) & wire.CORRELATION_MASK
                self.pending.append((corr, fut))
            self._arm(deadline)  # before a write that may block: the watchdog can then end it
            head = wire.request_header(self._api, corr, len(body))
            try:
                if len(body) < SMALL_WRITE_BYTES:
                    self._sock.sendall(head + body)
                else:
                    self._sock.sendall(head)
                    self._sock.sendall(body)
            except OSError as e:
                write_error: OSError | None = e
            else:
                write_error = None
        if write_error is not None:  # not under the write lock: fail() may close the socket, which takes it
            self.fail(StreamError(grpc.StatusCode.UNAVAILABLE, f"writing to {self._where} failed: {write_error}"))
        return fut

    def head_deadline(self) -> float | None:
        with self._lock:
            return self.pending[0][1].deadline if self.pending else None

    def answered_unread(self) -> bool:
        """Inline: bytes of an answer wait in the buffer or the socket (nobody has pumped them yet)."""
        if not self.inline or self.closed or self._read_lock.locked():
            return False  # a pump() reading now (maybe stalled inside a frame): the deadline applies
        if self._end > self._start:
            return True
        try:
            return self.buffered() or readable(self._sock.fileno(), 0)
        except (OSError, ValueError):  # closed meanwhile
            return False

    def extend_head(self, deadline: float) -> float:
        """Move the oldest request's deadline to `deadline`; returns the head's deadline now."""
        with self._lock:
            if not self.pending:
                return deadline
            fut = self.pending[0][1]
            fut.deadline = max(fut.deadline, deadline)
            return fut.deadline

    # -- reading: a reader thread, or (inline) whoever calls pump() -----------------------------

    def _recv_more(self, into: memoryview) -> int:
        n = self._sock.recv_into(into)
        if n == 0:
            raise _Ended(StreamError(grpc.StatusCode.UNAVAILABLE, f"{self._where} closed the connection"))
        return n

    def _read_frame(self) -> tuple[int, int, bytes | bytearray | memoryview]:
        """The next response frame (corr, status, body), reading as much as it needs (blocking).

        The body is a view of the read buffer, valid until the next call, unless the frame is
        bigger than the buffer (its own bytearray then).
        """
        buf, view = self._buf, self._view
        while self._end - self._start < wire.HEADER_BYTES:
            if self._start:  # move the partial header to the front
                kept = self._end - self._start
                buf[:kept] = buf[self._start : self._end]
                self._start, self._end = 0, kept
            self._end += self._recv_more(view[self._end :])
        size, corr, status = wire.RESPONSE_HEADER.unpack_from(buf, self._start)
        if size < wire.SIZE_MIN or size > wire.SIZE_MIN + RESPONSE_BYTES_MAX:
            raise _Ended(StreamError(grpc.StatusCode.INTERNAL, f"{self._where} sent a frame of size {size}"))
        body_len = size - wire.SIZE_MIN
        body_start = self._start + wire.HEADER_BYTES
        if body_start + body_len <= len(buf):  # fits in the buffer: read up to it in place
            while self._end < body_start + body_len:
                self._end += self._recv_more(view[self._end :])
            self._start = body_start + body_len
            if self._start == self._end:
                self._start = self._end = 0
            return corr, status, view[body_start : body_start + body_len]
        big = bytearray(body_len)  # a big response: its own buffer, what is already read first
        have = min(self._end - body_start, body_len)
        big[:have] = view[body_start : body_start + have]
        big_view = memoryview(big)
        while have < body_len:
            have += self._recv_more(big_view[have:])
        self._start = self._end = 0
        return corr, status, big

    def _deliver(self, corr: int, status: int, body: bytes | bytearray | memoryview) -> None:
        with self._lock:
            head = self.pending.popleft() if self.pending and self.pending[0][0] == corr else None
        if head is None:
            raise _Ended(StreamError(grpc.StatusCode.INTERNAL,
                                     f"{self._where} answered correlation id {corr}, not the oldest request's"))
        fut = head[1]
        self.answers += 1
        if status == wire.STATUS_OK:
            try:
                response = self._response_cls.FromString(body)
            except (DecodeError, ValueError) as e:
                fut.complete(None, StreamError(grpc.StatusCode.INTERNAL, f"malformed response: {e}"))
            else:
                fut.complete(response, None)
        else:
            fut.complete(None, StreamError(wire.status_code(status), bytes(body).decode("utf-8", "replace")))

    def _read(self) -> None:
        mark_reader_thread()  # callbacks run here: they must not block on a socket write
        try:
            while True:
                self._deliver(*self._read_frame())
        except Exception as e:
            self._end_with(e)

    def pump(self, wait_s: float = 0.0) -> None:
        """Inline mode: complete the requests whose responses have arrived, waiting up to `wait_s`
        for the first byte; callbacks run here. A frame begun is read to its end (the watchdog's
        deadline bounds that wait)."""
        if not self._read_lock.acquire(timeout=max(wait_s, 0.0)):
            return
        try:
            if self.closed:
                return
            ready = self._end > self._start or self.buffered() or readable(self._sock.fileno(), wait_s)
            while ready:
                self._deliver(*self._read_frame())
                ready = self._end > self._start or self.buffered() or readable(self._sock.fileno(), 0)
        except Exception as e:
            self._end_with(e)
        finally:
            if self.closed:  # failed by another thread (the watchdog) while nobody else reads
                self._close_socket()
            self._read_lock.release()

    def fileno(self) -> int:
        """The socket's descriptor (for poll(2)), -1 once closed."""
        return self._sock.fileno()

    def buffered(self) -> bool:
        """TLS: decrypted bytes wait in the TLS layer, where poll() on the descriptor does not see them."""
        sock = self._sock
        return isinstance(sock, TlsSocket) and not self.closed and sock.buffered()

    def _end_with(self, exc: BaseException) -> None:
        if isinstance(exc, _Ended):
            error = exc.error
        elif isinstance(exc, OSError):
            error = StreamError(grpc.StatusCode.UNAVAILABLE, f"connection to {self._where} failed: {exc}")
        else:  # a bug: fail loudly rather than leave requests waiting
            log.error("record transport reader failed", exc_info=exc)
            error = StreamError(grpc.StatusCode.INTERNAL, f"reader failed: {exc!r}")
        self.fail(error)
        self._close_socket()

    def _close_socket(self) -> None:
        with self._write_lock:  # no writer is inside sendall() on the descriptor being closed
            self._sock.close()

    def fail(self, error: StreamError, head_only: bool = False) -> None:
        """Close the connection; every pending request fails with `error` (`head_only` as _Stream's)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            failed = [fut for _, fut in self.pending]
            self.pending.clear()
        self._owner.forget(self, error)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader (it closes the socket)
        except OSError:
            pass
        if self.inline and self._read_lock.acquire(blocking=False):  # no pump() to close it: close it here
            try:
                self._close_socket()
            finally:
                self._read_lock.release()
        fail_pending(failed, error, head_only, "connection")
