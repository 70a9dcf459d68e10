"""`logbroker cluster stats [--watch [SECONDS]] [--format text|json] [--top N]`: the whole cluster on one
screen, as a client through --bootstrap.

Each refresh is one DescribeCluster and one DescribeTopics (the same Admin calls as `cluster
describe` and `topics describe`); the numbers are computed by logbroker/client/cluster_stats.py
(pure). Without --watch it prints once (no rates: they need two looks). With --watch it redraws
every SECONDS (default 2) until Ctrl-C, with records/s and bytes/s per topic and records/s for the
top partitions, from the change since the previous refresh; `--format json` then prints one JSON
object per refresh, one per line. `--iterations N` (hidden, for tests) stops after N refreshes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from logbroker.client.cluster_stats import TOP_DEFAULT, TOP_MAX, Snapshot, render_text, stats
from logbroker.errors import LogbrokerError

WATCH_DEFAULT_S = 2.0
WATCH_MIN_S = 0.1
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class StatsCliError(LogbrokerError):
    """A usage problem found after parsing (printed as one line by cli.main, exit 1)."""


def _admin(args: argparse.Namespace) -> Any:
    from logbroker.cli_tls import sasl_from_args, tls_from_args
    from logbroker.client import Admin

    return Admin(args.bootstrap, tls=tls_from_args(args), sasl=sasl_from_args(args))


def snapshot(admin: Any, include_internal: bool) -> Snapshot:
    """One look at the cluster (two admin calls)."""
    cluster = admin.describe_cluster()
    topics = [t for t in admin.describe_topics() if include_internal or not t.name.startswith("__")]
    return Snapshot(time.monotonic(), cluster, topics)


def _show(data: dict[str, Any], args: argparse.Namespace, redraw: bool) -> None:
    if args.format == "json":
        print(json.dumps(data), flush=True)
        return
    text = render_text(data)
    if redraw and sys.stdout.isatty():
        text = CLEAR_SCREEN + text
    print(text, end="" if not redraw else "\n", flush=True)


def cmd_cluster_stats(args: argparse.Namespace) -> int:
    if not 0 <= args.top <= TOP_MAX:
        raise StatsCliError(f"--top must be in [0, {TOP_MAX}], got {args.top}")
    if args.watch is not None and args.watch < WATCH_MIN_S:
        raise StatsCliError(f"--watch must be at least {WATCH_MIN_S} seconds, got {args.watch}")
    if args.iterations is not None and args.iterations < 1:
        raise StatsCliError(f"--iterations must be >= 1, got {args.iterations}")
    with _admin(args) as admin:
        previous = None
        done = 0
        while True:
            current = snapshot(admin, args.include_internal)
            _show(stats(current, previous, args.top), args, redraw=args.watch is not None)
            done += 1
            if args.watch is None or (args.iterations is not None and done >= args.iterations):
                return 0
            previous = current
            time.sleep(args.watch)  # the refresh interval (Ctrl-C ends it: KeyboardInterrupt, exit 130)


def add_stats_parser(clsub: Any, common: argparse.ArgumentParser) -> None:
    """`cluster stats` under `cluster`."""
    t = clsub.add_parser("stats", parents=[common],
                         help="brokers, health, topic sizes and rates, top partitions by bytes (--watch refreshes)")
    t.add_argument("--watch", type=float, nargs="?", const=WATCH_DEFAULT_S, default=None, metavar="SECONDS",
                   help=f"redraw every SECONDS (default {WATCH_DEFAULT_S:g}) with rates until Ctrl-C")
    t.add_argument("--format", choices=["text", "json"], default="text",
                   help="json: one object per refresh, one per line")
    t.add_argument("--top", type=int, default=TOP_DEFAULT, help=f"partitions in the top list (default {TOP_DEFAULT})")
    t.add_argument("--include-internal", action="store_true", help="count internal topics (__consumer_offsets) too")
    t.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(func=cmd_cluster_stats)
