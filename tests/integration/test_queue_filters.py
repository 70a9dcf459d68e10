"""Share-group filters against a real standalone broker: a filtered QueueConsumer receives exactly
the matching records of a mixed stream, the others are settled for the group (never delivered,
never dead-lettered, the group's start offset moves past them); the filter is the group's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from logbroker import Admin, Producer, QueueConsumer
from logbroker.errors import InvalidFilterError
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(120)

INVOICES = 'headers["type"] == "invoice"'
N = 300


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=["--offsets-topic-partitions", "2"])


def _drain(c: QueueConsumer, want: int, timeout_s: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        batch = c.poll(300)
        for m in batch:
            m.ack()
        got.extend(batch)
    assert all(e is None for e in c.commit_acks().values())
    return got


def _settled_to_end(admin: Admin, group: str) -> bool:
    parts = admin.describe_share_group(group)["partitions"]
    return len(parts) == 2 and all(p["start_offset"] == p["log_end_offset"] and p["in_flight"] == 0 for p in parts)


def test_filtered_queue_consumer_gets_exactly_the_matching_records(standalone: BrokerProcess) -> None:
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("mixed", partitions=2)
    with Producer(bootstrap) as p:
        for i in range(N):
            p.send("mixed", b"v%d" % i, key=b"k%d" % i,
                   headers=[("type", b"invoice" if i % 10 == 0 else b"receipt")])
        p.flush(10)
    want = {b"v%d" % i for i in range(0, N, 10)}
    with QueueConsumer(bootstrap, "invoices", ["mixed"], auto_offset_reset="earliest", filter=INVOICES) as c, \
            QueueConsumer(bootstrap, "everything", ["mixed"], auto_offset_reset="earliest") as everything:
        got = _drain(c, len(want))
        assert sorted(m.value for m in got) == sorted(want)  # exactly these, each once
        assert all(dict(m.headers)["type"] == b"invoice" and m.delivery_count == 1 for m in got)
        assert c.poll(500) == []  # the others are never delivered
        assert len(_drain(everything, N)) == N  # another group, unfiltered: every record
        with Admin(bootstrap) as admin:
            wait_for(lambda: _settled_to_end(admin, "invoices"), 10, "the group settled to the log end")  # the non-matching ones are settled
            d = admin.describe_share_group("invoices")
            assert d["settings"]["filter"] == INVOICES
            assert all(p["dead_lettered"] == 0 for p in d["partitions"])
            assert "mixed.dlq" not in admin.list_topics()


def test_the_filter_is_the_groups_and_a_bad_one_is_refused(standalone: BrokerProcess) -> None:
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("jobs", partitions=1)
    with QueueConsumer(bootstrap, "q", ["jobs"], filter=INVOICES) as first:
        first.poll(100)  # joins: the group is created with the filter
        with QueueConsumer(bootstrap, "q", ["jobs"], filter='key == "x"') as other, \
                pytest.raises(InvalidFilterError, match='has filter \'headers\\["type"\\] == "invoice"\''):
            other.poll(100)
        with QueueConsumer(bootstrap, "q", ["jobs"]) as plain:  # says no filter: takes the group's
            assert plain.poll(100) == []
    with Admin(bootstrap) as admin:
        # the broker checks too (a client that does not): INVALID_FILTER with the parser's words
        with pytest.raises(InvalidFilterError, match="does not parse") as info:
            admin._share_call("q", "AlterShareGroup", pb.AlterShareGroupRequest(
                group="q", settings=pb.ShareGroupSettings(filter='headers["type" ==')))
        assert info.value.code == pb.INVALID_FILTER
        assert admin.describe_share_group("q")["settings"]["filter"] == INVOICES  # unchanged
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": bootstrap}
    proc = subprocess.run([sys.executable, "-m", "logbroker", "queues", "configure", "q", "--filter", 'key == "x"'],
                          capture_output=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode()
    with Admin(bootstrap) as admin:
        assert admin.describe_share_group("q")["settings"]["filter"] == 'key == "x"'
