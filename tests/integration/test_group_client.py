"""The client side of consumer groups end to end: Consumer members, Admin and the `groups` CLI against a
real standalone broker and a real three-broker cluster (real ZooKeeper)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.errors import InvalidGroupIdError, NonEmptyGroupError
from tests.cluster import Cluster
from tests.conftest import BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(300)

GROUP_ARGS = ["--offsets-topic-partitions", "4"]


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=GROUP_ARGS)


@pytest.fixture
def cluster(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000,
                extra_args=[*GROUP_ARGS, "--replica-lag-time-max-ms", "3000"])
    try:
        yield c.start()
    finally:
        c.stop()


class Ledger:
    """Callbacks and records of several members, in one order (a lock-protected log)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str, frozenset]] = []  # (assign|revoke|lost, member, partitions)
        self.records: list[tuple[str, int, int]] = []  # (member, partition, offset)

    def callbacks(self, name: str) -> dict:
        def record(kind: str) -> Callable[[set], None]:
            def cb(tps: set) -> None:
                with self.lock:
                    self.events.append((kind, name, frozenset(tps)))
            return cb
        return {"on_assign": record("assign"), "on_revoke": record("revoke"), "on_lost": record("lost")}

    def count(self) -> int:
        with self.lock:
            return len(self.records)

    def keys(self) -> set[tuple[int, int]]:
        with self.lock:
            return {(p, o) for _, p, o in self.records}

    def check_single_ownership(self, upto: int | None = None) -> None:
        """Replaying the callbacks (the first `upto`): nobody is given a partition another member has not
        given up."""
        owner: dict[tuple[str, int], str] = {}
        with self.lock:
            events = self.events[:upto]
        for kind, name, tps in events:
            for tp in tps:
                if kind == "assign":
                    assert tp not in owner, f"{tp} assigned to {name} while {owner[tp]} owned it: {events}"
                    owner[tp] = name
                else:
                    assert owner.get(tp) == name, f"{name} gave up {tp} it did not own: {events}"
                    del owner[tp]


class Member(threading.Thread):
    """A consumer polling in its own thread (callbacks run here), recording into a Ledger."""

    def __init__(self, name: str, ledger: Ledger, bootstrap: str, topics: list[str] | None, group: str,
                 **kw: object) -> None:
        super().__init__(name=f"member-{name}", daemon=True)
        self.member = name
        self.ledger = ledger
        self.consumer = Consumer(bootstrap, topics, group, **ledger.callbacks(name), **kw)  # type: ignore[arg-type]
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                for m in self.consumer.poll(timeout_ms=100):
                    with self.ledger.lock:
                        self.ledger.records.append((self.member, m.partition, m.offset))
        except BaseException as e:  # surfaced by the test through .error
            self.error = e
        finally:
            self.consumer.close(timeout=10)

    def assignment(self) -> set[tuple[str, int]]:
        return self.consumer.assignment()

    def stop(self) -> None:
        self.stop_event.set()
        self.join(30)
        assert not self.is_alive(), f"{self.member} did not stop"
        assert self.error is None, f"{self.member} failed: {self.error!r}"


def produce(bootstrap: str, topic: str, partitions: int, per_partition: int, start: int = 0) -> None:
    with Producer(bootstrap, acks="all", linger_ms=5) as p:
        for i in range(start, start + per_partition):
            for part in range(partitions):
                p.send(topic, b"%d-%d" % (part, i), partition=part)
        p.flush(60)


def cli(address: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": address}
    proc = subprocess.run([sys.executable, "-m", "logbroker", *args], capture_output=True, env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr.decode()
    return proc


def test_members_split_partitions_commit_and_leave_promptly(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("orders", partitions=6)
    produce(bootstrap, "orders", 6, 100)
    ledger = Ledger()
    a = Member("a", ledger, bootstrap, ["orders"], "g1", max_poll_records=50)
    try:
        wait_for(lambda: len(a.assignment()) == 6, 60, "a to own all 6 partitions")
        wait_for(lambda: ledger.count() >= 100, 30, "a to read something")
        b = Member("b", ledger, bootstrap, ["orders"], "g1", max_poll_records=50)
        try:
            wait_for(lambda: len(a.assignment()) == 3 and len(b.assignment()) == 3, 30, "a 3/3 split")
            assert a.assignment().isdisjoint(b.assignment())
            wait_for(lambda: ledger.keys() == {(p, o) for p in range(6) for o in range(100)}, 30, "every record")
            # stable membership, commit on revoke: each record went to exactly one member, once
            assert ledger.count() == 600
            ledger.check_single_ownership()
            revoked = [e for e in ledger.events if e[0] == "revoke" and e[1] == "a"]
            assert revoked and revoked[0][2] == frozenset(b.assignment())
            assert a.consumer.member_id != b.consumer.member_id and a.consumer.member_epoch > 0
            # a prompt leave: b owns everything long before the 45 s session timeout
            t0 = time.monotonic()
            a.stop()
            wait_for(lambda: len(b.assignment()) == 6, 10, "b to take a's partitions after a left")
            assert time.monotonic() - t0 < 5
            produce(bootstrap, "orders", 6, 10, start=100)
            wait_for(lambda: ledger.count() == 660, 30, "b to read the new records")
            ledger.check_single_ownership()
        finally:
            b.stop()
    finally:
        if a.is_alive():
            a.stop()
    with Consumer(bootstrap, group="g1") as c:  # closing committed everything (auto-commit)
        c.assign([("orders", p) for p in range(6)])
        assert [c.committed("orders", p) for p in range(6)] == [110] * 6
        c.commit({("orders", 0): 5})  # the group is empty: a manual consumer may commit
        assert c.committed("orders", 0) == 5


def test_commit_committed_and_position_of_a_member(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("t", partitions=2)
    produce(bootstrap, "t", 2, 20)
    with Consumer(bootstrap, ["t"], "g2", enable_auto_commit=False, max_poll_records=5) as c:
        got = []
        deadline = time.monotonic() + 60
        while len(got) < 40:
            assert time.monotonic() < deadline
            got.extend(c.poll(timeout_ms=200))
        assert c.assignment() == {("t", 0), ("t", 1)}
        assert c.committed("t", 0) is None
        c.commit()
        assert (c.committed("t", 0), c.committed("t", 1)) == (20, 20) == (c.position("t", 0), c.position("t", 1))
        results = []
        c.commit({("t", 0): 7}, asynchronous=True, callback=lambda o, e: results.append((o, e)))
        deadline = time.monotonic() + 10
        while not results:
            assert time.monotonic() < deadline
            c.poll(timeout_ms=50)
        assert results == [({("t", 0): 7}, None)] and c.committed("t", 0) == 7
    with Consumer(bootstrap, ["t"], "g2") as c:  # resumes from the commits
        first: dict[int, int] = {}
        deadline = time.monotonic() + 60
        while len(first) < 1:
            assert time.monotonic() < deadline
            for m in c.poll(timeout_ms=200):
                first.setdefault(m.partition, m.offset)
        assert first.get(0, 7) == 7 and 1 not in first


def test_pattern_subscription_picks_up_a_topic_created_later(standalone):
    bootstrap = standalone.address
    ledger = Ledger()
    with Admin(bootstrap) as admin:
        admin.create_topic("metrics.cpu", partitions=2)
        produce(bootstrap, "metrics.cpu", 2, 5)
        m = Member("m", ledger, bootstrap, None, "g3", pattern=r"metrics\..*")
        try:
            wait_for(lambda: len(ledger.keys()) == 10, 60, "records of metrics.cpu")
            admin.create_topic("metrics.disk", partitions=3)
            admin.create_topic("other", partitions=1)
            produce(bootstrap, "metrics.disk", 3, 5)
            wait_for(lambda: m.assignment() == {("metrics.cpu", 0), ("metrics.cpu", 1), ("metrics.disk", 0),
                                                ("metrics.disk", 1), ("metrics.disk", 2)}, 30, "metrics.disk assigned")
            wait_for(lambda: ledger.count() == 25, 30, "records of metrics.disk")
        finally:
            m.stop()


def test_groups_cli_list_describe_reset_delete(standalone):
    address = standalone.address
    with Admin(address) as admin:
        admin.create_topic("events", partitions=3)
    produce(address, "events", 3, 10)
    c = Consumer(address, ["events"], "g4", enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 60
        read = 0
        while read < 30:
            assert time.monotonic() < deadline
            read += len(c.poll(timeout_ms=200))
        c.commit({("events", 0): 10, ("events", 1): 4})
        listing = json.loads(cli(address, "groups", "list", "--format", "json").stdout)
        assert [(g["group"], g["members"]) for g in listing] == [("g4", 1)]
        text = cli(address, "groups", "list").stdout.decode().splitlines()
        assert text[0].split() == ["GROUP", "STATE", "MEMBERS", "COORDINATOR"] and text[1].split()[0] == "g4"
        d = json.loads(cli(address, "groups", "describe", "g4", "--format", "json").stdout)
        assert d["group"] == "g4" and [m["member_id"] for m in d["members"]] == [c.member_id]
        rows = {r["partition"]: r for r in d["partitions"]}
        assert rows[0] == {"topic": "events", "partition": 0, "current_offset": 10, "log_end_offset": 10, "lag": 0,
                           "member_id": c.member_id}
        assert (rows[1]["current_offset"], rows[1]["lag"]) == (4, 6)
        assert (rows[2]["current_offset"], rows[2]["lag"], rows[2]["log_end_offset"]) == (None, None, 10)
        lines = cli(address, "groups", "describe", "g4").stdout.decode().splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("TOPIC"))
        assert lines[header].split() == ["TOPIC", "PARTITION", "CURRENT-OFFSET", "LOG-END-OFFSET", "LAG", "MEMBER"]
        assert lines[header + 2].split() == ["events", "1", "4", "10", "6", c.member_id]
        assert lines[header + 3].split() == ["events", "2", "-", "10", "-", c.member_id]
        # a group with members: no reset, no delete (one line, exit 1)
        for args in (["groups", "reset-offsets", "--group", "g4", "--topic", "events", "--to-earliest"],
                     ["groups", "delete", "g4"]):
            proc = cli(address, *args, check=False)
            assert proc.returncode == 1 and proc.stdout == b""
            assert len(proc.stderr.decode().strip().splitlines()) == 1, proc.stderr
            assert b"NON_EMPTY_GROUP" in proc.stderr
    finally:
        c.close()
    probe = Consumer(address, ["events"], "g4", enable_auto_commit=False)  # the API refuses as the CLI does
    try:
        wait_for(lambda: probe.poll(timeout_ms=50) is not None and probe.member_epoch > 0, 30, "probe joined")
        with Admin(address) as admin, pytest.raises(NonEmptyGroupError):
            admin.reset_offsets("g4", "events", "earliest")
    finally:
        probe.close()
    dry = json.loads(cli(address, "groups", "reset-offsets", "--group", "g4", "--topic", "events", "--shift-by", "-3",
                         "--dry-run", "--format", "json").stdout)
    assert [o["offset"] for o in dry["offsets"]] == [7, 1, 0] and dry["dry_run"]
    d = json.loads(cli(address, "groups", "describe", "g4", "--format", "json").stdout)
    assert [r["current_offset"] for r in d["partitions"]] == [10, 4]  # unchanged by the dry run
    out = cli(address, "groups", "reset-offsets", "--group", "g4", "--topic", "events", "--to-offset", "6")
    assert [line.split()[-1] for line in out.stdout.decode().splitlines()[1:]] == ["6", "6", "6"]
    cli(address, "groups", "reset-offsets", "--group", "g4", "--topic", "events", "--partitions", "2",
        "--to-latest")
    cli(address, "groups", "reset-offsets", "--group", "g4", "--topic", "events", "--partitions", "1",
        "--to-datetime", "2000-01-01T00:00:00Z")
    d = json.loads(cli(address, "groups", "describe", "g4", "--format", "json").stdout)
    assert [(r["current_offset"], r["lag"], r["member_id"]) for r in d["partitions"]] == [
        (6, 4, None), (0, 10, None), (10, 0, None)]
    with Consumer(address, ["events"], "g4") as again:  # a new member starts where the reset put the group
        firsts: dict[int, int] = {}
        deadline = time.monotonic() + 60
        while len(firsts) < 2:
            assert time.monotonic() < deadline
            for m in again.poll(timeout_ms=200):
                firsts.setdefault(m.partition, m.offset)
        assert firsts == {0: 6, 1: 0}
    assert cli(address, "groups", "delete", "g4").stdout.decode().strip() == "deleted group g4"
    assert json.loads(cli(address, "groups", "list", "--format", "json").stdout) == []
    proc = cli(address, "groups", "describe", "g4", check=False)
    assert proc.returncode == 1 and b"GROUP_ID_NOT_FOUND" in proc.stderr
    proc = cli(address, "groups", "reset-offsets", "--group", "g4", "--topic", "events", "--to-datetime", "soon",
               check=False)
    assert proc.returncode == 1 and len(proc.stderr.decode().strip().splitlines()) == 1


def test_three_members_on_a_cluster_follow_the_coordinator(cluster):
    bootstrap = cluster.bootstrap
    with Admin(bootstrap) as admin:
        admin.create_topic("jobs", partitions=6, replication_factor=3)
    produce(bootstrap, "jobs", 6, 50)
    ledger = Ledger()
    members = [Member(n, ledger, bootstrap, ["jobs"], "g5", session_timeout_ms=6000) for n in ("a", "b", "c")]
    try:
        wait_for(lambda: sorted(len(m.assignment()) for m in members) == [2, 2, 2], 60, "a 2/2/2 split")
        wait_for(lambda: len(ledger.keys()) == 300, 60, "every record")
        assert ledger.count() == 300  # stable group, nothing read twice
        ledger.check_single_ownership()
        with Admin(bootstrap) as admin:
            (listing,) = [g for g in admin.list_groups() if g.group == "g5"]
            assert listing.members == 3
            coordinator = admin.describe_group("g5").coordinator_id
        # kill -9 the coordinator: members find the new one, rejoin, and go on. The new coordinator knows
        # no members (membership is not persisted): the first to rejoin gets partitions the others still
        # hold until their next heartbeat is refused, so ownership is checked only up to the kill; their
        # commits are refused meanwhile (at least once, never backwards).
        with ledger.lock:
            before_kill = len(ledger.events)
        cluster.kill9(coordinator)
        produce(bootstrap, "jobs", 6, 20, start=50)
        wait_for(lambda: len(ledger.keys()) == 420, 90, "records produced after the coordinator died")
        wait_for(lambda: sorted(len(m.assignment()) for m in members) == [2, 2, 2], 60, "the group to settle again")
        ledger.check_single_ownership(before_kill)
        owned = [m.assignment() for m in members]
        assert set().union(*owned) == {("jobs", p) for p in range(6)} and sum(map(len, owned)) == 6
        with Admin(bootstrap) as admin:
            assert admin.describe_group("g5").coordinator_id != coordinator
    finally:
        for m in members:
            m.stop()
    with Admin(bootstrap) as admin:
        d = admin.describe_group("g5")
        assert d.members == [] and d.offsets == {("jobs", p): 70 for p in range(6)}


def test_an_invalid_group_id_is_raised_by_poll(standalone):
    with Admin(standalone.address) as admin:
        admin.create_topic("x", partitions=1)
    with Consumer(standalone.address, ["x"], "a/b") as c, pytest.raises(InvalidGroupIdError):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            c.poll(timeout_ms=100)
