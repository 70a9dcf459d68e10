"""Helpers for the deploy/ tests: render the kustomize overlays, read the Dockerfile, find things in
rendered manifests, and expand a container's `$(VAR)` references as the kubelet does."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.conftest import REPO
from tests.kustomize_lite import render

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("dev", "prod")
Resource = dict[str, Any]
# The Secret the operator creates (deploy/README.md) and the key the broker reads from it.
CLUSTER_SECRET_NAME = "logbroker-cluster-secret"
CLUSTER_SECRET_KEY = "cluster-secret"
TEST_CLUSTER_SECRET = "test-secret-" + "x" * 32  # what a test writes where the Secret's key would be
# The prod overlay's TLS Secret (deploy/README.md: cert-manager or openssl) and its keys.
TLS_SECRET_NAME = "logbroker-tls"
TLS_SECRET_KEYS = ("tls.crt", "tls.key", "ca.crt")


def render_overlay(name: str) -> list[Resource]:
    return render(K8S / "overlays" / name)


def find(resources: list[Resource], kind: str, name: str) -> Resource:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(pod_spec: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    items = pod_spec["initContainers" if init else "containers"]
    matches = [c for c in items if c["name"] == name]
    assert len(matches) == 1, name
    return matches[0]


def dockerfile_instructions(path: Path = DEPLOY / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_exec_form(instruction: str) -> list[str]:
    """ENTRYPOINT/CMD of the final stage, which must use the exec (JSON) form."""
    values = [args for word, args in dockerfile_instructions() if word == instruction]
    assert values, f"no {instruction} in the Dockerfile"
    parsed = json.loads(values[-1])
    assert isinstance(parsed, list) and all(isinstance(x, str) for x in parsed), values[-1]
    return parsed


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion in command, args and env values: $(VAR) if VAR is defined, $$ -> $."""
    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _REF.sub(sub, text)


def container_env(c: dict[str, Any], field_values: dict[str, str]) -> dict[str, str]:
    """A container's environment: `value`s expanded in order, `fieldRef`s from `field_values`."""
    env: dict[str, str] = {}
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = expand(item["value"], env)
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            assert path in field_values, f"test gives no value for fieldRef {path}"
            env[item["name"]] = field_values[path]
    return env


# deploy/grafana and deploy/prometheus (tests/unit/test_deploy_monitoring.py,
# tests/integration/test_deploy_monitoring.py)
DASHBOARD = DEPLOY / "grafana" / "logbroker-dashboard.json"
ALERT_RULES = DEPLOY / "prometheus" / "logbroker-alerts.yaml"
ALERT_RULES_TEST = DEPLOY / "prometheus" / "logbroker-alerts.test.yaml"
# a metric name in PromQL: the broker's own and prometheus_client's process collector's
_METRIC_NAME = re.compile(r"\b((?:logbroker|process)_[a-zA-Z0-9_]+)\b")
# what a sample name adds to its family's name in the text exposition
SAMPLE_SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")


def dashboard_exprs(dashboard: dict[str, Any] | None = None) -> list[str]:
    """Every panel target's PromQL expression (rows' nested panels included)."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    out: list[str] = []
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        out.extend(t["expr"] for t in panel.get("targets", []))
    return out


def alert_rules() -> list[dict[str, Any]]:
    import yaml  # a test dependency (pyproject's test extras), imported where used

    return [rule for group in yaml.safe_load(ALERT_RULES.read_text())["groups"] for rule in group["rules"]]


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in _METRIC_NAME.findall(e)}


def exposed_families(text: str) -> set[str]:
    """The metric family names a /metrics text declares (`# TYPE` lines: a labelled family with no
    series yet, such as the lag of no group, still declares itself)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def is_exposed(name: str, families: set[str]) -> bool:
    """`name` is a family or one of its sample names (`_total` of a counter, `_bucket` of a histogram)."""
    return name in families or any(name.endswith(s) and name[: -len(s)] in families for s in SAMPLE_SUFFIXES)
