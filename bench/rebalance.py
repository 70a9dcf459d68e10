"""`python -m bench rebalance`: how long a consumer group takes to consume again after a member joins,
leaves or dies.

One cluster (ZooKeeper + 3 brokers; `--brokers 1`: one standalone broker, the same coordinator code),
one topic of 12 partitions (replication factor 3, min_insync_replicas 2 on a cluster) and one producer
thread writing 1,200 records/s of 100 B round-robin over the partitions throughout (100 records/s
per partition, acks=all on a cluster, acks=1 standalone, linger_ms 5). Three member processes consume
it as one group (`Consumer(bootstrap, topics=[topic], group=..., session_timeout_ms=3000,
on_assign=..., on_revoke=..., auto_commit_interval_ms=1000)`, client defaults otherwise; the broker's
default heartbeat interval: 500 ms while the group is stable, 100 ms while it reconciles). Each member
reports, with `time.monotonic()` (one clock for every process on Linux), when its callbacks ran and,
for every poll that returned records, the time and the first and last offset per partition.

Each trial is four events, each started from a steady group (every partition consumed by its owner
within the last 0.5 s, the assignment balanced) after a random 0.5-1.0 s (the members heartbeat in
step after a rebalance: an event a fixed time after the last one would meet the same heartbeat phase
every time), and followed until the group is steady again:

- `join`: a 4th member process (already started, the client imported) is told to construct its
  Consumer; time zero is taken in that process just before the constructor, which starts the heartbeat
  thread that finds the coordinator and joins;
- `leave`: the oldest member calls `close()` (on_revoke, commit, leave heartbeat); time zero: the call;
- `join` again;
- `kill`: the oldest member gets SIGKILL; time zero is just before `os.kill`.

Figures per event (seconds from time zero):

- `settled_s`: every partition owned by a live member, disjoint, balanced (3/3/3/3 after a join,
  4/4/4 after a departure), and each consumed again by its owner: a record received by it after time
  zero and after it got the partition. The latest such first record over all 12 partitions: "the
  group consuming again" (issue 4's figure for a join);
- `resumed_s`: the same over the moved partitions only (those whose owner changed; for a departure,
  the partitions of the member that left or died: issue 4's figure for a death, also given minus the
  session timeout as `resumed_minus_session_s`); `first_resumed_s`: the earliest of them;
- `longest_gap_s`: per moved partition, its old owner's last record → its new owner's first: the
  longest time a partition was not consumed;
- `assigned_s`: the new owners' `on_assign` of the moved partitions (the last of them);
- join only: `first_record_s` (the new member's first record), `member_assigned_s` (its first
  non-empty on_assign), `revoked_s` (the old owners' last on_revoke), `constructed_s`;
- leave only: `close_s`, how long `close()` took;
- from the coordinator's DescribeGroup, polled every 50 ms while an event runs: `registered_s` (the
  new member is listed), `left_s` / `evicted_s` (the member is no longer listed: after a kill, the
  session timeout counted from its last heartbeat), `after_eviction_s` = resumed_s - evicted_s (the
  survivors hear of it at their next heartbeat), `group_stable_s`;
- `redelivered`: records of moved partitions received again by their new owner (offsets at or below
  the old owner's last): after a kill, what the dead member read after its last commit.

At the end, ownership intervals (on_assign → on_revoke, or the kill) are checked: no partition may be
owned by two members at any moment (`ownership_overlaps`).
"""

from __future__ import annotations

import bisect
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

from bench.procs import STARTED_PIDS, ServerProcess, die_with_parent, free_port, reap
from bench.progress import say

TOPIC = "rebalance"
GROUP = "bench-rebalance"
PARTITIONS = 12
MEMBERS = 3  # the steady group; a join makes it 4
BROKERS = 3
REPLICATION_FACTOR = 3
MIN_INSYNC = 2
ZK_SESSION_TIMEOUT_MS = 6000
SESSION_TIMEOUT_MS = 3000
AUTO_COMMIT_INTERVAL_MS = 1000
RATE = 1200  # records/s over all partitions
RECORD_SIZE = 100
LINGER_MS = 5
POLL_TIMEOUT_MS = 50
REPORT_INTERVAL_S = 0.05  # members send their receipts this often
STEADY_WINDOW_S = 0.5  # before an event: every partition consumed by its owner within this long
PRE_EVENT_S = 0.5  # and the group observed this long, plus a random 0..PHASE_JITTER_S:
PHASE_JITTER_S = 0.5  # one stable heartbeat interval: members heartbeat in step after a rebalance, events must not
OBSERVE_S = 0.5  # after it settles: the assignment must not move again
SETTLE_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.05
EVENTS = ("join", "leave", "join", "kill")
TARGETS_S = {"join": 1.0, "kill": 2.0}  # issue 4: join < 1 s; death < 2 s after the session timeout


# -- member processes ------------------------------------------------------------------------------


def member_main(conn: Connection, bootstrap: str, parent_pid: int) -> None:
    """A group member: ("ready", pid) → ("join",) → consume and report until ("leave",) or SIGKILL."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    consumer: Any = None
    try:
        import logbroker

        Consumer = logbroker.Consumer  # the client's modules load now (lazily imported), not after time zero
        conn.send(("ready", os.getpid()))
        if conn.recv()[0] != "join":
            return

        def callback(kind: str) -> Callable[[set[tuple[str, int]]], None]:
            def report(partitions: set[tuple[str, int]]) -> None:
                conn.send((kind, time.monotonic(), sorted(p for _, p in partitions)))

            return report

        t_join = time.monotonic()
        consumer = Consumer(
            bootstrap, topics=[TOPIC], group=GROUP, session_timeout_ms=SESSION_TIMEOUT_MS,
            on_assign=callback("assign"), on_revoke=callback("revoke"), on_lost=callback("lost"),
            auto_offset_reset="earliest", auto_commit_interval_ms=AUTO_COMMIT_INTERVAL_MS, max_poll_records=10_000,
        )  # fmt: skip
        conn.send(("joined", t_join, time.monotonic(), consumer.member_id))
        receipts: list[tuple[float, int, int, int, int]] = []
        next_report = time.monotonic() + REPORT_INTERVAL_S
        while True:
            if conn.poll():
                msg = conn.recv()
                if msg[0] == "leave":
                    if receipts:
                        conn.send(("records", receipts))
                    t_close = time.monotonic()
                    c, consumer = consumer, None
                    c.close()
                    conn.send(("left", t_close, time.monotonic()))
                    return
            records = consumer.poll(timeout_ms=POLL_TIMEOUT_MS)
            now = time.monotonic()
            if records:
                spans: dict[int, list[int]] = {}
                for r in records:
                    s = spans.get(r.partition)
                    if s is None:
                        spans[r.partition] = [r.offset, r.offset, 1]
                    else:
                        s[0] = min(s[0], r.offset)
                        s[1] = max(s[1], r.offset)
                        s[2] += 1
                receipts.extend((now, p, a, b, n) for p, (a, b, n) in spans.items())
            if receipts and now >= next_report:
                conn.send(("records", receipts))
                receipts = []
                next_report = now + REPORT_INTERVAL_S
    except (EOFError, BrokenPipeError):
        pass  # the harness went away
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if consumer is not None:
            with contextlib.suppress(Exception):
                consumer.close()
        conn.close()


# -- the harness's view of the group ---------------------------------------------------------------


@dataclass
class Member:
    name: str
    proc: BaseProcess
    conn: Connection
    pid: int = 0
    member_id: str = ""
    t_join: float | None = None  # just before its Consumer was constructed
    t_constructed: float = 0.0  # its constructor returned
    gone_at: float | None = None  # killed, or close() returned
    owned: set[int] = field(default_factory=set)
    assigned_at: dict[int, float] = field(default_factory=dict)  # partition -> when it got it (owned ones)
    callbacks: list[tuple[str, float, list[int]]] = field(default_factory=list)
    receipts: dict[int, list[tuple[float, int, int]]] = field(default_factory=dict)  # p -> [(t, first, last)]
    left: tuple[float, float] | None = None
    ready: bool = False

    @property
    def active(self) -> bool:
        return self.t_join is not None and self.gone_at is None

    def first_receipt(self, partition: int, since: float) -> tuple[float, int] | None:
        """(time, first offset) of the first records of `partition` received at or after `since`."""
        rs = self.receipts.get(partition, [])
        i = bisect.bisect_left(rs, (since, -1, -1))
        return (rs[i][0], rs[i][1]) if i < len(rs) else None

    def last_receipt(self, partition: int, before: float) -> tuple[float, int] | None:
        """(time, last offset) of the last records of `partition` received before `before`."""
        rs = self.receipts.get(partition, [])
        i = bisect.bisect_left(rs, (before, -1, -1))
        return (rs[i - 1][0], rs[i - 1][2]) if i > 0 else None


class GroupView:
    """Every member process, what each reports, and the ownership intervals of every partition."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.members: list[Member] = []
        self.intervals: dict[int, list[list[Any]]] = {p: [] for p in range(PARTITIONS)}  # [name, start, end]
        self._ctx = multiprocessing.get_context("spawn")
        self._count = 0
        self._rng = random.Random(4)

    def spawn(self) -> Member:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=member_main, args=(child, self.bootstrap, os.getpid()),
                                 name=f"bench-member-{self._count}", daemon=True)  # fmt: skip
        proc.start()
        assert proc.pid is not None
        STARTED_PIDS.append(proc.pid)
        child.close()
        m = Member(f"m{self._count}", proc, parent)
        self._count += 1
        self.members.append(m)
        return m

    def active(self) -> list[Member]:
        return [m for m in self.members if m.active]

    def pump(self, timeout_s: float) -> None:
        """Read whatever the members sent, waiting up to timeout_s for the first message."""
        conns = {m.conn: m for m in self.members if not m.conn.closed}
        if not conns:
            time.sleep(timeout_s)
            return
        for ready in multiprocessing.connection.wait(list(conns), timeout=timeout_s):
            m = conns[cast(Connection, ready)]
            try:
                while m.conn.poll():
                    self._handle(m, m.conn.recv())
            except (EOFError, OSError):
                m.conn.close()
                if m.gone_at is None:
                    m.proc.join(1)
                    raise RuntimeError(f"member {m.name} exited unexpectedly (code {m.proc.exitcode})") from None

    def pump_for(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.pump(min(left, 0.05))

    def _handle(self, m: Member, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "records":
            for t, p, first, last, _n in msg[1]:
                m.receipts.setdefault(p, []).append((t, first, last))
        elif kind == "assign":
            _, t, parts = msg
            m.callbacks.append((kind, t, parts))
            for p in parts:
                m.owned.add(p)
                m.assigned_at[p] = t
                self.intervals[p].append([m.name, t, None])
        elif kind in ("revoke", "lost"):
            _, t, parts = msg
            m.callbacks.append((kind, t, parts))
            for p in parts:
                self._release(m, p, t)
        elif kind == "ready":
            m.pid, m.ready = msg[1], True
        elif kind == "joined":
            _, m.t_join, m.t_constructed, m.member_id = msg
        elif kind == "left":
            m.left = (msg[1], msg[2])
            m.gone_at = msg[2]
            for p in list(m.owned):  # close() revokes first; anything left over ends here
                self._release(m, p, msg[2])
        elif kind == "error":
            raise RuntimeError(f"member {m.name} failed:\n{msg[1]}")

    def _release(self, m: Member, p: int, t: float) -> None:
        m.owned.discard(p)
        m.assigned_at.pop(p, None)
        for iv in reversed(self.intervals[p]):
            if iv[0] == m.name and iv[2] is None:
                iv[2] = t
                break

    def mark_gone(self, m: Member, t: float) -> None:
        m.gone_at = t
        for p in list(m.owned):
            self._release(m, p, t)

    def owners(self) -> dict[int, Member] | None:
        """partition -> its owner, when the active members' assignments are disjoint, complete and
        balanced; else None."""
        active = self.active()
        if not active:
            return None
        sizes = [len(m.owned) for m in active]
        out = {p: m for m in active for p in m.owned}
        if len(out) != PARTITIONS or sum(sizes) != PARTITIONS or max(sizes) - min(sizes) > 1:
            return None
        return out

    def consumed_since(self, t0: float) -> dict[int, tuple[float, int]] | None:
        """When the group is shared out: per partition, (time, first offset) of the first records its
        owner received at or after max(t0, when it got the partition); None if some has none yet."""
        owners = self.owners()
        if owners is None:
            return None
        out = {}
        for p, m in owners.items():
            r = m.first_receipt(p, max(t0, m.assigned_at.get(p, t0)))
            if r is None:
                return None
            out[p] = r
        return out

    def wait_settled(self, t0: float, members: int, timeout_s: float = SETTLE_TIMEOUT_S) -> dict[int, tuple[float, int]]:
        deadline = time.monotonic() + timeout_s
        while True:
            if len(self.active()) == members:
                got = self.consumed_since(t0)
                if got is not None:
                    return got
            if time.monotonic() > deadline:
                raise RuntimeError(f"the group did not settle within {timeout_s:.0f} s: {self.describe()}")
            self.pump(0.02)

    def wait_steady(self, members: int) -> None:
        """Shared out among `members`, every partition consumed by its owner within STEADY_WINDOW_S;
        then PRE_EVENT_S more of observation (the old owners' last records are fresh at time zero) and
        a random delay: after a rebalance the members heartbeat in step, every 500 ms, so an event
        started a fixed time after the last one settled would always meet the same heartbeat phase
        (a kill just after a heartbeat is evicted a full session timeout later, one just before it
        up to an interval earlier)."""
        self.wait_settled(time.monotonic() - STEADY_WINDOW_S, members, SETTLE_TIMEOUT_S)
        self.pump_for(PRE_EVENT_S + self._rng.uniform(0.0, PHASE_JITTER_S))

    def describe(self) -> str:
        parts = []
        for m in self.members:
            if m.t_join is None:
                continue
            state = "gone" if m.gone_at is not None else "active"
            parts.append(f"{m.name} ({state}) owns {sorted(m.owned)}")
        return "; ".join(parts)

    def overlaps(self) -> list[str]:
        """Moments when a partition had two owners (from the callbacks' times and the kills)."""
        found = []
        end_of_time = time.monotonic()
        for p, ivs in self.intervals.items():
            spans = sorted((s, e if e is not None else end_of_time, n) for n, s, e in ivs)
            held_until, holder = float("-inf"), ""
            for start, end, name in spans:
                if start < held_until:
                    found.append(f"partition {p}: {holder} held it until {held_until - start:.3f} s after {name} got it")
                if end > held_until:
                    held_until, holder = end, name
        return found

    def stop_all(self) -> None:
        for m in self.members:
            if m.gone_at is None and m.proc.is_alive():
                with contextlib.suppress(OSError):
                    m.conn.send(("leave",))
        reap([m.proc for m in self.members], grace_s=10.0)


class GroupWatch:
    """A thread asking the coordinator for DescribeGroup every WATCH_INTERVAL_S while an event runs:
    (time, group state, {member id: member epoch}) snapshots, to tell the coordinator's share of an
    event (the join registered, the dead member evicted, the group stable again) from the clients'."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.snapshots: list[tuple[float, str, dict[str, int]]] = []
        self.details: list[tuple[float, str]] = []  # (time, "state: member epoch/state/assigned/revoking ...")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="group-watch", daemon=True)

    def start(self) -> GroupWatch:
        self._thread.start()
        return self

    def _run(self) -> None:
        import grpc

        from logbroker.v1 import logbroker_pb2 as pb
        from logbroker.v1 import logbroker_pb2_grpc as pbg

        address = _coordinator(self.bootstrap)
        if address is None:
            return
        with grpc.insecure_channel(address) as ch:
            admin = pbg.AdminStub(ch)
            while not self._stop.is_set():
                try:
                    resp = admin.DescribeGroup(pb.DescribeGroupRequest(group=GROUP), timeout=2)
                    if resp.error_code == pb.NONE:
                        t = time.monotonic()
                        members = {m.member_id: m.member_epoch for m in resp.members}
                        self.snapshots.append((t, resp.state, members))
                        self.details.append((t, f"{resp.state} epoch {resp.group_epoch}: " + ", ".join(
                            f"{m.member_id[:4]} e{m.member_epoch} {m.state} "
                            f"{sum(len(x.partitions) for x in m.assigned.topics)}"
                            f"-{sum(len(x.partitions) for x in m.revoking.topics)}"
                            f"/{sum(len(x.partitions) for x in m.target.topics)}"
                            for m in sorted(resp.members, key=lambda m: m.member_id))))
                except grpc.RpcError:
                    pass
                self._stop.wait(WATCH_INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def timeline(self, t0: float) -> list[str]:
        """The coordinator's view as it changed: "+0.123 s stable epoch 7: abcd e7 stable 3-0/3, ..."
        (per member: id prefix, member epoch, state, assigned-revoking/target partition counts)."""
        out, last = [], ""
        for t, text in self.details:
            if text != last:
                out.append(f"{t - t0:+.3f} s {text}")
                last = text
        return out

    def first(self, t0: float, test: Callable[[str, dict[str, int]], bool]) -> float | None:
        """Seconds from t0 to the first snapshot (taken after t0) that passes `test`."""
        for t, state, members in self.snapshots:
            if t >= t0 and test(state, members):
                return round(t - t0, 4)
        return None


def _coordinator(bootstrap: str) -> str | None:
    import grpc

    from logbroker.v1 import logbroker_pb2 as pb
    from logbroker.v1 import logbroker_pb2_grpc as pbg

    for address in bootstrap.split(","):
        with grpc.insecure_channel(address) as ch:
            try:
                r = pbg.BrokerStub(ch).FindCoordinator(pb.FindCoordinatorRequest(group=GROUP), timeout=3)
            except grpc.RpcError:
                continue
            if r.error_code == pb.NONE:
                return f"{r.host}:{r.port}"
    return None


class PacedProducer:
    """A producer thread: RATE records/s, partition = sequence number mod PARTITIONS."""

    def __init__(self, bootstrap: str, acks: int | str) -> None:
        import logbroker

        self.producer = logbroker.Producer(bootstrap, acks=acks, linger_ms=LINGER_MS)
        self.value = (b"logbroker-rebalance-" * 8)[:RECORD_SIZE]
        self.sent = 0
        self.failed = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rebalance-producer", daemon=True)

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    def _done(self, fut: Any) -> None:
        if fut.exception(0) is not None:
            self.failed += 1

    def _run(self) -> None:
        try:
            t_start = time.monotonic()
            while not self._stop.is_set():
                due = int((time.monotonic() - t_start) * RATE)
                while self.sent < due:
                    fut = self.producer.send(TOPIC, self.value, partition=self.sent % PARTITIONS)
                    fut.add_done_callback(self._done)
                    self.sent += 1
                time.sleep(0.001)
        except BaseException as exc:
            self.failure = exc

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(Exception):
            self.producer.flush(10)
        self.producer.close(5)


# -- events ----------------------------------------------------------------------------------------


def _moved_figures(view: GroupView, t0: float, before: dict[int, Member], after: dict[int, Member],
                   firsts: dict[int, tuple[float, int]]) -> dict[str, Any]:  # fmt: skip
    moved = sorted(p for p in range(PARTITIONS) if before.get(p) is not after[p])
    out: dict[str, Any] = {
        "settled_s": round(max(t for t, _ in firsts.values()) - t0, 4),
        "moved": len(moved),
        "sizes": "/".join(str(n) for n in sorted((len(m.owned) for m in view.active()), reverse=True)),
    }
    if not moved:
        return out
    gaps, redelivered, assigned = [], 0, []
    for p in moved:
        t_new, first_offset = firsts[p]
        new = after[p]
        assigned.append(new.assigned_at.get(p, t_new))
        old = before.get(p)
        last = old.last_receipt(p, t_new) if old is not None else None
        if last is not None:
            gaps.append(t_new - last[0])
            redelivered += max(0, last[1] - first_offset + 1)
    resumed = [firsts[p][0] - t0 for p in moved]
    out.update(
        resumed_s=round(max(resumed), 4),
        first_resumed_s=round(min(resumed), 4),
        assigned_s=round(max(assigned) - t0, 4),
        longest_gap_s=round(max(gaps), 4) if gaps else None,
        redelivered=redelivered,
    )
    return out


def _join(view: GroupView, n: int) -> dict[str, Any]:
    m = view.spawn()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not m.ready:
        if time.monotonic() > deadline:
            raise RuntimeError(f"member {m.name} not ready within {READY_TIMEOUT_S:.0f} s")
        view.pump(0.05)
    view.wait_steady(n)
    before = view.owners() or {}
    watch = GroupWatch(view.bootstrap).start()
    try:
        m.conn.send(("join",))
        while m.t_join is None:
            view.pump(0.02)
        t0 = m.t_join
        firsts = view.wait_settled(t0, n + 1)
    finally:
        watch.stop()
    after = view.owners()
    assert after is not None
    out = {"event": "join", "member": m.name, **_moved_figures(view, t0, before, after, firsts)}
    mine = [t for kind, t, parts in m.callbacks if kind == "assign" and parts]
    first = min((rs[0][0] for rs in m.receipts.values() if rs), default=None)
    revoked = [t for o in view.members if o is not m for kind, t, parts in o.callbacks
               if kind == "revoke" and t >= t0 and parts]  # fmt: skip
    out.update(
        constructed_s=round(m.t_constructed - t0, 4),
        registered_s=watch.first(t0, lambda _s, ms: m.member_id in ms),
        group_stable_s=watch.first(t0, lambda st, ms: st == "stable" and m.member_id in ms),
        coordinator=watch.timeline(t0),
        callbacks=[f"{t - t0:+.3f} s {name} {kind} {parts}" for t, name, kind, parts in sorted(
            (t, o.name, kind, parts) for o in view.members for kind, t, parts in o.callbacks if t >= t0 and parts)],
        member_assigned_s=round(mine[0] - t0, 4) if mine else None,
        first_record_s=round(first - t0, 4) if first is not None else None,
        revoked_s=round(max(revoked) - t0, 4) if revoked else None,
    )
    _observe(view, after)
    return out


def _oldest(view: GroupView) -> Member:
    return min(view.active(), key=lambda m: m.t_join or 0.0)


def _leave(view: GroupView, n: int) -> dict[str, Any]:
    view.wait_steady(n)
    before = view.owners() or {}
    m = _oldest(view)
    watch = GroupWatch(view.bootstrap).start()
    try:
        m.conn.send(("leave",))
        while m.left is None:
            view.pump(0.02)
        t0 = m.left[0]
        firsts = view.wait_settled(t0, n - 1)
    finally:
        watch.stop()
    after = view.owners()
    assert after is not None
    out = {"event": "leave", "member": m.name, **_moved_figures(view, t0, before, after, firsts),
           "close_s": round(m.left[1] - m.left[0], 4),
           "left_s": watch.first(t0, lambda _s, ms: m.member_id not in ms),
           "group_stable_s": watch.first(t0, lambda st, ms: st == "stable" and m.member_id not in ms),
           "coordinator": watch.timeline(t0)}  # fmt: skip
    m.proc.join(10)
    _observe(view, after)
    return out


def _kill(view: GroupView, n: int) -> dict[str, Any]:
    view.wait_steady(n)
    before = view.owners() or {}
    m = _oldest(view)
    watch = GroupWatch(view.bootstrap).start()
    time.sleep(2 * WATCH_INTERVAL_S)  # a snapshot or two before the kill
    try:
        t0 = time.monotonic()
        os.kill(m.pid, signal.SIGKILL)
        view.mark_gone(m, t0)
        firsts = view.wait_settled(t0, n - 1)
    finally:
        watch.stop()
    after = view.owners()
    assert after is not None
    out = {"event": "kill", "member": m.name, **_moved_figures(view, t0, before, after, firsts)}
    out["evicted_s"] = watch.first(t0, lambda _s, ms: m.member_id not in ms)
    out["group_stable_s"] = watch.first(t0, lambda st, ms: st == "stable" and m.member_id not in ms)
    out["coordinator"] = watch.timeline(t0)
    out["resumed_minus_session_s"] = round(out["resumed_s"] - SESSION_TIMEOUT_MS / 1000, 4)
    out["after_eviction_s"] = round(out["resumed_s"] - out["evicted_s"], 4) if out["evicted_s"] is not None else None
    m.proc.join(5)
    _observe(view, after)
    return out


def _observe(view: GroupView, owners: dict[int, Member]) -> None:
    """The group stays as it settled for OBSERVE_S (no partition moves again)."""
    view.pump_for(OBSERVE_S)
    now = view.owners()
    if now is None or any(now[p] is not owners[p] for p in range(PARTITIONS)):
        raise RuntimeError(f"the assignment moved again after the group had settled: {view.describe()}")


# -- the whole measurement -------------------------------------------------------------------------


@contextlib.contextmanager
def _servers(workdir: Path, brokers: int) -> Iterator[str]:
    """ZooKeeper + `brokers` brokers (or one standalone broker) with the topic; yields the bootstrap."""
    import logbroker
    from bench.cluster import LogbrokerCluster, health_serving
    from bench.drivers.logbroker import LOGBROKER_ROOT

    with ExitStack() as stack:
        if brokers > 1:
            cluster = LogbrokerCluster(workdir, brokers, ZK_SESSION_TIMEOUT_MS)
            stack.callback(cluster.stop)
            cluster.start()
            bootstrap = cluster.bootstrap
            rf = min(REPLICATION_FACTOR, brokers)
            config = {"min_insync_replicas": str(min(MIN_INSYNC, rf))}
        else:
            address = f"127.0.0.1:{free_port()}"
            argv = [
                sys.executable, "-m", "logbroker", "serve", "--data-dir", str(workdir / "data"),
                "--listen", address, "--log-level", "warning", "--metrics-listen", "off",
            ]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(LOGBROKER_ROOT),
                                                                               os.environ.get("PYTHONPATH")]))}  # fmt: skip
            proc = ServerProcess("logbroker", argv, workdir / "logbroker.log", env=env)
            stack.callback(proc.stop)
            proc.wait_until(lambda: health_serving(address), 30, "SERVING on the gRPC health service")
            bootstrap, rf, config, cluster = address, 1, {}, None
        with logbroker.Admin(bootstrap) as admin:
            admin.create_topic(TOPIC, PARTITIONS, replication_factor=rf, config=config)
        if cluster is not None:
            cluster.wait_fully_replicated(TOPIC, PARTITIONS, rf)
        yield bootstrap


def run(trials: int, data_root: Path, brokers: int = BROKERS, progress: Callable[[str], None] = say) -> dict[str, Any]:
    """The whole measurement; every process it starts is stopped before it returns or raises."""
    t_begin = time.monotonic()
    events: list[dict[str, Any]] = []
    view: GroupView | None = None
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rebalance-", dir=data_root)))
        try:
            bootstrap = stack.enter_context(_servers(workdir, brokers))
            view = GroupView(bootstrap)
            stack.callback(view.stop_all)
            prod = PacedProducer(bootstrap, "all" if brokers > 1 else 1).start()
            stack.callback(prod.stop)
            first = [view.spawn() for _ in range(MEMBERS)]
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not all(m.ready for m in first):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"members not ready within {READY_TIMEOUT_S:.0f} s")
                view.pump(0.05)
            for m in first:
                m.conn.send(("join",))
            view.wait_settled(time.monotonic(), MEMBERS, READY_TIMEOUT_S)
            n = MEMBERS
            for i in range(trials):
                for kind in EVENTS:
                    if kind == "join":
                        e = _join(view, n)
                        n += 1
                    elif kind == "leave":
                        e = _leave(view, n)
                        n -= 1
                    else:
                        e = _kill(view, n)
                        n -= 1
                    e["trial"] = i + 1
                    events.append(e)
                    progress(_one_line(e, i, trials))
                    if prod.failure is not None:
                        raise RuntimeError(f"the producer thread failed: {prod.failure!r}")
            overlaps = view.overlaps()
            produced, failed = prod.sent, prod.failed
        except Exception as exc:
            tails = _tails(workdir)
            raise RuntimeError(f"rebalance measurement failed after {len(events)} events: {exc}\n{tails}") from exc
    return {
        "setup": {
            "brokers": brokers, "partitions": PARTITIONS, "members": MEMBERS,
            "replication_factor": min(REPLICATION_FACTOR, brokers), "session_timeout_ms": SESSION_TIMEOUT_MS,
            "heartbeat_interval_ms": "the broker's default: 500 ms while the group is stable, 100 ms while it reconciles",
            "auto_commit_interval_ms": AUTO_COMMIT_INTERVAL_MS, "rate_records_per_s": RATE,
            "record_size": RECORD_SIZE, "acks": "all" if brokers > 1 else "1", "linger_ms": LINGER_MS,
            "poll_timeout_ms": POLL_TIMEOUT_MS, "assignor": "sticky (client default)",
            "event_delay_s": [PRE_EVENT_S, PRE_EVENT_S + PHASE_JITTER_S], "observe_s": OBSERVE_S,
        },  # fmt: skip
        "events": events,
        "summary": summarize(events),
        "ownership_overlaps": overlaps,
        "produced": produced,
        "failed_sends": failed,
        "wall_s": round(time.monotonic() - t_begin, 1),
    }


def _tails(workdir: Path, lines: int = 20) -> str:
    out = []
    for log in sorted(workdir.glob("*.log")):
        with contextlib.suppress(OSError):
            text = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
            out.append(f"--- {log.name}, last lines ---\n{text}")
    return "\n".join(out)


def _one_line(e: dict[str, Any], i: int, trials: int) -> str:
    head = f"[rebalance · {i + 1}/{trials}] {e['event']:<5} {e['member']}: settled {e['settled_s']:.3f} s"
    if e["event"] == "join":
        return (f"{head} (new member: assigned {_f(e.get('member_assigned_s'))} s, first record "
                f"{_f(e.get('first_record_s'))} s), {e['moved']} partitions moved, longest gap "
                f"{_f(e.get('longest_gap_s'))} s, now {e['sizes']}")  # fmt: skip
    tail = f", evicted {_f(e.get('evicted_s'))} s" if e["event"] == "kill" else f", close() {e['close_s']:.3f} s"
    return (f"{head}; its {e['moved']} partitions consumed again after {_f(e.get('resumed_s'))} s{tail}, "
            f"{e.get('redelivered', 0)} records redelivered, now {e['sizes']}")  # fmt: skip


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _stats(xs: Sequence[float | None]) -> dict[str, Any]:
    vals = [x for x in xs if x is not None]
    if not vals:
        return {"median": None, "max": None, "all": []}
    return {"median": round(statistics.median(vals), 4), "max": round(max(vals), 4), "all": vals}


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    keys = {
        "join": ("settled_s", "first_record_s", "constructed_s", "registered_s", "revoked_s", "member_assigned_s",
                 "group_stable_s", "resumed_s", "longest_gap_s"),
        "leave": ("settled_s", "resumed_s", "first_resumed_s", "close_s", "left_s", "assigned_s", "group_stable_s",
                  "longest_gap_s"),
        "kill": ("settled_s", "resumed_s", "resumed_minus_session_s", "first_resumed_s", "evicted_s",
                 "after_eviction_s", "assigned_s", "group_stable_s", "longest_gap_s"),
    }  # fmt: skip
    for kind, names in keys.items():
        es = [e for e in events if e["event"] == kind]
        if not es:
            continue
        out[kind] = {"events": len(es), **{k: _stats([e.get(k) for e in es]) for k in names},
                     "redelivered": sum(e.get("redelivered", 0) for e in es)}  # fmt: skip
    return out
