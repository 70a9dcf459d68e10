"""`logbroker worker --queue`: a handler over a SHARE group (queue semantics) instead of a consumer group.

Threads (the same slots as runtime.py: threads or child processes, one message each at a time)::

    run() = the poll thread, the only one that calls poll()/close() on the QueueConsumer
      free = workers - queued - running
      consumer.poll(max_records = free)  ── queue.append ──notify──┐
      (pending acknowledgements ride on that poll)                 v
                                                      slot thread i (N of them):
                                                        m = queue.popleft()
                                                        outcome = slot.run(Message(m), hard_stop)
                                      <──notify──       settle m (below)

No per-partition order is kept (a share group has none to keep): any message goes to any free slot.
The worker never takes more messages than it has free slots, so a held message waits for a slot at
most one poll, and its lock (`--lock-ms`) runs while its handler does.

Settling (`QueueMessage.ack / release / reject`; they only queue the acknowledgement, the next poll
sends it):

    handler returned                                    -> ack; for a request (reply_to and correlation_id
                                                           headers, client/requester.py) the return value is
                                                           sent as the reply first (client/responder.py's
                                                           settle_replied: bytes/str/None, or (value, headers))
    handler raised, delivery_count < max_attempts       -> release(0): the group's retry backoff
                                                           (retry_backoff_ms doubling to _max_ms) on the broker
    handler raised on the last attempt                  -> reject(reason = the exception line): dead-lettered
                                                           at once (the broker would after max attempts anyway)
    handler raised a BaseException (SystemExit ...)     -> release, and the worker stops (HandlerFailedError)
    hard stop while it ran                              -> left alone: the lock expires or leaving frees it

`max_delivery_attempts` is the value this worker passes as the group setting (it applies when this
worker creates the group; `Admin.alter_share_group` changes an existing group, and a worker told a
different number only rejects earlier or later than the broker would dead-letter).

Stopping (stop(), SIGTERM/SIGINT): no new message starts; running ones get `grace_ms`; then the
consumer is closed: pending acknowledgements are committed and the member leaves the group, so the
messages it held but did not finish are available to the others at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Protocol

from logbroker.client.metadata_cache import LogThrottle
from logbroker.client.queue.message import QueueMessage
from logbroker.client.responder import ReplySender, reply_headers, settle_replied
from logbroker.errors import LogbrokerError
from logbroker.storage.record_batch import Message
from logbroker.worker.runtime import (
    GRACE_MS_MAX,
    WAIT_SLICE_MS,
    WORKERS_MAX,
    HandlerFailedError,
    _resolve_handler,
)
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

log = logging.getLogger("logbroker.worker")

MAX_DELIVERY_ATTEMPTS_DEFAULT = 5
REASON_CHARS_MAX = 1024  # share_headers.REASON_TEXT_MAX_CHARS: the broker refuses longer
CLOSE_TIMEOUT_MS_MIN = 1_000


class ShareConsumer(Protocol):
    """What the queue runtime needs of a consumer (logbroker.QueueConsumer)."""

    max_poll_records: int

    def poll(self, timeout_ms: int = 1000) -> list[QueueMessage]: ...

    def close(self, timeout_ms: int | None = None) -> None: ...


ShareConsumerFactory = Callable[[], ShareConsumer]


@dataclass
class QueueWorkerStats:
    processed: int = 0  # handler returned: acked
    released: int = 0  # handler raised before the last attempt: released (redelivered after backoff)
    rejected: int = 0  # handler raised on the last attempt: rejected (dead-lettered)
    handed_back: int = 0  # taken, never started: given back by leaving the group
    unfinished: int = 0  # still running when the grace period ended


def as_message(m: QueueMessage) -> Message:
    """The handler's argument: a plain logbroker.Message (picklable for --processes)."""
    return Message(m.topic, m.partition, m.offset, m.key, m.value, m.headers, m.timestamp)


def settle_failure(m: QueueMessage, failure: Failure, max_delivery_attempts: int) -> str:
    """Release or reject `m` after its handler failed; returns "released" or "rejected"."""
    if not failure.fatal and m.delivery_count >= max_delivery_attempts:
        m.reject(failure.error[:REASON_CHARS_MAX])
        return "rejected"
    m.release()
    return "released"


class QueueWorker:
    """Runs `handler(message)` for the messages of share group `group` on `workers` threads or processes.

    `run()` blocks until `stop()` (or SIGTERM/SIGINT on the main thread) and returns QueueWorkerStats;
    it raises HandlerFailedError when the handler raised a BaseException (SystemExit ...) or a child
    process could not load it.
    """

    def __init__(
        self,
        handler: HandlerRef,
        *,
        group: str,
        topics: Sequence[str],
        bootstrap: str | Sequence[str] | None = None,
        workers: int = 1,
        processes: bool = False,
        grace_ms: int = 20_000,
        poll_timeout_ms: int = 500,
        max_delivery_attempts: int = MAX_DELIVERY_ATTEMPTS_DEFAULT,
        consumer_config: dict[str, Any] | None = None,
        consumer_factory: ShareConsumerFactory | None = None,
    ) -> None:
        """`consumer_config`: QueueConsumer keyword arguments (lock_ms, retry_backoff_ms,
        retry_backoff_max_ms, dead_letter_topic, auto_offset_reset ...), group settings included."""
        if not group:
            raise ValueError("a worker needs a group")
        if isinstance(topics, str) or not topics:
            raise ValueError("a queue worker needs at least one topic (no --pattern with --queue)")
        if not 1 <= workers <= WORKERS_MAX:
            raise ValueError(f"workers must be between 1 and {WORKERS_MAX}, got {workers}")
        if not 0 <= grace_ms <= GRACE_MS_MAX:
            raise ValueError(f"grace_ms must be between 0 and {GRACE_MS_MAX}, got {grace_ms}")
        if not 1 <= poll_timeout_ms <= 10_000:
            raise ValueError("poll_timeout_ms must be within 1..10000")
        if max_delivery_attempts < 1:
            raise ValueError(f"max_delivery_attempts must be > 0, got {max_delivery_attempts}")
        self._handler: HandlerRef = _resolve_handler(handler, processes)
        self.group = group
        self.topics = list(topics)
        self.workers = workers
        self.processes = processes
        self.max_delivery_attempts = max_delivery_attempts
        self._bootstrap = bootstrap
        self._grace_s = grace_ms / 1000
        self._poll_timeout_ms = poll_timeout_ms
        self._consumer_config = {"max_delivery_attempts": max_delivery_attempts, **(consumer_config or {})}
        self._factory = consumer_factory or self._default_consumer

        self._queue: deque[QueueMessage] = deque()
        self._running = 0
        self._cond = threading.Condition(threading.Lock())
        self._stop = threading.Event()
        self._hard_stop = threading.Event()
        self._draining = False  # under _cond: no new message starts
        self._closing = False  # under _cond: slot threads exit
        self._fatal: HandlerFailedError | None = None
        self._started = False
        self._threads: list[threading.Thread] = []
        self._slots: list[Slot] = []
        self.stats = QueueWorkerStats()
        self._log = LogThrottle(log)
        self._replies: ReplySender | None = None

    # -- control ---------------------------------------------------------------------------------

    def stop(self, grace_ms: int | None = None) -> None:
        """Stop gracefully (thread- and signal-safe). grace_ms=0: at once, abandoning running messages."""
        self._stop.set()
        if grace_ms is not None and grace_ms <= 0:
            self._hard_stop.set()

    @contextlib.contextmanager
    def signals_stop(self) -> Iterator[None]:
        """While inside: the first SIGTERM/SIGINT stops gracefully, a second one at once. Main thread only."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                log.warning("%s again: stopping now; running messages go back to the group", name)
                self._hard_stop.set()
            else:
                log.info("%s: finishing running messages (up to %.0f s), then stopping", name, self._grace_s)
                self._stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- the poll thread -------------------------------------------------------------------------

    def run(self) -> QueueWorkerStats:
        """Process messages until stop(), a signal (with signals_stop()) or a fatal handler failure."""
        if self._started:
            raise RuntimeError("a QueueWorker runs once")
        self._started = True
        self._start_slots()
        consumer: ShareConsumer | None = None
        error: BaseException | None = None
        try:
            consumer = self._factory()
            log.info("queue worker of share group %s on %s: %d %s, dead-lettering after %d attempts",
                     self.group, ",".join(self.topics), self.workers,
                     "processes" if self.processes else "threads", self.max_delivery_attempts)
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

    def _poll_loop(self, consumer: ShareConsumer) -> None:
        while not self._stop.is_set() and self._fatal is None:
            with self._cond:
                free = self.workers - len(self._queue) - self._running
                if free <= 0:
                    self._cond.wait(WAIT_SLICE_MS / 1000)  # a finished message frees a slot
                    continue
            consumer.max_poll_records = free
            try:
                messages = consumer.poll(self._poll_timeout_ms)
            except LogbrokerError as e:
                self._log.warning("poll", "share group %s: poll failed (retrying): %s", self.group, e)
                self._stop.wait(WAIT_SLICE_MS / 1000)
                continue
            if messages:
                with self._cond:
                    self._queue.extend(messages)
                    self._cond.notify_all()

    def _shutdown(self, consumer: ShareConsumer | None) -> None:
        deadline = time.monotonic() + self._grace_s
        with self._cond:
            self._draining = True
            self.stats.handed_back += len(self._queue)
            self._queue.clear()  # given back by leaving the group
            while self._running and not self._hard_stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, WAIT_SLICE_MS / 1000))
            running = self._running
        if running:
            self.stats.unfinished += running
            log.warning("%d messages still running after the %.0f s grace period: they go back to the group",
                        running, self._grace_s)
        self._hard_stop.set()
        if consumer is not None:
            try:  # commits the pending acknowledgements, then leaves the group
                consumer.close(int(max(CLOSE_TIMEOUT_MS_MIN / 1000, deadline - time.monotonic()) * 1000))
            except LogbrokerError as e:
                log.warning("closing the queue consumer failed: %s", e)
        self._stop_slots()
        if self._replies is not None:
            self._replies.close(close_metadata=True)
        s = self.stats
        log.info("queue worker stopped: %d acked, %d released, %d rejected, %d handed back, %d unfinished",
                 s.processed, s.released, s.rejected, s.handed_back, s.unfinished)

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
                    if not self._draining and self._queue:
                        m = self._queue.popleft()
                        self._running += 1
                        break
                    self._cond.wait()
            try:
                self._handle(slot, m)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()

    def _handle(self, slot: Slot, m: QueueMessage) -> None:
        outcome = slot.run(as_message(m), self._hard_stop)
        where = f"{m.topic}-{m.partition}@{m.offset}"
        if outcome is None:
            if reply_headers(m) is None:
                m.ack()
            elif not settle_replied(self._reply_sender(), m, slot.result):
                with self._cond:
                    self.stats.released += 1
                return
            with self._cond:
                self.stats.processed += 1
            return
        if not isinstance(outcome, Failure):  # ABANDONED: hard stop; leaving the group gives it back
            return
        settled = settle_failure(m, outcome, self.max_delivery_attempts)
        with self._cond:
            if settled == "rejected":
                self.stats.rejected += 1
            else:
                self.stats.released += 1
            if outcome.fatal and self._fatal is None:
                self._fatal = HandlerFailedError(f"handler failed on {where}: {outcome.error}")
                self._draining = True
                self._cond.notify_all()
        if settled == "rejected":
            log.error("handler failed on %s on its last attempt (%d of %d): dead-lettering it: %s\n%s", where,
                      m.delivery_count, self.max_delivery_attempts, outcome.error, outcome.traceback.rstrip())
        else:
            log.warning("handler failed on %s (attempt %d of %d), released for a retry: %s", where,
                        m.delivery_count, self.max_delivery_attempts, outcome.error)

    def _reply_sender(self) -> ReplySender:
        """The sender of replies, made on the first request (a worker with no requests opens nothing)."""
        with self._cond:
            if self._replies is None:
                from logbroker.client.metadata_cache import MetadataCache
                from logbroker.config import default_bootstrap

                bootstrap = self._bootstrap if self._bootstrap is not None else default_bootstrap()
                self._replies = ReplySender(MetadataCache(bootstrap))
            return self._replies

    # -- the consumer ----------------------------------------------------------------------------

    def _default_consumer(self) -> ShareConsumer:
        from logbroker.client.queue import QueueConsumer
        from logbroker.config import default_bootstrap

        bootstrap = self._bootstrap if self._bootstrap is not None else default_bootstrap()
        consumer: ShareConsumer = QueueConsumer(bootstrap, self.group, self.topics, max_poll_records=self.workers,
                                                **self._consumer_config)
        return consumer
