"""`python -m bench.rebalance_pause [--rate N] [--warmup-s S] [--after-s S]`: how long producers wait
for acknowledgements while `logbroker cluster rebalance --execute` moves leadership (issue 21).

ZooKeeper and 3 brokers (bench/cluster.py, `--replica-lag-time-max-ms 3000`), one topic of 6
partitions, replication factor 3, min_insync_replicas 2, every leader piled onto broker 0 first
(each partition reassigned to the same replicas with broker 0 first). One producer (acks=all,
linger_ms 0) sends `--rate` records/s in total (default 600: 100 per partition) of 100 bytes,
round-robin over explicit partitions, paced on a fixed schedule, and records the time of every
acknowledgement (`time.monotonic()`, in the future's callback). After `--warmup-s` (default 3) the
rebalance runs as the CLI does it (`cluster rebalance --execute --sample-seconds 1`, a subprocess);
the producer goes on for `--after-s` (default 3) after it returned.

Figures (seconds):

- `rebalance_s`: the CLI's wall time (its 1 s bytes-in sample included) and `moves`;
- `gap_median_s`, `gap_max_s`: per partition, the longest time between two consecutive
  acknowledgements of that partition where that interval overlaps the rebalance (from the CLI's
  start to its end): the pause a producer saw; the median and the maximum over the 6 partitions;
- `baseline_gap_median_s`: the same over the warm-up, before the rebalance (the steady rhythm);
- `failed_sends` (must be 0), `acknowledged`, `leaders_before` / `leaders_after` per broker.

Prints one JSON object. Not run by the test suite's benchmark smoke; results go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.cluster import LOGBROKER_ROOT, LogbrokerCluster, zookeeper_missing

TOPIC = "pause-bench"
PARTITIONS = 6
RECORD = b"p" * 100
CLI_TIMEOUT_S = 180.0


class AckRecorder:
    """A paced acks=all producer on its own thread: every acknowledgement's time per partition."""

    def __init__(self, bootstrap: str, rate: int) -> None:
        self.bootstrap = bootstrap
        self.rate = rate
        self.acks: dict[int, list[float]] = {p: [] for p in range(PARTITIONS)}
        self.failed = 0
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _done(self, partition: int, fut: Any) -> None:
        now = time.monotonic()
        with self._lock:
            if fut.exception() is None:
                self.acks[partition].append(now)
            else:
                self.failed += 1

    def _run(self) -> None:
        from logbroker import Producer

        with Producer(self.bootstrap, acks="all", linger_ms=0, request_timeout_ms=10_000,
                      delivery_timeout_ms=60_000) as producer:
            interval_s = 1.0 / self.rate
            next_s = time.monotonic()
            i = 0
            while not self._stop.is_set():
                p = i % PARTITIONS
                f = producer.send(TOPIC, RECORD, partition=p)
                f.add_done_callback(functools.partial(self._done, p))
                i += 1
                next_s += interval_s
                delay_s = next_s - time.monotonic()
                if delay_s > 0:
                    time.sleep(delay_s)  # the pace of a steady producer
            self.sent = i
            producer.flush(60)

    def start(self) -> AckRecorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


def longest_gap_s(acks: list[float], start: float, end: float) -> float:
    """The longest interval between consecutive acknowledgements that overlaps [start, end] (the
    acknowledgement before `start` and the one after `end` included)."""
    if not acks:
        return end - start
    lo = max(0, bisect.bisect_left(acks, start) - 1)
    hi = min(len(acks), bisect.bisect_right(acks, end) + 1)
    window = acks[lo:hi]
    gaps = [b - a for a, b in zip(window, window[1:], strict=False) if b >= start and a <= end]
    if acks[-1] < end:  # nothing acknowledged after the end: the pause lasts at least until then
        gaps.append(end - acks[-1])
    return max(gaps, default=0.0)


def _leaders(cluster: LogbrokerCluster) -> dict[int, int]:
    states = cluster.partition_states(TOPIC)
    return {b: sum(1 for s in states.values() if s.leader == b) for b in range(cluster.size)}


def _pile_leaders(cluster: LogbrokerCluster) -> None:
    from logbroker import Admin

    with Admin(cluster.bootstrap) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3, config={"min_insync_replicas": "2"})
        cluster.wait_fully_replicated(TOPIC, PARTITIONS, 3)
        for p, s in sorted(cluster.partition_states(TOPIC).items()):
            admin.reassign_partition(TOPIC, p, [0, *[b for b in s.replicas if b != 0]])
    deadline = time.monotonic() + 60
    while _leaders(cluster).get(0) != PARTITIONS or any(
            len(s.isr) != 3 for s in cluster.partition_states(TOPIC).values()):
        if time.monotonic() > deadline:
            raise RuntimeError("leaders were not piled onto broker 0 within 60 s")
        time.sleep(0.1)


def _rebalance(bootstrap: str) -> tuple[float, float, dict[str, Any]]:
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": bootstrap,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(LOGBROKER_ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "logbroker", "cluster", "rebalance", "--execute", "--format", "json",
                          "--sample-seconds", "1"], capture_output=True, text=True, env=env, cwd=LOGBROKER_ROOT,
                         timeout=CLI_TIMEOUT_S, check=False)
    end = time.monotonic()
    if run.returncode != 0:
        raise RuntimeError(f"cluster rebalance --execute exited {run.returncode}: {run.stdout}{run.stderr}")
    return start, end, json.loads(run.stdout)


def measure(workdir: Path, rate: int, warmup_s: float, after_s: float) -> dict[str, Any]:
    cluster = LogbrokerCluster(workdir, 3, extra_args=["--replica-lag-time-max-ms", "3000"])
    try:
        cluster.start()
        _pile_leaders(cluster)
        before = _leaders(cluster)
        producer = AckRecorder(cluster.bootstrap, rate).start()
        try:
            warm_start = time.monotonic()
            time.sleep(warmup_s)
            start, end, result = _rebalance(cluster.bootstrap)
            time.sleep(after_s)
        finally:
            producer.stop()
        after = _leaders(cluster)
    finally:
        cluster.stop()
    gaps = [longest_gap_s(producer.acks[p], start, end) for p in range(PARTITIONS)]
    baseline = [longest_gap_s(producer.acks[p], warm_start + 0.5, start) for p in range(PARTITIONS)]
    return {
        "partitions": PARTITIONS, "rate_records_per_s": rate, "rebalance_s": round(end - start, 3),
        "moves": len(result.get("moves", [])), "move_failures": result.get("result", {}).get("failed", []),
        "gap_median_s": round(statistics.median(gaps), 3), "gap_max_s": round(max(gaps), 3),
        "gaps_s": [round(g, 3) for g in gaps], "baseline_gap_median_s": round(statistics.median(baseline), 3),
        "failed_sends": producer.failed, "sent": producer.sent,
        "acknowledged": sum(len(a) for a in producer.acks.values()),
        "leaders_before": before, "leaders_after": after,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.rebalance_pause", description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=int, default=600, help="records/s over all partitions (default 600)")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--after-s", type=float, default=3.0)
    args = ap.parse_args(argv)
    if not 1 <= args.rate <= 100_000:
        ap.error("--rate must be in [1, 100000]")
    missing = zookeeper_missing()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-rebalance-pause-") as tmp:
        print(json.dumps(measure(Path(tmp), args.rate, args.warmup_s, args.after_s)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
