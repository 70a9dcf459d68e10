"""Shared fixtures: free loopback ports and real broker processes, always reaped.

The broker process, free_port and wait_for are logbroker.testing's (the pytest plugin applications
use); the plugin is loaded here too, so its fixtures work in this suite with or without its entry
point installed (registered under its module name, it is the same plugin either way)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# the plugin (below) is imported here before pytest_plugins loads it: unless its entry point or -p
# loaded it already, let pytest rewrite it as it rewrites plugins (else it warns that it cannot)
if "logbroker.testing" not in sys.modules:
    pytest.register_assert_rewrite("logbroker.testing")

from logbroker.testing import BrokerProcess, free_port, wait_for  # noqa: E402
from tests.zookeeper import ZooKeeperProcess, zookeeper_available  # noqa: E402

pytest_plugins = ["logbroker.testing"]

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "BrokerProcess", "free_port", "wait_for"]


@pytest.fixture
def broker_factory(tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    started: list[BrokerProcess] = []

    def make(data_dir: Path | None = None, port: int | None = None, extra_args: list[str] | None = None,
             start: bool = True, env: dict[str, str] | None = None) -> BrokerProcess:
        b = BrokerProcess(data_dir or tmp_path / "data", port or free_port(), extra_args, env)
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
