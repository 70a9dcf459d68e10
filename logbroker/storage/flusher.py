"""Background fsync of rolled segments, so that a roll never waits for the disk on the caller's thread.

A roll unmaps and trims the old segment but neither msyncs nor fsyncs it: its written pages stay
dirty in the page cache. The log hands the file to a `SegmentFlusher`, whose single worker thread
fsyncs it and then its directory (which also makes the new segment's name durable), as Kafka's
scheduler flushes a rolled segment. Only once that has finished does the log advance its recovery
point past the segment, on its own thread (`Log._reap_flushes`); a crash before then recovers from
the older recovery point, which is always safe.

The worker touches nothing but descriptors it owns: `prepare` opens the segment file and its
directory again on the caller's thread (two cheap opens), the job closes them. It never touches a
mapping or the LMDB index. A segment deleted while its flush waits (retention, truncation, deletion
of the log) stays reachable through that descriptor; the job sees it has no links left and skips
the fsync.

Pending flushes are bounded by `max_pending`, shared by every log using the flusher: when the disk
cannot keep up, `prepare` waits for a slot (at most `wait_timeout_s`), so the un-fsynced data and
the recovery point's lag stay bounded.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from logbroker.errors import StorageError
from logbroker.storage.flush_timing import LOG_FLUSHES

log = logging.getLogger(__name__)

MAX_PENDING = 8  # flushes queued or running per flusher (a 128 MiB segment each by default)
WAIT_TIMEOUT_S = 60.0  # longest wait for a slot, or for a log's flushes at close
SLOW_SLOT_WAIT_S = 0.01  # a roll that waited longer than this for a slot is logged

FsyncFunction = Callable[[int], None]


class PendingFlush:
    """The flush of one segment file: prepared (descriptors open, a slot held), then started."""

    __slots__ = ("path", "_fd", "_dir_fd", "_future", "_flusher")

    def __init__(self, flusher: SegmentFlusher, path: Path, fd: int, dir_fd: int) -> None:
        self.path = path
        self._flusher = flusher
        self._fd = fd
        self._dir_fd = dir_fd
        self._future: concurrent.futures.Future[None] | None = None

    def done(self) -> bool:
        """Whether the flush has finished (thread-safe)."""
        return self._future is not None and self._future.done()

    def error(self) -> BaseException | None:
        """Why a finished flush failed, or None."""
        assert self._future is not None and self._future.done()
        return self._future.exception()

    def cancel(self) -> None:
        """Give up a prepared flush that was never started: close its descriptors, free its slot."""
        assert self._future is None
        self._close()
        self._flusher._slots.release()

    def _close(self) -> None:
        for fd in (self._fd, self._dir_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fd = self._dir_fd = -1

    def __repr__(self) -> str:
        state = "pending" if self._future is None or not self._future.done() else "done"
        return f"PendingFlush({self.path.name}, {state})"


class SegmentFlusher:
    """One worker thread that fsyncs rolled segment files. Shared by the logs of a LogManager.

    `fsync` is the function the worker calls on each descriptor (tests inject slow or failing
    ones). `prepare` and `start` are called from the logs' threads; `wait` blocks its caller.
    """

    def __init__(
        self, max_pending: int = MAX_PENDING, fsync: FsyncFunction = os.fsync, wait_timeout_s: float = WAIT_TIMEOUT_S,
        name: str = "segment-flush",
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending {max_pending} must be >= 1")
        self.max_pending = max_pending
        self.wait_timeout_s = wait_timeout_s
        self._fsync = fsync
        self._name = name
        self._slots = threading.BoundedSemaphore(max_pending)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def prepare(self, path: Path) -> PendingFlush:
        """Take a slot (waiting while `max_pending` flushes are outstanding) and open `path` and its
        directory for the worker. Raises StorageError, with nothing held, if either fails."""
        if not self._slots.acquire(blocking=False):
            started = time.monotonic()
            if not self._slots.acquire(timeout=self.wait_timeout_s):
                raise StorageError(
                    f"cannot roll {path}: {self.max_pending} segment flushes still pending after "
                    f"{self.wait_timeout_s:.0f} s")
            waited = time.monotonic() - started
            if waited > SLOW_SLOT_WAIT_S:
                log.warning("roll of %s waited %.0f ms for one of %d pending segment flushes (disk behind)",
                            path, waited * 1000, self.max_pending)
        fd = dir_fd = -1
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            if fd >= 0:
                os.close(fd)
            self._slots.release()
            raise StorageError(f"cannot open {path} for flushing: {e}") from e
        return PendingFlush(self, path, fd, dir_fd)

    def start(self, job: PendingFlush) -> None:
        """Queue a prepared flush for the worker."""
        assert job._future is None
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            try:
                job._future = self._executor.submit(self._run, job)
                return
            except RuntimeError:  # the interpreter is shutting down: no new threads
                pass
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        job._future = future
        try:
            self._run(job)
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(None)

    def wait(self, jobs: Iterable[PendingFlush], timeout: float | None = None) -> bool:
        """Block until `jobs` (started ones) have finished, at most `timeout` seconds (default
        `wait_timeout_s`). Returns whether they all have."""
        futures = [job._future for job in jobs if job._future is not None]
        if not futures:
            return True
        _, not_done = concurrent.futures.wait(futures, self.wait_timeout_s if timeout is None else timeout)
        return not not_done

    def shutdown(self, wait: bool = True) -> None:
        """Stop the worker once the queued flushes are done (joined if `wait`). A later `start`
        starts a new one."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait)

    def _run(self, job: PendingFlush) -> None:
        """Worker: fsync the segment file, then its directory. Only the job's own descriptors."""
        try:
            if os.fstat(job._fd).st_nlink == 0:
                return  # deleted while waiting: nothing left to make durable
            started = time.perf_counter()
            self._fsync(job._fd)
            self._fsync(job._dir_fd)
            LOG_FLUSHES.observe(time.perf_counter() - started)
        finally:
            job._close()
            self._slots.release()


_default: SegmentFlusher | None = None
_default_lock = threading.Lock()


def default_flusher() -> SegmentFlusher:
    """The process-wide flusher of logs opened without one (a LogManager brings its own)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = SegmentFlusher(name="segment-flush-default")
        return _default
