"""`logbroker mirror` between two standalone brokers on loopback (each its own data directory), as a
real process: records copied with equal content (key, value, headers, timestamp, partition), the
topic created with the same partitions and config; kill -9 of the mirror mid-copy and a restart end
with exactly the source's records; a group's committed offsets are translated to the target, where a
consumer failing over resumes exactly where it stopped on the source (issue 21, item 4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.mirror import progress
from tests.conftest import REPO, BrokerProcess, free_port, wait_for
from tests.integration.test_sasl import ADMIN as SASL_ADMIN
from tests.integration.test_sasl import ADMIN_PASSWORD, WRONG_PASSWORD, sasl_broker  # noqa: F401 - the fixture
from tests.integration.test_tls import pki  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(300)

GROUP_ARGS = ["--offsets-topic-partitions", "4"]
BASE_TS_MS = 1_700_000_000_000


class MirrorProcess:
    """`logbroker mirror ...` as a child process; output in a log file."""

    def __init__(self, log_path: Path, args: list[str]) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logbroker", "mirror", "--report-interval-ms", "500", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                 "PYTHONUNBUFFERED": "1"},
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self, timeout_s: float = 60) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"mirror still running after {timeout_s}s: {self.log_text()[-3000:]}") from None

    def reap(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def clusters(broker_factory: Callable[..., BrokerProcess], tmp_path: Path) -> tuple[BrokerProcess, BrokerProcess]:
    a = broker_factory(data_dir=tmp_path / "a" / "data", extra_args=GROUP_ARGS)
    b = broker_factory(data_dir=tmp_path / "b" / "data", extra_args=GROUP_ARGS)
    return a, b


@pytest.fixture
def mirrors(tmp_path: Path) -> Iterator[Callable[..., MirrorProcess]]:
    started: list[MirrorProcess] = []

    def start(a: BrokerProcess | str, b: BrokerProcess | str, *args: str) -> MirrorProcess:
        source, target = (x if isinstance(x, str) else x.bootstrap for x in (a, b))
        m = MirrorProcess(tmp_path / f"mirror-{len(started)}.log", ["--source", source, "--target", target, *args])
        started.append(m)
        return m

    yield start
    for m in started:
        m.reap()


def produce(bootstrap: str, topic: str, count: int, partitions: int, first: int = 0) -> None:
    with Producer(bootstrap, linger_ms=20) as p:
        for i in range(first, first + count):
            p.send(topic, f"value-{i}".encode(), key=f"key-{i % 997}".encode(),
                   headers=[("seq", str(i).encode()), ("empty", None)], partition=i % partitions,
                   timestamp_ms=BASE_TS_MS + i)
        p.flush(timeout=120)


def total_end(admin: Admin, topic: str) -> int:
    try:
        return sum(p.high_watermark for p in admin.describe_topic(topic).partitions)
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def read_all(bootstrap: str, topic: str, partitions: int, expected: int) -> dict[int, list]:
    """Every record of the topic, per partition in offset order: (offset, key, value, headers, ts)."""
    out: dict[int, list] = {p: [] for p in range(partitions)}
    seen = 0
    with Consumer(bootstrap, enable_auto_commit=False, max_poll_records=10_000) as c:
        c.assign([(topic, p) for p in range(partitions)])
        c.seek_to_beginning()

        def more() -> bool:
            nonlocal seen
            for m in c.poll(timeout_ms=200):
                out[m.partition].append((m.offset, m.key, m.value, list(m.headers), m.timestamp))
                seen += 1
            return seen >= expected

        wait_for(more, 120, f"{expected} records of {topic}")
    return out


def status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
        return json.loads(resp.read())


def strip_src(headers: list) -> list:
    return [h for h in headers if h[0] != progress.SRC_HEADER]


@pytest.mark.slow
def test_records_are_copied_with_equal_content_and_the_topic_with_its_config(clusters, mirrors):
    a, b = clusters
    n, parts = 100_000, 4
    with Admin(a.bootstrap) as admin_a:
        admin_a.create_topic("orders", parts, config={"retention_ms": 86_400_000})
        admin_a.create_topic("payments", 1)  # not matched by --topics
    produce(a.bootstrap, "orders", n, parts)
    status_port = free_port()
    m = mirrors(a, b, "--topics", "orders.*", "--prefix", "us-east", "--status-port", str(status_port))
    with Admin(b.bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "us-east.orders") >= n, 180, "the copy of 100,000 records")
        d = admin_b.describe_topic("us-east.orders")
        assert len(d.partitions) == parts
        assert d.config.get("retention_ms") == "86400000"
        assert "payments" not in admin_b.list_topics() and "us-east.payments" not in admin_b.list_topics()
    mark = len(m.log_text())
    wait_for(lambda: "lag 0 records" in m.log_text()[mark:], 30, "a lag report of 0")
    wait_for(lambda: status(status_port).get("lag_total") == 0, 30, "lag 0 on --status-port")
    assert status(status_port)["copied"] == n and set(status(status_port)["lag"]) == {
        f"orders-{p}" for p in range(parts)}
    assert m.stop() == 0
    source = read_all(a.bootstrap, "orders", parts, n)
    target = read_all(b.bootstrap, "us-east.orders", parts, n)
    for p in range(parts):
        assert len(target[p]) == len(source[p])
        for (s_off, s_key, s_val, s_h, s_ts), (_t_off, t_key, t_val, t_h, t_ts) in zip(source[p], target[p], strict=True):
            assert (t_key, t_val, strip_src(t_h), t_ts) == (s_key, s_val, s_h, s_ts)
            assert progress.source_position(t_h, p) == s_off


@pytest.mark.slow
def test_a_mirror_killed_mid_copy_and_restarted_loses_nothing_and_duplicates_nothing(clusters, mirrors):
    a, b = clusters
    n, parts = 100_000, 4
    with Admin(a.bootstrap) as admin_a:
        admin_a.create_topic("orders", parts)
    produce(a.bootstrap, "orders", n, parts)
    first = mirrors(a, b, "--topics", "orders", "--flush-interval-ms", "100",
                    "--session-timeout-ms", "3000")
    with Admin(b.bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "orders") >= n // 5, 120, "a fifth of the copy")
        first.kill9()
        at_kill = total_end(admin_b, "orders")
        assert at_kill < n, "the copy finished before the kill: nothing tested"
        second = mirrors(a, b, "--topics", "orders", "--flush-interval-ms", "100",
                    "--session-timeout-ms", "3000")
        produce(a.bootstrap, "orders", 100, parts, first=n)  # the source goes on meanwhile
        wait_for(lambda: total_end(admin_b, "orders") >= n + 100, 180, "the rest of the copy")
        mark = len(second.log_text())
        wait_for(lambda: "lag 0 records" in second.log_text()[mark:], 30, "a lag report of 0")
        assert total_end(admin_b, "orders") == n + 100, "duplicates on the target"
    assert second.stop() == 0
    assert "resuming at source offset" in second.log_text()
    target = read_all(b.bootstrap, "orders", parts, n + 100)
    source = read_all(a.bootstrap, "orders", parts, n + 100)
    for p in range(parts):
        assert [progress.source_position(h, p) for _o, _k, _v, h, _t in target[p]] == [r[0] for r in source[p]]
        assert [r[2] for r in target[p]] == [r[2] for r in source[p]]


def committed_on(bootstrap: str, group: str) -> dict:
    with Admin(bootstrap) as admin:
        try:
            return admin.describe_group(group).offsets
        except Exception:  # noqa: BLE001 - not there yet
            return {}


def consume_and_commit(bootstrap: str, group: str, topic: str, count: int) -> None:
    """A group member on cluster A reads `count` more records, commits its positions, leaves."""
    got = 0
    with Consumer(bootstrap, topic, group=group, enable_auto_commit=False, max_poll_records=100) as c:
        def read() -> bool:
            nonlocal got
            got += len(c.poll(timeout_ms=200))
            return got >= count

        wait_for(read, 60, f"{count} records for group {group}")
        c.commit()


def test_a_group_fails_over_to_the_target_at_its_translated_offsets(clusters, mirrors):
    a, b = clusters
    parts, local = 2, 5
    with Admin(a.bootstrap) as admin_a, Admin(b.bootstrap) as admin_b:
        admin_a.create_topic("events", parts)
        admin_b.create_topic("events", parts)  # B's own records first: target offsets = source + 5
    produce(b.bootstrap, "events", local * parts, parts, first=1_000_000)
    produce(a.bootstrap, "events", 2_000, parts)
    mirrors(a, b, "--topics", "events", "--sync-group-offsets", "app.*", "--checkpoint-interval-ms", "200",
            "--flush-interval-ms", "100")
    for count in (300, 500):  # the group goes on on A; B follows each commit within a checkpoint
        consume_and_commit(a.bootstrap, "app", "events", count)
        on_a = committed_on(a.bootstrap, "app")
        expected = {tp: off + local for tp, off in on_a.items()}
        wait_for(lambda: committed_on(b.bootstrap, "app") == expected, 60,  # noqa: B023
                 f"translated offsets {expected} on the target")
    # fail over: the group's consumer now runs on B and starts exactly where it stopped on A
    firsts: dict[int, int] = {}
    with Consumer(b.bootstrap, "events", group="app", enable_auto_commit=False) as c:
        def read() -> bool:
            for m in c.poll(timeout_ms=200):
                src = progress.source_position(m.headers, m.partition)  # None: one of B's own records
                firsts.setdefault(m.partition, -1 if src is None else src)
            return len(firsts) == parts

        wait_for(read, 60, "records on B for the failed-over group")
    assert on_a, "the group committed nothing on A"
    assert {("events", p): off for p, off in firsts.items() if ("events", p) in on_a} == on_a


def test_active_active_mirrors_each_way_without_loops(clusters, mirrors):
    """A -> B with prefix a and B -> A with prefix b: each side gets the other's topic under the
    other's alias, and no copy of a copy (a.b.x, b.a.x) ever appears."""
    a, b = clusters
    for cluster in (a, b):
        with Admin(cluster.bootstrap) as admin:
            admin.create_topic("orders", 2)
    produce(a.bootstrap, "orders", 1_000, 2)
    produce(b.bootstrap, "orders", 700, 2, first=5_000)
    common = ["--topics", ".*", "--flush-interval-ms", "100", "--topics-interval-ms", "100"]
    mirrors(a, b, *common, "--prefix", "a", "--target-alias", "b")
    mirrors(b, a, *common, "--prefix", "b", "--target-alias", "a")
    with Admin(a.bootstrap) as admin_a, Admin(b.bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "a.orders") >= 1_000 and total_end(admin_a, "b.orders") >= 700, 120,
                 "each side's copy of the other's orders")
        produce(a.bootstrap, "orders", 10, 2, first=1_000)  # a marker after the copies exist
        wait_for(lambda: total_end(admin_b, "a.orders") >= 1_010, 60, "the marker on B")
        assert sorted(admin_a.list_topics()) == ["b.orders", "orders"]
        assert sorted(admin_b.list_topics()) == ["a.orders", "orders"]
        assert total_end(admin_b, "a.orders") == 1_010 and total_end(admin_a, "b.orders") == 700


def test_a_restarted_mirror_translates_offsets_of_records_an_earlier_run_copied(clusters, mirrors):
    a, b = clusters
    with Admin(a.bootstrap) as admin_a:
        admin_a.create_topic("events", 1)
    produce(a.bootstrap, "events", 1_000, 1)
    first = mirrors(a, b, "--topics", "events", "--flush-interval-ms", "100")
    with Admin(b.bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "events") >= 1_000, 60, "the first run's copy")
    assert first.stop() == 0
    consume_and_commit(a.bootstrap, "app", "events", 300)  # behind everything the first run copied
    on_a = committed_on(a.bootstrap, "app")
    assert 0 < on_a[("events", 0)] < 1_000
    mirrors(a, b, "--topics", "events", "--sync-group-offsets", "app", "--checkpoint-interval-ms", "200")
    wait_for(lambda: committed_on(b.bootstrap, "app") == on_a, 60, f"translated offsets {on_a} on the target")


@pytest.fixture
def zk_clusters(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two single-broker ZooKeeper-backed clusters, each with its own ZooKeeper process."""
    from tests.cluster import Cluster
    from tests.zookeeper import ZooKeeperProcess, zookeeper_available

    why = zookeeper_available()
    if why is not None:
        if os.environ.get("CI"):
            raise RuntimeError(f"ZooKeeper is required in CI: {why}")
        pytest.skip(why)
    started: list = []
    try:
        bootstraps = []
        for name in ("a", "b"):
            zk = ZooKeeperProcess(tmp_path / f"zk-{name}", free_port()).start()
            started.append(zk)
            cluster = Cluster(zk, f"/{name}", tmp_path / f"cluster-{name}", 1, extra_args=GROUP_ARGS).start()
            started.append(cluster)
            bootstraps.append(cluster.bootstrap)
        yield bootstraps[0], bootstraps[1]
    finally:
        for thing in reversed(started):
            thing.stop()


@pytest.mark.slow
def test_between_two_zookeeper_clusters_a_killed_mirror_ends_with_the_sources_records(zk_clusters, mirrors):
    a_bootstrap, b_bootstrap = zk_clusters
    n, parts = 30_000, 3
    with Admin(a_bootstrap) as admin_a:
        admin_a.create_topic("orders", parts)
    produce(a_bootstrap, "orders", n, parts)
    args = ["--topics", "orders", "--prefix", "dc1", "--flush-interval-ms", "100", "--session-timeout-ms", "3000"]
    first = mirrors(a_bootstrap, b_bootstrap, *args)
    with Admin(b_bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "dc1.orders") >= n // 10, 120, "a tenth of the copy")
        first.kill9()
        assert total_end(admin_b, "dc1.orders") < n, "the copy finished before the kill: nothing tested"
        second = mirrors(a_bootstrap, b_bootstrap, *args)
        wait_for(lambda: total_end(admin_b, "dc1.orders") >= n, 120, "the rest of the copy")
        mark = len(second.log_text())
        wait_for(lambda: "lag 0 records" in second.log_text()[mark:], 30, "a lag report of 0")
        assert total_end(admin_b, "dc1.orders") == n, "duplicates on the target"
    source = read_all(a_bootstrap, "orders", parts, n)
    target = read_all(b_bootstrap, "dc1.orders", parts, n)
    for p in range(parts):
        assert [(r[1], r[2], strip_src(r[3]), r[4]) for r in target[p]] == [r[1:] for r in source[p]]
        assert [progress.source_position(r[3], p) for r in target[p]] == [r[0] for r in source[p]]


def test_a_mirror_logs_in_to_a_scram_source_and_copies_to_a_plain_target(sasl_broker, broker_factory, mirrors,  # noqa: F811
                                                                         tmp_path):
    """--source-tls-ca and --source-sasl-* (the super user, SCRAM-SHA-512) to a TLS + SCRAM broker;
    the target plain. A wrong password: one error line naming the source, exit != 0, no secret shown."""
    src, ca = sasl_broker.broker, sasl_broker.ca_only
    target = broker_factory(data_dir=tmp_path / "b" / "data", extra_args=GROUP_ARGS)
    with Producer(src.bootstrap, tls=ca, sasl=SASL_ADMIN, linger_ms=20) as p:
        for i in range(500):
            p.send("orders", f"v{i}".encode(), key=f"k{i}".encode(), headers=[("h", b"x")], timestamp_ms=BASE_TS_MS + i)
        p.flush(timeout=60)
    good, bad = tmp_path / "good-password", tmp_path / "bad-password"
    good.write_text(ADMIN_PASSWORD + "\n")
    bad.write_text(WRONG_PASSWORD + "\n")

    def login(password_file: Path) -> list[str]:
        return ["--topics", "orders", "--source-tls-ca", ca.ca_file, "--source-sasl-user", "admin",
                "--source-sasl-mechanism", "SCRAM-SHA-512", "--source-sasl-password-file", str(password_file)]

    m = mirrors(src.bootstrap, target.bootstrap, *login(good), "--flush-interval-ms", "100")
    with Admin(target.bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "orders") >= 500, 60, "the copy of 500 records")
    assert m.stop() == 0
    copied = read_all(target.bootstrap, "orders", 1, 500)[0]
    assert [(k, v, strip_src(h), ts) for _o, k, v, h, ts in copied] == [
        (f"k{i}".encode(), f"v{i}".encode(), [("h", b"x")], BASE_TS_MS + i) for i in range(500)]

    refused = subprocess.run(
        [sys.executable, "-m", "logbroker", "mirror", "--source", src.bootstrap, "--target", target.bootstrap,
         *login(bad)], cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    lines = [ln for ln in refused.stderr.splitlines() if ln.strip()]
    assert refused.returncode != 0
    assert len(lines) == 1, refused.stderr
    assert lines[0].startswith("logbroker: error: the source cluster") and "authentication failed" in lines[0]
    assert WRONG_PASSWORD not in refused.stderr + refused.stdout


def _owned(port: int) -> set[str]:
    """The partitions a mirror process reported as its own (empty while it has none or is starting)."""
    try:
        s = status(port)
    except OSError:
        return set()
    return set(s.get("lag") or {}) if s.get("assigned") else set()


@pytest.mark.slow
def test_two_mirror_processes_in_one_group_share_the_copy_and_one_killed_loses_and_duplicates_nothing(
        clusters, mirrors):
    """The worker group for scale: two `logbroker mirror` processes with the same --group split a
    6-partition topic; one is killed with -9 while records still flow; the other takes its partitions
    over, and the target ends with exactly the source's records, each once, in order."""
    a, b = clusters
    parts, first, more = 6, 30_000, 30_000
    with Admin(a.bootstrap) as admin_a:
        admin_a.create_topic("orders", parts)
    produce(a.bootstrap, "orders", first, parts)
    ports = [free_port(), free_port()]
    args = ["--topics", "orders", "--group", "mirror-pool", "--flush-interval-ms", "100",
            "--session-timeout-ms", "3000"]
    victim, survivor = (mirrors(a, b, *args, "--status-port", str(port)) for port in ports)
    everything = {f"orders-{p}" for p in range(parts)}

    def shared() -> bool:
        mine, theirs = _owned(ports[0]), _owned(ports[1])
        return bool(mine) and bool(theirs) and not mine & theirs and mine | theirs == everything

    wait_for(shared, 90, "both mirror processes to own some of the 6 partitions")
    producer = threading.Thread(target=produce, args=(a.bootstrap, "orders", more, parts, first), daemon=True)
    producer.start()
    with Admin(b.bootstrap) as admin_b:
        at_start = total_end(admin_b, "orders")
        wait_for(lambda: total_end(admin_b, "orders") > at_start + 2_000, 60, "copying under way")
        victim.kill9()
        at_kill = total_end(admin_b, "orders")
        producer.join(120)
        assert not producer.is_alive()
        assert at_kill < first + more, "the copy finished before the kill: nothing tested"
        wait_for(lambda: _owned(ports[1]) == everything, 60, "the survivor to take over every partition")
        wait_for(lambda: total_end(admin_b, "orders") >= first + more, 180, "the rest of the copy")
        wait_for(lambda: status(ports[1]).get("lag_total") == 0, 30, "the survivor's lag 0")
        assert total_end(admin_b, "orders") == first + more, "duplicates on the target"
    assert survivor.stop() == 0
    source = read_all(a.bootstrap, "orders", parts, first + more)
    target = read_all(b.bootstrap, "orders", parts, first + more)
    for p in range(parts):
        assert [progress.source_position(r[3], p) for r in target[p]] == [r[0] for r in source[p]]
        assert [(r[1], r[2], strip_src(r[3]), r[4]) for r in target[p]] == [r[1:] for r in source[p]]


def test_records_of_a_source_that_grew_are_copied_into_their_source_partitions(clusters, mirrors):
    """The source grows while the mirror is stopped; the restarted mirror grows the target first and
    then copies records placed by the old count: the target takes each into its source partition (it
    created the topic with key_order_on_growth=false, so nothing is refused or re-routed)."""
    a, b = clusters
    with Admin(a.bootstrap) as admin_a:
        admin_a.create_topic("grows", 2)
    with Producer(a.bootstrap, linger_ms=5) as p:
        p.send_many("grows", [b"first"], [b"k-first"])
        p.flush(timeout=30)
    m = mirrors(a, b, "--topics", "grows")
    with Admin(b.bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "grows") >= 1, 60, "the first copy")
        assert admin_b.describe_topic("grows").config.get("key_order_on_growth") == "false"
    assert m.stop() == 0
    keys = [b"key-%d" % i for i in range(400)]
    with Producer(a.bootstrap, linger_ms=5) as p:  # placed by 2 partitions
        p.send_many("grows", [b"v-%d" % i for i in range(400)], keys)
        p.flush(timeout=30)
    with Admin(a.bootstrap) as admin_a:
        admin_a.create_partitions("grows", 4)
    m = mirrors(a, b, "--topics", "grows")
    with Admin(b.bootstrap) as admin_b:
        wait_for(lambda: total_end(admin_b, "grows") >= 401, 60, "401 records on the target")
        assert len(admin_b.describe_topic("grows").partitions) == 4
    assert m.stop() == 0
    source = read_all(a.bootstrap, "grows", 4, 401)
    target = read_all(b.bootstrap, "grows", 4, 401)
    for p in range(4):
        assert [(k, v) for _o, k, v, _h, _t in target[p]] == [(k, v) for _o, k, v, _h, _t in source[p]]
    assert "PARTITION_COUNT_CHANGED" not in m.log_text() and "Traceback" not in m.log_text()
