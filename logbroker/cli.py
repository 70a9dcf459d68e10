"""The `logbroker` command line: run a broker, manage topics, produce and consume.

Every command takes `--bootstrap HOST:PORT[,HOST:PORT]` (default: $LOGBROKER_BOOTSTRAP, then
127.0.0.1:9092). Errors print one line on stderr and exit non-zero; there are no tracebacks for
anything a user can cause.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from logbroker.config import (
    BOOTSTRAP_ENV,
    DEFAULT_BOOTSTRAP,
    BrokerConfig,
    default_bootstrap,
    parse_host_port,
)
from logbroker.errors import LogbrokerError
from logbroker.group.coordinator import CoordinatorConfig

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
        host, port = parse_host_port(args.listen)
        adv_host, adv_port = parse_host_port(args.advertised_address, port) if args.advertised_address else ("", 0)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    config = BrokerConfig(
        data_dir=Path(args.data_dir).resolve(),
        listen_host=host,
        listen_port=port,
        advertised_host=adv_host,
        advertised_port=adv_port,
        broker_id=args.broker_id,
        rack=args.rack,
        zookeeper=args.zookeeper,
        zk_session_timeout_ms=args.zk_session_timeout_ms,
        replica_lag_time_max_ms=args.replica_lag_time_max_ms,
        max_request_bytes=args.max_request_bytes,
        retention_check_interval_ms=args.retention_check_interval_ms,
        default_topic_config=_parse_config_pairs(args.default_topic_config),
        coordinator=CoordinatorConfig(
            offsets_topic_partitions=args.offsets_topic_partitions,
            offsets_topic_replication_factor=args.offsets_topic_replication_factor,
            session_timeout_ms=args.group_session_timeout_ms,
            heartbeat_interval_ms=args.group_heartbeat_interval_ms,
            offsets_retention_ms=args.offsets_retention_ms,
        ),
    )
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )

    async def run() -> None:
        broker = Broker(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(broker.stop()))
        try:
            await broker.start()
        except BaseException:
            await broker.stop()
            raise
        print(f"logbroker serving on {host}:{broker.bound_port} (data in {config.data_dir})", file=sys.stderr, flush=True)
        await broker.wait_stopped()

    try:
        asyncio.run(run())
    except OSError as exc:
        raise CliError(str(exc)) from None
    return EXIT_OK


# -- topics -----------------------------------------------------------------------------------------


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.client import Admin

    return Admin(args.bootstrap)


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
        }
        for p in d.partitions
    ]
    if args.format == "json":
        print(json.dumps({"name": d.name, "config": dict(d.config), "partitions": parts}, indent=2))
        return EXIT_OK
    print(f"Topic: {d.name}\tPartitions: {len(parts)}")
    non_default = {k: v for k, v in sorted(d.config.items())}
    print("Config: " + ", ".join(f"{k}={v}" for k, v in non_default.items()))
    print(f"{'PARTITION':>9} {'LEADER':>6} {'EPOCH':>5} {'REPLICAS':<12} {'ISR':<12} {'START':>12} {'END':>12} {'BYTES':>14}")
    for p in parts:
        print(
            f"{p['partition']:>9} {p['leader']:>6} {p['leader_epoch']:>5} "
            f"{','.join(map(str, p['replicas'])):<12} {','.join(map(str, p['isr'])):<12} "
            f"{p['log_start_offset']:>12} {p['log_end_offset']:>12} {p['size_bytes']:>14}"
        )
    return EXIT_OK


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
        admin.reassign_partition(args.name, args.partition, replicas)
    print(f"reassignment of {args.name}-{args.partition} to {replicas} started")
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
    return run_dev_cluster(args.brokers, Path(args.data_dir).resolve(), args.base_port)


# -- produce / consume --------------------------------------------------------------------------------


def cmd_produce(args: argparse.Namespace) -> int:
    from logbroker.client import Producer

    acks: int | str = "all" if args.acks in ("all", "-1") else int(args.acks)
    failures: list[BaseException] = []
    count = 0
    sep = args.key_separator.encode() if args.key_separator else None
    stdin = sys.stdin.buffer
    with _admin(args) as admin:
        admin.describe_topic(args.topic)  # fail fast on an unknown topic: auto-creation is off
    with Producer(args.bootstrap, acks=acks, linger_ms=args.linger_ms) as producer:
        futures = []
        for line in stdin:
            line = line.rstrip(b"\r\n")
            key = None
            if sep is not None:
                key_part, found, rest = line.partition(sep)
                if found:
                    key, line = key_part, rest
            futures.append(producer.send(args.topic, line, key=key, partition=args.partition))
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


def _failures(futures: list[Any]) -> list[BaseException]:
    out = []
    for f in futures:
        exc = f.exception()
        if exc is not None:
            out.append(exc)
    return out


def _text(b: bytes | None) -> str | None:
    return None if b is None else b.decode("utf-8", "replace")


def cmd_consume(args: argparse.Namespace) -> int:
    from logbroker.client import Consumer

    reset = "earliest" if args.from_beginning else "latest"
    consumer = Consumer(args.bootstrap, topics=None, group=args.group, auto_offset_reset=reset)
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run a broker: standalone by default, a cluster member with --zookeeper",
                           description="Run one broker. Data lives in --data-dir; logs are recovered on start "
                           "and the gRPC health service says SERVING once they are. SIGTERM shuts down cleanly.")
    serve.add_argument("--data-dir", default=os.environ.get("LOGBROKER_DATA_DIR", "./logbroker-data"),
                       help="directory for partition logs and metadata (default: ./logbroker-data)")
    serve.add_argument("--listen", default=DEFAULT_BOOTSTRAP, help=f"HOST:PORT to listen on (default: {DEFAULT_BOOTSTRAP})")
    serve.add_argument("--advertised-address", default="", help="HOST:PORT clients should use (default: --listen)")
    serve.add_argument("--broker-id", type=int, default=0, help="this broker's id, unique in the cluster (default: 0)")
    serve.add_argument("--zookeeper", default=os.environ.get("LOGBROKER_ZOOKEEPER", ""), metavar="HOST:PORT[,...][/CHROOT]",
                       help="join a cluster coordinated by this ZooKeeper ensemble (chroot default /logbroker); "
                       "without it the broker runs standalone with an embedded metadata store")
    serve.add_argument("--rack", default="", help="rack/zone of this broker, for rack-aware replica placement")
    serve.add_argument("--zk-session-timeout-ms", type=int, default=6000,
                       help="ZooKeeper session timeout: how fast a dead broker is noticed (default: 6000)")
    serve.add_argument("--replica-lag-time-max-ms", type=int, default=10_000,
                       help="a follower that has not caught up for this long leaves the ISR (default: 10000)")
    serve.add_argument("--max-request-bytes", type=int, default=32 << 20,
                       help="largest request accepted; larger ones fail with RESOURCE_EXHAUSTED (default: 32 MiB)")
    serve.add_argument("--retention-check-interval-ms", type=int, default=60_000,
                       help="how often retention deletes old segments (default: 60000)")
    serve.add_argument("--default-topic-config", action="append", default=[], metavar="KEY=VALUE",
                       help="topic config applied to new topics unless they set it (repeatable)")
    serve.add_argument("--offsets-topic-partitions", type=int, default=16,
                       help="partitions of __consumer_offsets, fixed when it is created (default: 16)")
    serve.add_argument("--offsets-topic-replication-factor", type=int, default=3,
                       help="replicas of __consumer_offsets, capped at the live brokers (default: 3)")
    serve.add_argument("--group-session-timeout-ms", type=int, default=45_000,
                       help="a group member silent this long is evicted, unless it asked for its own (default: 45000)")
    serve.add_argument("--group-heartbeat-interval-ms", type=int, default=500,
                       help="how often stable group members heartbeat (default: 500)")
    serve.add_argument("--offsets-retention-ms", type=int, default=7 * 24 * 3600 * 1000,
                       help="committed offsets of a group without members are deleted after this (default: 7 days)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    cl = sub.add_parser("cluster", help="show the cluster's brokers and controller")
    clsub = cl.add_subparsers(dest="cluster_command", metavar="ACTION", required=True)
    t = clsub.add_parser("describe", parents=[common], help="list brokers and the controller")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.set_defaults(func=cmd_cluster_describe)

    dev = sub.add_parser("dev-cluster", help="start ZooKeeper and N brokers on loopback for development",
                         description="Start ZooKeeper (Debian's zookeeper package) and --brokers brokers on "
                         "127.0.0.1, print their addresses, and stop everything on Ctrl-C.")
    dev.add_argument("--brokers", type=int, default=3, help="number of brokers (default: 3)")
    dev.add_argument("--data-dir", default="./logbroker-dev-cluster", help="where logs and data go")
    dev.add_argument("--base-port", type=int, default=0, help="first broker port (default: free ports)")
    dev.set_defaults(func=cmd_dev_cluster)

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
    t.set_defaults(func=cmd_topics_reassign)
    t = tsub.add_parser("add-partitions", parents=[common], help="grow a topic to --total partitions")
    t.add_argument("name")
    t.add_argument("--total", type=int, required=True, help="the new total number of partitions")
    t.set_defaults(func=cmd_topics_add_partitions)

    p = sub.add_parser("produce", parents=[common], help="send one record per line of standard input",
                       description="Read standard input and send one record per line.")
    p.add_argument("topic")
    p.add_argument("--key-separator", default=None,
                   help="split each line at the first SEP into key and value (default: no key)")
    p.add_argument("--acks", default="all", choices=["all", "-1", "0", "1"], help="acknowledgement level (default: all)")
    p.add_argument("--partition", type=int, default=None, help="send every record to this partition")
    p.add_argument("--linger-ms", type=int, default=5, help="batching delay (default: 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the last acknowledgements")
    p.set_defaults(func=cmd_produce)

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
    c.add_argument("--key-separator", default="\t", help="separator for --print-key (default: tab)")
    c.set_defaults(func=cmd_consume)
    return parser


def _rpc_error_line(exc: grpc.RpcError, bootstrap: str) -> str:
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach a broker at {bootstrap}: {details}"
    name = code.name if code is not None else "RPC error"
    return f"{name}: {details}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"logbroker: error: {exc}", file=sys.stderr)
    except LogbrokerError as exc:
        print(f"logbroker: error: {exc}", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"logbroker: error: {_rpc_error_line(exc, getattr(args, 'bootstrap', ''))}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. piped into head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
