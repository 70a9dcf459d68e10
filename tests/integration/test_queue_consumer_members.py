"""QueueConsumers as a crowd, on a real standalone broker: a member killed with -9 while holding records
(in a child process), and four members sharing two partitions."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest

from logbroker import Admin, Producer, QueueConsumer
from tests.conftest import REPO, BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(120)

# The child: takes every record produced, acks those with an even offset (commit_acks: answered once
# durable), prints one JSON line {acked, held, acquired_at_s} and blocks until it is killed.
CHILD = r'''
import json, sys, time
from logbroker import QueueConsumer

bootstrap, group, topic, want = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
c = QueueConsumer(bootstrap, group, [topic], lock_ms=2000, auto_offset_reset="earliest")
got = {}
acquired_at = None
deadline = time.monotonic() + 30
while len(got) < want and time.monotonic() < deadline:
    for m in c.poll(500):
        got.setdefault((m.partition, m.offset), m)
        acquired_at = acquired_at or time.time()
for (p, o), m in got.items():
    if o % 2 == 0:
        m.ack()
results = c.commit_acks()
acked = sorted([p, o] for (t, p, o), err in results.items() if err is None)
held = sorted([p, o] for (p, o) in got if [p, o] not in acked)
print(json.dumps({"acked": acked, "held": held, "acquired_at_s": acquired_at}), flush=True)
while True:
    time.sleep(60)
'''


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=["--offsets-topic-partitions", "2"])


def _produce(bootstrap: str, topic: str, n: int, partitions: int) -> None:
    with Producer(bootstrap, acks="all") as p:
        futures = [p.send(topic, b"r%d" % i, partition=i % partitions) for i in range(n)]
        p.flush(30)
        for f in futures:
            f.result(30)


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    if not ready:
        raise AssertionError(f"the child printed nothing within {timeout_s}s")
    line = proc.stdout.readline().decode()
    if not line:
        raise AssertionError(f"the child exited ({proc.poll()}) without a report")
    return line


def _all_settled(admin: Admin, group: str, ends: dict[int, int]) -> bool:
    """Every partition's start offset (all below it settled) at its log end `ends[partition]`."""
    parts = admin.describe_share_group(group)["partitions"]
    return {p["partition"]: (p["start_offset"], p["in_flight"]) for p in parts} == {
        p: (end, 0) for p, end in ends.items()}


def test_member_killed_holding_records_they_go_to_another_with_delivery_count_2(standalone, tmp_path):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("held", partitions=2)
    _produce(bootstrap, "held", 20, 2)
    err = open(tmp_path / "child.err", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", CHILD, bootstrap, "crowd", "held", "20"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=err,
                            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    try:
        report = json.loads(_read_line(proc, 60))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        err.close()
    acked = {tuple(x) for x in report["acked"]}
    held = {tuple(x) for x in report["held"]}
    assert len(acked) == 10 and len(held) == 10, (report, (tmp_path / "child.err").read_text()[-2000:])
    assert not acked & held

    with QueueConsumer(bootstrap, "crowd", ["held"]) as c:
        got: dict[tuple[int, int], int] = {}
        deadline = time.monotonic() + 30
        while len(got) < len(held) and time.monotonic() < deadline:
            for m in c.poll(300):
                assert (m.partition, m.offset) not in got, f"{m} delivered twice"
                assert time.time() >= report["acquired_at_s"] + 1.9, "handed out before the 2 s lock expired"
                got[(m.partition, m.offset)] = m.delivery_count
                m.ack()
        assert set(got) == held  # exactly the held ones; never an acked one
        assert set(got.values()) == {2}
        quiet_until = time.monotonic() + 1.5
        while time.monotonic() < quiet_until:
            late = c.poll(300)
            assert late == [], f"records came back after they were settled: {late}"
        assert all(e is None for e in c.commit_acks().values())
    with Admin(bootstrap) as admin:
        wait_for(lambda: _all_settled(admin, "crowd", {0: 10, 1: 10}), 15, "every record acked by someone")


def test_four_members_on_two_partitions_all_get_work_each_record_acked_once(standalone):
    bootstrap = standalone.address
    with Admin(bootstrap) as admin:
        admin.create_topic("work", partitions=2)
    total = 400
    consumers = [QueueConsumer(bootstrap, "four", ["work"], auto_offset_reset="earliest", max_poll_records=5)
                 for _ in range(4)]
    received: list[list[tuple[int, int]]] = [[] for _ in consumers]
    stop = threading.Event()
    errors: list[BaseException] = []

    def member(i: int) -> None:
        try:
            while not stop.is_set():
                for m in consumers[i].poll(200):
                    time.sleep(0.002)  # the "work": lets the others take their share
                    received[i].append((m.partition, m.offset))
                    m.ack()  # rides on the next poll
            consumers[i].commit_acks()
        except BaseException as e:  # reported by the test thread
            errors.append(e)

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(4)]
    try:
        for c in consumers:
            c.poll(100)  # join before the records exist: stable membership from here on
        for t in threads:
            t.start()
        _produce(bootstrap, "work", total, 2)
        wait_for(lambda: sum(map(len, received)) >= total or bool(errors), 60, "every record received")
        with Admin(bootstrap) as admin:
            wait_for(lambda: _all_settled(admin, "four", {0: total // 2, 1: total // 2}) or bool(errors), 30, "every record acknowledged")
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for c in consumers:
            c.close()
    assert not errors, errors
    counts = Counter(r for rs in received for r in rs)
    assert len(counts) == total and set(counts.values()) == {1}, "each record handed out (and acked) once"
    assert all(received), [len(r) for r in received]  # all four got work
    assert {p for rs in received for p, _ in rs} == {0, 1}
