"""Where a handler runs: one record at a time per slot, in the slot's thread or in its child process.

The runtime owns one thread per slot; the thread takes a record from the window and calls
`slot.run(message, hard_stop)`, which returns None (the handler returned), a `Failure`, or
`ABANDONED` (hard stop while the record ran in a child process, which is killed). After a None,
`slot.result` is what the handler returned (from a child process: when it pickles, else None);
`logbroker worker --queue` sends it as the reply to a request (client/responder.py).

`ThreadSlot` calls the handler in the calling thread. A running handler cannot be interrupted: at a
hard stop the runtime stops waiting for it (its thread is a daemon) and the record stays uncommitted.

`ProcessSlot` keeps one child process (multiprocessing "spawn": no fork of a process that holds gRPC
threads) and talks to it over a pipe::

    parent                               child (child_main)
    start(): spawn ───────────────────>  ignore SIGINT/SIGTERM (the parent decides when children stop),
                                          load the handler (a `module:function` string or a pickled
             <───────────── ("ready",)    callable), or reply ("error", line, traceback) and exit
    run():   Message ─────────────────>  handler(message)
             <── ("ok", result) | ("ok",) (result None or unpicklable) | ("failed", line, traceback)
                 | ("fatal", line, traceback) then exit
    close(): None ────────────────────>  exit; killed if still alive after the timeout

A child that dies while handling a record (a crash, os._exit, the OOM killer) counts as a failed
attempt; the next attempt respawns it. A child whose parent died sees EOF on the pipe and exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final, Protocol

from logbroker.storage.record_batch import Message
from logbroker.worker.handler import Handler, load_handler

log = logging.getLogger("logbroker.worker")

HandlerRef = str | Handler  # a `module:function` string, or a callable (pickled by reference for processes)

CHILD_START_TIMEOUT_MS = 60_000
CHILD_POLL_INTERVAL_MS = 50
CHILD_EXIT_TIMEOUT_MS = 2_000


@dataclass(frozen=True)
class Failure:
    """A failed attempt. `fatal`: do not retry (the handler raised a BaseException such as SystemExit,
    or a child process could not load the handler)."""

    error: str  # one line: "ValueError: bad input"
    traceback: str = ""
    fatal: bool = False


class _Abandoned:
    def __repr__(self) -> str:
        return "ABANDONED"


ABANDONED: Final = _Abandoned()
Outcome = Failure | _Abandoned | None


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def call_handler(handler: Handler, message: Message) -> tuple[Failure | None, Any]:
    """(None, what the handler returned) or (its Failure, None)."""
    try:
        return None, handler(message)
    except Exception as e:
        return Failure(describe(e), traceback.format_exc()), None
    except BaseException as e:  # SystemExit and friends: the handler wants out, do not retry
        return Failure(describe(e), traceback.format_exc(), fatal=True), None


class Slot(Protocol):
    result: Any  # what the handler returned, after a run() that returned None

    def start(self) -> None: ...

    def wait_ready(self, timeout_s: float) -> Failure | None: ...

    def run(self, message: Message, hard_stop: threading.Event) -> Outcome: ...

    def close(self, timeout_s: float) -> None: ...


class ThreadSlot:
    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self.result: Any = None

    def start(self) -> None:
        pass

    def wait_ready(self, timeout_s: float) -> Failure | None:
        return None

    def run(self, message: Message, hard_stop: threading.Event) -> Outcome:
        failure, self.result = call_handler(self._handler, message)
        return failure

    def close(self, timeout_s: float) -> None:
        pass


def child_main(conn: Connection, handler_ref: HandlerRef) -> None:
    """Entry point of a worker child process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        handler = load_handler(handler_ref) if isinstance(handler_ref, str) else handler_ref
    except BaseException as e:
        conn.send(("error", describe(e), traceback.format_exc()))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone
        if message is None:
            return
        failure, result = call_handler(handler, message)
        try:
            if failure is None:
                _send_ok(conn, result)
            else:
                conn.send(("fatal" if failure.fatal else "failed", failure.error, failure.traceback))
        except (BrokenPipeError, OSError):
            return
        if failure is not None and failure.fatal:
            return


def _send_ok(conn: Connection, result: Any) -> None:
    """("ok", result), or ("ok",) when there is none or it does not pickle (pickling precedes the write)."""
    if result is not None:
        try:
            conn.send(("ok", result))
            return
        except (pickle.PicklingError, TypeError, AttributeError):
            pass
    conn.send(("ok",))


class ProcessSlot:
    def __init__(self, handler: HandlerRef, name: str) -> None:
        self._handler = handler
        self._name = name
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None  # multiprocessing.process.BaseProcess
        self._conn: Connection | None = None
        self._ready = False
        self.result: Any = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Spawn the child (returns at once; `wait_ready` waits for it to load the handler)."""
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=child_main, args=(child_conn, self._handler), name=self._name, daemon=True)
        proc.start()
        child_conn.close()
        self._proc, self._conn, self._ready = proc, parent_conn, False

    def wait_ready(self, timeout_s: float) -> Failure | None:
        if self._ready:
            return None
        if self._proc is None:
            self.start()
        conn = self._conn
        assert conn is not None
        try:
            if not conn.poll(timeout_s):
                self._kill()
                return Failure(f"worker process did not start within {timeout_s:.0f}s", fatal=True)
            reply = conn.recv()
        except (EOFError, OSError):
            return Failure(f"worker process failed to start (exit code {self._reap()})", fatal=True)
        if reply[0] != "ready":
            self._reap()
            return Failure(f"worker process could not load the handler: {reply[1]}", reply[2], fatal=True)
        self._ready = True
        return None

    def run(self, message: Message, hard_stop: threading.Event) -> Outcome:
        if not self._ready:
            failure = self.wait_ready(CHILD_START_TIMEOUT_MS / 1000)
            if failure is not None:
                return failure
        conn = self._conn
        assert conn is not None
        try:
            conn.send(message)
            while not conn.poll(CHILD_POLL_INTERVAL_MS / 1000):
                if hard_stop.is_set():
                    self._kill()
                    return ABANDONED
            reply = conn.recv()
        except (EOFError, OSError):
            return Failure(f"worker process died while handling the record (exit code {self._reap()})")
        if reply[0] == "ok":
            self.result = reply[1] if len(reply) > 1 else None
            return None
        if reply[0] == "fatal":
            self._reap()
        return Failure(reply[1], reply[2], fatal=reply[0] == "fatal")

    def _reap(self) -> int | None:
        """Forget the child (it exited or is being killed); the next run() spawns a new one."""
        proc, self._proc, self._ready = self._proc, None, False
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        proc.join(CHILD_EXIT_TIMEOUT_MS / 1000)
        if proc.exitcode is None:
            proc.kill()
            proc.join(CHILD_EXIT_TIMEOUT_MS / 1000)
        code: int | None = proc.exitcode
        return code

    def _kill(self) -> None:
        if self._proc is not None and self._proc.exitcode is None:
            self._proc.kill()
        self._reap()

    def close(self, timeout_s: float) -> None:
        """Ask the child to exit; kill it if it has not after `timeout_s`. Not while run() is in progress."""
        proc, conn = self._proc, self._conn
        if proc is None:
            return
        if conn is not None:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        proc.join(max(timeout_s, 0))
        if proc.exitcode is None:
            proc.kill()
        self._reap()


def wait_all_ready(slots: list[Slot], timeout_s: float) -> Failure | None:
    """Start every slot at once (children spawn in parallel), then wait for each."""
    for slot in slots:
        slot.start()
    deadline = time.monotonic() + timeout_s
    for slot in slots:
        failure = slot.wait_ready(max(0.0, deadline - time.monotonic()))
        if failure is not None:
            return failure
    return None


SLOT_JOIN_TIMEOUT_MS = 2_000
THREAD_JOIN_TIMEOUT_MS = 200


def make_slots(handler: HandlerRef, workers: int, processes: bool) -> list[Slot]:
    """`workers` slots running `handler`: child processes (the caller then waits for them with
    `wait_all_ready`) or threads."""
    if processes:
        return [ProcessSlot(handler, f"logbroker-worker-{i}") for i in range(workers)]
    assert callable(handler)
    return [ThreadSlot(handler) for _ in range(workers)]


def run_slot_threads(slots: list[Slot], slot_main: Callable[[Slot], None]) -> list[threading.Thread]:
    """One daemon thread per slot, running `slot_main(slot)`."""
    threads = []
    for i, slot in enumerate(slots):
        t = threading.Thread(target=slot_main, args=(slot,), name=f"logbroker-worker-{i}", daemon=True)
        t.start()
        threads.append(t)
    return threads


def join_slots(threads: list[threading.Thread], slots: list[Slot], processes: bool) -> None:
    """After the slot threads were told to return: wait for them a moment (a child process's slot
    thread returns within CHILD_POLL_INTERVAL_MS of the hard stop; a thread still inside a handler
    does not return at all: it is abandoned), then close the slots."""
    join_ms = SLOT_JOIN_TIMEOUT_MS if processes else THREAD_JOIN_TIMEOUT_MS
    deadline = time.monotonic() + join_ms / 1000
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for t in threads:
        if t.is_alive():
            log.warning("%s is still in the handler; abandoning it", t.name)
    for slot in slots:
        slot.close(SLOT_JOIN_TIMEOUT_MS / 1000)
