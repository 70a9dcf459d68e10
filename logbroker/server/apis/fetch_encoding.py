"""FetchResponse encoded by hand around the record bytes, so they are copied once, from the mmap
straight into the response.

`results` (field 1) is a length-delimited FetchPartitionResult whose `records` (field 8, bytes) is
appended after the small fields protobuf serializes for us.
"""

from __future__ import annotations

from logbroker.v1 import logbroker_pb2 as pb

_RESULTS_TAG = b"\x0a"  # field 1, wire type 2
_RECORDS_TAG = b"\x42"  # field 8, wire type 2

# A partition's result without records, and a zero-copy view of its records (None: none). Views
# stay valid until the event loop next runs: encode (or release) before any await.
FetchParts = list[tuple[pb.FetchPartitionResult, memoryview | None]]


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def release(results: FetchParts) -> None:
    for _, view in results:
        if view is not None:
            view.release()


def encode_fetch_response(results: FetchParts) -> bytes:
    """The serialized FetchResponse; releases the views."""
    parts: list[bytes | memoryview] = []
    for r, view in results:
        head = r.SerializeToString()
        if view is not None and len(view):
            rec_prefix = _RECORDS_TAG + _uvarint(len(view))
            inner_len = len(head) + len(rec_prefix) + len(view)
            parts += (_RESULTS_TAG, _uvarint(inner_len), head, rec_prefix, view)
        else:
            parts += (_RESULTS_TAG, _uvarint(len(head)), head)
    try:
        return b"".join(parts)
    finally:
        release(results)
