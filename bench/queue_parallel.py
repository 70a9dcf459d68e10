"""`python -m bench queue-parallel`: a share group's parallelism beyond the partition count.

logbroker only (issue 16: "with a handler that sleeps 10 ms, four consumers finish at least 3x faster
than one"). One standalone broker; per run a fresh topic of `PARTITIONS` (2) partitions holding
`--records` (default 400) records of 100 B and a fresh share group (`auto_offset_reset="earliest"`,
the default lock_ms). `consumers` member processes (1, then 4) are started and each builds its
`QueueConsumer(..., max_poll_records=--max-poll-records)` (default 10: a worker takes a few records at a
time, as a prefetch, so that one member does not acquire the whole topic in one poll); then all are told
to go at once (time zero, `time.monotonic()`, one clock for all processes). Each handles every message
it gets by sleeping 10 ms, then `message.ack()` (the acks ride on its next poll), and reports after
each poll the time its last handler finished and the (partition, offset) it handled. The run ends
when every record has been handled; the members then `commit_acks()` and close.

Figures: records/s per run = records / (last handler finished - time zero), the join included; the
median of `--runs` (default 3) for 1 and for 4 consumers, and their ratio (target >= 3). Checks:
every record handled (`missing`), none handled twice (`duplicates`: under stable membership each
record is acknowledged once); any not 0 is listed in `problems` and makes the command fail.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import statistics
import tempfile
import time
from contextlib import ExitStack
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, cast

from bench.drivers.logbroker import LogbrokerDriver
from bench.procs import STARTED_PIDS, die_with_parent, reap
from bench.queue_failover import produce
from bench.workload import Workload

PARTITIONS = 2
RECORDS = 400
HANDLER_S = 0.010
MAX_POLL_RECORDS = 10
CONSUMERS = (1, 4)
RUN_TIMEOUT_S = 120.0
TARGET_RATIO = 3.0


def _member(conn: Connection, address: str, topic: str, group: str, max_poll_records: int, parent: int) -> None:
    """One worker: wait for "go", then poll, sleep 10 ms per message and ack it, until "stop"."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    from logbroker import QueueConsumer

    c = QueueConsumer(address, group=group, topics=[topic], auto_offset_reset="earliest",
                      max_poll_records=max_poll_records)  # fmt: skip
    try:
        conn.send(("ready",))
        conn.recv()  # go
        while not conn.poll(0):
            got = c.poll(timeout_ms=100)
            for m in got:
                time.sleep(HANDLER_S)
                m.ack()
            if got:
                conn.send(("done", time.monotonic(), [(m.partition, m.offset) for m in got]))
        c.commit_acks()
    finally:
        c.close()


def _run(address: str, name: str, consumers: int, records: int, max_poll_records: int) -> dict[str, Any]:
    produce(address, name, PARTITIONS, records)
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        for _ in range(consumers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_member, args=(child, address, name, name, max_poll_records, os.getpid()),
                               name="bench-queue-parallel", daemon=True)  # fmt: skip
            proc.start()
            assert proc.pid is not None
            STARTED_PIDS.append(proc.pid)
            child.close()
            procs.append(proc)
            conns.append(parent)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        for conn in conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"queue-parallel: a consumer was not ready within {RUN_TIMEOUT_S:.0f} s")
            conn.recv()
        t0 = time.monotonic()
        for conn in conns:
            conn.send(("go",))
        handled, last, per_member = _collect(conns, records, t0 + RUN_TIMEOUT_S)
        for conn in conns:
            conn.send(("stop",))
        distinct = set(handled)
        return {
            "consumers": consumers,
            "elapsed_s": last - t0,
            "records_per_s": len(distinct) / (last - t0) if last > t0 else None,
            "handled_per_consumer": per_member,
            "missing": records - len(distinct),
            "duplicates": len(handled) - len(distinct),
        }
    finally:
        reap(procs)


def _collect(conns: list[Connection], records: int, deadline: float) -> tuple[list[Any], float, list[int]]:
    """The members' reports until every record was handled once, or the deadline: every (partition,
    offset) handled (with repeats), when the last handler finished, and how many each member handled."""
    handled: list[Any] = []
    per_member = [0] * len(conns)
    last = 0.0
    while len(set(handled)) < records and time.monotonic() < deadline:
        for ready in wait(conns, timeout=0.2):
            conn = cast(Connection, ready)
            _, t, got = conn.recv()
            handled += [tuple(k) for k in got]
            per_member[conns.index(conn)] += len(got)
            last = max(last, t)
    return handled, last, per_member


def run(runs: int, data_root: Path, records: int = RECORDS, max_poll_records: int = MAX_POLL_RECORDS) -> dict[str, Any]:
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in CONSUMERS}
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-queue-parallel-", dir=data_root)))
        server = LogbrokerDriver().start(workdir, Workload(name="queue-parallel"), stack)
        for i in range(runs):
            for n in CONSUMERS:  # alternate, so a slow spell of the machine hits both
                results[n].append(_run(server.address, f"queue-parallel-{i}-{n}", n, records, max_poll_records))
    medians = {}
    for n, rs in results.items():
        rates = [r["records_per_s"] for r in rs if r["records_per_s"] and not r["missing"]]
        medians[n] = statistics.median(rates) if rates else None
    one, four = medians[CONSUMERS[0]], medians[CONSUMERS[-1]]
    checks = ("missing", "duplicates")
    problems = [f"{n} consumers, run {i + 1}: {k} = {r[k]}" for n, rs in results.items()
                for i, r in enumerate(rs) for k in checks if r[k]]  # fmt: skip
    return {
        "setup": {"partitions": PARTITIONS, "records": records, "handler_ms": HANDLER_S * 1000,
                  "max_poll_records": max_poll_records, "runs": runs},  # fmt: skip
        "runs": {str(n): rs for n, rs in results.items()},
        "summary": {
            "records_per_s_median": {str(n): m for n, m in medians.items()},
            "ratio": four / one if one and four else None,
            "target_ratio": TARGET_RATIO,
        },
        "problems": problems,
    }
