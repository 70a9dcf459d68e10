"""`logbroker worker --queue` end to end: a real broker, worker CLI processes over a share group.

The handler appends one line per *delivery* ("offset value delivery-time-s pid") before it decides,
so the file counts attempts, not successes; values starting with "poison" always raise.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from logbroker import Admin
from logbroker.client.consumer import Consumer
from logbroker.group import share_headers as sh
from tests.conftest import BrokerProcess, wait_for
from tests.integration.test_worker import GROUP_ARGS, WorkerProcess, produce

pytestmark = pytest.mark.timeout(180)

HANDLER = '''
import os, time

OUT = os.environ["WK_OUT"]


def handle(m):
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{m.offset} {m.value.decode()} {time.monotonic():.3f} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
    if m.value.startswith(b"poison"):
        raise ValueError("cannot handle " + m.value.decode())
'''


def deliveries(path: Path) -> list[tuple[int, str, float]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            off, value, t, _pid = line.split()
            out.append((int(off), value, float(t)))
    return out


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=GROUP_ARGS)


@pytest.fixture
def queue_workers(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    app = tmp_path / "app"
    app.mkdir()
    (app / "wk_app.py").write_text(HANDLER)
    started: list[WorkerProcess] = []

    def start(broker: BrokerProcess, *args: str) -> WorkerProcess:
        w = WorkerProcess(broker, app, tmp_path / "deliveries.txt", ["--queue", *args], {}, f"qworker-{len(started)}")
        started.append(w)
        return w

    yield start
    for w in started:
        w.reap()


def test_failing_handler_is_tried_max_attempts_times_then_dead_lettered_good_ones_acked_once(
        standalone, queue_workers, tmp_path):
    with Admin(standalone.address) as admin:
        admin.create_topic("jobs", partitions=1)
    values = [b"good-%d" % i for i in range(20)]
    values.insert(7, b"poison-1")
    produce(standalone, "jobs", values, 1)
    poison_offset = 7
    w = queue_workers(standalone, "--group", "q", "--topic", "jobs", "--workers", "3", "--auto-offset-reset",
                      "earliest", "--max-delivery-attempts", "3", "--retry-backoff-ms", "200",
                      "--retry-backoff-max-ms", "1000", "--lock-ms", "10000")
    out = tmp_path / "deliveries.txt"
    wait_for(lambda: len(deliveries(out)) >= 23, 60, f"20 good deliveries and 3 attempts of the poison ({w.log_path})")

    with Admin(standalone.address) as admin:
        wait_for(lambda: "jobs.dlq" in admin.list_topics(), 20, "the dead-letter topic")
        with Consumer(standalone.address, topics=["jobs.dlq"], auto_offset_reset="earliest") as consumer:
            dead: list = []
            wait_for(lambda: dead.extend(consumer.poll(200)) or dead, 20, "the dead letter")

        def settled() -> bool:
            (p,) = admin.describe_share_group("q")["partitions"]
            return p["start_offset"] == len(values) and p["in_flight"] == 0
        wait_for(settled, 20, "every record of jobs settled (acked or dead-lettered)")

    got = deliveries(out)
    counts = Counter(off for off, _, _ in got)
    assert counts[poison_offset] == 3  # exactly max_delivery_attempts, not one more
    assert {off: n for off, n in counts.items() if off != poison_offset} == {
        i: 1 for i in range(len(values)) if i != poison_offset}  # good ones once each
    times = [t for off, _, t in got if off == poison_offset]
    assert times[1] - times[0] >= 0.15 and times[2] - times[1] >= 0.35  # the group's backoff: 200, then 400 ms

    (m,) = dead
    headers = dict(m.headers)
    assert m.value == b"poison-1"
    assert headers[sh.DLQ_TOPIC] == b"jobs" and headers[sh.DLQ_PARTITION] == b"0"
    assert headers[sh.DLQ_OFFSET] == str(poison_offset).encode() and headers[sh.DLQ_DELIVERY_COUNT] == b"3"
    assert headers[sh.DLQ_REASON] == sh.REASON_REJECTED.encode()
    assert headers[sh.DLQ_REASON_TEXT] == b"ValueError: cannot handle poison-1"

    assert w.alive(), "the worker keeps running after a dead letter"
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.log_text()[-3000:]
    assert "Traceback (most recent call last)" in w.log_text()  # the last attempt's traceback is logged


def test_two_queue_workers_share_one_partition(standalone, queue_workers, tmp_path):
    with Admin(standalone.address) as admin:
        admin.create_topic("one", partitions=1)
    produce(standalone, "one", [b"v%d" % i for i in range(200)], 1)
    a = queue_workers(standalone, "--group", "q1", "--topic", "one", "--workers", "2", "--auto-offset-reset", "earliest")
    b = queue_workers(standalone, "--group", "q1", "--topic", "one", "--workers", "2", "--auto-offset-reset", "earliest")
    out = tmp_path / "deliveries.txt"
    wait_for(lambda: len({off for off, _, _ in deliveries(out)}) == 200, 60, "all 200 records handled")
    with Admin(standalone.address) as admin:
        wait_for(lambda: admin.describe_share_group("q1")["partitions"][0]["start_offset"] == 200, 20,
                 "every record acked")
    assert Counter(off for off, _, _ in deliveries(out)) == dict.fromkeys(range(200), 1)
    for w in (a, b):
        w.signal(signal.SIGTERM)
        assert w.wait(30) == 0, w.log_text()[-3000:]
