"""The console's HTTP side on the standard library's http.server (a thread per request).

`Console.handle(method, path, query, form)` routes a request to a page and returns (status, HTML);
errors are pages with their message (400 bad input, 403 read-only or a bad form token, 404 unknown
topic/group/page, 502 the cluster's error or no answer in time), never a stack trace (that goes to
the log). Changes (POST) are refused unless the console runs with --read-write, and need the
per-process form token (csrf) and, when the browser sends one, an Origin of this console.
Every response carries a Content-Security-Policy without scripts."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import grpc

from logbroker.console import pages
from logbroker.console.markup import Markup
from logbroker.console.reader import ClusterReader
from logbroker.console.views import BrowseQuery, ConsoleInputError
from logbroker.errors import GroupIdNotFoundError, LogbrokerError, UnknownTopicOrPartitionError

log = logging.getLogger(__name__)

FORM_MAX_BYTES = 8 << 10
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class ConsoleForbiddenError(LogbrokerError):
    """A change asked of a read-only console, or a form without this console's token."""


class NotFoundError(LogbrokerError):
    """No such page."""


def _status_of(exc: BaseException) -> int:
    if isinstance(exc, ConsoleInputError):
        return 400
    if isinstance(exc, ConsoleForbiddenError):
        return 403
    if isinstance(exc, NotFoundError | UnknownTopicOrPartitionError | GroupIdNotFoundError):
        return 404
    return 502


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return f"the cluster answered {exc.code().name}: {exc.details()}"
    return " ".join(str(exc).split()) or type(exc).__name__


class Console:
    def __init__(self, reader: ClusterReader, read_write: bool = False) -> None:
        self.reader = reader
        self.read_write = read_write
        self.csrf = secrets.token_urlsafe(24)

    def handle(self, method: str, path: str, query: Mapping[str, str], form: Mapping[str, str]) -> tuple[int, Markup]:
        try:
            return 200, self._route(method, [unquote(s) for s in path.strip("/").split("/") if s], query, form)
        except (LogbrokerError, grpc.RpcError, TimeoutError, OSError) as exc:
            status = _status_of(exc)
            return status, pages.error_page(status, _one_line(exc))
        except Exception as exc:  # a bug of ours: the log has the trace, the page only the message
            log.exception("console: %s %s failed", method, path)
            return 500, pages.error_page(500, f"internal error: {type(exc).__name__}: {_one_line(exc)}")

    def _route(self, method: str, parts: list[str], query: Mapping[str, str], form: Mapping[str, str]) -> Markup:
        if method == "POST":
            return self._change(parts, form)
        rw, r = self.read_write, self.reader
        routes: dict[tuple[str, int], Callable[[], Markup]] = {
            ("", 0): lambda: pages.cluster_page(r.overview(), rw),
            ("topics", 1): lambda: pages.topics_page(r.overview(cluster_required=False), rw, self.csrf),
            ("topics", 2): lambda: pages.topic_page(*r.topic(parts[1])[:2], rw),
            ("groups", 1): lambda: pages.groups_page(r.groups(), rw),
            ("groups", 2): lambda: pages.group_page(r.group(parts[1]), r.history.samples(parts[1]), rw, self.csrf),
            ("queues", 1): lambda: pages.groups_page(r.queues(), rw, "Share groups (queues)", "/queues"),
            ("queues", 2): lambda: pages.queue_page(*r.queue(parts[1]), rw),
        }
        if len(parts) == 3 and parts[0] == "topics" and parts[2] == "messages":
            q = BrowseQuery.parse(parts[1], query)
            messages, t = r.browse(q)
            return pages.browse_page(q, t, messages, rw)
        route = routes.get((parts[0] if parts else "", len(parts)))
        if route is None:
            raise NotFoundError("no such page: /" + "/".join(parts))
        return route()

    def _change(self, parts: list[str], form: Mapping[str, str]) -> Markup:
        if not self.read_write:
            raise ConsoleForbiddenError("this console is read-only (start it with --read-write to allow changes)")
        if not secrets.compare_digest(form.get("csrf", ""), self.csrf):
            raise ConsoleForbiddenError("the form's token is not this console's: reload the page and try again")
        if parts == ["topics"]:
            name = form.get("name", "").strip()
            try:
                partitions, rf = int(form.get("partitions", "1")), int(form.get("replication_factor", "1"))
            except ValueError:
                raise ConsoleInputError("partitions and replication factor must be whole numbers") from None
            self.reader.create_topic(name, partitions, rf)
            return pages.page("Topic created", pages.html("<p>Created <a href='{}'>{}</a>.</p>",
                                                          pages.link("/topics", name), name), True)
        if len(parts) == 3 and parts[0] == "groups" and parts[2] == "delete":
            self.reader.delete_group(parts[1])
            return pages.page("Group deleted", pages.html("<p>Deleted the offsets of group {}.</p>", parts[1]), True)
        raise NotFoundError("no such action: /" + "/".join(parts))


def _handler(console: Console) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "logbroker-console"
        sys_version = ""

        def _reply(self, status: int, body: Markup) -> None:
            data = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            for k, v in SECURITY_HEADERS.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            self._reply(*console.handle("GET", url.path, dict(parse_qsl(url.query)), {}))

        def do_POST(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            origin = self.headers.get("Origin")
            host = self.headers.get("Host", "")
            if length > FORM_MAX_BYTES or length < 0:
                self._reply(400, pages.error_page(400, f"form larger than {FORM_MAX_BYTES} bytes"))
                return
            if origin is not None and urlsplit(origin).netloc != host:
                self._reply(403, pages.error_page(403, "a change from another site's page is refused"))
                return
            form = dict(parse_qsl(self.rfile.read(length).decode("utf-8", "replace")))
            self._reply(*console.handle("POST", url.path, {}, form))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
            log.info("console: %s " + format, self.address_string(), *args)

    return Handler


def make_server(console: Console, host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _handler(console))
    server.daemon_threads = True
    return server
