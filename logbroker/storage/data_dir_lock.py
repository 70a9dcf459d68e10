"""The exclusive lock on a broker's data directory, held for the life of the process (Kafka's `.lock`).

File ``<data dir>/.lock``::

    "<pid of the holder>\\n"    ASCII; empty for the moment between taking the lock and writing it

Two brokers on one data directory would each trim, index and checkpoint the other's logs (a second
broker's clean shutdown trims the first one's active segment under its writes and marks its logs
clean). So a broker takes `flock(LOCK_EX | LOCK_NB)` on this file before it touches anything else in
the directory, and a second one fails at once with `DataDirLockedError`, naming the directory and the
holder's pid. The lock belongs to the open file: it goes away when the holder closes it or exits (a
`kill -9` included), so a stale `.lock` left by a dead broker never blocks a restart. The file itself
is never deleted (deleting it would let a third broker lock a new inode beside a live holder).

`flock` is advisory and local: it does not protect a directory shared over NFS between machines.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path

LOCK_FILE = ".lock"
PID_BYTES_MAX = 32  # the most of the file read back for the holder's pid


class DataDirLockedError(OSError):
    """Another process holds the data directory's lock. An OSError, like a port in use: the
    command line reports it as one line and exits non-zero."""


class DataDirLock:
    """An exclusive flock on `<data dir>/.lock`. `acquire()` once; `release()` (idempotent) at exit."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        """Create the directory if missing, take the lock and write our pid into the file.
        DataDirLockedError if another process (or another DataDirLock) holds it; OSError if the
        file cannot be opened."""
        assert self._fd < 0, "lock already held"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            who = f"pid {holder}" if holder is not None else "another process (pid not yet written)"
            raise DataDirLockedError(
                f"data directory {self.data_dir} is in use by {who}: it holds {self.path}; "
                "one broker per data directory",
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (closing the file drops it). The file stays."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        raw = os.pread(fd, PID_BYTES_MAX, 0)
    except OSError:
        return None
    text = raw.decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None
