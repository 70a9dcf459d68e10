"""Log: producer state snapshots at segment roll (storage/log.py with producer_snapshot.py). The
scan bound of an open without a snapshot (PRODUCER_STATE_SCAN_BYTES) is set to one byte here, so
only the active segment is scanned: what survives a reopen beyond it survives by a snapshot."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from logbroker.storage import log as log_module
from logbroker.storage import producer_snapshot as ps
from logbroker.storage.log import Log, LogConfig
from logbroker.storage.record_batch import BatchBuilder

CONFIG = LogConfig(segment_bytes=4096, index_interval_bytes=256, index_map_bytes=4 << 20)


@pytest.fixture(autouse=True)
def tiny_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_module, "PRODUCER_STATE_SCAN_BYTES", 1)


class Clock:
    def __init__(self) -> None:
        self.now_ms = 10_000_000

    def __call__(self) -> int:
        return self.now_ms


def pbatch(pid: int, epoch: int, seq: int, n: int = 2, ts: int = 1000) -> bytes:
    b = BatchBuilder(ts)
    for i in range(n):
        b.append(ts + i, None, b"v%d" % (seq + i), None)
    return b.build(pid, epoch, seq)


def plain(n: int = 2) -> bytes:
    return pbatch(-1, -1, -1, n)


def test_an_idle_producer_survives_a_reopen_past_the_scan_bound_by_the_snapshot(tmp_path: Path) -> None:
    d = tmp_path / "t-0"
    log = Log.open(d, CONFIG)
    first = log.append(pbatch(5, 0, 0), 0)
    for _ in range(4):  # the producer goes idle while other writers roll the log past its batch
        log.append(plain(), 0)
        log.roll()
    log.append(plain(), 0)
    bases = [s.base_offset for s in log.segments]
    assert len(bases) == 5
    assert ps.list_snapshots(d) == bases[-2:]  # the newest two are kept
    log.close()
    log = Log.open(d, CONFIG)
    end = log.log_end_offset
    again = log.append(pbatch(5, 0, 0), 0)
    assert again.duplicate and (again.base_offset, again.last_offset) == (first.base_offset, first.last_offset)
    assert log.log_end_offset == end
    log.close()
    ps.delete_snapshots(d, ps.list_snapshots(d))  # without the snapshots, the scan alone forgets it
    log = Log.open(d, CONFIG)
    assert log.producers.entry(5) is None
    log.close()


def test_batches_after_the_snapshot_are_replayed(tmp_path: Path) -> None:
    d = tmp_path / "t-0"
    log = Log.open(d, CONFIG)
    log.append(pbatch(5, 0, 0), 0)
    log.roll()  # snapshot at 2
    second = log.append(pbatch(5, 0, 2), 0)
    log.append(pbatch(6, 0, 0), 0)
    log.roll()  # snapshot at 6
    log.append(plain(), 0)
    log._abandon()  # a crash
    ps.delete_snapshots(d, [6])
    log = Log.open(d, CONFIG)
    assert log.append(pbatch(5, 0, 0), 0).duplicate  # from the snapshot at 2
    dup = log.append(pbatch(5, 0, 2), 0)  # replayed from 2 on
    assert dup.duplicate and dup.base_offset == second.base_offset
    assert log.append(pbatch(6, 0, 0), 0).duplicate
    log.close()


def test_a_corrupt_snapshot_is_skipped_with_one_warning_then_the_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d = tmp_path / "t-0"
    log = Log.open(d, CONFIG)
    log.append(pbatch(5, 0, 0), 0)
    log.roll()  # snapshot at 2
    log.append(pbatch(5, 0, 2), 0)
    log.roll()  # snapshot at 4
    log.append(plain(), 0)
    log.close()
    newest = d / ps.file_name(4)
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0xFF
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="logbroker.storage.log"):
        log = Log.open(d, CONFIG)
    warnings = [r for r in caplog.records if "producer snapshot" in r.getMessage()]
    assert len(warnings) == 1 and "CRC" in warnings[0].getMessage()
    assert log.append(pbatch(5, 0, 0), 0).duplicate  # the older snapshot, and the batch after it replayed
    assert log.append(pbatch(5, 0, 2), 0).duplicate
    assert ps.list_snapshots(d) == [2]  # the corrupt one is gone
    log.close()
    (d / ps.file_name(2)).write_bytes((d / ps.file_name(2)).read_bytes()[:30])  # torn
    log = Log.open(d, CONFIG)  # no valid snapshot left: the (bounded) scan of the active segment
    assert log.producers.entry(5) is None and ps.list_snapshots(d) == []
    log.close()


def test_truncation_deletes_the_snapshots_past_its_point(tmp_path: Path) -> None:
    d = tmp_path / "t-0"
    log = Log.open(d, CONFIG)
    log.append(pbatch(5, 0, 0), 0)
    log.roll()  # snapshot at 2
    log.append(pbatch(5, 0, 2), 0)
    log.roll()  # snapshot at 4
    log.append(pbatch(5, 0, 4), 0)
    log.truncate_to(3)  # a follower's truncation: the batch 2..3 goes whole
    assert log.log_end_offset == 2 and ps.list_snapshots(d) == [2]
    rewritten = log.append(pbatch(5, 0, 2, n=3), 0)  # a different batch at the same sequence
    assert not rewritten.duplicate
    log.roll()  # snapshot at 5
    log.close()
    log = Log.open(d, CONFIG)
    entry = log.producers.entry(5)
    assert entry is not None  # from the snapshot at 5: the rewritten batch, not the truncated one
    assert [(b.first_sequence, b.last_sequence, b.first_offset) for b in entry.batches] == [(0, 1, 0), (2, 4, 2)]
    dup = log.append(pbatch(5, 0, 2, n=3), 0)
    assert dup.duplicate and dup.base_offset == rewritten.base_offset
    log.truncate_fully_and_start_at(100)
    assert ps.list_snapshots(d) == []
    log.close()


def test_retention_deletes_the_snapshots_below_the_first_segment(tmp_path: Path) -> None:
    d = tmp_path / "t-0"
    log = Log.open(d, CONFIG)
    log.append(pbatch(5, 0, 0), 0)
    log.roll()  # snapshot at 2
    log.append(pbatch(5, 0, 2), 0)
    log.roll()  # snapshot at 4
    log.append(plain(), 0)
    log.high_watermark = log.log_end_offset
    assert log.advance_log_start_offset(3) == 1  # the segment at 0 goes
    assert ps.list_snapshots(d) == [2, 4]
    assert log.advance_log_start_offset(4) == 1  # the segment at 2 goes
    assert ps.list_snapshots(d) == [4]
    log.close()


def test_a_snapshot_past_the_log_end_is_deleted_and_ignored(tmp_path: Path) -> None:
    d = tmp_path / "t-0"
    log = Log.open(d, CONFIG)
    log.append(pbatch(5, 0, 0), 0)
    log.append(plain(), 0)
    bogus = log.producers
    log.close()
    ps.write_snapshot(d, 1000, bogus)  # as if a crash lost the log's tail after the roll at 1000
    log = Log.open(d, CONFIG)
    assert ps.list_snapshots(d) == []
    assert log.append(pbatch(5, 0, 0), 0).duplicate  # the scan of the (only) segment
    log.close()


def test_producers_from_a_snapshot_expire_on_load(tmp_path: Path) -> None:
    clock = Clock()
    config = LogConfig(segment_bytes=4096, index_map_bytes=4 << 20, producer_id_expiration_ms=1000)
    d = tmp_path / "t-0"
    log = Log.open(d, config, now_ms=clock)
    log.append(pbatch(5, 0, 0), 0)
    clock.now_ms += 500
    log.append(pbatch(6, 0, 0), 0)
    log.roll()
    log.append(plain(), 0)
    log.close()
    clock.now_ms += 600  # 5 is now idle for 1100 ms, 6 for 600 ms
    log = Log.open(d, config, now_ms=clock)
    assert log.producers.entry(5) is None and log.producers.entry(6) is not None
    log.close()


def test_no_snapshot_without_producers(tmp_path: Path) -> None:
    d = tmp_path / "t-0"
    log = Log.open(d, CONFIG)
    log.append(plain(), 0)
    log.roll()
    assert ps.list_snapshots(d) == []
    log.close()
