"""Log: append, read, roll, retention, truncation and crash recovery of one partition."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from logbroker.errors import (
    CorruptMessageError,
    InvalidConfigError,
    MessageTooLargeError,
    OffsetOutOfRangeError,
    StorageError,
    UnsupportedForMessageFormatError,
)
from logbroker.storage import segment as segment_module
from logbroker.storage.flusher import SegmentFlusher
from logbroker.storage.index import META_RECOVERY_POINT, PartitionIndex
from logbroker.storage.log import (
    CLEAN_SHUTDOWN_FILE,
    INDEX_DIR,
    PREALLOCATE_RETRY_INTERVAL_MS,
    Log,
    LogConfig,
)
from logbroker.storage.record_batch import (
    HEADER_SIZE,
    BatchHeader,
    batch_crc_ok,
    decode_batch,
    encode_batch,
    iter_batches,
    parse_header,
    set_base_offset,
    set_leader_epoch,
)
from logbroker.storage.segment import Segment, file_name

SMALL = {"segment_bytes": 4096, "index_interval_bytes": 256, "index_map_bytes": 4 << 20}


class ManualClock:
    def __init__(self, now_ms: int = 10_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def batch(n: int = 1, ts: int = 1000, size: int = 20, key: bytes | None = None, step_ms: int = 1) -> bytes:
    return encode_batch([(ts + i * step_ms, key, bytes([65 + i % 26]) * size, None) for i in range(n)])


def stamp(raw: bytes, base_offset: int, epoch: int) -> bytes:
    """The bytes the log stores for a producer batch."""
    b = bytearray(raw)
    set_base_offset(b, 0, base_offset)
    set_leader_epoch(b, 0, epoch)
    return bytes(b)


def open_log(path: Path, clock: ManualClock | None = None, flusher: SegmentFlusher | None = None,
             **overrides: object) -> Log:
    return Log.open(path, LogConfig(**{**SMALL, **overrides}), clock or ManualClock(), flusher)  # type: ignore[arg-type]


def read_all(log: Log, max_bytes: int = 1 << 20) -> list[tuple[BatchHeader, bytes]]:
    """Every batch stored, up to the log end offset (not the high watermark: that is replication's)."""
    out: list[tuple[BatchHeader, bytes]] = []
    offset = log.log_start_offset
    while offset < log.log_end_offset:
        view = log.read(offset, max_bytes, log.log_end_offset)
        assert view.nbytes, f"empty read at {offset} below the log end offset {log.log_end_offset}"
        for h, pos in iter_batches(view):
            out.append((h, bytes(view[pos : pos + h.size_bytes])))
            offset = h.next_offset
    return out


def crash(log: Log) -> None:
    """What kill -9 leaves: mappings dropped, nothing trimmed, flushed or marked."""
    log._abandon()


def fill(log: Log, count: int, epoch: int = 0, **kw: object) -> list[bytes]:
    """Append `count` single-record-ish batches; returns the stored bytes of each, in order."""
    stored = []
    for i in range(count):
        raw = batch(1 + i % 3, **kw)  # type: ignore[arg-type]
        r = log.append(raw, epoch)
        stored.append(stamp(raw, r.base_offset, epoch))
    log.high_watermark = log.log_end_offset
    return stored


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "orders-0"


# -- append and read --------------------------------------------------------------------------------


def test_new_log_is_empty(path):
    log = open_log(path)
    assert (log.log_start_offset, log.log_end_offset, log.high_watermark) == (0, 0, 0)
    assert log.size_bytes == 0 and log.segment_count == 1 and log.latest_epoch == -1
    assert log.read(0, 100).nbytes == 0
    assert log.recovery_reports == []
    log.close()


def test_append_assigns_offsets_and_reads_back_byte_identical(path):
    log = open_log(path)
    raws = [batch(3), batch(1), batch(5)]
    results = [log.append(r, 4) for r in raws]
    assert [(r.base_offset, r.last_offset, r.record_count) for r in results] == [(0, 2, 3), (3, 3, 1), (4, 8, 5)]
    assert results[0].max_timestamp == 1002 and results[0].log_append_time_ms == -1
    assert log.log_end_offset == 9 and log.latest_epoch == 4
    assert log.read(0, 1 << 20).nbytes == 0  # nothing below the high watermark yet
    log.high_watermark = 9
    got = read_all(log)
    assert [g[1] for g in got] == [stamp(r, res.base_offset, 4) for r, res in zip(raws, results, strict=True)]
    assert log.size_bytes == sum(len(r) for r in raws)
    log.close()


def test_multi_batch_payload_is_one_append(path):
    log = open_log(path)
    raws = [batch(2), batch(3, key=b"k"), batch(1)]
    r = log.append(b"".join(raws), 0)
    assert (r.base_offset, r.last_offset, r.record_count) == (0, 5, 6)
    log.high_watermark = log.log_end_offset
    assert [h.base_offset for h, _ in read_all(log)] == [0, 2, 5]
    log.close()


def test_append_accepts_memoryview_and_bytearray(path):
    log = open_log(path)
    log.append(memoryview(batch(2)), 0)
    log.append(bytearray(batch(2)), 0)
    assert log.log_end_offset == 4
    log.close()


@pytest.mark.parametrize(
    "payload, error",
    [
        (b"", "CorruptMessageError"),
        (batch(2)[:-1], "CorruptMessageError"),
        (batch(2) + batch(1)[:30], "CorruptMessageError"),
        (batch(2)[:70] + bytes([batch(2)[70] ^ 1]) + batch(2)[71:], "CorruptMessageError"),
        (batch(2)[:16] + b"\x01" + batch(2)[17:], "UnsupportedForMessageFormatError"),
    ],
)
def test_invalid_payload_writes_nothing(path, payload, error):
    log = open_log(path)
    log.append(batch(1), 0)
    before = (log.log_end_offset, log.size_bytes, log.index.entry_counts())
    with pytest.raises((CorruptMessageError, UnsupportedForMessageFormatError)) as info:
        log.append(payload, 0)
    assert type(info.value).__name__ == error
    assert (log.log_end_offset, log.size_bytes, log.index.entry_counts()) == before
    active = log.segments[-1]
    tail = active.buffer[active.size_bytes : active.capacity_bytes]
    assert len(tail) > 0 and tail.count(0) == len(tail)
    log.close()


def test_batch_above_max_message_bytes_is_rejected(path):
    log = open_log(path, max_message_bytes=200)
    with pytest.raises(MessageTooLargeError):
        log.append(batch(1, size=300), 0)
    assert log.log_end_offset == 0
    log.close()


def test_leader_epoch_must_not_be_negative(path):
    log = open_log(path)
    with pytest.raises(ValueError):
        log.append(batch(), -1)
    log.close()


def test_high_watermark_never_exceeds_log_end(path):
    log = open_log(path)
    log.append(batch(2), 0)
    with pytest.raises(ValueError):
        log.high_watermark = 3
    log.high_watermark = 2
    assert log.high_watermark == 2
    log.close()
    assert open_log(path).high_watermark == 2  # the checkpoint written at close


def test_read_limits(path):
    log = open_log(path, segment_bytes=1 << 20)
    stored = fill(log, 10)  # offsets: batches of 1, 2, 3, 1, 2, 3, ... records
    bases = [h.base_offset for h, _ in read_all(log)]
    sizes = [len(s) for s in stored]
    # at least one whole batch however small max_bytes is
    assert log.read(0, 0).nbytes == sizes[0]
    assert log.read(0, sizes[0] + sizes[1] - 1).nbytes == sizes[0]
    assert log.read(0, sizes[0] + sizes[1]).nbytes == sizes[0] + sizes[1]
    # an offset inside a batch starts at that batch
    inside = bases[2] + 1
    view = log.read(inside, 1 << 20)
    assert parse_header(view).base_offset == bases[2]
    # max_offset: no batch whose base offset is >= it; empty exactly at it
    view = log.read(0, 1 << 20, max_offset=bases[3])
    assert [h.base_offset for h, _ in iter_batches(view)] == bases[:3]
    assert log.read(bases[3], 1 << 20, max_offset=bases[3]).nbytes == 0
    # the high watermark is the default bound
    log.high_watermark = bases[5]
    assert [h.base_offset for h, _ in iter_batches(log.read(0, 1 << 20))] == bases[:5]
    assert log.read(bases[5], 1 << 20).nbytes == 0
    assert log.read(log.log_end_offset, 1 << 20).nbytes == 0
    log.close()


def test_read_out_of_range_names_the_valid_range(path):
    log = open_log(path)
    fill(log, 3)
    with pytest.raises(OffsetOutOfRangeError, match=r"\[0, 6\]"):
        log.read(7, 100)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(-1, 100)
    log.close()


def test_read_view_is_read_only_zero_copy(path):
    log = open_log(path)
    fill(log, 2)
    view = log.read(0, 100)
    assert view.readonly
    with pytest.raises(TypeError):
        view[0] = 1  # type: ignore[index]
    log.close()


def test_reads_cross_segments(path):
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 40)
    assert log.segment_count > 3
    assert [b for _, b in read_all(log)] == stored
    assert [b for _, b in read_all(log, max_bytes=1)] == stored
    # every offset starts a read at the batch containing it
    for h, _ in read_all(log):
        for off in range(h.base_offset, h.next_offset):
            assert parse_header(log.read(off, 1)).base_offset == h.base_offset
    log.close()


# -- rolling ----------------------------------------------------------------------------------------


def test_roll_by_size_trims_closed_segments(path):
    log = open_log(path, segment_bytes=1024)
    fill(log, 30)
    segs = log.segments
    assert len(segs) > 2
    for seg in segs[:-1]:
        assert not seg.is_active and os.path.getsize(seg.path) == seg.size_bytes <= 1024
    assert segs[-1].is_active and os.path.getsize(segs[-1].path) == 1024
    assert [s.base_offset for s in segs] == sorted(s.base_offset for s in segs)
    assert log.recovery_point <= segs[-1].base_offset  # a roll hands its fsync to the flusher,
    assert log.wait_for_flushes()
    assert log.recovery_point == segs[-1].base_offset  # and the recovery point follows it
    log.close()
    assert os.path.getsize(segs[-1].path) == segs[-1].size_bytes


def test_roll_by_age(path):
    clock = ManualClock()
    log = open_log(path, clock, segment_ms=1000)
    log.append(batch(), 0)
    clock.now_ms += 1000
    log.append(batch(), 0)
    assert log.segment_count == 1
    clock.now_ms += 1
    log.append(batch(), 0)
    assert log.segment_count == 2 and log.segments[-1].base_offset == 2
    log.close()


def test_payload_larger_than_a_segment_gets_its_own(path):
    log = open_log(path, segment_bytes=1024, max_message_bytes=1 << 20)
    log.append(batch(), 0)
    big = batch(2, size=3000)
    log.append(big, 0)
    log.append(batch(), 0)
    sizes = [s.size_bytes for s in log.segments]
    assert sizes[1] == len(big) and log.segment_count == 3
    log.high_watermark = log.log_end_offset
    assert len(read_all(log)) == 3
    log.close()
    # and as the very first append, on an empty active segment
    log = open_log(path.with_name("other-0"), segment_bytes=1024)
    log.append(big, 0)
    assert log.segment_count == 1 and log.size_bytes == len(big)
    log.close()


def test_explicit_roll(path):
    log = open_log(path)
    log.roll()
    assert log.segment_count == 1  # nothing to roll
    log.append(batch(), 0)
    log.roll()
    assert log.segment_count == 2 and log.segments[-1].base_offset == 1
    log.close()


# -- background flush of rolled segments --------------------------------------------------------------

DEADLINE_S = 30.0  # generous bound on every wait below; none of them is expected to take long


class GatedFsync:
    """An fsync for SegmentFlusher that holds each segment file's fsync until `allow`ed (directory
    fsyncs pass), then really fsyncs, or raises `fail`. Records the threads it ran on."""

    def __init__(self, fail: OSError | None = None) -> None:
        self._cond = threading.Condition()
        self._permits = 0
        self.entered = 0  # segment fsyncs started
        self.finished = 0  # segment fsyncs done
        self.threads: set[int] = set()
        self.fail = fail

    def allow(self, n: int = 1 << 30) -> None:
        with self._cond:
            self._permits += n
            self._cond.notify_all()

    def wait_entered(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.entered >= n, DEADLINE_S), "flush never started"

    def __call__(self, fd: int) -> None:
        self.threads.add(threading.get_ident())
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.fsync(fd)
            return
        with self._cond:
            self.entered += 1
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._permits > 0, DEADLINE_S):
                raise AssertionError("fsync never allowed")
            self._permits -= 1
        if self.fail is not None:
            raise self.fail
        os.fsync(fd)
        with self._cond:
            self.finished += 1


@pytest.fixture
def gated():
    fsync = GatedFsync()
    flusher = SegmentFlusher(max_pending=64, fsync=fsync, wait_timeout_s=DEADLINE_S)
    yield fsync, flusher
    fsync.allow()
    flusher.shutdown(wait=True)


def checkpointed_recovery_point(path: Path) -> int | None:
    """The recovery point in the index on disk (of a crashed or closed log)."""
    index, _ = PartitionIndex.open(path / INDEX_DIR, SMALL["index_map_bytes"])
    try:
        return index.meta(META_RECOVERY_POINT)
    finally:
        index.close()


def test_roll_leaves_the_fsync_to_the_flusher_and_the_recovery_point_follows_it(path, gated, monkeypatch):
    fsync, flusher = gated
    caller = threading.get_ident()
    synced_on_caller: list[object] = []
    real_fsync, real_msync = os.fsync, Segment.flush

    def watch_fsync(fd: int) -> None:
        if threading.get_ident() == caller:
            synced_on_caller.append(fd)
        real_fsync(fd)

    def watch_msync(seg: Segment) -> None:
        if threading.get_ident() == caller:
            synced_on_caller.append(seg.path)
        real_msync(seg)

    monkeypatch.setattr(os, "fsync", watch_fsync)
    monkeypatch.setattr(Segment, "flush", watch_msync)
    log = open_log(path, flusher=flusher, segment_bytes=1024)
    stored = fill(log, 40)
    ends = [s.base_offset for s in log.segments[1:]]
    assert len(ends) >= 3
    # every roll returned although no fsync could finish: none ran on this thread
    assert synced_on_caller == []
    assert log.pending_flushes == ends
    fsync.wait_entered(1)  # the first rolled segment's fsync is running, held inside fsync
    assert not log.wait_for_flushes(timeout=0)  # applies what has finished: nothing
    assert log.recovery_point == 0 and log.index.meta(META_RECOVERY_POINT) == 0

    fsync.allow(1)  # one segment on disk: the recovery point moves to its end, no further
    assert log.wait_for_flushes(up_to=ends[0])
    assert log.recovery_point == ends[0] == log.index.meta(META_RECOVERY_POINT)
    assert log.pending_flushes == ends[1:]

    fsync.allow()
    done = flusher.prepare(log.segments[0].path)  # queued behind the log's flushes on the one worker
    flusher.start(done)
    assert flusher.wait([done], DEADLINE_S)
    log.append(batch(), 0)  # an append applies the finished flushes
    assert log.recovery_point == ends[-1] == log.index.meta(META_RECOVERY_POINT)
    assert all(end > ends[-1] for end in log.pending_flushes)  # (that append may have rolled)
    assert fsync.threads and caller not in fsync.threads
    log.high_watermark = log.log_end_offset
    assert [b for _, b in read_all(log)][: len(stored)] == stored
    log.close()
    assert (path / CLEAN_SHUTDOWN_FILE).exists()
    assert checkpointed_recovery_point(path) == log.log_end_offset


@pytest.mark.parametrize("finished", [0, 1])
def test_crash_with_flushes_pending_recovers_from_the_last_fsynced_segment(path, gated, finished):
    fsync, flusher = gated
    log = open_log(path, flusher=flusher, segment_bytes=1024)
    stored = fill(log, 40)
    ends = log.pending_flushes
    fsync.allow(finished)
    assert log.wait_for_flushes(up_to=ends[0] if finished else -1)
    expected_rp = ends[0] if finished else 0
    fsync.wait_entered(finished + 1)  # a flush is in flight
    crash(log)
    # the checkpoint never passes data whose fsync has not finished
    assert checkpointed_recovery_point(path) == expected_rp
    log = open_log(path, segment_bytes=1024)
    assert log.recovery_reports == []
    assert [b for _, b in read_all(log)] == stored
    assert log.recovery_point == log.log_end_offset
    fsync.allow()  # the crashed log's flushes finish now, harmlessly
    flusher.shutdown(wait=True)
    stored += fill(log, 10)
    log.close()
    log = open_log(path, segment_bytes=1024)
    assert log.recovery_reports == [] and [b for _, b in read_all(log)] == stored
    log.close()


def test_close_waits_for_pending_flushes(path, gated):
    fsync, flusher = gated
    log = open_log(path, flusher=flusher, segment_bytes=1024)
    fill(log, 40)
    rolls = len(log.pending_flushes)
    assert rolls >= 3

    def release() -> None:
        fsync.wait_entered(1)
        fsync.allow()

    releaser = threading.Thread(target=release)
    releaser.start()
    log.close()
    releaser.join(DEADLINE_S)
    assert fsync.finished == rolls  # every rolled segment was fsynced before close returned
    assert (path / CLEAN_SHUTDOWN_FILE).exists()
    assert checkpointed_recovery_point(path) == log.log_end_offset


def test_close_gives_up_on_a_stuck_flush_without_the_clean_marker(path, gated, caplog):
    fsync, _ = gated
    flusher = SegmentFlusher(max_pending=64, fsync=fsync, wait_timeout_s=0.05)  # the bound on close's wait
    log = open_log(path, flusher=flusher, segment_bytes=1024)
    stored = fill(log, 40)
    log.close()  # the fsync is never allowed while it waits
    assert not (path / CLEAN_SHUTDOWN_FILE).exists() and "without the clean-shutdown marker" in caplog.text
    assert checkpointed_recovery_point(path) == 0
    log = open_log(path, segment_bytes=1024)
    assert log.recovery_reports == [] and [b for _, b in read_all(log)] == stored
    log.close()
    fsync.allow()
    flusher.shutdown(wait=True)


def test_deleting_segments_with_flushes_pending(path, gated):
    fsync, flusher = gated
    log = open_log(path, flusher=flusher, segment_bytes=1024, retention_bytes=0)
    fill(log, 40)
    doomed = [s.path for s in log.segments[:-1]]
    fsync.wait_entered(1)  # the first one is inside fsync; the others wait behind it
    assert log.enforce_retention() == len(doomed) and not any(p.exists() for p in doomed)
    fsync.allow()
    assert log.wait_for_flushes() and not log.is_offline
    assert fsync.finished == 1  # the later ones found their file gone and skipped it
    assert log.recovery_point == log.log_start_offset == log.segments[0].base_offset
    stored = [b for _, b in read_all(log)] + fill(log, 3)
    log.close()
    log = open_log(path, segment_bytes=1024)
    assert log.recovery_reports == [] and [b for _, b in read_all(log)] == stored
    log.delete()  # and a deleted log's pending flushes neither fail nor find anything to sync
    assert not path.exists()


def test_truncation_drops_flushes_of_data_it_cut(path, gated):
    fsync, flusher = gated
    log = open_log(path, flusher=flusher, segment_bytes=1024)
    fill(log, 40)
    ends = log.pending_flushes
    log.truncate_to(ends[1] - 1)  # inside the second segment: its flush, and later ones, no longer count
    assert log.pending_flushes == [ends[0]]
    kept = [b for _, b in read_all(log)]
    fsync.allow()
    assert log.wait_for_flushes()
    assert log.recovery_point == ends[0] <= log.log_end_offset
    refill = fill(log, 40)  # rewrites the offsets past the cut, and rolls again
    assert log.wait_for_flushes()
    assert log.recovery_point == log.segments[-1].base_offset
    assert [b for _, b in read_all(log)] == kept + refill
    log.close()


def test_failed_background_fsync_takes_the_log_offline(path):
    fsync = GatedFsync(fail=OSError(errno.EIO, "Input/output error"))
    flusher = SegmentFlusher(fsync=fsync, wait_timeout_s=DEADLINE_S)
    log = open_log(path, flusher=flusher, segment_bytes=1024)
    fill(log, 10)
    assert log.pending_flushes
    fsync.allow()  # and fail
    with pytest.raises(StorageError, match="Input/output"):
        log.wait_for_flushes()
    assert log.is_offline and log.recovery_point == 0
    with pytest.raises(StorageError, match="offline"):
        log.append(batch(), 0)
    log.close()
    assert not (path / CLEAN_SHUTDOWN_FILE).exists()
    flusher.shutdown(wait=True)


def test_pending_flushes_are_bounded(path, gated):
    fsync, _ = gated
    flusher = SegmentFlusher(max_pending=1, fsync=fsync, wait_timeout_s=0.05)
    log = open_log(path, flusher=flusher, segment_bytes=1024)
    log.append(batch(), 0)
    log.roll()  # takes the one slot; its fsync is held
    log.append(batch(), 0)
    files = sorted(os.listdir(path))
    with pytest.raises(StorageError, match="pending"):
        log.roll()
    assert log.segment_count == 2 and sorted(os.listdir(path)) == files and not log.is_offline
    fsync.allow()
    assert log.wait_for_flushes()
    log.roll()
    assert log.segment_count == 3
    log.close()
    flusher.shutdown(wait=True)


# -- timestamps and epochs ----------------------------------------------------------------------------


def test_log_append_time(path):
    clock = ManualClock(555_000)
    log = open_log(path, clock, message_timestamp_type="LogAppendTime")
    r = log.append(batch(2, ts=5), 0)
    assert r.log_append_time_ms == 555_000 and r.max_timestamp == 555_000
    log.high_watermark = log.log_end_offset
    view = log.read(0, 1 << 20)
    h = parse_header(view)
    assert h.max_timestamp == 555_000 and batch_crc_ok(view, 0, h.size_bytes)
    msgs = decode_batch(bytes(view), 0, h, "t", 0)
    assert [m.timestamp for m in msgs] == [555_000, 555_000]
    assert log.offset_for_timestamp(555_000) == (0, 555_000)
    log.close()


def test_offset_for_timestamp(path):
    log = open_log(path, segment_bytes=1024, index_interval_bytes=500)
    # timestamps go up and down; the answer is the first record (by offset) at or after the target
    expected_records = []
    for i in range(60):
        ts = 1000 + (i * 37) % 200 + i * 5
        raw = encode_batch([(ts, None, b"x" * 20, None), (ts + 3, None, b"y" * 20, None)])
        r = log.append(raw, 0)
        expected_records += [(r.base_offset, ts), (r.base_offset + 1, ts + 3)]
    log.high_watermark = log.log_end_offset
    assert log.segment_count > 3

    def oracle(target: int) -> tuple[int, int] | None:
        return next(((o, t) for o, t in expected_records if t >= target), None)

    for target in [-10, 0, 999, 1000, 1001, 1050, 1100, 1234, 1300, 1400, 1500, 1600, 10_000]:
        assert log.offset_for_timestamp(target) == oracle(target), target
    # only up to the high watermark
    log.high_watermark = 10
    assert log.offset_for_timestamp(10**6) is None
    found = log.offset_for_timestamp(1200)
    assert found is None or found[0] < 10
    log.close()


def test_epochs_and_end_offset_for_epoch(path):
    log = open_log(path)
    log.append(batch(3), 1)  # 0-2
    log.append(batch(2), 1)  # 3-4
    log.append(batch(2), 3)  # 5-6
    log.append(batch(1), 5)  # 7
    assert log.epochs == [(1, 0), (3, 5), (5, 7)]
    assert log.end_offset_for_epoch(5) == (5, 8)
    assert log.end_offset_for_epoch(3) == (3, 7)
    assert log.end_offset_for_epoch(4) == (3, 7)
    assert log.end_offset_for_epoch(1) == (1, 5)
    assert log.end_offset_for_epoch(0) == (0, 0)
    assert log.end_offset_for_epoch(6) == (-1, -1)
    assert log.end_offset_for_epoch(-1) == (-1, -1)
    log.close()
    log = open_log(path)
    assert log.epochs == [(1, 0), (3, 5), (5, 7)]
    log.close()


# -- truncation ---------------------------------------------------------------------------------------


def test_truncate_to(path):
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 30, epoch=2)
    log.append(batch(), 3)
    bases = [h.base_offset for h, _ in read_all(log)]
    segs_before = log.segment_count
    cut = bases[12]
    log.truncate_to(cut)
    assert log.log_end_offset == cut and log.high_watermark == cut
    assert log.segment_count <= segs_before
    assert log.epochs == [(2, 0)]
    assert [b for _, b in read_all(log)] == stored[:12]
    # a cut inside a batch drops that whole batch
    log.truncate_to(bases[5] + 1)
    assert log.log_end_offset == bases[5]
    assert [b for _, b in read_all(log)] == stored[:5]
    # appends continue from there, and a crash does not bring the old tail back
    r = log.append(batch(2), 4)
    assert r.base_offset == bases[5]
    log.high_watermark = log.log_end_offset
    crash(log)
    log = open_log(path, segment_bytes=1024)
    got = read_all(log)
    assert [b for _, b in got[:5]] == stored[:5] and len(got) == 6
    assert log.epochs == [(2, 0), (4, bases[5])]
    assert log.recovery_reports == []
    log.close()


def test_truncate_into_a_closed_segment_and_to_a_segment_boundary(path):
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 40)
    segs = log.segments
    boundary = segs[2].base_offset
    log.truncate_to(boundary)
    assert log.segment_count == 3 and log.segments[-1].size_bytes == 0
    n = len([b for b in read_all(log)])
    assert [b for _, b in read_all(log)] == stored[:n]
    mid = segs[1].base_offset + 1
    log.truncate_to(mid)
    assert log.segment_count == 2 and log.segments[-1].is_active
    fill(log, 5)
    log.close()
    log = open_log(path, segment_bytes=1024)
    assert log.recovery_reports == []
    assert read_all(log)[0][1] == stored[0]
    log.close()


def test_truncate_below_log_start_empties_the_log(path):
    clock = ManualClock()
    log = open_log(path, clock, segment_bytes=1024, retention_bytes=1024)
    fill(log, 40)
    log.enforce_retention()
    start = log.log_start_offset
    assert start > 0
    log.truncate_to(start - 1)
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (start - 1, start - 1, 0)
    r = log.append(batch(), 0)
    assert r.base_offset == start - 1
    log.close()
    log = open_log(path)
    assert (log.log_start_offset, log.log_end_offset) == (start - 1, start)
    log.close()


# -- retention ----------------------------------------------------------------------------------------


def test_retention_by_time(path):
    clock = ManualClock(10_000)
    log = open_log(path, clock, segment_bytes=1024, retention_ms=1000)
    for ts in range(0, 8000, 100):
        log.append(batch(ts=ts), 0)
    log.high_watermark = log.log_end_offset
    newest = {s.base_offset: max(h.max_timestamp for h, _ in iter_batches(s.view(0, s.size_bytes)))
              for s in log.segments}
    clock.now_ms = 1000  # nothing is older than 1 s yet
    assert log.enforce_retention() == 0
    # a segment goes once its newest record is more than retention_ms old, oldest first
    deleted = log.enforce_retention(now_ms=5000 + 1000)
    doomed = [base for base, ts in newest.items() if ts < 5000]
    assert deleted == len(doomed) > 0
    assert log.log_start_offset == log.segments[0].base_offset > max(doomed)
    assert newest[log.segments[0].base_offset] >= 5000
    with pytest.raises(OffsetOutOfRangeError):
        log.read(0, 100)
    # the active segment is never deleted
    n = log.segment_count
    assert log.enforce_retention(now_ms=10**12) == n - 1 and log.segment_count == 1
    log.close()
    log = open_log(path, clock)
    assert log.log_start_offset == log.segments[0].base_offset > 0  # checkpointed
    log.close()


def test_retention_by_bytes(path):
    log = open_log(path, segment_bytes=1024, retention_bytes=3000)
    fill(log, 60)
    total = log.size_bytes
    deleted = log.enforce_retention()
    assert deleted > 0
    assert log.size_bytes <= 3000 + 1024 and log.size_bytes < total
    assert log.size_bytes + log.segments[0].size_bytes > 3000  # deleting one more would go below
    assert log.index.floor_offset(log.log_start_offset - 1) is None  # index entries went too
    log.close()


def test_retention_never_passes_the_high_watermark(path):
    log = open_log(path, segment_bytes=1024, retention_bytes=0)
    fill(log, 40)
    log.high_watermark = log.segments[2].base_offset + 1
    log.enforce_retention()
    assert log.segments[0].base_offset <= log.high_watermark
    assert log.log_start_offset <= log.high_watermark
    assert log.segment_count >= 2
    log.close()


def test_views_survive_roll_and_retention(path):
    log = open_log(path, segment_bytes=1024, retention_bytes=0)
    stored = fill(log, 3)
    held = log.read(0, 1 << 20)
    copy = bytes(held)
    fill(log, 40)  # rolls the segment `held` points into
    assert log.enforce_retention() > 0  # and deletes it
    assert bytes(held) == copy and copy.startswith(stored[0])
    del held
    gc.collect()
    log.close()


# -- clean shutdown and crash recovery ----------------------------------------------------------------


def test_clean_close_and_reopen(path):
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 30, epoch=1)
    counts = log.index.entry_counts()
    log.close()
    log.close()  # idempotent
    assert (path / CLEAN_SHUTDOWN_FILE).exists()
    log = open_log(path, segment_bytes=1024)
    assert not (path / CLEAN_SHUTDOWN_FILE).exists()
    assert log.recovery_reports == []
    assert log.index.entry_counts() == counts
    assert [b for _, b in read_all(log)] == stored
    stored += fill(log, 5, epoch=1)
    assert [b for _, b in read_all(log)] == stored
    log.close()


def test_crash_with_a_preallocated_tail_is_not_damage(path):
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 30)
    active = log.segments[-1].path
    crash(log)
    assert os.path.getsize(active) == 1024  # the zero tail is still there
    log = open_log(path, segment_bytes=1024)
    assert log.recovery_reports == []
    assert [b for _, b in read_all(log)] == stored
    log.close()


def test_crash_recovery_cuts_a_garbled_batch(path, caplog):
    log = open_log(path, segment_bytes=1 << 16)
    stored = fill(log, 10)
    active = log.segments[-1].path
    crash(log)
    positions = [0]
    for s in stored:
        positions.append(positions[-1] + len(s))
    data = bytearray(active.read_bytes())
    data[positions[6] + 65] ^= 0x40  # inside batch 6's records
    active.write_bytes(bytes(data))
    log = open_log(path, segment_bytes=1 << 16)
    assert len(log.recovery_reports) == 1
    report = log.recovery_reports[0]
    assert report.segment == active.name and report.position == positions[6] and "CRC" in report.reason
    assert report.truncated_bytes == len(data) - positions[6]
    assert f"byte {positions[6]}" in caplog.text and active.name in caplog.text
    assert [b for _, b in read_all(log)] == stored[:6]
    assert log.log_end_offset == parse_header(stored[5]).next_offset
    log.close()


def test_crash_between_copy_and_offset_stamping_is_torn(path):
    """A batch copied into the segment but not yet given its offset and epoch must not survive."""
    log = open_log(path)
    raw = batch(2)
    crash(log)
    with open(path / file_name(0), "r+b") as f:
        f.write(raw)  # producer's baseOffset 0 and epoch -1, exactly what the copy leaves
    log = open_log(path)
    assert log.log_end_offset == 0
    assert len(log.recovery_reports) == 1 and "epoch" in log.recovery_reports[0].reason
    log.close()


def test_crash_recovery_deletes_segments_after_damage(path):
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 40)
    segs = [s.path for s in log.segments]
    crash(log)
    forget_recovery_point(path)
    with open(segs[1], "r+b") as f:
        f.truncate(100)  # torn inside its first batch
    log = open_log(path, segment_bytes=1024)
    names = [r.segment for r in log.recovery_reports]
    assert names[0] == segs[1].name and names[1:] == [p.name for p in segs[2:]]
    assert not any(p.exists() for p in segs[2:])
    assert log.segment_count == 2 and log.segments[-1].is_active
    got = [b for _, b in read_all(log)]
    assert got == stored[: len(got)] and log.log_end_offset == log.segments[1].base_offset
    fill(log, 3)
    log.close()


def forget_recovery_point(path: Path) -> None:
    index, _ = PartitionIndex.open(path / INDEX_DIR, SMALL["index_map_bytes"])
    index.write(meta={META_RECOVERY_POINT: 0})
    index.close()


def test_recovery_handles_short_files_and_strays(path):
    log = open_log(path)
    stored = fill(log, 3)
    crash(log)
    (path / "notes.txt").write_text("hello")
    (path / "123.log").write_bytes(b"x")
    (path / "subdir").mkdir()
    (path / file_name(10**6)).write_bytes(b"\x00\x01")  # shorter than a header, out of sequence
    log = open_log(path)
    assert [b for _, b in read_all(log)] == stored
    assert len(log.recovery_reports) == 1 and log.recovery_reports[0].segment == file_name(10**6)
    assert (path / "notes.txt").exists()
    log.close()
    # a lone file shorter than a header
    other = path.with_name("other-0")
    other.mkdir()
    (other / file_name(0)).write_bytes(b"\x00" * (HEADER_SIZE - 1))
    log = open_log(other)
    assert log.log_end_offset == 0 and log.recovery_reports == []
    log.close()


@pytest.mark.parametrize("damage", ["delete", "garbage"])
def test_lost_index_is_rebuilt_from_the_log(path, damage):
    log = open_log(path, segment_bytes=1024, index_interval_bytes=0)
    stored = fill(log, 30, epoch=3)
    counts = log.index.entry_counts()
    log.close()
    if damage == "delete":
        shutil.rmtree(path / INDEX_DIR)
    else:
        (path / INDEX_DIR / "data.mdb").write_bytes(os.urandom(20_000))
    log = open_log(path, segment_bytes=1024, index_interval_bytes=0)
    assert log.index.entry_counts() == counts
    assert [b for _, b in read_all(log)] == stored
    assert log.epochs == [(3, 0)]
    assert log.high_watermark == 0  # its checkpoint went with the index: nothing known replicated
    log.high_watermark = log.log_end_offset  # as a leader whose ISR is itself sets it
    assert log.offset_for_timestamp(0) == (0, 1000)
    log.close()


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_clean_shutdown_still_walks_the_active_tail(path, caplog, damage):
    """After a clean close the batches past the last index entry are walked (and CRC-checked) on
    open, so damage there is repaired like after a crash."""
    log = open_log(path, segment_bytes=1 << 16, index_interval_bytes=4096)
    stored = fill(log, 20)
    log.close()
    seg = path / file_name(0)
    pos15 = sum(len(s) for s in stored[:15])
    with open(seg, "r+b") as f:
        if damage == "truncate":
            f.truncate(pos15 + len(stored[15]) // 2)
        else:
            f.seek(pos15 + len(stored[15]) - 3)
            f.write(b"\xde\xad\xbe")
    log = open_log(path, segment_bytes=1 << 16, index_interval_bytes=4096)
    assert [b for _, b in read_all(log)] == stored[:15]
    assert len(log.recovery_reports) == 1 and log.recovery_reports[0].position == pos15
    assert "truncated" in caplog.text
    assert log.append(batch(), 0).base_offset == parse_header(stored[14]).next_offset
    log.close()


def test_corrupt_batch_is_never_served(path, caplog):
    """Damage in a trusted (flushed, cleanly closed) segment is caught by the CRC on read."""
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 20)
    assert log.segments[1].base_offset > parse_header(stored[4]).base_offset
    log.close()
    seg = path / file_name(0)  # closed, so recovery trusts it
    data = bytearray(seg.read_bytes())
    pos3 = sum(len(s) for s in stored[:3])
    data[pos3 + 70] ^= 1
    seg.write_bytes(bytes(data))
    log = open_log(path, segment_bytes=1024)
    assert log.recovery_reports == []
    off3 = parse_header(stored[3]).base_offset
    view = log.read(0, 1 << 20)  # the good batches before it are served
    assert bytes(view) == b"".join(stored[:3])
    assert log.corrupt_reason is not None and "CRC" in log.corrupt_reason
    with pytest.raises(CorruptMessageError):
        log.read(off3, 1 << 20)
    assert "corrupt" in caplog.text
    log.close()


# -- failures -----------------------------------------------------------------------------------------


def test_disk_full_at_roll_leaves_the_log_as_it_was(path, monkeypatch):
    log = open_log(path, segment_bytes=1024)
    stored = fill(log, 5)
    before = (log.log_end_offset, log.size_bytes, log.segment_count, sorted(os.listdir(path)))

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    big = batch(1, size=900)
    with monkeypatch.context() as m:
        m.setattr(segment_module.os, "posix_fallocate", no_space)
        with pytest.raises(StorageError, match="No space"):
            log.append(big, 0)
    assert (log.log_end_offset, log.size_bytes, log.segment_count, sorted(os.listdir(path))) == before
    assert [b for _, b in read_all(log)] == stored
    log.append(big, 0)  # space is back
    assert log.segment_count == 2
    log.close()


def test_index_failure_leaves_the_log_as_it_was(path, monkeypatch):
    log = open_log(path)
    stored = fill(log, 3)
    active = log.segments[-1]
    end = active.size_bytes

    def fail(*args, **kwargs):
        raise StorageError("index full")

    with monkeypatch.context() as m:
        m.setattr(type(log.index), "write", fail)
        with pytest.raises(StorageError):
            log.append(batch(2), 0)
    assert log.log_end_offset == 6 and active.size_bytes == end
    tail = active.buffer[end : active.capacity_bytes]
    assert tail.count(0) == len(tail)  # the copied bytes are gone again
    crash(log)
    log = open_log(path)
    assert [b for _, b in read_all(log)] == stored and log.recovery_reports == []
    log.close()


def test_closed_log_refuses_work(path):
    log = open_log(path)
    log.close()
    with pytest.raises(StorageError):
        log.append(batch(), 0)
    with pytest.raises(StorageError):
        log.read(0, 10)


def test_flush_policy_advances_the_recovery_point(path):
    clock = ManualClock()
    log = open_log(path, clock, flush_interval_messages=5)
    log.append(batch(3), 0)
    assert log.recovery_point == 0
    log.append(batch(2), 0)
    assert log.recovery_point == 5
    log.close()
    log = open_log(path, clock, flush_interval_ms=1000)
    log.append(batch(1), 0)
    assert log.recovery_point == 5
    clock.now_ms += 1000
    log.append(batch(1), 0)
    assert log.recovery_point == 7
    log.flush()
    assert log.recovery_point == 7
    log.close()


def test_delete_removes_the_directory(path):
    log = open_log(path)
    fill(log, 3)
    log.delete()
    assert not path.exists() and list(path.parent.iterdir()) == []


def test_config_from_topic_config():
    c = LogConfig.from_topic_config(
        {"segment_bytes": "2048", "retention.ms": "-1", "cleanup_policy": "delete", "min_insync_replicas": "2",
         "message_timestamp_type": "LogAppendTime"}
    )
    assert (c.segment_bytes, c.retention_ms, c.message_timestamp_type) == (2048, -1, "LogAppendTime")
    assert c.index_interval_bytes == 4096
    base = LogConfig(index_map_bytes=8 << 20)
    assert LogConfig.from_topic_config({}, base).index_map_bytes == 8 << 20
    with pytest.raises(InvalidConfigError):
        LogConfig.from_topic_config({"segment_bytes": "big"})
    with pytest.raises(InvalidConfigError):
        LogConfig(segment_bytes=10)
    with pytest.raises(InvalidConfigError):
        LogConfig(message_timestamp_type="Whenever")


# -- properties ---------------------------------------------------------------------------------------

APPEND = st.tuples(
    st.just("append"),
    st.integers(1, 3),  # batches in the payload
    st.integers(1, 4),  # records per batch
    st.integers(0, 300),  # value bytes
    st.integers(-5, 5000),  # timestamp
)
OPS = st.lists(
    st.one_of(
        APPEND, APPEND, APPEND,
        st.just(("roll",)), st.just(("flush",)), st.just(("reopen_clean",)), st.just(("reopen_crash",)),
    ),
    min_size=4,
    max_size=30,
)
# (kind, which file, byte position, xor mask)
DAMAGE = st.tuples(
    st.sampled_from(["truncate", "garble", "none"]), st.integers(0, 1000), st.integers(0, 1 << 16),
    st.integers(1, 255),
).map(lambda d: None if d[0] == "none" else d)
CONFIGS = st.fixed_dictionaries(
    {"segment_bytes": st.sampled_from([1024, 4096]), "index_interval_bytes": st.sampled_from([0, 200, 4096])}
)
PROPERTY_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


def layout(directory: Path) -> list[tuple[int, int, int, int]]:
    """(file base offset, position, size, batch base offset) of each batch in the segment files."""
    out = []
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".log"):
            continue
        base = int(name[:-4])
        data = (directory / name).read_bytes()
        pos = 0
        while len(data) - pos >= HEADER_SIZE and data[pos : pos + HEADER_SIZE] != bytes(HEADER_SIZE):
            h = parse_header(data, pos)
            out.append((base, pos, h.size_bytes, h.base_offset))
            pos += h.size_bytes
    return out


@PROPERTY_SETTINGS
@given(config=CONFIGS, ops=OPS, damage=DAMAGE, index_loss=st.sampled_from(["keep", "rp_zero", "delete"]))
def test_property_append_read_recover(tmp_path_factory, config, ops, damage, index_loss):
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        directory = Path(tmp) / "t-0"
        clock = ManualClock()
        cfg = {**config, "max_message_bytes": 1 << 20}
        log = open_log(directory, clock, **cfg)
        model: dict[int, bytes] = {}  # base offset -> stored bytes, for every append that returned
        epoch = 0
        for op in ops:
            if op[0] == "append":
                _, nb, nr, size, ts = op
                raws = [encode_batch([(ts + j, None, bytes([k % 256]) * size, None) for j in range(nr)])
                        for k in range(nb)]
                r = log.append(b"".join(raws), epoch)
                off = r.base_offset
                for raw in raws:
                    model[off] = stamp(raw, off, epoch)
                    off += nr
                assert r.last_offset == off - 1 == log.log_end_offset - 1
                epoch += ts % 2
                clock.now_ms += 7
            elif op[0] == "roll":
                log.roll()
            elif op[0] == "flush":
                log.flush()
            else:
                if op[0] == "reopen_clean":
                    log.close()
                else:
                    crash(log)
                log = open_log(directory, clock, **cfg)
                assert log.recovery_reports == []
            log.high_watermark = log.log_end_offset
            assert {h.base_offset: b for h, b in read_all(log)} == model
        model_end = log.log_end_offset
        recovery_point = log.recovery_point
        crash(log)

        # damage one segment file at a byte position; only segments recovery will scan are fair game
        before = layout(directory)
        assert [b[3] for b in before] == sorted(model)
        damaged: tuple[int, int] | None = None  # (file base offset, byte position)
        if index_loss == "rp_zero":
            forget_recovery_point(directory)
        elif index_loss == "delete":
            shutil.rmtree(directory / INDEX_DIR)
        files = sorted(int(n[:-4]) for n in os.listdir(directory) if n.endswith(".log"))
        first_scanned = 0 if index_loss != "keep" else max(b for b in files if b <= recovery_point)
        candidates = [b for b in files if b >= first_scanned]
        if damage is not None:
            target = candidates[damage[1] % len(candidates)]
            fpath = directory / file_name(target)
            fsize = os.path.getsize(fpath)
            data_end = max([b[1] + b[2] for b in before if b[0] == target], default=0)
            # mostly inside the data or just past it; sometimes anywhere in the preallocated tail
            span = fsize if damage[2] >= 60_000 else min(fsize, data_end + HEADER_SIZE + 20)
            if damage[0] == "truncate":
                pos = damage[2] % (span + 1)
                os.truncate(fpath, pos)
            elif span:
                pos = damage[2] % span
                with open(fpath, "r+b") as f:
                    f.seek(pos)
                    old = f.read(1)[0]
                    f.seek(pos)
                    f.write(bytes([old ^ damage[3]]))
            else:
                pos = 0
            damaged = (target, pos)

        log = open_log(directory, clock, **cfg)
        log.high_watermark = log.log_end_offset
        got = read_all(log)

        # offsets strictly increase with no gaps, from the start to the end of the log
        expected = log.log_start_offset
        for h, data in got:
            assert h.base_offset == expected
            expected = h.next_offset
            assert batch_crc_ok(data, 0, len(data))  # a corrupt batch is never returned
        assert expected == log.log_end_offset <= model_end

        def hit(b: tuple[int, int, int, int]) -> bool:  # does the damage touch this batch?
            if damaged is None:
                return False
            fbase, pos = damaged
            if damage is not None and damage[0] == "truncate":
                return fbase == b[0] and pos < b[1] + b[2]
            return fbase == b[0] and b[1] <= pos < b[1] + b[2]

        def precedes(b: tuple[int, int, int, int]) -> bool:
            return damaged is None or b[0] < damaged[0] or (b[0] == damaged[0] and b[1] + b[2] <= damaged[1])

        got_by_offset = {h.base_offset: data for h, data in got}
        for b in before:
            if precedes(b):  # every batch before the damage is read back byte-identical at its offset
                assert got_by_offset.get(b[3]) == model[b[3]], b
            elif b[3] in got_by_offset and hit(b):
                # damage the recovery walk cannot see: only the leader epoch (outside the CRC)
                diff = [i for i, (x, y) in enumerate(zip(got_by_offset[b[3]], model[b[3]], strict=True)) if x != y]
                assert all(12 <= i < 16 for i in diff), diff
            elif b[3] in got_by_offset:
                assert got_by_offset[b[3]] == model[b[3]], b
        lost = [b for b in before if b[3] not in got_by_offset]
        event(f"damage={damage[0] if damage else None} index={index_loss}")
        event(f"batches lost: {'some' if lost else 'none'}; reports: {len(log.recovery_reports)}")
        event(f"segment files before damage: {min(len(files), 4)}+")
        if lost and damage is not None and damage[0] == "garble":
            assert log.recovery_reports, "data was cut without a report"
        if damage is None:
            assert log.recovery_reports == [] and len(got) == len(model)

        # the recovered log takes appends and survives a clean restart unchanged
        r = log.append(batch(2), epoch + 1)
        assert r.base_offset == expected
        log.high_watermark = log.log_end_offset
        after = read_all(log)
        log.close()
        log = open_log(directory, clock, **cfg)
        assert log.recovery_reports == []
        assert read_all(log) == after
        log.close()


@PROPERTY_SETTINGS
@given(
    sizes=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 200)), min_size=1, max_size=40),
    probes=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 3000)), min_size=1, max_size=20),
    interval=st.sampled_from([0, 100, 4096]),
)
def test_property_read_contract(tmp_path_factory, sizes, probes, interval):
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        log = open_log(Path(tmp) / "t-0", segment_bytes=2048, index_interval_bytes=interval)
        spans = []  # (base, next, size)
        for n, size in sizes:
            r = log.append(batch(n, size=size), 0)
            spans.append((r.base_offset, r.last_offset + 1, len(batch(n, size=size))))
        log.high_watermark = log.log_end_offset
        seg_of = {}
        for seg in log.segments:
            for h, _ in iter_batches(seg.view(0, seg.size_bytes)):
                seg_of[h.base_offset] = seg.base_offset
        for raw_offset, max_bytes in probes:
            offset = raw_offset % (log.log_end_offset + 1)
            view = log.read(offset, max_bytes)
            if offset == log.log_end_offset:
                assert view.nbytes == 0
                continue
            headers = [h for h, _ in iter_batches(view)]
            assert headers, offset
            assert headers[0].base_offset <= offset < headers[0].next_offset  # starts with its batch
            assert view.nbytes <= max_bytes or len(headers) == 1
            assert sum(h.size_bytes for h in headers) == view.nbytes  # whole batches only
            assert len({seg_of[h.base_offset] for h in headers}) == 1  # from one segment
            nxt = [s for s in spans if s[0] == headers[-1].next_offset]
            if nxt and seg_of[nxt[0][0]] == seg_of[headers[0].base_offset]:
                assert view.nbytes + nxt[0][2] > max_bytes  # stopped only because it was full
        log.close()


# -- high watermark checkpoint ------------------------------------------------------------------------


def offsets_readable(log: Log) -> int:
    """The offset a consumer read (bounded by the high watermark) gets to."""
    offset = log.log_start_offset
    while True:
        view = log.read(offset, 1 << 20)
        if not view.nbytes:
            return offset
        for h, _pos in iter_batches(view):
            offset = h.next_offset


def test_reopened_log_starts_from_its_checkpointed_high_watermark_not_its_end(path):
    log = open_log(path)
    stored = fill(log, 10)
    leo = log.log_end_offset
    hw = parse_header(stored[2], 0).next_offset  # a batch boundary
    log.high_watermark = hw
    log.close()
    log = open_log(path)
    assert (log.log_end_offset, log.high_watermark) == (leo, hw)
    assert offsets_readable(log) == hw < leo  # what was never known replicated stays unexposed
    log.close()


def test_high_watermark_after_a_crash_is_the_last_checkpoint_written(path):
    log = open_log(path)
    fill(log, 10)
    log.high_watermark = 3
    log.flush()  # written with the recovery point
    log.high_watermark = 6  # a move alone writes nothing
    crash(log)
    log = open_log(path)
    assert log.high_watermark == 3
    log.high_watermark = 7
    assert log.checkpoint_high_watermark() is True  # the periodic checkpoint
    assert log.checkpoint_high_watermark() is False  # unchanged: no write
    crash(log)
    log = open_log(path)
    assert log.high_watermark == 7
    log.close()


def test_checkpointed_high_watermark_is_capped_by_what_recovery_keeps(path):
    log = open_log(path)
    stored = fill(log, 10)
    log.high_watermark = log.log_end_offset
    log.flush()
    end = log.segments[-1].size_bytes
    crash(log)
    with open(path / file_name(0), "r+b") as f:
        f.truncate(end - 5)  # the last batch torn
    log = open_log(path)
    assert log.log_end_offset == parse_header(stored[-2], 0).next_offset
    assert log.high_watermark == log.log_end_offset
    log.close()


# -- segment size and preallocation at reopen ---------------------------------------------------------


def test_reopened_log_preallocates_its_active_segment_by_its_config(path):
    log = open_log(path, segment_bytes=8192)
    fill(log, 3)
    log.close()
    log = open_log(path, segment_bytes=16384)
    assert log.segments[-1].capacity_bytes == 16384
    assert os.stat(path / file_name(0)).st_size == 16384
    log.close()
    # a caller that does not know the topic's config yet (cluster mode, before its LeaderAndIsr):
    # the size checkpointed when the log was last open, not the default 128 MiB
    log = Log.open(path, LogConfig(index_map_bytes=SMALL["index_map_bytes"]), ManualClock(),
                   segment_bytes_from_checkpoint=True)
    assert log.config.segment_bytes == 16384
    assert log.segments[-1].capacity_bytes == 16384
    log.close()


def no_space(fd: int, offset: int, length: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_active_segment_that_cannot_be_preallocated_opens_read_only(path, monkeypatch):
    clock = ManualClock()
    log = open_log(path, clock)
    stored = fill(log, 5)
    leo = log.log_end_offset
    log.high_watermark = leo
    log.close()
    with monkeypatch.context() as m:
        m.setattr(segment_module.os, "posix_fallocate", no_space)
        log = open_log(path, clock)
        assert log.read_only_reason is not None and "No space" in log.read_only_reason
        assert os.stat(path / file_name(0)).st_size == sum(len(b) for b in stored)
        assert [b for _, b in read_all(log)] == stored  # served read-only
        assert offsets_readable(log) == leo
        with pytest.raises(StorageError, match="read-only"):
            log.append(batch(), 0)
        clock.now_ms += PREALLOCATE_RETRY_INTERVAL_MS
        with pytest.raises(StorageError, match="No space"):  # retried, still full
            log.append(batch(), 0)
        assert log.enforce_retention() == 0  # retention (which frees space) still runs
        log.assign_epoch_start(0, leo)  # index-only bookkeeping too
    assert log.log_end_offset == leo
    with pytest.raises(StorageError, match="read-only"):  # space is back, but the retry is not due yet
        log.append(batch(), 0)
    clock.now_ms += PREALLOCATE_RETRY_INTERVAL_MS
    assert log.append(batch(), 0).base_offset == leo
    assert log.read_only_reason is None
    log.close()
    log = open_log(path, clock)
    assert log.read_only_reason is None and log.log_end_offset == leo + 1
    log.close()


def test_read_only_log_closes_cleanly_and_keeps_its_data(path, monkeypatch):
    log = open_log(path)
    stored = fill(log, 4)
    crash(log)  # a crash, then a restart on a full disk
    with monkeypatch.context() as m:
        m.setattr(segment_module.os, "posix_fallocate", no_space)
        log = open_log(path)
        assert log.read_only_reason is not None
        log.close()
    assert (path / CLEAN_SHUTDOWN_FILE).exists()
    log = open_log(path)
    assert log.read_only_reason is None
    assert [b for _, b in read_all(log)] == stored
    log.close()


def test_compacted_log_refuses_keyless_records_and_other_logs_take_them(tmp_path: Path) -> None:
    from logbroker.errors import InvalidRecordError

    compacted = open_log(tmp_path / "c", cleanup_policy="compact")
    with pytest.raises(InvalidRecordError, match="has no key"):
        compacted.append(batch(1, key=b"k") + batch(2), 0)  # one keyless batch refuses the whole payload
    assert compacted.log_end_offset == 0
    assert compacted.append(batch(2, key=b"k"), 0).last_offset == 1
    plain = open_log(tmp_path / "d")
    assert plain.append(batch(2), 0).last_offset == 1


def _with_codec(data: bytes, codec: int) -> bytes:
    """`data` (one uncompressed batch) relabelled as compressed with `codec`, CRC recomputed."""
    import struct

    from logbroker.storage.record_batch import CRC_START, crc32c

    out = bytearray(data)
    attributes = struct.unpack_from(">h", out, 21)[0]
    struct.pack_into(">h", out, 21, attributes | codec)
    struct.pack_into(">I", out, 17, crc32c(memoryview(out)[CRC_START:]))
    return bytes(out)


@pytest.mark.parametrize("codec", [2, 3, 4])  # snappy, lz4, zstd
def test_compacted_log_refuses_codecs_it_cannot_read(tmp_path: Path, codec: int) -> None:
    from logbroker.errors import UnsupportedCompressionTypeError, error_for
    from logbroker.v1 import logbroker_pb2 as pb

    compacted = open_log(tmp_path / "c", cleanup_policy="compact")
    unreadable = _with_codec(batch(2, key=b"k"), codec)
    with pytest.raises(UnsupportedCompressionTypeError, match=f"codec {codec}"):
        compacted.append(batch(1, key=b"k") + unreadable, 0)  # the whole payload is refused
    assert compacted.log_end_offset == 0 and compacted.size_bytes == 0
    assert compacted.append(batch(2, key=b"k"), 0).last_offset == 1
    plain = open_log(tmp_path / "d")  # other topics never read records: they take it as it is
    assert plain.append(unreadable, 0).last_offset == 1
    assert pb.UNSUPPORTED_COMPRESSION_TYPE == 76
    assert isinstance(error_for(76, "x"), UnsupportedCompressionTypeError)
    compacted.close()
    plain.close()
