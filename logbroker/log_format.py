"""How the long-running commands (`serve`, `worker`) write their log: `--log-format text|json`.

text (the default): `2026-12-06 22:10:49,123 INFO logbroker.server.broker: message`, as always.

json: one object per line, standard library `logging` only (a `Formatter` subclass, no dependency):

    {"time": "2026-12-06T22:10:49.123Z", "level": "WARNING", "logger": "logbroker.request",
     "message": "slow request: Produce took 1532 ms", "api": "Produce", "client_id": "billing-7",
     "principal": "User:bob", "peer": "ipv4:10.0.0.7:51200", "listener": "record", "duration_ms": 1532, ...}

`time` is UTC, ISO 8601 with milliseconds. While a broker handles a request, `REQUEST_FIELDS` (a
context variable the request layer sets around each call: server/request_log.py) holds the caller's
request, whose fields (api, client_id, principal, peer, listener); every line logged in that time, on that task,
carries them. Outside a request they are absent. A line's own `extra={"fields": {...}}` adds more
fields (never overriding time/level/logger/message). An exception is one string field, `exception`
(the formatted traceback), so a line stays one line. Values that are not JSON types are written
with `str()`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Protocol

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestFields(Protocol):
    """The request being handled; its fields are built only when a line is formatted."""

    def log_fields(self) -> Mapping[str, Any]: ...


# the request being handled on this task (None: none); set by server/request_log.py
REQUEST_FIELDS: ContextVar[RequestFields | None] = ContextVar("logbroker_request_fields", default=None)
_RESERVED = frozenset({"time", "level", "logger", "message"})


def _iso_utc_ms(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for the fields)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": _iso_utc_ms(record), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        request = REQUEST_FIELDS.get()
        if request is not None:
            for key, value in request.log_fields().items():
                out.setdefault(key, value)
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            for key, value in extra.items():
                if key not in _RESERVED:
                    out[str(key)] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, separators=(",", ":"))


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of `--log-format` (ValueError for another name)."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r} (known: {', '.join(LOG_FORMATS)})")


def configure_logging(level: str, log_format: str = "text") -> None:
    """The root logger of a long-running command: `level` (debug, info, ...) and `log_format`, on stderr.
    Replaces the root's handlers (as logging.basicConfig(force=True))."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
