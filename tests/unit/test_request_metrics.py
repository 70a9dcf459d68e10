"""The pure parts of /metrics' request and host figures: bounded topic labels, histograms, record
counts from batch headers, error names, the per-call accounting, connection counting."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest

from logbroker.server.host_metrics import disk_usage, established_by_port, rss_anon_bytes
from logbroker.server.request_context import RequestRejected, RequestStatus
from logbroker.server.request_metrics import OTHER_TOPIC, Histogram, RequestMetrics, TopicLabels, error_name
from logbroker.storage.flush_timing import FlushTimes
from logbroker.storage.record_batch import count_records, encode_batch
from logbroker.v1 import logbroker_pb2 as pb


def test_topics_past_the_cap_fold_into_other_and_internal_topics_keep_their_names():
    labels = TopicLabels(labels_max=3)
    assert [labels.label(t) for t in ("a", "b", "c", "d", "a", "e")] == ["a", "b", "c", OTHER_TOPIC, "a", OTHER_TOPIC]
    assert labels.label("__consumer_offsets") == "__consumer_offsets"  # internal: always named, not counted
    assert labels.label("__priority.1.orders") == OTHER_TOPIC  # a level topic is a user topic's kind
    assert labels.label("c") == "c"


def test_the_cap_counts_distinct_names_once():
    labels = TopicLabels(labels_max=2)
    for _ in range(100):
        assert labels.label("a") == "a"
    assert labels.label("b") == "b" and labels.label("z") == OTHER_TOPIC


def test_histogram_buckets_are_cumulative_and_end_with_inf():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0):
        h.observe(v)
    snap = h.snapshot()
    assert snap.buckets == (("0.1", 2), ("1.0", 3), ("+Inf", 4))
    assert snap.sum == pytest.approx(2.65)


def test_flush_times_are_cumulative():
    f = FlushTimes((0.01,))
    f.observe(0.001)
    f.observe(0.5)
    assert f.snapshot() == ([1, 2], pytest.approx(0.501))


def test_records_are_counted_from_batch_headers_and_a_partial_batch_is_left_out():
    one = encode_batch([(1, None, b"v%d" % i, None) for i in range(7)])
    two = encode_batch([(1, b"k", b"w", None)] * 3)
    assert count_records(one) == 7
    assert count_records(one + two) == 10
    assert count_records(memoryview(one + two[:-1])) == 7
    assert count_records(b"") == 0 and count_records(one[:30]) == 0


def test_error_names_are_the_enum_and_bounded():
    assert error_name(pb.UNKNOWN_TOPIC_OR_PARTITION) == "UNKNOWN_TOPIC_OR_PARTITION"
    assert error_name(999_999) == "UNKNOWN_CODE"


def test_a_call_is_counted_timed_and_its_failures_named():
    ticks = iter(range(100))
    m = RequestMetrics(clock=lambda: float(next(ticks)))

    async def ok() -> pb.ListOffsetsResponse:
        resp = pb.ListOffsetsResponse()
        resp.results.add(topic="t", partition=0, error_code=pb.NOT_LEADER_OR_FOLLOWER)
        resp.results.add(topic="t", partition=1)
        return resp

    async def refused() -> None:
        raise RequestRejected(RequestStatus.PERMISSION_DENIED, "no")

    async def run() -> None:
        m.started("ListOffsets")
        await m.timed("ListOffsets", ok())
        m.started("CreateTopics")
        with pytest.raises(RequestRejected):
            await m.timed("CreateTopics", refused())

    asyncio.run(run())
    snap = m.snapshot()
    assert snap.requests == {"ListOffsets": 1, "CreateTopics": 1}
    assert snap.errors == {("ListOffsets", "NOT_LEADER_OR_FOLLOWER"): 1, ("CreateTopics", "PERMISSION_DENIED"): 1}
    assert snap.durations["ListOffsets"].sum == 1.0 and snap.durations["ListOffsets"].buckets[-1] == ("+Inf", 1)


def test_produce_and_fetch_traffic_per_topic():
    m = RequestMetrics(topic_labels_max=1)
    m.produced("a", 100, 4)
    m.produced("a", 50, 2)
    m.produced("b", 10, 1)
    m.fetched("a", memoryview(encode_batch([(1, None, b"x", None)] * 5)))
    m.produce_failed(pb.UNKNOWN_TOPIC_OR_PARTITION)
    snap = m.snapshot()
    assert snap.topics_in == {"a": (150, 6), OTHER_TOPIC: (10, 1)}
    assert snap.topics_out["a"][1] == 5
    assert snap.errors == {("Produce", "UNKNOWN_TOPIC_OR_PARTITION"): 1}


def test_connections_are_counted_per_listener_port():
    def conn(port: int, status: str = "ESTABLISHED") -> SimpleNamespace:
        return SimpleNamespace(status=status, laddr=SimpleNamespace(port=port))

    conns = [conn(9092), conn(9092), conn(9093), conn(9092, "LISTEN"), conn(5555), SimpleNamespace(status="NONE", laddr=())]
    assert established_by_port(conns, {"grpc": 9092, "record_transport": 9093}) == {"grpc": 2, "record_transport": 1}
    assert established_by_port(conns, {"grpc": 9092, "record_transport": 0}) == {"grpc": 2}


def test_disk_usage_is_statvfs(tmp_path: Path):
    import os

    total, used, free = disk_usage(tmp_path)
    st = os.statvfs(tmp_path)
    assert total == st.f_blocks * st.f_frsize and used == (st.f_blocks - st.f_bfree) * st.f_frsize
    assert abs(free - st.f_bavail * st.f_frsize) < 64 << 20


def test_rss_anon_is_read_from_proc_status(tmp_path: Path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nRssAnon:\t  1234 kB\nRssFile:\t 10 kB\n")
    assert rss_anon_bytes(str(status)) == 1234 * 1024
    status.write_text("Name:\tpython\n")
    assert rss_anon_bytes(str(status)) is None
    assert rss_anon_bytes(str(tmp_path / "missing")) is None
