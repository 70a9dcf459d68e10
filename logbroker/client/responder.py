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
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import grpc

from logbroker.client.metadata_cache import MetadataCache, metadata_for
from logbroker.client.queue import QueueConsumer, QueueMessage
from logbroker.client.requester import CORRELATION_ID_HEADER, REPLY_TO_HEADER
from logbroker.client.streams import REPLY_BATCH_STREAM, REPLY_STREAM
from logbroker.errors import LogbrokerError
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
    broker named by their reply_to, else any; `send_batch_async` many in one ReplyBatch call."""

    def __init__(self, metadata: MetadataCache, timeout_s: float = 10.0) -> None:
        self._metadata = metadata
        self._streams = metadata.client_streams()
        self._timeout_s = timeout_s
        self._refreshed = False
        self.batches = True  # False once a broker answered ReplyBatch UNIMPLEMENTED (an older one)

    def _address(self, reply_to: str) -> str:
        if not self._refreshed:  # the brokers' record-transport addresses (a share consumer never asked)
            self._metadata.refresh([])
            self._refreshed = True
        broker, _, _ = reply_to.partition(":")
        address = self._metadata.brokers().get(int(broker)) if broker.isdigit() else None
        return address or self._metadata.any_address()

    def send_async(self, req: pb.ReplyRequest) -> Any:
        """A future of the broker's answer (its result() raises grpc.RpcError when none answered)."""
        return self._streams.send(REPLY_STREAM, pb.ReplyResponse, self._address(req.reply_to), req, self._timeout_s)

    def send_batch_async(self, replies: Sequence[pb.ReplyRequest]) -> Any:
        """A future of the ReplyBatchResponse for `replies`, sent in one call to the broker the first
        one's reply_to names (the caller groups them by broker: `reply_broker`)."""
        batch = pb.ReplyBatchRequest()
        batch.replies.extend(replies)
        return self._streams.send(REPLY_BATCH_STREAM, pb.ReplyBatchResponse, self._address(replies[0].reply_to), batch,
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
        return settle_answer(message, reply_to, e)
    return settle_answer(message, reply_to, resp)


def settle_answer(message: QueueMessage, reply_to: str, resp: pb.ReplyResponse | Exception) -> bool:
    """Settle a request by its reply's answer (or the exception that kept it from one); True when
    it was acknowledged."""
    if isinstance(resp, Exception):
        log.warning("reply to %s could not be sent (%s); releasing the request", reply_to, resp)
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


class _Outgoing(NamedTuple):
    """A request's reply, to be sent."""

    message: QueueMessage
    reply_to: str
    reply: pb.ReplyRequest


def _send_one(sender: ReplySender, o: _Outgoing) -> Any:
    """The future of one Reply, or the exception that kept it from being sent."""
    try:
        return sender.send_async(o.reply)
    except Exception as e:
        return e


def _unimplemented(e: Exception) -> bool:
    code = getattr(e, "code", None)
    return callable(code) and code() == grpc.StatusCode.UNIMPLEMENTED


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
        go out in one ReplyBatch per broker, then each request is settled on its reply's answer."""
        before = self.handled
        out = self._handle(self._consumer.poll(self.poll_timeout_ms if timeout_ms is None else timeout_ms))
        for group, sent, batch in self._send_replies(out):
            self._settle_group(group, sent, batch, wait=True)
        return self.handled - before

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
        out = self._handle(self._consumer.poll(self.poll_timeout_ms))
        for group, sent, batch in self._send_replies(out):
            self._settle_later(group, sent, batch)

    def _handle(self, messages: list[QueueMessage]) -> list[_Outgoing]:
        """Run the handler on each message; the replies to send (a message that is no request is
        acknowledged here, one whose handler raised released)."""
        out: list[_Outgoing] = []
        for message in messages:
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
            try:
                reply = reply_request(route[0], route[1], result)
            except Exception as e:  # a return value that is no reply
                self._count(settle_answer(message, route[0], e))
                continue
            out.append(_Outgoing(message, route[0], reply))
        return out

    def _send_replies(self, out: list[_Outgoing]) -> list[tuple[list[_Outgoing], Any, bool]]:
        """Send the replies: one ReplyBatch per broker named (one Reply each once a broker refused
        batches); (the replies, the future of their answer or the exception of sending, whether
        it is a batch)."""
        sender = self._sender
        if not sender.batches:
            return [([o], _send_one(sender, o), False) for o in out]
        groups: defaultdict[str, list[_Outgoing]] = defaultdict(list)
        for o in out:
            groups[o.reply_to.partition(":")[0]].append(o)
        sent: list[tuple[list[_Outgoing], Any, bool]] = []
        for group in groups.values():
            try:
                sent.append((group, sender.send_batch_async([o.reply for o in group]), True))
            except Exception as e:
                sent.append((group, e, True))
        return sent

    def _settle_later(self, group: list[_Outgoing], sent: Any, batch: bool) -> None:
        """Settle `group` when the answer of `sent` comes (on the reply connection's thread)."""
        if isinstance(sent, Exception):
            self._settle_group(group, sent, batch, wait=False)
            return
        with self._inflight_cond:
            self._inflight += 1
        sent.add_done_callback(lambda fut: self._on_answer(group, fut, batch))

    def _settle_group(self, group: list[_Outgoing], sent: Any, batch: bool, wait: bool) -> None:
        """Settle the requests of `group` by the answer of `sent` (a ReplyBatch's if `batch`, else
        one Reply's); a broker without ReplyBatch gets them again one Reply each, and no sender
        batches any more."""
        answers: list[pb.ReplyResponse | Exception]
        try:
            if isinstance(sent, Exception):
                raise sent
            resp = sent.result()
            answers = list(resp.results) if batch else [resp]
            if len(answers) != len(group):
                raise LogbrokerError(f"{len(answers)} answers to {len(group)} replies")
        except Exception as e:
            if not (batch and _unimplemented(e)):
                answers = [e] * len(group)
            else:
                if self._sender.batches:
                    log.info("a broker has no ReplyBatch: sending one Reply per request from now on")
                    self._sender.batches = False
                for o in group:
                    one = _send_one(self._sender, o)
                    if wait:
                        self._settle_group([o], one, False, wait)
                    else:
                        self._settle_later([o], one, False)
                return
        for o, answer in zip(group, answers, strict=True):
            try:
                self._count(settle_answer(o.message, o.reply_to, answer))
            except Exception:  # settled already (the consumer rejoined): nothing to do
                log.debug("settling %s-%d@%d after its reply failed", o.message.topic, o.message.partition,
                          o.message.offset, exc_info=True)

    def _on_answer(self, group: list[_Outgoing], fut: Any, batch: bool) -> None:
        """A reply batch's answer came (on the reply connection's thread): settle its requests."""
        try:
            self._settle_group(group, fut, batch, wait=False)
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
