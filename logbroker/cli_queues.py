"""`logbroker queues list|describe|configure|redrive|purge`: share groups (queues) on the command line.

Registered by logbroker/cli.py with `add_queues_parser`; the conventions of cli_groups.py
(`--bootstrap` from the shared parent parser, one-line errors, exit 1). `describe` prints per
partition: start offset, in flight, acquired, available, delayed, dead-lettered, expired and the age
of the oldest unsettled record (`--format json`: Admin.describe_share_group's dict).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from logbroker.errors import InvalidConfigError

_SETTINGS = ("lock_ms", "max_delivery_attempts", "retry_backoff_ms", "retry_backoff_max_ms", "dead_letter_topic",
             "max_in_flight_records")
_COLUMNS = ("start_offset", "in_flight", "acquired", "available", "delayed", "dead_lettered", "expired",
            "oldest_unsettled_age_ms")


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.cli_tls import sasl_from_args, tls_from_args
    from logbroker.client import Admin

    return Admin(args.bootstrap, tls=tls_from_args(args), sasl=sasl_from_args(args))


def cmd_queues_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        groups = admin.list_share_groups()
    if args.format == "json":
        print(json.dumps([{"group": g.group, "state": g.state, "members": g.members,
                           "coordinator_id": g.coordinator_id} for g in groups], indent=2))
        return 0
    if not groups:
        print("no share groups", file=sys.stderr)
        return 0
    width = max(5, *(len(g.group) for g in groups))
    print(f"{'GROUP':<{width}} {'MEMBERS':>7} {'COORDINATOR':>11}")
    for g in groups:
        print(f"{g.group:<{width}} {g.members:>7} {g.coordinator_id:>11}")
    return 0


def cmd_queues_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        d = admin.describe_share_group(args.group)
    if args.format == "json":
        print(json.dumps(d, indent=2))
        return 0
    settings = " ".join(f"{k}={v}" for k, v in sorted(d["settings"].items()))
    print(f"Group: {d['group']}\tMembers: {len(d['members'])}\tCoordinator: {d['coordinator_id']}\t{settings}")
    rows = d["partitions"]
    if not rows:
        print(f"share group {d['group']} reads no partition yet", file=sys.stderr)
        return 0
    tw = max(5, *(len(r["topic"]) for r in rows))
    print(f"{'TOPIC':<{tw}} {'PARTITION':>9} " + " ".join(f"{c.upper().replace('_', '-'):>12}" for c in _COLUMNS))
    for r in rows:
        print(f"{r['topic']:<{tw}} {r['partition']:>9} " + " ".join(f"{r[c]:>12}" for c in _COLUMNS))
    return 0


def cmd_queues_configure(args: argparse.Namespace) -> int:
    settings: dict[str, Any] = {k: getattr(args, k) for k in _SETTINGS if getattr(args, k) is not None}
    if args.dead_letter_expired is not None:
        settings["dead_letter_expired"] = args.dead_letter_expired == "true"
    if args.ordering is not None:
        settings["ordering"] = args.ordering
    if args.filter is not None:
        settings["filter"] = args.filter
    if not settings:
        print("nothing to change: give at least one setting", file=sys.stderr)
        return 1
    with _admin(args) as admin:
        try:
            admin.alter_share_group(args.group, **settings)
        except ValueError as exc:  # refused by the client's own check: the broker's code, one line
            raise InvalidConfigError(str(exc)) from None
    print(f"share group {args.group}: " + " ".join(f"{k}={v}" for k, v in sorted(settings.items())))
    return 0


def cmd_queues_redrive(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        moved = admin.redrive(args.dlq_topic, group=args.group, max_messages=args.max_messages,
                              timeout_s=args.timeout_s)
    print(f"moved {moved} dead letter(s) from {args.dlq_topic} back to their topics")
    return 0


def cmd_queues_purge(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        purged = admin.purge_share_group(args.group, args.topic or None)
    print(f"share group {args.group}: {purged} record(s) purged")
    return 0


def add_queues_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `queues ...` on the top-level subparsers."""
    queues = sub.add_parser("queues", help="list, describe, configure, redrive and purge share groups (queues)")
    qsub = queues.add_subparsers(dest="queues_command", metavar="ACTION", required=True)
    q = qsub.add_parser("list", parents=[common], help="list share groups (asks every broker)")
    q.add_argument("--format", choices=["text", "json"], default="text")
    q.set_defaults(func=cmd_queues_list)
    q = qsub.add_parser("describe", parents=[common], help="settings, members and per-partition queue state")
    q.add_argument("group")
    q.add_argument("--format", choices=["text", "json"], default="text")
    q.set_defaults(func=cmd_queues_describe)
    q = qsub.add_parser("configure", parents=[common], help="change a share group's settings")
    q.add_argument("group")
    for name in _SETTINGS:
        q.add_argument("--" + name.replace("_", "-"), dest=name, type=str if name == "dead_letter_topic" else int,
                       default=None)
    q.add_argument("--dead-letter-expired", choices=["true", "false"], default=None)
    q.add_argument("--ordering", choices=["none", "key"], default=None,
                   help="key: per-key FIFO (one record of a key handed out at a time, in offset order)")
    q.add_argument("--filter", default=None, metavar="EXPR",
                   help='the group\'s CEL filter over key, headers, timestamp, e.g. \'headers["type"] == "invoice"\': '
                        'records it does not match are settled without delivery; "" removes it')
    q.set_defaults(func=cmd_queues_configure)
    q = qsub.add_parser("redrive", parents=[common], help="move dead letters back to their source topics")
    q.add_argument("dlq_topic")
    q.add_argument("--group", default="redrive", help="the share group that reads the DLQ (default: redrive)")
    q.add_argument("--max-messages", type=int, default=None)
    q.add_argument("--timeout-s", type=float, default=30.0)
    q.set_defaults(func=cmd_queues_redrive)
    q = qsub.add_parser("purge", parents=[common], help="settle everything a share group has not settled")
    q.add_argument("group")
    q.add_argument("--topic", action="append", default=[], help="only this topic (repeatable; default: all)")
    q.set_defaults(func=cmd_queues_purge)
