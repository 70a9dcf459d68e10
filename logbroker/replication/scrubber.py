"""Background scrubbing: verify every batch of the closed segments of the hosted logs, slowly.

Silent corruption (a flipped bit on disk) in a closed segment is otherwise noticed only when
someone reads it, possibly long after the healthy copies are gone. The scrubber reads each closed
(non-active) segment and checks each batch as recovery would: length bounds, magic, baseOffset
equal to the offset after the previous batch (a segment's first batch: its file name), and the
CRC-32C over attributes..end (record_batch.py documents the header). Bytes outside the CRC
(baseOffset, batchLength, partitionLeaderEpoch, magic) are covered by the walk's own checks as far
as they can be: a flipped bit in a leader epoch goes unnoticed.

Three parts:

- `walk_segment`: pure-ish. Walks the batches of one segment through a `read(position, size)`
  callable, in chunks, and yields one `BatchCheck` per batch, bad ones included (a bad CRC does not
  stop the walk; a bad length does, as nothing after it can be found). Every byte read is paid for
  through a `Throttle` first.
- `Throttle` (storage/io_throttle.py): a token bucket over an injected monotonic clock and sleep:
  at most `bytes_per_sec` on average, bursts of at most one chunk.
- `Scrubber`: the driver at the edge. An asyncio task on the broker's event loop starts a pass every
  `interval_ms` (the first one after min(interval_ms, FIRST_PASS_DELAY_MS_MAX)). A pass snapshots,
  on the loop, the closed segments of every hosted replica (path, base offset, size), then scans
  them one at a time in its own thread (`scan_file`: its own descriptor, `os.pread`, no mmap, no
  LMDB), so the loop and the logs' mappings are never touched from the thread. What the thread
  finds is handed back to the loop, which confirms it against the log's own view (the segment is
  still a closed segment of the same log, and the batch at that position still fails the check:
  a retention delete or a truncation in between made the scan's finding stale) and acts:

    follower   truncates its log to the start of the bad batch and restarts its fetcher, which
               truncates by leader epoch as always and re-fetches the range from the leader; and
               reports the replica to the controller (ReplicaManager.report_offline), which takes it
               out of the ISR at once (rather than leaving a copy below the high watermark in the
               ISR for up to replica_lag_time_max_ms). Until the controller has handled that report
               the truncated copy is still in the ISR: it refuses to lead (a LeaderAndIsr naming it
               leader gets KAFKA_STORAGE_ERROR for the partition) until it has re-fetched what it
               had or its leader re-adds it to the ISR (ReplicaManager, "Bad copies"). It rejoins
               through the leader's usual ISR expansion once caught up, and that clears the
               controller's mark.
    leader     with another ISR member, in a cluster: the partition is flagged and reported; the
               controller moves leadership to an in-sync replica and the LeaderAndIsr that makes this
               one a follower truncates it to the bad batch and re-fetches (the follower path).
    otherwise  (standalone, or a leader alone in its ISR: no healthy copy to move to) the partition
               is flagged (`Log.corrupt_reason`, the metric `logbroker_corrupt_partitions`) and an
               ERROR names the partition, the offsets and the segment. Reads never serve the batch:
               `Log.read` checks the CRC of every batch it returns and answers CORRUPT_MESSAGE for it.

Stopping: `stop()` sets an event that the thread's throttle sleeps on and the walk checks per
chunk, so a pass in progress ends within one chunk.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import crc32c as _crc32c

from logbroker.storage.io_throttle import CHUNK_BYTES_MAX, Throttle
from logbroker.storage.record_batch import (
    CRC_START,
    HEADER,
    HEADER_SIZE,
    LOG_OVERHEAD,
    MAGIC,
    MIN_BATCH_LENGTH,
    crc32c,
)

if TYPE_CHECKING:
    from logbroker.replication.replica_manager import ReplicaManager

log = logging.getLogger(__name__)

BAD_BATCHES_PER_SEGMENT_MAX = 100  # reported per segment scan; the walk goes on counting
FIRST_PASS_DELAY_MS_MAX = 5 * 60 * 1000
DEFAULT_SCRUB_INTERVAL_MS = 24 * 3600 * 1000
DEFAULT_SCRUB_BYTES_PER_SEC = 8 << 20


class BatchCheck(NamedTuple):
    """One batch as the walk found it. `offset` is where the batch should start (the expected
    offset; the header's baseOffset when the walk has lost track after damage); `problem` is None
    for a good batch. Header fields are as stored (meaningless when the length was bad)."""

    position: int
    size_bytes: int
    offset: int
    last_offset: int
    record_count: int
    leader_epoch: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    max_timestamp: int
    magic: int
    crc: int
    problem: str | None

    @property
    def ok(self) -> bool:
        return self.problem is None


class ScrubStopped(Exception):
    """The scrubber was stopped while a walk was in progress."""


class _Reader:
    """A window over `read` that pays for every byte through the throttle."""

    def __init__(self, read: Callable[[int, int], bytes], size_bytes: int, throttle: Throttle | None,
                 stop: Callable[[], bool]) -> None:
        self._read = read
        self._size = size_bytes
        self._throttle = throttle
        self._stop = stop
        self._chunk = throttle.chunk_bytes() if throttle is not None else CHUNK_BYTES_MAX
        self._buf = b""
        self._start = 0

    def get(self, position: int, size: int) -> memoryview:
        """`size` bytes at `position` (the caller keeps size <= one chunk)."""
        end = position + size
        if not (self._start <= position and end <= self._start + len(self._buf)):
            n = min(max(self._chunk, size), self._size - position)
            if self._throttle is not None:
                self._throttle.consume(n)  # may sleep: on the stop event, in the scrubber
            if self._stop():
                raise ScrubStopped()
            self._buf = self._read(position, n)
            self._start = position
            if len(self._buf) < size:
                raise OSError(f"short read: {len(self._buf)} of {size} bytes at byte {position}")
        return memoryview(self._buf)[position - self._start : end - self._start]

    def crc(self, start: int, end: int) -> int:
        value = 0
        while start < end:
            n = min(self._chunk, end - start)
            value = crc32c_update(self.get(start, n), value)
            start += n
        return value


def crc32c_update(data: memoryview, value: int) -> int:
    """CRC-32C of `data` continuing from `value` (the CRC of the bytes before it)."""
    return int(_crc32c.crc32c(data, value))


def walk_segment(
    read: Callable[[int, int], bytes], size_bytes: int, base_offset: int, *, throttle: Throttle | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> Iterator[BatchCheck]:
    """Check each batch of a segment holding `size_bytes` bytes whose first offset is `base_offset`.
    See the module doc. Raises ScrubStopped if `stop()` turns true, OSError from `read`."""
    reader = _Reader(read, size_bytes, throttle, stop)
    pos = 0
    expected: int | None = base_offset
    while pos < size_bytes:
        remaining = size_bytes - pos
        guess = expected if expected is not None else -1
        if remaining < HEADER_SIZE:
            yield BatchCheck(pos, remaining, guess, guess, 0, -1, -1, -1, -1, -1, -1, 0,
                             f"partial batch header of {remaining} bytes at the end of the segment")
            return
        (base, length, epoch, magic, crc, _attrs, lod, _bts, max_ts, pid, pepoch, seq,
         count) = HEADER.unpack_from(reader.get(pos, HEADER_SIZE))
        size = length + LOG_OVERHEAD
        offset = expected if expected is not None else base
        if length < MIN_BATCH_LENGTH or size > remaining:
            yield BatchCheck(pos, remaining, offset, offset, count, epoch, pid, pepoch, seq, max_ts, magic, crc,
                             f"batchLength {length} is invalid or runs past the end ({remaining} bytes left); "
                             "nothing after it can be checked")
            return
        problem = _header_problem(base, expected, magic, lod, epoch)
        if problem is None and reader.crc(pos + CRC_START, pos + size) != crc:
            problem = "CRC-32C mismatch"
        yield BatchCheck(pos, size, offset, offset + max(lod, 0), count, epoch, pid, pepoch, seq, max_ts, magic,
                         crc, problem)
        pos += size
        # after damage, trust the next header's baseOffset rather than a count we cannot check
        expected = base + lod + 1 if problem is None else None


def _header_problem(base: int, expected: int | None, magic: int, lod: int, epoch: int) -> str | None:
    if magic != MAGIC:
        return f"magic {magic}"
    if expected is not None and base != expected:
        return f"baseOffset {base}, expected {expected}"
    if lod < 0 or epoch < 0:
        return f"lastOffsetDelta {lod} / leader epoch {epoch} not set"
    return None


def check_batch_at(buf: mmap.mmap | bytes | memoryview, position: int, size_bytes: int, base_offset: int) -> str | None:
    """The problem of the batch of `size_bytes` at `position` of `buf` (a mapping of the segment),
    or None if it checks out: used to confirm a scan's finding against the log's own view."""
    if position + HEADER_SIZE > len(buf) or size_bytes < HEADER_SIZE or position + size_bytes > len(buf):
        return "batch runs past the end of the segment"
    base, length, epoch, magic, crc, _a, lod, *_rest = HEADER.unpack_from(buf, position)
    if length + LOG_OVERHEAD != size_bytes:
        return f"batchLength {length}"
    problem = _header_problem(base, base_offset, magic, lod, epoch)
    if problem is None:
        with memoryview(buf) as mv:
            if crc32c(mv[position + CRC_START : position + size_bytes]) != crc:
                problem = "CRC-32C mismatch"
    return problem


@dataclass
class SegmentScrub:
    """What one segment scan found."""

    path: Path
    base_offset: int
    size_bytes: int
    batches: int = 0
    bytes_checked: int = 0
    bad: list[BatchCheck] = field(default_factory=list)
    bad_count: int = 0


def scan_file(
    path: Path, base_offset: int, size_bytes: int, throttle: Throttle | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> SegmentScrub | None:
    """Scan the first `size_bytes` of the segment file at `path` (blocking: a thread's work). None if
    the file is gone (deleted by retention meanwhile) or shorter than `size_bytes` (truncated)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    result = SegmentScrub(path, base_offset, size_bytes)
    try:
        if os.fstat(fd).st_size < size_bytes:
            return None
        for b in walk_segment(lambda pos, n: os.pread(fd, n, pos), size_bytes, base_offset, throttle=throttle,
                              stop=stop):
            result.batches += 1
            result.bytes_checked += b.size_bytes
            if not b.ok:
                result.bad_count += 1
                if len(result.bad) < BAD_BATCHES_PER_SEGMENT_MAX:
                    result.bad.append(b)
    finally:
        os.close(fd)
    return result


class _Target(NamedTuple):
    key: tuple[str, int]
    path: Path
    base_offset: int
    size_bytes: int


class Scrubber:
    """The driver (module doc): an event-loop task plus one scanning thread."""

    def __init__(
        self, replica_manager: ReplicaManager, interval_ms: int, bytes_per_sec: int,
        monotonic_s: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval_ms <= 0:
            raise ValueError("interval_ms must be positive (no Scrubber at all to switch scrubbing off)")
        self._rm = replica_manager
        self.interval_ms = interval_ms
        self._stop_event = threading.Event()
        self._throttle = Throttle(bytes_per_sec, monotonic_s, self._stop_event.wait)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self.passes = 0
        self.bad_batches_found = 0  # confirmed, since start

    def start(self) -> None:
        """Start the periodic passes (call on the running event loop)."""
        if self._task is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="scrubber")
            self._task = asyncio.create_task(self._run(), name="scrubber")

    async def stop(self) -> None:
        self._stop_event.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        await asyncio.sleep(min(self.interval_ms, FIRST_PASS_DELAY_MS_MAX) / 1000)
        while True:
            started = time.monotonic()
            try:
                await self.run_pass()
            except ScrubStopped:
                return
            except Exception:
                log.exception("scrub pass failed")
            await asyncio.sleep(max(0.0, self.interval_ms / 1000 - (time.monotonic() - started)))

    async def run_pass(self) -> int:
        """Scan every closed segment once; returns how many bad batches were confirmed."""
        loop = asyncio.get_running_loop()
        targets = self._targets()
        log.debug("scrub pass %d: %d closed segments", self.passes + 1, len(targets))
        confirmed = 0
        for t in targets:
            result = await loop.run_in_executor(
                self._executor, scan_file, t.path, t.base_offset, t.size_bytes, self._throttle, self._stop_event.is_set
            )
            if result is not None and result.bad:
                confirmed += self._on_bad(t, result)
        self.passes += 1
        log.info("scrub pass %d done: %d closed segments checked, %d bad batches", self.passes, len(targets),
                 confirmed)
        return confirmed

    def _targets(self) -> list[_Target]:
        out = []
        for key, part in sorted(self._rm.partitions.items()):
            plog = part.log
            if plog.is_offline:
                continue
            for seg in plog.segments[:-1]:
                if not seg.is_active and seg.size_bytes:
                    out.append(_Target(key, seg.path, seg.base_offset, seg.size_bytes))
        return out

    def _on_bad(self, target: _Target, result: SegmentScrub) -> int:
        """On the loop: confirm the findings against the log and act (module doc)."""
        part = self._rm.partitions.get(target.key)
        if part is None:
            return 0
        plog = part.log
        seg = next((s for s in plog.segments[:-1] if s.path == target.path and s.base_offset == target.base_offset
                    and not s.is_active), None)
        if seg is None:
            return 0  # deleted or truncated into meanwhile: the scan saw an older file
        confirmed = []
        for b in result.bad:
            problem = check_batch_at(seg.buffer, b.position, b.size_bytes, b.offset)
            if problem is not None:
                confirmed.append(b._replace(problem=b.problem or problem))
        if not confirmed:
            return 0
        self.bad_batches_found += len(confirmed)
        topic, index = target.key
        ranges = ", ".join(f"offsets {b.offset}-{b.last_offset} at byte {b.position} ({b.problem})"
                           for b in confirmed)
        first = min(b.offset for b in confirmed)
        from logbroker.replication.partition import Role

        if part.role is Role.FOLLOWER and part.leader >= 0:
            log.error("scrub: replica %d of %s-%d has corrupt batches in %s: %s; truncating to offset %d and "
                      "re-fetching from the leader, broker %d", self._rm.broker_id, topic, index, target.path,
                      ranges, first, part.leader)
            self._rm.refetch_from(part, first)
            self._rm.report_offline({target.key: f"corrupt batch at offset {first} in {target.path}"})
        elif self._rm.leader_copy_corrupt(part, first, f"corrupt batch at offset {first} in {target.path}"):
            plog.corrupt_reason = plog.corrupt_reason or f"{target.path}: corrupt batch at offset {first}"
            log.error("scrub: %s-%d (leader on broker %d) has corrupt batches in %s: %s; reported to the controller: "
                      "leadership moves to an in-sync replica, then this copy is truncated to offset %d and "
                      "re-fetched", topic, index, self._rm.broker_id, target.path, ranges, first)
        else:
            plog.corrupt_reason = plog.corrupt_reason or f"{target.path}: corrupt batch at offset {first}"
            log.error("scrub: %s-%d (%s on broker %d) has corrupt batches in %s: %s; they are not served",
                      topic, index, part.role.value, self._rm.broker_id, target.path, ranges)
        return len(confirmed)
