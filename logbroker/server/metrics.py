"""A Prometheus `/metrics` endpoint for `logbroker serve --metrics-listen HOST:PORT`.

Served by prometheus_client's HTTP server on its own daemon thread. Broker figures are read at scrape
time *on the broker's event loop* (which owns all partition state) with a bounded wait, so a scrape
never races the loop; a loop that does not answer within SCRAPE_TIMEOUT_S shows as
`logbroker_up 0` (the process metrics still come through).

| metric | type | meaning |
|---|---|---|
| `logbroker_up` | gauge | 1 if the broker's event loop answered the scrape |
| `logbroker_broker_info{broker_id,rack}` | gauge | always 1; identifies the broker |
| `logbroker_ready` | gauge | 1 once logs are recovered (readiness also waits for registration: use the probe) |
| `logbroker_partitions{role}` | gauge | hosted replicas by role: leader, follower, none |
| `logbroker_under_replicated_partitions` | gauge | led partitions whose ISR is smaller than their replica set |
| `logbroker_under_min_isr_partitions` | gauge | led partitions whose ISR is below min_insync_replicas (acks=all fails) |
| `logbroker_log_size_bytes` | gauge | bytes in all hosted partition logs |
| `logbroker_corrupt_partitions` | gauge | hosted replicas with a corrupt batch found by a read or the scrubber |
| `logbroker_offline_partitions` | gauge | hosted partitions whose log is offline (vanished: KAFKA_STORAGE_ERROR until recovered) |
| `logbroker_reply_streams` | gauge | request-reply: requesters' reply streams open on this broker (server/reply_registry.py) |
| `logbroker_replies_total{outcome}` | counter | replies for this broker's streams: `delivered`, `dropped` (the client did not read), `unknown` (no such stream: UNKNOWN_REPLY_TO) |
| `logbroker_connections_refused_total{reason}` | counter | record-transport connections closed at admission (server/connection_gate.py): `connections_max`, `max_connections_per_ip`, `max_connection_creation_rate_per_sec` |
| `logbroker_overload_refusals_total` | counter | client requests refused with RESOURCE_EXHAUSTED for overload (server/admission.py: `--max-inflight-request-bytes`, `--max-inflight-requests`, a full fetch purgatory) |
| `logbroker_inflight_request_bytes`, `logbroker_inflight_requests` | gauge | client requests being handled now, their bytes and count (server/admission.py) |
| `logbroker_interbroker_refusals_total` | counter | inter-broker calls refused: no or a wrong cluster secret, or a standalone broker (server/request_checks.py) |
| `logbroker_sasl_failed_logins_total` | counter | SASL (SCRAM) logins refused: wrong password, unknown user, malformed or replayed messages (server/sasl.py) |
| cluster, consumer lag, share groups, active clients | | server/cluster_metrics.py (`ClusterCollector`) |
| `logbroker_fetch_purgatory_size` | gauge | long-poll fetches waiting in the fetch purgatory |
| `logbroker_log_flush_duration_seconds` | histogram | log flushes: a rolled segment's fsync (the flusher) and a log's flush (msync, index sync) (storage/flush_timing.py) |
| `logbroker_requests_total{api}`, ... | | request and per-topic traffic metrics: server/request_metrics.py |
| `logbroker_partition_bytes_in_total{topic,partition}`, `..._records_in_total`, `..._bytes_out_total`, `..._records_out_total` | counter | per partition, as its leader counted them (server/partition_heat.py): only the `PARTITION_SERIES_MAX` partitions with the most bytes in on this broker get series, the others are in the topic counters only; a partition dropping out of that set (or led by another broker now: only partitions led here get series) ends its series, and one forgotten and back in restarts it (a counter reset). Rates and heavy keys: `logbroker topics hot` |
| `logbroker_disk_free_bytes{dir}`, ... | | host metrics (psutil): server/host_metrics.py |
| `process_*`, `python_*` | | prometheus_client's process, platform and GC collectors |
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from logbroker.server.cluster_metrics import ClusterCollector
from logbroker.server.host_metrics import HostCollector
from logbroker.server.request_checks import INTERBROKER_REFUSALS
from logbroker.server.request_metrics import RequestMetricsSnapshot
from logbroker.server.scrape import read_on_loop
from logbroker.storage.flush_timing import LOG_FLUSHES
from logbroker.tls import ServerTls

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from logbroker.server.broker import Broker


SCRAPE_TIMEOUT_S = 2.0
PARTITION_SERIES_MAX = 100  # partitions with per-partition series (by bytes in), the cardinality bound


@dataclass(frozen=True)
class BrokerSnapshot:
    ready: bool
    partitions_by_role: dict[str, int]
    under_replicated: int
    under_min_isr: int
    log_size_bytes: int
    corrupt_partitions: int = 0
    offline: int = 0
    reply_streams: int = 0
    replies: tuple[int, int, int] = (0, 0, 0)  # delivered, dropped, unknown
    connections_refused: tuple[tuple[str, int], ...] = ()  # (reason, count) of the record transport
    overload: tuple[int, int, int] = (0, 0, 0)  # in-flight request bytes, in-flight requests, refused ever
    fetch_purgatory_size: int = 0
    requests: RequestMetricsSnapshot | None = None
    # (topic, partition, (bytes in, records in, bytes out, records out)) of the top partitions by bytes in
    partition_totals: tuple[tuple[str, int, tuple[int, int, int, int]], ...] = ()


def snapshot(broker: Broker) -> BrokerSnapshot:
    """The figures a scrape reports; call on the broker's event loop."""
    by_role = {"leader": 0, "follower": 0, "none": 0}
    under_replicated = under_min_isr = size = corrupt = 0
    for p in broker.partitions.values():
        by_role[p.role.value] = by_role.get(p.role.value, 0) + 1
        corrupt += p.log.corrupt_reason is not None
        size += p.log.size_bytes
        if p.is_leader:
            under_replicated += len(p.isr) < len(p.replicas)
            under_min_isr += len(p.isr) < p.min_insync_replicas
    offline = len(broker.replica_manager.offline_partitions) + sum(p.log.is_offline for p in broker.partitions.values())
    reg = broker.replies.registry
    refused = tuple(sorted(broker.wire_server.refused_total.items())) if broker.wire_server is not None else ()
    admission = broker.apis.admission
    overload = ((admission.inflight_bytes, admission.inflight_requests, admission.refused_total)
                if admission is not None else (0, 0, 0))
    request_metrics = broker.apis.metrics
    return BrokerSnapshot(broker.ready, by_role, under_replicated, under_min_isr, size, corrupt, offline,
                          len(reg), (reg.delivered, reg.dropped, reg.unknown), refused, overload,
                          broker.replica_manager.fetch_purgatory.waiting,
                          request_metrics.snapshot() if request_metrics is not None else None,
                          tuple(broker.heat.totals(PARTITION_SERIES_MAX, lambda t, p: _led_here(broker, t, p))))


def _led_here(broker: Broker, topic: str, partition: int) -> bool:
    part = broker.replica_manager.partitions.get((topic, partition))
    return part is not None and part.is_leader


class BrokerCollector(Collector):
    def __init__(self, broker: Broker, loop: asyncio.AbstractEventLoop) -> None:
        self._broker = broker
        self._loop = loop

    def _read(self) -> BrokerSnapshot | None:
        async def on_loop() -> BrokerSnapshot:
            return snapshot(self._broker)

        return read_on_loop(on_loop(), self._loop, SCRAPE_TIMEOUT_S, "metrics snapshot")

    def collect(self) -> Iterator[Metric]:
        snap = self._read()
        yield GaugeMetricFamily("logbroker_up", "1 if the broker's event loop answered the scrape",
                                value=0 if snap is None else 1)
        info = GaugeMetricFamily("logbroker_broker_info", "identifies the broker", labels=["broker_id", "rack"])
        info.add_metric([str(self._broker.config.broker_id), self._broker.config.rack], 1)
        yield info
        yield CounterMetricFamily("logbroker_interbroker_refusals", "inter-broker calls refused (no or a wrong "
                                  "cluster secret)", value=INTERBROKER_REFUSALS.total)
        sasl = getattr(self._broker, "sasl", None)
        yield CounterMetricFamily("logbroker_sasl_failed_logins", "SASL logins refused",
                                  value=sasl.failed_logins if sasl is not None else 0)
        yield self._flush_family()
        if snap is None:
            return
        yield GaugeMetricFamily("logbroker_ready", "1 once logs are recovered", value=int(snap.ready))
        parts = GaugeMetricFamily("logbroker_partitions", "hosted partition replicas by role", labels=["role"])
        for role, count in sorted(snap.partitions_by_role.items()):
            parts.add_metric([role], count)
        yield parts
        yield GaugeMetricFamily("logbroker_under_replicated_partitions",
                                "led partitions whose ISR is smaller than their replica set",
                                value=snap.under_replicated)
        yield GaugeMetricFamily("logbroker_under_min_isr_partitions",
                                "led partitions whose ISR is below min_insync_replicas", value=snap.under_min_isr)
        yield GaugeMetricFamily("logbroker_log_size_bytes", "bytes in all hosted partition logs",
                                value=snap.log_size_bytes)
        yield GaugeMetricFamily("logbroker_corrupt_partitions",
                                "hosted replicas with a corrupt batch found by a read or the scrubber",
                                value=snap.corrupt_partitions)
        yield GaugeMetricFamily("logbroker_offline_partitions", "hosted partitions whose log is offline",
                                value=snap.offline)
        yield GaugeMetricFamily("logbroker_reply_streams", "requesters' reply streams open on this broker",
                                value=snap.reply_streams)
        replies = CounterMetricFamily("logbroker_replies", "replies for this broker's reply streams, by outcome",
                                      labels=["outcome"])
        for outcome, count in zip(("delivered", "dropped", "unknown"), snap.replies, strict=True):
            replies.add_metric([outcome], count)
        yield replies
        refused = CounterMetricFamily("logbroker_connections_refused", "record-transport connections closed at "
                                      "admission, by the limit they hit", labels=["reason"])
        for reason, count in snap.connections_refused:
            refused.add_metric([reason], count)
        yield refused
        inflight_bytes, inflight_requests, overload_refusals = snap.overload
        yield CounterMetricFamily("logbroker_overload_refusals", "client requests refused for overload",
                                  value=overload_refusals)
        yield GaugeMetricFamily("logbroker_inflight_request_bytes", "bytes of client requests being handled",
                                value=inflight_bytes)
        yield GaugeMetricFamily("logbroker_inflight_requests", "client requests being handled", value=inflight_requests)
        yield GaugeMetricFamily("logbroker_fetch_purgatory_size", "long-poll fetches waiting",
                                value=snap.fetch_purgatory_size)
        if snap.requests is not None:
            yield from request_families(snap.requests)
        yield from partition_families(snap.partition_totals)

    def _flush_family(self) -> Metric:
        cumulative, total = LOG_FLUSHES.snapshot()
        bounds = [repr(b) for b in LOG_FLUSHES.bounds] + ["+Inf"]
        return HistogramMetricFamily("logbroker_log_flush_duration_seconds", "log flushes (fsync, msync, index "
                                     "sync)", buckets=list(zip(bounds, cumulative, strict=True)), sum_value=total)


def request_families(snap: RequestMetricsSnapshot) -> Iterator[Metric]:
    """The metrics of server/request_metrics.py, from a snapshot taken on the loop."""
    requests = CounterMetricFamily("logbroker_requests", "client calls by API", labels=["api"])
    for api, count in sorted(snap.requests.items()):
        requests.add_metric([api], count)
    yield requests
    errors = CounterMetricFamily("logbroker_request_errors", "failed calls and partition results by API and "
                                 "error code", labels=["api", "error"])
    for (api, error), count in sorted(snap.errors.items()):
        errors.add_metric([api, error], count)
    yield errors
    durations = HistogramMetricFamily("logbroker_request_duration_seconds", "time to answer a client call, by API",
                                      labels=["api"])
    for api, hist in sorted(snap.durations.items()):
        durations.add_metric([api], list(hist.buckets), hist.sum)
    yield durations
    for direction, table in (("in", snap.topics_in), ("out", snap.topics_out)):
        verb = "appended by Produce" if direction == "in" else "sent to consumers by Fetch"
        nbytes = CounterMetricFamily(f"logbroker_topic_bytes_{direction}", f"record bytes {verb}", labels=["topic"])
        records = CounterMetricFamily(f"logbroker_topic_records_{direction}", f"records {verb}", labels=["topic"])
        for topic, (b, r) in sorted(table.items()):
            nbytes.add_metric([topic], b)
            records.add_metric([topic], r)
        yield nbytes
        yield records


def partition_families(rows: tuple[tuple[str, int, tuple[int, int, int, int]], ...]) -> Iterator[Metric]:
    """Per-partition traffic counters (server/partition_heat.py), for the partitions in `rows`."""
    names = (("bytes_in", "record bytes appended by Produce"), ("records_in", "records appended by Produce"),
             ("bytes_out", "record bytes sent to consumers by Fetch"), ("records_out", "records sent to consumers"))
    for i, (name, what) in enumerate(names):
        family = CounterMetricFamily(f"logbroker_partition_{name}", f"{what}, per partition (the top "
                                     f"{PARTITION_SERIES_MAX} by bytes in on this broker)",
                                     labels=["topic", "partition"])
        for topic, partition, totals in rows:
            family.add_metric([topic, str(partition)], totals[i])
        yield family


class MetricsServer:
    """The /metrics HTTP endpoint; `stop()` closes its socket."""

    def __init__(self, httpd: WSGIServer) -> None:
        self._httpd = httpd

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @classmethod
    def start(cls, broker: Broker, loop: asyncio.AbstractEventLoop, host: str, port: int,
              tls: ServerTls | None = None) -> MetricsServer:
        """`tls`: HTTPS with the broker's certificate (read once: not reloaded), client certificates
        required as by --tls-client-auth required."""
        registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        registry.register(BrokerCollector(broker, loop))
        registry.register(ClusterCollector(broker, loop))  # server/cluster_metrics.py
        registry.register(HostCollector([broker.config.data_dir], lambda: {
            "grpc": broker.bound_port, "record_transport": broker.bound_data_port}))
        if tls is None:
            httpd, _thread = start_http_server(port, addr=host, registry=registry)
        else:
            httpd, _thread = start_http_server(port, addr=host, registry=registry, certfile=tls.cert_file,
                                               keyfile=tls.key_file, client_cafile=tls.client_ca_file or None,
                                               client_auth_required=tls.client_auth == "required")
        return cls(httpd)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
