from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.errors import CorruptMessageError, MessageTooLargeError, UnsupportedForMessageFormatError
from logbroker.storage import record_batch as rb

records_st = st.lists(
    st.tuples(
        st.integers(min_value=-(2**20), max_value=2**36),  # timestamp deltas of 1..5+ varint bytes
        st.one_of(st.none(), st.binary(max_size=300)),
        st.one_of(st.none(), st.binary(max_size=20_000)),
        st.one_of(st.none(), st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=10))),
                                      max_size=3)),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(records_st, st.sampled_from([rb.COMPRESSION_NONE, rb.COMPRESSION_GZIP]), st.integers(0, 2**40),
       st.integers(0, 200), st.integers(0, 45))
def test_encode_decode_roundtrip(records, compression, base_offset, pad, skip):
    ts0 = 1_700_000_000_000
    # padding records push offset deltas past 63, into two-byte varints
    recs = [(ts0, None, b"p", None)] * pad + [(ts0 + d, k, v, h) for d, k, v, h in records]
    data = bytearray(rb.encode_batch(recs, compression))
    infos = rb.validate_batches(data, 1 << 30)
    assert len(infos) == 1 and infos[0].record_count == len(recs)
    rb.set_base_offset(data, 0, base_offset)
    rb.set_leader_epoch(data, 0, 7)
    rb.validate_batches(data, 1 << 30)  # patching is outside the CRC
    h = rb.parse_header(data)
    assert h.partition_leader_epoch == 7
    msgs = rb.decode_batch(bytes(data), 0, h, "t", 3, min_offset=base_offset + skip)
    assert [(m.offset, m.timestamp, m.key, m.value, list(m.headers)) for m in msgs] == [
        (base_offset + i, ts, k, v, list(hd or [])) for i, (ts, k, v, hd) in enumerate(recs) if i >= skip
    ]
    assert h.max_timestamp == max(r[0] for r in recs)


def test_varint_roundtrip_edges():
    for n in [0, 1, -1, 63, 64, -64, -65, 8191, 8192, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63)]:
        enc = rb.encode_varint(n)
        assert rb.decode_varint(enc, 0) == (n, len(enc))
    with pytest.raises(CorruptMessageError):
        rb.decode_varint(b"\xff\xff", 0)


def _batch() -> bytearray:
    return bytearray(rb.encode_batch([(1000, b"k", b"v" * 10, None), (1001, None, b"w", None)]))


def test_validate_rejects_bad_crc():
    data = _batch()
    data[-1] ^= 0xFF
    with pytest.raises(CorruptMessageError, match="CRC"):
        rb.validate_batches(data, 1 << 20)


def test_validate_rejects_hostile_lengths():
    for length in (0, 10, 48, 2**31 - 1, -5):
        data = _batch()
        struct.pack_into(">i", data, 8, length)
        with pytest.raises(CorruptMessageError):
            rb.validate_batches(data, 1 << 20)
    data = _batch()
    struct.pack_into(">i", data, 57, 2**31 - 1)  # recordCount
    with pytest.raises(CorruptMessageError):
        rb.validate_batches(data, 1 << 20)


def test_validate_rejects_truncated_and_trailing_garbage():
    data = _batch()
    with pytest.raises(CorruptMessageError):
        rb.validate_batches(data[:-3], 1 << 20)
    with pytest.raises(CorruptMessageError):
        rb.validate_batches(data + b"\x00" * 20, 1 << 20)
    with pytest.raises(CorruptMessageError):
        rb.validate_batches(b"", 1 << 20)


def test_validate_rejects_magic_and_size():
    data = _batch()
    data[16] = 1
    with pytest.raises(UnsupportedForMessageFormatError):
        rb.validate_batches(data, 1 << 20)
    with pytest.raises(MessageTooLargeError):
        rb.validate_batches(_batch(), 50 + 12)


def test_decode_rejects_hostile_inner_lengths_with_valid_crc():
    # A record claiming a 1 GB value: the CRC is recomputed so only the inner check can catch it.
    data = _batch()
    body = bytearray(data[rb.HEADER_SIZE:])
    # first record: length, attrs, tsDelta, offsetDelta, keyLen(1)=0x02, key 'k', valueLen
    idx = body.index(b"k") + 1
    body[idx:idx + 1] = rb.encode_varint(1 << 30)
    data = data[: rb.HEADER_SIZE] + body
    struct.pack_into(">i", data, 8, len(data) - 12)
    struct.pack_into(">I", data, 17, rb.crc32c(memoryview(data)[21:]))
    rb.validate_batches(data, 1 << 20)  # the header is fine
    with pytest.raises(CorruptMessageError):
        rb.decode_batch(bytes(data), 0, rb.parse_header(data), "t", 0)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 200))
def test_decode_never_crashes_on_garbage(garbage, cut):
    data = _batch()
    body = garbage[:cut] + bytes(data[rb.HEADER_SIZE:])[cut:]
    data = data[: rb.HEADER_SIZE] + body
    struct.pack_into(">i", data, 8, len(data) - 12)
    struct.pack_into(">I", data, 17, rb.crc32c(memoryview(data)[21:]))
    try:
        rb.decode_batch(bytes(data), 0, rb.parse_header(data), "t", 0)
    except (CorruptMessageError, UnsupportedForMessageFormatError):
        pass


def test_iter_batches_skips_partial_tail():
    a, b = _batch(), _batch()
    buf = bytes(a + b[:-5])
    assert [pos for _, pos in rb.iter_batches(buf)] == [0]


# -- the broker's key-only scan of compacted topics' produce payloads ---------------------------------------


@pytest.mark.parametrize("compression", [rb.COMPRESSION_NONE, rb.COMPRESSION_GZIP])
def test_first_null_key_finds_the_first_keyless_record(compression: int) -> None:
    def built(keys: list[bytes | None]) -> bytes:
        builder = rb.BatchBuilder(1000, compression)
        for i, k in enumerate(keys):
            builder.append(1000 + i, k, None if i == 1 else b"v" * (200 * i), [("h", b"x")])
        return builder.build()

    keyed = built([b"a", b"", b"c" * 300])  # an empty key is a key; a null value (tombstone) is fine
    assert rb.first_null_key(keyed, rb.validate_batches(keyed, 1 << 20)[0]) is None
    two = keyed + built([b"a", b"b", None, None])
    infos = rb.validate_batches(two, 1 << 20)
    assert rb.first_null_key(two, infos[1]) == 2
    assert rb.first_null_key(memoryview(two), infos[1]) == 2  # the log's payload view, no copy


def test_first_null_key_refuses_a_record_running_past_its_batch() -> None:
    raw = bytearray(rb.encode_batch([(1000, b"k", b"v", None)]))
    raw[rb.HEADER_SIZE] = 0x7E  # record length 63: past the batch end
    info = rb.validate_batches(bytes(raw), 1 << 20, check_crc=False)[0]
    with pytest.raises(CorruptMessageError, match="runs past"):
        rb.first_null_key(bytes(raw), info)
