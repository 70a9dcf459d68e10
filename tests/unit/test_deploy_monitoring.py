"""deploy/grafana and deploy/prometheus: the alert rules pass `promtool check rules` and their unit
tests (`promtool test rules`), every dashboard expression is valid PromQL, and the dashboard has what
an operator needs (a JSON schema, below). That every metric they name is one a live broker serves
is tests/integration/test_deploy_monitoring.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy import ALERT_RULES, ALERT_RULES_TEST, DASHBOARD, alert_rules, dashboard_exprs, metric_names

PROMTOOL_TIMEOUT_S = 60
DS_REF = {"type": "object", "required": ["uid"], "properties": {"uid": {"const": "${datasource}"}}}
TARGET = {"type": "object", "required": ["expr", "refId", "datasource"],
          "properties": {"expr": {"type": "string", "minLength": 1}, "datasource": DS_REF}}
PANEL = {
    "type": "object",
    "required": ["type", "title", "id", "gridPos"],
    "properties": {
        "id": {"type": "integer"},
        "title": {"type": "string", "minLength": 1},
        "gridPos": {"type": "object", "required": ["h", "w", "x", "y"]},
    },
    "if": {"properties": {"type": {"const": "row"}}},
    "then": {"properties": {"panels": {"type": "array", "maxItems": 0}}},  # rows are open: panels follow them
    "else": {"required": ["datasource", "targets"],
             "properties": {"datasource": DS_REF, "targets": {"type": "array", "minItems": 1, "items": TARGET}}},
}
# What the dashboard must have: a current schema, a Prometheus datasource variable that every
# panel and target goes through (no datasource uid of one Grafana baked in), and panels.
DASHBOARD_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 39},  # Grafana 11
        "id": {"type": "null"},
        "panels": {"type": "array", "minItems": 1, "items": PANEL},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {
            "type": "array",
            "contains": {"type": "object", "required": ["type", "name", "query"], "properties": {
                "type": {"const": "datasource"}, "name": {"const": "datasource"}, "query": {"const": "prometheus"}}},
        }}},
    },
}
ROWS = {  # each row and metrics its panels must show
    "Cluster health": {"logbroker_under_replicated_partitions", "logbroker_offline_partitions",
                       "logbroker_under_min_isr_partitions", "logbroker_active_controller",
                       "logbroker_zookeeper_session_state"},
    "Throughput": {"logbroker_topic_bytes_in_total", "logbroker_topic_bytes_out_total",
                   "logbroker_topic_records_in_total", "logbroker_topic_records_out_total"},
    "Requests": {"logbroker_requests_total", "logbroker_request_errors_total",
                 "logbroker_request_duration_seconds_bucket"},
    "Consumers": {"logbroker_consumer_group_lag", "logbroker_consumer_group_members",
                  "logbroker_share_group_in_flight", "logbroker_share_group_dead_letters_total",
                  "logbroker_share_group_oldest_unsettled_age_seconds"},
    "Host": {"process_cpu_seconds_total", "process_resident_memory_bytes", "logbroker_disk_free_bytes",
             "logbroker_process_io_read_bytes_total", "logbroker_process_io_write_bytes_total",
             "logbroker_system_network_received_bytes_total", "logbroker_system_network_sent_bytes_total"},
}
ALERTS = {"UnderReplicatedPartitions", "OfflinePartitions", "ConsumerLagGrowing", "DeadLettersPresent",
          "DiskAlmostFull", "NoActiveController"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # required, never skipped: the README's test command installs Debian's prometheus
    path = shutil.which("promtool")
    assert path, "promtool not found: apt-get install prometheus"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S, cwd=cwd)


def test_alert_rules_pass_promtool_check_rules():
    done = promtool("check", "rules", str(ALERT_RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_their_promtool_unit_tests():
    done = promtool("test", "rules", ALERT_RULES_TEST.name, cwd=ALERT_RULES_TEST.parent)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr
    tested = {t["alertname"] for case in yaml.safe_load(ALERT_RULES_TEST.read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested >= {"UnderReplicatedPartitions", "NoActiveController", "DiskAlmostFull"}


def test_promtool_unit_tests_catch_a_wrong_rule(tmp_path):
    # the unit tests have teeth: a DiskAlmostFull at 60 % would fire on the half-free /data2
    (tmp_path / ALERT_RULES.name).write_text(ALERT_RULES.read_text().replace("< 0.10", "< 0.60"))
    (tmp_path / ALERT_RULES_TEST.name).write_text(ALERT_RULES_TEST.read_text())
    done = promtool("test", "rules", ALERT_RULES_TEST.name, cwd=tmp_path)
    assert done.returncode != 0 and "dir=\"/data2\"" in done.stdout + done.stderr, done.stdout + done.stderr


def test_alert_rules_have_severity_summary_and_description():
    rules = {r["alert"]: r for r in alert_rules()}
    assert set(rules) >= ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    assert "absent(logbroker_active_controller)" in rules["NoActiveController"]["expr"]
    assert "< 0.10" in rules["DiskAlmostFull"]["expr"]


def test_dashboard_loads_and_matches_its_schema():
    dashboard = json.loads(DASHBOARD.read_text())
    jsonschema.validate(dashboard, DASHBOARD_SCHEMA, cls=jsonschema.Draft202012Validator)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_rows_show_what_an_operator_needs():
    by_row: dict[str, list[str]] = {}
    row = ""
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        by_row.setdefault(row, []).extend(t["expr"] for t in panel["targets"])
    assert set(by_row) == set(ROWS)
    for title, wanted in ROWS.items():
        missing = wanted - metric_names(by_row[title])
        assert not missing, f"row {title!r} lacks {sorted(missing)}"
    exprs = dashboard_exprs()
    for counter in ROWS["Throughput"]:
        assert any(f"rate({counter}" in e for e in exprs), counter
    for q in ("0.5", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q}, sum by (api, le) (rate(logbroker_request_duration_seconds_bucket")
                   for e in exprs), q


def test_dashboard_expressions_are_valid_promql(tmp_path):
    # promtool parses rules, so the dashboard's expressions become recording rules, with Grafana's
    # variables replaced as Grafana would
    grafana_vars = {"$__rate_interval": "1m", "$job": ".+"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("path", [DASHBOARD, ALERT_RULES])
def test_no_hard_coded_datasource_or_port(path):
    text = path.read_text()
    assert "9102" not in text
    if path == DASHBOARD:
        uids = {json.dumps(d) for d in _datasources(json.loads(text))}
        assert uids == {json.dumps({"type": "prometheus", "uid": "${datasource}"})}


def _datasources(node: Any) -> list[Any]:
    if isinstance(node, dict):
        found = [node["datasource"]] if isinstance(node.get("datasource"), dict) else []
        return found + [d for v in node.values() for d in _datasources(v)]
    if isinstance(node, list):
        return [d for v in node for d in _datasources(v)]
    return []
