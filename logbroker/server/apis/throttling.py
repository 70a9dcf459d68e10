"""Client quotas enforced in the request layer (`BrokerApis.handle`): every call of a caller with a
quota (security/quotas.py) is measured and, over quota, its answer is delayed — never dropped.

Measured per call, after it ran (as Kafka): Produce the bytes of its record batches
(`producer_byte_rate`), Fetch the bytes of its response (`consumer_byte_rate`), and every call the
time it spent on the event loop (`request_percentage`: the coroutine's steps are timed, so a
long-poll fetch's wait in the purgatory costs nothing). The throttle time is the larger of the
byte and request throttles; the broker sleeps `min(throttle, max_delay_ms)` (an asyncio sleep:
the loop keeps serving everyone else) and reports the whole throttle in the response's
`throttle_time_ms` (Produce, Fetch), so a client that honours it waits out the rest before its
next request to this broker (client/throttle.py). Other APIs are only delayed. A call of the same
(user, client id) that arrives while it is throttled waits for the throttle's end (bounded the same)
before it runs: Kafka mutes the connection; here requests are pipelined (the record transport runs
a connection's requests concurrently), so the wait is per caller. At most `MAX_CALLERS` throttle
ends are remembered (the oldest forgotten first).

Not measured: calls of other brokers (they present the cluster secret: follower fetches, share
groups' reads of remote partitions), nor a Fetch with a replica id (refused by the fetch path
without the secret). The user of a quota is the connection's principal without its ``User:`` prefix
(``ANONYMOUS`` without authentication); the client id is `RequestContext.client_id` ("" when the
client gave none; "" matches only `<default>` client-id quotas).

With no quota configured at all the calls run untouched (one attribute test per call).

Layout: a throttled Fetch response is already serialized; its `throttle_time_ms` (field 2, varint)
is appended to the bytes, which protobuf reads as the field's value (a later field wins).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Generator
from typing import Any

from google.protobuf.message import Message

from logbroker.clock import Clock, SystemClock
from logbroker.security.quotas import QuotaKind, QuotaManager
from logbroker.server.request_context import RequestContext
from logbroker.v1 import logbroker_pb2 as pb

DEFAULT_MAX_DELAY_MS = 12_000  # twice it stays under the clients' 30 s request timeout (a request may
# wait for its caller's throttle, then its own); a client waits out the rest of a longer throttle
MAX_CALLERS = 10_000
_THROTTLE_FIELD_TAG = b"\x10"  # field 2, wire type 0 (varint): FetchResponse.throttle_time_ms


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def with_throttle(response: Message | bytes, throttle_ms: int) -> Message | bytes:
    """The response with `throttle_time_ms` set (Produce, Fetch); others unchanged."""
    if isinstance(response, bytes | bytearray | memoryview):
        return bytes(response) + _THROTTLE_FIELD_TAG + _varint(throttle_ms)
    if isinstance(response, pb.ProduceResponse | pb.FetchResponse):
        response.throttle_time_ms = throttle_ms
    return response


class _Timed:
    """Awaits a call and adds up the time its steps ran on the loop (ms)."""

    __slots__ = ("_call", "loop_ms")

    def __init__(self, call: Awaitable[Any]) -> None:
        self._call = call
        self.loop_ms = 0.0

    def __await__(self) -> Generator[Any, Any, Any]:
        it = self._call.__await__()
        value: Any = None
        exc: BaseException | None = None
        while True:
            t0 = time.perf_counter()
            try:
                step = it.throw(exc) if exc is not None else it.send(value)
            except StopIteration as stop:
                return stop.value
            finally:
                self.loop_ms += (time.perf_counter() - t0) * 1000.0
            try:
                value, exc = (yield step), None
            except BaseException as e:  # cancellation goes into the call
                value, exc = None, e


def user_of(context: RequestContext) -> str:
    p = context.principal
    return p[5:] if p.startswith("User:") else p


class ClientQuotas:
    """The broker's quota state (updated by server/quota_cache.py) and its enforcement."""

    def __init__(self, manager: QuotaManager, clock: Clock | None = None,
                 max_delay_ms: int = DEFAULT_MAX_DELAY_MS, cluster_secret: bytes = b"") -> None:
        self.manager = manager
        self._cluster_secret = cluster_secret
        self._clock = clock or SystemClock()
        self._max_delay_ms = max_delay_ms
        self._until: OrderedDict[tuple[str, str], int] = OrderedDict()  # caller -> throttled until (monotonic ms)
        self.throttled_calls = 0  # how many answers were delayed (tests, metrics)

    @property
    def active(self) -> bool:
        return self.manager.size > 0

    def applies(self, api: str, context: RequestContext, request: Message) -> bool:
        if not self.active or (api == "Fetch" and getattr(request, "replica_id", -1) >= 0):
            return False
        presented = context.presented_cluster_secret
        return not (self._cluster_secret and presented is not None
                    and hmac.compare_digest(presented, self._cluster_secret))

    async def run(self, api: str, context: RequestContext, request: Message,
                  call: Awaitable[Message | bytes]) -> Message | bytes:
        caller = (user_of(context), context.client_id)
        until = self._until.get(caller)
        if until is not None:
            wait_ms = until - self._clock.monotonic_ms()
            if wait_ms > 0:  # the caller is throttled: this call runs when that ends
                await asyncio.sleep(min(wait_ms, self._max_delay_ms) / 1000.0)
            else:
                del self._until[caller]
        timed = _Timed(call)
        response = await timed
        throttle = self._record(api, caller, request, response, timed.loop_ms)
        if throttle <= 0:
            return response
        self.throttled_calls += 1
        self._until[caller] = self._clock.monotonic_ms() + throttle
        self._until.move_to_end(caller)
        while len(self._until) > MAX_CALLERS:
            self._until.popitem(last=False)
        await asyncio.sleep(min(throttle, self._max_delay_ms) / 1000.0)
        return with_throttle(response, throttle)

    def _record(self, api: str, caller: tuple[str, str], request: Message, response: Message | bytes,
                loop_ms: float) -> int:
        """Record the call's usage; its throttle time (ms)."""
        user, client_id = caller
        now = self._clock.monotonic_ms()
        throttle = self.manager.record(QuotaKind.REQUEST, user, client_id, loop_ms / 10.0, now)
        if api == "Produce":
            size = sum(len(p.records) for p in request.partitions)
            throttle = max(throttle, self.manager.record(QuotaKind.PRODUCE, user, client_id, size, now))
        elif api == "Fetch":
            size = len(response) if isinstance(response, bytes) else response.ByteSize()
            throttle = max(throttle, self.manager.record(QuotaKind.FETCH, user, client_id, size, now))
        return throttle
