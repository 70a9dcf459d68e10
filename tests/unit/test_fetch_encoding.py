"""The hand-encoded FetchResponse parses as the proto says, for any mix of results."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.server.apis.fetch_encoding import encode_fetch_response as _encode_fetch_response
from logbroker.v1 import logbroker_pb2 as pb


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.text(max_size=20), st.integers(-1, 2**31 - 1), st.integers(-1, 2**62),
                          st.one_of(st.none(), st.binary(max_size=3000))), max_size=8))
def test_encoded_fetch_response_roundtrip(items):
    results = []
    for topic, partition, hw, records in items:
        r = pb.FetchPartitionResult(topic=topic, partition=partition, high_watermark=hw, log_start_offset=-1)
        results.append((r, None if records is None else memoryview(records)))
    decoded = pb.FetchResponse.FromString(_encode_fetch_response(results))
    assert len(decoded.results) == len(items)
    for got, (topic, partition, hw, records) in zip(decoded.results, items, strict=True):
        assert (got.topic, got.partition, got.high_watermark, got.log_start_offset) == (topic, partition, hw, -1)
        assert got.records == (records or b"")
