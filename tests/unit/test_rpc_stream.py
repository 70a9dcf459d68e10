"""logbroker/server/rpc.py `stream_method` driven directly (no server): how a stream handler ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from logbroker.server import rpc
from logbroker.v1 import logbroker_pb2 as pb

pytestmark = pytest.mark.timeout(30)


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


async def _answer(request: pb.ProduceRequest, context: Any) -> pb.ProduceResponse:
    return pb.ProduceResponse(results=[pb.ProducePartitionResult(partition=request.partitions[0].partition)])


def _handler(pipeline_max: int = 8) -> Any:
    return rpc.stream_method(pb.ProduceRequest, _answer, pipeline_max).stream_stream


def _raw(i: int) -> bytes:
    return pb.ProduceRequest(partitions=[pb.ProducePartition(topic="t", partition=i)]).SerializeToString()


def test_a_request_stream_that_breaks_ends_the_handler_after_the_responses_before_it():
    async def requests() -> AsyncIterator[bytes]:
        yield _raw(0)
        yield _raw(1)
        raise RuntimeError("connection reset")

    async def run() -> FakeContext:
        context = FakeContext()
        with pytest.raises(Aborted):
            await asyncio.wait_for(_handler()(requests(), context), 5)  # hung forever before
        return context

    context = asyncio.run(run())
    assert [pb.ProduceResponse.FromString(w).results[0].partition for w in context.written] == [0, 1]
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.UNAVAILABLE


def test_a_cancelled_request_reader_ends_the_handler():
    async def requests() -> AsyncIterator[bytes]:
        yield _raw(0)
        raise asyncio.CancelledError()

    async def run() -> FakeContext:
        context = FakeContext()
        await asyncio.wait_for(_handler()(requests(), context), 5)
        return context

    context = asyncio.run(run())
    assert len(context.written) == 1 and context.aborted is None


@pytest.mark.parametrize(("method", "request_cls", "most"), [
    ("ProduceStream", pb.ProduceRequest, rpc.PRODUCE_STREAM_PIPELINE_MAX),
    ("FetchStream", pb.FetchRequest, rpc.FETCH_STREAM_PIPELINE_MAX),
])
def test_the_broker_handles_few_requests_of_one_stream_at_once(monkeypatch: pytest.MonkeyPatch, method: str,
                                                                request_cls: Any, most: int):
    """Each may be a 32 MiB produce or a 64 MiB fetch response: a client needs no more than these."""
    from logbroker.server import broker_service

    assert most <= 8
    running, peak = [0], [0]
    release = asyncio.Event()

    async def slow(self: Any, request: Any, context: Any) -> bytes:
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await release.wait()
        running[0] -= 1
        return b""

    monkeypatch.setattr(broker_service.BrokerService, "produce", slow)
    monkeypatch.setattr(broker_service.BrokerService, "fetch", slow)
    generic = broker_service.handler(None, rpc.OpenStreams())  # type: ignore[arg-type]
    details = type("Details", (), {"method": f"/logbroker.v1.Broker/{method}", "invocation_metadata": ()})()
    handle = generic.service(details).stream_stream

    async def requests() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield request_cls().SerializeToString()

    async def run() -> FakeContext:
        context = FakeContext()
        task = asyncio.ensure_future(handle(requests(), context))
        for _ in range(200):  # let the reader take all it may
            await asyncio.sleep(0)
        assert peak[0] == most
        release.set()
        await asyncio.wait_for(task, 5)
        return context

    context = asyncio.run(run())
    assert len(context.written) == 20
    assert peak[0] == most
