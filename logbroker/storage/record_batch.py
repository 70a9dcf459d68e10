"""Kafka RecordBatch v2 (magic 2), byte for byte.

Batch header, 61 bytes, big-endian::

    offset size field
    0      8    baseOffset            int64   assigned by the broker (outside the CRC)
    8      4    batchLength           int32   bytes after this field (total size - 12)
    12     4    partitionLeaderEpoch  int32   set by the broker (outside the CRC)
    16     1    magic                 int8    always 2
    17     4    crc                   uint32  CRC-32C of bytes 21 .. end of batch
    21     2    attributes            int16   bits 0-2 compression (0 none, 1 gzip, 2 snappy,
                                              3 lz4, 4 zstd), bit 3 timestamp type (1 =
                                              LogAppendTime), bit 4 transactional, bit 5 control
    23     4    lastOffsetDelta       int32   recordCount - 1 for a batch written by a producer
    27     8    baseTimestamp         int64   ms
    35     8    maxTimestamp          int64   ms
    43     8    producerId            int64   -1: not idempotent
    51     2    producerEpoch         int16
    53     4    baseSequence          int32
    57     4    recordCount           int32
    61     ...  records

Each record (all varints zigzag-encoded, as protobuf sint32/sint64)::

    length varint | attributes int8 | timestampDelta varlong | offsetDelta varint |
    keyLength varint (-1 = null) | key | valueLength varint (-1 = null) | value |
    headerCount varint | headers: (keyLength varint | key utf-8 | valueLength varint | value)*

The broker only ever touches the header (`validate_batches`, `set_base_offset`,
`set_leader_epoch`), except for compacted topics, whose produced records `first_null_key` walks
up to each key length (no key or value copied) to refuse null keys (and refuses the codecs it
cannot inflate there: snappy, lz4, zstd); records are encoded by `BatchBuilder` and decoded by `decode_batch` on the
client, whose hot loops use table lookups for one- and two-byte varints.

Where aiokafka's compiled RecordBatch v2 codec is installed (`aiokafka.record._crecords`, Cython:
Kafka's own format, so the bytes are the same), the client encodes uncompressed batches with it.

Decoding an uncompressed, CreateTime batch takes the first of, in this order:

1. `logbroker.storage._records.decode_records`, our C extension (_records.c, built by setup.py and
   optional: a machine without a compiler installs without it), which builds the Messages itself
   and leaves those without headers out of the cyclic GC (_records.c says why); LOGBROKER_NO_EXT=1
   switches it off;
2. aiokafka's compiled reader, when the extension is not importable (AIOKAFKA_NO_EXTENSIONS=1
   switches it off), whose records are then copied into Messages;
3. the Python loop in `decode_batch`, which is the reference and the fallback for everything else:
   compression, LogAppendTime, and any batch the compiled decoder refuses (it then raises the
   precise error, or decodes what it accepts).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import crc32c as _crc32c

from logbroker.errors import (
    CorruptMessageError,
    MessageTooLargeError,
    UnsupportedCompressionTypeError,
    UnsupportedForMessageFormatError,
)

HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE = HEADER.size  # 61
assert HEADER_SIZE == 61
LOG_OVERHEAD = 12  # baseOffset + batchLength: the bytes not counted by batchLength
CRC_START = 21
MAGIC = 2
MIN_BATCH_LENGTH = HEADER_SIZE - LOG_OVERHEAD  # 49

_BASE_OFFSET = struct.Struct(">q")
_LENGTH_AND_EPOCH = struct.Struct(">ii")
_LEADER_EPOCH = struct.Struct(">i")

COMPRESSION_MASK = 0x07
COMPRESSION_NONE = 0
COMPRESSION_GZIP = 1
TIMESTAMP_TYPE_MASK = 0x08
TRANSACTIONAL_MASK = 0x10
CONTROL_MASK = 0x20
KNOWN_ATTRIBUTE_BITS = 0x3F
MAX_COMPRESSION_CODEC = 4
COMPRESSED_RECORDS_MAX = 1 << 24  # records claimed by one compressed batch
KEY_SCAN_DECOMPRESSED_BYTES_MAX = 256 << 20  # a gzip batch's body as the broker's key scan inflates it

NO_PRODUCER_ID = -1


def crc32c(data: bytes | bytearray | memoryview) -> int:
    return _crc32c.crc32c(data)


# aiokafka's compiled codec, imported on first use (the broker never needs it; the import pulls in
# aiokafka's client modules, ~50 ms): (DefaultRecordBatch, DefaultRecordBatchBuilder), or None.
# AIOKAFKA_NO_EXTENSIONS (aiokafka's own switch for its pure-Python fallback) selects ours.
_c_codec: tuple[Any, Any] | None = None
_c_codec_loaded = False


# Our C decoder (module docstring), imported here: a few kilobytes, no dependencies.
_decode_records: Callable[[bytes, int, int, str, int, int, type], list[Any] | None] | None = None
if not os.environ.get("LOGBROKER_NO_EXT"):
    try:
        from logbroker.storage import _records
    except ImportError:
        pass
    else:
        _decode_records = _records.decode_records


def _load_c_codec() -> tuple[Any, Any] | None:
    global _c_codec, _c_codec_loaded
    if not _c_codec_loaded:
        _c_codec_loaded = True
        if not os.environ.get("AIOKAFKA_NO_EXTENSIONS"):
            try:
                from aiokafka.record._crecords import DefaultRecordBatch, DefaultRecordBatchBuilder
            except ImportError:
                pass
            else:
                _c_codec = (DefaultRecordBatch, DefaultRecordBatchBuilder)
    return _c_codec


class BatchHeader(NamedTuple):
    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    record_count: int

    @property
    def size_bytes(self) -> int:
        return self.batch_length + LOG_OVERHEAD

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.last_offset_delta + 1

    @property
    def compression(self) -> int:
        return self.attributes & COMPRESSION_MASK

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & CONTROL_MASK)


def parse_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> BatchHeader:
    return BatchHeader._make(HEADER.unpack_from(buf, pos))


class BatchInfo(NamedTuple):
    """Where one validated batch sits in a buffer, and what the broker needs of its header."""

    position: int
    size_bytes: int
    record_count: int
    last_offset_delta: int
    max_timestamp: int
    partition_leader_epoch: int
    producer_id: int  # -1: not idempotent
    producer_epoch: int
    base_sequence: int


def validate_batches(
    buf: bytes | bytearray | memoryview, max_batch_bytes: int, check_crc: bool = True, compacted: bool = False
) -> list[BatchInfo]:
    """Check every batch in a produce payload: sizes, magic, attributes, counts and CRC.

    recordCount must equal lastOffsetDelta + 1, except with `compacted` (batches replicated from a
    compacted log, segment_cleaner.py): there 1 <= recordCount <= lastOffsetDelta + 1 (records
    removed from inside the batch). Producer payloads are always checked strictly.

    Raises `CorruptMessageError` for anything malformed (including a trailing partial batch and
    hostile lengths), `MessageTooLargeError` for a batch above `max_batch_bytes`, and
    `UnsupportedForMessageFormatError` for a magic other than 2. Allocates nothing proportional to
    what the lengths claim: every length is checked against the buffer before use.
    """
    view = memoryview(buf)
    total = len(view)
    if total == 0:
        raise CorruptMessageError("empty record set")
    infos: list[BatchInfo] = []
    pos = 0
    while pos < total:
        if total - pos < HEADER_SIZE:
            raise CorruptMessageError(
                f"truncated batch header at byte {pos}: {total - pos} bytes, need {HEADER_SIZE}"
            )
        h = BatchHeader._make(HEADER.unpack_from(view, pos))
        size = h.batch_length + LOG_OVERHEAD
        if h.batch_length < MIN_BATCH_LENGTH:
            raise CorruptMessageError(f"batch at byte {pos}: batchLength {h.batch_length} below {MIN_BATCH_LENGTH}")
        if size > total - pos:
            raise CorruptMessageError(
                f"batch at byte {pos}: batchLength {h.batch_length} runs past the {total - pos} bytes sent"
            )
        if h.magic != MAGIC:
            raise UnsupportedForMessageFormatError(f"batch at byte {pos}: magic {h.magic}, only 2 is supported")
        if size > max_batch_bytes:
            raise MessageTooLargeError(
                f"batch of {size} bytes exceeds max_message_bytes {max_batch_bytes}: the topic's max_message_bytes "
                "config is the limit (set it at creation, `topics create --config max_message_bytes=N`, or for new "
                "topics `serve --default-topic-config max_message_bytes=N`); a producer's batches stay below its "
                "batch_size_bytes, so keep that under the limit")
        if h.attributes & ~KNOWN_ATTRIBUTE_BITS or h.attributes & COMPRESSION_MASK > MAX_COMPRESSION_CODEC:
            raise UnsupportedForMessageFormatError(f"batch at byte {pos}: unknown attributes {h.attributes:#x}")
        if h.record_count <= 0 or (
            h.last_offset_delta < h.record_count - 1 if compacted else h.last_offset_delta != h.record_count - 1
        ):
            raise CorruptMessageError(
                f"batch at byte {pos}: recordCount {h.record_count} and lastOffsetDelta "
                f"{h.last_offset_delta} disagree"
            )
        # Each record takes at least 7 bytes (length, attributes, 2 deltas, key, value, headers);
        # a compressed body can be far smaller than its records, so only bound it loosely there.
        if h.attributes & COMPRESSION_MASK == COMPRESSION_NONE:
            fits = h.record_count <= (size - HEADER_SIZE) // 7
        else:
            fits = h.record_count <= COMPRESSED_RECORDS_MAX
        if not fits:
            raise CorruptMessageError(
                f"batch at byte {pos}: recordCount {h.record_count} cannot fit in {size - HEADER_SIZE} bytes"
            )
        if check_crc and crc32c(view[pos + CRC_START : pos + size]) != h.crc:
            raise CorruptMessageError(f"batch at byte {pos}: CRC-32C mismatch")
        infos.append(
            BatchInfo(pos, size, h.record_count, h.last_offset_delta, h.max_timestamp, h.partition_leader_epoch,
                      h.producer_id, h.producer_epoch, h.base_sequence)
        )
        pos += size
    return infos


def set_base_offset(buf: bytearray | memoryview, pos: int, base_offset: int) -> None:
    _BASE_OFFSET.pack_into(buf, pos, base_offset)


def set_leader_epoch(buf: bytearray | memoryview, pos: int, epoch: int) -> None:
    _LEADER_EPOCH.pack_into(buf, pos + 12, epoch)


def read_length_and_epoch(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """batchLength and partitionLeaderEpoch of the batch at `pos` (the caller checks bounds)."""
    return _LENGTH_AND_EPOCH.unpack_from(buf, pos + 8)


def batch_crc_ok(buf: bytes | bytearray | memoryview, pos: int, size: int) -> bool:
    stored = struct.unpack_from(">I", buf, pos + 17)[0]
    return crc32c(memoryview(buf)[pos + CRC_START : pos + size]) == stored


# ---------------------------------------------------------------------------------------------
# Varints (zigzag). Tables make the common one- and two-byte cases a single lookup.

_VARINT_TABLE_SIZE = 1 << 14


def _encode_zigzag_slow(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    z &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


# _ZZ[n] = zigzag varint bytes of n, for 0 <= n < 2**14 (lengths, deltas, counts)
_ZZ: list[bytes] = [_encode_zigzag_slow(n) for n in range(_VARINT_TABLE_SIZE)]
_MINUS_ONE = _encode_zigzag_slow(-1)


def encode_varint(n: int) -> bytes:
    if 0 <= n < _VARINT_TABLE_SIZE:
        return _ZZ[n]
    return _encode_zigzag_slow(n)


def decode_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """(value, next position) of the zigzag varint at `pos`; raises CorruptMessageError if malformed."""
    shift = 0
    z = 0
    end = len(buf)
    while True:
        if pos >= end or shift > 63:
            raise CorruptMessageError("malformed varint")
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if b < 0x80:
            return (z >> 1) ^ -(z & 1), pos
        shift += 7


# _ONE[b] = decoded value of the one-byte varint b (b < 0x80)
_ONE: list[int] = [(b >> 1) ^ -(b & 1) for b in range(0x80)]
# _TWO[z] = value of the two-byte varint whose 14 payload bits are z = (b0 & 0x7F) | (b1 << 7)
_TWO: list[int] = [(z >> 1) ^ -(z & 1) for z in range(1 << 14)]


# ---------------------------------------------------------------------------------------------
# Encoding (client side)

Headers = list[tuple[str, bytes | None]]
# A consumed record's headers: immutable, the shared empty tuple when it has none (no allocation
# per record, and records stay hashable plain data)
RecordHeaders = tuple[tuple[str, bytes | None], ...]
# A record as copied from another log: (timestamp_ms, key, value, headers).
CopiedRecord = tuple[int, bytes | None, bytes | None, Sequence[tuple[str, bytes | None]] | None]


def _encode_headers(headers: Sequence[tuple[str, bytes | None]]) -> bytes:
    out = bytearray(encode_varint(len(headers)))
    for hk, hv in headers:
        kb = hk.encode()
        out += encode_varint(len(kb))
        out += kb
        if hv is None:
            out += _MINUS_ONE
        else:
            out += encode_varint(len(hv))
            out += hv
    return bytes(out)


_NO_HEADERS: Headers = []  # handed to the C builder for records without headers; never mutated
_C_BATCH_BYTES_MAX = (1 << 31) - 1  # the C builder's size limit where the caller checks its own
# Batches whose first value is larger are built in Python: for 100 KB values the C builder (with its
# own CRC-32C) encodes ~2.2 GB/s against Python's ~15 GB/s; for 100 B values it is ~1.6x faster.
_C_VALUE_BYTES_MAX = 4096


class BatchBuilder:
    """Accumulates records into the body of one RecordBatch v2; `build()` adds header and CRC.

    The header is reserved up front so `build()` patches it in place: one copy at the end.
    Uncompressed batches are encoded by aiokafka's C builder when it is installed (`_c`); it takes
    the first record's timestamp as baseTimestamp, so a first record stamped otherwise than
    `base_timestamp_ms` (or a negative base, its "unset" marker) switches this batch to Python, as
    does a first value above _C_VALUE_BYTES_MAX (large values are faster in Python).

    `limit_bytes` bounds what `append_many` puts in the batch (its encoded, uncompressed size with
    the header; the C builder checks it itself). `append` and `try_append` leave sizes to the caller,
    who keeps within `limit_bytes` (past it the C builder refuses a record: `append` raises).
    """

    __slots__ = ("_buf", "_count", "_base_ts", "_max_ts", "_compression", "_c", "_limit")

    def __init__(
        self, base_timestamp_ms: int, compression: int = COMPRESSION_NONE, limit_bytes: int = _C_BATCH_BYTES_MAX
    ) -> None:
        self._buf = bytearray(HEADER_SIZE)
        self._count = 0
        self._base_ts = base_timestamp_ms
        self._max_ts = base_timestamp_ms
        self._compression = compression
        self._limit = min(limit_bytes, _C_BATCH_BYTES_MAX - 1)
        self._c: Any = None
        if compression == COMPRESSION_NONE and base_timestamp_ms >= 0:
            codec = _load_c_codec()
            if codec is not None:
                # the C builder keeps a batch strictly below its limit: one more keeps ours within it
                self._c = codec[1](MAGIC, 0, 0, NO_PRODUCER_ID, -1, -1, self._limit + 1)

    @property
    def record_count(self) -> int:
        return self._count

    @property
    def size_bytes(self) -> int:
        c = self._c
        return len(self._buf) if c is None else c.size()

    def try_append(
        self, timestamp_ms: int, key: bytes | None, value: bytes | None, headers: Headers | None,
        size: int, limit_bytes: int,
    ) -> int:
        """`append` if the batch stays within `limit_bytes` with `size` more bytes, else -1 (the
        producer's hot path: one call instead of `size_bytes` and `append`)."""
        c = self._c
        if c is not None:
            if c.size() + size > limit_bytes:
                return -1
            od = self._count
            if od:
                c.append(od, timestamp_ms, key, value, headers or _NO_HEADERS)
                self._count = od + 1
                return od
        elif len(self._buf) + size > limit_bytes:
            return -1
        return self.append(timestamp_ms, key, value, headers)

    def append(
        self, timestamp_ms: int, key: bytes | None, value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] | None = None,
    ) -> int:
        """Encode one record; returns its offset delta within the batch."""
        od = self._count
        c = self._c
        if c is not None:
            if od or (timestamp_ms == self._base_ts and (value is None or len(value) <= _C_VALUE_BYTES_MAX)):
                if c.append(od, timestamp_ms, key, value, headers or _NO_HEADERS) is None:
                    raise ValueError(f"record past limit_bytes {self._limit}")  # a caller's bug
                self._count = od + 1
                return od
            # a first record stamped otherwise than the base (Python keeps the base), or a large value:
            # the C builder pays per record, Python's bytearray per byte, and its CRC is slower than ours
            self._c = None
        zz = _ZZ
        td = timestamp_ms - self._base_ts
        if timestamp_ms > self._max_ts:
            self._max_ts = timestamp_ms
        tdv = zz[td] if 0 <= td < 16384 else _encode_zigzag_slow(td)
        odv = zz[od] if od < 16384 else _encode_zigzag_slow(od)
        if key is None:
            kl = _MINUS_ONE
            klen = 0
        else:
            klen = len(key)
            kl = zz[klen] if klen < 16384 else _encode_zigzag_slow(klen)
        if value is None:
            vl = _MINUS_ONE
            vlen = 0
        else:
            vlen = len(value)
            vl = zz[vlen] if vlen < 16384 else _encode_zigzag_slow(vlen)
        hb = _encode_headers(headers) if headers else b"\x00"
        body_len = 1 + len(tdv) + len(odv) + len(kl) + klen + len(vl) + vlen + len(hb)
        buf = self._buf
        buf += zz[body_len] if body_len < 16384 else _encode_zigzag_slow(body_len)
        buf += b"\x00"
        buf += tdv
        buf += odv
        buf += kl
        if key is not None:
            buf += key
        buf += vl
        if value is not None:
            buf += value
        buf += hb
        self._count = od + 1
        return od

    def append_many(
        self, timestamp_ms: int, keys: Sequence[bytes | None] | None, values: Sequence[bytes | None],
        headers: Headers | None = None,
    ) -> int:
        """Append the records (keys[i], values[i]) in order, each stamped `timestamp_ms` and carrying
        `headers`, while the batch stays within `limit_bytes` (an empty batch takes its first record
        whatever its size); returns how many were appended. `keys` None: every key is null.

        Types are the caller's to check (bytes or None): the C builder would refuse one half-way.
        With the C builder this is one C call per record: the producer's batch path (`send_many`).
        """
        n = len(values)
        if n == 0:
            return 0
        first = self._count
        i = 0
        if first == 0:  # the first record decides C or Python (see the class docstring)
            self.append(timestamp_ms, None if keys is None else keys[0], values[0], headers)
            i = 1
        c = self._c
        if c is not None:
            od = self._count
            app = c.append
            hdrs = headers or _NO_HEADERS
            if keys is None:
                for v in values[i:] if i else values:
                    if app(od, timestamp_ms, None, v, hdrs) is None:  # None: the batch is full
                        break
                    od += 1
            else:
                for j in range(i, n):
                    if app(od, timestamp_ms, keys[j], values[j], hdrs) is None:
                        break
                    od += 1
            self._count = od
            return od - first
        self._append_within_limit((timestamp_ms, None if keys is None else keys[j], values[j], headers)
                                  for j in range(i, n))
        return self._count - first

    def append_copies(self, records: Sequence[CopiedRecord], start: int, stop: int) -> int:
        """Append records[start:stop], each (timestamp_ms, key, value, headers) as it was read from
        another log, in order while the batch stays within `limit_bytes` (an empty batch takes its
        first record whatever its size); returns how many were appended. The copy path
        (`Producer.send_records`, the mirror): one C call per record. Types are the caller's to check.
        """
        if start >= stop:
            return 0
        first = self._count
        i = start
        if first == 0:  # the first record decides C or Python (see the class docstring)
            t, k, v, h = records[i]
            self.append(t, k, v, h)
            i += 1
        c = self._c
        if c is not None:
            od = self._count
            app = c.append
            for j in range(i, stop):
                t, k, v, h = records[j]
                if app(od, t, k, v, h or _NO_HEADERS) is None:  # None: the batch is full
                    break
                od += 1
            self._count = od
            return od - first
        self._append_within_limit(records[j] for j in range(i, stop))
        return self._count - first

    def _append_within_limit(self, records: Iterable[CopiedRecord]) -> None:
        """The Python builder's `append` of each record until one takes the batch past `limit_bytes`
        (taken back; the batch's first record, appended before, always stays)."""
        buf = self._buf
        limit = self._limit
        append = self.append
        for t, k, v, h in records:
            mark, max_ts = len(buf), self._max_ts
            append(t, k, v, h)
            if len(buf) > limit:  # over: take it back
                del buf[mark:]
                self._count -= 1
                self._max_ts = max_ts
                break

    def build(self, producer_id: int = NO_PRODUCER_ID, producer_epoch: int = -1, base_sequence: int = -1) -> bytes:
        if self._count == 0:
            raise ValueError("empty batch")
        c = self._c
        if c is not None:
            c.set_producer_state(producer_id, producer_epoch, base_sequence)
            return bytes(c.build())
        attributes = self._compression
        if self._compression == COMPRESSION_GZIP:
            body = zlib.compress(bytes(memoryview(self._buf)[HEADER_SIZE:]), 1, 31)
            buf = bytearray(HEADER_SIZE)
            buf += body
        elif self._compression == COMPRESSION_NONE:
            buf = self._buf
        else:
            raise ValueError(f"unsupported compression codec {self._compression}")
        HEADER.pack_into(
            buf,
            0,
            0,
            len(buf) - LOG_OVERHEAD,
            -1,
            MAGIC,
            0,
            attributes,
            self._count - 1,
            self._base_ts,
            self._max_ts,
            producer_id,
            producer_epoch,
            base_sequence,
            self._count,
        )
        struct.pack_into(">I", buf, 17, crc32c(memoryview(buf)[CRC_START:]))
        return bytes(buf)


def encode_batch(
    records: list[tuple[int, bytes | None, bytes | None, Headers | None]],
    compression: int = COMPRESSION_NONE,
) -> bytes:
    """One batch from (timestamp_ms, key, value, headers) tuples: a convenience for tests and tools."""
    if not records:
        raise ValueError("empty batch")
    builder = BatchBuilder(records[0][0], compression)
    for ts, key, value, headers in records:
        builder.append(ts, key, value, headers)
    return builder.build()


# ---------------------------------------------------------------------------------------------
# Decoding (client side)


class Message(NamedTuple):
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: RecordHeaders
    timestamp: int


_new_message = tuple.__new__


def _decode_headers(buf: bytes, pos: int, count: int, end: int) -> tuple[RecordHeaders, int]:
    if count < 0 or count > end - pos:
        raise CorruptMessageError(f"hostile header count {count}")
    headers: list[tuple[str, bytes | None]] = []
    for _ in range(count):
        kl, pos = decode_varint(buf, pos)
        if kl < 0 or pos + kl > end:
            raise CorruptMessageError("header key length out of bounds")
        hk = buf[pos : pos + kl].decode("utf-8", "replace")
        pos += kl
        vl, pos = decode_varint(buf, pos)
        if vl < 0:
            hv = None
        else:
            if pos + vl > end:
                raise CorruptMessageError("header value length out of bounds")
            hv = buf[pos : pos + vl]
            pos += vl
        headers.append((hk, hv))
    return tuple(headers), pos


def first_null_key(buf: bytes | bytearray | memoryview, info: BatchInfo) -> int | None:
    """The offset delta of the first record with a null key in the batch `validate_batches`
    described as `info`, or None when every record has a key (and for control batches).

    A key-only walk: per record, its length, attributes, timestamp and offset deltas and key length;
    nothing is copied from an uncompressed batch. Raises UnsupportedCompressionTypeError for a
    snappy/lz4/zstd batch (the broker cannot inflate it, so cannot check or compact its keys), and
    CorruptMessageError for a record whose length runs past the batch or a gzip body that does not
    inflate (within KEY_SCAN_DECOMPRESSED_BYTES_MAX)."""
    view = memoryview(buf)
    pos = info.position
    attributes = int.from_bytes(view[pos + 21 : pos + 23], "big", signed=True)
    codec = attributes & COMPRESSION_MASK
    if attributes & CONTROL_MASK:
        return None
    if codec not in (COMPRESSION_NONE, COMPRESSION_GZIP):
        raise UnsupportedCompressionTypeError(
            f"the batch at byte {pos} is compressed with codec {codec} (snappy, lz4 or zstd), which this broker "
            "cannot read: a cleanup_policy=compact topic accepts uncompressed or gzip batches only")
    data: bytes | memoryview = view
    p, end = pos + HEADER_SIZE, pos + info.size_bytes
    if codec == COMPRESSION_GZIP:
        inflater = zlib.decompressobj(47)
        try:
            data = inflater.decompress(view[p:end], KEY_SCAN_DECOMPRESSED_BYTES_MAX)
        except zlib.error as e:
            raise CorruptMessageError(f"gzip batch at byte {pos}: {e}") from None
        if inflater.unconsumed_tail:
            raise CorruptMessageError(f"gzip batch at byte {pos} inflates past {KEY_SCAN_DECOMPRESSED_BYTES_MAX} bytes")
        p, end = 0, len(data)
    for _ in range(info.record_count):
        length, q = decode_varint(data, p)
        rec_end = q + length
        if length < 6 or rec_end > end:
            raise CorruptMessageError(f"record of {length} bytes runs past its batch at byte {pos}")
        _, q = decode_varint(data, q + 1)  # timestampDelta, after attributes
        offset_delta, q = decode_varint(data, q)
        key_length, q = decode_varint(data, q)
        if key_length < 0:
            return offset_delta
        p = rec_end
    return None


SAMPLED_KEYS_INFLATE_BYTES_MAX = 4 << 20  # a sampled gzip batch's body as the heat sampler inflates it


def batch_keys(buf: bytes | bytearray | memoryview, pos: int, key_bytes_max: int) -> list[bytes | None]:
    """The keys of the records of the batch at `pos` (None: a null key), each cut to `key_bytes_max`
    bytes: the heat sampler's walk (server/partition_heat.py), like `first_null_key` it reads each
    record's length, deltas and key only. Best effort and never raising for what it cannot read: a
    control batch, a snappy/lz4/zstd batch, a gzip body that does not inflate within
    SAMPLED_KEYS_INFLATE_BYTES_MAX, or a malformed record give the keys read so far (or none). The
    batch must be whole (`validate_batches` checked it)."""
    view = memoryview(buf)
    if len(view) - pos < HEADER_SIZE:
        return []
    h = parse_header(view, pos)
    codec = h.attributes & COMPRESSION_MASK
    if h.attributes & CONTROL_MASK or codec not in (COMPRESSION_NONE, COMPRESSION_GZIP):
        return []
    data: bytes | memoryview = view
    p, end = pos + HEADER_SIZE, pos + h.size_bytes
    if end > len(view):
        return []
    if codec == COMPRESSION_GZIP:
        inflater = zlib.decompressobj(47)
        try:
            data = inflater.decompress(view[p:end], SAMPLED_KEYS_INFLATE_BYTES_MAX)
        except zlib.error:
            return []
        p, end = 0, len(data)
    keys: list[bytes | None] = []
    try:
        for _ in range(min(h.record_count, COMPRESSED_RECORDS_MAX)):
            length, q = decode_varint(data, p)
            rec_end = q + length
            if length < 6 or rec_end > end:
                break
            _, q = decode_varint(data, q + 1)  # timestampDelta, after attributes
            _, q = decode_varint(data, q)  # offsetDelta
            key_length, q = decode_varint(data, q)
            keys.append(None if key_length < 0 else bytes(data[q : q + min(key_length, key_bytes_max, rec_end - q)]))
            p = rec_end
    except (IndexError, ValueError, CorruptMessageError):
        pass
    return keys


def iter_batches(buf: bytes | memoryview) -> Iterator[tuple[BatchHeader, int]]:
    """Complete batches in a fetched chunk as (header, position); a trailing partial batch is skipped."""
    total = len(buf)
    pos = 0
    while total - pos >= HEADER_SIZE:
        h = BatchHeader._make(HEADER.unpack_from(buf, pos))
        if h.batch_length < MIN_BATCH_LENGTH:
            raise CorruptMessageError(f"batch at byte {pos}: batchLength {h.batch_length}")
        size = h.batch_length + LOG_OVERHEAD
        if size > total - pos:
            return
        yield h, pos
        pos += size


_BATCH_LENGTH = struct.Struct(">i")  # at byte 8
_RECORD_COUNT = struct.Struct(">i")  # at byte 57


def count_records(buf: bytes | memoryview) -> int:
    """The records of the complete batches in `buf` (fetch results, whole batches), from each batch
    header's recordCount: one header read per batch, no record decoded, nothing checked (a trailing
    partial batch or a nonsense length ends the count)."""
    total = len(buf)
    pos = count = 0
    while total - pos >= HEADER_SIZE:
        size = _BATCH_LENGTH.unpack_from(buf, pos + 8)[0] + LOG_OVERHEAD
        if size < HEADER_SIZE or size > total - pos:
            break
        count += _RECORD_COUNT.unpack_from(buf, pos + 57)[0]
        pos += size
    return count


def check_batch(buf: bytes, pos: int, h: BatchHeader) -> None:
    """The checks `decode_batch` makes before it decodes (magic, bounds, CRC-32C), raising as it
    does, for a reader that needs the batch intact but not its records."""
    size = h.batch_length + LOG_OVERHEAD
    if h.magic != MAGIC:
        raise UnsupportedForMessageFormatError(f"magic {h.magic}")
    if pos + size > len(buf):
        raise CorruptMessageError(f"batch at offset {h.base_offset} runs past the buffer")
    if crc32c(memoryview(buf)[pos + CRC_START : pos + size]) != h.crc:
        raise CorruptMessageError(f"CRC-32C mismatch in batch at offset {h.base_offset}")


def decode_batch(
    buf: bytes, pos: int, h: BatchHeader, topic: str, partition: int, min_offset: int = 0
) -> list[Message]:
    """Every record of the batch at `pos` (header `h`) whose offset is >= `min_offset`, as Messages.

    Checks the CRC first: a corrupt batch raises CorruptMessageError, it is never decoded. Hostile
    inner lengths are caught by checking each record ends where its length says. This is the
    consumer's hot loop: an uncompressed CreateTime batch goes to the C extension (or, without it,
    aiokafka's reader); the Python loop below is the reference, where one- and two-byte varints
    (record lengths of ~100-byte values, offset and timestamp deltas from 64 on) are single table
    lookups, so a typical record makes no call.
    """
    # Over 80 lines on purpose: the per-record loop alone is ~90 lines of inlined varint and header
    # decoding with its tables bound to locals; a helper call per record (or per field) would slow
    # the consumer's poll, which issue 14 forbids. The checks above the loop run once per batch.
    check_batch(buf, pos, h)
    size = h.batch_length + LOG_OVERHEAD
    attributes = h.attributes
    if attributes & CONTROL_MASK:
        return []
    codec = attributes & COMPRESSION_MASK
    if not attributes & (COMPRESSION_MASK | TIMESTAMP_TYPE_MASK) and buf.__class__ is bytes:
        ext = _decode_records
        if ext is not None:
            # None: malformed or beyond int64, and the reference below says what exactly
            fast = ext(buf, pos, size, topic, partition, min_offset - h.base_offset, Message)
            if fast is not None:
                return fast
        elif (c_codec := _c_codec if _c_codec_loaded else _load_c_codec()) is not None:
            fast = _decode_batch_c(c_codec[0], buf, pos, size, topic, partition, min_offset - h.base_offset)
            if fast is not None:
                return fast
    if codec == COMPRESSION_NONE:
        data = buf
        p = pos + HEADER_SIZE
        end = pos + size
    elif codec == COMPRESSION_GZIP:
        try:
            data = zlib.decompress(memoryview(buf)[pos + HEADER_SIZE : pos + size], 47)
        except zlib.error as e:
            raise CorruptMessageError(f"gzip batch at offset {h.base_offset}: {e}") from None
        p = 0
        end = len(data)
    else:
        raise UnsupportedForMessageFormatError(f"compression codec {codec} is not supported by this client")
    base_offset = h.base_offset
    base_ts = h.base_timestamp
    append_ts = max(h.max_timestamp, 0) if attributes & TIMESTAMP_TYPE_MASK else None
    skip = min_offset - base_offset  # offset deltas below this are not returned
    one = _ONE
    two = _TWO
    new = _new_message
    cls = Message
    out: list[Message] = []
    append = out.append
    headers: RecordHeaders
    try:
        for _ in range(h.record_count):
            # length
            b = data[p]
            if b < 0x80:
                rec_end = p + 1 + one[b]
                p += 2  # and the attributes byte
            else:
                c = data[p + 1]
                if c < 0x80:
                    rec_end = p + 2 + two[(b & 0x7F) | (c << 7)]
                    p += 3
                else:
                    length, p = decode_varint(data, p)
                    rec_end = p + length
                    p += 1
            # timestampDelta
            b = data[p]
            if b < 0x80:
                td = one[b]
                p += 1
            else:
                c = data[p + 1]
                if c < 0x80:
                    td = two[(b & 0x7F) | (c << 7)]
                    p += 2
                else:
                    td, p = decode_varint(data, p)
            # offsetDelta
            b = data[p]
            if b < 0x80:
                od = one[b]
                p += 1
            else:
                c = data[p + 1]
                if c < 0x80:
                    od = two[(b & 0x7F) | (c << 7)]
                    p += 2
                else:
                    od, p = decode_varint(data, p)
            # key
            b = data[p]
            if b == 1:  # -1: null, the common case
                key = None
                p += 1
            else:
                if b < 0x80:
                    kl = one[b]
                    p += 1
                else:
                    kl, p = decode_varint(data, p)
                if kl < 0:
                    key = None
                else:
                    key = data[p : p + kl]
                    p += kl
            # value
            b = data[p]
            if b < 0x80:
                vl = one[b]
                p += 1
            else:
                c = data[p + 1]
                if c < 0x80:
                    vl = two[(b & 0x7F) | (c << 7)]
                    p += 2
                else:
                    vl, p = decode_varint(data, p)
            if vl < 0:
                value = None
            else:
                value = data[p : p + vl]
                p += vl
            # headers
            b = data[p]
            p += 1
            if b == 0:
                headers = ()
            else:
                if b >= 0x80:
                    b, p = decode_varint(data, p - 1)
                else:
                    b = one[b]
                headers, p = _decode_headers(data, p, b, rec_end)
            if p != rec_end or rec_end > end:
                raise CorruptMessageError(f"record lengths disagree in batch at offset {base_offset}")
            if od >= skip:
                append(new(cls, (topic, partition, base_offset + od, key, value, headers,
                                 base_ts + td if append_ts is None else append_ts)))
    except IndexError:
        raise CorruptMessageError(f"record runs past the end of batch at offset {base_offset}") from None
    return out


def _decode_batch_c(
    reader: Any, buf: bytes, pos: int, size: int, topic: str, partition: int, skip: int
) -> list[Message] | None:
    """decode_batch's fast path, through aiokafka's C reader, for an uncompressed CreateTime batch
    whose CRC has been checked; None when the reader refuses it (decode_batch then decodes it in
    Python, which raises the precise error or accepts what the C reader is stricter about, such as
    a header key that is not UTF-8).

    The reader gets a memoryview of `buf`: it copies keys and values out as bytes, and its
    varint reads, checked to start inside the batch, end at the latest on the NUL byte CPython
    keeps after every bytes object, so they never leave `buf`'s memory.
    """
    new = _new_message
    cls = Message
    try:
        records = reader(memoryview(buf)[pos : pos + size])
        base = records.base_offset
        # reader's timestamp is None for a stamp of -1 (its "no timestamp"); ours stays -1. The
        # skip filter applies even when skip <= 0: a crafted batch may carry negative offset deltas
        return [
            new(cls, (topic, partition, r.offset, r.key, r.value, tuple(h) if (h := r.headers) else (),
                      -1 if (t := r.timestamp) is None else t))
            for r in records if r.offset - base >= skip
        ]
    except Exception:
        return None
