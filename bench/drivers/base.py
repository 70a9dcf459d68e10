"""The small interface every system implements: start a server, create a topic, produce, consume, stop.

The harness process calls `missing`, `unsupported`, `start` and `create_topic`. Worker processes
(spawned, one per producer or consumer) call `producer` / `consumer` and drive the returned client
from the generic loops in `bench.worker`, so every system is measured by the same code.
"""

from __future__ import annotations

import importlib.util
import shutil
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from bench.procs import ServerProcess
from bench.workload import Workload


@dataclass
class Server:
    """A running system: where clients connect and which processes to measure."""

    address: str
    processes: list[ServerProcess] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]


class ProducerClient(Protocol):
    batch_records: int  # records per `send` call at full speed (a pipeline, a window of async publishes)

    def send(self, values: Sequence[bytes], keys: Sequence[bytes] | None) -> None: ...

    def flush(self) -> None:
        """Return once every record sent so far is acknowledged; raise if any failed."""

    def close(self) -> None: ...


class ConsumerClient(Protocol):
    def poll(self, timeout_s: float) -> Sequence[Any]:
        """Records available now, waiting up to timeout_s for the first; [] on timeout."""

    def value(self, record: Any) -> bytes: ...

    def close(self) -> None: ...


class QueueConsumerClient(ConsumerClient, Protocol):
    """A consumer of a shared queue (`requires = "queues"`): every message acknowledged on its own."""

    def ack(self, records: Sequence[Any]) -> None:
        """Acknowledge each of `records` individually (the wire may batch them, as the client allows)."""

    def finish(self) -> int | None:
        """Send acks still buffered; how many the system confirmed, or None if its protocol does not say."""


class Driver(ABC):
    name: str = ""
    title: str = ""  # as shown in tables
    binaries: tuple[tuple[str, str], ...] = ()  # (executable, Debian package)
    modules: tuple[tuple[str, str], ...] = ()  # (import name, pip package)
    native: bool = False  # produce-only reference (redis-benchmark): no worker processes

    def missing(self) -> str | None:
        """Why this system cannot run here (one line naming the package to install), or None."""
        for exe, package in self.binaries:
            if shutil.which(exe) is None and not Path(f"/usr/sbin/{exe}").exists():
                return f"`{exe}` not found: install it with `apt-get install -y {package}`"
        for module, package in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"Python module `{module}` not found: `.venv/bin/pip install -e '.[bench]'` (package {package})"
        return None

    def unsupported(self, wl: Workload) -> str | None:
        """Why this driver cannot run this workload (cluster, groups...), or None."""
        if wl.requires == "cluster" or wl.replication_factor > 1:
            return f"{self.title}: the harness has no multi-node setup for it yet"
        return None

    @abstractmethod
    def start(self, workdir: Path, wl: Workload, stack: ExitStack) -> Server:
        """Start the server(s) on 127.0.0.1, register their stop on `stack`, wait until ready."""

    @abstractmethod
    def create_topic(self, server: Server, topic: str, wl: Workload) -> None: ...

    # -- in worker processes ------------------------------------------------------------------

    def producer(self, address: str, topic: str, wl: Workload, index: int) -> ProducerClient:
        raise NotImplementedError

    def consumer(self, address: str, topic: str, wl: Workload, index: int) -> ConsumerClient:
        raise NotImplementedError

    # -- optional ---------------------------------------------------------------------------------

    def preload(self, server: Server, topic: str, wl: Workload, progress: Any) -> dict[str, Any] | None:
        """Fill the topic with wl.preload_bytes the fastest way this system has; None: use producers."""
        return None

    def unacked(self, server: Server, topic: str, wl: Workload) -> int | None:
        """Queue workloads, after every consumer has gone: messages still in the queue, not acknowledged."""
        return None

    def native_produce(self, server: Server, wl: Workload, workdir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def version(self) -> str:
        return ""


def exe_path(exe: str) -> str:
    return shutil.which(exe) or f"/usr/sbin/{exe}"


def records_per_request(record_size: int, limit_records: int = 1000, limit_bytes: int = 16 << 20) -> int:
    """A batch of `limit_records`, or fewer when that would exceed `limit_bytes` (100 KB records)."""
    return max(1, min(limit_records, limit_bytes // max(record_size, 1)))


def partition_of(key: bytes | None, partitions: int, fallback: int) -> int:
    """Peers' key -> stream/subject mapping (logbroker uses its own consistent hash)."""
    return fallback % partitions if key is None else zlib.crc32(key) % partitions
