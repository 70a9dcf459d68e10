"""`logbroker topics hot [TOPIC] [--top N] [--keys K] [--format text|json]`: the hottest partitions of
the cluster and their heaviest keys, as a client through --bootstrap.

One DescribeHotPartitions per live broker (`Admin.describe_hot_partitions`): each leader reports
the partitions it leads, with bytes and records in and out per second (decayed over ~10 s,
server/partition_heat.py) and the keys of its sampled appends (server/heavy_keys.py) with their
estimated share of the partition's records. Keys print as text when printable, else as hex.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from logbroker.errors import LogbrokerError

TOP_DEFAULT = 10
TOP_MAX = 1000
KEYS_DEFAULT = 5
KEYS_MAX = 100


class HotCliError(LogbrokerError):
    """A usage problem found after parsing (printed as one line by cli.main, exit 1)."""


def cmd_topics_hot(args: argparse.Namespace) -> int:
    from logbroker.cli_tls import sasl_from_args, tls_from_args
    from logbroker.client import Admin
    from logbroker.client.hot_partitions import as_json, render_text

    if not 1 <= args.top <= TOP_MAX:
        raise HotCliError(f"--top must be in [1, {TOP_MAX}], got {args.top}")
    if not 1 <= args.keys <= KEYS_MAX:
        raise HotCliError(f"--keys must be in [1, {KEYS_MAX}], got {args.keys}")
    with Admin(args.bootstrap, tls=tls_from_args(args), sasl=sasl_from_args(args)) as admin:
        rows = admin.describe_hot_partitions([args.topic] if args.topic else [], args.top, args.keys)
    if args.format == "json":
        print(json.dumps({"partitions": as_json(rows)}), flush=True)
    else:
        print(render_text(rows), end="", flush=True)
    return 0


def add_hot_parser(tsub: Any, common: argparse.ArgumentParser) -> None:
    """`topics hot` under `topics`."""
    t = tsub.add_parser("hot", parents=[common],
                        help="the hottest partitions (bytes/records in and out per second) and their heaviest keys")
    t.add_argument("topic", nargs="?", default=None, help="only this topic (default: every topic)")
    t.add_argument("--top", type=int, default=TOP_DEFAULT, help=f"partitions shown (default {TOP_DEFAULT})")
    t.add_argument("--keys", type=int, default=KEYS_DEFAULT, help=f"keys per partition (default {KEYS_DEFAULT})")
    t.add_argument("--format", choices=["text", "json"], default="text")
    t.set_defaults(func=cmd_topics_hot)
