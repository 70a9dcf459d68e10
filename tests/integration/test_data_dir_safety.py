"""The data directory under faults: a second broker on it, a full disk at restart."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from logbroker import Admin, Producer
from logbroker.errors import StorageError
from logbroker.v1 import logbroker_pb2 as pb
from tests.conftest import REPO, free_port, wait_for
from tests.integration.test_crash_recovery import consume_all
from tests.tmpfs import fill_up, small_tmpfs

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
             "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "off"],
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


def _produce_one(address: str, value: bytes) -> BaseException | None:
    """One record, no retries: the error it met, or None."""
    with Producer(address, acks="all", linger_ms=0, retries=0, delivery_timeout_ms=10_000,
                  request_timeout_ms=5_000) as producer:
        try:
            producer.send("t", value, partition=0).result(timeout=30)
        except Exception as e:  # noqa: BLE001 - the test looks at which
            return e
    return None


def test_restart_on_a_full_disk_serves_what_it_has_and_refuses_writes(broker_factory, tmp_path):
    """A real small volume: a restart preallocates the topic's segment size (not 128 MiB); once the
    disk is too full even for that, the broker still starts, serves the partition read-only, fails
    produces with KAFKA_STORAGE_ERROR, and takes them again when space is back."""
    with small_tmpfs(tmp_path / "vol", 16 << 20) as volume:
        brokers = []
        try:
            broker = broker_factory(data_dir=volume)
            brokers.append(broker)
            with Admin(broker.address) as admin:
                admin.create_topic("t", partitions=1, config={"segment_bytes": str(1 << 20)})
            values = [b"rec-%03d" % i for i in range(40)]
            with Producer(broker.address, acks="all", linger_ms=0) as producer:
                for v in values:
                    producer.send("t", v, partition=0).result(timeout=30)
            assert broker.stop() == 0

            # 16 MiB is far below the default 128 MiB segment: the restart sizes it by the topic
            broker = broker_factory(data_dir=volume, port=broker.port)
            brokers.append(broker)
            assert [m.value for m in consume_all(broker.address, "t", 1, expected_total=40)[0]] == values
            assert broker.stop() == 0

            filler = fill_up(volume, leave_bytes=256 << 10)  # room for the indexes, not a segment
            broker = broker_factory(data_dir=volume, port=broker.port)
            brokers.append(broker)
            assert "read-only" in broker.log_text()
            assert [m.value for m in consume_all(broker.address, "t", 1, expected_total=40)[0]] == values
            err = _produce_one(broker.address, b"refused")
            assert isinstance(err, StorageError), repr(err)
            assert err.code == pb.KAFKA_STORAGE_ERROR

            filler.unlink()  # space is back: a later produce retries the preallocation
            wait_for(lambda: _produce_one(broker.address, b"after") is None, 30, "a produce accepted again")
            got = consume_all(broker.address, "t", 1, expected_total=41)[0]
            assert [m.value for m in got] == [*values, b"after"]
        finally:
            for b in brokers:
                b.stop()
