"""A filtered fetch's records: each fetched batch re-encoded with only the records a
`RecordFilter` (logbroker/group/record_filter.py) matches, offsets kept.

As compaction rewrites a batch (storage/segment_cleaner.py), a batch keeps its 61-byte header —
baseOffset, lastOffsetDelta, timestamps, producer fields — and only the kept records' bytes are
copied (unchanged, so their offset and timestamp deltas still hold); batchLength, recordCount and
the CRC are recomputed, and a gzip batch is written uncompressed. A batch none of whose records
match is kept as its header alone (recordCount 0): its lastOffsetDelta still tells the consumer
where the batch ends, so its position moves past the records it was not sent. A batch whose
records all match is passed through as it was. Control batches, and batches in a codec the broker
cannot inflate (snappy, lz4, zstd), are passed through whole (unfiltered). A trailing partial
batch is dropped (the consumer fetches it next time).

Cost: every record of a filtered fetch is decoded (the C decoder, storage/_records.c) and
evaluated. A filter translated to Python (group/filter_program.py; the usual case) costs about
1 µs per record to evaluate and ~2 µs per record for the whole of this function (decode,
evaluate, re-encode), measured by bench/filter_cost.py; a filter left to cel-python ~110 µs per
record. Either holds the interpreter lock the event loop needs, so the broker runs this off its
loop, one filter at a time (produce_fetch.py), and reads at most `filtered_fetch_max_bytes` per
filtered fetch: `FILTERED_FETCH_MAX_BYTES` (512 KiB: ~10 ms for 100-byte records, ~45 ms at
worst, for records of ~20 bytes) when the filter is translated, `CELPY_FILTERED_FETCH_MAX_BYTES`
(32 KiB: about 300 records of 100 B, tens of ms) when it is not. Unfiltered fetches never come here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from logbroker.storage.record_batch import (
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    CONTROL_MASK,
    HEADER_SIZE,
    LOG_OVERHEAD,
    decode_batch,
    iter_batches,
)
from logbroker.storage.segment_cleaner import append_kept, batch_body, scan_records

if TYPE_CHECKING:
    from logbroker.group.record_filter import RecordFilter

FILTERED_FETCH_MAX_BYTES = 512 << 10
CELPY_FILTERED_FETCH_MAX_BYTES = 32 << 10


def filtered_fetch_max_bytes(record_filter: RecordFilter) -> int:
    """How many bytes one fetch with this filter may read (module doc)."""
    return FILTERED_FETCH_MAX_BYTES if record_filter.fast is not None else CELPY_FILTERED_FETCH_MAX_BYTES


def filter_records(data: bytes, record_filter: RecordFilter, topic: str, partition: int) -> bytes:
    """`data` (whole batches, as a fetch reads them) with only the matching records (module doc)."""
    out = bytearray()
    matches = record_filter.matches
    for h, pos in iter_batches(data):
        size = h.batch_length + LOG_OVERHEAD
        raw = data[pos : pos + size]
        body = None if h.attributes & CONTROL_MASK else batch_body(raw, 0, h)
        if body is None:
            out += raw
            continue
        messages = decode_batch(raw, 0, h, topic, partition)  # checks the CRC
        records = scan_records(body, h)
        kept = [rec for m, rec in zip(messages, records, strict=True) if matches(m.key, m.headers, m.timestamp)]
        if len(kept) == h.record_count and h.attributes & COMPRESSION_MASK == COMPRESSION_NONE:
            out += raw
            continue
        append_kept(out, raw[:HEADER_SIZE], h.attributes, body, kept)
    return bytes(out)
