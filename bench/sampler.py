"""CPU and memory of server processes, read from /proc on a background thread.

Per sample, for each server pid and its descendants: utime+stime+cutime+cstime from
/proc/<pid>/stat, and VmRSS, VmHWM (the kernel's own peak), RssAnon, RssFile from /proc/<pid>/status.
RssAnon is what a broker that serves from mmap'd segments really holds: RssFile is page cache
the kernel can drop. `mark(name)` snapshots the CPU counter so phases can be told apart.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
_STATUS_KEYS = {b"VmRSS:": "rss", b"VmHWM:": "hwm", b"RssAnon:": "anon", b"RssFile:": "file"}


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


def _tree(pids: Iterable[int]) -> list[int]:
    seen: list[int] = []
    todo = list(pids)
    while todo and len(seen) < 256:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(_children(pid))
    return seen


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    # after the ")" : state is fields[0]; utime, stime, cutime, cstime are stat fields 14-17
    return sum(int(x) for x in fields[11:15]) / _TICKS_PER_S


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key = _STATUS_KEYS.get(line.split(None, 1)[0])
                if key:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


@dataclass
class Sample:
    t: float
    cpu_s: float
    rss_kib: int
    anon_kib: int


@dataclass
class ProcSampler:
    pids: list[int]
    interval_s: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    marks: dict[str, tuple[float, float]] = field(default_factory=dict)
    peak_hwm_kib: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def sample(self) -> Sample:
        # A reaped child's CPU moves into its parent's cutime/cstime, so the total stays whole.
        with self._lock:
            cpu = 0.0
            rss = anon = 0
            for pid in _tree(self.pids):
                cpu += cpu_seconds(pid)
                mem = memory_kib(pid)
                rss += mem.get("rss", 0)
                anon += mem.get("anon", 0)
                self.peak_hwm_kib = max(self.peak_hwm_kib, mem.get("hwm", 0))
            s = Sample(time.monotonic(), cpu, rss, anon)
            self.samples.append(s)
            return s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> ProcSampler:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="proc-sampler", daemon=True)
        self._thread.start()
        return self

    def mark(self, name: str) -> None:
        s = self.sample()
        self.marks[name] = (s.t, s.cpu_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2.0)

    def cpu_between(self, a: str, b: str) -> float:
        return self.marks[b][1] - self.marks[a][1]

    def peak(self, start: str | None = None, end: str | None = None) -> dict[str, float]:
        t0 = self.marks[start][0] if start else 0.0
        t1 = self.marks[end][0] if end else float("inf")
        window = [s for s in self.samples if t0 <= s.t <= t1] or self.samples
        return {
            "peak_rss_mb": max(s.rss_kib for s in window) / 1024,
            "peak_rss_anon_mb": max(s.anon_kib for s in window) / 1024,
        }

    def summary(self) -> dict[str, float]:
        first, last = self.samples[0], self.samples[-1]
        return {
            "server_cpu_s": last.cpu_s - first.cpu_s,
            "server_peak_rss_mb": max(self.peak_hwm_kib / 1024, max(s.rss_kib for s in self.samples) / 1024),
            "server_peak_rss_anon_mb": max(s.anon_kib for s in self.samples) / 1024,
        }
