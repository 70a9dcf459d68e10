"""deploy/grafana and deploy/prometheus name only metrics a live broker serves: a standalone broker is
started with /metrics, scraped once, and every `logbroker_*` (and `process_*`) name in the
dashboard's panels and the alert rules must be declared there (`# TYPE` lines, so a labelled family
with no series yet, such as the lag of no group, counts)."""

from __future__ import annotations

import urllib.request

from tests.conftest import free_port
from tests.deploy import alert_rules, dashboard_exprs, exposed_families, is_exposed, metric_names

# Names the dashboard and the rules may use before the broker serves them (a branch adding them not
# merged yet). Keep it empty: the test below fails, naming each name to remove, once the broker serves it.
PENDING_MERGE_METRICS: frozenset[str] = frozenset()


def used_metrics() -> set[str]:
    return metric_names(dashboard_exprs() + [rule["expr"] for rule in alert_rules()])


def test_dashboard_and_rules_name_only_metrics_a_live_broker_serves(broker_factory):
    metrics_port = free_port()
    broker_factory(extra_args=["--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        families = exposed_families(resp.read().decode())
    assert "logbroker_up" in families and "process_resident_memory_bytes" in families  # a real scrape
    used = used_metrics()
    unknown = sorted(n for n in used - PENDING_MERGE_METRICS if not is_exposed(n, families))
    assert not unknown, f"the dashboard or the alert rules name metrics the broker does not serve: {unknown}"
    served_now = sorted(n for n in PENDING_MERGE_METRICS if is_exposed(n, families))
    assert not served_now, f"the broker serves these now: remove them from PENDING_MERGE_METRICS: {served_now}"


def test_allowlist_names_only_used_metrics():
    assert used_metrics() >= PENDING_MERGE_METRICS
