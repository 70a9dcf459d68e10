"""The console's reads of the cluster, as a client: one Admin (its calls serialised by a lock, each
bounded by `request_timeout_ms`) and, for the message browser, a short-lived Consumer without a
group (assign, seek, poll until `count` records, the high watermark or the deadline).

The sampler thread looks at the cluster every `sample_interval_s`: one `describe_cluster` and one
`describe_topics` (kept as the previous snapshot, so pages show rates at the first view, as
`logbroker cluster stats --watch` does), then per consumer group (at most the history's
`groups_max`) `describe_group` + `group_lag`, whose total goes into the bounded LagHistory. A failed
sample is logged and skipped: the next one tries again."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from logbroker.client import Admin, Consumer
from logbroker.client.admin import GroupDescription, PartitionLag, TopicDescription
from logbroker.client.cluster_stats import Snapshot, stats
from logbroker.client.sasl import SaslConfig
from logbroker.console.views import BrowseQuery, LagHistory, PartitionRate, partition_rates, total_lag
from logbroker.errors import LogbrokerError, PermissionDeniedError, UnknownTopicOrPartitionError
from logbroker.storage.record_batch import Message
from logbroker.tls import TlsConfig

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_DEFAULT_S = 10.0
RATE_MIN_INTERVAL_S = 1.0  # a previous snapshot younger than this is too close for a rate
POLL_SLICE_MS = 200
DLQ_TOPICS_MAX = 50


@dataclass(frozen=True)
class ClientOptions:
    bootstrap: str
    tls: TlsConfig | None = None
    sasl: SaslConfig | None = None
    request_timeout_ms: int = 5_000


@dataclass(frozen=True)
class GroupView:
    description: GroupDescription
    lags: list[PartitionLag]


class ClusterReader:
    def __init__(self, options: ClientOptions, history: LagHistory,
                 sample_interval_s: float = SAMPLE_INTERVAL_DEFAULT_S) -> None:
        self.options = options
        self.history = history
        self.sample_interval_s = sample_interval_s
        self._admin = Admin(options.bootstrap, request_timeout_ms=options.request_timeout_ms, tls=options.tls,
                            sasl=options.sasl, client_id="logbroker-console")
        self._lock = threading.Lock()  # one Admin call at a time
        self._snapshots: deque[Snapshot] = deque(maxlen=2)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reads ---------------------------------------------------------------------------------

    def _snapshot(self, cluster_required: bool) -> Snapshot:
        """describe_cluster and describe_topics; a principal not allowed to describe the cluster still
        gets its topics (an empty cluster) unless `cluster_required`."""
        with self._lock:
            try:
                cluster = self._admin.describe_cluster()
            except PermissionDeniedError:
                if cluster_required:
                    raise
                cluster = {}
            topics = [t for t in self._admin.describe_topics() if not t.name.startswith("__")]
        return Snapshot(time.monotonic(), cluster, topics)

    def _previous(self, now_s: float) -> Snapshot | None:
        """The newest sampled snapshot at least RATE_MIN_INTERVAL_S old."""
        for s in reversed(self._snapshots):
            if now_s - s.taken_at_s >= RATE_MIN_INTERVAL_S:
                return s
        return None

    def overview(self, cluster_required: bool = True) -> dict[str, Any]:
        """`logbroker cluster stats`' data, with rates against the sampler's previous look."""
        current = self._snapshot(cluster_required)
        return stats(current, self._previous(current.taken_at_s), top=10)

    def topic(self, name: str) -> tuple[TopicDescription, dict[int, PartitionRate], dict[str, Any]]:
        with self._lock:
            current = self._admin.describe_topic(name)
        now = time.monotonic()
        previous = self._previous(now)
        before = None if previous is None else next((t for t in previous.topics if t.name == name), None)
        elapsed = None if previous is None else now - previous.taken_at_s
        return current, partition_rates(current, before, elapsed), {"elapsed_s": elapsed}

    def groups(self) -> list[Any]:
        with self._lock:
            return self._admin.list_groups()

    def group(self, name: str) -> GroupView:
        with self._lock:
            d = self._admin.describe_group(name)
            return GroupView(d, self._admin.group_lag(name, d))

    def queues(self) -> list[Any]:
        with self._lock:
            return self._admin.list_share_groups()

    def queue(self, name: str) -> tuple[dict[str, Any], list[TopicDescription]]:
        """describe_share_group, and the dead-letter topics of its topics that exist (the setting is a
        name or a template with "{topic}"; at most DLQ_TOPICS_MAX)."""
        with self._lock:
            d = self._admin.describe_share_group(name)
            template = d["settings"].get("dead_letter_topic") or ""
            names = sorted({template.replace("{topic}", p["topic"]) for p in d["partitions"]} if template else set())
            out = []
            for dlq in names[:DLQ_TOPICS_MAX]:
                try:
                    out.append(self._admin.describe_topic(dlq))
                except UnknownTopicOrPartitionError:
                    continue  # made at the first dead letter
            return d, out

    def browse(self, q: BrowseQuery) -> tuple[list[Message], TopicDescription]:
        """Up to q.count records of q.topic/q.partition from q.offset, within the request timeout."""
        with self._lock:
            t = self._admin.describe_topic(q.topic)
        parts = {p.partition: p for p in t.partitions}
        if q.partition not in parts:
            raise UnknownTopicOrPartitionError(f"topic {q.topic} has no partition {q.partition} "
                                               f"(it has {len(parts)})")
        end = min(parts[q.partition].high_watermark, q.offset + q.count)
        if q.offset >= end:
            return [], t
        out: list[Message] = []
        consumer = Consumer(self.options.bootstrap, topics=None, group=None, tls=self.options.tls,
                            sasl=self.options.sasl, request_timeout_ms=self.options.request_timeout_ms,
                            max_poll_records=q.count, client_id="logbroker-console")
        deadline = time.monotonic() + self.options.request_timeout_ms / 1000
        try:
            consumer.assign([(q.topic, q.partition)])
            consumer.seek(q.topic, q.partition, q.offset)
            while len(out) < q.count and time.monotonic() < deadline:
                out.extend(m for m in consumer.poll(timeout_ms=POLL_SLICE_MS, max_records=q.count - len(out))
                           if m.offset >= q.offset)
                if out and out[-1].offset >= end - 1:
                    break
        finally:
            consumer.close()
        return out[:q.count], t

    def create_topic(self, name: str, partitions: int, replication_factor: int) -> None:
        with self._lock:
            self._admin.create_topic(name, partitions=partitions, replication_factor=replication_factor)

    def delete_group(self, name: str) -> None:
        with self._lock:
            self._admin.delete_group(name)

    # -- the sampler ---------------------------------------------------------------------------

    def sample_once(self) -> None:
        self._snapshots.append(self._snapshot(cluster_required=False))
        for g in self.groups()[:self.history.groups_max]:
            try:
                view = self.group(g.group)
            except LogbrokerError as exc:  # deleted meanwhile, coordinator moving: the next sample
                log.info("console: lag of group %s not sampled: %s", g.group, exc)
                continue
            self.history.record(g.group, time.time(), total_lag([r.lag for r in view.lags]))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample_once()
            except Exception as exc:  # the cluster unreachable now: sample again next time
                log.warning("console: sample failed: %s", exc)
            self._stop.wait(self.sample_interval_s)

    def start(self) -> ClusterReader:
        self._thread = threading.Thread(target=self._run, name="console-sampler", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.options.request_timeout_ms / 1000 * 3)
        self._admin.close()
