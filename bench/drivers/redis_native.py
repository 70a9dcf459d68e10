"""Native reference: Redis's own C client, `redis-benchmark -P 1000 ... XADD`, against the same server.

Produce only (redis-benchmark has no stream reader). A warm-up invocation also calibrates `-n` so the
measured one lasts about `duration_s`. `-c` is the workload's producer count (one connection per
producer process on the Python side) unless `[options.redis-native] clients` says otherwise.
"""

from __future__ import annotations

import csv
import io
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.drivers.base import Driver, Server, exe_path
from bench.drivers.redis import start_redis
from bench.workload import Workload

PIPELINE = 1000


def _run(address: str, stream: str, value: str, n: int, clients: int, timeout_s: float) -> dict[str, float]:
    host, port = address.rsplit(":", 1)
    argv = [
        exe_path("redis-benchmark"), "-h", host, "-p", port, "-P", str(PIPELINE), "-c", str(clients),
        "-n", str(n), "--csv", "XADD", stream, "*", "v", value,
    ]  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    elapsed = time.monotonic() - t0
    if out.returncode != 0:
        raise RuntimeError(f"redis-benchmark failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    rows = [r for r in csv.reader(io.StringIO(out.stdout)) if r and r[0] != "test"]
    if not rows:
        raise RuntimeError(f"no CSV line in redis-benchmark output: {out.stdout[-500:]!r}")
    row = rows[-1]
    return {"rps": float(row[1]), "p50_ms": float(row[4]), "p99_ms": float(row[6]), "wall_s": elapsed}


class RedisNativeDriver(Driver):
    name = "redis-native"
    title = "redis-benchmark (C)"
    binaries = (("redis-server", "redis-server"), ("redis-benchmark", "redis-tools"))
    native = True

    def unsupported(self, wl: Workload) -> str | None:
        if wl.latency or wl.acks == "all" or wl.replication_factor > 1 or wl.requires:
            return "redis-benchmark: a produce-throughput reference only"
        return None

    def start(self, workdir: Path, wl: Workload, stack: ExitStack) -> Server:
        return start_redis(workdir, stack)

    def create_topic(self, server: Server, topic: str, wl: Workload) -> None:
        pass  # XADD creates the stream

    def native_produce(self, server: Server, wl: Workload, workdir: Path) -> dict[str, Any]:
        clients = int(wl.option(self.name, "clients", wl.producers))
        value = ("x" * wl.record_size)[: wl.record_size]
        warm_n = max(PIPELINE * clients, int(wl.native_requests_per_s * max(wl.warmup_s, 0.2)))
        warm = _run(server.address, "bench-warmup", value, warm_n, clients, 120)
        n = max(PIPELINE * clients, int(warm["rps"] * wl.duration_s))
        res = _run(server.address, "bench", value, n, clients, wl.duration_s * 10 + 60)
        return {
            "records": n,
            "produce_records_per_s": res["rps"],
            "native": {**res, "clients": clients, "n": n},
        }

    def version(self) -> str:
        out = subprocess.run(
            [exe_path("redis-benchmark"), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
