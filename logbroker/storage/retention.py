"""Retention: which of a log's oldest segments to delete, as a pure decision (Kafka's
deleteRetentionMsBreachedSegments / deleteRetentionSizeBreachedSegments /
deleteLogStartOffsetBreachedSegments, in one pass). The log applies the decision: it deletes the
files, advances the log start offset and checkpoints it (`Log.enforce_retention`).

Invariants of the decision:
- only a prefix of the segments goes (oldest first; the first segment that stays ends the pass);
- never the active (last) segment;
- never a segment holding an offset at or above the high watermark (the next segment's base offset
  must be <= the high watermark), so nothing a consumer has not been allowed to see yet is lost;
- a segment goes if any of: its largest timestamp is older than `now_ms - retention_ms` (if
  retention_ms >= 0), the log stays at or above retention_bytes without it (if retention_bytes >=
  0), or it ends at or below the log start offset.
The timestamp of a segment is asked for only for the segments the pass examines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol


class RetentionSegment(Protocol):
    """What retention needs to know of a segment (a `segment.Segment` is one)."""

    @property
    def base_offset(self) -> int: ...

    @property
    def size_bytes(self) -> int: ...


def segments_to_delete(
    segments: Sequence[RetentionSegment], total_bytes: int, timestamp_ms: Callable[[int], int], *,
    retention_ms: int, retention_bytes: int, now_ms: int, high_watermark: int, log_start_offset: int,
) -> int:
    """How many of `segments` (oldest first, the last one active), counted from the first, to
    delete. `total_bytes` is the log's size; `timestamp_ms(i)` is segment i's retention timestamp
    (its largest record timestamp, or its file's modification time when it has none)."""
    remaining = total_bytes
    doomed = 0
    for i in range(len(segments) - 1):
        seg = segments[i]
        next_base = segments[i + 1].base_offset
        if next_base > high_watermark:
            break
        by_bytes = retention_bytes >= 0 and remaining - seg.size_bytes >= retention_bytes
        by_time = retention_ms >= 0 and now_ms - timestamp_ms(i) > retention_ms
        below_start = next_base <= log_start_offset
        if not (by_bytes or by_time or below_start):
            break
        remaining -= seg.size_bytes
        doomed += 1
    return doomed
