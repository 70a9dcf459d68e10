"""A small tmpfs mounted for one test: a real volume that fills up (disk-full tests).

Mounting needs root (CAP_SYS_ADMIN); where that is not permitted the test is skipped with the
reason. Always unmounted, lazily if something still holds it (a broker process killed by the test).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(mount_point: Path, size_bytes: int) -> Iterator[Path]:
    """`mount_point` with a tmpfs of `size_bytes` on it, for the duration of the block."""
    mount_point.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if mount is None:
        pytest.skip("disk-full test needs mount(8) to make a small tmpfs")
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", str(mount_point)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"disk-full test needs a small tmpfs and mount is not permitted here "
                    f"(uid {os.getuid()}): {done.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


def fill_up(volume: Path, leave_bytes: int) -> Path:
    """Take all but about `leave_bytes` of the volume's free space with one file; returns it."""
    st = os.statvfs(volume)
    free = st.f_bavail * st.f_frsize
    filler = volume / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.posix_fallocate(fd, 0, max(4096, free - leave_bytes))
    finally:
        os.close(fd)
    return filler

