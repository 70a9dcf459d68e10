"""The pure compaction decisions (storage/compaction.py): which range to clean, which records stay."""

from __future__ import annotations

import pytest

from logbroker.storage.compaction import (
    NO_LAG_LIMIT,
    CompactionSettings,
    OffsetMap,
    SegmentInfo,
    deletes_by_retention,
    is_compacted,
    keep_record,
    plan_clean,
    plan_prefix_for_map,
    tombstone_expired,
)

NOW = 1_000_000_000


def segs(*specs: tuple[int, int, int]) -> list[SegmentInfo]:
    return [SegmentInfo(b, s, t) for b, s, t in specs]


LOG = segs((0, 100, NOW - 5000), (10, 100, NOW - 4000), (20, 100, NOW - 3000), (30, 50, NOW))  # last: active


def plan(first_dirty: int = 0, hw: int = 30, **kw: int | float) -> object:
    return plan_clean(LOG, first_dirty, now_ms=NOW, high_watermark=hw, settings=CompactionSettings(**kw))  # type: ignore[arg-type]


def test_policy_parts() -> None:
    assert is_compacted("compact") and not deletes_by_retention("compact")
    assert is_compacted("compact,delete") and deletes_by_retention("delete, compact")
    assert not is_compacted("delete")


def test_whole_closed_prefix_is_cleaned_never_the_active_segment() -> None:
    p = plan()
    assert p is not None
    assert (p.segment_count, p.first_dirty_offset, p.end_offset, p.forced) == (3, 0, 30, False)
    assert p.dirty_ratio == 1.0


def test_high_watermark_bounds_the_range() -> None:
    p = plan(hw=25)  # segment 20 holds offsets up to 29 >= hw: not cleanable
    assert p is not None and (p.segment_count, p.end_offset) == (2, 20)
    assert plan(hw=9) is None


def test_min_compaction_lag_stops_at_the_first_recent_segment() -> None:
    p = plan(min_compaction_lag_ms=3500)  # segment 20 (3000 ms old) is too recent
    assert p is not None and p.end_offset == 20
    assert plan(min_compaction_lag_ms=10_000) is None


def test_dirty_ratio_threshold() -> None:
    # clean part [0, 20): 200 bytes; dirty part: segment 20, 100 bytes -> ratio 1/3
    assert plan(first_dirty=20, min_cleanable_dirty_ratio=0.5) is None
    p = plan(first_dirty=20, min_cleanable_dirty_ratio=0.3)
    assert p is not None and abs(p.dirty_ratio - 1 / 3) < 1e-9 and p.first_dirty_offset == 20
    # first dirty offset in the middle of a segment: that whole segment is dirty
    p = plan(first_dirty=15, min_cleanable_dirty_ratio=0.6)
    assert p is not None and abs(p.dirty_ratio - 2 / 3) < 1e-9


def test_nothing_dirty_nothing_to_do() -> None:
    assert plan(first_dirty=30) is None
    assert plan(first_dirty=31) is None


def test_max_compaction_lag_forces_a_clean_below_the_ratio() -> None:
    assert plan(first_dirty=20, min_cleanable_dirty_ratio=0.9, max_compaction_lag_ms=NO_LAG_LIMIT) is None
    p = plan(first_dirty=20, min_cleanable_dirty_ratio=0.9, max_compaction_lag_ms=2000)
    assert p is not None and p.forced
    assert plan(first_dirty=20, min_cleanable_dirty_ratio=0.9, max_compaction_lag_ms=3500) is None


def test_only_an_active_segment() -> None:
    one = segs((0, 10, NOW))
    assert plan_clean(one, 0, now_ms=NOW, high_watermark=5, settings=CompactionSettings()) is None


def test_plan_prefix_for_map() -> None:
    p = plan()
    assert p is not None
    cut = plan_prefix_for_map(p, LOG, 2)
    assert cut is not None and (cut.segment_count, cut.end_offset) == (2, 20)
    assert plan_prefix_for_map(p, LOG, 3) == p
    assert plan_prefix_for_map(p, LOG, 0) is None


def test_offset_map_latest_and_bound() -> None:
    m = OffsetMap(capacity_entries=2)
    assert m.put(b"a", 1) and m.put(b"b", 2) and m.put(b"a", 5)
    assert not m.put(b"c", 6)  # full: a new key is refused, nothing changes
    assert (m.latest(b"a"), m.latest(b"b"), m.latest(b"c"), len(m), m.max_offset) == (5, 2, None, 2, 5)
    assert m.put(b"a", 3) and m.latest(b"a") == 5  # an older offset never replaces a newer one
    with pytest.raises(ValueError):
        OffsetMap(0)


def test_keep_record_latest_per_key() -> None:
    m = OffsetMap()
    for off, key in enumerate([b"k1", b"k2", b"k1", b"k1"]):
        m.put(key, off)
    kept = [off for off, key in enumerate([b"k1", b"k2", b"k1", b"k1"]) if keep_record(key, off, False, m, False)]
    assert kept == [1, 3]
    assert keep_record(None, 0, False, m, True)  # no key: kept
    assert keep_record(b"new", 9, False, m, False)  # past the map: kept


def test_tombstones_kept_until_delete_retention() -> None:
    m = OffsetMap()
    m.put(b"k", 4)
    assert keep_record(b"k", 4, True, m, tombstones_expired=False)
    assert not keep_record(b"k", 4, True, m, tombstones_expired=True)
    assert not keep_record(b"k", 3, False, m, tombstones_expired=False)  # shadowed by the tombstone
    day = 24 * 3600 * 1000
    assert not tombstone_expired(NOW - day + 1, NOW, day)
    assert tombstone_expired(NOW - day, NOW, day)


def test_topic_configs_parsed_and_bounded() -> None:
    from logbroker.cluster.metadata import normalize_topic_config
    from logbroker.errors import InvalidConfigError
    from logbroker.storage.log_config import LogConfig

    out = normalize_topic_config({"cleanup.policy": "compact,delete", "min.cleanable.dirty.ratio": "0.1",
                                  "delete_retention_ms": "5"})
    cfg = LogConfig.from_topic_config(out)
    assert cfg.cleanup_policy == "compact,delete" and cfg.min_cleanable_dirty_ratio == 0.1
    assert cfg.compaction == CompactionSettings(0.1, 0, NO_LAG_LIMIT, 5)
    assert LogConfig().compaction == CompactionSettings()  # Kafka's defaults
    for bad in ({"min_cleanable_dirty_ratio": "1.5"}, {"min_cleanable_dirty_ratio": "x"},
                {"cleanup_policy": "shred"}, {"max_compaction_lag_ms": "0"}, {"delete_retention_ms": "-1"}):
        with pytest.raises(InvalidConfigError):
            normalize_topic_config(bad)
        with pytest.raises(InvalidConfigError):
            LogConfig.from_topic_config(bad)
