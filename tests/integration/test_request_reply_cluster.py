"""Request-reply across brokers: a reply sent to a broker other than the requester's is forwarded
(Replica.ForwardReply) to the broker named in reply_to and pushed onto the requester's stream.
Two real brokers on a real ZooKeeper."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from logbroker import Admin, Requester, Responder
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster2(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path / "cluster", 2)
    try:
        yield c.start()
    finally:
        c.stop()


def test_a_reply_sent_to_the_other_broker_is_forwarded_to_the_requester(cluster2):
    with Admin(cluster2.bootstrap) as admin:
        admin.create_topic("fwd", partitions=2, replication_factor=1)
    with Requester(cluster2.bootstrap, timeout_ms=30_000) as req:
        future = req.request_async("fwd", b"question")
        reply_to = req._reply_stream().reply_to
        (corr,) = list(req._pending)
        home = int(reply_to.split(":")[0])
        other = cluster2.brokers[1 - home].address
        with grpc.insecure_channel(other) as ch:
            stub = pbg.BrokerStub(ch)
            sent = pb.ReplyRequest(reply_to=reply_to, correlation_id=corr, value=b"answer")
            sent.headers.add(key="h", value=b"v")
            assert stub.Reply(sent, timeout=10).error_code == pb.NONE
            reply = future.result(20)
            assert (reply.value, dict(reply.headers)) == (b"answer", {"h": b"v"})
            token = reply_to.split(":")[1]
            gone = stub.Reply(pb.ReplyRequest(reply_to=f"{home}:{token[::-1]}", correlation_id="x"), timeout=10)
            assert gone.error_code == pb.UNKNOWN_REPLY_TO and f"broker {home}" in gone.error_message
            nobody = stub.Reply(pb.ReplyRequest(reply_to=f"7:{token}", correlation_id="x"), timeout=10)
            assert nobody.error_code == pb.UNKNOWN_REPLY_TO and "not a live broker" in nobody.error_message
        with Responder(cluster2.bootstrap, "fwd", "svc", lambda m: b"re:" + m.value,
                       auto_offset_reset="earliest").start():
            assert req.request("fwd", b"again", timeout_ms=30_000).value == b"re:again"
