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


def _handler(pipeline_max: int = rpc.STREAM_PIPELINE_MAX) -> Any:
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
