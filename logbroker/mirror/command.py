"""`logbroker mirror --source A --target B --topics PATTERN`: the mirror on the command line.

Registered by logbroker/cli.py with `add_mirror_parser`. Problems a user can cause (a bad regex or
alias, a cluster refusing the mirror's credentials) are one line on stderr, exit 1; SIGTERM/SIGINT
stop it gracefully (flush, commit), exit 0. Each cluster has its own TLS and SCRAM flags
(`--source-tls-ca`, `--source-sasl-user`, ..., `--target-...`: cli_tls.py with a prefix).
"""

from __future__ import annotations

import argparse
import re
import signal
from typing import Any

from logbroker.cli_tls import add_tls_arguments, sasl_from_args, tls_from_args
from logbroker.errors import LogbrokerError
from logbroker.log_format import LOG_FORMATS, configure_logging


class MirrorCliError(LogbrokerError):
    """A usage problem found after parsing (printed as one line by cli.main, exit 1)."""


def _settings(args: argparse.Namespace) -> Any:
    from logbroker.mirror import naming
    from logbroker.mirror.mirror import MirrorSettings

    for flag, value in (("--topics", args.topics), ("--sync-group-offsets", args.sync_group_offsets)):
        if value is None:
            continue
        try:
            re.compile(value)
        except re.error as e:
            raise MirrorCliError(f"{flag} {value!r} is not a regular expression: {e}") from None
    try:
        prefix = naming.check_alias(args.prefix, "--prefix") if args.prefix else None
        target_alias = naming.check_alias(args.target_alias, "--target-alias") if args.target_alias else None
    except ValueError as e:
        raise MirrorCliError(str(e)) from None
    for flag, value in (("--flush-interval-ms", args.flush_interval_ms),
                        ("--checkpoint-interval-ms", args.checkpoint_interval_ms),
                        ("--report-interval-ms", args.report_interval_ms),
                        ("--topics-interval-ms", args.topics_interval_ms)):
        if not 10 <= value <= 3_600_000:
            raise MirrorCliError(f"{flag} must be in [10, 3600000], got {value}")
    if args.status_port is not None and not 0 < args.status_port < 65536:
        raise MirrorCliError(f"--status-port must be in [1, 65535], got {args.status_port}")
    group = args.group or "mirror-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", args.target)
    return MirrorSettings(
        source=args.source, target=args.target, topics=args.topics, group=group, prefix=prefix,
        target_alias=target_alias, sync_groups=args.sync_group_offsets, flush_interval_ms=args.flush_interval_ms,
        checkpoint_interval_ms=args.checkpoint_interval_ms, report_interval_ms=args.report_interval_ms,
        session_timeout_ms=args.session_timeout_ms, topics_interval_ms=args.topics_interval_ms,
        source_tls=tls_from_args(args, "source"), source_sasl=sasl_from_args(args, "source"),
        target_tls=tls_from_args(args, "target"), target_sasl=sasl_from_args(args, "target"),
    )


def cmd_mirror(args: argparse.Namespace) -> int:
    from logbroker.mirror.mirror import Mirror

    settings = _settings(args)
    configure_logging(args.log_level, args.log_format)
    mirror = Mirror(settings)
    stops = 0

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            raise KeyboardInterrupt
        mirror.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    if args.status_port is not None:
        from logbroker.mirror.status import StatusServer

        server = StatusServer(lambda: mirror.status, args.status_port).start()
    try:
        mirror.run()
    finally:
        if server is not None:
            server.close()
    return 0


def add_mirror_parser(sub: Any) -> None:
    m = sub.add_parser(
        "mirror", help="copy topics from one cluster to another (keys, headers, timestamps, partitions, "
        "group offsets)")
    m.add_argument("--source", required=True, metavar="HOST:PORT[,...]", help="the cluster to copy from (A)")
    m.add_argument("--target", required=True, metavar="HOST:PORT[,...]", help="the cluster to copy to (B)")
    m.add_argument("--topics", required=True, metavar="REGEX",
                   help="copy the topics whose whole name matches (internal topics never)")
    m.add_argument("--prefix", default=None, metavar="ALIAS",
                   help="the source's alias: target topics are named ALIAS.<topic>")
    m.add_argument("--target-alias", default=None, metavar="ALIAS",
                   help="the target's alias: source topics named ALIAS.<topic> came from the target and are "
                   "never copied back (active-active)")
    m.add_argument("--group", default=None, help="the mirror's consumer group on the source (default mirror-<target>)")
    m.add_argument("--sync-group-offsets", default=None, metavar="REGEX",
                   help="translate the committed offsets of the source's groups matching REGEX to the target")
    m.add_argument("--flush-interval-ms", type=int, default=1_000,
                   help="wait for the target's acknowledgements and commit on the source this often")
    m.add_argument("--checkpoint-interval-ms", type=int, default=5_000,
                   help="translate group offsets this often")
    m.add_argument("--session-timeout-ms", type=int, default=10_000,
                   help="the mirror's group session on the source: a killed mirror's partitions move after it")
    m.add_argument("--topics-interval-ms", type=int, default=10_000,
                   help="look for new matching topics (and grown partition counts) on the source this often")
    m.add_argument("--report-interval-ms", type=int, default=5_000, help="log copied records and lag this often")
    m.add_argument("--status-port", type=int, default=None, metavar="PORT",
                   help="serve the last lag report as JSON on 127.0.0.1:PORT")
    for role in ("source", "target"):
        add_tls_arguments(m, role)
    m.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    m.add_argument("--log-format", default="text", choices=list(LOG_FORMATS))
    m.set_defaults(func=cmd_mirror)
