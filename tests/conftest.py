"""Shared fixtures: free loopback ports and real broker processes, always reaped."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.zookeeper import ZooKeeperProcess, zookeeper_available

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
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


class BrokerProcess:
    """`logbroker serve` as a real child process on 127.0.0.1:<port>."""

    def __init__(self, data_dir: Path, port: int, extra_args: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = port
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"broker-{port}.log"
        self._log_file = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0, wait_serving: bool = True) -> BrokerProcess:
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logbroker", "serve", "--data-dir", str(self.data_dir),
             "--listen", self.address, *self.extra_args],
            stdout=self._log_file, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if wait_serving:
            wait_for(self.serving, timeout_s, f"broker on {self.address} to report SERVING (log: {self.log_path})")
        return self

    def serving(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"broker exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
        try:
            with grpc.insecure_channel(self.address) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                return resp.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []

    def make(data_dir: Path | None = None, port: int | None = None, extra_args: list[str] | None = None,
             start: bool = True) -> BrokerProcess:
        b = BrokerProcess(data_dir or tmp_path / "data", port or free_port(), extra_args)
        started.append(b)
        return b.start() if start else b

    yield make
    for b in started:
        b.stop()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory()


@pytest.fixture(scope="session")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperProcess]:
    """One real ZooKeeper for the session; tests isolate themselves with their own chroot."""
    why = zookeeper_available()
    if why is not None:
        if os.environ.get("CI"):
            raise RuntimeError(f"ZooKeeper is required in CI: {why}")
        pytest.skip(why)
    zk = ZooKeeperProcess(tmp_path_factory.mktemp("zookeeper"), free_port()).start()
    yield zk
    zk.stop()


@pytest.fixture
def zk_chroot(request: pytest.FixtureRequest) -> str:
    """A chroot unique to the test, so tests sharing the session's ZooKeeper never see each other."""
    import re
    import uuid

    name = re.sub(r"[^A-Za-z0-9_]", "_", request.node.name)[:60]
    return f"/t_{name}_{uuid.uuid4().hex[:8]}"
