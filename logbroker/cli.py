"""The `logbroker` command line: run a broker, manage topics, produce and consume.

Every command takes `--bootstrap HOST:PORT[,HOST:PORT]` (default: $LOGBROKER_BOOTSTRAP, then
127.0.0.1:9092). Errors print one line on stderr and exit non-zero; there are no tracebacks for
anything a user can cause.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from logbroker.cli_tls import add_tls_arguments, sasl_from_args, tls_from_args
from logbroker.config import (
    BOOTSTRAP_ENV,
    DEFAULT_BOOTSTRAP,
    SERVE_SETTINGS,
    ConfigError,
    SettingValue,
    broker_config_from_settings,
    broker_id_from_pod_name,
    default_bootstrap,
    metrics_address,
    parse_pairs,
    resolve_serve_settings,
)
from logbroker.errors import BrokerUnavailableError, LogbrokerError
from logbroker.log_format import configure_logging
from logbroker.security.scram import ScramError
from logbroker.tls import TlsError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def _parse_config_pairs(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--config expects KEY=VALUE, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


# -- serve ------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from logbroker.server.broker import Broker

    try:
        values = resolve_serve_settings(args.config, os.environ, serve_flags(args))
        config = broker_config_from_settings(values, hostname=os.environ.get("HOSTNAME") or socket.gethostname())
        metrics_at = metrics_address(values)
    except (ConfigError, ValueError) as exc:
        raise CliError(str(exc)) from None
    host = config.listen_host
    configure_logging(str(values["log_level"]), str(values["log_format"]))

    async def run() -> None:
        broker = Broker(config)
        loop = asyncio.get_running_loop()

        def on_signal(_signum: int, _frame: object) -> None:  # the main thread, between bytecodes
            loop.call_soon_threadsafe(lambda: asyncio.ensure_future(broker.stop()))

        # signal.signal rather than loop.add_signal_handler: asyncio resets its handlers to the
        # default action when they are removed or the loop closes, and a SIGTERM in that moment
        # killed a cleanly stopped broker (exit -15); this handler is replaced by SIG_IGN in one call
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        metrics = None
        if metrics_at is not None:
            from logbroker.server.metrics import MetricsServer

            metrics = MetricsServer.start(broker, loop, *metrics_at,
                                          tls=config.tls if config.metrics_tls else None)
        try:
            try:
                await broker.start()
            except BaseException:
                await broker.stop()
                raise
            print(f"logbroker serving on {host}:{broker.bound_port} (data in {config.data_dir})", file=sys.stderr, flush=True)
            await broker.wait_stopped()
            # Stopped: from here to the process's exit a SIGTERM (a supervisor repeating itself) must
            # not turn the clean stop into a death by signal (exit -15): ignored from now on.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        finally:
            if metrics is not None:
                metrics.stop()

    try:
        asyncio.run(run())
    except OSError as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """One flag per setting in config.SERVE_SETTINGS, plus --config; every default is None so that
    resolve_serve_settings can tell a flag given from one left to the files and the environment."""
    serve.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="TOML file of settings (keys as the flags, with underscores); repeatable, later "
                       "files win; the environment (LOGBROKER_<SETTING>) and flags override files")
    for s in SERVE_SETTINGS:
        help_text = f"{s.help} ({_help_default(s.default, s.help)}env: {s.env})"
        if s.kind is bool:
            serve.add_argument(s.flag, action="store_true", default=None, help=help_text)
        elif s.kind is dict:
            serve.add_argument(s.flag, action="append", default=None, metavar=s.metavar, help=help_text)
        else:
            serve.add_argument(s.flag, type=s.kind, default=None, metavar=s.metavar, choices=s.choices, help=help_text)


def _help_default(default: SettingValue, help_text: str) -> str:
    """'default: X; ' for a setting's --help line; nothing when its help already names the default or
    there is none to name (empty, off)."""
    if "(default:" in help_text or default is False or default == "" or default == {}:
        return ""
    if isinstance(default, dict):
        return "default: " + ", ".join(f"{k}={v}" for k, v in default.items()) + "; "
    return f"default: {default}; "


def serve_flags(args: argparse.Namespace) -> dict[str, SettingValue | None]:
    """The settings given on the command line (None: not given)."""
    out: dict[str, SettingValue | None] = {}
    for s in SERVE_SETTINGS:
        value = getattr(args, s.name)
        out[s.name] = parse_pairs(value, s.flag) if s.kind is dict and value is not None else value
    return out


def cmd_health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    request = health_pb2.HealthCheckRequest(service=args.service)
    try:
        tls = tls_from_args(args)
        with (grpc.secure_channel(args.address, tls.channel_credentials()) if tls is not None
              else grpc.insecure_channel(args.address)) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "ERROR"
        raise CliError(f"no health answer from {args.address}: {code}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    print(status)
    return EXIT_OK if resp.status == health_pb2.HealthCheckResponse.SERVING or args.liveness else EXIT_ERROR


WAIT_SAFE_UNREACHABLE_S = 10.0


def cmd_wait_safe_to_stop(args: argparse.Namespace) -> int:
    from logbroker.client import Admin
    from logbroker.cluster.stop_safety import PartitionReplicas, blocking_partitions

    try:
        broker_id = (broker_id_from_pod_name(os.environ.get("HOSTNAME") or socket.gethostname())
                     if args.broker_id_from_hostname else args.broker_id)
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    if broker_id is None:
        raise CliError("give --broker-id or --broker-id-from-hostname")
    deadline = time.monotonic() + args.timeout
    last = "no answer yet"
    unreachable_since: float | None = None
    with Admin(args.bootstrap, request_timeout_ms=5000, tls=tls_from_args(args), sasl=sasl_from_args(args)) as admin:
        while True:
            now = time.monotonic()
            try:
                partitions = [
                    PartitionReplicas(t.name, p.partition, tuple(p.replicas), tuple(p.isr),
                                      int(t.config.get("min_insync_replicas", "1")))
                    for t in admin.describe_topics() for p in t.partitions
                ]
                blocking = blocking_partitions(broker_id, partitions)
                if not blocking:
                    print(f"broker {broker_id} can stop: every partition keeps enough in-sync replicas")
                    return EXIT_OK
                last = f"{len(blocking)} partitions would fall short of in-sync replicas, e.g. " + ", ".join(
                    f"{p.topic}-{p.partition} (isr {list(p.isr)} of {list(p.replicas)})" for p in blocking[:3])
                unreachable_since = None
            except BrokerUnavailableError as exc:
                # A broker that cannot be reached (hung, being killed after a failed liveness probe)
                # serves no follower either: waiting for it protects nothing, so give up early.
                unreachable_since = now if unreachable_since is None else unreachable_since
                if now - unreachable_since >= WAIT_SAFE_UNREACHABLE_S:
                    raise CliError(f"no broker answers at {args.bootstrap} for {WAIT_SAFE_UNREACHABLE_S:g} s: "
                                   "not waiting") from None
                last = f"cannot reach a broker: {str(exc).splitlines()[0]}"
            except (grpc.RpcError, LogbrokerError, ValueError) as exc:
                last = f"cannot describe topics: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            if time.monotonic() >= deadline:
                raise CliError(f"broker {broker_id} is not safe to stop after {args.timeout:g} s: {last}")
            time.sleep(min(args.interval, max(0.0, deadline - time.monotonic())))


# -- topics -----------------------------------------------------------------------------------------


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.client import Admin

    return Admin(args.bootstrap, tls=tls_from_args(args), sasl=sasl_from_args(args))


def cmd_topics_create(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.create_topic(args.name, partitions=args.partitions, replication_factor=args.replication_factor,
                           config=_parse_config_pairs(args.config))
    print(f"created topic {args.name} ({args.partitions} partitions)")
    return EXIT_OK


def cmd_topics_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        names = admin.list_topics()
    if args.format == "json":
        print(json.dumps(names))
    else:
        for name in names:
            print(name)
    return EXIT_OK


def cmd_topics_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        d = admin.describe_topic(args.name)
    parts = [
        {
            "partition": p.partition, "leader": p.leader, "leader_epoch": p.leader_epoch,
            "replicas": list(p.replicas), "isr": list(p.isr), "log_start_offset": p.log_start_offset,
            "log_end_offset": p.log_end_offset, "high_watermark": p.high_watermark, "size_bytes": p.size_bytes,
            "offline_replicas": list(p.offline_replicas),
            "parents": {str(k): v for k, v in sorted(p.parents.items())},
        }
        for p in d.partitions
    ]
    if args.format == "json":
        print(json.dumps({"name": d.name, "topic_id": d.topic_id, "config": dict(d.config), "partitions": parts},
                         indent=2))
        return EXIT_OK
    print(f"Topic: {d.name}\tTopicId: {d.topic_id or '-'}\tPartitions: {len(parts)}")
    non_default = {k: v for k, v in sorted(d.config.items())}
    print("Config: " + ", ".join(f"{k}={v}" for k, v in non_default.items()))
    print(f"{'PARTITION':>9} {'LEADER':>6} {'EPOCH':>5} {'REPLICAS':<12} {'ISR':<12} {'START':>12} {'END':>12} {'BYTES':>14}")
    for p in parts:
        print(
            f"{p['partition']:>9} {p['leader']:>6} {p['leader_epoch']:>5} "
            f"{','.join(map(str, p['replicas'])):<12} {','.join(map(str, p['isr'])):<12} "
            f"{p['log_start_offset']:>12} {p['log_end_offset']:>12} {p['size_bytes']:>14}"
            + (f"  OFFLINE on {','.join(map(str, p['offline_replicas']))}" if p["offline_replicas"] else "")
            + (f"  SPLIT FROM {_lineage(p['parents'])}" if p["parents"] else "")
        )
    return EXIT_OK


def _lineage(parents: dict[str, int]) -> str:
    """`0@120,1@98,...`: each parent partition and its split offset (cluster/lineage.py);
    `0,1,... (pending)` while a cluster has not recorded the offsets yet."""
    if any(v < 0 for v in parents.values()):
        return ",".join(parents) + " (pending)"
    return ",".join(f"{k}@{v}" for k, v in parents.items())


def cmd_topics_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.delete_topic(args.name)
    print(f"deleted topic {args.name}")
    return EXIT_OK


def cmd_topics_reassign(args: argparse.Namespace) -> int:
    try:
        replicas = [int(x) for x in args.replicas.split(",") if x.strip()]
    except ValueError:
        raise CliError(f"--replicas expects comma-separated broker ids, got {args.replicas!r}") from None
    with _admin(args) as admin:
        admin.reassign_partition(args.name, args.partition, replicas,
                                 throttle_bytes_per_sec=args.replication_throttle_bytes_per_sec)
    print(f"reassignment of {args.name}-{args.partition} to {replicas} started")
    return EXIT_OK


def cmd_topics_recover_empty(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.recover_empty_partition(args.name, args.partition)
    print(f"{args.name}-{args.partition} recreated empty and online (its lost records are gone for good)")
    return EXIT_OK


def cmd_topics_add_partitions(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.create_partitions(args.name, args.total)
    print(f"topic {args.name} now has {args.total} partitions")
    return EXIT_OK


def cmd_cluster_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        info = admin.describe_cluster()
    if args.format == "json":
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(f"Cluster: {info['cluster_id']}\tController: {info['controller_id']} (epoch {info['controller_epoch']})")
    print(f"{'BROKER':>6} {'ADDRESS':<24} RACK")
    for b in info["brokers"]:
        print(f"{b['broker_id']:>6} {b['host'] + ':' + str(b['port']):<24} {b['rack']}")
    return EXIT_OK


def cmd_dev_cluster(args: argparse.Namespace) -> int:
    from logbroker.cluster.dev_cluster import run_dev_cluster

    if not 1 <= args.brokers <= 9:
        raise CliError("--brokers must be between 1 and 9")
    return run_dev_cluster(args.brokers, Path(args.data_dir).resolve() if args.data_dir else None, args.base_port)


# -- produce / consume --------------------------------------------------------------------------------


def cmd_produce(args: argparse.Namespace) -> int:
    from logbroker.client import Producer

    acks: int | str = "all" if args.acks in ("all", "-1") else int(args.acks)
    failures: list[BaseException] = []
    count = 0
    sep = args.key_separator.encode() if args.key_separator else None
    stdin = sys.stdin.buffer
    with _admin(args) as admin:
        topic = admin.describe_topic(args.topic)  # fail fast on an unknown topic: auto-creation is off
    # Batches never above the topic's max_message_bytes: only a record too large alone is refused.
    batch_size_bytes = max(min(PRODUCE_BATCH_BYTES, int(topic.config.get("max_message_bytes", PRODUCE_BATCH_BYTES))),
                           PRODUCE_BATCH_BYTES_MIN)
    with Producer(args.bootstrap, acks=acks, linger_ms=args.linger_ms, batch_size_bytes=batch_size_bytes,
                  tls=tls_from_args(args), sasl=sasl_from_args(args),
                  encryption_key_file=args.encryption_key_file) as producer:
        futures = []
        for line in stdin:
            line = line.rstrip(b"\r\n")
            key = None
            if sep is not None:
                key_part, found, rest = line.partition(sep)
                if found:
                    key, line = key_part, rest
            futures.append(producer.send(args.topic, line, key=key, partition=args.partition, priority=args.priority))
            count += 1
            if len(futures) >= 10_000:
                failures.extend(_failures(futures))
                if failures:
                    break
                futures = []
        producer.flush(args.timeout)
        failures.extend(_failures(futures))
    if failures:
        raise CliError(f"{len(failures)} of {count} records were not produced: {failures[0]}")
    print(f"produced {count} records to {args.topic}", file=sys.stderr)
    return EXIT_OK


PRODUCE_BATCH_BYTES = 1 << 20  # the Producer's default batch_size_bytes
PRODUCE_BATCH_BYTES_MIN = 128  # the Producer needs room for a batch header and one record


def _failures(futures: list[Any]) -> list[BaseException]:
    out = []
    for f in futures:
        exc = f.exception()
        if exc is not None:
            out.append(exc)
    return out


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "replace")


TOPIC_WAIT_INTERVAL_S = 0.5


def _await_topic(args: argparse.Namespace) -> int:
    """The topic's partition count; an unknown topic is an error, or with --wait-for-topic awaited
    (up to --timeout when given)."""
    from logbroker.errors import UnknownTopicOrPartitionError

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    said = False
    with _admin(args) as admin:
        while True:
            try:
                return len(admin.describe_topic(args.topic).partitions)
            except UnknownTopicOrPartitionError:
                if not args.wait_for_topic:
                    raise CliError(f"topic {args.topic} does not exist (`logbroker topics list` shows the topics; "
                                   "--wait-for-topic waits for it to be created)") from None
            if deadline is not None and time.monotonic() >= deadline:
                raise CliError(f"topic {args.topic} was not created within {args.timeout:g} s")
            if not said:
                print(f"waiting for topic {args.topic} to be created", file=sys.stderr, flush=True)
                said = True
            time.sleep(TOPIC_WAIT_INTERVAL_S)


def cmd_consume(args: argparse.Namespace) -> int:
    from logbroker.client import Consumer

    partitions = _await_topic(args)
    if args.partition is not None and not 0 <= args.partition < partitions:
        raise CliError(f"topic {args.topic} has {partitions} partitions: there is no partition {args.partition}")
    reset = "earliest" if args.from_beginning else "latest"
    consumer = Consumer(args.bootstrap, tls=tls_from_args(args), sasl=sasl_from_args(args), topics=None, group=args.group, auto_offset_reset=reset,
                        filter=args.filter or None, encryption_key_file=args.encryption_key_file)
    out = sys.stdout
    seen = 0
    idle_deadline = time.monotonic() + args.timeout if args.timeout is not None else None
    try:
        if args.partition is not None:
            consumer.assign([(args.topic, args.partition)])
            if args.offset is not None:
                consumer.seek(args.topic, args.partition, args.offset)
        else:
            consumer.subscribe([args.topic])
        while args.max_messages is None or seen < args.max_messages:
            remaining = None if args.max_messages is None else args.max_messages - seen
            batch = consumer.poll(timeout_ms=200, max_records=remaining)
            if not batch:
                if idle_deadline is not None and time.monotonic() >= idle_deadline:
                    break
                continue
            if idle_deadline is not None:
                idle_deadline = time.monotonic() + args.timeout
            lines = []
            for m in batch:
                if not isinstance(m.value, bytes | None):  # a DecryptionError (client/encryption.py)
                    print(f"skipped: {m.value}", file=sys.stderr)
                    continue
                if args.format == "json":
                    lines.append(json.dumps({
                        "topic": m.topic, "partition": m.partition, "offset": m.offset,
                        "timestamp": m.timestamp, "key": _text(m.key), "value": _text(m.value),
                        "headers": {k: _text(v) for k, v in m.headers},
                    }))
                elif args.print_key:
                    lines.append(f"{_text(m.key) or ''}{args.key_separator}{_text(m.value) or ''}")
                else:
                    lines.append(_text(m.value) or "")
            out.write("\n".join(lines) + "\n")
            seen += len(batch)
            if args.group:
                consumer.commit()  # what was printed is consumed
        out.flush()
    finally:
        consumer.close()
    return EXIT_OK


# -- parser ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `logbroker` command line: one function per command group below, in the order of `--help`."""
    parser = argparse.ArgumentParser(
        prog="logbroker",
        description="logbroker: a Kafka-style partitioned log broker. Run a broker, manage topics, "
        "produce and consume.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bootstrap", default=default_bootstrap(),
        help=f"broker address(es) HOST:PORT[,HOST:PORT] (default: ${BOOTSTRAP_ENV}, else {DEFAULT_BOOTSTRAP})",
    )
    add_tls_arguments(common)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_broker_parsers(sub, common)
    _add_cluster_parsers(sub, common)
    _add_topics_parser(sub, common)
    _add_produce_parser(sub, common)
    _add_consume_parser(sub, common)

    from logbroker.cli_groups import add_groups_parser

    add_groups_parser(sub, common)

    from logbroker.cli_queues import add_queues_parser

    add_queues_parser(sub, common)

    from logbroker.cli_security import add_security_parsers

    add_security_parsers(sub, common)

    from logbroker.cli_quotas import add_quotas_parser

    add_quotas_parser(sub, common)

    from logbroker.cli_dump import add_dump_log_parser

    add_dump_log_parser(sub)

    from logbroker.worker.command import add_worker_parser

    add_worker_parser(sub, common)

    from logbroker.console.command import add_console_parser

    add_console_parser(sub, common)

    from logbroker.mirror.command import add_mirror_parser

    add_mirror_parser(sub)
    return parser


def _add_broker_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """`serve`, `health` and `wait-safe-to-stop`: running one broker."""
    serve = sub.add_parser("serve", help="run a broker: standalone by default, a cluster member with --zookeeper",
                           description="Run one broker. Data lives in --data-dir; logs are recovered on start "
                           "and the gRPC health service says SERVING once they are. SIGTERM shuts down cleanly.")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    h = sub.add_parser("health", help="ask a broker's gRPC health service whether it is SERVING",
                       description="Print the broker's health status. Exit 0 if SERVING (with --liveness: if "
                       "the broker answered at all, e.g. NOT_SERVING while recovering logs), 1 otherwise.")
    h.add_argument("--address", default=DEFAULT_BOOTSTRAP, help=f"HOST:PORT of the broker (default: {DEFAULT_BOOTSTRAP})")
    h.add_argument("--service", default="", help="health service name (default: the whole server)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: 5)")
    h.add_argument("--liveness", action="store_true", help="succeed on any answer: the broker is alive, maybe not ready")
    add_tls_arguments(h)
    h.set_defaults(func=cmd_health)

    w = sub.add_parser("wait-safe-to-stop", parents=[common],
                       help="wait until stopping a broker leaves every partition enough in-sync replicas",
                       description="Poll the cluster until no partition whose ISR includes the broker would fall "
                       "below max(2, min_insync_replicas + 1) in-sync replicas (capped at its replication "
                       "factor) without it; exit 0 then, 1 at --timeout (or after 10 s without any broker answering). "
                       "Meant for a preStop hook.")
    wid = w.add_mutually_exclusive_group(required=True)
    wid.add_argument("--broker-id", type=int, default=None, help="the broker about to stop")
    wid.add_argument("--broker-id-from-hostname", action="store_true",
                     help="the broker id is the ordinal ending $HOSTNAME (logbroker-2: broker 2)")
    w.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds (default: 120)")
    w.add_argument("--interval", type=float, default=1.0, help="seconds between checks (default: 1)")
    w.set_defaults(func=cmd_wait_safe_to_stop)


def _add_cluster_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    """`cluster describe|stats|rebalance` and `dev-cluster`."""
    cl = sub.add_parser("cluster", help="show the cluster's brokers and controller, or its stats; rebalance it")
    clsub = cl.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    t = clsub.add_parser("describe", parents=[common], help="list brokers and the controller")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.set_defaults(func=cmd_cluster_describe)
    from logbroker.cli_rebalance import add_rebalance_parser
    from logbroker.cli_stats import add_stats_parser

    add_stats_parser(clsub, common)
    add_rebalance_parser(clsub, common)

    dev = sub.add_parser("dev-cluster", help="start ZooKeeper and N brokers on loopback for development",
                         description="Start ZooKeeper (Debian's zookeeper package) and --brokers brokers on "
                         "127.0.0.1, print their addresses, and stop everything on Ctrl-C.")
    dev.add_argument("--brokers", type=int, default=3, help="number of brokers (default: 3)")
    dev.add_argument("--data-dir", default=None,
                     help="where data and logs go (default: a new logbroker-dev-cluster-* directory under $TMPDIR "
                     "or /tmp; the path is printed and kept after exit)")
    dev.add_argument("--base-port", type=int, default=0, help="first broker port (default: free ports)")
    dev.set_defaults(func=cmd_dev_cluster)


def _add_topics_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """`topics create|list|describe|delete|reassign|add-partitions|recover-empty|hot`."""
    topics = sub.add_parser("topics", help="create, list, describe, delete, reassign topics and add partitions")
    tsub = topics.add_subparsers(dest="topics_command", metavar="ACTION", required=True)
    t = tsub.add_parser("create", parents=[common], help="create a topic")
    t.add_argument("name")
    t.add_argument("--partitions", type=int, default=1, help="number of partitions (default: 1)")
    t.add_argument("--replication-factor", type=int, default=1, help="replicas per partition (default: 1)")
    t.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="topic config, e.g. retention_ms=3600000 (repeatable)")
    t.set_defaults(func=cmd_topics_create)
    t = tsub.add_parser("list", parents=[common], help="list topics")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.set_defaults(func=cmd_topics_list)
    t = tsub.add_parser("describe", parents=[common], help="show partitions, leaders, ISR and offsets of a topic")
    t.add_argument("name")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.set_defaults(func=cmd_topics_describe)
    t = tsub.add_parser("delete", parents=[common], help="delete a topic and its data")
    t.add_argument("name")
    t.set_defaults(func=cmd_topics_delete)
    t = tsub.add_parser("reassign", parents=[common],
                        help="move a partition to other brokers (data is copied before old replicas are dropped)")
    t.add_argument("name")
    t.add_argument("--partition", type=int, required=True)
    t.add_argument("--replicas", required=True, help="comma-separated broker ids; the first is the preferred leader")
    t.add_argument("--replication-throttle-bytes-per-sec", type=int, default=0,
                   help="each replica added copies at most N bytes/s until caught up (default 0: unthrottled)")
    t.set_defaults(func=cmd_topics_reassign)
    t = tsub.add_parser("add-partitions", parents=[common], help="grow a topic to --total partitions")
    t.add_argument("name")
    t.add_argument("--total", type=int, required=True, help="the new total number of partitions")
    t.set_defaults(func=cmd_topics_add_partitions)
    t = tsub.add_parser("recover-empty", parents=[common],
                        help="accept the loss of an offline partition whose log vanished: recreate it empty")
    t.add_argument("name")
    t.add_argument("partition", type=int)
    t.set_defaults(func=cmd_topics_recover_empty)
    from logbroker.cli_hot import add_hot_parser

    add_hot_parser(tsub, common)


def _add_produce_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """`produce`: one record per line of standard input."""
    p = sub.add_parser("produce", parents=[common], help="send one record per line of standard input",
                       description="Read standard input and send one record per line.")
    p.add_argument("topic")
    p.add_argument("--key-separator", default=None,
                   help="split each line at the first SEP into key and value (default: no key)")
    p.add_argument("--acks", default="all", choices=["all", "-1", "0", "1"], help="acknowledgement level (default: all)")
    p.add_argument("--partition", type=int, default=None, help="send every record to this partition")
    p.add_argument("--priority", type=int, default=0,
                   help="the records' priority, 0 (default, lowest) to the topic's priority_levels - 1")
    p.add_argument("--linger-ms", type=int, default=5, help="batching delay (default: 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last acknowledgements")
    p.add_argument("--encryption-key-file", default=None, metavar="FILE",
                   help="encrypt each value end to end with the file's current key (README: End-to-end encryption)")
    p.set_defaults(func=cmd_produce)


def _add_consume_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """`consume`: print records of a topic."""
    c = sub.add_parser("consume", parents=[common], help="print records of a topic",
                       description="Print each record's value (or JSON with --format json).")
    c.add_argument("topic")
    c.add_argument("--from-beginning", action="store_true", help="start at the earliest offset (default: latest)")
    c.add_argument("--group", default=None, help="consumer group: resume from and commit its offsets")
    c.add_argument("--partition", type=int, default=None, help="read only this partition")
    c.add_argument("--offset", type=int, default=None, help="with --partition: start at this offset")
    c.add_argument("--max-messages", type=int, default=None, help="exit after this many records")
    c.add_argument("--timeout", type=float, default=None, help="exit after this many seconds without a record")
    c.add_argument("--format", choices=["text", "json"], default="text")
    c.add_argument("--print-key", action="store_true", help="print KEY<SEP>VALUE")
    c.add_argument("--filter", default=None, metavar="EXPR",
                   help='a CEL expression the broker evaluates per record (key, headers, timestamp), '
                        'e.g. \'headers["type"] == "invoice"\': only matching records are sent')
    c.add_argument("--key-separator", default="\t", help="separator for --print-key (default: tab)")
    c.add_argument("--encryption-key-file", default=None, metavar="FILE",
                   help="decrypt values encrypted end to end; a record it cannot decrypt is reported on stderr")
    c.add_argument("--wait-for-topic", action="store_true",
                   help="wait for the topic to be created (default: exit 1 if it does not exist)")
    c.set_defaults(func=cmd_consume)


def _rpc_error_line(exc: grpc.RpcError, bootstrap: str) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach a broker at {bootstrap}: {details}"
    name = code.name if code is not None else "RPC error"
    return f"{name}: {details}"


def _one_line(text: object) -> str:
    """An error message as one line (a gRPC error's str() spans five)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _check_bootstrap(args: argparse.Namespace) -> None:
    """A malformed --bootstrap (or $LOGBROKER_BOOTSTRAP) is a one-line error before any connection."""
    from logbroker.client.metadata_cache import parse_bootstrap

    bootstrap = getattr(args, "bootstrap", None)
    if bootstrap is None:
        return
    try:
        parse_bootstrap(bootstrap)
    except ValueError as exc:
        raise CliError(f"--bootstrap (or ${BOOTSTRAP_ENV}): {exc}; expected HOST:PORT[,HOST:PORT]") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _check_bootstrap(args)
        return int(args.func(args))
    except (CliError, TlsError, ScramError) as exc:
        print(f"logbroker: error: {_one_line(exc)}", file=sys.stderr)
    except LogbrokerError as exc:
        print(f"logbroker: error: {_one_line(exc)}", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"logbroker: error: {_one_line(_rpc_error_line(exc, getattr(args, 'bootstrap', '')))}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as exc:  # a socket or file error a user can cause (refused connection, bad path)
        print(f"logbroker: error: {_one_line(exc)}", file=sys.stderr)
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
