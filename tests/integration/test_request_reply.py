"""Request-reply (Requester, Responder, the reply streams and Reply call) against real brokers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Requester, Responder
from logbroker.client.queue import QueueMessage
from logbroker.errors import RequestTimeoutError
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=["--offsets-topic-partitions", "2"])


def _echo(message: QueueMessage) -> tuple[bytes, dict[str, bytes]]:
    return b"re:" + (message.value or b""), {"served-by": b"x"}


def _data_dir_bytes(broker: BrokerProcess) -> dict[str, int]:
    return {str(p): p.stat().st_size for p in Path(broker.data_dir).rglob("*") if p.is_file()}


def test_many_concurrent_requests_each_get_their_own_reply(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("rpc", partitions=4)
    responders = [Responder(bootstrap, "rpc", "svc", _echo, auto_offset_reset="earliest").start() for _ in range(4)]
    try:
        with Requester(bootstrap, timeout_ms=60_000) as req:
            def ask(thread: int) -> list[tuple[bytes, bytes]]:
                futures = [req.request_async("rpc", b"t%d-r%d" % (thread, i)) for i in range(20)]
                return [(b"t%d-r%d" % (thread, i), f.result(90).value) for i, f in enumerate(futures)]

            with ThreadPoolExecutor(50) as pool:
                results = [pair for got in pool.map(ask, range(50)) for pair in got]
            assert len(results) == 1000
            assert all(reply == b"re:" + sent for sent, reply in results)
            one = req.request("rpc", b"hello", headers={"h": b"1"}, timeout_ms=30_000)
            assert one.value == b"re:hello" and dict(one.headers) == {"served-by": b"x"}
            assert req.late_replies == 0 and req.duplicate_replies == 0
        # a responder counts a request once its reply is confirmed, which may be just after the reply arrived
        wait_for(lambda: sum(r.handled for r in responders) == 1001, 10, "every request counted by a responder")
        from logbroker.client.wire_connection import WireConnection

        conns = [c for r in responders for c in r._sender._streams._streams.values()]
        assert conns and all(isinstance(c, WireConnection) for c in conns)  # replies on the record transport
    finally:
        for r in responders:
            r.close()


def test_request_without_responder_times_out_naming_the_topic(standalone):
    with Admin(standalone.address) as admin:
        admin.create_topic("nobody-home", partitions=1)
    with Requester(standalone.address) as req:
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="nobody-home"):
            req.request("nobody-home", b"x", timeout_ms=500)
        assert time.monotonic() - started < 10


def test_a_late_reply_is_dropped_and_counted(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("slow", partitions=1)
    gate = threading.Event()

    def slow(message: QueueMessage) -> bytes:
        gate.wait(30)
        return b"late"

    with Responder(bootstrap, "slow", "svc", slow, auto_offset_reset="earliest").start() as responder, \
            Requester(bootstrap) as req:
        with pytest.raises(RequestTimeoutError, match="slow"):
            req.request("slow", b"x", timeout_ms=1_000)
        gate.set()
        wait_for(lambda: req.late_replies == 1, 30, "the late reply counted")
        wait_for(lambda: responder.handled == 1, 30, "the late request acknowledged")


def test_reply_to_unknown_client_and_reply_too_large_are_refused(standalone):
    before = _data_dir_bytes(standalone)
    with grpc.insecure_channel(standalone.address) as ch:
        stub = pbg.BrokerStub(ch)
        unknown = stub.Reply(pb.ReplyRequest(reply_to=f"0:{'ab' * 16}", correlation_id="1",
                                             value=b"v"), timeout=10)
        assert unknown.error_code == pb.UNKNOWN_REPLY_TO and "no reply stream" in unknown.error_message
        other_broker = stub.Reply(pb.ReplyRequest(reply_to=f"9999:{'ab' * 16}", correlation_id="1"), timeout=10)
        assert other_broker.error_code == pb.UNKNOWN_REPLY_TO
        garbage = stub.Reply(pb.ReplyRequest(reply_to="nonsense", correlation_id="1"), timeout=10)
        assert garbage.error_code == pb.UNKNOWN_REPLY_TO and "not a reply address" in garbage.error_message
        big = stub.Reply(pb.ReplyRequest(reply_to=f"0:{'ab' * 16}", correlation_id="1",
                                         value=b"x" * ((1 << 20) + 1)), timeout=10)
        assert big.error_code == pb.REPLY_TOO_LARGE and "over the limit" in big.error_message
    assert _data_dir_bytes(standalone) == before


def test_reply_batch_over_grpc_answers_each_reply_in_order(standalone):
    """ReplyBatch (the responder's call on the record transport) is a unary gRPC call as well."""
    with Admin(standalone.address) as admin:
        admin.create_topic("nobody-answers", partitions=1)
    with Requester(standalone.address, timeout_ms=10_000) as req, grpc.insecure_channel(standalone.address) as ch:
        stream = req._reply_stream()  # open: its address is the first reply's reply_to
        fut = req.request_async("nobody-answers", b"q")
        corr = next(iter(req._pending))
        resp = pbg.BrokerStub(ch).ReplyBatch(pb.ReplyBatchRequest(replies=[
            pb.ReplyRequest(reply_to=stream.reply_to, correlation_id=corr, value=b"a"),
            pb.ReplyRequest(reply_to="nonsense", correlation_id="x"),
            pb.ReplyRequest(reply_to=f"0:{'ab' * 16}", correlation_id="y"),
        ]), timeout=10)
        assert [r.error_code for r in resp.results] == [pb.NONE, pb.UNKNOWN_REPLY_TO, pb.UNKNOWN_REPLY_TO]
        assert fut.result(timeout=10).value == b"a"


def test_a_too_large_reply_rejects_the_request_and_the_requester_times_out(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("huge", partitions=1)
    with Responder(bootstrap, "huge", "svc", lambda m: b"x" * (2 << 20), auto_offset_reset="earliest",
                   dead_letter_topic="").start() as responder, Requester(bootstrap) as req:
        with pytest.raises(RequestTimeoutError, match="huge"):
            req.request("huge", b"x", timeout_ms=3_000)
        wait_for(lambda: responder.failed == 1, 20, "the too-large reply refused")


RESPONDER_SCRIPT = """
import sys, time
from logbroker import Responder
slow = sys.argv[2] == "slow"
def handle(m):
    print("got", m.value.decode(), flush=True)
    if slow:
        time.sleep(3600)   # killed mid-request
    return b"re:" + m.value
r = Responder(sys.argv[1], "work", "svc", handle, auto_offset_reset="earliest", lock_ms=2000, max_poll_records=5)
print("ready", flush=True)
r.run()
"""


@pytest.mark.slow
def test_responder_killed_mid_request_every_request_gets_exactly_one_reply(standalone, tmp_path):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("work", partitions=2)
    script = tmp_path / "responder.py"
    script.write_text(RESPONDER_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    victim = subprocess.Popen([sys.executable, str(script), bootstrap, "slow"], env=env, stdout=subprocess.PIPE,
                              text=True)
    healthy: subprocess.Popen[str] | None = None
    try:
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        with Requester(bootstrap, timeout_ms=60_000) as req:
            futures = {i: req.request_async("work", b"%d" % i) for i in range(20)}
            got_line = victim.stdout.readline()
            assert got_line.startswith("got"), got_line  # it holds a request (and up to 4 more), mid-handler
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            healthy = subprocess.Popen([sys.executable, str(script), bootstrap, "fast"], env=env,
                                       stdout=subprocess.DEVNULL)
            replies = {i: f.result(60).value for i, f in futures.items()}
            assert replies == {i: b"re:%d" % i for i in range(20)}
            assert req.duplicate_replies == 0 and req.late_replies == 0
    finally:
        for proc in (victim, healthy):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


WORKER_APP = """
def handle(m):
    if m.value == b"bad":
        raise ValueError("bad request")
    return b"worker:" + m.value, {"by": "worker"}
"""


@pytest.mark.parametrize("processes", [False, True])
def test_queue_worker_answers_requests_with_its_return_value(standalone, tmp_path, processes):
    from tests.integration.test_worker import WorkerProcess

    with Admin(standalone.address) as admin:
        admin.create_topic("wq", partitions=2)
    app = tmp_path / "app"
    app.mkdir()
    (app / "wk_app.py").write_text(WORKER_APP)
    worker = WorkerProcess(standalone, app, tmp_path / "out.txt",
                           ["--queue", "--group", "wsvc", "--topic", "wq", "--auto-offset-reset", "earliest",
                            "--workers", "2", *(["--processes"] if processes else [])], {}, "rr-worker")
    try:
        with Requester(standalone.address, timeout_ms=60_000) as req:
            futures = [req.request_async("wq", b"%d" % i) for i in range(20)]
            got = [f.result(90) for f in futures]
            assert [r.value for r in got] == [b"worker:%d" % i for i in range(20)]
            assert all(dict(r.headers) == {"by": b"worker"} for r in got)
            with pytest.raises(RequestTimeoutError, match="wq"):
                req.request("wq", b"bad", timeout_ms=1_500)  # the handler raises: released, never answered
    finally:
        worker.reap()


def test_reply_streams_and_outcomes_are_in_the_metrics(broker_factory):
    import urllib.request

    from tests.conftest import free_port

    metrics_port = free_port()
    broker = broker_factory(extra_args=["--offsets-topic-partitions", "2",
                                        "--metrics-listen", f"127.0.0.1:{metrics_port}"])

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    with Admin(broker.address) as admin:
        admin.create_topic("m", partitions=1)
    with Responder(broker.address, "m", "svc", lambda m: b"ok", auto_offset_reset="earliest").start(), \
            Requester(broker.address) as req:
        assert req.request("m", b"x", timeout_ms=30_000).value == b"ok"
        with grpc.insecure_channel(broker.address) as ch:
            pbg.BrokerStub(ch).Reply(pb.ReplyRequest(reply_to="0:" + "ab" * 16, correlation_id="c"), timeout=10)
        text = scrape()
        assert "logbroker_reply_streams 1.0" in text
        assert 'logbroker_replies_total{outcome="delivered"} 1.0' in text
        assert 'logbroker_replies_total{outcome="unknown"} 1.0' in text
    wait_for(lambda: "logbroker_reply_streams 0.0" in scrape(), 20, "the closed stream unregistered")
