"""Issue 13 item 11: a plain client replays the brokers' own RPCs against a real cluster (ZooKeeper +
3 brokers) — a replica Fetch as a follower, LeaderAndIsr with controller epoch + 1 to a follower,
UpdateMetadata, StopReplica with delete to a leader, ControlledShutdown with broker epoch 0 — without
the cluster secret and with a wrong one. Every call is refused before it is read, nothing changes, and
every acknowledged record is still readable. Also: a restarted broker answers Metadata "not ready"
(UNAVAILABLE, retried by clients), not "unknown topic", until the controller's metadata reaches it."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import grpc
import pytest

from logbroker import Admin, Consumer, Producer, wire
from logbroker.cluster.cluster_secret import CLUSTER_SECRET_HEADER, call_metadata
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.cluster import Cluster
from tests.conftest import BrokerProcess, wait_for

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

TOPIC = "acked"
PARTITIONS = 2
RECORDS = 300


@pytest.fixture
def cluster(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=10_000,
                extra_args=["--replica-lag-time-max-ms", "3000"])
    try:
        yield c.start()
    finally:
        c.stop()


def attacks(c: Cluster, leader: int, follower: int, controller: int, controller_epoch: int) -> list[tuple[int, str, pb.Message]]:
    """(target broker, Service/Method, request): the calls that lost 819 of 1,381 records."""
    states = c.partition_states(TOPIC)
    st = states[0]
    usurp = pb.PartitionState(topic=TOPIC, partition=0, controller_epoch=controller_epoch + 1, leader=follower,
                              leader_epoch=st.leader_epoch + 1, isr=[follower], replicas=list(st.replicas),
                              zk_version=99)
    live = [pb.BrokerInfo(broker_id=i, host="127.0.0.1", port=b.port) for i, b in c.brokers.items()]
    return [
        (leader, "Broker/Fetch", pb.FetchRequest(replica_id=follower, max_wait_ms=0, partitions=[
            pb.FetchPartition(topic=TOPIC, partition=0, fetch_offset=0, partition_max_bytes=1 << 20,
                              current_leader_epoch=st.leader_epoch)])),
        (follower, "Replica/LeaderAndIsr", pb.LeaderAndIsrRequest(
            controller_id=follower, controller_epoch=controller_epoch + 1, partitions=[usurp], live_brokers=live,
            topic_configs_json={TOPIC: json.dumps({})})),
        (leader, "Replica/UpdateMetadata", pb.UpdateMetadataRequest(
            controller_id=leader, controller_epoch=controller_epoch + 1, brokers=live[:1], deleted_topics=[TOPIC])),
        (leader, "Replica/StopReplica", pb.StopReplicaRequest(
            controller_id=follower, controller_epoch=controller_epoch + 1, delete_partitions=True,
            partitions=[pb.TopicPartition(topic=TOPIC, partition=p) for p in range(PARTITIONS)])),
        (controller, "Replica/ControlledShutdown", pb.ControlledShutdownRequest(broker_id=leader, broker_epoch=0)),
        (leader, "Replica/OffsetForLeaderEpoch", pb.OffsetForLeaderEpochRequest(replica_id=follower, partitions=[
            pb.OffsetForLeaderEpochPartition(topic=TOPIC, partition=0, current_leader_epoch=st.leader_epoch,
                                             leader_epoch=st.leader_epoch)])),
    ]


def call(address: str, method: str, request: pb.Message, metadata: tuple[tuple[str, bytes], ...] | None,
         stream: bool = False) -> grpc.RpcError | None:
    """One raw call as any gRPC client can make it; the error it ends with (None: answered)."""
    with grpc.insecure_channel(address) as ch:
        return raw_call(ch, method, request, metadata, stream)


def raw_call(ch: grpc.Channel, method: str, request: pb.Message, metadata: tuple[tuple[str, bytes], ...] | None,
             stream: bool = False) -> grpc.RpcError | None:
    """`method` ("Service/Name" of logbroker.v1) called on `ch`, unary or as a one-message stream; the
    error it ends with (None: answered)."""
    service, name = method.split("/")
    path = f"/logbroker.v1.{service}/{name}"
    try:
        if stream:
            fn = ch.stream_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                  response_deserializer=lambda b: b)
            list(fn(iter([request]), timeout=10, metadata=metadata))
        else:
            ch.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                           response_deserializer=lambda b: b)(request, timeout=10, metadata=metadata)
    except grpc.RpcError as e:
        return e
    return None


def wire_call(c: Cluster, i: int, request: pb.FetchRequest) -> tuple[int, str]:
    """A Fetch frame on broker i's record transport (logbroker/wire.py): (status, body as text)."""
    brokers = {b.broker_id: b for b in c.describe_cluster().brokers}
    with socket.create_connection(("127.0.0.1", brokers[i].data_port), timeout=10) as sock:
        sock.settimeout(10)
        body = request.SerializeToString()
        sock.sendall(wire.request_header(wire.API_FETCH, 1, len(body)) + body)
        header = b""
        while len(header) < wire.HEADER_BYTES:
            chunk = sock.recv(wire.HEADER_BYTES - len(header))
            assert chunk, "connection closed"
            header += chunk
        size, _corr, status = wire.RESPONSE_HEADER.unpack(header)
        rest = b""
        while len(rest) < size - wire.SIZE_MIN:
            chunk = sock.recv(size - wire.SIZE_MIN - len(rest))
            assert chunk, "connection closed"
            rest += chunk
    return status, rest.decode(errors="replace")


def produce_acknowledged(bootstrap: str) -> set[bytes]:
    acked: set[bytes] = set()
    with Producer(bootstrap, acks="all", linger_ms=2) as producer:
        futures = [(v, producer.send(TOPIC, v, key=v)) for v in (f"rec-{i}".encode() for i in range(RECORDS))]
        for value, fut in futures:
            fut.result(timeout=60)
            acked.add(value)
    return acked


def read_all(bootstrap: str, expected: int) -> set[bytes]:
    got: set[bytes] = set()
    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([(TOPIC, p) for p in range(PARTITIONS)])
        wait_for(lambda: (got.update(m.value for m in consumer.poll(timeout_ms=300)), len(got) >= expected)[1],
                 60, f"{expected} records")
    return got


def test_a_plain_client_cannot_make_inter_broker_calls_and_loses_no_acknowledged_record(cluster: Cluster):
    c = cluster
    with Admin(c.bootstrap) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3, config={"min_insync_replicas": "2"})
    wait_for(lambda: all(len(s.isr) == 3 for s in c.partition_states(TOPIC).values()), 60, "ISR of 3")
    acked = produce_acknowledged(c.bootstrap)
    wait_for(lambda: all(len(s.isr) == 3 for s in c.partition_states(TOPIC).values()), 60, "ISR of 3")
    before = {p: (s.leader, s.leader_epoch, list(s.isr)) for p, s in c.partition_states(TOPIC).items()}
    described = c.describe_cluster()
    controller, controller_epoch = described.controller_id, described.controller_epoch
    leader = before[0][0]
    follower = next(i for i in c.brokers if i != leader)

    wrong = ((CLUSTER_SECRET_HEADER, b"not-the-cluster-secret-at-all"),)
    for metadata, code in ((None, grpc.StatusCode.UNAUTHENTICATED), (wrong, grpc.StatusCode.PERMISSION_DENIED)):
        for target, method, request in attacks(c, leader, follower, controller, controller_epoch):
            err = call(c.brokers[target].address, method, request, metadata)
            assert err is not None, f"{method} to broker {target} was served without the secret"
            assert err.code() == code, (method, err.code(), err.details())
            assert ("needs the cluster secret" if metadata is None else "wrong cluster secret") in (err.details() or "")
        # the replica fetch on the client-facing stream is refused too
        fetch = attacks(c, leader, follower, controller, controller_epoch)[0]
        err = call(c.brokers[leader].address, "Broker/FetchStream", fetch[2], metadata, stream=True)
        assert err is not None and err.code() == code, err

    # ... and on the record transport, which carries no secret at all
    fetch_request = attacks(c, leader, follower, controller, controller_epoch)[0][2]
    status, message = wire_call(c, leader, fetch_request)
    assert wire.status_code(status) == grpc.StatusCode.UNAUTHENTICATED and "needs the cluster secret" in message

    # positive control: the same read-only call with the right secret is answered
    secret = call_metadata(c.secret_file.read_bytes().strip())
    ofle = attacks(c, leader, follower, controller, controller_epoch)[-1]
    assert call(c.brokers[leader].address, ofle[1], ofle[2], secret) is None

    # nothing changed: leaders, epochs, ISRs, controller epoch, every replica's data, every record
    after = {p: (s.leader, s.leader_epoch, list(s.isr)) for p, s in c.partition_states(TOPIC).items()}
    assert after == before
    for i in c.brokers:  # each broker's own view agrees (its metadata was not rewritten)
        assert {p: s.leader for p, s in c.partition_states(TOPIC, via=i).items()} == {p: v[0] for p, v in before.items()}
    assert (c.describe_cluster().controller_id, c.describe_cluster().controller_epoch) == (controller, controller_epoch)
    for i in c.brokers:
        assert all(c.replica_batches(i, TOPIC, p) for p in range(PARTITIONS)), f"broker {i} lost its replica"
    assert read_all(c.bootstrap, len(acked)) == acked
    for i in c.brokers:  # and the cluster still works: the real controller's calls are accepted
        assert c.brokers[i].proc is not None and c.brokers[i].proc.poll() is None
    assert len(produce_acknowledged(c.bootstrap)) == RECORDS
    assert "refused LeaderAndIsr" in c.brokers[follower].log_text()


def test_a_standalone_broker_refuses_every_inter_broker_call(broker: BrokerProcess):
    for method, request in (("Replica/LeaderAndIsr", pb.LeaderAndIsrRequest(controller_epoch=1)),
                            ("Replica/StopReplica", pb.StopReplicaRequest(delete_partitions=True)),
                            ("Broker/Fetch", pb.FetchRequest(replica_id=1))):
        for metadata in (None, ((CLUSTER_SECRET_HEADER, b"0123456789abcdef0123"),)):
            err = call(broker.address, method, request, metadata)
            assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err)
            assert "standalone" in (err.details() or "")
    assert call(broker.address, "Broker/Fetch", pb.FetchRequest(replica_id=-1), None) is None  # consumers: served


def metadata_answer(address: str) -> str:
    """What a client's Metadata call for TOPIC gets: 'ok', 'unknown' or 'unavailable: <details>'."""
    with grpc.insecure_channel(address) as ch:
        try:
            resp = pbg.BrokerStub(ch).Metadata(pb.MetadataRequest(topics=[TOPIC]), timeout=5)
        except grpc.RpcError as e:
            return f"{e.code().name.lower()}: {e.details()}"
    t = resp.topics[0]
    return "unknown" if t.error_code == pb.UNKNOWN_TOPIC_OR_PARTITION else "ok" if t.error_code == pb.NONE else str(t)


def test_a_restarted_broker_says_not_ready_until_the_controller_metadata_arrives(cluster: Cluster):
    c = cluster
    with Admin(c.bootstrap) as admin:
        admin.create_topic(TOPIC, partitions=1, replication_factor=1)
    controller = c.describe_cluster().controller_id
    other = next(i for i in c.brokers if i != controller)
    wait_for(lambda: metadata_answer(c.brokers[other].address) == "ok", 30, "the topic known everywhere")
    c.brokers[other].stop()
    c.sigstop(controller)  # no controller to send metadata: the restarted broker must say "not ready"
    try:
        b = c.brokers[other]
        b.start(timeout_s=60, wait_serving=False)
        answers: list[str] = []
        wait_for(lambda: (answers.append(metadata_answer(b.address)), "not received the cluster metadata" in answers[-1])[1],
                 30, "Metadata refused as not ready")
        assert answers[-1].startswith("unavailable:"), answers[-1]
        assert "unknown" not in answers and "ok" not in answers, answers
        # a producer bootstrapped on it alone, now: it retries "not ready" instead of failing
        sent: list[object] = []
        producing = threading.Thread(target=lambda: sent.append(produce_one(b.address)), daemon=True)
        producing.start()
        wait_for(lambda: "not received the cluster metadata" in metadata_answer(b.address), 10, "still not ready")
    finally:
        c.sigcont(controller)
    producing.join(timeout=90)
    assert sent and not isinstance(sent[0], Exception), sent
    assert metadata_answer(c.brokers[other].address) == "ok"


def produce_one(bootstrap: str) -> object:
    try:
        with Producer(bootstrap, acks="all", max_block_ms=60_000) as producer:
            return producer.send(TOPIC, b"v").result(timeout=60)
    except Exception as e:  # reported by the test
        return e
