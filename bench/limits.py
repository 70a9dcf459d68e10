"""The machine's physical limits, so every throughput can be read as a fraction of one.

- Disk: write 1 GiB in 1 MiB chunks to a temporary file in the data root's filesystem, then
  fdatasync; time includes the fdatasync. Median of 3.
- Loopback TCP: a sender process pushes 1 MiB chunks for 2 s to a receiver (this process) over
  127.0.0.1; bytes received / time. Median of 3.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.procs import STARTED_PIDS, die_with_parent, reap
from bench.progress import say

CHUNK = 1 << 20
DISK_BYTES = 1 << 30
LOOPBACK_S = 2.0
REPEATS = 3


def disk_write_mb_s(directory: Path, total: int = DISK_BYTES) -> float:
    buf = os.urandom(CHUNK)
    fd, path = tempfile.mkstemp(prefix="bench-disk-", dir=directory)
    try:
        t0 = time.monotonic()
        for _ in range(total // CHUNK):
            os.write(fd, buf)
        os.fdatasync(fd)
        seconds = time.monotonic() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return total / seconds / 1e6


def _sender(port: int, seconds: float, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    buf = b"\0" * CHUNK
    with socket.create_connection(("127.0.0.1", port)) as s:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            s.sendall(buf)


def loopback_mb_s(seconds: float = LOOPBACK_S) -> float:
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(30)
        proc = ctx.Process(
            target=_sender, args=(listener.getsockname()[1], seconds, os.getpid()), daemon=True
        )
        proc.start()
        assert proc.pid is not None
        STARTED_PIDS.append(proc.pid)
        try:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(seconds + 30)
                buf = bytearray(CHUNK)
                view = memoryview(buf)
                total = conn.recv_into(view)
                t0 = time.monotonic()
                while True:
                    n = conn.recv_into(view)
                    if n == 0:
                        break
                    total += n
                elapsed = time.monotonic() - t0
        finally:
            reap([proc], grace_s=seconds + 5)
    return total / elapsed / 1e6


def measure(data_root: Path) -> dict[str, Any]:
    say(f"machine limits: disk write + fdatasync in {data_root}, loopback TCP ...")
    disk = [disk_write_mb_s(data_root) for _ in range(REPEATS)]
    loop = [loopback_mb_s() for _ in range(REPEATS)]
    out = {
        "disk_write_fdatasync_mb_s": statistics.median(disk),
        "disk_runs_mb_s": disk,
        "loopback_tcp_mb_s": statistics.median(loop),
        "loopback_runs_mb_s": loop,
        "data_root": str(data_root),
    }
    say(
        f"machine limits: disk {out['disk_write_fdatasync_mb_s']:,.0f} MB/s (1 GiB + fdatasync), "
        f"loopback TCP {out['loopback_tcp_mb_s']:,.0f} MB/s"
    )
    return out
