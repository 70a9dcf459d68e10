"""The data directory under faults: a second broker on it, a full disk at restart."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from logbroker import Admin, Producer
from tests.conftest import REPO, free_port
from tests.integration.test_crash_recovery import consume_all

pytestmark = pytest.mark.timeout(180)


def test_second_broker_on_the_same_data_dir_exits_at_once_and_harms_nothing(broker_factory):
    broker = broker_factory()
    with Admin(broker.address) as admin:
        admin.create_topic("t", partitions=1)
    values = [b"rec-%03d" % i for i in range(50)]
    with Producer(broker.address, acks="all", linger_ms=0) as producer:
        for v in values[:25]:
            producer.send("t", v, partition=0).result(timeout=30)
        started = time.monotonic()
        second = subprocess.run(
            [sys.executable, "-m", "logbroker", "serve", "--data-dir", str(broker.data_dir),
             "--listen", f"127.0.0.1:{free_port()}"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
        elapsed = time.monotonic() - started
        for v in values[25:]:  # the first broker goes on as if nothing happened
            producer.send("t", v, partition=0).result(timeout=30)
    assert second.returncode != 0
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, second.stderr
    assert str(broker.data_dir) in lines[0] and f"pid {broker.proc.pid}" in lines[0], lines[0]
    assert elapsed < 30, f"the second broker took {elapsed:.1f} s to give up"

    assert broker.stop() == 0
    broker2 = broker_factory(data_dir=broker.data_dir, port=broker.port)
    got = consume_all(broker2.address, "t", 1, expected_total=len(values))[0]
    assert [m.value for m in got] == values
