"""The broker's composition root: metadata store, logs, partitions, the gRPC server and its lifecycle.

Lifecycle::

    created --start()--> RECOVERING --logs recovered--> SERVING --stop()/SIGTERM--> STOPPING --> stopped

While RECOVERING the gRPC server is already up but the health service says NOT_SERVING and every
data call is refused with UNAVAILABLE. All partition state is owned by one asyncio loop; recovery
runs in a thread before the loop touches any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from logbroker.clock import SYSTEM_CLOCK, Clock, FileOffsetClock
from logbroker.cluster.controller import Controller
from logbroker.cluster.lineage import SPLITS_MAX, Split, parents_of
from logbroker.cluster.local_store import LocalMetadataStore, MetadataStore
from logbroker.cluster.metadata import (
    PARTITIONS_MAX,
    TOPIC_NAME_MAX_CHARS,
    TopicSpec,
    normalize_topic_config,
    validate_topic_name,
)
from logbroker.cluster.metadata_image import MetadataImage
from logbroker.cluster.priority_levels import (
    LEVEL_PREFIX,
    is_level_topic,
    level_topic,
    max_user_topic_chars,
    parse_level_topic,
    parse_levels,
)
from logbroker.cluster.producer_id_store import ProducerIdStore, ZkProducerIdStore
from logbroker.cluster.security_store import SecurityStore, ZkSecurityStore
from logbroker.config import BrokerConfig
from logbroker.errors import (
    InvalidConfigError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    InvalidRequestError,
    InvalidTopicError,
    NotLeaderOrFollowerError,
    TopicAlreadyExistsError,
    UnknownTopicOrPartitionError,
)
from logbroker.group.coordinator import GroupCoordinator
from logbroker.group.offsets import OFFSETS_TOPIC
from logbroker.group.share_coordinator import ShareCoordinator
from logbroker.group.share_data import ShareData
from logbroker.replication.fetcher import FetcherConfig
from logbroker.replication.partition import Partition
from logbroker.replication.replica_manager import CallableIsrStore, InMemoryIsrStore, IsrStore, ReplicaManager
from logbroker.replication.replica_throttle import REPLICATION_THROTTLE_BYTES_PER_SEC_MAX
from logbroker.replication.scrubber import Scrubber
from logbroker.security.acl import CLUSTER_NAME, Authorizer, Operation, ResourceType
from logbroker.security.quotas import QuotaManager
from logbroker.server import admin_service, broker_service, replica_service, rpc
from logbroker.server.acl_cache import AclCache
from logbroker.server.active_clients import ActiveClients
from logbroker.server.admission import Admission
from logbroker.server.apis.admin import AdminApis
from logbroker.server.apis.broker_apis import BrokerApis
from logbroker.server.apis.groups import GroupApis
from logbroker.server.apis.heat import HeatApis
from logbroker.server.apis.metadata import MetadataApis
from logbroker.server.apis.produce_fetch import ProduceFetchApis
from logbroker.server.apis.producer_ids import ProducerIdApis
from logbroker.server.apis.queues import QueueApis
from logbroker.server.apis.replies import ReplyApis
from logbroker.server.apis.security import SecurityApis
from logbroker.server.apis.throttling import ClientQuotas
from logbroker.server.authorization import AuthorizingHook
from logbroker.server.broker_channels import ReplyForwarding
from logbroker.server.broker_principals import broker_principals
from logbroker.server.cluster_member import ClusterMember
from logbroker.server.heat_sampling import SampleBudget
from logbroker.server.partition_heat import HeatTracker
from logbroker.server.quota_cache import QuotaCache
from logbroker.server.reply_registry import ReplyRegistry
from logbroker.server.request_context import RequestRejected, RequestStatus
from logbroker.server.request_log import RequestLog
from logbroker.server.request_metrics import RequestMetrics
from logbroker.server.sasl import SaslServer
from logbroker.server.wire_server import WireServer
from logbroker.storage.cleaner_checkpoint import FILE_NAME as CLEANER_CHECKPOINT_FILE
from logbroker.storage.data_dir_lock import DataDirLock
from logbroker.storage.log import LogConfig
from logbroker.storage.log_cleaner import LogCleaner
from logbroker.storage.log_identity import LostLogError
from logbroker.storage.log_manager import LogManager
from logbroker.tls import RELOAD_INTERVAL_S, CertFiles
from logbroker.v1 import logbroker_pb2 as pb

log = logging.getLogger(__name__)

SERVICE_NAMES = ("logbroker.v1.Broker", "logbroker.v1.Admin", "logbroker.v1.Replica")
FIRST_METADATA_WAIT_S = 30.0
# HTTP/2 keepalive of the broker's server: a ping after this long without traffic on a connection
# with calls open, the connection closed when unanswered for the timeout (its calls then end).
SERVER_KEEPALIVE_TIME_MS = 30_000
SERVER_KEEPALIVE_TIMEOUT_MS = 10_000
# The most often a client may ping without data before the server calls it abusive (default 5 min).
MIN_CLIENT_PING_INTERVAL_MS = 5_000
HIGH_WATERMARK_CHECKPOINT_INTERVAL_MS = 5_000  # as Kafka's default
# What one gRPC connection may hold before (and after) any call is authorized (issue 18 item 5):
# HTTP/2 streams open at once on it (a client's further calls wait for a free stream, they do not
# fail; logbroker's clients use a few per broker), the header block of a call (metadata: client id,
# the cluster secret; gRPC's own default is 8 KiB soft), and how long a connection without calls is
# kept (then a GOAWAY: the client reconnects on its next call; Kafka's connections.max.idle.ms).
# Server-wide: `maximum_concurrent_rpcs` (1000) calls; a request at most max_request_bytes.
GRPC_MAX_CONCURRENT_STREAMS = 256
GRPC_MAX_METADATA_BYTES = 16 << 10
GRPC_MAX_CONNECTION_IDLE_MS = 600_000


def check_listen_address(host: str, port: int, flag: str = "--listen") -> None:
    """Raise OSError naming host:port when it cannot be bound (in use, not a local address); port 0
    always binds. gRPC only says "Failed to bind", so serve would not tell a user why."""
    if port == 0:
        return
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: TIME_WAIT is no conflict
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"address {host}:{port} is already in use (another broker, or another program, "
                              f"listens there): choose another with {flag}") from None
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class Broker:
    """The composition root: builds the replica manager, the group coordinator, the cluster member
    and the request layer, and wires each with the narrow interfaces it names (the broker itself
    implements ClusterView / TopicCatalog, PartitionLookup, TopicAdmin, ListenerPorts and
    InterBrokerHost)."""

    def __init__(self, config: BrokerConfig, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.clock = clock
        self.topics: dict[str, TopicSpec] = {}
        self.ready = False
        self.bound_port = 0
        self.bound_data_port = 0  # the record transport's port (logbroker/wire.py); 0: none
        self.wire_server: WireServer | None = None
        self._store: MetadataStore | None = None
        # Before anything else touches the data directory: one broker per directory (data_dir_lock.py).
        self._data_dir_lock = DataDirLock(Path(config.data_dir))
        self._data_dir_lock.acquire()
        try:
            self._log_manager = LogManager(Path(config.data_dir), LogConfig())
            self.metadata_image = MetadataImage()
            # TLS (logbroker/tls.py): gRPC reads the files per handshake, the record transport's context
            # is reloaded by _tls_reload_loop; replica fetches present the broker's own certificate.
            self._cert_files = CertFiles(config.tls) if config.tls is not None else None
            self._wire_tls = self._cert_files.server_context() if self._cert_files is not None else None
            self.cluster: ClusterMember | None = (
                ClusterMember(config, self.metadata_image, self, self._drop_roles_on_session_lost, self._log_manager)
                if config.cluster_mode else None
            )
            isr_store: IsrStore = (
                CallableIsrStore(self.cluster.store.write_isr_as_leader) if self.cluster is not None else InMemoryIsrStore()
            )
            self.replica_manager = ReplicaManager(
                config.broker_id, self._log_manager, isr_store, clock,
                replica_lag_time_max_ms=config.replica_lag_time_max_ms,
                produce_timeout_ms_max=config.produce_timeout_ms_cap,
                cluster_secret=config.cluster_secret,
                fetcher_config=FetcherConfig(tls=config.tls.as_client()) if config.tls is not None else None,
            )
            if self.cluster is not None:
                self.replica_manager.offline_reporter = self.cluster.report_offline_replicas
            self.coordinator = GroupCoordinator(
                config.broker_id, self, self, self.replica_manager,
                self.cluster.channels if self.cluster is not None else None, config.coordinator, clock,
            )
            offset_file = os.environ.get(FileOffsetClock.ENV)  # tests only: time moved by a file's number
            self.share_coordinator = ShareCoordinator(
                self.coordinator,
                ShareData(self, self.replica_manager, self.cluster.channels if self.cluster is not None else None, self,
                          self.topic_config),
                FileOffsetClock(offset_file) if offset_file else clock,
            )
            self._security: SecurityStore | None = None  # opened by start()
            self._producer_ids: ProducerIdStore | None = None  # opened by the first InitProducerId
            # per topic, for /metrics (server/cluster_metrics.py); nothing counted when it is off
            self.active_clients = ActiveClients(clock) if config.metrics_enabled else None
            self.apis = self._build_apis(config)
            self.sasl: SaslServer | None = (SaslServer(config.sasl_mechanisms, self.security_store)
                                            if config.sasl_mechanisms else None)
            self.scrubber: Scrubber | None = (
                Scrubber(self.replica_manager, config.scrub_interval_ms, config.scrub_bytes_per_sec)
                if config.scrub_interval_ms > 0 else None
            )
            self.log_cleaner: LogCleaner | None = (
                LogCleaner(self._log_manager.logs, config.log_cleaner_interval_ms,
                           io_bytes_per_sec=config.log_cleaner_io_bytes_per_sec,
                           threads=config.log_cleaner_threads,
                           checkpoint_path=Path(config.data_dir) / CLEANER_CHECKPOINT_FILE,
                           topic_id_of=lambda plog: self._log_manager.registry.partition_metadata(plog.directory))
                if config.log_cleaner_interval_ms > 0 else None
            )
            self._server: grpc.aio.Server | None = None
            self._health = health.aio.HealthServicer()
            self._tasks: list[asyncio.Task[None]] = []
            self._stopping = False
            self._serving = False  # start() completed: only then can stop() say it stopped cleanly
            self._stopped = asyncio.Event()
            self.open_streams = rpc.OpenStreams()  # ended on stop: idle streams would hold it for the whole grace
        except BaseException:  # no broker to stop(): free the directory now, not when the fd is collected
            self._data_dir_lock.release()
            raise

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", cfg.max_request_bytes),
                ("grpc.max_send_message_length", cfg.max_response_bytes),
                ("grpc.so_reuseport", 0),
                # A client that vanished without a reset must not hold a stream (and an RPC slot) forever:
                # ping connections with calls open; accept the clients' own keepalive pings (every 10 s
                # from brokers, 60 s from clients; the default refuses more than one per 5 min without data).
                ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
                ("grpc.keepalive_timeout_ms", SERVER_KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
                ("grpc.max_concurrent_streams", GRPC_MAX_CONCURRENT_STREAMS),
                ("grpc.max_metadata_size", GRPC_MAX_METADATA_BYTES),
                ("grpc.max_connection_idle_ms", GRPC_MAX_CONNECTION_IDLE_MS),
            ],
            maximum_concurrent_rpcs=1000,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        server.add_generic_rpc_handlers(
            (broker_service.handler(self.apis, self.open_streams, self.sasl), admin_service.handler(self.apis, self.sasl),
             replica_service.handler(self, self.broker_principals))
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        check_listen_address(cfg.listen_host, cfg.listen_port)  # gRPC's own bind error names no cause
        try:
            port = (server.add_secure_port(f"{cfg.listen_host}:{cfg.listen_port}", self._cert_files.grpc_credentials())
                    if self._cert_files is not None else
                    server.add_insecure_port(f"{cfg.listen_host}:{cfg.listen_port}"))
        except RuntimeError as exc:  # grpc raises RuntimeError("Failed to bind to address ...")
            raise OSError(f"cannot listen on {cfg.listen_host}:{cfg.listen_port}: {exc}") from None
        if port == 0:
            raise OSError(f"cannot listen on {cfg.listen_host}:{cfg.listen_port}")
        self.bound_port = port
        await server.start()
        self._server = server
        if cfg.data_listen_enabled:
            check_listen_address(cfg.data_listen_host or cfg.listen_host, cfg.data_listen_port, "--data-listen")
            self.wire_server = WireServer(broker_service.wire_handlers(self.apis), cfg.max_request_bytes,
                                          reply_registry=self.replies.registry, sasl=self.sasl,
                                          connections_per_ip_max=cfg.max_connections_per_ip,
                                          connection_creation_rate_per_sec=cfg.max_connection_creation_rate_per_sec,
                                          admission=self.apis.admission)
            self.bound_data_port = await self.wire_server.start(cfg.data_listen_host or cfg.listen_host,
                                                                cfg.data_listen_port, self._wire_tls)
        if self._cert_files is not None and self._wire_tls is not None:
            self._tasks.append(asyncio.create_task(self._tls_reload_loop(self._cert_files)))
        log.info("broker %d listening on %s:%d, recovering logs in %s", cfg.broker_id, cfg.listen_host, port, cfg.data_dir)
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, self._recover)
        self.replica_manager.start()
        self.coordinator.start()  # before registering: it must see our first __consumer_offsets roles
        self.share_coordinator.start()
        self.ready = True
        if self.cluster is not None:
            await self.cluster.start()  # registered: the controller now sends our partition roles
            await self._await_first_metadata()
        self._security = await asyncio.to_thread(self._open_security_store)
        if self.acl_cache is not None:
            await self.acl_cache.load()
            self._tasks.append(asyncio.create_task(self.acl_cache.run()))
        await self.quota_cache.load()
        self._tasks.append(asyncio.create_task(self.quota_cache.run()))
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._serving = True
        log.info(
            "broker %d serving: %d topics, %d partitions recovered in %.2f s",
            cfg.broker_id, len(self.topics), len(self.partitions), time.monotonic() - started,
        )
        self._tasks.append(asyncio.create_task(self._retention_loop()))
        self._tasks.append(asyncio.create_task(self._high_watermark_checkpoint_loop()))
        if self.scrubber is not None:
            self.scrubber.start()
        if self.log_cleaner is not None:
            self.log_cleaner.start()

    async def _tls_reload_loop(self, files: CertFiles) -> None:
        """Rotation without a restart: the record transport's context is replaced when the
        certificate, key or client CA file changes (gRPC asks the files itself on each handshake)."""
        seen = files.stamp()
        while True:
            await asyncio.sleep(RELOAD_INTERVAL_S)
            stamp = files.stamp()
            if stamp == seen:
                continue
            try:
                files.reload()
            except (OSError, ssl.SSLError) as exc:  # half-written pair: try again at the next change
                log.warning("TLS files changed but do not load (%s); keeping the previous certificate",
                            type(exc).__name__)
                seen = stamp
                continue
            seen = stamp
            log.info("TLS certificate reloaded from %s", files.tls.cert_file)

    async def _await_first_metadata(self) -> None:
        """Cluster mode: report SERVING once the controller has told us the cluster's metadata, so a
        client's first Metadata call here does not see an empty cluster (bounded wait). A LeaderAndIsr
        alone is not enough: it names only our own partitions. Until the metadata arrives, Metadata
        calls are answered UNAVAILABLE (`check_metadata_ready`), which clients retry."""
        deadline = time.monotonic() + FIRST_METADATA_WAIT_S
        while not self.metadata_image.received_update:
            if time.monotonic() > deadline:
                log.warning("no metadata from a controller after %.0f s; serving anyway", FIRST_METADATA_WAIT_S)
                return
            await asyncio.sleep(0.05)

    def _recover(self) -> None:
        Path(self.config.data_dir).mkdir(parents=True, exist_ok=True)
        if self.cluster is not None:
            # Logs are recovered now and stay open; each becomes a leader or follower replica when
            # the controller's LeaderAndIsr names it.
            self._store = self.cluster.store
            self._log_manager.load_all()
            return
        self._store = LocalMetadataStore(Path(self.config.data_dir))
        topics = self._store.list_topics()
        logs = self._log_manager.load_all(self._log_configs(topics))
        for log_ in logs.values():
            for report in getattr(log_, "recovery_reports", []):
                log.warning("recovery: %s", report)
        for name, spec in topics.items():
            for p in spec.assignment:
                logs.pop((name, p), None)
                try:
                    self.replica_manager.make_local_leader(name, p, spec.config, spec.topic_id)
                except LostLogError as e:
                    self.replica_manager.mark_offline(name, p, str(e))
        for (name, p) in logs:
            log.warning("deleting log of %s-%d: its topic no longer exists", name, p)
            self._log_manager.delete_log(name, p)
        self.topics = topics

    def _build_apis(self, config: BrokerConfig) -> BrokerApis:
        """The request layer, with the authorizer's hook when --authorizer acl."""
        hook = self._build_authorizer(config)
        self.broker_principals = broker_principals(
            config.tls, config.broker_principals, None if hook is None else
            lambda ctx: hook.allowed(ctx, Operation.CLUSTER_ACTION, ResourceType.CLUSTER, CLUSTER_NAME))
        if hook is not None and self.broker_principals is not None:
            hook.is_broker = self.broker_principals.is_broker
        self.replies = ReplyApis(self, ReplyRegistry(config.broker_id),
                                 ReplyForwarding(self.cluster.channels, self.metadata_image)
                                 if self.cluster is not None else None)
        self.client_quotas = ClientQuotas(QuotaManager(samples=config.quota_window_num,
                                                       window_ms=config.quota_window_size_ms),
                                          cluster_secret=config.cluster_secret)
        self.quota_cache = QuotaCache(self.security_store, self.client_quotas.manager)
        self.request_metrics = RequestMetrics() if config.metrics_enabled else None
        # on whatever --metrics-listen says: DescribeHotPartitions reads it
        self.heat = HeatTracker(budget=SampleBudget(config.heat_sample_bytes_per_sec / 4,
                                                    config.heat_sample_bytes_per_sec, now_s=time.monotonic()))
        visible = None if hook is None else (  # may this caller describe this topic? (listings)
            lambda ctx, topic: hook.allowed(ctx, Operation.DESCRIBE, ResourceType.TOPIC, topic))
        return BrokerApis(
            ProduceFetchApis(config, self, self.replica_manager, self, self.broker_principals, self.active_clients,
                             self.request_metrics, self.heat, grown_partition_count=self.grown_partition_count),
            MetadataApis(self, self, visible),
            GroupApis(self, self.coordinator),
            AdminApis(self, self, self, self.replica_manager, visible),
            queues=QueueApis(self, self.share_coordinator, self.active_clients),
            security=SecurityApis(self.security_store, self._acls_changed, self.quota_cache.reload),
            producer_ids=ProducerIdApis(self.producer_id_store),
            hook=hook,
            quotas=self.client_quotas,
            replies=self.replies,
            admission=Admission(config.max_inflight_request_bytes, config.max_inflight_requests,
                                config.overload_retry_after_ms),
            request_log=RequestLog(config.slow_request_ms),
            metrics=self.request_metrics,
            heat=HeatApis(self, self.heat, self.replica_manager),
        )

    def _build_authorizer(self, config: BrokerConfig) -> AuthorizingHook | None:
        """The ACL request hook and its cache with --authorizer acl (empty until start() loads them)."""
        self.authorizing_hook: AuthorizingHook | None = None
        self.acl_cache: AclCache | None = None
        if config.authorizer == "acl":
            self.authorizing_hook = AuthorizingHook(Authorizer([], config.super_users), config.cluster_secret)
            self.acl_cache = AclCache(self.security_store, self.authorizing_hook, config.super_users)
        return self.authorizing_hook

    def _open_security_store(self) -> SecurityStore:
        if self.cluster is not None:
            return ZkSecurityStore(self.cluster.store)
        assert isinstance(self._store, LocalMetadataStore)
        return self._store.security()

    def producer_id_store(self) -> ProducerIdStore:
        """Where producer ids come from (cluster/producer_id_store.py); opened on first use (in a thread)."""
        if self._producer_ids is None:
            if self.cluster is not None:
                self._producer_ids = ZkProducerIdStore(self.cluster.store)
            else:
                assert isinstance(self._store, LocalMetadataStore)
                self._producer_ids = self._store.producer_ids()
        return self._producer_ids

    def security_store(self) -> SecurityStore:
        """Users and ACLs (cluster/security_store.py); RequestRejected(UNAVAILABLE) until opened."""
        if self._security is None:
            raise RequestRejected(RequestStatus.UNAVAILABLE, "broker is starting: users and ACLs not loaded yet")
        return self._security

    async def _acls_changed(self) -> None:
        if self.acl_cache is not None:
            await self.acl_cache.reload()

    def _log_configs(self, topics: dict[str, TopicSpec]) -> dict[str, LogConfig]:
        """The log settings of each topic, to reopen its logs with (segment size: what a restart
        preallocates). A topic whose stored config does not parse is left to the log's checkpoint."""
        out = {}
        for name, spec in topics.items():
            try:
                out[name] = LogConfig.from_topic_config(spec.config, self._log_manager.default_config)
            except InvalidConfigError as e:
                log.error("topic %s: stored config is invalid (%s); its logs open with their own", name, e)
        return out

    async def stop(self) -> None:
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        log.info("broker %d shutting down", self.config.broker_id)
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            for task in self._tasks:
                task.cancel()
            if self.scrubber is not None:
                await self.scrubber.stop()
            if self.log_cleaner is not None:
                await self.log_cleaner.stop()
            await self.share_coordinator.stop()
            await self.coordinator.stop()
            if self.cluster is not None:
                await self.cluster.controlled_shutdown()  # leadership moves away while we still serve
                await self.cluster.stop_controller()
            self.ready = False
            await self.replica_manager.shutdown()  # fetchers stopped, parked requests answered
            if self._server is not None:
                self.open_streams.close()  # streams never end on their own: end them, clients reopen elsewhere
                stops = [self._server.stop(self.config.shutdown_grace_s)]
                if self.wire_server is not None:
                    stops.append(self.wire_server.stop(self.config.shutdown_grace_s))
                await asyncio.gather(*stops)
            if self.cluster is not None:
                await self.cluster.close()  # closing the session drops our registration at once
            self._log_manager.close_all()
            if self._store is not None and self.cluster is None:
                self._store.close()
            if self._serving:
                log.info("broker %d stopped cleanly", self.config.broker_id)
            else:
                log.info("broker %d stopped before it started serving", self.config.broker_id)
        except Exception:
            log.exception("broker %d: error during shutdown (logs will be recovered on restart)",
                          self.config.broker_id)
        finally:
            self._data_dir_lock.release()  # after the logs are closed
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

    async def _high_watermark_checkpoint_loop(self) -> None:
        """Checkpoint the high watermarks that moved (Kafka's replica.high.watermark.checkpoint.
        interval.ms); flushes, rolls and the clean shutdown write them too (see storage/log.py)."""
        while True:
            await asyncio.sleep(HIGH_WATERMARK_CHECKPOINT_INTERVAL_MS / 1000)
            try:
                self._log_manager.checkpoint_high_watermarks()
            except Exception:
                log.exception("high watermark checkpoint failed")

    # -- state used by the services ---------------------------------------------------------------

    @property
    def store(self) -> MetadataStore:
        assert self._store is not None, "store used before recovery"
        return self._store

    @property
    def cluster_id(self) -> str:
        return self.store.cluster_id

    @property
    def partitions(self) -> dict[tuple[str, int], Partition]:
        """The replicas this broker hosts (owned by the replica manager; do not modify)."""
        return self.replica_manager.partitions

    @property
    def broker_epoch(self) -> int:
        return self.cluster.broker_epoch if self.cluster is not None else 0

    @property
    def controller(self) -> Controller | None:
        return self.cluster.controller if self.cluster is not None else None

    def _drop_roles_on_session_lost(self) -> None:
        """The ZooKeeper session is gone: no produce is accepted as leader any more."""
        rm = self.replica_manager
        for topic, partition in list(rm.partitions):
            rm.remove_partition(topic, partition, delete=False)

    def forward_reply(self, req: pb.ReplyRequest) -> pb.ReplyResponse:
        """Replica.ForwardReply: a reply another broker received for a reply stream open here."""
        return self.replies.forward_reply(req)

    def on_metadata_updated(self) -> None:
        """The controller sent a full UpdateMetadata: long-polls re-check (e.g. a deleted topic)."""
        self.replica_manager.fetch_purgatory.notify_all()

    def check_metadata_ready(self) -> None:
        """Cluster mode: refuse (UNAVAILABLE, retriable) to describe the cluster before the controller
        has told us what it is; a restarted broker would otherwise call every topic unknown."""
        if self.cluster is not None and not self.metadata_image.received_update:
            raise RequestRejected(
                RequestStatus.UNAVAILABLE,
                f"broker {self.config.broker_id} has not received the cluster metadata from the controller yet; retry",
            )

    def check_partition(self, topic: str, index: int) -> None:
        """Raise UNKNOWN_TOPIC_OR_PARTITION unless the cluster has this partition. Standalone, reads the
        topic's assignment (topic_partitions builds every partition's state: an OffsetCommit of many
        partitions checked each one in O(partitions))."""
        if self.cluster is not None:
            partitions: Mapping[int, object] | None = self.metadata_image.partitions.get(topic)
        else:
            spec = self.topics.get(topic)
            partitions = None if spec is None else spec.assignment
        if partitions is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {topic!r}")
        if index not in partitions:
            raise UnknownTopicOrPartitionError(f"topic {topic!r} has no partition {index} (it has {len(partitions)})")

    def partition(self, topic: str, index: int) -> Partition:
        """The local replica; UNKNOWN_TOPIC_OR_PARTITION or (cluster) NOT_LEADER_OR_FOLLOWER if none."""
        p = self.partitions.get((topic, index))
        if p is None:
            self.check_partition(topic, index)
            self.replica_manager.check_online(topic, index)
            states = self.topic_partitions(topic) or {}
            raise NotLeaderOrFollowerError(
                f"broker {self.config.broker_id} hosts no replica of {topic}-{index} (leader: {states[index].leader})"
            )
        return p

    def topic_names(self) -> list[str]:
        """Every topic but the hidden priority-level topics (cluster/priority_levels.py)."""
        names = self.metadata_image.topic_names() if self.cluster is not None else sorted(self.topics)
        return [n for n in names if not is_level_topic(n)]

    def partition_ids(self, topic: str) -> list[int]:
        """The partition numbers of `topic`, sorted ([] for none): `topic_partitions` without its states."""
        if self.cluster is not None:
            return sorted(self.metadata_image.partitions.get(topic) or {})
        spec = self.topics.get(topic)
        return sorted(spec.assignment) if spec is not None else []

    def topic_partitions(self, topic: str) -> dict[int, pb.PartitionState] | None:
        """Leader, epoch, replicas and ISR of every partition of `topic` (None: no such topic)."""
        if self.cluster is not None:
            return self.metadata_image.partitions.get(topic)
        spec = self.topics.get(topic)
        if spec is None:
            return None
        out = {}
        me = self.config.broker_id
        for p in sorted(spec.assignment):
            part = self.partitions.get((topic, p))
            if part is None:  # offline (its log vanished): still ours, answering KAFKA_STORAGE_ERROR
                out[p] = pb.PartitionState(topic=topic, partition=p, leader=me, leader_epoch=0, isr=[], replicas=[me])
                continue
            out[p] = pb.PartitionState(topic=topic, partition=p, leader=part.leader, leader_epoch=part.leader_epoch,
                                       isr=part.isr, replicas=part.replicas)
        return out

    async def topic_id(self, topic: str) -> str:
        """The topic's id ('' if unknown)."""
        if self.cluster is not None:
            spec = await asyncio.to_thread(self.cluster.store.get_topic, topic)
            return spec.topic_id if spec is not None else ""
        spec = self.topics.get(topic)
        return spec.topic_id if spec is not None else ""

    async def recover_empty_partition(self, topic: str, partition: int) -> None:
        """An operator accepts the loss of an offline partition (its log vanished): it is created
        empty and served again (standalone: led at once; a cluster: reported recovered to the
        controller, which may then elect it). InvalidRequestError if it is not offline here."""
        self.check_partition(topic, partition)
        if self.cluster is not None:
            if (topic, partition) not in self.replica_manager.offline_partitions:
                raise InvalidRequestError(f"{topic}-{partition} is not offline on broker {self.config.broker_id}: "
                                          f"nothing to recover (a follower re-fetches a lost replica by itself)")
            spec_zk = await asyncio.to_thread(self.cluster.store.get_topic, topic)
            if spec_zk is None:
                raise InvalidRequestError(f"unknown topic {topic!r}")
            self.replica_manager.recover_empty_replica(topic, partition, spec_zk.config, spec_zk.topic_id)
            return
        spec = self.topics.get(topic)
        if spec is None:
            raise InvalidRequestError(f"{topic}-{partition} is not offline on broker {self.config.broker_id}")
        self.replica_manager.recover_empty(topic, partition, spec.config, spec.topic_id)

    async def reassign_partition(self, topic: str, partition: int, replicas: list[int],
                                 throttle_bytes_per_sec: int = 0) -> None:
        if not 0 <= throttle_bytes_per_sec <= REPLICATION_THROTTLE_BYTES_PER_SEC_MAX:
            raise InvalidRequestError(f"replication_throttle_bytes_per_sec {throttle_bytes_per_sec} must be 0 "
                                      f"(unthrottled) to {REPLICATION_THROTTLE_BYTES_PER_SEC_MAX}")
        if self.cluster is not None:
            await self.cluster.reassign(topic, partition, replicas, throttle_bytes_per_sec)
            return
        self.partition(topic, partition)
        if replicas != [self.config.broker_id]:
            raise InvalidReplicationFactorError("a standalone broker can only place replicas on itself")

    async def topic_config(self, topic: str) -> dict[str, str]:
        if self.cluster is not None:
            spec = await asyncio.to_thread(self.cluster.store.get_topic, topic)
            return dict(spec.config) if spec is not None else {}
        spec = self.topics.get(topic)
        return dict(spec.config) if spec is not None else {}

    def cluster_brokers(self) -> tuple[list[pb.BrokerInfo], int, int]:
        """(live brokers, controller id, controller epoch)."""
        if self.cluster is not None:
            image = self.metadata_image
            return [image.brokers[b] for b in sorted(image.brokers)], image.controller_id, image.controller_epoch
        host, port = self.config.advertised
        me = pb.BrokerInfo(broker_id=self.config.broker_id, host=host, port=port or self.bound_port, rack=self.config.rack,
                           data_port=self.bound_data_port)
        return [me], self.config.broker_id, 0

    async def create_topic(self, name: str, partitions: int, replication_factor: int, config: dict[str, str],
                           validate_only: bool = False, *, internal: bool = False) -> None:
        """Create a topic; `internal` (the group coordinator's __consumer_offsets) only from inside.
        A topic with priority_levels=N > 1 gets its N-1 hidden level topics first (same partition
        count and replication factor; cluster/priority_levels.py), removed again if it fails."""
        if (name == OFFSETS_TOPIC or is_level_topic(name)) and not internal:
            raise InvalidTopicError(f"{name} is internal (the {OFFSETS_TOPIC} topic and the {LEVEL_PREFIX} prefix "
                                    "are reserved)")
        if internal:
            await self._create_one(name, partitions, replication_factor, config, validate_only)
            return
        validate_topic_name(name)
        levels = parse_levels(normalize_topic_config({**self.config.default_topic_config, **config})["priority_levels"])
        if levels > 1 and len(name) > max_user_topic_chars(TOPIC_NAME_MAX_CHARS):
            raise InvalidTopicError(f"a topic with priority levels has at most {max_user_topic_chars(TOPIC_NAME_MAX_CHARS)}"
                                    f" characters, {name!r} has {len(name)}")
        if levels > 1 and name in self.topic_names():
            raise TopicAlreadyExistsError(f"topic {name!r} already exists")
        level_config = {k: v for k, v in config.items() if not k.replace(".", "_").startswith("priority_")}
        created: list[str] = []
        try:
            for level in range(1, levels):
                await self._create_one(level_topic(name, level), partitions, replication_factor, level_config,
                                       validate_only)
                created.append(level_topic(name, level))
            await self._create_one(name, partitions, replication_factor, config, validate_only)
        except BaseException:
            for hidden in created if not validate_only else []:
                with contextlib.suppress(Exception):
                    await self._delete_one(hidden)
            raise

    async def _create_one(self, name: str, partitions: int, replication_factor: int, config: dict[str, str],
                          validate_only: bool) -> None:
        if self.cluster is not None:
            await self.cluster.create_topic(name, partitions, replication_factor, config, validate_only)
            return
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
        spec = TopicSpec(name, {p: [self.config.broker_id] for p in range(partitions)}, full_config,
                         topic_id=uuid.uuid4().hex)
        created: list[int] = []
        try:
            for p in range(partitions):
                created.append(p)
                self.replica_manager.make_local_leader(name, p, full_config, spec.topic_id)
            self.store.create_topic(spec)
        except BaseException:
            for p in created:
                self.replica_manager.remove_partition(name, p, delete=True)
            raise
        self.topics[name] = spec
        log.info("created topic %s with %d partitions", name, partitions)

    async def delete_topic(self, name: str) -> None:
        """Delete a topic, then its priority-level topics (those that exist)."""
        if name == OFFSETS_TOPIC:
            raise InvalidTopicError(f"{OFFSETS_TOPIC} is internal: it holds every group's committed offsets")
        if is_level_topic(name):
            raise InvalidTopicError(f"{name} is a priority level of {parse_level_topic(name)[0]}: delete that topic")
        levels = parse_levels((await self.topic_config(name)).get("priority_levels", "1"))
        await self._delete_one(name)
        for level in range(1, levels):
            try:
                await self._delete_one(level_topic(name, level))
            except UnknownTopicOrPartitionError:
                pass

    async def _delete_one(self, name: str) -> None:
        if self.cluster is not None:
            await self.cluster.delete_topic(name)
            return
        validate_topic_name(name)
        spec = self.topics.get(name)
        if spec is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        self.store.delete_topic(name)
        del self.topics[name]
        for p in spec.assignment:
            self.replica_manager.remove_partition(name, p, delete=True)
        self.coordinator.forget_topics([name])
        log.info("deleted topic %s", name)

    async def create_partitions(self, name: str, total: int) -> None:
        """Grow a topic, then its priority-level topics to the same count."""
        if name == OFFSETS_TOPIC:
            raise InvalidTopicError(f"{OFFSETS_TOPIC} is internal: more partitions would move every group's offsets")
        if is_level_topic(name):
            raise InvalidTopicError(f"{name} is a priority level of {parse_level_topic(name)[0]}: grow that topic")
        await self._create_partitions_one(name, total)
        for level in range(1, parse_levels((await self.topic_config(name)).get("priority_levels", "1"))):
            await self._create_partitions_one(level_topic(name, level), total)

    async def _create_partitions_one(self, name: str, total: int) -> None:
        if self.cluster is not None:
            await self.cluster.create_partitions(name, total)
            return
        validate_topic_name(name)
        spec = self.topics.get(name)
        if spec is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        current = spec.partition_count
        if total <= current:
            raise InvalidPartitionsError(f"topic {name!r} has {current} partitions; the new total must be larger")
        if total > PARTITIONS_MAX:
            raise InvalidPartitionsError(f"at most {PARTITIONS_MAX} partitions")
        # The split point (cluster/lineage.py): every old partition's log end offset now. No await
        # between reading it and `spec` growing, so no append lands after it under the old count:
        # the produce path checks a grown topic's keys against `spec` in the same loop step as its append.
        ordered = spec.config.get("key_order_on_growth", "true") == "true"
        split = Split(current, total, tuple(self.partition(name, p).log.log_end_offset for p in range(current)))
        assignment = dict(spec.assignment)
        for p in range(current, total):
            self.replica_manager.make_local_leader(name, p, spec.config, spec.topic_id)
            assignment[p] = [self.config.broker_id]
        if ordered and isinstance(self.store, LocalMetadataStore):  # one transaction: assignment and split
            self.store.set_assignment(name, assignment, split)
            spec.splits = [*spec.splits, split][-SPLITS_MAX:]
        else:
            self.store.set_assignment(name, assignment)
        spec.assignment = assignment
        log.info("topic %s grew from %d to %d partitions (split at offsets %s)", name, current, total,
                 list(split.end_offsets))

    def grown_partition_count(self, topic: str) -> int:
        """The partition count of a topic that has grown (its keys are then checked on produce,
        cluster/lineage.py); 0 for one that never grew. A cluster broker knows it from the
        controller's UpdateMetadata (splits sent only for topics with key_order_on_growth)."""
        if self.cluster is not None:
            image = self.metadata_image
            return len(image.partitions.get(topic, {})) if image.splits.get(topic) else 0
        spec = self.topics.get(topic)
        if spec is None or not spec.splits or spec.config.get("key_order_on_growth", "true") != "true":
            return 0
        return spec.partition_count

    def partition_parents(self, topic: str, partition: int) -> dict[int, int]:
        """A partition's parents and their split offsets (cluster/lineage.py; SPLIT_PENDING while a
        cluster has not read them yet); {} for none."""
        if self.cluster is not None:
            return self.metadata_image.partition_parents(topic, partition)
        spec = self.topics.get(topic)
        return parents_of(spec.splits, partition) if spec is not None else {}
