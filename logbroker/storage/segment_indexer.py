"""Which index entries one segment gets as batches are added to it, on append and in recovery.

Invariants: the first batch of a segment (position 0) always gets an offset entry, and after it one
batch every `interval_bytes` (Kafka's index.interval.bytes), so a lookup walks at most about
`interval_bytes` of headers; at most one entry per batch, never one per record. A time entry
(segment base, largest timestamp so far, offset of the batch that has it) is written with an
offset entry when the largest timestamp grew, and by `finish` when the segment stops being active,
so time entries of a segment strictly increase in timestamp. `state`/`restore` rewind it after a
failed append.
"""

from __future__ import annotations

from logbroker.storage.index import OffsetEntry, TimeEntry

NO_TS = -(1 << 63) - 1  # below every int64 timestamp


class SegmentIndexer:
    """Decides the index entries of one segment as batches are added (append and recovery)."""

    __slots__ = ("segment_base", "interval_bytes", "since_bytes", "max_ts", "max_ts_offset", "indexed_ts")

    def __init__(self, segment_base: int, interval_bytes: int) -> None:
        self.segment_base = segment_base
        self.interval_bytes = interval_bytes
        self.since_bytes = 0
        self.max_ts = NO_TS
        self.max_ts_offset = segment_base
        self.indexed_ts = NO_TS

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
