"""A real cluster for tests: the session's ZooKeeper plus N `logbroker serve --zookeeper` processes
on loopback, with helpers to kill -9, SIGSTOP/SIGCONT and restart broker i, and to read each
replica's log straight from its segment files."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

import grpc

from logbroker.storage import record_batch as rb
from logbroker.tls import TlsConfig
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import BrokerProcess, free_port, wait_for
from tests.zookeeper import ZooKeeperProcess


class Cluster:
    def __init__(self, zookeeper: ZooKeeperProcess, chroot: str, workdir: Path, size: int,
                 session_timeout_ms: int = 6000, extra_args: list[str] | None = None,
                 tls: TlsConfig | None = None) -> None:
        """`tls`: how the test reaches brokers serving TLS (their --tls-* flags go in extra_args)."""
        self.zookeeper = zookeeper
        self.chroot = chroot
        self.workdir = workdir
        self.session_timeout_ms = session_timeout_ms
        self.brokers: dict[int, BrokerProcess] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        self.secret_file = workdir / "cluster-secret"  # the secret the brokers share (cluster_secret.py)
        self.secret_file.write_bytes(secrets.token_hex(32).encode() + b"\n")
        for i in range(size):
            args = [
                "--zookeeper", f"{zookeeper.address}{chroot}", "--broker-id", str(i),
                "--cluster-secret-file", str(self.secret_file),
                "--zk-session-timeout-ms", str(session_timeout_ms), *(extra_args or []),
            ]
            self.brokers[i] = BrokerProcess(workdir / f"broker-{i}", free_port(), args, tls=tls)

    @property
    def bootstrap(self) -> str:
        return ",".join(b.address for b in self.brokers.values())

    def start(self, timeout_s: float = 60.0) -> Cluster:
        for b in self.brokers.values():
            b.start(timeout_s)
        wait_for(lambda: len(self.live_broker_ids()) == len(self.brokers), timeout_s, "every broker registered")
        return self

    def stop(self) -> None:
        for b in self.brokers.values():
            if b.proc is not None and b.proc.poll() is None:
                try:
                    b.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            b.stop()

    # -- faults ---------------------------------------------------------------------------------

    def kill9(self, i: int) -> None:
        self.brokers[i].kill(signal.SIGKILL)

    def sigstop(self, i: int) -> None:
        proc = self.brokers[i].proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)

    def sigcont(self, i: int) -> None:
        proc = self.brokers[i].proc
        assert proc is not None
        proc.send_signal(signal.SIGCONT)

    def restart(self, i: int, timeout_s: float = 60.0) -> None:
        b = self.brokers[i]
        b.stop()
        b.start(timeout_s)

    # -- views ----------------------------------------------------------------------------------

    def _stub(self, i: int | None = None) -> tuple[grpc.Channel, pbg.AdminStub, pbg.BrokerStub]:
        candidates = [self.brokers[i]] if i is not None else list(self.brokers.values())
        for b in candidates:
            if b.proc is not None and b.proc.poll() is None:
                ch = b.channel()
                return ch, pbg.AdminStub(ch), pbg.BrokerStub(ch)
        raise AssertionError("no broker running")

    def describe_cluster(self, via: int | None = None) -> pb.DescribeClusterResponse:
        ch, admin, _ = self._stub(via)
        try:
            return admin.DescribeCluster(pb.DescribeClusterRequest(), timeout=5)
        finally:
            ch.close()

    def live_broker_ids(self) -> set[int]:
        try:
            return {b.broker_id for b in self.describe_cluster().brokers}
        except grpc.RpcError:
            return set()

    def partition_states(self, topic: str, via: int | None = None) -> dict[int, pb.PartitionDescription]:
        ch, admin, _ = self._stub(via)
        try:
            d = admin.DescribeTopics(pb.DescribeTopicsRequest(names=[topic]), timeout=5).topics[0]
            return {p.partition: p for p in d.partitions}
        finally:
            ch.close()

    def leader_of(self, topic: str, partition: int) -> int:
        try:
            return self.partition_states(topic)[partition].leader
        except (grpc.RpcError, KeyError):
            return -1

    def high_watermark(self, topic: str, partition: int) -> int:
        """The high watermark as the partition's leader reports it (ListOffsets latest)."""
        leader = self.leader_of(topic, partition)
        assert leader >= 0, f"{topic}-{partition} has no leader"
        ch, _, broker = self._stub(leader)
        try:
            resp = broker.ListOffsets(pb.ListOffsetsRequest(partitions=[
                pb.ListOffsetsPartition(topic=topic, partition=partition, timestamp=-1)]), timeout=5)
            r = resp.results[0]
            assert r.error_code == pb.NONE, r
            return r.offset
        finally:
            ch.close()

    def replica_batches(self, i: int, topic: str, partition: int) -> list[bytes]:
        """Every well-formed batch in broker i's segment files of the partition, in order."""
        out: list[bytes] = []
        pdir = self.brokers[i].data_dir / f"{topic}-{partition}"
        for seg in sorted(pdir.glob("*.log")):
            data = seg.read_bytes()
            pos = 0
            while len(data) - pos >= rb.HEADER_SIZE:
                h = rb.parse_header(data, pos)
                size = h.batch_length + rb.LOG_OVERHEAD
                if h.batch_length < rb.MIN_BATCH_LENGTH or h.magic != rb.MAGIC or pos + size > len(data):
                    break
                out.append(data[pos:pos + size])
                pos += size
        return out
