"""`serve --log-format json` on a real broker: every log line is one JSON object, and a request slower
than `--slow-request-ms` logs one WARNING carrying the request's context (logbroker/log_format.py,
server/request_log.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from logbroker import Admin, Producer
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(120)


def _json_lines(b: BrokerProcess) -> list[dict[str, Any]]:
    """The log's JSON lines; every line that looks like one must parse (the only other line the
    broker writes on its own is the `logbroker serving on ...` banner, a print)."""
    out = []
    for line in b.log_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_json_log_lines_and_a_slow_produce_with_its_request_context(broker_factory) -> None:
    b = broker_factory(extra_args=["--log-format", "json", "--slow-request-ms", "1"])
    with Admin(b.bootstrap, request_timeout_ms=5000, client_id="ops-console.1") as admin:
        admin.create_topic("orders", partitions=2)
    with Producer(b.bootstrap, client_id="billing-7", request_timeout_ms=5000) as p:

        def slow_produce_logged() -> bool:  # a produce taking over 1 ms: sends until one did
            p.send("orders", b"v" * 1000, partition=0).get(timeout=15)
            return any(line.get("api") == "Produce" and line["logger"] == "logbroker.request"
                       for line in _json_lines(b))

        wait_for(slow_produce_logged, 30, "a slow-request line for a Produce")
    lines = _json_lines(b)
    assert lines, b.log_text()
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert str(line["time"]).endswith("Z")
    slow = next(line for line in lines if line.get("api") == "Produce" and line["logger"] == "logbroker.request")
    assert slow["level"] == "WARNING" and slow["client_id"] == "billing-7" and slow["principal"] == "ANONYMOUS"
    assert slow["partitions"] == 1 and slow["topics"] == 1 and slow["duration_ms"] >= 1 and slow["peer"]
    # lines logged outside any request (startup) carry no request fields
    startup = [line for line in lines if line["logger"] != "logbroker.request" and "api" not in line]
    assert startup, "expected broker lines outside any request"
    non_json = [line for line in b.log_text().splitlines() if line.strip() and not line.startswith("{")]
    assert all(line.startswith("logbroker serving on") for line in non_json), non_json
