"""The log of one partition replica: segment files plus their LMDB index, in one directory.

Directory ``<data dir>/<topic>-<partition>/``::

    00000000000000000000.log   closed segments (read-only, trimmed), oldest first
    00000000000000004711.log   the active segment (preallocated, zeros past the data)
    index.lmdb/                offset, time, epoch and checkpoint records (see index.py)
    .clean_shutdown            present only while the log is closed after a clean `close()`
    partition.metadata         the topic id the log belongs to (see log_identity.py)

Offsets. Every batch's baseOffset is assigned here: the first batch of an append gets the log end
offset, the next one follows its predecessor's last offset, with no gaps. Offsets strictly
increase within a segment and across segments; a segment's name is the offset of its first batch.

Recovery (`Log.open`). The clean-shutdown marker says `close()` trimmed and indexed everything, so
only the tail of the active segment past its last index entry is walked. Without the marker (a
crash), every segment from the one holding the recovery point onwards is validated batch by batch
(`segment.Scan`): length bounds, magic, CRC, and baseOffset equal to the expected next offset.
The first bad batch and everything after it is cut off; each cut is returned in
`recovery_reports` and logged. A zero header at the end of the data is the preallocated tail, not
damage. Index entries from the first validated segment on are rebuilt from the walk.

Recovery point. Offsets below it are on disk (fsynced), so recovery trusts the segments before
the one holding it. A roll does not wait for the disk: it trims the old segment and hands its fsync
to a background `SegmentFlusher` (flusher.py). When that fsync has finished, and those of all
earlier rolled segments, the recovery point moves to the end of the segment and is checkpointed
in the index; the log applies finished flushes on its own thread at its next append, roll, flush,
retention, truncation or close (`_reap_flushes`). So the recovery point may lag the rolls, never
lead the disk. `flush()` and `close()` wait for the log's pending flushes (bounded by the flusher's
`wait_timeout_s`); a close that gives up writes no clean-shutdown marker, so the next open recovers.

High watermark. The log only stores it; the replication layer moves it. It is checkpointed in the
index (Kafka's replication-offset checkpoint) on `close`, with every recovery-point write (`flush`,
and after a rolled segment's background flush), at truncation and retention, and when the log
manager's periodic `checkpoint_high_watermarks` finds it moved: never an index write per append. A
reopened log starts from min(checkpoint, log end offset), or from its log start offset if there is
no checkpoint (a rebuilt index), so a restarted leader exposes nothing beyond what was known
replicated; a leader whose ISR is itself alone (standalone mode) raises it to the log end offset
as soon as it leads (partition_state).

Read-only. If the active segment cannot be preallocated when the log opens (disk full), the log
still opens, with that segment mapped read-only: reads, retention, epoch bookkeeping and
checkpoints go on, and writes (append, follower append, truncation, roll) retry the preallocation
at most once every PREALLOCATE_RETRY_INTERVAL_MS and otherwise fail with StorageError
(KAFKA_STORAGE_ERROR), the log unchanged. `read_only_reason` says why; `retry_preallocation` forces
a retry. (Offline, by contrast, is a log whose data can no longer be trusted: it takes nothing.)

Views. `read` returns a zero-copy read-only slice of a segment mapping. It is valid until the log is
next modified (append, roll, truncate_to, enforce_retention, close): copy it, or finish with it,
before anything else can touch the log. Holding it longer is safe for the process (see segment.py)
but the bytes may have been zeroed by a truncation.

Threading: a Log is owned by one thread (the broker's event loop, or a worker it hands the log to);
no method may run concurrently with another on the same Log.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import mmap
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

from logbroker.errors import (
    CorruptMessageError,
    InvalidConfigError,
    InvalidFetchSizeError,
    OffsetOutOfRangeError,
    RecordListTooLargeError,
    StorageError,
)
from logbroker.storage import segment as segment_file
from logbroker.storage.flusher import PendingFlush, SegmentFlusher, default_flusher
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
from logbroker.storage.log_identity import IDENTITY_FILES
from logbroker.storage.record_batch import HEADER_SIZE, decode_batch, validate_batches
from logbroker.storage.segment import POSITION_MAX, Scan, Segment

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000
CLEAN_SHUTDOWN_FILE = ".clean_shutdown"
INDEX_DIR = "index.lmdb"
DELETE_SUFFIX = "-delete"
CREATE_TIME = "CreateTime"
LOG_APPEND_TIME = "LogAppendTime"
NO_TIMESTAMP = -1
UNDEFINED_EPOCH = -1
UNDEFINED_EPOCH_OFFSET = -1
APPEND_BYTES_MAX = POSITION_MAX // 2  # one append's payload; the server bounds requests far lower
RECOVERY_INDEX_CHUNK = 50_000  # index entries per transaction while recovery rebuilds
PREALLOCATE_RETRY_INTERVAL_MS = 1_000  # a read-only log retries preallocating at most this often
_NO_TS = -(1 << 63) - 1  # below every int64 timestamp
_EMPTY = memoryview(b"")


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class LogConfig:
    """Per-log settings (Kafka's topic configs with units last)."""

    segment_bytes: int = 128 << 20  # preallocated per partition: Redpanda's default, not Kafka's 1 GiB
    segment_ms: int = 7 * DAY_MS
    retention_ms: int = 7 * DAY_MS  # -1: unlimited
    retention_bytes: int = -1  # -1: unlimited
    max_message_bytes: int = 1 << 20  # largest batch accepted
    index_interval_bytes: int = 4096
    flush_interval_messages: int = -1  # -1: never fsync on a message count
    flush_interval_ms: int = -1  # -1: never fsync on time
    message_timestamp_type: str = CREATE_TIME  # or LogAppendTime
    index_map_bytes: int = 256 << 20  # LMDB map size per partition

    def __post_init__(self) -> None:
        checks = [
            (HEADER_SIZE <= self.segment_bytes <= POSITION_MAX // 2, "segment_bytes", self.segment_bytes),
            (self.segment_ms >= 1, "segment_ms", self.segment_ms),
            (self.retention_ms >= -1, "retention_ms", self.retention_ms),
            (self.retention_bytes >= -1, "retention_bytes", self.retention_bytes),
            (HEADER_SIZE <= self.max_message_bytes <= APPEND_BYTES_MAX, "max_message_bytes", self.max_message_bytes),
            (self.index_interval_bytes >= 0, "index_interval_bytes", self.index_interval_bytes),
            (self.flush_interval_messages >= -1, "flush_interval_messages", self.flush_interval_messages),
            (self.flush_interval_ms >= -1, "flush_interval_ms", self.flush_interval_ms),
            (self.message_timestamp_type in (CREATE_TIME, LOG_APPEND_TIME), "message_timestamp_type",
             self.message_timestamp_type),
            (1 << 20 <= self.index_map_bytes <= 1 << 40, "index_map_bytes", self.index_map_bytes),
        ]
        for ok, name, value in checks:
            if not ok:
                raise InvalidConfigError(f"log config {name}={value!r} is out of bounds")

    @classmethod
    def from_topic_config(cls, config: dict[str, str], base: LogConfig | None = None) -> LogConfig:
        """A LogConfig from topic config strings (metadata.TOPIC_CONFIG_DEFAULTS keys; Kafka's
        dotted names work too). Keys it does not use are ignored; missing ones come from `base`
        (the broker's defaults) or the class defaults."""
        values = {f.name: getattr(base, f.name) for f in fields(cls)} if base else {}
        names = {f.name for f in fields(cls)}
        for raw_key, raw in config.items():
            key = raw_key.replace(".", "_")
            if key not in names:
                continue
            if key == "message_timestamp_type":
                values[key] = raw
                continue
            try:
                values[key] = int(raw)
            except (TypeError, ValueError):
                raise InvalidConfigError(f"{raw_key} must be an integer, got {raw!r}") from None
        return cls(**values)


class AppendResult(NamedTuple):
    base_offset: int
    last_offset: int
    max_timestamp: int
    log_append_time_ms: int  # -1 unless the log uses LogAppendTime
    record_count: int


class RecoveryReport(NamedTuple):
    """One cut made by recovery: `truncated_bytes` removed from `segment` starting at `position`."""

    segment: str
    position: int
    truncated_bytes: int
    reason: str


class _SegmentIndexer:
    """Decides the index entries of one segment as batches are added (append and recovery)."""

    __slots__ = ("segment_base", "interval_bytes", "since_bytes", "max_ts", "max_ts_offset", "indexed_ts")

    def __init__(self, segment_base: int, interval_bytes: int) -> None:
        self.segment_base = segment_base
        self.interval_bytes = interval_bytes
        self.since_bytes = 0
        self.max_ts = _NO_TS
        self.max_ts_offset = segment_base
        self.indexed_ts = _NO_TS

    def add(
        self, position: int, size: int, base_offset: int, max_ts: int, offsets: list[OffsetEntry],
        times: list[TimeEntry],
    ) -> None:
        if max_ts > self.max_ts:
            self.max_ts = max_ts
            self.max_ts_offset = base_offset
        if position == 0 or self.since_bytes > self.interval_bytes:
            offsets.append((base_offset, self.segment_base, position))
            self.since_bytes = 0
            if self.max_ts > self.indexed_ts:
                times.append((self.segment_base, self.max_ts, self.max_ts_offset))
                self.indexed_ts = self.max_ts
        self.since_bytes += size

    def finish(self, times: list[TimeEntry]) -> None:
        """The pending time entry, when the segment stops being active (its largest timestamp)."""
        if self.max_ts > self.indexed_ts:
            times.append((self.segment_base, self.max_ts, self.max_ts_offset))
            self.indexed_ts = self.max_ts

    def state(self) -> tuple[int, int, int, int]:
        return self.since_bytes, self.max_ts, self.max_ts_offset, self.indexed_ts

    def restore(self, state: tuple[int, int, int, int]) -> None:
        self.since_bytes, self.max_ts, self.max_ts_offset, self.indexed_ts = state


class Log:
    """An append-only partition log. Create with `Log.open`. See the module doc."""

    def __init__(
        self, directory: Path, config: LogConfig, now_ms: Callable[[], int], flusher: SegmentFlusher | None = None
    ) -> None:
        self.directory = directory
        self._config = config
        self._now_ms = now_ms
        self._flusher = flusher if flusher is not None else default_flusher()
        # background flushes of rolled segments, oldest first: (segment end offset, flush)
        self._pending: deque[tuple[int, PendingFlush]] = deque()
        self._segments: list[Segment] = []
        self._bases: list[int] = []
        self._index: PartitionIndex | None = None
        self._indexer = _SegmentIndexer(0, config.index_interval_bytes)
        self._epochs: list[EpochEntry] = []
        self._log_start_offset = 0
        self._log_end_offset = 0
        self._high_watermark = 0
        self._recovery_point = 0
        self._size_bytes = 0
        self._active_created_ms = 0
        self._unflushed_messages = 0
        self._last_flush_ms = 0
        self._closed = False
        self._offline: str | None = None
        self._read_only: str | None = None  # why the active segment is not writable (see "Read-only")
        self._preallocate_retry_at_ms = 0
        self._checkpointed_hw = -1  # the high watermark last written to the index
        self.corrupt_reason: str | None = None
        self.recovery_reports: list[RecoveryReport] = []

    # -- opening and recovery -------------------------------------------------------------------

    @classmethod
    def open(
        cls, directory: Path, config: LogConfig, now_ms: Callable[[], int] = wall_clock_ms,
        flusher: SegmentFlusher | None = None, *, segment_bytes_from_checkpoint: bool = False,
    ) -> Log:
        """Open the log in `directory`, creating it if missing, recovering it if it was not closed.
        Rolled segments are fsynced by `flusher` (default: a process-wide one).
        `segment_bytes_from_checkpoint`: the caller does not know the topic's config yet, so the
        segment size is the one checkpointed when the log was last open (`config`'s if none)."""
        self = cls(Path(directory), config, now_ms, flusher)
        try:
            self._load(segment_bytes_from_checkpoint)
        except BaseException:
            self._abandon()
            raise
        return self

    def _load(self, segment_bytes_from_checkpoint: bool = False) -> None:
        directory = self.directory
        try:
            directory.mkdir(parents=True, exist_ok=True)
            marker = directory / CLEAN_SHUTDOWN_FILE
            clean = marker.exists()
            self._index, rebuilt = PartitionIndex.open(directory / INDEX_DIR, self._config.index_map_bytes)
            if clean:
                marker.unlink()
                _fsync_dir(directory)
            bases = self._list_segments()
        except OSError as e:
            raise StorageError(f"cannot open log {directory}: {e}") from e
        index = self._index
        meta_lso = 0 if rebuilt else (index.meta(META_LOG_START_OFFSET) or 0)
        meta_hw = None if rebuilt else index.meta(META_HIGH_WATERMARK)
        if segment_bytes_from_checkpoint and not rebuilt:
            self._config = _with_segment_bytes(self._config, index.meta(META_SEGMENT_BYTES))
        now = self._now_ms()
        if not bases:
            self._segments = [Segment.create(directory, meta_lso, self._config.segment_bytes)]
            self._bases = [meta_lso]
            self._epochs = []
            index.truncate_from(meta_lso, meta_lso, [], {})
            self._log_end_offset = meta_lso
        else:
            if clean and not rebuilt:
                leo = self._walk_clean_tail(bases[-1])
                if leo is None:
                    log.warning("%s: clean-shutdown marker, but the active segment's tail does not "
                                "check out; recovering it", directory)
                    leo = self._recover(bases, len(bases) - 1)
                    bases = self._list_segments(warn=False)
            else:
                rp = 0 if rebuilt else (index.meta(META_RECOVERY_POINT) or 0)
                start = max(0, bisect.bisect_right(bases, rp) - 1)
                leo = self._recover(bases, start)
                bases = self._list_segments(warn=False)
            self._log_end_offset = leo
            self._epochs = [e for e in index.epochs() if e[1] < leo]
            for base in bases[:-1]:
                self._segments.append(Segment.open_closed(directory / segment_file.file_name(base), base))
            last = bases[-1]
            last_path = directory / segment_file.file_name(last)
            self._segments.append(self._open_active_segment(last_path, last, now))
            self._bases = bases
        self._size_bytes = sum(s.size_bytes for s in self._segments)
        self._log_start_offset = min(max(meta_lso, self._bases[0]), self._log_end_offset)
        # the checkpoint, or the log start offset when there is none (Kafka: a missing
        # replication-offset checkpoint means 0); a leader whose ISR is itself raises it to the LEO
        self._high_watermark = max(self._log_start_offset, min(meta_hw or 0, self._log_end_offset))
        self._checkpointed_hw = self._high_watermark
        self._recovery_point = self._log_end_offset
        self._epochs = _epochs_from_start(self._epochs, self._log_start_offset)
        index.delete_before(self._bases[0], self._epochs, self._checkpoints())
        index.sync()
        self._restore_active_state(now)
        self._last_flush_ms = now

    def _open_active_segment(self, path: Path, base: int, now: int) -> Segment:
        """The last segment, preallocated to `segment_bytes` and writable; or, if preallocating
        fails (disk full), mapped read-only: the log serves what it has and refuses writes until
        a retry succeeds (see "Read-only" in the module doc)."""
        size = _file_size(path)
        try:
            return Segment.open_active(path, base, size, self._config.segment_bytes)
        except StorageError as e:
            seg = Segment.open_closed(path, base)  # may raise: then the log cannot be opened at all
            if seg.size_bytes != size:
                seg.close(trim=False)
                raise
            self._read_only = str(e)
            self._preallocate_retry_at_ms = now + PREALLOCATE_RETRY_INTERVAL_MS
            log.error("log %s is read-only (appends fail with KAFKA_STORAGE_ERROR until preallocation "
                      "succeeds): %s", self.directory, e)
            return seg

    def _list_segments(self, warn: bool = True) -> list[int]:
        bases = []
        for entry in os.scandir(self.directory):
            base = segment_file.parse_file_name(entry.name)
            if base is not None and entry.is_file(follow_symlinks=False):
                bases.append(base)
            elif warn and entry.name not in (INDEX_DIR, CLEAN_SHUTDOWN_FILE, *IDENTITY_FILES):
                log.warning("%s: ignoring stray file %s", self.directory, entry.name)
        bases.sort()
        return bases

    def _walk_clean_tail(self, last_base: int) -> int | None:
        """LEO after a clean shutdown: walk the active segment from its last index entry.
        None if that walk does not end exactly at the end of the trimmed file."""
        assert self._index is not None
        path = self.directory / segment_file.file_name(last_base)
        entry = self._index.floor_offset((1 << 63) - 1)
        position, expected = (entry[2], entry[0]) if entry and entry[1] == last_base else (0, last_base)
        with _mapped(path) as (buf, size):
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
        assert self._index is not None
        index = self._index
        interval = self._config.index_interval_bytes
        start_base = bases[start]
        epochs = [e for e in index.epochs() if e[1] < start_base]
        index.truncate_from(start_base, start_base, epochs, {})
        expected = start_base
        scanned: list[Path] = []
        for i in range(start, len(bases)):
            base = bases[i]
            path = self.directory / segment_file.file_name(base)
            damage: str | None = None
            if base != expected:
                damage = f"segment base offset {base} does not follow the previous segment's end {expected}"
                self._delete_segment_files(bases[i:], damage)
                break
            indexer = _SegmentIndexer(base, interval)
            offsets: list[OffsetEntry] = []
            times: list[TimeEntry] = []
            new_epochs: list[EpochEntry] = []
            latest_epoch = epochs[-1][0] if epochs else UNDEFINED_EPOCH
            with _mapped(path) as (buf, size):
                scan = Scan(buf, size, expected)
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
            scanned.append(path)
            expected = scan.next_offset
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
            _fsync_dir(self.directory)
        except OSError as e:
            raise StorageError(f"cannot sync {self.directory} after recovery: {e}") from e
        return expected

    def _delete_segment_files(self, bases: list[int], reason: str) -> None:
        for base in bases:
            path = self.directory / segment_file.file_name(base)
            size = _file_size(path)
            self._report(path, 0, size, reason)
            try:
                path.unlink()
            except OSError as e:
                raise StorageError(f"cannot delete {path} during recovery: {e}") from e

    def _report(self, path: Path, position: int, truncated_bytes: int, reason: str) -> None:
        self.recovery_reports.append(RecoveryReport(path.name, position, truncated_bytes, reason))
        log.warning("recovery of %s: truncated %d bytes at byte %d: %s", path, truncated_bytes, position, reason)

    def _restore_active_state(self, now: int) -> None:
        """Rebuild the in-memory state of the active segment: time-index running maximum, bytes
        since the last offset entry, and the age it rolls by."""
        assert self._index is not None
        active = self._segments[-1]
        indexer = _SegmentIndexer(active.base_offset, self._config.index_interval_bytes)
        position = 0
        last_time = self._index.segment_max_timestamp(active.base_offset)
        if last_time is not None:
            indexer.max_ts, indexer.max_ts_offset = last_time
            indexer.indexed_ts = last_time[0]
            position = max(0, self._position_of(active, last_time[1]))
        for _pos, _size, base, _lod, max_ts in active.batch_headers(position, active.size_bytes):
            if max_ts > indexer.max_ts:
                indexer.max_ts, indexer.max_ts_offset = max_ts, base
        entry = self._index.floor_offset(max(self._log_end_offset - 1, 0))
        if entry is not None and entry[1] == active.base_offset:
            indexer.since_bytes = active.size_bytes - entry[2]
        else:
            indexer.since_bytes = active.size_bytes
        self._indexer = indexer
        self._active_created_ms = now
        if active.size_bytes >= HEADER_SIZE:
            first_ts = active.header(0).max_timestamp
            if first_ts >= 0:
                self._active_created_ms = min(now, first_ts)

    # -- properties -----------------------------------------------------------------------------

    @property
    def config(self) -> LogConfig:
        return self._config

    def update_config(self, config: LogConfig) -> None:
        """New settings from now on (index_map_bytes takes effect at the next open)."""
        self._config = config
        self._indexer.interval_bytes = config.index_interval_bytes

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._log_end_offset

    @property
    def high_watermark(self) -> int:
        return self._high_watermark

    @high_watermark.setter
    def high_watermark(self, value: int) -> None:
        if not 0 <= value <= self._log_end_offset:
            raise ValueError(f"high watermark {value} outside [0, log end offset {self._log_end_offset}]")
        self._high_watermark = max(value, self._log_start_offset)

    @property
    def recovery_point(self) -> int:
        """Offsets below this are flushed to disk; recovery validates from its segment on."""
        return self._recovery_point

    @property
    def pending_flushes(self) -> list[int]:
        """End offsets of rolled segments whose background flush is not applied yet, oldest first."""
        return [end for end, _ in self._pending]

    @property
    def size_bytes(self) -> int:
        return self._size_bytes

    @property
    def segment_count(self) -> int:
        return len(self._segments)

    @property
    def segments(self) -> list[Segment]:
        """The segments, oldest first (a copy of the list; do not modify the segments)."""
        return list(self._segments)

    @property
    def latest_epoch(self) -> int:
        return self._epochs[-1][0] if self._epochs else UNDEFINED_EPOCH

    @property
    def epochs(self) -> list[EpochEntry]:
        """(leader epoch, start offset) history, oldest first."""
        return list(self._epochs)

    @property
    def index(self) -> PartitionIndex:
        assert self._index is not None
        return self._index

    @property
    def is_offline(self) -> bool:
        return self._offline is not None

    @property
    def read_only_reason(self) -> str | None:
        """Why the log takes no writes while it still serves reads (None: it takes them)."""
        return self._read_only

    # -- append ---------------------------------------------------------------------------------

    def append(self, records: bytes | bytearray | memoryview, leader_epoch: int) -> AppendResult:
        """Append a produce payload (one or more batches) as the leader, assigning offsets.

        Raises CorruptMessageError / MessageTooLargeError / UnsupportedForMessageFormatError /
        RecordListTooLargeError with nothing written, and StorageError (disk full, I/O error, index
        full) with the log as it was.
        """
        self._check_writable()
        if self._pending:
            self._reap_flushes()
        if leader_epoch < 0:
            raise ValueError(f"leader epoch {leader_epoch} must be >= 0")
        payload = memoryview(records)
        if payload.ndim != 1 or payload.itemsize != 1:
            payload = payload.cast("B")
        n = payload.nbytes
        if n > APPEND_BYTES_MAX:
            raise RecordListTooLargeError(f"append of {n} bytes exceeds {APPEND_BYTES_MAX}")
        config = self._config
        infos = validate_batches(payload, config.max_message_bytes)
        now = self._now_ms()
        active = self._room_for(n, now)
        start = active.size_bytes
        base_offset = next_offset = self._log_end_offset
        log_append = config.message_timestamp_type == LOG_APPEND_TIME
        indexer = self._indexer
        saved = indexer.state()
        batches: list[tuple[int, int, int]] = []
        offsets: list[OffsetEntry] = []
        times: list[TimeEntry] = []
        max_timestamp = NO_TIMESTAMP
        record_count = 0
        for info in infos:
            ts = now if log_append else info.max_timestamp
            batches.append((info.position, info.size_bytes, next_offset))
            indexer.add(start + info.position, info.size_bytes, next_offset, ts, offsets, times)
            if ts > max_timestamp:
                max_timestamp = ts
            next_offset += info.last_offset_delta + 1
            record_count += info.record_count
        epochs = [(leader_epoch, base_offset)] if leader_epoch > self.latest_epoch else []
        assert self._index is not None
        with self._undo_on_failure(active, start, n, saved):
            active.append(payload, batches, leader_epoch, now if log_append else None)
            self._index.write(offsets, times, epochs)
        active.size_bytes = start + n
        self._size_bytes += n
        self._log_end_offset = next_offset
        self._epochs += epochs
        self._unflushed_messages += record_count
        if (0 < config.flush_interval_messages <= self._unflushed_messages) or (
            config.flush_interval_ms >= 0 and now - self._last_flush_ms >= config.flush_interval_ms
        ):
            self.flush()
        return AppendResult(base_offset, next_offset - 1, max_timestamp, now if log_append else -1, record_count)

    # -- replication: follower appends and leader epochs -----------------------------------------

    def append_as_follower(self, records: bytes | bytearray | memoryview) -> AppendResult:
        """Append batches replicated from the leader exactly as they are: baseOffset,
        partitionLeaderEpoch and timestamps are kept, not assigned.

        Checks every batch (`validate_batches` with a bound as large as an append, CRC included),
        that the first baseOffset is the log end offset and that each batch follows the previous
        one without a gap, and that epochs never go backwards. Each batch whose epoch is above the
        latest one starts that epoch in the epoch history (`_assign_epoch`). Raises
        OffsetOutOfRangeError (first batch not at the log end offset) or CorruptMessageError with
        nothing written; StorageError as `append`.
        """
        self._check_writable()
        if self._pending:
            self._reap_flushes()
        payload = memoryview(records)
        if payload.ndim != 1 or payload.itemsize != 1:
            payload = payload.cast("B")
        n = payload.nbytes
        if n > APPEND_BYTES_MAX:
            raise RecordListTooLargeError(f"append of {n} bytes exceeds {APPEND_BYTES_MAX}")
        infos = validate_batches(payload, APPEND_BYTES_MAX)
        base_offset = next_offset = self._log_end_offset
        epochs = self._epochs
        max_timestamp = NO_TIMESTAMP
        record_count = 0
        bases: list[int] = []
        for info in infos:
            base = int.from_bytes(payload[info.position : info.position + 8], "big", signed=True)
            if base != next_offset:
                if not bases:
                    raise OffsetOutOfRangeError(
                        f"replicated batches start at offset {base}, the log ends at {next_offset}"
                    )
                raise CorruptMessageError(f"replicated batch at offset {base} does not follow offset {next_offset - 1}")
            epoch = info.partition_leader_epoch
            if epoch < 0:
                raise CorruptMessageError(f"replicated batch at offset {base} carries no leader epoch ({epoch})")
            epochs = _assign_epoch(epochs, epoch, base)
            bases.append(base)
            max_timestamp = max(max_timestamp, info.max_timestamp)
            next_offset = base + info.last_offset_delta + 1
            record_count += info.record_count
        assert self._index is not None
        kept = 0
        while kept < min(len(epochs), len(self._epochs)) and epochs[kept] == self._epochs[kept]:
            kept += 1
        if kept < len(self._epochs):  # epochs started at the log end offset without data: drop them
            self._index.replace_epochs(self._epochs[:kept])
            self._epochs = self._epochs[:kept]
        config = self._config
        now = self._now_ms()
        active = self._room_for(n, now)
        start = active.size_bytes
        indexer = self._indexer
        saved = indexer.state()
        offsets: list[OffsetEntry] = []
        times: list[TimeEntry] = []
        for info, base in zip(infos, bases, strict=True):
            indexer.add(start + info.position, info.size_bytes, base, info.max_timestamp, offsets, times)
        added = epochs[kept:]
        with self._undo_on_failure(active, start, n, saved):
            active.append(payload, [], 0, None)  # no batches to stamp: the bytes go in verbatim
            self._index.write(offsets, times, added)
        active.size_bytes = start + n
        self._size_bytes += n
        self._log_end_offset = next_offset
        self._epochs = list(epochs)
        self._unflushed_messages += record_count
        if (0 < config.flush_interval_messages <= self._unflushed_messages) or (
            config.flush_interval_ms >= 0 and now - self._last_flush_ms >= config.flush_interval_ms
        ):
            self.flush()
        return AppendResult(base_offset, next_offset - 1, max_timestamp, -1, record_count)

    def assign_epoch_start(self, epoch: int, offset: int) -> None:
        """Record that leader epoch `epoch` starts at `offset` (normally the log end offset, when
        this replica becomes leader in `epoch`), so the OffsetForLeaderEpoch answer for earlier
        epochs ends there. Epoch entries starting at or after `offset` (epochs that never got a
        batch) are replaced. A no-op if `epoch` is already the latest. ValueError for an epoch
        below the latest one or an offset outside [latest epoch's start, log end offset]. Only the
        index changes: allowed while the log is read-only."""
        self._check_online()
        assert self._index is not None
        latest = self.latest_epoch
        if epoch < 0 or epoch < latest:
            raise ValueError(f"leader epoch {epoch} is below the log's latest epoch {latest}")
        latest_start = self._epochs[-1][1] if self._epochs else 0
        if not latest_start <= offset <= self._log_end_offset:
            raise ValueError(
                f"epoch start offset {offset} is outside [{latest_start}, log end offset {self._log_end_offset}]"
            )
        if epoch == latest:
            return
        epochs = _assign_epoch(self._epochs, epoch, offset)
        if epochs[:-1] == self._epochs:
            self._index.write(epochs=epochs[-1:])
        else:
            self._index.replace_epochs(epochs)
        self._epochs = epochs

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Drop everything and restart the (empty) log at `offset`, which may lie past the log
        end offset: a follower that has fallen behind the leader's log start offset."""
        self._check_writable()
        if offset < 0:
            raise ValueError(f"offset {offset} is negative")
        self._reap_flushes()
        self._truncate_fully(offset)

    @contextlib.contextmanager
    def _undo_on_failure(self, active: Segment, start: int, n: int, saved: tuple[int, int, int, int]) -> Iterator[None]:
        """An append either lands whole or leaves the log as it was: on failure the copied bytes are
        zeroed and the indexer rewound, and an OSError surfaces as StorageError."""
        try:
            yield
        except BaseException as e:
            self._indexer.restore(saved)
            active.zero(start, start + n)
            if isinstance(e, StorageError) or not isinstance(e, Exception):
                raise
            raise StorageError(f"append to {active.path} failed: {e}") from e

    def _room_for(self, n: int, now: int) -> Segment:
        """The active segment, rolled first if `n` more bytes do not fit or it is too old."""
        active = self._segments[-1]
        if active.size_bytes and (
            active.size_bytes + n > active.capacity_bytes or now - self._active_created_ms > self._config.segment_ms
        ):
            self._roll(max(self._config.segment_bytes, n), now)
            active = self._segments[-1]
        elif active.size_bytes + n > active.capacity_bytes:
            active.grow(n)
        return active

    def roll(self) -> None:
        """Close the active segment and start a new one (a no-op if the active one is empty)."""
        self._check_writable()
        self._reap_flushes()
        if self._segments[-1].size_bytes:
            self._roll(self._config.segment_bytes, self._now_ms())

    def _roll(self, capacity_bytes: int, now: int) -> None:
        """Seal the active segment and start a new one. No msync or fsync here: the old segment's
        fsync is handed to the flusher, and the recovery point follows when it is done."""
        assert self._index is not None
        old = self._segments[-1]
        end = self._log_end_offset
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
            self._go_offline(f"roll of {old.path} failed: {e}")
            with contextlib.suppress(StorageError):
                new.delete()
            raise StorageError(f"roll of {old.path} failed: {e}") from e
        self._flusher.start(job)  # fsyncs the old file, then the directory (naming `new` durably)
        self._pending.append((end, job))
        times: list[TimeEntry] = []
        self._indexer.finish(times)
        self._segments.append(new)
        self._bases.append(new.base_offset)
        self._indexer = _SegmentIndexer(new.base_offset, self._config.index_interval_bytes)
        self._active_created_ms = now
        self._index.write(times=times)

    def _reap_flushes(self) -> None:
        """Apply finished background flushes, on the log's thread: advance the recovery point to
        the end of the newest rolled segment whose flush, and every earlier one's, has finished, and
        checkpoint it in the index. The checkpoint is not synced here (an LMDB sync can wait behind
        other fsyncs); it is durable at the next index sync (flush, close), and until then a crash
        recovers from the previous one. Raises StorageError (the log goes offline) if a flush failed.
        """
        pending = self._pending
        if not pending or not pending[0][1].done():
            return
        assert self._index is not None
        recovery_point = self._recovery_point
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
        if recovery_point > self._recovery_point:
            hw = self._high_watermark
            self._index.write(meta={META_RECOVERY_POINT: recovery_point, META_HIGH_WATERMARK: hw})
            self._recovery_point = recovery_point
            self._checkpointed_hw = hw
        for _ in range(finished):
            pending.popleft()
        if failed is not None:  # an fsync error: what was written to that file cannot be trusted
            path = pending[0][1].path
            self._go_offline(f"flush of {path} failed: {failed}")
            raise StorageError(f"flush of {path} failed: {failed}") from failed

    def wait_for_flushes(self, timeout: float | None = None, up_to: int | None = None) -> bool:
        """Block until the background flushes of rolled segments ending at or below `up_to`
        (default: all) have finished, at most `timeout` seconds (default: the flusher's
        `wait_timeout_s`), and apply them. Returns whether none of them is still pending.
        Blocks the caller: for shutdown and tests, not for the event loop."""
        self._check_open()
        return self._wait_for_flushes(timeout, up_to)

    def _wait_for_flushes(self, timeout: float | None = None, up_to: int | None = None) -> bool:
        jobs = [job for end, job in self._pending if up_to is None or end <= up_to]
        self._flusher.wait(jobs, timeout)
        self._reap_flushes()
        return not any(up_to is None or end <= up_to for end, _ in self._pending)

    def flush(self) -> None:
        """Wait for the pending flushes of rolled segments, msync the active segment, then advance
        and checkpoint the recovery point (to the log end offset unless a rolled segment's flush
        is still running after the flusher's `wait_timeout_s`)."""
        self._check_online()
        assert self._index is not None
        all_flushed = self._wait_for_flushes()
        try:
            self._segments[-1].flush()
        except StorageError as e:  # an fsync error: nothing written since can be trusted
            self._go_offline(str(e))
            raise
        if all_flushed:
            self._recovery_point = self._log_end_offset
        else:
            log.warning("%s: flushes of rolled segments still pending after %.0f s; recovery point stays at %d",
                        self.directory, self._flusher.wait_timeout_s, self._recovery_point)
        hw = self._high_watermark
        self._index.write(meta={META_RECOVERY_POINT: self._recovery_point, META_HIGH_WATERMARK: hw})
        self._index.sync()
        self._checkpointed_hw = hw
        self._unflushed_messages = 0
        self._last_flush_ms = self._now_ms()

    # -- read -----------------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> memoryview:
        """Whole batches from the one containing `offset`: at most `max_bytes` but at least one
        batch, none with a base offset >= `max_offset` (default: the high watermark), from one
        segment. Empty at `max_offset`. Zero-copy: see "Views" in the module doc.

        Raises OffsetOutOfRangeError outside [log_start_offset, log_end_offset], and
        CorruptMessageError if the first batch fails its CRC (the log is then flagged:
        `corrupt_reason`). A bad batch after good ones ends the read before it.
        """
        self._check_open()
        if max_bytes < 0:
            raise InvalidFetchSizeError(f"max_bytes {max_bytes} is negative")
        if not self._log_start_offset <= offset <= self._log_end_offset:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside the log's range [{self._log_start_offset}, {self._log_end_offset}]"
            )
        limit = self._high_watermark if max_offset is None else min(max_offset, self._log_end_offset)
        if offset >= limit:
            return _EMPTY
        i = bisect.bisect_right(self._bases, offset) - 1
        while i < len(self._segments):
            seg = self._segments[i]
            position = self._position_of(seg, offset)
            if position >= 0:
                end, damage = seg.read_end(position, max_bytes, limit)
                if damage is not None:
                    self._flag_corrupt(seg, damage)
                    if end == position:
                        raise CorruptMessageError(f"{seg.path.name}: {damage}")
                return seg.view(position, end - position)
            i += 1
        return _EMPTY

    def _position_of(self, seg: Segment, offset: int) -> int:
        """Byte position in `seg` of the batch containing `offset` (-1 if past its last batch)."""
        assert self._index is not None
        entry = self._index.floor_offset(offset)
        start = entry[2] if entry is not None and entry[1] == seg.base_offset else 0
        try:
            return seg.find(offset, start)
        except CorruptMessageError as e:
            self._flag_corrupt(seg, str(e))
            raise

    def _flag_corrupt(self, seg: Segment, reason: str) -> None:
        if self.corrupt_reason is None:
            self.corrupt_reason = f"{seg.path}: {reason}"
        log.error("corrupt data in %s: %s", seg.path, reason)

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, timestamp) of the first record at or below the high watermark whose timestamp is
        >= `timestamp_ms`, or None. Uses the time index, then decodes the one batch found."""
        self._check_open()
        limit = self._high_watermark
        for seg in list(self._segments):
            if seg.base_offset >= limit:
                break
            seg_max = self._segment_max_timestamp(seg)
            if seg_max is None or seg_max < timestamp_ms:
                continue
            floor = self.index.time_floor(seg.base_offset, timestamp_ms)
            start = max(floor[1] if floor is not None else seg.base_offset, self._log_start_offset)
            position = self._position_of(seg, start)
            if position < 0:
                continue
            for pos, size, base, _lod, max_ts in seg.batch_headers(position, seg.size_bytes):
                if base >= limit:
                    return None
                if max_ts < timestamp_ms:
                    continue
                h = seg.header(pos)
                for m in decode_batch(bytes(seg.view(pos, size)), 0, h, "", 0, self._log_start_offset):
                    if m.offset >= limit:
                        return None
                    if m.timestamp >= timestamp_ms:
                        return m.offset, m.timestamp
        return None

    def _segment_max_timestamp(self, seg: Segment) -> int | None:
        if seg is self._segments[-1]:
            return None if self._indexer.max_ts == _NO_TS else self._indexer.max_ts
        found = self.index.segment_max_timestamp(seg.base_offset)
        return None if found is None else found[0]

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        """(epoch, end offset) as Kafka's OffsetForLeaderEpoch: the end offset of the largest epoch
        <= `epoch` is the start offset of the next larger one (the LEO for the latest epoch);
        (-1, -1) if `epoch` is undefined or above the latest."""
        epochs = self._epochs
        if epoch == UNDEFINED_EPOCH or not epochs:
            return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
        if epoch == epochs[-1][0]:
            return epoch, self._log_end_offset
        i = bisect.bisect_right(epochs, (epoch, 1 << 64))
        if i == len(epochs):
            return UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET
        higher_start = epochs[i][1]
        return (epochs[i - 1][0] if i > 0 else epoch), higher_start

    # -- truncation and retention ---------------------------------------------------------------

    def truncate_to(self, offset: int) -> None:
        """Drop every batch holding an offset >= `offset` (a batch straddling it goes whole, so the
        log end offset becomes that batch's base offset). Below the log start offset, the log is
        emptied and restarts at `offset`."""
        self._check_writable()
        self._reap_flushes()
        assert self._index is not None
        if offset >= self._log_end_offset:
            return
        if offset < self._log_start_offset:
            self._truncate_fully(offset)
            return
        i = bisect.bisect_right(self._bases, offset) - 1
        seg = self._segments[i]
        position = self._position_of(seg, offset)
        if position < 0:
            position = seg.size_bytes
            cut = self._log_end_offset if i == len(self._segments) - 1 else self._bases[i + 1]
        else:
            cut = seg.batch_base_offset(position)
        try:
            for later in self._segments[i + 1 :]:
                later.delete()
            del self._segments[i + 1 :]
            del self._bases[i + 1 :]
            if not seg.is_active:
                seg.reopen_writable(self._config.segment_bytes)
            seg.truncate(position)
        except (StorageError, OSError) as e:
            self._go_offline(f"truncation to {offset} failed: {e}")
            raise StorageError(f"truncation of {self.directory} to {offset} failed: {e}") from e
        self._log_end_offset = cut
        self._high_watermark = min(self._high_watermark, cut)
        self._recovery_point = min(self._recovery_point, cut)
        while self._pending and self._pending[-1][0] > cut:  # no longer the end of anything
            self._pending.pop()
        self._size_bytes = sum(s.size_bytes for s in self._segments)
        self._epochs = [e for e in self._epochs if e[1] < cut]
        self._index.truncate_from(cut, seg.base_offset, self._epochs, self._checkpoints())
        self._restore_active_state(self._now_ms())

    def _truncate_fully(self, offset: int) -> None:
        assert self._index is not None
        try:
            for seg in self._segments:
                seg.delete()
            self._segments = [Segment.create(self.directory, offset, self._config.segment_bytes)]
        except (StorageError, OSError) as e:
            self._go_offline(f"truncation to {offset} failed: {e}")
            raise StorageError(f"truncation of {self.directory} to {offset} failed: {e}") from e
        self._bases = [offset]
        self._log_start_offset = self._log_end_offset = self._high_watermark = offset
        self._recovery_point = offset
        self._pending.clear()
        self._size_bytes = 0
        self._epochs = []
        self._index.truncate_from(0, 0, [], self._checkpoints())
        self._restore_active_state(self._now_ms())

    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Delete closed segments, oldest first, while past retention_ms (by their largest
        timestamp) or beyond retention_bytes, never the active segment nor any data at or above
        the high watermark. Advances and checkpoints the log start offset. Returns segments deleted.
        A deleted segment's pending flush finds no file left to sync (see flusher.py). Runs while
        the log is read-only too (it frees disk space)."""
        self._check_online()
        self._reap_flushes()
        assert self._index is not None
        now = self._now_ms() if now_ms is None else now_ms
        config = self._config
        remaining = self._size_bytes
        doomed = 0
        for i, seg in enumerate(self._segments[:-1]):
            next_base = self._bases[i + 1]
            if next_base > self._high_watermark:
                break
            by_bytes = config.retention_bytes >= 0 and remaining - seg.size_bytes >= config.retention_bytes
            by_time = config.retention_ms >= 0 and now - self._retention_timestamp(seg) > config.retention_ms
            below_start = next_base <= self._log_start_offset
            if not (by_bytes or by_time or below_start):
                break
            remaining -= seg.size_bytes
            doomed += 1
        if not doomed:
            return 0
        try:
            for seg in self._segments[:doomed]:
                seg.delete()
        except StorageError as e:
            self._go_offline(str(e))
            raise
        finally:
            gone = [s for s in self._segments[:doomed] if not s.path.exists()]
            del self._segments[: len(gone)]
            del self._bases[: len(gone)]
            self._size_bytes = sum(s.size_bytes for s in self._segments)
        self._log_start_offset = max(self._log_start_offset, self._bases[0])
        self._recovery_point = max(self._recovery_point, self._log_start_offset)
        self._epochs = _epochs_from_start(self._epochs, self._log_start_offset)
        self._index.delete_before(self._bases[0], self._epochs, self._checkpoints())
        log.info("%s: retention deleted %d segments, log start offset now %d",
                 self.directory, doomed, self._log_start_offset)
        return doomed

    def advance_log_start_offset(self, offset: int) -> int:
        """Raise the log start offset to `offset`, capped at the high watermark: a follower mirrors
        its leader's log start (retention there, as Kafka's `maybeIncrementLogStartOffset`). Reads
        below it fail from now on; closed segments wholly below it are deleted (a partly covered
        one stays until it is). Checkpointed with the index. Returns segments deleted."""
        self._check_writable()
        assert self._index is not None
        target = min(offset, self._high_watermark)
        if target <= self._log_start_offset:
            return 0
        self._reap_flushes()
        doomed = 0
        for next_base in self._bases[1:]:
            if next_base > target:
                break
            doomed += 1
        try:
            for seg in self._segments[:doomed]:
                seg.delete()
        except StorageError as e:
            self._go_offline(str(e))
            raise
        finally:
            gone = [s for s in self._segments[:doomed] if not s.path.exists()]
            del self._segments[: len(gone)]
            del self._bases[: len(gone)]
            self._size_bytes = sum(s.size_bytes for s in self._segments)
        self._log_start_offset = target
        self._recovery_point = max(self._recovery_point, self._bases[0])
        self._epochs = _epochs_from_start(self._epochs, self._log_start_offset)
        self._index.delete_before(self._bases[0], self._epochs, self._checkpoints())
        log.info("%s: log start offset now %d (the leader's), %d segments deleted", self.directory, target, doomed)
        return doomed

    def _retention_timestamp(self, seg: Segment) -> int:
        ts = self._segment_max_timestamp(seg)
        if ts is None or ts < 0:  # no timestamps: the file's modification time
            try:
                return os.stat(seg.path).st_mtime_ns // 1_000_000
            except OSError:
                return 0
        return ts

    # -- close ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the pending flushes of rolled segments, flush and trim the active segment,
        checkpoint, and mark a clean shutdown. Idempotent. If a rolled segment's flush is still
        running after the flusher's `wait_timeout_s`, no marker is written (the next open recovers)."""
        if self._closed:
            return
        if self._offline is not None:
            self._abandon()
            return
        assert self._index is not None
        try:
            all_flushed = self._wait_for_flushes()
            times: list[TimeEntry] = []
            self._indexer.finish(times)
            self._segments[-1].flush()
            if all_flushed:
                self._recovery_point = self._log_end_offset
            self._index.write(times=times, meta=self._checkpoints())
            self._index.sync()
            for seg in self._segments:
                seg.close(trim=True)
            self._index.close()
            if all_flushed:
                _write_atomically(self.directory / CLEAN_SHUTDOWN_FILE, b"")
            else:
                log.warning("%s: %d segment flushes still pending after %.0f s; closed without the "
                            "clean-shutdown marker, so the next open recovers from offset %d", self.directory,
                            len(self._pending), self._flusher.wait_timeout_s, self._recovery_point)
                self._pending.clear()  # they run on, on their own descriptors
        except (StorageError, OSError) as e:
            self._abandon()
            raise StorageError(f"close of {self.directory} failed: {e}") from e
        self._closed = True

    def delete(self) -> None:
        """Close and remove the directory (renamed to `<name>.<uuid>-delete` first, so a crash
        midway leaves a directory that the log manager removes rather than reloads)."""
        self._abandon()
        remove_log_dir(self.directory)

    def _abandon(self) -> None:
        """Release mappings and the index without writing anything (no clean-shutdown marker).
        Pending flushes run on, on their own descriptors; nobody applies them."""
        self._pending.clear()
        for seg in self._segments:
            with contextlib.suppress(StorageError, OSError):
                seg.close(trim=False)
        if self._index is not None:
            with contextlib.suppress(Exception):
                self._index.close()
        self._closed = True

    def _checkpoints(self) -> dict[bytes, int]:
        return {META_LOG_START_OFFSET: self._log_start_offset, META_RECOVERY_POINT: self._recovery_point,
                META_HIGH_WATERMARK: self._high_watermark, META_SEGMENT_BYTES: self._config.segment_bytes}

    def checkpoint_high_watermark(self) -> bool:
        """Write the high watermark to the index if it moved since it was last written (one small
        transaction, not synced: durable at the next index sync, and a process crash keeps it in
        the page cache). For a periodic caller (the log manager). Returns whether it wrote."""
        if self._closed or self._offline is not None or self._high_watermark == self._checkpointed_hw:
            return False
        assert self._index is not None
        hw = self._high_watermark
        self._index.write(meta={META_HIGH_WATERMARK: hw})
        self._checkpointed_hw = hw
        return True

    def _go_offline(self, reason: str) -> None:
        self._offline = reason
        log.error("log %s is offline: %s", self.directory, reason)

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError(f"log {self.directory} is closed")

    def _check_online(self) -> None:
        """Open and not offline: reads, retention, epochs and checkpoints may go on (also while
        read-only)."""
        self._check_open()
        if self._offline is not None:
            raise StorageError(f"log {self.directory} is offline: {self._offline}")

    def _check_writable(self) -> None:
        """Online, and the active segment writable: retries preallocation if read-only and due."""
        self._check_online()
        if self._read_only is not None and not self.retry_preallocation():
            raise StorageError(f"log {self.directory} is read-only: {self._read_only}")

    def retry_preallocation(self, force: bool = False) -> bool:
        """A read-only log (its active segment could not be preallocated): try again, at most once
        every PREALLOCATE_RETRY_INTERVAL_MS unless `force`. Returns whether the log is writable."""
        if self._read_only is None:
            return True
        now = self._now_ms()
        if not force and now < self._preallocate_retry_at_ms:
            return False
        self._preallocate_retry_at_ms = now + PREALLOCATE_RETRY_INTERVAL_MS
        active = self._segments[-1]
        try:
            active.reopen_writable(self._config.segment_bytes)
        except StorageError as e:
            self._read_only = str(e)
            return False
        self._read_only = None
        log.info("log %s is writable again: its active segment is preallocated (%d bytes)", self.directory,
                 active.capacity_bytes)
        return True

    def __repr__(self) -> str:
        return (
            f"Log({self.directory}, start={self._log_start_offset}, end={self._log_end_offset}, "
            f"hw={self._high_watermark}, segments={len(self._segments)})"
        )


def _with_segment_bytes(config: LogConfig, segment_bytes: int | None) -> LogConfig:
    """`config` with a checkpointed segment size, if there is one and it is within bounds."""
    if segment_bytes is None or segment_bytes == config.segment_bytes:
        return config
    try:
        return replace(config, segment_bytes=segment_bytes)
    except InvalidConfigError:
        log.warning("ignoring checkpointed segment_bytes %d (out of bounds)", segment_bytes)
        return config


def remove_log_dir(directory: Path) -> None:
    """Remove a (closed) log directory: rename it to `<name>.<uuid>-delete`, then delete that."""
    doomed = directory.with_name(f"{directory.name}.{uuid.uuid4().hex}{DELETE_SUFFIX}")
    try:
        if directory.exists():
            os.rename(directory, doomed)
            _fsync_dir(directory.parent)
            shutil.rmtree(doomed)
    except OSError as e:
        raise StorageError(f"cannot delete {directory}: {e}") from e


def _assign_epoch(epochs: list[EpochEntry], epoch: int, start_offset: int) -> list[EpochEntry]:
    """The epoch history once a batch of `epoch` is written at `start_offset` (Kafka's
    LeaderEpochFileCache.assign). Unchanged (the same list) if `epoch` is the latest; otherwise
    the entries starting at or after `start_offset` (epochs that got no batch) go, and `epoch`
    starts at `start_offset` unless it is already the latest remaining one. CorruptMessageError if
    a later epoch already has data below `start_offset` (epochs going backwards)."""
    if epochs and epochs[-1][0] == epoch and epochs[-1][1] <= start_offset:
        return epochs
    kept = list(epochs)
    while kept and (kept[-1][0] >= epoch or kept[-1][1] >= start_offset):
        e, s = kept[-1]
        if s < start_offset:
            if e > epoch:
                raise CorruptMessageError(
                    f"leader epoch {epoch} at offset {start_offset} follows epoch {e}, which started at {s}"
                )
            break  # e == epoch: the epoch goes on from where it started
        kept.pop()
    if not kept or kept[-1][0] != epoch:
        kept.append((epoch, start_offset))
    return kept


def _epochs_from_start(epochs: list[EpochEntry], start_offset: int) -> list[EpochEntry]:
    """Kafka's truncateFromStart: drop epochs that end before `start_offset`, move the one that
    spans it to start there."""
    kept = [e for e in epochs if e[1] >= start_offset]
    before = [e for e in epochs if e[1] < start_offset]
    if before and (not kept or kept[0][1] > start_offset):
        kept.insert(0, (before[-1][0], start_offset))
    return kept


class _mapped:
    """Context manager: a read-only mapping of a whole file (or b"" if it is empty), and its size."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._file: object = None
        self._map: mmap.mmap | None = None

    def __enter__(self) -> tuple[mmap.mmap | bytes, int]:
        try:
            with open(self._path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size:
                    self._map = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as e:
            raise StorageError(f"cannot read {self._path}: {e}") from e
        return (self._map if self._map is not None else b""), size

    def __exit__(self, *exc: object) -> None:
        if self._map is not None:
            self._map.close()


def _file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise StorageError(f"cannot stat {path}: {e}") from e


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(path: Path, data: bytes) -> None:
    """Small metadata file: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
