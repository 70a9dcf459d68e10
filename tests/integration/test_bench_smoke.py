"""The benchmark harness cannot rot: a smoke of every workload against logbroker (issue 5).

`python -m bench run --all --system logbroker --smoke` as a real process: no thresholds, only that
every runnable workload (the cluster one too, where ZooKeeper is installed; queue-ack where
`from logbroker import QueueConsumer` works) wrote a JSON result with
records produced and consumed, that the whole pass took under 60 s, and that every process the
harness started is gone afterwards. `python -m bench failover --smoke` likewise: one kill -9 and one
SIGTERM trial, every acknowledged record read back, nothing left running. `python -m bench rebalance
--smoke --brokers 1`: one trial (a join, a close(), a join, a kill -9) on a standalone broker, the
group consuming again after each, no partition ever owned twice, nothing left running. `queue-failover
--smoke` and `queue-parallel --smoke` (issue 16, where QueueConsumer imports): no problem reported (nothing
lost, no accepted ack redelivered, no record handled twice), nothing left running. `python -m
bench compaction --smoke`: one short produce run with the cleaner on and one off, 10,000 offset
commits replayed after a kill -9, every figure present, nothing left running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUDGET_S = 150.0  # every workload's smoke (eleven since the idempotence pair): about 65-100 s on 2 cores beside the suite's other processes

pytest.importorskip("hdrh", reason="the bench extra is not installed: pip install -e '.[bench]'")


def _workloads() -> dict[str, str]:
    """name -> why logbroker cannot run it here ('' when it can), as the harness itself decides."""
    from bench import workload
    from bench.drivers import get_driver

    driver = get_driver("logbroker")
    return {name: driver.unsupported(workload.load(name, smoke=True)) or "" for name in workload.all_names()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.mark.timeout(180)
def test_every_workload_smokes_against_logbroker(tmp_path: Path) -> None:
    results = tmp_path / "results"
    data_root = tmp_path / "data"
    argv = [
        sys.executable, "-m", "bench", "run", "--all", "--system", "logbroker", "--smoke",
        "--no-limits", "--no-report", "--results-dir", str(results), "--data-root", str(data_root),
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-6000:]}"

    records = {}
    for path in results.glob("*.json"):
        record = json.loads(path.read_text())
        records[record["workload"]["name"]] = record
    runnable = {name for name, why in _workloads().items() if not why}
    assert runnable <= set(records), (
        f"no result for {sorted(runnable - set(records))}:\n{proc.stderr[-3000:]}"
    )
    for name, why in _workloads().items():
        if why:  # a whole workload (no ZooKeeper) or logbroker on it (queue-ack without QueueConsumer)
            skipped = f"skip {name}: {why}" in proc.stderr or f"skip {name} on logbroker: {why}" in proc.stderr
            assert skipped, f"{name} cannot run ({why}) but was not skipped"

    started: list[int] = []
    for name in sorted(runnable):
        record = records[name]
        assert "error" not in record, f"{name}: {record['error']}"
        assert record["system"] == "logbroker"
        run = record["runs"][0]
        if record["workload"].get("requires") == "request-reply":  # its own phases (bench/request_reply.py)
            assert run["rate"]["received"] > 0 and run["max"]["received"] > 0, f"{name}: no reply"
            assert record["unreaped_pids"] == [], f"{name}: processes left running: {record['unreaped_pids']}"
            started += record["started_pids"]
            continue
        produced = run["preload"]["total_records"] if "preload" in run else run["produce"]["total_records"]
        assert produced > 0, f"{name}: nothing produced"
        assert run["consume"]["records"] > 0, f"{name}: nothing consumed"
        assert record["unreaped_pids"] == [], f"{name}: processes left running: {record['unreaped_pids']}"
        started += record["started_pids"]

    assert started, "the results name no process the harness started"
    assert [pid for pid in started if _alive(pid)] == [], "a server or worker outlived the harness"
    assert _processes_mentioning(str(data_root)) == [], "a process still uses the bench data root"
    assert list(data_root.iterdir()) == [], "a temporary data directory was left behind"
    assert elapsed < BUDGET_S, f"the smoke of every workload took {elapsed:.0f} s (budget {BUDGET_S:.0f} s)"


@pytest.mark.timeout(180)
def test_failover_smoke(tmp_path: Path) -> None:
    from logbroker.cluster.dev_cluster import zookeeper_available

    why = zookeeper_available()
    if why:
        pytest.skip(why)
    results = tmp_path / "results"
    data_root = tmp_path / "data"
    argv = [
        sys.executable, "-m", "bench", "failover", "--smoke",
        "--results-dir", str(results), "--data-root", str(data_root),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"bench failover failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    [path] = results.glob("*failover.json")
    record = json.loads(path.read_text())
    assert "error" not in record, record["error"]
    assert sorted(t["signal"] for t in record["trials"]) == ["kill", "term"]
    assert all(t["first_ack_s"] > 0 for t in record["trials"])
    assert record["verified"]["acknowledged"] > 0
    assert record["verified"]["missing"] == 0 and record["verified"]["mismatched"] == 0, record["verified"]
    assert not (results / "latest.json").exists(), "a smoke must not touch latest.json"
    assert record["unreaped_pids"] == [], f"processes left running: {record['unreaped_pids']}"
    assert [pid for pid in record["started_pids"] if _alive(pid)] == [], "a process outlived the harness"
    assert _processes_mentioning(str(data_root)) == [], "a process still uses the bench data root"
    assert list(data_root.iterdir()) == [], "a temporary data directory was left behind"


@pytest.mark.timeout(180)
def test_rebalance_smoke(tmp_path: Path) -> None:
    from bench.drivers import get_driver
    from bench.workload import load

    why = get_driver("logbroker").unsupported(load("group-12p-3c", smoke=True))
    if why:
        pytest.skip(why)
    results = tmp_path / "results"
    data_root = tmp_path / "data"
    argv = [
        sys.executable, "-m", "bench", "rebalance", "--smoke", "--brokers", "1",
        "--results-dir", str(results), "--data-root", str(data_root),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"bench rebalance failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    [path] = results.glob("*rebalance.json")
    record = json.loads(path.read_text())
    assert "error" not in record, record["error"]
    assert [e["event"] for e in record["events"]] == ["join", "leave", "join", "kill"]
    for e in record["events"]:
        assert e["settled_s"] > 0 and e["moved"] > 0, e
    assert record["ownership_overlaps"] == [], record["ownership_overlaps"]
    assert not (results / "latest.json").exists(), "a smoke must not touch latest.json"
    assert record["unreaped_pids"] == [], f"processes left running: {record['unreaped_pids']}"
    assert [pid for pid in record["started_pids"] if _alive(pid)] == [], "a process outlived the harness"
    assert _processes_mentioning(str(data_root)) == [], "a process still uses the bench data root"
    assert list(data_root.iterdir()) == [], "a temporary data directory was left behind"


@pytest.mark.timeout(120)
def test_compaction_smoke(tmp_path: Path) -> None:
    results = tmp_path / "results"
    data_root = tmp_path / "data"
    argv = [sys.executable, "-m", "bench", "compaction", "--smoke", "--results-dir", str(results),
            "--data-root", str(data_root)]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, f"bench compaction failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    [path] = results.glob("*compaction.json")
    record = json.loads(path.read_text())
    assert "error" not in record, record["error"]
    summary = record["summary"]
    assert summary["produce_on_median"] > 0 and summary["produce_off_median"] > 0
    assert [r["cleaner"] for r in record["produce"]["on"]] == [True]
    assert record["produce"]["off"][0]["passes"] == []  # --log-cleaner-interval-ms 0: no cleaner
    for cleaner in ("on", "off"):
        replay = record["replay"][cleaner]
        assert replay["commits"] == 10_000 and replay["groups_loaded"] == 50, replay
        assert replay["offsets_spanned"] == 10_000 and 0 < replay["records_replayed"] <= 10_000, replay
        assert replay["rebuild_s"] >= 0 and replay["ready_s"] > 0, replay
    assert not (results / "latest.json").exists(), "a smoke must not touch latest.json"
    assert record["unreaped_pids"] == [], f"processes left running: {record['unreaped_pids']}"
    assert [pid for pid in record["started_pids"] if _alive(pid)] == [], "a process outlived the harness"
    assert _processes_mentioning(str(data_root)) == [], "a process still uses the bench data root"
    assert list(data_root.iterdir()) == [], "a temporary data directory was left behind"
    print(f"bench compaction --smoke took {time.monotonic() - started:.1f} s")


def _queue_command_smoke(tmp_path: Path, command: list[str]) -> dict[str, object]:
    """`python -m bench <command> --smoke` as a real process: it succeeded, wrote one JSON (not
    latest.json), and left no process or data directory behind. Skipped without QueueConsumer."""
    from bench.drivers.logbroker import queue_consumer_missing

    why = queue_consumer_missing()
    if why:
        pytest.skip(why)
    results = tmp_path / "results"
    data_root = tmp_path / "data"
    argv = [sys.executable, "-m", "bench", *command, "--smoke", "--results-dir", str(results),
            "--data-root", str(data_root)]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"bench {command[0]} failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    [path] = results.glob(f"*-smoke-{command[0]}.json")
    record = json.loads(path.read_text())
    assert "error" not in record, record["error"]
    assert record["problems"] == [], record["problems"]
    assert not (results / "latest.json").exists(), "a smoke must not touch latest.json"
    assert record["unreaped_pids"] == [], f"processes left running: {record['unreaped_pids']}"
    assert [pid for pid in record["started_pids"] if _alive(pid)] == [], "a process outlived the harness"
    assert _processes_mentioning(str(data_root)) == [], "a process still uses the bench data root"
    assert list(data_root.iterdir()) == [], "a temporary data directory was left behind"
    return record


@pytest.mark.timeout(180)
def test_queue_failover_smoke(tmp_path: Path) -> None:
    record = _queue_command_smoke(tmp_path, ["queue-failover", "--lock-ms", "2000"])
    [trial] = record["trials"]  # type: ignore[misc]
    assert trial["held"] > 0 and trial["acks_accepted"] > 0, trial
    assert trial["all_redelivered_s"] is not None and trial["all_redelivered_s"] > 0, trial


@pytest.mark.timeout(180)
def test_queue_parallel_smoke(tmp_path: Path) -> None:
    record = _queue_command_smoke(tmp_path, ["queue-parallel"])
    rates = record["summary"]["records_per_s_median"]  # type: ignore[index]
    assert rates["1"] > 0 and rates["4"] > 0, rates
    assert sum(record["runs"]["4"][0]["handled_per_consumer"]) == 100  # type: ignore[index]


@pytest.mark.timeout(120)
def test_logbroker_tls_smoke(tmp_path: Path) -> None:
    """`--system logbroker-tls` (issue 18): the same broker and clients over mTLS produce and consume."""
    pytest.importorskip("trustme", reason="trustme makes the TLS run's certificates")
    results, data_root = tmp_path / "results", tmp_path / "data"
    argv = [
        sys.executable, "-m", "bench", "run", "--workload", "max-100b", "--system", "logbroker-tls", "--smoke",
        "--no-limits", "--no-report", "--results-dir", str(results), "--data-root", str(data_root),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stderr[-6000:]}"
    [record] = [json.loads(p.read_text()) for p in results.glob("*.json")]
    assert "error" not in record, record["error"]
    assert record["system"] == "logbroker-tls"
    run = record["runs"][0]
    assert run["produce"]["total_records"] > 0 and run["consume"]["records"] > 0, run
    assert record["unreaped_pids"] == []
    assert list(data_root.iterdir()) == [], "a temporary data directory was left behind"
