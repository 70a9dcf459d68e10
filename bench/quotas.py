"""The quota scenario of issue 19: a producer over a 10 MB/s produce quota is held within 15 % of it,
while a second producer (another client id, no quota) is not slowed.

    python -m bench.quotas                      # 10 MB/s, 15 s warm-up + 30 s measured, twice (~1.5 min)
    python -m bench.quotas --quota-mb 2 --warmup-s 3 --duration-s 5 --window-num 3 --window-ms 500   # smoke

One standalone broker (a fresh data directory, the default quota windows: 11 x 1 s), one topic of
4 partitions, acks=1, 1 KiB values. Phases: the unlimited producer alone (its baseline), then both
at once: `limited` (client id with `logbroker quotas set --client-id limited --producer-byte-rate`)
and `free` (no quota). Each producer is its own process (spawn), sends as fast as its futures allow
(at most `WINDOW` records unacknowledged), and counts the value bytes acknowledged inside the
measured window (after the warm-up). Printed: each producer's MB/s, the limited one against its
quota (within 15 %: ok), the free one against its baseline, and the throttled responses the limited
producer saw (`Producer.throttle`). The warm-up must outlast the first throttle: a producer
starting flat out gets the windows' span times the quota through at once (Kafka's burst) and the
requests it pipelined meanwhile, then waits that debt out (up to the 30 s bound); 15 s covers it
with the default windows. Value bytes are counted; the broker's quota counts batch bytes
(headers and per-record overhead on top, ~5 % at 1 KiB), so the limited rate reads slightly low.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from collections import deque
from contextlib import ExitStack
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.cluster import health_serving
from bench.procs import ServerProcess, free_port, reap

TOPIC = "quota"
VALUE_BYTES = 1024
WINDOW = 2000  # unacknowledged records per producer
LOGBROKER_ROOT = Path(__file__).resolve().parents[1]


def _produce(address: str, client_id: str, warmup_s: float, duration_s: float, out: Connection) -> None:
    from logbroker import Producer

    value = os.urandom(VALUE_BYTES)
    p = Producer(address, client_id=client_id, acks=1, linger_ms=5)
    start = time.monotonic()
    measure_from, end = start + warmup_s, start + warmup_s + duration_s
    acked = [0]

    def on_done(sent_at: float) -> Any:
        def done(_f: Any) -> None:
            if measure_from <= sent_at and time.monotonic() <= end:
                acked[0] += VALUE_BYTES
        return done

    pending: deque[Any] = deque()
    while time.monotonic() < end:
        f = p.send(TOPIC, value)
        f.add_done_callback(on_done(time.monotonic()))
        pending.append(f)
        while len(pending) >= WINDOW:
            pending.popleft().get(timeout=60)
    p.flush(timeout=60)
    out.send({"client_id": client_id, "mb_per_s": acked[0] / duration_s / 1e6,
              "throttled_responses": p.throttle.throttled_responses,
              "throttle_time_ms_total": p.throttle.throttle_time_ms_total})
    p.close()


def _phase(address: str, client_ids: list[str], warmup_s: float, duration_s: float) -> dict[str, dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for cid in client_ids:
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_produce, args=(address, cid, warmup_s, duration_s, send), daemon=True)
        proc.start()
        pipes.append(recv)
        procs.append(proc)
    try:
        results = [r.recv() if r.poll(warmup_s + duration_s + 120) else {} for r in pipes]
    finally:
        reap(procs)
    return {cid: res for cid, res in zip(client_ids, results, strict=True)}


def run(quota_mb: float, warmup_s: float, duration_s: float, window_num: int, window_ms: int) -> int:
    import logbroker

    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-quotas-")))
        address = f"127.0.0.1:{free_port()}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(LOGBROKER_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        proc = ServerProcess("logbroker", [sys.executable, "-m", "logbroker", "serve", "--data-dir",
                                           str(workdir / "data"), "--listen", address, "--log-level", "warning", "--metrics-listen", "off",
                                           "--quota-window-num", str(window_num),
                                           "--quota-window-size-ms", str(window_ms)],
                             workdir / "logbroker.log", env=env)
        stack.callback(proc.stop)
        proc.wait_until(lambda: health_serving(address), 30, "SERVING")
        with logbroker.Admin(address) as admin:
            admin.create_topic(TOPIC, partitions=4)
            admin.set_quota(client_id="limited", producer_byte_rate=quota_mb * 1e6)
        baseline = _phase(address, ["free"], warmup_s, duration_s)["free"]
        both = _phase(address, ["limited", "free"], warmup_s, duration_s)
    limited, free = both["limited"], both["free"]
    off = abs(limited["mb_per_s"] - quota_mb) / quota_mb
    print(f"free alone:       {baseline['mb_per_s']:8.2f} MB/s")
    print(f"limited (quota {quota_mb:g} MB/s): {limited['mb_per_s']:8.2f} MB/s ({off:.0%} off; "
          f"{'ok' if off <= 0.15 else 'OUTSIDE 15 %'}), {limited['throttled_responses']} throttled responses")
    print(f"free beside it:   {free['mb_per_s']:8.2f} MB/s ({free['mb_per_s'] / max(baseline['mb_per_s'], 1e-9):.0%} "
          f"of alone), {free['throttled_responses']} throttled responses")
    return 0 if off <= 0.15 and free["throttled_responses"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quotas", description=__doc__.splitlines()[0])
    ap.add_argument("--quota-mb", type=float, default=10.0, help="the limited producer's quota, MB/s")
    ap.add_argument("--warmup-s", type=float, default=15.0)
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--window-num", type=int, default=11, help="serve --quota-window-num")
    ap.add_argument("--window-ms", type=int, default=1000, help="serve --quota-window-size-ms")
    args = ap.parse_args(argv)
    return run(args.quota_mb, args.warmup_s, args.duration_s, args.window_num, args.window_ms)


if __name__ == "__main__":
    sys.exit(main())
