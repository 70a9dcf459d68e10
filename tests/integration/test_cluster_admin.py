"""Cluster administration on real processes: partition reassignment, the cluster CLI, the one-command
dev cluster, and a whole-cluster restart. Real ZooKeeper, real brokers, real `logbroker` commands."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from logbroker import Admin, Consumer, Producer
from logbroker.storage import record_batch as rb
from tests.cluster import Cluster
from tests.conftest import REPO, wait_for

pytestmark = pytest.mark.timeout(180)

SESSION_TIMEOUT_MS = 2000


def cli(bootstrap: str, *args: str, check: bool = True, timeout: float = 60,
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": bootstrap, **(env_extra or {})}
    proc = subprocess.run([sys.executable, "-m", "logbroker", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"logbroker {' '.join(args)}: {proc.stderr}"
    return proc


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exactly one `logbroker: error:` line and no traceback."""
    err = proc.stderr
    assert proc.returncode == 1, (proc.returncode, err)
    assert err.startswith("logbroker: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def make_cluster(zookeeper, chroot: str, workdir: Path, size: int) -> Cluster:
    return Cluster(zookeeper, chroot, workdir, size, session_timeout_ms=SESSION_TIMEOUT_MS,
                   extra_args=["--replica-lag-time-max-ms", "3000"])


@pytest.fixture
def cluster3(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = make_cluster(zookeeper, zk_chroot, tmp_path, 3)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def cluster4(zookeeper, zk_chroot, tmp_path) -> Iterator[Cluster]:
    c = make_cluster(zookeeper, zk_chroot, tmp_path, 4)
    try:
        yield c.start()
    finally:
        c.stop()


def settled(c: Cluster, topic: str, partitions: int, isr_size: int) -> bool:
    try:
        states = c.partition_states(topic)
    except (grpc.RpcError, AssertionError):
        return False
    return len(states) == partitions and all(s.leader >= 0 and len(s.isr) == isr_size for s in states.values())


def produce_acked(bootstrap: str, topic: str, values: list[bytes], partition: int | None = None,
                  keyed: bool = False) -> dict[bytes, tuple[int, int]]:
    """Send with acks=all; every record must be acknowledged. value -> (partition, offset)."""
    with Producer(bootstrap, acks="all", linger_ms=2, request_timeout_ms=10_000,
                  delivery_timeout_ms=30_000) as producer:
        futures = [(v, producer.send(topic, v, key=v if keyed else None, partition=partition)) for v in values]
        producer.flush(60)
        return {v: (f.result(timeout=30).partition, f.result(timeout=30).offset) for v, f in futures}


def consume_all(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 30):
    got: dict[int, list] = {p: [] for p in range(partitions)}
    deadline = time.monotonic() + timeout_s
    with Consumer(bootstrap, auto_offset_reset="earliest") as consumer:
        consumer.assign([(topic, p) for p in range(partitions)])
        while sum(len(v) for v in got.values()) < expected and time.monotonic() < deadline:
            for m in consumer.poll(timeout_ms=500):
                got[m.partition].append(m)
    return got


def assert_all_at_their_offsets(got: dict[int, list], acked: dict[bytes, tuple[int, int]]) -> None:
    where = {(m.partition, m.offset): m.value for msgs in got.values() for m in msgs}
    missing = [(v, loc) for v, loc in acked.items() if where.get(loc) != v]
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged records not at their offsets: {missing[:3]}"


def batches_below(batches: list[bytes], hw: int) -> list[bytes]:
    out = []
    for raw in batches:
        if rb.parse_header(raw).base_offset >= hw:
            break
        out.append(raw)
    return out


# ============================================================================ 1. reassignment


def test_reassignment_copies_data_then_drops_the_old_replicas(cluster4):
    c = cluster4
    topic = "moving"
    with Admin(c.bootstrap) as admin:
        admin.create_topic(topic, partitions=1, replication_factor=2, config={"min_insync_replicas": "2"})
    wait_for(lambda: settled(c, topic, 1, 2), 30, "partition led with both replicas in the ISR")
    acked: dict[bytes, tuple[int, int]] = {}
    for r in range(4):  # several batches
        acked |= produce_acked(c.bootstrap, topic, [b"r-%05d" % i for i in range(r * 500, r * 500 + 500)], partition=0)
    assert sorted(off for _, off in acked.values()) == list(range(2000))
    before = c.partition_states(topic)[0]
    old = list(before.replicas)
    hw_before = c.high_watermark(topic, 0)
    assert hw_before == 2000
    reference = batches_below(c.replica_batches(before.leader, topic, 0), hw_before)
    assert len(reference) > 1

    # bad requests: a clear error, and nothing changes
    newcomers = [b for b in sorted(c.brokers) if b not in old]
    for args, code in (
        (["--partition", "5", "--replicas", "0,1"], "UNKNOWN_TOPIC_OR_PARTITION"),
        (["--partition", "0", "--replicas", f"{newcomers[0]},9"], "INVALID_REPLICATION_FACTOR"),
        (["--partition", "0", "--replicas", f"{newcomers[0]},{newcomers[0]}"], "INVALID_REPLICATION_FACTOR"),
        (["--partition", "0", "--replicas", "1,x"], None),
    ):
        err = one_error_line(cli(c.bootstrap, "topics", "reassign", topic, *args, check=False))
        assert code is None or code in err, err
    err = one_error_line(cli(c.bootstrap, "topics", "reassign", "nosuchtopic", "--partition", "0",
                             "--replicas", "0,1", check=False))
    assert "UNKNOWN_TOPIC_OR_PARTITION" in err, err
    st = c.partition_states(topic)[0]
    assert (list(st.replicas), st.leader, st.leader_epoch) == (old, before.leader, before.leader_epoch)

    # move to the two brokers that hold nothing yet: both copy everything, the leader moves, both old
    # replicas go away
    target = newcomers
    out = cli(c.bootstrap, "topics", "reassign", topic, "--partition", "0", "--replicas", ",".join(map(str, target)))
    assert "reassignment" in out.stdout

    def moved() -> bool:
        try:
            st = c.partition_states(topic)[0]
        except (grpc.RpcError, AssertionError, KeyError):
            return False
        return list(st.replicas) == target and sorted(st.isr) == sorted(target) and st.leader in target

    wait_for(moved, 30, f"replicas and ISR {target}")
    after = c.partition_states(topic)[0]
    assert after.leader_epoch > before.leader_epoch
    for b in old:
        wait_for(lambda b=b: not (c.brokers[b].data_dir / f"{topic}-0").exists(), 30,
                 f"the removed replica's directory on broker {b} deleted")

    # every record still at its offset, through the new leader
    got = consume_all(c.bootstrap, topic, 1, 2000)
    assert [m.offset for m in got[0]] == list(range(2000))
    assert_all_at_their_offsets(got, acked)
    # the new replicas hold the old leader's batches byte for byte
    hw = c.high_watermark(topic, 0)
    assert hw == 2000
    for b in target:
        assert batches_below(c.replica_batches(b, topic, 0), hw) == reference, f"broker {b} differs"

    # produce continues on the new replicas (acks=all needs both of them)
    more = produce_acked(c.bootstrap, topic, [b"s-%05d" % i for i in range(300)], partition=0)
    assert sorted(off for _, off in more.values()) == list(range(2000, 2300))
    got = consume_all(c.bootstrap, topic, 1, 2300)
    assert_all_at_their_offsets(got, {**acked, **more})
    wait_for(lambda: c.high_watermark(topic, 0) == 2300, 10, "high watermark at 2300")
    logs = [batches_below(c.replica_batches(b, topic, 0), 2300) for b in target]
    assert logs[0] == logs[1] and logs[0][:len(reference)] == reference
    for b in old:
        assert not (c.brokers[b].data_dir / f"{topic}-0").exists(), f"broker {b} recreated the replica"

    # a partial move under load: the leader goes, one replica stays, a former replica comes back
    # (from an empty directory); acks=all records sent meanwhile are all kept
    leader = c.leader_of(topic, 0)
    stay = next(b for b in target if b != leader)
    second = [stay, old[0]]
    stop = threading.Event()
    during: dict[bytes, tuple[int, int]] = {}
    errors: list[BaseException] = []

    def produce_while_moving() -> None:
        with Producer(c.bootstrap, acks="all", linger_ms=2, request_timeout_ms=5000,
                      delivery_timeout_ms=30_000, retry_backoff_ms=50) as producer:
            i = 0
            while not stop.is_set():
                futures = [(b"u-%05d" % j, producer.send(topic, b"u-%05d" % j, partition=0)) for j in range(i, i + 50)]
                i += 50
                for v, f in futures:
                    try:
                        md = f.result(timeout=40)
                        during[v] = (md.partition, md.offset)
                    except Exception as e:  # noqa: BLE001 - reported below
                        errors.append(e)

    t = threading.Thread(target=produce_while_moving, daemon=True)
    t.start()
    wait_for(lambda: len(during) >= 100, 20, "records flowing before the second move")
    cli(c.bootstrap, "topics", "reassign", topic, "--partition", "0", "--replicas", ",".join(map(str, second)))
    target = second

    wait_for(moved, 30, f"replicas and ISR {second}")
    wait_for(lambda: not (c.brokers[leader].data_dir / f"{topic}-0").exists(), 30,
             f"the removed replica's directory on broker {leader} deleted")
    n = len(during)
    wait_for(lambda: len(during) >= n + 100, 20, "records flowing after the second move")
    stop.set()
    t.join(60)
    assert not t.is_alive() and not errors, errors[:3]
    everything = {**acked, **more, **during}
    hw = c.high_watermark(topic, 0)
    got = consume_all(c.bootstrap, topic, 1, hw)
    assert [m.offset for m in got[0]] == list(range(hw))
    assert_all_at_their_offsets(got, everything)
    wait_for(lambda: sorted(c.partition_states(topic)[0].isr) == sorted(second), 10, "both replicas in the ISR")
    logs = [batches_below(c.replica_batches(b, topic, 0), hw) for b in second]
    assert logs[0] == logs[1] and logs[0][:len(reference)] == reference


# ============================================================================ 2. CLI in a cluster


def test_cluster_cli_create_describe_grow_delete(cluster3):
    c = cluster3
    boot = c.bootstrap
    out = cli(boot, "topics", "create", "events", "--partitions", "2", "--replication-factor", "3",
              "--config", "min_insync_replicas=2")
    assert "created topic events" in out.stdout
    wait_for(lambda: settled(c, "events", 2, 3), 30, "full ISRs")

    d = json.loads(cli(boot, "topics", "describe", "events", "--format", "json").stdout)
    assert d["name"] == "events" and d["config"]["min_insync_replicas"] == "2"
    assert [p["partition"] for p in d["partitions"]] == [0, 1]
    for p in d["partitions"]:
        assert sorted(p["replicas"]) == [0, 1, 2] and sorted(p["isr"]) == [0, 1, 2]
        assert p["leader"] in p["replicas"] and p["leader_epoch"] >= 0
    text = cli(boot, "topics", "describe", "events").stdout
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "PARTITION" in line)
    assert all(col in lines[header] for col in ("LEADER", "EPOCH", "REPLICAS", "ISR"))
    assert "min_insync_replicas=2" in text
    for p, line in zip(d["partitions"], lines[header + 1:], strict=True):
        cols = line.split()
        assert cols[:5] == [str(p["partition"]), str(p["leader"]), str(p["leader_epoch"]),
                            ",".join(map(str, p["replicas"])), ",".join(map(str, p["isr"]))], line

    info = json.loads(cli(boot, "cluster", "describe", "--format", "json").stdout)
    assert [b["broker_id"] for b in info["brokers"]] == [0, 1, 2]
    assert {f"{b['host']}:{b['port']}" for b in info["brokers"]} == {b.address for b in c.brokers.values()}
    assert info["controller_id"] in (0, 1, 2) and info["controller_epoch"] >= 1
    text = cli(boot, "cluster", "describe").stdout
    assert f"Controller: {info['controller_id']} (epoch {info['controller_epoch']})" in text
    for b in c.brokers.values():
        assert b.address in text

    # grow in the cluster: the new partitions get three replicas and a leader, and take records
    out = cli(boot, "topics", "add-partitions", "events", "--total", "4")
    assert "4 partitions" in out.stdout
    wait_for(lambda: settled(c, "events", 4, 3), 30, "4 partitions with full ISRs")
    acked = produce_acked(boot, "events", [b"e-%d" % i for i in range(400)], keyed=True)
    assert {p for p, _ in acked.values()} == {0, 1, 2, 3}

    # more replicas than live brokers: one clear line, nothing created
    err = one_error_line(cli(boot, "topics", "create", "wide", "--replication-factor", "4", check=False))
    assert "INVALID_REPLICATION_FACTOR" in err, err
    assert "wide" not in cli(boot, "topics", "list").stdout.split()

    # delete: gone from the list and from every broker's disk
    dirs = [b.data_dir / f"events-{p}" for b in c.brokers.values() for p in range(4)]
    assert all(d.is_dir() for d in dirs)
    out = cli(boot, "topics", "delete", "events")
    assert "deleted topic events" in out.stdout
    wait_for(lambda: "events" not in cli(boot, "topics", "list").stdout.split(), 30, "events gone from the list")
    wait_for(lambda: not any(d.exists() for d in dirs), 30, "every broker deleted the topic's directories")
    err = one_error_line(cli(boot, "topics", "describe", "events", check=False))
    assert "UNKNOWN_TOPIC_OR_PARTITION" in err, err

    # delete while a replica's broker is down: its copy goes once it is back
    cli(boot, "topics", "create", "gone", "--replication-factor", "3")
    wait_for(lambda: settled(c, "gone", 1, 3), 30, "gone fully replicated")
    down = c.brokers[2]
    assert (down.data_dir / "gone-0").is_dir()
    assert down.stop() == 0
    boot2 = ",".join(c.brokers[i].address for i in (0, 1))
    wait_for(lambda: c.live_broker_ids() == {0, 1}, 30, "broker 2 deregistered")
    err = one_error_line(cli(boot2, "topics", "create", "wide", "--replication-factor", "3", check=False))
    assert "INVALID_REPLICATION_FACTOR" in err, err
    cli(boot2, "topics", "delete", "gone")
    wait_for(lambda: "gone" not in cli(boot2, "topics", "list").stdout.split(), 30, "gone gone from the list")
    wait_for(lambda: not any((c.brokers[i].data_dir / "gone-0").exists() for i in (0, 1)), 30,
             "live brokers deleted gone-0")
    down.start(60)
    wait_for(lambda: not (down.data_dir / "gone-0").exists(), 30, "the returning broker deleted gone-0")
    assert "gone" not in cli(boot, "topics", "list").stdout.split()
    cli(boot, "topics", "create", "gone", "--replication-factor", "3")  # the name is free again
    wait_for(lambda: settled(c, "gone", 1, 3), 30, "the new gone fully replicated")


# ============================================================================ 3. dev-cluster


def _pids_mentioning(text: str) -> set[int]:
    """Processes (other than us) whose command line contains `text`."""
    me = os.getpid()
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            out.add(int(entry.name))
    return out


def _reap(proc: subprocess.Popen[str], marker: str) -> None:
    """Kill what the test started: the dev-cluster's process group and anything it spawned."""
    for pid in [proc.pid, *_pids_mentioning(marker)]:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class DevClusterOutput:
    """`logbroker dev-cluster` as a child process whose stdout lines are read as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "logbroker", "dev-cluster", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     start_new_session=True, env=env)
        self.printed: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def read_until(self, done: Callable[[list[str]], bool], what: str, timeout_s: float = 60) -> list[str]:
        """Lines printed so far, once `done(lines)` holds; fails if dev-cluster exits first."""
        deadline = time.monotonic() + timeout_s
        while not done(self.printed):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {what} within {timeout_s} s; got {self.printed}"
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, (
                f"dev-cluster exited ({self.proc.wait()}): {self.printed} "
                f"{self.proc.stderr.read() if self.proc.stderr else ''}")
            self.printed.append(line)
        return self.printed


def test_dev_cluster_starts_serves_and_stops_everything_on_ctrl_c(zookeeper, tmp_path):
    # (the `zookeeper` fixture only ensures ZooKeeper is installed; the dev cluster starts its own)
    data_dir = tmp_path / "devcluster"
    dev = DevClusterOutput(["--brokers", "3", "--data-dir", str(data_dir)], REPO,
                           {**os.environ, "PYTHONUNBUFFERED": "1"})
    proc = dev.proc
    try:
        printed = dev.read_until(lambda lines: any(x.startswith("bootstrap") for x in lines), "bootstrap line")
        bootstrap = next(line.split()[1] for line in printed if line.startswith("bootstrap"))
        brokers = [line.split()[2] for line in printed if line.startswith("broker ")]
        assert len(brokers) == 3 and bootstrap.split(",") == brokers
        assert any(line.startswith("zookeeper") for line in printed)
        children = _pids_mentioning(str(data_dir)) - {proc.pid}
        assert len(children) >= 4, children  # ZooKeeper and three brokers

        with Admin(bootstrap) as admin:
            admin.create_topic("dev", partitions=2, replication_factor=3, config={"min_insync_replicas": "2"})
            assert [b["broker_id"] for b in admin.describe_cluster()["brokers"]] == [0, 1, 2]
        acked = produce_acked(bootstrap, "dev", [b"d-%d" % i for i in range(200)], keyed=True)
        assert_all_at_their_offsets(consume_all(bootstrap, "dev", 2, 200), acked)

        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pytest.fail("dev-cluster did not exit within 45 s of SIGINT")
        assert rc == 0, proc.stderr.read() if proc.stderr else ""
        survivors = _pids_mentioning(str(data_dir))
        assert not survivors, f"processes left behind by dev-cluster: {survivors}"
    finally:
        _reap(proc, str(data_dir))


def test_dev_cluster_by_default_keeps_its_data_out_of_the_working_tree_and_says_where(zookeeper, tmp_path):
    cwd, tmp = tmp_path / "checkout", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    dev = DevClusterOutput(["--brokers", "1"], cwd, env)
    proc = dev.proc
    try:
        printed = dev.read_until(lambda lines: bool(lines) and lines[-1].startswith("export "), "export line")
        data_line = next(line for line in printed if line.startswith("data "))
        data_dir = Path(data_line.split()[1])
        assert data_dir.parent == tmp and data_dir.name.startswith("logbroker-dev-cluster-"), data_line
        assert "broker-N.log" in data_line and (data_dir / "broker-0.log").exists()
        bootstrap = next(line.split()[1] for line in printed if line.startswith("bootstrap"))
        assert printed[-1].strip() == f"export LOGBROKER_BOOTSTRAP={bootstrap}"
        assert list(cwd.iterdir()) == []  # nothing left in the working tree
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=45) == 0
    finally:
        _reap(proc, str(tmp_path))  # the whole test dir: also what an old dev-cluster left in cwd


def test_dev_cluster_without_zookeeper_names_the_package(tmp_path):
    env = {**os.environ, "LOGBROKER_ZOOKEEPER_JARS": str(tmp_path / "no" / "zookeeper.jar")}
    proc = subprocess.run([sys.executable, "-m", "logbroker", "dev-cluster", "--data-dir", str(tmp_path / "d")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    err = one_error_line(proc)
    assert "zookeeper" in err and "apt-get install zookeeper" in err, err
    assert not proc.stdout


# ============================================================================ 4. whole-cluster restart


def test_whole_cluster_restart_keeps_every_acknowledged_record(cluster3):
    c = cluster3
    topic = "durable"
    with Admin(c.bootstrap) as admin:
        admin.create_topic(topic, partitions=3, replication_factor=3, config={"min_insync_replicas": "2"})
    wait_for(lambda: settled(c, topic, 3, 3), 30, "full ISRs")
    acked = produce_acked(c.bootstrap, topic, [b"k-%04d" % i for i in range(1500)], keyed=True)
    assert {p for p, _ in acked.values()} == {0, 1, 2}
    epoch_before = c.describe_cluster().controller_epoch
    leader_epochs = {p: s.leader_epoch for p, s in c.partition_states(topic).items()}

    # controlled shutdown of all three at once
    for b in c.brokers.values():
        assert b.proc is not None
        b.proc.send_signal(signal.SIGTERM)
    for i, b in c.brokers.items():
        assert b.stop(timeout_s=40) == 0, f"broker {i} did not stop cleanly: {b.log_text()[-2000:]}"

    for b in c.brokers.values():
        b.start(60)
    wait_for(lambda: len(c.live_broker_ids()) == 3, 30, "three brokers registered again")
    wait_for(lambda: settled(c, topic, 3, 3), 60, "leaders elected and full ISRs after the restart")
    d = c.describe_cluster()
    assert d.controller_id in (0, 1, 2) and d.controller_epoch > epoch_before
    for p, s in c.partition_states(topic).items():
        assert s.leader_epoch >= leader_epochs[p]

    total = len(acked)
    got = consume_all(c.bootstrap, topic, 3, total)
    for p, msgs in got.items():
        assert [m.offset for m in msgs] == list(range(len(msgs))), f"partition {p}: gaps or duplicates"
    assert sum(len(v) for v in got.values()) == total
    assert_all_at_their_offsets(got, acked)
    more = produce_acked(c.bootstrap, topic, [b"after-%d" % i for i in range(100)], keyed=True)
    assert all(off >= 0 for _, off in more.values())
    for p in range(3):
        hw = c.high_watermark(topic, p)
        st = c.partition_states(topic)[p]
        logs = {b: batches_below(c.replica_batches(b, topic, p), hw) for b in st.isr}
        assert all(v == logs[st.leader] for v in logs.values()), f"partition {p}: replicas differ"
