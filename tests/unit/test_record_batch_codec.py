"""The compiled codec (aiokafka's Cython RecordBatch v2 reader and builder) against the Python one:
the same bytes out of BatchBuilder, the same Messages (or the same error) out of decode_batch."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.errors import LogbrokerError
from logbroker.storage import record_batch as rb

C_CODEC = rb._load_c_codec()
pytestmark = pytest.mark.skipif(C_CODEC is None, reason="aiokafka's compiled codec is not installed")


@pytest.fixture(autouse=True, scope="module")
def _without_our_extension() -> Iterator[None]:
    """Here "compiled" means aiokafka's reader: our own C decoder (tests/unit/test_records_ext.py)
    would otherwise take its place."""
    saved = rb._decode_records
    rb._decode_records = None
    try:
        yield
    finally:
        rb._decode_records = saved


@contextlib.contextmanager
def pure_python() -> Iterator[None]:
    """Run a block with the compiled codec switched off."""
    rb._c_codec = None
    try:
        yield
    finally:
        rb._c_codec = C_CODEC


records_st = st.lists(
    st.tuples(
        st.integers(min_value=-(2**20), max_value=2**36),
        st.one_of(st.none(), st.binary(max_size=300)),
        st.one_of(st.none(), st.binary(max_size=3_000)),
        st.one_of(st.none(), st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=10))),
                                      max_size=3)),
    ),
    min_size=1,
    max_size=40,
)


def _encode(recs: list, base_ts: int) -> bytes:
    builder = rb.BatchBuilder(base_ts)
    for ts, k, v, h in recs:
        builder.append(ts, k, v, h)
    return builder.build(producer_id=5, producer_epoch=2, base_sequence=9)


def _decoded(data: bytes, min_offset: int) -> list[rb.Message] | str:
    try:
        return rb.decode_batch(data, 0, rb.parse_header(data), "t", 3, min_offset)
    except LogbrokerError as e:
        return f"{type(e).__name__}: {e}"


@settings(max_examples=150, deadline=None)
@given(records_st, st.integers(-1, 2**41), st.integers(0, 200), st.integers(0, 45), st.booleans())
def test_same_bytes_and_messages(records, ts0, pad, skip, first_at_base):
    recs = [(ts0, None, b"p", None)] * pad + [(ts0 + d, k, v, h) for d, k, v, h in records]
    base_ts = ts0 if pad or first_at_base else recs[0][0] + 1  # a first record off the base: Python
    c_bytes = _encode(recs, base_ts)
    with pure_python():
        py_bytes = _encode(recs, base_ts)
    assert c_bytes == py_bytes
    data = bytearray(c_bytes)
    rb.set_base_offset(data, 0, 1000)
    data_b = bytes(data)
    c_msgs = _decoded(data_b, 1000 + skip)
    with pure_python():
        py_msgs = _decoded(data_b, 1000 + skip)
    assert c_msgs == py_msgs
    assert isinstance(c_msgs, list) and all(type(m) is rb.Message for m in c_msgs)


def _batch() -> bytearray:
    recs = [(1000, b"k", b"v" * 10, [("h", b"x")]), (1001, None, b"w", None), (999, b"kk", None, None)]
    return bytearray(rb.encode_batch(recs))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 200), st.integers(0, 64))
def test_garbage_with_valid_crc_same_outcome(garbage, cut, tail):
    """Whatever the compiled reader makes of hostile records with a valid CRC, the answer is the
    Python decoder's: the same Messages or the same error; and it never reads outside the buffer
    (`tail` bytes of a following batch, or none, after it)."""
    data = _batch()
    body = garbage[:cut] + bytes(data[rb.HEADER_SIZE:])[cut:]
    data = data[: rb.HEADER_SIZE] + body
    struct.pack_into(">i", data, 8, len(data) - 12)
    struct.pack_into(">I", data, 17, rb.crc32c(memoryview(data)[21:]))
    buf = bytes(data) + b"\xff" * tail
    c_msgs = _decoded(buf, 0)
    with pure_python():
        py_msgs = _decoded(buf, 0)
    assert c_msgs == py_msgs


def test_corrupt_crc_never_decoded():
    data = _batch()
    data[-1] ^= 0xFF
    with pytest.raises(rb.CorruptMessageError, match="CRC"):
        rb.decode_batch(bytes(data), 0, rb.parse_header(data), "t", 0)


def test_minus_one_timestamp_and_non_utf8_header_key():
    data = bytes(rb.encode_batch([(-1, None, b"a", None), (-1, None, b"b", None)]))
    assert [m.timestamp for m in _decoded(data, 0)] == [-1, -1]  # type: ignore[union-attr]
    # a header key that is not UTF-8: the C reader refuses it, the Python one replaces it
    body = rb.encode_batch([(5, None, b"v", [("ab", b"x")])])
    data = bytearray(body.replace(b"ab", b"\xffb"))
    struct.pack_into(">I", data, 17, rb.crc32c(memoryview(data)[21:]))
    msgs = _decoded(bytes(data), 0)
    assert isinstance(msgs, list) and msgs[0].headers == [("\ufffdb", b"x")]


def test_try_append_respects_the_limit_in_both_codecs():
    for codec in (C_CODEC, None):
        rb._c_codec = codec
        try:
            b = rb.BatchBuilder(7)
            assert b.try_append(7, None, b"a" * 50, None, 60, 200) == 0  # the first record
            size = b.size_bytes
            assert b.try_append(8, b"k", b"b" * 50, None, 200 - size + 1, 200) == -1
            assert b.size_bytes == size and b.record_count == 1
            assert b.try_append(8, b"k", b"b" * 50, None, 200 - size, 200) == 1
            msgs = rb.decode_batch(b.build(), 0, rb.parse_header(b.build()), "t", 0)
            assert [(m.offset, m.key, m.timestamp) for m in msgs] == [(0, None, 7), (1, b"k", 8)]
        finally:
            rb._c_codec = C_CODEC
