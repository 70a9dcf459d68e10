"""`logbroker worker` end to end: real broker processes, worker CLI processes, a handler module in tmp_path.

The handler appends one line per record it finished ("topic partition offset pid") to a file with a
single O_APPEND write, so the file is the ledger of what was processed, in the order it finished, and
survives a kill -9 of the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from logbroker import Admin, Producer
from tests.conftest import REPO, BrokerProcess, wait_for

pytestmark = pytest.mark.timeout(240)

GROUP_ARGS = ["--offsets-topic-partitions", "4"]

HANDLER = '''
import os, time

OUT = os.environ["WK_OUT"]
DELAY_S = float(os.environ.get("WK_DELAY_S", "0"))


def handle(m):
    if m.value.startswith(b"poison"):
        raise ValueError("poison record " + m.value.decode())
    if DELAY_S:
        time.sleep(DELAY_S)  # the handler's "work"
    fd = os.open(OUT, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{m.topic} {m.partition} {m.offset} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)
'''


class WorkerProcess:
    """`logbroker worker wk_app:handle ...` as a child process; output in a log file."""

    def __init__(self, broker: BrokerProcess, app_dir: Path, out: Path, args: list[str], env: dict[str, str],
                 name: str) -> None:
        self.log_path = app_dir.parent / f"{name}.log"
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in reap()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "logbroker", "worker", "wk_app:handle", "--bootstrap", broker.address,
             "--commit-interval-ms", "200", *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=REPO,
            env={**os.environ, "PYTHONPATH": f"{app_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                 "WK_OUT": str(out), "PYTHONUNBUFFERED": "1", **env},
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker {self.pid} still running after {timeout_s}s: {self.log_text()[-3000:]}") from None

    def reap(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[tuple[str, int, int, int]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                t, p, o, pid = line.split()
                out.append((t, int(p), int(o), int(pid)))
        return out

    def keys(self) -> set[tuple[str, int, int]]:
        return {(t, p, o) for t, p, o, _ in self.lines()}


@pytest.fixture
def standalone(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=GROUP_ARGS)


@pytest.fixture
def app(tmp_path: Path) -> Path:
    d = tmp_path / "app"
    d.mkdir()
    (d / "wk_app.py").write_text(HANDLER)
    return d


@pytest.fixture
def workers(app: Path, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(broker: BrokerProcess, *args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        w = WorkerProcess(broker, app, tmp_path / "processed.txt", list(args), env or {}, f"worker-{len(started)}")
        started.append(w)
        return w

    yield start
    for w in started:
        w.reap()


def produce(broker: BrokerProcess, topic: str, values: list[bytes], partitions: int) -> dict[tuple[str, int], int]:
    """Round-robin over partitions; returns each partition's end offset."""
    ends: dict[tuple[str, int], int] = defaultdict(int)
    with Producer(broker.address, acks="all", linger_ms=5) as producer:
        futures = [producer.send(topic, v, partition=i % partitions) for i, v in enumerate(values)]
        producer.flush()
        for f in futures:
            md = f.result(timeout=60)
            ends[(topic, md.partition)] = max(ends[(topic, md.partition)], md.offset + 1)
    return dict(ends)


def committed(broker: BrokerProcess, group: str) -> dict[tuple[str, int], int]:
    with Admin(broker.address) as admin:
        return dict(admin.describe_group(group).offsets)


def test_worker_processes_every_record_in_partition_order_commits_and_exits_0_on_sigterm(standalone, workers, tmp_path):
    with Admin(standalone.address) as admin:
        admin.create_topic("orders", partitions=3)
    ends = produce(standalone, "orders", [b"v%d" % i for i in range(3000)], 3)
    ledger = Ledger(tmp_path / "processed.txt")
    w = workers(standalone, "--group", "billing", "--topic", "orders", "--workers", "4", "--max-in-flight", "100")
    wait_for(lambda: len(ledger.keys()) == 3000, 60, f"3000 records processed ({w.log_path})")
    wait_for(lambda: committed(standalone, "billing") == ends, 30, "the group's commits to reach the log ends")
    lines = ledger.lines()
    assert len(lines) == 3000  # once each
    for p in range(3):
        assert [o for t, pp, o, _ in lines if pp == p] == list(range(ends[("orders", p)]))  # in order
    began = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.log_text()
    assert time.monotonic() - began < 10
    assert "Traceback" not in w.log_text()


def test_sigterm_mid_stream_then_restart_resumes_after_the_committed_offsets(standalone, workers, tmp_path):
    with Admin(standalone.address) as admin:
        admin.create_topic("jobs", partitions=2)
    ends = produce(standalone, "jobs", [b"v%d" % i for i in range(2000)], 2)
    ledger = Ledger(tmp_path / "processed.txt")
    w = workers(standalone, "--group", "g", "--topic", "jobs", "--workers", "2", env={"WK_DELAY_S": "0.002"})
    wait_for(lambda: len(ledger.lines()) >= 300, 60, "300 records processed")
    began = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.log_text()
    assert time.monotonic() - began < 10, "a graceful stop takes about one record's time, not the whole window"
    first = ledger.lines()
    c1 = committed(standalone, "g")
    assert len(first) < 2000, "the stream was still going when SIGTERM came"
    for p in range(2):
        done = sorted(o for _, pp, o, _ in first if pp == p)
        # everything finished was committed (and nothing that was not)
        assert c1.get(("jobs", p), 0) == len(done) and done == list(range(len(done)))

    w2 = workers(standalone, "--group", "g", "--topic", "jobs", "--workers", "2")
    wait_for(lambda: len(ledger.keys()) == 2000, 60, "every record processed after the restart")
    wait_for(lambda: committed(standalone, "g") == ends, 30, "commits to reach the end")
    w2.signal(signal.SIGTERM)
    assert w2.wait(30) == 0, w2.log_text()
    counts = Counter((t, p, o) for t, p, o, _ in ledger.lines())
    assert not [k for k, n in counts.items() if n > 1], "a graceful stop commits everything it finished"


def test_a_failing_handler_stops_the_worker_with_status_1_and_skip_goes_on(standalone, workers, tmp_path):
    with Admin(standalone.address) as admin:
        admin.create_topic("t", partitions=1)
    produce(standalone, "t", [b"poison-5" if i == 5 else b"v%d" % i for i in range(10)], 1)
    ledger = Ledger(tmp_path / "processed.txt")
    w = workers(standalone, "--group", "g", "--topic", "t", "--retries", "2", "--retry-backoff-ms", "10")
    assert w.wait(60) == 1
    log = w.log_text()
    assert "logbroker: error: handler failed on t-0@5 after 3 attempt(s): ValueError: poison record poison-5" in log
    assert "Traceback" in log and "raise ValueError" in log  # the handler's traceback is logged
    assert sorted(o for _, _, o, _ in ledger.lines()) == [0, 1, 2, 3, 4]
    assert committed(standalone, "g") == {("t", 0): 5}  # the failed record goes to whoever comes next

    w2 = workers(standalone, "--group", "g", "--topic", "t", "--retries", "0", "--on-failure", "skip")
    wait_for(lambda: committed(standalone, "g") == {("t", 0): 10}, 60, "the skip run to commit past the record")
    w2.signal(signal.SIGTERM)
    assert w2.wait(30) == 0, w2.log_text()
    assert sorted(o for _, _, o, _ in ledger.lines()) == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert "skipping t-0@5" in w2.log_text()


def test_bad_handler_reference_is_one_line_exit_1(standalone, app):
    # the console script, run in the handler's directory: the current directory is searched like `python -m`
    script = Path(sys.executable).parent / "logbroker"
    for spec, text in (("wk_app:nope", "wk_app has no attribute 'nope'"),
                       ("missing_mod:handle", "cannot import module 'missing_mod'"),
                       ("wk_app", "handler must be MODULE:FUNCTION")):
        proc = subprocess.run([str(script), "worker", spec, "--group", "g", "--topic", "t", "--bootstrap",
                               standalone.address], capture_output=True, timeout=60, cwd=app,
                              env={**os.environ, "WK_OUT": str(app / "out.txt")})
        err = proc.stderr.decode()
        assert proc.returncode == 1 and err.startswith(f"logbroker: error: {text}"), err
        assert "Traceback" not in err and err.count("\n") == 1, err


def test_process_mode_runs_handlers_in_children_and_reaps_them(standalone, workers, tmp_path):
    with Admin(standalone.address) as admin:
        admin.create_topic("cpu", partitions=4)
    ends = produce(standalone, "cpu", [b"v%d" % i for i in range(1000)], 4)
    ledger = Ledger(tmp_path / "processed.txt")
    w = workers(standalone, "--group", "g", "--topic", "cpu", "--processes", "--workers", "2")
    wait_for(lambda: len(ledger.keys()) == 1000, 90, f"1000 records processed ({w.log_path})")
    wait_for(lambda: committed(standalone, "g") == ends, 30, "commits to reach the end")
    pids = {pid for *_, pid in ledger.lines()}
    assert w.pid not in pids and 1 <= len(pids) <= 2
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.log_text()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_share_a_group_and_a_killed_one_only_duplicates_what_it_had_not_committed(standalone, workers, tmp_path):
    """Three workers over 6 partitions: a member joining and one leaving gracefully move partitions without
    duplicates (revocation commits what was finished); kill -9 of a member duplicates only records it
    processed after its last commit, which its partitions' next owner starts from."""
    with Admin(standalone.address) as admin:
        admin.create_topic("events", partitions=6)
    ledger = Ledger(tmp_path / "processed.txt")
    args = ["--group", "shared", "--topic", "events", "--workers", "3", "--session-timeout-ms", "3000"]
    env = {"WK_DELAY_S": "0.001"}
    a = workers(standalone, *args, env=env)
    b = workers(standalone, *args, env=env)
    produce(standalone, "events", [b"a%d" % i for i in range(3000)], 6)
    wait_for(lambda: len(ledger.keys()) >= 1000, 60, "the first records processed")
    c = workers(standalone, *args, env=env)  # joins mid-stream
    # the next records only once c owns partitions: a and b may otherwise finish them all first
    wait_for(lambda: "assigned events-" in c.log_text(), 60, f"the third worker's partitions ({c.log_path})")
    produce(standalone, "events", [b"b%d" % i for i in range(3000)], 6)
    wait_for(lambda: c.pid in {pid for *_, pid in ledger.lines()}, 60, f"the third worker to get partitions ({c.log_path})")
    b.signal(signal.SIGTERM)  # leaves gracefully mid-stream
    assert b.wait(30) == 0, b.log_text()
    ends = produce(standalone, "events", [b"c%d" % i for i in range(3000)], 6)
    wait_for(lambda: len(ledger.keys()) == 9000, 90, "every record processed")
    wait_for(lambda: committed(standalone, "shared") == ends, 30, "commits to reach the ends")
    lines = ledger.lines()
    assert len(lines) == 9000, "graceful joins and leaves duplicate nothing"
    for p in range(6):
        assert [o for _, pp, o, _ in lines if pp == p] == list(range(ends[("events", p)]))

    # kill -9 a member while it works; its partitions move to the survivor after the session timeout
    before = len(lines)
    produce(standalone, "events", [b"d%d" % i for i in range(3000)], 6)
    wait_for(lambda: sum(1 for *_, pid in ledger.lines()[before:] if pid == c.pid) >= 50, 60, "the victim at work")
    c.signal(signal.SIGKILL)
    c.wait(30)
    final_ends = {("events", p): ends[("events", p)] + 500 for p in range(6)}
    wait_for(lambda: committed(standalone, "shared") == final_ends, 90, "the survivor to finish and commit everything")
    lines = ledger.lines()
    assert {(t, p, o) for t, p, o, _ in lines} == {("events", p, o) for p in range(6) for o in range(final_ends[("events", p)])}
    counts = Counter((t, p, o) for t, p, o, _ in lines)
    dups = sorted(k for k, n in counts.items() if n > 1)
    assert all(counts[k] == 2 for k in dups)
    # Per partition: the duplicates are exactly the records the victim finished after its last commit,
    # i.e. from where the survivor took the partition over up to the victim's last record.
    for p in range(6):
        victim = [o for _, pp, o, pid in lines[before:] if pp == p and pid == c.pid]
        survivor = [o for _, pp, o, pid in lines[before:] if pp == p and pid == a.pid]
        dups_p = [o for _, pp, o in dups if pp == p]
        if not victim:
            assert dups_p == [], p
            continue
        assert victim == list(range(victim[0], victim[-1] + 1))  # in order, no gaps
        if not survivor:  # the victim finished and committed the partition before it died
            assert dups_p == [] and victim[-1] + 1 == final_ends[("events", p)], p
            continue
        takeover = survivor[0]
        assert takeover <= victim[-1] + 1, "nothing lost"
        assert dups_p == list(range(takeover, victim[-1] + 1)), (p, takeover, victim[-1], dups_p)
    a.signal(signal.SIGTERM)
    assert a.wait(30) == 0, a.log_text()
