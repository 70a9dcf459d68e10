"""`logbroker cluster stats` against a real standalone broker: the broker, the topic, its size and end
offsets once; with --watch, a rate after producing between two refreshes (logbroker/cli_stats.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import pytest

from logbroker import Admin, Producer
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(120)


def _stats(bootstrap: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "logbroker", "cluster", "stats", "--bootstrap", bootstrap,
                           "--format", "json", *args], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_stats_once_reports_the_broker_the_topic_and_its_size(broker) -> None:
    with Admin(broker.bootstrap, request_timeout_ms=5000) as admin:
        admin.create_topic("orders", partitions=3)
    with Producer(broker.bootstrap, request_timeout_ms=5000) as p:
        for i in range(30):
            p.send("orders", b"x" * 100, partition=i % 3)
        p.flush(timeout=15)
    s = _stats(broker.bootstrap)
    [b] = s["brokers"]
    assert b["alive"] and b["port"] == broker.port
    assert s["health"] == {"partitions": 3, "offline": 0, "under_replicated": 0, "under_min_isr": 0}
    [t] = s["topics"]
    assert (t["name"], t["partitions"], t["end_offset"], t["records"]) == ("orders", 3, 30, 30)
    assert t["size_bytes"] > 3000 and t["records_per_sec"] is None
    assert len(s["top_partitions"]) == 3 and s["top_partitions"][0]["size_bytes"] >= s["top_partitions"][2]["size_bytes"]
    text = subprocess.run([sys.executable, "-m", "logbroker", "cluster", "stats", "--bootstrap", broker.bootstrap],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert text.returncode == 0 and "orders" in text.stdout and "Health: offline 0" in text.stdout


def test_watch_reports_a_rate_after_producing_between_refreshes(broker) -> None:
    with Admin(broker.bootstrap, request_timeout_ms=5000) as admin:
        admin.create_topic("orders", partitions=1)
    proc = subprocess.Popen([sys.executable, "-m", "logbroker", "cluster", "stats", "--bootstrap", broker.bootstrap,
                             "--format", "json", "--watch", "1", "--iterations", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    stop = threading.Event()
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        assert first["topics"][0]["records_per_sec"] is None and first["topics"][0]["end_offset"] == 0
        # the first refresh is taken: produce (acknowledged at once) until the command ends, so the
        # second refresh sees records however its interval falls
        with Producer(broker.bootstrap, request_timeout_ms=5000) as p:
            p.send("orders", b"v").get(timeout=15)

            def keep_producing() -> None:
                while not stop.is_set():
                    p.send("orders", b"v").get(timeout=15)

            t = threading.Thread(target=keep_producing, daemon=True)
            t.start()
            second = json.loads(proc.stdout.readline())
            stop.set()
            t.join(timeout=20)
        assert proc.wait(timeout=30) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    [topic] = second["topics"]
    assert second["elapsed_s"] > 0 and topic["end_offset"] >= 1
    assert topic["records_per_sec"] > 0 and second["top_partitions"][0]["records_per_sec"] > 0
