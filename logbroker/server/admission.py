"""Admission of client requests: bounds on the work a broker holds at once (overload protection).

Every client call, on every listener (gRPC unary and stream messages, record-transport frames),
is admitted here before it is parsed and released when its handler ends (answered, refused or
cancelled): two counters, checked and moved in O(1), never a per-record cost.

    in-flight request bytes   the request bodies being handled (their memory, held until the
                              handler ends)                  <= request_bytes_max
    in-flight requests        calls being handled, long-polls parked in a purgatory included
                                                             <= requests_max

A request that would pass a bound is refused with RESOURCE_EXHAUSTED and a retry-after hint
(`retry_after_ms`; logbroker/wire.py says how each transport carries it) instead of waiting in a
queue: the client backs off and may go elsewhere. One request bigger than `request_bytes_max` is
admitted when nothing else is in flight (max_request_bytes bounds it), so it is never refused
forever. What is not counted here: the bytes of a frame still arriving (bounded per connection by
max_request_bytes and connections by the connection gate), gRPC's own receive buffers (gRPC takes a
message in whole, and HTTP/2 lets a client send ahead, before a handler sees it: measured, 200
producers sending 768 KiB at once grow the broker's heap by ~75 MiB with a 1 MiB bound, mostly
there; what the refusals buy is that the clients back off instead of piling more on), and
inter-broker calls (replica fetches, the controller's calls: the cluster's own work is never refused).

Defaults, from the machine budget (docs: /work/shared/ARCHITECTURE.md "The budget"): a broker takes
in 300–800 MB/s of 1 MiB produce requests, so 128 MiB in flight is a quarter to half a second of
work: more only adds queueing delay, and it is 4 requests of the largest size (32 MiB). 4096 calls
in flight is over a second of tiny gRPC calls (1,500–3,700/s) while leaving room for thousands of
parked long-poll fetches. The hint, 100 ms, is about the time the in-flight bytes take to drain.

Refusals are counted (`refused_total`, the metric `logbroker_overload_refusals_total`) and logged with
at most one WARNING per REFUSED_WARNING_INTERVAL_S, saying how many it stands for.

Single-threaded: owned by the broker's event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from logbroker import wire
from logbroker.log_throttle import LogThrottle
from logbroker.server.request_context import RequestRejected, RequestStatus

INFLIGHT_REQUEST_BYTES_MAX = 128 << 20
INFLIGHT_REQUESTS_MAX = 4096
OVERLOAD_RETRY_AFTER_MS = 100
REFUSED_WARNING_INTERVAL_S = 10.0

log = logging.getLogger(__name__)


class Admission:
    """The in-flight counters of one broker and their bounds (0 or less: that bound is off)."""

    def __init__(self, request_bytes_max: int = INFLIGHT_REQUEST_BYTES_MAX,
                 requests_max: int = INFLIGHT_REQUESTS_MAX,
                 retry_after_ms: int = OVERLOAD_RETRY_AFTER_MS,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.request_bytes_max = request_bytes_max
        self.requests_max = requests_max
        self.retry_after_ms = retry_after_ms
        self.inflight_bytes = 0
        self.inflight_requests = 0
        self.refused_total = 0  # requests refused for overload, ever
        self._warnings = LogThrottle(REFUSED_WARNING_INTERVAL_S, monotonic=monotonic)

    def refusal(self, nbytes: int) -> str | None:
        """Why a request of `nbytes` cannot be admitted now; None: it can."""
        if 0 < self.requests_max <= self.inflight_requests:
            return f"broker overloaded: {self.inflight_requests} requests in flight (max {self.requests_max})"
        if (0 < self.request_bytes_max < self.inflight_bytes + nbytes) and self.inflight_requests > 0:
            return (f"broker overloaded: {self.inflight_bytes} request bytes in flight, {nbytes} more would "
                    f"pass max_inflight_request_bytes {self.request_bytes_max}")
        return None

    def admit(self, nbytes: int) -> None:
        """Count a request of `nbytes` in flight (call `release(nbytes)` once when its handler ends),
        or raise RequestRejected(RESOURCE_EXHAUSTED) carrying the retry-after hint."""
        why = self.refusal(nbytes)
        if why is not None:
            self.refused_total += 1
            count = self._warnings.event("overload")
            if count:
                log.warning("refused %d request(s) for overload since the last such line: %s", count, why)
            raise overloaded(why, self.retry_after_ms)
        self.inflight_bytes += nbytes
        self.inflight_requests += 1

    def release(self, nbytes: int) -> None:
        self.inflight_bytes -= nbytes
        self.inflight_requests -= 1

    def releaser(self, nbytes: int) -> Callable[[object], None]:
        """A done-callback for the task of an admitted request of `nbytes`: releases it."""
        def release(_task: object) -> None:
            self.release(nbytes)

        return release


def overloaded(why: str, retry_after_ms: int) -> RequestRejected:
    """The refusal of a request the broker has no room for (retriable, after `retry_after_ms`)."""
    return RequestRejected(RequestStatus.RESOURCE_EXHAUSTED, wire.with_retry_after(why, retry_after_ms),
                           retry_after_ms=retry_after_ms)
