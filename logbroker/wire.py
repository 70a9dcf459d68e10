"""The record transport: Produce and Fetch as length-prefixed frames on a plain TCP connection.

gRPC carries every API; this second listener carries only the two on the data path, because of
where a synchronous gRPC client spends its time: each message crosses about three threads per
direction (the caller, gRPC's writer or poller, the completion queue), and on this 2-core machine
those hand-offs are most of a produce-to-consume latency (measured: a bare gRPC bidi ping-pong is
p50 0.15 / p99 0.24 ms; a length-prefixed TCP round trip in the calling thread p50 0.05). Here the
caller writes the frame itself, one reader thread per connection completes the futures, and on the
broker the frames are read and answered on its event loop by the same handlers gRPC calls.

Request frame, client -> broker (integers big-endian):

    offset  size  field
    0       4     size   bytes after this field = 5 + len(body); 5 <= size <= 5 + max_request_bytes
    4       1     api    API_PRODUCE (1), API_FETCH (2), API_REPLY (3), API_REPLY_STREAM (4),
                         API_SASL_AUTHENTICATE (5), API_SHARE_FETCH (6), API_SHARE_ACKNOWLEDGE (7),
                         API_REPLY_BATCH (8) or API_CLIENT_ID (9)
    5       4     corr   correlation id, echoed by the response (the client numbers its requests)
    9       ...   body   the request message, protobuf (logbroker.v1.ProduceRequest / FetchRequest /
                         ReplyRequest / ReplyStreamRequest / SaslAuthenticateRequest /
                         ShareFetchRequest / ShareAcknowledgeRequest / ReplyBatchRequest); for
                         API_CLIENT_ID the client id in ASCII (logbroker/client_id.py), answered
                         with an empty body

Response frame, broker -> client:

    0       4     size   5 + len(body)
    4       4     corr   the request's correlation id
    8       1     status 0: body is the response message (ProduceResponse / FetchResponse / ...);
                         otherwise a gRPC status code number (INVALID_ARGUMENT = 3, ...), body its
                         message in UTF-8, exactly what the unary gRPC call would have ended with
    9       ...   body

A reply stream (request-reply, logbroker/server/reply_registry.py): a connection whose request is
API_REPLY_STREAM becomes a push channel. The broker answers with one frame (status 0, the request's
correlation id) whose body is a ReplyRequest carrying only reply_to, the stream's address
"<broker_id>:<token>"; then, for as long as the connection lives, one frame of that correlation id per
reply addressed to it (body: the ReplyRequest the responder sent). The client sends nothing more on
it; the broker reads it only to notice EOF, and does not close it for being idle.

SASL (logbroker/server/sasl.py): on a broker with --sasl-mechanisms, a connection without a verified
client certificate sends two API_SASL_AUTHENTICATE frames first (client-first, then client-final;
each answered with a SaslAuthenticateResponse carrying server-first, then server-final). Until the
second succeeds, any other frame is answered UNAUTHENTICATED, and a frame over 4 KiB is refused
(RESOURCE_EXHAUSTED) and closes the connection. A refused exchange is answered UNAUTHENTICATED
(after a delay) and the broker closes the connection.

Client id (logbroker/client_id.py): a client sends one API_CLIENT_ID frame right after connecting
(after TLS and SASL); every later request of the connection carries that id in its RequestContext. A
malformed id is answered INVALID_ARGUMENT (the connection goes on, without an id).

A connection answers in request order. A request refused whole (malformed body, unknown api, broker
not ready) gets its status and the connection goes on, since framing is intact. A frame whose size
is out of bounds cannot be skipped without reading it: the broker answers RESOURCE_EXHAUSTED (or
INVALID_ARGUMENT for a size below 5) with the frame's correlation id and closes the connection.

Overload (server/admission.py): a request refused because the broker's bounds on in-flight work are
passed gets RESOURCE_EXHAUSTED whose message ends with `(retry-after-ms=N)`, the broker's hint of how
long to wait; the connection goes on. gRPC carries the same message, and the hint also as trailing
metadata `retry-after-ms`. A RESOURCE_EXHAUSTED without the hint (a request over max_request_bytes)
is final; with it, retriable (`retry_after_ms` below reads it).
"""

from __future__ import annotations

import re
import struct

import grpc

API_PRODUCE = 1
API_FETCH = 2
API_REPLY = 3
API_REPLY_STREAM = 4
API_SASL_AUTHENTICATE = 5
API_SHARE_FETCH = 6  # a share-group member's fetch (queues): its round trip is request-reply's
API_SHARE_ACKNOWLEDGE = 7
API_REPLY_BATCH = 8  # a responder's replies of one poll (ReplyBatchRequest)
API_CLIENT_ID = 9  # the connection's client id (body: the id in ASCII; answer: empty)

REQUEST_HEADER = struct.Struct(">IBI")  # size, api, corr
RESPONSE_HEADER = struct.Struct(">IIB")  # size, corr, status
HEADER_BYTES = 9  # both headers: size field (4) + 5 counted in size
SIZE_MIN = 5  # a frame with an empty body
CORRELATION_MASK = 0xFFFFFFFF

STATUS_OK = 0
_STATUS_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def request_header(api: int, corr: int, body_bytes: int) -> bytes:
    return REQUEST_HEADER.pack(SIZE_MIN + body_bytes, api, corr & CORRELATION_MASK)


def response_header(corr: int, status: int, body_bytes: int) -> bytes:
    return RESPONSE_HEADER.pack(SIZE_MIN + body_bytes, corr & CORRELATION_MASK, status)


def status_number(code: grpc.StatusCode) -> int:
    return int(code.value[0])


def status_code(number: int) -> grpc.StatusCode:
    """The gRPC status a response's status byte stands for (UNKNOWN for a number gRPC has not)."""
    return _STATUS_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def error_frame(corr: int, code: grpc.StatusCode, message: str) -> bytes:
    body = message.encode("utf-8", "replace")[:4096]
    return response_header(corr, status_number(code), len(body)) + body


RETRY_AFTER_METADATA = "retry-after-ms"  # gRPC trailing metadata of an overload refusal
_RETRY_AFTER = re.compile(r"\(retry-after-ms=(\d{1,9})\)$")


def with_retry_after(message: str, retry_after_ms: int) -> str:
    """An overload refusal's message, its retry-after hint at the end (see the module doc)."""
    return f"{message} (retry-after-ms={max(0, retry_after_ms)})"


def retry_after_ms(message: str) -> int | None:
    """The retry-after hint at the end of a refusal's message; None: it has none (not an overload)."""
    found = _RETRY_AFTER.search(message)
    return int(found.group(1)) if found else None
