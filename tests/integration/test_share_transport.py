"""Share groups on the record transport (ShareFetch / ShareAcknowledge as API_SHARE_FETCH /
API_SHARE_ACKNOWLEDGE frames) and what a fetch writes to __consumer_offsets, against a real broker."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest

from logbroker import Admin, Producer, QueueConsumer, wire
from logbroker.client.metadata_cache import MetadataCache
from logbroker.client.streams import SHARE_FETCH_STREAM
from logbroker.client.wire_connection import WireConnection
from logbroker.group.offsets import OFFSETS_TOPIC
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import BrokerProcess
from tests.integration.test_share_groups import Stubs, offsets, settle
from tests.integration.test_streams import high_watermark
from tests.integration.test_wire_transport import data_port, read_response

pytestmark = pytest.mark.timeout(120)
OFFSETS_PARTITIONS = 2


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    b = broker_factory(extra_args=["--offsets-topic-partitions", str(OFFSETS_PARTITIONS)])
    with Admin(b.address) as admin:
        admin.create_topic("q", partitions=2)
    with Producer(b.address, acks=-1) as producer:
        for i in range(20):
            producer.send("q", b"value-%d" % i, key=b"k%d" % i)
        producer.flush()
    return b


def _call(sock: socket.socket, api: int, corr: int, request: pb.ShareFetchRequest | pb.ShareAcknowledgeRequest) -> bytes:
    body = request.SerializeToString()
    sock.sendall(wire.request_header(api, corr, len(body)) + body)
    got_corr, status, answer = read_response(sock)
    assert (got_corr, status) == (corr, wire.STATUS_OK), answer
    return answer


def test_share_fetch_and_acknowledge_as_record_transport_frames(broker):
    Stubs(broker.address).broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
    with socket.create_connection(("127.0.0.1", data_port(broker)), timeout=20) as sock:
        fetch = pb.ShareFetchRequest(group="g", member_id="m", member_epoch=0, topics=["q"], max_records=5,
                                     max_wait_ms=1000, settings=pb.ShareGroupSettings(auto_offset_reset="earliest"))
        resp = pb.ShareFetchResponse.FromString(_call(sock, wire.API_SHARE_FETCH, 1, fetch))
        assert resp.error_code == pb.NONE, resp.error_message
        assert len(offsets(resp)) == 5 and all(p.records for p in resp.partitions)
        ack = pb.ShareAcknowledgeRequest(group="g", member_id="m", member_epoch=resp.member_epoch,
                                         acknowledgements=settle(resp))
        acked = pb.ShareAcknowledgeResponse.FromString(_call(sock, wire.API_SHARE_ACKNOWLEDGE, 2, ack))
    assert acked.error_code == pb.NONE and [r.error_code for r in acked.results] == [pb.NONE] * len(acked.results)
    d = Stubs(broker.address).describe()
    assert sum(p.acknowledged for p in d.partitions) == 5


def _consume_all(c: QueueConsumer, want: int) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + 30
    while len(got) < want and time.monotonic() < deadline:
        for m in c.poll(500):
            got.append(m.value)
            m.ack()
    assert all(e is None for e in c.commit_acks().values())
    return got


@pytest.mark.parametrize("transport", ["tcp", "grpc"])
def test_queue_consumer_uses_the_transport_asked_for(broker, transport: str):
    md = MetadataCache(broker.address, transport=transport)
    try:
        c = QueueConsumer(md, "g", ["q"], auto_offset_reset="earliest")
        got = _consume_all(c, 20)
        assert sorted(got) == sorted(b"value-%d" % i for i in range(20))
        if transport == "tcp":
            assert c._streams is not None
            conns = [s for k, s in c._streams._streams.items() if k[0] == SHARE_FETCH_STREAM]
            assert conns and all(type(s) is WireConnection and s.inline for s in conns), conns
        else:
            assert c._streams is None  # unary gRPC calls
        c.close()
        assert c._streams is None or not c._streams._streams  # released on close
    finally:
        md.close()


def _offsets_log_end(broker: BrokerProcess) -> int:
    return sum(high_watermark(broker.address, OFFSETS_TOPIC, p) for p in range(OFFSETS_PARTITIONS))


def test_an_acquisition_alone_writes_nothing_a_settle_writes_it(broker):
    """Acquiring writes no snapshot (module doc of group/share_coordinator.py); the acknowledgement
    does, and holds the acquisitions too: after kill -9 the unacknowledged come back with count 2."""
    stubs = Stubs(broker.address)
    stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
    first = stubs.fetch("a", 0, max_records=1, max_wait_ms=1000, auto_offset_reset="earliest")  # creates
    assert first.error_code == pb.NONE, first.error_message
    before = _offsets_log_end(broker)
    epoch, taken = first.member_epoch, offsets(first)
    for _ in range(5):
        resp = stubs.fetch("a", epoch, max_records=2, max_wait_ms=1000)
        assert resp.error_code == pb.NONE and offsets(resp), resp.error_message
        epoch, taken = resp.member_epoch, taken | offsets(resp)
    assert len(taken) == 11
    assert _offsets_log_end(broker) == before  # 5 acquisitions: nothing written
    acked = sorted(taken)[:3]
    acks = [pb.ShareAcknowledgement(topic="q", partition=p, ranges=[
        pb.AcknowledgeRange(first_offset=o, last_offset=o, type=1) for (pp, o) in acked if pp == p]) for p in (0, 1)]
    assert all(r.error_code == pb.NONE for r in stubs.ack("a", epoch, [a for a in acks if a.ranges]).results)
    assert _offsets_log_end(broker) > before
    stubs.channel.close()
    broker.kill()
    broker.start()
    again_stubs = Stubs(broker.address)
    again_stubs.broker.FindCoordinator(pb.FindCoordinatorRequest(group="g"), timeout=10)
    again = again_stubs.fetch("b", 0, max_records=100, max_wait_ms=1000)
    assert again.error_code == pb.NONE, again.error_message
    back = offsets(again)
    assert not back & set(acked)  # acknowledged: never again
    assert taken - set(acked) <= back  # acquired, unsettled: handed out again
    counts = {(p.partition, o): a.delivery_count for p in again.partitions for a in p.acquired
              for o in range(a.first_offset, a.last_offset + 1)}
    assert {counts[o] for o in taken - set(acked) if o[0] in {p for p, _ in acked}} == {2}
    again_stubs.channel.close()
