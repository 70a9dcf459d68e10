"""Responder: request-reply over a queue, the answering side; and `ReplySender`, the one call that
sends a reply (also used by `logbroker worker --queue`).

A Responder is a share-group member (`QueueConsumer`) of `group` on `topic`. For each request it
calls `handler(message)`; the return value becomes the reply to the message's `reply_to` /
`correlation_id` headers (requester.py):

    bytes / str / None        the reply's value
    (value, headers)          headers a dict or a list of (name, value) pairs

The reply is sent (and answered by the broker) before the request is acknowledged, so a responder
that dies mid-request leaves the request locked until the group's lock_ms passes, then redelivered
to another member, which answers it: the requester keeps the first reply. A handler that raises
releases the request (redelivered after the group's retry backoff; the last attempt dead-letters it,
queue semantics). A reply the broker refuses: REPLY_TOO_LARGE rejects the request (dead letter, the
reason says why), UNKNOWN_REPLY_TO acknowledges it (its requester has gone: nobody waits for it);
a reply that could not be sent (no broker reachable) releases it. A message without reply_to is
handled and acknowledged with no reply.

`run()` (and `start()`) pipeline: once a poll's replies are sent, the next poll goes out at once,
and each request is settled by its reply's answer when it comes (on the reply connection's
thread), its acknowledgement riding on a later poll; so a responder waits for records, not for
its replies' answers. `serve_once()` is the step-by-step form: it settles a poll's requests before
returning.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from logbroker.client.metadata_cache import MetadataCache, metadata_for
from logbroker.client.queue import QueueConsumer, QueueMessage
from logbroker.client.requester import CORRELATION_ID_HEADER, REPLY_TO_HEADER
from logbroker.client.streams import REPLY_STREAM
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

Handler = Callable[[QueueMessage], Any]


def _as_bytes(v: bytes | str | None) -> bytes:
    if v is None:
        return b""
    return v.encode() if isinstance(v, str) else bytes(v)


def reply_request(reply_to: str, correlation_id: str, result: Any) -> pb.ReplyRequest:
    """The ReplyRequest for a handler's return value (see the module doc)."""
    headers: Any = ()
    value = result
    if isinstance(result, tuple):
        value, headers = result
    req = pb.ReplyRequest(reply_to=reply_to, correlation_id=correlation_id, value=_as_bytes(value))
    for k, v in (headers.items() if isinstance(headers, dict) else headers):
        req.headers.add(key=k, value=_as_bytes(v))
    return req


class ReplySender:
    """Sends replies (Reply over the record transport, pipelined on one connection per broker) to the
    broker named by their reply_to, else any."""

    def __init__(self, metadata: MetadataCache, timeout_s: float = 10.0) -> None:
        self._metadata = metadata
        self._streams = metadata.client_streams()
        self._timeout_s = timeout_s
        self._refreshed = False

    def send_async(self, req: pb.ReplyRequest) -> Any:
        """A future of the broker's answer (its result() raises grpc.RpcError when none answered)."""
        if not self._refreshed:  # the brokers' record-transport addresses (a share consumer never asked)
            self._metadata.refresh([])
            self._refreshed = True
        broker, _, _ = req.reply_to.partition(":")
        address = self._metadata.brokers().get(int(broker)) if broker.isdigit() else None
        return self._streams.send(REPLY_STREAM, pb.ReplyResponse, address or self._metadata.any_address(), req,
                                  self._timeout_s)

    def send(self, req: pb.ReplyRequest) -> pb.ReplyResponse:
        resp: pb.ReplyResponse = self.send_async(req).result()
        return resp

    def close(self, close_metadata: bool = False) -> None:
        """Close its streams (and the metadata cache it was given, if `close_metadata`)."""
        self._metadata.release_streams(self._streams)
        if close_metadata:
            self._metadata.close()


def reply_headers(message: QueueMessage) -> tuple[str, str] | None:
    """(reply_to, correlation_id) of a request, None for a message that is no request."""
    reply_to, corr = message.header(REPLY_TO_HEADER), message.header(CORRELATION_ID_HEADER)
    if reply_to is None or corr is None:
        return None
    return reply_to.decode("utf-8", "replace"), corr.decode("utf-8", "replace")


def settle_replied(sender: ReplySender, message: QueueMessage, result: Any) -> bool:
    """Send the reply for `message` (if it is a request) and settle it as the module doc says; True
    when it was acknowledged."""
    route = reply_headers(message)
    if route is None:
        message.ack()
        return True
    return settle_sent(message, route[0], _send(sender, route, result))


def _send(sender: ReplySender, route: tuple[str, str], result: Any) -> Any:
    """The future of a reply, or the exception that kept it from being sent."""
    try:
        return sender.send_async(reply_request(route[0], route[1], result))
    except Exception as e:
        return e


def settle_sent(message: QueueMessage, reply_to: str, sent: Any) -> bool:
    """Settle a request once its reply's future (or the exception of sending it) is in; True when
    it was acknowledged."""
    try:
        if isinstance(sent, Exception):
            raise sent
        resp = sent.result()
    except Exception as e:  # no broker answered: another member may do better later
        log.warning("reply to %s could not be sent (%s); releasing the request", reply_to, e)
        message.release()
        return False
    if resp.error_code == pb.REPLY_TOO_LARGE:
        message.reject(resp.error_message)
        return False
    if resp.error_code not in (pb.NONE, pb.UNKNOWN_REPLY_TO):
        log.warning("reply to %s refused: %s %s; releasing the request", reply_to,
                    pb.ErrorCode.Name(resp.error_code), resp.error_message)
        message.release()
        return False
    message.ack()
    return True


class Responder:
    """Answers the requests on `topic` with `handler`, as a member of share group `group`."""

    def __init__(self, bootstrap: str | Sequence[str] | MetadataCache, topic: str, group: str, handler: Handler, *,
                 lock_ms: int | None = None, max_poll_records: int = 100, poll_timeout_ms: int = 500,
                 auto_offset_reset: str = "latest", request_timeout_ms: int = 30_000, **queue_options: Any) -> None:
        self._metadata, self._owns_metadata = metadata_for(bootstrap, request_timeout_ms, 100)
        self._consumer = QueueConsumer(self._metadata, group, [topic], lock_ms=lock_ms,
                                       max_poll_records=max_poll_records, auto_offset_reset=auto_offset_reset,
                                       request_timeout_ms=request_timeout_ms, **queue_options)
        self._sender_timeout_s = 10.0
        self._sender = ReplySender(self._metadata, self._sender_timeout_s)
        self._inflight = 0  # replies sent by run() whose answer has not come yet
        self._inflight_cond = threading.Condition()
        self._handler = handler
        self.poll_timeout_ms = poll_timeout_ms
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.handled = 0  # requests answered and acknowledged
        self.failed = 0  # handler errors and refused replies

    def serve_once(self, timeout_ms: int | None = None) -> int:
        """One poll and the requests it returned; how many were acknowledged. The replies of one poll
        are sent one after another without waiting (pipelined), then each request is settled on its
        reply's answer."""
        done = 0
        sent: list[tuple[QueueMessage, str, Any]] = []
        for message in self._consumer.poll(self.poll_timeout_ms if timeout_ms is None else timeout_ms):
            try:
                result = self._handler(message)
            except Exception:
                log.exception("responder handler failed on %s-%d@%d; releasing it", message.topic,
                              message.partition, message.offset)
                self.failed += 1
                message.release()
                continue
            route = reply_headers(message)
            if route is None:
                message.ack()
                done += 1
            else:
                sent.append((message, route[0], _send(self._sender, route, result)))
        for message, reply_to, fut in sent:
            if settle_sent(message, reply_to, fut):
                done += 1
            else:
                self.failed += 1
        self.handled += done
        return done

    def run(self) -> None:
        """Serve until stop() (or close() from another thread), pipelined: the next poll goes out as
        soon as a poll's replies are sent, and each request is settled when its reply's answer comes
        (on the reply connection's thread), so its acknowledgement rides on a later poll. On the way
        out it waits for the replies still in flight, so close() commits their settles."""
        try:
            while not self._stop.is_set():
                self._serve_pipelined()
        finally:
            self._drain(self._sender_timeout_s)

    def _serve_pipelined(self) -> None:
        for message in self._consumer.poll(self.poll_timeout_ms):
            try:
                result = self._handler(message)
            except Exception:
                log.exception("responder handler failed on %s-%d@%d; releasing it", message.topic,
                              message.partition, message.offset)
                self._count(False)
                message.release()
                continue
            route = reply_headers(message)
            if route is None:
                message.ack()
                self._count(True)
                continue
            sent = _send(self._sender, route, result)
            if isinstance(sent, Exception):
                self._count(settle_sent(message, route[0], sent))
                continue
            with self._inflight_cond:
                self._inflight += 1
            sent.add_done_callback(lambda fut, m=message, reply_to=route[0]: self._on_answer(m, reply_to, fut))

    def _on_answer(self, message: QueueMessage, reply_to: str, fut: Any) -> None:
        """A reply's answer came (on the reply connection's thread): settle its request."""
        try:
            self._count(settle_sent(message, reply_to, fut))
        except Exception:  # settled already (the consumer rejoined): nothing to do
            log.debug("settling %s-%d@%d after its reply failed", message.topic, message.partition, message.offset,
                      exc_info=True)
        finally:
            with self._inflight_cond:
                self._inflight -= 1
                if self._inflight == 0:
                    self._inflight_cond.notify_all()

    def _count(self, acked: bool) -> None:
        with self._inflight_cond:
            if acked:
                self.handled += 1
            else:
                self.failed += 1

    def _drain(self, timeout_s: float) -> None:
        """Wait (at most `timeout_s`) for the replies in flight to be answered and settled."""
        with self._inflight_cond:
            self._inflight_cond.wait_for(lambda: self._inflight == 0, timeout_s)

    def start(self) -> Responder:
        """Serve on a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="logbroker-responder", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.poll_timeout_ms / 1000 + 30)

    def close(self) -> None:
        """Stop serving, send the pending acknowledgements, leave the group."""
        self.stop()
        self._consumer.close()
        self._sender.close()
        if self._owns_metadata:
            self._metadata.close()

    def __enter__(self) -> Responder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
