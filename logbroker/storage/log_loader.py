"""Loading and recovering a log directory when it is opened (Kafka's LogLoader).

Clean open. The clean-shutdown marker (log_dir.py) says `close()` trimmed and indexed everything,
so only the tail of the active segment past its last index entry is walked; if that walk does not
end exactly at the end of the file, the active segment is recovered as after a crash.

Crash recovery. Without the marker, every segment from the one holding the recovery point
(checkpointed in the index) onwards is validated batch by batch (`segment.Scan`): length bounds,
magic, CRC, and baseOffset equal to the expected next offset. The first bad batch and everything
after it is cut off (later segments are deleted); each cut is returned in `recovery_reports` and
logged. A zero header at the end of the data is the preallocated tail, not damage. Index entries
from the first validated segment on are rebuilt from the walk (a `SegmentIndexer` per segment, one
offset entry per batch at most), in transactions of at most RECOVERY_INDEX_CHUNK entries; the
epoch history is rebuilt from the batches' leader epochs. The files are fsynced before the log is
used, so the recovery point after loading is the log end offset.

Invariants of a loaded log:
- segments are contiguous: each segment's base offset is the previous one's end; the last is the
  active one, preallocated to `segment_bytes` or, if that failed, mapped read-only (`read_only`);
- log start offset = min(max(checkpoint, first segment's base), log end offset);
- high watermark = max(log start offset, min(checkpoint, log end offset)), or the log start
  offset without a checkpoint (a rebuilt index): a restarted leader exposes nothing beyond what
  was known replicated;
- every epoch entry starts in [log start offset, log end offset); index entries below the first
  segment are deleted, and the index is synced with the new checkpoints.
On any failure, what was opened is closed again and nothing more is written.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from logbroker.errors import StorageError
from logbroker.storage import segment as segment_file
from logbroker.storage.compaction import is_compacted
from logbroker.storage.index import (
    META_HIGH_WATERMARK,
    META_LOG_START_OFFSET,
    META_RECOVERY_POINT,
    META_SEGMENT_BYTES,
    EpochEntry,
    OffsetEntry,
    PartitionIndex,
    TimeEntry,
)
from logbroker.storage.leader_epoch_cache import UNDEFINED_EPOCH, LeaderEpochCache
from logbroker.storage.log_config import LogConfig, with_segment_bytes
from logbroker.storage.log_dir import (
    CLEAN_SHUTDOWN_FILE,
    INDEX_DIR,
    file_size,
    fsync_dir,
    list_segments,
    mapped,
)
from logbroker.storage.segment import Scan, Segment
from logbroker.storage.segment_cleaner import recover_cleaning
from logbroker.storage.segment_indexer import SegmentIndexer

log = logging.getLogger(__name__)

RECOVERY_INDEX_CHUNK = 50_000  # index entries per transaction while recovery rebuilds
PREALLOCATE_RETRY_INTERVAL_MS = 1_000  # a read-only log retries preallocating at most this often


class RecoveryReport(NamedTuple):
    """One cut made by recovery: `truncated_bytes` removed from `segment` starting at `position`."""

    segment: str
    position: int
    truncated_bytes: int
    reason: str


@dataclass
class LoadedLog:
    """What loading found: the parts a Log is composed from. See the module doc's invariants."""

    config: LogConfig
    index: PartitionIndex
    segments: list[Segment]
    bases: list[int]
    log_start_offset: int
    log_end_offset: int
    high_watermark: int
    epochs: LeaderEpochCache
    opened_ms: int  # the clock when loading began
    read_only: str | None = None
    preallocate_retry_at_ms: int = 0
    recovery_reports: list[RecoveryReport] = field(default_factory=list)


class LogLoader:
    """Opens the index and segments of one directory, recovering them if needed. Use `load_log`."""

    def __init__(self, directory: Path, config: LogConfig, now_ms: Callable[[], int]) -> None:
        self.directory = directory
        self.config = config
        self._now_ms = now_ms
        self.index: PartitionIndex | None = None
        self.segments: list[Segment] = []
        self.read_only: str | None = None
        self.preallocate_retry_at_ms = 0
        self.recovery_reports: list[RecoveryReport] = []

    def load(self, segment_bytes_from_checkpoint: bool) -> LoadedLog:
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            marker = directory / CLEAN_SHUTDOWN_FILE
            clean = marker.exists()
            recover_cleaning(directory)
            self.index, rebuilt = PartitionIndex.open(directory / INDEX_DIR, self.config.index_map_bytes)
            if clean:
                marker.unlink()
                fsync_dir(directory)
            bases = list_segments(directory)
        except OSError as e:
            raise StorageError(f"cannot open log {directory}: {e}") from e
        index = self.index
        meta_lso = 0 if rebuilt else (index.meta(META_LOG_START_OFFSET) or 0)
        meta_hw = None if rebuilt else index.meta(META_HIGH_WATERMARK)
        if segment_bytes_from_checkpoint and not rebuilt:
            self.config = with_segment_bytes(self.config, index.meta(META_SEGMENT_BYTES))
        now = self._now_ms()
        if not bases:
            self.segments = [Segment.create(directory, meta_lso, self.config.segment_bytes)]
            bases = [meta_lso]
            epochs = LeaderEpochCache()
            index.truncate_from(meta_lso, meta_lso, [], {})
            leo = meta_lso
        else:
            leo, bases = self._recover_segments(bases, clean and not rebuilt, rebuilt)
            epochs = LeaderEpochCache(e for e in index.epochs() if e[1] < leo)
            self._open_segments(bases, now)
        lso = min(max(meta_lso, bases[0]), leo)
        # the checkpoint, or the log start offset when there is none (Kafka: a missing
        # replication-offset checkpoint means 0); a leader whose ISR is itself raises it to the LEO
        hw = max(lso, min(meta_hw or 0, leo))
        epochs = epochs.truncate_from_start(lso)
        index.delete_before(bases[0], epochs.entries, {
            META_LOG_START_OFFSET: lso, META_RECOVERY_POINT: leo, META_HIGH_WATERMARK: hw,
            META_SEGMENT_BYTES: self.config.segment_bytes,
        })
        index.sync()
        return LoadedLog(self.config, index, self.segments, bases, lso, leo, hw, epochs, now, self.read_only,
                         self.preallocate_retry_at_ms, self.recovery_reports)

    def abandon(self) -> None:
        """Close what was opened, writing nothing."""
        for seg in self.segments:
            with contextlib.suppress(StorageError, OSError):
                seg.close(trim=False)
        if self.index is not None:
            with contextlib.suppress(Exception):
                self.index.close()

    def _recover_segments(self, bases: list[int], clean: bool, rebuilt: bool) -> tuple[int, list[int]]:
        """(log end offset, segment base offsets) once the segments are checked: only the active
        segment's tail after a clean shutdown, from the recovery point's segment on otherwise."""
        assert self.index is not None
        if clean:
            leo = self._walk_clean_tail(bases[-1])
            if leo is not None:
                return leo, bases
            log.warning("%s: clean-shutdown marker, but the active segment's tail does not "
                        "check out; recovering it", self.directory)
            leo = self._recover(bases, len(bases) - 1)
        else:
            rp = 0 if rebuilt else (self.index.meta(META_RECOVERY_POINT) or 0)
            start = max(0, bisect.bisect_right(bases, rp) - 1)
            leo = self._recover(bases, start)
        return leo, list_segments(self.directory, warn=False)

    def _open_segments(self, bases: list[int], now: int) -> None:
        directory = self.directory
        for base in bases[:-1]:
            self.segments.append(Segment.open_closed(directory / segment_file.file_name(base), base))
        last = bases[-1]
        self.segments.append(self._open_active_segment(directory / segment_file.file_name(last), last, now))

    def _open_active_segment(self, path: Path, base: int, now: int) -> Segment:
        """The last segment, preallocated to `segment_bytes` and writable; or, if preallocating
        fails (disk full), mapped read-only: the log serves what it has and refuses writes until
        a retry succeeds (see "Read-only" in log.py)."""
        size = file_size(path)
        try:
            return Segment.open_active(path, base, size, self.config.segment_bytes)
        except StorageError as e:
            seg = Segment.open_closed(path, base)  # may raise: then the log cannot be opened at all
            if seg.size_bytes != size:
                seg.close(trim=False)
                raise
            self.read_only = str(e)
            self.preallocate_retry_at_ms = now + PREALLOCATE_RETRY_INTERVAL_MS
            log.error("log %s is read-only (appends fail with KAFKA_STORAGE_ERROR until preallocation "
                      "succeeds): %s", self.directory, e)
            return seg

    def _walk_clean_tail(self, last_base: int) -> int | None:
        """LEO after a clean shutdown: walk the active segment from its last index entry.
        None if that walk does not end exactly at the end of the trimmed file."""
        assert self.index is not None
        path = self.directory / segment_file.file_name(last_base)
        entry = self.index.floor_offset((1 << 63) - 1)
        position, expected = (entry[2], entry[0]) if entry and entry[1] == last_base else (0, last_base)
        with mapped(path) as (buf, size):
            if position > size:
                return None
            scan = Scan(buf, size, expected, position)
            for _ in scan:
                pass
            if scan.damage is not None or scan.end_position != size:
                return None
            return scan.next_offset

    def _recover(self, bases: list[int], start: int) -> int:
        """Validate segments `bases[start:]`, cut at the first damage, rebuild their index entries.
        Returns the log end offset."""
        assert self.index is not None
        start_base = bases[start]
        epochs = [e for e in self.index.epochs() if e[1] < start_base]
        self.index.truncate_from(start_base, start_base, epochs, {})
        expected = start_base
        scanned: list[Path] = []
        for i in range(start, len(bases)):
            base = bases[i]
            path = self.directory / segment_file.file_name(base)
            compacted_gap = is_compacted(self.config.cleanup_policy) and base > expected
            if base != expected and not compacted_gap:
                gap = f"segment base offset {base} does not follow the previous segment's end {expected}"
                self._delete_segment_files(bases[i:], gap)
                break
            expected, damage = self._recover_segment(path, base, epochs, i < len(bases) - 1)
            scanned.append(path)
            if damage is not None:
                self._delete_segment_files(bases[i + 1 :], f"follows damage in {path.name}")
                break
        try:
            for path in scanned:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(self.directory)
        except OSError as e:
            raise StorageError(f"cannot sync {self.directory} after recovery: {e}") from e
        return expected

    def _recover_segment(
        self, path: Path, base: int, epochs: list[EpochEntry], closed: bool
    ) -> tuple[int, str | None]:
        """Walk one segment from `base`, index its good batches (extending `epochs` in place), cut
        the file at the first damage. Returns (the offset after its last good batch, the damage)."""
        assert self.index is not None
        index = self.index
        indexer = SegmentIndexer(base, self.config.index_interval_bytes)
        offsets: list[OffsetEntry] = []
        times: list[TimeEntry] = []
        new_epochs: list[EpochEntry] = []
        latest_epoch = epochs[-1][0] if epochs else UNDEFINED_EPOCH
        with mapped(path) as (buf, size):
            scan = Scan(buf, size, base, allow_gaps=closed and is_compacted(self.config.cleanup_policy))
            for b in scan:
                indexer.add(b.position, b.size_bytes, b.base_offset, b.max_timestamp, offsets, times)
                if b.leader_epoch > latest_epoch:
                    latest_epoch = b.leader_epoch
                    new_epochs.append((b.leader_epoch, b.base_offset))
                if len(offsets) + len(times) >= RECOVERY_INDEX_CHUNK:
                    index.write(offsets, times, new_epochs)
                    epochs += new_epochs
                    offsets, times, new_epochs = [], [], []
        indexer.finish(times)
        index.write(offsets, times, new_epochs)
        epochs += new_epochs
        end = scan.end_position
        damage = scan.damage
        if end < size:
            try:
                os.truncate(path, end)
            except OSError as e:
                raise StorageError(f"cannot truncate {path} during recovery: {e}") from e
            if damage is not None:
                self._report(path, end, size - end, damage)
        return scan.next_offset, damage

    def _delete_segment_files(self, bases: list[int], reason: str) -> None:
        for base in bases:
            path = self.directory / segment_file.file_name(base)
            size = file_size(path)
            self._report(path, 0, size, reason)
            try:
                path.unlink()
            except OSError as e:
                raise StorageError(f"cannot delete {path} during recovery: {e}") from e

    def _report(self, path: Path, position: int, truncated_bytes: int, reason: str) -> None:
        self.recovery_reports.append(RecoveryReport(path.name, position, truncated_bytes, reason))
        log.warning("recovery of %s: truncated %d bytes at byte %d: %s", path, truncated_bytes, position, reason)


def load_log(
    directory: Path, config: LogConfig, now_ms: Callable[[], int], segment_bytes_from_checkpoint: bool = False
) -> LoadedLog:
    """Open and, if needed, recover the log in `directory` (created if missing). On failure,
    everything opened is closed again before the error propagates."""
    loader = LogLoader(directory, config, now_ms)
    try:
        return loader.load(segment_bytes_from_checkpoint)
    except BaseException:
        loader.abandon()
        raise

