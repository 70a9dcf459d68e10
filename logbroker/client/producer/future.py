"""The futures a producer hands out, as Kafka's `FutureRecordMetadata` / `ProduceRequestResult`.

Every record of one batch shares the batch's `_BatchResult` (its base offset, append time or error,
set once when the batch completes); a `FutureRecordMetadata` is three slots pointing at it (no
`concurrent.futures.Future` per record), a `FutureRecordsMetadata` (one `send_many` call) holds a
(batch result, first delta, count) segment per batch. Callbacks run on the thread that completes the
batch (the sender's), or at once in the caller's thread if it is already done.

A batch whose records were re-routed (reroute.py: its topic grew) gets `moved`, where each record
went (another batch's result and delta), and completes once all of those have: a future follows
`moved` to the result of the batch its record finally landed in (`_resolve`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from logbroker.errors import KafkaTimeoutError

log = logging.getLogger(__name__)

_monotonic = time.monotonic  # result(timeout) waits in real time, as concurrent.futures does


class RecordMetadata(NamedTuple):
    """Where a record landed. `offset` is -1 with acks=0."""

    topic: str
    partition: int
    offset: int
    timestamp: int


class FutureTimeoutError(KafkaTimeoutError, TimeoutError):
    """`result()` / `exception()` timed out (also a builtin TimeoutError, as concurrent.futures raises)."""


# ---------------------------------------------------------------------------------------------
# Futures

# Guards every _BatchResult's done flag, event and callbacks. Taken once per batch completion and
# per waiter / callback registration, never per send().
_RESULT_LOCK = threading.Lock()


class _BatchResult:
    """The completion shared by every record of one batch."""

    __slots__ = ("topic", "partition", "base_offset", "log_append_time_ms", "error", "done",
                 "_event", "_callbacks", "moved")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition
        self.base_offset = -1
        self.log_append_time_ms = -1
        self.error: BaseException | None = None
        self.done = False
        self._event: threading.Event | None = None
        self._callbacks: list[tuple[Callable[[Any], object], Any]] | None = None
        # re-routed: record delta -> (the result, delta) it went to (module doc); set before done
        self.moved: list[tuple[_BatchResult, int]] | None = None

    def wait(self, timeout: float | None) -> bool:
        if self.done:
            return True
        with _RESULT_LOCK:
            if self.done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def add_callback(self, fn: Callable[[Any], object], future: Any) -> bool:
        """Store the callback; False if the result is already done (the caller runs it)."""
        with _RESULT_LOCK:
            if self.done:
                return False
            if self._callbacks is None:
                self._callbacks = []
            self._callbacks.append((fn, future))
            return True

    def complete(self, base_offset: int, log_append_time_ms: int, error: BaseException | None) -> None:
        with _RESULT_LOCK:
            if self.done:
                return
            self.base_offset = base_offset
            self.log_append_time_ms = log_append_time_ms
            self.error = error
            self.done = True
            event = self._event
            callbacks = self._callbacks
            self._callbacks = None
        if event is not None:
            event.set()
        if callbacks:
            for fn, fut in callbacks:
                _run_callback(fn, fut)


def forward(old: _BatchResult, routes: list[tuple[_BatchResult, int]]) -> None:
    """`old`'s records now live at routes[delta]; `old` completes once every one of those results
    has (module doc). Call without the producer's lock: it may complete `old` and run callbacks."""
    old.moved = routes
    targets = list({id(r): r for r, _ in routes}.values())
    pending = [len(targets)]

    def one_done(_: object) -> None:
        with _RESULT_LOCK:
            pending[0] -= 1
            last = pending[0] == 0
        if last:
            old.complete(-1, -1, None)

    for r in targets:
        if not r.add_callback(one_done, None):
            one_done(None)


def _resolve(r: _BatchResult, delta: int) -> tuple[_BatchResult, int]:
    """The result and delta where record `delta` of `r` finally went (itself if never re-routed)."""
    while r.moved is not None:
        r, delta = r.moved[delta]
    return r, delta


def _run_callback(fn: Callable[[Any], object], fut: Any) -> None:
    try:
        fn(fut)
    except Exception:
        log.exception("exception calling callback for %r", fut)


class FutureRecordMetadata:
    """The future of one sent record, with the `concurrent.futures.Future` API.

    `result()` returns RecordMetadata or raises the delivery error; callbacks get this future as
    their one argument and run on the producer's sender thread (or at once, in the caller's thread,
    if the record is already done).
    """

    __slots__ = ("_result", "_delta", "_timestamp")

    def __init__(self, result: _BatchResult, delta: int, timestamp: int) -> None:
        self._result = result
        self._delta = delta
        self._timestamp = timestamp

    def done(self) -> bool:
        return self._result.done

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return not self._result.done

    def cancel(self) -> bool:
        """Records cannot be taken back once sent: always False."""
        return False

    def result(self, timeout: float | None = None) -> RecordMetadata:
        r = self._result
        if not r.done and not r.wait(timeout):
            raise FutureTimeoutError(f"record not delivered within {timeout} s")
        delta = self._delta
        if r.moved is not None:
            r, delta = _resolve(r, delta)
        if r.error is not None:
            raise r.error
        offset = r.base_offset + delta if r.base_offset >= 0 else -1
        ts = r.log_append_time_ms if r.log_append_time_ms >= 0 else self._timestamp
        return RecordMetadata(r.topic, r.partition, offset, ts)

    get = result  # kafka-python spelling

    def exception(self, timeout: float | None = None) -> BaseException | None:
        r = self._result
        if not r.done and not r.wait(timeout):
            raise FutureTimeoutError(f"record not delivered within {timeout} s")
        if r.moved is not None:
            r = _resolve(r, self._delta)[0]
        return r.error

    def add_done_callback(self, fn: Callable[[FutureRecordMetadata], object]) -> None:
        if not self._result.add_callback(fn, self):
            _run_callback(fn, self)

    def __repr__(self) -> str:
        r = self._result
        state = "pending" if not r.done else ("error" if r.error is not None else "done")
        return f"<FutureRecordMetadata {r.topic}-{r.partition} +{self._delta} {state}>"


def failed_future(topic: str, partition: int, error: BaseException, timestamp: int = -1) -> FutureRecordMetadata:
    r = _BatchResult(topic, partition)
    r.complete(-1, -1, error)
    return FutureRecordMetadata(r, 0, timestamp)


class FutureRecordsMetadata:
    """The future of one `send_many` call, with the `concurrent.futures.Future` API.

    Done when every batch holding a record of the call is done. `result()` returns the records'
    RecordMetadata in the order they were given (built on the first call, then kept), or raises the
    error of the first failed record in that order; `exception()` returns that error. Callbacks get
    this future as their one argument and run once, on the producer's sender thread (or at once, in
    the caller's thread, if the call is already done).

    It holds one (batch result, first offset delta, record count) segment per batch the call's
    records went into, in the order they were appended, and `order`, the input position of each
    appended record when that order differs (keyed records grouped per partition); nothing per record.
    """

    __slots__ = ("_topic", "_segments", "_order", "_timestamp", "_count", "_metadata")

    def __init__(
        self, topic: str, segments: list[tuple[_BatchResult, int, int]], order: list[int] | None,
        timestamp: int, count: int,
    ) -> None:
        self._topic = topic
        self._segments = segments
        self._order = order
        self._timestamp = timestamp
        self._count = count
        self._metadata: list[RecordMetadata] | None = None

    def __len__(self) -> int:
        """How many records the call sent."""
        return self._count

    def done(self) -> bool:
        return all(r.done for r, _, _ in self._segments)

    def cancelled(self) -> bool:
        return False

    def running(self) -> bool:
        return not self.done()

    def cancel(self) -> bool:
        """Records cannot be taken back once sent: always False."""
        return False

    def _wait(self, timeout: float | None) -> None:
        deadline = None if timeout is None else _monotonic() + timeout
        for r, _, _ in self._segments:
            if r.done:
                continue
            remaining = None if deadline is None else max(0.0, deadline - _monotonic())
            if not r.wait(remaining):
                raise FutureTimeoutError(f"{self._count} record(s) not delivered within {timeout} s")

    def _final_segments(self) -> list[tuple[_BatchResult, int, int]]:
        """The segments, a re-routed one split per record into where each went (segments all done)."""
        segments = self._segments
        if all(r.moved is None for r, _, _ in segments):
            return segments
        out: list[tuple[_BatchResult, int, int]] = []
        for r, delta, n in segments:
            if r.moved is None:
                out.append((r, delta, n))
            else:
                out.extend((*_resolve(r, d), 1) for d in range(delta, delta + n))
        return out

    def _first_error(self) -> BaseException | None:
        """The error of the failed record that came first in the input (segments all done)."""
        order = self._order
        best: tuple[int, BaseException] | None = None
        at = 0
        for r, _, n in self._final_segments():
            if r.error is not None:
                # within a segment the input order is kept: its first record comes first
                pos = at if order is None else order[at]
                if best is None or pos < best[0]:
                    best = (pos, r.error)
                if order is None:
                    break
            at += n
        return None if best is None else best[1]

    def runs(self, timeout: float | None = None) -> list[tuple[int, int, int]]:
        """The records' places as (partition, first offset, count) runs, in the order they were
        appended (input order unless keyed records were grouped per partition: `result()` then), one
        per batch they went into, without an object per record; raises as `result()` does. An offset
        is -1 when the producer did not wait for it (acks=0)."""
        self._wait(timeout)
        error = self._first_error()
        if error is not None:
            raise error
        return [(r.partition, r.base_offset + delta if r.base_offset >= 0 else -1, n)
                for r, delta, n in self._segments]

    def result(self, timeout: float | None = None) -> list[RecordMetadata]:
        """Every record's RecordMetadata, in input order; raises the first failed record's error."""
        if self._metadata is not None:
            return self._metadata
        self._wait(timeout)
        error = self._first_error()
        if error is not None:
            raise error
        topic = self._topic
        timestamp = self._timestamp
        out: list[RecordMetadata] = []
        for r, delta, n in self._final_segments():
            ts = r.log_append_time_ms if r.log_append_time_ms >= 0 else timestamp
            if r.base_offset >= 0:
                base = r.base_offset + delta
                out.extend([RecordMetadata(topic, r.partition, o, ts) for o in range(base, base + n)])
            else:
                out.extend([RecordMetadata(topic, r.partition, -1, ts)] * n)
        order = self._order
        if order is not None:
            placed: list[RecordMetadata] = [None] * len(out)  # type: ignore[list-item]
            for pos, md in zip(order, out, strict=True):
                placed[pos] = md
            out = placed
        self._metadata = out
        return out

    get = result  # kafka-python spelling

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait(timeout)
        return self._first_error()

    def add_done_callback(self, fn: Callable[[FutureRecordsMetadata], object]) -> None:
        results = [r for r, _, _ in self._segments]
        pending = [len(results)]

        def one_done(_: object) -> None:
            with _RESULT_LOCK:
                pending[0] -= 1
                last = pending[0] == 0
            if last:
                _run_callback(fn, self)

        if not results:
            _run_callback(fn, self)
            return
        for r in results:
            if not r.add_callback(one_done, self):
                one_done(None)

    def __repr__(self) -> str:
        done = sum(1 for r, _, _ in self._segments if r.done)
        return f"<FutureRecordsMetadata {self._topic} {self._count} record(s), {done}/{len(self._segments)} batches done>"


def failed_records_future(topic: str, partition: int, error: BaseException, count: int,
                          timestamp: int = -1) -> FutureRecordsMetadata:
    r = _BatchResult(topic, partition)
    r.complete(-1, -1, error)
    return FutureRecordsMetadata(topic, [(r, 0, count)], None, timestamp, count)
