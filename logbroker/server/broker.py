"""The broker's composition root: metadata store, logs, partitions, the gRPC server and its lifecycle.

Lifecycle::

    created --start()--> RECOVERING --logs recovered--> SERVING --stop()/SIGTERM--> STOPPING --> stopped

While RECOVERING the gRPC server is already up but the health service says NOT_SERVING and every
data call is refused with UNAVAILABLE. All partition state is owned by one asyncio loop; recovery
runs in a thread before the loop touches any of it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from logbroker.clock import SYSTEM_CLOCK, Clock
from logbroker.cluster.local_store import LocalMetadataStore, MetadataStore
from logbroker.cluster.metadata import (
    PARTITIONS_MAX,
    TopicSpec,
    normalize_topic_config,
    validate_topic_name,
)
from logbroker.config import BrokerConfig
from logbroker.errors import (
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from logbroker.replication.partition import Partition
from logbroker.replication.purgatory import Purgatory
from logbroker.server import admin_service, broker_service
from logbroker.storage.log import LogConfig
from logbroker.storage.log_manager import LogManager

log = logging.getLogger(__name__)

SERVICE_NAMES = ("logbroker.v1.Broker", "logbroker.v1.Admin")


class Broker:
    def __init__(self, config: BrokerConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        self.partitions: dict[tuple[str, int], Partition] = {}
        self.topics: dict[str, TopicSpec] = {}
        self.purgatory = Purgatory()
        self.ready = False
        self.bound_port = 0
        self._store: MetadataStore | None = None
        self._log_manager = LogManager(Path(config.data_dir), LogConfig())
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._stopped = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", cfg.max_response_bytes),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=1000,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers((broker_service.handler(self), admin_service.handler(self)))
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        port = server.add_insecure_port(f"{cfg.listen_host}:{cfg.listen_port}")
        if port == 0:
            raise OSError(f"cannot listen on {cfg.listen_host}:{cfg.listen_port}")
        self.bound_port = port
        await server.start()
        self._server = server
        log.info("broker %d listening on %s:%d, recovering logs in %s", cfg.broker_id, cfg.listen_host, port, cfg.data_dir)
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, self._recover)
        self.ready = True
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "broker %d serving: %d topics, %d partitions recovered in %.2f s",
            cfg.broker_id, len(self.topics), len(self.partitions), time.monotonic() - started,
        )
        self._tasks.append(asyncio.create_task(self._retention_loop()))

    def _recover(self) -> None:
        Path(self.config.data_dir).mkdir(parents=True, exist_ok=True)
        self._store = LocalMetadataStore(Path(self.config.data_dir))
        logs = self._log_manager.load_all()
        for log_ in logs.values():
            for report in getattr(log_, "recovery_reports", []):
                log.warning("recovery: %s", report)
        topics = self._store.list_topics()
        for name, spec in topics.items():
            log_config = LogConfig.from_topic_config(spec.config)
            for p in spec.assignment:
                plog = logs.pop((name, p), None)
                if plog is None:
                    plog = self._log_manager.create_log(name, p, log_config)
                self.partitions[(name, p)] = Partition(name, p, plog, self.config.broker_id)
        for (name, p) in logs:
            log.warning("deleting log of %s-%d: its topic no longer exists", name, p)
            self._log_manager.delete_log(name, p)
        self.topics = topics

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("broker %d shutting down", self.config.broker_id)
        self.ready = False
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            for task in self._tasks:
                task.cancel()
            self.purgatory.notify_all()
            if self._server is not None:
                await self._server.stop(self.config.shutdown_grace_s)
            self._log_manager.close_all()
            if self._store is not None:
                self._store.close()
            log.info("broker %d stopped cleanly", self.config.broker_id)
        except Exception:
            log.exception("broker %d: error during shutdown (logs will be recovered on restart)",
                          self.config.broker_id)
        finally:
            self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _retention_loop(self) -> None:
        interval_s = self.config.retention_check_interval_ms / 1000
        while True:
            await asyncio.sleep(interval_s)
            try:
                deleted = self._log_manager.enforce_retention(self.clock.now_ms())
                if deleted:
                    log.info("retention deleted %d segments", deleted)
            except Exception:
                log.exception("retention check failed")

    # -- state used by the services ---------------------------------------------------------------

    @property
    def store(self) -> MetadataStore:
        assert self._store is not None, "store used before recovery"
        return self._store

    def partition(self, topic: str, index: int) -> Partition:
        p = self.partitions.get((topic, index))
        if p is None:
            if topic not in self.topics:
                raise UnknownTopicOrPartitionError(f"unknown topic {topic!r}")
            raise UnknownTopicOrPartitionError(
                f"topic {topic!r} has no partition {index} (it has {self.topics[topic].partition_count})"
            )
        return p

    def create_topic(self, name: str, partitions: int, replication_factor: int, config: dict[str, str],
                     validate_only: bool = False) -> None:
        validate_topic_name(name)
        if not 1 <= partitions <= PARTITIONS_MAX:
            raise InvalidPartitionsError(f"partitions must be in [1, {PARTITIONS_MAX}], got {partitions}")
        rf = replication_factor or 1
        if rf != 1:
            raise InvalidReplicationFactorError(
                f"replication factor {rf} is larger than the 1 broker available (standalone)"
            )
        full_config = normalize_topic_config({**self.config.default_topic_config, **config})
        if name in self.topics:
            raise TopicAlreadyExistsError(f"topic {name!r} already exists")
        if validate_only:
            return
        spec = TopicSpec(name, {p: [self.config.broker_id] for p in range(partitions)}, full_config)
        log_config = LogConfig.from_topic_config(full_config)
        created: list[int] = []
        try:
            for p in range(partitions):
                plog = self._log_manager.create_log(name, p, log_config)
                created.append(p)
                self.partitions[(name, p)] = Partition(name, p, plog, self.config.broker_id)
            self.store.create_topic(spec)
        except BaseException:
            for p in created:
                self.partitions.pop((name, p), None)
                self._log_manager.delete_log(name, p)
            raise
        self.topics[name] = spec
        log.info("created topic %s with %d partitions", name, partitions)

    def delete_topic(self, name: str) -> None:
        validate_topic_name(name)
        spec = self.topics.get(name)
        if spec is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        self.store.delete_topic(name)
        del self.topics[name]
        for p in spec.assignment:
            self.partitions.pop((name, p), None)
            self._log_manager.delete_log(name, p)
            self.purgatory.notify((name, p))
        log.info("deleted topic %s", name)

    def create_partitions(self, name: str, total: int) -> None:
        validate_topic_name(name)
        spec = self.topics.get(name)
        if spec is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        current = spec.partition_count
        if total <= current:
            raise InvalidPartitionsError(f"topic {name!r} has {current} partitions; the new total must be larger")
        if total > PARTITIONS_MAX:
            raise InvalidPartitionsError(f"at most {PARTITIONS_MAX} partitions")
        log_config = LogConfig.from_topic_config(spec.config)
        assignment = dict(spec.assignment)
        for p in range(current, total):
            plog = self._log_manager.create_log(name, p, log_config)
            self.partitions[(name, p)] = Partition(name, p, plog, self.config.broker_id)
            assignment[p] = [self.config.broker_id]
        self.store.set_assignment(name, assignment)
        spec.assignment = assignment
        log.info("topic %s grew from %d to %d partitions", name, current, total)
