"""Client-side cluster metadata: who leads each partition, and one gRPC channel per broker.

The cache maps (topic, partition) -> leader broker id -> advertised "host:port", as the last
`Broker.Metadata` response said. It never guesses: a partition without a leader reads as `None`
until a refresh finds one. Clients refresh it when a partition result says `refresh_metadata`
(NOT_LEADER_OR_FOLLOWER, LEADER_NOT_AVAILABLE, ...), when a broker is unreachable, and every
`metadata_max_age_ms`.

A standalone broker answers Metadata with itself as broker 0, leader of every partition; a
cluster answers with different leaders per partition. The cache treats both alike.

Channels: one `grpc.Channel` per broker address, opened on first use and kept until `close()`.
Each cache uses its own subchannel pool, so a producer and a consumer in one process get their
own TCP connections (one HTTP/2 connection shared by a 1 MiB produce stream and a long-poll fetch
stream would serialize them).

Each channel also carries one idle `grpc.health.v1.Health/Watch` call (`_SpinAnchor`). gRPC's
synchronous channel runs the callbacks of `.future()` calls on a "channel spin" thread that it
starts when the channel's first call begins and ends when its last call finishes; a client that
keeps one Produce or one Fetch in flight at a time (every latency-bound client) therefore started
and joined an OS thread per RPC — measured here, 20 % of the producer's and consumer's CPU at
10,000 records/s. The idle call keeps that thread alive for the channel's life.

Produce and Fetch go over `Broker.ProduceStream` / `Broker.FetchStream` (`produce_call`,
`fetch_call`; logbroker/client/streams.py): one open stream per broker (and fetch lane), opened
on first use, reopened after a failure, unary calls for a broker without them. `streams=False`
makes them unary calls. Each Producer and Consumer has its own streams (`client_streams()`), so
clients sharing a cache share channels but never wait behind each other's long polls. With
`transport="tcp"` (the default), a broker that advertises a data port gets these two APIs on the
record transport instead (logbroker/wire.py: plain TCP frames the calling thread writes itself);
`transport="grpc"` keeps them on gRPC streams.

Thread safety: every public method may be called from any thread. `refresh()` serializes its RPCs
on `_refresh_lock`; readers only take `_lock` for dictionary lookups.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from logbroker.client.backoff import client_retry_policy
from logbroker.client.call_errors import is_retriable, rpc_error, rpc_error_text
from logbroker.client.circuit import Circuits, State
from logbroker.client.sasl import CallDetails, SaslConfig, SaslInterceptor
from logbroker.client.streams import FETCH_STREAM, PRODUCE_STREAM, BrokerStreams
from logbroker.client_id import CLIENT_ID_METADATA, DEFAULT_CLIENT_ID, checked_client_id
from logbroker.clock import SYSTEM_CLOCK, Clock, monotonic_s
from logbroker.errors import (
    BrokerUnavailableError,
    LeaderNotAvailableError,
    TopicAuthorizationFailedError,
    UnauthenticatedError,
    UnknownTopicOrPartitionError,
    error_for,
)
from logbroker.log_throttle import LogThrottle as EventThrottle
from logbroker.tls import TlsConfig, client_tls, probe
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg

log = logging.getLogger(__name__)

MESSAGE_BYTES_MAX = 64 << 20
TRANSPORTS = ("tcp", "grpc")  # Produce and Fetch: the record transport where advertised, or gRPC streams

CHANNEL_OPTIONS: list[tuple[str, int | str]] = [
    ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
    # Keepalive only while calls are active, and no more often than a default server accepts
    # (servers answer pings more frequent than their min interval with GOAWAY too_many_pings).
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted broker is reachable again within ~2 s (the gRPC default backs off to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),  # a restarted broker is found again within 0.5 s
    ("grpc.use_local_subchannel_pool", 1),
]


class _SpinAnchor:
    """An idle Health/Watch call that keeps the channel's spin thread alive (module docstring).

    It waits for the broker to be reachable (wait_for_ready) and is opened again when the broker
    ends it by going away (UNAVAILABLE) or after a long life; it stops for good when the channel
    closes (CANCELLED) or on any other quick ending (a server without the health service), so a
    misbehaving server can never make it spin. Its messages are never read: they stay in HTTP/2
    flow control, and only the first one is ever sent.
    """

    __slots__ = ("_channel", "_started")

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._started = 0.0
        self._open()

    def _open(self) -> None:
        self._started = time.monotonic()
        try:
            call = health_pb2_grpc.HealthStub(self._channel).Watch(
                health_pb2.HealthCheckRequest(service=""), wait_for_ready=True
            )
            call.add_done_callback(self._on_done)
        except Exception:  # the channel closed meanwhile: nothing to anchor
            pass

    def _on_done(self, call: object) -> None:
        code = call.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE or time.monotonic() - self._started >= ANCHOR_REOPEN_AFTER_S:
            self._open()


ANCHOR_REOPEN_AFTER_S = 1.0


class LogThrottle:
    """Logs a repeating warning once per `interval_s` per key; the repeats in between go to DEBUG
    (the counting is logbroker/log_throttle.py's, shared with the broker).

    A broker that is down makes every retry fail; one line every 10 s says so without flooding.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._counter = EventThrottle(interval_s)

    def warning(self, key: str, msg: str, *args: object) -> None:
        if self._counter.event(key):
            self._log.warning(msg, *args)
        else:
            self._log.debug(msg, *args)


def parse_bootstrap(bootstrap: str | Sequence[str]) -> list[str]:
    """"host:port[,host:port]" or a list of them -> a list of "host:port" (order kept, no duplicates)."""
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    out: list[str] = []
    for raw in items:
        addr = raw.strip()
        if not addr:
            continue
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bootstrap address {addr!r} is not host:port")
        if addr not in out:
            out.append(addr)
    if not out:
        raise ValueError("bootstrap is empty: give at least one host:port")
    return out


def broker_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return f"{host}:{port}"


@dataclass
class PartitionRoute:
    leader: int  # broker id, -1 when none
    leader_epoch: int
    replicas: list[int] = field(default_factory=list)
    isr: list[int] = field(default_factory=list)
    parents: dict[int, int] = field(default_factory=dict)  # lineage: parent -> split offset (cluster/lineage.py)


@dataclass
class TopicRoute:
    name: str
    partitions: list[PartitionRoute]


class ClientIdInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                          grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the `client-id` metadata (logbroker/client_id.py) to every call of a channel."""

    def __init__(self, client_id: str) -> None:
        self._entry = (CLIENT_ID_METADATA, client_id)

    def _details(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != CLIENT_ID_METADATA]
        return CallDetails(details, [*metadata, self._entry])

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


class MetadataCache:
    """Leaders and partition counts from `Broker.Metadata`, and the channels to reach them."""

    def __init__(
        self,
        bootstrap: str | Sequence[str],
        *,
        request_timeout_ms: int = 30_000,
        retries: int = 2,
        retry_backoff_ms: int = 100,
        channel_options: Sequence[tuple[str, int | str]] | None = None,
        streams: bool = True,
        transport: str = "tcp",
        clock: Clock | None = None,
        tls: TlsConfig | None = None,
        sasl: SaslConfig | None = None,
        client_id: str = DEFAULT_CLIENT_ID,
    ) -> None:
        """`client_id`: what every connection and call says this client is (logbroker/client_id.py;
        ValueError when malformed). `clock` (default: the system's) times `last_refresh_monotonic`, which the clients compare
        with their own clock. `tls`: every connection (gRPC and the record transport) speaks TLS
        (logbroker/tls.py); a broker refusing the handshake is UnauthenticatedError. `sasl`: every
        connection logs in with SCRAM (client/sasl.py); it needs `tls`."""
        if sasl is not None and tls is None:
            raise ValueError("sasl= needs tls=: the password is never sent on a plaintext connection")
        if retries < 0 or request_timeout_ms <= 0 or retry_backoff_ms < 0:
            raise ValueError("retries, request_timeout_ms and retry_backoff_ms must be positive")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.client_id = checked_client_id(client_id)
        self._bootstrap = parse_bootstrap(bootstrap)
        self._request_timeout_s = request_timeout_ms / 1000
        self._retries = retries
        self._retry_backoff_ms = retry_backoff_ms
        self._channel_options = list(channel_options if channel_options is not None else CHANNEL_OPTIONS)
        self.tls = tls
        self.sasl = sasl
        self._interceptors: list[SaslInterceptor] = []
        self._channel_credentials = tls.channel_credentials() if tls is not None else None
        self._tls_context = tls.ssl_context() if tls is not None else None
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._broker_stubs: dict[str, pbg.BrokerStub] = {}
        self._admin_stubs: dict[str, pbg.AdminStub] = {}
        self._brokers: dict[int, str] = {}
        self._topics: dict[str, TopicRoute] = {}
        self._unauthorized: set[str] = set()  # topics the last answer said we may not describe (ACLs)
        self._controller_id = -1
        self.cluster_id = ""
        self._monotonic = monotonic_s(clock)
        self.last_refresh_monotonic = 0.0  # seconds on `clock`
        self._closed = False
        self.use_streams = streams
        self.transport = transport
        self._data_addresses: dict[str, tuple[str, int]] = {}  # broker address -> (host, data port)
        self._streams: BrokerStreams | None = None  # for callers without their own (client_streams())
        self._client_streams: list[BrokerStreams] = []
        # per broker: stop sending to one that keeps failing, for a while (client/circuit.py)
        self.circuits = Circuits(clock=clock or SYSTEM_CLOCK)

    # -- lookups (no RPC) -------------------------------------------------------------------

    @property
    def bootstrap(self) -> list[str]:
        return list(self._bootstrap)

    def brokers(self) -> dict[int, str]:
        with self._lock:
            return dict(self._brokers)

    def topics(self) -> list[str]:
        with self._lock:
            return list(self._topics)

    def cached_partitions(self, topic: str) -> int | None:
        """The partition count the cache holds for `topic`, or None (no RPC)."""
        with self._lock:
            route = self._topics.get(topic)
            return None if route is None else len(route.partitions)

    def leader(self, topic: str, partition: int) -> str | None:
        """Address of the partition's leader, None when it has none (or its broker is unknown).

        Raises UnknownTopicOrPartitionError when the cache does not know the topic or partition.
        """
        with self._lock:
            route = self._topics.get(topic)
            if route is None or not 0 <= partition < len(route.partitions):
                raise UnknownTopicOrPartitionError(f"{topic}-{partition} is not in the metadata")
            leader_id = route.partitions[partition].leader
            return self._brokers.get(leader_id) if leader_id >= 0 else None

    def parents(self, topic: str, partition: int) -> dict[int, int] | None:
        """The partition's parents and their split offsets as last fetched ({}: none; None: the
        metadata does not know the partition yet, so neither its lineage)."""
        with self._lock:
            route = self._topics.get(topic)
            if route is None or not 0 <= partition < len(route.partitions):
                return None
            return dict(route.partitions[partition].parents)

    def leader_epoch(self, topic: str, partition: int) -> int:
        with self._lock:
            route = self._topics.get(topic)
            if route is None or not 0 <= partition < len(route.partitions):
                return -1
            return route.partitions[partition].leader_epoch

    def controller_address(self) -> str | None:
        with self._lock:
            return self._brokers.get(self._controller_id)

    def any_address(self) -> str:
        """A broker to send a request any broker can answer: the controller, a known broker, or bootstrap."""
        with self._lock:
            addr = self._brokers.get(self._controller_id)
            if addr is not None:
                return addr
            if self._brokers:
                return next(iter(self._brokers.values()))
        return self._bootstrap[0]

    # -- lookups that may refresh -----------------------------------------------------------

    def unauthorized(self, topic: str) -> bool:
        """Whether the last answer about `topic` was TOPIC_AUTHORIZATION_FAILED (ACLs)."""
        with self._lock:
            return topic in self._unauthorized

    def partitions_for(self, topic: str) -> int:
        """Partition count of `topic`; refreshes once if the cache does not know it.

        Raises UnknownTopicOrPartitionError if the cluster does not know it either.
        """
        n = self.cached_partitions(topic)
        if n is None:
            self.refresh([topic])
            n = self.cached_partitions(topic)
            if n is None and topic in self._unauthorized:
                raise TopicAuthorizationFailedError(f"not authorized to describe topic {topic!r}")
            if n is None:
                raise UnknownTopicOrPartitionError(f"topic {topic!r} does not exist")
        return n

    def leader_channel(self, topic: str, partition: int) -> grpc.Channel:
        """Channel to the partition's leader; refreshes once when the leader is unknown.

        Raises UnknownTopicOrPartitionError or LeaderNotAvailableError.
        """
        return self.channel(self.leader_address(topic, partition))

    def leader_address(self, topic: str, partition: int) -> str:
        """Like `leader`, but refreshes once on a miss and raises instead of returning None."""
        try:
            addr = self.leader(topic, partition)
        except UnknownTopicOrPartitionError:
            addr = None
        if addr is None:
            self.refresh([topic])
            addr = self.leader(topic, partition)  # raises UnknownTopicOrPartitionError
            if addr is None:
                raise LeaderNotAvailableError(f"{topic}-{partition} has no leader")
        return addr

    # -- channels ----------------------------------------------------------------------------

    def channel(self, address: str) -> grpc.Channel:
        with self._lock:
            if self._closed:
                raise BrokerUnavailableError("client is closed")
            ch = self._channels.get(address)
            if ch is None:
                if self._channel_credentials is not None:
                    ch = grpc.secure_channel(address, self._channel_credentials, options=self._channel_options)
                else:
                    ch = grpc.insecure_channel(address, options=self._channel_options)
                _SpinAnchor(ch)
                if self.sasl is not None:  # the token of this channel's connection on every call
                    interceptor = SaslInterceptor(ch, self.sasl, self._request_timeout_s)
                    self._interceptors.append(interceptor)
                    ch = grpc.intercept_channel(ch, interceptor)
                ch = grpc.intercept_channel(ch, ClientIdInterceptor(self.client_id))
                self._channels[address] = ch
            return ch

    def broker_stub(self, address: str) -> pbg.BrokerStub:
        stub = self._broker_stubs.get(address)
        if stub is None:
            stub = pbg.BrokerStub(self.channel(address))
            self._broker_stubs[address] = stub
        return stub

    def admin_stub(self, address: str) -> pbg.AdminStub:
        stub = self._admin_stubs.get(address)
        if stub is None:
            stub = pbg.AdminStub(self.channel(address))
            self._admin_stubs[address] = stub
        return stub

    def _unary_future(self, method: str, address: str) -> Any:
        return getattr(self.broker_stub(address), method.rsplit("/", 1)[1].removesuffix("Stream")).future

    def _broker_streams(self) -> BrokerStreams:
        with self._lock:
            if self._streams is None:
                self._streams = BrokerStreams(self.channel, self._unary_future, self._wire_resolver(),
                                             tls_context=self._tls_context, sasl=self.sasl,
                                             client_id=self.client_id)
            return self._streams

    def client_streams(self, inline: bool = False) -> BrokerStreams:
        """Streams of one client (Producer, Consumer) on this cache's channels, closed by
        `release_streams` or `close()`: clients sharing a cache do not share streams, so none waits
        behind another's long poll or acks=all wait. `inline`: record-transport connections are
        read by the client's own thread (`WireConnection.pump`), not a reader thread."""
        streams = BrokerStreams(self.channel, self._unary_future, self._wire_resolver(), inline, self._tls_context,
                                self.sasl, self.client_id)
        with self._lock:
            if self._closed:
                streams.close()
            else:
                self._client_streams.append(streams)
        return streams

    def _wire_resolver(self) -> Any:
        return self.data_address if self.transport == "tcp" else None

    def data_address(self, address: str) -> tuple[str, int] | None:
        """(host, port) of the record transport of the broker at `address`, if it advertised one."""
        with self._lock:
            return self._data_addresses.get(address)

    def release_streams(self, streams: BrokerStreams) -> None:
        with self._lock:
            if streams in self._client_streams:
                self._client_streams.remove(streams)
        streams.close()

    def produce_call(self, address: str, request: pb.ProduceRequest, timeout_s: float,
                     streams: BrokerStreams | None = None, wire_ok: bool = True) -> Any:
        """A Produce to `address`, on its stream (of `streams`, else the cache's own): a future of the
        ProduceResponse (grpc.RpcError on failure). `wire_ok=False`: on gRPC even where the record
        transport is available (see BrokerStreams.send)."""
        if not self.use_streams:
            return self.broker_stub(address).Produce.future(request, timeout=timeout_s)
        return (streams or self._broker_streams()).send(PRODUCE_STREAM, pb.ProduceResponse, address, request,
                                                        timeout_s, wire_ok=wire_ok)

    def fetch_call(self, address: str, request: pb.FetchRequest, timeout_s: float, lane: int = 0,
                   streams: BrokerStreams | None = None) -> Any:
        """A Fetch to `address` on its stream number `lane` (one long-poll at a time per lane) of
        `streams` (else the cache's own): a future."""
        if not self.use_streams:
            return self.broker_stub(address).Fetch.future(request, timeout=timeout_s)
        return (streams or self._broker_streams()).send(FETCH_STREAM, pb.FetchResponse, address, request,
                                                        timeout_s, lane)

    # -- refresh -----------------------------------------------------------------------------

    def candidate_addresses(self) -> list[str]:
        """Where to send a Metadata request: known brokers (shuffled) first, then bootstrap; brokers
        whose circuit is open (client/circuit.py) after all the others."""
        with self._lock:
            known = list(self._brokers.values())
        random.shuffle(known)
        candidates = known + [a for a in self._bootstrap if a not in known]
        return sorted(candidates, key=lambda a: self.circuits.state(a) is not State.CLOSED)  # (stable)

    def fetch_metadata(
        self, topics: Iterable[str] | None = None, retry: bool = True
    ) -> tuple[pb.MetadataResponse, str]:
        """One Metadata RPC, tried on each candidate address, `retries` more rounds with backoff
        (none with retry=False: callers with their own backoff loop must not sleep here).

        Returns the response and the address that gave it.
        """
        request = pb.MetadataRequest(topics=list(topics or ()))
        last: Exception | None = None
        backoff = client_retry_policy(self._retry_backoff_ms, self._retries).start()
        for attempt in range(self._retries + 1 if retry else 1):
            if attempt:
                time.sleep((backoff.failed() or 0) / 1000)
            for addr in self.candidate_addresses():
                try:
                    answer = self.broker_stub(addr).Metadata(request, timeout=self._request_timeout_s)
                    self.circuits.succeeded(addr)
                    return answer, addr
                except grpc.RpcError as e:
                    last = e
                    log.debug("Metadata from %s failed: %s", addr, e)
                    if is_retriable(rpc_error(e)):  # unreachable, timed out, overloaded: try the next
                        self.circuits.failed(addr, rpc_error_text(e))
                    self.check_tls_refusal(addr, e)
                    if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # not logged in (SASL): final
                        raise UnauthenticatedError(f"broker {addr}: {e.details()}") from None
                except ValueError as e:  # a channel closed under us
                    last = e
            if self._closed:
                break
        raise BrokerUnavailableError(
            f"no broker answered Metadata (tried {', '.join(self.candidate_addresses())}): "
            f"{rpc_error_text(last) if last is not None else 'client closed'}"
        )

    def check_tls_refusal(self, address: str, error: grpc.RpcError) -> None:
        """With TLS, a call that failed UNAVAILABLE may be a refused handshake, which gRPC reports as a
        closed socket: ask `tls.probe` and raise UnauthenticatedError when it was."""
        if self.tls is None or getattr(error, "code", lambda: None)() != grpc.StatusCode.UNAVAILABLE:
            return
        host, _, port = address.rpartition(":")
        refused = probe((host.strip("[]"), int(port)), self.tls)
        if refused is not None:
            raise UnauthenticatedError(f"broker {address}: {refused}")

    def refresh(self, topics: Iterable[str] | None = None, retry: bool = True) -> pb.MetadataResponse:
        """Fetch metadata for `topics` (None: every topic) and merge it into the cache.

        A topic the cluster reports as unknown is dropped from the cache; with `topics=None`, so is
        every cached topic missing from the answer (deleted). Raises BrokerUnavailableError when no
        broker answers.
        """
        wanted = None if topics is None else list(dict.fromkeys(topics))
        with self._refresh_lock:
            resp, addr = self.fetch_metadata(wanted, retry)
            self.apply(resp, wanted, addr)
        return resp

    def apply(self, resp: pb.MetadataResponse, wanted: list[str] | None, answered_by: str = "") -> None:
        """Merge a Metadata response (asked for `wanted`; None: all topics) into the cache."""
        answering_host = answered_by.rpartition(":")[0]
        brokers: dict[int, str] = {}
        data_addresses: dict[str, tuple[str, int] | None] = {}  # None: advertises none (any more)
        for b in resp.brokers:
            host = b.host
            if host in ("", "0.0.0.0", "::", "[::]") and answering_host:
                host = answering_host  # a wildcard listen address is no address to dial
            brokers[b.broker_id] = broker_address(host, b.port)
            data_addresses[brokers[b.broker_id]] = (host.strip("[]"), b.data_port) if 0 < b.data_port <= 65535 else None
        routes: dict[str, TopicRoute | None] = {}
        answered: set[str] = set()
        for t in resp.topics:
            answered.add(t.name)
            if t.error_code == pb.TOPIC_AUTHORIZATION_FAILED:
                with self._lock:
                    self._unauthorized.add(t.name)
            elif t.name in self._unauthorized:
                with self._lock:
                    self._unauthorized.discard(t.name)
            if t.error_code != pb.NONE and not t.partitions:
                err = error_for(t.error_code, t.error_message)
                if isinstance(err, UnknownTopicOrPartitionError) or not err.retriable:
                    routes[t.name] = None
                continue  # a transient topic-level error: keep what we had
            count = max((p.partition for p in t.partitions), default=-1) + 1
            parts = [PartitionRoute(-1, -1) for _ in range(count)]
            for p in t.partitions:
                leader = p.leader if p.error_code == pb.NONE or p.leader >= 0 else -1
                parts[p.partition] = PartitionRoute(leader, p.leader_epoch, list(p.replicas), list(p.isr),
                                                    {pp.partition: pp.split_offset for pp in p.parents})
            routes[t.name] = TopicRoute(t.name, parts)
        with self._lock:
            self._brokers = brokers
            for address, data in data_addresses.items():  # brokers a partial answer left out are kept
                if data is None:
                    self._data_addresses.pop(address, None)
                else:
                    self._data_addresses[address] = data
            self._controller_id = resp.controller_id
            self.cluster_id = resp.cluster_id
            if wanted is None:
                kept = {n: r for n, r in self._topics.items() if n in answered and n not in routes}
                kept.update({n: r for n, r in routes.items() if r is not None})
                self._topics = kept
            else:
                for name in wanted:
                    if name not in answered:
                        routes[name] = None  # asked but not answered: the cluster does not know it
                for name, r in routes.items():
                    if r is None:
                        self._topics.pop(name, None)
                    else:
                        self._topics[name] = r
            self.last_refresh_monotonic = self._monotonic()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
            interceptors, self._interceptors = self._interceptors, []
        for interceptor in interceptors:
            interceptor.close()
        with self._lock:
            self._broker_stubs.clear()
            self._admin_stubs.clear()
            streams, self._streams = self._streams, None
            client_streams, self._client_streams = self._client_streams, []
        for each in ([streams] if streams is not None else []) + client_streams:
            each.close()
        for ch in channels:
            ch.close()

    def __enter__(self) -> MetadataCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def metadata_for(
    bootstrap: str | Sequence[str] | MetadataCache, request_timeout_ms: int, retry_backoff_ms: int,
    transport: str = "tcp", clock: Clock | None = None, tls: TlsConfig | bool | None = None,
    sasl: SaslConfig | None = None, client_id: str | None = None,
) -> tuple[MetadataCache, bool]:
    """The cache a client uses, and whether the client owns (and so closes) it: a given cache is
    shared (tests pass an in-memory one; it keeps its own clock and its own client id: a different
    `client_id` is a ValueError), a bootstrap address makes a new one on the client's `clock`
    (`client_id` None: DEFAULT_CLIENT_ID)."""
    if isinstance(bootstrap, MetadataCache):
        cached = getattr(bootstrap, "client_id", DEFAULT_CLIENT_ID)
        if client_id is not None and client_id != cached:
            raise ValueError(f"client_id {client_id!r} differs from the shared MetadataCache's {cached!r}")
        return bootstrap, False
    return MetadataCache(bootstrap, request_timeout_ms=request_timeout_ms, retry_backoff_ms=retry_backoff_ms,
                         transport=transport, clock=clock, tls=client_tls(tls), sasl=sasl,
                         client_id=DEFAULT_CLIENT_ID if client_id is None else client_id), True
