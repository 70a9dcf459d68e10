"""QueueConsumer and the share-group Admin calls against a real standalone broker."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from logbroker import Admin, Producer, QueueConsumer
from logbroker.group import share_headers as sh
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    broker = broker_factory(extra_args=["--offsets-topic-partitions", "2"])
    return broker


def _poll_until(c: QueueConsumer, want: int, timeout_s: float = 20.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        got.extend(c.poll(500))
    return got


def test_ack_release_reject_and_redelivery(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("jobs", partitions=2)
    with QueueConsumer(bootstrap, "workers", ["jobs"], auto_offset_reset="earliest", lock_ms=5_000,
                       retry_backoff_ms=100, retry_backoff_max_ms=200, max_delivery_attempts=3) as c:
        with Producer(bootstrap) as p:
            for i in range(10):
                p.send("jobs", b"job-%d" % i, key=b"%d" % i)
            p.flush(10)
        first = _poll_until(c, 10)
        assert sorted(m.value for m in first) == sorted(b"job-%d" % i for i in range(10))
        assert {m.delivery_count for m in first} == {1}
        released = first[0]
        released.release()
        rejected = first[1]
        rejected.reject("poison")
        for m in first[2:]:
            m.ack()
        assert all(e is None for e in c.commit_acks().values())
        again = _poll_until(c, 1)
        assert [(m.value, m.delivery_count) for m in again] == [(released.value, 2)]
        assert c.extend_lock(again[0], 10_000) is True
        again[0].ack()
        assert all(e is None for e in c.commit_acks().values())
        assert c.poll(300) == []


def test_delayed_record_is_not_delivered_before_its_time(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("later", partitions=1)
    with QueueConsumer(bootstrap, "g", ["later"], auto_offset_reset="earliest") as c, Producer(bootstrap) as p:
        sent_ms = time.time_ns() // 1_000_000
        p.send("later", b"x", delay_ms=2_000).result(10)
        got = _poll_until(c, 1, timeout_s=15)
        assert time.time_ns() // 1_000_000 >= sent_ms + 2_000
        assert dict(got[0].headers)[sh.DELIVER_AT_MS] is not None
        got[0].ack()


def test_admin_describe_alter_list_purge_and_redrive(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("src", partitions=1)
        with QueueConsumer(bootstrap, "q", ["src"], auto_offset_reset="earliest", max_delivery_attempts=1) as c, \
                Producer(bootstrap) as p:
            p.send("src", b"bad", key=b"k").result(10)
            (m,) = _poll_until(c, 1)
            m.reject("no good")
            c.commit_acks()
        assert "q" in [g.group for g in admin.list_share_groups()]
        admin.alter_share_group("q", lock_ms=7_000)
        d = admin.describe_share_group("q")
        assert d["settings"]["lock_ms"] == 7_000
        wait_for(lambda: admin.describe_share_group("q")["partitions"][0]["dead_lettered"] == 1, 10, "the rejected record dead-lettered")
        assert admin.redrive("src.dlq", timeout_s=20) == 1
        with QueueConsumer(bootstrap, "q2", ["src"], auto_offset_reset="earliest") as c2:
            values = [m.value for m in _poll_until(c2, 2)]
        assert values == [b"bad", b"bad"]
        assert admin.purge_share_group("q2") >= 0


def test_poll_rides_out_a_coordinator_that_is_down(standalone):
    """A poll while the coordinator is unreachable returns nothing (it does not raise); once the
    broker is back the consumer rejoins by itself: the accepted ack holds, the rest come again."""
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("down", partitions=1)
    with Producer(bootstrap) as p:
        for i in range(3):
            p.send("down", b"%d" % i).result(10)
    with QueueConsumer(bootstrap, "g", ["down"], auto_offset_reset="earliest", lock_ms=60_000,
                       request_timeout_ms=2_000) as c:
        got = _poll_until(c, 3)
        assert len(got) == 3
        got[0].ack()
        assert all(e is None for e in c.commit_acks().values())
        standalone.kill()
        assert c.poll(300) == []
        standalone.start()
        rest = _poll_until(c, 2, timeout_s=30)  # rejoined: the two it held come again
        assert sorted((m.value, m.delivery_count) for m in rest) == [(b"1", 2), (b"2", 2)]
        for m in rest:
            m.ack()
        assert all(e is None for e in c.commit_acks().values())
        assert c.poll(300) == []
