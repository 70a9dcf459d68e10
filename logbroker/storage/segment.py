"""One segment file: RecordBatch v2 batches back to back, named by the base offset of its first batch.

File ``<partition dir>/<base offset, 20 digits>.log``::

    position 0            batch (61-byte header + records; baseOffset = the file's base offset)
    position n            batch
    ...
    size_bytes            end of data: zeros up to capacity_bytes while the segment is active

States of a `Segment` (the log moves it through them; nothing else does):

    active   the one segment appends go to. The file is preallocated with posix_fallocate to
             `capacity_bytes` (so a full disk fails here, as an OSError, instead of as SIGBUS inside
             an mmap write) and mapped read/write at that size. Bytes past `size_bytes` are zero.
    closed   read-only: after `seal()` (roll) the mapping is dropped, the file trimmed to
             `size_bytes` and mapped read-only at that size. Sealing does not flush: the written
             pages stay dirty in the page cache until the log's background flusher fsyncs the file
             (flusher.py). A closed segment becomes active again only when the log truncates into
             it (`reopen_writable`).
    gone     `close()` or `delete()`: no mapping, no descriptor.

Views. `view()` hands out zero-copy read-only memoryviews of the mapping. Python refuses to unmap
an mmap with live views (BufferError), so when the segment drops a mapping while a caller still
holds a view, the mapping is left to be unmapped by the garbage collector when that view dies. That
is safe because of one invariant: a view never covers bytes at or past `size_bytes`, and no file is
ever shortened below `size_bytes` while mapped (roll trims only the zero tail; truncation of data
zeroes bytes in place, it does not shrink the file; deleting unlinks, which leaves the pages
mapped). So no view can reach a page past the end of its file, which is what raises SIGBUS.

The walks over batch headers (`find`, `read_end`, `scan`) live here because they are about the
contents of one file; the log decides what to do with what they find.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from logbroker.errors import CorruptMessageError, StorageError
from logbroker.storage.record_batch import (
    CRC_START,
    HEADER,
    HEADER_SIZE,
    LOG_OVERHEAD,
    MAGIC,
    MIN_BATCH_LENGTH,
    BatchHeader,
    crc32c,
    set_base_offset,
    set_leader_epoch,
)

log = logging.getLogger(__name__)

SUFFIX = ".log"
BASE_OFFSET_DIGITS = 20
POSITION_MAX = (1 << 32) - 1  # positions are u32 in the offset index
ZERO_TAIL_CHECK_BYTES = 64 << 10  # how far past a zero header recovery looks for torn data
_ZERO_HEADER = bytes(HEADER_SIZE)
_ZERO_CHUNK = bytes(1 << 20)

# baseOffset, batchLength, then lastOffsetDelta at byte 23
_WALK = struct.Struct(">qi11xi")
_BASE_AND_LENGTH = struct.Struct(">qi")
_ATTRIBUTES = struct.Struct(">h")
_TIMESTAMP = struct.Struct(">q")
_CRC = struct.Struct(">I")
_ATTRIBUTES_POS = 21
_MAX_TIMESTAMP_POS = 35
_TIMESTAMP_TYPE_LOG_APPEND = 0x08


def file_name(base_offset: int) -> str:
    return f"{base_offset:0{BASE_OFFSET_DIGITS}d}{SUFFIX}"


def parse_file_name(name: str) -> int | None:
    """Base offset of a segment file name, or None if `name` is not one."""
    stem = name[: -len(SUFFIX)]
    if not name.endswith(SUFFIX) or len(stem) != BASE_OFFSET_DIGITS or not stem.isdigit():
        return None
    return int(stem)


class ScannedBatch(NamedTuple):
    position: int
    size_bytes: int
    base_offset: int
    last_offset_delta: int
    max_timestamp: int
    leader_epoch: int


class Scan:
    """A validating walk over the batches of a buffer, for recovery.

    Iterate it for the batches that pass: length bounds, magic, baseOffset equal to the expected
    next offset (so a batch copied in but not yet given its offset counts as torn), a patched
    leader epoch (>= 0), CRC. After iteration `end_position` is where the valid batches end,
    `next_offset` the offset after them, and `damage` None if the walk stopped at the end of the
    buffer or at a zero tail (a preallocated file's normal state), else why it stopped.
    """

    def __init__(
        self, buf: mmap.mmap | bytes, limit: int, expected_offset: int, position: int = 0, check_crc: bool = True,
        allow_gaps: bool = False,
    ) -> None:
        self._allow_gaps = allow_gaps  # a compacted closed segment: baseOffset may skip ahead
        self._buf = buf
        self._limit = limit
        self._check_crc = check_crc
        self.end_position = position
        self.next_offset = expected_offset
        self.damage: str | None = None

    def __iter__(self) -> Iterator[ScannedBatch]:
        buf = self._buf
        limit = self._limit
        pos = self.end_position
        expected = self.next_offset
        while pos < limit:
            remaining = limit - pos
            if remaining < HEADER_SIZE:
                if buf[pos:limit].count(0) != remaining:
                    self.damage = f"partial batch header of {remaining} bytes"
                break
            if buf[pos : pos + HEADER_SIZE] == _ZERO_HEADER:
                window_end = min(limit, pos + ZERO_TAIL_CHECK_BYTES)
                if buf[pos:window_end].count(0) != window_end - pos:
                    self.damage = "zero batch header followed by data (torn write)"
                break
            (base, length, epoch, magic, _crc, _attrs, lod, _bts, max_ts, *_rest) = HEADER.unpack_from(buf, pos)
            size = length + LOG_OVERHEAD
            if length < MIN_BATCH_LENGTH or size > remaining:
                self.damage = f"batchLength {length} is invalid or runs past the end ({remaining} bytes left)"
                break
            if magic != MAGIC:
                self.damage = f"magic {magic}"
                break
            if base != expected and not (self._allow_gaps and base > expected):
                self.damage = f"baseOffset {base}, expected {expected} (torn or unpatched write)"
                break
            if epoch < 0 or lod < 0:
                self.damage = f"leader epoch {epoch} / lastOffsetDelta {lod} not set (torn or unpatched write)"
                break
            if self._check_crc and not crc_ok(buf, pos, size):
                self.damage = "CRC-32C mismatch"
                break
            yield ScannedBatch(pos, size, base, lod, max_ts, epoch)
            pos += size
            expected = base + lod + 1
            self.end_position = pos
            self.next_offset = expected


class Segment:
    """A segment file and its memory mapping. See the module doc for states and view safety."""

    __slots__ = ("base_offset", "path", "size_bytes", "capacity_bytes", "_map", "_fd", "_writable")

    def __init__(
        self, path: Path, base_offset: int, size_bytes: int, capacity_bytes: int, mapping: mmap.mmap | None,
        fd: int, writable: bool,
    ) -> None:
        self.path = path
        self.base_offset = base_offset
        self.size_bytes = size_bytes
        self.capacity_bytes = capacity_bytes
        self._map = mapping
        self._fd = fd
        self._writable = writable

    def __repr__(self) -> str:
        state = "active" if self._writable else "closed"
        return f"Segment({self.path.name}, {state}, {self.size_bytes}/{self.capacity_bytes} bytes)"

    # -- lifecycle ------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, base_offset: int, capacity_bytes: int) -> Segment:
        """A new, empty, active segment; StorageError (and no file left behind) if it cannot be made."""
        _check_capacity(capacity_bytes)
        path = directory / file_name(base_offset)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StorageError(f"cannot create segment {path}: {e}") from e
        try:
            os.posix_fallocate(fd, 0, capacity_bytes)
            mapping = mmap.mmap(fd, capacity_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise StorageError(f"cannot preallocate {capacity_bytes} bytes for segment {path}: {e}") from e
        return cls(path, base_offset, 0, capacity_bytes, mapping, fd, True)

    @classmethod
    def open_closed(cls, path: Path, base_offset: int) -> Segment:
        """A closed segment: mapped read-only at the file's size, which is taken as its data size."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                _check_capacity(size)
                mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) if size else None
            finally:
                os.close(fd)  # the mmap holds its own descriptor
        except OSError as e:
            raise StorageError(f"cannot open segment {path}: {e}") from e
        return cls(path, base_offset, size, size, mapping, -1, False)

    @classmethod
    def open_active(cls, path: Path, base_offset: int, size_bytes: int, capacity_bytes: int) -> Segment:
        """An existing file as the active segment: data up to `size_bytes`, zeros after it.

        The file must hold nothing but zeros past `size_bytes` (it was trimmed there, or recovery
        cut it there); it is extended to `capacity_bytes` and mapped read/write.
        """
        capacity_bytes = max(capacity_bytes, size_bytes)
        fd, mapping = _map_preallocated(path, capacity_bytes)
        return cls(path, base_offset, size_bytes, capacity_bytes, mapping, fd, True)

    @property
    def is_active(self) -> bool:
        return self._writable

    @property
    def buffer(self) -> mmap.mmap | bytes:
        """The mapping (or b"" for an empty closed file), for header reads by the log."""
        return self._map if self._map is not None else b""

    def grow(self, capacity_bytes: int) -> None:
        """Preallocate and map more room in the active segment (for a payload above segment_bytes)."""
        assert self._writable and capacity_bytes > self.capacity_bytes
        _check_capacity(capacity_bytes)
        try:
            os.posix_fallocate(self._fd, 0, capacity_bytes)
            mapping = mmap.mmap(self._fd, capacity_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise StorageError(f"cannot preallocate {capacity_bytes} bytes for segment {self.path}: {e}") from e
        old, self._map = self._map, mapping
        _release(old)
        self.capacity_bytes = capacity_bytes

    def seal(self) -> None:
        """Active -> closed: unmap, trim the file to `size_bytes`, map it read-only.

        Neither msyncs nor fsyncs, so it costs no disk wait: the pages written through the mapping
        are the page cache's pages, and unmapping leaves them dirty there, to be written back by
        the kernel or by an fsync of the file from anyone (the log's background flusher). The trim
        needs no flush first: it only cuts the zero tail, which holds no data.
        """
        assert self._writable
        old, self._map = self._map, None
        _release(old)
        try:
            os.ftruncate(self._fd, self.size_bytes)
            self._map = (
                mmap.mmap(self._fd, self.size_bytes, mmap.MAP_SHARED, mmap.PROT_READ) if self.size_bytes else None
            )
        except OSError as e:
            raise StorageError(f"cannot trim segment {self.path}: {e}") from e
        finally:
            os.close(self._fd)
            self._fd = -1
            self._writable = False
            self.capacity_bytes = self.size_bytes

    def reopen_writable(self, capacity_bytes: int) -> None:
        """Closed -> active (the log truncates into this segment): extend, map read/write."""
        assert not self._writable
        capacity_bytes = max(capacity_bytes, self.size_bytes)
        fd, mapping = _map_preallocated(self.path, capacity_bytes)
        old, self._map = self._map, mapping
        _release(old)
        self._fd = fd
        self._writable = True
        self.capacity_bytes = capacity_bytes

    def flush(self) -> None:
        """msync the data written so far (a no-op for a closed segment, which has no writable
        mapping: fsync its file instead)."""
        if self._writable and self._map is not None and self.size_bytes:
            try:
                self._map.flush(0, _page_ceiling(self.size_bytes, self.capacity_bytes))
            except OSError as e:
                raise StorageError(f"cannot flush segment {self.path}: {e}") from e

    def close(self, trim: bool = True) -> None:
        """Drop the mapping and descriptor; an active segment is flushed and trimmed if `trim`."""
        if self._writable and trim:
            self.flush()
        old, self._map = self._map, None
        _release(old)
        if self._fd >= 0:
            try:
                if self._writable and trim:
                    os.ftruncate(self._fd, self.size_bytes)
                    os.fsync(self._fd)
            except OSError as e:
                raise StorageError(f"cannot trim segment {self.path}: {e}") from e
            finally:
                os.close(self._fd)
                self._fd = -1
        self._writable = False

    def delete(self) -> None:
        self.close(trim=False)
        try:
            self.path.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"cannot delete segment {self.path}: {e}") from e

    # -- data -----------------------------------------------------------------------------------

    def view(self, position: int, size: int) -> memoryview:
        """Zero-copy read-only view of `size` bytes at `position` (within `size_bytes`)."""
        assert position >= 0 and position + size <= self.size_bytes
        if size == 0 or self._map is None:
            return memoryview(b"")
        return memoryview(self._map)[position : position + size].toreadonly()

    def append(
        self, payload: memoryview, batches: list[tuple[int, int, int]], leader_epoch: int, append_time_ms: int | None
    ) -> None:
        """Copy a validated payload to the end of the active segment and stamp its batches.

        `batches` holds (position in payload, size, base offset) per batch. The payload is copied
        once; then each batch gets its baseOffset, for LogAppendTime its timestamp type, maxTimestamp
        and CRC, and its partitionLeaderEpoch last, so a batch whose stamping was interrupted by a
        crash has an epoch of -1 or a wrong offset or CRC, which recovery treats as torn. Does not
        advance `size_bytes`: the log does, once the index has the batches too.
        """
        assert self._writable and self._map is not None
        start = self.size_bytes
        end = start + payload.nbytes
        assert end <= self.capacity_bytes
        mapping = self._map
        mapping[start:end] = payload
        with memoryview(mapping) as mv:
            for pos, size, base_offset in batches:
                p = start + pos
                set_base_offset(mv, p, base_offset)
                if append_time_ms is not None:
                    attrs = _ATTRIBUTES.unpack_from(mv, p + _ATTRIBUTES_POS)[0]
                    _ATTRIBUTES.pack_into(mv, p + _ATTRIBUTES_POS, attrs | _TIMESTAMP_TYPE_LOG_APPEND)
                    _TIMESTAMP.pack_into(mv, p + _MAX_TIMESTAMP_POS, append_time_ms)
                    _CRC.pack_into(mv, p + 17, crc32c(mv[p + CRC_START : p + size]))
                set_leader_epoch(mv, p, leader_epoch)

    def zero(self, start: int, end: int) -> None:
        """Overwrite [start, end) of the active mapping with zeros."""
        assert self._writable and self._map is not None and 0 <= start <= end <= self.capacity_bytes
        mapping = self._map
        chunk = len(_ZERO_CHUNK)
        while start < end:
            n = min(chunk, end - start)
            mapping[start : start + n] = _ZERO_CHUNK[:n] if n < chunk else _ZERO_CHUNK
            start += n

    def truncate(self, size_bytes: int) -> None:
        """Drop the data past `size_bytes` of the active segment (zeroed in place, never shrunk)."""
        assert self._writable and 0 <= size_bytes <= self.size_bytes
        self.zero(size_bytes, self.size_bytes)
        self.size_bytes = size_bytes

    # -- header walks ---------------------------------------------------------------------------

    def find(self, offset: int, position: int) -> int:
        """Position of the batch containing `offset`, walking headers from the batch at `position`
        (whose base offset must be <= offset); -1 if the segment ends first."""
        buf = self.buffer
        size = self.size_bytes
        unpack = _WALK.unpack_from
        while position < size:
            if size - position < HEADER_SIZE:
                raise CorruptMessageError(f"{self.path}: partial batch header at byte {position}")
            base, length, lod = unpack(buf, position)
            if length < MIN_BATCH_LENGTH or position + length + LOG_OVERHEAD > size:
                raise CorruptMessageError(f"{self.path}: batchLength {length} at byte {position} is invalid")
            if offset <= base + lod:
                return position
            position += length + LOG_OVERHEAD
        return -1

    def header(self, position: int) -> BatchHeader:
        """The header of the batch at `position`."""
        return BatchHeader._make(HEADER.unpack_from(self.buffer, position))

    def batch_base_offset(self, position: int) -> int:
        """baseOffset of the batch at `position`."""
        return int(_BASE_AND_LENGTH.unpack_from(self.buffer, position)[0])

    def read_end(self, position: int, max_bytes: int, max_offset: int) -> tuple[int, str | None]:
        """Where a read of whole batches from `position` ends: batches with base offset below
        `max_offset`, at most `max_bytes` in total but at least one, each with a good CRC.

        Returns (end position, damage): damage names the first bad batch met, which is not included.
        """
        buf = self.buffer
        size = self.size_bytes
        unpack = _BASE_AND_LENGTH.unpack_from
        end = position
        while size - end >= HEADER_SIZE:
            base, length = unpack(buf, end)
            if base >= max_offset:
                break
            batch_size = length + LOG_OVERHEAD
            if length < MIN_BATCH_LENGTH or end + batch_size > size:
                return end, f"batchLength {length} at byte {end} is invalid"
            if end > position and end + batch_size - position > max_bytes:
                break
            if not crc_ok(buf, end, batch_size):
                return end, f"CRC-32C mismatch in the batch at byte {end} (offset {base})"
            end += batch_size
        else:
            if end < size:
                return end, f"partial batch header at byte {end}"
        return end, None

    def batch_headers(self, position: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
        """(position, size, base offset, last offset delta, max timestamp) of each batch in
        [position, end), unchecked beyond length bounds."""
        buf = self.buffer
        end = min(end, self.size_bytes)
        while end - position >= HEADER_SIZE:
            h = HEADER.unpack_from(buf, position)
            size = h[1] + LOG_OVERHEAD
            if h[1] < MIN_BATCH_LENGTH or position + size > end:
                raise CorruptMessageError(f"{self.path}: batchLength {h[1]} at byte {position} is invalid")
            yield position, size, h[0], h[6], h[8]
            position += size


    def producer_batches(self) -> Iterator[BatchHeader]:
        """The header of every batch with a producer id (>= 0), in order: the batch headers only,
        unchecked beyond length bounds (the log was recovered when it opened)."""
        buf = self.buffer
        end = self.size_bytes
        position = 0
        while end - position >= HEADER_SIZE:
            h = HEADER.unpack_from(buf, position)
            if h[1] < MIN_BATCH_LENGTH or position + h[1] + LOG_OVERHEAD > end:
                raise CorruptMessageError(f"{self.path}: batchLength {h[1]} at byte {position} is invalid")
            if h[9] >= 0:
                yield BatchHeader._make(h)
            position += h[1] + LOG_OVERHEAD


def crc_ok(buf: mmap.mmap | bytes, position: int, size: int) -> bool:
    """Whether the batch of `size` bytes at `position` matches its CRC-32C."""
    stored = _CRC.unpack_from(buf, position + 17)[0]
    with memoryview(buf) as mv:
        return crc32c(mv[position + CRC_START : position + size]) == stored


def _release(mapping: mmap.mmap | None) -> None:
    """Unmap now, or, if a caller still holds a view, when the last view is garbage-collected."""
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:
        log.debug("mapping still has views; it is unmapped when they are released")


def _check_capacity(capacity_bytes: int) -> None:
    if not 0 <= capacity_bytes <= POSITION_MAX:
        raise StorageError(f"segment size {capacity_bytes} is outside [0, {POSITION_MAX}]")


def _page_ceiling(n: int, limit: int) -> int:
    page = mmap.PAGESIZE
    return min(limit, (n + page - 1) // page * page)


def _map_preallocated(path: Path, capacity_bytes: int) -> tuple[int, mmap.mmap]:
    """Open `path`, reserve `capacity_bytes` on disk (posix_fallocate, so a full disk fails here and
    never as SIGBUS inside an mmap write) and map it read/write. The caller owns the descriptor."""
    _check_capacity(capacity_bytes)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise StorageError(f"cannot open segment {path}: {e}") from e
    size_before = -1
    try:
        size_before = os.fstat(fd).st_size
        os.posix_fallocate(fd, 0, capacity_bytes)
        mapping = mmap.mmap(fd, capacity_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as e:
        # A failed fallocate may have grown the file part way (ext4): give the room back, and keep
        # the file's size its data size (a read-only fallback maps it as it was).
        with contextlib.suppress(OSError):
            if size_before >= 0 and os.fstat(fd).st_size > size_before:
                os.ftruncate(fd, size_before)
        os.close(fd)
        raise StorageError(f"cannot preallocate {capacity_bytes} bytes for segment {path}: {e}") from e
    return fd, mapping
