"""`logbroker console --listen HOST:PORT --bootstrap ADDR[,ADDR] [--read-write]`: serve the web console.

Read-only unless --read-write. Served on 127.0.0.1:8090 by default (loopback: put a reverse proxy with
authentication in front before listening elsewhere). The console is a client of the cluster: the same
--bootstrap, --tls*/--sasl* flags as every client command (logbroker/cli_tls.py). SIGTERM or Ctrl-C
stops it."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from logbroker.errors import LogbrokerError

LISTEN_DEFAULT = "127.0.0.1:8090"


class ConsoleCliError(LogbrokerError):
    """A usage problem (printed as one line by cli.main, exit 1)."""


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConsoleCliError(f"--listen expects HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def cmd_console(args: argparse.Namespace) -> int:
    from logbroker.cli_tls import sasl_from_args, tls_from_args
    from logbroker.console.reader import ClientOptions, ClusterReader
    from logbroker.console.server import Console, make_server
    from logbroker.console.views import LagHistory

    host, port = parse_listen(args.listen)
    if args.request_timeout_ms < 100 or args.lag_sample_s < 0.1 or args.lag_samples < 1:
        raise ConsoleCliError("--request-timeout-ms >= 100, --lag-sample-s >= 0.1 and --lag-samples >= 1")
    options = ClientOptions(args.bootstrap, tls_from_args(args), sasl_from_args(args), args.request_timeout_ms)
    reader = ClusterReader(options, LagHistory(args.lag_samples), args.lag_sample_s)
    try:
        server = make_server(Console(reader, args.read_write), host, port)
    except OSError as exc:
        reader.close()
        raise ConsoleCliError(f"cannot listen on {args.listen}: {exc.strerror}") from None
    reader.start()
    stop = threading.Event()

    def on_signal(_signum: int, _frame: object) -> None:
        stop.set()
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    mode = "read-write" if args.read_write else "read-only"
    print(f"logbroker console ({mode}) on http://{args.listen}/ for {args.bootstrap}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        reader.close()
    return 0


def add_console_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    c = sub.add_parser("console", parents=[common], help="serve a web console over the cluster (read-only by default)",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    c.add_argument("--listen", default=LISTEN_DEFAULT, metavar="HOST:PORT",
                   help=f"where to serve the console (default {LISTEN_DEFAULT}: loopback only)")
    c.add_argument("--read-write", action="store_true",
                   help="allow changes from the console (create topics, delete a group's offsets)")
    c.add_argument("--request-timeout-ms", type=int, default=5000,
                   help="bound of every request to the cluster (default 5000)")
    c.add_argument("--lag-sample-s", type=float, default=10.0,
                   help="seconds between two samples of every group's lag (default 10)")
    c.add_argument("--lag-samples", type=int, default=360,
                   help="lag samples kept per group, in memory (default 360: one hour at 10 s)")
    c.set_defaults(func=cmd_console)
