"""fetch_filter: batches re-encoded with only the matching records, offsets kept."""

from __future__ import annotations

from logbroker.group.record_filter import compile_filter
from logbroker.server.apis.fetch_filter import filter_records
from logbroker.storage.record_batch import (
    COMPRESSION_GZIP,
    decode_batch,
    encode_batch,
    iter_batches,
    set_base_offset,
)


def _batch(base: int, types: list[str], compression: int = 0) -> bytes:
    buf = bytearray(encode_batch([(1000 + i, f"k{i}".encode(), b"v", [("type", t.encode())])
                                  for i, t in enumerate(types)], compression))
    set_base_offset(buf, 0, base)
    return bytes(buf)


def _decode(data: bytes) -> tuple[list[int], int]:
    offsets: list[int] = []
    next_offset = -1
    for h, pos in iter_batches(data):
        offsets += [m.offset for m in decode_batch(data, pos, h, "t", 0)]
        next_offset = h.base_offset + h.last_offset_delta + 1
    return offsets, next_offset


F = compile_filter('headers["type"] == "a"')


def test_keeps_matching_records_with_their_offsets() -> None:
    data = _batch(10, ["a", "b", "a", "b"]) + _batch(14, ["b", "a"], COMPRESSION_GZIP)
    out = filter_records(data, F, "t", 0)
    assert _decode(out) == ([10, 12, 15], 16)


def test_all_filtered_batch_still_moves_the_consumer_on() -> None:
    out = filter_records(_batch(0, ["a"]) + _batch(1, ["b", "b", "b"]), F, "t", 0)
    batches = list(iter_batches(out))
    assert len(batches) == 2 and batches[1][0].record_count == 0
    assert _decode(out) == ([0], 4)


def test_all_matching_batch_passed_through() -> None:
    data = _batch(5, ["a", "a"])
    assert filter_records(data, F, "t", 0) == data


def test_trailing_partial_batch_dropped() -> None:
    data = _batch(0, ["a"]) + _batch(1, ["a"])[:30]
    assert _decode(filter_records(data, F, "t", 0)) == ([0], 1)


def test_a_translated_filter_may_read_more_per_fetch_than_one_cel_python_evaluates() -> None:
    from logbroker.server.apis.fetch_filter import (
        CELPY_FILTERED_FETCH_MAX_BYTES,
        FILTERED_FETCH_MAX_BYTES,
        filtered_fetch_max_bytes,
    )
    assert F.fast is not None
    assert filtered_fetch_max_bytes(F) == FILTERED_FETCH_MAX_BYTES == 512 << 10
    slow = compile_filter("double(timestamp) > 1.5")  # doubles are left to cel-python
    assert slow.fast is None
    assert filtered_fetch_max_bytes(slow) == CELPY_FILTERED_FETCH_MAX_BYTES == 32 << 10
