"""Log compaction, the pure decisions (Kafka's LogCleanerManager.cleanableOffsets and the
Cleaner's record filter). No I/O: `segment_cleaner.py` applies them to files.

Which range to clean (`plan_clean`). The segments are oldest first, the last one active:
- the active segment is never cleaned, nor any segment holding an offset at or above the high
  watermark (its successor's base offset must be <= the high watermark), nor any segment whose
  largest record timestamp is within `min_compaction_lag_ms` of now (too recent), nor anything
  after the first such segment: the cleanable segments are a prefix, ending at the first
  uncleanable offset (a segment base);
- the dirty part is the cleanable segments holding an offset >= `first_dirty_offset` (the
  cleaner's checkpoint: everything below it has been cleaned at least once); the clean part is
  the cleanable segments before it;
- the log is cleanable when it has a dirty part and either its dirty ratio
  (dirty bytes / (clean + dirty bytes)) is >= `min_cleanable_dirty_ratio`, or the first dirty
  segment's largest timestamp is older than `now - max_compaction_lag_ms` (forced; Kafka looks at
  the segment's earliest timestamp, we at its largest, which is what the index keeps: a forced
  clean may come up to one segment's time span later than Kafka's).
The whole cleanable prefix is rewritten (clean and dirty parts); the offset map is built over all
of it, so it holds every key's latest offset below the first uncleanable offset.

Which records stay (`keep_record`):
- a record with a key stays iff its offset is the latest of that key in the offset map (a key not
  in the map, which happens only for records at or past the mapped range, stays);
- a record without a key stays (produce refuses them in compacted topics, so only records written
  before the topic became compacted have none; Kafka's cleaner would refuse the whole log);
- a tombstone (null value) that is the latest of its key stays until its segment is older than
  `delete_retention_ms`: it is removed once the segment's last-modified time (the time its last
  batch was appended, which cleaning preserves on the cleaned file) is <= now - delete_retention_ms.
  So a tombstone is in the log for at least `delete_retention_ms` after it was written, and a
  consumer that reads from the beginning to the end within that time sees it (Kafka's guarantee;
  Kafka measures from the time the tombstone's segment was first cleaned, which is later).
- control batches (transaction markers) are kept whole.

Bounds: the offset map holds at most `OffsetMap.capacity_entries` keys (Kafka's dedupe buffer);
`plan_prefix_for_map` trims a plan to the segments whose keys fit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

COMPACT = "compact"
DELETE = "delete"
CLEANUP_POLICIES = ("delete", "compact", "compact,delete", "delete,compact")
OFFSET_MAP_ENTRIES_DEFAULT = 1 << 20  # keys per clean pass (Kafka: 128 MiB of 24-byte entries)
NO_LAG_LIMIT = (1 << 63) - 1  # max_compaction_lag_ms default: never forced


def policy_parts(cleanup_policy: str) -> frozenset[str]:
    """{"compact"}, {"delete"} or both, from "compact", "delete", "compact,delete" (any order)."""
    return frozenset(p.strip() for p in cleanup_policy.split(",") if p.strip())


def is_compacted(cleanup_policy: str) -> bool:
    return COMPACT in policy_parts(cleanup_policy)


def deletes_by_retention(cleanup_policy: str) -> bool:
    return DELETE in policy_parts(cleanup_policy)


class SegmentInfo(NamedTuple):
    """What the plan needs of one segment."""

    base_offset: int
    size_bytes: int
    largest_timestamp_ms: int  # largest record timestamp (or the file's mtime when there is none)


class CleanPlan(NamedTuple):
    """Rewrite segments [0, segment_count): offsets below `end_offset`, the dirty part from
    `first_dirty_offset`."""

    segment_count: int
    first_dirty_offset: int
    end_offset: int
    dirty_ratio: float
    forced: bool


class CompactionSettings(NamedTuple):
    min_cleanable_dirty_ratio: float = 0.5
    min_compaction_lag_ms: int = 0
    max_compaction_lag_ms: int = NO_LAG_LIMIT
    delete_retention_ms: int = 24 * 3600 * 1000


def plan_clean(
    segments: Sequence[SegmentInfo], first_dirty_offset: int, *, now_ms: int, high_watermark: int,
    settings: CompactionSettings,
) -> CleanPlan | None:
    """The clean to do now, or None (see the module doc)."""
    cleanable = 0
    for i in range(len(segments) - 1):
        seg = segments[i]
        if segments[i + 1].base_offset > high_watermark:
            break
        if now_ms - seg.largest_timestamp_ms < settings.min_compaction_lag_ms:
            break
        cleanable += 1
    if cleanable == 0:
        return None
    end_offset = segments[cleanable].base_offset
    if first_dirty_offset >= end_offset:
        return None
    clean_bytes = dirty_bytes = 0
    first_dirty_segment: SegmentInfo | None = None
    for i in range(cleanable):
        seg = segments[i]
        if segments[i + 1].base_offset > first_dirty_offset:
            dirty_bytes += seg.size_bytes
            if first_dirty_segment is None:
                first_dirty_segment = seg
        else:
            clean_bytes += seg.size_bytes
    assert first_dirty_segment is not None
    total = clean_bytes + dirty_bytes
    ratio = dirty_bytes / total if total else 1.0
    lag = settings.max_compaction_lag_ms
    forced = lag < NO_LAG_LIMIT and now_ms - first_dirty_segment.largest_timestamp_ms > lag
    if ratio < settings.min_cleanable_dirty_ratio and not forced:
        return None
    return CleanPlan(cleanable, max(first_dirty_offset, segments[0].base_offset), end_offset, ratio, forced)


def plan_prefix_for_map(plan: CleanPlan, segments: Sequence[SegmentInfo], mapped_segments: int) -> CleanPlan | None:
    """`plan` cut to its first `mapped_segments` segments (those whose keys fit the offset map)."""
    if mapped_segments >= plan.segment_count:
        return plan
    if mapped_segments <= 0:
        return None
    end = segments[mapped_segments].base_offset
    return plan._replace(segment_count=mapped_segments, end_offset=end,
                         first_dirty_offset=min(plan.first_dirty_offset, end))


class OffsetMap:
    """key -> latest offset, bounded to `capacity_entries` keys."""

    __slots__ = ("capacity_entries", "_latest", "max_offset")

    def __init__(self, capacity_entries: int = OFFSET_MAP_ENTRIES_DEFAULT) -> None:
        if capacity_entries < 1:
            raise ValueError("offset map capacity must be >= 1")
        self.capacity_entries = capacity_entries
        self._latest: dict[bytes, int] = {}
        self.max_offset = -1

    def __len__(self) -> int:
        return len(self._latest)

    def put(self, key: bytes, offset: int) -> bool:
        """Record `offset` as `key`'s latest; False (nothing changed) if a new key would overflow."""
        latest = self._latest
        if key not in latest and len(latest) >= self.capacity_entries:
            return False
        if offset > latest.get(key, -1):
            latest[key] = offset
        if offset > self.max_offset:
            self.max_offset = offset
        return True

    def put_records(self, records: Iterable[tuple[int, int, int, bytes | None, bool]]) -> bool:
        """`put(key, offset)` for each (start, end, offset, key, is_tombstone) with a key, in order
        (segment_cleaner.scan_records's records); False as soon as a new key would overflow."""
        latest, capacity, top = self._latest, self.capacity_entries, self.max_offset
        get = latest.get
        try:
            for _start, _end, offset, key, _tombstone in records:
                if key is None:
                    continue
                held = get(key)
                if held is None:
                    if len(latest) >= capacity:
                        return False
                    latest[key] = offset
                elif offset > held:
                    latest[key] = offset
                if offset > top:
                    top = offset
        finally:
            self.max_offset = top
        return True

    def latest(self, key: bytes) -> int | None:
        return self._latest.get(key)


def tombstone_expired(segment_last_modified_ms: int, now_ms: int, delete_retention_ms: int) -> bool:
    """Whether tombstones in a segment last written at `segment_last_modified_ms` may go."""
    return segment_last_modified_ms <= now_ms - delete_retention_ms


def keep_record(key: bytes | None, offset: int, is_tombstone: bool, offsets: OffsetMap, tombstones_expired: bool) -> bool:
    """Whether the record at `offset` survives the clean (see the module doc)."""
    if key is None:
        return True
    latest = offsets.latest(key)
    if latest is not None and offset < latest:
        return False
    return not (is_tombstone and tombstones_expired)


def keep_records(records: Sequence[tuple[int, int, int, bytes | None, bool]], offsets: OffsetMap,
                 tombstones_expired: bool) -> list[tuple[int, int, int, bytes | None, bool]]:
    """The (start, end, offset, key, is_tombstone) records that `keep_record` keeps, in one loop
    (the cleaner's hot path: no call per record)."""
    get = offsets._latest.get
    return [r for r in records
            if r[3] is None or ((held := get(r[3])) is None or r[2] >= held) and not (r[4] and tombstones_expired)]
