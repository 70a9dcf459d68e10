"""Broker configuration: one frozen dataclass, filled from the command line (and later a file)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from logbroker.group.coordinator import CoordinatorConfig

DEFAULT_PORT = 9092
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BOOTSTRAP = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
BOOTSTRAP_ENV = "LOGBROKER_BOOTSTRAP"
DEFAULT_ZK_CHROOT = "/logbroker"


def default_bootstrap() -> str:
    return os.environ.get(BOOTSTRAP_ENV) or DEFAULT_BOOTSTRAP


def parse_host_port(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host:port', 'host' or '[v6]:port' -> (host, port); raises ValueError with a clear message."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"bad port in address {text!r}")
        port = int(port_text)
    return host or DEFAULT_HOST, port


@dataclass(frozen=True)
class BrokerConfig:
    data_dir: Path
    listen_host: str = DEFAULT_HOST
    listen_port: int = DEFAULT_PORT
    advertised_host: str = ""  # defaults to listen_host
    advertised_port: int = 0  # defaults to the bound port
    broker_id: int = 0
    rack: str = ""
    # gRPC bounds: a request above max_request_bytes is refused whole (RESOURCE_EXHAUSTED).
    max_request_bytes: int = 32 << 20
    max_response_bytes: int = 64 << 20
    fetch_max_wait_ms_cap: int = 30_000
    produce_timeout_ms_cap: int = 300_000
    auto_create_topics: bool = False
    default_partitions: int = 1
    retention_check_interval_ms: int = 60_000
    shutdown_grace_s: float = 5.0
    default_topic_config: dict[str, str] = field(default_factory=dict)
    # cluster mode (empty zookeeper: standalone with the embedded metadata store)
    zookeeper: str = ""  # "host:port[,host:port...][/chroot]"
    zk_session_timeout_ms: int = 6000
    replica_lag_time_max_ms: int = 10_000
    controlled_shutdown_timeout_ms: int = 30_000
    default_replication_factor: int = 1
    # consumer groups: __consumer_offsets, sessions, heartbeats, offset retention
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)

    @property
    def zk_hosts_and_chroot(self) -> tuple[str, str]:
        """("h1:p1,h2:p2", "/logbroker"): the chroot defaults to /logbroker as in Kafka's layout."""
        hosts, sep, chroot = self.zookeeper.partition("/")
        return hosts, ("/" + chroot.strip("/")) if sep and chroot.strip("/") else DEFAULT_ZK_CHROOT

    @property
    def cluster_mode(self) -> bool:
        return bool(self.zookeeper)

    @property
    def advertised(self) -> tuple[str, int]:
        return (self.advertised_host or self.listen_host, self.advertised_port or self.listen_port)
