"""The `request-reply` workload: a front end asks, one of 4 responders answers, the asker waits.

Run by `python -m bench run --workload request-reply` (a workload with `requires = "request-reply"`,
routed here by cli.py instead of runner.py). Per system and run: a fresh server; `consumers` (4)
responder processes that answer every request with its own 100 B value; then one requester process
runs two phases, each `warmup_s` + `duration_s`:

- `rate`: open loop at `target_rate` (1,000) requests/s (what is due is sent each millisecond, whether
  or not earlier replies came); round trip = reply received - request sent, for requests sent after
  the warm-up. A request unanswered `TIMEOUT_S` after the phase is counted lost.
- `max`: closed loop with `window` requests in flight (option, default 256); requests/s = replies
  received within the measured window / duration_s; round trips recorded as well.

The systems, each in its own idiom:

- logbroker: `Requester.request_async` (one reply stream; requests produced to a 4-partition topic,
  acks=1) and 4 `Responder`s of one share group.
- NATS core request-reply (nats-py): `nc.request(subject, ...)` (one muxed inbox subscription per
  connection), 4 subscribers in one queue group answering with `msg.respond`.
- RabbitMQ direct reply-to (pika): requests published to one classic queue with
  reply_to=`amq.rabbitmq.reply-to` and a correlation_id, 4 consumers (prefetch 100) publishing the
  reply to the reply_to and acknowledging.

Each process is its own (spawn), so no two share a GIL. Figures per run: p50/p99/p99.9 of the rate
phase, its lost count, and the max phase's requests/s; summary: medians over runs.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench import histogram
from bench.drivers.base import Driver
from bench.procs import STARTED_PIDS, die_with_parent, reap
from bench.workload import Workload

TOPIC = "rr"
GROUP = "rr"
TIMEOUT_S = 10.0
READY_TIMEOUT_S = 60.0
WINDOW_DEFAULT = 256


# -- responders ------------------------------------------------------------------------------------


def _respond_logbroker(address: str, ready: Callable[[], None]) -> None:
    from logbroker import Responder

    r = Responder(address, TOPIC, GROUP, lambda m: m.value, auto_offset_reset="earliest", max_poll_records=100,
                  poll_timeout_ms=200)
    r.serve_once(100)  # joined
    ready()
    r.run()


def _respond_nats(address: str, ready: Callable[[], None]) -> None:
    import nats

    async def main() -> None:
        nc = await nats.connect(f"nats://{address}", connect_timeout=5)

        async def on_request(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(TOPIC, queue=GROUP, cb=on_request)
        await nc.flush()
        ready()
        await asyncio.Event().wait()

    asyncio.run(main())


def _respond_rabbitmq(address: str, ready: Callable[[], None]) -> None:
    import pika

    from bench.drivers.rabbitmq import _params

    conn = pika.BlockingConnection(_params(address))
    ch = conn.channel()
    ch.queue_declare(queue=TOPIC)
    ch.basic_qos(prefetch_count=100)

    def on_request(ch: Any, method: Any, props: Any, body: bytes) -> None:
        ch.basic_publish(exchange="", routing_key=props.reply_to, body=body,
                         properties=pika.BasicProperties(correlation_id=props.correlation_id))
        ch.basic_ack(delivery_tag=method.delivery_tag)

    ch.basic_consume(queue=TOPIC, on_message_callback=on_request)
    ready()
    ch.start_consuming()


RESPONDERS = {"logbroker": _respond_logbroker, "nats": _respond_nats, "rabbitmq": _respond_rabbitmq}


def _responder_main(conn: Connection, system: str, address: str, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    RESPONDERS[system](address, lambda: conn.send(("ready",)))


# -- the requester -----------------------------------------------------------------------------------


class _Tally:
    """Round trips of one phase: sent times by id, a histogram of those sent after the warm-up."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        self.hist = histogram.new()
        self.lock = threading.Lock()
        self.warmup_s, self.duration_s = warmup_s, duration_s
        self.measure_from = self.measure_to = float("inf")  # set by begin()
        self.sent = self.received = self.in_window = 0

    def begin(self) -> float:
        """The phase starts now, once the asker is connected and has had its first reply (a loaded
        machine may take seconds for that): warm-up, then the measured window. Returns its end."""
        self.measure_from = time.monotonic() + self.warmup_s
        self.measure_to = self.measure_from + self.duration_s
        return self.measure_to

    def done(self, sent_at: float, now: float) -> None:
        with self.lock:
            self.received += 1
            if sent_at >= self.measure_from:
                histogram.record(self.hist, int((now - sent_at) * 1e6))
            if self.measure_from <= now < self.measure_to:
                self.in_window += 1


def _paced(rate: int, until: float, send: Callable[[], None], idle: Callable[[float], None]) -> None:
    """Open loop: call send() for every request due (rate per second) until `until`; idle(s) between."""
    start = time.monotonic()
    n = 0
    while True:
        now = time.monotonic()
        if now >= until:
            return
        due = int((now - start) * rate) + 1
        while n < due:
            send()
            n += 1
        idle(min(start + n / rate, until) - time.monotonic())


def _ask_logbroker(address: str, phase: str, wl: Workload, tally: _Tally, window: int) -> None:
    from logbroker import Requester

    value = os.urandom(wl.record_size)
    gate = threading.Semaphore(window)
    with Requester(address, timeout_ms=int(TIMEOUT_S * 1000)) as req:
        req.request(TOPIC, value)  # the reply stream opened, metadata known
        until = tally.begin()

        def send() -> None:
            if phase == "max":
                gate.acquire()
            t = time.monotonic()
            tally.sent += 1
            fut = req.request_async(TOPIC, value)
            fut.add_done_callback(lambda f: (f.exception() is None and tally.done(t, time.monotonic()),
                                             phase == "max" and gate.release()))

        if phase == "rate":
            _paced(wl.target_rate, until, send, lambda s: time.sleep(max(s, 0)))
        else:
            while time.monotonic() < until:
                send()
        end = time.monotonic() + TIMEOUT_S
        while tally.received < tally.sent and time.monotonic() < end and phase == "rate":
            time.sleep(0.01)


def _ask_nats(address: str, phase: str, wl: Workload, tally: _Tally, window: int) -> None:
    import nats

    value = os.urandom(wl.record_size)

    async def main() -> None:
        nc = await nats.connect(f"nats://{address}", connect_timeout=5)
        await nc.request(TOPIC, value, timeout=TIMEOUT_S)
        until = tally.begin()

        async def one() -> None:
            t = time.monotonic()
            tally.sent += 1
            try:
                await nc.request(TOPIC, value, timeout=TIMEOUT_S)
            except Exception:
                return
            tally.done(t, time.monotonic())

        tasks: set[asyncio.Task[None]] = set()
        if phase == "rate":
            start, n = time.monotonic(), 0
            while time.monotonic() < until:
                due = int((time.monotonic() - start) * wl.target_rate) + 1
                while n < due:
                    task = asyncio.create_task(one())
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    n += 1
                await asyncio.sleep(max(0.0, start + n / wl.target_rate - time.monotonic()))
            if tasks:
                await asyncio.wait(tasks, timeout=TIMEOUT_S)
        else:
            async def loop() -> None:
                while time.monotonic() < until:
                    await one()

            await asyncio.gather(*(loop() for _ in range(window)))
        await nc.close()

    asyncio.run(main())


def _ask_rabbitmq(address: str, phase: str, wl: Workload, tally: _Tally, window: int) -> None:
    import pika

    from bench.drivers.rabbitmq import _params

    value = os.urandom(wl.record_size)
    conn = pika.BlockingConnection(_params(address))
    ch = conn.channel()
    sent_at: dict[str, float] = {}
    ids = iter(range(1 << 62))

    def publish() -> None:
        corr = str(next(ids))
        sent_at[corr] = time.monotonic()
        tally.sent += 1
        ch.basic_publish(exchange="", routing_key=TOPIC, body=value,
                         properties=pika.BasicProperties(reply_to="amq.rabbitmq.reply-to", correlation_id=corr))

    def on_reply(ch: Any, method: Any, props: Any, body: bytes) -> None:
        t = sent_at.pop(props.correlation_id, None)
        if t is not None:
            tally.done(t, time.monotonic())
        if phase == "max" and time.monotonic() < until:
            publish()

    ch.basic_consume(queue="amq.rabbitmq.reply-to", on_message_callback=on_reply, auto_ack=True)
    until = tally.begin()
    if phase == "rate":
        _paced(wl.target_rate, until, publish, lambda s: conn.process_data_events(time_limit=max(s, 0)))
    else:
        for _ in range(window):
            publish()
        while time.monotonic() < until:
            conn.process_data_events(time_limit=0.05)
    end = time.monotonic() + (TIMEOUT_S if phase == "rate" else 1.0)
    while sent_at and time.monotonic() < end:
        conn.process_data_events(time_limit=0.05)
    conn.close()


ASKERS = {"logbroker": _ask_logbroker, "nats": _ask_nats, "rabbitmq": _ask_rabbitmq}


def _requester_main(conn: Connection, system: str, address: str, phase: str, wl: Workload, window: int,
                    parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    tally = _Tally(wl.warmup_s, wl.duration_s)  # its window starts once the asker is ready (begin())
    ASKERS[system](address, phase, wl, tally, window)
    conn.send({"sent": tally.sent, "received": tally.received, "in_window": tally.in_window,
               "hist": histogram.encode(tally.hist)})


# -- the harness -------------------------------------------------------------------------------------


def _spawn(ctx: Any, target: Any, args: tuple[Any, ...], procs: list[Any]) -> Connection:
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args, os.getpid()), daemon=True, name="bench-request-reply")
    proc.start()
    assert proc.pid is not None
    STARTED_PIDS.append(proc.pid)
    child.close()
    procs.append(proc)
    return parent


def _one_run(driver: Driver, wl: Workload, data_root: Path) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    window = int(wl.option(driver.name, "window", WINDOW_DEFAULT))
    procs: list[Any] = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-rr-", dir=data_root)))
        server = driver.start(workdir, wl, stack)
        if driver.name == "logbroker":
            driver.create_topic(server, TOPIC, wl)
        try:
            conns = [_spawn(ctx, _responder_main, (driver.name, server.address), procs) for _ in range(wl.consumers)]
            for c in conns:
                if not c.poll(READY_TIMEOUT_S):
                    raise RuntimeError(f"request-reply: a {driver.name} responder was not ready in {READY_TIMEOUT_S} s")
                c.recv()
            out: dict[str, Any] = {}
            for phase in ("rate", "max"):
                c = _spawn(ctx, _requester_main, (driver.name, server.address, phase, wl, window), procs)
                limit = wl.warmup_s + wl.duration_s + TIMEOUT_S + 60
                if not c.poll(limit):
                    raise RuntimeError(f"request-reply: the {driver.name} requester did not finish its {phase} phase")
                res = c.recv()
                h = histogram.merge([res["hist"]])
                out[phase] = {"sent": res["sent"], "received": res["received"],
                              "requests_per_s": res["in_window"] / wl.duration_s,
                              "latency_ms": histogram.percentiles_ms(h)}
            out["rate"]["lost"] = out["rate"]["sent"] - out["rate"]["received"]
            return out
        finally:
            reap(procs)


def run_workload(driver: Driver, wl: Workload, runs: int, data_root: Path) -> list[dict[str, Any]]:
    return [_one_run(driver, wl, data_root) for _ in range(runs)]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    lat = [r["rate"]["latency_ms"] for r in runs if r["rate"]["latency_ms"]]
    problems = [f"run {i + 1}: {r['rate']['lost']} requests of the rate phase unanswered"
                for i, r in enumerate(runs) if r["rate"]["lost"]]
    return {
        "runs": len(runs),
        "rate_phase": {
            "requests_per_s": med([r["rate"]["requests_per_s"] for r in runs]),
            "latency_ms": {k: med([x[k] for x in lat]) for k in (lat[0] if lat else {})},
        },
        "max_requests_per_s": med([r["max"]["requests_per_s"] for r in runs]),
        "max_phase_latency_ms": {k: med([r["max"]["latency_ms"][k] for r in runs if r["max"]["latency_ms"]])
                                 for k in ("p50", "p99")} if all(r["max"]["latency_ms"] for r in runs) else {},
        "problems": problems,
    }


def one_line(system: str, summary: dict[str, Any]) -> str:
    lat = summary["rate_phase"]["latency_ms"]
    return (f"request-reply {system}: at {summary['rate_phase']['requests_per_s']:,.0f} req/s p50 {lat.get('p50', 0):.3f} ms "
            f"p99 {lat.get('p99', 0):.3f} ms p99.9 {lat.get('p99.9', 0):.3f} ms; max {summary['max_requests_per_s']:,.0f} req/s")
