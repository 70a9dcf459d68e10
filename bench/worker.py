"""Producer and consumer worker processes: the same measuring loops for every system.

A worker builds its client, answers ("ready",), waits for ("go", params), runs, answers
("done", result) or ("error", traceback), and exits. While running it sends ("progress", records)
about twice a second.

Group workloads add a phase before "go" for consumers (`settle`): on ("settle",) a consumer polls
the still empty topic and reports ("assignment", sorted partitions) each time its assignment changes
(("assignment", None) once for a client without one: the peers' shared consumers), until ("hold",),
which it answers with ("held", partitions) and stops polling; the group's membership carries on in
the client (logbroker's heartbeat thread) while the producers run. Times are `time.monotonic()`, which on Linux is one clock for all processes,
so the harness can hand out a common schedule (start, end of warm-up, end).

Queue workloads (`requires = "queues"`): after each poll the consumer acknowledges every message it
got, one ack per message (`client.ack(records)`), and a poll's records count once acknowledged;
`client.finish()` at the end flushes what the client still buffers and returns how many acks the
system confirmed (None when its protocol does not confirm acks, as AMQP's and JetStream's do not).

Record layout: bytes 0-7 are the send time (monotonic_ns, little endian) when the workload measures
latency, zero otherwise; the rest is filler up to `record_size`.
"""

from __future__ import annotations

import contextlib
import random
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from bench import histogram
from bench.drivers import get_driver
from bench.drivers.base import ConsumerClient, ProducerClient
from bench.procs import die_with_parent
from bench.workload import Workload

PROGRESS_INTERVAL_S = 0.5
KEY_CYCLE = 1 << 16
TICK_S = 0.001  # a paced producer sends what is due once per millisecond (each record stamped as sent)


def payload(record_size: int) -> bytes:
    return bytes(8) + (b"logbroker-bench-" * (record_size // 16 + 1))[: record_size - 8]


def key_cycle(wl: Workload, index: int) -> list[bytes] | None:
    """A fixed sequence of keys to cycle through: no per-record randomness in the hot loop."""
    if wl.key_distribution == "none":
        return None
    rng = random.Random(index)
    pool = [b"key-%d" % i for i in range(wl.key_count)]
    if wl.key_distribution == "uniform":
        return [rng.choice(pool) for _ in range(KEY_CYCLE)]
    return [b"hot-key" if rng.random() < wl.hot_key_share else rng.choice(pool) for _ in range(KEY_CYCLE)]


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def produce(
    client: ProducerClient, wl: Workload, index: int, p: dict[str, Any], conn: Connection
) -> dict[str, Any]:
    rate = wl.rate_per_producer
    full = max(1, client.batch_records)
    base = payload(wl.record_size)
    tail = base[8:]
    constant = [base] * full
    keys = key_cycle(wl, index)
    key_pos = 0
    t_start, t_warm, t_end = p["t_start"], p["t_warm"], p["t_end"]
    max_records = p.get("max_records") or 0  # preload: stop after this many
    _sleep_until(t_start)
    count = c0 = 0
    t0 = time.monotonic()
    warm_done = t_warm <= t0
    next_report = t0 + PROGRESS_INTERVAL_S
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        if not warm_done and now >= t_warm:
            client.flush()  # everything counted from here on is sent and acknowledged in the window
            t0, c0, warm_done = time.monotonic(), count, True
        if rate:  # paced: every TICK_S, send what is due by now
            n = min(int((now - t_start) * rate) - count, full)
            if n <= 0:
                time.sleep(min(TICK_S, max(0.0, t_start + (count + 1) / rate - now)))
                continue
        else:
            n = full
        if max_records:
            n = min(n, max_records - count)
            if n <= 0:
                break
        if wl.latency:
            values = [time.monotonic_ns().to_bytes(8, "little") + tail for _ in range(n)]
        else:
            values = constant if n == full else constant[:n]
        ks = None
        if keys is not None:
            if key_pos + n > KEY_CYCLE:
                key_pos = 0
            ks = keys[key_pos : key_pos + n]
            key_pos += n
        client.send(values, ks)
        count += n
        if rate:
            _sleep_until(now + TICK_S)
        if now >= next_report:
            conn.send(("progress", count))
            next_report = now + PROGRESS_INTERVAL_S
    client.flush()
    t1 = time.monotonic()
    return {"records": count - c0, "total_records": count, "t0": t0, "t1": t1}


def assignment_of(client: ConsumerClient) -> list[tuple[str, int]] | None:
    """The partitions a group member owns now (sorted), or None for a client without an assignment."""
    get = getattr(client, "assignment", None)
    return None if get is None else sorted(get())


def settle(client: ConsumerClient, conn: Connection) -> list[tuple[str, int]] | None:
    """Poll the (empty) topic until the harness says ("hold",), reporting assignment changes."""
    current = assignment_of(client)
    conn.send(("assignment", current))
    while True:
        if conn.poll(0 if current is not None else None):
            msg = conn.recv()
            if msg[0] == "hold":
                held = assignment_of(client)
                conn.send(("held", held))
                return held
            raise RuntimeError(f"unexpected message while settling: {msg[0]!r}")
        records = client.poll(0.05)
        if records:
            raise RuntimeError(f"{len(records)} records arrived while the group settled on an empty topic")
        now = assignment_of(client)
        if now != current:
            current = now
            conn.send(("assignment", current))


def consume(client: ConsumerClient, wl: Workload, p: dict[str, Any], conn: Connection) -> dict[str, Any]:
    hist = histogram.new() if wl.latency else None
    warm_ns = int(p.get("t_warm", 0.0) * 1e9)
    deadline = p["deadline"]
    expected: int | None = p.get("expected")
    single = wl.consumers == 1
    draining = expected is not None
    idle_s = p.get("idle_s", 1.0)
    count = 0
    samples: list[tuple[float, int]] = []
    t_go = time.monotonic()
    t_last = t_go
    next_report = t_go + PROGRESS_INTERVAL_S
    timed_out = False
    value = client.value
    ack = getattr(client, "ack", None) if wl.requires == "queues" else None  # one ack per message
    while True:
        now = time.monotonic()
        if now >= deadline:
            timed_out = True
            break
        if not draining and conn.poll():
            msg = conn.recv()
            if msg[0] == "drain":
                draining, expected = True, msg[1]
        records = client.poll(0.1)
        if records:
            if ack is not None:
                ack(records)  # counted (and timed) once acknowledged
            t = time.monotonic()
            count += len(records)
            samples.append((t, count))
            t_last = t
            if hist is not None:
                now_ns = time.monotonic_ns()
                for r in records:
                    sent_ns = int.from_bytes(value(r)[:8], "little")
                    if sent_ns >= warm_ns:
                        histogram.record(hist, (now_ns - sent_ns) // 1000)
            if t >= next_report:
                conn.send(("progress", count))
                next_report = t + PROGRESS_INTERVAL_S
        if draining:
            if single and expected is not None and count >= expected:
                break
            if not single and time.monotonic() - t_last >= idle_s and (count or time.monotonic() - t_go > 10):
                break
    out: dict[str, Any] = {}
    if ack is not None:  # after the window: what is still buffered goes now; a figure only if the client confirms
        confirmed = client.finish()  # type: ignore[attr-defined]
        if confirmed is not None:
            out["acks_confirmed"] = confirmed
    return {
        **out,
        "records": count,
        "samples": samples,
        "t_go": t_go,
        "timed_out": timed_out,
        "latency_hist": histogram.encode(hist) if hist is not None else "",
    }


def main(
    conn: Connection,
    role: str,
    system: str,
    address: str,
    topic: str,
    wl_dict: dict[str, Any],
    index: int,
    parent_pid: int,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the harness stops us; Ctrl-C is for it alone
    die_with_parent(parent_pid)
    client: Any = None
    try:
        wl = Workload(**{**wl_dict, "systems": tuple(wl_dict["systems"])})
        driver = get_driver(system)
        if role == "producer":
            client = driver.producer(address, topic, wl, index)
        else:
            client = driver.consumer(address, topic, wl, index)
        conn.send(("ready", None))
        msg = conn.recv()
        if msg[0] == "settle" and role == "consumer":
            settle(client, conn)
            msg = conn.recv()
        if msg[0] != "go":
            return
        if role == "producer":
            result = produce(client, wl, index, msg[1], conn)
        else:
            result = consume(client, wl, msg[1], conn)
        conn.send(("done", result))
    except (EOFError, BrokenPipeError):
        pass  # the harness went away
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        conn.close()
