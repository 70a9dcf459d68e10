"""Redis Streams: `redis-server` (Debian package) with AOF `appendfsync everysec`, client redis-py + hiredis.

A topic of N partitions is N streams `<topic>:<p>`. Produce: XADD in non-transactional pipelines of
1000 (Redis's documented way to go fast). Consume: XREADGROUP ... COUNT 1000 NOACK on a consumer
group created at topic creation, so one consumer reads everything and several share the streams.
Both capped at 16 MiB per round trip for 100 KB records.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.drivers.base import Driver, Server, exe_path, partition_of, records_per_request
from bench.procs import ServerProcess, free_port
from bench.workload import Workload

GROUP = "bench"
FIELD = b"v"


def _connect(address: str) -> Any:
    import redis

    host, port = address.rsplit(":", 1)
    return redis.Redis(host=host, port=int(port), socket_timeout=60)


def start_redis(workdir: Path, stack: ExitStack) -> Server:
    port = free_port()
    data = workdir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        exe_path("redis-server"), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(data),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
        "--protected-mode", "yes", "--logfile", "", "--maxmemory", "0",
    ]  # fmt: skip
    proc = ServerProcess("redis-server", argv, workdir / "redis.log")
    stack.callback(proc.stop)
    address = f"127.0.0.1:{port}"

    def ready() -> bool:
        return bool(_connect(address).ping())

    proc.wait_until(ready, 15, "answering PING")
    return Server(address, [proc])


class RedisProducer:
    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        self.r = _connect(address)
        self.streams = [f"{topic}:{p}" for p in range(wl.partitions)]
        self.batch_records = records_per_request(wl.record_size)
        self.rr = index
        self.pending = None

    def send(self, values: Sequence[bytes], keys: Sequence[bytes] | None) -> None:
        pipe = self.r.pipeline(transaction=False)
        if keys is None:
            stream = self.streams[self.rr % len(self.streams)]
            self.rr += 1
            for v in values:
                pipe.xadd(stream, {FIELD: v})
        else:
            n = len(self.streams)
            for v, k in zip(values, keys, strict=True):
                pipe.xadd(self.streams[partition_of(k, n, 0)], {FIELD: v})
        pipe.execute()  # raises on the first error reply

    def flush(self) -> None:
        pass  # execute() already waited for every reply

    def close(self) -> None:
        self.r.close()


class RedisConsumer:
    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        self.r = _connect(address)
        self.name = f"c{index}"
        self.streams = {f"{topic}:{p}": ">" for p in range(wl.partitions)}
        self.count = records_per_request(wl.record_size)

    def poll(self, timeout_s: float) -> Sequence[Any]:
        reply = self.r.xreadgroup(
            GROUP, self.name, self.streams, count=self.count, block=max(1, int(timeout_s * 1000)), noack=True
        )
        if not reply:
            return []
        if len(reply) == 1:
            return reply[0][1]
        out: list[Any] = []
        for _stream, entries in reply:
            out.extend(entries)
        return out

    def value(self, record: Any) -> bytes:
        return record[1][FIELD]

    def close(self) -> None:
        self.r.close()


class RedisDriver(Driver):
    name = "redis"
    title = "Redis Streams"
    binaries = (("redis-server", "redis-server"),)
    modules = (("redis", "redis"), ("hiredis", "hiredis"))

    def unsupported(self, wl: Workload) -> str | None:
        if wl.acks == "all" or wl.replication_factor > 1:
            return "Redis Streams: the harness has no replicated (WAIT) setup for it yet"
        return None

    def start(self, workdir: Path, wl: Workload, stack: ExitStack) -> Server:
        return start_redis(workdir, stack)

    def create_topic(self, server: Server, topic: str, wl: Workload) -> None:
        r = _connect(server.address)
        for p in range(wl.partitions):
            r.xgroup_create(f"{topic}:{p}", GROUP, id="0", mkstream=True)
        r.close()

    def producer(self, address: str, topic: str, wl: Workload, index: int) -> RedisProducer:
        return RedisProducer(address, topic, wl, index)

    def consumer(self, address: str, topic: str, wl: Workload, index: int) -> RedisConsumer:
        return RedisConsumer(address, topic, wl, index)

    def version(self) -> str:
        out = subprocess.run(
            [exe_path("redis-server"), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.split(" sha=")[0].replace("Redis server v=", "redis-server ").strip()
