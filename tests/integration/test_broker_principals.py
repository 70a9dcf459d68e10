"""Issue 18 item 4 on real brokers: in a 3-broker cluster with mTLS (real ZooKeeper), a client with a
VALID client certificate that is not a broker's calls the brokers' own RPCs — LeaderAndIsr with a
higher controller epoch, UpdateMetadata, StopReplica with delete, a replica Fetch (unary and stream),
ControlledShutdown, OffsetForLeaderEpoch — with and without the cluster secret. Without it the call
is UNAUTHENTICATED (the secret), with it PERMISSION_DENIED (not a broker principal); nothing changes
(leaders, epochs, ISR, every replica's data) and the cluster keeps replicating: the brokers' own
calls, made with their certificate (CN "broker", the default broker principal), still pass."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.cluster.cluster_secret import call_metadata
from logbroker.v1 import logbroker_pb2 as pb
from tests.cluster import Cluster
from tests.conftest import BrokerProcess, wait_for
from tests.integration.test_interbroker_auth import PARTITIONS, RECORDS, TOPIC, attacks, raw_call
from tests.integration.test_tls import Pki, pki  # noqa: F401 - the fixture

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.fixture
def tls_cluster(zookeeper, zk_chroot, tmp_path: Path, pki: Pki) -> Iterator[tuple[Cluster, Pki]]:  # noqa: F811
    # the test's client certificate (CN "client") is valid, trusted by the brokers, and not a broker's
    c = Cluster(zookeeper, zk_chroot, tmp_path / "cluster", 3, session_timeout_ms=10_000,
                extra_args=[*pki.broker_args("required"), "--replica-lag-time-max-ms", "3000"], tls=pki.client())
    try:
        yield c.start(), pki
    finally:
        c.stop()


def tls_call(broker: BrokerProcess, method: str, request: pb.Message,
             metadata: tuple[tuple[str, bytes], ...] | None, stream: bool = False) -> grpc.RpcError | None:
    """One raw call over TLS, presenting the client certificate `broker` was made with."""
    with broker.channel() as ch:
        return raw_call(ch, method, request, metadata, stream)


def produce(c: Cluster, certs: Pki, prefix: str) -> set[bytes]:
    acked: set[bytes] = set()
    with Producer(c.bootstrap, acks="all", linger_ms=2, tls=certs.client()) as producer:
        futures = [(v, producer.send(TOPIC, v, key=v)) for v in (f"{prefix}-{i}".encode() for i in range(RECORDS))]
        for value, fut in futures:
            fut.result(timeout=60)
            acked.add(value)
    return acked


def read_all(c: Cluster, certs: Pki, expected: int) -> set[bytes]:
    got: set[bytes] = set()
    with Consumer(c.bootstrap, auto_offset_reset="earliest", tls=certs.client()) as consumer:
        consumer.assign([(TOPIC, p) for p in range(PARTITIONS)])
        wait_for(lambda: (got.update(m.value for m in consumer.poll(timeout_ms=300)), len(got) >= expected)[1],
                 60, f"{expected} records")
    return got


def test_a_client_certificate_that_is_not_a_brokers_cannot_make_broker_only_calls(
        tls_cluster: tuple[Cluster, Pki]) -> None:
    c, certs = tls_cluster
    with Admin(c.bootstrap, tls=certs.client()) as admin:
        admin.create_topic(TOPIC, partitions=PARTITIONS, replication_factor=3, config={"min_insync_replicas": "2"})
    wait_for(lambda: all(len(s.isr) == 3 for s in c.partition_states(TOPIC).values()), 60, "ISR of 3 over mTLS")
    acked = produce(c, certs, "before")
    wait_for(lambda: all(len(s.isr) == 3 for s in c.partition_states(TOPIC).values()), 60, "ISR of 3")
    before = {p: (s.leader, s.leader_epoch, list(s.isr)) for p, s in c.partition_states(TOPIC).items()}
    described = c.describe_cluster()
    controller, controller_epoch = described.controller_id, described.controller_epoch
    leader = before[0][0]
    follower = next(i for i in c.brokers if i != leader)
    secret = call_metadata(c.secret_file.read_bytes().strip())

    calls = attacks(c, leader, follower, controller, controller_epoch)
    for metadata, code, says in ((None, grpc.StatusCode.UNAUTHENTICATED, "needs the cluster secret"),
                                 (secret, grpc.StatusCode.PERMISSION_DENIED, "not a broker principal")):
        for target, method, request in calls:
            err = tls_call(c.brokers[target], method, request, metadata)
            assert err is not None, f"{method} to broker {target} was served to a client certificate"
            assert err.code() == code and says in (err.details() or ""), (method, err.code(), err.details())
        err = tls_call(c.brokers[leader], "Broker/FetchStream", calls[0][2], metadata, stream=True)
        assert err is not None and err.code() == code and says in (err.details() or ""), err
    # the same client's ordinary fetch is served (it is refused as a broker, not as a client)
    assert tls_call(c.brokers[leader], "Broker/Fetch", pb.FetchRequest(max_wait_ms=0, partitions=[pb.FetchPartition(
        topic=TOPIC, partition=0, fetch_offset=0, partition_max_bytes=1 << 16)]), None) is None

    after = {p: (s.leader, s.leader_epoch, list(s.isr)) for p, s in c.partition_states(TOPIC).items()}
    assert after == before
    for i in c.brokers:
        assert {p: s.leader for p, s in c.partition_states(TOPIC, via=i).items()} == {p: v[0] for p, v in before.items()}
        assert all(c.replica_batches(i, TOPIC, p) for p in range(PARTITIONS)), f"broker {i} lost its replica"
    assert (c.describe_cluster().controller_id, c.describe_cluster().controller_epoch) == (controller, controller_epoch)
    assert read_all(c, certs, len(acked)) == acked
    # still replicating: acks=all with min ISR 2 needs the followers' fetches, and the ISR stays full
    more = produce(c, certs, "after")
    assert len(more) == RECORDS
    wait_for(lambda: all(len(s.isr) == 3 for s in c.partition_states(TOPIC).values()), 60, "ISR of 3 after")
    assert "not a broker principal" in c.brokers[follower].log_text()
    secret_text = c.secret_file.read_text().strip()
    key_lines = {line for f in certs.dir.glob("*.key") for line in f.read_text().splitlines()
                 if line and not line.startswith("-----")}
    for b in c.brokers.values():
        log = b.log_text()
        assert "Traceback" not in log
        # no secret in any log line: the cluster secret, a private key (its PEM lines or its marker)
        assert secret_text not in log and "PRIVATE KEY" not in log
        assert not any(line in log for line in key_lines), "a line of a private key in a broker's log"


def test_with_the_acl_authorizer_cluster_action_makes_a_broker(zookeeper, zk_chroot, tmp_path: Path,
                                                               pki: Pki) -> None:  # noqa: F811
    """--authorizer acl, brokers not in --broker-principals but super users (ClusterAction on the
    Cluster): the cluster replicates; a client certificate with the secret is still refused."""
    admin_tls = pki.client("admin")
    c = Cluster(zookeeper, zk_chroot, tmp_path / "cluster", 3, session_timeout_ms=10_000,
                extra_args=[*pki.broker_args("required"), "--replica-lag-time-max-ms", "3000",
                            "--authorizer", "acl", "--super-users", "User:broker,User:admin",
                            "--broker-principals", "User:someone-else"], tls=admin_tls)
    try:
        c.start()
        with Admin(c.bootstrap, tls=admin_tls) as admin:
            admin.create_topic(TOPIC, partitions=1, replication_factor=3, config={"min_insync_replicas": "2"})
        wait_for(lambda: len(c.partition_states(TOPIC)[0].isr) == 3, 60, "ISR of 3: the brokers' calls pass")
        with Producer(c.bootstrap, acks="all", tls=admin_tls) as producer:
            assert producer.send(TOPIC, b"acked", partition=0).result(30).offset == 0
        before = {p: (s.leader, s.leader_epoch, list(s.isr)) for p, s in c.partition_states(TOPIC).items()}
        described = c.describe_cluster()
        leader = before[0][0]
        follower = next(i for i in c.brokers if i != leader)
        secret = call_metadata(c.secret_file.read_bytes().strip())
        mallory = pki.client("mallory")  # the same brokers, reached with a valid non-broker certificate
        for target, method, request in attacks(c, leader, follower, described.controller_id,
                                               described.controller_epoch)[:3]:
            err = tls_call(BrokerProcess(c.brokers[target].data_dir, c.brokers[target].port, tls=mallory), method,
                           request, secret)
            assert err is not None and err.code() == grpc.StatusCode.PERMISSION_DENIED, (method, err)
        assert {p: (s.leader, s.leader_epoch, list(s.isr)) for p, s in c.partition_states(TOPIC).items()} == before
    finally:
        c.stop()
