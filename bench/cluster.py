"""A logbroker cluster for the harness: ZooKeeper plus N `logbroker serve --zookeeper` brokers.

ZooKeeper starts exactly as `logbroker dev-cluster` and the tests start it (`ZooKeeperProcess`,
Debian's package), with one addition: like every server the harness starts it gets
PR_SET_PDEATHSIG, so even a `kill -9` of the harness takes it along. Brokers are `ServerProcess`es
(own session, PR_SET_PDEATHSIG, log file), each restartable on its data directory, which is what
the failover measurement needs. Everything binds 127.0.0.1 on free ports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bench.procs import STARTED_PIDS, ServerProcess, dying_with_parent, free_port

LOGBROKER_ROOT = Path(__file__).resolve().parents[1]
CHROOT = "/bench"
SERVING_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0  # a clean stop includes a controlled shutdown (leadership moves first)


def zookeeper_missing() -> str | None:
    """Why ZooKeeper cannot run here (naming the package), or None."""
    from logbroker.cluster.dev_cluster import zookeeper_available

    why = zookeeper_available()
    return f"{why} — needed for logbroker's cluster workloads" if why else None


@contextlib.contextmanager
def _popen_dies_with_harness() -> Iterator[None]:
    """`ZooKeeperProcess.start` calls `subprocess.Popen` through its module's `subprocess` name:
    for the length of this block only that name sees a Popen that runs the command through
    `dying_with_parent` (PR_SET_PDEATHSIG, then exec: the same process, the same argv after it)."""
    from logbroker.cluster import dev_cluster

    real = subprocess.Popen

    def popen(args: Sequence[str], *rest: Any, **kwargs: Any) -> subprocess.Popen[bytes]:
        return real(dying_with_parent(args), *rest, **kwargs)

    dev_cluster.subprocess = SimpleNamespace(**{**vars(subprocess), "Popen": popen})  # type: ignore[assignment]
    try:
        yield
    finally:
        dev_cluster.subprocess = subprocess


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(LOGBROKER_ROOT), os.environ.get("PYTHONPATH")])),
    }


class Broker:
    """One broker: a fixed id, port and data directory; started again on the same data after a stop."""

    def __init__(self, workdir: Path, broker_id: int, zookeeper: str, session_timeout_ms: int,
                 extra_args: list[str]) -> None:  # fmt: skip
        from logbroker.cluster.dev_cluster import dev_cluster_secret

        self.broker_id = broker_id
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workdir = workdir
        self.argv = [
            sys.executable, "-m", "logbroker", "serve", "--data-dir", str(workdir / f"broker-{broker_id}"),
            "--listen", self.address, "--broker-id", str(broker_id), "--zookeeper", zookeeper,
            "--cluster-secret-file", str(dev_cluster_secret(workdir)),
            "--zk-session-timeout-ms", str(session_timeout_ms), "--log-level", "warning", "--metrics-listen", "off", *extra_args,
        ]  # fmt: skip
        self.proc: ServerProcess | None = None
        self.history: list[ServerProcess] = []  # every incarnation, for exit codes and logs
        self.starts = 0

    def start(self) -> ServerProcess:
        self.starts += 1
        suffix = "" if self.starts == 1 else f".{self.starts}"
        self.proc = ServerProcess(
            f"broker-{self.broker_id}", self.argv, self.workdir / f"broker-{self.broker_id}{suffix}.log", env=_env()
        )
        self.history.append(self.proc)
        return self.proc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def signal(self, sig: int) -> None:
        """Send `sig` to the broker process itself (not its group: that is what `kill` does)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)


class LogbrokerCluster:
    """ZooKeeper + `size` brokers. `stop()` is idempotent and stops brokers one at a time (each
    controlled shutdown hands leadership to a broker still running), then ZooKeeper."""

    def __init__(self, workdir: Path, size: int = 3, session_timeout_ms: int = 6000,
                 extra_args: list[str] | None = None) -> None:  # fmt: skip
        from logbroker.cluster.dev_cluster import ZooKeeperProcess

        self.workdir = workdir
        self.size = size
        self.session_timeout_ms = session_timeout_ms
        self.zk = ZooKeeperProcess(workdir / "zookeeper", free_port())
        self.brokers: list[Broker] = []
        self._extra_args = extra_args or []

    @property
    def bootstrap(self) -> str:
        return ",".join(b.address for b in self.brokers)

    @property
    def processes(self) -> list[ServerProcess]:
        return [b.proc for b in self.brokers if b.proc is not None]

    def start(self) -> LogbrokerCluster:
        (self.workdir / "zookeeper").mkdir(parents=True, exist_ok=True)
        try:
            with _popen_dies_with_harness():
                self.zk.start(SERVING_TIMEOUT_S)
        finally:
            if self.zk.proc is not None:
                STARTED_PIDS.append(self.zk.proc.pid)
        connect = f"{self.zk.address}{CHROOT}"
        self.brokers = [
            Broker(self.workdir, i, connect, self.session_timeout_ms, self._extra_args) for i in range(self.size)
        ]
        for b in self.brokers:
            b.start()
        for b in self.brokers:
            self.wait_serving(b.broker_id)
        _wait(lambda: self.live_broker_ids() == set(range(self.size)), SERVING_TIMEOUT_S,
              "every broker registered in ZooKeeper", self)  # fmt: skip
        return self

    def wait_serving(self, i: int, timeout_s: float = SERVING_TIMEOUT_S) -> None:
        b = self.brokers[i]
        assert b.proc is not None
        b.proc.wait_until(lambda: health_serving(b.address), timeout_s, "SERVING on the gRPC health service")

    def stop(self) -> None:
        try:
            for b in self.brokers:
                if b.proc is not None:
                    b.proc.stop(STOP_TIMEOUT_S)
        finally:
            self.zk.stop()

    # -- faults ---------------------------------------------------------------------------------

    def send_signal(self, i: int, sig: int) -> float:
        """Send `sig` to broker i (the process, not its group); returns the monotonic time of it."""
        b = self.brokers[i]
        assert b.proc is not None and b.alive(), f"broker {i} is not running"
        t = time.monotonic()
        b.signal(sig)
        return t

    def reap(self, i: int, sig: int, wait_s: float = STOP_TIMEOUT_S) -> None:
        """Wait for broker i to exit after `sig` (SIGKILL it after wait_s); record how it went."""
        b = self.brokers[i]
        assert b.proc is not None
        try:
            b.proc.proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            b.signal(signal.SIGKILL)
            b.proc.proc.wait(5)
        b.proc.stop()  # records the exit code, closes the log
        b.proc.graceful = sig != signal.SIGKILL and b.proc.exit_code == 0

    def restart(self, i: int) -> None:
        b = self.brokers[i]
        if b.alive():
            assert b.proc is not None
            b.proc.stop(STOP_TIMEOUT_S)
        b.start()
        self.wait_serving(i)

    # -- views ----------------------------------------------------------------------------------

    def _admin_call(self, fn: Callable[[Any], Any], timeout_s: float = 3.0) -> Any:
        """fn(AdminStub) on the first running broker that answers."""
        import grpc

        from logbroker.v1 import logbroker_pb2_grpc as pbg

        last: Exception | None = None
        for b in self.brokers:
            if not b.alive():
                continue
            with grpc.insecure_channel(b.address) as ch:
                try:
                    return fn(pbg.AdminStub(ch))
                except grpc.RpcError as exc:
                    last = exc
        raise RuntimeError(f"no broker answered: {last}")

    def live_broker_ids(self) -> set[int]:
        from logbroker.v1 import logbroker_pb2 as pb

        try:
            resp = self._admin_call(lambda s: s.DescribeCluster(pb.DescribeClusterRequest(), timeout=3))
        except RuntimeError:
            return set()
        return {b.broker_id for b in resp.brokers}

    def partition_states(self, topic: str) -> dict[int, Any]:
        """partition -> PartitionDescription (leader, replicas, isr, leader_epoch, ...)."""
        from logbroker.v1 import logbroker_pb2 as pb

        resp = self._admin_call(lambda s: s.DescribeTopics(pb.DescribeTopicsRequest(names=[topic]), timeout=3))
        if not resp.topics or resp.topics[0].error_code != pb.NONE:
            return {}
        return {p.partition: p for p in resp.topics[0].partitions}

    def leader_of(self, topic: str, partition: int) -> int:
        try:
            p = self.partition_states(topic).get(partition)
        except RuntimeError:
            return -1
        return p.leader if p is not None else -1

    def wait_fully_replicated(self, topic: str, partitions: int, replicas: int,
                              timeout_s: float = SERVING_TIMEOUT_S, preferred: bool = False) -> None:  # fmt: skip
        """Every partition has a live leader and all `replicas` in its ISR (and, if `preferred`, its
        leader is its first replica: preferred-leader rebalancing has happened)."""

        def ready() -> bool:
            try:
                states = self.partition_states(topic)
            except RuntimeError:
                return False
            if len(states) != partitions:
                return False
            live = {b.broker_id for b in self.brokers if b.alive()}
            return all(
                p.leader in live
                and len(p.isr) == replicas
                and (not preferred or (len(p.replicas) > 0 and p.leader == p.replicas[0]))
                for p in states.values()
            )

        what = f"{topic}: every partition led, {replicas} replicas in sync" + (", preferred leaders" if preferred else "")
        _wait(ready, timeout_s, what, self)

    def log_tails(self, lines: int = 25) -> str:
        parts = [f"--- zookeeper log, last lines ---\n{_tail(self.zk.log_path, lines)}"]
        for b in self.brokers:
            for p in b.history:
                parts.append(f"--- {p.log_path.name}, last lines ---\n{p.log_tail(lines)}")
        return "\n".join(parts)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _wait(ready: Callable[[], bool], timeout_s: float, what: str, cluster: LogbrokerCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for b in cluster.brokers:
            if b.proc is not None and not b.alive() and b.proc.exit_code is None:
                raise RuntimeError(f"broker {b.broker_id} exited ({b.proc.proc.returncode}) while waiting for {what}:\n"
                                   f"{b.proc.log_tail()}")  # fmt: skip
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"not {what} after {timeout_s:.0f} s")


def health_serving(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
