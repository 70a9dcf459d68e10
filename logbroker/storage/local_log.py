"""The segments of one log and the paths that touch them (Kafka's LocalLog): the byte side of an
append, the read path, roll, truncation of segments, flushes and the recovery point, and the
read-only / offline states. `Log` (log.py) composes it with the offsets and checkpoints that are
not about segments (log start offset, high watermark, leader epochs, retention).

Invariants:
- `segments` is never empty; `bases[i] == segments[i].base_offset`, strictly increasing; each
  segment's base offset is the previous one's end; only the last segment (the active one) is
  writable, and `log_end_offset` is the offset after its last batch.
- `size_bytes` is the sum of the segments' sizes.
- `indexer` describes the active segment: it has given the index one offset entry for its first
  batch and one at most every `index_interval_bytes` after (never one per record); an append
  copies the payload once, into the mapping, and either lands whole (data and index entries in one
  index transaction) or leaves the log as it was (`undo_on_failure`).
- Recovery point: offsets below it are fsynced. It only moves forward to the end of a rolled
  segment whose background flush, and every earlier one's, has finished (`reap_flushes`, on the
  log's thread), or to the log end offset at `flush`/`close`; truncation and retention clamp it. So
  it may lag the rolls, never lead the disk. `pending` holds the rolled segments' flushes, oldest
  first, by their end offset.
- Read-only (`read_only` set): the active segment could not be preallocated; reads, retention and
  checkpoints go on; writes retry the preallocation at most once every
  PREALLOCATE_RETRY_INTERVAL_MS and otherwise fail with StorageError, nothing changed.
- Offline (`offline` set): an fsync, roll, truncation or segment deletion failed, so the data
  cannot be trusted: writes, retention, epoch changes and checkpoints are refused (reads only
  check that the log is open), and close writes nothing.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from logbroker.errors import CorruptMessageError, StorageError
from logbroker.storage.flush_timing import LOG_FLUSHES
from logbroker.storage.flusher import PendingFlush, SegmentFlusher
from logbroker.storage.index import META_HIGH_WATERMARK, META_RECOVERY_POINT, PartitionIndex, TimeEntry
from logbroker.storage.log_config import LogConfig
from logbroker.storage.log_dir import CLEAN_SHUTDOWN_FILE, write_atomically
from logbroker.storage.log_loader import PREALLOCATE_RETRY_INTERVAL_MS, LoadedLog
from logbroker.storage.record_batch import HEADER_SIZE
from logbroker.storage.segment import Segment
from logbroker.storage.segment_indexer import NO_TS, SegmentIndexer

log = logging.getLogger(__name__)

_EMPTY = memoryview(b"")


class LocalLog:
    """The segments of one log. Owned by the Log; see the module doc."""

    def __init__(
        self, directory: Path, loaded: LoadedLog, now_ms: Callable[[], int], flusher: SegmentFlusher
    ) -> None:
        self.directory = directory
        self.config: LogConfig = loaded.config
        self._now_ms = now_ms
        self._flusher = flusher
        # background flushes of rolled segments, oldest first: (segment end offset, flush)
        self.pending: deque[tuple[int, PendingFlush]] = deque()
        self.segments: list[Segment] = loaded.segments
        self.bases: list[int] = loaded.bases
        self.index: PartitionIndex = loaded.index
        self.indexer = SegmentIndexer(0, self.config.index_interval_bytes)
        self.log_end_offset = loaded.log_end_offset
        self.recovery_point = loaded.log_end_offset
        self.size_bytes = sum(s.size_bytes for s in self.segments)
        self.active_created_ms = 0
        self.unflushed_messages = 0
        self.last_flush_ms = loaded.opened_ms
        self.closed = False
        self.offline: str | None = None
        self.read_only: str | None = loaded.read_only  # why the active segment is not writable
        self._preallocate_retry_at_ms = loaded.preallocate_retry_at_ms
        self.corrupt_reason: str | None = None
        self.on_roll: Callable[[int], None] | None = None  # called with the new segment's base offset

    # -- states ----------------------------------------------------------------------------------

    def go_offline(self, reason: str) -> None:
        self.offline = reason
        log.error("log %s is offline: %s", self.directory, reason)

    def check_open(self) -> None:
        if self.closed:
            raise StorageError(f"log {self.directory} is closed")

    def check_online(self) -> None:
        """Open and not offline: reads, retention, epochs and checkpoints may go on (also while
        read-only)."""
        self.check_open()
        if self.offline is not None:
            raise StorageError(f"log {self.directory} is offline: {self.offline}")

    def check_writable(self) -> None:
        """Online, and the active segment writable: retries preallocation if read-only and due."""
        self.check_online()
        if self.read_only is not None and not self.retry_preallocation():
            raise StorageError(f"log {self.directory} is read-only: {self.read_only}")

    def retry_preallocation(self, force: bool = False) -> bool:
        """A read-only log (its active segment could not be preallocated): try again, at most once
        every PREALLOCATE_RETRY_INTERVAL_MS unless `force`. Returns whether the log is writable."""
        if self.read_only is None:
            return True
        now = self._now_ms()
        if not force and now < self._preallocate_retry_at_ms:
            return False
        self._preallocate_retry_at_ms = now + PREALLOCATE_RETRY_INTERVAL_MS
        active = self.segments[-1]
        try:
            active.reopen_writable(self.config.segment_bytes)
        except StorageError as e:
            self.read_only = str(e)
            return False
        self.read_only = None
        log.info("log %s is writable again: its active segment is preallocated (%d bytes)", self.directory,
                 active.capacity_bytes)
        return True

    # -- the active segment ------------------------------------------------------------------------

    def restore_active_state(self, now: int) -> None:
        """Rebuild the in-memory state of the active segment: time-index running maximum, bytes
        since the last offset entry, and the age it rolls by."""
        active = self.segments[-1]
        indexer = SegmentIndexer(active.base_offset, self.config.index_interval_bytes)
        position = 0
        last_time = self.index.segment_max_timestamp(active.base_offset)
        if last_time is not None:
            indexer.max_ts, indexer.max_ts_offset = last_time
            indexer.indexed_ts = last_time[0]
            position = max(0, self.position_of(active, last_time[1]))
        for _pos, _size, base, _lod, max_ts in active.batch_headers(position, active.size_bytes):
            if max_ts > indexer.max_ts:
                indexer.max_ts, indexer.max_ts_offset = max_ts, base
        entry = self.index.floor_offset(max(self.log_end_offset - 1, 0))
        if entry is not None and entry[1] == active.base_offset:
            indexer.since_bytes = active.size_bytes - entry[2]
        else:
            indexer.since_bytes = active.size_bytes
        self.indexer = indexer
        self.active_created_ms = now
        if active.size_bytes >= HEADER_SIZE:
            first_ts = active.header(0).max_timestamp
            if first_ts >= 0:
                self.active_created_ms = min(now, first_ts)

    def room_for(self, n: int, now: int) -> Segment:
        """The active segment, rolled first if `n` more bytes do not fit or it is too old."""
        active = self.segments[-1]
        if active.size_bytes and (
            active.size_bytes + n > active.capacity_bytes or now - self.active_created_ms > self.config.segment_ms
        ):
            self.roll(max(self.config.segment_bytes, n), now)
            active = self.segments[-1]
        elif active.size_bytes + n > active.capacity_bytes:
            active.grow(n)
        return active

    @contextlib.contextmanager
    def undo_on_failure(self, active: Segment, start: int, n: int, saved: tuple[int, int, int, int]) -> Iterator[None]:
        """An append either lands whole or leaves the log as it was: on failure the copied bytes are
        zeroed and the indexer rewound, and an OSError surfaces as StorageError."""
        try:
            yield
        except BaseException as e:
            self.indexer.restore(saved)
            active.zero(start, start + n)
            if isinstance(e, StorageError) or not isinstance(e, Exception):
                raise
            raise StorageError(f"append to {active.path} failed: {e}") from e

    def appended(self, active: Segment, start: int, n: int, next_offset: int, record_count: int) -> None:
        """Account for `n` bytes that landed at `start` in the active segment."""
        active.size_bytes = start + n
        self.size_bytes += n
        self.log_end_offset = next_offset
        self.unflushed_messages += record_count

    def flush_due(self, now: int) -> bool:
        """Whether flush_interval_messages or flush_interval_ms asks for a flush now."""
        config = self.config
        return (0 < config.flush_interval_messages <= self.unflushed_messages) or (
            config.flush_interval_ms >= 0 and now - self.last_flush_ms >= config.flush_interval_ms
        )

    def roll(self, capacity_bytes: int, now: int) -> None:
        """Seal the active segment and start a new one. No msync or fsync here: the old segment's
        fsync is handed to the flusher, and the recovery point follows when it is done."""
        old = self.segments[-1]
        end = self.log_end_offset
        job = self._flusher.prepare(old.path)  # may wait for a slot, may raise: nothing changed
        try:
            new = Segment.create(self.directory, end, capacity_bytes)  # may raise: nothing changed
        except BaseException:
            job.cancel()
            raise
        try:
            old.seal()
        except (StorageError, OSError) as e:
            job.cancel()
            self.go_offline(f"roll of {old.path} failed: {e}")
            with contextlib.suppress(StorageError):
                new.delete()
            raise StorageError(f"roll of {old.path} failed: {e}") from e
        self._flusher.start(job)  # fsyncs the old file, then the directory (naming `new` durably)
        self.pending.append((end, job))
        times: list[TimeEntry] = []
        self.indexer.finish(times)
        self.segments.append(new)
        self.bases.append(new.base_offset)
        self.indexer = SegmentIndexer(new.base_offset, self.config.index_interval_bytes)
        self.active_created_ms = now
        self.index.write(times=times)
        if self.on_roll is not None:
            self.on_roll(new.base_offset)

    # -- flushes and the recovery point -------------------------------------------------------------

    def reap_flushes(self, high_watermark: int) -> bool:
        """Apply finished background flushes, on the log's thread: advance the recovery point to
        the end of the newest rolled segment whose flush, and every earlier one's, has finished, and
        checkpoint it in the index with `high_watermark`. The checkpoint is not synced here (an LMDB
        sync can wait behind other fsyncs); it is durable at the next index sync (flush, close), and
        until then a crash recovers from the previous one. Returns whether it wrote a checkpoint.
        Raises StorageError (the log goes offline) if a flush failed.
        """
        pending = self.pending
        if not pending or not pending[0][1].done():
            return False
        recovery_point = self.recovery_point
        finished = 0
        failed: BaseException | None = None
        for end, job in pending:
            if not job.done():
                break
            failed = job.error()
            if failed is not None:
                break
            recovery_point = max(recovery_point, end)
            finished += 1
        wrote = recovery_point > self.recovery_point
        if wrote:
            self.index.write(meta={META_RECOVERY_POINT: recovery_point, META_HIGH_WATERMARK: high_watermark})
            self.recovery_point = recovery_point
        for _ in range(finished):
            pending.popleft()
        if failed is not None:  # an fsync error: what was written to that file cannot be trusted
            path = pending[0][1].path
            self.go_offline(f"flush of {path} failed: {failed}")
            raise StorageError(f"flush of {path} failed: {failed}") from failed
        return wrote

    def wait_for_flushes(self, high_watermark: int, timeout: float | None = None, up_to: int | None = None
                         ) -> tuple[bool, bool]:
        """Wait for the pending flushes ending at or below `up_to` (default: all), at most `timeout`
        seconds (default: the flusher's `wait_timeout_s`), and apply them. Returns (none of them
        is still pending, a checkpoint was written)."""
        jobs = [job for end, job in self.pending if up_to is None or end <= up_to]
        self._flusher.wait(jobs, timeout)
        wrote = self.reap_flushes(high_watermark)
        return not any(up_to is None or end <= up_to for end, _ in self.pending), wrote

    def flush(self, high_watermark: int) -> None:
        """Wait for the pending flushes of rolled segments, msync the active segment, then advance
        and checkpoint the recovery point (to the log end offset unless a rolled segment's flush
        is still running after the flusher's `wait_timeout_s`), with `high_watermark`."""
        started = time.perf_counter()
        all_flushed, _ = self.wait_for_flushes(high_watermark)
        try:
            self.segments[-1].flush()
        except StorageError as e:  # an fsync error: nothing written since can be trusted
            self.go_offline(str(e))
            raise
        if all_flushed:
            self.recovery_point = self.log_end_offset
        else:
            log.warning("%s: flushes of rolled segments still pending after %.0f s; recovery point stays at %d",
                        self.directory, self._flusher.wait_timeout_s, self.recovery_point)
        self.index.write(meta={META_RECOVERY_POINT: self.recovery_point, META_HIGH_WATERMARK: high_watermark})
        self.index.sync()
        self.unflushed_messages = 0
        self.last_flush_ms = self._now_ms()
        LOG_FLUSHES.observe(time.perf_counter() - started)

    # -- read ---------------------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int, limit: int) -> memoryview:
        """Whole batches from the one holding `offset` (within the log), from one segment, at most
        `max_bytes` but at least one, none with a base offset >= `limit` (see Log.read)."""
        i = bisect.bisect_right(self.bases, offset) - 1
        while i < len(self.segments):
            seg = self.segments[i]
            position = self.position_of(seg, offset)
            if position >= 0:
                end, damage = seg.read_end(position, max_bytes, limit)
                if damage is not None:
                    self.flag_corrupt(seg, damage)
                    if end == position:
                        raise CorruptMessageError(f"{seg.path.name}: {damage}")
                return seg.view(position, end - position)
            i += 1
        return _EMPTY

    def position_of(self, seg: Segment, offset: int) -> int:
        """Byte position in `seg` of the batch containing `offset` (-1 if past its last batch)."""
        entry = self.index.floor_offset(offset)
        start = entry[2] if entry is not None and entry[1] == seg.base_offset else 0
        try:
            return seg.find(offset, start)
        except CorruptMessageError as e:
            self.flag_corrupt(seg, str(e))
            raise

    def flag_corrupt(self, seg: Segment, reason: str) -> None:
        if self.corrupt_reason is None:
            self.corrupt_reason = f"{seg.path}: {reason}"
        log.error("corrupt data in %s: %s", seg.path, reason)

    def segment_max_timestamp(self, seg: Segment) -> int | None:
        if seg is self.segments[-1]:
            return None if self.indexer.max_ts == NO_TS else self.indexer.max_ts
        found = self.index.segment_max_timestamp(seg.base_offset)
        return None if found is None else found[0]

    def retention_timestamp(self, seg: Segment) -> int:
        """A segment's largest timestamp, or its file's modification time if it has none."""
        ts = self.segment_max_timestamp(seg)
        if ts is None or ts < 0:  # no timestamps: the file's modification time
            try:
                return os.stat(seg.path).st_mtime_ns // 1_000_000
            except OSError:
                return 0
        return ts

    # -- truncation and deletion --------------------------------------------------------------------

    def truncate_segments(self, offset: int) -> tuple[int, int]:
        """Drop every batch holding an offset >= `offset` (in [log start, log end)): the segments
        after the one holding it, and that one's tail, which becomes the active segment. Returns
        (the new log end offset, the active segment's base offset). The caller then truncates the
        index and calls `restore_active_state`."""
        i = bisect.bisect_right(self.bases, offset) - 1
        seg = self.segments[i]
        position = self.position_of(seg, offset)
        if position < 0:
            position = seg.size_bytes
            cut = self.log_end_offset if i == len(self.segments) - 1 else self.bases[i + 1]
        else:
            cut = seg.batch_base_offset(position)
        try:
            for later in self.segments[i + 1 :]:
                later.delete()
            del self.segments[i + 1 :]
            del self.bases[i + 1 :]
            if not seg.is_active:
                seg.reopen_writable(self.config.segment_bytes)
            seg.truncate(position)
        except (StorageError, OSError) as e:
            self.go_offline(f"truncation to {offset} failed: {e}")
            raise StorageError(f"truncation of {self.directory} to {offset} failed: {e}") from e
        self.log_end_offset = cut
        self.recovery_point = min(self.recovery_point, cut)
        while self.pending and self.pending[-1][0] > cut:  # no longer the end of anything
            self.pending.pop()
        self.size_bytes = sum(s.size_bytes for s in self.segments)
        return cut, seg.base_offset

    def replace_all_segments(self, offset: int) -> None:
        """Delete every segment and start one empty segment at `offset`. The caller then truncates
        the index and calls `restore_active_state`."""
        try:
            for seg in self.segments:
                seg.delete()
            self.segments = [Segment.create(self.directory, offset, self.config.segment_bytes)]
        except (StorageError, OSError) as e:
            self.go_offline(f"truncation to {offset} failed: {e}")
            raise StorageError(f"truncation of {self.directory} to {offset} failed: {e}") from e
        self.bases = [offset]
        self.log_end_offset = self.recovery_point = offset
        self.pending.clear()
        self.size_bytes = 0

    def delete_oldest(self, count: int) -> None:
        """Delete the `count` oldest segments (never the active one: the caller's decision). A
        deleted segment's pending flush finds no file left to sync (see flusher.py)."""
        try:
            for seg in self.segments[:count]:
                seg.delete()
        except StorageError as e:
            self.go_offline(str(e))
            raise
        finally:
            gone = [s for s in self.segments[:count] if not s.path.exists()]
            del self.segments[: len(gone)]
            del self.bases[: len(gone)]
            self.size_bytes = sum(s.size_bytes for s in self.segments)

    # -- close ----------------------------------------------------------------------------------------

    def close(self, high_watermark: int, checkpoints: Callable[[], dict[bytes, int]]) -> None:
        """Wait for the pending flushes, flush and trim the active segment, write `checkpoints()`
        (taken once the recovery point is final), and mark a clean shutdown, unless a rolled
        segment's flush is still running after the flusher's `wait_timeout_s`."""
        all_flushed, _ = self.wait_for_flushes(high_watermark)
        times: list[TimeEntry] = []
        self.indexer.finish(times)
        self.segments[-1].flush()
        if all_flushed:
            self.recovery_point = self.log_end_offset
        self.index.write(times=times, meta=checkpoints())
        self.index.sync()
        for seg in self.segments:
            seg.close(trim=True)
        self.index.close()
        if all_flushed:
            write_atomically(self.directory / CLEAN_SHUTDOWN_FILE, b"")
        else:
            log.warning("%s: %d segment flushes still pending after %.0f s; closed without the "
                        "clean-shutdown marker, so the next open recovers from offset %d", self.directory,
                        len(self.pending), self._flusher.wait_timeout_s, self.recovery_point)
            self.pending.clear()  # they run on, on their own descriptors

    def abandon(self) -> None:
        """Release mappings and the index without writing anything (no clean-shutdown marker).
        Pending flushes run on, on their own descriptors; nobody applies them."""
        self.pending.clear()
        for seg in self.segments:
            with contextlib.suppress(StorageError, OSError):
                seg.close(trim=False)
        with contextlib.suppress(Exception):
            self.index.close()
        self.closed = True
