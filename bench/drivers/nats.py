"""NATS JetStream: `nats-server -js` (Debian package) with file storage, client nats-py.

A topic of N partitions is one stream with subjects `<topic>.<p>`. Produce: `js.publish_async`
(nats-py's pipelined publish: many publishes in flight, acks gathered as they come, bounded by
`publish_async_max_pending`), the fast path the NATS guides recommend over awaiting each
`js.publish`. Consume, one consumer: an ordered push consumer with a message callback, nats-py's
fastest reader (274k msg/s here against 50k for `fetch(batch=1000)` on a pull subscription).
Several consumers sharing a topic (groups): a durable pull consumer with AckPolicy.NONE created with
the topic, fetched in batches of 1000 (fewer for 100 KB records) — the documented way to share.
`[options.nats] consumer = "pull"` forces the pull path for a single consumer too.
Queue workloads (`requires = "queues"`, queue-ack): the stream has work-queue retention and the shared
durable pull consumer AckPolicy.EXPLICIT (`max_ack_pending` from `[options.nats]`); every message
gets its own `msg.ack()`.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import subprocess
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.drivers.base import Driver, Server, exe_path, partition_of, records_per_request
from bench.procs import ServerProcess, free_port
from bench.workload import Workload

DURABLE = "bench"
MAX_PENDING = 4000  # publish_async window (the client default; 16k and 64k measured slower)


def _connect(loop: asyncio.AbstractEventLoop, address: str) -> Any:
    import nats

    return loop.run_until_complete(
        nats.connect(f"nats://{address}", connect_timeout=5, allow_reconnect=False, max_reconnect_attempts=0)
    )


def _shutdown(loop: asyncio.AbstractEventLoop, nc: Any) -> None:
    loop.run_until_complete(nc.close())
    tasks = asyncio.all_tasks(loop)
    for t in tasks:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()


class NatsProducer:
    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.nc = _connect(self.loop, address)
        self.js = self.nc.jetstream(publish_async_max_pending=MAX_PENDING, timeout=30)
        self.subjects = [f"{topic}.{p}" for p in range(wl.partitions)]
        self.batch_records = records_per_request(wl.record_size)
        self.rr = index
        self.inflight: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def _send(self, values: Sequence[bytes], keys: Sequence[bytes] | None) -> None:
        publish = self.js.publish_async
        append = self.inflight.append
        if keys is None:
            subject = self.subjects[self.rr % len(self.subjects)]
            self.rr += 1
            for v in values:
                append(await publish(subject, v))
        else:
            n = len(self.subjects)
            for v, k in zip(values, keys, strict=True):
                append(await publish(self.subjects[partition_of(k, n, 0)], v))
        self._check()

    def _check(self) -> None:
        q = self.inflight
        while q and q[0].done():
            exc = q.popleft().exception()
            if exc is not None:
                raise RuntimeError(f"NATS publish failed: {exc!r}")

    def send(self, values: Sequence[bytes], keys: Sequence[bytes] | None) -> None:
        self.loop.run_until_complete(self._send(values, keys))

    def flush(self) -> None:
        self.loop.run_until_complete(asyncio.wait_for(self.js.publish_async_completed(), 60))
        self._check()
        if self.inflight:
            raise RuntimeError(f"NATS: {len(self.inflight)} publishes without an ack")

    def close(self) -> None:
        _shutdown(self.loop, self.nc)


class NatsPushConsumer:
    """Ordered push consumer: the callback buffers messages; poll() runs the loop until some arrive."""

    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        self.loop = asyncio.new_event_loop()
        self.nc = _connect(self.loop, address)
        self.js = self.nc.jetstream(timeout=30)
        self.batch = records_per_request(wl.record_size)
        self.buf: list[Any] = []
        self.event = asyncio.Event()

        async def on_message(msg: Any) -> None:
            self.buf.append(msg)
            self.event.set()

        self.sub = self.loop.run_until_complete(
            self.js.subscribe(
                f"{topic}.*",
                stream=topic,
                ordered_consumer=True,
                cb=on_message,
                pending_msgs_limit=1 << 20,
                pending_bytes_limit=1 << 30,
            )
        )

    async def _collect(self, timeout_s: float) -> None:
        if not self.buf:
            self.event.clear()
            try:
                await asyncio.wait_for(self.event.wait(), timeout_s)
            except TimeoutError:
                return
        n = -1
        while len(self.buf) != n and len(self.buf) < self.batch:  # go on while messages keep coming
            n = len(self.buf)
            await asyncio.sleep(0)

    def poll(self, timeout_s: float) -> Sequence[Any]:
        self.loop.run_until_complete(self._collect(timeout_s))
        out, self.buf = self.buf, []
        return out

    def value(self, record: Any) -> bytes:
        return record.data

    def close(self) -> None:
        _shutdown(self.loop, self.nc)


class NatsConsumer:
    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        import nats.errors

        self.timeout_error = nats.errors.TimeoutError
        self.loop = asyncio.new_event_loop()
        self.nc = _connect(self.loop, address)
        self.js = self.nc.jetstream(timeout=30)
        self.sub = self.loop.run_until_complete(self.js.pull_subscribe_bind(durable=DURABLE, stream=topic))
        self.batch = records_per_request(wl.record_size)

    def poll(self, timeout_s: float) -> Sequence[Any]:
        try:
            return self.loop.run_until_complete(self.sub.fetch(batch=self.batch, timeout=timeout_s))
        except (TimeoutError, self.timeout_error):
            return []

    def value(self, record: Any) -> bytes:
        return record.data

    def ack(self, records: Sequence[Any]) -> None:
        """Queue workloads: one explicit ack per message (each a publish to its reply subject)."""

        async def ack_all() -> None:
            for m in records:
                await m.ack()

        self.loop.run_until_complete(ack_all())

    def finish(self) -> int | None:
        self.loop.run_until_complete(self.nc.flush(timeout=30))  # the server has read every ack
        return None  # JetStream does not confirm a plain ack (ack_sync would: a round trip each)

    def close(self) -> None:
        _shutdown(self.loop, self.nc)


class NatsDriver(Driver):
    name = "nats"
    title = "NATS JetStream"
    binaries = (("nats-server", "nats-server"),)
    modules = (("nats", "nats-py"),)

    def start(self, workdir: Path, wl: Workload, stack: ExitStack) -> Server:
        port = free_port()
        store = workdir / "nats"
        store.mkdir(parents=True, exist_ok=True)
        conf = workdir / "nats.conf"
        conf.write_text(
            f'listen: "127.0.0.1:{port}"\n'
            "max_payload: 1048576\n"
            f'jetstream {{\n  store_dir: "{store}"\n  max_memory_store: 1GB\n}}\n'
        )
        proc = ServerProcess("nats-server", [exe_path("nats-server"), "-c", str(conf)], workdir / "nats.log")
        stack.callback(proc.stop)
        address = f"127.0.0.1:{port}"

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                return s.recv(4) == b"INFO"

        proc.wait_until(ready, 15, "accepting connections")
        return Server(address, [proc])

    def create_topic(self, server: Server, topic: str, wl: Workload) -> None:
        from nats.js.api import (
            AckPolicy,
            ConsumerConfig,
            DeliverPolicy,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )

        queue = wl.requires == "queues"  # a work queue: acked messages leave the stream

        async def create() -> None:
            import nats

            nc = await nats.connect(f"nats://{server.address}", connect_timeout=5, allow_reconnect=False)
            try:
                js = nc.jetstream(timeout=30)
                for attempt in range(50):  # JetStream may still be starting up
                    try:
                        await js.add_stream(
                            StreamConfig(
                                name=topic,
                                subjects=[f"{topic}.*"],
                                storage=StorageType.FILE,
                                num_replicas=wl.replication_factor,
                                retention=RetentionPolicy.WORK_QUEUE if queue else None,  # None: the server default, limits
                            )
                        )
                        break
                    except Exception:
                        if attempt == 49:
                            raise
                        await asyncio.sleep(0.1)
                await js.add_consumer(
                    topic,
                    ConsumerConfig(
                        durable_name=DURABLE,
                        ack_policy=AckPolicy.EXPLICIT if queue else AckPolicy.NONE,
                        deliver_policy=DeliverPolicy.ALL,
                        max_waiting=512,
                        max_ack_pending=int(wl.option(self.name, "max_ack_pending", 20_000)) if queue else None,
                    ),
                )
            finally:
                await nc.close()

        asyncio.run(create())

    def unacked(self, server: Server, topic: str, wl: Workload) -> int | None:
        """A work-queue stream keeps exactly the messages not yet acknowledged."""

        async def count() -> int:
            import nats

            nc = await nats.connect(f"nats://{server.address}", connect_timeout=5, allow_reconnect=False)
            try:
                info = await nc.jetstream(timeout=30).stream_info(topic)
                return int(info.state.messages)
            finally:
                await nc.close()

        return asyncio.run(count())

    def producer(self, address: str, topic: str, wl: Workload, index: int) -> NatsProducer:
        return NatsProducer(address, topic, wl, index)

    def consumer(self, address: str, topic: str, wl: Workload, index: int) -> NatsConsumer | NatsPushConsumer:
        if wl.consumers == 1 and wl.option(self.name, "consumer", "push") == "push":
            return NatsPushConsumer(address, topic, wl, index)
        return NatsConsumer(address, topic, wl, index)

    def version(self) -> str:
        out = subprocess.run(
            [exe_path("nats-server"), "--version"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip()
