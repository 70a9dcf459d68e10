"""Broker configuration: one frozen dataclass, filled from defaults, config files, LOGBROKER_* environment
variables and the command line (`resolve_serve_settings`)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logbroker.cluster.cluster_secret import MAKE_ONE_HINT, ClusterSecretError, load_cluster_secret
from logbroker.group.coordinator_config import CoordinatorConfig
from logbroker.log_format import LOG_FORMATS
from logbroker.storage.log_cleaner import THREADS_MAX as LOG_CLEANER_THREADS_MAX
from logbroker.tls import CLIENT_AUTH_MODES, ServerTls, TlsError

DEFAULT_PORT = 9092
DEFAULT_HOST = "127.0.0.1"
DEFAULT_BOOTSTRAP = f"{DEFAULT_HOST}:{DEFAULT_PORT}"
# /metrics is on by default on the listen host at this port (OpenTelemetry's Prometheus exporter port);
# `--metrics-listen off` disables it, `--metrics-listen HOST:PORT` moves it.
DEFAULT_METRICS_PORT = 9464
BOOTSTRAP_ENV = "LOGBROKER_BOOTSTRAP"
DEFAULT_ZK_CHROOT = "/logbroker"
OFFSETS_SEGMENT_BYTES_MIN = 1 << 14  # the topic config bounds of segment_bytes (cluster/metadata.py)
OFFSETS_SEGMENT_BYTES_MAX = 1 << 31


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
    # The record transport (Produce/Fetch as TCP frames, logbroker/wire.py): advertised with the
    # advertised host; port 0 lets the OS pick one; host "" is listen_host.
    data_listen_enabled: bool = True
    data_listen_host: str = ""
    data_listen_port: int = 0
    # gRPC bounds: a request above max_request_bytes is refused whole (RESOURCE_EXHAUSTED).
    max_request_bytes: int = 32 << 20
    max_response_bytes: int = 64 << 20
    fetch_max_wait_ms_cap: int = 30_000
    produce_timeout_ms_cap: int = 300_000
    auto_create_topics: bool = False
    default_partitions: int = 1
    retention_check_interval_ms: int = 60_000
    # background CRC scrubbing of closed segments (replication/scrubber.py); interval 0: off
    scrub_interval_ms: int = 24 * 3600 * 1000
    scrub_bytes_per_sec: int = 8 << 20
    # log compaction of cleanup_policy=compact topics (storage/log_cleaner.py); interval 0: off
    log_cleaner_interval_ms: int = 15_000
    log_cleaner_io_bytes_per_sec: int = 64 << 20  # reads and writes of the cleaner's passes; 0: unlimited
    log_cleaner_threads: int = 1  # passes at once, on different logs (1..LOG_CLEANER_THREADS_MAX)
    # bytes of appended batches per second whose keys the leader reads for `topics hot` (0: off;
    # server/heat_sampling.py; a partition gets at most a quarter of it)
    heat_sample_bytes_per_sec: int = 1 << 20
    shutdown_grace_s: float = 5.0
    default_topic_config: dict[str, str] = field(default_factory=dict)
    # cluster mode (empty zookeeper: standalone with the embedded metadata store)
    zookeeper: str = ""  # "host:port[,host:port...][/chroot]"
    zk_session_timeout_ms: int = 6000
    auto_leader_rebalance: bool = False  # the controller's periodic leader balancing (cluster/balancer.py)
    replica_lag_time_max_ms: int = 10_000
    controlled_shutdown_timeout_ms: int = 30_000
    default_replication_factor: int = 1
    # the secret brokers prove themselves with on inter-broker calls (logbroker/cluster/cluster_secret.py);
    # required in cluster mode; never printed
    cluster_secret: bytes = field(default=b"", repr=False)
    # authorization (server/authorization.py): "none" or "acl"; super users are User:NAME principals
    authorizer: str = "none"
    super_users: tuple[str, ...] = ()
    # client quotas (security/quotas.py): the rate measurement's windows, as Kafka's quota.window.*
    quota_window_num: int = 11
    quota_window_size_ms: int = 1000
    # consumer groups: __consumer_offsets, sessions, heartbeats, offset retention
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    # TLS on every listener and to other brokers (logbroker/tls.py); None: plaintext
    tls: ServerTls | None = None
    metrics_tls: bool = False  # /metrics over HTTPS too (with tls)
    # /metrics is served (--metrics-listen not `off`): only then does the broker count requests, topic
    # traffic and active clients (server/request_metrics.py, active_clients.py)
    metrics_enabled: bool = True
    # SASL mechanisms a connection without a client certificate must authenticate with (server/sasl.py);
    # empty: none (needs tls)
    sasl_mechanisms: tuple[str, ...] = ()
    # with TLS, who may make broker-only calls (server/broker_principals.py); empty: User:<CN> of tls.cert_file
    broker_principals: tuple[str, ...] = ()
    # the record transport before any frame (server/wire_server.py): open connections per client
    # address, and new connections per second (token bucket; 0: no limit)
    max_connections_per_ip: int = 100
    max_connection_creation_rate_per_sec: int = 200
    # overload protection (server/admission.py): client requests in flight at once, by bytes and by
    # count (0: no bound), and the retry-after hint of a refusal
    max_inflight_request_bytes: int = 128 << 20
    max_inflight_requests: int = 4096
    overload_retry_after_ms: int = 100
    # a client request slower than this logs a WARNING (server/request_log.py); 0: off
    slow_request_ms: int = 1000

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


# -- `logbroker serve` settings: one table, four sources ----------------------------------------------
#
# Every setting has one name, spelled three ways: `zk_session_timeout_ms` in a config file (TOML),
# `--zk-session-timeout-ms` on the command line and `LOGBROKER_ZK_SESSION_TIMEOUT_MS` in the
# environment. Precedence, lowest first: built-in default < config files (`--config`, repeatable, in
# order) < environment < command line. An unknown key in a file and an unknown `LOGBROKER_*`
# variable are errors, so a typo never silently leaves a default in place.

ENV_PREFIX = "LOGBROKER_"
# LOGBROKER_* variables that belong to other commands, or are test-only hooks read where they act
# (storage/segment_cleaner.CRASH_ENV, clock.FileOffsetClock.ENV): `serve` ignores them instead of failing.
NON_SERVE_ENV_VARS = frozenset({BOOTSTRAP_ENV, "LOGBROKER_ZOOKEEPER_JARS", "LOGBROKER_TEST_CLEANER_CRASH_AT",
                                "LOGBROKER_TEST_CLOCK_OFFSET_FILE", "LOGBROKER_TLS", "LOGBROKER_TLS_CA",
                                "LOGBROKER_SASL_USER", "LOGBROKER_SASL_PASSWORD_FILE", "LOGBROKER_SASL_MECHANISM"})
LOG_LEVELS = ("debug", "info", "warning", "error")
AUTHORIZERS = ("none", "acl")
SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
SettingValue = str | int | bool | dict[str, str]


class ConfigError(ValueError):
    """A setting that cannot be used: unknown key, wrong type, unparsable value. Names its source."""


@dataclass(frozen=True)
class ServeSetting:
    name: str
    kind: type  # str, int, bool or dict (KEY=VALUE pairs)
    default: SettingValue
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


SERVE_SETTINGS: tuple[ServeSetting, ...] = (
    ServeSetting("data_dir", str, "./logbroker-data", "directory for partition logs and metadata"),
    ServeSetting("listen", str, DEFAULT_BOOTSTRAP, "HOST:PORT the gRPC server binds", "HOST:PORT"),
    ServeSetting("advertised_address", str, "", "HOST:PORT clients are told to use (default: the listen address)",
                 "HOST:PORT"),
    ServeSetting("data_listen", str, "",
                 "HOST:PORT of the record transport, Produce and Fetch as length-prefixed TCP frames beside "
                 "gRPC, advertised on the advertised host (default: the listen host, a port the OS picks; "
                 "'off': none, clients then use gRPC streams)", "HOST:PORT|off"),
    ServeSetting("broker_id", int, 0, "this broker's id, unique in the cluster"),
    ServeSetting("broker_id_from_hostname", bool, False,
                 "take the broker id from the ordinal ending the host name ($HOSTNAME), as a Kubernetes "
                 "StatefulSet names its pods: logbroker-2 is broker 2"),
    ServeSetting("zookeeper", str, "", "join a cluster coordinated by this ZooKeeper ensemble (chroot default "
                 "/logbroker); without it the broker runs standalone with an embedded metadata store",
                 "HOST:PORT[,...][/CHROOT]"),
    ServeSetting("cluster_secret_file", str, "",
                 "file holding the secret the brokers of a cluster share (16 to 4096 bytes; surrounding "
                 "whitespace ignored): every inter-broker call carries it, and calls without it are refused. "
                 "Required with --zookeeper", "PATH"),
    ServeSetting("rack", str, "", "rack/zone of this broker, for rack-aware replica placement"),
    ServeSetting("zk_session_timeout_ms", int, 6000, "ZooKeeper session timeout: how fast a dead broker is noticed"),
    ServeSetting("auto_leader_rebalance", bool, False,
                 "the controller evens out leaders per broker at every preferred-leader check (every 10 s, at "
                 "most 10 partitions each time) by reordering replicas, as `cluster rebalance --execute`"),
    ServeSetting("replica_lag_time_max_ms", int, 10_000,
                 "a follower that has not caught up for this long leaves the ISR"),
    ServeSetting("controlled_shutdown_timeout_ms", int, 30_000,
                 "on SIGTERM, how long to wait for leadership to move away before stopping anyway"),
    ServeSetting("max_request_bytes", int, 32 << 20,
                 "largest request accepted; larger ones fail with RESOURCE_EXHAUSTED"),
    ServeSetting("retention_check_interval_ms", int, 60_000, "how often retention deletes old segments"),
    ServeSetting("scrub_interval_ms", int, 24 * 3600 * 1000,
                 "how often a background pass verifies the CRC of every batch in closed segments (0: off)"),
    ServeSetting("scrub_bytes_per_sec", int, 8 << 20, "read rate limit of the scrubber (0: unlimited)"),
    ServeSetting("log_cleaner_interval_ms", int, 15_000,
                 "how often the log cleaner compacts the dirtiest cleanup_policy=compact log (0: off)"),
    ServeSetting("log_cleaner_io_bytes_per_sec", int, 64 << 20,
                 "read plus write rate limit of the log cleaner (0: unlimited)"),
    ServeSetting("log_cleaner_threads", int, 1,
                 f"log cleaner passes at once, each on a different log (1..{LOG_CLEANER_THREADS_MAX})"),
    ServeSetting("heat_sample_bytes_per_sec", int, 1 << 20,
                 "bytes of appended batches per second whose record keys the leader reads for `topics hot` "
                 "(0: off; a partition gets at most a quarter)"),
    ServeSetting("default_topic_config", dict, {},
                 "topic config applied to new topics unless they set it (flag repeatable; env: K=V,K=V; "
                 "file: a table)", "KEY=VALUE"),
    ServeSetting("offsets_topic_partitions", int, 16, "partitions of __consumer_offsets, fixed when it is created"),
    ServeSetting("offsets_topic_replication_factor", int, 3,
                 "replicas of __consumer_offsets, capped at the live brokers"),
    ServeSetting("offsets_topic_segment_bytes", int, 4 << 20,
                 "segment size of __consumer_offsets (compacted), fixed when it is created"),
    ServeSetting("group_session_timeout_ms", int, 45_000,
                 "a group member silent this long is evicted, unless it asked for its own"),
    ServeSetting("group_heartbeat_interval_ms", int, 500, "how often stable group members heartbeat"),
    ServeSetting("offsets_retention_ms", int, 7 * 24 * 3600 * 1000,
                 "committed offsets of a group without members are deleted after this"),
    ServeSetting("metrics_listen", str, "", "HOST:PORT for the Prometheus /metrics endpoint (default: the listen "
                 f"host, port {DEFAULT_METRICS_PORT}); off: no endpoint", "HOST:PORT|off"),
    ServeSetting("authorizer", str, "none",
                 "acl: every client call is checked against the ACLs (logbroker acls), and refused when none "
                 "allows it; none: no checks", choices=AUTHORIZERS),
    ServeSetting("super_users", str, "", "principals allowed everything, comma-separated: User:admin,User:broker",
                 "User:NAME[,...]"),
    ServeSetting("quota_window_num", int, 11, "client quotas (logbroker quotas) measure rates over this many "
                 "windows, 2..100 (Kafka's quota.window.num)"),
    ServeSetting("quota_window_size_ms", int, 1000, "the length of one quota window, 1..60000 ms"),
    ServeSetting("log_level", str, "info", "log level", choices=LOG_LEVELS),
    ServeSetting("log_format", str, "text", "text: one readable line per message; json: one JSON object per line "
                 "(time, level, logger, message, and the request's api, client_id, principal, peer while one "
                 "is handled)", choices=LOG_FORMATS),
    ServeSetting("slow_request_ms", int, 1000, "a client request taking longer than this (beyond a fetch's own "
                 "max_wait_ms) logs one WARNING with its api, duration_ms, client_id, principal and "
                 "partition count (0: off)"),
    ServeSetting("tls_cert", str, "", "PEM certificate (chain) of this broker: with it every listener speaks TLS, "
                 "and calls to other brokers present it; reloaded when the file changes", "PATH"),
    ServeSetting("tls_key", str, "", "PEM private key of --tls-cert (reloaded with it)", "PATH"),
    ServeSetting("tls_client_ca", str, "", "PEM CA bundle client certificates (and other brokers' certificates) "
                 "are checked against", "PATH"),
    ServeSetting("tls_client_auth", str, "none", "client certificates: none, requested (checked when given) or "
                 "required (mTLS: a client without a trusted, unexpired one fails the handshake)",
                 choices=CLIENT_AUTH_MODES),
    ServeSetting("sasl_mechanisms", str, "", "SCRAM-SHA-256,SCRAM-SHA-512: a connection without a client "
                 "certificate must log in as a user (logbroker users) first; needs --tls-cert", "MECH[,...]"),
    ServeSetting("broker_principals", str, "",
                 "with TLS: the principals that may make broker-only calls (the controller's calls, replica "
                 "fetches), besides the cluster secret; default: User:<CN of --tls-cert>",
                 "User:NAME[,...]"),
    ServeSetting("max_connections_per_ip", int, 100,
                 "open record-transport connections per client address; more are closed at once"),
    ServeSetting("max_connection_creation_rate_per_sec", int, 200,
                 "new record-transport connections accepted per second (all addresses; 0: no limit)"),
    ServeSetting("max_inflight_request_bytes", int, 128 << 20,
                 "bytes of client requests being handled at once; a request that would pass it is refused with "
                 "RESOURCE_EXHAUSTED and a retry-after hint (0: no limit)"),
    ServeSetting("max_inflight_requests", int, 4096,
                 "client requests being handled at once, parked long-poll fetches included; more are refused "
                 "as above (0: no limit)"),
    ServeSetting("overload_retry_after_ms", int, 100,
                 "how long a client refused for overload is told to wait before it tries again"),
    ServeSetting("metrics_tls", bool, False, "serve --metrics-listen over HTTPS with the broker's certificate "
                 "(client certificates as --tls-client-auth)"),
)
SERVE_SETTINGS_BY_NAME = {s.name: s for s in SERVE_SETTINGS}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_pairs(pairs: list[str] | tuple[str, ...], source: str) -> dict[str, str]:
    """["k=v", ...] -> {k: v}; a pair without '=' is an error naming `source`."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source}: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _check_choice(setting: ServeSetting, value: SettingValue, source: str) -> SettingValue:
    if setting.choices is not None and value not in setting.choices:
        raise ConfigError(f"{source}: {setting.name} must be one of {', '.join(setting.choices)}, got {value!r}")
    return value


def _from_text(setting: ServeSetting, text: str, source: str) -> SettingValue:
    """An environment variable's text as the setting's type."""
    if setting.kind is bool:
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{source}: expected true or false, got {text!r}")
    if setting.kind is int:
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(f"{source}: expected an integer, got {text!r}") from None
    if setting.kind is dict:
        return parse_pairs([p for p in text.split(",") if p.strip()], source)
    return _check_choice(setting, text.strip(), source)


def _from_toml(setting: ServeSetting, value: object, source: str) -> SettingValue:
    """A config file value as the setting's type: TOML types must match (no "30" for 30)."""
    if setting.kind is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {setting.name} must be a table of KEY = VALUE")
        out: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, bool):
                out[str(k)] = "true" if v else "false"
            elif isinstance(v, str | int):
                out[str(k)] = str(v)
            else:
                raise ConfigError(f"{source}: {setting.name}.{k} must be a string or an integer")
        return out
    # bool is a subclass of int: check it first so `broker_id = true` is refused.
    if isinstance(value, bool) != (setting.kind is bool) or not isinstance(value, setting.kind):
        raise ConfigError(f"{source}: {setting.name} must be a {setting.kind.__name__}, got {value!r}")
    return _check_choice(setting, value, source)  # type: ignore[arg-type]


def read_serve_config_file(path: Path) -> dict[str, SettingValue]:
    """The settings in one TOML file; unknown keys and wrong types raise ConfigError."""
    import tomllib

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    out: dict[str, SettingValue] = {}
    for key, value in data.items():
        setting = SERVE_SETTINGS_BY_NAME.get(key)
        if setting is None:
            raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join(SERVE_SETTINGS_BY_NAME)})")
        out[key] = _from_toml(setting, value, f"{path}: {key}")
    return out


def read_serve_env(environ: Mapping[str, str]) -> dict[str, SettingValue]:
    """The settings in LOGBROKER_* variables; an unknown LOGBROKER_* variable raises ConfigError."""
    by_env = {s.env: s for s in SERVE_SETTINGS}
    out: dict[str, SettingValue] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in NON_SERVE_ENV_VARS:
            continue
        setting = by_env.get(var)
        if setting is None:
            raise ConfigError(f"unknown environment variable {var} (serve reads: {', '.join(by_env)})")
        out[setting.name] = _from_text(setting, environ[var], var)
    return out


def resolve_serve_settings(
    config_files: Sequence[Path | str],
    environ: Mapping[str, str],
    flags: Mapping[str, SettingValue | None],
) -> dict[str, SettingValue]:
    """Every serve setting's value: defaults < config files in order < environment < flags.

    `flags` holds what the command line set explicitly (None: not given)."""
    values: dict[str, SettingValue] = {s.name: s.default for s in SERVE_SETTINGS}
    for path in config_files:
        values.update(read_serve_config_file(Path(path)))
    values.update(read_serve_env(environ))
    for name, value in flags.items():
        if name not in SERVE_SETTINGS_BY_NAME:
            raise ConfigError(f"unknown setting {name!r}")
        if value is not None:
            values[name] = _check_choice(SERVE_SETTINGS_BY_NAME[name], value, SERVE_SETTINGS_BY_NAME[name].flag)
    return values


def _cluster_secret(path: str, cluster_mode: bool) -> bytes:
    """The cluster secret from its file; a cluster broker without one does not start (any client could
    otherwise make the controller's calls to it and lose acknowledged data)."""
    if not path:
        if cluster_mode:
            raise ConfigError("--zookeeper needs --cluster-secret-file: brokers prove to each other that they "
                              f"are brokers with a secret they share; {MAKE_ONE_HINT} and give every broker the same")
        return b""
    try:
        return load_cluster_secret(path)
    except ClusterSecretError as exc:
        raise ConfigError(str(exc)) from None


def _server_tls(values: Mapping[str, SettingValue]) -> ServerTls | None:
    """The broker's TLS from --tls-* (None: none of them given; --metrics-tls needs them)."""
    files = [str(values[n]) for n in ("tls_cert", "tls_key", "tls_client_ca")]
    if not any(files):
        if values["tls_client_auth"] != "none" or values["metrics_tls"]:
            raise ConfigError("--tls-client-auth and --metrics-tls need --tls-cert and --tls-key")
        return None
    try:
        return ServerTls(files[0], files[1], files[2], str(values["tls_client_auth"]))
    except TlsError as exc:
        raise ConfigError(str(exc)) from None


def _sasl_mechanisms(text: str, tls: ServerTls | None) -> tuple[str, ...]:
    """The SASL mechanisms of --sasl-mechanisms (SCRAM only, and only over TLS)."""
    names = tuple(dict.fromkeys(m.strip().upper() for m in text.split(",") if m.strip()))
    for name in names:
        if name not in SASL_MECHANISMS:
            raise ConfigError(f"--sasl-mechanisms: unknown mechanism {name!r} (known: {', '.join(SASL_MECHANISMS)})")
    if names and tls is None:
        raise ConfigError("--sasl-mechanisms needs --tls-cert and --tls-key: SCRAM is allowed only over TLS "
                          "(a password login on a plaintext connection could be watched and replayed)")
    return names


_ORDINAL = re.compile(r"-(\d+)$")


def broker_id_from_pod_name(name: str) -> int:
    """The ordinal a StatefulSet gives its pods: 'logbroker-2' -> 2 (also 'logbroker-2.svc.local')."""
    short = name.strip().split(".", 1)[0]
    match = _ORDINAL.search(short)
    if match is None:
        raise ConfigError(f"cannot take a broker id from host name {name!r}: it does not end in -<number>")
    return int(match.group(1))


def _super_users(text: str, what: str = "super user") -> tuple[str, ...]:
    users = tuple(u.strip() for u in text.split(",") if u.strip())
    for u in users:
        if not u.startswith("User:") or len(u) <= len("User:"):
            raise ConfigError(f"{what} {u!r} must be written User:NAME")
    return users


def _front_door(values: Mapping[str, SettingValue], tls: ServerTls | None, cluster_mode: bool) -> dict[str, Any]:
    """The SASL, broker-only-call, connection-limit and request-log settings (server/sasl.py,
    broker_principals.py, wire_server.py, admission.py, request_log.py)."""
    if tls is not None and cluster_mode and tls.client_auth != "required" and str(values["broker_principals"]):
        # ("requested" asks for no certificate on gRPC, where the controller's calls arrive: tls.py)
        raise ConfigError("--broker-principals needs --tls-client-auth required: without client certificates "
                          "the brokers' calls are proven by the cluster secret alone")
    for name in ("max_connections_per_ip", "max_connection_creation_rate_per_sec", "max_inflight_request_bytes",
                 "max_inflight_requests", "overload_retry_after_ms", "slow_request_ms"):
        value = values[name]
        if not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be >= 0, got {value}")
    if values["max_connections_per_ip"] == 0:
        raise ConfigError("max_connections_per_ip must be positive")
    return {"sasl_mechanisms": _sasl_mechanisms(str(values["sasl_mechanisms"]), tls),
            "broker_principals": _super_users(str(values["broker_principals"]), "broker principal"),
            "max_connections_per_ip": values["max_connections_per_ip"],
            "max_connection_creation_rate_per_sec": values["max_connection_creation_rate_per_sec"],
            "max_inflight_request_bytes": values["max_inflight_request_bytes"],
            "max_inflight_requests": values["max_inflight_requests"],
            "overload_retry_after_ms": values["overload_retry_after_ms"],
            "slow_request_ms": values["slow_request_ms"]}


def _quota_windows(values: Mapping[str, SettingValue]) -> dict[str, Any]:
    num, size_ms = values["quota_window_num"], values["quota_window_size_ms"]
    assert isinstance(num, int) and isinstance(size_ms, int)
    if not 2 <= num <= 100 or not 1 <= size_ms <= 60_000:
        raise ConfigError(f"quota_window_num must be in [2, 100] and quota_window_size_ms in [1, 60000], got "
                          f"{num} and {size_ms}")
    return {"quota_window_num": num, "quota_window_size_ms": size_ms}


def metrics_address(values: Mapping[str, SettingValue]) -> tuple[str, int] | None:
    """Where /metrics binds: --metrics-listen HOST:PORT, None for `off`, and by default the listen host
    at DEFAULT_METRICS_PORT. Raises ValueError on a malformed address."""
    text = str(values["metrics_listen"]).strip()
    if text.lower() == "off":
        return None
    if not text:
        return parse_host_port(str(values["listen"]))[0], DEFAULT_METRICS_PORT
    return parse_host_port(text, DEFAULT_METRICS_PORT)


_NON_NEGATIVE_SETTINGS = ("scrub_interval_ms", "scrub_bytes_per_sec", "log_cleaner_interval_ms",
                          "log_cleaner_io_bytes_per_sec", "heat_sample_bytes_per_sec")


def broker_config_from_settings(values: Mapping[str, SettingValue], hostname: str = "") -> BrokerConfig:
    """BrokerConfig from resolved settings; `hostname` is used with broker_id_from_hostname."""
    def text(name: str) -> str:
        return str(values[name])

    def number(name: str) -> int:
        value = values[name]
        assert isinstance(value, int), (name, value)
        return value

    try:
        host, port = parse_host_port(text("listen"))
        adv_host, adv_port = parse_host_port(text("advertised_address"), port) if text("advertised_address") else ("", 0)
        metrics_address(values)
        data_on = text("data_listen").strip().lower() != "off"
        data_host, data_port = parse_host_port(text("data_listen"), 0) if data_on and text("data_listen") else ("", 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    broker_id = broker_id_from_pod_name(hostname) if values["broker_id_from_hostname"] else number("broker_id")
    if broker_id < 0:
        raise ConfigError(f"broker id must be >= 0, got {broker_id}")
    topic_defaults = values["default_topic_config"]
    assert isinstance(topic_defaults, dict)
    for name in ("zk_session_timeout_ms", "replica_lag_time_max_ms", "controlled_shutdown_timeout_ms",
                 "max_request_bytes", "retention_check_interval_ms", "offsets_topic_partitions",
                 "offsets_topic_replication_factor", "group_session_timeout_ms", "group_heartbeat_interval_ms",
                 "offsets_retention_ms"):
        if number(name) <= 0:
            raise ConfigError(f"{name} must be positive, got {number(name)}")
    for name in _NON_NEGATIVE_SETTINGS:
        if number(name) < 0:
            raise ConfigError(f"{name} must be >= 0, got {number(name)}")
    if not 1 <= number("log_cleaner_threads") <= LOG_CLEANER_THREADS_MAX:
        raise ConfigError(f"log_cleaner_threads must be in [1, {LOG_CLEANER_THREADS_MAX}], "
                          f"got {number('log_cleaner_threads')}")
    if not OFFSETS_SEGMENT_BYTES_MIN <= number("offsets_topic_segment_bytes") <= OFFSETS_SEGMENT_BYTES_MAX:
        raise ConfigError(f"offsets_topic_segment_bytes must be in [{OFFSETS_SEGMENT_BYTES_MIN}, "
                          f"{OFFSETS_SEGMENT_BYTES_MAX}], got {number('offsets_topic_segment_bytes')}")
    secret = _cluster_secret(text("cluster_secret_file"), cluster_mode=bool(text("zookeeper")))
    tls = _server_tls(values)
    return BrokerConfig(
        data_dir=Path(text("data_dir")).resolve(),
        listen_host=host,
        listen_port=port,
        advertised_host=adv_host,
        advertised_port=adv_port,
        broker_id=broker_id,
        rack=text("rack"),
        data_listen_enabled=data_on,
        data_listen_host=data_host,
        data_listen_port=data_port,
        zookeeper=text("zookeeper"),
        cluster_secret=secret,
        tls=tls,
        metrics_tls=bool(values["metrics_tls"]),
        metrics_enabled=metrics_address(values) is not None,
        **_front_door(values, tls, bool(text("zookeeper"))), **_quota_windows(values),
        zk_session_timeout_ms=number("zk_session_timeout_ms"), auto_leader_rebalance=bool(values["auto_leader_rebalance"]),
        replica_lag_time_max_ms=number("replica_lag_time_max_ms"),
        controlled_shutdown_timeout_ms=number("controlled_shutdown_timeout_ms"),
        max_request_bytes=number("max_request_bytes"),
        retention_check_interval_ms=number("retention_check_interval_ms"),
        scrub_interval_ms=number("scrub_interval_ms"),
        scrub_bytes_per_sec=number("scrub_bytes_per_sec"),
        log_cleaner_interval_ms=number("log_cleaner_interval_ms"),
        log_cleaner_io_bytes_per_sec=number("log_cleaner_io_bytes_per_sec"),
        log_cleaner_threads=number("log_cleaner_threads"),
        heat_sample_bytes_per_sec=number("heat_sample_bytes_per_sec"),
        default_topic_config=dict(topic_defaults),
        authorizer=text("authorizer"),
        super_users=_super_users(text("super_users")),
        coordinator=CoordinatorConfig(
            offsets_topic_partitions=number("offsets_topic_partitions"),
            offsets_topic_replication_factor=number("offsets_topic_replication_factor"),
            offsets_topic_segment_bytes=number("offsets_topic_segment_bytes"),
            session_timeout_ms=number("group_session_timeout_ms"),
            heartbeat_interval_ms=number("group_heartbeat_interval_ms"),
            offsets_retention_ms=number("offsets_retention_ms"),
        ),
    )
