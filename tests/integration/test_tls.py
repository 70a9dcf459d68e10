"""TLS on real broker processes (issue 18, item 1): every listener speaks TLS with --tls-*; with
--tls-client-auth required a client without a certificate, with one from another CA or an expired
one is refused with UNAUTHENTICATED over gRPC and over the record transport, a good one works;
a certificate rotated on disk is served to the next connection; a ZooKeeper cluster replicates
over mTLS between its brokers. Certificates are made here with trustme."""

from __future__ import annotations

import datetime
import logging
import os
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from logbroker import Admin, Consumer, Producer
from logbroker.client.metadata_cache import MetadataCache
from logbroker.client.tls_socket import TlsRefusedError
from logbroker.client.wire_connection import open_socket
from logbroker.errors import BrokerUnavailableError, UnauthenticatedError
from logbroker.tls import TlsConfig, probe
from logbroker.v1 import logbroker_pb2 as pb
from tests.cluster import Cluster
from tests.conftest import BrokerProcess, free_port, wait_for

pytestmark = pytest.mark.timeout(180)


@dataclass
class Pki:
    """A CA, the broker's certificate files and client configurations, all in `dir`."""

    dir: Path
    ca: trustme.CA

    def write_leaf(self, cert: trustme.LeafCert, name: str, ca: trustme.CA | None = None) -> tuple[str, str]:
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        # rotation writes a new file and renames it over the old, as cert-manager and friends do
        for path, data in ((cert_path, b"".join(c.bytes() for c in cert.cert_chain_pems)),
                           (key_path, cert.private_key_pem.bytes())):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return str(cert_path), str(key_path)

    @property
    def ca_file(self) -> str:
        return str(self.dir / "ca.pem")

    def broker_args(self, client_auth: str = "required") -> list[str]:
        cert, key = str(self.dir / "broker.pem"), str(self.dir / "broker.key")
        return ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", self.ca_file,
                "--tls-client-auth", client_auth]

    def client(self, name: str = "client", **kw: object) -> TlsConfig:
        cert, key = self.write_leaf(self.ca.issue_cert(name, common_name=name, **kw), name)  # type: ignore[arg-type]
        return TlsConfig(self.ca_file, cert, key)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    d = tmp_path / "pki"
    d.mkdir()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    p = Pki(d, ca)
    p.write_leaf(ca.issue_cert("127.0.0.1", "localhost", common_name="broker"), "broker")
    return p


@pytest.fixture
def tls_broker(pki: Pki, tmp_path: Path) -> Iterator[BrokerProcess]:
    b = BrokerProcess(tmp_path / "data", free_port(), pki.broker_args("required"), tls=pki.client("probe"))
    try:
        yield b.start()
    finally:
        b.stop()


def data_port(broker: BrokerProcess, tls: TlsConfig) -> int:
    with MetadataCache(broker.bootstrap, tls=tls) as cache:
        cache.refresh([])
        target = cache.data_address(broker.address)
    assert target is not None, "the broker advertises no record transport"
    return target[1]


def test_plaintext_to_tls_ports_fails(tls_broker: BrokerProcess, pki: Pki) -> None:
    with pytest.raises(BrokerUnavailableError), Admin(tls_broker.bootstrap, request_timeout_ms=2000) as admin:
        admin.create_topic("t")
    port = data_port(tls_broker, pki.client())
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:  # a plaintext Metadata frame
        s.sendall(struct.pack(">iiB", 5, 1, 3))
        assert s.recv(64) == b"", "a TLS port answered plaintext"
    # and the plaintext client sees no records: the broker accepted none of it
    assert "Traceback" not in tls_broker.log_text()


@pytest.mark.parametrize("which", ["none", "untrusted", "expired"])
def test_client_without_a_good_certificate_is_unauthenticated(tls_broker: BrokerProcess, pki: Pki,
                                                              tmp_path: Path, which: str) -> None:
    port = data_port(tls_broker, pki.client())  # asked with a good one
    if which == "none":
        bad = TlsConfig(pki.ca_file)
    elif which == "untrusted":
        other = trustme.CA()
        cert, key = pki.write_leaf(other.issue_cert("mallory", common_name="mallory"), "mallory")
        bad = TlsConfig(pki.ca_file, cert, key)
    else:
        bad = pki.client("old", not_before=datetime.datetime(2020, 1, 1), not_after=datetime.datetime(2021, 1, 1))
    # gRPC: Admin and Metadata
    with pytest.raises(UnauthenticatedError, match="refused this client's certificate"), \
            Admin(tls_broker.bootstrap, request_timeout_ms=3000, tls=bad) as admin:
        admin.create_topic("t")
    with pytest.raises(UnauthenticatedError), MetadataCache(tls_broker.bootstrap, tls=bad) as cache:
        cache.refresh([])
    # the data clients: a send and a poll raise it too (not retried until a timeout)
    with Producer(tls_broker.bootstrap, max_block_ms=10_000, tls=bad) as producer, \
            pytest.raises(UnauthenticatedError):
        producer.send("t", b"v")
    with pytest.raises(UnauthenticatedError), Consumer(tls_broker.bootstrap, topics=["t"], tls=bad) as consumer:
        consumer.poll(timeout_ms=5000)  # (its first metadata lookup, in the constructor, raises already)
    with Consumer(tls_broker.bootstrap, tls=bad) as assigned:
        assigned.assign([("t", 0)])
        with pytest.raises(UnauthenticatedError):
            assigned.poll(timeout_ms=5000)
    # the record transport: its own handshake is refused the same way
    with pytest.raises(TlsRefusedError, match="refused this client's certificate"):
        open_socket(("127.0.0.1", port), 3.0, bad.ssl_context())
    assert probe(("127.0.0.1", port), bad, grpc_port=False) is not None
    assert probe(("127.0.0.1", port), pki.client(), grpc_port=False) is None
    assert "Traceback" not in tls_broker.log_text()


def test_client_that_does_not_trust_the_broker_is_unauthenticated(tls_broker: BrokerProcess, pki: Pki) -> None:
    other = trustme.CA()
    other_ca = pki.dir / "other-ca.pem"
    other.cert_pem.write_to_path(str(other_ca))
    good = pki.client()
    with pytest.raises(UnauthenticatedError, match="not trusted"), \
            Admin(tls_broker.bootstrap, request_timeout_ms=3000,
                  tls=TlsConfig(str(other_ca), good.cert_file, good.key_file)) as admin:
        admin.list_topics()


def test_good_certificate_works_over_grpc_and_the_record_transport(
        tls_broker: BrokerProcess, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    good = pki.client()
    with Admin(tls_broker.bootstrap, tls=good) as admin:
        admin.create_topic("secure", partitions=2)
        assert "secure" in admin.list_topics()
    caplog.set_level(logging.INFO, logger="logbroker.client")
    with Producer(tls_broker.bootstrap, acks="all", linger_ms=1, tls=good) as producer:
        futures = [producer.send("secure", b"v%d" % i, key=b"k%d" % i) for i in range(200)]
        producer.flush(30)
        assert all(f.result().offset >= 0 for f in futures)
    got: list[bytes] = []
    with Consumer(tls_broker.bootstrap, auto_offset_reset="earliest", tls=good) as consumer:
        consumer.assign([("secure", 0), ("secure", 1)])
        wait_for(lambda: got.extend(m.value for m in consumer.poll(timeout_ms=200)) or len(got) >= 200, 30,
                 "every record consumed")
    assert sorted(got) == sorted(b"v%d" % i for i in range(200))
    # the data went over the record transport (no fallback to gRPC streams)
    assert not [r for r in caplog.records if "record transport" in r.getMessage()], caplog.text
    # and over gRPC streams too (transport="grpc")
    with Producer(tls_broker.bootstrap, acks="all", transport="grpc", tls=good) as producer:
        assert producer.send("secure", b"over-grpc", partition=0).result(30).offset >= 0


def test_many_threads_writing_while_responses_are_read_over_tls(tls_broker: BrokerProcess, pki: Pki) -> None:
    """A record-transport connection is written by the sending threads while its reader thread reads:
    over TLS that must not touch OpenSSL from two threads at once (tls_socket.py)."""
    import threading

    good = pki.client()
    with Admin(tls_broker.bootstrap, tls=good) as admin:
        admin.create_topic("busy", partitions=2)
    errors: list[BaseException] = []
    with Producer(tls_broker.bootstrap, acks=1, linger_ms=0, tls=good) as producer:
        def send(t: int) -> None:
            try:
                futures = [producer.send("busy", b"%d-%d" % (t, i) * 20, partition=i % 2) for i in range(1500)]
                for f in futures:
                    f.result(60)
            except BaseException as e:  # noqa: BLE001 - collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    assert not errors, errors[:3]
    got = 0
    with Consumer(tls_broker.bootstrap, auto_offset_reset="earliest", tls=good) as consumer:
        consumer.assign([("busy", 0), ("busy", 1)])

        def count() -> bool:
            nonlocal got
            got += len(consumer.poll(timeout_ms=200))
            return got >= 6000

        wait_for(count, 60, "every record read back")
    assert got == 6000


def served_certificate(address: tuple[str, int], tls: TlsConfig, alpn: bool) -> bytes:
    ctx = tls.ssl_context()
    if alpn:
        ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(address, timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=address[0]) as s:
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_rotated_certificate_is_served_to_the_next_connection(tls_broker: BrokerProcess, pki: Pki) -> None:
    good = pki.client()
    grpc_addr, data_addr = ("127.0.0.1", tls_broker.port), ("127.0.0.1", data_port(tls_broker, good))
    old = served_certificate(grpc_addr, good, alpn=True)
    assert served_certificate(data_addr, good, alpn=False) == old
    new_cert = pki.ca.issue_cert("127.0.0.1", "localhost", common_name="broker-rotated")
    pki.write_leaf(new_cert, "broker")
    new = ssl.PEM_cert_to_DER_cert(new_cert.cert_chain_pems[0].bytes().decode())
    assert new != old
    wait_for(lambda: served_certificate(grpc_addr, good, alpn=True) == new, 20, "gRPC serves the new certificate")
    wait_for(lambda: served_certificate(data_addr, good, alpn=False) == new, 20,
             "the record transport serves the new certificate")
    with Admin(tls_broker.bootstrap, tls=good) as admin:  # and calls work on it
        admin.create_topic("after-rotation")
    assert tls_broker.running()


def test_replaced_client_ca_refuses_the_old_one_on_every_listener(tls_broker: BrokerProcess, pki: Pki) -> None:
    """--tls-client-ca replaced by a new CA: clients of the old CA are refused from the next
    handshake on (not only added to: the record transport switches to a new context)."""
    old_client = pki.client("old-client")
    server_ca = pki.dir / "server-ca.pem"  # the clients keep trusting the broker's own (unchanged) CA
    server_ca.write_bytes((pki.dir / "ca.pem").read_bytes())
    old = TlsConfig(str(server_ca), old_client.cert_file, old_client.key_file)
    grpc_addr, data_addr = ("127.0.0.1", tls_broker.port), ("127.0.0.1", data_port(tls_broker, old))
    new_ca = trustme.CA()
    cert, key = pki.write_leaf(new_ca.issue_cert("new-client", common_name="new-client"), "new-client")
    new = TlsConfig(str(server_ca), cert, key)
    assert probe(data_addr, new, grpc_port=False) is not None, "a client of a CA not yet trusted was accepted"
    (pki.dir / "ca.tmp").write_bytes(new_ca.cert_pem.bytes())
    os.replace(pki.dir / "ca.tmp", pki.dir / "ca.pem")
    wait_for(lambda: probe(data_addr, old, grpc_port=False) is not None, 20, "the record transport refuses the old CA")
    assert probe(grpc_addr, old) is not None, "gRPC still accepts the old CA"
    assert probe(data_addr, new, grpc_port=False) is None and probe(grpc_addr, new) is None
    open_socket(data_addr, 3.0, new.ssl_context()).close()


def run_cli(broker: BrokerProcess, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LOGBROKER_TLS")}
    return subprocess.run([sys.executable, "-m", "logbroker", *args, "--bootstrap", broker.address],
                          capture_output=True, timeout=60, env={**base, **(env or {})})


def test_cli_flags_and_environment(tls_broker: BrokerProcess, pki: Pki) -> None:
    good = pki.client()
    ok = run_cli(tls_broker, "topics", "create", "from-cli", "--tls-ca", good.ca_file, "--tls-cert", good.cert_file,
                 "--tls-key", good.key_file)
    assert ok.returncode == 0, ok.stderr.decode()
    listed = run_cli(tls_broker, "topics", "list", env={"LOGBROKER_TLS_CA": good.ca_file,
                                                        "LOGBROKER_TLS_CERT": good.cert_file,
                                                        "LOGBROKER_TLS_KEY": good.key_file})
    assert listed.returncode == 0 and b"from-cli" in listed.stdout, listed.stderr.decode()
    refused = run_cli(tls_broker, "topics", "list", "--tls-ca", good.ca_file)  # no client certificate
    assert refused.returncode == 1
    err = refused.stderr.decode()
    assert err.count("\n") == 1 and "UNAUTHENTICATED" in err and "refused this client's certificate" in err, err
    health = subprocess.run([sys.executable, "-m", "logbroker", "health", "--address", tls_broker.address,
                             "--tls-ca", good.ca_file, "--tls-cert", good.cert_file, "--tls-key", good.key_file],
                            capture_output=True, timeout=60)
    assert health.returncode == 0 and health.stdout.strip() == b"SERVING", health.stderr.decode()
    missing = run_cli(tls_broker, "topics", "list", "--tls-cert", good.cert_file)
    assert missing.returncode == 1 and b"needs its key" in missing.stderr


@pytest.mark.timeout(300)
def test_cluster_replicates_over_mtls_between_brokers(zookeeper, zk_chroot, tmp_path: Path, pki: Pki) -> None:
    good = pki.client()
    c = Cluster(zookeeper, zk_chroot, tmp_path / "cluster", 3, session_timeout_ms=2000,
                extra_args=[*pki.broker_args("required"), "--replica-lag-time-max-ms", "3000"], tls=good)
    try:
        c.start()
        with Admin(c.bootstrap, tls=good) as admin:
            admin.create_topic("replicated", partitions=1, replication_factor=3, config={"min_insync_replicas": "2"})
        wait_for(lambda: len(c.partition_states("replicated").get(0, pb.PartitionDescription()).isr) == 3, 60,
                 "the followers joined the ISR over mTLS")
        with Producer(c.bootstrap, acks="all", tls=good) as producer:
            for i in range(100):
                producer.send("replicated", b"r%d" % i, partition=0)
            producer.flush(60)
        leader = c.leader_of("replicated", 0)
        c.kill9(leader)
        wait_for(lambda: c.leader_of("replicated", 0) not in (-1, leader), 60, "a new leader after kill -9")
        survivors = ",".join(b.address for i, b in c.brokers.items() if i != leader)
        got: list[bytes] = []
        with Consumer(survivors, auto_offset_reset="earliest", tls=good) as consumer:
            consumer.assign([("replicated", 0)])
            wait_for(lambda: got.extend(m.value for m in consumer.poll(timeout_ms=200)) or len(got) >= 100, 60,
                     "every acknowledged record read from the new leader")
        assert got == [b"r%d" % i for i in range(100)]
        for i, b in c.brokers.items():
            if i != leader:
                assert "Traceback" not in b.log_text()
    finally:
        c.stop()


@pytest.mark.timeout(300)
def test_brokers_reconnect_with_rotated_certificates_after_a_ca_change(zookeeper, zk_chroot, tmp_path: Path,
                                                                        pki: Pki) -> None:
    """Every TLS file replaced by ones from a new CA on the running brokers: a restarted broker trusts
    only the new CA, so the controller's and the leader's new connections to it must present the new
    certificates (their channels to other brokers are reopened after a rotation)."""
    good = pki.client()
    c = Cluster(zookeeper, zk_chroot, tmp_path / "cluster", 2, session_timeout_ms=2000,
                extra_args=[*pki.broker_args("required"), "--replica-lag-time-max-ms", "3000"], tls=good)
    try:
        c.start()
        with Admin(c.bootstrap, tls=good) as admin:
            admin.create_topic("rotating", partitions=2, replication_factor=2, config={"min_insync_replicas": "2"})
        wait_for(lambda: all(len(s.isr) == 2 for s in c.partition_states("rotating").values()), 60, "ISR of 2")
        controller = c.describe_cluster().controller_id
        other = 1 - controller
        new_ca = trustme.CA()  # the rotation: a new CA and everything re-issued from it, files replaced
        (pki.dir / "ca.tmp").write_bytes(new_ca.cert_pem.bytes())
        os.replace(pki.dir / "ca.tmp", pki.dir / "ca.pem")
        pki.write_leaf(new_ca.issue_cert("127.0.0.1", "localhost", common_name="broker"), "broker")
        pki.write_leaf(new_ca.issue_cert("client", common_name="client"), "client")
        wait_for(lambda: served_certificate(("127.0.0.1", c.brokers[controller].port), good, alpn=True) ==
                 ssl.PEM_cert_to_DER_cert((pki.dir / "broker.pem").read_text()), 20, "the new certificate served")
        c.kill9(other)
        c.restart(other)  # trusts only the new CA from its start
        wait_for(lambda: all(len(s.isr) == 2 for s in c.partition_states("rotating").values()), 90,
                 "the restarted broker got its roles from the controller and caught up (ISR of 2 again)")
        with Producer(c.bootstrap, acks="all", tls=good) as producer:
            assert producer.send("rotating", b"after", partition=0).result(30).offset >= 0
    finally:
        c.stop()


def test_metrics_over_https_with_metrics_tls(pki: Pki, tmp_path: Path) -> None:
    import urllib.request

    metrics_port = free_port()
    good = pki.client()
    b = BrokerProcess(tmp_path / "data", free_port(), [*pki.broker_args("required"), "--metrics-listen",
                                                       f"127.0.0.1:{metrics_port}", "--metrics-tls"], tls=good)
    try:
        b.start()
        url = f"https://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, context=good.ssl_context(), timeout=10) as resp:
            assert b"logbroker_" in resp.read()
        with pytest.raises(OSError):  # no client certificate: an alert or a bare close, both OSError
            urllib.request.urlopen(url, context=TlsConfig(pki.ca_file).ssl_context(), timeout=10).read()
        with pytest.raises(OSError):  # plaintext (URLError, a reset: both OSError)
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    finally:
        b.stop()


def test_worker_command_takes_the_tls_flags(pki: Pki, tmp_path: Path) -> None:
    import signal

    good = pki.client()
    b = BrokerProcess(tmp_path / "data", free_port(), [*pki.broker_args("required"), "--offsets-topic-partitions",
                                                       "2"], tls=good)
    app, out = tmp_path / "app", tmp_path / "handled.txt"
    app.mkdir()
    (app / "tls_app.py").write_text(
        "import os\n\ndef handle(m):\n"
        "    with open(os.environ['TLS_OUT'], 'a') as f:\n        f.write(m.value.decode() + '\\n')\n")
    worker = None
    try:
        b.start()
        with Admin(b.bootstrap, tls=good) as admin:
            admin.create_topic("jobs")
        with Producer(b.bootstrap, tls=good) as producer:
            for i in range(20):
                producer.send("jobs", b"job-%d" % i)
            producer.flush(30)
        worker = subprocess.Popen(
            [sys.executable, "-m", "logbroker", "worker", "tls_app:handle", "--group", "g", "--topic", "jobs",
             "--bootstrap", b.address, "--tls-ca", good.ca_file, "--tls-cert", good.cert_file,
             "--tls-key", good.key_file],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(app), os.environ.get("PYTHONPATH")])),
                 "TLS_OUT": str(out)})
        wait_for(lambda: out.exists() and len(out.read_text().splitlines()) >= 20, 60, "the worker handled every job")
        assert sorted(out.read_text().split()) == sorted(f"job-{i}" for i in range(20))
    finally:
        if worker is not None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
        b.stop()


def test_the_principal_is_the_client_certificates_common_name(pki: Pki, tmp_path: Path) -> None:
    """With mTLS and --authorizer acl, a call's principal is User:<CN> of its connection's
    certificate, on gRPC (Admin, Metadata) and on the record transport (produce, fetch) alike."""
    from logbroker.errors import PermissionDeniedError, TopicAuthorizationFailedError
    from logbroker.security.acl import AclBinding, Operation, PatternType, Permission, ResourceType

    b = BrokerProcess(tmp_path / "data", free_port(),
                      [*pki.broker_args("required"), "--authorizer", "acl", "--super-users", "User:admin"],
                      tls=pki.client("admin"))
    try:
        b.start()
        admin_tls, alice, bob = pki.client("admin"), pki.client("alice"), pki.client("bob")
        with Admin(b.bootstrap, tls=admin_tls) as admin:
            admin.create_topic("orders")
            admin.create_topic("secret")
            admin.create_acls([AclBinding("User:alice", "*", op, Permission.ALLOW, ResourceType.TOPIC, "orders",
                                          PatternType.LITERAL) for op in (Operation.WRITE, Operation.READ)])
        with Admin(b.bootstrap, tls=alice) as admin:
            wait_for(lambda: admin.list_topics() == ["orders"], 15, "alice to see only her topic")
            with pytest.raises(PermissionDeniedError):
                admin.create_topic("mine")
        with Producer(b.bootstrap, tls=alice) as p:
            p.send("orders", b"from-alice").get(timeout=15)
        with Consumer(b.bootstrap, tls=alice) as c:
            c.assign([("orders", 0)])
            c.seek_to_beginning()
            assert [m.value for m in c.poll(timeout_ms=5000)] == [b"from-alice"]
        with Producer(b.bootstrap, tls=bob, request_timeout_ms=5000) as p, \
                pytest.raises(TopicAuthorizationFailedError):
            p.send("orders", b"from-bob").get(timeout=15)
        # bob against alice's topic: fetch, commit, describe, delete are refused, and no answer carries
        # the topic's name (bob's own input aside), its records or its offsets
        errors: list[Exception] = []
        with Consumer(b.bootstrap, tls=bob, request_timeout_ms=5000) as c, \
                pytest.raises((PermissionDeniedError, TopicAuthorizationFailedError)) as e1:
            c.assign([("orders", 0)])  # (raised here: bob may not even look the topic up)
            c.seek("orders", 0, 0)
            c.poll(timeout_ms=5000)
        errors.append(e1.value)
        with Admin(b.bootstrap, tls=bob, request_timeout_ms=5000) as admin:
            for call in (lambda: admin.reset_offsets("bobs-group", "orders", "earliest"),
                         lambda: admin.describe_topic("orders"), lambda: admin.delete_topic("orders")):
                with pytest.raises((PermissionDeniedError, TopicAuthorizationFailedError)) as e2:
                    call()
                errors.append(e2.value)
        for err in errors:
            text = str(err).replace("'orders'", "")  # bob named it himself
            assert "from-alice" not in text and "orders" not in text and "offset" not in text.lower(), text
        with Admin(b.bootstrap, tls=admin_tls) as admin:
            assert admin.describe_topic("orders").partitions[0].log_end_offset == 1  # nothing of bob's landed
    finally:
        b.stop()
