"""`logbroker worker MODULE:FUNCTION --group G --topic T`: the worker runtime on the command line.

Registered by logbroker/cli.py with `add_worker_parser`. Same conventions as the other commands:
`--bootstrap` from the shared parent parser; problems a user can cause are one line on stderr and
exit status 1 (a bad handler reference, a record whose handler failed for good); SIGTERM/SIGINT stop
gracefully with status 0, a second one at once.

The current directory is put on sys.path (as `python -m` does), so `logbroker worker app:handle` run
next to app.py finds it; otherwise use PYTHONPATH.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from logbroker.errors import LogbrokerError
from logbroker.log_format import LOG_FORMATS, configure_logging

DEFAULT_WORKERS = 4
DEFAULT_RETRY_BACKOFF_MS = 100
DEFAULT_RETRY_BACKOFF_MAX_MS = 5000
MAX_DELIVERY_ATTEMPTS_DEFAULT = 5  # worker/queue_runtime.py's


class WorkerCliError(LogbrokerError):
    """A usage problem found after parsing (printed as one line by cli.main, exit 1)."""


def cmd_worker(args: argparse.Namespace) -> int:
    from logbroker.worker import RetryPolicy, Worker

    configure_logging(args.log_level, args.log_format)
    if not args.topic and args.pattern is None:
        raise WorkerCliError("worker needs --topic (repeatable) or --pattern")
    if args.pattern is not None:
        try:
            re.compile(args.pattern)
        except re.error as e:
            raise WorkerCliError(f"--pattern {args.pattern!r} is not a regular expression: {e}") from None
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)  # children of --processes inherit sys.path
    if args.queue:
        return _run_queue_worker(args)
    consumer_config: dict[str, Any] = {"assignor": args.assignor, **_tls(args)}
    if args.session_timeout_ms:
        consumer_config["session_timeout_ms"] = args.session_timeout_ms
    try:
        worker = Worker(
            args.handler, group=args.group, topics=args.topic, pattern=args.pattern, bootstrap=args.bootstrap,
            workers=args.workers, processes=args.processes, max_in_flight=args.max_in_flight,
            ordering=args.ordering, on_failure=args.on_failure, grace_ms=args.grace_ms,
            commit_interval_ms=args.commit_interval_ms, auto_offset_reset=args.auto_offset_reset or "earliest",
            retry=RetryPolicy(args.retries, _or(args.retry_backoff_ms, DEFAULT_RETRY_BACKOFF_MS),
                              _or(args.retry_backoff_max_ms, DEFAULT_RETRY_BACKOFF_MAX_MS)),
            consumer_config=consumer_config,
        )
    except ValueError as e:
        raise WorkerCliError(str(e)) from None
    with worker.signals_stop():
        worker.run()
    return 0


def _tls(args: argparse.Namespace) -> dict[str, Any]:
    """The --tls* flags (shared parent parser) as the consumer's `tls` keyword, when given."""
    from logbroker.cli_tls import tls_from_args
    from logbroker.tls import TlsError

    try:
        tls = tls_from_args(args)
    except TlsError as e:
        raise WorkerCliError(str(e)) from None
    return {} if tls is None else {"tls": tls}


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _run_queue_worker(args: argparse.Namespace) -> int:
    """--queue: the handler over share group --group (worker/queue_runtime.py)."""
    from logbroker.worker.queue_runtime import QueueWorker

    if args.pattern is not None:
        raise WorkerCliError("--queue takes --topic, not --pattern")
    config: dict[str, Any] = {"auto_offset_reset": args.auto_offset_reset or "latest", **_tls(args)}
    for name in ("lock_ms", "retry_backoff_ms", "retry_backoff_max_ms", "dead_letter_topic"):
        if getattr(args, name) is not None:
            config[name] = getattr(args, name)
    try:
        worker = QueueWorker(
            args.handler, group=args.group, topics=args.topic, bootstrap=args.bootstrap, workers=args.workers,
            processes=args.processes, grace_ms=args.grace_ms, max_delivery_attempts=args.max_delivery_attempts,
            consumer_config=config,
        )
    except (ValueError, TypeError) as e:
        raise WorkerCliError(str(e)) from None
    with worker.signals_stop():
        worker.run()
    return 0


def add_worker_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    """Register `worker` on the top-level subparsers."""
    w = sub.add_parser(
        "worker", parents=[common], help="run a handler function over a consumer group (at least once)",
        description="Consume --topic/--pattern as a member of --group and call MODULE:FUNCTION(message) for "
        "each record on --workers threads (or processes). An offset is committed only after the handler "
        "returned for that record and every earlier one of its partition, so records are processed at least "
        "once. A failing handler is retried with backoff; then the worker stops with status 1 (--on-failure "
        "skip: log it and go on). SIGTERM/SIGINT: finish running records (up to --grace-ms), commit, leave "
        "the group, exit 0; records not finished go to the next member.",
    )
    w.add_argument("handler", metavar="MODULE:FUNCTION",
                   help="the handler, e.g. myapp.handlers:handle; called as handle(message) with a "
                   "logbroker.Message (topic, partition, offset, key, value, headers, timestamp)")
    w.add_argument("--group", required=True, help="consumer group to join")
    w.add_argument("--topic", action="append", default=[], help="topic to consume (repeatable)")
    w.add_argument("--pattern", default=None, metavar="REGEX",
                   help="consume every topic whose whole name matches, including topics created later")
    w.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"handler threads, or processes with --processes (default: {DEFAULT_WORKERS})")
    w.add_argument("--processes", action="store_true",
                   help="run the handler in child processes (for CPU-bound handlers; Message must be all it needs)")
    w.add_argument("--max-in-flight", type=int, default=1000,
                   help="records taken from the group but not yet committable; polling pauses at this many "
                   "(default: 1000)")
    w.add_argument("--ordering", choices=["partition", "key", "none"], default="partition",
                   help="partition: a partition's records one at a time, in order (default); key: in order per "
                   "key, keys in parallel; none: any record any time (commits stay contiguous)")
    w.add_argument("--retries", type=int, default=3, help="retries of a failed record before it fails (default: 3)")
    w.add_argument("--retry-backoff-ms", type=int, default=None,
                   help="wait before the first retry, doubled for each next one (default: 100; with --queue the "
                   "share group's setting, default: the broker's)")
    w.add_argument("--retry-backoff-max-ms", type=int, default=None,
                   help="longest wait between retries (default: 5000; with --queue the share group's setting)")
    w.add_argument("--on-failure", choices=["stop", "skip"], default="stop",
                   help="when a record failed every retry: stop with status 1, leaving it uncommitted (default), "
                   "or log it and commit past it")
    w.add_argument("--grace-ms", type=int, default=20_000,
                   help="on SIGTERM/SIGINT and on revocation, how long running records may take to finish "
                   "(default: 20000)")
    w.add_argument("--commit-interval-ms", type=int, default=1000, help="how often progress is committed (default: 1000)")
    w.add_argument("--auto-offset-reset", choices=["earliest", "latest"], default=None,
                   help="where a partition without a committed offset starts (default: earliest); with --queue "
                   "where a new share group starts (default: latest)")
    q = w.add_argument_group("queues (--queue)")
    q.add_argument("--queue", action="store_true",
                   help="consume --group as a SHARE group (queue semantics): any worker takes any message; "
                   "success acks it, an exception releases it (the group's retry backoff), the last attempt "
                   "rejects it to the dead-letter topic; --retries, --ordering, --max-in-flight and "
                   "--on-failure do not apply")
    q.add_argument("--lock-ms", type=int, default=None,
                   help="how long a taken message is this worker's before it goes back (group setting; default: "
                   "the broker's, 30000)")
    q.add_argument("--max-delivery-attempts", type=int, default=MAX_DELIVERY_ATTEMPTS_DEFAULT,
                   help=f"attempts before a message is dead-lettered (group setting; default: "
                   f"{MAX_DELIVERY_ATTEMPTS_DEFAULT})")
    q.add_argument("--dead-letter-topic", default=None,
                   help="where dead letters go (group setting; default: TOPIC.dlq; '' for none)")
    w.add_argument("--assignor", choices=["range", "roundrobin", "sticky"], default="sticky",
                   help="how the coordinator spreads partitions, when this member creates the group (default: sticky)")
    w.add_argument("--session-timeout-ms", type=int, default=0,
                   help="a member silent this long is evicted (default: the broker's)")
    w.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    w.add_argument("--log-format", default="text", choices=LOG_FORMATS,
                   help="text (default) or json: one JSON object per line (time, level, logger, message)")
    w.set_defaults(func=cmd_worker)
