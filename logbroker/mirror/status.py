"""`--status-port`: the mirror's last report as JSON over HTTP (GET any path), on 127.0.0.1.

    {"copied": 100000, "records_per_s": 81234.0, "assigned": true, "lag_total": 0,
     "lag": {"orders-0": 0, ...}}

The mirror's loop replaces the whole dict at each report (`Mirror.status`); the server thread only
reads the latest ({} before the first report).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class StatusServer:
    def __init__(self, snapshot: Callable[[], dict[str, Any]], port: int, host: str = "127.0.0.1") -> None:

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                body = json.dumps(snapshot()).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="mirror-status", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> StatusServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
