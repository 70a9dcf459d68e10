"""Issue 19 item 3: overload protection on a real broker process.

A broker with a small in-flight bound (server/admission.py) and 200 producers sending big batches
at once (half over gRPC streams, half on the record transport): the broker refuses what it has no
room for (RESOURCE_EXHAUSTED with a retry-after, counted in its metrics), its anonymous RSS stays
bounded (loosely: sampled every 10 ms), the producers retry (client/call_errors.py,
client/circuit.py) until every record is acknowledged, and every acknowledged record is in the log.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from logbroker import wire
from logbroker.client import Admin, Consumer, Producer
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import BrokerProcess, free_port, wait_for
from tests.integration.test_streams import fetch_req, produce_req
from tests.integration.test_wire_transport import data_port, frame, produce_frame, read_response

pytestmark = pytest.mark.timeout(180)

PRODUCERS = 200
PARTITIONS = 4
BIG_RECORDS, BIG_VALUE_BYTES = 12, 64 << 10  # 768 KiB a producer: a gRPC stream request (>= 64 KiB)
SMALL_RECORDS, SMALL_VALUE_BYTES = 6, 8 << 10  # 48 KiB: a record-transport frame
INFLIGHT_BYTES_MAX = 1 << 20
PEAK_GROWTH_MAX_KIB = 384 << 10  # the broker's anonymous memory may grow by this much at most


def _kib(status_path: Path, field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB$", status_path.read_text(), re.M)
    assert found is not None, field
    return int(found.group(1))


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found is not None, name
    return float(found.group(1))


def _produce(bootstrap: str, index: int, start: threading.Barrier, acked: list[bytes], errors: list[BaseException],
             lock: threading.Lock) -> None:
    big = index % 2 == 0
    count, size = (BIG_RECORDS, BIG_VALUE_BYTES) if big else (SMALL_RECORDS, SMALL_VALUE_BYTES)
    try:
        with Producer(bootstrap, linger_ms=50, retry_backoff_ms=20, delivery_timeout_ms=90_000,
                      request_timeout_ms=30_000) as producer:
            start.wait(60)
            futures = []
            for i in range(count):
                key = b"p%03d-%02d" % (index, i)
                futures.append((key, producer.send("overload", key + b"." * (size - len(key)), key=key)))
            producer.flush(90)
            done = [key for key, f in futures if f.result(1) is not None]
        with lock:
            acked.extend(done)
    except BaseException as exc:  # collected: the test fails naming it
        with lock:
            errors.append(exc)


def test_two_hundred_producers_at_once_get_retriable_refusals_and_every_acked_record_is_in_the_log(
        broker_factory) -> None:
    metrics_port = free_port()
    broker: BrokerProcess = broker_factory(extra_args=[
        "--max-inflight-request-bytes", str(INFLIGHT_BYTES_MAX), "--overload-retry-after-ms", "50",
        "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with Admin(broker.address) as admin:
        admin.create_topic("overload", partitions=PARTITIONS)
    assert broker.proc is not None
    status = Path(f"/proc/{broker.proc.pid}/status")
    anon_before_kib = _kib(status, "RssAnon")

    acked: list[bytes] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(PRODUCERS)
    threads = [threading.Thread(target=_produce, args=(broker.bootstrap, i, start, acked, errors, lock), daemon=True)
               for i in range(PRODUCERS)]
    peak_anon_kib = [_kib(status, "RssAnon")]
    sampling = threading.Event()

    def sample() -> None:  # the broker's anonymous memory (its heap: requests, buffers), not its mmap'd log
        while not sampling.wait(0.01):
            peak_anon_kib[0] = max(peak_anon_kib[0], _kib(status, "RssAnon"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    elapsed_s = time.monotonic() - began
    sampling.set()
    sampler.join(5)
    assert not any(t.is_alive() for t in threads), "producers still running"
    assert errors == [], errors[:3]

    offered_bytes = PRODUCERS // 2 * (BIG_RECORDS * BIG_VALUE_BYTES + SMALL_RECORDS * SMALL_VALUE_BYTES)
    peak_growth_kib = peak_anon_kib[0] - anon_before_kib
    refusals = _metric(metrics_port, "logbroker_overload_refusals_total")
    print(f"{PRODUCERS} producers, {offered_bytes >> 20} MiB offered, {elapsed_s:.1f} s, {refusals:.0f} refusals, "
          f"anonymous RSS {anon_before_kib >> 10} MiB before, peak +{peak_growth_kib >> 10} MiB")
    assert refusals > 0, "no request was refused: the bound was not reached"
    assert _metric(metrics_port, "logbroker_inflight_requests") == 0
    assert _metric(metrics_port, "logbroker_inflight_request_bytes") == 0
    # loose: measured +74..+76 MiB here (7-10 s, 50-65 refusals). What the bound holds is the requests
    # being handled; most of the peak is gRPC's receive buffers, which take a stream message in whole
    # before the handler can refuse it (see server/admission.py)
    assert peak_growth_kib < PEAK_GROWTH_MAX_KIB, (peak_growth_kib, offered_bytes)

    expected = PRODUCERS // 2 * (BIG_RECORDS + SMALL_RECORDS)
    assert len(acked) == expected
    seen: dict[bytes, int] = {}
    deadline = time.monotonic() + 60
    with Consumer(broker.bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([("overload", p) for p in range(PARTITIONS)])
        while len(seen) < expected and time.monotonic() < deadline:
            for m in consumer.poll(timeout_ms=500):
                assert m.key is not None
                seen[m.key] = seen.get(m.key, 0) + 1
    assert set(acked) <= set(seen), f"{len(set(acked) - set(seen))} acknowledged records missing from the log"
    assert "Traceback" not in broker.log_text()


def test_a_request_over_the_in_flight_count_is_refused_on_both_transports_with_a_retry_after(broker_factory) -> None:
    metrics_port = free_port()
    broker: BrokerProcess = broker_factory(extra_args=[
        "--max-inflight-requests", "2", "--overload-retry-after-ms", "70",
        "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with Admin(broker.address) as admin:
        admin.create_topic("busy", partitions=1)
    sock = socket.create_connection(("127.0.0.1", data_port(broker)), timeout=20)
    try:
        # two long polls on an empty partition take both places
        sock.sendall(b"".join(frame(wire.API_FETCH, corr, fetch_req("busy", 0, 0, max_wait_ms=3000).SerializeToString())
                              for corr in (1, 2)))
        wait_for(lambda: _metric(metrics_port, "logbroker_inflight_requests") == 2, 10, "two parked fetches")
        with broker.channel() as channel, pytest.raises(grpc.RpcError) as refused:
            pbg.BrokerStub(channel).Produce(produce_req("busy", 0, b"v"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (wire.RETRY_AFTER_METADATA, "70") in tuple(refused.value.trailing_metadata())
        assert wire.retry_after_ms(refused.value.details()) == 70
        sock.sendall(produce_frame(3, "busy", b"w"))
        answers = [read_response(sock) for _ in range(3)]  # in request order: the fetches end first
        assert [(corr, status) for corr, status, _ in answers] == [
            (1, wire.STATUS_OK), (2, wire.STATUS_OK), (3, wire.status_number(grpc.StatusCode.RESOURCE_EXHAUSTED))]
        assert wire.retry_after_ms(answers[2][2].decode()) == 70
        sock.sendall(produce_frame(4, "busy", b"x"))  # the connection goes on, and there is room again
        corr, status, body = read_response(sock)
        assert (corr, status) == (4, wire.STATUS_OK) and pb.ProduceResponse.FromString(body).results[0].base_offset == 0
    finally:
        sock.close()
    assert _metric(metrics_port, "logbroker_overload_refusals_total") == 2
    assert "refused 1 request(s) for overload" in broker.log_text()


def test_a_big_frame_is_refused_from_its_header_and_its_bytes_dropped_and_the_connection_goes_on(
        broker_factory) -> None:
    metrics_port = free_port()
    broker: BrokerProcess = broker_factory(extra_args=[
        "--max-inflight-request-bytes", str(1 << 20), "--metrics-listen", f"127.0.0.1:{metrics_port}"])
    with Admin(broker.address) as admin:
        admin.create_topic("big", partitions=1)
    sock = socket.create_connection(("127.0.0.1", data_port(broker)), timeout=20)
    try:
        sock.sendall(frame(wire.API_FETCH, 1, fetch_req("big", 0, 0, max_wait_ms=3000).SerializeToString()))
        wait_for(lambda: _metric(metrics_port, "logbroker_inflight_requests") == 1, 10, "a parked fetch")
        big = produce_frame(2, "big", b"x" * (3 << 19))  # 1.5 MiB: over the bound beside the fetch
        sock.sendall(big[: 64 << 10])  # the header and a little: refused already, before the rest comes
        wait_for(lambda: _metric(metrics_port, "logbroker_overload_refusals_total") == 1, 10, "the refusal")
        assert _metric(metrics_port, "logbroker_inflight_request_bytes") < 64 << 10  # the big frame is not counted
        sock.sendall(big[64 << 10 :] + produce_frame(3, "big", b"after"))
        answers = [read_response(sock) for _ in range(3)]
        assert [(corr, status) for corr, status, _ in answers] == [
            (1, wire.STATUS_OK), (2, wire.status_number(grpc.StatusCode.RESOURCE_EXHAUSTED)), (3, wire.STATUS_OK)]
        assert wire.retry_after_ms(answers[1][2].decode()) is not None
        assert pb.ProduceResponse.FromString(answers[2][2]).results[0].base_offset == 0  # the big one was not written
    finally:
        sock.close()
