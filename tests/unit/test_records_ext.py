"""The C record decoder (logbroker.storage._records) against the pure-Python reference decoder:
the same Messages for every well-formed batch, None (and then the reference's error) for every
malformed one, flat reference counts and memory, and decode_batch's choice of decoder."""

from __future__ import annotations

import contextlib
import gc
import os
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from logbroker.errors import LogbrokerError
from logbroker.storage import record_batch as rb

EXT_SWITCHED_OFF = bool(os.environ.get("LOGBROKER_NO_EXT"))
try:
    from logbroker.storage._records import decode_records as decode_ext
except ImportError as e:
    decode_ext = None  # type: ignore[assignment]
    EXT_MISSING = f"logbroker.storage._records did not build or does not load: {e}"


def test_extension_is_built_and_preferred():
    """Fails when the extension did not build (the install goes on without it, CI must not)."""
    assert decode_ext is not None, EXT_MISSING
    if EXT_SWITCHED_OFF:
        assert rb._decode_records is None
    else:
        assert rb._decode_records is decode_ext


@pytest.fixture(autouse=True)
def _needs_extension(request: pytest.FixtureRequest) -> None:
    if decode_ext is None and request.node.name != "test_extension_is_built_and_preferred":
        pytest.skip("the extension is missing: test_extension_is_built_and_preferred fails")


@contextlib.contextmanager
def decoders(ext: Any, c_codec: Any) -> Iterator[None]:
    """decode_batch with the given decoders (None: that one is not installed)."""
    saved = rb._decode_records, rb._c_codec, rb._c_codec_loaded
    rb._decode_records, rb._c_codec, rb._c_codec_loaded = ext, c_codec, True
    try:
        yield
    finally:
        rb._decode_records, rb._c_codec, rb._c_codec_loaded = saved


def reference(data: bytes, min_offset: int, pos: int = 0) -> list[rb.Message] | str:
    """The pure-Python decoder's answer: Messages, or the error it raises."""
    with decoders(None, None):
        try:
            return rb.decode_batch(data, pos, rb.parse_header(data, pos), "t", 3, min_offset)
        except LogbrokerError as e:
            return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------
# Batches built by hand, so offset deltas, varint forms and record counts can be anything.

def varint(n: int, pad: int = 0) -> bytes:
    """Zigzag varint of n, with `pad` redundant continuation bytes (still valid, still n)."""
    enc = bytearray(rb.encode_varint(n))
    for _ in range(pad):
        if len(enc) >= 10:
            break
        enc[-1] |= 0x80
        enc.append(0)
    return bytes(enc)


Record = tuple[int, int, bytes | None, bytes | None, list[tuple[bytes, bytes | None]]]


def record(td: int, od: int, key: bytes | None, value: bytes | None,
           headers: list[tuple[bytes, bytes | None]], pad: int = 0) -> bytes:
    body = bytearray(b"\x00")
    body += varint(td, pad) + varint(od, pad)
    body += varint(-1, pad) if key is None else varint(len(key), pad) + key
    body += varint(-1, pad) if value is None else varint(len(value), pad) + value
    body += varint(len(headers), pad)
    for hk, hv in headers:
        body += varint(len(hk), pad) + hk
        body += varint(-1, pad) if hv is None else varint(len(hv), pad) + hv
    return varint(len(body), pad) + bytes(body)


def batch(records_bytes: bytes, count: int, base_offset: int = 1000, base_ts: int = 1_700_000_000_000,
          attributes: int = 0) -> bytes:
    size = rb.HEADER_SIZE + len(records_bytes)
    buf = bytearray(rb.HEADER.pack(base_offset, size - rb.LOG_OVERHEAD, 0, rb.MAGIC, 0, attributes,
                                   count - 1, base_ts, base_ts, -1, -1, -1, count))
    buf += records_bytes
    struct.pack_into(">I", buf, 17, rb.crc32c(memoryview(buf)[rb.CRC_START:]))
    return bytes(buf)


def ext(data: bytes, skip: int, pos: int = 0, size: int | None = None) -> list[rb.Message] | None:
    if size is None:
        size = rb.parse_header(data, pos).size_bytes
    return decode_ext(data, pos, size, "t", 3, skip, rb.Message)


int64 = st.integers(-(2**63), 2**63 - 1)
blob = st.one_of(st.none(), st.just(b""), st.binary(max_size=40), st.binary(min_size=200, max_size=20_000))
records_st = st.lists(
    st.tuples(
        st.one_of(st.integers(-(2**20), 2**40), int64),  # timestampDelta: 1 to 10 varint bytes
        st.one_of(st.integers(-5, 300), st.integers(-(2**31), 2**31 - 1)),  # offsetDelta, any order
        blob.filter(lambda b: b is None or len(b) < 1000),  # key
        blob,  # value
        st.lists(st.tuples(st.one_of(st.binary(max_size=8), st.text(max_size=5).map(str.encode)),
                           st.one_of(st.none(), st.binary(max_size=8))), max_size=3),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(records_st, st.integers(-(2**40), 2**40), st.integers(-(2**40), 2**40),
       st.one_of(st.integers(-3, 310), int64), st.integers(0, 3), st.binary(max_size=30))
def test_same_messages_as_the_reference(records, base_offset, base_ts, skip, pad, tail):
    data = batch(b"".join(record(td, od, k, v, hs, pad) for td, od, k, v, hs in records), len(records), base_offset,
                 base_ts)
    want = reference(data, base_offset + skip)
    got = ext(data + tail, skip)  # bytes after the batch (a following one) are never read
    event("extension refuses" if got is None else f"extension decodes {'some' if got else 'none'}")
    if isinstance(want, str) or any(not -(2**63) <= x < 2**63 for m in want for x in (m.offset, m.timestamp)):
        assert got is None  # malformed, or a timestamp or offset beyond int64: the reference decides
        return
    assert got == want
    assert all(type(m) is rb.Message for m in got)
    assert [m.headers for m in got] == [tuple((hk.decode("utf-8", "replace"), hv) for hk, hv in r[4])
                                         for r in records if r[1] >= skip]
    # through decode_batch, at a position inside a larger buffer
    with decoders(decode_ext, None):
        assert rb.decode_batch(b"x" * 7 + data + tail, 7, rb.parse_header(data), "t", 3, base_offset + skip) == want


def test_kafka_encoded_batches_and_message_behaviour():
    recs = [(5, b"k", b"v" * 100, [("h", None), ("\u00e9", b"x")]), (5, None, None, None), (-9, b"", b"", None)]
    data = rb.encode_batch(recs)
    msgs = ext(data, 0)
    assert msgs == reference(data, 0)
    assert msgs is not None
    m = msgs[0]
    assert m._asdict()["headers"] == (("h", None), ("\u00e9", b"x"))
    assert msgs[1] == tuple(msgs[1]) and msgs[1][1:3] == (3, 1) and len(msgs[1]) == 7
    assert msgs[0].timestamp is msgs[1].timestamp  # one int object per distinct timestamp
    assert msgs[1].headers is msgs[2].headers == ()  # no headers: the shared empty tuple
    assert ext(data, 2) == msgs[2:] and ext(data, 3) == []


def test_any_contiguous_buffer():
    data = rb.encode_batch([(5, b"k", b"v", [("h", b"x")])] * 3)
    want = ext(data, 0)
    assert decode_ext(bytearray(data), 0, len(data), "t", 3, 0, rb.Message) == want
    assert decode_ext(memoryview(b"ab" + data)[2:], 0, len(data), "t", 3, 0, rb.Message) == want
    assert all(type(m.value) is bytes for m in want or [])
    with pytest.raises(TypeError):
        decode_ext("not a buffer", 0, len(data), "t", 3, 0, rb.Message)  # type: ignore[arg-type]


def test_message_cls_must_be_a_plain_tuple_subclass():
    data = rb.encode_batch([(5, None, b"v", None)])

    class WithDict(tuple):
        pass

    for cls in (list, WithDict, object):
        with pytest.raises(TypeError):
            decode_ext(data, 0, len(data), "t", 3, 0, cls)
    assert decode_ext(data, 0, len(data), "t", 3, 0, tuple) == [("t", 3, 1000 * 0, None, b"v", (), 5)]


def test_skip_beyond_int64():
    data = rb.encode_batch([(5, None, b"v", None)] * 2)
    assert ext(data, -(2**70)) == ext(data, 0) != []
    assert ext(data, 2**70) is None  # the reference then returns []
    with decoders(decode_ext, None):
        assert rb.decode_batch(data, 0, rb.parse_header(data), "t", 3, 2**70) == []


def test_gc_tracking():
    """A message without headers is left out of the cyclic GC; one with headers stays in."""
    data = rb.encode_batch([(5, None, b"v", None), (5, None, b"v", [("h", b"x")])])
    plain, with_headers = ext(data, 0) or []
    assert not gc.is_tracked(plain) and plain.headers == ()
    assert gc.is_tracked(with_headers) and with_headers.headers == (("h", b"x"),)


def test_gc_state_is_restored():
    data = rb.encode_batch([(5, None, b"v", None)] * 2)
    assert gc.isenabled()
    ext(data, 0)
    assert gc.isenabled()
    gc.disable()
    try:
        ext(data, 0)
        assert not gc.isenabled()
    finally:
        gc.enable()


# ---------------------------------------------------------------------------------------------
# Hostile batches: None from the extension, the reference's error from decode_batch.

GOOD = record(0, 0, None, b"value", [])


def _hostile() -> dict[str, bytes]:
    cases: dict[str, bytes] = {}
    cases["record length past the batch"] = batch(varint(200) + GOOD[1:], 1)
    cases["negative record length"] = batch(varint(-3) + GOOD[1:], 1)
    cases["record length too short"] = batch(varint(2) + GOOD[1:], 1)
    cases["record longer than its fields"] = batch(varint(len(GOOD)) + GOOD[1:] + b"\x00", 1)
    cases["record shorter than its fields"] = batch(varint(len(GOOD) - 2) + GOOD[1:], 1)
    cases["value length past the record"] = batch(record(0, 0, None, b"value", [])
                                                  .replace(varint(5) + b"value", varint(50) + b"value"), 1)
    cases["key length past the record"] = batch(record(0, 0, b"kk", None, []).replace(varint(2) + b"kk",
                                                                                        varint(90) + b"kk"), 1)
    cases["huge record count"] = batch(GOOD, 2**31 - 1)
    cases["count above what fits"] = batch(GOOD * 3, 4)
    cases["count below the records"] = batch(GOOD * 3, 2)
    cases["zero count"] = batch(GOOD, 0)
    cases["negative count"] = batch(GOOD, -1)
    cases["truncated varint"] = batch(GOOD + b"\x85", 2)
    cases["varint of 11 bytes"] = batch(varint(7) + b"\x00" + b"\x80" * 10 + b"\x00" + GOOD[3:], 1)
    cases["varint above 64 bits"] = batch(GOOD[:2] + b"\xff" * 9 + b"\x7f" + GOOD[3:], 1)
    cases["negative header count"] = batch(record(0, 0, None, b"v", [])[:-1] + varint(-2), 1)
    cases["header count past the record"] = batch(record(0, 0, None, b"v", [(b"a", b"b")])
                                                  .replace(varint(1) + varint(1) + b"a", varint(40) + varint(1) + b"a"),
                                                  1)
    cases["negative header key length"] = batch(record(0, 0, None, b"v", [(b"a", b"b")])
                                                .replace(varint(1) + b"a", varint(-1) + b"a"), 1)
    cases["header value past the record"] = batch(record(0, 0, None, b"v", [(b"a", b"bb")])
                                                  .replace(varint(2) + b"bb", varint(9) + b"bb"), 1)
    cases["offset beyond int64"] = batch(record(0, 5, None, b"v", []), 1, base_offset=2**63 - 2)
    cases["timestamp beyond int64"] = batch(record(-5, 0, None, b"v", []), 1, base_ts=-(2**63) + 1)
    return cases


HOSTILE = _hostile()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_batch_refused(name):
    data = HOSTILE[name]
    assert ext(data, 0) is None
    with decoders(decode_ext, None):
        try:
            got: Any = rb.decode_batch(data, 0, rb.parse_header(data), "t", 3, 0)
        except LogbrokerError as e:
            got = f"{type(e).__name__}: {e}"
    assert got == reference(data, 0)


def test_refuses_what_it_does_not_decode_and_bad_bounds():
    good = batch(GOOD * 2, 2)
    for attributes in (rb.COMPRESSION_GZIP, rb.TIMESTAMP_TYPE_MASK, rb.CONTROL_MASK):
        assert ext(batch(GOOD, 1, attributes=attributes), 0) is None
    bad_magic = bytearray(good)
    bad_magic[16] = 1
    assert ext(bytes(bad_magic), 0) is None
    n = len(good)
    for pos, size in ((-1, n), (0, n + 1), (1, n), (0, 60), (0, n - 1), (n, 0), (0, -5), (2**62, n)):
        assert decode_ext(good, pos, size, "t", 3, 0, rb.Message) is None, (pos, size)
    assert ext(good, 0) is not None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 200), st.integers(-1, 6), st.binary(max_size=40))
def test_garbage_never_disagrees(garbage, cut, count_delta, tail):
    """Records spliced with garbage (valid CRC, any count): the extension returns None or exactly
    the reference's Messages, and returns None whenever the reference raises."""
    body = garbage[:cut] + (record(3, 0, b"k", b"v" * 10, [(b"h", b"x")]) + record(4, 1, None, b"w", []))[cut:]
    data = batch(body, 2 + count_delta)
    got = ext(data + tail, 0)
    want = reference(data, 0)
    event("reference raises" if isinstance(want, str) else "reference decodes")
    event("extension refuses" if got is None else "extension decodes")
    if got is not None:
        assert got == want
    elif not isinstance(want, str):
        # refused though the reference accepts: only bytes after the last record (the reference
        # ignores them), or a varint above 64 bits
        end = rb.HEADER_SIZE
        try:
            for _ in range(rb.parse_header(data).record_count):
                length, end = rb.decode_varint(data, end)
                end += length
        except LogbrokerError:
            end = -1
        assert end != len(data) or any(not -(2**63) <= x < 2**63 for m in want for x in (m.offset, m.timestamp))


# ---------------------------------------------------------------------------------------------
# Reference counts and memory.

def test_refcounts_flat_on_success_and_failure():
    topic = "".join(["to", "pic"])  # not interned by the compiler
    partition = 10**6 + 7  # not a cached small int
    data = rb.encode_batch([(5, None, b"v" * 100, [("h", b"x")]), (6, b"k", None, None)] * 50)
    bad = HOSTILE["record shorter than its fields"]
    mid_bad = batch(GOOD * 10 + varint(-3) + GOOD[1:], 11)  # fails after ten messages were built
    before = sys.getrefcount(topic), sys.getrefcount(partition), sys.getrefcount(rb.Message)
    for _ in range(2000):
        msgs = decode_ext(data, 0, len(data), topic, partition, 0, rb.Message)
        assert msgs is not None and len(msgs) == 100
        del msgs
        assert decode_ext(bad, 0, len(bad), topic, partition, 0, rb.Message) is None
        assert decode_ext(mid_bad, 0, len(mid_bad), topic, partition, 0, rb.Message) is None
        assert decode_ext(data, 0, len(data), topic, partition, 99, rb.Message) is not None
    assert (sys.getrefcount(topic), sys.getrefcount(partition), sys.getrefcount(rb.Message)) == before


def test_memory_flat():
    data = rb.encode_batch([(5 + i, b"k", b"v" * 100, [("h", b"x")] if i % 3 else None) for i in range(200)])
    bad = batch(GOOD * 10 + varint(-3) + GOOD[1:], 11)

    def once() -> None:
        for _ in range(200):
            decode_ext(data, 0, len(data), "t", 3, 50, rb.Message)
            decode_ext(bad, 0, len(bad), "t", 3, 0, rb.Message)

    once()
    gc.collect()
    tracemalloc.start()
    try:
        once()
        gc.collect()
        first, _ = tracemalloc.get_traced_memory()
        for _ in range(5):
            once()
        gc.collect()
        last, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert last - first < 64 * 1024, (first, last)


# ---------------------------------------------------------------------------------------------
# decode_batch's order: the extension, else aiokafka's reader, else Python; a refusal goes to Python.

class Spy:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        return self.inner(*args)


def _decode(data: bytes) -> list[rb.Message]:
    return rb.decode_batch(data, 0, rb.parse_header(data), "t", 3, 0)


def test_fallback_order(monkeypatch):
    data = rb.encode_batch([(5, b"k", b"v", None)] * 3)
    want = reference(data, 0)
    aiokafka = rb._load_c_codec()
    reader = Spy(aiokafka[0] if aiokafka else lambda *a: None)
    c_path = Spy(rb._decode_batch_c)
    monkeypatch.setattr(rb, "_decode_batch_c", c_path)
    ext_spy = Spy(decode_ext)
    with decoders(ext_spy, (reader, None)):  # 1. the extension, aiokafka untouched
        assert _decode(data) == want
        assert (ext_spy.calls, c_path.calls) == (1, 0)
    refusing = Spy(lambda *a: None)
    with decoders(refusing, (reader, None)):  # a refusal: straight to the reference
        assert _decode(data) == want
        assert (refusing.calls, c_path.calls) == (1, 0)
    if aiokafka is not None:
        with decoders(None, (reader, None)):  # 2. no extension: aiokafka's reader
            assert _decode(data) == want
            assert (c_path.calls, reader.calls) == (1, 1)
    with decoders(None, None):  # 3. neither: Python
        assert _decode(data) == want
    ext_spy.calls = 0
    for attributes in (rb.TIMESTAMP_TYPE_MASK, rb.COMPRESSION_GZIP):  # never handed to the extension
        with decoders(ext_spy, None):
            other = rb.encode_batch([(5, b"k", b"v", None)], compression=attributes & 7)
            if attributes == rb.TIMESTAMP_TYPE_MASK:
                buf = bytearray(other)
                struct.pack_into(">h", buf, 21, attributes)
                struct.pack_into(">I", buf, 17, rb.crc32c(memoryview(buf)[21:]))
                other = bytes(buf)
            assert _decode(other)[0].value == b"v"
        assert ext_spy.calls == 0
    with decoders(ext_spy, None):  # nor a bytearray (the reference returns bytearray values)
        rb.decode_batch(bytearray(data), 0, rb.parse_header(data), "t", 3, 0)  # type: ignore[arg-type]
        assert ext_spy.calls == 0


def test_switch_off_with_environment():
    code = ("from logbroker.storage import record_batch as rb; "
            "import sys; sys.exit(0 if rb._decode_records is None else 1)")
    env = {**os.environ, "LOGBROKER_NO_EXT": "1"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0


def test_aiokafka_fallback_filters_negative_offset_deltas():
    """Where the extension is not built, aiokafka's reader decodes; a crafted batch whose offset
    deltas go below zero must not hand out offsets below the one asked for."""
    codec = rb._load_c_codec()
    if codec is None:
        pytest.skip("aiokafka's C reader is not installed")
    data = batch(record(0, -3, None, b"early", []) + record(0, 0, None, b"v", []) + record(0, 1, None, b"w", []), 3)
    want = reference(data, 1000)
    with decoders(None, codec):
        got = rb.decode_batch(data, 0, rb.parse_header(data), "t", 3, 1000)
    assert got == want
    assert [m.value for m in got] == [b"v", b"w"]


def test_topic_and_partition_must_be_plain_str_and_int():
    data = batch(record(0, 0, None, b"v", []), 1)

    class Topic(str):
        pass

    for topic, partition in ((Topic("t"), 3), (["t"], 3), ("t", True), ("t", 3.0)):
        with pytest.raises(TypeError):
            decode_ext(data, 0, len(data), topic, partition, 0, rb.Message)
