"""logbroker/client/streams.py against small in-process gRPC servers (127.0.0.1, port 0)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from logbroker.client import streams as streams_mod
from logbroker.client.streams import PRODUCE_STREAM, BrokerStreams, StreamError
from logbroker.v1 import logbroker_pb2 as pb

pytestmark = pytest.mark.timeout(30)


def _response(req: pb.ProduceRequest, base: int) -> pb.ProduceResponse:
    return pb.ProduceResponse(results=[pb.ProducePartitionResult(
        topic=req.partitions[0].topic, partition=req.partitions[0].partition, base_offset=base)])


class Server:
    """A Broker with only the methods given (raw bytes handlers)."""

    def __init__(self, methods: dict[str, Any]) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("logbroker.v1.Broker", methods),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.address = f"127.0.0.1:{self.port}"

    def streams(self) -> BrokerStreams:
        def unary_for(method: str, address: str) -> Callable[..., Any]:
            name = method.rsplit("/", 1)[1].removesuffix("Stream")
            return self.channel.unary_unary(f"/logbroker.v1.Broker/{name}",
                                            request_serializer=pb.ProduceRequest.SerializeToString,
                                            response_deserializer=pb.ProduceResponse.FromString).future
        return BrokerStreams(lambda _address: self.channel, unary_for)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(0)


def req(i: int) -> pb.ProduceRequest:
    return pb.ProduceRequest(acks=1, partitions=[pb.ProducePartition(topic="t", partition=i)])


def test_pipelined_requests_are_matched_to_responses_in_order_on_one_stream():
    opened = []

    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        opened.append(1)
        for n, raw in enumerate(requests):
            yield _response(pb.ProduceRequest.FromString(raw), n).SerializeToString()

    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    streams = srv.streams()
    try:
        futs = [streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(i), 10) for i in range(200)]
        results = [f.result(10) for f in futs]
        assert [r.results[0].partition for r in results] == list(range(200))
        assert [r.results[0].base_offset for r in results] == list(range(200))
        assert opened == [1]  # one stream carried them all
    finally:
        streams.close()
        srv.close()


def test_a_broker_without_the_stream_method_gets_unary_calls_with_the_pending_requests_resent():
    unary_calls = []

    def produce(raw: bytes, context: Any) -> bytes:
        r = pb.ProduceRequest.FromString(raw)
        unary_calls.append(r.partitions[0].partition)
        return _response(r, 7).SerializeToString()

    srv = Server({"Produce": grpc.unary_unary_rpc_method_handler(produce)})
    streams = srv.streams()
    try:
        futs = [streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(i), 10) for i in range(5)]
        assert [f.result(10).results[0].partition for f in futs] == list(range(5))
        later = streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(9), 10)
        assert later.result(10).results[0].base_offset == 7
        assert sorted(unary_calls) == [0, 1, 2, 3, 4, 9]
    finally:
        streams.close()
        srv.close()


def test_a_request_without_a_response_by_its_deadline_fails_the_stream_and_a_new_one_opens():
    release = threading.Event()
    opened = []

    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        opened.append(1)
        for raw in requests:
            r = pb.ProduceRequest.FromString(raw)
            if r.partitions[0].partition == 0:
                release.wait(20)  # hangs: the client's deadline passes first
                return
            yield _response(r, 1).SerializeToString()

    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    streams = srv.streams()
    try:
        t0 = time.monotonic()
        hung = streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(0), 0.3)
        behind = streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(1), 10)
        for f in (hung, behind):
            with pytest.raises(StreamError) as info:
                f.result(10)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 5
        again = streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(2), 10)
        assert again.result(10).results[0].partition == 2
        assert len(opened) == 2
    finally:
        release.set()
        streams.close()
        srv.close()


def test_close_fails_pending_requests_and_later_sends():
    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for _ in requests:
            pass  # never answers
        return iter(())

    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    streams = srv.streams()
    try:
        pending = streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(0), 10)
        streams.close()
        with pytest.raises(StreamError) as info:
            pending.result(5)
        assert info.value.code() == grpc.StatusCode.CANCELLED
        after = streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(1), 10)
        with pytest.raises(StreamError):
            after.result(1)
    finally:
        srv.close()


def test_a_request_sent_while_the_watchdog_scans_still_times_out(monkeypatch: pytest.MonkeyPatch):
    """The watchdog's notify() for a send() during its unlocked scan must not be lost."""
    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for _ in requests:
            pass  # never answers
        return iter(())

    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    streams = srv.streams()
    scanning, sent = threading.Event(), threading.Event()
    original = streams_mod._Stream.head_deadline

    def slow_head_deadline(self: Any) -> float | None:
        if threading.current_thread().name == "logbroker-stream-watchdog" and not sent.is_set():
            scanning.set()
            sent.wait(5)  # the scan goes on only after the send() below
        return original(self)

    try:
        streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(0), 100.0, lane=0)
        monkeypatch.setattr(streams_mod._Stream, "head_deadline", slow_head_deadline)
        streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(1), 50.0, lane=1)  # wakes it
        assert scanning.wait(5)
        t0 = time.monotonic()
        short = streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(2), 0.5, lane=2)
        sent.set()
        with pytest.raises(StreamError) as info:
            short.result(5)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3
    finally:
        sent.set()
        streams.close()
        srv.close()


def test_a_status_ending_the_stream_is_the_oldest_pending_requests_only():
    """Requests behind the refused one fail retriably: the broker may have handled them already."""
    from logbroker.client.producer import is_retriable, rpc_error

    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for n, raw in enumerate(requests):
            r = pb.ProduceRequest.FromString(raw)
            if n == 0:
                yield _response(r, 0).SerializeToString()
            elif n == 3:  # 1 and 2 read (and, in a real broker, maybe appended) but not answered
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "request 1 too large")

    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    streams = srv.streams()
    try:
        futs = [streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(i), 10) for i in range(4)]
        assert futs[0].result(10).results[0].partition == 0
        errors = []
        for f in futs[1:]:
            with pytest.raises(StreamError) as info:
                f.result(10)
            errors.append(info.value)
        assert errors[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not is_retriable(rpc_error(errors[0]))
        for e in errors[1:]:
            assert e.code() == grpc.StatusCode.UNAVAILABLE
            assert "earlier request" in e.details()
            assert is_retriable(rpc_error(e))
    finally:
        streams.close()
        srv.close()


def test_a_send_past_the_pending_bound_fails_retriably(monkeypatch: pytest.MonkeyPatch):
    from logbroker.client.producer import is_retriable, rpc_error

    def stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for _ in requests:
            pass  # never answers
        return iter(())

    monkeypatch.setattr(streams_mod, "STREAM_PENDING_MAX", 2)
    srv = Server({"ProduceStream": grpc.stream_stream_rpc_method_handler(stream)})
    streams = srv.streams()
    try:
        futs = [streams.send(PRODUCE_STREAM, pb.ProduceResponse, srv.address, req(i), 10) for i in range(3)]
        assert not futs[0].done() and not futs[1].done()
        with pytest.raises(StreamError) as info:
            futs[2].result(1)
        assert is_retriable(rpc_error(info.value))
    finally:
        streams.close()
        srv.close()
