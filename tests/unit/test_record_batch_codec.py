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
    assert isinstance(msgs, list) and msgs[0].headers == (("\ufffdb", b"x"),)


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


many_st = st.lists(
    st.tuples(st.one_of(st.none(), st.binary(max_size=40)), st.one_of(st.none(), st.binary(max_size=300))),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(many_st, st.integers(0, 5), st.integers(100, 3_000), st.booleans(), st.booleans(), st.booleans())
def test_append_many_fills_up_to_the_limit_as_appends_would(records, already, limit, keyed, headers, c):
    """append_many == one append per record for as many records as fit within limit_bytes (the first
    record of an empty batch always), in the C builder and in the Python one: the same bytes."""
    hdrs = [("h", b"x")] if headers else None
    keys = [k for k, _ in records] if keyed else None
    values = [v for _, v in records]
    ctx = contextlib.nullcontext() if c else pure_python()
    with ctx:
        got = rb.BatchBuilder(1000, limit_bytes=limit)
        want = rb.BatchBuilder(1000)
        for i in range(already):  # records already in the batch, stamped otherwise
            if got.append_many(1000 + i, [b"pre"], [b"v" * 20]):
                want.append(1000 + i, b"pre", b"v" * 20)
        already = got.record_count
        added = got.append_many(1005, keys, values, hdrs)
        fit = 0
        for i, v in enumerate(values):
            want.append(1005, None if keys is None else keys[i], v, hdrs)
            if want.size_bytes > limit and want.record_count > 1:
                break
            fit += 1
        assert added == fit
        assert got.record_count == already + added
        assert added == 0 or got.size_bytes <= limit or got.record_count == 1
        if got.record_count:
            ref = rb.BatchBuilder(1000)
            for i in range(already):
                ref.append(1000 + i, b"pre", b"v" * 20)
            for i in range(added):
                ref.append(1005, None if keys is None else keys[i], values[i], hdrs)
            assert got.build() == ref.build()
        # a full batch takes nothing more
        if added < len(values):
            assert got.append_many(1005, keys and keys[added:], values[added:], hdrs) == 0


def test_append_many_keeps_a_large_first_record_and_stops_after_it():
    for ctx in (contextlib.nullcontext(), pure_python()):
        with ctx:
            b = rb.BatchBuilder(7, limit_bytes=100)
            assert b.append_many(7, [b"k", b"k"], [b"b" * 500, b"c"]) == 1
            assert b.append_many(7, None, []) == 0
            msgs = rb.decode_batch(b.build(), 0, rb.parse_header(b.build()), "t", 0)
            assert [(m.offset, m.key, m.value, m.timestamp) for m in msgs] == [(0, b"k", b"b" * 500, 7)]


copies_st = st.lists(
    st.tuples(st.integers(0, 10_000), st.one_of(st.none(), st.binary(max_size=40)),
              st.one_of(st.none(), st.binary(max_size=300)),
              st.lists(st.tuples(st.sampled_from(["h", "logbroker.mirror.src", "é"]),
                                 st.one_of(st.none(), st.binary(max_size=20))), max_size=3)),
    min_size=1, max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(copies_st, st.integers(100, 3_000), st.booleans())
def test_append_copies_keeps_each_records_timestamp_and_headers_within_the_limit(records, limit, c):
    """append_copies (the mirror's path) == one append per record, each with its own timestamp and
    headers, for as many as fit within limit_bytes (the first always), in both codecs: the same bytes,
    and they decode to the records given."""
    with contextlib.nullcontext() if c else pure_python():
        got = rb.BatchBuilder(records[0][0], limit_bytes=limit)
        added = got.append_copies(records, 0, len(records))
        want = rb.BatchBuilder(records[0][0])
        fit = 0
        for t, k, v, h in records:
            want.append(t, k, v, h)
            if want.size_bytes > limit and want.record_count > 1:
                break
            fit += 1
        assert added == fit and got.record_count == added
        ref = rb.BatchBuilder(records[0][0])
        for t, k, v, h in records[:added]:
            ref.append(t, k, v, h)
        data = got.build()
        assert data == ref.build()
        msgs = rb.decode_batch(data, 0, rb.parse_header(data), "t", 0)
        assert [(m.timestamp, m.key, m.value, list(m.headers)) for m in msgs] == \
            [(t, k, v, h) for t, k, v, h in records[:added]]
        assert got.append_copies(records, added, added) == 0
        if added < len(records):
            assert got.append_copies(records, added, len(records)) == 0  # full: nothing more
