"""`python -m bench queue-failover`: how long after a share consumer's kill -9 its records reach another.

logbroker only (issue 16). One standalone broker; per trial a fresh topic of 4 partitions holding
`BACKLOG` records of 100 B and a fresh share group (`auto_offset_reset="earliest"`, `lock_ms` from
`--lock-ms`, default 5,000, and `retry_backoff_ms` from `--retry-backoff-ms`, default 0: the group's
retry backoff is added to an expired lock, 1 s by default, and is a policy, not the failover's cost).

A *survivor* process is started first: it builds its `QueueConsumer` and waits. A *victim* process
(`QueueConsumer`) then polls until it holds records, acks the first half of them and `commit_acks()`
(so which acks the broker accepted is known), and reports the records it still holds and when its
poll began. The harness tells the survivor to go and sends the victim SIGKILL at once (time zero,
just before `os.kill`; `time.monotonic()` is one clock for all processes). The survivor joins,
drains the rest and acks every message, reporting for each poll the time and (partition, offset,
delivery_count) of each message.

Figures per trial (seconds from the kill): `first_redelivered_s` / `all_redelivered_s`, the first and
the last of the victim's held records received by the survivor, and `after_lock_s` =
all_redelivered_s - lock_ms (issue 16's target: lock expiry + under 1 s). The locks were taken
`acquired_before_kill_s` before the kill (at most: from the start of the victim's poll), so
`after_expiry_s` = all_redelivered_s - (lock_ms - acquired_before_kill_s) is the delay after the locks
ran out (an upper bound). Checks: every held record came back with delivery_count >= 2
(`held_not_redelivered`, `redelivered_count_below_2`), no record whose ack the broker accepted came
back (`acked_redelivered`), every record not acked by the victim was received (`lost`); any of them
not 0 is listed in `problems` and makes the command fail.

Where `from logbroker import QueueConsumer` fails the measurement is skipped with that one line.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import statistics
import tempfile
import time
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.drivers.logbroker import LogbrokerDriver, queue_consumer_missing
from bench.procs import STARTED_PIDS, die_with_parent, reap
from bench.workload import Workload

BACKLOG = 2_000
PARTITIONS = 4
LOCK_MS = 5_000
TRIAL_TIMEOUT_S = 60.0
TARGET_AFTER_LOCK_S = 1.0

Key = tuple[int, int]  # (partition, offset)


def missing() -> str | None:
    return LogbrokerDriver().missing() or queue_consumer_missing()


def _member(conn: Connection, role: str, address: str, topic: str, group: str, settings: dict[str, int],
            parent: int) -> None:
    """A share-group member process: `victim` (hold, ack half, then wait to be killed) or `survivor`
    (wait for "go", then drain and ack everything until "stop")."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    from logbroker import QueueConsumer

    c = QueueConsumer(address, group=group, topics=[topic], auto_offset_reset="earliest",
                      lock_ms=settings["lock_ms"], retry_backoff_ms=settings["retry_backoff_ms"])  # fmt: skip
    try:
        if role == "victim":
            _victim(conn, c)
        conn.send(("ready",))
        conn.recv()  # go
        while not conn.poll(0):
            got = list(c.poll(timeout_ms=100))
            if got:
                t = time.monotonic()
                for m in got:
                    m.ack()
                conn.send(("got", t, [(m.partition, m.offset, m.delivery_count) for m in got]))
        c.commit_acks()
    finally:
        c.close()


def _victim(conn: Connection, c: Any) -> None:
    """Poll until holding records, ack the first half, commit, report, and wait for SIGKILL."""
    held: list[Any] = []
    deadline = time.monotonic() + TRIAL_TIMEOUT_S
    t_poll = time.monotonic()
    while not held and time.monotonic() < deadline:
        t_poll = time.monotonic()
        held = list(c.poll(timeout_ms=500))
    acked = held[: len(held) // 2]
    for m in acked:
        m.ack()
    outcome = c.commit_acks()  # {(topic, partition, offset): None when accepted, else the error}
    accepted = [(m.partition, m.offset) for m in acked if outcome.get((m.topic, m.partition, m.offset), 0) is None]
    conn.send(("held", t_poll, [(m.partition, m.offset) for m in held[len(acked):]],
               [(m.partition, m.offset) for m in acked], accepted))  # fmt: skip
    while True:  # hold the rest until SIGKILL
        time.sleep(1)


def _spawn(role: str, address: str, topic: str, group: str, settings: dict[str, int]) -> tuple[Any, Connection]:
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_member, args=(child, role, address, topic, group, settings, os.getpid()),
                       name=f"bench-queue-{role}", daemon=True)  # fmt: skip
    proc.start()
    assert proc.pid is not None
    STARTED_PIDS.append(proc.pid)
    child.close()
    return proc, parent


def _recv(conn: Connection, deadline: float, what: str) -> Any:
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise RuntimeError(f"queue-failover: no {what} within {TRIAL_TIMEOUT_S:.0f} s")
    return conn.recv()


def produce(address: str, topic: str, partitions: int = PARTITIONS, records: int = BACKLOG) -> None:
    """A topic of `partitions` holding `records` values of 100 B (no key: spread over the partitions)."""
    import logbroker
    from bench.worker import payload

    admin = logbroker.Admin(address)
    try:
        admin.create_topic(topic, partitions=partitions, replication_factor=1, config={})
    finally:
        admin.close()
    p = logbroker.Producer(address, acks=1)
    try:
        value = payload(100)
        p.send_many(topic, [value] * records, None).result(60)
        p.flush(60)
    finally:
        p.close(10)


def _trial(address: str, i: int, settings: dict[str, int]) -> dict[str, Any]:
    topic, group = f"queue-failover-{i}", f"queue-failover-{i}"
    lock_s = settings["lock_ms"] / 1000
    produce(address, topic)
    procs: list[Any] = []
    try:
        deadline = time.monotonic() + TRIAL_TIMEOUT_S
        survivor, sconn = _spawn("survivor", address, topic, group, settings)
        procs.append(survivor)
        _recv(sconn, deadline, "survivor ready")
        victim, vconn = _spawn("victim", address, topic, group, settings)
        procs.append(victim)
        _, t_poll, held_raw, acked_raw, accepted_raw = _recv(vconn, deadline, "records held by the victim")
        held, accepted = {tuple(k) for k in held_raw}, {tuple(k) for k in accepted_raw}
        sconn.send(("go",))
        t_kill = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        seen = _drain(sconn, held, BACKLOG - len(accepted), t_kill + lock_s + TRIAL_TIMEOUT_S)
        back = [seen[k] for k in held if k in seen]
        times = sorted(t - t_kill for t, _ in back)
        last = times[-1] if len(back) == len(held) and times else None
        return {
            "held": len(held),
            "acked_by_victim": len(acked_raw),
            "acks_accepted": len(accepted),
            "acquired_before_kill_s": t_kill - t_poll,
            "first_redelivered_s": times[0] if times else None,
            "all_redelivered_s": last,
            "after_lock_s": None if last is None else last - lock_s,
            "after_expiry_s": None if last is None else last - (lock_s - (t_kill - t_poll)),
            "held_not_redelivered": len(held) - len(back),
            "redelivered_count_below_2": sum(1 for _, n in back if n < 2),
            "acked_redelivered": len(accepted & seen.keys()),
            "lost": BACKLOG - len(accepted) - len(seen.keys() - accepted),
        }
    finally:
        reap(procs)


def _drain(sconn: Connection, held: set[Key], expected: int, deadline: float) -> dict[Key, tuple[float, int]]:
    """The survivor's receipts until it has every record expected (and every held one), or the deadline:
    (partition, offset) -> (time of the first receipt, its delivery count). Then tells it to stop."""
    seen: dict[Key, tuple[float, int]] = {}
    while (len(seen) < expected or not held <= seen.keys()) and time.monotonic() < deadline:
        if sconn.poll(0.2):
            _, t, got = sconn.recv()
            for part, off, count in got:
                seen.setdefault((part, off), (t, count))
    sconn.send(("stop",))
    return seen


def run(trials: int, data_root: Path, lock_ms: int = LOCK_MS, retry_backoff_ms: int = 0) -> dict[str, Any]:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-queue-failover-", dir=data_root)))
        server = LogbrokerDriver().start(workdir, Workload(name="queue-failover"), stack)
        settings = {"lock_ms": lock_ms, "retry_backoff_ms": retry_backoff_ms}
        results = [_trial(server.address, i, settings) for i in range(trials)]
    done = [r["after_lock_s"] for r in results if r["after_lock_s"] is not None]
    checks = ("held_not_redelivered", "redelivered_count_below_2", "acked_redelivered", "lost")
    problems = [f"trial {i + 1}: {k} = {r[k]}" for i, r in enumerate(results) for k in checks if r[k]]
    expiry = [r["after_expiry_s"] for r in results if r["after_expiry_s"] is not None]
    return {
        "lock_ms": lock_ms,
        "retry_backoff_ms": retry_backoff_ms,
        "backlog": BACKLOG,
        "trials": results,
        "summary": {
            "after_lock_s_median": statistics.median(done) if done else None,
            "after_lock_s_max": max(done) if done else None,
            "after_expiry_s_median": statistics.median(expiry) if expiry else None,
            "target_after_lock_s": TARGET_AFTER_LOCK_S,
            "complete_trials": len(done),
        },
        "problems": problems,
    }
