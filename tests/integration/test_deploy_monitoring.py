"""deploy/grafana and deploy/prometheus name only metrics a live broker serves: a standalone broker is
started with /metrics, scraped once, and every `logbroker_*` (and `process_*`) name in the
dashboard's panels and the alert rules must be declared there (`# TYPE` lines, so a labelled family
with no series yet, such as the lag of no group, counts)."""

from __future__ import annotations

import urllib.request

from tests.conftest import free_port
from tests.deploy import alert_rules, dashboard_exprs, exposed_families, is_exposed, metric_names

# Names the dashboard and the rules use that arrive with the request, host and storage metrics of
# the branch s9-m1 (logbroker/server/request_metrics.py, host_metrics.py, metrics.py there). After
# merging it, empty this set: the test below then fails, naming each name to remove, until it is.
PENDING_M1_MERGE_METRICS = frozenset({
    "logbroker_connections",
    "logbroker_disk_free_bytes",
    "logbroker_disk_used_bytes",
    "logbroker_fetch_purgatory_size",
    "logbroker_log_flush_duration_seconds_bucket",
    "logbroker_process_io_read_bytes_total",
    "logbroker_process_io_write_bytes_total",
    "logbroker_process_memory_anonymous_bytes",
    "logbroker_process_open_files",
    "logbroker_request_duration_seconds_bucket",
    "logbroker_request_errors_total",
    "logbroker_requests_total",
    "logbroker_system_cpu_seconds_total",
    "logbroker_system_cpus",
    "logbroker_system_disk_read_bytes_total",
    "logbroker_system_disk_written_bytes_total",
    "logbroker_system_memory_available_bytes",
    "logbroker_system_network_received_bytes_total",
    "logbroker_system_network_sent_bytes_total",
    "logbroker_topic_bytes_in_total",
    "logbroker_topic_bytes_out_total",
    "logbroker_topic_records_in_total",
    "logbroker_topic_records_out_total",
})


def used_metrics() -> set[str]:
    return metric_names(dashboard_exprs() + [rule["expr"] for rule in alert_rules()])


def test_dashboard_and_rules_name_only_metrics_a_live_broker_serves(broker_factory):
    metrics_port = free_port()
    broker_factory(extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        families = exposed_families(resp.read().decode())
    assert "logbroker_up" in families and "process_resident_memory_bytes" in families  # a real scrape
    used = used_metrics()
    unknown = sorted(n for n in used - PENDING_M1_MERGE_METRICS if not is_exposed(n, families))
    assert not unknown, f"the dashboard or the alert rules name metrics the broker does not serve: {unknown}"
    served_now = sorted(n for n in PENDING_M1_MERGE_METRICS if is_exposed(n, families))
    assert not served_now, f"the broker serves these now: remove them from PENDING_M1_MERGE_METRICS: {served_now}"


def test_allowlist_names_only_used_metrics():
    assert used_metrics() >= PENDING_M1_MERGE_METRICS
