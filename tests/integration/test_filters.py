"""Server-side filters on a real broker: a filtered group gets exactly the matching records of a
mixed stream (its offsets still move past the others), an unfiltered group gets them all, and bad
expressions are refused with the parser's message (by the client and by the broker)."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.errors import InvalidFilterError
from logbroker.v1 import logbroker_pb2 as pb
from logbroker.v1 import logbroker_pb2_grpc as pbg
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(180)

FILTER = '"type" in headers && headers["type"] == "invoice" && key.startsWith("eu-")'
TOTAL = 600


def _kind(i: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    key = (b"eu-" if i % 3 else b"us-") + b"%d" % i
    headers = [] if i % 7 == 0 else [("type", b"invoice" if i % 2 else b"receipt")]
    return key, headers


def _expected() -> set[int]:
    return {i for i in range(TOTAL) if i % 3 and i % 7 and i % 2}


def _drain(consumer: Consumer, want: int, positions_done: Callable[[], bool]) -> list[int]:
    got: list[int] = []

    def done() -> bool:
        got.extend(int(m.value) for m in consumer.poll(timeout_ms=200))  # type: ignore[arg-type]
        return len(got) >= want and positions_done()

    wait_for(done, 60, "the consumer to reach the end")
    return got


def test_filtered_group_gets_exactly_the_matching_records(broker: BrokerProcess) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic("mixed", partitions=2)
    with Producer(broker.address, acks="all", linger_ms=5) as p:
        for i in range(TOTAL):
            key, headers = _kind(i)
            p.send("mixed", b"%d" % i, key=key, headers=headers)
        p.flush()
    with Consumer(broker.address, topics=["mixed"], group="filtered", filter=FILTER,
                  auto_offset_reset="earliest", enable_auto_commit=False) as filtered, \
         Consumer(broker.address, topics=["mixed"], group="all", auto_offset_reset="earliest",
                  enable_auto_commit=False) as unfiltered:
        expected = _expected()
        assert 0 < len(expected) < TOTAL

        def at_end(c: Consumer) -> Callable[[], bool]:
            def check() -> bool:
                tps = c.assignment()
                return len(tps) == 2 and sum(c.position(t, q) or 0 for t, q in tps) == TOTAL
            return check

        got = _drain(filtered, len(expected), at_end(filtered))
        assert sorted(got) == sorted(expected)  # exactly: no extra, no duplicate
        filtered.commit()
        all_got = _drain(unfiltered, TOTAL, at_end(unfiltered))
        assert sorted(all_got) == list(range(TOTAL))


@pytest.mark.parametrize("expr, words", [
    ('headers["type"] ==', "Unexpected token"),
    ('key == "' + "x" * 1100 + '"', "the limit is 1024"),
    ('key.matches("(a+)+$")', "matches() is not allowed"),
])
def test_bad_filters_refused_with_the_parsers_message(broker: BrokerProcess, expr: str, words: str) -> None:
    with Admin(broker.address) as admin:
        admin.create_topic("bad", partitions=1)
    with pytest.raises(InvalidFilterError, match=words.replace("(", r"\(").replace(")", r"\)")):
        Consumer(broker.address, topics=["bad"], group="g", filter=expr)
    # the broker refuses it too (a client that does not check first): INVALID_FILTER, same words
    with grpc.insecure_channel(broker.address) as ch:
        resp = pbg.BrokerStub(ch).Fetch(pb.FetchRequest(
            max_wait_ms=0, min_bytes=1, max_bytes=1 << 20, replica_id=-1, filter=expr,
            partitions=[pb.FetchPartition(topic="bad", partition=0, fetch_offset=0, partition_max_bytes=1 << 20,
                                          current_leader_epoch=-1)]), timeout=10)
    assert resp.results[0].error_code == pb.INVALID_FILTER
    assert words in resp.results[0].error_message
