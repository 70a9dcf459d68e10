"""`python -m bench compaction`: issue 15's figures for log compaction, logbroker only, one standalone
broker per phase (each on a fresh data directory, `--log-level info` so its log carries what is parsed):

1. **produce**: max-100b-style produce (one `Producer(acks=1, linger_ms=5, batch_size_bytes=1 MiB)`,
   `send_many` of 1,000 records, 100 B values over 1,000 keys) to a `cleanup_policy=compact` topic
   (`segment_bytes` 8 MiB, `min_cleanable_dirty_ratio` 0.1) for `duration_s` after a 1 s warm-up,
   with the cleaner running (`--log-cleaner-interval-ms 200`) and with it off (`0`), alternated,
   `runs` of each; medians and their ratio.
2. **cleaner throughput**: from the cleaner-on runs, the broker's per-pass log line ("log cleaner
   cleaned T-P below offset O (...): read N bytes in M ms", log_cleaner.LogCleaner.run_pass: bytes of
   closed segments read, time of the pass's phases 2 and 3): MB/s = sum N / sum M, over all passes
   (while the producer competes for the 2 cores) and over the passes after the producer stopped
   (the broker otherwise idle; the run waits for the cleaner to go quiet, at most `settle_s`).
3. **offsets replay**: `commits` offset commits (raw gRPC `OffsetCommit`, one request per group of
   `partitions` partitions, 32 in flight) to a standalone broker, `groups` groups, each committed
   `commits / (groups * partitions)` times; with the cleaner on (`__consumer_offsets` is compacted,
   `--offsets-topic-segment-bytes` 1 MiB) or off; then the broker is killed with SIGKILL and
   restarted on the same data directory, and the coordinator's per-partition line ("coordinator:
   leads __consumer_offsets-N in epoch E: G groups (...) loaded from R records in X s") is parsed.
   *Rebuild* = the last partition's end − the earliest start (end − X), the span in which the
   coordinator answers COORDINATOR_LOAD_IN_PROGRESS; issue 15's target is < 1 s after 1,000,000
   commits. *Ready* = process start → the last partition loaded (includes the restart and the log
   recovery after the kill).
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.cluster import health_serving
from bench.procs import ServerProcess, free_port

LOGBROKER_ROOT = Path(__file__).resolve().parents[1]
TOPIC = "changelog"
KEYS = 1_000
BATCH = 1_000
SEGMENT_BYTES = 8 << 20
CLEANER_ON_MS = 200
IN_FLIGHT = 32

PASS_RE = re.compile(r"^(\S+ \S+) INFO \S+: log cleaner cleaned (\S+)-(\d+) below offset \d+ .*: read (\d+) bytes in (\d+) ms")
LOAD_RE = re.compile(r"^(\S+ \S+) INFO \S+: coordinator: leads __consumer_offsets-(\d+) in epoch \d+: (\d+) groups "
                     r"\(\d+ with members\) loaded from (\d+) records \((\d+) offsets\) in ([\d.]+) s")


def _ts(text: str) -> float:
    """The epoch seconds of a broker log timestamp ("2026-12-06 13:01:41,737", local time)."""
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


class Broker:
    """One standalone broker on a free port; `kill()` is SIGKILL, `restart()` keeps the data dir."""

    def __init__(self, workdir: Path, args: list[str]) -> None:
        self.workdir, self.args, self.starts = workdir, args, 0
        self.address = f"127.0.0.1:{free_port()}"
        self.proc: ServerProcess | None = None

    def start(self) -> float:
        self.starts += 1
        argv = [sys.executable, "-m", "logbroker", "serve", "--data-dir", str(self.workdir / "data"),
                "--listen", self.address, "--log-level", "info", "--metrics-listen", "off", *self.args]
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(LOGBROKER_ROOT), os.environ.get("PYTHONPATH")]))}
        started = time.time()
        self.proc = ServerProcess("logbroker", argv, self.log_path, env=env)
        self.proc.wait_until(lambda: health_serving(self.address), 60, "SERVING on the gRPC health service")
        return started

    @property
    def log_path(self) -> Path:
        return self.workdir / f"logbroker-{self.starts}.log"

    def lines(self) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.proc.wait(10)
        self.proc.stop()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def cleaner_passes(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        m = PASS_RE.match(line)
        if m:
            out.append({"at": _ts(m[1]), "topic": m[2], "partition": int(m[3]), "bytes": int(m[4]), "ms": int(m[5])})
    return out


def _mb_per_s(passes: list[dict[str, Any]]) -> float | None:
    ms = sum(p["ms"] for p in passes)
    return sum(p["bytes"] for p in passes) / 1e6 / (ms / 1000) if ms else None


def _produce(address: str, duration_s: float) -> dict[str, Any]:
    import logbroker

    keys = [b"key-%04d" % k for k in range(KEYS)] * (BATCH // KEYS)
    value = b"v" * 100
    with logbroker.Admin(address) as admin:
        admin.create_topic(TOPIC, config={"cleanup_policy": "compact", "segment_bytes": str(SEGMENT_BYTES),
                                          "min_cleanable_dirty_ratio": "0.1"})
    with logbroker.Producer(address, acks=1, linger_ms=5, batch_size_bytes=1 << 20) as producer:
        futures = []
        for phase_s in (1.0, duration_s):  # warm-up, then the measured window
            sent, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < phase_s:
                futures.append(producer.send_many(TOPIC, [value] * BATCH, keys, partition=0))
                sent += BATCH
                if len(futures) > 64:
                    futures.pop(0).result(60)
            producer.flush(60)
            for f in futures:
                f.result(60)
            futures.clear()
            elapsed = time.monotonic() - t0
    return {"records": sent, "seconds": elapsed, "rate": sent / elapsed, "ended_at": time.time()}


def _wait_quiet(broker: Broker, quiet_s: float, limit_s: float) -> None:
    """Until no cleaner pass was logged for `quiet_s` (at most `limit_s`)."""
    deadline = time.monotonic() + limit_s
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = len(cleaner_passes(broker.lines()))
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            return
        time.sleep(0.2)


def produce_run(root: Path, cleaner: bool, duration_s: float, settle_s: float, quiet_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-compaction-", dir=root) as tmp:
        broker = Broker(Path(tmp), ["--log-cleaner-interval-ms", str(CLEANER_ON_MS if cleaner else 0)])
        try:
            broker.start()
            result = _produce(broker.address, duration_s)
            if cleaner:
                _wait_quiet(broker, quiet_s, settle_s)
            passes = [p for p in cleaner_passes(broker.lines()) if p["topic"] == TOPIC]
        finally:
            broker.stop()
    result["cleaner"] = cleaner
    result["passes"] = passes
    result["passes_after_produce"] = [p for p in passes if p["at"] > result["ended_at"] + 0.5]
    return result


def _commit_all(address: str, groups: int, partitions: int, rounds: int) -> dict[str, Any]:
    import grpc

    import logbroker
    from logbroker.v1 import logbroker_pb2 as pb
    from logbroker.v1 import logbroker_pb2_grpc as pbg

    with logbroker.Admin(address) as admin:
        admin.create_topic("committed", partitions=partitions)
    t0 = time.monotonic()
    errors = 0
    with grpc.insecure_channel(address) as channel:
        stub = pbg.BrokerStub(channel)
        _wait_coordinator(stub, pb)
        commit = stub.OffsetCommit
        pending: list[Any] = []
        for _ in range(rounds):
            for g in range(groups):
                req = pb.OffsetCommitRequest(group=f"group-{g:05d}", partitions=[
                    pb.OffsetCommitPartition(topic="committed", partition=p, offset=0) for p in range(partitions)])
                pending.append(commit.future(req, timeout=60))
                if len(pending) >= IN_FLIGHT:
                    errors += _commit_errors(pending.pop(0).result())
        for f in pending:
            errors += _commit_errors(f.result())
    if errors:
        raise RuntimeError(f"{errors} offset commits failed")
    return {"commits": groups * partitions * rounds, "commit_s": time.monotonic() - t0}


def _wait_coordinator(stub: Any, pb: Any) -> None:
    """FindCoordinator creates __consumer_offsets; then every shard must answer a commit."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if stub.FindCoordinator(pb.FindCoordinatorRequest(group="group-00000"), timeout=10).error_code == 0:
            probes = [stub.OffsetFetch(pb.OffsetFetchRequest(group=f"group-{g:05d}"), timeout=10) for g in range(64)]
            if all(r.error_code == 0 for r in probes):
                return
        time.sleep(0.1)
    raise RuntimeError("the coordinator did not load __consumer_offsets within 60 s")


def _commit_errors(resp: Any) -> int:
    return int(resp.error_code != 0) + sum(1 for r in resp.results if r.error_code != 0)


def replay_run(root: Path, cleaner: bool, commits: int, groups: int, partitions: int,
               settle_s: float, quiet_s: float = 3.0) -> dict[str, Any]:  # fmt: skip
    rounds = max(1, commits // (groups * partitions))
    with tempfile.TemporaryDirectory(prefix="bench-compaction-", dir=root) as tmp:
        broker = Broker(Path(tmp), ["--log-cleaner-interval-ms", str(CLEANER_ON_MS if cleaner else 0),
                                    "--offsets-topic-segment-bytes", str(1 << 20)])
        try:
            broker.start()
            result = _commit_all(broker.address, groups, partitions, rounds)
            if cleaner:
                _wait_quiet(broker, quiet_s, settle_s)
            result["passes"] = len(cleaner_passes(broker.lines()))
            offsets_bytes = _offsets_bytes(broker)
            broker.kill()
            started = broker.start()
            n = _offsets_partitions(broker)
            deadline = time.monotonic() + 120
            while len(loads := _loads(broker.lines())) < n and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            broker.stop()
    if len(loads) < n:
        raise RuntimeError(f"only {len(loads)} of {n} __consumer_offsets partitions loaded after 120 s")
    result.update(cleaner=cleaner, groups=groups, partitions=partitions, rounds=rounds, offsets_partitions=n,
                  records_replayed=sum(x["records"] for x in loads), offsets_spanned=sum(x["offsets"] for x in loads),
                  offsets_log_bytes=offsets_bytes, groups_loaded=sum(x["groups"] for x in loads),
                  rebuild_s=max(x["at"] for x in loads) - min(x["at"] - x["s"] for x in loads),
                  max_partition_s=max(x["s"] for x in loads),
                  ready_s=max(x["at"] for x in loads) - started)
    return result


def _offsets_partitions(broker: Broker) -> int:
    import logbroker

    with logbroker.Admin(broker.address) as admin:
        return len(admin.describe_topics(["__consumer_offsets"])[0].partitions)


def _offsets_bytes(broker: Broker) -> int:
    import logbroker

    with logbroker.Admin(broker.address) as admin:
        return sum(p.size_bytes for p in admin.describe_topics(["__consumer_offsets"])[0].partitions)


def _loads(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        m = LOAD_RE.match(line)
        if m:
            out.append({"at": _ts(m[1]), "partition": int(m[2]), "groups": int(m[3]), "records": int(m[4]),
                        "offsets": int(m[5]), "s": float(m[6])})
    return out


def run(data_root: Path, runs: int = 3, duration_s: float = 10.0, commits: int = 1_000_000, groups: int = 1_000,
        partitions: int = 100, settle_s: float = 60.0, quiet_s: float = 3.0, say: Any = print) -> dict[str, Any]:  # fmt: skip
    produce: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for i in range(runs):
        for cleaner in ((True, False) if i % 2 == 0 else (False, True)):
            r = produce_run(data_root, cleaner, duration_s, settle_s, quiet_s)
            produce["on" if cleaner else "off"].append(r)
            say(f"compaction produce, cleaner {'on' if cleaner else 'off'}: {r['rate']:,.0f} rec/s; "
                f"{len(r['passes'])} cleaner passes")
    on = statistics.median(r["rate"] for r in produce["on"])
    off = statistics.median(r["rate"] for r in produce["off"])
    all_passes = [p for r in produce["on"] for p in r["passes"]]
    idle_passes = [p for r in produce["on"] for p in r["passes_after_produce"]]
    replay = {}
    for cleaner in (True, False):
        r = replay_run(data_root, cleaner, commits, groups, partitions, settle_s, quiet_s)
        replay["on" if cleaner else "off"] = r
        say(f"compaction replay, cleaner {'on' if cleaner else 'off'}: {r['commits']:,} commits in "
            f"{r['commit_s']:.1f} s; restart rebuilt {r['groups_loaded']:,} groups from {r['records_replayed']:,} "
            f"records in {r['rebuild_s']:.3f} s (ready {r['ready_s']:.2f} s after the restart)")
    summary = {
        "produce_on_median": on, "produce_off_median": off, "produce_ratio": on / off,
        "cleaner_mb_per_s_all": _mb_per_s(all_passes), "cleaner_mb_per_s_idle": _mb_per_s(idle_passes),
        "cleaner_passes": len(all_passes), "cleaner_passes_idle": len(idle_passes),
        "cleaned_bytes": sum(p["bytes"] for p in all_passes),
    }
    say(f"compaction: produce with the cleaner {on:,.0f} rec/s vs off {off:,.0f} = {on / off:.2f}x; cleaner "
        f"{summary['cleaner_mb_per_s_all'] or 0:.1f} MB/s over {len(all_passes)} passes, "
        f"{summary['cleaner_mb_per_s_idle'] or 0:.1f} MB/s idle ({len(idle_passes)} passes)")
    return {"produce": produce, "replay": replay, "summary": summary,
            "settings": {"runs": runs, "duration_s": duration_s, "commits": commits, "groups": groups,
                         "partitions": partitions}}
