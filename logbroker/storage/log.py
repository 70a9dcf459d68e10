"""The log of one partition replica (Kafka's UnifiedLog): segment files plus their LMDB index, in
one directory, composed from one part per concept:

    log_dir.py             the files of the directory (layout, clean-shutdown marker, deletion)
    log_config.py          LogConfig: the per-log settings and their bounds
    log_loader.py          opening and crash recovery (LogLoader)
    local_log.py           the segments: append/read bytes, roll, truncate, flushes, recovery point,
                           read-only and offline (LocalLog)
    segment_indexer.py     which index entries an appended batch gets
    leader_epoch_cache.py  the leader epoch history (LeaderEpochFileCache)
    retention.py           which old segments retention deletes (a pure decision)
    producer_state.py      idempotent producers: epoch and last batches per producer id (pure)
    index.py               the LMDB index: key and value layouts

`Log` keeps what ties them together: offset assignment, the log start offset, the high watermark,
the epoch history and the checkpoints, and the checks every public method makes.

Offsets. Every batch's baseOffset is assigned here: the first batch of an append gets the log end
offset, the next one follows its predecessor's last offset, with no gaps. Offsets strictly
increase within a segment and across segments; a segment's name is the offset of its first batch.
Invariant: log start offset <= high watermark <= log end offset.

Recovery (`Log.open`): see log_loader.py. Recovery point and background flushes of rolled segments:
see local_log.py. `flush()` and `close()` wait for the log's pending flushes (bounded by the
flusher's `wait_timeout_s`); a close that gives up writes no clean-shutdown marker, so the next
open recovers.

High watermark. The log only stores it; the replication layer moves it. It is checkpointed in the
index (Kafka's replication-offset checkpoint) on `close`, with every recovery-point write (`flush`,
and after a rolled segment's background flush), at truncation and retention, and when the log
manager's periodic `checkpoint_high_watermarks` finds it moved: never an index write per append. A
reopened log starts from min(checkpoint, log end offset), or from its log start offset if there is
no checkpoint (a rebuilt index), so a restarted leader exposes nothing beyond what was known
replicated; a leader whose ISR is itself alone (standalone mode) raises it to the log end offset
as soon as it leads (partition_state).

Idempotent producers. A produced batch with producerId >= 0 is checked against the producer state
(producer_state.py) before anything is written: a duplicate of one of the producer's last five
batches, sent alone, is answered with the original offsets (`AppendResult.duplicate`) and not
written again; a gap raises OutOfOrderSequenceNumberError, an older epoch
InvalidProducerEpochError, a duplicate among several batches DuplicateSequenceNumberError, with
nothing written. Every append (leader or follower) records its idempotent batches, so followers
hold the same state. At every roll the state is snapshotted (producer_snapshot.py: a small file named
after the new segment's base offset, written atomically on the caller's thread, once per roll and
only if some producer is known); the newest PRODUCER_SNAPSHOTS_KEPT are kept. Opening a log loads
the newest valid snapshot in [first segment's base, log end offset] and replays the batch headers
(no record decoded) from its offset on; an invalid snapshot is deleted with a warning and the next
older one tried. Without one, the state is rebuilt from the batch headers of the newest segments,
whole segments back from the active one until at least PRODUCER_STATE_SCAN_BYTES are covered (all
of them if the log is smaller): a bounded open. A producer whose last batch lies before that window
and before every snapshot is unknown after a restart (its next batch is accepted at any sequence,
as Kafka does for an expired producer). Producer ids are expired by the log's clock (time of append
as a snapshot kept it; for a replayed batch, the time the log opened) after
`producer_id_expiration_ms`, when the log opens and at most every PRODUCER_EXPIRY_CHECK_MS during
appends. Truncation forgets the batches it removes and deletes the snapshots past its point;
retention deletes those below the first segment left.

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
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from logbroker.errors import (
    CorruptMessageError,
    DuplicateSequenceNumberError,
    InvalidFetchSizeError,
    InvalidProducerEpochError,
    InvalidRecordError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceNumberError,
    RecordListTooLargeError,
    StorageError,
)
from logbroker.storage.compaction import deletes_by_retention, is_compacted
from logbroker.storage.flusher import SegmentFlusher, default_flusher
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
from logbroker.storage.leader_epoch_cache import UNDEFINED_EPOCH, UNDEFINED_EPOCH_OFFSET, LeaderEpochCache
from logbroker.storage.local_log import LocalLog
from logbroker.storage.log_config import APPEND_BYTES_MAX, CREATE_TIME, DAY_MS, LOG_APPEND_TIME, LogConfig
from logbroker.storage.log_dir import CLEAN_SHUTDOWN_FILE, DELETE_SUFFIX, INDEX_DIR, remove_log_dir
from logbroker.storage.log_loader import (
    PREALLOCATE_RETRY_INTERVAL_MS,
    RECOVERY_INDEX_CHUNK,
    RecoveryReport,
    load_log,
)
from logbroker.storage.producer_snapshot import (
    SnapshotError,
    delete_snapshots,
    list_snapshots,
    read_snapshot,
    write_snapshot,
)
from logbroker.storage.producer_snapshot import file_name as snapshot_file_name
from logbroker.storage.producer_state import ProducerStateMap, Verdict, sequence_after
from logbroker.storage.record_batch import BatchInfo, decode_batch, first_null_key, validate_batches
from logbroker.storage.retention import segments_to_delete
from logbroker.storage.segment import Segment

__all__ = [
    "APPEND_BYTES_MAX", "CLEAN_SHUTDOWN_FILE", "CREATE_TIME", "DAY_MS", "DELETE_SUFFIX", "INDEX_DIR",
    "LOG_APPEND_TIME", "NO_TIMESTAMP", "PREALLOCATE_RETRY_INTERVAL_MS", "RECOVERY_INDEX_CHUNK", "UNDEFINED_EPOCH",
    "UNDEFINED_EPOCH_OFFSET", "AppendResult", "Log", "LogConfig", "RecoveryReport", "remove_log_dir",
    "wall_clock_ms",
]

log = logging.getLogger(__name__)

NO_TIMESTAMP = -1
_EMPTY = memoryview(b"")
PRODUCER_STATE_SCAN_BYTES = 64 << 20  # opening a log rebuilds producer state from at least this much of its tail
PRODUCER_EXPIRY_CHECK_MS = 60_000
PRODUCER_SNAPSHOTS_KEPT = 2  # producer state snapshots kept per log, newest first


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class AppendResult(NamedTuple):
    base_offset: int
    last_offset: int
    max_timestamp: int
    log_append_time_ms: int  # -1 unless the log uses LogAppendTime
    record_count: int
    duplicate: bool = False  # an idempotent producer's batch already in the log: its original offsets


def _as_bytes_view(records: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of `records` (no copy), bounded by APPEND_BYTES_MAX."""
    payload = memoryview(records)
    if payload.ndim != 1 or payload.itemsize != 1:
        payload = payload.cast("B")
    if payload.nbytes > APPEND_BYTES_MAX:
        raise RecordListTooLargeError(f"append of {payload.nbytes} bytes exceeds {APPEND_BYTES_MAX}")
    return payload


def _refuse_null_keys(payload: memoryview, infos: list[BatchInfo]) -> None:
    """InvalidRecordError if any record of a produce payload to a compacted log has no key (the
    key-only scan of record_batch.first_null_key; other topics never decode their records);
    UnsupportedCompressionTypeError for a batch whose codec the broker cannot read."""
    for info in infos:
        delta = first_null_key(payload, info)
        if delta is not None:
            raise InvalidRecordError(
                f"record {delta} of the batch at byte {info.position} has no key: a cleanup_policy=compact "
                "topic keeps the latest record per key, so every record needs one")


class Log:
    """An append-only partition log. Create with `Log.open`. See the module doc."""

    def __init__(
        self, directory: Path, config: LogConfig, now_ms: Callable[[], int], flusher: SegmentFlusher | None = None
    ) -> None:
        self.directory = directory
        self._config = config
        self._now_ms = now_ms
        self._flusher = flusher if flusher is not None else default_flusher()
        self._local: LocalLog  # set by `open`
        self._epochs = LeaderEpochCache()
        self._log_start_offset = 0
        self._high_watermark = 0
        self._checkpointed_hw = -1  # the high watermark last written to the index
        self.recovery_reports: list[RecoveryReport] = []
        self.producers = ProducerStateMap(config.producer_id_expiration_ms)
        self._producers_expire_at_ms = 0
        self._producer_snapshots: list[int] = []  # offsets of the snapshot files, ascending

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open(
        cls, directory: Path, config: LogConfig, now_ms: Callable[[], int] = wall_clock_ms,
        flusher: SegmentFlusher | None = None, *, segment_bytes_from_checkpoint: bool = False,
    ) -> Log:
        """Open the log in `directory`, creating it if missing, recovering it if it was not closed
        (log_loader.py). Rolled segments are fsynced by `flusher` (default: a process-wide one).
        `segment_bytes_from_checkpoint`: the caller does not know the topic's config yet, so the
        segment size is the one checkpointed when the log was last open (`config`'s if none)."""
        self = cls(Path(directory), config, now_ms, flusher)
        loaded = load_log(self.directory, config, now_ms, segment_bytes_from_checkpoint)
        self._local = LocalLog(self.directory, loaded, now_ms, self._flusher)
        self._config = loaded.config
        self._epochs = loaded.epochs
        self._log_start_offset = loaded.log_start_offset
        self._high_watermark = self._checkpointed_hw = loaded.high_watermark
        self.recovery_reports = loaded.recovery_reports
        try:
            self._local.restore_active_state(loaded.opened_ms)
            self._rebuild_producers()
            self._local.on_roll = self._snapshot_producers
        except BaseException:
            self._abandon()
            raise
        return self

    def _rebuild_producers(self) -> None:
        """The producer state: the newest valid snapshot, then the batch headers after it; without
        one, the batch headers of the newest segments (module doc)."""
        local = self._local
        segments = local.segments
        now = self._now_ms()
        start, state = self._load_producer_snapshot()
        if state is not None:
            first = max(bisect.bisect_right(local.bases, start) - 1, 0)
        else:
            first = len(segments) - 1
            covered = segments[first].size_bytes
            while first > 0 and covered < PRODUCER_STATE_SCAN_BYTES:
                first -= 1
                covered += segments[first].size_bytes
            state = ProducerStateMap(self._config.producer_id_expiration_ms)
        state.expire(now)
        record = state.record
        for seg in segments[first:]:
            for h in seg.producer_batches():
                if h.base_offset >= start:
                    record(h.producer_id, h.producer_epoch, h.base_sequence, h.record_count, h.base_offset,
                           h.base_offset + h.last_offset_delta, now)
        self.producers = state
        self._producers_expire_at_ms = now + min(self._config.producer_id_expiration_ms, PRODUCER_EXPIRY_CHECK_MS)

    def _load_producer_snapshot(self) -> tuple[int, ProducerStateMap | None]:
        """(its offset, the state) of the newest valid snapshot in [first segment's base, log end
        offset], or (-1, None). Deletes the snapshots outside that range and the invalid ones it
        meets (one warning each)."""
        directory, local = self.directory, self._local
        try:
            offsets = list_snapshots(directory)
        except OSError as e:
            log.warning("%s: cannot list producer snapshots (%s); rebuilding from the log", directory, e)
            return -1, None
        stale = [o for o in offsets if not local.bases[0] <= o <= local.log_end_offset]
        self._producer_snapshots = [o for o in offsets if local.bases[0] <= o <= local.log_end_offset]
        while self._producer_snapshots:
            offset = self._producer_snapshots[-1]
            try:
                state = read_snapshot(directory, offset, self._config.producer_id_expiration_ms)
            except (OSError, SnapshotError) as e:
                log.warning("%s: skipping producer snapshot %s: %s", directory, snapshot_file_name(offset), e)
                stale.append(self._producer_snapshots.pop())
                continue
            self._delete_producer_snapshots(stale)
            return offset, state
        self._delete_producer_snapshots(stale)
        return -1, None

    def _snapshot_producers(self, offset: int) -> None:
        """At a roll to a segment at `offset`: write the producer state (it covers everything below
        `offset`) and keep the newest PRODUCER_SNAPSHOTS_KEPT snapshots. A failed write is logged,
        not raised: the next open then replays from an older snapshot or scans."""
        if not len(self.producers):
            return
        try:
            write_snapshot(self.directory, offset, self.producers)
        except OSError as e:
            log.warning("%s: cannot write the producer snapshot at %d: %s", self.directory, offset, e)
            return
        kept = [o for o in self._producer_snapshots if o < offset] + [offset]
        self._producer_snapshots = kept[-PRODUCER_SNAPSHOTS_KEPT:]
        self._delete_producer_snapshots(kept[:-PRODUCER_SNAPSHOTS_KEPT])

    def _drop_producer_snapshots(self, below: int = 0, above: int | None = None) -> None:
        """Delete the snapshots at offsets below `below` or above `above` (truncation, retention)."""
        doomed = [o for o in self._producer_snapshots if o < below or (above is not None and o > above)]
        if doomed:
            self._producer_snapshots = [o for o in self._producer_snapshots if o not in doomed]
            self._delete_producer_snapshots(doomed)

    def _delete_producer_snapshots(self, offsets: list[int]) -> None:
        try:
            delete_snapshots(self.directory, offsets)
        except OSError as e:
            log.warning("%s: cannot delete producer snapshots %s: %s", self.directory, offsets, e)

    # -- properties -----------------------------------------------------------------------------

    @property
    def config(self) -> LogConfig:
        return self._config

    def update_config(self, config: LogConfig) -> None:
        """New settings from now on (index_map_bytes takes effect at the next open)."""
        self._config = config
        self._local.config = config
        self._local.indexer.interval_bytes = config.index_interval_bytes
        self.producers.expiration_ms = config.producer_id_expiration_ms

    @property
    def log_start_offset(self) -> int:
        return self._log_start_offset

    @property
    def log_end_offset(self) -> int:
        """The offset the next appended record gets."""
        return self._local.log_end_offset

    @property
    def high_watermark(self) -> int:
        return self._high_watermark

    @high_watermark.setter
    def high_watermark(self, value: int) -> None:
        leo = self._local.log_end_offset
        if not 0 <= value <= leo:
            raise ValueError(f"high watermark {value} outside [0, log end offset {leo}]")
        self._high_watermark = max(value, self._log_start_offset)

    @property
    def recovery_point(self) -> int:
        """Offsets below this are flushed to disk; recovery validates from its segment on."""
        return self._local.recovery_point

    @property
    def pending_flushes(self) -> list[int]:
        """End offsets of rolled segments whose background flush is not applied yet, oldest first."""
        return [end for end, _ in self._local.pending]

    @property
    def size_bytes(self) -> int:
        return self._local.size_bytes

    @property
    def segment_count(self) -> int:
        return len(self._local.segments)

    @property
    def segments(self) -> list[Segment]:
        """The segments, oldest first (a copy of the list; do not modify the segments)."""
        return list(self._local.segments)

    @property
    def latest_epoch(self) -> int:
        return self._epochs.latest_epoch

    @property
    def epochs(self) -> list[EpochEntry]:
        """(leader epoch, start offset) history, oldest first."""
        return self._epochs.entries

    @property
    def index(self) -> PartitionIndex:
        return self._local.index

    @property
    def is_offline(self) -> bool:
        return self._local.offline is not None

    @property
    def read_only_reason(self) -> str | None:
        """Why the log takes no writes while it still serves reads (None: it takes them)."""
        return self._local.read_only

    @property
    def corrupt_reason(self) -> str | None:
        """Why the log's data was found corrupt (by a read or the scrubber), or None."""
        return self._local.corrupt_reason

    @corrupt_reason.setter
    def corrupt_reason(self, value: str | None) -> None:
        self._local.corrupt_reason = value

    # -- append ---------------------------------------------------------------------------------

    def append(self, records: bytes | bytearray | memoryview, leader_epoch: int) -> AppendResult:
        """Append a produce payload (one or more batches) as the leader, assigning offsets.

        Raises CorruptMessageError / MessageTooLargeError / UnsupportedForMessageFormatError /
        RecordListTooLargeError, and in a compacted topic InvalidRecordError (a record without a
        key: compaction keeps the latest record per key, as Kafka refuses them) and
        UnsupportedCompressionTypeError (a snappy/lz4/zstd batch, whose keys the broker cannot
        read), with nothing written, and StorageError (disk full, I/O error, index
        full) with the log as it was.
        """
        local = self._local
        local.check_writable()
        if local.pending:
            self._reap_flushes()
        if leader_epoch < 0:
            raise ValueError(f"leader epoch {leader_epoch} must be >= 0")
        payload = _as_bytes_view(records)
        n = payload.nbytes
        config = self._config
        infos = validate_batches(payload, config.max_message_bytes)
        if is_compacted(config.cleanup_policy):
            _refuse_null_keys(payload, infos)
        idempotent = [info for info in infos if info.producer_id >= 0]
        if idempotent:
            duplicate = self._check_producers(idempotent, len(infos))
            if duplicate is not None:
                return duplicate
        now = self._now_ms()
        active = local.room_for(n, now)
        start = active.size_bytes
        base_offset = next_offset = local.log_end_offset
        log_append = config.message_timestamp_type == LOG_APPEND_TIME
        indexer = local.indexer
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
        epochs = [(leader_epoch, base_offset)] if leader_epoch > self._epochs.latest_epoch else []
        with local.undo_on_failure(active, start, n, saved):
            active.append(payload, batches, leader_epoch, now if log_append else None)
            local.index.write(offsets, times, epochs)
        local.appended(active, start, n, next_offset, record_count)
        self._epochs = self._epochs.append(epochs)
        if idempotent:
            self._record_producers(infos, [b[2] for b in batches], now)
        if local.flush_due(now):
            self.flush()
        return AppendResult(base_offset, next_offset - 1, max_timestamp, now if log_append else -1, record_count)

    # -- replication: follower appends and leader epochs -----------------------------------------

    def append_as_follower(self, records: bytes | bytearray | memoryview) -> AppendResult:
        """Append batches replicated from the leader exactly as they are: baseOffset,
        partitionLeaderEpoch and timestamps are kept, not assigned.

        Checks every batch (`validate_batches` with a bound as large as an append, CRC included),
        that the first baseOffset is the log end offset and that each batch follows the previous
        one without a gap, and that epochs never go backwards. In a compacted topic (the leader's
        cleaner leaves gaps, compaction.py) a batch may hold fewer records than its offset span and
        start past the previous batch's end (offsets still strictly increase), and the first batch
        may start past the log end offset when the gap was cleaned away. Each batch whose epoch is above the
        latest one starts that epoch in the epoch history (`LeaderEpochCache.assign`). Raises
        OffsetOutOfRangeError (first batch not at the log end offset) or CorruptMessageError with
        nothing written; StorageError as `append`.
        """
        local = self._local
        local.check_writable()
        if local.pending:
            self._reap_flushes()
        payload = _as_bytes_view(records)
        n = payload.nbytes
        compacted = is_compacted(self._config.cleanup_policy)
        infos = validate_batches(payload, APPEND_BYTES_MAX, compacted=compacted)
        base_offset = local.log_end_offset
        bases, epochs, next_offset, max_timestamp, record_count = self._check_replicated(payload, infos, compacted)
        kept = epochs.common_prefix_length(self._epochs)
        if kept < len(self._epochs):  # epochs started at the log end offset without data: drop them
            local.index.replace_epochs(self._epochs.prefix(kept).entries)
            self._epochs = self._epochs.prefix(kept)
        now = self._now_ms()
        active = local.room_for(n, now)
        start = active.size_bytes
        indexer = local.indexer
        saved = indexer.state()
        offsets: list[OffsetEntry] = []
        times: list[TimeEntry] = []
        for info, base in zip(infos, bases, strict=True):
            indexer.add(start + info.position, info.size_bytes, base, info.max_timestamp, offsets, times)
        with local.undo_on_failure(active, start, n, saved):
            active.append(payload, [], 0, None)  # no batches to stamp: the bytes go in verbatim
            local.index.write(offsets, times, epochs.suffix(kept))
        local.appended(active, start, n, next_offset, record_count)
        self._epochs = epochs
        self._record_producers(infos, bases, now)
        if local.flush_due(now):
            self.flush()
        return AppendResult(base_offset, next_offset - 1, max_timestamp, -1, record_count)

    def _check_producers(self, idempotent: list[BatchInfo], batch_count: int) -> AppendResult | None:
        """Check a produce payload's idempotent batches against the producer state (module doc),
        changing nothing: the AppendResult to answer for a lone duplicate, None to append, or
        raise."""
        producers = self.producers
        following: dict[int, tuple[int, int]] = {}  # producer id -> (epoch, next sequence) in this payload
        for info in idempotent:
            pid, epoch, sequence = info.producer_id, info.producer_epoch, info.base_sequence
            expected = following.get(pid)
            if expected is None:
                result = producers.check(pid, epoch, sequence, info.record_count)
                if result.verdict is Verdict.DUPLICATE:
                    if batch_count == 1:
                        return AppendResult(result.first_offset, result.last_offset, NO_TIMESTAMP, -1, 0, True)
                    raise DuplicateSequenceNumberError(
                        f"producer {pid} epoch {epoch}: the batch at sequence {sequence} is already at offset "
                        f"{result.first_offset}; resend it alone")
                if result.verdict is Verdict.FENCED:
                    raise InvalidProducerEpochError(result.message)
                if result.verdict is Verdict.OUT_OF_ORDER:
                    raise OutOfOrderSequenceNumberError(result.message)
            elif expected != (epoch, sequence):
                raise OutOfOrderSequenceNumberError(
                    f"producer {pid}: a batch at epoch {epoch} sequence {sequence} follows one that ends before "
                    f"epoch {expected[0]} sequence {expected[1]} in the same request")
            following[pid] = (epoch, sequence_after(sequence, info.record_count))
        return None

    def _record_producers(self, infos: list[BatchInfo], bases: list[int], now: int) -> None:
        """Remember the appended idempotent batches (at `bases`); expire idle producers now and then."""
        record = self.producers.record
        for info, base in zip(infos, bases, strict=True):
            if info.producer_id >= 0:
                record(info.producer_id, info.producer_epoch, info.base_sequence, info.record_count, base,
                       base + info.last_offset_delta, now)
        if now >= self._producers_expire_at_ms:
            self.producers.expire(now)
            self._producers_expire_at_ms = now + min(self._config.producer_id_expiration_ms, PRODUCER_EXPIRY_CHECK_MS)

    def _check_replicated(
        self, payload: memoryview, infos: list[BatchInfo], compacted: bool = False
    ) -> tuple[list[int], LeaderEpochCache, int, int, int]:
        """Check replicated batches' offsets and epochs against the log, changing nothing.
        Returns (their base offsets, the epoch history after them, the next offset after them,
        their largest timestamp, their record count)."""
        next_offset = self._local.log_end_offset
        epochs = self._epochs
        max_timestamp = NO_TIMESTAMP
        record_count = 0
        bases: list[int] = []
        for info in infos:
            base = int.from_bytes(payload[info.position : info.position + 8], "big", signed=True)
            if base != next_offset and not (compacted and base > next_offset):
                if not bases:
                    raise OffsetOutOfRangeError(
                        f"replicated batches start at offset {base}, the log ends at {next_offset}"
                    )
                raise CorruptMessageError(f"replicated batch at offset {base} does not follow offset {next_offset - 1}")
            epoch = info.partition_leader_epoch
            if epoch < 0:
                raise CorruptMessageError(f"replicated batch at offset {base} carries no leader epoch ({epoch})")
            epochs = epochs.assign(epoch, base)
            bases.append(base)
            max_timestamp = max(max_timestamp, info.max_timestamp)
            next_offset = base + info.last_offset_delta + 1
            record_count += info.record_count
        return bases, epochs, next_offset, max_timestamp, record_count

    def assign_epoch_start(self, epoch: int, offset: int) -> None:
        """Record that leader epoch `epoch` starts at `offset` (normally the log end offset, when
        this replica becomes leader in `epoch`), so the OffsetForLeaderEpoch answer for earlier
        epochs ends there. Epoch entries starting at or after `offset` (epochs that never got a
        batch) are replaced. A no-op if `epoch` is already the latest. ValueError for an epoch
        below the latest one or an offset outside [latest epoch's start, log end offset]. Only the
        index changes: allowed while the log is read-only."""
        local = self._local
        local.check_online()
        latest = self._epochs.latest_epoch
        if epoch < 0 or epoch < latest:
            raise ValueError(f"leader epoch {epoch} is below the log's latest epoch {latest}")
        latest_start = self._epochs.latest_start_offset
        leo = local.log_end_offset
        if not latest_start <= offset <= leo:
            raise ValueError(f"epoch start offset {offset} is outside [{latest_start}, log end offset {leo}]")
        if epoch == latest:
            return
        epochs = self._epochs.assign(epoch, offset)
        if epochs.entries[:-1] == self._epochs.entries:
            local.index.write(epochs=epochs.entries[-1:])
        else:
            local.index.replace_epochs(epochs.entries)
        self._epochs = epochs

    def end_offset_for_epoch(self, epoch: int) -> tuple[int, int]:
        """(epoch, end offset) as Kafka's OffsetForLeaderEpoch: the end offset of the largest epoch
        <= `epoch` is the start offset of the next larger one (the LEO for the latest epoch);
        (-1, -1) if `epoch` is undefined or above the latest."""
        return self._epochs.end_offset_for_epoch(epoch, self._local.log_end_offset)

    # -- roll and flush ---------------------------------------------------------------------------

    def roll(self) -> None:
        """Close the active segment and start a new one (a no-op if the active one is empty)."""
        local = self._local
        local.check_writable()
        self._reap_flushes()
        if local.segments[-1].size_bytes:
            local.roll(self._config.segment_bytes, self._now_ms())

    def _reap_flushes(self) -> None:
        """Apply finished background flushes of rolled segments (LocalLog.reap_flushes)."""
        hw = self._high_watermark
        if self._local.reap_flushes(hw):
            self._checkpointed_hw = hw

    def wait_for_flushes(self, timeout: float | None = None, up_to: int | None = None) -> bool:
        """Block until the background flushes of rolled segments ending at or below `up_to`
        (default: all) have finished, at most `timeout` seconds (default: the flusher's
        `wait_timeout_s`), and apply them. Returns whether none of them is still pending.
        Blocks the caller: for shutdown and tests, not for the event loop."""
        self._local.check_open()
        hw = self._high_watermark
        none_pending, wrote = self._local.wait_for_flushes(hw, timeout, up_to)
        if wrote:
            self._checkpointed_hw = hw
        return none_pending

    def flush(self) -> None:
        """Wait for the pending flushes of rolled segments, msync the active segment, then advance
        and checkpoint the recovery point (to the log end offset unless a rolled segment's flush
        is still running after the flusher's `wait_timeout_s`) and the high watermark."""
        self._local.check_online()
        hw = self._high_watermark
        self._local.flush(hw)
        self._checkpointed_hw = hw

    # -- read -----------------------------------------------------------------------------------

    def read(self, offset: int, max_bytes: int, max_offset: int | None = None) -> memoryview:
        """Whole batches from the one containing `offset`: at most `max_bytes` but at least one
        batch, none with a base offset >= `max_offset` (default: the high watermark), from one
        segment. Empty at `max_offset`. Zero-copy: see "Views" in the module doc.

        Raises OffsetOutOfRangeError outside [log_start_offset, log_end_offset], and
        CorruptMessageError if the first batch fails its CRC (the log is then flagged:
        `corrupt_reason`). A bad batch after good ones ends the read before it.
        """
        local = self._local
        local.check_open()
        if max_bytes < 0:
            raise InvalidFetchSizeError(f"max_bytes {max_bytes} is negative")
        leo = local.log_end_offset
        if not self._log_start_offset <= offset <= leo:
            raise OffsetOutOfRangeError(
                f"offset {offset} is outside the log's range [{self._log_start_offset}, {leo}]"
            )
        limit = self._high_watermark if max_offset is None else min(max_offset, leo)
        if offset >= limit:
            return _EMPTY
        return local.read(offset, max_bytes, limit)

    def offset_for_timestamp(self, timestamp_ms: int) -> tuple[int, int] | None:
        """(offset, timestamp) of the first record at or below the high watermark whose timestamp is
        >= `timestamp_ms`, or None. Uses the time index, then decodes the one batch found."""
        local = self._local
        local.check_open()
        limit = self._high_watermark
        for seg in list(local.segments):
            if seg.base_offset >= limit:
                break
            seg_max = local.segment_max_timestamp(seg)
            if seg_max is None or seg_max < timestamp_ms:
                continue
            floor = local.index.time_floor(seg.base_offset, timestamp_ms)
            start = max(floor[1] if floor is not None else seg.base_offset, self._log_start_offset)
            position = local.position_of(seg, start)
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

    # -- truncation and retention ---------------------------------------------------------------

    def truncate_to(self, offset: int) -> None:
        """Drop every batch holding an offset >= `offset` (a batch straddling it goes whole, so the
        log end offset becomes that batch's base offset). Below the log start offset, the log is
        emptied and restarts at `offset`."""
        local = self._local
        local.check_writable()
        self._reap_flushes()
        if offset >= local.log_end_offset:
            return
        if offset < self._log_start_offset:
            self._truncate_fully(offset)
            return
        cut, active_base = local.truncate_segments(offset)
        self.producers.truncate_to(cut)
        self._drop_producer_snapshots(above=cut)
        self._high_watermark = min(self._high_watermark, cut)
        self._epochs = self._epochs.truncate_from_end(cut)
        local.index.truncate_from(cut, active_base, self._epochs.entries, self._checkpoints())
        local.restore_active_state(self._now_ms())

    def truncate_fully_and_start_at(self, offset: int) -> None:
        """Drop everything and restart the (empty) log at `offset`, which may lie past the log
        end offset: a follower that has fallen behind the leader's log start offset."""
        self._local.check_writable()
        if offset < 0:
            raise ValueError(f"offset {offset} is negative")
        self._reap_flushes()
        self._truncate_fully(offset)

    def _truncate_fully(self, offset: int) -> None:
        local = self._local
        local.replace_all_segments(offset)
        self.producers.clear()
        self._drop_producer_snapshots(above=-1)
        self._log_start_offset = self._high_watermark = offset
        self._epochs = LeaderEpochCache()
        local.index.truncate_from(0, 0, [], self._checkpoints())
        local.restore_active_state(self._now_ms())

    def enforce_retention(self, now_ms: int | None = None) -> int:
        """Delete closed segments, oldest first, as retention.py decides: past retention_ms (by
        their largest timestamp) or beyond retention_bytes or below the log start offset, never the
        active segment nor any data at or above the high watermark. Advances and checkpoints the
        log start offset. Returns segments deleted. A deleted segment's pending flush finds no file
        left to sync (see flusher.py). Runs while the log is read-only too (it frees disk space).
        A `compact`-only topic has no time or size retention (the cleaner bounds it), only the log
        start offset; `compact,delete` has both."""
        local = self._local
        local.check_online()
        self._reap_flushes()
        config = self._config
        segments = local.segments
        by_retention = deletes_by_retention(config.cleanup_policy)
        doomed = segments_to_delete(
            segments, local.size_bytes, lambda i: local.retention_timestamp(segments[i]),
            retention_ms=config.retention_ms if by_retention else -1,
            retention_bytes=config.retention_bytes if by_retention else -1,
            now_ms=self._now_ms() if now_ms is None else now_ms, high_watermark=self._high_watermark,
            log_start_offset=self._log_start_offset,
        )
        if not doomed:
            return 0
        local.delete_oldest(doomed)
        self._drop_producer_snapshots(below=local.bases[0])
        self._log_start_offset = max(self._log_start_offset, local.bases[0])
        local.recovery_point = max(local.recovery_point, self._log_start_offset)
        self._epochs = self._epochs.truncate_from_start(self._log_start_offset)
        local.index.delete_before(local.bases[0], self._epochs.entries, self._checkpoints())
        log.info("%s: retention deleted %d segments, log start offset now %d",
                 self.directory, doomed, self._log_start_offset)
        return doomed

    def advance_log_start_offset(self, offset: int) -> int:
        """Raise the log start offset to `offset`, capped at the high watermark: a follower mirrors
        its leader's log start (retention there, as Kafka's `maybeIncrementLogStartOffset`). Reads
        below it fail from now on; closed segments wholly below it are deleted (a partly covered
        one stays until it is). Checkpointed with the index. Returns segments deleted. Like
        retention, runs while the log is read-only (it frees disk space)."""
        local = self._local
        local.check_online()
        target = min(offset, self._high_watermark)
        if target <= self._log_start_offset:
            return 0
        self._reap_flushes()
        doomed = 0
        for next_base in local.bases[1:]:
            if next_base > target:
                break
            doomed += 1
        if doomed:
            local.delete_oldest(doomed)
            self._drop_producer_snapshots(below=local.bases[0])
        self._log_start_offset = target
        local.recovery_point = max(local.recovery_point, local.bases[0])
        self._epochs = self._epochs.truncate_from_start(self._log_start_offset)
        local.index.delete_before(local.bases[0], self._epochs.entries, self._checkpoints())
        log.info("%s: log start offset now %d (the leader's), %d segments deleted", self.directory, target, doomed)
        return doomed

    # -- close and checkpoints --------------------------------------------------------------------

    def close(self) -> None:
        """Wait for the pending flushes of rolled segments, flush and trim the active segment,
        checkpoint, and mark a clean shutdown. Idempotent. If a rolled segment's flush is still
        running after the flusher's `wait_timeout_s`, no marker is written (the next open recovers)."""
        local = self._local
        if local.closed:
            return
        if local.offline is not None:
            self._abandon()
            return
        try:
            local.close(self._high_watermark, self._checkpoints)
        except (StorageError, OSError) as e:
            self._abandon()
            raise StorageError(f"close of {self.directory} failed: {e}") from e
        local.closed = True

    def delete(self) -> None:
        """Close and remove the directory (renamed to `<name>.<uuid>-delete` first, so a crash
        midway leaves a directory that the log manager removes rather than reloads)."""
        self._abandon()
        remove_log_dir(self.directory)

    def _abandon(self) -> None:
        """Release mappings and the index without writing anything (no clean-shutdown marker).
        Pending flushes run on, on their own descriptors; nobody applies them."""
        self._local.abandon()

    def _checkpoints(self) -> dict[bytes, int]:
        return {META_LOG_START_OFFSET: self._log_start_offset, META_RECOVERY_POINT: self._local.recovery_point,
                META_HIGH_WATERMARK: self._high_watermark, META_SEGMENT_BYTES: self._config.segment_bytes}

    def checkpoint_high_watermark(self) -> bool:
        """Write the high watermark to the index if it moved since it was last written (one small
        transaction, not synced: durable at the next index sync, and a process crash keeps it in
        the page cache). For a periodic caller (the log manager). Returns whether it wrote."""
        local = self._local
        if local.closed or local.offline is not None or self._high_watermark == self._checkpointed_hw:
            return False
        hw = self._high_watermark
        local.index.write(meta={META_HIGH_WATERMARK: hw})
        self._checkpointed_hw = hw
        return True

    def retry_preallocation(self, force: bool = False) -> bool:
        """A read-only log (its active segment could not be preallocated): try again, at most once
        every PREALLOCATE_RETRY_INTERVAL_MS unless `force`. Returns whether the log is writable."""
        return self._local.retry_preallocation(force)

    def __repr__(self) -> str:
        return (
            f"Log({self.directory}, start={self._log_start_offset}, end={self._local.log_end_offset}, "
            f"hw={self._high_watermark}, segments={len(self._local.segments)})"
        )
