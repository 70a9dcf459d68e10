"""Requester: request-reply over a queue (a topic consumed by a share group), the asking side.

    request_async(topic, value) ─> Producer.send(topic, value, headers + reply_to, correlation_id)
                                     ... a Responder (share group) handles it, sends Reply ...
    broker ─push─> reply stream ─> the pending request of that correlation_id ─> its Future

One reply stream per Requester (client/reply_stream.py), to one broker, opened on the first request;
its address is every request's `reply_to` header, so replies reach this Requester only, with no topic
or poll loop of its own (routing: server/reply_registry.py). `correlation_id` is a random prefix of
this Requester and a counter.

Pending requests: correlation id -> (future, topic, deadline), at most `max_pending`. The first reply
for an id completes its future; a later one (a redelivered request answered twice) finds none and is
dropped: counted in `late_replies` when its request had timed out (the ids of the last
`TIMED_OUT_REMEMBERED` timeouts are kept to tell), in `duplicate_replies` otherwise. A timer thread
fails each request whose deadline passes with `RequestTimeoutError` naming the topic. When the reply
stream closes (its broker stopped) the requests pending on it fail at once with
`BrokerUnavailableError` (their replies can no longer reach this client); the next request opens a
new stream. Opening it feeds the broker's circuit (client/circuit.py, the metadata cache's
`circuits`, which the requests' Producer uses too): a failed open counts against it, an open stream
closes it, and a broker whose circuit is open is passed over for the next one during its cool-down
(BrokerUnavailableError naming it when no broker is left). Thread-safe: many threads may share one
Requester.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, NamedTuple

from logbroker.client.metadata_cache import MetadataCache, metadata_for
from logbroker.client.producer import Producer
from logbroker.client.reply_stream import ReplyStream
from logbroker.client.sasl import SaslConfig
from logbroker.errors import BrokerUnavailableError, LogbrokerError, RequestTimeoutError
from logbroker.tls import TlsConfig
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

REPLY_TO_HEADER = "reply_to"
CORRELATION_ID_HEADER = "correlation_id"
MAX_PENDING_DEFAULT = 100_000
TIMED_OUT_REMEMBERED = 100_000
CONNECT_TIMEOUT_S = 5.0
HEAP_SLACK = 10_000  # deadlines of answered requests kept before the heap is rebuilt without them

Headers = Sequence[tuple[str, bytes | str | None]] | dict[str, bytes | str | None]


class Reply(NamedTuple):
    """The reply to one request."""

    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    key: bytes | None
    correlation_id: str


class _Pending(NamedTuple):
    future: Future[Reply]
    topic: str
    timeout_ms: int
    reply_to: str


class Requester:
    def __init__(self, bootstrap: str | Sequence[str] | MetadataCache, *, timeout_ms: int = 30_000,
                 acks: int | str = 1, max_pending: int = MAX_PENDING_DEFAULT, request_timeout_ms: int = 30_000,
                 retry_backoff_ms: int = 100, tls: TlsConfig | bool | None = None,
                 sasl: SaslConfig | None = None) -> None:
        """`timeout_ms`: the default per request; `acks`: the producer's, for the requests; `tls`,
        `sasl`: as the Producer's."""
        if timeout_ms < 1 or max_pending < 1:
            raise ValueError("timeout_ms and max_pending must be > 0")
        self.timeout_ms = timeout_ms
        self.max_pending = max_pending
        self._metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, retry_backoff_ms,
                                                           tls=tls, sasl=sasl)
        self._producer = Producer(self._metadata, acks=acks, linger_ms=0, request_timeout_ms=request_timeout_ms)
        self._prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._pending: dict[str, _Pending] = {}
        self._by_stream: dict[str, set[str]] = {}  # reply_to -> ids pending on that stream
        self._deadlines: list[tuple[float, str]] = []
        self._timed_out: OrderedDict[str, None] = OrderedDict()
        self._stream: ReplyStream | None = None
        self._stream_lock = threading.Lock()
        self._closed = False
        self.late_replies = 0  # replies to requests that had timed out (dropped)
        self.duplicate_replies = 0  # second replies to an answered request, or to no request of ours (dropped)
        self._timer = threading.Thread(target=self._expire, name="logbroker-requester-timer", daemon=True)
        self._timer.start()

    # -- asking ----------------------------------------------------------------------------------

    def request(self, topic: str, value: bytes | str | None, key: bytes | str | None = None,
                headers: Headers | None = None, timeout_ms: int | None = None) -> Reply:
        """Send a request to `topic` and wait for its reply; RequestTimeoutError after `timeout_ms`."""
        return self.request_async(topic, value, key, headers, timeout_ms).result()

    def request_async(self, topic: str, value: bytes | str | None, key: bytes | str | None = None,
                      headers: Headers | None = None, timeout_ms: int | None = None) -> Future[Reply]:
        """Send a request; a Future of its Reply (many may be in flight)."""
        timeout_ms = self.timeout_ms if timeout_ms is None else int(timeout_ms)
        if timeout_ms < 1:
            raise ValueError(f"timeout_ms must be > 0, got {timeout_ms}")
        stream = self._reply_stream()
        corr = f"{self._prefix}{next(self._ids):x}"
        future: Future[Reply] = Future()
        with self._cond:
            if self._closed:
                raise LogbrokerError("the requester is closed")
            if len(self._pending) >= self.max_pending:
                raise LogbrokerError(f"{self.max_pending} requests are pending (max_pending)")
            self._pending[corr] = _Pending(future, topic, timeout_ms, stream.reply_to)
            self._by_stream.setdefault(stream.reply_to, set()).add(corr)
            deadline = time.monotonic() + timeout_ms / 1000
            if len(self._deadlines) > 2 * len(self._pending) + HEAP_SLACK:  # drop the answered ones' deadlines
                self._deadlines = [d for d in self._deadlines if d[1] in self._pending]
                heapq.heapify(self._deadlines)
            heapq.heappush(self._deadlines, (deadline, corr))
            if self._deadlines[0][1] == corr:
                self._cond.notify()
        all_headers = list(headers.items()) if isinstance(headers, dict) else list(headers or ())
        all_headers += [(REPLY_TO_HEADER, stream.reply_to), (CORRELATION_ID_HEADER, corr)]
        try:
            sent = self._producer.send(topic, value, key=key, headers=all_headers)
        except BaseException as e:
            self._fail(corr, e)
            raise
        sent.add_done_callback(lambda f: self._on_sent(corr, f))
        return future

    def _on_sent(self, corr: str, sent: Any) -> None:
        error = sent.exception()
        if error is not None:
            self._fail(corr, error)

    # -- answers ---------------------------------------------------------------------------------

    def _on_replies(self, replies: list[pb.ReplyRequest]) -> None:
        """Replies off the stream (a burst, on its reader thread): matched under one lock, settled after."""
        answered: list[tuple[_Pending, pb.ReplyRequest]] = []
        with self._cond:
            for reply in replies:
                corr = reply.correlation_id
                pending = self._pop(corr)
                if pending is not None:
                    answered.append((pending, reply))
                elif corr in self._timed_out:
                    del self._timed_out[corr]
                    self.late_replies += 1
                else:
                    self.duplicate_replies += 1
        for pending, reply in answered:
            headers = tuple((h.key, h.value) for h in reply.headers) if reply.headers else ()
            _settle(pending.future, Reply(reply.value, headers, reply.key or None, reply.correlation_id), None)

    def _pop(self, corr: str) -> _Pending | None:
        """The pending request `corr`, taken out (under _cond)."""
        pending = self._pending.pop(corr, None)
        if pending is not None:
            ids = self._by_stream.get(pending.reply_to)
            if ids is not None:
                ids.discard(corr)
        return pending

    def _fail(self, corr: str, error: BaseException) -> None:
        with self._cond:
            pending = self._pop(corr)
        if pending is not None:
            _settle(pending.future, None, error)

    def _expire(self) -> None:
        """The timer thread: fail each request whose deadline has passed."""
        while True:
            expired: list[_Pending] = []
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, corr = heapq.heappop(self._deadlines)
                    pending = self._pop(corr)
                    if pending is not None:
                        expired.append(pending)
                        self._timed_out[corr] = None
                        if len(self._timed_out) > TIMED_OUT_REMEMBERED:
                            self._timed_out.popitem(last=False)
                if not expired:
                    self._cond.wait(self._deadlines[0][0] - now if self._deadlines else None)
                    continue
            for p in expired:
                _settle(p.future, None, RequestTimeoutError(
                    f"no reply to the request on topic {p.topic!r} within {p.timeout_ms} ms"))

    # -- the reply stream ------------------------------------------------------------------------

    def _reply_stream(self) -> ReplyStream:
        stream = self._stream
        if stream is not None and not stream.closed:
            return stream
        with self._stream_lock:
            stream = self._stream
            if stream is not None and not stream.closed:
                return stream
            self._stream = stream = self._open_stream()
            return stream

    def _open_stream(self) -> ReplyStream:
        errors: list[str] = []
        if not self._metadata.brokers():
            self._metadata.refresh()
        circuits = self._metadata.circuits
        for address in self._metadata.candidate_addresses():
            target = self._metadata.data_address(address)
            if target is None:
                errors.append(f"{address} has no record transport")
                continue
            if not circuits.allow(address):  # open (client/circuit.py): the next broker
                errors.append(f"circuit to {address} open (no requests to it for a cool-down)")
                continue
            try:
                stream = ReplyStream(target, self._on_replies, self._on_stream_closed, CONNECT_TIMEOUT_S)
            except BrokerUnavailableError as e:
                circuits.failed(address, e)
                errors.append(str(e))
                continue
            circuits.succeeded(address)
            return stream
        raise BrokerUnavailableError("no broker took a reply stream: " + "; ".join(errors))

    def _on_stream_closed(self, stream: ReplyStream, reason: str) -> None:
        with self._cond:
            ids = self._by_stream.pop(stream.reply_to, set())
            failed = [p for p in (self._pending.pop(corr, None) for corr in ids) if p is not None]
        for p in failed:
            _settle(p.future, None, BrokerUnavailableError(
                f"the reply stream to {stream.where} closed ({reason}) before the reply to the request on "
                f"topic {p.topic!r} came"))

    # -- life --------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop: pending requests fail, the reply stream and the producer close."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending.values())
            self._pending.clear()
            self._cond.notify_all()
        for p in pending:
            _settle(p.future, None, LogbrokerError("the requester was closed"))
        if self._stream is not None:
            self._stream.close()
        self._producer.close(timeout=5)
        self._timer.join(timeout=5)
        if self._owns_metadata:
            self._metadata.close()

    def __enter__(self) -> Requester:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settle(future: Future[Reply], reply: Reply | None, error: BaseException | None) -> None:
    """Complete a future (one the caller cancelled stays cancelled)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            assert reply is not None
            future.set_result(reply)
    except InvalidStateError:
        pass
