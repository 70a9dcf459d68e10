"""Compaction of a live log on disk (storage/log_cleaner.py, segment_cleaner.py), and crash
recovery at each step of the swap (a hook raises between steps, then the log is reopened)."""

from __future__ import annotations

from pathlib import Path

import pytest

from logbroker.storage.log import Log
from logbroker.storage.log_cleaner import clean_log
from logbroker.storage.log_config import LogConfig
from logbroker.storage.record_batch import decode_batch, encode_batch, iter_batches
from logbroker.storage.segment_cleaner import STEPS

NOW = 10_000_000
CFG = dict(segment_bytes=4096, index_interval_bytes=256, index_map_bytes=4 << 20, cleanup_policy="compact",
           min_cleanable_dirty_ratio=0.0, delete_retention_ms=0)


class Clock:
    def __call__(self) -> int:
        return NOW


def open_log(path: Path) -> Log:
    return Log.open(path, LogConfig(**CFG), Clock())  # type: ignore[arg-type]


def fill(log: Log, updates: int, keys: int) -> dict[bytes, bytes | None]:
    latest: dict[bytes, bytes | None] = {}
    for i in range(0, updates, 4):
        recs = []
        for j in range(i, min(i + 4, updates)):
            k = b"k%d" % (j % keys)
            v = None if j % 37 == 0 else b"v%d" % j
            latest[k] = v
            recs.append((1000 + j, k, v, None))
        log.append(encode_batch(recs), 0)
    log.high_watermark = log.log_end_offset
    return latest


def records(log: Log) -> list[tuple[int, bytes | None, bytes | None]]:
    out = []
    for seg in log.segments:
        buf = bytes(seg.view(0, seg.size_bytes))
        for h, pos in iter_batches(buf):
            out += [(m.offset, m.key, m.value) for m in decode_batch(buf, pos, h, "t", 0)]
    return out


def check(log: Log, latest: dict[bytes, bytes | None], cleaned: bool) -> None:
    recs = records(log)
    offsets = [o for o, _, _ in recs]
    assert offsets == sorted(set(offsets))  # strictly increasing (decode_batch checked every CRC)
    final = {k: v for _, k, v in recs}
    # the latest record of every key is there; nothing else of a cleaned key before the active segment
    for k, v in latest.items():
        assert final.get(k) == v or (v is None and k not in final)


def test_clean_keeps_latest_per_key_and_offsets(tmp_path: Path) -> None:
    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)
    before = log.size_bytes
    assert clean_log(log, 0, NOW) is not None
    assert log.size_bytes < before / 5
    check(log, latest, True)
    closed_end = log.segments[-1].base_offset
    keys_below = [k for o, k, _ in records(log) if o < closed_end]
    assert len(keys_below) == len(set(keys_below))  # one record per key in the cleaned part
    # reads through the log (index rebuilt) see the same, from every offset
    assert log.read(0, 1 << 20)
    log.close()
    log = open_log(tmp_path / "t-0")
    check(log, latest, True)
    log.close()


def test_not_cleaned_below_ratio(tmp_path: Path) -> None:
    log = Log.open(tmp_path / "t-0", LogConfig(**{**CFG, "min_cleanable_dirty_ratio": 0.5}), Clock())  # type: ignore[arg-type]
    fill(log, 400, 20)
    end = clean_log(log, 0, NOW)
    assert end is not None
    assert clean_log(log, end, NOW) is None  # nothing dirty
    log.close()


class Crash(Exception):
    pass


@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("clean_close", [False, True])
def test_crash_at_each_step_then_reopen(tmp_path: Path, step: str, clean_close: bool) -> None:
    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)

    def hook(s: str) -> None:
        if s == step:
            raise Crash(s)

    with pytest.raises(Crash):
        clean_log(log, 0, NOW, hook)
    if clean_close:
        log.close()
    else:
        log._abandon()  # a crash: nothing more is written
    log = open_log(tmp_path / "t-0")
    assert not list((tmp_path / "t-0").glob("*.cleaned")) and not list((tmp_path / "t-0").glob("*.swap"))
    check(log, latest, True)
    # the log goes on: clean again, append, read everything
    clean_log(log, 0, NOW)
    check(log, latest, True)
    log.close()


def test_full_recovery_accepts_compaction_gaps(tmp_path: Path) -> None:
    import shutil

    log = open_log(tmp_path / "t-0")
    latest = fill(log, 2000, 20)
    clean_log(log, 0, NOW)
    log._abandon()
    shutil.rmtree(tmp_path / "t-0" / "index.lmdb")  # recovery walks every segment
    log = open_log(tmp_path / "t-0")
    assert not log.recovery_reports
    check(log, latest, True)
    log.close()
