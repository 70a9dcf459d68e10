"""server/admission.py: the in-flight counters and their refusals, and the gRPC adapters (server/rpc.py)
applying them, driven directly (no server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from logbroker import wire
from logbroker.server import rpc
from logbroker.server.admission import Admission
from logbroker.server.request_context import RequestRejected, RequestStatus
from logbroker.v1 import logbroker_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def test_requests_are_admitted_up_to_the_byte_bound_then_refused_with_a_retry_after():
    admission = Admission(request_bytes_max=1000, requests_max=0, retry_after_ms=250)
    admission.admit(600)
    admission.admit(400)
    with pytest.raises(RequestRejected) as refused:
        admission.admit(1)
    assert refused.value.status == RequestStatus.RESOURCE_EXHAUSTED
    assert refused.value.retry_after_ms == 250
    assert wire.retry_after_ms(refused.value.message) == 250
    assert "max_inflight_request_bytes" in refused.value.message
    assert (admission.inflight_bytes, admission.inflight_requests, admission.refused_total) == (1000, 2, 1)
    admission.release(600)
    admission.admit(500)  # room again once a request ends
    assert (admission.inflight_bytes, admission.inflight_requests) == (900, 2)


def test_requests_are_admitted_up_to_the_count_bound():
    admission = Admission(request_bytes_max=0, requests_max=2)
    admission.admit(10)
    admission.admit(10)
    with pytest.raises(RequestRejected, match="2 requests in flight"):
        admission.admit(10)
    admission.releaser(10)(None)
    admission.admit(10)
    assert admission.inflight_requests == 2


def test_one_request_over_the_byte_bound_is_admitted_alone_never_refused_forever():
    admission = Admission(request_bytes_max=100, requests_max=0)
    admission.admit(5000)
    with pytest.raises(RequestRejected):
        admission.admit(5000)
    admission.release(5000)
    assert admission.inflight_bytes == 0 and admission.inflight_requests == 0


def test_zero_bounds_are_off():
    admission = Admission(0, 0)
    for _ in range(10_000):
        admission.admit(1 << 30)
    assert admission.refused_total == 0


def test_the_retry_after_hint_is_read_only_from_the_end_of_a_message():
    assert wire.retry_after_ms(wire.with_retry_after("busy", 42)) == 42
    assert wire.retry_after_ms("request of 40 bytes is over the broker's limit of 10 (max_request_bytes)") is None
    assert wire.retry_after_ms("(retry-after-ms=5) then more") is None


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted: tuple[grpc.StatusCode, str, Any] | None = None

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any = ()) -> None:
        self.aborted = (code, details, trailing_metadata)
        raise Aborted(details)


def _raw(i: int, value_bytes: int = 100) -> bytes:
    return pb.ProduceRequest(partitions=[pb.ProducePartition(topic="t", partition=i, records=b"x" * value_bytes)]
                             ).SerializeToString()


def test_a_unary_call_over_the_bound_ends_resource_exhausted_with_retry_after_metadata():
    admission = Admission(request_bytes_max=150, requests_max=0, retry_after_ms=70)
    gate = asyncio.Event()

    async def answer(request: pb.ProduceRequest, context: Any) -> pb.ProduceResponse:
        await gate.wait()
        return pb.ProduceResponse()

    unary = rpc.method(pb.ProduceRequest, answer, admission=admission).unary_unary

    async def run() -> FakeContext:
        first = asyncio.ensure_future(unary(_raw(0), FakeContext()))
        await asyncio.sleep(0)  # the first call is admitted and waits
        assert admission.inflight_requests == 1
        refused = FakeContext()
        with pytest.raises(Aborted):
            await unary(_raw(1), refused)
        gate.set()
        await first
        return refused

    refused = asyncio.run(run())
    assert refused.aborted is not None
    code, details, trailing = refused.aborted
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and wire.retry_after_ms(details) == 70
    assert tuple(trailing) == ((wire.RETRY_AFTER_METADATA, "70"),)
    assert admission.inflight_requests == 0 and admission.inflight_bytes == 0  # released when answered


def test_a_stream_answers_what_it_admitted_then_ends_resource_exhausted_and_releases_everything():
    admission = Admission(request_bytes_max=250, requests_max=0, retry_after_ms=30)
    gate = asyncio.Event()

    async def answer(request: pb.ProduceRequest, context: Any) -> pb.ProduceResponse:
        await gate.wait()
        return pb.ProduceResponse(results=[pb.ProducePartitionResult(partition=request.partitions[0].partition)])

    async def requests() -> AsyncIterator[bytes]:
        yield _raw(0)
        yield _raw(1)
        gate.set()  # the third would pass the bound while the first two are in flight
        yield _raw(2)

    handler = rpc.stream_method(pb.ProduceRequest, answer, 8, admission=admission).stream_stream

    async def run() -> FakeContext:
        context = FakeContext()
        with pytest.raises(Aborted):
            await asyncio.wait_for(handler(requests(), context), 5)
        return context

    context = asyncio.run(run())
    assert [pb.ProduceResponse.FromString(w).results[0].partition for w in context.written] == [0, 1]
    assert context.aborted is not None and context.aborted[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert tuple(context.aborted[2]) == ((wire.RETRY_AFTER_METADATA, "30"),)
    assert admission.inflight_requests == 0 and admission.inflight_bytes == 0
