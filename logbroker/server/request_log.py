"""The request log: who a log line is about, and one WARNING per slow request.

`RequestLog.run(api, context, request, call)` wraps one call of the request layer
(`BrokerApis.handle`): while it runs, log_format.REQUEST_FIELDS holds the caller's fields (api,
client_id, principal, peer, listener), so every line logged meanwhile on that task carries them in
`--log-format json` (tasks the call starts copy them too); and a call that takes longer than
`slow_request_ms` logs one WARNING on the `logbroker.request` logger:

    slow request: Produce took 1532 ms (client_id=billing-7 principal=User:bob partitions=3 topics=1)

with the fields api, duration_ms, client_id, principal, peer, listener, topics and partitions
(counted from the request's `partitions`/`topics`; only for slow calls). A long-poll's own wait is
not slowness: a Fetch or ShareFetch is slow beyond `slow_request_ms + max_wait_ms`. The time is the
call's own (the API and its purgatory wait), without a client quota's throttle delay. A fast
request costs one coroutine frame, a small object, two clock reads and a context variable set and
reset (about 1.3 us here); the fields themselves are built only when a line is formatted.
`slow_request_ms` 0: no slow lines (the context is still set).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from google.protobuf.message import Message

from logbroker.log_format import REQUEST_FIELDS
from logbroker.server.request_context import RequestContext

log = logging.getLogger("logbroker.request")

Response: TypeAlias = Message | bytes


def request_fields(api: str, context: RequestContext) -> dict[str, Any]:
    """The caller's fields a log line carries while its request is handled."""
    return {"api": api, "client_id": context.client_id, "principal": context.principal, "peer": context.peer,
            "listener": context.listener}


def request_size(request: Message) -> dict[str, int]:
    """{"topics": n, "partitions": n} of a request, as far as its fields tell ({} when they do not)."""
    out: dict[str, int] = {}
    parts = getattr(request, "partitions", None)
    if parts is not None and not isinstance(parts, (int, str, bytes)):
        out["partitions"] = len(parts)
        out["topics"] = len({getattr(p, "topic", "") for p in parts})
    topics = getattr(request, "topics", None)
    if topics is not None and not isinstance(topics, (int, str, bytes)):
        out["topics"] = len(topics)
    names = getattr(request, "names", None)
    if "topics" not in out and names is not None and not isinstance(names, (str, bytes)):
        out["topics"] = len(names)
    return out


def _wait_allowed_ms(request: Message) -> int:
    """A long-poll's requested wait (Fetch, ShareFetch: max_wait_ms), else 0."""
    wait = getattr(request, "max_wait_ms", 0)
    return wait if isinstance(wait, int) and wait > 0 else 0


class _Current:
    """The request a task is handling (log_format.RequestFields): its fields are built only when a line
    is formatted, so a request that logs nothing pays for this object only."""

    __slots__ = ("api", "context")

    def __init__(self, api: str, context: RequestContext) -> None:
        self.api = api
        self.context = context

    def log_fields(self) -> dict[str, Any]:
        return request_fields(self.api, self.context)


class RequestLog:
    """Sets the request's log fields around each call, and logs the slow ones."""

    def __init__(self, slow_request_ms: int, clock: Callable[[], float] = time.monotonic) -> None:
        if slow_request_ms < 0:
            raise ValueError(f"slow_request_ms must be >= 0, got {slow_request_ms}")
        self.slow_request_ms = slow_request_ms
        self._clock = clock

    async def run(self, api: str, context: RequestContext, request: Message, call: Awaitable[Response]) -> Response:
        token = REQUEST_FIELDS.set(_Current(api, context))
        start = self._clock()
        try:
            return await call
        finally:
            if self.slow_request_ms:
                elapsed_ms = (self._clock() - start) * 1000.0
                if elapsed_ms > self.slow_request_ms and elapsed_ms > self.slow_request_ms + _wait_allowed_ms(request):
                    self._log_slow(api, context, request, elapsed_ms)
            REQUEST_FIELDS.reset(token)

    def _log_slow(self, api: str, context: RequestContext, request: Message, elapsed_ms: float) -> None:
        size = request_size(request)
        fields: dict[str, Any] = {**request_fields(api, context), "duration_ms": round(elapsed_ms), **size}
        details = " ".join(f"{k}={v}" for k, v in (("client_id", context.client_id or "-"),
                                                     ("principal", context.principal), *size.items()))
        log.warning("slow request: %s took %d ms (%s)", api, round(elapsed_ms), details, extra={"fields": fields})
