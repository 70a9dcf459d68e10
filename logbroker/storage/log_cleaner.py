"""One compaction pass over one live log (the driver's unit of work; see compaction.py for the
decisions and segment_cleaner.py for the files and the crash-safe swap).

The cleaner's checkpoint (`first dirty offset`) is held in memory by the caller: after a restart
the whole closed prefix counts as dirty again, which costs one extra pass and changes nothing.
Concurrency: `clean_log` must run where the log's other mutations run (the event loop) for the
swap of each segment object; readers holding views of a replaced segment keep its old mapping
(segment.py "Views": the old file is unlinked by the rename, its pages stay mapped).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from logbroker.storage.compaction import (
    OffsetMap,
    SegmentInfo,
    plan_clean,
    plan_prefix_for_map,
    tombstone_expired,
)
from logbroker.storage.log import Log
from logbroker.storage.record_batch import iter_batches
from logbroker.storage.segment import Segment
from logbroker.storage.segment_cleaner import clean_segment, map_segment, swap_in, write_cleaned
from logbroker.storage.segment_indexer import SegmentIndexer


def clean_log(
    log: Log, first_dirty_offset: int, now_ms: int, hook: Callable[[str], None] | None = None,
    offset_map_entries: int = 1 << 20,
) -> int | None:
    """Clean the log once if compaction.plan_clean says so; returns the new first dirty offset
    (None: nothing to do)."""
    local = log._local
    segments = list(local.segments)
    infos = [SegmentInfo(s.base_offset, s.size_bytes, local.retention_timestamp(s)) for s in segments]
    plan = plan_clean(infos, first_dirty_offset, now_ms=now_ms, high_watermark=log.high_watermark,
                      settings=log.config.compaction)
    if plan is None:
        return None
    offsets = OffsetMap(offset_map_entries)
    mapped = 0
    for seg in segments[: plan.segment_count]:
        if not map_segment(seg.view(0, seg.size_bytes), offsets):
            break
        mapped += 1
    plan = plan_prefix_for_map(plan, infos, mapped)
    if plan is None:
        return None
    for i in range(plan.segment_count):
        _clean_one(log, i, segments[i], segments[i + 1].base_offset, offsets, now_ms, hook)
    return plan.end_offset


def _clean_one(
    log: Log, i: int, seg: Segment, next_base: int, offsets: OffsetMap, now_ms: int,
    hook: Callable[[str], None] | None,
) -> None:
    local = log._local
    mtime_ns = os.stat(seg.path).st_mtime_ns
    expired = tombstone_expired(mtime_ns // 1_000_000, now_ms, log.config.delete_retention_ms)
    data = clean_segment(seg.view(0, seg.size_bytes), offsets, expired)
    if len(data) == seg.size_bytes:
        return
    directory = seg.path.parent
    write_cleaned(directory, seg.path.name, data, mtime_ns)
    local.index.delete_offsets(seg.base_offset, next_base)
    swap_in(directory, seg.path.name, hook or (lambda step: None))
    new = Segment.open_closed(seg.path, seg.base_offset)
    local.segments[i] = new
    local.size_bytes += new.size_bytes - seg.size_bytes
    seg.close(trim=False)
    indexer = SegmentIndexer(seg.base_offset, log.config.index_interval_bytes)
    entries: list[tuple[int, int, int]] = []
    for base, position, size in _batches(new):
        indexer.add(position, size, base, -1, entries, [])
    local.index.write(entries)


def _batches(seg: Segment) -> list[tuple[int, int, int]]:
    return [(h.base_offset, pos, h.batch_length + 12) for h, pos in iter_batches(seg.view(0, seg.size_bytes))]
