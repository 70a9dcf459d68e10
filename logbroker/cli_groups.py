"""`logbroker groups list|describe|reset-offsets|delete`: consumer-group administration on the command line.

Kept apart from logbroker/cli.py (which registers it with `add_groups_parser`) so the group commands
are one unit. Same conventions: `--bootstrap` from the shared parent parser, one-line errors, exit 1.

`describe` prints Kafka's columns per partition the group owns or has committed::

    TOPIC  PARTITION  CURRENT-OFFSET  LOG-END-OFFSET  LAG  MEMBER

(CURRENT-OFFSET: the committed offset; LOG-END-OFFSET: the high watermark; "-" when unknown).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from typing import Any

from logbroker.errors import GroupIdNotFoundError, LogbrokerError


class GroupsCliError(LogbrokerError):
    """A usage problem found after parsing (printed as one line by cli.main, exit 1)."""


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.cli_tls import sasl_from_args, tls_from_args
    from logbroker.client import Admin

    return Admin(args.bootstrap, tls=tls_from_args(args), sasl=sasl_from_args(args))


def _dash(v: object) -> str:
    return "-" if v is None or v == "" else str(v)


def cmd_groups_list(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        groups = admin.list_groups()
    if args.format == "json":
        print(json.dumps([{"group": g.group, "state": g.state, "members": g.members,
                           "coordinator_id": g.coordinator_id} for g in groups], indent=2))
        return 0
    if not groups:
        print("no consumer groups", file=sys.stderr)
        return 0
    width = max(5, *(len(g.group) for g in groups))
    print(f"{'GROUP':<{width}} {'STATE':<12} {'MEMBERS':>7} {'COORDINATOR':>11}")
    for g in groups:
        print(f"{g.group:<{width}} {g.state:<12} {g.members:>7} {g.coordinator_id:>11}")
    return 0


def cmd_groups_describe(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        d = admin.describe_group(args.group)
        rows = admin.group_lag(args.group, d)
    if args.format == "json":
        print(json.dumps({
            "group": d.group, "state": d.state, "group_epoch": d.group_epoch, "assignor": d.assignor,
            "coordinator_id": d.coordinator_id,
            "members": [
                {
                    "member_id": m.member_id, "member_epoch": m.member_epoch, "state": m.state,
                    "client_host": m.client_host, "subscribed_topics": m.subscribed_topics,
                    "subscribed_regex": m.subscribed_regex,
                    "assigned": [{"topic": t, "partition": p} for t, p in m.assigned],
                    "revoking": [{"topic": t, "partition": p} for t, p in m.revoking],
                }
                for m in d.members
            ],
            "partitions": [
                {"topic": r.topic, "partition": r.partition, "current_offset": r.current_offset,
                 "log_end_offset": r.log_end_offset, "lag": r.lag, "member_id": r.member_id or None}
                for r in rows
            ],
        }, indent=2))
        return 0
    print(f"Group: {d.group}\tState: {d.state}\tMembers: {len(d.members)}\tEpoch: {d.group_epoch}\t"
          f"Assignor: {d.assignor or '-'}\tCoordinator: {d.coordinator_id}")
    if not rows:
        print(f"group {d.group} owns no partitions and has committed no offsets", file=sys.stderr)
        return 0
    tw = max(5, *(len(r.topic) for r in rows))
    print(f"{'TOPIC':<{tw}} {'PARTITION':>9} {'CURRENT-OFFSET':>14} {'LOG-END-OFFSET':>14} {'LAG':>10} MEMBER")
    for r in rows:
        print(f"{r.topic:<{tw}} {r.partition:>9} {_dash(r.current_offset):>14} {_dash(r.log_end_offset):>14} "
              f"{_dash(r.lag):>10} {_dash(r.member_id)}")
    return 0


def _parse_datetime_ms(text: str) -> int:
    """ISO 8601 ("2024-05-01T12:00:00Z", "...+02:00"; without a zone: local time) -> ms since the epoch."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise GroupsCliError(f"--to-datetime expects an ISO 8601 time like 2024-05-01T12:00:00Z, got {text!r}") from None
    return int(when.timestamp() * 1000)


def cmd_groups_reset_offsets(args: argparse.Namespace) -> int:
    if args.to_earliest:
        to, value = "earliest", None
    elif args.to_latest:
        to, value = "latest", None
    elif args.to_offset is not None:
        to, value = "offset", args.to_offset
    elif args.shift_by is not None:
        to, value = "shift", args.shift_by
    else:
        to, value = "datetime", _parse_datetime_ms(args.to_datetime)
    partitions = None
    if args.partitions:
        try:
            partitions = [int(x) for x in args.partitions.split(",") if x.strip()]
        except ValueError:
            raise GroupsCliError(f"--partitions expects comma-separated numbers, got {args.partitions!r}") from None
    with _admin(args) as admin:
        try:
            offsets = admin.reset_offsets(args.group, args.topic, to, value, partitions=partitions,
                                          dry_run=args.dry_run, allow_new_group=args.allow_new_group)
        except ValueError as e:
            raise GroupsCliError(str(e)) from None
        except GroupIdNotFoundError:
            raise GroupsCliError(f"group {args.group} does not exist (a typo?): --allow-new-group creates it "
                                 "with these offsets") from None
    if args.to_offset is not None:
        for (t, p), off in sorted(offsets.items()):
            if off != args.to_offset:
                where = "past the log end" if args.to_offset > off else "before the log start"
                print(f"note: offset {args.to_offset} is {where} of {t}-{p}: set to {off}", file=sys.stderr)
    if args.format == "json":
        print(json.dumps({"group": args.group, "dry_run": args.dry_run, "offsets": [
            {"topic": t, "partition": p, "offset": off} for (t, p), off in sorted(offsets.items())]}, indent=2))
    else:
        tw = max(5, len(args.topic))
        print(f"{'GROUP':<{max(5, len(args.group))}} {'TOPIC':<{tw}} {'PARTITION':>9} {'NEW-OFFSET':>12}")
        for (t, p), off in sorted(offsets.items()):
            print(f"{args.group:<{max(5, len(args.group))}} {t:<{tw}} {p:>9} {off:>12}")
    if args.dry_run:
        print("dry run: nothing was committed", file=sys.stderr)
    return 0


def cmd_groups_delete(args: argparse.Namespace) -> int:
    with _admin(args) as admin:
        admin.delete_group(args.group)
    print(f"deleted group {args.group}")
    return 0


def add_groups_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `groups ...` on the top-level subparsers."""
    groups = sub.add_parser("groups", help="list, describe, reset offsets of and delete consumer groups")
    gsub = groups.add_subparsers(dest="groups_command", metavar="ACTION", required=True)
    g = gsub.add_parser("list", parents=[common], help="list consumer groups (asks every broker)")
    g.add_argument("--format", choices=["text", "json"], default="text")
    g.set_defaults(func=cmd_groups_list)
    g = gsub.add_parser("describe", parents=[common],
                        help="members, and per partition the committed offset, log end offset, lag and owner")
    g.add_argument("group")
    g.add_argument("--format", choices=["text", "json"], default="text")
    g.set_defaults(func=cmd_groups_describe)
    g = gsub.add_parser("reset-offsets", parents=[common],
                        help="set a group's committed offsets of a topic (the group must have no members)",
                        description="Set the committed offsets of --topic for --group, clamped to the log (a note "
                        "on stderr says when). Only while the group has no active members, and only for a group "
                        "that exists unless --allow-new-group.")
    g.add_argument("--group", required=True)
    g.add_argument("--topic", required=True)
    g.add_argument("--partitions", default="", help="comma-separated partitions (default: all)")
    how = g.add_mutually_exclusive_group(required=True)
    how.add_argument("--to-earliest", action="store_true", help="the log start offset")
    how.add_argument("--to-latest", action="store_true", help="the log end offset (skip everything)")
    how.add_argument("--to-offset", type=int, metavar="N", help="offset N")
    how.add_argument("--shift-by", type=int, metavar="N", help="the committed offset plus N (N may be negative)")
    how.add_argument("--to-datetime", metavar="ISO", help="the first record at or after this time, e.g. "
                     "2024-05-01T12:00:00Z")
    g.add_argument("--dry-run", action="store_true", help="print the new offsets without committing them")
    g.add_argument("--allow-new-group", action="store_true",
                   help="create the group if it does not exist (default: refuse, so a typo creates nothing)")
    g.add_argument("--format", choices=["text", "json"], default="text")
    g.set_defaults(func=cmd_groups_reset_offsets)
    g = gsub.add_parser("delete", parents=[common], help="delete a group's committed offsets (no members allowed)")
    g.add_argument("group")
    g.set_defaults(func=cmd_groups_delete)
