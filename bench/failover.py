"""`python -m bench failover`: how long a partition cannot take writes when its leader goes away.

One cluster (ZooKeeper + 3 brokers, ZooKeeper session timeout 6 s), one topic (6 partitions,
replication factor 3, min_insync_replicas 2) and one producer (acks=all, client defaults otherwise)
writing to partition 0 at a small steady rate throughout. Each trial waits for the steady state
(every replica in sync, preferred leaders back), finds partition 0's leader, sends it a signal, and
reads the producer's acknowledgement times (taken in its completion callbacks) around the signal:

- `first_ack_s`: from the signal to the first acknowledgement of a record *sent after* the signal
  (a response already on its way when the signal landed does not count);
- `outage_s`: the longest interval without any acknowledgement, from 1 s before the signal until
  `OBSERVE_S` after the first ack: what a writer sees as the partition being unavailable;
- `leader_elected_s`: from the signal until DescribeTopics (polled every 50 ms) names another
  leader: how much of the failover is the cluster's and how much the client's;
- `back_outage_s`: after the restart, the longest interval without an acknowledgement until 1 s
  after the first ack of a record sent once the broker had its preferred leadership back (the
  controller moves it back as soon as the broker is in sync): a rolling restart's second outage.

`kill` is `kill -9` (the ZooKeeper session must expire before the controller acts); `term` is
SIGTERM, a controlled shutdown (leadership moves while the broker still serves). The broker is
restarted after each trial. Trials alternate kill / term. At the end every acknowledged record is
read back at its acknowledged offset (a lost acknowledged write would be a broker bug).
"""

from __future__ import annotations

import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.cluster import LogbrokerCluster
from bench.progress import say

TOPIC = "failover"
PARTITIONS = 6
PARTITION = 0  # the partition written and failed over
REPLICATION_FACTOR = 3
MIN_INSYNC = 2
BROKERS = 3
SESSION_TIMEOUT_MS = 6000
RATE = 1000  # records/s
RECORD_SIZE = 100
LINGER_MS = 5
PRE_SIGNAL_S = 1.0  # steady writes observed before each signal
OBSERVE_S = 1.0  # and after the first ack that follows it
FIRST_ACK_LIMIT_S = 60.0  # a trial without an ack by then fails
STEADY_TIMEOUT_S = 60.0
STEADY_ATTEMPTS = 10
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
TARGETS_S = {"kill": 8.0, "term": 1.0}  # issue 3: median kill -9 < 8 s, SIGTERM < 1 s


class PacedProducer:
    """A producer thread: RATE records/s to one partition, each record's value starting with its
    sequence number; send and acknowledgement times (time.monotonic) kept per record."""

    def __init__(self, bootstrap: str) -> None:
        import logbroker

        self.producer = logbroker.Producer(bootstrap, acks="all", linger_ms=LINGER_MS)
        self.filler = (b"logbroker-failover-" * 8)[: RECORD_SIZE - 8]
        self.lock = threading.Lock()
        self.sent: list[float] = []  # by sequence number
        self.acks: list[tuple[float, int, int]] = []  # (ack time, seq, offset), in completion order
        self.errors: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="failover-producer", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> PacedProducer:
        self._thread.start()
        return self

    def _callback(self, seq: int) -> Callable[[Any], None]:
        def done(fut: Any) -> None:
            t = time.monotonic()
            err = fut.exception(0)
            with self.lock:
                if err is None:
                    self.acks.append((t, seq, fut.result(0).offset))
                else:
                    self.errors.append((t, seq, repr(err)))

        return done

    def _run(self) -> None:
        try:
            t_start = time.monotonic()
            seq = 0
            while not self._stop.is_set():
                due = int((time.monotonic() - t_start) * RATE)
                while seq < due:
                    value = seq.to_bytes(8, "little") + self.filler
                    t = time.monotonic()
                    fut = self.producer.send(TOPIC, value, partition=PARTITION)
                    with self.lock:
                        self.sent.append(t)
                    fut.add_done_callback(self._callback(seq))
                    seq += 1
                time.sleep(0.001)
        except BaseException as exc:  # reported by the trial loop
            self.failure = exc

    def ack_count(self) -> int:
        with self.lock:
            return len(self.acks)

    def last_ack_time(self) -> float:
        with self.lock:
            return self.acks[-1][0] if self.acks else 0.0

    def first_ack_after(self, t_sig: float, pos: int) -> tuple[float | None, int]:
        """The first ack (from index `pos` on) of a record sent after t_sig, and where to look next."""
        with self.lock:
            sent, acks = self.sent, self.acks
            while pos < len(acks):
                t, seq, _ = acks[pos]
                if t >= t_sig and sent[seq] >= t_sig:
                    return t, pos
                pos += 1
        return None, pos

    def last_ack_before(self, t: float, pos: int) -> float | None:
        """Time of the last ack before t (looking at acks from index `pos` on)."""
        with self.lock:
            times = [a[0] for a in self.acks[pos:] if a[0] < t]
        return max(times) if times else None

    def outage(self, t0: float, t1: float, pos: int) -> float:
        """The longest interval in [t0, t1] without an ack (looking at acks from index `pos` on)."""
        with self.lock:
            times = sorted(t for t, _, _ in self.acks[pos:] if t0 <= t <= t1)
        edges = [t0, *times, t1]
        return max(b - a for a, b in zip(edges, edges[1:], strict=False))

    def stop(self, flush_s: float = 60.0) -> None:
        self._stop.set()
        self._thread.join(5)
        if flush_s > 0:
            self.producer.flush(flush_s)
        self.producer.close(min(flush_s, 10.0))


def _wait_steady(cluster: LogbrokerCluster, prod: PacedProducer, timeout_s: float = STEADY_TIMEOUT_S) -> float:
    """Every replica in sync, the preferred leaders leading, and the producer acknowledged for a record
    sent after that was seen (a stale client view of the leader is not a steady state). Returns the
    time of that first acknowledgement."""
    cluster.wait_fully_replicated(TOPIC, PARTITIONS, REPLICATION_FACTOR, timeout_s, preferred=True)
    t_seen = time.monotonic()
    deadline = t_seen + timeout_s
    pos = max(0, prod.ack_count() - 1)
    while True:
        first, pos = prod.first_ack_after(t_seen, pos)
        if first is not None:
            return first
        if time.monotonic() > deadline:
            raise RuntimeError("the producer is not being acknowledged in the steady state")
        if prod.failure is not None:
            raise RuntimeError(f"the producer thread failed: {prod.failure!r}")
        time.sleep(0.02)


def _controller_id(cluster: LogbrokerCluster) -> int:
    from logbroker.v1 import logbroker_pb2 as pb

    try:
        resp = cluster._admin_call(lambda s: s.DescribeCluster(pb.DescribeClusterRequest(), timeout=3))
        return int(resp.controller_id)
    except RuntimeError:
        return -1


def trial(cluster: LogbrokerCluster, prod: PacedProducer, kind: str) -> dict[str, Any]:
    """Signal partition 0's leader, measure until writes are acknowledged again, restart the broker,
    and measure again until it has its leadership back and writes to it are acknowledged."""
    for _ in range(STEADY_ATTEMPTS):  # steady for the whole PRE_SIGNAL_S: acks right up to the signal
        _wait_steady(cluster, prod)
        leader = cluster.leader_of(TOPIC, PARTITION)
        controller = _controller_id(cluster)
        time.sleep(PRE_SIGNAL_S)
        acked_now = time.monotonic() - prod.last_ack_time() < 0.1
        if leader >= 0 and acked_now and cluster.leader_of(TOPIC, PARTITION) == leader:
            break
    else:
        raise RuntimeError(f"no steady state (partition 0 led, its writes acknowledged) after {STEADY_ATTEMPTS} tries")
    errors_before = len(prod.errors)
    pos0 = max(0, prod.ack_count() - int(2 * PRE_SIGNAL_S * RATE))  # earlier acks are older than the window
    sig = SIGNALS[kind]
    t_sig = cluster.send_signal(leader, sig)
    pos = pos0
    first: float | None = None
    elected: float | None = None
    exited: float | None = None
    new_leader = -1
    deadline = t_sig + FIRST_ACK_LIMIT_S
    proc = cluster.brokers[leader].proc
    assert proc is not None
    while first is None or elected is None or exited is None:
        if time.monotonic() > deadline:
            break
        if exited is None and not proc.alive():
            exited = time.monotonic()
        if elected is None:
            lead = cluster.leader_of(TOPIC, PARTITION)
            if lead >= 0 and lead != leader:
                elected, new_leader = time.monotonic(), lead
        if first is None:
            first, pos = prod.first_ack_after(t_sig, pos)
        if prod.failure is not None:
            raise RuntimeError(f"the producer thread failed: {prod.failure!r}")
        time.sleep(0.05)
    cluster.reap(leader, sig)
    before = prod.last_ack_before(t_sig, pos0)
    if first is None:
        raise RuntimeError(f"{kind}: no write on {TOPIC}-{PARTITION} acknowledged within {FIRST_ACK_LIMIT_S:.0f} s")
    time.sleep(max(0.0, first + OBSERVE_S - time.monotonic()))
    result = {
        "signal": kind,
        "leader": leader,
        "leader_was_controller": leader == controller,
        "new_leader": new_leader,
        "first_ack_s": round(first - t_sig, 4),
        "outage_s": round(prod.outage(t_sig - PRE_SIGNAL_S, first + OBSERVE_S, pos0), 4),
        "last_ack_before_s": None if before is None else round(t_sig - before, 4),
        "leader_elected_s": round(elected - t_sig, 4) if elected is not None else None,
        "broker_exit_s": round(exited - t_sig, 4) if exited is not None else None,
        "broker_exit_code": proc.exit_code,
        "failed_sends": len(prod.errors) - errors_before,
    }
    # The broker comes back and, once in sync, gets its preferred leadership back: writers see that too.
    pos_back = prod.ack_count()
    t_restart = time.monotonic()
    cluster.restart(leader)
    first_back = _wait_steady(cluster, prod)
    time.sleep(max(0.0, first_back + OBSERVE_S - time.monotonic()))
    result["back_outage_s"] = round(prod.outage(t_restart, first_back + OBSERVE_S, pos_back), 4)
    result["back_s"] = round(first_back - t_restart, 4)
    return result


def _verify(bootstrap: str, prod: PacedProducer) -> dict[str, Any]:
    """Read partition 0 back; every acknowledged record must be at its acknowledged offset."""
    import logbroker

    with prod.lock:
        acked = {offset: seq for _, seq, offset in prod.acks}
    if not acked:
        return {"acknowledged": 0, "missing": 0, "mismatched": 0}
    top = max(acked)
    seen: dict[int, int] = {}
    consumer = logbroker.Consumer(bootstrap, topics=[TOPIC], auto_offset_reset="earliest", max_poll_records=10_000)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (not seen or max(seen) < top):
            for m in consumer.poll(timeout_ms=500):
                if m.partition == PARTITION:
                    seen[m.offset] = int.from_bytes((m.value or b"")[:8], "little")
    finally:
        consumer.close()
    missing = sum(1 for o in acked if o not in seen)
    mismatched = sum(1 for o, s in acked.items() if o in seen and seen[o] != s)
    duplicates = len(seen) - len(set(seen.values()))
    return {
        "acknowledged": len(acked),
        "read": len(seen),
        "missing": missing,
        "mismatched": mismatched,
        "duplicated_records": duplicates,
    }


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in SIGNALS:
        ts = [t for t in trials if t["signal"] == kind]
        if not ts:
            continue
        firsts = [t["first_ack_s"] for t in ts]
        outages = [t["outage_s"] for t in ts]
        elected = [t["leader_elected_s"] for t in ts if t["leader_elected_s"] is not None]
        back = [t["back_outage_s"] for t in ts if t.get("back_outage_s") is not None]
        out[kind] = {
            "trials": len(ts),
            "first_ack_s_median": _median(firsts),
            "first_ack_s": firsts,
            "outage_s_median": _median(outages),
            "outage_s": outages,
            "leader_elected_s_median": _median(elected),
            "failed_sends": sum(t["failed_sends"] for t in ts),
            "back_outage_s_median": _median(back),
            "back_outage_s": back,
            "target_s": TARGETS_S[kind],
        }
    return out


def run(trials_per_signal: int, data_root: Path, progress: Callable[[str], None] = say) -> dict[str, Any]:
    """The whole measurement; every process it starts is stopped before it returns or raises."""
    kinds = [k for _ in range(trials_per_signal) for k in SIGNALS]
    results: list[dict[str, Any]] = []
    t0 = time.monotonic()
    cluster: LogbrokerCluster | None = None
    try:
        with ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-failover-", dir=data_root)))
            cluster = LogbrokerCluster(workdir, BROKERS, SESSION_TIMEOUT_MS)
            stack.callback(cluster.stop)
            cluster.start()
            import logbroker

            with logbroker.Admin(cluster.bootstrap) as admin:
                admin.create_topic(TOPIC, PARTITIONS, replication_factor=REPLICATION_FACTOR,
                                   config={"min_insync_replicas": str(MIN_INSYNC)})  # fmt: skip
            prod = PacedProducer(cluster.bootstrap).start()
            try:
                for i, kind in enumerate(kinds):
                    r = trial(cluster, prod, kind)
                    results.append(r)
                    progress(
                        f"[failover · {i + 1}/{len(kinds)}] {kind:<4} leader {r['leader']}"
                        f"{' (controller)' if r['leader_was_controller'] else ''} -> {r['new_leader']}: "
                        f"first ack {r['first_ack_s']:.3f} s, outage {r['outage_s']:.3f} s, leader elected "
                        f"{'?' if r['leader_elected_s'] is None else format(r['leader_elected_s'], '.3f')} s; "
                        f"restarted, leader back: outage {r['back_outage_s']:.3f} s"
                    )
                _wait_steady(cluster, prod)
            except BaseException:
                prod.stop(flush_s=0)
                raise
            prod.stop()
            verified = _verify(cluster.bootstrap, prod)
    except Exception as exc:
        logs = cluster.log_tails() if cluster is not None else ""
        raise RuntimeError(f"failover measurement failed after {len(results)} trials: {exc}\n{logs}") from exc
    return {
        "setup": {
            "brokers": BROKERS, "partitions": PARTITIONS, "replication_factor": REPLICATION_FACTOR,
            "min_insync_replicas": MIN_INSYNC, "zk_session_timeout_ms": SESSION_TIMEOUT_MS,
            "rate_records_per_s": RATE, "record_size": RECORD_SIZE, "acks": "all", "linger_ms": LINGER_MS,
        },  # fmt: skip
        "trials": results,
        "summary": summarize(results),
        "verified": verified,
        "wall_s": round(time.monotonic() - t0, 1),
    }
