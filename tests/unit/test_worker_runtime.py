"""The worker runtime against an in-memory group consumer (no sockets): commits, window, retries,
revocation, stopping, signals; handler references; process slots."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import defaultdict

import pytest

from logbroker.storage.record_batch import Message
from logbroker.worker import HandlerFailedError, HandlerSpecError, RetryPolicy, Worker, load_handler
from logbroker.worker.slot import ABANDONED, Failure, ProcessSlot
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(60)

TP0 = ("t", 0)
TP1 = ("t", 1)


class FakeGroupConsumer:
    """A group consumer over in-memory logs (offset = index). Checks the worker never polls past its window.

    `script[n]` runs inside the n-th poll (1-based), before records are returned: rebalances go there.
    """

    def __init__(self, logs, on_assign, on_revoke, on_lost, capacity=None, completed=None, script=None):
        self.logs = logs
        self.on_assign = on_assign
        self.on_revoke = on_revoke
        self.on_lost = on_lost
        self.assigned = set(logs)
        self.positions = dict.fromkeys(logs, 0)
        self.capacity = capacity
        self.completed = completed  # callable: records the test's handler finished so far
        self.script = script or {}
        self.polls = 0
        self.handed_out = 0
        self.commits: list[dict] = []
        self.committed: dict = {}
        self.closed = False
        self.thread: threading.Thread | None = None

    def poll(self, timeout_ms=None, max_records=None):
        assert not self.closed
        if self.thread is None:
            self.thread = threading.current_thread()
        assert threading.current_thread() is self.thread, "the consumer is used from one thread only"
        self.polls += 1
        if self.polls == 1:
            self.on_assign(set(self.assigned))
        action = self.script.get(self.polls)
        if action is not None:
            action(self)
        if self.capacity is not None:
            assert self.handed_out - self.completed() + max_records <= self.capacity, "polled past the window"
        out: list[Message] = []
        for tp in sorted(self.assigned):
            log = self.logs[tp]
            take = log[self.positions[tp] : self.positions[tp] + max_records - len(out)]
            self.positions[tp] += len(take)
            out.extend(take)
        self.handed_out += len(out)
        if not out:
            time.sleep(timeout_ms / 1000)  # the real one long-polls
        return out

    def revoke(self, tps):
        self.on_revoke(set(tps))
        self.assigned -= set(tps)

    def lose(self, tps):
        self.on_lost(set(tps))
        self.assigned -= set(tps)

    def assign(self, tps, position):
        for tp in tps:
            self.positions[tp] = position
            self.committed[tp] = position  # another member got this far
        self.assigned |= set(tps)
        self.on_assign(set(tps))

    def commit(self, offsets=None, **_kw):
        assert threading.current_thread() is self.thread
        for tp, off in offsets.items():
            assert off > self.committed.get(tp, -1), "commits only move forward"
            assert tp in self.assigned, f"commit for {tp}, which is not assigned"
        self.commits.append(dict(offsets))
        self.committed.update(offsets)

    def close(self, timeout=None):
        self.closed = True


def make_logs(partitions=2, records=20, topic="t"):
    return {(topic, p): [Message(topic, p, o, b"k%d" % (o % 3), b"v%d" % o, [], 0) for o in range(records)]
            for p in range(partitions)}


class Recorder:
    """A handler that records what it saw; optional per-record behaviour."""

    def __init__(self, behaviour=None):
        self.lock = threading.Lock()
        self.seen: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.count = 0
        self.attempts: dict[tuple[str, int, int], int] = defaultdict(int)
        self.behaviour = behaviour

    def __call__(self, m: Message) -> None:
        with self.lock:
            self.attempts[(m.topic, m.partition, m.offset)] += 1
            attempt = self.attempts[(m.topic, m.partition, m.offset)]
        if self.behaviour is not None:
            self.behaviour(m, attempt)
        with self.lock:
            self.seen[(m.topic, m.partition)].append(m.offset)
            self.count += 1


def start(worker: Worker) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def target():
        try:
            result["stats"] = worker.run()
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, result


def make_worker(handler, logs, fakes: list, capacity=None, completed=None, script=None, **kw) -> Worker:
    def factory(on_assign, on_revoke, on_lost):
        fake = FakeGroupConsumer(logs, on_assign, on_revoke, on_lost, capacity, completed, script)
        fakes.append(fake)
        return fake

    kw.setdefault("poll_timeout_ms", 5)
    kw.setdefault("commit_interval_ms", 20)
    return Worker(handler, group="g", consumer_factory=factory, **kw)


def test_every_record_processed_in_partition_order_and_the_end_committed():
    logs = make_logs(partitions=3, records=50)
    rec = Recorder()
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, workers=4, max_in_flight=10)
    t, result = start(w)
    wait_for(lambda: rec.count == 150, 20, "all records handled")
    wait_for(lambda: fakes[0].committed == {tp: 50 for tp in logs}, 10, "periodic commit of the end")
    w.stop()
    t.join(10)
    assert not t.is_alive() and "error" not in result
    for tp in logs:
        assert rec.seen[tp] == list(range(50))  # in order, once each
    assert fakes[0].closed
    assert result["stats"].processed == 150 and result["stats"].committed == {tp: 50 for tp in logs}


def test_poll_never_returns_more_than_the_window_has_room_for():
    logs = make_logs(partitions=2, records=40)
    gate = threading.Semaphore(0)
    rec = Recorder(lambda m, attempt: gate.acquire())
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, capacity=6, completed=lambda: rec.count, workers=2, max_in_flight=6)
    t, result = start(w)
    wait_for(lambda: fakes and fakes[0].handed_out == 6, 10, "the window to fill")
    for i in range(80):  # release one record at a time; the fake asserts the bound on every poll
        gate.release()
        wait_for(lambda i=i: rec.count == i + 1 or "error" in result, 10, "a record to finish", interval_s=0.002)
        if rec.count == 80:
            break
    assert rec.count == 80, result
    w.stop()
    t.join(10)
    assert "error" not in result, result


def test_a_handler_failing_for_good_stops_the_worker_and_nothing_past_it_is_committed():
    logs = make_logs(partitions=1, records=10)

    def boom(m, attempt):
        if m.offset == 5:
            raise ValueError("bad record")

    rec = Recorder(boom)
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, retry=RetryPolicy(retries=2, backoff_ms=1))
    with pytest.raises(HandlerFailedError, match=r"t-0@5 after 3 attempt\(s\): ValueError: bad record"):
        w.run()
    assert rec.seen[TP0] == [0, 1, 2, 3, 4]
    assert rec.attempts[("t", 0, 5)] == 3
    assert fakes[0].committed == {TP0: 5} and fakes[0].closed
    assert w.stats.failed_attempts == 3


def test_transient_failures_are_retried_in_place_keeping_the_partition_order():
    logs = make_logs(partitions=1, records=10)

    def flaky(m, attempt):
        if m.offset == 3 and attempt <= 2:
            raise ConnectionError("try again")

    rec = Recorder(flaky)
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, workers=3, retry=RetryPolicy(retries=2, backoff_ms=1))
    t, result = start(w)
    wait_for(lambda: rec.count == 10, 10, "all records")
    wait_for(lambda: fakes[0].committed == {TP0: 10}, 10, "commit")
    w.stop()
    t.join(10)
    assert rec.seen[TP0] == list(range(10)) and result["stats"].failed_attempts == 2


def test_on_failure_skip_commits_past_the_failed_record():
    logs = make_logs(partitions=1, records=10)

    def boom(m, attempt):
        if m.offset == 5:
            raise ValueError("bad record")

    rec = Recorder(boom)
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, retry=RetryPolicy(retries=0), on_failure="skip")
    t, result = start(w)
    wait_for(lambda: fakes and fakes[0].committed == {TP0: 10}, 10, "commit past the skipped record")
    w.stop()
    t.join(10)
    assert rec.seen[TP0] == [0, 1, 2, 3, 4, 6, 7, 8, 9] and result["stats"].skipped == 1


def test_a_fatal_handler_exception_is_not_retried():
    logs = make_logs(partitions=1, records=3)

    def leave(m, attempt):
        raise SystemExit(3)

    fakes: list[FakeGroupConsumer] = []
    w = make_worker(Recorder(leave), logs, fakes, retry=RetryPolicy(retries=5, backoff_ms=1))
    with pytest.raises(HandlerFailedError, match="after 1 attempt"):
        w.run()


def test_revocation_waits_for_running_records_commits_them_and_hands_back_the_queue():
    logs = make_logs(partitions=2, records=20)
    release = threading.Event()
    revoking = threading.Event()

    def slow_p0(m, attempt):
        if m.partition == 0 and m.offset == 0:
            release.wait(10)

    def revoke_p0(fake):
        revoking.set()
        fake.revoke([TP0])

    rec = Recorder(slow_p0)
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, workers=2, script={3: revoke_p0})
    t, result = start(w)
    revoking.wait(10)
    assert rec.seen[TP0] == []  # on_revoke is waiting for the running record
    release.set()
    wait_for(lambda: rec.count == 21, 10, "p0@0 and all of p1")
    wait_for(lambda: fakes[0].committed.get(TP1) == 20, 10, "p1 committed")
    w.stop()
    t.join(10)
    assert rec.seen[TP0] == [0]  # the rest of p0 was handed back, not processed
    assert fakes[0].committed[TP0] == 1  # committed inside on_revoke: the next owner starts at 1
    assert result["stats"].handed_back == 19


def test_revocation_gives_up_after_the_grace_period_and_ignores_the_late_completion():
    logs = make_logs(partitions=2, records=5)
    release = threading.Event()

    def stuck_p0(m, attempt):
        if m.partition == 0:
            release.wait(20)

    rec = Recorder(stuck_p0)
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, workers=2, grace_ms=100, script={3: lambda f: f.revoke([TP0])})
    t, result = start(w)
    wait_for(lambda: fakes and fakes[0].polls > 3 and fakes[0].committed.get(TP1) == 5, 10, "revoke, p1 done")
    assert TP0 not in fakes[0].committed and w.stats.unfinished == 1
    release.set()
    wait_for(lambda: rec.count == 6, 10, "the late record to finish")
    w.stop()
    t.join(10)
    assert TP0 not in fakes[0].committed  # the late completion is not committed: p0 belongs to another


def test_lost_partitions_are_dropped_uncommitted_and_a_reassignment_starts_afresh():
    logs = make_logs(partitions=1, records=20)
    release = threading.Event()
    reassigned = threading.Event()

    def slow_first(m, attempt):
        if m.offset == 0 and not reassigned.is_set():
            release.wait(10)

    def fenced_then_back(fake):
        fake.lose([TP0])  # fenced: p0 moved to another member, which processed 0..4
        fake.assign([TP0], position=5)
        reassigned.set()

    rec = Recorder(slow_first)
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, workers=2, script={3: fenced_then_back})
    t, result = start(w)
    reassigned.wait(10)
    release.set()  # the old generation's record finishes late: ignored
    wait_for(lambda: fakes[0].committed.get(TP0) == 20 or "error" in result, 10, "p0 committed to the end")
    wait_for(lambda: rec.count == 16, 10, "the old generation's record to finish too")
    w.stop()
    t.join(10)
    assert "error" not in result, result
    assert sorted(rec.seen[TP0]) == [0, *range(5, 20)]
    assert all(c[TP0] > 5 for c in fakes[0].commits if TP0 in c)  # never behind the other member


def test_stop_finishes_running_records_commits_them_and_hands_back_the_rest():
    logs = make_logs(partitions=1, records=20)
    release = threading.Event()
    rec = Recorder(lambda m, attempt: release.wait(10))
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, workers=1, max_in_flight=10)
    t, result = start(w)
    wait_for(lambda: fakes and fakes[0].handed_out == 10, 10, "records in flight")
    w.stop()
    wait_for(lambda: w._draining, 10, "the worker to start draining")
    release.set()
    t.join(10)
    assert rec.seen[TP0] == [0]
    assert fakes[0].committed == {TP0: 1} and fakes[0].closed
    assert result["stats"].handed_back == 9


def test_stop_abandons_a_handler_running_past_the_grace_period():
    logs = make_logs(partitions=1, records=3)
    release = threading.Event()
    rec = Recorder(lambda m, attempt: release.wait(30))
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, grace_ms=100)
    t, result = start(w)
    wait_for(lambda: fakes and fakes[0].handed_out == 3, 10, "records in flight")
    began = time.monotonic()
    w.stop()
    t.join(10)
    assert time.monotonic() - began < 5
    assert result["stats"].unfinished == 1 and fakes[0].committed == {} and fakes[0].closed
    release.set()


def test_sigterm_stops_gracefully_and_a_second_signal_stops_at_once():
    logs = make_logs(partitions=1, records=1000)
    hold = threading.Event()

    def handler(m, attempt):
        if m.offset == 10:
            hold.wait(30)  # blocks until the test ends: only the second signal gets the worker out

    rec = Recorder(handler)
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, grace_ms=30_000, max_in_flight=50)

    def signaller():
        wait_for(lambda: rec.count == 10, 10, "10 records")
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for(lambda: w._draining, 10, "draining")
        os.kill(os.getpid(), signal.SIGINT)

    s = threading.Thread(target=signaller, daemon=True)
    previous = signal.getsignal(signal.SIGTERM)
    with w.signals_stop():
        s.start()
        stats = w.run()  # in the main thread, where signals are delivered
    hold.set()
    s.join(10)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert stats.processed == 10 and stats.unfinished == 1
    assert fakes[0].committed == {TP0: 10}


def test_a_consumer_that_cannot_be_built_leaves_no_threads_behind():
    def factory(on_assign, on_revoke, on_lost):
        raise RuntimeError("no broker")

    w = Worker(Recorder(), group="g", consumer_factory=factory, workers=3)
    with pytest.raises(RuntimeError, match="no broker"):
        w.run()
    wait_for(lambda: not any(t.is_alive() for t in w._threads), 5, "slot threads to exit")


def test_worker_argument_bounds():
    for kw in ({"workers": 0}, {"workers": 1000}, {"max_in_flight": 0}, {"on_failure": "ignore"},
               {"grace_ms": -1}, {"ordering": "random"}, {"commit_interval_ms": 0}):
        with pytest.raises(ValueError):
            Worker(Recorder(), group="g", topics=["t"], **kw)
    with pytest.raises(ValueError):
        Worker(Recorder(), group="g")  # no topics, no pattern
    with pytest.raises(ValueError):
        Worker(Recorder(), group="", topics=["t"])
    with pytest.raises(HandlerSpecError):
        Worker("nope", group="g", topics=["t"], processes=True)


# -- handler references --------------------------------------------------------------------------------


@pytest.fixture
def handler_module(tmp_path, monkeypatch):
    (tmp_path / "wk_handlers.py").write_text(
        "import os, sys\n"
        "calls = []\n"
        "def ok(m):\n    calls.append(m.offset)\n"
        "def fails(m):\n    raise ValueError(f'bad {m.offset}')\n"
        "def crash(m):\n    os._exit(7)\n"
        "def leave(m):\n    sys.exit(2)\n"
        "def slow(m):\n    import time; time.sleep(30)\n"
        "class Group:\n    @staticmethod\n    def handle(m):\n        pass\n"
        "not_callable = 3\n"
    )
    (tmp_path / "wk_broken.py").write_text("raise RuntimeError('import-time failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "wk_handlers"


def test_load_handler_resolves_module_function_and_explains_every_mistake(handler_module):
    assert load_handler("wk_handlers:ok").__name__ == "ok"
    assert callable(load_handler("wk_handlers:Group.handle"))
    for spec, text in [
        ("wk_handlers", "MODULE:FUNCTION"),
        ("wk_handlers:", "MODULE:FUNCTION"),
        (":ok", "MODULE:FUNCTION"),
        ("wk handlers:ok", "MODULE:FUNCTION"),
        ("no_such_module_xyz:ok", "no module named 'no_such_module_xyz'"),
        ("wk_broken:ok", "RuntimeError: import-time failure"),
        ("wk_handlers:missing", "has no attribute 'missing'"),
        ("wk_handlers:Group.missing", "wk_handlers:Group has no attribute 'missing'"),
        ("wk_handlers:not_callable", "not callable"),
    ]:
        with pytest.raises(HandlerSpecError, match=text):
            load_handler(spec)


# -- process slots --------------------------------------------------------------------------------------


def m(offset: int) -> Message:
    return Message("t", 0, offset, None, b"v", [], 0)


def test_process_slot_runs_reports_failures_and_respawns_a_dead_child(handler_module):
    stop = threading.Event()
    slot = ProcessSlot("wk_handlers:ok", "test-slot")
    try:
        assert slot.wait_ready(60) is None
        assert slot.run(m(1), stop) is None
        first_pid = slot.pid
        slot._handler = "wk_handlers:fails"  # the next child loads another function
        slot._kill()
        out = slot.run(m(2), stop)
        assert isinstance(out, Failure) and out.error == "ValueError: bad 2" and not out.fatal
        assert "Traceback" in out.traceback and slot.pid != first_pid
        slot._handler = "wk_handlers:crash"
        slot._kill()
        out = slot.run(m(3), stop)
        assert isinstance(out, Failure) and "died" in out.error and "exit code 7" in out.error
        slot._handler = "wk_handlers:leave"
        out = slot.run(m(4), stop)  # respawned after the crash
        assert isinstance(out, Failure) and out.fatal and out.error.startswith("SystemExit")
    finally:
        slot.close(5)
    assert slot.pid is None


def test_process_slot_reports_a_handler_it_cannot_load_and_is_killed_on_hard_stop(handler_module):
    slot = ProcessSlot("wk_handlers:missing", "test-slot")
    failure = slot.wait_ready(60)
    assert isinstance(failure, Failure) and failure.fatal and "has no attribute 'missing'" in failure.error
    slot = ProcessSlot("wk_handlers:slow", "test-slot")
    stop = threading.Event()
    try:
        assert slot.wait_ready(60) is None
        pid = slot.pid
        threading.Timer(0.2, stop.set).start()
        began = time.monotonic()
        assert slot.run(m(1), stop) is ABANDONED
        assert time.monotonic() - began < 10
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    finally:
        slot.close(1)


def test_run_on_the_main_thread_handles_sigterm_itself_and_restores_the_handler():
    logs = make_logs(partitions=1, records=1000)
    rec = Recorder(lambda m, attempt: time.sleep(0.001))
    fakes: list[FakeGroupConsumer] = []
    w = make_worker(rec, logs, fakes, grace_ms=10_000, max_in_flight=50)
    caught: list[int] = []

    def test_handler(signum, _frame):  # stands in for the default action (which would end pytest)
        caught.append(signum)

    done = threading.Event()

    def signaller():
        wait_for(lambda: rec.count >= 10, 10, "10 records")
        os.kill(os.getpid(), signal.SIGTERM)
        if not done.wait(10):
            w.stop()  # the worker ignored the signal: end the test anyway

    previous = signal.signal(signal.SIGTERM, test_handler)
    try:
        s = threading.Thread(target=signaller, daemon=True)
        s.start()
        stats = w.run()  # no signals_stop(): run() itself handles SIGTERM on the main thread
        done.set()
        s.join(10)
        assert caught == [], "SIGTERM reached the previous handler, not the worker"
        assert signal.getsignal(signal.SIGTERM) is test_handler  # restored when run() returned
        assert 10 <= stats.processed < 1000 and stats.unfinished == 0
        assert fakes[0].committed == {TP0: stats.processed}  # a graceful stop commits what finished
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_run_off_the_main_thread_or_when_told_leaves_signals_alone():
    logs = make_logs(partitions=1, records=5)
    w = make_worker(Recorder(), logs, [])
    before = signal.getsignal(signal.SIGTERM)
    t, result = start(w)
    wait_for(lambda: w.stats.processed == 5, 10, "5 records")
    assert signal.getsignal(signal.SIGTERM) is before
    w.stop()
    t.join(10)
    assert "stats" in result
    w2 = make_worker(Recorder(), logs, [])
    seen: list[object] = []
    threading.Timer(0.2, lambda: (seen.append(signal.getsignal(signal.SIGTERM)), w2.stop())).start()
    w2.run(handle_signals=False)
    assert seen == [before]
