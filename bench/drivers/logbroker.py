"""logbroker: `python -m logbroker serve` (standalone) and its own client (Producer, Consumer, Admin).

Client settings come from the workload's `[options.logbroker]` table: `producer = {...}` and
`consumer = {...}` are passed to `logbroker.Producer` / `logbroker.Consumer` as keyword arguments.

Queue workloads (`requires = "queues"`, queue-ack): the backlog goes in with the usual Producer, and each
consumer process is a `QueueConsumer` of the share group `bench` (`auto_offset_reset="earliest"`,
`[options.logbroker] queue_consumer = {...}` for `lock_ms` and the like) that acks every message. Where
`from logbroker import QueueConsumer` fails, `unsupported` says so and logbroker alone is skipped.

`preload` (consume-5gb) fills the log the fastest way there is: one RecordBatch v2 of 100-byte
records built once with the client's own `BatchBuilder`, then sent again and again with raw gRPC
`Produce` calls (several in flight). The broker assigns offsets by patching baseOffset, which sits
outside the CRC, so every resend is a valid batch; the consumer then reads ordinary records. This is
only the setup of a consume test, and it is labelled as such in the results.

`logbroker-tls` (`LogbrokerTlsDriver`) is the same broker and clients over TLS with mTLS required
(`--tls-cert`, `--tls-key`, `--tls-client-ca`, `--tls-client-auth required`; a CA and the
certificates made with trustme in the run's directory), so a workload listing both shows what TLS
costs. Its worker processes find the client certificate through `BENCH_LOGBROKER_TLS_DIR`, set by
`start()` before they are spawned.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.cluster import LogbrokerCluster, health_serving, zookeeper_missing
from bench.drivers.base import Driver, Server, records_per_request
from bench.procs import ServerProcess, free_port
from bench.workload import Workload

TLS_DIR_ENV = "BENCH_LOGBROKER_TLS_DIR"  # logbroker-tls: where start() wrote the CA and certificates
PRELOAD_BATCH_BYTES = 1_000_000  # under the default max_message_bytes (1 MiB)
PRELOAD_IN_FLIGHT = 4
QUEUE_GROUP = "bench"  # the share group of a queue workload
LOGBROKER_ROOT = Path(__file__).resolve().parents[2]


def _acks(wl: Workload) -> int | str:
    return "all" if wl.acks == "all" else int(wl.acks)


class LogbrokerProducer:
    """Each batch of values goes to the client in one `Producer.send_many` call, as the Redis driver
    hands its batch to one pipeline; batches are as large as Redis's (`records_per_request`)."""

    def __init__(self, address: str, topic: str, wl: Workload, index: int, tls: Any = None) -> None:
        import logbroker

        settings = {"linger_ms": 5, "batch_size_bytes": 1 << 20, **wl.option("logbroker", "producer", {})}
        self.p = logbroker.Producer(address, acks=_acks(wl), tls=tls, **settings)
        self.topic = topic
        self.batch_records = records_per_request(wl.record_size)
        self.pending: deque[Any] = deque()  # send_many futures not yet seen done, oldest first
        self.error: BaseException | None = None

    def send(self, values: Sequence[bytes], keys: Sequence[bytes] | None) -> None:
        pending = self.pending
        pending.append(self.p.send_many(self.topic, values, keys))
        while pending[0].done():  # keep the backlog of futures short; remember the first failure
            error = pending.popleft().exception()
            if error is not None and self.error is None:
                self.error = error
            if not pending:
                break

    def flush(self) -> None:
        self.p.flush(60)
        while self.pending:  # exception(), not result(): no metadata is built that nobody reads
            error = self.pending.popleft().exception(60)
            if error is not None and self.error is None:
                self.error = error
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.p.close(10)


class LogbrokerConsumer:
    """One consumer; in a group workload one member of the group `bench` (subscribed to the topic, the
    coordinator assigns its partitions; auto-commit and close() committing and leaving as for any user)."""

    def __init__(self, address: str, topic: str, wl: Workload, index: int, tls: Any = None) -> None:
        import logbroker

        settings = {"max_poll_records": 10_000, **wl.option("logbroker", "consumer", {})}
        self.group = "bench" if wl.requires == "groups" else None
        if wl.filter:  # filtered-consume: a group member, a fresh group per pass (one process each)
            settings["filter"] = wl.filter
            self.group = f"bench-filtered-{os.getpid()}"
        self.c = logbroker.Consumer(
            address, topics=[topic], group=self.group, auto_offset_reset="earliest", tls=tls, **settings
        )

    def poll(self, timeout_s: float) -> Sequence[Any]:
        return self.c.poll(timeout_ms=int(timeout_s * 1000))

    def assignment(self) -> list[tuple[str, int]]:
        """The partitions this member owns now (worker.settle waits for the group to share them out)."""
        return sorted(self.c.assignment()) if self.group is not None else []

    def value(self, record: Any) -> bytes:
        return record.value

    def close(self) -> None:
        self.c.close()


class LogbrokerQueueConsumer:
    """Queue workloads: one member of the share group `bench` (`QueueConsumer`, earliest), every message
    acked with `message.ack()`; the acks ride on the next poll, and `finish()` is `commit_acks()`."""

    def __init__(self, address: str, topic: str, wl: Workload, index: int) -> None:
        from logbroker import QueueConsumer

        settings = {"lock_ms": 30_000, **wl.option("logbroker", "queue_consumer", {})}
        self.c = QueueConsumer(
            address, group=QUEUE_GROUP, topics=[topic], auto_offset_reset="earliest", **settings
        )

    def poll(self, timeout_s: float) -> Sequence[Any]:
        return list(self.c.poll(timeout_ms=int(timeout_s * 1000)))

    def value(self, record: Any) -> bytes:
        return bytes(record.value)

    def ack(self, records: Sequence[Any]) -> None:
        for m in records:
            m.ack()

    def finish(self) -> int | None:
        """Send the acks still pending (`commit_acks()`). None: most acks rode on polls, whose answers
        the client does not count; that all were settled is checked afterwards by `unacked`."""
        self.c.commit_acks()
        return None

    def close(self) -> None:
        self.c.close()


def queue_consumer_missing() -> str | None:
    """Why logbroker cannot run a queue workload here (QueueConsumer not in this client), or None."""
    try:
        from logbroker import QueueConsumer  # noqa: F401
    except Exception as exc:
        return f"`from logbroker import QueueConsumer` failed ({exc.__class__.__name__}): share groups are not in this build"
    return None


class LogbrokerDriver(Driver):
    name = "logbroker"
    title = "logbroker"
    modules = (("grpc_health", "grpcio-health-checking"),)

    def missing(self) -> str | None:
        reason = super().missing()
        if reason:
            return reason
        try:
            import logbroker

            logbroker.Producer  # noqa: B018 - the import is the check
            logbroker.Consumer  # noqa: B018
            logbroker.Admin  # noqa: B018
        except Exception as exc:
            return f"the logbroker client does not import yet ({exc!r})"
        return None

    def unsupported(self, wl: Workload) -> str | None:
        if wl.requires == "cluster" or wl.brokers > 1:
            return zookeeper_missing()
        if wl.requires == "queues":
            return queue_consumer_missing()
        return None

    def client_tls(self) -> Any:
        """The clients' TlsConfig (None: plaintext)."""
        return None

    def server_args(self, workdir: Path) -> list[str]:
        """Extra `serve` flags (logbroker-tls: its certificates)."""
        return []

    def serving(self, address: str) -> bool:
        return health_serving(address)

    def start(self, workdir: Path, wl: Workload, stack: ExitStack) -> Server:
        if wl.brokers > 1:
            cluster = LogbrokerCluster(workdir, wl.brokers, wl.zk_session_timeout_ms)
            stack.callback(cluster.stop)
            cluster.start()
            return Server(cluster.bootstrap, cluster.processes, {"cluster": cluster})
        port = free_port()
        address = f"127.0.0.1:{port}"
        argv = [
            sys.executable, "-m", "logbroker", "serve", "--data-dir", str(workdir / "data"),
            "--listen", address, "--log-level", "warning", *self.server_args(workdir),
            # /metrics is on by default, as in production, on a port of its own;
            # `[options.logbroker] metrics = false` turns it off (max-100b-metrics-off: its cost)
            "--metrics-listen", f"127.0.0.1:{free_port()}" if wl.option(self.name, "metrics", True) else "off",
        ]  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(LOGBROKER_ROOT), os.environ.get("PYTHONPATH")])),
        }
        proc = ServerProcess("logbroker", argv, workdir / "logbroker.log", env=env)
        stack.callback(proc.stop)
        proc.wait_until(lambda: self.serving(address), 30, "SERVING on the gRPC health service")
        return Server(address, [proc])

    def create_topic(self, server: Server, topic: str, wl: Workload) -> None:
        import logbroker

        config = {"min_insync_replicas": str(wl.min_insync_replicas)} if wl.replication_factor > 1 else {}
        config.update({k: str(v) for k, v in wl.option("logbroker", "topic", {}).items()})
        admin = logbroker.Admin(server.address, tls=self.client_tls())
        try:
            admin.create_topic(
                topic, partitions=wl.partitions, replication_factor=wl.replication_factor, config=config
            )
        finally:
            admin.close()
        cluster: LogbrokerCluster | None = server.extra.get("cluster")
        if cluster is not None:  # measure a cluster in its steady state: every replica in sync
            cluster.wait_fully_replicated(topic, wl.partitions, wl.replication_factor)

    def unacked(self, server: Server, topic: str, wl: Workload) -> int | None:
        """The share group's unsettled records of `topic`: those in its window (`in_flight`) and those
        not read into it yet (the log end as the coordinator last saw it, when it has seen one)."""
        import logbroker
        from logbroker.errors import GroupIdNotFoundError

        admin = logbroker.Admin(server.address, tls=self.client_tls())
        try:
            desc = admin.describe_share_group(QUEUE_GROUP)
        except GroupIdNotFoundError:
            return None
        finally:
            admin.close()
        parts = [p for p in desc["partitions"] if p["topic"] == topic]
        return sum(p["in_flight"] + max(0, p["log_end_offset"] - p["end_offset"]) for p in parts)

    def producer(self, address: str, topic: str, wl: Workload, index: int) -> LogbrokerProducer:
        return LogbrokerProducer(address, topic, wl, index, self.client_tls())

    def consumer(
        self, address: str, topic: str, wl: Workload, index: int
    ) -> LogbrokerConsumer | LogbrokerQueueConsumer:
        if wl.requires == "queues":
            return LogbrokerQueueConsumer(address, topic, wl, index)
        return LogbrokerConsumer(address, topic, wl, index, self.client_tls())

    def preload(self, server: Server, topic: str, wl: Workload, progress: Any) -> dict[str, Any] | None:
        import grpc

        from bench.worker import payload
        from logbroker.storage.record_batch import BatchBuilder
        from logbroker.v1 import logbroker_pb2 as pb
        from logbroker.v1 import logbroker_pb2_grpc as pb_grpc

        value = payload(wl.record_size)
        now_ms = int(time.time() * 1000)
        builder = BatchBuilder(now_ms)
        matching = 0
        while builder.size_bytes + wl.record_size + 40 < PRELOAD_BATCH_BYTES:
            if wl.match_every:  # filtered-consume: one record in match_every is an invoice
                match = builder.record_count % wl.match_every == 0
                matching += match
                builder.append(now_ms, None, value, [("type", b"invoice" if match else b"receipt")])
            else:
                builder.append(now_ms, None, value)
        batch = builder.build()
        per_batch = builder.record_count
        target = max(1, wl.preload_bytes // wl.record_size)
        n_requests = -(-target // per_batch)
        requests = [
            pb.ProduceRequest(
                acks=1,
                timeout_ms=30_000,
                partitions=[pb.ProducePartition(topic=topic, partition=p, records=batch)],
            )
            for p in range(wl.partitions)
        ]
        t0 = time.monotonic()
        deadline = t0 + wl.consume_time_limit_s
        sent = 0
        with grpc.insecure_channel(
            server.address, options=[("grpc.max_send_message_length", 64 << 20)]
        ) as channel:
            produce = pb_grpc.BrokerStub(channel).Produce
            inflight: deque[Any] = deque()

            def settle(call: Any) -> None:
                for r in call.result(timeout=60).results:
                    if r.error_code != 0:
                        raise RuntimeError(
                            f"preload Produce failed: {pb.ErrorCode.Name(r.error_code)} {r.error_message}"
                        )

            for i in range(n_requests):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"preload did not finish within {wl.consume_time_limit_s:.0f} s")
                inflight.append(produce.future(requests[i % len(requests)], timeout=60))
                sent += 1
                if len(inflight) >= PRELOAD_IN_FLIGHT:
                    settle(inflight.popleft())
                if i % 16 == 0:
                    progress.update((i + 1) / n_requests, (i + 1) * per_batch, "preload")
            while inflight:
                settle(inflight.popleft())
        seconds = time.monotonic() - t0
        records = sent * per_batch
        return {
            "records": records,
            "total_records": records,
            "matching_records": sent * matching if wl.match_every else records,
            "seconds": seconds,
            "records_per_s": records / seconds,
            "mb_per_s": records * wl.record_size / 1e6 / seconds,
            "path": f"raw gRPC Produce, one {len(batch):,}-byte batch of {per_batch:,} records resent",
        }

    def version(self) -> str:
        try:
            import logbroker

            return f"logbroker {logbroker.__version__}"
        except Exception:
            return "logbroker"


class LogbrokerTlsDriver(LogbrokerDriver):
    """logbroker with TLS on every listener and client certificates required (see the module doc)."""

    name = "logbroker-tls"
    title = "logbroker (TLS, mTLS)"

    def missing(self) -> str | None:
        try:
            import trustme  # noqa: F401
        except ImportError:
            return "trustme is not installed (pip install trustme): it makes the run's certificates"
        return super().missing()

    def unsupported(self, wl: Workload) -> str | None:
        if wl.brokers > 1 or wl.requires == "queues" or wl.preload_bytes:
            return "logbroker-tls runs the plain produce/consume workloads (max-100b, max-100kb) only"
        return super().unsupported(wl)

    def server_args(self, workdir: Path) -> list[str]:
        import trustme

        pki = workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(pki / "ca.pem"))
        for name, identities in (("broker", ("127.0.0.1", "localhost")), ("client", ("bench-client",))):
            leaf = ca.issue_cert(*identities, common_name=name)
            leaf.cert_chain_pems[0].write_to_path(str(pki / f"{name}.pem"))
            leaf.private_key_pem.write_to_path(str(pki / f"{name}.key"))
        os.environ[TLS_DIR_ENV] = str(pki)  # inherited by the worker processes spawned after this
        return ["--tls-cert", str(pki / "broker.pem"), "--tls-key", str(pki / "broker.key"),
                "--tls-client-ca", str(pki / "ca.pem"), "--tls-client-auth", "required"]

    def client_tls(self) -> Any:
        from logbroker.tls import TlsConfig

        pki = Path(os.environ[TLS_DIR_ENV])
        return TlsConfig(str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))

    def serving(self, address: str) -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.secure_channel(address, self.client_tls().channel_credentials()) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
