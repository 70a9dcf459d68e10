"""Records of a share partition that wait outside its window: those produced with a delivery time
more than `DEFER_AFTER_MS` ahead (share_headers.DELIVER_AT_MS). Pure, like share_partition.py,
which owns one of these and moves such records here as they enter its window (their window slot is
settled at once), so a backlog of delayed records (a week ahead, a million of them) never fills the
window and holds back the records after them.

Each record keeps the window's lifecycle (AVAILABLE -> ACQUIRED -> settled, or given back with a
backoff, or archived), stored sparse: a dict by offset, and a heap of (due time, offset) so a fetch
finds the due ones without scanning anything (stale heap entries are skipped when popped). Bounded
by `capacity`: when full, delayed records stay in the window (and may fill it) until some here
settle.

Persistence: the records are grouped in chunks of CHUNK_OFFSETS consecutive offsets; a change marks
its chunk dirty, and the shell writes each dirty chunk as one record (group/offsets.py, key version
4), or a tombstone once the chunk is empty, so an acknowledgement rewrites one small chunk, not the
whole set. Chunk byte layout (big-endian)::

    int16 version = 0
    int32 count
    count x { int64 offset, int8 state (0 available: an acquired record is stored available),
              int16 delivery_count, int64 until_ms, int64 expires_ms }
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass, field

CHUNK_OFFSETS = 1024
DEFER_AFTER_MS = 1_000
CAPACITY_DEFAULT = 100_000
AVAILABLE, ACQUIRED = 0, 1

_HEAD = struct.Struct(">hi")
_ENTRY = struct.Struct(">qbhqq")


@dataclass
class Entry:
    state: int
    count: int
    owner: str | None
    until_ms: int
    expires_ms: int


@dataclass
class Deferred:
    capacity: int = CAPACITY_DEFAULT
    entries: dict[int, Entry] = field(default_factory=dict)
    _heap: list[tuple[int, int]] = field(default_factory=list)
    dirty_chunks: set[int] = field(default_factory=set)

    def __len__(self) -> int:
        return len(self.entries)

    def has_room(self, n: int = 1) -> bool:
        return len(self.entries) + n <= self.capacity

    def _touch(self, offset: int) -> None:
        self.dirty_chunks.add(offset // CHUNK_OFFSETS)

    def add(self, offset: int, until_ms: int, expires_ms: int, count: int = 0) -> None:
        self.entries[offset] = Entry(AVAILABLE, count, None, until_ms, expires_ms)
        heapq.heappush(self._heap, (until_ms, offset))
        self._touch(offset)

    def make_available(self, offset: int, e: Entry, until_ms: int) -> None:
        e.state, e.owner, e.until_ms = AVAILABLE, None, until_ms
        heapq.heappush(self._heap, (until_ms, offset))
        self._touch(offset)

    def pop_due(self, now_ms: int) -> tuple[int, Entry] | None:
        """The next available record due by `now_ms` (taken off the heap), or None."""
        heap = self._heap
        while heap and heap[0][0] <= now_ms:
            until, offset = heapq.heappop(heap)
            e = self.entries.get(offset)
            if e is not None and e.state == AVAILABLE and e.until_ms == until:
                return offset, e
        return None

    def acquire(self, offset: int, e: Entry, member: str, lock_until_ms: int) -> int:
        e.state, e.owner, e.until_ms = ACQUIRED, member, lock_until_ms
        e.count = min(e.count + 1, 255)
        self._touch(offset)
        return e.count

    def remove(self, offset: int) -> None:
        if self.entries.pop(offset, None) is not None:
            self._touch(offset)

    def held(self, member: str) -> list[int]:
        return [o for o, e in self.entries.items() if e.state == ACQUIRED and e.owner == member]

    def locks_ended(self, now_ms: int) -> tuple[list[int], int | None]:
        """Offsets whose lock ended by `now_ms`, and the earliest lock still running."""
        lost: list[int] = []
        nxt: int | None = None
        for o, e in self.entries.items():
            if e.state == ACQUIRED:
                if e.until_ms <= now_ms:
                    lost.append(o)
                elif nxt is None or e.until_ms < nxt:
                    nxt = e.until_ms
        return lost, nxt

    def in_range(self, first: int, last: int) -> bool:
        if not self.entries:
            return False
        if last - first < len(self.entries):
            return any(o in self.entries for o in range(first, last + 1))
        return any(first <= o <= last for o in self.entries)

    def remove_below(self, offset: int) -> int:
        """Drop every record below `offset` (a purge, or retention took them); returns how many."""
        doomed = [o for o in self.entries if o < offset]
        for o in doomed:
            self.remove(o)
        return len(doomed)

    # -- persistence -------------------------------------------------------------------------------

    def take_dirty(self) -> dict[int, bytes | None]:
        """Every chunk changed since the last call: its bytes, or None when it is empty now."""
        out: dict[int, bytes | None] = {}
        by_chunk: dict[int, list[tuple[int, Entry]]] = {c: [] for c in self.dirty_chunks}
        if by_chunk:
            for o, e in self.entries.items():
                lst = by_chunk.get(o // CHUNK_OFFSETS)
                if lst is not None:
                    lst.append((o, e))
        for chunk, items in by_chunk.items():
            if not items:
                out[chunk] = None
                continue
            body = b"".join(_ENTRY.pack(o, AVAILABLE, e.count, 0 if e.state == ACQUIRED else e.until_ms, e.expires_ms)
                            for o, e in sorted(items, key=lambda oe: oe[0]))
            out[chunk] = _HEAD.pack(0, len(items)) + body
        self.dirty_chunks.clear()
        return out

    def restore_chunk(self, chunk: int, data: bytes) -> None:
        """Load one chunk written by `take_dirty`; raises ValueError on junk (nothing loaded)."""
        if len(data) < _HEAD.size:
            raise ValueError("deferred chunk too short")
        version, n = _HEAD.unpack_from(data, 0)
        if version != 0 or not 0 <= n <= CHUNK_OFFSETS or len(data) != _HEAD.size + n * _ENTRY.size:
            raise ValueError("bad deferred chunk")
        loaded = [_ENTRY.unpack_from(data, _HEAD.size + i * _ENTRY.size) for i in range(n)]
        if any(o // CHUNK_OFFSETS != chunk or s != AVAILABLE or not 0 <= c <= 255 for o, s, c, _, _ in loaded):
            raise ValueError("deferred chunk entry out of place")
        for o, _, c, until, expires in loaded:
            self.entries[o] = Entry(AVAILABLE, c, None, until, expires)
            heapq.heappush(self._heap, (until, o))
