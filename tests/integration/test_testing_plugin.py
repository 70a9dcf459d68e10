"""The `logbroker.testing` pytest plugin, used as an application would: only its fixtures and the public
client (Producer, Consumer, Admin), nothing from the project's tests/ package."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from logbroker import Admin, Consumer, Producer

README = Path(__file__).resolve().parents[2] / "README.md"


def read_all(bootstrap: str, topic: str, count: int, timeout_s: float = 30.0, **options: object) -> list:
    out: list = []
    with Consumer(bootstrap, topics=[topic], auto_offset_reset="earliest", **options) as consumer:
        deadline = time.monotonic() + timeout_s
        while len(out) < count and time.monotonic() < deadline:
            out.extend(consumer.poll(timeout_ms=500))
    return out


def test_an_application_round_trip_on_the_fixture_broker(logbroker_broker):
    with Admin(logbroker_broker.bootstrap) as admin:
        admin.create_topic("orders", partitions=2)
    with Producer(logbroker_broker.bootstrap, acks="all") as producer:
        for i in range(20):
            producer.send("orders", b"order-%d" % i, key=b"customer-%d" % (i % 4))
        producer.flush()
    messages = read_all(logbroker_broker.bootstrap, "orders", 20)
    assert sorted(m.value for m in messages) == sorted(b"order-%d" % i for i in range(20))
    assert logbroker_broker.data_dir.is_dir() and logbroker_broker.log_path.exists()


def test_each_test_gets_a_fresh_broker(logbroker_broker):
    with Admin(logbroker_broker.bootstrap) as admin:
        assert "orders" not in admin.list_topics()


def test_the_factory_starts_independent_brokers_and_reaps_them(logbroker_broker_factory):
    a, b = logbroker_broker_factory(), logbroker_broker_factory()
    assert a.bootstrap != b.bootstrap and a.data_dir != b.data_dir
    with Admin(a.bootstrap) as admin:
        admin.create_topic("only-on-a", partitions=1)
    with Admin(b.bootstrap) as admin:
        assert "only-on-a" not in admin.list_topics()
    b.stop()
    assert not b.running() and a.running()


def test_a_broker_restarts_with_its_data(logbroker_broker):
    with Admin(logbroker_broker.bootstrap) as admin:
        admin.create_topic("kept", partitions=1)
    with Producer(logbroker_broker.bootstrap, acks="all") as producer:
        producer.send("kept", b"before-restart", key=b"k").result(timeout=30)
    logbroker_broker.kill()  # kill -9: the log is recovered from its files on start
    logbroker_broker.restart()
    assert [m.value for m in read_all(logbroker_broker.bootstrap, "kept", 1)] == [b"before-restart"]


@pytest.mark.parametrize("run", [1, 2])
def test_the_session_broker_is_shared(logbroker_broker_session, run):
    with Admin(logbroker_broker_session.bootstrap) as admin:
        if run == 1:
            admin.create_topic("session-topic", partitions=1)
        else:  # the second test sees what the first made: one broker for the session
            assert "session-topic" in admin.list_topics()
    with Producer(logbroker_broker_session.bootstrap, acks="all") as producer:
        producer.send("session-topic", b"x").result(timeout=30)
    assert logbroker_broker_session.running()


def test_a_three_broker_cluster_replicates(logbroker_cluster):
    assert len(logbroker_cluster.brokers) == 3
    with Admin(logbroker_cluster.bootstrap) as admin:
        admin.create_topic("replicated", partitions=1, replication_factor=3)
    with Producer(logbroker_cluster.bootstrap, acks="all") as producer:
        producer.send("replicated", b"on-three-brokers", key=b"k").result(timeout=30)
    assert [m.value for m in read_all(logbroker_cluster.bootstrap, "replicated", 1)] == [b"on-three-brokers"]


def test_the_readme_example_passes_in_a_project_of_its_own(tmp_path):
    """README's "Testing your application" example, run by pytest in a directory that has nothing of
    this repository but the installed logbroker: the plugin's fixtures are found and pass."""
    section = README.read_text().split("## Testing your application", 1)[1]
    (tmp_path / "test_app.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    import logbroker

    root = str(Path(logbroker.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    # -p loads the plugin when the entry point is not installed (a stale editable install); beside
    # the entry point it is the same plugin, not a second registration
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "logbroker.testing",
                           "test_app.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
