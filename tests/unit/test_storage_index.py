"""PartitionIndex: the LMDB layout of one partition's offset, time, epoch and checkpoint records."""

from __future__ import annotations

import pytest

from logbroker.errors import StorageError
from logbroker.storage.index import META_LOG_START_OFFSET, META_RECOVERY_POINT, PartitionIndex

MAP_BYTES = 8 << 20


@pytest.fixture
def index(tmp_path):
    idx, rebuilt = PartitionIndex.open(tmp_path / "index.lmdb", MAP_BYTES)
    assert rebuilt  # a new environment has nothing in it: the caller must build every entry
    yield idx
    idx.close()


def test_reopen_is_not_a_rebuild(tmp_path):
    idx, _ = PartitionIndex.open(tmp_path / "i", MAP_BYTES)
    idx.write(offsets=[(0, 0, 0)], meta={META_RECOVERY_POINT: 7})
    idx.close()
    idx, rebuilt = PartitionIndex.open(tmp_path / "i", MAP_BYTES)
    assert not rebuilt
    assert idx.meta(META_RECOVERY_POINT) == 7
    assert idx.meta(META_LOG_START_OFFSET) is None
    idx.close()


def test_floor_offset(index):
    index.write(offsets=[(0, 0, 0), (10, 0, 4096), (25, 25, 0), (40, 25, 5000)])
    assert index.floor_offset(0) == (0, 0, 0)
    assert index.floor_offset(9) == (0, 0, 0)
    assert index.floor_offset(10) == (10, 0, 4096)
    assert index.floor_offset(24) == (10, 0, 4096)
    assert index.floor_offset(39) == (25, 25, 0)
    assert index.floor_offset(10**12) == (40, 25, 5000)


def test_floor_offset_below_everything_and_empty(index):
    assert index.floor_offset(5) is None
    index.write(offsets=[(100, 100, 0)])
    assert index.floor_offset(99) is None
    assert index.floor_offset(100) == (100, 100, 0)


def test_time_entries_are_per_segment_and_sort_negative_timestamps(index):
    index.write(times=[(0, -5, 0), (0, 1000, 3), (0, 2000, 9), (50, 1500, 50), (50, 3000, 70)])
    assert index.segment_max_timestamp(0) == (2000, 9)
    assert index.segment_max_timestamp(50) == (3000, 70)
    assert index.segment_max_timestamp(20) is None
    assert index.time_floor(0, 1000) == (-5, 0)  # strictly below the target
    assert index.time_floor(0, 1001) == (1000, 3)
    assert index.time_floor(0, -5) is None
    assert index.time_floor(50, 1500) is None  # does not leak into segment 0
    assert index.time_floor(50, 10**15) == (3000, 70)


def test_truncate_from(index):
    index.write(
        offsets=[(0, 0, 0), (5, 0, 100), (10, 10, 0), (15, 10, 200)],
        times=[(0, 10, 0), (0, 20, 5), (10, 30, 10), (10, 40, 15)],
        epochs=[(0, 0), (3, 12)],
    )
    index.truncate_from(15, 10, [(0, 0)], {META_RECOVERY_POINT: 15})
    assert index.offset_entries() == [(0, 0, 0), (5, 0, 100), (10, 10, 0)]
    assert index.time_entries() == [(0, 10, 0), (0, 20, 5), (10, 30, 10)]
    assert index.epochs() == [(0, 0)]
    assert index.meta(META_RECOVERY_POINT) == 15
    index.truncate_from(5, 0, [], {})
    assert index.offset_entries() == [(0, 0, 0)]
    assert index.time_entries() == [(0, 10, 0)]


def test_delete_before(index):
    index.write(
        offsets=[(0, 0, 0), (5, 0, 100), (10, 10, 0), (15, 10, 200)],
        times=[(0, 10, 0), (10, 30, 10)],
        epochs=[(1, 0), (2, 7)],
    )
    index.delete_before(10, [(2, 10)], {META_LOG_START_OFFSET: 10})
    assert index.offset_entries() == [(10, 10, 0), (15, 10, 200)]
    assert index.time_entries() == [(10, 30, 10)]
    assert index.epochs() == [(2, 10)]
    assert index.meta(META_LOG_START_OFFSET) == 10


def test_full_map_raises_storage_error_and_writes_nothing(tmp_path):
    idx, _ = PartitionIndex.open(tmp_path / "small", 1 << 20)
    with pytest.raises(StorageError, match="index_map_bytes"):
        idx.write(offsets=[(i, 0, i) for i in range(100_000)])
    assert idx.entry_counts()["offset"] == 0
    idx.write(offsets=[(1, 0, 0)])  # still usable afterwards
    assert idx.floor_offset(5) == (1, 0, 0)
    idx.close()


def test_unreadable_environment_is_replaced(tmp_path):
    path = tmp_path / "bad"
    path.mkdir()
    (path / "data.mdb").write_bytes(b"this is not an lmdb file" * 500)
    idx, rebuilt = PartitionIndex.open(path, MAP_BYTES)
    assert rebuilt
    idx.write(offsets=[(0, 0, 0)])
    assert idx.floor_offset(3) == (0, 0, 0)
    idx.close()
