"""The consumer's fast decoder gives exactly what record_batch.decode_batch gives, errors included."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.client.record_decoder import decode_records
from logbroker.errors import CorruptMessageError, UnsupportedForMessageFormatError
from logbroker.storage import record_batch as rb

records_st = st.lists(
    st.tuples(
        st.integers(min_value=-(2**20), max_value=2**36),  # timestamp deltas of 1..5+ varint bytes
        st.one_of(st.none(), st.binary(max_size=200)),
        st.one_of(st.none(), st.binary(max_size=9_000)),  # value lengths of 1, 2 and 3 varint bytes
        st.one_of(st.none(), st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=8))),
                                      max_size=3)),
    ),
    min_size=1,
    max_size=30,
)


def _as_tuples(msgs: list[rb.Message]) -> list[tuple[object, ...]]:
    return [tuple(m) for m in msgs]


@settings(max_examples=200, deadline=None)
@given(records_st, st.sampled_from([rb.COMPRESSION_NONE, rb.COMPRESSION_GZIP]), st.integers(0, 2**40),
       st.integers(0, 40), st.integers(0, 300))
def test_same_messages_as_decode_batch(records, compression, base_offset, skip, pad):
    ts0 = 1_700_000_000_000
    recs = [(ts0 + d, k, v, h) for d, k, v, h in records]
    builder = rb.BatchBuilder(ts0, compression)
    for _ in range(pad):  # offset deltas above 63 take two varint bytes
        builder.append(ts0, None, b"p")
    for ts, k, v, h in recs:
        builder.append(ts, k, v, h)
    data = bytearray(builder.build())
    rb.set_base_offset(data, 0, base_offset)
    buf = b"\x00" * 7 + bytes(data)  # not at position 0
    h = rb.parse_header(buf, 7)
    min_offset = base_offset + pad + skip
    expected = rb.decode_batch(buf, 7, h, "topic", 2, min_offset)
    got = decode_records(buf, 7, h, "topic", 2, min_offset)
    assert _as_tuples(got) == _as_tuples(expected)
    assert all(type(m) is rb.Message for m in got)
    assert [m.offset for m in got] == list(range(min_offset, base_offset + pad + len(recs)))


def test_log_append_time_and_control_batches():
    data = bytearray(rb.encode_batch([(1000, b"k", b"v", None), (1005, None, b"w", None)]))
    attrs = struct.unpack_from(">h", data, 21)[0]
    struct.pack_into(">h", data, 21, attrs | rb.TIMESTAMP_TYPE_MASK)
    struct.pack_into(">q", data, 35, 77_777)  # maxTimestamp: the append time
    struct.pack_into(">I", data, 17, rb.crc32c(memoryview(data)[21:]))
    buf = bytes(data)
    got = decode_records(buf, 0, rb.parse_header(buf), "t", 0)
    assert [m.timestamp for m in got] == [77_777, 77_777]
    assert _as_tuples(got) == _as_tuples(rb.decode_batch(buf, 0, rb.parse_header(buf), "t", 0))

    struct.pack_into(">h", data, 21, attrs | rb.CONTROL_MASK)
    struct.pack_into(">I", data, 17, rb.crc32c(memoryview(data)[21:]))
    buf = bytes(data)
    assert decode_records(buf, 0, rb.parse_header(buf), "t", 0) == []


def test_bad_crc_magic_and_codec_are_rejected():
    data = bytearray(rb.encode_batch([(1000, b"k", b"v" * 10, None)]))
    bad = bytearray(data)
    bad[-1] ^= 0xFF
    with pytest.raises(CorruptMessageError, match="CRC"):
        decode_records(bytes(bad), 0, rb.parse_header(bad), "t", 0)
    bad = bytearray(data)
    bad[16] = 1
    with pytest.raises(UnsupportedForMessageFormatError):
        decode_records(bytes(bad), 0, rb.parse_header(bad), "t", 0)
    bad = bytearray(data)
    struct.pack_into(">h", bad, 21, 3)  # lz4
    struct.pack_into(">I", bad, 17, rb.crc32c(memoryview(bad)[21:]))
    with pytest.raises(UnsupportedForMessageFormatError):
        decode_records(bytes(bad), 0, rb.parse_header(bad), "t", 0)


def _recrc(data: bytearray) -> bytes:
    struct.pack_into(">i", data, 8, len(data) - 12)
    struct.pack_into(">I", data, 17, rb.crc32c(memoryview(data)[21:]))
    return bytes(data)


def test_hostile_inner_lengths_with_valid_crc():
    data = bytearray(rb.encode_batch([(1000, b"k", b"v" * 10, None), (1001, None, b"w", None)]))
    body = bytearray(data[rb.HEADER_SIZE:])
    idx = body.index(b"k") + 1
    body[idx:idx + 1] = rb.encode_varint(1 << 30)
    buf = _recrc(data[: rb.HEADER_SIZE] + body)
    with pytest.raises(CorruptMessageError):
        decode_records(buf, 0, rb.parse_header(buf), "t", 0)


def test_gzip_garbage_is_corrupt_not_a_zlib_error():
    data = bytearray(rb.encode_batch([(1000, None, b"v" * 50, None)], rb.COMPRESSION_GZIP))
    data[rb.HEADER_SIZE + 12] ^= 0xFF
    buf = _recrc(data)
    with pytest.raises(CorruptMessageError):
        decode_records(buf, 0, rb.parse_header(buf), "t", 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 200))
def test_garbage_raises_only_corrupt_or_unsupported(garbage, cut):
    data = bytearray(rb.encode_batch([(1000, b"k", b"v" * 10, None), (1001, None, b"w" * 200, [("h", b"x")])]))
    body = garbage[:cut] + bytes(data[rb.HEADER_SIZE:])[cut:]
    buf = _recrc(data[: rb.HEADER_SIZE] + body)
    with contextlib.suppress(CorruptMessageError, UnsupportedForMessageFormatError):
        decode_records(buf, 0, rb.parse_header(buf), "t", 0)
