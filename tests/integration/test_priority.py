"""Priority levels (cluster/priority_levels.py, group/priority_drain.py) against a real standalone
broker: an urgent record is not hidden behind a large low-priority backlog, weights set the mix,
bad priorities are refused with nothing written, and the level topics follow their topic."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from logbroker import Admin, Consumer, Producer, QueueConsumer
from logbroker.errors import (
    InvalidConfigError,
    InvalidPriorityError,
    InvalidTopicError,
    UnknownTopicOrPartitionError,
)
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=["--offsets-topic-partitions", "1"])


def _end_offsets(admin: Admin, topic: str) -> list[int]:
    return [p.log_end_offset for p in admin.describe_topic(topic).partitions]


def test_urgent_records_come_in_the_first_fetch_despite_a_large_backlog(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("jobs", partitions=2, config={"priority_levels": "10"})
    with Producer(bootstrap, linger_ms=5) as p:
        values = [b"low-%06d" % i for i in range(10_000)]
        for _ in range(10):
            p.send_many("jobs", values)
        p.flush(60)
        for i in range(10):
            p.send("jobs", b"urgent-%d" % i, key=b"%d" % i, priority=9)
        p.flush(10)
    with Admin(bootstrap) as admin:
        assert sum(_end_offsets(admin, "jobs")) == 100_000
    with QueueConsumer(bootstrap, "workers", ["jobs"], auto_offset_reset="earliest", max_poll_records=100) as c:
        first: list = []
        deadline = time.monotonic() + 30
        while not first and time.monotonic() < deadline:  # a poll while the coordinator loads hands out nothing
            first = c.poll(10_000)
        urgent = [m for m in first if m.priority == 9]
        assert sorted(m.value for m in urgent) == sorted(b"urgent-%d" % i for i in range(10))
        assert first[:10] == urgent  # handed out ahead of the level-0 records of the same fetch
        assert {m.topic for m in first} == {"jobs"}
        for m in first:
            m.ack()
        assert all(e is None for e in c.commit_acks().values())
        # acknowledged through their level log: never handed out again; level 0 continues
        later = c.poll(5_000)
        assert later and all(m.priority == 0 for m in later)
        # a running group with ~99,800 level-0 records still waiting: new urgent ones come next
        with Producer(bootstrap) as p:
            p.send_many("jobs", [b"again"] * 3, priority=5)
            p.flush(10)
        nxt = c.poll(5_000)
        assert [(m.value, m.priority) for m in nxt[:3]] == [(b"again", 5)] * 3


def test_weights_set_the_mix_while_both_levels_are_backlogged(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("mix", partitions=1, config={"priority_levels": "2", "priority_weights": "1,9"})
    with Producer(bootstrap) as p:
        p.send_many("mix", [b"low"] * 5_000)
        p.send_many("mix", [b"high"] * 5_000, priority=1)
        p.flush(30)
    counts = {0: 0, 1: 0}
    with QueueConsumer(bootstrap, "w", ["mix"], auto_offset_reset="earliest", max_poll_records=50) as c:
        deadline = time.monotonic() + 60
        while sum(counts.values()) < 2_000 and time.monotonic() < deadline:
            for m in c.poll(2_000):
                counts[m.priority] += 1
                m.ack()
    total = sum(counts.values())
    assert total >= 2_000, counts
    share_high = counts[1] / total
    assert abs(share_high - 0.9) <= 0.09, counts  # within 10 % of the weights


def test_strict_levels_hand_out_nothing_lower_while_higher_records_wait(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("strict", partitions=1, config={"priority_levels": "3"})
    with Producer(bootstrap) as p:
        p.send_many("strict", [b"l0"] * 300)
        p.send_many("strict", [b"l1"] * 300, priority=1)
        p.send_many("strict", [b"l2"] * 300, priority=2)
        p.flush(30)
    seen: list[int] = []
    with QueueConsumer(bootstrap, "s", ["strict"], auto_offset_reset="earliest", max_poll_records=100) as c:
        deadline = time.monotonic() + 60
        while len(seen) < 900 and time.monotonic() < deadline:
            for m in c.poll(2_000):
                seen.append(m.priority)
                m.ack()
    assert seen == [2] * 300 + [1] * 300 + [0] * 300


def test_bad_priorities_are_refused_and_nothing_is_written(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("two", partitions=1, config={"priority_levels": "2"})
        admin.create_topic("plain", partitions=1)
        with Producer(bootstrap) as p:
            for topic, priority in (("two", 2), ("two", 10), ("two", -1), ("plain", 1), ("two", "1")):
                with pytest.raises(InvalidPriorityError) as info:
                    p.send(topic, b"x", priority=priority)  # type: ignore[arg-type]
                assert info.value.code == InvalidPriorityError.code
                with pytest.raises(InvalidPriorityError):
                    p.send_many(topic, [b"x"], priority=priority)  # type: ignore[arg-type]
            p.send("plain", b"ok", priority=0).result(10)
            p.send("two", b"ok", priority=1).result(10)
            p.flush(10)
        assert _end_offsets(admin, "plain") == [1]
        assert _end_offsets(admin, "two") == [0]
        assert _end_offsets(admin, "__priority.1.two") == [1]


def test_level_topics_are_hidden_reserved_and_follow_their_topic(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        for bad in ("0", "11", "two", ""):
            with pytest.raises(InvalidConfigError):
                admin.create_topic("bad", partitions=1, config={"priority_levels": bad})
        with pytest.raises(InvalidConfigError):
            admin.create_topic("bad", partitions=1, config={"priority_levels": "2", "priority_weights": "1,2,3"})
        with pytest.raises(InvalidTopicError):
            admin.create_topic("__priority.1.mine", partitions=1)
        assert "bad" not in admin.list_topics(include_internal=True)
        admin.create_topic("lv", partitions=2, config={"priority_levels": "3"})
        assert admin.list_topics(include_internal=True).count("lv") == 1
        assert not [t for t in admin.list_topics(include_internal=True) if t.startswith("__priority.")]
        assert len(admin.describe_topic("__priority.2.lv").partitions) == 2
        with pytest.raises(InvalidTopicError):
            admin.delete_topic("__priority.2.lv")
        admin.create_partitions("lv", 3)
        assert len(admin.describe_topic("__priority.2.lv").partitions) == 3
        admin.delete_topic("lv")
        for hidden in ("__priority.1.lv", "__priority.2.lv"):
            with pytest.raises(UnknownTopicOrPartitionError):
                admin.describe_topic(hidden)


def test_a_plain_consumer_of_the_topic_reads_level_zero_only(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("pc", partitions=1, config={"priority_levels": "2"})
    with Producer(bootstrap) as p:
        p.send("pc", b"low").result(10)
        p.send("pc", b"high", priority=1).result(10)
        p.send("pc", b"low2").result(10)
    got: list[bytes | None] = []
    with Consumer(bootstrap, ["pc"], "plain", auto_offset_reset="earliest") as c:
        wait_for(lambda: got.extend(m.value for m in c.poll(200)) or len(got) >= 2, 20, "two records")
        got.extend(m.value for m in c.poll(300))
    assert got == [b"low", b"low2"]


def test_cli_creates_a_topic_with_levels_and_produces_at_a_priority(standalone):
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": standalone.address}

    def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([sys.executable, "-m", "logbroker", *args], input=stdin, capture_output=True, env=env,
                              timeout=60)

    assert cli("topics", "create", "c", "--config", "priority_levels=3").returncode == 0
    ok = cli("produce", "c", "--priority", "2", stdin=b"a\nb\n")
    assert ok.returncode == 0, ok.stderr.decode()
    bad = cli("produce", "c", "--priority", "3", stdin=b"x\n")
    assert bad.returncode != 0 and b"priority level 3" in bad.stderr, bad.stderr.decode()
    with Admin(standalone.address) as admin:
        assert _end_offsets(admin, "__priority.2.c") == [2]
        assert _end_offsets(admin, "c") == [0]
        assert "__priority.2.c" not in cli("topics", "list").stdout.decode()
