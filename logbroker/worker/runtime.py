"""The worker runtime's shell: a consumer, N slots (threads or child processes) and the window between them.

Threads::

    run() = the poll thread, the only one that touches the consumer
      consumer.poll(max_records = window.free_records())  ── window.add ──notify──┐
        on_revoke (runs inside poll): drop queued records of the revoked          │
        partitions, wait (<= grace_ms) for their running ones, commit, forget     v
      every commit_interval_ms: commit window.commit_offsets()     slot thread i (N of them):
      stop / fatal failure: see "Stopping"                           entry = window.next_ready()
                                                                     slot.run(message) + retries
                                                     <──notify──     window.complete(entry) / fail(entry)

One `threading.Condition` guards the window; nobody holds it while a handler runs or an RPC is made.
Poll never returns more than the window has room for, so the window's bounds are hard (records) and
soft by one poll (bytes). When the window is full the poll thread waits for a completion instead of
polling (the group consumer heartbeats on its own thread, so membership does not lapse). Rebalance
callbacks run inside poll(), so a revocation that arrives while the window is full is acted on once
some record finishes and makes room; with every slot busy, on_revoke would be waiting for running
records then anyway.

Commits: the consumer runs with enable_auto_commit=False; the runtime commits each partition's
contiguous low-water mark (see window.py) every commit_interval_ms, on revocation and at the end.
A record is committed only after its handler returned and so did the handler of every earlier record
of its partition: at least once.

Failures: a handler that raises is retried on the same slot (so the partition's order holds) after
`RetryPolicy` backoff; when the retries are used up the record has *failed* and, by default
(on_failure="stop"), the worker stops with HandlerFailedError, which the CLI turns into exit status 1:
the record and everything after it in its partition stay uncommitted and go to the next owner,
like a Kafka consumer that lets the exception escape. on_failure="skip" logs the error with its
traceback and commits past the record instead (for handlers whose failures are their own business).

Stopping (stop(), SIGTERM/SIGINT while run() runs on the main thread or inside `signals_stop()`, or a
failed record): no new record starts; queued ones are handed back (they are simply not committed);
running ones get `grace_ms` to finish; then what finished is committed and the consumer is closed (which leaves the group at once). A
second signal, or the end of the grace period, stops at once: child processes are killed, handler
threads abandoned (they are daemons), their records uncommitted.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Protocol

from logbroker.client.metadata_cache import LogThrottle
from logbroker.errors import LogbrokerError
from logbroker.storage.record_batch import Message
from logbroker.worker.handler import load_handler, parse_spec
from logbroker.worker.retry import RetryPolicy
from logbroker.worker.slot import (
    CHILD_START_TIMEOUT_MS,
    Failure,
    HandlerRef,
    Slot,
    join_slots,
    make_slots,
    run_slot_threads,
    wait_all_ready,
)
from logbroker.worker.window import ORDERINGS, Entry, InFlightWindow, Ordering, TopicPartition

log = logging.getLogger("logbroker.worker")

WORKERS_MAX = 256
MAX_IN_FLIGHT_MAX = 1_000_000
GRACE_MS_MAX = 3_600_000
ON_FAILURE = ("stop", "skip")
WAIT_SLICE_MS = 100  # longest sleep of the poll thread between looks at stop requests
CLOSE_TIMEOUT_MS_MIN = 1_000  # closing the consumer (commit, leave the group) may take this long past the grace

RebalanceCallback = Callable[[set[TopicPartition]], None]


class GroupConsumer(Protocol):
    """What the runtime needs of a consumer (logbroker.client.Consumer with a group)."""

    def poll(self, timeout_ms: int | None = None, max_records: int | None = None) -> list[Message]: ...

    def commit(self, offsets: dict[TopicPartition, int] | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


# Builds the consumer, given the rebalance callbacks it must call inside poll(): on_assign(new partitions),
# on_revoke(partitions about to be given up; commits still accepted), on_lost(partitions already
# someone else's: no commit).
ConsumerFactory = Callable[[RebalanceCallback, RebalanceCallback, RebalanceCallback], GroupConsumer]


class HandlerFailedError(LogbrokerError):
    """A record's handler failed on every attempt (or could not be loaded): the worker stopped."""


@dataclass
class WorkerStats:
    processed: int = 0  # handler returned
    skipped: int = 0  # failed for good, committed anyway (on_failure="skip")
    failed_attempts: int = 0  # handler raised (each retry counts)
    handed_back: int = 0  # queued, never started: dropped at revocation or stop
    unfinished: int = 0  # still running when a grace period ended
    commits: int = 0
    committed: dict[TopicPartition, int] = field(default_factory=dict)


def _check_bounds(group: str, workers: int, max_in_flight: int, ordering: str, on_failure: str, grace_ms: int,
                  commit_interval_ms: int, poll_timeout_ms: int, max_poll_records: int) -> None:
    """The Worker's arguments within their bounds, or ValueError naming the first that is not."""
    if not group:
        raise ValueError("a worker needs a group")
    if not 1 <= workers <= WORKERS_MAX:
        raise ValueError(f"workers must be between 1 and {WORKERS_MAX}, got {workers}")
    if not 1 <= max_in_flight <= MAX_IN_FLIGHT_MAX:
        raise ValueError(f"max_in_flight must be between 1 and {MAX_IN_FLIGHT_MAX}, got {max_in_flight}")
    if ordering not in ORDERINGS:
        raise ValueError(f"ordering must be one of {', '.join(ORDERINGS)}, got {ordering!r}")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be 'stop' or 'skip', got {on_failure!r}")
    if not 0 <= grace_ms <= GRACE_MS_MAX:
        raise ValueError(f"grace_ms must be between 0 and {GRACE_MS_MAX}, got {grace_ms}")
    if not 10 <= commit_interval_ms <= GRACE_MS_MAX:
        raise ValueError(f"commit_interval_ms must be between 10 and {GRACE_MS_MAX}, got {commit_interval_ms}")
    if not 1 <= poll_timeout_ms <= 10_000 or max_poll_records <= 0:
        raise ValueError("poll_timeout_ms must be within 1..10000 and max_poll_records positive")


def _resolve_handler(handler: HandlerRef, processes: bool) -> HandlerRef:
    """A callable, or (processes) a `module:function` string each child imports; checked here."""
    if isinstance(handler, str):
        if processes:
            parse_spec(handler)  # each child imports it; a bad name is still caught here
            return handler
        return load_handler(handler)
    if callable(handler):
        return handler
    raise TypeError(f"handler must be a callable or a 'module:function' string, not {type(handler).__name__}")


class Worker:
    """Runs `handler(message)` for every record of a group's partitions, on `workers` threads or processes.

    `handler`: a callable, or a `module:function` string (imported here for threads; by each child
    for processes, where a callable is pickled by reference, so it must be a module-level function).
    `run()` blocks until `stop()` (or SIGTERM/SIGINT when run on the main thread) and returns `WorkerStats`;
    it raises HandlerFailedError when a record failed for good with on_failure="stop".
    """

    def __init__(
        self,
        handler: HandlerRef,
        *,
        group: str,
        topics: Sequence[str] = (),
        pattern: str | None = None,
        bootstrap: str | Sequence[str] | None = None,
        workers: int = 1,
        processes: bool = False,
        max_in_flight: int = 1_000,
        max_in_flight_bytes: int = 64 << 20,
        ordering: Ordering = "partition",
        retry: RetryPolicy | None = None,
        on_failure: str = "stop",
        grace_ms: int = 20_000,
        commit_interval_ms: int = 1_000,
        poll_timeout_ms: int = WAIT_SLICE_MS,
        max_poll_records: int = 500,
        auto_offset_reset: str = "earliest",
        consumer_config: Mapping[str, Any] | None = None,
        consumer_factory: ConsumerFactory | None = None,
    ) -> None:
        _check_bounds(group, workers, max_in_flight, ordering, on_failure, grace_ms, commit_interval_ms,
                      poll_timeout_ms, max_poll_records)
        if consumer_factory is None and not topics and not pattern:
            raise ValueError("a worker needs topics or a pattern")
        self._handler: HandlerRef = _resolve_handler(handler, processes)
        self.group = group
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self.pattern = pattern
        self.workers = workers
        self.processes = processes
        self.ordering: Ordering = ordering
        self._bootstrap = bootstrap
        self._retry = retry or RetryPolicy()
        self._on_failure = on_failure
        self._grace_s = grace_ms / 1000
        self._commit_interval_s = commit_interval_ms / 1000
        self._poll_timeout_ms = poll_timeout_ms
        self._max_poll_records = max_poll_records
        self._consumer_config = {"auto_offset_reset": auto_offset_reset, **(consumer_config or {})}
        self._factory = consumer_factory or self._default_consumer

        self._window = InFlightWindow(max_in_flight, max_in_flight_bytes, ordering)
        self._cond = threading.Condition(threading.Lock())
        self._stop = threading.Event()  # graceful stop requested
        self._hard_stop = threading.Event()  # stop now: no more waiting for running records
        self._draining = False  # under _cond: no new record starts
        self._closing = False  # under _cond: slot threads exit
        self._fatal: HandlerFailedError | None = None
        self._consumer: GroupConsumer | None = None
        self._started = False
        self._signals_handled = False  # inside signals_stop()
        self._threads: list[threading.Thread] = []
        self._slots: list[Slot] = []
        self.stats = WorkerStats()
        self._log = LogThrottle(log)

    # -- control ---------------------------------------------------------------------------------

    def stop(self, grace_ms: int | None = None) -> None:
        """Stop gracefully (thread- and signal-safe). grace_ms=0: stop at once, abandoning running records."""
        self._stop.set()
        if grace_ms is not None and grace_ms <= 0:
            self._hard_stop.set()

    @contextlib.contextmanager
    def signals_stop(self) -> Iterator[None]:
        """While inside: the first SIGTERM/SIGINT stops gracefully, a second one at once. Main thread only."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                log.warning("%s again: stopping now; running records stay uncommitted", name)
                self._hard_stop.set()
            else:
                log.info("%s: finishing running records (up to %.0f s), then stopping", name, self._grace_s)
                self._stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._signals_handled = True
        try:
            yield
        finally:
            self._signals_handled = False
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- the poll thread -------------------------------------------------------------------------

    def run(self, handle_signals: bool = True) -> WorkerStats:
        """Process records until stop(), a signal or a failure (see the module's "Stopping").

        Called on the main thread, run() handles SIGTERM/SIGINT as `signals_stop()` does (the first
        stops gracefully, a second at once) and restores the previous handlers when it returns;
        handle_signals=False leaves signals to the caller. On another thread only stop() stops it.
        """
        if (handle_signals and not self._signals_handled
                and threading.current_thread() is threading.main_thread()):
            with self.signals_stop():
                return self._run()
        return self._run()

    def _run(self) -> WorkerStats:
        if self._started:
            raise RuntimeError("a Worker runs once")
        self._started = True
        self._start_slots()
        consumer: GroupConsumer | None = None
        error: BaseException | None = None
        try:
            consumer = self._consumer = self._factory(self._on_assign, self._on_revoke, self._on_lost)
            log.info("worker of group %s on %s: %d %s, ordering by %s, at most %d records in flight",
                     self.group, self.pattern or ",".join(self.topics), self.workers,
                     "processes" if self.processes else "threads", self.ordering, self._window.max_records)
            self._poll_loop(consumer)
        except BaseException as e:
            error = e
        finally:
            self._shutdown(consumer)
        if error is not None:
            raise error
        if self._fatal is not None:
            raise self._fatal
        return self.stats

    def _poll_loop(self, consumer: GroupConsumer) -> None:
        next_commit = time.monotonic() + self._commit_interval_s
        while not self._stop.is_set() and self._fatal is None:
            with self._cond:
                free = self._window.free_records()
                if free == 0:
                    self._cond.wait(WAIT_SLICE_MS / 1000)  # a completion makes room
            if free > 0:
                messages = consumer.poll(timeout_ms=self._poll_timeout_ms,
                                         max_records=min(free, self._max_poll_records))
                if messages:
                    with self._cond:
                        if self._draining:
                            break  # a record failed meanwhile: these are handed back
                        self._window.add(messages)
                        self._cond.notify_all()
            now = time.monotonic()
            if now >= next_commit:
                next_commit = now + self._commit_interval_s
                self._commit(None)

    def _commit(self, partitions: set[TopicPartition] | None) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        with self._cond:
            offsets = self._window.commit_offsets(partitions)
        if not offsets:
            return
        try:
            consumer.commit(offsets)
        except LogbrokerError as e:
            self._log.warning("commit", "commit of group %s failed (retried at the next commit): %s", self.group, e)
            return
        with self._cond:
            self._window.mark_committed(offsets)
        self.stats.commits += 1
        self.stats.committed.update(offsets)
        log.debug("committed %s", offsets)

    def _wait_running(self, partitions: set[TopicPartition] | None, deadline: float) -> int:
        """Under _cond: wait until no record (of these partitions) runs, or the deadline; returns how many still run."""
        while True:
            running = self._window.running if partitions is None else self._window.running_in(partitions)
            left = deadline - time.monotonic()
            if running == 0 or left <= 0 or self._hard_stop.is_set():
                return running
            self._cond.wait(min(left, WAIT_SLICE_MS / 1000))

    def _on_assign(self, partitions: set[TopicPartition]) -> None:
        with self._cond:
            # Still tracked: lost without a revocation (e.g. fenced). Someone else may have moved on.
            stale = set(partitions) & self._window.partitions()
            if stale:
                self.stats.handed_back += self._window.drop_queued(stale)
                self._window.forget(stale)
        log.info("assigned %s", _names(partitions))

    def _on_revoke(self, partitions: set[TopicPartition]) -> None:
        tps = set(partitions)
        with self._cond:
            self.stats.handed_back += self._window.drop_queued(tps)
            running = self._wait_running(tps, time.monotonic() + self._grace_s)
        if running:
            self.stats.unfinished += running
            log.warning("revoked %s with %d records still running after %.0f s: they stay uncommitted",
                        _names(tps), running, self._grace_s)
        self._commit(tps)
        with self._cond:
            self._window.forget(tps)
        log.info("revoked %s", _names(tps))

    def _on_lost(self, partitions: set[TopicPartition]) -> None:
        tps = set(partitions)
        with self._cond:
            self.stats.handed_back += self._window.drop_queued(tps)
            running = self._window.running_in(tps)
            self._window.forget(tps)
        log.warning("lost %s (this member was fenced): %d running records will not be committed",
                    _names(tps), running)

    def _shutdown(self, consumer: GroupConsumer | None) -> None:
        grace_deadline = time.monotonic() + self._grace_s
        with self._cond:
            self._draining = True
            self.stats.handed_back += self._window.drop_queued()
            running = self._wait_running(None, grace_deadline)
        if running:
            self.stats.unfinished += running
            log.warning("%d records still running after the %.0f s grace period: they stay uncommitted",
                        running, self._grace_s)
        self._hard_stop.set()  # child processes still busy are killed, retry backoffs end
        if consumer is not None:
            self._commit(None)
            try:
                # leaves the group (on_revoke runs again: nothing is left to wait for or commit)
                consumer.close(timeout=max(CLOSE_TIMEOUT_MS_MIN / 1000, grace_deadline - time.monotonic()))
            except LogbrokerError as e:
                log.warning("closing the consumer failed: %s", e)
        self._stop_slots()
        s = self.stats
        log.info("worker stopped: %d processed, %d skipped, %d failed attempts, %d handed back, %d unfinished",
                 s.processed, s.skipped, s.failed_attempts, s.handed_back, s.unfinished)

    # -- slots -----------------------------------------------------------------------------------

    def _start_slots(self) -> None:
        self._slots = make_slots(self._handler, self.workers, self.processes)
        if self.processes:
            failure = wait_all_ready(self._slots, CHILD_START_TIMEOUT_MS / 1000)
            if failure is not None:
                self._stop_slots()
                raise HandlerFailedError(failure.error)
        self._threads = run_slot_threads(self._slots, self._slot_main)

    def _stop_slots(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        join_slots(self._threads, self._slots, self.processes)

    def _slot_main(self, slot: Slot) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    entry = None if self._draining else self._window.next_ready()
                    if entry is not None:
                        break
                    self._cond.wait()
            self._handle(slot, entry)

    def _handle(self, slot: Slot, entry: Entry) -> None:
        m = entry.message
        failures = 0
        while True:
            outcome = slot.run(m, self._hard_stop)
            if outcome is None:
                with self._cond:
                    self._window.complete(entry)
                    self.stats.processed += 1
                    self._cond.notify_all()
                return
            if not isinstance(outcome, Failure):  # ABANDONED: hard stop
                with self._cond:
                    self._window.fail(entry)
                    self._cond.notify_all()
                return
            failures += 1
            with self._cond:
                self.stats.failed_attempts += 1
            where = f"{m.topic}-{m.partition}@{m.offset}"
            delay_ms = None if outcome.fatal else self._retry.delay_ms(failures)
            if delay_ms is not None:
                log.warning("handler failed on %s (attempt %d of %d), retrying in %d ms: %s",
                            where, failures, self._retry.retries + 1, delay_ms, outcome.error)
                if self._hard_stop.wait(delay_ms / 1000):
                    with self._cond:
                        self._window.fail(entry)
                        self._cond.notify_all()
                    return
                continue
            log.error("handler failed on %s after %d attempt(s): %s\n%s", where, failures, outcome.error,
                      outcome.traceback.rstrip())
            with self._cond:
                if self._on_failure == "skip" and not outcome.fatal:
                    log.error("skipping %s (on_failure=skip): it is committed as processed", where)
                    self._window.complete(entry)
                    self.stats.skipped += 1
                else:
                    self._window.fail(entry)
                    if self._fatal is None:
                        self._fatal = HandlerFailedError(
                            f"handler failed on {where} after {failures} attempt(s): {outcome.error}"
                        )
                    self._draining = True
                    self.stats.handed_back += self._window.drop_queued()
                self._cond.notify_all()
            return

    # -- the consumer ----------------------------------------------------------------------------

    def _default_consumer(self, on_assign: RebalanceCallback, on_revoke: RebalanceCallback,
                          on_lost: RebalanceCallback) -> GroupConsumer:
        from logbroker.client.consumer import Consumer
        from logbroker.config import default_bootstrap

        bootstrap = self._bootstrap if self._bootstrap is not None else default_bootstrap()
        consumer: GroupConsumer = Consumer(
            bootstrap, topics=self.topics or None, group=self.group, pattern=self.pattern,
            on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost, enable_auto_commit=False,
            max_poll_records=self._max_poll_records, **self._consumer_config,
        )
        return consumer


def _names(partitions: set[TopicPartition]) -> str:
    return ", ".join(f"{t}-{p}" for t, p in sorted(partitions)) or "nothing"
