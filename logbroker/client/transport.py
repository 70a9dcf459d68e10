"""The transport interface under the clients: what one open connection to a broker offers.

Two implementations, both answered in request order: a gRPC bidirectional stream
(`streams._Stream`) and a record-transport TCP connection (`wire_connection.WireConnection`).
`streams.BrokerStreams` owns them (one per method, broker and lane), arms their deadlines with its
watchdog and replaces the ones that fail; it is their `ConnectionOwner`. Both import this module
and nothing of each other.

    Connection.send(request, deadline) -> StreamFuture   (None: closed, the owner opens another)
    StreamFuture.complete(response | error) ──> callbacks, on the thread that read the answer

Reader threads: a connection's reader thread runs the callbacks of the futures it completes. Code
that may block writing a socket (a producer shipping inline) asks `on_reader_thread()` and leaves
that work to its own thread instead: a reader blocked in a write stops reading responses, the broker
then stops reading requests, and both wait forever. `mark_reader_thread()` is called once by each
reader thread; the knowledge lives here only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

import grpc
from google.protobuf.message import Message

log = logging.getLogger(__name__)

# Requests pending on one stream; send() beyond it fails at once with a retriable UNAVAILABLE (not
# RESOURCE_EXHAUSTED, which producers take as a final "request too large"): the callers bound their
# in-flight requests far below it.
STREAM_PENDING_MAX = 1024

Key = tuple[str, str, int]  # (method path, broker address, lane)

_READER = threading.local()


def mark_reader_thread() -> None:
    """Called by a connection's reader thread before it reads: callbacks run on it from then on."""
    _READER.active = True


def on_reader_thread() -> bool:
    """Whether the calling thread is a connection's reader (it must not block on a socket write)."""
    return getattr(_READER, "active", False)


class StreamError(grpc.RpcError):
    """A stream's failure, as each request pending on it sees it (code() and details() as grpc's)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class StreamFuture:
    """The outcome of one request on a connection; the subset of grpc.Future the clients use."""

    __slots__ = ("_callbacks", "_done", "_error", "_lock", "_response", "connection", "deadline", "request")

    def __init__(self, request: Message, deadline: float) -> None:
        self.request: Message | None = request  # kept for a unary re-send; dropped once done
        self.deadline = deadline
        self.connection: Any = None  # an inline WireConnection whose pump() completes this future
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._response: Any = None
        self._error: grpc.RpcError | None = None
        self._callbacks: list[Callable[[StreamFuture], object]] = []

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise grpc.FutureTimeoutError()
        if self._error is not None:
            raise self._error
        return self._response

    def cancel(self) -> bool:
        """Stop waiting for the response (the stream stays open; the response is dropped)."""
        self.complete(None, StreamError(grpc.StatusCode.CANCELLED, "cancelled"))
        return True

    def add_done_callback(self, fn: Callable[[StreamFuture], object]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def complete(self, response: Any, error: grpc.RpcError | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._response, self._error = response, error
            self.request = None
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:
                log.exception("stream future callback failed")


class Connection(Protocol):
    """One open connection to a broker (a gRPC stream or a record-transport connection)."""

    key: Key
    closed: bool

    def send(self, request: Message, deadline: float) -> StreamFuture | None:
        """Queue or write `request`; None when the connection is closed (the caller opens another)."""
        ...

    def head_deadline(self) -> float | None:
        """The oldest pending request's deadline (None: nothing pending)."""
        ...

    def answered_unread(self) -> bool:
        """An answer waits that nobody has read yet (inline connections only)."""
        ...

    def extend_head(self, deadline: float) -> float:
        """Move the oldest request's deadline to `deadline`; returns the head's deadline now."""
        ...

    def fail(self, error: StreamError, head_only: bool = False) -> None:
        """Close; every pending request fails with `error` (`head_only`: see fail_pending)."""
        ...


class ConnectionOwner(Protocol):
    """What a connection reports back to the one who opened it (streams.BrokerStreams)."""

    def forget(self, stream: Connection, error: StreamError) -> None: ...

    def resend_unary(self, key: Key, failed: list[StreamFuture]) -> bool: ...


def fail_pending(failed: list[StreamFuture], error: StreamError, head_only: bool, what: str) -> None:
    """Fail the requests a stream or connection had pending when it ended with `error`.

    `head_only`: `error` is the oldest one's own outcome; the ones behind it fail with a retriable
    UNAVAILABLE (the broker may or may not have handled them; a producer's retry is then what it is
    after any lost response)."""
    if head_only and failed and error.code() != grpc.StatusCode.UNAVAILABLE:
        failed[0].complete(None, error)
        behind = StreamError(grpc.StatusCode.UNAVAILABLE,
                             f"{what} ended by an earlier request ({error.code().name}: {error.details()})")
        for fut in failed[1:]:
            fut.complete(None, behind)
        return
    for fut in failed:
        fut.complete(None, error)
