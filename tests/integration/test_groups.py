"""Consumer groups end to end: real ZooKeeper, three real brokers, members as real processes
(tests/group_member.py) that are killed -9 and frozen with SIGSTOP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from logbroker import Admin, Consumer, Producer
from tests.cluster import Cluster
from tests.conftest import REPO, wait_for
from tests.group_rpc import GroupRpc

pytestmark = pytest.mark.timeout(420)

MEMBER_SESSION_TIMEOUT_MS = 3000
TP = tuple[str, int]


@pytest.fixture
def cluster(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = Cluster(zookeeper, zk_chroot, tmp_path, 3, session_timeout_ms=2000,
                extra_args=["--replica-lag-time-max-ms", "3000", "--offsets-topic-partitions", "6"])
    try:
        yield c.start()
    finally:
        c.stop()


class Member:
    """tests/group_member.py as a child process, and the events it wrote."""

    def __init__(self, name: str, bootstrap: str, group: str, topics: list[str], workdir: Path,
                 extra: list[str] | None = None) -> None:
        self.name = name
        self.events_path = workdir / f"{group}-{name}.jsonl"
        self.log_path = workdir / f"{group}-{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "tests.group_member", "--bootstrap", bootstrap, "--group", group,
               "--events", str(self.events_path), "--session-timeout-ms", str(MEMBER_SESSION_TIMEOUT_MS)]
        for t in topics:
            cmd += ["--topic", t]
        cmd += extra or []
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.killed_at: float | None = None

    def events(self) -> list[dict[str, Any]]:
        if not self.events_path.exists():
            return []
        out = []
        for line in self.events_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by kill -9
        return out

    def owned(self) -> set[TP]:
        owned: set[TP] = set()
        for e in self.events():
            if e["ev"] == "assign":
                owned |= {(t, p) for t, p in e["tps"]}
            elif e["ev"] == "revoke":
                owned -= {(t, p) for t, p in e["tps"]}
        return owned

    def kill9(self) -> None:
        self.killed_at = time.monotonic()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def members(tmp_path) -> Iterator[list[Member]]:
    started: list[Member] = []
    yield started
    for m in started:
        m.stop()


def _produce(bootstrap: str, topic: str, start: int, count: int) -> None:
    with Producer(bootstrap, acks=-1) as p:
        for i in range(start, start + count):
            p.send(topic, value=b"%d" % i, key=b"k%d" % i)
        p.flush(60)


def _records(ms: list[Member]) -> dict[str, list[tuple[TP, int]]]:
    return {m.name: [((e["tp"][0], e["tp"][1]), e["o"]) for e in m.events() if e["ev"] == "rec"] for m in ms}


def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[TP, int]:
    with Consumer(bootstrap) as c:
        c.assign([(topic, p) for p in range(partitions)])
        c.seek_to_end()
        return {(topic, p): c.position(topic, p) for p in range(partitions)}


def _all_consumed(ms: list[Member], ends: dict[TP, int]) -> bool:
    seen: dict[TP, set[int]] = defaultdict(set)
    for recs in _records(ms).values():
        for tp, o in recs:
            seen[tp].add(o)
    return all(len(seen[tp]) >= end for tp, end in ends.items())


def _ownership_intervals(m: Member) -> list[tuple[TP, float, float]]:
    """(partition, from, to) for every stretch the member owned a partition."""
    since: dict[TP, float] = {}
    out = []
    end_of_life = m.killed_at if m.killed_at is not None else float("inf")
    for e in m.events():
        if e["ev"] == "assign":
            for t, p in e["tps"]:
                since.setdefault((t, p), e["t"])
        elif e["ev"] == "revoke":
            for t, p in e["tps"]:
                if (t, p) in since:
                    out.append(((t, p), since.pop((t, p)), e["t"]))
    out += [(tp, start, end_of_life) for tp, start in since.items()]
    return out


def test_three_members_then_a_join_and_a_kill9(cluster: Cluster, members: list[Member], tmp_path) -> None:
    boot = cluster.bootstrap
    Admin(boot).create_topic("jobs", partitions=12, replication_factor=3)
    members += [Member(f"m{i}", boot, "workers", ["jobs"], tmp_path) for i in range(3)]
    wait_for(lambda: all(len(m.owned()) == 4 for m in members), 60, "3 members owning 4 partitions each")

    # stable membership: every record goes to exactly one member
    _produce(boot, "jobs", 0, 3000)
    ends = _end_offsets(boot, "jobs", 12)
    wait_for(lambda: _all_consumed(members, ends), 60, "the first 3000 records consumed")
    counts: dict[tuple[TP, int], int] = defaultdict(int)
    for recs in _records(members).values():
        for r in recs:
            counts[r] += 1
    assert sum(counts.values()) == 3000 and all(n == 1 for n in counts.values())

    # a 4th member joins while records flow; then one of the first three dies
    members.append(Member("m3", boot, "workers", ["jobs"], tmp_path))
    _produce(boot, "jobs", 3000, 2000)
    wait_for(lambda: sorted(len(m.owned()) for m in members) == [3, 3, 3, 3], 60, "4 members owning 3 each")
    victim = members[1]
    victim.kill9()
    _produce(boot, "jobs", 5000, 2000)
    alive = [m for m in members if m is not victim]
    wait_for(lambda: sorted(len(m.owned()) for m in alive) == [4, 4, 4], 60, "3 survivors owning 4 each")
    ends = _end_offsets(boot, "jobs", 12)
    wait_for(lambda: _all_consumed(members, ends), 90, "all 7000 records consumed")

    # no partition owned by two members at any moment
    intervals = [(m.name, *iv) for m in members for iv in _ownership_intervals(m)]
    for i, (a, tp_a, s_a, e_a) in enumerate(intervals):
        for b, tp_b, s_b, e_b in intervals[i + 1:]:
            if a != b and tp_a == tp_b:
                assert e_a <= s_b or e_b <= s_a, f"{tp_a} owned by {a} [{s_a}, {e_a}] and {b} [{s_b}, {e_b}]"

    # duplicates only for records after the last commit of the member that died
    last_commit: dict[TP, int] = {}
    for e in victim.events():
        if e["ev"] == "commit":
            for t, p, o in e["offsets"]:
                last_commit[(t, p)] = o
    by_record: dict[tuple[TP, int], list[str]] = defaultdict(list)
    for name, recs in _records(members).items():
        for r in recs:
            by_record[r].append(name)
    for (tp, offset), names in by_record.items():
        if len(names) > 1:
            assert sorted(names).count(victim.name) == 1 and len(names) == 2, (tp, offset, names)
            assert offset >= last_commit.get(tp, 0), f"{tp}@{offset} redelivered though {victim.name} committed it"
    assert len(by_record) == 7000


def test_two_groups_each_see_every_record(cluster: Cluster) -> None:
    boot = cluster.bootstrap
    Admin(boot).create_topic("events", partitions=4, replication_factor=3)
    _produce(boot, "events", 0, 1000)
    seen: dict[str, set[tuple[int, int]]] = {"audit": set(), "billing": set()}
    consumers = [Consumer(boot, topics=["events"], group=g, session_timeout_ms=MEMBER_SESSION_TIMEOUT_MS)
                 for g in ("audit", "billing", "billing")]
    try:
        def drain() -> bool:
            for c, g in zip(consumers, ("audit", "billing", "billing"), strict=True):
                for m in c.poll(timeout_ms=50):
                    seen[g].add((m.partition, m.offset))
            return all(len(s) == 1000 for s in seen.values())

        wait_for(drain, 60, "both groups consuming all 1000 records", interval_s=0)
    finally:
        for c in consumers:
            c.close()


def test_coordinator_killed_twice_consumer_resumes_from_last_commit(cluster: Cluster, members: list[Member],
                                                                    tmp_path) -> None:
    boot = cluster.bootstrap
    Admin(boot).create_topic("ledger", partitions=3, replication_factor=3)
    stop = threading.Event()

    def produce_steadily() -> None:
        with Producer(boot, acks=-1) as p:
            i = 0
            while not stop.is_set():
                p.send("ledger", value=b"%d" % i, key=b"k%d" % i)
                i += 1
                if i % 50 == 0:
                    p.flush(60)
                    stop.wait(0.02)

    producer = threading.Thread(target=produce_steadily, daemon=True)
    producer.start()
    samples: list[dict[TP, int]] = []
    member = Member("solo", boot, "ledger-readers", ["ledger"], tmp_path)
    members.append(member)

    def commits() -> int:
        return sum(e["ev"] == "commit" for e in member.events())

    try:
        wait_for(lambda: commits() > 0, 60, "first commits")
        for _ in range(2):
            victim = _coordinator_id(cluster, "ledger-readers")
            n = commits()
            cluster.kill9(victim)
            wait_for(lambda n=n: commits() > n + 3, 90, "commits acknowledged by the next coordinator")
            samples.append(_committed_raw(cluster, "ledger-readers"))
            cluster.restart(victim)
        member.kill9()
    finally:
        stop.set()
        producer.join(60)
    last: dict[TP, int] = {}
    for e in member.events():
        if e["ev"] == "commit":
            for t, p, o in e["offsets"]:
                last[(t, p)] = o
    final = _committed_raw(cluster, "ledger-readers")
    for tp, o in last.items():  # (a commit acknowledged just before the kill -9 may not be in its log yet)
        assert final.get(tp, -1) >= o, f"{tp}: committed {final.get(tp)} but the member's last commit was {o}"
    for before, after in zip(samples, [*samples[1:], final], strict=True):
        assert all(after.get(tp, -1) >= o for tp, o in before.items()), "a committed offset went backwards"

    # a new member resumes exactly where the dead one committed (records produced since give it something to read)
    _produce(boot, "ledger", 10**6, 300)
    wait_for(lambda: not _members_of(cluster, "ledger-readers"), 30, "the dead member evicted")
    with Consumer(boot, topics=["ledger"], group="ledger-readers", enable_auto_commit=False,
                  session_timeout_ms=MEMBER_SESSION_TIMEOUT_MS) as c:
        first: dict[TP, int] = {}
        deadline = time.monotonic() + 60
        while len(first) < len(final) and time.monotonic() < deadline:
            for m in c.poll(timeout_ms=200):
                first.setdefault((m.topic, m.partition), m.offset)
        assert first == final, f"resumed at {first}, last commits {final}"


def _committed_raw(cluster: Cluster, group: str) -> dict[TP, int]:
    return GroupRpc([b.address for b in cluster.brokers.values()], group).committed()


def _members_of(cluster: Cluster, group: str) -> list[str]:
    return GroupRpc([b.address for b in cluster.brokers.values()], group).members()


def _coordinator_id(cluster: Cluster, group: str) -> int:
    rpc = GroupRpc([b.address for b in cluster.brokers.values()], group)
    rpc.find()
    return rpc.broker_id


def test_frozen_member_is_evicted_and_its_late_commit_rejected(cluster: Cluster, members: list[Member],
                                                               tmp_path) -> None:
    boot = cluster.bootstrap
    Admin(boot).create_topic("slow", partitions=4, replication_factor=3)
    _produce(boot, "slow", 0, 200)
    a = Member("a", boot, "g", ["slow"], tmp_path, ["--zombie-commit-on-cont"])
    b = Member("b", boot, "g", ["slow"], tmp_path)
    members += [a, b]
    wait_for(lambda: len(a.owned()) == 2 and len(b.owned()) == 2, 60, "2 partitions each")
    wait_for(lambda: _all_consumed(members, {("slow", p): e for (_, p), e in
                                             _end_offsets(boot, "slow", 4).items()}), 60, "all consumed")
    frozen_member_ids = set(_members_of(cluster, "g"))
    a.proc.send_signal(signal.SIGSTOP)
    wait_for(lambda: len(_members_of(cluster, "g")) == 1, 30, "the frozen member evicted")
    wait_for(lambda: len(b.owned()) == 4, 30, "the survivor owning every partition")
    _produce(boot, "slow", 200, 200)
    before = _committed_raw(cluster, "g")
    a.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: any(e["ev"] == "zombie_commit" for e in a.events()), 30, "the zombie's commit")
    zombie = next(e for e in a.events() if e["ev"] == "zombie_commit")
    assert zombie["code"] in ("UNKNOWN_MEMBER_ID", "FENCED_MEMBER_EPOCH", "STALE_MEMBER_EPOCH"), zombie
    assert zombie["member_id"] in frozen_member_ids
    # it rejoins as a member again, and the group settles
    wait_for(lambda: len(a.owned()) == 2 and len(b.owned()) == 2, 60, "settled again after the zombie rejoined")
    after = _committed_raw(cluster, "g")
    assert all(after.get(tp, -1) >= o for tp, o in before.items()), "a committed offset went backwards"
