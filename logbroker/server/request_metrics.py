"""Request metrics: what every client call costs and carries, counted on the broker's event loop.

`BrokerApis.handle` (server/apis/broker_apis.py) calls `started` once per call on every listener
(gRPC and the record transport) and times the API call with `timed`; Produce and Fetch report their
partitions' outcome (`produced`, `fetched`). Every update is a few dict increments per call or per
partition of a call: nothing is done per record (record counts come from the append's result and
from batch headers, never from decoding records). Everything here runs on the broker's event loop;
`snapshot()` copies it there for a scrape (server/metrics.py renders it).

| metric | type | meaning |
|---|---|---|
| `logbroker_requests_total{api}` | counter | client calls, by API (the gRPC method names) |
| `logbroker_request_errors_total{api,error}` | counter | failed calls and failed partition results: `error` is the ErrorCode name of a partition result, or the RequestStatus name (PERMISSION_DENIED, RESOURCE_EXHAUSTED, ...) of a refused call, or `INTERNAL` for an unexpected exception; both enums, so bounded |
| `logbroker_request_duration_seconds{api}` | histogram | time from the API's start to its response (long-poll waits included; client quota delays and the listener's framing not) |
| `logbroker_topic_bytes_in_total{topic}` | counter | record bytes appended by Produce (successful partitions; an idempotent producer's resent duplicate, not appended again, is not counted) |
| `logbroker_topic_records_in_total{topic}` | counter | records appended by Produce (the append's record count, from the batch headers) |
| `logbroker_topic_bytes_out_total{topic}` | counter | record bytes sent to consumers by Fetch (follower fetches not counted) |
| `logbroker_topic_records_out_total{topic}` | counter | records in the batches sent by Fetch, from the batch headers' recordCount: a fetch from the middle of a batch sends (and counts) the whole batch, and a filtered fetch counts what passed the filter |

Topic labels are bounded: the first `TOPIC_LABELS_MAX` topic names seen keep their name, later ones
are counted under `topic="_other"` (until the broker restarts); internal topics (`__` prefix, not
the priority levels' `__priority.<k>.<topic>`, which count as their topic's kind) always keep theirs.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from google.protobuf.message import Message

from logbroker.cluster.priority_levels import is_level_topic
from logbroker.errors import ErrorCode
from logbroker.server.request_context import RequestRejected
from logbroker.storage.record_batch import count_records

TOPIC_LABELS_MAX = 1000
OTHER_TOPIC = "_other"
# request latency buckets, seconds (Prometheus' defaults from 0.5 ms; long polls reach the top ones)
DURATION_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
INTERNAL_ERROR = "INTERNAL"

T = TypeVar("T")


class TopicLabels:
    """Topic name -> its metric label, bounded (pure)."""

    def __init__(self, labels_max: int = TOPIC_LABELS_MAX) -> None:
        self._labels_max = labels_max
        self._named: set[str] = set()

    def label(self, topic: str) -> str:
        if topic in self._named:
            return topic
        if topic.startswith("__") and not is_level_topic(topic):
            return topic  # internal: a handful, always named
        if len(self._named) < self._labels_max:
            self._named.add(topic)
            return topic
        return OTHER_TOPIC


class Histogram:
    """A fixed-bucket histogram (not thread-safe: one thread observes and snapshots)."""

    def __init__(self, bounds: tuple[float, ...] = DURATION_BUCKETS_S) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket (not cumulative); the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def snapshot(self) -> HistogramSnapshot:
        cumulative: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramSnapshot(tuple(cumulative), self.sum)


@dataclass(frozen=True)
class HistogramSnapshot:
    buckets: tuple[tuple[str, int], ...]  # (upper bound as text, cumulative count), the last "+Inf"
    sum: float


@dataclass(frozen=True)
class RequestMetricsSnapshot:
    requests: dict[str, int]
    errors: dict[tuple[str, str], int]
    durations: dict[str, HistogramSnapshot]
    topics_in: dict[str, tuple[int, int]]  # label -> (bytes, records)
    topics_out: dict[str, tuple[int, int]]


_ERROR_NAMES: dict[int, str] = {}


def error_name(code: int) -> str:
    name = _ERROR_NAMES.get(code)
    if name is None:
        try:
            name = ErrorCode.Name(code)
        except ValueError:
            name = f"CODE_{int(code)}" if 0 <= code < 1000 else "UNKNOWN_CODE"  # bounded all the same
        _ERROR_NAMES[code] = name
    return name


class RequestMetrics:
    def __init__(self, topic_labels_max: int = TOPIC_LABELS_MAX, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock if clock is not None else time.perf_counter
        self.requests: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}
        self.durations: dict[str, Histogram] = {}
        self.topics = TopicLabels(topic_labels_max)
        self.topics_in: dict[str, list[int]] = {}  # label -> [bytes, records]
        self.topics_out: dict[str, list[int]] = {}

    def started(self, api: str) -> None:
        self.requests[api] = self.requests.get(api, 0) + 1

    def error(self, api: str, name: str, count: int = 1) -> None:
        key = (api, name)
        self.errors[key] = self.errors.get(key, 0) + count

    def rejected(self, api: str, exc: BaseException) -> None:
        self.error(api, exc.status.name if isinstance(exc, RequestRejected) else INTERNAL_ERROR)

    async def timed(self, api: str, call: Awaitable[T]) -> T:
        """Await the API call, timing it; a refused call counts as an error of its status, a
        response's failed partition results (a `results` field with `error_code`) each as theirs."""
        start = self._clock()
        try:
            response = await call
        except Exception as exc:
            self.rejected(api, exc)
            raise
        finally:
            histogram = self.durations.get(api)
            if histogram is None:
                histogram = self.durations[api] = Histogram()
            histogram.observe(self._clock() - start)
        if isinstance(response, Message) and api != "Produce":  # Produce reports its own (produced)
            results = getattr(response, "results", None)
            if results is not None:
                self.partition_errors(api, (getattr(r, "error_code", 0) for r in results))
        return response

    def partition_errors(self, api: str, codes: Iterable[int]) -> None:
        for code in codes:
            if code:
                self.error(api, error_name(code))

    def produced(self, topic: str, nbytes: int, records: int) -> None:
        """One partition's successful append."""
        _add(self.topics_in, self.topics.label(topic), nbytes, records)

    def produce_failed(self, code: int) -> None:
        self.error("Produce", error_name(code))

    def fetched(self, topic: str, records: memoryview | bytes) -> None:
        """One partition's records sent to a consumer (whole batches)."""
        _add(self.topics_out, self.topics.label(topic), len(records), count_records(records))

    def fetch_failed(self, code: int) -> None:
        self.error("Fetch", error_name(code))

    def snapshot(self) -> RequestMetricsSnapshot:
        return RequestMetricsSnapshot(
            dict(self.requests), dict(self.errors), {api: h.snapshot() for api, h in self.durations.items()},
            {t: (v[0], v[1]) for t, v in self.topics_in.items()}, {t: (v[0], v[1]) for t, v in self.topics_out.items()})


def _add(table: dict[str, list[int]], label: str, nbytes: int, records: int) -> None:
    row = table.get(label)
    if row is None:
        table[label] = [nbytes, records]
    else:
        row[0] += nbytes
        row[1] += records
