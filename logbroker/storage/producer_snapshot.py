"""Producer state snapshots: the idempotent producers' state of one log written at a segment roll
(Kafka's ProducerStateManager `<offset>.snapshot` files), so a restart need not rescan the log.

A snapshot named after offset S (`00000000000000001234.producers`, the segment files' 20-digit
naming) holds the ProducerStateMap (producer_state.py) as it was when the log rolled to a segment
whose base offset is S: it covers every batch below S and nothing at or above it. Opening a log
loads the newest valid snapshot at or below its log end offset and replays only the batch headers
from S on (log.py). The state is bounded by `producers_max` producers of at most BATCHES_KEPT
batches each, so a snapshot is small and bounded: SNAPSHOT_BYTES_MAX.

Byte layout (big-endian, version 1):

    offset  size  field
    0       4     magic b"LBPS"
    4       2     version (int16) = 1
    6       4     CRC-32C (uint32) of every byte from offset 10 to the end
    10      8     snapshot offset S (int64, >= 0)
    18      4     producer count (int32, 0..PRODUCERS_MAX_DEFAULT)
    22      ...   producers, least recently recorded first:
                    producer id (int64, >= 0), epoch (int16, >= 0), last timestamp ms (int64),
                    batch count (int8, 1..BATCHES_KEPT), then per batch, oldest first:
                      first sequence (int32), last sequence (int32),
                      first offset (int64), last offset (int64)   (0 <= first <= last < S)

Decoding refuses (SnapshotError) a file over SNAPSHOT_BYTES_MAX, a short or trailing file, a wrong
magic, version or CRC, and hostile contents (counts past their bounds or past the bytes present,
negative ids or epochs, offsets outside [0, S), a producer id twice). Nothing is trusted before the
CRC matched and every count is checked against the bytes left.

The file functions at the bottom are the I/O edge: a snapshot is written atomically (temp, fsync,
rename, fsync the directory: atomic_file.py) and deleted with the directory synced, so a snapshot
removed by a truncation cannot come back after a crash.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path

from logbroker.storage.atomic_file import fsync_dir, write_atomically
from logbroker.storage.producer_state import (
    BATCHES_KEPT,
    PRODUCERS_MAX_DEFAULT,
    BatchMetadata,
    ProducerEntry,
    ProducerStateMap,
)
from logbroker.storage.record_batch import crc32c
from logbroker.storage.segment import BASE_OFFSET_DIGITS

MAGIC = b"LBPS"
VERSION = 1
SUFFIX = ".producers"
TMP_SUFFIX = SUFFIX + ".tmp"

_HEADER = struct.Struct(">4shI")  # magic, version, crc
_BODY_HEADER = struct.Struct(">qi")  # snapshot offset, producer count
_PRODUCER = struct.Struct(">qhqb")  # producer id, epoch, last timestamp ms, batch count
_BATCH = struct.Struct(">iiqq")  # first/last sequence, first/last offset
CRC_START = _HEADER.size
HEADER_BYTES = _HEADER.size + _BODY_HEADER.size
PRODUCER_BYTES_MAX = _PRODUCER.size + BATCHES_KEPT * _BATCH.size
SNAPSHOT_BYTES_MAX = HEADER_BYTES + PRODUCERS_MAX_DEFAULT * PRODUCER_BYTES_MAX  # about 13.9 MB


class SnapshotError(ValueError):
    """A snapshot file that is not a valid one (the module doc says which)."""


def encode(offset: int, state: ProducerStateMap) -> bytes:
    """The snapshot of `state` at `offset` (module doc)."""
    parts = [_BODY_HEADER.pack(offset, len(state))]
    pack_producer, pack_batch = _PRODUCER.pack, _BATCH.pack
    for pid, entry in state.items():
        parts.append(pack_producer(pid, entry.epoch, entry.last_timestamp_ms, len(entry.batches)))
        parts.extend(pack_batch(*b) for b in entry.batches)
    body = b"".join(parts)
    return _HEADER.pack(MAGIC, VERSION, crc32c(body)) + body


def decode(
    data: bytes, expiration_ms: int, producers_max: int = PRODUCERS_MAX_DEFAULT
) -> tuple[int, ProducerStateMap]:
    """(snapshot offset, the state) of a snapshot file's bytes; SnapshotError if it is not a valid
    one. A state over `producers_max` keeps its most recently recorded producers."""
    if len(data) > SNAPSHOT_BYTES_MAX:
        raise SnapshotError(f"{len(data)} bytes exceeds the maximum of {SNAPSHOT_BYTES_MAX}")
    if len(data) < HEADER_BYTES:
        raise SnapshotError(f"truncated: {len(data)} bytes, a header is {HEADER_BYTES}")
    magic, version, crc = _HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise SnapshotError(f"bad magic {magic!r}")
    if version != VERSION:
        raise SnapshotError(f"unsupported version {version} (this broker reads {VERSION})")
    if crc32c(memoryview(data)[CRC_START:]) != crc:
        raise SnapshotError("CRC-32C mismatch")
    offset, count = _BODY_HEADER.unpack_from(data, _HEADER.size)
    if offset < 0:
        raise SnapshotError(f"negative snapshot offset {offset}")
    if not 0 <= count <= PRODUCERS_MAX_DEFAULT or count * (_PRODUCER.size + _BATCH.size) > len(data) - HEADER_BYTES:
        raise SnapshotError(f"producer count {count} does not fit the file")
    state = ProducerStateMap(expiration_ms, producers_max)
    position = HEADER_BYTES
    for _ in range(count):
        pid, entry, position = _decode_producer(data, position, offset)
        if state.entry(pid) is not None:
            raise SnapshotError(f"producer id {pid} appears twice")
        state.restore(pid, entry)
    if position != len(data):
        raise SnapshotError(f"{len(data) - position} trailing bytes")
    return offset, state


def _decode_producer(data: bytes, position: int, offset: int) -> tuple[int, ProducerEntry, int]:
    """One producer at `position`: (its id, its entry, the position after it)."""
    if position + _PRODUCER.size > len(data):
        raise SnapshotError(f"truncated producer at byte {position}")
    pid, epoch, last_timestamp_ms, batch_count = _PRODUCER.unpack_from(data, position)
    position += _PRODUCER.size
    if pid < 0 or epoch < 0:
        raise SnapshotError(f"producer id {pid} epoch {epoch} at byte {position}: negative")
    if not 1 <= batch_count <= BATCHES_KEPT or position + batch_count * _BATCH.size > len(data):
        raise SnapshotError(f"producer {pid}: batch count {batch_count} does not fit the file")
    entry = ProducerEntry(epoch, last_timestamp_ms)
    for _ in range(batch_count):
        batch = BatchMetadata._make(_BATCH.unpack_from(data, position))
        position += _BATCH.size
        if not 0 <= batch.first_offset <= batch.last_offset < offset:
            raise SnapshotError(
                f"producer {pid}: batch offsets {batch.first_offset}..{batch.last_offset} outside [0, {offset})")
        entry.batches.append(batch)
    return pid, entry, position


# -- files (the I/O edge) -------------------------------------------------------------------------


def file_name(offset: int) -> str:
    return f"{offset:0{BASE_OFFSET_DIGITS}d}{SUFFIX}"


def parse_file_name(name: str) -> int | None:
    """The offset of a snapshot file name, or None if `name` is not one."""
    stem = name[: -len(SUFFIX)]
    if not name.endswith(SUFFIX) or len(stem) != BASE_OFFSET_DIGITS or not stem.isdigit():
        return None
    return int(stem)


def is_snapshot_file(name: str) -> bool:
    """A snapshot or the temp file of one being written (not a stray file of the log directory)."""
    return parse_file_name(name) is not None or (
        name.endswith(TMP_SUFFIX) and parse_file_name(name[: -len(".tmp")]) is not None)


def list_snapshots(directory: Path) -> list[int]:
    """Offsets of the snapshot files in `directory`, ascending. Removes temp files a crash left."""
    offsets = []
    for entry in os.scandir(directory):
        offset = parse_file_name(entry.name)
        if offset is not None:
            offsets.append(offset)
        elif is_snapshot_file(entry.name):
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
    offsets.sort()
    return offsets


def write_snapshot(directory: Path, offset: int, state: ProducerStateMap) -> None:
    """Write the snapshot of `state` at `offset` atomically (module doc). Raises OSError."""
    write_atomically(directory / file_name(offset), encode(offset, state))


def read_snapshot(
    directory: Path, offset: int, expiration_ms: int, producers_max: int = PRODUCERS_MAX_DEFAULT
) -> ProducerStateMap:
    """The state in the snapshot at `offset`. Raises OSError, or SnapshotError for a file that is
    not a valid snapshot of that offset (one over SNAPSHOT_BYTES_MAX is not read)."""
    with open(directory / file_name(offset), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > SNAPSHOT_BYTES_MAX:
            raise SnapshotError(f"{size} bytes exceeds the maximum of {SNAPSHOT_BYTES_MAX}")
        data = f.read(SNAPSHOT_BYTES_MAX + 1)
    stored, state = decode(data, expiration_ms, producers_max)
    if stored != offset:
        raise SnapshotError(f"the file holds offset {stored}, its name says {offset}")
    return state


def delete_snapshots(directory: Path, offsets: list[int]) -> None:
    """Remove these snapshot files (missing ones are fine), then sync the directory. Raises OSError."""
    if not offsets:
        return
    for offset in offsets:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / file_name(offset))
    fsync_dir(directory)
