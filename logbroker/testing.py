"""`logbroker.testing`: a pytest plugin that runs real brokers for an application's tests.

Installed with logbroker, it registers itself through the `pytest11` entry point
`logbroker.testing` (pyproject.toml), so a project that pip-installs logbroker gets these fixtures
without configuration (`-p logbroker.testing` or `pytest_plugins = ["logbroker.testing"]` in the
rootdir conftest also load it, and are harmless beside the entry point: it is registered under its
module name either way). Fixtures:

- `logbroker_broker`: one standalone broker (`python -m logbroker serve`, embedded metadata store) on
  127.0.0.1 with a free port and a data dir under the test's tmp_path, SERVING before the test starts;
  `.bootstrap` is what a Producer/Consumer/Admin takes. Stopped (SIGTERM, SIGKILL after a bound) when
  the test ends, passed or failed.
- `logbroker_broker_session`: the same, one for the whole session (topics persist between tests).
- `logbroker_broker_factory`: `factory(extra_args=[...])` starts another broker; all are reaped.
- `logbroker_cluster`: three brokers over a real ZooKeeper (Debian's `zookeeper` package, started by
  `logbroker.cluster.dev_cluster`); skipped, saying why, when ZooKeeper is not installed.

The broker runs the same logbroker the tests import (its package root goes first on the child's
PYTHONPATH), with every LOGBROKER_* variable of the environment removed, so a developer's shell
settings never reach the test broker. Ports are picked free on 127.0.0.1; every wait is bounded and
polls a condition (the gRPC health service, ZooKeeper's `ruok`), never a sleep.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from logbroker.cluster.dev_cluster import ZooKeeperProcess, zookeeper_available
from logbroker.tls import TlsConfig

START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
KILL_TIMEOUT_S = 10.0
_ENV_PREFIX = "LOGBROKER_"
# LOGBROKER_* variables that configure how ZooKeeper is found, not the broker: kept
_KEPT_ENV = frozenset({"LOGBROKER_ZOOKEEPER_JARS"})


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    """Poll `predicate` until it holds; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def broker_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The child broker's environment: this one without LOGBROKER_* settings, with this process's
    logbroker package first on PYTHONPATH (unless it is an installed copy in site-packages)."""
    import logbroker

    base = dict(os.environ if environ is None else environ)
    env = {k: v for k, v in base.items() if not k.startswith(_ENV_PREFIX) or k in _KEPT_ENV}
    root = str(Path(logbroker.__file__).resolve().parent.parent)
    if Path(root).name not in ("site-packages", "dist-packages"):
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, base.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class BrokerProcess:
    """`logbroker serve` as a real child process on 127.0.0.1:<port>, its output in `log_path`."""

    def __init__(self, data_dir: Path, port: int, extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None, tls: TlsConfig | None = None) -> None:
        self.data_dir = data_dir
        self.tls = tls  # how this process reaches a broker serving TLS (serving(), channel())
        self.port = port
        self.extra_args = extra_args or []
        self.env = env or {}  # set in the child on top of broker_env() (e.g. LOGBROKER_TEST_* hooks)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"broker-{port}.log"
        self._log_file: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def bootstrap(self) -> str:
        """What a Producer, Consumer or Admin takes as `bootstrap`."""
        return self.address

    def start(self, timeout_s: float = START_TIMEOUT_S, wait_serving: bool = True) -> BrokerProcess:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logbroker", "serve", "--data-dir", str(self.data_dir),
             "--listen", self.address, *self._metrics_args(), *self.extra_args],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=self.data_dir.parent,
            env={**broker_env(), **self.env},
        )
        if wait_serving:
            try:
                wait_for(self.serving, timeout_s, f"broker on {self.address} to report SERVING (log: {self.log_path})")
            except BaseException:
                self.stop()
                raise
        return self

    def _metrics_args(self) -> list[str]:
        """/metrics is on by default at a fixed port: off here (parallel brokers would collide) unless
        the test asks for it (its --metrics-listen in extra_args comes later and wins, or the environment)."""
        return [] if "LOGBROKER_METRICS_LISTEN" in self.env else ["--metrics-listen", "off"]

    def serving(self) -> bool:
        """The broker's gRPC health service says SERVING; raises if the process has exited."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
        try:
            with self.channel() as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    def channel(self) -> Any:
        """A gRPC channel to this broker (TLS with `tls`)."""
        import grpc

        if self.tls is None:
            return grpc.insecure_channel(self.address)
        return grpc.secure_channel(self.address, self.tls.channel_credentials())

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` (default: kill -9) and wait for the exit."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=STOP_TIMEOUT_S)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM (a clean shutdown), SIGKILL after `timeout_s`; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)  # a SIGSTOPped broker cannot act on SIGTERM
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=KILL_TIMEOUT_S)
            except ProcessLookupError:
                self.proc.wait(timeout=KILL_TIMEOUT_S)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> BrokerProcess:
        """Stop, then start again on the same port and data dir."""
        self.stop()
        return self.start(timeout_s)


class LocalCluster:
    """N brokers joined through one ZooKeeper (under `chroot`), sharing a fresh cluster secret."""

    def __init__(self, zookeeper: ZooKeeperProcess, workdir: Path, size: int = 3, chroot: str = "/logbroker",
                 extra_args: list[str] | None = None) -> None:
        self.zookeeper = zookeeper
        workdir.mkdir(parents=True, exist_ok=True)
        self.secret_file = workdir / "cluster-secret"
        fd = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
        finally:
            os.close(fd)
        self.brokers: list[BrokerProcess] = [
            BrokerProcess(workdir / f"broker-{i}", free_port(), [
                "--zookeeper", f"{zookeeper.address}{chroot}", "--broker-id", str(i),
                "--cluster-secret-file", str(self.secret_file), *(extra_args or []),
            ])
            for i in range(size)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(b.address for b in self.brokers)

    def start(self, timeout_s: float = START_TIMEOUT_S) -> LocalCluster:
        for b in self.brokers:
            b.start(timeout_s, wait_serving=False)
        for b in self.brokers:
            wait_for(b.serving, timeout_s, f"broker on {b.address} to report SERVING (log: {b.log_path})")
        wait_for(lambda: self._registered() == len(self.brokers), timeout_s, "every broker registered")
        return self

    def _registered(self) -> int:
        import grpc

        from logbroker.v1 import logbroker_pb2 as pb
        from logbroker.v1 import logbroker_pb2_grpc as pbg

        try:
            with grpc.insecure_channel(self.brokers[0].address) as ch:
                return len(pbg.AdminStub(ch).DescribeCluster(pb.DescribeClusterRequest(), timeout=5).brokers)
        except grpc.RpcError:
            return 0

    def stop(self) -> None:
        for b in self.brokers:
            b.stop()


def _reap(started: list[BrokerProcess]) -> None:
    """Stop every broker, even when one stop fails; then raise the first failure."""
    errors: list[BaseException] = []
    for b in started:
        try:
            b.stop()
        except Exception as e:  # keep reaping the others
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def logbroker_broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """`factory(extra_args=None, data_dir=None, start=True)` -> a BrokerProcess; all reaped."""
    started: list[BrokerProcess] = []

    def make(extra_args: list[str] | None = None, data_dir: Path | None = None, start: bool = True) -> BrokerProcess:
        port = free_port()
        b = BrokerProcess(data_dir or tmp_path / f"logbroker-{port}" / "data", port, extra_args)
        started.append(b)
        return b.start() if start else b

    yield make
    _reap(started)


@pytest.fixture
def logbroker_broker(logbroker_broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A standalone broker, SERVING, for this test alone."""
    return logbroker_broker_factory()


@pytest.fixture(scope="session")
def logbroker_broker_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """A standalone broker shared by the whole session: give each test its own topic names."""
    b = BrokerProcess(tmp_path_factory.mktemp("logbroker") / "data", free_port())
    try:
        yield b.start()
    finally:
        b.stop()


@pytest.fixture
def logbroker_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """Three brokers over a real ZooKeeper of their own; skipped when ZooKeeper is not installed."""
    why = zookeeper_available()
    if why is not None:
        pytest.skip(f"logbroker_cluster needs ZooKeeper: {why}")
    zk = ZooKeeperProcess(tmp_path / "zookeeper", free_port())
    (tmp_path / "zookeeper").mkdir(parents=True, exist_ok=True)
    cluster: LocalCluster | None = None
    try:
        zk.start()
        cluster = LocalCluster(zk, tmp_path / "cluster")
        yield cluster.start()
    finally:
        try:
            if cluster is not None:
                _reap(cluster.brokers)
        finally:
            zk.stop()
