"""RabbitMQ: Debian's `rabbitmq-server`, started privately by the harness; client pika.

Only the queue workload (`requires = "queues"`) runs here: a topic is one durable classic queue named
after it. Produce: persistent messages (delivery_mode 2) through the default exchange with pika's
BlockingConnection; `flush()` waits until the queue counts every message sent (publisher confirms
would make each blocking publish a round trip: the backlog is the set-up, not a figure). Consume:
`basic_qos(prefetch_count)` and `basic_consume` with manual acks; each delivery gets its own
`basic_ack` (never `multiple=True`).

The server is the harness's own, never the system service Debian's package may start: a private
`epmd` on a free port (ERL_EPMD_PORT, bound to 127.0.0.1) that the harness starts and stops, then
`/usr/lib/rabbitmq/bin/rabbitmq-server` (the script the `rabbitmq-server` wrapper runs, without its
switch to the `rabbitmq` user) with HOME (the Erlang cookie), the node name, the AMQP and
distribution ports, the Mnesia base, logs, the config and the enabled-plugins file all in the run's
temporary directory. Ready when an AMQP connection opens.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.drivers.base import Driver, Server
from bench.procs import ServerProcess, free_port
from bench.workload import Workload

SERVER_SCRIPT = "/usr/lib/rabbitmq/bin/rabbitmq-server"
PREFETCH = 1000  # per consumer; `[options.rabbitmq] prefetch = N`
PUBLISH_BATCH = 1000  # values per send() (each a basic_publish; pika writes them as they come)


def _params(address: str) -> Any:
    import pika

    host, port = address.rsplit(":", 1)
    return pika.ConnectionParameters(
        host=host, port=int(port), heartbeat=0, blocked_connection_timeout=60, connection_attempts=1
    )


def _queue_depth(channel: Any, queue: str) -> int:
    """Messages ready in the queue (not those delivered and unacknowledged), by a passive declare."""
    return int(channel.queue_declare(queue=queue, passive=True).method.message_count)


class RabbitProducer:
    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        import pika

        self.conn = pika.BlockingConnection(_params(address))
        self.ch = self.conn.channel()
        self.queue = topic
        self.props = pika.BasicProperties(delivery_mode=2)  # persistent
        self.batch_records = PUBLISH_BATCH
        self.sent = 0
        self.depth_at_start = _queue_depth(self.ch, topic)

    def send(self, values: Sequence[bytes], keys: Sequence[bytes] | None) -> None:
        publish, queue, props = self.ch.basic_publish, self.queue, self.props
        for v in values:
            publish(exchange="", routing_key=queue, body=v, properties=props)
        self.sent += len(values)

    def flush(self) -> None:
        """The queue holds everything sent (one producer, nobody consuming while it runs)."""
        deadline = time.monotonic() + 60
        while _queue_depth(self.ch, self.queue) < self.depth_at_start + self.sent:
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ: {self.sent:,} published, the queue does not hold them after 60 s")
            self.conn.sleep(0.005)

    def close(self) -> None:
        self.conn.close()


class RabbitConsumer:
    """A basic_consume subscription; deliveries are buffered by the callback, poll() runs the I/O loop."""

    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        import pika

        self.conn = pika.BlockingConnection(_params(address))
        self.ch = self.conn.channel()
        self.ch.basic_qos(prefetch_count=int(wl.option("rabbitmq", "prefetch", PREFETCH)))
        self.buf: list[tuple[int, bytes]] = []

        def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
            self.buf.append((method.delivery_tag, body))

        self.ch.basic_consume(queue=topic, on_message_callback=on_message, auto_ack=False)

    def poll(self, timeout_s: float) -> Sequence[Any]:
        if not self.buf:
            self.conn.process_data_events(time_limit=timeout_s)
        n = -1
        while len(self.buf) != n:  # take what has already arrived
            n = len(self.buf)
            self.conn.process_data_events(time_limit=0)
        out, self.buf = self.buf, []
        return out

    def value(self, record: Any) -> bytes:
        return bytes(record[1])

    def ack(self, records: Sequence[Any]) -> None:
        basic_ack = self.ch.basic_ack
        for tag, _ in records:
            basic_ack(delivery_tag=tag, multiple=False)

    def finish(self) -> int | None:
        self.conn.process_data_events(time_limit=0)  # AMQP does not confirm acks
        return None

    def close(self) -> None:
        self.conn.close()


class RabbitmqDriver(Driver):
    name = "rabbitmq"
    title = "RabbitMQ"
    binaries = (("rabbitmq-server", "rabbitmq-server"), ("epmd", "erlang-base"))
    modules = (("pika", "pika"),)

    def missing(self) -> str | None:
        if not Path(SERVER_SCRIPT).exists():
            return f"`{SERVER_SCRIPT}` not found: install it with `apt-get install -y rabbitmq-server`"
        return super().missing()

    def unsupported(self, wl: Workload) -> str | None:
        if wl.requires not in ("queues", "request-reply"):
            return "RabbitMQ: only the queue workloads (requires = \"queues\") are set up for it"
        return super().unsupported(wl)

    def start(self, workdir: Path, wl: Workload, stack: ExitStack) -> Server:
        home = workdir / "rabbitmq"
        home.mkdir(parents=True, exist_ok=True)
        (home / "enabled_plugins").write_text("[].\n")
        (home / "rabbitmq.conf").write_text("")
        (home / "rabbitmq-env.conf").write_text("")
        (home / ".erlang.cookie").write_text(uuid.uuid4().hex)
        (home / ".erlang.cookie").chmod(0o400)
        epmd_port, amqp_port, dist_port = free_port(), free_port(), free_port()
        env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(home),
            "ERL_EPMD_PORT": str(epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODENAME": f"bench-{uuid.uuid4().hex[:8]}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(amqp_port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(home / "mnesia"),
            "RABBITMQ_LOG_BASE": str(home / "log"),
            "RABBITMQ_LOGS": "-",
            "RABBITMQ_CONFIG_FILE": str(home / "rabbitmq"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(home / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(home / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(home / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(home / "plugins-expand"),
            "RABBITMQ_PID_FILE": str(home / "rabbitmq.pid"),
        }
        epmd = ServerProcess("epmd", ["epmd", "-port", str(epmd_port)], workdir / "epmd.log", env=env)
        stack.callback(epmd.stop)  # registered first: stopped after the node
        proc = ServerProcess("rabbitmq", [SERVER_SCRIPT], workdir / "rabbitmq.log", env=env)
        stack.callback(proc.stop, 30.0)
        address = f"127.0.0.1:{amqp_port}"

        def ready() -> bool:
            import pika

            pika.BlockingConnection(_params(address)).close()
            return True

        proc.wait_until(ready, 60, "accepting AMQP connections")
        return Server(address, [proc, epmd])

    def create_topic(self, server: Server, topic: str, wl: Workload) -> None:
        import pika

        conn = pika.BlockingConnection(_params(server.address))
        try:
            conn.channel().queue_declare(queue=topic, durable=True)
        finally:
            conn.close()

    def unacked(self, server: Server, topic: str, wl: Workload) -> int | None:
        import pika

        conn = pika.BlockingConnection(_params(server.address))
        try:
            return _queue_depth(conn.channel(), topic)
        finally:
            conn.close()

    def producer(self, address: str, topic: str, wl: Workload, index: int) -> RabbitProducer:
        return RabbitProducer(address, topic, wl, index)

    def consumer(self, address: str, topic: str, wl: Workload, index: int) -> RabbitConsumer:
        return RabbitConsumer(address, topic, wl, index)

    def version(self) -> str:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"], capture_output=True, text=True, timeout=10
        )
        return f"RabbitMQ {out.stdout.strip()}" if out.returncode == 0 else "RabbitMQ"
