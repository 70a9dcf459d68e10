"""Host metrics for /metrics: the machine and this process as the operating system sees them (psutil).

Read at scrape time on the scrape thread (nothing here touches the broker's event loop). Names
follow Prometheus' conventions (units last, `_total` on counters) and never repeat prometheus_client's
process collector (`process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
`process_virtual_memory_bytes`, ...), which server/metrics.py registers beside this one.

| metric | type | meaning |
|---|---|---|
| `logbroker_process_cpu_mode_seconds_total{mode}` | counter | this process's CPU time, `user` and `system` (their sum is `process_cpu_seconds_total`) |
| `logbroker_process_memory_anonymous_bytes` | gauge | anonymous resident memory (Linux RssAnon: the heap, not the mapped segment files) |
| `logbroker_process_memory_unique_bytes` | gauge | USS: memory freed if the process ended (where psutil can read it) |
| `logbroker_process_open_files` | gauge | regular files open (process_open_fds counts sockets and pipes too) |
| `logbroker_process_io_read_bytes_total`, `logbroker_process_io_write_bytes_total` | counter | bytes this process read from and wrote to storage (Linux /proc/<pid>/io) |
| `logbroker_system_cpu_seconds_total{mode}` | counter | the machine's CPU time by mode (user, system, idle, iowait, ...), all CPUs |
| `logbroker_system_cpus` | gauge | logical CPUs |
| `logbroker_system_memory_total_bytes`, `logbroker_system_memory_available_bytes` | gauge | the machine's memory, and what can be given to processes without swapping |
| `logbroker_system_disk_read_bytes_total`, `logbroker_system_disk_written_bytes_total` | counter | bytes read from and written to all disks |
| `logbroker_system_network_received_bytes_total`, `logbroker_system_network_sent_bytes_total` | counter | bytes received and sent on all network interfaces |
| `logbroker_disk_total_bytes{dir}`, `logbroker_disk_used_bytes{dir}`, `logbroker_disk_free_bytes{dir}` | gauge | the file system of each data directory, as os.statvfs: total f_blocks x f_frsize, used (f_blocks - f_bfree) x f_frsize, free to this (unprivileged) process f_bavail x f_frsize, as `df` |
| `logbroker_connections{listener}` | gauge | TCP connections established to each listener's port: `grpc` and `record_transport` |

A figure psutil cannot read on this platform is left out, not reported as 0. psutil is a declared
dependency; where it is missing all the same, only the disk figures (os.statvfs) are served and
the broker logs one warning.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

ESTABLISHED = "ESTABLISHED"  # psutil.CONN_ESTABLISHED
ListenerPorts = Callable[[], dict[str, int]]  # listener name -> bound port (0: not listening)


def disk_usage(path: Path) -> tuple[int, int, int]:
    """(total, used, free) bytes of the file system holding `path`, from os.statvfs."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize


def rss_anon_bytes(status_path: str = "/proc/self/status") -> int | None:
    """RssAnon from /proc/self/status (Linux), None where there is none."""
    try:
        with open(status_path, encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def established_by_port(connections: Iterable[Any], ports: dict[str, int]) -> dict[str, int]:
    """Count the established TCP connections whose local port is each listener's (pure)."""
    by_port = {port: name for name, port in ports.items() if port}
    out = dict.fromkeys(by_port.values(), 0)
    for c in connections:
        if c.status == ESTABLISHED and c.laddr and c.laddr.port in by_port:
            out[by_port[c.laddr.port]] += 1
    return out


class HostCollector(Collector):
    def __init__(self, data_dirs: list[Path], listener_ports: ListenerPorts) -> None:
        self._data_dirs = data_dirs
        self._listener_ports = listener_ports
        self._psutil: Any = None
        try:
            self._psutil = importlib.import_module("psutil")
        except ImportError:
            log.warning("psutil is not installed: /metrics serves no process, system or connection figures")
        self._process: Any = self._psutil.Process() if self._psutil is not None else None

    def collect(self) -> Iterator[Metric]:
        yield from self._disk_families()
        if self._psutil is None:
            return
        yield from self._process_families()
        yield from self._system_families()
        yield from self._connection_families()

    def _process_families(self) -> Iterator[Metric]:
        psutil = self._psutil
        proc = self._process
        times = proc.cpu_times()
        cpu = CounterMetricFamily("logbroker_process_cpu_mode_seconds", "this process's CPU time by mode",
                                  labels=["mode"])
        cpu.add_metric(["user"], times.user)
        cpu.add_metric(["system"], times.system)
        yield cpu
        anon = rss_anon_bytes()
        if anon is not None:
            yield GaugeMetricFamily("logbroker_process_memory_anonymous_bytes",
                                    "anonymous resident memory (RssAnon)", value=anon)
        try:
            yield GaugeMetricFamily("logbroker_process_memory_unique_bytes", "unique set size (USS)",
                                    value=proc.memory_full_info().uss)
        except (psutil.Error, AttributeError, OSError):
            pass
        try:
            yield GaugeMetricFamily("logbroker_process_open_files", "regular files open",
                                    value=len(proc.open_files()))
        except (psutil.Error, OSError):
            pass
        try:
            io = proc.io_counters()
        except (psutil.Error, AttributeError, OSError):
            return
        yield CounterMetricFamily("logbroker_process_io_read_bytes", "bytes this process read from storage",
                                  value=io.read_bytes)
        yield CounterMetricFamily("logbroker_process_io_write_bytes", "bytes this process wrote to storage",
                                  value=io.write_bytes)

    def _system_families(self) -> Iterator[Metric]:
        psutil = self._psutil
        cpu = CounterMetricFamily("logbroker_system_cpu_seconds", "the machine's CPU time by mode, all CPUs",
                                  labels=["mode"])
        for mode, seconds in psutil.cpu_times()._asdict().items():
            cpu.add_metric([mode], seconds)
        yield cpu
        yield GaugeMetricFamily("logbroker_system_cpus", "logical CPUs", value=psutil.cpu_count() or 0)
        mem = psutil.virtual_memory()
        yield GaugeMetricFamily("logbroker_system_memory_total_bytes", "the machine's memory", value=mem.total)
        yield GaugeMetricFamily("logbroker_system_memory_available_bytes",
                                "memory that can be given to processes without swapping", value=mem.available)
        disk = psutil.disk_io_counters()
        if disk is not None:
            yield CounterMetricFamily("logbroker_system_disk_read_bytes", "bytes read from all disks",
                                      value=disk.read_bytes)
            yield CounterMetricFamily("logbroker_system_disk_written_bytes", "bytes written to all disks",
                                      value=disk.write_bytes)
        net = psutil.net_io_counters()
        if net is not None:
            yield CounterMetricFamily("logbroker_system_network_received_bytes",
                                      "bytes received on all network interfaces", value=net.bytes_recv)
            yield CounterMetricFamily("logbroker_system_network_sent_bytes", "bytes sent on all network interfaces",
                                      value=net.bytes_sent)

    def _disk_families(self) -> Iterator[Metric]:
        families = [GaugeMetricFamily(f"logbroker_disk_{what}_bytes", help_text, labels=["dir"]) for what, help_text in (
            ("total", "size of the data directory's file system"),
            ("used", "bytes used on the data directory's file system"),
            ("free", "bytes free to the broker on the data directory's file system (f_bavail x f_frsize)"))]
        for d in self._data_dirs:
            try:
                figures = disk_usage(d)
            except OSError:
                continue  # the directory vanished: the broker reports its offline logs
            for family, value in zip(families, figures, strict=True):
                family.add_metric([str(d)], value)
        yield from families

    def _connection_families(self) -> Iterator[Metric]:
        ports = self._listener_ports()
        try:
            connections = self._process.net_connections(kind="tcp")
        except (self._psutil.Error, OSError):
            return
        family = GaugeMetricFamily("logbroker_connections", "TCP connections established to each listener",
                                   labels=["listener"])
        for name, count in sorted(established_by_port(connections, ports).items()):
            family.add_metric([name], count)
        yield family
