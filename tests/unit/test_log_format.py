"""--log-format json (logbroker/log_format.py) and the request log (server/request_log.py): no sockets."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from logbroker.log_format import REQUEST_FIELDS, JsonFormatter, formatter
from logbroker.server.request_context import LISTENER_RECORD, RequestContext
from logbroker.server.request_log import RequestLog, request_size
from logbroker.v1 import logbroker_pb2 as pb

CONTEXT = RequestContext(principal="User:bob", client_id="billing-7", peer="ipv4:10.0.0.7:51200",
                         listener=LISTENER_RECORD)


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.log_format")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    request_logger = logging.getLogger("logbroker.request")
    request_logger.addHandler(handler)
    yield logger, stream
    logger.removeHandler(handler)
    request_logger.removeHandler(handler)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    text = stream.getvalue()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # each line one valid object


def test_a_line_outside_a_request_has_the_base_fields_only(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("hello %s", "world")
    [line] = _lines(stream)
    assert line["message"] == "hello world" and line["level"] == "INFO" and line["logger"] == "test.log_format"
    assert set(line) == {"time", "level", "logger", "message"}
    time = str(line["time"])  # ISO 8601, UTC, milliseconds
    assert len(time) == len("2026-12-06T22:10:49.123Z") and time.endswith("Z") and time[10] == "T" and time[19] == "."


def test_a_line_inside_a_request_carries_its_context(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured

    async def api() -> bytes:
        logger.warning("inside")
        await asyncio.sleep(0)
        logger.warning("after an await")
        return b""

    async def main() -> None:
        await RequestLog(0).run("Produce", CONTEXT, pb.ProduceRequest(), api())
        logger.warning("outside")

    asyncio.run(main())
    inside, after, outside = _lines(stream)
    for line in (inside, after):
        assert line["api"] == "Produce" and line["client_id"] == "billing-7" and line["principal"] == "User:bob"
        assert line["peer"] == "ipv4:10.0.0.7:51200" and line["listener"] == "record"
    assert "api" not in outside and "client_id" not in outside
    assert REQUEST_FIELDS.get() is None


def test_an_exception_is_one_string_field_and_the_line_stays_one_line(
        captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("it failed")
    [line] = _lines(stream)
    assert line["message"] == "it failed"
    assert isinstance(line["exception"], str) and "ValueError: bad" in line["exception"]
    assert "Traceback" in line["exception"]


def test_extra_fields_and_values_that_are_not_json(captured: tuple[logging.Logger, io.StringIO]) -> None:
    logger, stream = captured
    logger.info("x", extra={"fields": {"count": 3, "obj": object(), "level": "spoofed"}})
    [line] = _lines(stream)
    assert line["count"] == 3 and str(line["obj"]).startswith("<object") and line["level"] == "INFO"


def test_formatter_names() -> None:
    assert isinstance(formatter("json"), JsonFormatter)
    assert not isinstance(formatter("text"), JsonFormatter)
    with pytest.raises(ValueError):
        formatter("xml")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(log: RequestLog, clock: _Clock, took_s: float, api: str = "Produce",
         request: object = None) -> None:
    async def call() -> bytes:
        clock.now += took_s
        return b"ok"

    req = request if request is not None else pb.ProduceRequest(partitions=[
        pb.ProducePartition(topic="a", partition=0), pb.ProducePartition(topic="a", partition=1),
        pb.ProducePartition(topic="b", partition=0)])
    assert asyncio.run(log.run(api, CONTEXT, req, call())) == b"ok"  # type: ignore[arg-type]


def test_a_slow_request_logs_one_warning_with_its_fields(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, stream = captured
    clock = _Clock()
    log = RequestLog(100, clock)
    _run(log, clock, 0.050)  # fast: nothing
    _run(log, clock, 0.100)  # at the threshold: nothing
    assert stream.getvalue() == ""
    _run(log, clock, 0.250)
    [line] = _lines(stream)
    assert line["level"] == "WARNING" and line["logger"] == "logbroker.request"
    assert line["api"] == "Produce" and line["duration_ms"] == 250 and line["client_id"] == "billing-7"
    assert line["principal"] == "User:bob" and line["partitions"] == 3 and line["topics"] == 2
    assert "slow request: Produce took 250 ms" in str(line["message"])


def test_a_long_poll_wait_is_not_slowness(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, stream = captured
    clock = _Clock()
    log = RequestLog(100, clock)
    _run(log, clock, 0.550, "Fetch", pb.FetchRequest(max_wait_ms=500))
    assert stream.getvalue() == ""
    _run(log, clock, 0.700, "Fetch", pb.FetchRequest(max_wait_ms=500))
    [line] = _lines(stream)
    assert line["api"] == "Fetch" and line["duration_ms"] == 700


def test_zero_disables_and_a_failed_call_is_still_measured(captured: tuple[logging.Logger, io.StringIO]) -> None:
    _, stream = captured
    clock = _Clock()
    _run(RequestLog(0, clock), clock, 10.0)
    assert stream.getvalue() == ""

    async def failing() -> bytes:
        clock.now += 1.0
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        asyncio.run(RequestLog(100, clock).run("Metadata", CONTEXT, pb.MetadataRequest(), failing()))
    [line] = _lines(stream)
    assert line["api"] == "Metadata" and line["duration_ms"] == 1000
    with pytest.raises(ValueError):
        RequestLog(-1)


def test_request_size_counts() -> None:
    assert request_size(pb.CreateTopicsRequest(topics=[pb.NewTopic(name="a"), pb.NewTopic(name="b")])) == {"topics": 2}
    assert request_size(pb.DeleteTopicsRequest(names=["a"])) == {"topics": 1}
    assert request_size(pb.DescribeClusterRequest()) == {}


def test_time_is_utc_iso_8601_with_milliseconds() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    record.created, record.msecs = 86400.25, 250.0
    assert json.loads(JsonFormatter().format(record))["time"] == "1970-01-02T00:00:00.250Z"
