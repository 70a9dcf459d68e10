"""`python -m bench run|failover|rebalance|compaction|report|limits|list`: the harness's command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from bench import workload as workloads
from bench.drivers import SYSTEMS, get_driver
from bench.procs import STARTED_PIDS
from bench.profiler import py_spy
from bench.profiler import summarize as summarize_profile
from bench.progress import say

BENCH_DIR = Path(__file__).parent
RESULTS_DIR = BENCH_DIR / "results"
LATEST = "latest.json"


def revision() -> str:
    """The checkout being measured: its commit, and the files under logbroker/ that differ from it
    (others may be editing the same checkout while a benchmark runs)."""
    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=BENCH_DIR.parent, capture_output=True, text=True, timeout=10).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        dirty = sorted(line[3:] for line in git("status", "--porcelain", "--", "logbroker").splitlines())
    except (OSError, subprocess.SubprocessError):
        return ""
    if not head:
        return ""
    return head + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else "")


def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else ""
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "os": f"Debian {debian}" if debian else platform.platform(),
        "python": platform.python_version(),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "revision": revision(),
    }


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds every ExitStack: servers and workers are stopped


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def cmd_run(args: argparse.Namespace) -> int:
    from bench.runner import Runner, summarize, unreaped

    names = workloads.all_names() if args.all else args.workload
    if not names:
        say("bench run: give --all or --workload NAME (see `python -m bench list`)")
        return 2
    systems = args.system or list(SYSTEMS)
    profile_dir = Path(args.profile) if args.profile else None
    if profile_dir is not None and py_spy() is None:
        say("bench run --profile: py-spy not found: `.venv/bin/pip install py-spy`")
        return 2
    runs = args.runs if args.runs else (1 if args.smoke or profile_dir else 3)
    scratch = args.smoke or profile_dir is not None  # never merged into latest.json
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    stamp = time.strftime("%Y%m%d-%H%M%S")
    date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    t_begin = time.monotonic()
    pid_mark = len(STARTED_PIDS)
    failures = 0
    entries: dict[str, dict[str, Any]] = {}
    limits: dict[str, Any] | None = None

    load = os.getloadavg()[0]
    if load > 0.5:
        say(
            f"note: load average {load:.2f} before the run: other work on this machine will make figures noisy"
        )
    machine_at_start = machine()
    if args.limits is True or (args.limits is None and args.all and not args.smoke):
        from bench import limits as machine_limits

        limits = machine_limits.measure(data_root)

    gate = get_driver("logbroker")
    for name in names:
        wl = workloads.load(name, smoke=args.smoke)
        entries[wl.name] = {}
        # a cluster workload without ZooKeeper is skipped as a whole; logbroker's other limits (a queue
        # workload without QueueConsumer) skip logbroker alone: the peers still run
        gated = gate.unsupported(wl) if wl.requires == "cluster" else None
        if gated:
            say(f"skip {wl.name}: {gated}")
        for system in [s for s in wl.systems if s in systems]:
            driver = get_driver(system)
            if gated:
                entries[wl.name][system] = {"skipped": gated, "title": driver.title, "workload": wl.to_dict()}
                continue
            reason = driver.missing() or driver.unsupported(wl)
            if reason:
                say(f"skip {wl.name} on {system}: {reason}")
                entries[wl.name][system] = {
                    "skipped": reason,
                    "title": driver.title,
                    "workload": wl.to_dict(),
                }
                continue
            before = len(STARTED_PIDS)
            record: dict[str, Any] = {
                "workload": wl.to_dict(),
                "system": system,
                "title": driver.title,
                "version": driver.version(),
                "smoke": args.smoke,
                "profiled": profile_dir is not None,
                "command": command,
                "date": date,
                "revision": revision(),
            }
            runner = Runner(driver, wl, runs, data_root, profile_dir)
            try:
                if wl.requires == "request-reply":  # its own phases (bench/request_reply.py)
                    from bench import request_reply

                    run_results = request_reply.run_workload(driver, wl, runs, data_root)
                    record["summary"] = request_reply.summarize(run_results)
                    say(request_reply.one_line(system, record["summary"]))
                else:
                    run_results = runner.run()
                    record["summary"] = summarize(run_results)
                record["runs"] = run_results
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                failures += 1
                detail = str(exc) if isinstance(exc, RuntimeError) else traceback.format_exc()
                if runner.failure_logs:
                    detail += "\n" + runner.failure_logs
                say(f"FAILED {wl.name} on {system}: {detail}")
                record["error"] = detail
            record["started_pids"] = STARTED_PIDS[before:]
            record["unreaped_pids"] = unreaped(before)
            if record["unreaped_pids"]:
                say(f"WARNING: processes still alive after {wl.name} on {system}: {record['unreaped_pids']}")
            for p in record.get("summary", {}).get("problems", []):
                say(f"problem: {wl.name} on {system}: {p}")
            for path in runner.profiles:
                say(summarize_profile(path))
            _write_json(
                results_dir
                / f"{stamp}-{'smoke-' if args.smoke else ''}{'profile-' if profile_dir else ''}{wl.name}-{system}.json",
                record,
            )
            entries[wl.name][system] = {
                k: record[k]
                for k in ("title", "version", "workload", "summary", "error", "command", "date", "revision")
                if k in record
            }

    if args.failover is True or (args.failover is None and args.all and not args.smoke):
        fo = run_failover(args.failover_trials or (1 if args.smoke else 5), results_dir, data_root, command, date,
                          stamp, keep=not scratch)  # fmt: skip
        if fo is not None and ("error" in fo or fo["unreaped_pids"]):
            failures += 1
    if args.rebalance is True or (args.rebalance is None and args.all and not args.smoke):
        rb = run_rebalance(args.rebalance_trials or (1 if args.smoke else 3), None, results_dir, data_root, command,
                           date, stamp, keep=not scratch)  # fmt: skip
        if rb is not None and ("error" in rb or rb["unreaped_pids"]):
            failures += 1

    if args.queues is True or (args.queues is None and args.all and not args.smoke):
        qf = run_queue_failover(1 if args.smoke else 3, 5_000, 0,
                                results_dir, data_root, command, stamp, keep=not scratch)  # fmt: skip
        qp = run_queue_parallel(1 if args.smoke else 3, 100 if args.smoke else 0, 10, results_dir, data_root,
                                command, stamp, keep=not scratch)  # fmt: skip
        failures += sum(1 for r in (qf, qp) if r is not None and _queue_failed(r))

    total_s = time.monotonic() - t_begin
    say(f"bench run finished in {total_s:.0f} s ({failures} failed)")
    if unreaped(pid_mark):
        say(f"WARNING: unreaped processes: {unreaped(pid_mark)}")
        failures += 1
    if not scratch:
        latest_path = results_dir / LATEST
        latest = json.loads(latest_path.read_text()) if latest_path.exists() else {"results": {}}
        for wl_name, per_system in entries.items():
            latest["results"].setdefault(wl_name, {}).update(per_system)
        machine_at_start["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        if args.all or "command" not in latest:  # the report's header is the last whole run; a partial run's
            # figures are merged in and their sections say when and how they were measured
            latest.update(command=command, date=date, machine=machine_at_start, wall_s=round(total_s, 1))
        for per_system in entries.values():
            for entry in per_system.values():
                entry.setdefault("load_average", [machine_at_start["loadavg_1m_at_start"],
                                                  machine_at_start["loadavg_1m_at_end"]])
        if limits is not None:
            latest["limits"] = limits
        _write_json(latest_path, latest)
        if args.report is True or (args.report is None and args.all):
            from bench import report

            report.write(results_dir)
    return 1 if failures else 0


def _measure(name: str, record: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a measurement into `record`: its failure becomes `error`; the processes it started and any
    it left alive are recorded (and the latter said)."""
    from bench.runner import unreaped

    before = len(STARTED_PIDS)
    try:
        record.update(measure())
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        record["error"] = str(exc) if isinstance(exc, RuntimeError) else traceback.format_exc()
        say(f"FAILED {name}: {record['error']}")
    record["started_pids"] = STARTED_PIDS[before:]
    record["unreaped_pids"] = unreaped(before)
    if record["unreaped_pids"]:
        say(f"WARNING: processes still alive after {name}: {record['unreaped_pids']}")
    return record


def _save(name: str, record: dict[str, Any], results_dir: Path, stamp: str, keep: bool) -> None:
    """A JSON per invocation; merged into latest.json under `name` unless `keep` is false (smoke)."""
    _write_json(results_dir / f"{stamp}-{'' if keep else 'smoke-'}{name}.json", record)
    if keep:
        latest_path = results_dir / LATEST
        latest = json.loads(latest_path.read_text()) if latest_path.exists() else {"results": {}}
        latest[name] = {k: v for k, v in record.items() if k not in ("started_pids",)}
        _write_json(latest_path, latest)


def run_failover(trials: int, results_dir: Path, data_root: Path, command: str, date: str,
                 stamp: str, keep: bool) -> dict[str, Any] | None:  # fmt: skip
    """The failover measurement (bench/failover.py): a JSON per invocation, merged into latest.json
    unless `keep` is false (smoke). None, with one line saying why, when it could not run."""
    from bench import failover
    from bench.cluster import zookeeper_missing

    why = get_driver("logbroker").missing() or zookeeper_missing()
    if why:
        say(f"skip failover: {why}")
        return None
    record = _measure("failover", {"command": command, "date": date, "machine": machine(),
                                   "trials_per_signal": trials}, lambda: failover.run(trials, data_root))
    for kind, s in record.get("summary", {}).items():
        values = ", ".join(f"{x:.3f}" for x in s["first_ack_s"])
        say(f"failover {kind}: first ack after the signal, median {s['first_ack_s_median']:.3f} s "
            f"(target < {s['target_s']:g} s; {values}); outage median {s['outage_s_median']:.3f} s")  # fmt: skip
    if "verified" in record:
        v = record["verified"]
        say(f"failover: {v['acknowledged']:,} acknowledged records read back: {v['missing']} missing, "
            f"{v['mismatched']} at another offset")  # fmt: skip
    _save("failover", record, results_dir, stamp, keep)
    return record


def run_rebalance(trials: int, brokers: int | None, results_dir: Path, data_root: Path, command: str, date: str,
                  stamp: str, keep: bool) -> dict[str, Any] | None:  # fmt: skip
    """The rebalance measurement (bench/rebalance.py): a JSON per invocation, merged into latest.json
    unless `keep` is false (smoke). `brokers` None: 3 with ZooKeeper installed, else one standalone
    broker (said in one line). None, with one line saying why, when it could not run."""
    from bench import rebalance
    from bench.cluster import zookeeper_missing

    why = get_driver("logbroker").missing()
    if why:
        say(f"skip rebalance: {why}")
        return None
    if brokers is None:
        no_zk = zookeeper_missing()
        brokers = 1 if no_zk else rebalance.BROKERS
        if no_zk:
            say(f"rebalance: one standalone broker ({no_zk})")
    elif brokers > 1 and zookeeper_missing():
        say(f"skip rebalance: {zookeeper_missing()}")
        return None
    record = _measure("rebalance", {"command": command, "date": date, "machine": machine(), "trials": trials},
                      lambda: rebalance.run(trials, data_root, brokers))
    s = record.get("summary", {})
    if "join" in s:
        j = s["join"]
        say(f"rebalance join: group consuming again (all {rebalance.PARTITIONS} partitions, balanced) median "
            f"{j['settled_s']['median']:.3f} s, max {j['settled_s']['max']:.3f} s (target < "
            f"{rebalance.TARGETS_S['join']:g} s); new member's first record median {j['first_record_s']['median']:.3f} s")  # fmt: skip
    if "kill" in s:
        k = s["kill"]
        say(f"rebalance kill -9: dead member's partitions consumed again median {k['resumed_s']['median']:.3f} s, "
            f"max {k['resumed_s']['max']:.3f} s = session timeout {k['resumed_minus_session_s']['median']:+.3f} s "
            f"(target < {rebalance.TARGETS_S['kill']:g} s after it)")  # fmt: skip
    if "leave" in s:
        lv = s["leave"]
        say(f"rebalance close(): the member's partitions consumed again median {lv['resumed_s']['median']:.3f} s")
    if record.get("ownership_overlaps"):
        say(f"rebalance: a partition had two owners at once: {record['ownership_overlaps'][:3]}")
    _save("rebalance", record, results_dir, stamp, keep)
    return record


def cmd_rebalance(args: argparse.Namespace) -> int:
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        say(f"note: load average {load:.2f} before the run: other work on this machine will make figures noisy")
    trials = args.trials or (1 if args.smoke else 5)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = run_rebalance(trials, args.brokers, results_dir, data_root, command,
                           time.strftime("%Y-%m-%d %H:%M:%S %Z"), time.strftime("%Y%m%d-%H%M%S"),
                           keep=not args.smoke)  # fmt: skip
    if record is None:
        return 0
    failed = "error" in record or record["unreaped_pids"] or record.get("ownership_overlaps")
    if not args.smoke and args.report and not failed:
        from bench import report

        report.write(results_dir)
    return 1 if failed else 0


def cmd_queue_failover(args: argparse.Namespace) -> int:
    """logbroker share groups: a consumer's kill -9 -> its unacked records delivered to another member."""
    results_dir, data_root = _dirs(args)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = run_queue_failover(args.trials or (1 if args.smoke else 5), args.lock_ms, args.retry_backoff_ms,
                                results_dir, data_root, command, time.strftime("%Y%m%d-%H%M%S"),
                                keep=not args.smoke)  # fmt: skip
    return 1 if record is not None and _queue_failed(record) else 0


def cmd_queue_parallel(args: argparse.Namespace) -> int:
    """logbroker share groups: 1 vs 4 consumers of a 2-partition topic, each message a 10 ms handler."""
    results_dir, data_root = _dirs(args)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = run_queue_parallel(args.runs or (1 if args.smoke else 3), args.records or (100 if args.smoke else 0),
                                args.max_poll_records, results_dir, data_root, command,
                                time.strftime("%Y%m%d-%H%M%S"), keep=not args.smoke)  # fmt: skip
    return 1 if record is not None and _queue_failed(record) else 0


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    results_dir, data_root = Path(args.results_dir), Path(args.data_root)
    results_dir.mkdir(parents=True, exist_ok=True)
    data_root.mkdir(parents=True, exist_ok=True)
    return results_dir, data_root


def _queue_failed(record: dict[str, Any]) -> bool:
    return bool("error" in record or record["unreaped_pids"] or record.get("problems"))


def run_queue_failover(trials: int, lock_ms: int, retry_backoff_ms: int, results_dir: Path, data_root: Path,
                       command: str, stamp: str, keep: bool) -> dict[str, Any] | None:  # fmt: skip
    """The share-consumer kill -9 measurement (bench/queue_failover.py), saved as run_failover's; None,
    with one line saying why, when it could not run."""
    from bench import queue_failover

    why = queue_failover.missing()
    if why:
        say(f"skip queue-failover: {why}")
        return None
    record = _measure(
        "queue-failover",
        {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()},
        lambda: queue_failover.run(trials, data_root, lock_ms, retry_backoff_ms),
    )
    s = record.get("summary", {})
    if s.get("after_lock_s_median") is not None:
        say(f"queue-failover: unacked records of the killed consumer all delivered to another "
            f"lock_ms + {s['after_lock_s_median']:.3f} s after the kill, "
            f"{s['after_expiry_s_median']:.3f} s after the locks ran out (medians of {s['complete_trials']}; "
            f"target < {s['target_after_lock_s']:g} s)")  # fmt: skip
    for problem in record.get("problems", []):
        say(f"queue-failover PROBLEM: {problem}")
    _save("queue-failover", record, results_dir, stamp, keep)
    return record


def run_queue_parallel(runs: int, records: int, max_poll_records: int, results_dir: Path, data_root: Path,
                       command: str, stamp: str, keep: bool) -> dict[str, Any] | None:  # fmt: skip
    """The share-group parallelism measurement (bench/queue_parallel.py; `records` 0: its default),
    saved as run_failover's; None, with one line saying why, when it could not run."""
    from bench import queue_failover, queue_parallel

    why = queue_failover.missing()
    if why:
        say(f"skip queue-parallel: {why}")
        return None
    records = records or queue_parallel.RECORDS
    record = _measure(
        "queue-parallel",
        {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": machine()},
        lambda: queue_parallel.run(runs, data_root, records, max_poll_records),
    )
    s = record.get("summary", {})
    rates = s.get("records_per_s_median", {})
    if s.get("ratio") is not None:
        say(f"queue-parallel: 10 ms handler, {records} records on 2 partitions: 1 consumer {rates['1']:.0f} rec/s, "
            f"4 consumers {rates['4']:.0f} rec/s = {s['ratio']:.2f}x (medians of {runs}; target >= {s['target_ratio']:g}x)")  # fmt: skip
    for problem in record.get("problems", []):
        say(f"queue-parallel PROBLEM: {problem}")
    _save("queue-parallel", record, results_dir, stamp, keep)
    return record


def cmd_failover(args: argparse.Namespace) -> int:
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        say(f"note: load average {load:.2f} before the run: other work on this machine will make figures noisy")
    trials = args.trials or (1 if args.smoke else 5)
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = run_failover(trials, results_dir, data_root, command, time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          time.strftime("%Y%m%d-%H%M%S"), keep=not args.smoke)  # fmt: skip
    if record is None:
        return 0
    failed = "error" in record or record["unreaped_pids"]
    if not args.smoke and args.report and not failed:
        from bench import report

        report.write(results_dir)
    return 1 if failed else 0


def cmd_compaction(args: argparse.Namespace) -> int:
    """Issue 15's compaction figures (bench/compaction.py): a JSON per invocation, merged into
    latest.json under `compaction` unless --smoke."""
    from bench import compaction

    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    data_root = Path(args.data_root)
    data_root.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    if load > 0.5:
        say(f"note: load average {load:.2f} before the run: other work on this machine will make figures noisy")
    settings = ({"runs": 1, "duration_s": 1.0, "commits": 10_000, "groups": 50, "partitions": 20, "settle_s": 5.0,
                 "quiet_s": 1.0}
                if args.smoke else {"runs": args.runs, "duration_s": args.duration_s, "commits": args.commits})
    command = "python -m bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    record = _measure("compaction", {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                                     "machine": machine(), "source": revision()},
                      lambda: compaction.run(data_root, say=say, **settings))  # type: ignore[arg-type]
    _save("compaction", record, results_dir, time.strftime("%Y%m%d-%H%M%S"), keep=not args.smoke)
    return 1 if "error" in record or record["unreaped_pids"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench import report

    report.write(Path(args.results_dir))
    return 0


def cmd_limits(args: argparse.Namespace) -> int:
    from bench import limits as machine_limits

    data_root = Path(args.data_root)
    result = machine_limits.measure(data_root)
    print(json.dumps(result, indent=1))
    latest_path = Path(args.results_dir) / LATEST
    if latest_path.exists():
        latest = json.loads(latest_path.read_text())
        latest["limits"] = result
        _write_json(latest_path, latest)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    for name in workloads.all_names():
        wl = workloads.load(name)
        need = f"  requires {wl.requires}" if wl.requires else ""
        print(f"{name:<22} {wl.description}{need}")
    print()
    for system in SYSTEMS:
        d = get_driver(system)
        print(f"{system:<14} {d.missing() or 'available'}")
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--results-dir", default=str(RESULTS_DIR), help="where JSON results go (default: bench/results)"
    )
    common.add_argument(
        "--data-root", default=tempfile.gettempdir(), help="parent of the servers' temporary data directories"
    )

    r = sub.add_parser("run", parents=[common], help="run workloads against systems")
    r.add_argument("--all", action="store_true", help="every workload in bench/workloads")
    r.add_argument("--workload", action="append", default=[], help="a workload name (repeatable)")
    r.add_argument("--system", action="append", choices=SYSTEMS, help="a system (repeatable; default: all)")
    r.add_argument("--smoke", action="store_true", help="the short CI version of each workload, 1 run")
    r.add_argument("--runs", type=int, default=0, help="repetitions per figure (default 3, smoke 1)")
    r.add_argument("--limits", action=argparse.BooleanOptionalAction, default=None,
                   help="measure disk and loopback limits (default: with --all)")  # fmt: skip
    r.add_argument("--report", action=argparse.BooleanOptionalAction, default=None,
                   help="write RESULTS.md and plots afterwards (default: with --all)")  # fmt: skip
    r.add_argument("--failover", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the failover measurement, as `failover` does (default: with --all, not --smoke)")  # fmt: skip
    r.add_argument("--failover-trials", type=int, default=0, help="trials per signal (default 5, smoke 1)")
    r.add_argument("--rebalance", action=argparse.BooleanOptionalAction, default=None,
                   help="also run the consumer-group rebalance measurement (default: with --all, not --smoke)")  # fmt: skip
    r.add_argument("--queues", action=argparse.BooleanOptionalAction, default=None,
                   help="also run queue-failover (3 trials) and queue-parallel (3 runs) (default: with --all, not --smoke)")  # fmt: skip
    r.add_argument("--rebalance-trials", type=int, default=0,
                   help="rebalance trials, each a join, a close(), a join and a kill -9 (default 3 here, smoke 1)")  # fmt: skip
    r.add_argument(
        "--profile", metavar="DIR", help="py-spy the server and workers (1 run, not kept in latest.json)"
    )
    r.set_defaults(func=cmd_run)

    f = sub.add_parser(
        "failover", parents=[common],
        help="kill -9 / SIGTERM a partition leader of a 3-broker cluster; time until writes are acknowledged again",
    )  # fmt: skip
    f.add_argument("--trials", type=int, default=0, help="trials per signal (default 5, smoke 1)")
    f.add_argument("--smoke", action="store_true", help="1 trial per signal, not merged into latest.json")
    f.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="rewrite RESULTS.md afterwards (default: yes)")  # fmt: skip
    f.set_defaults(func=cmd_failover)

    b = sub.add_parser(
        "rebalance", parents=[common],
        help="a consumer group of 3 over 12 partitions: time until it consumes again after a join, close() or kill -9",
    )  # fmt: skip
    b.add_argument("--trials", type=int, default=0,
                   help="trials, each a join, a close(), a join and a kill -9 (default 5, smoke 1)")  # fmt: skip
    b.add_argument("--brokers", type=int, default=None,
                   help="3: ZooKeeper + 3 brokers (the default where ZooKeeper is installed); 1: one standalone broker")  # fmt: skip
    b.add_argument("--smoke", action="store_true", help="1 trial, not merged into latest.json")
    b.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                   help="rewrite RESULTS.md afterwards (default: yes)")  # fmt: skip
    b.set_defaults(func=cmd_rebalance)

    q = sub.add_parser(
        "queue-failover", parents=[common],
        help="logbroker share groups: a consumer's kill -9 -> its unacked records delivered to another member",
    )  # fmt: skip
    q.add_argument("--trials", type=int, default=0, help="trials (default 5, smoke 1)")
    q.add_argument("--lock-ms", type=int, default=5000, help="the share group's lock_ms (default 5000)")
    q.add_argument("--retry-backoff-ms", type=int, default=0,
                   help="the share group's retry_backoff_ms, added to an expired lock (default 0)")  # fmt: skip
    q.add_argument("--smoke", action="store_true", help="1 trial, not merged into latest.json")
    q.set_defaults(func=cmd_queue_failover)
    c = sub.add_parser(
        "compaction", parents=[common],
        help="compacted topic: cleaner MB/s, produce with the cleaner on vs off, offsets replay after 1,000,000 commits",
    )  # fmt: skip
    c.add_argument("--runs", type=int, default=3, help="produce runs with the cleaner on, and off (default 3)")
    c.add_argument("--duration-s", type=float, default=10.0, help="seconds of each produce run (default 10)")
    c.add_argument("--commits", type=int, default=1_000_000, help="offset commits before the restart (default 1,000,000)")
    c.add_argument("--smoke", action="store_true", help="1 short run, 20,000 commits, not merged into latest.json")
    c.set_defaults(func=cmd_compaction)

    qp = sub.add_parser(
        "queue-parallel", parents=[common],
        help="logbroker share groups: 1 vs 4 consumers of a 2-partition topic, a 10 ms handler per message",
    )  # fmt: skip
    qp.add_argument("--runs", type=int, default=0, help="runs of each (default 3, smoke 1)")
    qp.add_argument("--records", type=int, default=0, help="records per run (default 400, smoke 100)")
    qp.add_argument("--max-poll-records", type=int, default=10,
                    help="each consumer's max_poll_records (default 10)")  # fmt: skip
    qp.add_argument("--smoke", action="store_true", help="1 run of 100 records, not merged into latest.json")
    qp.set_defaults(func=cmd_queue_parallel)

    p = sub.add_parser(
        "report", parents=[common], help="write bench/RESULTS.md and bench/plots/ from latest.json"
    )
    p.set_defaults(func=cmd_report)
    m = sub.add_parser(
        "limits", parents=[common], help="measure the machine: disk fdatasync write, loopback TCP"
    )
    m.set_defaults(func=cmd_limits)
    sub.add_parser("list", help="workloads and which systems are available").set_defaults(func=cmd_list)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (&)
    try:
        return int(args.func(args))
    except workloads.WorkloadError as exc:
        say(f"bench: {exc}")
        return 2
    except KeyboardInterrupt:
        say("bench: interrupted; every server and worker it started has been stopped")
        return 130
