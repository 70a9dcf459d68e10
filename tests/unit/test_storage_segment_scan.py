"""The cleaner's hot loop (storage/segment_cleaner.scan_records and compaction's bulk OffsetMap.put_records
and keep_records) agrees with the reference: record_batch.decode_batch for the records, and
OffsetMap.put / keep_record for the decisions, over one-, two- and three-byte varints."""

from __future__ import annotations

import pytest

from logbroker.errors import CorruptMessageError
from logbroker.storage.compaction import OffsetMap, keep_record, keep_records
from logbroker.storage.record_batch import HEADER_SIZE, BatchBuilder, decode_batch, iter_batches
from logbroker.storage.segment_cleaner import scan_records

NOW = 1_700_000_000_000


def key_of(i: int) -> bytes | None:
    if i % 97 == 0:
        return None
    if i % 1000 == 1:
        return b"L" * 9000 + b"%d" % (i % 7)  # a three-byte key length
    return b"k" * (i % 80) + b"%d" % (i % 300)  # one- and two-byte key lengths


def value_of(i: int) -> bytes | None:
    return None if i % 13 == 0 else b"v" * (i % 150)


def batch() -> bytes:
    builder = BatchBuilder(NOW, limit_bytes=64 << 20)
    for i in range(10_000):  # offset deltas up to 9,999: three-byte varints from 8,192 on
        builder.append(NOW + i * 1000, key_of(i), value_of(i))
    return bytes(builder.build())


def test_scan_records_matches_the_reference_decoder() -> None:
    buf = batch()
    (h, pos), = list(iter_batches(buf))
    body = buf[pos + HEADER_SIZE :]
    scanned = scan_records(body, h)
    reference = decode_batch(buf, pos, h, "t", 0)
    assert [(r[2], r[3], r[4]) for r in scanned] == [(m.offset, m.key, m.value is None) for m in reference]
    assert scanned[0][0] == 0 and scanned[-1][1] == len(body)
    assert all(a[1] == b[0] for a, b in zip(scanned, scanned[1:], strict=False))  # contiguous records


def test_scan_records_refuses_a_truncated_body() -> None:
    buf = batch()
    (h, pos), = list(iter_batches(buf))
    with pytest.raises(CorruptMessageError):
        scan_records(buf[pos + HEADER_SIZE : -5000], h)


def test_bulk_map_and_filter_match_put_and_keep_record() -> None:
    buf = batch()
    (h, pos), = list(iter_batches(buf))
    scanned = scan_records(buf[pos + HEADER_SIZE :], h)
    one, bulk = OffsetMap(), OffsetMap()
    for r in scanned:
        if r[3] is not None:
            assert one.put(r[3], r[2])
    assert bulk.put_records(scanned)
    assert (bulk._latest, bulk.max_offset) == (one._latest, one.max_offset)
    for expired in (False, True):
        assert keep_records(scanned, bulk, expired) == [r for r in scanned if keep_record(r[3], r[2], r[4], one, expired)]
    small = OffsetMap(capacity_entries=5)
    assert not small.put_records(scanned)  # a new key past the bound stops the map
    assert len(small) == 5
