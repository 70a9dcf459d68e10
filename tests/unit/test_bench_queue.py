"""The queue-ack workload and issue 16's report rows: parsed, gated and judged without any server."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

pytest.importorskip("hdrh", reason="the bench extra is not installed: pip install -e '.[bench]'")

from bench import report  # noqa: E402
from bench.drivers import get_driver  # noqa: E402
from bench.workload import Workload, WorkloadError, _check, load  # noqa: E402


def test_queue_ack_is_a_backlog_drained_by_four_acking_consumers() -> None:
    wl = load("queue-ack")
    assert (wl.requires, wl.consumers, wl.record_size, wl.backlog_records) == ("queues", 4, 100, 100_000)
    assert load("queue-ack", smoke=True).backlog_records == 5_000
    assert {"logbroker", "rabbitmq", "nats"} <= set(wl.systems)


def test_a_backlog_needs_the_sequential_mode() -> None:
    with pytest.raises(WorkloadError, match="backlog_records"):
        _check(Workload(name="x", backlog_records=10, mode="concurrent"))


def test_rabbitmq_runs_only_queue_workloads() -> None:
    rabbit = get_driver("rabbitmq")
    assert rabbit.unsupported(load("max-100b")) is not None
    assert rabbit.unsupported(load("queue-ack")) is None


def test_logbroker_is_skipped_on_queue_ack_exactly_while_queue_consumer_does_not_import() -> None:
    why = get_driver("logbroker").unsupported(load("queue-ack"))
    try:
        from logbroker import QueueConsumer  # noqa: F401

        present = True
    except ImportError:
        present = False
    assert (why is None) == present
    if why:
        assert "QueueConsumer" in why and "\n" not in why


def _entry(rate: float) -> dict[str, object]:
    return {"summary": {"consume": {"records_per_s": rate, "complete": True}}}


def test_the_issue_16_row_compares_with_the_better_peer() -> None:
    rows = report._queue_targets({"queue-ack": {"logbroker": _entry(90_000), "rabbitmq": _entry(20_000),
                                                "nats": _entry(30_000)}}, None)  # fmt: skip
    assert len(rows) == 3 and "nats 30,000" in rows[2] and rows[2].endswith("| met |")
    rows = report._queue_targets({"queue-ack": {"logbroker": _entry(80_000), "nats": _entry(30_000)}}, None)
    assert rows[2].endswith("| **missed** |")
    assert len(report._queue_targets({}, None)) == 2  # nothing run: no row


def test_the_issue_16_failover_and_parallelism_rows() -> None:
    failover = {"summary": {"after_lock_s_median": 0.2, "after_lock_s_max": 0.4, "after_expiry_s_median": 0.3,
                            "target_after_lock_s": 1.0, "complete_trials": 5}, "problems": []}  # fmt: skip
    parallel = {"summary": {"records_per_s_median": {"1": 80.0, "4": 300.0}, "ratio": 3.75, "target_ratio": 3.0},
                "problems": []}  # fmt: skip
    rows = report._queue_targets({}, failover, parallel)
    assert len(rows) == 4
    assert "lock_ms + 0.200 s" in rows[2] and "0.300 s after the locks ran out" in rows[2] and rows[2].endswith("| met |")
    assert "300 vs 80 rec/s = 3.75×" in rows[3] and rows[3].endswith("| met |")
    parallel["summary"]["ratio"] = 2.5  # type: ignore[index]
    assert report._queue_targets({}, None, parallel)[2].endswith("| **missed** |")
    parallel["summary"]["ratio"] = 3.75  # type: ignore[index]
    parallel["problems"] = ["4 consumers, run 1: duplicates = 3"]
    assert report._queue_targets({}, None, parallel)[2].endswith("| **missed** |")


def test_pika_is_in_the_bench_extra() -> None:
    extra = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    assert any(dep.startswith("pika") for dep in extra["project"]["optional-dependencies"]["bench"])
