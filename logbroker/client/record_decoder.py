"""The consumer's hot loop: records of one RecordBatch v2 -> Messages, with two-byte varint tables.

Same contract as `logbroker.storage.record_batch.decode_batch` (CRC checked first, gzip, control
batches yield nothing, LogAppendTime, hostile lengths -> CorruptMessageError), but faster for
real batches: there the record length of a 100-byte value (zigzag 216), offset deltas from 64 on
and timestamp deltas from 64 ms on take two bytes, which `decode_batch` hands to the generic
`decode_varint` call. Here a two-byte varint is one lookup in a 16 Ki-entry table, so a typical
record costs no function call at all. Longer varints still go to `decode_varint`.

Record layout (all varints zigzag)::

    length | attributes int8 | timestampDelta | offsetDelta | keyLength (-1 null) | key |
    valueLength (-1 null) | value | headerCount | headers
"""

from __future__ import annotations

import zlib

from logbroker.errors import CorruptMessageError, UnsupportedForMessageFormatError
from logbroker.storage.record_batch import (
    COMPRESSION_GZIP,
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    CONTROL_MASK,
    CRC_START,
    HEADER_SIZE,
    LOG_OVERHEAD,
    MAGIC,
    TIMESTAMP_TYPE_MASK,
    BatchHeader,
    Headers,
    Message,
    crc32c,
    decode_varint,
)

# _ONE[b]: value of the one-byte varint b (b < 0x80)
_ONE: list[int] = [(b >> 1) ^ -(b & 1) for b in range(0x80)]
# _TWO[z]: value of the two-byte varint whose 14 payload bits are z = (b0 & 0x7F) | (b1 << 7)
_TWO: list[int] = [(z >> 1) ^ -(z & 1) for z in range(1 << 14)]

_new = tuple.__new__


def _decode_headers(data: bytes, p: int, count: int, end: int) -> tuple[Headers, int]:
    if count < 0 or count > end - p:
        raise CorruptMessageError(f"hostile header count {count}")
    headers: Headers = []
    for _ in range(count):
        kl, p = decode_varint(data, p)
        if kl < 0 or p + kl > end:
            raise CorruptMessageError("header key length out of bounds")
        hk = data[p : p + kl].decode("utf-8", "replace")
        p += kl
        vl, p = decode_varint(data, p)
        if vl < 0:
            hv = None
        else:
            if p + vl > end:
                raise CorruptMessageError("header value length out of bounds")
            hv = data[p : p + vl]
            p += vl
        headers.append((hk, hv))
    return headers, p


def decode_records(
    buf: bytes, pos: int, h: BatchHeader, topic: str, partition: int, min_offset: int = 0
) -> list[Message]:
    """Every record of the batch at `pos` (header `h`) whose offset is >= `min_offset`."""
    size = h.batch_length + LOG_OVERHEAD
    if h.magic != MAGIC:
        raise UnsupportedForMessageFormatError(f"magic {h.magic}")
    if pos + size > len(buf):
        raise CorruptMessageError(f"batch at offset {h.base_offset} runs past the buffer")
    if crc32c(memoryview(buf)[pos + CRC_START : pos + size]) != h.crc:
        raise CorruptMessageError(f"CRC-32C mismatch in batch at offset {h.base_offset}")
    attributes = h.attributes
    if attributes & CONTROL_MASK:
        return []
    codec = attributes & COMPRESSION_MASK
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
    new = _new
    cls = Message
    out: list[Message] = []
    append = out.append
    headers: Headers
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
                headers = []
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
