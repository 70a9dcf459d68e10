"""Runs one workload against one system `runs` times and returns raw figures plus their medians.

Per run: a fresh data directory and server, the topic, producer and consumer worker processes on a
common schedule (start, end of warm-up, end), a /proc sampler on the server, and every process
stopped and reaped before the next run. Rates count only what happened after the warm-up.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, cast

from bench import histogram, worker
from bench.drivers.base import Driver, Server
from bench.procs import STARTED_PIDS, pid_exists, reap
from bench.profiler import Profiler, dump_stacks
from bench.progress import Progress
from bench.sampler import ProcSampler
from bench.workload import Workload

TOPIC = "bench"
READY_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 60.0  # group workloads: the members' join and first rebalances, on an empty topic
GRACE_S = 60.0  # past a phase's own end, for flushes and slow shutdowns
MB = 1e6


class RunError(RuntimeError):
    pass


@dataclass
class Worker:
    name: str
    proc: BaseProcess
    conn: Connection
    progress: int = 0
    result: dict[str, Any] | None = None


def spawn(role: str, n: int, system: str, server: Server, wl: Workload, into: list[Worker]) -> list[Worker]:
    ctx = multiprocessing.get_context("spawn")
    out = []
    for i in range(n):
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=worker.main,
            args=(child, role, system, server.address, TOPIC, wl.to_dict(), i, os.getpid()),
            name=f"bench-{role}-{i}",
            daemon=True,
        )
        proc.start()
        assert proc.pid is not None
        STARTED_PIDS.append(proc.pid)
        child.close()
        w = Worker(f"{system} {role} {i}", proc, parent)
        out.append(w)
        into.append(w)
    return out


def wait_for(
    workers: Sequence[Worker],
    kind: str,
    deadline: float,
    tick: Callable[[], None] | None = None,
    watch: Sequence[Worker] = (),
) -> None:
    """Collect one `kind` message from each of `workers`, relaying progress; bounded by `deadline`.
    Workers in `watch` are read too (progress, or an error that ends the run early)."""
    pending = {w.conn: w for w in workers}
    watched = {w.conn: w for w in watch if w.result is None}
    while pending:
        if time.monotonic() > deadline:
            names = ", ".join(w.name for w in pending.values())
            raise RunError(f"timed out waiting for {kind!r} from {names}")
        for ready in multiprocessing.connection.wait([*pending, *watched], timeout=0.2):
            conn = cast(Connection, ready)
            w = pending.get(conn) or watched[conn]
            try:
                msg = conn.recv()
            except EOFError:
                w.proc.join(1)
                raise RunError(f"{w.name} exited (code {w.proc.exitcode}) before {kind!r}") from None
            if msg[0] == "error":
                raise RunError(f"{w.name} failed:\n{msg[1]}")
            if msg[0] == "progress":
                w.progress = msg[1]
            elif conn in pending and msg[0] == kind:
                w.result = msg[1]
                del pending[conn]
            elif conn in watched and msg[0] == "done":
                w.result = msg[1]
                del watched[conn]
        if tick:
            tick()


def _send_all(workers: Sequence[Worker], msg: tuple[Any, ...]) -> None:
    for w in workers:
        if w.result is not None and msg[0] != "go":
            continue  # already finished (its deadline passed)
        try:
            w.conn.send(msg)
        except OSError:
            why = ""
            if w.conn.poll(0):
                reply = w.conn.recv()
                why = f":\n{reply[1]}" if reply[0] == "error" else ""
            raise RunError(f"{w.name} is gone (exit code {w.proc.exitcode}){why}") from None


def group_split(assignments: Sequence[Sequence[Any] | None], partitions: int) -> bool:
    """True when the members' assignments share out every partition: disjoint, complete, balanced
    (sizes differ by at most one). All None (clients without assignments, the peers) counts as True."""
    if all(a is None for a in assignments):
        return True
    if any(a is None for a in assignments):
        return False
    sizes = [len(a) for a in assignments if a is not None]
    owned = {tp for a in assignments if a is not None for tp in map(tuple, a)}
    return len(owned) == sum(sizes) == partitions and max(sizes) - min(sizes) <= 1


def _produce_figures(results: list[dict[str, Any]], record_size: int) -> dict[str, Any]:
    records = sum(r["records"] for r in results)
    seconds = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    rate = records / seconds if seconds > 0 else 0.0
    return {
        "records": records,
        "total_records": sum(r["total_records"] for r in results),
        "seconds": seconds,
        "records_per_s": rate,
        "mb_per_s": rate * record_size / MB,
    }


def _timeline(results: list[dict[str, Any]]) -> list[tuple[float, int]]:
    """All consumers' (time, cumulative records) samples merged into one cumulative timeline."""
    events: list[tuple[float, int]] = []
    for r in results:
        prev = 0
        for t, cum in r["samples"]:
            events.append((t, cum - prev))
            prev = cum
    events.sort()
    out, total = [], 0
    for t, n in events:
        total += n
        out.append((t, total))
    return out


def _cum_at(timeline: list[tuple[float, int]], t: float) -> int:
    c = 0
    for ti, ci in timeline:
        if ti > t:
            break
        c = ci
    return c


def _consume_figures(
    results: list[dict[str, Any]], wl: Workload, expected: int, window: tuple[float, float] | None
) -> dict[str, Any]:
    """`window` given (concurrent mode): records received in it. Otherwise (draining a backlog): from
    the end of the consumer warm-up (warmup_s, at most a fifth of the pass) to the last record."""
    tl = _timeline(results)
    total = sum(r["records"] for r in results)
    out: dict[str, Any] = {
        "records": total,
        "expected_records": expected,
        "complete": total >= expected,
        "timed_out": any(r["timed_out"] for r in results),
    }
    if len(results) > 1:
        out["records_per_consumer"] = [r["records"] for r in results]
    if not tl:
        return {**out, "seconds": 0.0, "records_per_s": 0.0, "mb_per_s": 0.0}
    if window:
        t0, t1 = window
        n = _cum_at(tl, t1) - _cum_at(tl, t0)
    else:
        t_first, t_last = tl[0][0], tl[-1][0]
        t0 = t_first + min(wl.warmup_s, 0.2 * (t_last - t_first))
        t0 = next((t for t, _ in tl if t >= t0), t_first)
        t1 = t_last
        n = tl[-1][1] - _cum_at(tl, t0)
        if t1 - t0 <= 0:  # everything arrived in one poll
            t0 = min(r["t_go"] for r in results)
            n = tl[-1][1]
    seconds = t1 - t0
    rate = n / seconds if seconds > 0 else 0.0
    return {**out, "seconds": seconds, "records_per_s": rate, "mb_per_s": rate * wl.record_size / MB}


def _schedule(wl: Workload, max_records: int = 0) -> dict[str, Any]:
    t_start = time.monotonic() + 0.2
    t_warm = t_start + wl.warmup_s
    return {"t_start": t_start, "t_warm": t_warm, "t_end": t_warm + wl.duration_s, "max_records": max_records}


class Runner:
    def __init__(
        self, driver: Driver, wl: Workload, runs: int, data_root: Path, profile_dir: Path | None = None
    ) -> None:
        self.driver = driver
        self.wl = wl
        self.runs = runs
        self.data_root = data_root
        self.profile_dir = profile_dir
        self.profiler: Profiler | None = None
        self.profiles: list[Path] = []
        self._started = 0
        self.failure_logs = ""  # the servers' log tails when a run fails

    def _label(self, i: int) -> str:
        return f"[{self.wl.name} · {self.driver.name} · {i + 1}/{self.runs}]"

    def _start(self, stack: ExitStack, workers: list[Worker]) -> tuple[Server, ProcSampler]:
        workdir = Path(
            stack.enter_context(
                tempfile.TemporaryDirectory(
                    prefix=f"bench-{self.wl.name}-{self.driver.name}-", dir=self.data_root
                )
            )
        )
        server = self.driver.start(workdir, self.wl, stack)

        def keep_logs(exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
            if exc is not None and not isinstance(exc, KeyboardInterrupt):
                self.failure_logs = "\n".join(
                    f"--- {p.name} log, last lines ---\n{p.log_tail(25)}\n{dump_stacks(p.pid) if p.alive() else ''}"
                    for p in server.processes
                )
            return False

        stack.push(keep_logs)
        sampler = ProcSampler(server.pids).start()
        stack.callback(sampler.stop)
        stack.callback(lambda: reap([w.proc for w in workers]))  # the list is filled later, read at exit
        if self.profile_dir is not None:
            self._started += 1
            prof = Profiler(self.profile_dir, f"{self.wl.name}-{self.driver.name}-{self._started}")
            self.profiler = prof
            stack.callback(lambda: self.profiles.extend(prof.files))
            stack.callback(prof.stop_all)
        self.driver.create_topic(server, TOPIC, self.wl)
        server.extra["workdir"] = workdir
        return server, sampler

    def _profile(self, name: str, pids: Sequence[int | None]) -> None:
        if self.profiler is not None:
            for i, pid in enumerate(pids):
                if pid is not None:
                    self.profiler.start(name if len(pids) == 1 else f"{name}{i}", pid)

    def _unprofile(self, name: str) -> None:
        if self.profiler is not None:
            self.profiler.stop(name)

    def _produce(
        self,
        server: Server,
        sampler: ProcSampler,
        workers: list[Worker],
        prog: Progress,
        max_records: int = 0,
    ) -> dict[str, Any]:
        wl = self.wl
        producers = spawn("producer", wl.producers, self.driver.name, server, wl, workers)
        wait_for(producers, "ready", time.monotonic() + READY_TIMEOUT_S)
        self._profile("producer", [w.proc.pid for w in producers])
        self._profile("server-produce", server.pids[:1])
        sched = _schedule(wl, max_records)
        if max_records:
            sched["t_end"] = sched["t_start"] + wl.consume_time_limit_s
        sampler.mark("produce_start")
        _send_all(producers, ("go", sched))

        def tick() -> None:
            done = sum(w.progress for w in producers)
            span = sched["t_end"] - sched["t_start"]
            frac = done / max_records if max_records else (time.monotonic() - sched["t_start"]) / span
            prog.update(frac, done, "produce")

        wait_for(producers, "done", sched["t_end"] + GRACE_S, tick)
        sampler.mark("produce_end")
        self._unprofile("server-produce")
        return _produce_figures([w.result or {} for w in producers], wl.record_size)

    def _consume(
        self,
        server: Server,
        sampler: ProcSampler,
        workers: list[Worker],
        prog: Progress,
        expected: int,
        tag: str,
        consumers: list[Worker] | None = None,
    ) -> dict[str, Any]:
        wl = self.wl
        if consumers is None:
            consumers = spawn("consumer", wl.consumers, self.driver.name, server, wl, workers)
            wait_for(consumers, "ready", time.monotonic() + READY_TIMEOUT_S)
        self._profile(f"{tag}-consumer", [w.proc.pid for w in consumers])
        self._profile(f"server-{tag}", server.pids[:1])
        deadline = time.monotonic() + wl.consume_time_limit_s
        sampler.mark(f"{tag}_start")
        _send_all(consumers, ("go", {"deadline": deadline, "expected": expected}))

        def tick() -> None:
            done = sum(w.progress for w in consumers)
            prog.update(done / max(expected, 1), done, "consume")

        wait_for(consumers, "done", deadline + GRACE_S, tick)
        sampler.mark(f"{tag}_end")
        self._unprofile(f"server-{tag}")
        results = [w.result or {} for w in consumers]
        figures = _consume_figures(results, wl, expected, None)
        confirmed = [r["acks_confirmed"] for r in results if "acks_confirmed" in r]
        if confirmed:  # the client said how many acks the system accepted (logbroker's commit_acks)
            figures["acks_confirmed"] = sum(confirmed)
        return figures

    def _settle_group(self, server: Server, workers: list[Worker], prog: Progress) -> tuple[list[Worker], dict[str, Any]]:
        """Group workloads: the consumers join while the topic is still empty, and the run goes on once
        their assignments share out every partition (disjoint, complete, balanced); they then stop
        polling ("hold") while the producers run, and drain the backlog as members of a settled group.
        So the consume rate is the steady group's, comparable with one consumer's; how long joins and
        departures take is `python -m bench rebalance`'s measurement."""
        wl = self.wl
        consumers = spawn("consumer", wl.consumers, self.driver.name, server, wl, workers)
        wait_for(consumers, "ready", time.monotonic() + READY_TIMEOUT_S)
        t0 = time.monotonic()
        _send_all(consumers, ("settle",))
        by_conn = {w.conn: w for w in consumers}
        latest: dict[Connection, Any] = {}
        prog.update(0.0, 0, "group joins")
        while len(latest) < len(consumers) or not group_split(list(latest.values()), wl.partitions):
            if time.monotonic() - t0 > SETTLE_TIMEOUT_S:
                seen = "; ".join(f"{by_conn[c].name}: {a}" for c, a in latest.items())
                raise RunError(f"the group did not share out {wl.partitions} partitions within "
                               f"{SETTLE_TIMEOUT_S:.0f} s; last assignments: {seen or 'none reported'}")  # fmt: skip
            for ready in multiprocessing.connection.wait(list(by_conn), timeout=0.2):
                conn = cast(Connection, ready)
                w = by_conn[conn]
                try:
                    msg = conn.recv()
                except EOFError:
                    w.proc.join(1)
                    raise RunError(f"{w.name} exited (code {w.proc.exitcode}) while the group settled") from None
                if msg[0] == "error":
                    raise RunError(f"{w.name} failed:\n{msg[1]}")
                if msg[0] == "assignment":
                    latest[conn] = msg[1]
        settle_s = time.monotonic() - t0
        _send_all(consumers, ("hold",))
        wait_for(consumers, "held", time.monotonic() + READY_TIMEOUT_S)
        held: list[Any] = [w.result for w in consumers]
        for w in consumers:
            w.result = None
        if not group_split(held, wl.partitions):
            raise RunError(f"the group's assignment changed while it was being held: {held}")
        if held[0] is None:
            return consumers, {}
        return consumers, {"settle_s": round(settle_s, 3), "partitions_per_member": [len(h or ()) for h in held]}

    def _server_figures(self, sampler: ProcSampler, phases: Sequence[str]) -> dict[str, Any]:
        sampler.mark("end")
        out: dict[str, Any] = dict(sampler.summary())
        for ph in phases:
            if f"{ph}_start" in sampler.marks and f"{ph}_end" in sampler.marks:
                out[f"{ph}_cpu_s"] = sampler.cpu_between(f"{ph}_start", f"{ph}_end")
                peaks = sampler.peak(f"{ph}_start", f"{ph}_end")
                out[f"{ph}_peak_rss_anon_mb"] = peaks["peak_rss_anon_mb"]
        return out

    # -- the three shapes of a run ----------------------------------------------------------------

    def _run_sequential(self, i: int) -> dict[str, Any]:
        prog = Progress(self._label(i))
        workers: list[Worker] = []
        with ExitStack() as stack:
            server, sampler = self._start(stack, workers)
            consumers: list[Worker] | None = None
            group: dict[str, Any] = {}
            if self.wl.requires == "groups":
                consumers, group = self._settle_group(server, workers, prog)
            produce = self._produce(server, sampler, workers, prog, self.wl.backlog_records)
            consume = self._consume(server, sampler, workers, prog, produce["total_records"], "consume", consumers)
            if group:
                consume["group"] = group
            if self.wl.requires == "queues":
                reap([w.proc for w in workers])  # consumers gone: whatever they held is back in the queue
                consume["unacked"] = self.driver.unacked(server, TOPIC, self.wl)
            figures = self._server_figures(sampler, ("produce", "consume"))
        result = {"produce": produce, "consume": consume, "server": figures, **self._stopped(server)}
        prog.done(_one_line(result))
        return result

    def _run_concurrent(self, i: int) -> dict[str, Any]:
        wl = self.wl
        prog = Progress(self._label(i))
        workers: list[Worker] = []
        with ExitStack() as stack:
            server, sampler = self._start(stack, workers)
            consumers = spawn("consumer", wl.consumers, self.driver.name, server, wl, workers)
            producers = spawn("producer", wl.producers, self.driver.name, server, wl, workers)
            wait_for(workers, "ready", time.monotonic() + READY_TIMEOUT_S)
            self._profile("producer", [w.proc.pid for w in producers])
            self._profile("consumer", [w.proc.pid for w in consumers])
            self._profile("server-run", server.pids[:1])
            sched = _schedule(wl)
            deadline = sched["t_end"] + wl.consume_time_limit_s
            sampler.mark("run_start")
            _send_all(consumers, ("go", {"deadline": deadline, "t_warm": sched["t_warm"]}))
            _send_all(producers, ("go", sched))

            def tick() -> None:
                frac = (time.monotonic() - sched["t_start"]) / (sched["t_end"] - sched["t_start"])
                prog.update(frac, sum(w.progress for w in consumers), "run")

            wait_for(producers, "done", sched["t_end"] + GRACE_S, tick, watch=consumers)
            produce = _produce_figures([w.result or {} for w in producers], wl.record_size)
            _send_all(consumers, ("drain", produce["total_records"]))
            wait_for([c for c in consumers if c.result is None], "done", deadline + GRACE_S, tick)
            sampler.mark("run_end")
            results = [w.result or {} for w in consumers]
            consume = _consume_figures(
                results, wl, produce["total_records"], (sched["t_warm"], sched["t_end"])
            )
            figures = self._server_figures(sampler, ("run",))
        hist = histogram.merge(r["latency_hist"] for r in results)
        result = {
            "produce": produce,
            "consume": consume,
            "latency_ms": histogram.percentiles_ms(hist),
            "latency_hist": histogram.encode(hist),
            "server": figures,
            **self._stopped(server),
        }
        prog.done(_one_line(result))
        return result

    def _run_native(self, i: int) -> dict[str, Any]:
        prog = Progress(self._label(i))
        with ExitStack() as stack:
            server, sampler = self._start(stack, [])
            prog.update(0.0, 0, "produce")
            sampler.mark("produce_start")
            native = self.driver.native_produce(server, self.wl, server.extra["workdir"])
            sampler.mark("produce_end")
            figures = self._server_figures(sampler, ("produce",))
        rate = native["produce_records_per_s"]
        produce = {
            "records": native["records"],
            "records_per_s": rate,
            "mb_per_s": rate * self.wl.record_size / MB,
        }
        result = {"produce": produce, "native": native["native"], "server": figures, **self._stopped(server)}
        prog.done(_one_line(result))
        return result

    def _run_preloaded(self) -> list[dict[str, Any]]:
        """One server: fill the log with preload_bytes, then each run is a fresh consumer reading it all."""
        wl = self.wl
        runs: list[dict[str, Any]] = []
        workers: list[Worker] = []
        prog = Progress(f"[{wl.name} · {self.driver.name} · preload]")
        with ExitStack() as stack:
            server, sampler = self._start(stack, workers)
            sampler.mark("preload_start")
            preload = self.driver.preload(server, TOPIC, wl, prog)
            if preload is None:
                max_records = max(1, wl.preload_bytes // wl.record_size)
                preload = self._produce(server, sampler, workers, prog, max_records=max_records)
                preload["path"] = "producer"
            sampler.mark("preload_end")
            preload["peak_rss_anon_mb"] = sampler.peak("preload_start", "preload_end")["peak_rss_anon_mb"]
            preload["gb"] = preload["total_records"] * wl.record_size / 1e9
            prog.done(
                f"preloaded {preload['total_records']:,} records ({preload['gb']:.2f} GB) "
                f"at {preload['records_per_s']:,.0f} rec/s via {preload.get('path', '?')}"
            )
            total, expected = preload["total_records"], preload.get("matching_records", preload["total_records"])
            for i in range(self.runs):
                prog = Progress(self._label(i))
                consume = self._consume(server, sampler, workers, prog, expected, f"pass{i}")
                if wl.filter:  # filtered-consume: the rate counts delivered records; scanned is all of them
                    consume["delivered_per_s"] = consume["records_per_s"]
                    consume["scanned_per_s"] = consume["records_per_s"] * total / max(expected, 1)
                cpu = sampler.cpu_between(f"pass{i}_start", f"pass{i}_end")
                peaks = sampler.peak(f"pass{i}_start", f"pass{i}_end")
                run = {"consume": consume, "server": {"consume_cpu_s": cpu, **peaks}}
                prog.done(_one_line(run))
                runs.append(run)
                reap([w.proc for w in workers])
            figures = self._server_figures(sampler, ("preload",))
        stopped = self._stopped(server)
        for run in runs:
            run.update(stopped, preload=preload, server_total=figures)
        return runs

    def _stopped(self, server: Server) -> dict[str, Any]:
        return {
            "server_exit": [
                {"name": p.name, "code": p.exit_code, "graceful": p.graceful} for p in server.processes
            ]
        }

    def run(self) -> list[dict[str, Any]]:
        if self.wl.preload_bytes:
            return self._run_preloaded()
        if self.driver.native:
            return [self._run_native(i) for i in range(self.runs)]
        if self.wl.mode == "concurrent":
            return [self._run_concurrent(i) for i in range(self.runs)]
        return [self._run_sequential(i) for i in range(self.runs)]


def _one_line(run: dict[str, Any]) -> str:
    parts = []
    for side in ("produce", "consume"):
        if side in run:
            d = run[side]
            parts.append(f"{side} {d['records_per_s']:>11,.0f} rec/s {d['mb_per_s']:8.1f} MB/s")
            if side == "consume" and "scanned_per_s" in d:
                parts.append(f"scanned {d['scanned_per_s']:>11,.0f} rec/s")
            if side == "consume" and not d.get("complete", True):
                parts.append(f"(INCOMPLETE: {d['records']:,} of {d['expected_records']:,})")
    lat = run.get("latency_ms")
    if lat:
        parts.append(f"p50 {lat['p50']:.2f} p99 {lat['p99']:.2f} max {lat['max']:.1f} ms")
    srv = run.get("server", {})
    if "server_peak_rss_anon_mb" in srv or "peak_rss_anon_mb" in srv:
        parts.append(f"anon {srv.get('server_peak_rss_anon_mb', srv.get('peak_rss_anon_mb', 0)):.0f} MB")
    return " | ".join(parts)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over runs of every figure, the spread of the rates, and the merged latency histogram."""
    out: dict[str, Any] = {"runs": len(runs)}
    for side in ("produce", "consume"):
        rates = [r[side]["records_per_s"] for r in runs if side in r]
        if rates:
            out[side] = {
                "records_per_s": _median(rates),
                "mb_per_s": _median([r[side]["mb_per_s"] for r in runs]),
                "min_records_per_s": min(rates),
                "max_records_per_s": max(rates),
                "spread": (max(rates) - min(rates)) / _median(rates) if _median(rates) else 0.0,
            }
            if side == "consume":
                out[side]["complete"] = all(r[side]["complete"] for r in runs)
                for key in ("scanned_per_s", "delivered_per_s"):  # filtered-consume
                    if all(key in r[side] for r in runs):
                        out[side][key] = _median([r[side][key] for r in runs])
    lats = [r["latency_ms"] for r in runs if r.get("latency_ms")]
    if lats:
        out["latency_ms"] = {k: _median([lat[k] for lat in lats]) for k in lats[0]}
        out["latency_curve_ms"] = histogram.curve_ms(histogram.merge(r["latency_hist"] for r in runs))
    server_keys = sorted({k for r in runs for k in r.get("server", {})})
    out["server"] = {k: _median([r["server"][k] for r in runs if k in r["server"]]) for k in server_keys}
    if runs and "preload" in runs[0]:
        out["preload"] = runs[0]["preload"]
        out["server"]["peak_rss_anon_mb_all"] = runs[0]["server_total"]["server_peak_rss_anon_mb"]
    groups = [r["consume"]["group"] for r in runs if "group" in r.get("consume", {})]
    if groups:
        out["group"] = {
            "settle_s": _median([g["settle_s"] for g in groups]),
            "partitions_per_member": groups[0]["partitions_per_member"],
            "records_per_consumer": runs[0]["consume"].get("records_per_consumer"),
        }
    if runs and "native" in runs[0]:
        out["native"] = {"clients": runs[0]["native"]["clients"], "pipeline": 1000}
    problems = []
    for i, r in enumerate(runs):
        c = r.get("consume")
        if c and not c["complete"]:
            problems.append(f"run {i + 1}: consumed {c['records']:,} of {c['expected_records']:,} records")
        if c and c.get("unacked"):
            problems.append(f"run {i + 1}: {c['unacked']:,} messages left unacknowledged in the queue")
        for e in r.get("server_exit", []):
            if not e["graceful"]:
                problems.append(
                    f"run {i + 1}: {e['name']} did not stop cleanly on SIGTERM (exit {e['code']})"
                )
    out["problems"] = problems
    return out


def unreaped(since: int) -> list[int]:
    return [pid for pid in STARTED_PIDS[since:] if pid_exists(pid)]
